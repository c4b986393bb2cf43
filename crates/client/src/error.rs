//! Typed errors. Callers match on variants instead of interpreting status codes.

use std::time::Duration;

/// Everything that can go wrong talking to a Durable Streams server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `404`: the stream (or the fork source) does not exist.
    #[error("stream not found: {url}")]
    NotFound { url: String },
    /// `410`: the stream was deleted but is kept for its forks, or the offset
    /// is before the retained data.
    #[error("stream gone: {url}")]
    Gone { url: String },
    /// `409` that is neither a closed stream nor a sequence problem: a create
    /// with a different configuration, a content-type mismatch, ...
    #[error("conflict at {url}: {message}")]
    Conflict { url: String, message: String },
    /// `409` with `Stream-Closed: true`: the stream is closed, nothing more
    /// can be appended. `final_offset` is the stream's final tail.
    #[error("stream is closed (final offset {})", final_offset.as_deref().unwrap_or("unknown"))]
    StreamClosed { final_offset: Option<String> },
    /// `403` to an idempotent producer: another session owns a newer epoch.
    #[error("stale producer epoch; the server's current epoch is {current}")]
    StaleEpoch { current: u64 },
    /// `409` to an idempotent producer: a sequence number was skipped.
    #[error("producer sequence gap: expected {expected}, received {received}")]
    SequenceGap { expected: u64, received: u64 },
    /// `409` because a `Stream-Seq` value was not greater than the last one.
    #[error("Stream-Seq conflict at {url}: {message}")]
    SequenceConflict { url: String, message: String },
    /// `429` after the retry budget was spent.
    #[error("rate limited (retry after {retry_after:?})")]
    RateLimited { retry_after: Option<Duration> },
    /// `400`: the server rejected the request (bad offset, invalid JSON, empty body, ...).
    #[error("bad request to {url}: {message}")]
    BadRequest { url: String, message: String },
    /// `413`: the body is larger than the server accepts.
    #[error("payload too large for {url}")]
    PayloadTooLarge { url: String },
    /// Any other unexpected status (including persistent `5xx`).
    #[error("unexpected HTTP status {status} from {url}: {message}")]
    Status {
        status: u16,
        url: String,
        message: String,
    },
    /// The connection failed, was reset, or the body could not be read.
    #[error("network error: {0}")]
    Network(#[source] reqwest::Error),
    /// A response arrived but did not make sense: invalid JSON in a JSON
    /// stream, a malformed SSE control event, a missing header, ...
    #[error("could not parse the response: {0}")]
    Parse(String),
    /// An argument was rejected before any request was made.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The idempotent producer was closed, or stopped after an earlier error.
    #[error("producer is closed")]
    ProducerClosed,
    /// The idempotent producer stopped after an earlier fatal error; see `restart`.
    #[error("producer failed earlier: {0}")]
    ProducerFailed(String),
    /// Local I/O (offset store files).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The HTTP status behind this error, when there was a response.
    pub fn status(&self) -> Option<u16> {
        Some(match self {
            Error::NotFound { .. } => 404,
            Error::Gone { .. } => 410,
            Error::Conflict { .. }
            | Error::StreamClosed { .. }
            | Error::SequenceGap { .. }
            | Error::SequenceConflict { .. } => 409,
            Error::StaleEpoch { .. } => 403,
            Error::RateLimited { .. } => 429,
            Error::BadRequest { .. } => 400,
            Error::PayloadTooLarge { .. } => 413,
            Error::Status { status, .. } => *status,
            Error::Network(e) => return e.status().map(|s| s.as_u16()),
            _ => return None,
        })
    }

    /// True for failures worth retrying: network errors, `429` and `5xx`.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Network(_) | Error::RateLimited { .. } => true,
            Error::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Shorthand for `Result<T, durable_streams_client::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
