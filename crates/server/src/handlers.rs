//! Thin handlers: extract and validate, call the engine, map the outcome.

use crate::error::ApiError;
use crate::live;
use crate::metrics::ReadKind;
use crate::request::{self, header_str, LiveMode, Target};
use crate::state::{AppState, StreamEvent};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use durable_streams_protocol::{etag, headers as h, json, parse, Offset, OffsetParam};
use durable_streams_storage::{
    AppendOutcome, AppendRequest, CreateOutcome, CreateRequest, Expiry, ForkSpec, ReadChunk,
    ReadFrom, StreamMeta,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Cache policy of a catch-up response that carries data (PROTOCOL.md 10.1).
pub const CACHE_PUBLIC: &str = "public, max-age=60, stale-while-revalidate=300";

/// What a request's connection allows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conn {
    /// The request came over TLS (URLs handed out without a configured
    /// public URL use https).
    pub https: bool,
    /// A catch-up response may leave its bytes in the engine's file
    /// ([`crate::compact_get::FileBody`]): the connection sends them.
    pub zero_copy: bool,
    /// An SSE response may hand its connection to the stream's reactor
    /// after the first delivery ([`crate::live::ParkSlot`]).
    pub park_sse: bool,
}

/// Dispatches a request under the stream prefix.
pub async fn dispatch(
    state: Arc<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    conn: Conn,
) -> Response {
    let https = conn.https;
    let target = match request::resolve_path(&state.config.path_prefix, uri.path()) {
        None => return ApiError::NotFound.into_response(),
        Some(Err(e)) => return e.into_response(),
        Some(Ok(t)) => t,
    };
    let path = match target {
        // Reserved for the subscription API (PROTOCOL.md 6): routed before
        // streams so no application stream can claim it.
        Target::Reserved(rel) => {
            return {
                // HTTP/2 carries the host in the :authority pseudo-header.
                let authority = uri.authority().map(|a| a.as_str());
                crate::subscriptions_http::dispatch(
                    &state, method, &rel, &headers, body, https, authority,
                )
                .await
            };
        }
        Target::Stream(p) => p,
    };
    let result = match method {
        Method::PUT => create(&state, &path, &uri, &headers, body).await,
        Method::POST => append(&state, &path, &headers, body).await,
        Method::GET => read(&state, &path, &uri, &headers, conn).await,
        Method::HEAD => head(&state, &path).await,
        Method::DELETE => delete(&state, &path).await,
        _ => Err(ApiError::MethodNotAllowed),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

fn set(resp: &mut Response, name: &'static str, value: impl std::fmt::Display) {
    // Formatted on the stack (offsets, numbers, dates all fit): one
    // allocation for the value instead of two.
    use std::io::Write as _;
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let v = if write!(cursor, "{value}").is_ok() {
        let n = cursor.position() as usize;
        HeaderValue::from_bytes(&buf[..n])
    } else {
        HeaderValue::from_str(&value.to_string())
    };
    if let Ok(v) = v {
        resp.headers_mut().insert(name, v);
    }
}

/// Parsed once, not per response (`insert("name", ..)` parses the name).
const STREAM_NEXT_OFFSET: http::HeaderName = http::HeaderName::from_static(h::STREAM_NEXT_OFFSET);

fn set_offset(resp: &mut Response, o: Offset) {
    if let Ok(v) = HeaderValue::from_bytes(&o.encode()) {
        resp.headers_mut().insert(STREAM_NEXT_OFFSET, v);
    }
}

fn set_closed(resp: &mut Response, closed: bool) {
    if closed {
        resp.headers_mut()
            .insert(h::STREAM_CLOSED, HeaderValue::from_static("true"));
    }
}

fn set_expiry(resp: &mut Response, meta: &StreamMeta) {
    match &meta.expiry {
        Expiry::Never => {}
        Expiry::TtlSecs(s) => set(resp, h::STREAM_TTL, s),
        Expiry::At(t) => set(resp, h::STREAM_EXPIRES_AT, parse::format_expires_at(t)),
    }
}

/// Room for the headers a response gets here and in the policy layer
/// (offsets, ETag, CORS, request id...): the map is allocated once.
/// (12 is what a map sized for 9 to 12 holds: its table has 16 slots.)
const RESPONSE_HEADERS: usize = 12;

fn empty(status: StatusCode) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    *resp.headers_mut() = HeaderMap::with_capacity(RESPONSE_HEADERS);
    resp
}

/// Room for a data response's headers: an answer without data's, plus
/// cache policy, up-to-date, cursor and compression's.
const DATA_RESPONSE_HEADERS: usize = 20;

async fn create(
    state: &AppState,
    path: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let content_type = header_str(headers, "content-type")?
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let ttl = header_str(headers, h::STREAM_TTL)?;
    let expires = header_str(headers, h::STREAM_EXPIRES_AT)?;
    let expiry = match (ttl, expires) {
        (Some(_), Some(_)) => {
            return Err(durable_streams_protocol::ProtocolError::TtlAndExpiresAt.into())
        }
        (Some(t), None) => Expiry::TtlSecs(parse::parse_ttl_secs(t)?),
        (None, Some(e)) => Expiry::At(parse::parse_expires_at(e)?),
        (None, None) => Expiry::Never,
    };
    let closed = parse::is_closed_flag(headers.get(h::STREAM_CLOSED).map(|v| v.as_bytes()));
    let forked_from = header_str(headers, h::STREAM_FORKED_FROM)?;
    let fork_offset = header_str(headers, h::STREAM_FORK_OFFSET)?;
    let sub_offset = header_str(headers, h::STREAM_FORK_SUB_OFFSET)?;
    let fork = match forked_from {
        None => {
            if fork_offset.is_some() || sub_offset.is_some() {
                return Err(ApiError::bad_request(
                    "Stream-Fork-Offset and Stream-Fork-Sub-Offset require Stream-Forked-From",
                ));
            }
            None
        }
        Some(src) => Some(ForkSpec {
            source: request::resolve_fork_source(&state.config.path_prefix, src)?,
            offset: fork_offset.map(|o| Offset::parse(o.trim())).transpose()?,
            sub_offset: sub_offset
                .map(parse::parse_sub_offset)
                .transpose()?
                .unwrap_or(0),
        }),
    };
    let body = request::read_body(headers, body, state.config.max_append_bytes).await?;
    state
        .metrics
        .received_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);

    // JSON mode follows the stream's type: the request's, or for a fork
    // without one, the source's.
    let json_mode = match (&content_type, &fork) {
        (Some(ct), _) => parse::is_json(ct),
        (None, Some(f)) => match state.engine.head(&f.source).await {
            Ok(m) => m.json,
            // The engine reports the precise error (404/409) on create.
            Err(_) => false,
        },
        (None, None) => false,
    };
    let records = frame_body(&body, Some(&body), json_mode, true)?;
    state.subscriptions.stream_creating(path);
    let req = CreateRequest {
        content_type: content_type.clone(),
        expiry,
        closed,
        json: json_mode,
        records,
        fork,
    };
    let (status, meta) = match state.engine.create(path, req).await? {
        CreateOutcome::Created(m) => (StatusCode::CREATED, m),
        CreateOutcome::Existed(m) => (StatusCode::OK, m),
    };
    let mut resp = empty(status);
    set(&mut resp, "content-type", &meta.content_type);
    set_offset(&mut resp, meta.tail);
    set_closed(&mut resp, meta.closed);
    set_expiry(&mut resp, &meta);
    if status == StatusCode::CREATED {
        let host = header_str(headers, "host")?.unwrap_or("localhost");
        set(
            &mut resp,
            "location",
            format!("http://{host}{}", uri.path()),
        );
        if let Some(hook) = &state.hooks.on_stream_created {
            hook(&StreamEvent {
                path: path.to_owned(),
                content_type: meta.content_type.clone(),
            });
        }
        state.subscriptions.stream_created(path);
    }
    if meta.tail.0 > 0 {
        state.subscriptions.stream_changed(path);
    }
    Ok(resp)
}

/// Splits a body into stored records: one per JSON message in JSON mode
/// (validated, flattened one level), otherwise the body as one record.
/// `owned`: the body as `Bytes`, when the caller has it (a large body is
/// then stored without a copy).
fn frame_body(
    body: &[u8],
    owned: Option<&Bytes>,
    json_mode: bool,
    allow_empty_array: bool,
) -> Result<Vec<Bytes>, ApiError> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    if !json_mode {
        // A small body may be a slice of a much larger receive buffer; a
        // stored record must not keep that alive (measured: ~6 KB held per
        // 256 B append in the memory engine before this copy).
        return Ok(vec![match owned {
            Some(b) if body.len() >= 64 * 1024 => b.clone(),
            _ => Bytes::copy_from_slice(body),
        }]);
    }
    let ranges = json::split_messages(body, allow_empty_array)?;
    let (stored, lens) = json::frame_messages(body, &ranges);
    let stored = Bytes::from(stored);
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for len in lens {
        out.push(stored.slice(at..at + len));
        at += len;
    }
    Ok(out)
}

async fn append(
    state: &AppState,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Headers are judged before the body is read: a bad header is a 400
    // whatever the body's size.
    let input = AppendInput::parse(&AppendHeaders::from_map(headers))?;
    let body = request::read_body(headers, body, state.config.max_append_bytes).await?;
    let reply = append_body(state, path, input, &body, Some(&body)).await?;
    let mut resp = empty(reply.status);
    reply.for_each_header(|name, value| {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            resp.headers_mut().insert(name, v);
        }
    });
    Ok(resp)
}

/// The request headers an append reads (the first value of each name, as
/// `HeaderMap::get` gives): raw values taken from hyper's `HeaderMap`, or
/// their positions in a parsed head ([`crate::compact_append`]), then
/// judged by the same [`AppendInput::parse`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AppendHeaders<V> {
    pub(crate) content_type: Option<V>,
    pub(crate) producer_id: Option<V>,
    pub(crate) producer_epoch: Option<V>,
    pub(crate) producer_seq: Option<V>,
    pub(crate) stream_seq: Option<V>,
    pub(crate) stream_closed: Option<V>,
}

impl<V> AppendHeaders<V> {
    pub(crate) fn none() -> Self {
        AppendHeaders {
            content_type: None,
            producer_id: None,
            producer_epoch: None,
            producer_seq: None,
            stream_seq: None,
            stream_closed: None,
        }
    }

    /// Each field with its header's name: the one list of what an append
    /// reads.
    pub(crate) fn by_name(&mut self) -> [(&'static str, &mut Option<V>); 6] {
        [
            ("content-type", &mut self.content_type),
            (h::PRODUCER_ID, &mut self.producer_id),
            (h::PRODUCER_EPOCH, &mut self.producer_epoch),
            (h::PRODUCER_SEQ, &mut self.producer_seq),
            (h::STREAM_SEQ, &mut self.stream_seq),
            (h::STREAM_CLOSED, &mut self.stream_closed),
        ]
    }

    pub(crate) fn map<W>(self, f: impl Fn(V) -> W) -> AppendHeaders<W> {
        AppendHeaders {
            content_type: self.content_type.map(&f),
            producer_id: self.producer_id.map(&f),
            producer_epoch: self.producer_epoch.map(&f),
            producer_seq: self.producer_seq.map(&f),
            stream_seq: self.stream_seq.map(&f),
            stream_closed: self.stream_closed.map(&f),
        }
    }
}

impl<'a> AppendHeaders<&'a [u8]> {
    pub(crate) fn from_map(headers: &'a HeaderMap) -> Self {
        let mut hs = AppendHeaders::none();
        for (name, slot) in hs.by_name() {
            *slot = headers.get(name).map(HeaderValue::as_bytes);
        }
        hs
    }

    /// True when the append closes the stream (the `close` metrics label).
    pub(crate) fn closes(&self) -> bool {
        parse::is_closed_flag(self.stream_closed)
    }
}

/// An append's validated headers.
pub(crate) struct AppendInput {
    close: bool,
    producer: Option<durable_streams_protocol::parse::ProducerHeaders>,
    stream_seq: Option<String>,
    content_type: Option<String>,
}

impl AppendInput {
    pub(crate) fn parse(hs: &AppendHeaders<&[u8]>) -> Result<Self, ApiError> {
        let text = request::header_text;
        Ok(AppendInput {
            close: hs.closes(),
            producer: parse::parse_producer(
                text(h::PRODUCER_ID, hs.producer_id)?,
                text(h::PRODUCER_EPOCH, hs.producer_epoch)?,
                text(h::PRODUCER_SEQ, hs.producer_seq)?,
            )?,
            stream_seq: text(h::STREAM_SEQ, hs.stream_seq)?.map(str::to_owned),
            content_type: text("content-type", hs.content_type)?
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
        })
    }
}

/// A successful append's answer: the status and the headers of
/// [`AppendReply::for_each_header`], without a body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AppendReply {
    pub(crate) status: StatusCode,
    tail: Offset,
    closed: bool,
    producer: Option<(u64, u64)>,
}

impl AppendReply {
    /// Calls `f` with each response header's name and value.
    pub(crate) fn for_each_header(&self, mut f: impl FnMut(http::HeaderName, &[u8])) {
        f(STREAM_NEXT_OFFSET, &self.tail.encode());
        if self.closed {
            f(STREAM_CLOSED, b"true");
        }
        if let Some((epoch, seq)) = self.producer {
            let mut buf = [0u8; 20];
            f(PRODUCER_EPOCH, decimal(epoch, &mut buf));
            f(PRODUCER_SEQ, decimal(seq, &mut buf));
        }
    }
}

const STREAM_CLOSED: http::HeaderName = http::HeaderName::from_static(h::STREAM_CLOSED);
const PRODUCER_EPOCH: http::HeaderName = http::HeaderName::from_static(h::PRODUCER_EPOCH);
const PRODUCER_SEQ: http::HeaderName = http::HeaderName::from_static(h::PRODUCER_SEQ);

/// `n` in decimal, formatted into `buf`.
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Appends `body` (already within the size limit) with the validated
/// headers. `owned`: the body as `Bytes` when the caller has it, so a large
/// body is stored without a copy.
pub(crate) async fn append_body(
    state: &AppState,
    path: &str,
    input: AppendInput,
    body: &[u8],
    owned: Option<&Bytes>,
) -> Result<AppendReply, ApiError> {
    let AppendInput {
        close,
        producer,
        stream_seq,
        content_type,
    } = input;
    state
        .metrics
        .received_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    if body.is_empty() && !close {
        return Err(ApiError::bad_request(
            "empty body: an append needs data (or Stream-Closed: true)",
        ));
    }
    let records = if body.is_empty() {
        Vec::new()
    } else {
        let Some(ct) = &content_type else {
            return Err(ApiError::bad_request(
                "Content-Type is required when appending data",
            ));
        };
        // Only a JSON body can need message framing, so only then is the
        // stream's mode looked up (a non-JSON body on a JSON stream is a
        // content-type mismatch the engine reports). On a closed stream the
        // engine answers (409, or 204 for a producer retry of the closing
        // append) without looking at the data.
        let json_mode = parse::is_json(ct) && {
            let meta = state.engine.head(path).await?;
            meta.json && !meta.closed
        };
        frame_body(body, owned, json_mode, false)?
    };
    let has_data = !records.is_empty();
    let req = AppendRequest {
        content_type,
        records,
        close,
        producer,
        stream_seq,
    };
    let reply = match append_tolerating_reorder(state, path, req).await? {
        AppendOutcome::Applied { meta, producer } => {
            if has_data {
                state.subscriptions.stream_changed(path);
                state.metrics.appends.fetch_add(1, Ordering::Relaxed);
                state
                    .metrics
                    .append_bytes
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
            }
            AppendReply {
                status: if producer.is_some() && has_data {
                    StatusCode::OK
                } else {
                    StatusCode::NO_CONTENT
                },
                tail: meta.tail,
                closed: meta.closed,
                producer,
            }
        }
        AppendOutcome::Duplicate { meta, epoch, seq } => AppendReply {
            status: StatusCode::NO_CONTENT,
            tail: meta.tail,
            closed: meta.closed,
            producer: Some((epoch, seq)),
        },
        AppendOutcome::AlreadyClosed { meta } => AppendReply {
            status: StatusCode::NO_CONTENT,
            tail: meta.tail,
            closed: true,
            producer: None,
        },
    };
    Ok(reply)
}

/// Appends; when an idempotent producer's request arrives ahead of its
/// predecessor (a sequence gap, typically two pipelined requests reordered
/// on different connections), waits a bounded few milliseconds for the
/// stream to change and tries again, so a correct pipelining client never
/// sees a spurious 409. If the predecessor does not come, the spec's 409
/// with Producer-Expected-Seq is returned.
async fn append_tolerating_reorder(
    state: &AppState,
    path: &str,
    req: AppendRequest,
) -> Result<AppendOutcome, durable_streams_storage::StorageError> {
    use durable_streams_storage::StorageError;
    let wait = state.config.producer_reorder_wait;
    if req.producer.is_none() || wait.is_zero() {
        return state.engine.append(path, req).await;
    }
    // The usual case (in order) needs no subscription: try first.
    match state.engine.append(path, req.clone()).await {
        Err(StorageError::SeqGap { .. }) => {}
        other => return other,
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Subscribe before trying again so a change in between is not
        // missed. The feed of accepted appends: the predecessor's
        // acceptance is what this request needs, not its commit.
        let mut rx = state.engine.watch_accepted(path).await?;
        match state.engine.append(path, req.clone()).await {
            Err(StorageError::SeqGap { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return state.engine.append(path, req).await },
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
            other => return other,
        }
    }
}

async fn head(state: &AppState, path: &str) -> Result<Response, ApiError> {
    let meta = state.engine.head(path).await?;
    let mut resp = empty(StatusCode::OK);
    set(&mut resp, "content-type", &meta.content_type);
    set_offset(&mut resp, meta.tail);
    set_closed(&mut resp, meta.closed);
    set_expiry(&mut resp, &meta);
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn delete(state: &AppState, path: &str) -> Result<Response, ApiError> {
    state.engine.delete(path).await?;
    state.subscriptions.stream_deleted(path);
    if let Some(hook) = &state.hooks.on_stream_deleted {
        hook(&StreamEvent {
            path: path.to_owned(),
            content_type: String::new(),
        });
    }
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn read(
    state: &Arc<AppState>,
    path: &str,
    uri: &Uri,
    headers: &HeaderMap,
    conn: Conn,
) -> Result<Response, ApiError> {
    let (zero_copy, park_sse) = (conn.zero_copy, conn.park_sse);
    let q = request::parse_read_query(uri.query())?;
    match q.live {
        LiveMode::CatchUp if zero_copy && q.offset != OffsetParam::Now => {
            catch_up_file(state, path, q.offset, headers).await
        }
        LiveMode::CatchUp => catch_up(state, path, q.offset, headers).await,
        LiveMode::LongPoll => {
            live::long_poll(state, path, q.offset, q.cursor.as_deref(), headers).await
        }
        LiveMode::Sse => live::sse(state, path, q.offset, q.cursor.as_deref(), park_sse).await,
    }
}

pub fn read_from(o: OffsetParam) -> ReadFrom {
    match o {
        OffsetParam::Start => ReadFrom::Start,
        OffsetParam::Now => ReadFrom::Tail,
        OffsetParam::At(o) => ReadFrom::At(o),
    }
}

async fn catch_up(
    state: &AppState,
    path: &str,
    offset: OffsetParam,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let chunk = state
        .engine
        .read(path, read_from(offset), state.config.read_chunk_bytes)
        .await?;
    if offset == OffsetParam::Now {
        // Tail position only: never cached, no ETag (PROTOCOL.md 8).
        let mut resp = data_response(&chunk, StatusCode::OK);
        resp.headers_mut()
            .insert("cache-control", HeaderValue::from_static("no-store"));
        count_sent(state, ReadKind::CatchUp, &resp, &chunk);
        return Ok(resp);
    }
    let resp = chunk_response(&chunk, headers);
    count_sent(state, ReadKind::CatchUp, &resp, &chunk);
    Ok(resp)
}

/// A catch-up read whose bytes may stay in the engine's file: the response
/// then carries a [`FileBody`](crate::compact_get::FileBody) and an empty
/// body of that `Content-Length`, for the connection to `sendfile`.
async fn catch_up_file(
    state: &AppState,
    path: &str,
    offset: OffsetParam,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let read = state
        .engine
        .read_file(path, read_from(offset), state.config.read_chunk_bytes)
        .await?;
    let mut resp = chunk_response(&read.chunk, headers);
    if let Some(slice) = read.file {
        if resp.status() == StatusCode::OK {
            // JSON: the stored range is `message,` repeated; the body is the
            // array `[` + the range without its last comma + `]` (as
            // `json::stored_to_array` builds it).
            let body = if read.chunk.meta.json {
                let mut last = [0u8; 1];
                let ends_with_comma = !slice.is_empty()
                    && slice.read_at(&mut last, slice.len() - 1).ok() == Some(1)
                    && last[0] == b',';
                if !ends_with_comma {
                    // Not a message-aligned range: cannot happen for ranges
                    // the engine cuts; answer from the copying path.
                    return catch_up(state, path, offset, headers).await;
                }
                crate::compact_get::FileBody {
                    slice: slice.truncated(slice.len() - 1),
                    json_array: true,
                }
            } else {
                crate::compact_get::FileBody {
                    slice,
                    json_array: false,
                }
            };
            state
                .metrics
                .sent_zero_copy_bytes
                .fetch_add(body.slice.len(), std::sync::atomic::Ordering::Relaxed);
            resp.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            state.metrics.sent(ReadKind::CatchUp, body.len());
            resp.extensions_mut().insert(body);
            return Ok(resp);
        }
    }
    count_sent(state, ReadKind::CatchUp, &resp, &read.chunk);
    Ok(resp)
}

/// Counts the body bytes of a read response built from `chunk` (none for
/// a 304).
pub fn count_sent(state: &AppState, kind: ReadKind, resp: &Response, chunk: &ReadChunk) {
    if resp.status() == StatusCode::OK {
        state.metrics.sent(kind, body_len(chunk));
    }
}

/// Length of [`body_of`] without building it: JSON chunks gain `[` and `]`
/// and lose the last record's trailing comma.
fn body_len(chunk: &ReadChunk) -> u64 {
    if !chunk.meta.json {
        return chunk.len();
    }
    let trailing_comma = chunk.data.last().is_some_and(|d| d.last() == Some(&b','));
    chunk.len() + 2 - u64::from(trailing_comma)
}

/// Whether the chunk reached the tail of a closed stream (the EOF signal).
pub fn chunk_closed(chunk: &ReadChunk) -> bool {
    chunk.meta.closed && chunk.up_to_date()
}

/// A catch-up (or long-poll 200) response for a chunk, with ETag and 304.
pub fn chunk_response(chunk: &ReadChunk, headers: &HeaderMap) -> Response {
    let tag = etag::format(
        chunk.meta.incarnation,
        chunk.start,
        chunk.next,
        chunk_closed(chunk),
    );
    let not_modified = headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|inm| etag::if_none_match_hits(inm, &tag));
    let mut resp = if not_modified {
        let mut r = empty(StatusCode::NOT_MODIFIED);
        set_offset(&mut r, chunk.next);
        if chunk.up_to_date() {
            r.headers_mut()
                .insert(h::STREAM_UP_TO_DATE, HeaderValue::from_static("true"));
        }
        set_closed(&mut r, chunk_closed(chunk));
        r
    } else {
        data_response(chunk, StatusCode::OK)
    };
    set(&mut resp, "etag", tag);
    // Data is immutable by position and cacheable; an empty read at the tail
    // of an open stream changes as soon as data arrives, so it must revalidate.
    let cache = if chunk.is_empty() && !chunk_closed(chunk) {
        "no-cache"
    } else {
        CACHE_PUBLIC
    };
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static(cache));
    resp
}

/// The body and protocol headers of a read.
pub fn data_response(chunk: &ReadChunk, status: StatusCode) -> Response {
    let mut resp = Response::new(body_of(chunk));
    *resp.status_mut() = status;
    *resp.headers_mut() = HeaderMap::with_capacity(DATA_RESPONSE_HEADERS);
    set(&mut resp, "content-type", &chunk.meta.content_type);
    set_offset(&mut resp, chunk.next);
    if chunk.up_to_date() {
        resp.headers_mut()
            .insert(h::STREAM_UP_TO_DATE, HeaderValue::from_static("true"));
    }
    set_closed(&mut resp, chunk_closed(chunk));
    resp
}

/// Response body of a chunk: JSON chunks are wrapped as an array around
/// the stored `message,` records. Large records are sent without a copy.
fn body_of(chunk: &ReadChunk) -> Body {
    let json = chunk.meta.json;
    let frames = chunk.data.len() + if json { 2 } else { 0 };
    // Many small records (JSON messages of a replay): one contiguous buffer
    // costs one copy but saves a body frame per record. Copied straight from
    // the chunk, not through a list of handles (a reference count up and
    // down per record).
    if frames > 16 && chunk.len() / (frames as u64) < 16 * 1024 {
        let mut buf = Vec::with_capacity(chunk.len() as usize + 2);
        if json {
            buf.push(b'[');
        }
        for d in &chunk.data {
            buf.extend_from_slice(d);
        }
        if json {
            // The last message's separator.
            if buf.last() == Some(&b',') {
                buf.pop();
            }
            buf.push(b']');
        }
        return Body::from(buf);
    }
    let mut parts: Vec<Bytes> = Vec::with_capacity(frames);
    if chunk.meta.json {
        parts.push(Bytes::from_static(b"["));
        let n = chunk.data.len();
        for (i, d) in chunk.data.iter().enumerate() {
            if i + 1 == n && d.last() == Some(&b',') {
                parts.push(d.slice(..d.len() - 1));
            } else {
                parts.push(d.clone());
            }
        }
        parts.push(Bytes::from_static(b"]"));
    } else {
        parts.extend(chunk.data.iter().cloned());
    }
    match parts.len() {
        0 => Body::empty(),
        1 => Body::from(parts.pop().unwrap_or_default()),
        // Few or large records are sent as they are, framed by their length.
        _ => Body::new(PartsBody {
            remaining: parts.iter().map(|p| p.len() as u64).sum(),
            parts: parts.into(),
        }),
    }
}

/// A response body of a few buffers sent in turn, its length known up
/// front (so it is framed with `Content-Length`, not chunked).
struct PartsBody {
    parts: std::collections::VecDeque<Bytes>,
    remaining: u64,
}

impl http_body::Body for PartsBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.parts.pop_front();
        if let Some(part) = &next {
            self.remaining -= part.len() as u64;
        }
        std::task::Poll::Ready(next.map(|p| Ok(http_body::Frame::data(p))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}
