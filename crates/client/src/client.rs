//! The shared HTTP client: connection pool, static and dynamic headers, retry policy.

use crate::error::{Error, Result};
use crate::retry::{parse_retry_after, RetryPolicy};
use bytes::Bytes;
use durable_streams_protocol::{headers as h, parse};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// A closure evaluated before every HTTP request to produce a header value
/// (for example a freshly refreshed `Authorization` token). `None` omits the
/// header for that request.
pub type HeaderFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// A cheap-to-clone handle on a connection pool and request configuration.
/// Every [`DurableStream`](crate::DurableStream), read and
/// [`IdempotentProducer`](crate::IdempotentProducer) made from it sends its
/// static and dynamic headers on every request.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    headers: HeaderMap,
    dynamic: Vec<(HeaderName, HeaderFn)>,
    params: Vec<(String, HeaderFn)>,
    retry: RetryPolicy,
    timeout: Option<Duration>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("headers", &self.inner.headers.keys().collect::<Vec<_>>())
            .field(
                "dynamic_headers",
                &self
                    .inner
                    .dynamic
                    .iter()
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>(),
            )
            .field(
                "dynamic_params",
                &self.inner.params.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("retry", &self.inner.retry)
            .finish()
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    /// A client with default settings.
    pub fn new() -> Client {
        // Building the default configuration cannot fail (no TLS backend to load).
        ClientBuilder::default().build_inner(reqwest::Client::new())
    }

    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The retry policy used for retryable operations.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    /// Builds the headers for one HTTP request: static, then dynamic (evaluated
    /// now), then the request's own (which win).
    pub(crate) fn request_headers(&self, own: &HeaderMap) -> HeaderMap {
        let mut out = self.inner.headers.clone();
        for (name, f) in &self.inner.dynamic {
            if let Some(v) = f() {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    out.insert(name.clone(), v);
                }
            }
        }
        for (name, v) in own {
            out.insert(name.clone(), v.clone());
        }
        out
    }

    /// The request URL with the dynamic query parameters (evaluated now) appended.
    pub(crate) fn request_url(&self, url: &Url) -> Url {
        if self.inner.params.is_empty() {
            return url.clone();
        }
        let mut out = url.clone();
        {
            let mut q = out.query_pairs_mut();
            for (name, f) in &self.inner.params {
                if let Some(v) = f() {
                    q.append_pair(name, &v);
                }
            }
        }
        out
    }

    /// Sends one request, retrying network errors, `429` and `5xx` per the
    /// policy when `retry` is set. Returns the final response whatever its
    /// status; transport failures become [`Error::Network`].
    pub(crate) async fn execute(
        &self,
        req: &Req,
        retry: Option<&RetryPolicy>,
    ) -> Result<reqwest::Response> {
        let mut attempt = 0u32;
        loop {
            let mut rb = self
                .inner
                .http
                .request(req.method.clone(), self.request_url(&req.url))
                .headers(self.request_headers(&req.headers));
            if let Some(body) = &req.body {
                rb = rb.body(body.clone());
            }
            if !req.live {
                if let Some(t) = self.inner.timeout {
                    rb = rb.timeout(t);
                }
            }
            let outcome = rb.send().await;
            let policy = match retry {
                Some(p) if attempt < p.max_retries => p,
                _ => return outcome.map_err(Error::Network),
            };
            let retry_after = match &outcome {
                Ok(resp) if is_retryable_status(resp.status()) => resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
                Ok(_) => return outcome.map_err(Error::Network),
                Err(_) => None,
            };
            tokio::time::sleep(policy.delay(attempt, retry_after)).await;
            attempt += 1;
        }
    }
}

pub(crate) fn is_retryable_status(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error()
}

/// One request, reusable across retries.
#[derive(Debug, Clone)]
pub(crate) struct Req {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// Live reads are not subject to the client's request timeout.
    pub live: bool,
}

impl Req {
    pub fn new(method: Method, url: Url) -> Req {
        Req {
            method,
            url,
            headers: HeaderMap::new(),
            body: None,
            live: false,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl AsRef<str>) -> Result<Req> {
        let v = HeaderValue::from_str(value.as_ref())
            .map_err(|_| Error::InvalidArgument(format!("invalid value for header {name}")))?;
        self.headers.insert(HeaderName::from_static(name), v);
        Ok(self)
    }

    pub fn extra_headers(mut self, extra: &HeaderMap) -> Req {
        for (n, v) in extra {
            self.headers.insert(n.clone(), v.clone());
        }
        self
    }

    pub fn body(mut self, body: Bytes) -> Req {
        self.body = Some(body);
        self
    }
}

/// Configures a [`Client`].
#[derive(Default)]
pub struct ClientBuilder {
    headers: HeaderMap,
    dynamic: Vec<(HeaderName, HeaderFn)>,
    params: Vec<(String, HeaderFn)>,
    retry: Option<RetryPolicy>,
    timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    http: Option<reqwest::Client>,
    error: Option<Error>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ClientBuilder {
    /// A header sent on every request.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                self.headers.insert(n, v);
            }
            _ => self.error = Some(Error::InvalidArgument(format!("invalid header {name}"))),
        }
        self
    }

    /// A header whose value is computed before every request, including each
    /// retry and every idempotent-producer batch.
    pub fn dynamic_header(
        mut self,
        name: &str,
        f: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => self.dynamic.push((n, Arc::new(f))),
            Err(_) => {
                self.error = Some(Error::InvalidArgument(format!(
                    "invalid header name {name}"
                )))
            }
        }
        self
    }

    /// A URL query parameter whose value is computed before every request
    /// (retries and producer batches included), e.g. a request id. `None`
    /// omits it for that request. Stream reads already use `offset`, `live`
    /// and `cursor`: do not reuse those names.
    pub fn dynamic_param(
        mut self,
        name: &str,
        f: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        if name.is_empty() {
            self.error = Some(Error::InvalidArgument("empty query parameter name".into()));
        } else {
            self.params.push((name.to_string(), Arc::new(f)));
        }
        self
    }

    /// Retry policy for retryable operations (default: [`RetryPolicy::default`]).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Timeout for each non-live request (live reads are exempt).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Timeout for establishing a connection (default 10 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = Some(t);
        self
    }

    /// Use this `reqwest::Client` (its own settings apply; `connect_timeout` is ignored).
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    pub fn build(mut self) -> Result<Client> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if let Some(p) = &self.retry {
            p.validate()?;
        }
        let http = match self.http.take() {
            Some(h) => h,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout.unwrap_or(Duration::from_secs(10)))
                .build()
                .map_err(Error::Network)?,
        };
        Ok(self.build_inner(http))
    }

    fn build_inner(self, http: reqwest::Client) -> Client {
        Client {
            inner: Arc::new(Inner {
                http,
                headers: self.headers,
                dynamic: self.dynamic,
                params: self.params,
                retry: self.retry.unwrap_or_default(),
                timeout: self.timeout,
            }),
        }
    }
}

/// What kind of request produced an error response; refines 409 handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ctx {
    Plain,
    /// The request carried `Stream-Seq`.
    StreamSeq,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header_str(headers, name).and_then(|v| v.trim().parse().ok())
}

pub(crate) fn header_string(headers: &HeaderMap, name: &str) -> Option<String> {
    header_str(headers, name).map(str::to_owned)
}

pub(crate) fn is_closed(headers: &HeaderMap) -> bool {
    parse::is_closed_flag(headers.get(h::STREAM_CLOSED).map(|v| v.as_bytes()))
}

/// Turns a non-success response into a typed error (reads its body for the message).
pub(crate) async fn error_from_response(resp: reqwest::Response, ctx: Ctx) -> Error {
    let status = resp.status();
    let url = resp.url().to_string();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap_or_default();
    let message = if body.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        body.trim().chars().take(500).collect()
    };
    match status.as_u16() {
        404 => Error::NotFound { url },
        410 => Error::Gone { url },
        400 => Error::BadRequest { url, message },
        413 => Error::PayloadTooLarge { url },
        429 => Error::RateLimited {
            retry_after: header_str(&headers, "retry-after").and_then(parse_retry_after),
        },
        403 if headers.contains_key(h::PRODUCER_EPOCH) => Error::StaleEpoch {
            current: header_u64(&headers, h::PRODUCER_EPOCH).unwrap_or(0),
        },
        409 if is_closed(&headers) => Error::StreamClosed {
            final_offset: header_string(&headers, h::STREAM_NEXT_OFFSET),
        },
        409 if headers.contains_key(h::PRODUCER_EXPECTED_SEQ) => Error::SequenceGap {
            expected: header_u64(&headers, h::PRODUCER_EXPECTED_SEQ).unwrap_or(0),
            received: header_u64(&headers, h::PRODUCER_RECEIVED_SEQ).unwrap_or(0),
        },
        409 if ctx == Ctx::StreamSeq && message.to_ascii_lowercase().contains("seq") => {
            Error::SequenceConflict { url, message }
        }
        409 => Error::Conflict { url, message },
        s => Error::Status {
            status: s,
            url,
            message,
        },
    }
}
