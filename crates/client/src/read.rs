//! Reads: catch-up, long-poll, SSE and auto, as batches or collected.

use crate::client::{error_from_response, header_string, is_closed, Client, Ctx, Req};
use crate::error::{Error, Result};
use crate::sse::SseParser;
use crate::stream::DurableStream;
use crate::text::Utf8Decoder;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use durable_streams_protocol::{headers as h, parse};
use futures_util::stream::{BoxStream, StreamExt};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::fmt;

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Offset {
    /// `-1`: the beginning of the stream.
    #[default]
    Beginning,
    /// `now`: the current tail (only future data).
    Now,
    /// A token returned by the server (`Stream-Next-Offset`, a batch's `offset`).
    At(String),
}

impl Offset {
    pub fn as_str(&self) -> &str {
        match self {
            Offset::Beginning => "-1",
            Offset::Now => "now",
            Offset::At(s) => s,
        }
    }
}

impl From<&str> for Offset {
    fn from(s: &str) -> Offset {
        match s {
            "-1" => Offset::Beginning,
            "now" => Offset::Now,
            other => Offset::At(other.to_string()),
        }
    }
}

impl From<String> for Offset {
    fn from(s: String) -> Offset {
        Offset::from(s.as_str())
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a read continues once it has caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LiveMode {
    /// Catch-up only: the read ends when it is up to date.
    #[default]
    Off,
    /// Catch up, then long-poll for new data.
    LongPoll,
    /// Server-Sent Events from the start offset (reconnecting as the server
    /// rotates connections).
    Sse,
    /// Catch up with plain reads, then follow with SSE; switch to long-poll if
    /// SSE connections keep dropping before delivering anything.
    Auto,
}

/// Options of a read.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub offset: Offset,
    pub live: LiveMode,
    /// Extra headers on every request of this read.
    pub headers: HeaderMap,
    /// `Auto` mode: consecutive SSE connections that end before their first
    /// control event after which the read falls back to long-poll.
    pub sse_fallback_after: u32,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            offset: Offset::Beginning,
            live: LiveMode::Off,
            headers: HeaderMap::new(),
            sse_fallback_after: 3,
        }
    }
}

impl StreamOptions {
    pub fn new() -> Self {
        StreamOptions::default()
    }
    pub fn offset(mut self, offset: impl Into<Offset>) -> Self {
        self.offset = offset.into();
        self
    }
    pub fn live(mut self, live: LiveMode) -> Self {
        self.live = live;
        self
    }
}

/// Data delivered by one response (or one SSE control event), with the
/// position after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The bytes; for a JSON stream, a JSON array of the messages.
    pub data: Bytes,
    /// The offset after this data: resume here.
    pub offset: String,
    /// The reader has seen everything the stream held when this was sent.
    pub up_to_date: bool,
    /// The stream is closed and this is its end (EOF).
    pub closed: bool,
    /// The stream is in JSON mode.
    pub json: bool,
}

impl Batch {
    /// No data (for JSON streams: no messages).
    pub fn is_empty(&self) -> bool {
        if self.json {
            json_is_empty_array(&self.data)
        } else {
            self.data.is_empty()
        }
    }

    /// The messages of a JSON stream.
    pub fn items<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        if self.data.is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_slice(&self.data)
            .map_err(|e| Error::Parse(format!("JSON stream body: {e}")))
    }

    /// The messages of a JSON stream as raw JSON text, exactly as stored.
    pub fn raw_items(&self) -> Result<Vec<Box<RawValue>>> {
        self.items()
    }
}

/// A batch of a JSON stream with its messages decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonBatch<T> {
    pub items: Vec<T>,
    pub offset: String,
    pub up_to_date: bool,
    pub closed: bool,
}

/// A batch decoded as UTF-8 (characters split across batches are carried over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextBatch {
    pub text: String,
    pub offset: String,
    pub up_to_date: bool,
    pub closed: bool,
}

fn json_is_empty_array(b: &[u8]) -> bool {
    let t = b.trim_ascii();
    t.is_empty()
        || (t.first() == Some(&b'[')
            && t.last() == Some(&b']')
            && t[1..t.len() - 1].trim_ascii().is_empty())
}

#[derive(Debug)]
enum Phase {
    CatchUp,
    LongPoll,
    Sse,
}

struct SseConn {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    parser: SseParser,
    base64: bool,
    pending: Vec<Vec<u8>>,
    ready: std::collections::VecDeque<Batch>,
    saw_control: bool,
}

/// Control event fields (PROTOCOL.md 5.8).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Control {
    stream_next_offset: String,
    stream_cursor: Option<String>,
    up_to_date: Option<bool>,
    stream_closed: Option<bool>,
}

/// An ongoing read. Pull batches with [`next_batch`](Self::next_batch) or
/// [`batches`](Self::batches), or collect with [`bytes`](Self::bytes),
/// [`text`](Self::text), [`json`](Self::json). Closure of the stream ends it.
pub struct StreamResponse {
    stream: DurableStream,
    client: Client,
    headers: HeaderMap,
    live: LiveMode,
    phase: Phase,
    offset: String,
    cursor: Option<String>,
    json: bool,
    content_type: Option<String>,
    up_to_date: bool,
    closed: bool,
    done: bool,
    status: u16,
    sse: Option<SseConn>,
    sse_failures: u32,
    sse_fallback_after: u32,
    first: Option<Batch>,
}

impl fmt::Debug for StreamResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamResponse")
            .field("url", &self.stream.url().as_str())
            .field("live", &self.live)
            .field("phase", &self.phase)
            .field("offset", &self.offset)
            .field("up_to_date", &self.up_to_date)
            .field("closed", &self.closed)
            .finish()
    }
}

/// Reads `url` with a default client. Fails early (404, bad offset, ...)
/// before returning the response.
pub async fn stream(url: &str, options: StreamOptions) -> Result<StreamResponse> {
    DurableStream::new(url)?.stream(options).await
}

impl StreamResponse {
    pub(crate) async fn start(stream: DurableStream, o: StreamOptions) -> Result<StreamResponse> {
        let client = stream.client().clone();
        let content_type = stream.content_type();
        let mut r = StreamResponse {
            client,
            headers: o.headers,
            live: o.live,
            phase: if o.live == LiveMode::Sse {
                Phase::Sse
            } else {
                Phase::CatchUp
            },
            offset: o.offset.as_str().to_string(),
            cursor: None,
            json: content_type.as_deref().is_some_and(parse::is_json),
            content_type,
            up_to_date: false,
            closed: false,
            done: false,
            status: 0,
            sse: None,
            sse_failures: 0,
            sse_fallback_after: o.sse_fallback_after.max(1),
            first: None,
            stream,
        };
        if let Phase::Sse = r.phase {
            // SSE responses do not carry the stream's content type: learn it
            // (and surface a 404 now).
            if r.content_type.is_none() {
                let info = r.stream.head().await?;
                r.content_type = info.content_type;
                r.json = r.content_type.as_deref().is_some_and(parse::is_json);
            }
        } else {
            r.first = r.next_batch_inner().await?;
        }
        Ok(r)
    }

    /// The stream's content type.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }
    /// The stream is in JSON mode.
    pub fn is_json(&self) -> bool {
        self.json
    }
    /// The offset after everything delivered so far (save it to resume).
    pub fn offset(&self) -> &str {
        self.first.as_ref().map_or(&self.offset, |b| &b.offset)
    }
    /// The last batch delivered was up to date.
    pub fn up_to_date(&self) -> bool {
        self.first
            .as_ref()
            .map_or(self.up_to_date, |b| b.up_to_date)
    }
    /// The stream's end was reached.
    pub fn closed(&self) -> bool {
        self.first.as_ref().map_or(self.closed, |b| b.closed)
    }
    /// Status of the most recent HTTP response (204 after an empty long-poll).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The next batch; `None` once the read is over (closed stream, or caught
    /// up with live mode off).
    pub async fn next_batch(&mut self) -> Result<Option<Batch>> {
        if let Some(b) = self.first.take() {
            return Ok(Some(b));
        }
        self.next_batch_inner().await
    }

    async fn next_batch_inner(&mut self) -> Result<Option<Batch>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let batch = match self.phase {
                Phase::CatchUp => self.fetch(false).await?,
                Phase::LongPoll => self.fetch(true).await?,
                Phase::Sse => match self.sse_next().await? {
                    Some(b) => b,
                    None => continue,
                },
            };
            let was_up_to_date = self.up_to_date;
            self.offset = batch.offset.clone();
            self.up_to_date = batch.up_to_date;
            self.closed = batch.closed;
            if batch.closed {
                self.done = true;
                self.sse = None;
                return Ok(Some(batch));
            }
            if batch.up_to_date {
                if let Phase::CatchUp = self.phase {
                    match self.live {
                        LiveMode::Off => self.done = true,
                        LiveMode::LongPoll => self.phase = Phase::LongPoll,
                        LiveMode::Sse | LiveMode::Auto => self.phase = Phase::Sse,
                    }
                }
            }
            if !batch.is_empty() || (batch.up_to_date && !was_up_to_date) {
                return Ok(Some(batch));
            }
        }
    }

    fn read_url(&self, live: Option<&str>) -> url::Url {
        let mut url = self.stream.url().clone();
        {
            // Keys in lexicographic order, for cache friendliness.
            let mut q = url.query_pairs_mut();
            if let (Some(_), Some(c)) = (live, &self.cursor) {
                q.append_pair("cursor", c);
            }
            if let Some(l) = live {
                q.append_pair("live", l);
            }
            q.append_pair("offset", &self.offset);
        }
        url
    }

    /// One catch-up (`live == false`) or long-poll request.
    async fn fetch(&mut self, long_poll: bool) -> Result<Batch> {
        let mut req = Req::new(Method::GET, self.read_url(long_poll.then_some("long-poll")))
            .extra_headers(&self.headers);
        req.live = long_poll;
        let resp = self
            .client
            .execute(&req, Some(self.client.retry_policy()))
            .await?;
        self.status = resp.status().as_u16();
        if !resp.status().is_success() {
            self.done = true;
            return Err(error_from_response(resp, Ctx::Plain).await);
        }
        let hs = resp.headers().clone();
        if let Some(ct) = header_string(&hs, "content-type") {
            if self.content_type.is_none() {
                self.json = parse::is_json(&ct);
                self.stream.set_content_type(Some(ct.clone()));
                self.content_type = Some(ct);
            }
        }
        if let Some(c) = header_string(&hs, h::STREAM_CURSOR) {
            self.cursor = Some(c);
        }
        let offset = header_string(&hs, h::STREAM_NEXT_OFFSET)
            .ok_or_else(|| Error::Parse("read response without Stream-Next-Offset".into()))?;
        let data = if resp.status().as_u16() == 204 {
            Bytes::new()
        } else {
            resp.bytes().await.map_err(Error::Network)?
        };
        if self.json
            && !data.is_empty()
            && serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_err()
        {
            self.done = true;
            return Err(Error::Parse(
                "JSON stream returned a body that is not valid JSON".into(),
            ));
        }
        Ok(Batch {
            data,
            offset,
            up_to_date: hs.contains_key(h::STREAM_UP_TO_DATE) || (long_poll && self.status == 204),
            closed: is_closed(&hs),
            json: self.json,
        })
    }

    /// The next batch from SSE, connecting or reconnecting as needed. `None`
    /// means "the connection ended, try again".
    async fn sse_next(&mut self) -> Result<Option<Batch>> {
        if self.sse.is_none() {
            let mut req =
                Req::new(Method::GET, self.read_url(Some("sse"))).extra_headers(&self.headers);
            req.live = true;
            let resp = self
                .client
                .execute(&req, Some(self.client.retry_policy()))
                .await?;
            self.status = resp.status().as_u16();
            if !resp.status().is_success() {
                self.done = true;
                return Err(error_from_response(resp, Ctx::Plain).await);
            }
            let ct = header_string(resp.headers(), "content-type").unwrap_or_default();
            if !ct.starts_with("text/event-stream") {
                self.done = true;
                return Err(Error::Parse(format!(
                    "expected an SSE response, got content type {ct:?}"
                )));
            }
            let base64 = header_string(resp.headers(), h::STREAM_SSE_DATA_ENCODING)
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("base64"));
            self.sse = Some(SseConn {
                body: resp.bytes_stream().boxed(),
                parser: SseParser::new(),
                base64,
                pending: Vec::new(),
                ready: Default::default(),
                saw_control: false,
            });
        }
        let json = self.json;
        let Some(conn) = self.sse.as_mut() else {
            return Ok(None);
        };
        loop {
            if let Some(b) = conn.ready.pop_front() {
                return Ok(Some(b));
            }
            match conn.body.next().await {
                Some(Ok(chunk)) => {
                    for ev in conn.parser.feed(&chunk) {
                        match ev.event.as_str() {
                            "data" => {
                                let payload = if conn.base64 {
                                    let cleaned: Vec<u8> = ev
                                        .data
                                        .iter()
                                        .copied()
                                        .filter(|b| *b != b'\n' && *b != b'\r')
                                        .collect();
                                    base64::engine::general_purpose::STANDARD
                                        .decode(&cleaned)
                                        .map_err(|e| {
                                            Error::Parse(format!("SSE base64 data: {e}"))
                                        })?
                                } else {
                                    ev.data
                                };
                                conn.pending.push(payload);
                            }
                            "control" => {
                                let c: Control = serde_json::from_slice(&ev.data)
                                    .map_err(|e| Error::Parse(format!("SSE control event: {e}")))?;
                                conn.saw_control = true;
                                if let Some(cur) = c.stream_cursor {
                                    self.cursor = Some(cur);
                                }
                                let closed = c.stream_closed.unwrap_or(false);
                                let data = merge_payloads(std::mem::take(&mut conn.pending), json)?;
                                conn.ready.push_back(Batch {
                                    data,
                                    offset: c.stream_next_offset,
                                    up_to_date: c.up_to_date.unwrap_or(false) || closed,
                                    closed,
                                    json,
                                });
                            }
                            _ => {} // unknown events are skipped
                        }
                    }
                }
                Some(Err(_)) | None => {
                    // Connection over. Data after the last control event is
                    // dropped: it is re-read from that control's offset.
                    let productive = conn.saw_control;
                    self.sse = None;
                    self.sse_failures = if productive { 0 } else { self.sse_failures + 1 };
                    if self.live == LiveMode::Auto && self.sse_failures >= self.sse_fallback_after {
                        self.phase = Phase::LongPoll;
                        return Ok(None);
                    }
                    let policy = self.client.retry_policy().clone();
                    if self.sse_failures > policy.max_retries {
                        self.done = true;
                        return Err(Error::Parse(
                            "SSE connections keep ending without any event".into(),
                        ));
                    }
                    if self.sse_failures > 0 {
                        tokio::time::sleep(policy.delay(self.sse_failures - 1, None)).await;
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// All batches as a `Stream`.
    pub fn batches(self) -> BoxStream<'static, Result<Batch>> {
        futures_util::stream::unfold(Some(self), |state| async move {
            let mut r = state?;
            match r.next_batch().await {
                Ok(Some(b)) => Some((Ok(b), Some(r))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
        .boxed()
    }

    /// JSON batches with decoded items.
    pub fn json_batches<T: DeserializeOwned + Send + 'static>(
        self,
    ) -> BoxStream<'static, Result<JsonBatch<T>>> {
        self.batches()
            .map(|b| {
                let b = b?;
                Ok(JsonBatch {
                    items: b.items()?,
                    offset: b.offset,
                    up_to_date: b.up_to_date,
                    closed: b.closed,
                })
            })
            .boxed()
    }

    /// Text batches; UTF-8 characters split across batches are reassembled.
    pub fn text_batches(self) -> BoxStream<'static, Result<TextBatch>> {
        let mut dec = Utf8Decoder::new();
        self.batches()
            .map(move |b| {
                let b = b?;
                let mut text = dec.decode(&b.data);
                if b.closed {
                    text.push_str(&dec.finish());
                }
                Ok(TextBatch {
                    text,
                    offset: b.offset,
                    up_to_date: b.up_to_date,
                    closed: b.closed,
                })
            })
            .boxed()
    }

    async fn collect_batches(mut self) -> Result<(Vec<Batch>, bool)> {
        let mut out = Vec::new();
        while let Some(b) = self.next_batch().await? {
            let stop = b.up_to_date || b.closed;
            out.push(b);
            if stop {
                break;
            }
        }
        Ok((out, self.json))
    }

    /// All bytes until up to date (or closed). For JSON streams, the messages
    /// of all batches as one JSON array.
    pub async fn bytes(self) -> Result<Bytes> {
        let (batches, json) = self.collect_batches().await?;
        merge_payloads(batches.into_iter().map(|b| b.data.to_vec()).collect(), json)
    }

    /// All text until up to date (or closed).
    pub async fn text(self) -> Result<String> {
        let bytes = self.bytes().await?;
        let mut d = Utf8Decoder::new();
        Ok(d.decode(&bytes) + &d.finish())
    }

    /// All messages of a JSON stream until up to date (or closed).
    pub async fn json<T: DeserializeOwned>(self) -> Result<Vec<T>> {
        let (batches, _) = self.collect_batches().await?;
        let mut out = Vec::new();
        for b in batches {
            out.extend(b.items::<T>()?);
        }
        Ok(out)
    }
}

/// Concatenates payloads: bytes as is; JSON arrays into one array.
fn merge_payloads(payloads: Vec<Vec<u8>>, json: bool) -> Result<Bytes> {
    if !json {
        let mut out = BytesMut::new();
        for p in payloads {
            out.extend_from_slice(&p);
        }
        return Ok(out.freeze());
    }
    let non_empty: Vec<Vec<u8>> = payloads
        .into_iter()
        .filter(|p| !json_is_empty_array(p))
        .collect();
    match non_empty.len() {
        0 => Ok(Bytes::new()),
        1 => Ok(non_empty
            .into_iter()
            .next()
            .map(Bytes::from)
            .unwrap_or_default()),
        _ => {
            let mut items: Vec<Box<RawValue>> = Vec::new();
            for p in non_empty {
                let v: Vec<Box<RawValue>> = serde_json::from_slice(&p)
                    .map_err(|e| Error::Parse(format!("JSON stream data: {e}")))?;
                items.extend(v);
            }
            serde_json::to_vec(&items)
                .map(Bytes::from)
                .map_err(|e| Error::Parse(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON payloads merge into one array keeping each message's text; empty arrays vanish.
    #[test]
    fn merging_json_payloads() {
        let m = merge_payloads(
            vec![
                b"[1, {\"a\" : 2}]".to_vec(),
                b"[ ]".to_vec(),
                b"[\n\"x\"\n]".to_vec(),
            ],
            true,
        )
        .unwrap();
        assert_eq!(&m[..], b"[1,{\"a\" : 2},\"x\"]");
        assert!(merge_payloads(vec![b"[]".to_vec()], true)
            .unwrap()
            .is_empty());
        assert_eq!(
            &merge_payloads(vec![b"ab".to_vec(), b"c".to_vec()], false).unwrap()[..],
            b"abc"
        );
    }

    /// Offsets convert from the sentinels and tokens.
    #[test]
    fn offsets() {
        assert_eq!(Offset::from("-1"), Offset::Beginning);
        assert_eq!(Offset::from("now"), Offset::Now);
        assert_eq!(Offset::from("0001_2").as_str(), "0001_2");
    }
}
