//! `client-conformance-adapter`: drives `durable-streams-client` for the
//! Durable Streams client conformance suite.
//!
//! The runner writes one JSON command per line on stdin; the adapter performs
//! it through the client library (never with hand-written HTTP) and answers
//! with exactly one JSON line on stdout. Commands are handled strictly one
//! after the other. stdout carries nothing but replies; diagnostics go to
//! stderr. The protocol is specified in `client-adapter-protocol.md` (shared
//! with the project); the section numbers below refer to it.

use base64::Engine as _;
use bytes::Bytes;
use durable_streams_client::text::Utf8Decoder;
use durable_streams_client::{
    AppendOptions, Batch, Client, CreateOptions, DurableStream, Error, IdempotentProducer,
    LiveMode, ProducerOptions, RetryPolicy, StreamOptions, DEFAULT_CONTENT_TYPE,
};
use futures_util::FutureExt as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Default read budget (§3.5).
const DEFAULT_READ_TIMEOUT_MS: u64 = 5_000;
/// Default `maxChunks` (§3.5).
const DEFAULT_MAX_CHUNKS: usize = 100;
/// Per-request timeout for non-live requests: a hung request must not
/// outlast the runner's 30 s reply timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type Reply = Map<String, Value>;
type Headers = BTreeMap<String, String>;

// ---------------------------------------------------------------------------
// Errors (§4)
// ---------------------------------------------------------------------------

/// A failed command: becomes `{"type":"error", ...}`.
#[derive(Debug, Clone)]
struct Fail {
    code: &'static str,
    status: Option<u16>,
    message: String,
}

impl Fail {
    fn new(code: &'static str, message: impl Into<String>) -> Fail {
        Fail {
            code,
            status: None,
            message: message.into(),
        }
    }
    fn invalid(message: impl Into<String>) -> Fail {
        Fail::new("INVALID_ARGUMENT", message)
    }
}

/// Which command failed: refines how a `400` is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Other,
}

/// Maps a client error to the protocol's error code and status. `what` names
/// the stream (its URL) so every HTTP failure mentions the path.
fn fail_from(e: &Error, op: Op, what: &str) -> Fail {
    let (code, status) = match e {
        Error::NotFound { .. } => ("NOT_FOUND", Some(404)),
        Error::StreamClosed { .. } => ("STREAM_CLOSED", Some(409)),
        Error::SequenceConflict { .. } | Error::SequenceGap { .. } => {
            ("SEQUENCE_CONFLICT", Some(409))
        }
        Error::Conflict { .. } => ("CONFLICT", Some(409)),
        Error::BadRequest { .. } if op == Op::Read => ("INVALID_OFFSET", Some(400)),
        Error::Parse(_) => ("PARSE_ERROR", None),
        Error::InvalidArgument(_) => ("INVALID_ARGUMENT", None),
        Error::Network(err) if err.is_timeout() => ("TIMEOUT", None),
        Error::Network(_) => ("NETWORK_ERROR", None),
        Error::ProducerClosed | Error::ProducerFailed(_) | Error::Io(_) => ("INTERNAL_ERROR", None),
        other => match other.status() {
            Some(s) => ("UNEXPECTED_STATUS", Some(s)),
            None => ("INTERNAL_ERROR", None),
        },
    };
    let message = match status {
        Some(s) => format!("HTTP {s} at {what}: {e}"),
        None => format!("{what}: {e}"),
    };
    Fail {
        code,
        status,
        message,
    }
}

// ---------------------------------------------------------------------------
// Commands (§3). Unknown fields are tolerated; optional fields may be absent.
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitCmd {
    server_url: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateCmd {
    path: String,
    content_type: Option<String>,
    ttl_seconds: Option<u64>,
    expires_at: Option<String>,
    headers: Option<Headers>,
    closed: Option<bool>,
    data: Option<String>,
}

#[derive(Deserialize)]
struct PathCmd {
    path: String,
    headers: Option<Headers>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppendCmd {
    path: String,
    data: String,
    binary: Option<bool>,
    seq: Option<serde_json::Number>,
    headers: Option<Headers>,
    producer_id: Option<String>,
    producer_epoch: Option<serde_json::Number>,
    producer_seq: Option<serde_json::Number>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadCmd {
    path: String,
    offset: Option<String>,
    live: Option<Value>,
    timeout_ms: Option<u64>,
    max_chunks: Option<usize>,
    wait_for_up_to_date: Option<bool>,
    headers: Option<Headers>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CloseCmd {
    path: String,
    data: Option<String>,
    content_type: Option<String>,
    headers: Option<Headers>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProducerCmd {
    path: String,
    producer_id: String,
    epoch: Option<i64>,
    auto_claim: Option<bool>,
    data: Option<String>,
    items: Option<Vec<String>>,
    max_in_flight: Option<i64>,
    headers: Option<Headers>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DynamicCmd {
    name: String,
    value_type: String,
    initial_value: Option<String>,
}

#[derive(Deserialize)]
struct ValidateCmd {
    target: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RetryTarget {
    max_retries: Option<f64>,
    initial_delay_ms: Option<f64>,
    max_delay_ms: Option<f64>,
    multiplier: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProducerTarget {
    producer_id: Option<String>,
    epoch: Option<f64>,
    max_batch_bytes: Option<f64>,
    max_batch_items: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BenchmarkCmd {
    iteration_id: String,
    operation: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BenchOp {
    op: String,
    path: String,
    size: Option<usize>,
    offset: Option<String>,
    live: Option<String>,
    content_type: Option<String>,
    count: Option<usize>,
    concurrency: Option<usize>,
}

fn parse<T: DeserializeOwned>(v: &Value) -> Result<T, Fail> {
    serde_json::from_value(v.clone())
        .map_err(|e| Fail::new("PARSE_ERROR", format!("invalid command: {e}")))
}

// ---------------------------------------------------------------------------
// Dynamic headers and params (§3.13)
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum DynKind {
    Counter(u64),
    Timestamp,
    Token(String),
}

#[derive(Debug)]
struct DynValue {
    name: String,
    kind: DynKind,
}

impl DynValue {
    /// The value for one command (a counter advances).
    fn next(&mut self) -> String {
        match &mut self.kind {
            DynKind::Counter(n) => {
                *n += 1;
                n.to_string()
            }
            DynKind::Timestamp => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
                .to_string(),
            DynKind::Token(t) => t.clone(),
        }
    }
}

/// Values computed once at the start of an `append` or `read`.
#[derive(Debug, Default)]
struct DynSnapshot {
    headers: Vec<(String, String)>,
    params: Vec<(String, String)>,
}

impl DynSnapshot {
    fn report(&self, out: &mut Reply) {
        if !self.headers.is_empty() {
            out.insert("headersSent".into(), pairs_object(&self.headers));
        }
        if !self.params.is_empty() {
            out.insert("paramsSent".into(), pairs_object(&self.params));
        }
    }
}

fn pairs_object(pairs: &[(String, String)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

// ---------------------------------------------------------------------------
// Adapter state (§1.6)
// ---------------------------------------------------------------------------

/// The error that stopped a producer, captured through `on_error` (the
/// producer's own methods then only report "producer failed").
type ErrorSlot = Arc<Mutex<Option<Fail>>>;

struct CachedProducer {
    producer: IdempotentProducer,
    error: ErrorSlot,
}

struct Adapter {
    base: Option<String>,
    http: reqwest::Client,
    content_types: HashMap<String, String>,
    dyn_headers: Vec<DynValue>,
    dyn_params: Vec<DynValue>,
    producers: HashMap<(String, String, u64), CachedProducer>,
}

enum Next {
    Continue,
    Exit,
}

static FRESH_ID: AtomicU64 = AtomicU64::new(0);

/// The retry policy of every client the adapter builds: retries network
/// errors, `429` and `5xx`, bounded so that even a storm of failures is
/// answered well inside the runner's reply timeout (about 7 s of backoff at
/// most, plus at most 2 s per `Retry-After`).
fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        max_retries: 10,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
        multiplier: 2.0,
        max_retry_after: Duration::from_secs(2),
    }
}

fn header_map(pairs: &[(String, String)]) -> Result<HeaderMap, Fail> {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| Fail::invalid(format!("invalid header name {k:?}")))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| Fail::invalid(format!("invalid value for header {k}")))?;
        map.insert(name, value);
    }
    Ok(map)
}

fn ok_reply() -> Reply {
    Map::new()
}

fn is_json(ct: &str) -> bool {
    ct.to_ascii_lowercase().contains("application/json")
}

impl Adapter {
    fn new() -> Adapter {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Adapter {
            base: None,
            http,
            content_types: HashMap::new(),
            dyn_headers: Vec::new(),
            dyn_params: Vec::new(),
            producers: HashMap::new(),
        }
    }

    fn url(&self, path: &str) -> Result<String, Fail> {
        match &self.base {
            Some(b) => Ok(format!("{b}{path}")),
            None => Err(Fail::new("INTERNAL_ERROR", "no init command received yet")),
        }
    }

    /// A client for one command: the shared connection pool, the command's
    /// headers, and (for `append` and `read`) the dynamic values computed for
    /// this command. A command header wins over a dynamic one of the same name.
    fn client(
        &self,
        headers: Option<&Headers>,
        dynamic: Option<&DynSnapshot>,
    ) -> Result<Client, Fail> {
        let mut b = Client::builder()
            .http_client(self.http.clone())
            .retry_policy(retry_policy())
            .timeout(REQUEST_TIMEOUT);
        let own = headers.cloned().unwrap_or_default();
        for (k, v) in &own {
            b = b.header(k, v);
        }
        if let Some(d) = dynamic {
            for (k, v) in &d.headers {
                if own.keys().any(|o| o.eq_ignore_ascii_case(k)) {
                    continue;
                }
                let v = v.clone();
                b = b.dynamic_header(k, move || Some(v.clone()));
            }
            for (k, v) in &d.params {
                let v = v.clone();
                b = b.dynamic_param(k, move || Some(v.clone()));
            }
        }
        b.build()
            .map_err(|e| fail_from(&e, Op::Other, "client configuration"))
    }

    /// A handle on `path`, with its content type when known.
    fn stream(&self, client: &Client, path: &str) -> Result<DurableStream, Fail> {
        let url = self.url(path)?;
        let s =
            DurableStream::with_client(client, &url).map_err(|e| fail_from(&e, Op::Other, &url))?;
        Ok(match self.content_types.get(path) {
            Some(ct) => s.with_content_type(ct.clone()),
            None => s,
        })
    }

    fn snapshot(&mut self) -> DynSnapshot {
        DynSnapshot {
            headers: self
                .dyn_headers
                .iter_mut()
                .map(|d| (d.name.clone(), d.next()))
                .collect(),
            params: self
                .dyn_params
                .iter_mut()
                .map(|d| (d.name.clone(), d.next()))
                .collect(),
        }
    }

    /// Handles one command line; returns the reply line's object.
    async fn handle_line(&mut self, line: &str) -> (Reply, Next) {
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                return (
                    error_reply(
                        "unknown",
                        &Fail::new("PARSE_ERROR", format!("invalid JSON command: {e}")),
                    ),
                    Next::Continue,
                )
            }
        };
        let ty = value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if ty.is_empty() {
            return (
                error_reply(
                    "unknown",
                    &Fail::new("PARSE_ERROR", "command without a \"type\""),
                ),
                Next::Continue,
            );
        }
        let result = match ty.as_str() {
            "init" => self.init(&value),
            "create" => self.create(&value).await,
            "connect" => self.connect(&value).await,
            "append" => self.append(&value).await,
            "read" => self.read(&value).await,
            "head" => self.head(&value).await,
            "delete" => self.delete(&value).await,
            "close" => self.close(&value).await,
            "idempotent-append" => self.idempotent_append(&value).await,
            "idempotent-append-batch" => self.idempotent_append_batch(&value).await,
            "idempotent-close" => self.idempotent_close(&value).await,
            "idempotent-detach" => self.idempotent_detach(&value).await,
            "set-dynamic-header" => self.set_dynamic(&value, true),
            "set-dynamic-param" => self.set_dynamic(&value, false),
            "clear-dynamic" => {
                self.dyn_headers.clear();
                self.dyn_params.clear();
                Ok(ok_reply())
            }
            "validate" => self.validate(&value),
            "benchmark" => self.benchmark(&value).await,
            "shutdown" => {
                let mut r = ok_reply();
                r.insert("type".into(), json!("shutdown"));
                r.insert("success".into(), json!(true));
                return (r, Next::Exit);
            }
            other => Err(Fail::new(
                "NOT_SUPPORTED",
                format!("unsupported command type {other:?}"),
            )),
        };
        match result {
            Ok(mut r) => {
                r.insert("type".into(), json!(ty));
                r.insert("success".into(), json!(true));
                (r, Next::Continue)
            }
            Err(f) => (error_reply(&ty, &f), Next::Continue),
        }
    }

    // -- §2 init ------------------------------------------------------------

    fn init(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: InitCmd = parse(v)?;
        let base = c.server_url.trim_end_matches('/').to_string();
        reqwest::Url::parse(&base)
            .map_err(|e| Fail::invalid(format!("invalid serverUrl {base:?}: {e}")))?;
        self.base = Some(base);
        self.content_types.clear();
        self.dyn_headers.clear();
        self.dyn_params.clear();
        self.producers.clear(); // dropping a handle stops its producer
        let mut r = ok_reply();
        r.insert("clientName".into(), json!("durable-streams-client (Rust)"));
        r.insert("clientVersion".into(), json!(env!("CARGO_PKG_VERSION")));
        r.insert(
            "features".into(),
            json!({
                "batching": true,
                "sse": true,
                "longPoll": true,
                "auto": true,
                "streaming": true,
                "dynamicHeaders": true,
                "retryOptions": true,
                "batchItems": true,
                "strictZeroValidation": true,
            }),
        );
        Ok(r)
    }

    // -- §3.2 create ----------------------------------------------------------

    async fn create(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: CreateCmd = parse(v)?;
        let client = self.client(c.headers.as_ref(), None)?;
        let url = self.url(&c.path)?;
        let s = DurableStream::with_client(&client, &url)
            .map_err(|e| fail_from(&e, Op::Other, &url))?;
        let ct = c
            .content_type
            .clone()
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string());
        let mut o = CreateOptions::new()
            .content_type(ct.clone())
            .closed(c.closed.unwrap_or(false));
        if let Some(ttl) = c.ttl_seconds {
            o = o.ttl_secs(ttl);
        }
        if let Some(at) = &c.expires_at {
            let at = chrono::DateTime::parse_from_rfc3339(at)
                .map_err(|e| Fail::invalid(format!("invalid expiresAt {at:?}: {e}")))?;
            o = o.expires_at(at.with_timezone(&chrono::Utc));
        }
        if let Some(data) = c.data {
            o = o.body(data.into_bytes());
        }
        let out = s
            .create_stream(o)
            .await
            .map_err(|e| fail_from(&e, Op::Other, &url))?;
        self.content_types.insert(c.path, ct);
        let mut r = ok_reply();
        r.insert("status".into(), json!(if out.created { 201 } else { 200 }));
        if let Some(off) = out.next_offset {
            r.insert("offset".into(), json!(off));
        }
        Ok(r)
    }

    // -- §3.3 connect, §3.6 head ---------------------------------------------

    async fn connect(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: PathCmd = parse(v)?;
        let client = self.client(c.headers.as_ref(), None)?;
        let url = self.url(&c.path)?;
        // What `DurableStream::connect` does (a HEAD), keeping the metadata.
        let s = DurableStream::with_client(&client, &url)
            .map_err(|e| fail_from(&e, Op::Other, &url))?;
        let info = s.head().await.map_err(|e| fail_from(&e, Op::Other, &url))?;
        if let Some(ct) = info.content_type {
            self.content_types.insert(c.path.clone(), ct);
        }
        let mut r = ok_reply();
        r.insert("status".into(), json!(200));
        r.insert("offset".into(), json!(info.next_offset));
        Ok(r)
    }

    async fn head(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: PathCmd = parse(v)?;
        let client = self.client(c.headers.as_ref(), None)?;
        let url = self.url(&c.path)?;
        let s = DurableStream::with_client(&client, &url)
            .map_err(|e| fail_from(&e, Op::Other, &url))?;
        let info = s.head().await.map_err(|e| fail_from(&e, Op::Other, &url))?;
        let mut r = ok_reply();
        r.insert("status".into(), json!(200));
        r.insert("offset".into(), json!(info.next_offset));
        r.insert("streamClosed".into(), json!(info.closed));
        if let Some(ct) = &info.content_type {
            r.insert("contentType".into(), json!(ct));
            self.content_types.insert(c.path.clone(), ct.clone());
        }
        if let Some(ttl) = info.ttl_secs {
            r.insert("ttlSeconds".into(), json!(ttl));
        }
        if let Some(at) = &info.expires_at {
            r.insert("expiresAt".into(), json!(at));
        }
        Ok(r)
    }

    // -- §3.7 delete ----------------------------------------------------------

    async fn delete(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: PathCmd = parse(v)?;
        let client = self.client(c.headers.as_ref(), None)?;
        let url = self.url(&c.path)?;
        let s = self.stream(&client, &c.path)?;
        s.delete()
            .await
            .map_err(|e| fail_from(&e, Op::Other, &url))?;
        self.content_types.remove(&c.path);
        let mut r = ok_reply();
        r.insert("status".into(), json!(200));
        Ok(r)
    }

    // -- §3.4 append ----------------------------------------------------------

    async fn append(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: AppendCmd = parse(v)?;
        let url = self.url(&c.path)?;
        let data: Bytes = if c.binary.unwrap_or(false) {
            base64::engine::general_purpose::STANDARD
                .decode(c.data.as_bytes())
                .map_err(|e| Fail::invalid(format!("data is not valid base64: {e}")))?
                .into()
        } else {
            c.data.into_bytes().into()
        };
        let mut extra = Vec::new();
        if let Some(id) = &c.producer_id {
            extra.push(("Producer-Id".to_string(), id.clone()));
        }
        if let Some(e) = &c.producer_epoch {
            extra.push(("Producer-Epoch".to_string(), integer(e, "producerEpoch")?));
        }
        if let Some(s) = &c.producer_seq {
            extra.push(("Producer-Seq".to_string(), integer(s, "producerSeq")?));
        }
        let seq = c.seq.as_ref().map(|s| integer(s, "seq")).transpose()?;
        let dynamic = self.snapshot();
        let client = self.client(c.headers.as_ref(), Some(&dynamic))?;
        let s = self.stream(&client, &c.path)?;
        let opts = AppendOptions {
            seq,
            headers: header_map(&extra)?,
            ..AppendOptions::default()
        };
        // The library never retries a plain append on its own (the server may
        // have applied it). The suite expects transient failures (5xx, 429,
        // dropped connections) to be retried, as the reference client does,
        // so the adapter repeats the library call with the library's backoff.
        let policy = retry_policy();
        let mut attempt = 0;
        let out = loop {
            match s.append_with(data.clone(), opts.clone()).await {
                Ok(out) => break out,
                Err(e) if e.is_retryable() && attempt < policy.max_retries => {
                    let retry_after = match &e {
                        Error::RateLimited { retry_after } => *retry_after,
                        _ => None,
                    };
                    tokio::time::sleep(policy.delay(attempt, retry_after)).await;
                    attempt += 1;
                }
                Err(e) => return Err(fail_from(&e, Op::Other, &url)),
            }
        };
        if let Some(ct) = s.content_type() {
            self.content_types.insert(c.path.clone(), ct);
        }
        let mut r = ok_reply();
        r.insert("status".into(), json!(200));
        r.insert("offset".into(), json!(out.next_offset));
        dynamic.report(&mut r);
        Ok(r)
    }

    // -- §3.5 read ------------------------------------------------------------

    async fn read(&mut self, v: &Value) -> Result<Reply, Fail> {
        let started = tokio::time::Instant::now();
        let c: ReadCmd = parse(v)?;
        let url = self.url(&c.path)?;
        let live = match &c.live {
            None | Some(Value::Bool(false)) | Some(Value::Null) => LiveMode::Off,
            Some(Value::Bool(true)) => LiveMode::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "long-poll" | "longPoll" => LiveMode::LongPoll,
                "sse" => LiveMode::Sse,
                "auto" => LiveMode::Auto,
                other => return Err(Fail::invalid(format!("unknown live mode {other:?}"))),
            },
            Some(other) => return Err(Fail::invalid(format!("unknown live mode {other}"))),
        };
        // Capped: the runner's own reply timeout is far below an hour.
        let budget = Duration::from_millis(
            c.timeout_ms
                .unwrap_or(DEFAULT_READ_TIMEOUT_MS)
                .min(3_600_000),
        );
        let deadline = started + budget;
        let max_chunks = c.max_chunks.unwrap_or(DEFAULT_MAX_CHUNKS);
        let wait_up_to_date = c.wait_for_up_to_date.unwrap_or(false);
        let requested = c.offset.clone().unwrap_or_else(|| "-1".to_string());

        let dynamic = self.snapshot();
        let client = self.client(c.headers.as_ref(), Some(&dynamic))?;
        let s = self.stream(&client, &c.path)?;
        let mut r = ok_reply();
        dynamic.report(&mut r);
        let timed_out_catch_up = || {
            Fail::new(
                "TIMEOUT",
                format!(
                    "{url}: catch-up read did not finish within {} ms",
                    c.timeout_ms.unwrap_or(DEFAULT_READ_TIMEOUT_MS)
                ),
            )
        };

        let opts = StreamOptions::new().offset(requested.as_str()).live(live);
        let mut res = match tokio::time::timeout_at(deadline, s.stream(opts)).await {
            Ok(Ok(res)) => res,
            Ok(Err(e)) => return Err(fail_from(&e, Op::Read, &url)),
            Err(_) if live == LiveMode::Off => return Err(timed_out_catch_up()),
            Err(_) => {
                // No response at all within the budget: an empty, up-to-date success.
                r.insert("status".into(), json!(200));
                r.insert("chunks".into(), json!([]));
                r.insert("offset".into(), json!(requested));
                r.insert("upToDate".into(), json!(true));
                r.insert("streamClosed".into(), json!(false));
                return Ok(r);
            }
        };
        if let Some(ct) = res.content_type() {
            self.content_types.insert(c.path.clone(), ct.to_string());
        }
        let mut chunks: Vec<Value> = Vec::new();
        let mut text = ChunkText::default();
        let mut timed_out = false;
        while chunks.len() < max_chunks {
            match tokio::time::timeout_at(deadline, res.next_batch()).await {
                Err(_) => {
                    timed_out = true;
                    break;
                }
                Ok(Err(e)) => return Err(fail_from(&e, Op::Read, &url)),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(batch))) => {
                    if let Some(chunk) = text
                        .chunk(&batch)
                        .map_err(|m| Fail::new("PARSE_ERROR", format!("{url}: {m}")))?
                    {
                        chunks.push(chunk);
                    }
                    if live != LiveMode::Off && wait_up_to_date && batch.up_to_date {
                        break;
                    }
                }
            }
        }
        if timed_out && live == LiveMode::Off {
            return Err(timed_out_catch_up());
        }
        if let Some(rest) = text.leftover(res.offset()) {
            chunks.push(rest);
        }
        let status = match res.status() {
            0 => 200,
            s => s,
        };
        r.insert("status".into(), json!(status));
        r.insert("chunks".into(), Value::Array(chunks));
        r.insert("offset".into(), json!(res.offset()));
        r.insert("upToDate".into(), json!(timed_out || res.up_to_date()));
        r.insert("streamClosed".into(), json!(res.closed()));
        Ok(r)
    }

    // -- §3.8 close -----------------------------------------------------------

    async fn close(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: CloseCmd = parse(v)?;
        let client = self.client(c.headers.as_ref(), None)?;
        let url = self.url(&c.path)?;
        let mut s = self.stream(&client, &c.path)?;
        if let Some(ct) = &c.content_type {
            s = s.with_content_type(ct.clone());
        }
        let out = match c.data {
            Some(data) => s.close_with(data.into_bytes()).await,
            None => s.close().await,
        }
        .map_err(|e| fail_from(&e, Op::Other, &url))?;
        let mut r = ok_reply();
        r.insert("finalOffset".into(), json!(out.final_offset));
        Ok(r)
    }

    // -- §3.9–3.12 idempotent producer ----------------------------------------

    fn producer_options(
        &self,
        c: &ProducerCmd,
        slot: &ErrorSlot,
        url: &str,
    ) -> Result<ProducerOptions, Fail> {
        let epoch = c.epoch.unwrap_or(0);
        if epoch < 0 {
            return Err(Fail::invalid("epoch must be >= 0"));
        }
        let slot = slot.clone();
        let url = url.to_string();
        Ok(ProducerOptions {
            epoch: epoch as u64,
            auto_claim: c.auto_claim.unwrap_or(false),
            max_in_flight: 1,
            linger: Duration::ZERO,
            on_error: Some(Arc::new(move |e: &Error| {
                if let Ok(mut g) = slot.lock() {
                    *g = Some(fail_from(e, Op::Other, &url));
                }
            })),
            ..ProducerOptions::default()
        })
    }

    /// The cached producer for (path, producerId, epoch), created on first use.
    fn cached_producer(&mut self, c: &ProducerCmd) -> Result<&CachedProducer, Fail> {
        let key = (
            c.path.clone(),
            c.producer_id.clone(),
            c.epoch.unwrap_or(0).max(0) as u64,
        );
        if !self.producers.contains_key(&key) {
            let url = self.url(&c.path)?;
            let client = self.client(c.headers.as_ref(), None)?;
            let s = self.stream(&client, &c.path)?;
            let error = ErrorSlot::default();
            let opts = self.producer_options(c, &error, &url)?;
            let producer = s
                .producer(&c.producer_id, opts)
                .map_err(|e| producer_arg_fail(&e))?;
            self.producers
                .insert(key.clone(), CachedProducer { producer, error });
        }
        self.producers
            .get(&key)
            .ok_or_else(|| Fail::new("INTERNAL_ERROR", "producer cache"))
    }

    fn evict(&mut self, c: &ProducerCmd) {
        self.producers.remove(&(
            c.path.clone(),
            c.producer_id.clone(),
            c.epoch.unwrap_or(0).max(0) as u64,
        ));
    }

    async fn idempotent_append(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: ProducerCmd = parse(v)?;
        let url = self.url(&c.path)?;
        let data = c
            .data
            .clone()
            .ok_or_else(|| Fail::invalid("idempotent-append needs data"))?;
        let cached = self.cached_producer(&c)?;
        let result = cached.producer.send(data.into_bytes()).await;
        let ack = match result {
            Ok(ack) => ack,
            Err(e) => {
                let f = producer_fail(&e, &cached.error, &url);
                self.evict(&c);
                return Err(f);
            }
        };
        let mut r = ok_reply();
        r.insert("status".into(), json!(200));
        if let Some(off) = ack.offset {
            r.insert("offset".into(), json!(off));
        }
        r.insert("duplicate".into(), json!(ack.duplicate));
        r.insert("producerEpoch".into(), json!(ack.epoch));
        r.insert("producerSeq".into(), json!(ack.seq));
        Ok(r)
    }

    async fn idempotent_append_batch(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: ProducerCmd = parse(v)?;
        let url = self.url(&c.path)?;
        let items = c.items.clone().unwrap_or_default();
        let max_in_flight = c.max_in_flight.unwrap_or(1).max(1) as usize;
        let client = self.client(c.headers.as_ref(), None)?;
        let s = self.stream(&client, &c.path)?;
        let error = ErrorSlot::default();
        let mut opts = self.producer_options(&c, &error, &url)?;
        opts.max_in_flight = max_in_flight;
        if max_in_flight <= 1 {
            // Everything in one batch: nothing leaves before flush seals it.
            opts.max_batch_bytes = 64 * 1024 * 1024;
            opts.linger = Duration::from_secs(1);
        } else {
            // One item per request, so that several are in flight at once.
            opts.max_batch_bytes = 1;
            opts.linger = Duration::ZERO;
        }
        let p = s
            .producer(&c.producer_id, opts)
            .map_err(|e| producer_arg_fail(&e))?;
        let mut result = Ok(());
        for item in items {
            if let Err(e) = p.append(item.into_bytes()) {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() {
            result = p.flush().await;
        }
        let detached = p.detach().await;
        if let Err(e) = result.and(detached) {
            return Err(producer_fail(&e, &error, &url));
        }
        let stats = p.stats();
        let mut r = ok_reply();
        r.insert("status".into(), json!(200));
        if stats.next_seq > 0 {
            r.insert("producerSeq".into(), json!(stats.next_seq - 1));
        }
        r.insert("producerEpoch".into(), json!(stats.epoch));
        if let Some(off) = stats.last_offset {
            r.insert("offset".into(), json!(off));
        }
        Ok(r)
    }

    async fn idempotent_close(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: ProducerCmd = parse(v)?;
        let url = self.url(&c.path)?;
        let cached = self.cached_producer(&c)?;
        // The library makes close idempotent: a repeated close returns the
        // first outcome without sending its (new) final message.
        match cached.producer.close(c.data.clone().map(Bytes::from)).await {
            Ok(out) => {
                let mut r = ok_reply();
                r.insert("status".into(), json!(200));
                r.insert("finalOffset".into(), json!(out.final_offset));
                Ok(r)
            }
            Err(e) => {
                let f = producer_fail(&e, &cached.error, &url);
                self.evict(&c);
                Err(f)
            }
        }
    }

    async fn idempotent_detach(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: ProducerCmd = parse(v)?;
        let url = self.url(&c.path)?;
        self.cached_producer(&c)?;
        let key = (
            c.path.clone(),
            c.producer_id.clone(),
            c.epoch.unwrap_or(0).max(0) as u64,
        );
        let Some(cached) = self.producers.remove(&key) else {
            return Err(Fail::new("INTERNAL_ERROR", "producer cache"));
        };
        cached
            .producer
            .detach()
            .await
            .map_err(|e| producer_fail(&e, &cached.error, &url))?;
        let mut r = ok_reply();
        r.insert("status".into(), json!(200));
        Ok(r)
    }

    // -- §3.13 dynamic headers and params -------------------------------------

    fn set_dynamic(&mut self, v: &Value, header: bool) -> Result<Reply, Fail> {
        let c: DynamicCmd = parse(v)?;
        let kind = match (c.value_type.as_str(), header) {
            ("counter", _) => DynKind::Counter(0),
            ("timestamp", _) => DynKind::Timestamp,
            ("token", true) => DynKind::Token(c.initial_value.clone().unwrap_or_default()),
            (other, _) => return Err(Fail::invalid(format!("unsupported valueType {other:?}"))),
        };
        if header {
            HeaderName::from_bytes(c.name.as_bytes())
                .map_err(|_| Fail::invalid(format!("invalid header name {:?}", c.name)))?;
        } else if c.name.is_empty() {
            return Err(Fail::invalid("empty parameter name"));
        }
        let list = if header {
            &mut self.dyn_headers
        } else {
            &mut self.dyn_params
        };
        list.retain(|d| {
            if header {
                !d.name.eq_ignore_ascii_case(&c.name)
            } else {
                d.name != c.name
            }
        });
        list.push(DynValue { name: c.name, kind });
        Ok(ok_reply())
    }

    // -- §3.14 validate -------------------------------------------------------

    fn validate(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: ValidateCmd = parse(v)?;
        match c.target.get("target").and_then(Value::as_str) {
            Some("retry-options") => {
                let t: RetryTarget = parse(&c.target)?;
                validate_retry(&t)?;
            }
            Some("idempotent-producer") => {
                let t: ProducerTarget = parse(&c.target)?;
                let base = self
                    .base
                    .clone()
                    .unwrap_or_else(|| "http://127.0.0.1:1".to_string());
                validate_producer(&t, &format!("{base}/validate"))?;
            }
            other => {
                return Err(Fail::new(
                    "NOT_SUPPORTED",
                    format!("unsupported validate target {other:?}"),
                ))
            }
        }
        Ok(ok_reply())
    }

    // -- §3.15 benchmark ------------------------------------------------------

    async fn benchmark(&mut self, v: &Value) -> Result<Reply, Fail> {
        let c: BenchmarkCmd = parse(v)?;
        let op: BenchOp = parse(&c.operation)?;
        let url = self.url(&op.path)?;
        let client = self.client(None, None)?;
        let bench_fail = |e: Error| {
            let mut f = fail_from(&e, Op::Other, &url);
            f.code = "INTERNAL_ERROR";
            f
        };
        let mut metrics = Map::new();
        let elapsed = match op.op.as_str() {
            "append" => {
                let s = self.stream(&client, &op.path)?;
                let ct = s.resolve_content_type().await.map_err(bench_fail)?;
                self.content_types.insert(op.path.clone(), ct.clone());
                let size = op.size.unwrap_or(100);
                let body = payload(size, is_json(&ct));
                let t = Instant::now();
                s.append(body).await.map_err(bench_fail)?;
                let d = t.elapsed();
                metrics.insert("bytesTransferred".into(), json!(size));
                d
            }
            "read" => {
                let s = self.stream(&client, &op.path)?;
                let t = Instant::now();
                let opts = StreamOptions::new().offset(op.offset.as_deref().unwrap_or("-1"));
                let bytes = s
                    .stream(opts)
                    .await
                    .map_err(bench_fail)?
                    .bytes()
                    .await
                    .map_err(bench_fail)?;
                let d = t.elapsed();
                metrics.insert("bytesTransferred".into(), json!(bytes.len()));
                d
            }
            "create" => {
                let s = DurableStream::with_client(&client, &url).map_err(bench_fail)?;
                let ct = op
                    .content_type
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string());
                let t = Instant::now();
                s.create_stream(CreateOptions::new().content_type(ct.clone()))
                    .await
                    .map_err(bench_fail)?;
                let d = t.elapsed();
                self.content_types.insert(op.path.clone(), ct);
                d
            }
            "roundtrip" => {
                let ct = op
                    .content_type
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string());
                let live = match op.live.as_deref() {
                    Some("sse") => LiveMode::Sse,
                    _ => LiveMode::LongPoll,
                };
                let size = op.size.unwrap_or(100);
                let s = DurableStream::with_client(&client, &url).map_err(bench_fail)?;
                let created = s
                    .create_stream(CreateOptions::new().content_type(ct.clone()))
                    .await
                    .map_err(bench_fail)?;
                self.content_types.insert(op.path.clone(), ct.clone());
                let start_offset = created.next_offset.unwrap_or_else(|| "-1".to_string());
                let body = payload(size, is_json(&ct));
                let t = Instant::now();
                let read = async {
                    let mut res = s
                        .stream(
                            StreamOptions::new()
                                .offset(start_offset.as_str())
                                .live(live),
                        )
                        .await?;
                    while let Some(b) = res.next_batch().await? {
                        if !b.is_empty() {
                            return Ok(b.data.len());
                        }
                    }
                    Err(Error::Parse(
                        "the stream ended before the data arrived".into(),
                    ))
                };
                let write = s.append(body);
                let work = async { tokio::join!(read, write) };
                let (got, wrote) = tokio::time::timeout(Duration::from_secs(20), work)
                    .await
                    .map_err(|_| {
                        Fail::new("INTERNAL_ERROR", format!("{url}: roundtrip timed out"))
                    })?;
                wrote.map_err(bench_fail)?;
                let n = got.map_err(bench_fail)?;
                let d = t.elapsed();
                metrics.insert("bytesTransferred".into(), json!(n));
                d
            }
            "throughput_append" => {
                let count = op.count.unwrap_or(1000);
                let size = op.size.unwrap_or(100);
                let s = DurableStream::with_client(&client, &url).map_err(bench_fail)?;
                let ct = match self.content_types.get(&op.path) {
                    Some(ct) => ct.clone(),
                    None => DEFAULT_CONTENT_TYPE.to_string(),
                };
                match s
                    .create_stream(CreateOptions::new().content_type(ct.clone()))
                    .await
                {
                    Ok(_) | Err(Error::Conflict { .. }) => {}
                    Err(e) => return Err(bench_fail(e)),
                }
                let ct = s.resolve_content_type().await.map_err(bench_fail)?;
                self.content_types.insert(op.path.clone(), ct.clone());
                let body = payload(size, is_json(&ct));
                let id = format!(
                    "bench-{}-{}",
                    std::process::id(),
                    FRESH_ID.fetch_add(1, Ordering::Relaxed)
                );
                let opts = ProducerOptions {
                    max_in_flight: op.concurrency.unwrap_or(1).max(1),
                    auto_claim: true,
                    ..ProducerOptions::default()
                };
                let t = Instant::now();
                let p = s.producer(&id, opts).map_err(bench_fail)?;
                let mut sent = Ok(());
                for _ in 0..count {
                    if let Err(e) = p.append(body.clone()) {
                        sent = Err(e);
                        break;
                    }
                }
                let flushed = match sent {
                    Ok(()) => p.flush().await,
                    Err(e) => Err(e),
                };
                let d = t.elapsed();
                let _ = p.detach().await;
                flushed.map_err(bench_fail)?;
                let secs = d.as_secs_f64().max(1e-9);
                metrics.insert("messagesProcessed".into(), json!(count));
                metrics.insert("bytesTransferred".into(), json!(count * size));
                metrics.insert("opsPerSecond".into(), json!(count as f64 / secs));
                metrics.insert("bytesPerSecond".into(), json!((count * size) as f64 / secs));
                d
            }
            "throughput_read" => {
                let s = self.stream(&client, &op.path)?;
                let t = Instant::now();
                let mut res = s.stream(StreamOptions::new()).await.map_err(bench_fail)?;
                let (mut messages, mut bytes) = (0usize, 0usize);
                while let Some(b) = res.next_batch().await.map_err(bench_fail)? {
                    bytes += b.data.len();
                    messages += if b.json {
                        b.raw_items().map_err(bench_fail)?.len()
                    } else {
                        usize::from(!b.is_empty())
                    };
                    if b.up_to_date {
                        break;
                    }
                }
                let d = t.elapsed();
                let secs = d.as_secs_f64().max(1e-9);
                metrics.insert("messagesProcessed".into(), json!(messages));
                metrics.insert("bytesTransferred".into(), json!(bytes));
                metrics.insert("opsPerSecond".into(), json!(messages as f64 / secs));
                metrics.insert("bytesPerSecond".into(), json!(bytes as f64 / secs));
                d
            }
            other => {
                return Err(Fail::new(
                    "NOT_SUPPORTED",
                    format!("unsupported benchmark op {other:?}"),
                ))
            }
        };
        let mut r = ok_reply();
        r.insert("iterationId".into(), json!(c.iteration_id));
        r.insert("durationNs".into(), json!(elapsed.as_nanos().to_string()));
        if !metrics.is_empty() {
            r.insert("metrics".into(), Value::Object(metrics));
        }
        Ok(r)
    }
}

/// A number sent as a header value: must be an integer, written in plain decimal.
fn integer(n: &serde_json::Number, field: &str) -> Result<String, Fail> {
    if let Some(u) = n.as_u64() {
        Ok(u.to_string())
    } else if let Some(i) = n.as_i64() {
        Ok(i.to_string())
    } else {
        Err(Fail::invalid(format!("{field} must be an integer")))
    }
}

/// `size` bytes of filler; for JSON streams a JSON string of about that size.
fn payload(size: usize, json: bool) -> Bytes {
    if json {
        let mut v = Vec::with_capacity(size.max(2));
        v.push(b'"');
        v.resize(size.max(2) - 1, b'x');
        v.push(b'"');
        Bytes::from(v)
    } else {
        Bytes::from(vec![b'x'; size.max(1)])
    }
}

/// The typed error behind a producer failure: the producer reports later
/// failures as `ProducerFailed`, the original one reached `on_error`.
fn producer_fail(e: &Error, slot: &ErrorSlot, url: &str) -> Fail {
    match e {
        Error::ProducerFailed(_) | Error::ProducerClosed => {
            if let Some(f) = slot.lock().ok().and_then(|g| g.clone()) {
                return f;
            }
            fail_from(e, Op::Other, url)
        }
        other => fail_from(other, Op::Other, url),
    }
}

fn producer_arg_fail(e: &Error) -> Fail {
    Fail::invalid(format!("producer rejected: {e}"))
}

/// A non-negative whole number, or an error naming `field`.
fn whole(v: f64, field: &str) -> Result<u64, Fail> {
    if !v.is_finite() || v < 0.0 || v.fract() != 0.0 {
        return Err(Fail::invalid(format!(
            "{field} must be a non-negative integer (got {v})"
        )));
    }
    Ok(v as u64)
}

/// A duration given in (possibly fractional) milliseconds.
fn millis(v: f64, field: &str) -> Result<Duration, Fail> {
    Duration::try_from_secs_f64(v / 1000.0)
        .map_err(|_| Fail::invalid(format!("{field} is out of range (got {v})")))
}

/// §3.14 retry options: the values must convert to the library's
/// `RetryPolicy` (no negative counts or delays, a positive initial delay),
/// and the policy must pass the library's validation.
fn validate_retry(t: &RetryTarget) -> Result<(), Fail> {
    let d = RetryPolicy::default();
    let max_retries = match t.max_retries {
        None => d.max_retries,
        Some(v) => u32::try_from(whole(v, "maxRetries")?)
            .map_err(|_| Fail::invalid("maxRetries is too large"))?,
    };
    let initial_backoff = match t.initial_delay_ms {
        None => d.initial_backoff,
        Some(v) if v > 0.0 => millis(v, "initialDelayMs")?,
        Some(v) => {
            return Err(Fail::invalid(format!(
                "initialDelayMs must be > 0 (got {v})"
            )))
        }
    };
    let max_backoff = match t.max_delay_ms {
        None => d.max_backoff,
        Some(v) if v >= 0.0 => millis(v, "maxDelayMs")?,
        Some(v) => {
            return Err(Fail::invalid(format!(
                "maxDelayMs must be >= initialDelayMs (got {v})"
            )))
        }
    };
    let multiplier = t.multiplier.unwrap_or(d.multiplier);
    let policy = RetryPolicy {
        max_retries,
        initial_backoff,
        max_backoff,
        multiplier,
        ..d
    };
    Client::builder()
        .retry_policy(policy)
        .build()
        .map(|_| ())
        .map_err(|e| {
            let msg = e.to_string();
            let field = if msg.contains("multiplier") {
                "multiplier"
            } else {
                "maxDelayMs"
            };
            Fail::invalid(format!("{field}: {msg}"))
        })
}

/// §3.14 producer options: construct an `IdempotentProducer` (no I/O).
fn validate_producer(t: &ProducerTarget, url: &str) -> Result<(), Fail> {
    let d = ProducerOptions::default();
    let epoch = match t.epoch {
        None => 0,
        Some(v) => whole(v, "epoch")?,
    };
    let max_batch_bytes = match t.max_batch_bytes {
        None => d.max_batch_bytes,
        Some(v) => usize::try_from(whole(v, "maxBatchBytes")?)
            .map_err(|_| Fail::invalid("maxBatchBytes is too large"))?,
    };
    let max_batch_items = match t.max_batch_items {
        None => d.max_batch_items,
        Some(v) => usize::try_from(whole(v, "maxBatchItems")?)
            .map_err(|_| Fail::invalid("maxBatchItems is too large"))?,
    };
    let id = t
        .producer_id
        .clone()
        .unwrap_or_else(|| "validate-producer".to_string());
    let opts = ProducerOptions {
        epoch,
        max_batch_bytes,
        max_batch_items,
        ..d
    };
    let s = DurableStream::new(url).map_err(|e| Fail::invalid(e.to_string()))?;
    match IdempotentProducer::new(s, &id, opts) {
        Ok(_producer) => Ok(()), // dropped unused: it stops without any request
        Err(e) => {
            let msg = e.to_string();
            let field = [
                ("producer id", "producerId"),
                ("max_batch_bytes", "maxBatchBytes"),
                ("max_batch_items", "maxBatchItems"),
                ("max_in_flight", "maxInFlight"),
                ("epoch", "epoch"),
            ]
            .iter()
            .find(|(needle, _)| msg.contains(needle))
            .map_or("options", |(_, f)| f);
            Err(Fail::invalid(format!("{field}: {msg}")))
        }
    }
}

// ---------------------------------------------------------------------------
// Read chunks (§3.5)
// ---------------------------------------------------------------------------

/// Turns batches into reported chunks. Text is decoded across chunk
/// boundaries (a character split between two responses is held back);
/// bytes that are not UTF-8 at all are reported base64 with `binary: true`.
#[derive(Default)]
struct ChunkText {
    carry: Vec<u8>,
}

impl ChunkText {
    fn chunk(&mut self, b: &Batch) -> Result<Option<Value>, String> {
        if b.is_empty() {
            return Ok(None);
        }
        if b.json {
            let data = compact_json(&b.data)?;
            return Ok(Some(json!({"data": data, "offset": b.offset})));
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(&b.data);
        let (text, binary) = match std::str::from_utf8(&buf) {
            Ok(s) => (s.to_string(), false),
            Err(e) if e.error_len().is_none() && !b.closed => {
                // An incomplete character at the end: keep it for the next chunk.
                let valid = e.valid_up_to();
                self.carry = buf[valid..].to_vec();
                let mut d = Utf8Decoder::new();
                (d.decode(&buf[..valid]), false)
            }
            Err(_) => (base64::engine::general_purpose::STANDARD.encode(&buf), true),
        };
        if text.is_empty() {
            return Ok(None);
        }
        let mut chunk = json!({"data": text, "offset": b.offset});
        if binary {
            chunk["binary"] = json!(true);
        }
        Ok(Some(chunk))
    }

    /// Bytes still held back when the read ends (an incomplete character).
    fn leftover(&mut self, offset: &str) -> Option<Value> {
        if self.carry.is_empty() {
            return None;
        }
        let data =
            base64::engine::general_purpose::STANDARD.encode(std::mem::take(&mut self.carry));
        Some(json!({"data": data, "binary": true, "offset": offset}))
    }
}

/// Validates a JSON body and removes insignificant whitespace, keeping every
/// value's text (key order, number spelling) as stored.
fn compact_json(data: &[u8]) -> Result<String, String> {
    let text =
        std::str::from_utf8(data).map_err(|e| format!("JSON stream data is not UTF-8: {e}"))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| format!("JSON stream data is not valid JSON: {e}"))?;
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for ch in text.chars() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if ch == '"' {
            in_string = true;
            out.push(ch);
        } else if !matches!(ch, ' ' | '\t' | '\n' | '\r') {
            out.push(ch);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Transport (§1)
// ---------------------------------------------------------------------------

fn error_reply(command: &str, f: &Fail) -> Reply {
    let mut r = Map::new();
    r.insert("type".into(), json!("error"));
    r.insert("success".into(), json!(false));
    r.insert("commandType".into(), json!(command));
    if let Some(s) = f.status {
        r.insert("status".into(), json!(s));
    }
    r.insert("errorCode".into(), json!(f.code));
    r.insert("message".into(), json!(f.message));
    r
}

fn write_reply(reply: &Reply) -> std::io::Result<()> {
    // serde_json escapes control characters, so no raw CR or LF can appear.
    let line = serde_json::to_string(reply).unwrap_or_else(|e| {
        format!(r#"{{"type":"error","success":false,"errorCode":"INTERNAL_ERROR","message":"cannot encode reply: {e}"}}"#)
    });
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

#[tokio::main]
async fn main() {
    let mut adapter = Adapter::new();
    let mut input = BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line).await {
            Ok(0) => break, // EOF: the runner is gone
            Ok(_) => {}
            Err(e) => {
                eprintln!("client-conformance-adapter: reading stdin: {e}");
                break;
            }
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        // A panic must not kill the adapter mid-run: answer it like any failure.
        let (reply, next) = match AssertUnwindSafe(adapter.handle_line(text))
            .catch_unwind()
            .await
        {
            Ok(done) => done,
            Err(_) => {
                let ty = serde_json::from_str::<Value>(text)
                    .ok()
                    .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| "unknown".to_string());
                (
                    error_reply(
                        &ty,
                        &Fail::new(
                            "INTERNAL_ERROR",
                            "the adapter panicked handling this command",
                        ),
                    ),
                    Next::Continue,
                )
            }
        };
        if let Err(e) = write_reply(&reply) {
            eprintln!("client-conformance-adapter: writing stdout: {e}");
            break;
        }
        if let Next::Exit = next {
            break;
        }
    }
}
