//! The Durable Streams protocol core: everything about the wire format that
//! does not need I/O. Offsets, header names and value parsing, cursors, JSON
//! mode framing, SSE event encoding and ETags.
//!
//! The server crate maps HTTP onto these functions; the client crate (and
//! tests) use the same functions so both sides agree byte for byte.

pub mod cursor;
pub mod etag;
pub mod headers;
pub mod json;
pub mod offset;
pub mod parse;
pub mod sse;

pub use offset::{Offset, OffsetParam};

/// Errors produced while parsing protocol values. Each carries a short
/// message that the server returns verbatim in a 400 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("malformed offset: {0}")]
    BadOffset(String),
    #[error("invalid Stream-TTL: must be a non-negative decimal integer without leading zeros")]
    BadTtl,
    #[error("invalid Stream-Expires-At: must be an RFC 3339 timestamp")]
    BadExpiresAt,
    #[error("Stream-TTL and Stream-Expires-At are mutually exclusive")]
    TtlAndExpiresAt,
    #[error("invalid producer headers: {0}")]
    BadProducer(&'static str),
    #[error("invalid Stream-Fork-Sub-Offset: must be a non-negative integer")]
    BadSubOffset,
    #[error("invalid JSON: {0}")]
    BadJson(String),
    #[error("empty JSON array is not a valid append")]
    EmptyJsonArray,
}
