//! Live reads: long-poll and SSE. Readers wait on the engine's change feed
//! (a `tokio::sync::watch` per stream): no polling, every waiter wakes on the
//! append that concerns it, and on deletion or expiry.

use crate::error::ApiError;
use crate::handlers::{chunk_closed, chunk_response, count_sent, read_from};
use crate::metrics::{Metrics, ReadKind};
use crate::sse_cache::{Delivery, Key};
use crate::state::AppState;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use durable_streams_protocol::{cursor, headers as h, parse, sse, Offset, OffsetParam};
use durable_streams_storage::{ReadChunk, ReadFrom, Signal, StorageError, StreamMeta};
use rand::Rng;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

/// The cursor for a live response (PROTOCOL.md 10.1).
pub fn cursor_for(state: &AppState, client: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let jitter = rand::thread_rng().gen_range(1..=3600);
    cursor::next_cursor(
        now,
        state.config.cursor_interval.as_secs().max(1),
        client,
        jitter,
    )
    .to_string()
}

/// When a waiter must wake at the latest: its own deadline, or the moment
/// the stream expires (so it can answer 404 at once).
fn wake_at(deadline: Instant, meta: &StreamMeta) -> Instant {
    wake_at_ms(deadline, meta.expires_at_ms)
}

pub(crate) fn wake_at_ms(deadline: Instant, expires_at_ms: Option<u64>) -> Instant {
    let Some(exp_ms) = expires_at_ms else {
        return deadline;
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let until = Duration::from_millis(exp_ms.saturating_sub(now_ms));
    deadline.min(Instant::now() + until)
}

enum Wake {
    /// New data or closure past `from`; the signal that showed it.
    Changed(Signal),
    /// Deadline, expiry time or shutdown.
    Timeout,
    /// The stream was deleted.
    Gone,
}

async fn wait_past(
    state: &AppState,
    rx: &mut watch::Receiver<Signal>,
    from: u64,
    until: Instant,
) -> Wake {
    let sleep = tokio::time::sleep_until(until);
    let shutdown = state.shutdown.clone().cancelled_owned();
    tokio::pin!(sleep, shutdown);
    wait_past_with(rx, from, sleep, shutdown).await
}

/// `wait_past` with the timer and the shutdown waiter owned by the caller,
/// so an SSE connection registers them once instead of on every wait.
async fn wait_past_with(
    rx: &mut watch::Receiver<Signal>,
    from: u64,
    mut sleep: Pin<&mut Sleep>,
    mut shutdown: Pin<&mut WaitForCancellationFutureOwned>,
) -> Wake {
    loop {
        {
            let s = *rx.borrow_and_update();
            if s.gone {
                return Wake::Gone;
            }
            if s.tail.0 > from || s.closed {
                return Wake::Changed(s);
            }
        }
        // Biased: a woken reader finds its change first and skips polling
        // the timer and the shutdown waiter.
        tokio::select! {
            biased;
            r = rx.changed() => if r.is_err() { return Wake::Gone },
            _ = shutdown.as_mut() => return Wake::Timeout,
            _ = sleep.as_mut() => return Wake::Timeout,
        }
    }
}

fn set_cursor(resp: &mut Response, cursor: &str) {
    if let Ok(v) = HeaderValue::from_str(cursor) {
        resp.headers_mut().insert(h::STREAM_CURSOR, v);
    }
}

/// A 204 for a long-poll that found no new data.
fn no_content(chunk: &ReadChunk, cursor: &str) -> Response {
    let mut resp = (StatusCode::NO_CONTENT, Body::empty()).into_response();
    let hs = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&chunk.next.to_string()) {
        hs.insert(h::STREAM_NEXT_OFFSET, v);
    }
    hs.insert(h::STREAM_UP_TO_DATE, HeaderValue::from_static("true"));
    hs.insert("cache-control", HeaderValue::from_static("no-store"));
    if chunk_closed(chunk) {
        hs.insert(h::STREAM_CLOSED, HeaderValue::from_static("true"));
    } else {
        set_cursor(&mut resp, cursor);
    }
    resp
}

fn with_data(state: &AppState, chunk: &ReadChunk, headers: &HeaderMap, cursor: &str) -> Response {
    let mut resp = chunk_response(chunk, headers);
    count_sent(state, ReadKind::LongPoll, &resp, chunk);
    if !chunk_closed(chunk) {
        set_cursor(&mut resp, cursor);
    }
    resp
}

pub async fn long_poll(
    state: &Arc<AppState>,
    path: &str,
    offset: OffsetParam,
    client_cursor: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    // Subscribe before reading so no append between the two is missed.
    let mut rx = state.engine.watch(path).await?;
    let chunk = state
        .engine
        .read(path, read_from(offset), state.config.read_chunk_bytes)
        .await?;
    let cursor = cursor_for(state, client_cursor);
    if !chunk.is_empty() {
        return Ok(with_data(state, &chunk, headers, &cursor));
    }
    if chunk_closed(&chunk) {
        return Ok(no_content(&chunk, &cursor));
    }
    let _slot = state.admit_live_reader(path)?;
    let _gauge = Metrics::live_reader(state, false);
    let from = chunk.start;
    let until = wake_at(Instant::now() + state.config.long_poll_timeout, &chunk.meta);
    match wait_past(state, &mut rx, from.0, until).await {
        Wake::Gone => return Err(ApiError::NotFound),
        Wake::Changed(_) | Wake::Timeout => {}
    }
    let chunk = state
        .engine
        .read(path, ReadFrom::At(from), state.config.read_chunk_bytes)
        .await?;
    if chunk.is_empty() {
        Ok(no_content(&chunk, &cursor))
    } else {
        Ok(with_data(state, &chunk, headers, &cursor))
    }
}

/// SSE payload of a chunk: a JSON array for JSON streams, the bytes otherwise.
fn payload(chunk: &ReadChunk) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk.len() as usize + 2);
    for d in &chunk.data {
        out.extend_from_slice(d);
    }
    if chunk.meta.json {
        durable_streams_protocol::json::stored_to_array(&out)
    } else {
        out
    }
}

/// A read, encoded for SSE.
pub(crate) fn delivery(chunk: &ReadChunk, base64: bool) -> Delivery {
    let closed = chunk_closed(chunk);
    let mut control_tail = Vec::with_capacity(64);
    sse::write_control_tail(
        &mut control_tail,
        &chunk.next.to_string(),
        chunk.up_to_date(),
        closed,
    );
    Delivery {
        data_event: (!chunk.is_empty())
            .then(|| Bytes::from(sse::data_event(&payload(chunk), base64))),
        next: chunk.next,
        control_tail,
        up_to_date: chunk.up_to_date(),
        closed,
        expires_at_ms: chunk.meta.expires_at_ms,
    }
}

/// The start of one connection's control events while the stream is open
/// (up to and including its cursor), written once per connection.
pub(crate) struct ControlHead(Vec<u8>);

impl ControlHead {
    fn new(cursor: &str) -> Self {
        let mut head = Vec::with_capacity(64);
        sse::write_control_head(&mut head, Some(cursor), false);
        // Kept for the connection's life: no spare capacity.
        head.shrink_to_fit();
        ControlHead(head)
    }

    /// Appends the control event of `d` to `out`.
    pub(crate) fn control_into(&self, out: &mut Vec<u8>, d: &Delivery) {
        if d.closed {
            // The last event of the connection: no cursor.
            sse::write_control_head(out, None, true);
        } else {
            out.extend_from_slice(&self.0);
        }
        out.extend_from_slice(&d.control_tail);
    }

    /// A buffer holding `data` (if any) and the control event of `d`.
    fn frame(&self, data: Option<&[u8]>, d: &Delivery) -> Bytes {
        let data = data.unwrap_or_default();
        let mut buf = Vec::with_capacity(data.len() + self.0.len() + d.control_tail.len());
        buf.extend_from_slice(data);
        if d.closed {
            // The last event of the connection: no cursor.
            sse::write_control_head(&mut buf, None, true);
        } else {
            buf.extend_from_slice(&self.0);
        }
        buf.extend_from_slice(&d.control_tail);
        Bytes::from(buf)
    }
}

/// Data events up to this size are copied into one buffer with their
/// control event (one body frame); larger ones go out as their own frame.
const COPY_DATA_EVENT_BYTES: usize = 16 * 1024;

/// A read for an SSE reader (see [`checked_delivery`]).
async fn read_delivery(
    state: &AppState,
    path: &str,
    from: Offset,
    incarnation: u64,
    base64: bool,
) -> Result<Delivery, StorageError> {
    let chunk = state
        .engine
        .read(path, ReadFrom::At(from), state.config.read_chunk_bytes)
        .await?;
    checked_delivery(&chunk, incarnation, base64)
}

/// A chunk encoded for SSE; refuses data of another incarnation of the
/// path (the stream was deleted and re-created under the reader).
pub(crate) fn checked_delivery(
    chunk: &ReadChunk,
    incarnation: u64,
    base64: bool,
) -> Result<Delivery, StorageError> {
    if chunk.meta.incarnation != incarnation {
        return Err(StorageError::NotFound);
    }
    Ok(delivery(chunk, base64))
}

/// An SSE connection's state once its first delivery is written, for
/// [`crate::sse_reactor`] to carry on with (compact HTTP/1.1 connections).
pub(crate) struct ParkedSse {
    pub(crate) state: Arc<AppState>,
    pub(crate) path: String,
    pub(crate) incarnation: u64,
    pub(crate) base64: bool,
    pub(crate) rx: watch::Receiver<Signal>,
    /// Where the next delivery starts.
    pub(crate) offset: Offset,
    /// `upToDate` was already sent for `offset` (an empty read there sends
    /// nothing more).
    pub(crate) announced_up_to_date: bool,
    /// When the connection is closed for the client to reconnect.
    pub(crate) deadline: Instant,
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) head: ControlHead,
    /// The live-reader slot and gauge, released when the connection ends.
    pub(crate) held: (crate::state::LiveGuard, crate::metrics::GaugeGuard),
}

/// Response extension carrying a [`ParkedSse`] out of the router (the
/// extension map wants `Clone`).
#[derive(Clone)]
pub(crate) struct ParkSlot(pub(crate) Arc<parking_lot::Mutex<Option<ParkedSse>>>);

pub async fn sse(
    state: &Arc<AppState>,
    path: &str,
    offset: OffsetParam,
    client_cursor: Option<&str>,
    park: bool,
) -> Result<Response, ApiError> {
    let mut rx = state.engine.watch(path).await?;
    let first = state
        .engine
        .read(path, read_from(offset), state.config.read_chunk_bytes)
        .await?;
    let slot = state.admit_live_reader(path)?;
    let gauge = Metrics::live_reader(state, true);
    let base64 = !parse::is_sse_text(&first.meta.content_type);
    let incarnation = first.meta.incarnation;
    let head = ControlHead::new(&cursor_for(state, client_cursor));
    let deadline = Instant::now() + state.config.sse_reconnect_interval;
    let state = state.clone();
    let path = path.to_owned();
    // Used in place by the stream below, not moved into new bindings: the
    // captured copies would stay in the stream's state beside the moved
    // ones, and an idle SSE connection costs what that state weighs.
    let held = (slot, gauge);
    let mut next = Some(Arc::new(delivery(&first, base64)));
    drop(first);
    if park && next.as_ref().is_some_and(|d| !d.closed) {
        return Ok(parked_response(
            state,
            path,
            rx,
            next,
            head,
            held,
            deadline,
            incarnation,
            base64,
        ));
    }

    let events = async_stream::stream! {
        let _held = &held;
        // Registered once for the whole connection (see `wait_past_with`).
        let sleep = tokio::time::sleep_until(deadline);
        let shutdown = state.shutdown.clone().cancelled_owned();
        tokio::pin!(sleep, shutdown);
        let mut announced_up_to_date = false;
        while let Some(d) = next.take() {
            if let Some(data) = &d.data_event {
                // A data event and its control event go out in one write.
                if data.len() <= COPY_DATA_EVENT_BYTES {
                    let buf = head.frame(Some(data), &d);
                    state.metrics.sent(ReadKind::Sse, buf.len() as u64);
                    yield Ok::<Bytes, std::convert::Infallible>(buf);
                } else {
                    let control = head.frame(None, &d);
                    state.metrics.sent(ReadKind::Sse, (data.len() + control.len()) as u64);
                    yield Ok(data.clone());
                    yield Ok(control);
                }
                if d.closed {
                    return;
                }
                announced_up_to_date = d.up_to_date;
            } else if d.closed || !announced_up_to_date {
                let buf = head.frame(None, &d);
                state.metrics.sent(ReadKind::Sse, buf.len() as u64);
                yield Ok(buf);
                if d.closed {
                    return;
                }
                announced_up_to_date = true;
            }
            let (offset, up_to_date, expires_at_ms) = (d.next, d.up_to_date, d.expires_at_ms);
            // Sent: not kept while the connection waits for more.
            drop(d);
            if Instant::now() >= deadline || state.shutdown.is_cancelled() {
                return;
            }
            // How the next delivery is read: `None` directly, `Some(key)`
            // shared with the stream's other readers.
            let shared = if !up_to_date {
                // Catching up: more data is already there.
                None
            } else {
                let until = wake_at_ms(deadline, expires_at_ms);
                if sleep.deadline() != until {
                    sleep.as_mut().reset(until);
                }
                match wait_past_with(&mut rx, offset.0, sleep.as_mut(), shutdown.as_mut()).await {
                    // Readers woken by the same signal at the same offset
                    // share one read and one encoding.
                    Wake::Changed(signal) if held.0.share().shared() => Some(Key {
                        incarnation,
                        from: offset.0,
                        tail: signal.tail.0,
                        closed: signal.closed,
                    }),
                    Wake::Changed(_) => None,
                    // Woken by expiry: the read answers whether it is gone.
                    Wake::Timeout if Instant::now() < deadline && !state.shutdown.is_cancelled() => None,
                    Wake::Timeout | Wake::Gone => return,
                }
            };
            // The read futures are boxed or awaited in place (the engine's
            // is boxed already) so they add little to an idle connection's
            // state, which is as large as its largest suspended future.
            let read = match shared.map(|key| held.0.share().lookup(key)) {
                Some(Ok(d)) => Ok(d),
                Some(Err(pending)) => {
                    Box::pin(held.0.share().fill(pending, || read_delivery(&state, &path, offset, incarnation, base64))).await
                }
                None => state
                    .engine
                    .read(&path, ReadFrom::At(offset), state.config.read_chunk_bytes)
                    .await
                    .and_then(|chunk| checked_delivery(&chunk, incarnation, base64))
                    .map(Arc::new),
            };
            next = match read {
                Ok(d) => Some(d),
                Err(_) => return,
            };
        }
    };

    let resp = (StatusCode::OK, Body::from_stream(events)).into_response();
    Ok(sse_headers(resp, base64))
}

/// An SSE response whose body is the first delivery only, carrying the
/// connection's state in a [`ParkSlot`] for the reactor.
#[allow(clippy::too_many_arguments)]
fn parked_response(
    state: Arc<AppState>,
    path: String,
    rx: watch::Receiver<Signal>,
    first: Option<Arc<Delivery>>,
    head: ControlHead,
    held: (crate::state::LiveGuard, crate::metrics::GaugeGuard),
    deadline: Instant,
    incarnation: u64,
    base64: bool,
) -> Response {
    let mut body = Vec::new();
    let mut offset = Offset(0);
    let mut announced_up_to_date = false;
    let mut expires_at_ms = None;
    if let Some(d) = first {
        // As the first turn of the connection loop in `sse`: data and its
        // control event, or the control event alone.
        if let Some(data) = &d.data_event {
            body.extend_from_slice(data);
        }
        head.control_into(&mut body, &d);
        announced_up_to_date = d.data_event.is_none() || d.up_to_date;
        offset = d.next;
        expires_at_ms = d.expires_at_ms;
    }
    state.metrics.sent(ReadKind::Sse, body.len() as u64);
    let parked = ParkedSse {
        state,
        path,
        incarnation,
        base64,
        rx,
        offset,
        announced_up_to_date,
        deadline,
        expires_at_ms,
        head,
        held,
    };
    // A body of unknown length: the connection uses chunked coding, and
    // the reactor goes on with more chunks.
    let frame = futures_util::stream::once(async move {
        Ok::<Bytes, std::convert::Infallible>(Bytes::from(body))
    });
    let mut resp = (StatusCode::OK, Body::from_stream(frame)).into_response();
    resp.extensions_mut()
        .insert(ParkSlot(Arc::new(parking_lot::Mutex::new(Some(parked)))));
    sse_headers(resp, base64)
}

fn sse_headers(mut resp: Response, base64: bool) -> Response {
    let hs = resp.headers_mut();
    hs.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    hs.insert("cache-control", HeaderValue::from_static("no-cache"));
    hs.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if base64 {
        hs.insert(
            h::STREAM_SSE_DATA_ENCODING,
            HeaderValue::from_static("base64"),
        );
    }
    resp
}
