//! Rust client for the [Durable Streams protocol](https://github.com/durable-streams/durable-streams):
//! durable, append-only byte streams over HTTP.
//!
//! The API follows the TypeScript client:
//!
//! * [`DurableStream`]: create (content type, TTL, expiry, closed, initial
//!   body), connect, head, append (bytes, text, serde values), close (with an
//!   optional final message), delete, fork;
//! * [`stream`] / [`DurableStream::stream`]: reads from an [`Offset`]
//!   (`-1`, `now` or a saved token) with a [`LiveMode`], returning a
//!   [`StreamResponse`] that you collect (`bytes`, `text`, `json`) or consume
//!   batch by batch; closure of the stream ends it;
//! * [`IdempotentProducer`]: exactly-once writes with batching, pipelining,
//!   retries and auto-claim;
//! * [`OffsetStore`] with [`FileOffsetStore`]: resume where a consumer left off.
//!
//! ```no_run
//! use durable_streams_client::{DurableStream, CreateOptions, StreamOptions, LiveMode, stream};
//! # async fn demo() -> durable_streams_client::Result<()> {
//! let url = "http://127.0.0.1:4437/v1/stream/orders/123/events";
//! let log = DurableStream::create(url, CreateOptions::new().json()).await?;
//! log.append_json(&serde_json::json!({"type": "OrderCreated", "total": 99.99})).await?;
//!
//! let events: Vec<serde_json::Value> = stream(url, StreamOptions::new().offset("-1")).await?.json().await?;
//! # let _ = events;
//! let mut live = log.stream(StreamOptions::new().offset("-1").live(LiveMode::Auto)).await?;
//! while let Some(batch) = live.next_batch().await? {
//!     for event in batch.items::<serde_json::Value>()? { println!("{event}"); }
//!     // save batch.offset to resume later
//! }
//! # Ok(()) }
//! ```
//!
//! Retries: `GET`, `HEAD`, `DELETE`, `PUT` and close-only requests are retried
//! on network errors, `429` and `5xx` with jittered exponential backoff that
//! honours `Retry-After` ([`RetryPolicy`]). A plain `append` is never retried
//! (the server may have applied it); producer batches are, since the server
//! deduplicates them.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod client;
mod error;
mod offset_store;
mod producer;
mod read;
mod retry;
pub mod sse;
mod stream;
pub mod text;

pub use client::{Client, ClientBuilder, HeaderFn};
pub use error::{Error, Result};
pub use offset_store::{FileOffsetStore, MemoryOffsetStore, OffsetStore};
pub use producer::{AppendAck, ErrorCallback, IdempotentProducer, ProducerOptions, ProducerStats};
pub use read::{
    stream, Batch, JsonBatch, LiveMode, Offset, StreamOptions, StreamResponse, TextBatch,
};
pub use retry::RetryPolicy;
pub use stream::{
    AppendOptions, AppendOutcome, CloseOutcome, CreateOptions, CreateOutcome, DurableStream,
    ForkOptions, StreamInfo, DEFAULT_CONTENT_TYPE,
};
