//! Storage engines for Durable Streams, behind one trait ([`Engine`]).
//!
//! The engine owns everything that must be consistent under concurrency:
//! stream configuration, bytes, closure, idempotent-producer state,
//! `Stream-Seq`, TTL bookkeeping, forks and their reference counts. The HTTP
//! layer only translates requests into these calls and outcomes into
//! responses. Engines know records (one per append, or one per JSON message)
//! but nothing about HTTP.

mod clock;
mod error;
pub mod file;
pub mod memory;
pub mod metrics;
pub mod rules;
mod types;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::StorageError;
pub use file::{FileEngine, FileOptions};
pub use memory::MemoryEngine;
pub use metrics::{Histogram, HistogramSnapshot};
pub use types::*;

use async_trait::async_trait;

/// A storage engine. All methods are safe to call concurrently; an engine
/// serialises work per stream (never globally) and, within a stream, per
/// idempotent producer.
///
/// Offsets are byte positions in the stream's stored representation. A fork
/// shares its source's offsets below its fork offset.
#[async_trait]
pub trait Engine: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a stream, or confirms an existing one whose configuration
    /// matches (`Existed`). Forks resolve their source under the same root.
    async fn create(&self, path: &str, req: CreateRequest) -> Result<CreateOutcome, StorageError>;

    /// Appends records and/or closes, applying idempotent-producer and
    /// `Stream-Seq` rules atomically with the data. Refreshes a sliding TTL.
    async fn append(&self, path: &str, req: AppendRequest) -> Result<AppendOutcome, StorageError>;

    /// Metadata without refreshing a sliding TTL (HEAD).
    async fn head(&self, path: &str) -> Result<StreamMeta, StorageError>;

    /// Reads up to `max_bytes` starting at `from` (cut at a record boundary
    /// for JSON streams; a single record larger than the limit is returned
    /// whole). Refreshes a sliding TTL.
    async fn read(
        &self,
        path: &str,
        from: ReadFrom,
        max_bytes: usize,
    ) -> Result<ReadChunk, StorageError>;

    /// Like [`Engine::read`], but an engine keeping a byte stream's data in
    /// files may leave the bytes there and return the file range instead
    /// (a server then sends them with `sendfile`, without copying). It may
    /// also return fewer bytes than `read` would (a range ends where a file
    /// does). For a JSON stream the range is cut at the same message
    /// boundary as `read`'s and holds the stored `message,` bytes. Engines
    /// without files return `read`'s data.
    async fn read_file(
        &self,
        path: &str,
        from: ReadFrom,
        max_bytes: usize,
    ) -> Result<FileRead, StorageError> {
        let chunk = self.read(path, from, max_bytes).await?;
        Ok(FileRead { chunk, file: None })
    }

    /// Deletes a stream; soft-deletes it while forks still reference it.
    async fn delete(&self, path: &str) -> Result<(), StorageError>;

    /// A change feed for live readers: the receiver sees every change of the
    /// stream's tail and closure, and `gone` once it is deleted or expired.
    /// Does not refresh TTL.
    async fn watch(&self, path: &str)
        -> Result<tokio::sync::watch::Receiver<Signal>, StorageError>;

    /// A change feed of the stream's pending state: the receiver sees every
    /// append the stream accepts (before it is durable, for an engine that
    /// validates before it commits), and `gone` once it is deleted. An
    /// idempotent producer's request waiting for its predecessor watches
    /// this. The default, [`Engine::watch`], suits engines that publish an
    /// append as they accept it.
    async fn watch_accepted(
        &self,
        path: &str,
    ) -> Result<tokio::sync::watch::Receiver<Signal>, StorageError> {
        self.watch(path).await
    }

    /// Frees streams whose expiry has passed. Returns how many were removed.
    async fn sweep_expired(&self) -> usize;

    /// Paths of every addressable stream (subscription glob backfill).
    async fn list_paths(&self) -> Vec<String>;

    /// Flushes and stops background work (called on graceful shutdown).
    async fn shutdown(&self) {}

    /// Engine counters for `/metrics`: `(name, help, value)`.
    fn metrics(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }

    /// Engine histograms for `/metrics` (the file engine's fsync latency
    /// and group-commit batch sizes). Engines without any keep the default.
    fn histograms(&self) -> Vec<HistogramSnapshot> {
        Vec::new()
    }
}
