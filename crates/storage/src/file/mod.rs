//! The durable file engine. Design, byte layout, invariants and recovery:
//! `docs/storage.md`.

pub mod catalog;
pub mod codec;
mod engine;
mod marks;
pub mod sim;
pub mod vfs;

pub use engine::{FileEngine, FileOptions, FileStats};
