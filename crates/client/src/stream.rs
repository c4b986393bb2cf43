//! `DurableStream`: a handle on one stream URL for create, append, close,
//! head, fork, delete and reads.

use crate::client::{error_from_response, header_string, header_u64, is_closed, Client, Ctx, Req};
use crate::error::{Error, Result};
use crate::producer::{IdempotentProducer, ProducerOptions};
use crate::read::{StreamOptions, StreamResponse};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use durable_streams_protocol::{headers as h, parse};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use url::Url;

/// The content type used when a stream is created without one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// A handle on one stream. Cheap to clone; making one does no I/O.
#[derive(Debug, Clone)]
pub struct DurableStream {
    client: Client,
    url: Url,
    content_type: Arc<Mutex<Option<String>>>,
}

/// Options of [`DurableStream::create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub content_type: Option<String>,
    /// Sliding time-to-live in seconds (`Stream-TTL`).
    pub ttl_secs: Option<u64>,
    /// Absolute expiry (`Stream-Expires-At`).
    pub expires_at: Option<DateTime<Utc>>,
    /// Create the stream already closed; `body` becomes its whole content.
    pub closed: bool,
    /// Initial content, written atomically with the creation.
    pub body: Option<Bytes>,
    /// Extra headers for this request.
    pub headers: HeaderMap,
}

impl CreateOptions {
    pub fn new() -> Self {
        CreateOptions::default()
    }
    pub fn content_type(mut self, ct: impl Into<String>) -> Self {
        self.content_type = Some(ct.into());
        self
    }
    /// Shorthand for `content_type("application/json")`.
    pub fn json(self) -> Self {
        self.content_type("application/json")
    }
    pub fn ttl_secs(mut self, secs: u64) -> Self {
        self.ttl_secs = Some(secs);
        self
    }
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.expires_at = Some(at);
        self
    }
    pub fn closed(mut self, closed: bool) -> Self {
        self.closed = closed;
        self
    }
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }
}

/// Result of a `PUT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOutcome {
    /// `201` (true) or `200`, the stream already existed with this configuration (false).
    pub created: bool,
    /// The tail offset after any initial content.
    pub next_offset: Option<String>,
    pub closed: bool,
}

/// Metadata from `HEAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub content_type: Option<String>,
    /// The tail offset.
    pub next_offset: String,
    pub ttl_secs: Option<u64>,
    pub expires_at: Option<String>,
    pub closed: bool,
    pub etag: Option<String>,
}

/// Result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The tail offset after the append.
    pub next_offset: String,
    /// The stream is now closed.
    pub closed: bool,
}

/// Result of a close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseOutcome {
    /// The stream's final offset.
    pub final_offset: String,
}

/// Options of [`DurableStream::append_with`].
#[derive(Debug, Clone, Default)]
pub struct AppendOptions {
    /// `Stream-Seq`: must be byte-wise greater than the last one accepted.
    pub seq: Option<String>,
    /// Close the stream atomically with this append.
    pub close: bool,
    /// JSON streams only: send the body as is, so a top-level array is stored
    /// as one message per element. Otherwise the body is one message.
    pub json_batch: bool,
    /// Extra headers for this request.
    pub headers: HeaderMap,
}

/// Options of [`DurableStream::fork`].
#[derive(Debug, Clone, Default)]
pub struct ForkOptions {
    /// The divergence point (a server-minted offset); default: the source's tail.
    pub offset: Option<String>,
    /// Messages (JSON) or bytes past `offset` to inherit.
    pub sub_offset: Option<u64>,
    pub ttl_secs: Option<u64>,
    pub expires_at: Option<DateTime<Utc>>,
    pub headers: HeaderMap,
}

impl DurableStream {
    /// A handle using a default [`Client`]. No I/O.
    pub fn new(url: &str) -> Result<DurableStream> {
        DurableStream::with_client(&Client::new(), url)
    }

    /// A handle using `client`. No I/O.
    pub fn with_client(client: &Client, url: &str) -> Result<DurableStream> {
        let url = Url::parse(url)
            .map_err(|e| Error::InvalidArgument(format!("invalid URL {url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::InvalidArgument(format!(
                "unsupported URL scheme {}",
                url.scheme()
            )));
        }
        Ok(DurableStream {
            client: client.clone(),
            url,
            content_type: Arc::new(Mutex::new(None)),
        })
    }

    /// Creates the stream (or confirms it exists with the same configuration)
    /// and returns its handle.
    pub async fn create(url: &str, options: CreateOptions) -> Result<DurableStream> {
        DurableStream::create_with_client(&Client::new(), url, options).await
    }

    /// [`create`](Self::create) with a given client.
    pub async fn create_with_client(
        client: &Client,
        url: &str,
        options: CreateOptions,
    ) -> Result<DurableStream> {
        let s = DurableStream::with_client(client, url)?;
        s.create_stream(options).await?;
        Ok(s)
    }

    /// Checks that the stream exists (`HEAD`) and returns its handle, with the
    /// content type learnt.
    pub async fn connect(url: &str) -> Result<DurableStream> {
        DurableStream::connect_with_client(&Client::new(), url).await
    }

    /// [`connect`](Self::connect) with a given client.
    pub async fn connect_with_client(client: &Client, url: &str) -> Result<DurableStream> {
        let s = DurableStream::with_client(client, url)?;
        s.head().await?;
        Ok(s)
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The content type, if known (learnt from create, connect, head or a read).
    pub fn content_type(&self) -> Option<String> {
        self.content_type.lock().ok().and_then(|g| g.clone())
    }

    /// Declares the stream's content type when it is already known (from an
    /// earlier create or HEAD), so appends and SSE reads need not ask the
    /// server first. No I/O.
    pub fn with_content_type(self, content_type: impl Into<String>) -> Self {
        self.set_content_type(Some(content_type.into()));
        self
    }

    pub(crate) fn set_content_type(&self, ct: Option<String>) {
        if let (Some(ct), Ok(mut g)) = (ct, self.content_type.lock()) {
            *g = Some(ct);
        }
    }

    /// The content type, asking the server once if unknown.
    pub async fn resolve_content_type(&self) -> Result<String> {
        if let Some(ct) = self.content_type() {
            return Ok(ct);
        }
        let info = self.head().await?;
        Ok(info
            .content_type
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string()))
    }

    /// True if the stream is in JSON mode (asks the server once if unknown).
    pub async fn is_json(&self) -> Result<bool> {
        Ok(parse::is_json(&self.resolve_content_type().await?))
    }

    /// `PUT`: creates the stream, or confirms it exists with the same configuration.
    /// Retried on transient failures (a `PUT` is idempotent).
    pub async fn create_stream(&self, o: CreateOptions) -> Result<CreateOutcome> {
        let ct = o
            .content_type
            .clone()
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string());
        let mut req = Req::new(Method::PUT, self.url.clone()).header("content-type", &ct)?;
        if let Some(ttl) = o.ttl_secs {
            req = req.header(h::STREAM_TTL, ttl.to_string())?;
        }
        if let Some(at) = &o.expires_at {
            req = req.header(h::STREAM_EXPIRES_AT, parse::format_expires_at(at))?;
        }
        if o.closed {
            req = req.header(h::STREAM_CLOSED, "true")?;
        }
        if let Some(body) = o.body {
            req = req.body(body);
        }
        let req = req.extra_headers(&o.headers);
        let resp = self
            .client
            .execute(&req, Some(self.client.retry_policy()))
            .await?;
        if !resp.status().is_success() {
            return Err(error_from_response(resp, Ctx::Plain).await);
        }
        self.set_content_type(Some(ct));
        Ok(CreateOutcome {
            created: resp.status().as_u16() == 201,
            next_offset: header_string(resp.headers(), h::STREAM_NEXT_OFFSET),
            closed: is_closed(resp.headers()),
        })
    }

    /// `HEAD`: metadata (tail offset, closure, TTL, expiry). Retried.
    pub async fn head(&self) -> Result<StreamInfo> {
        let req = Req::new(Method::HEAD, self.url.clone());
        let resp = self
            .client
            .execute(&req, Some(self.client.retry_policy()))
            .await?;
        if !resp.status().is_success() {
            return Err(error_from_response(resp, Ctx::Plain).await);
        }
        let hs = resp.headers();
        let info = StreamInfo {
            content_type: header_string(hs, "content-type"),
            next_offset: header_string(hs, h::STREAM_NEXT_OFFSET)
                .ok_or_else(|| Error::Parse("HEAD response without Stream-Next-Offset".into()))?,
            ttl_secs: header_u64(hs, h::STREAM_TTL),
            expires_at: header_string(hs, h::STREAM_EXPIRES_AT),
            closed: is_closed(hs),
            etag: header_string(hs, "etag"),
        };
        self.set_content_type(info.content_type.clone());
        Ok(info)
    }

    /// Appends bytes. On a JSON stream they are one message (a JSON value).
    /// Never retried automatically: use an [`IdempotentProducer`] for safe retries.
    pub async fn append(&self, data: impl Into<Bytes>) -> Result<AppendOutcome> {
        self.append_with(data.into(), AppendOptions::default())
            .await
    }

    /// Appends UTF-8 text (on a JSON stream: one JSON value).
    pub async fn append_text(&self, text: &str) -> Result<AppendOutcome> {
        self.append(Bytes::copy_from_slice(text.as_bytes())).await
    }

    /// Appends one serializable value as one message of a JSON stream.
    pub async fn append_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<AppendOutcome> {
        let body =
            serde_json::to_vec(&[value]).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.append_with(
            body.into(),
            AppendOptions {
                json_batch: true,
                ..AppendOptions::default()
            },
        )
        .await
    }

    /// Appends several values, one message each, in one request.
    pub async fn append_json_batch<T: Serialize>(&self, values: &[T]) -> Result<AppendOutcome> {
        if values.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot append an empty batch".into(),
            ));
        }
        let body = serde_json::to_vec(values).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.append_with(
            body.into(),
            AppendOptions {
                json_batch: true,
                ..AppendOptions::default()
            },
        )
        .await
    }

    /// Appends with options (`Stream-Seq`, close, raw JSON batches, headers).
    pub async fn append_with(&self, data: Bytes, o: AppendOptions) -> Result<AppendOutcome> {
        if data.is_empty() {
            return Err(Error::InvalidArgument("cannot append an empty body".into()));
        }
        let ct = self.resolve_content_type().await?;
        let body = if parse::is_json(&ct) && !o.json_batch {
            wrap_json(&data)
        } else {
            data
        };
        let mut req = Req::new(Method::POST, self.url.clone())
            .header("content-type", &ct)?
            .body(body);
        let mut ctx = Ctx::Plain;
        if let Some(seq) = &o.seq {
            req = req.header(h::STREAM_SEQ, seq)?;
            ctx = Ctx::StreamSeq;
        }
        if o.close {
            req = req.header(h::STREAM_CLOSED, "true")?;
        }
        let req = req.extra_headers(&o.headers);
        // A plain append is not idempotent: never retried.
        let resp = self.client.execute(&req, None).await?;
        if !resp.status().is_success() {
            return Err(error_from_response(resp, ctx).await);
        }
        Ok(AppendOutcome {
            next_offset: header_string(resp.headers(), h::STREAM_NEXT_OFFSET)
                .ok_or_else(|| Error::Parse("append response without Stream-Next-Offset".into()))?,
            closed: is_closed(resp.headers()),
        })
    }

    /// Closes the stream (idempotent; retried). Readers see EOF at the final offset.
    pub async fn close(&self) -> Result<CloseOutcome> {
        let req = Req::new(Method::POST, self.url.clone()).header(h::STREAM_CLOSED, "true")?;
        let resp = self
            .client
            .execute(&req, Some(self.client.retry_policy()))
            .await?;
        if !resp.status().is_success() {
            return Err(error_from_response(resp, Ctx::Plain).await);
        }
        Ok(CloseOutcome {
            final_offset: header_string(resp.headers(), h::STREAM_NEXT_OFFSET)
                .ok_or_else(|| Error::Parse("close response without Stream-Next-Offset".into()))?,
        })
    }

    /// Appends a final message and closes the stream atomically. Not retried
    /// (not idempotent); fails with [`Error::StreamClosed`] if already closed.
    pub async fn close_with(&self, final_message: impl Into<Bytes>) -> Result<CloseOutcome> {
        let out = self
            .append_with(
                final_message.into(),
                AppendOptions {
                    close: true,
                    ..AppendOptions::default()
                },
            )
            .await?;
        Ok(CloseOutcome {
            final_offset: out.next_offset,
        })
    }

    /// `DELETE` (retried; a retry that finds the stream already gone reports `NotFound`).
    pub async fn delete(&self) -> Result<()> {
        let req = Req::new(Method::DELETE, self.url.clone());
        let resp = self
            .client
            .execute(&req, Some(self.client.retry_policy()))
            .await?;
        if !resp.status().is_success() {
            return Err(error_from_response(resp, Ctx::Plain).await);
        }
        Ok(())
    }

    /// Forks this stream into `target` (a full URL, or a path on the same
    /// server). The fork shares this stream's data up to the fork offset.
    pub async fn fork(&self, target: &str, o: ForkOptions) -> Result<DurableStream> {
        let target_url = self
            .url
            .join(target)
            .map_err(|e| Error::InvalidArgument(format!("invalid fork target {target:?}: {e}")))?;
        if target_url.origin() != self.url.origin() {
            return Err(Error::InvalidArgument(
                "a fork must be on the same server as its source".into(),
            ));
        }
        let mut req = Req::new(Method::PUT, target_url.clone())
            .header(h::STREAM_FORKED_FROM, self.url.path())?;
        if let Some(off) = &o.offset {
            req = req.header(h::STREAM_FORK_OFFSET, off)?;
        }
        if let Some(sub) = o.sub_offset {
            req = req.header(h::STREAM_FORK_SUB_OFFSET, sub.to_string())?;
        }
        if let Some(ttl) = o.ttl_secs {
            req = req.header(h::STREAM_TTL, ttl.to_string())?;
        }
        if let Some(at) = &o.expires_at {
            req = req.header(h::STREAM_EXPIRES_AT, parse::format_expires_at(at))?;
        }
        if let Some(ct) = self.content_type() {
            req = req.header("content-type", ct)?;
        }
        let req = req.extra_headers(&o.headers);
        let resp = self
            .client
            .execute(&req, Some(self.client.retry_policy()))
            .await?;
        if !resp.status().is_success() {
            return Err(error_from_response(resp, Ctx::Plain).await);
        }
        let fork = DurableStream::with_client(&self.client, target_url.as_str())?;
        fork.set_content_type(
            header_string(resp.headers(), "content-type").or_else(|| self.content_type()),
        );
        Ok(fork)
    }

    /// Reads the stream (see [`StreamOptions`]).
    pub async fn stream(&self, options: StreamOptions) -> Result<StreamResponse> {
        StreamResponse::start(self.clone(), options).await
    }

    /// An idempotent producer writing to this stream.
    pub fn producer(
        &self,
        producer_id: &str,
        options: ProducerOptions,
    ) -> Result<IdempotentProducer> {
        IdempotentProducer::new(self.clone(), producer_id, options)
    }
}

/// Wraps one JSON value in an array so the server stores it as one message
/// even if it is itself an array.
fn wrap_json(data: &Bytes) -> Bytes {
    // Not one JSON value (e.g. `1,2`, which wrapped would become two
    // messages): send as is and let the server reject it.
    if serde_json::from_slice::<serde::de::IgnoredAny>(data).is_err() {
        return data.clone();
    }
    let mut v = Vec::with_capacity(data.len() + 2);
    v.push(b'[');
    v.extend_from_slice(data);
    v.push(b']');
    v.into()
}
