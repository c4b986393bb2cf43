//! Live reads: long-poll and SSE. Readers wait on the engine's change feed
//! (a `tokio::sync::watch` per stream): no polling, every waiter wakes on the
//! append that concerns it, and on deletion or expiry.

use crate::error::ApiError;
use crate::handlers::{chunk_closed, chunk_response, count_sent, read_from};
use crate::metrics::{Metrics, ReadKind};
use crate::state::AppState;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use durable_streams_protocol::{cursor, headers as h, parse, sse, OffsetParam};
use durable_streams_storage::{ReadChunk, ReadFrom, Signal, StreamMeta};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;

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
    let Some(exp_ms) = meta.expires_at_ms else {
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
    /// New data or closure past `from`.
    Changed,
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
    loop {
        {
            let s = *rx.borrow_and_update();
            if s.gone {
                return Wake::Gone;
            }
            if s.tail.0 > from || s.closed {
                return Wake::Changed;
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return Wake::Gone },
            _ = tokio::time::sleep_until(until) => return Wake::Timeout,
            _ = state.shutdown.cancelled() => return Wake::Timeout,
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
        Wake::Changed | Wake::Timeout => {}
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

fn control(chunk: &ReadChunk, cursor: &str) -> Vec<u8> {
    let closed = chunk_closed(chunk);
    sse::control_event(&sse::Control {
        next_offset: chunk.next.to_string(),
        cursor: (!closed).then(|| cursor.to_owned()),
        up_to_date: chunk.up_to_date(),
        closed,
    })
}

pub async fn sse(
    state: &Arc<AppState>,
    path: &str,
    offset: OffsetParam,
    client_cursor: Option<&str>,
) -> Result<Response, ApiError> {
    let mut rx = state.engine.watch(path).await?;
    let first = state
        .engine
        .read(path, read_from(offset), state.config.read_chunk_bytes)
        .await?;
    let slot = state.admit_live_reader(path)?;
    let gauge = Metrics::live_reader(state, true);
    let base64 = !parse::is_sse_text(&first.meta.content_type);
    let cursor = cursor_for(state, client_cursor);
    let deadline = Instant::now() + state.config.sse_reconnect_interval;
    let state = state.clone();
    let path = path.to_owned();
    // Used in place by the stream below, not moved into new bindings: the
    // captured copies would stay in the stream's state beside the moved
    // ones, and an idle SSE connection costs what that state weighs.
    let held = (slot, gauge);
    let mut chunk = first;

    let events = async_stream::stream! {
        let _held = &held;
        let mut announced_up_to_date = false;
        loop {
            let offset = chunk.next;
            if !chunk.is_empty() {
                // A data event and its control event go out in one write.
                let mut buf = sse::data_event(&payload(&chunk), base64);
                buf.extend_from_slice(&control(&chunk, &cursor));
                // Sent: not kept while the connection waits for more.
                chunk.data = Vec::new();
                state.metrics.sent(ReadKind::Sse, buf.len() as u64);
                yield Ok::<Bytes, std::convert::Infallible>(Bytes::from(buf));
                if chunk_closed(&chunk) {
                    return;
                }
                announced_up_to_date = chunk.up_to_date();
            } else {
                if chunk_closed(&chunk) {
                    let buf = control(&chunk, &cursor);
                    state.metrics.sent(ReadKind::Sse, buf.len() as u64);
                    yield Ok(Bytes::from(buf));
                    return;
                }
                if !announced_up_to_date {
                    let buf = control(&chunk, &cursor);
                    state.metrics.sent(ReadKind::Sse, buf.len() as u64);
                    yield Ok(Bytes::from(buf));
                    announced_up_to_date = true;
                }
                let until = wake_at(deadline, &chunk.meta);
                match wait_past(&state, &mut rx, offset.0, until).await {
                    Wake::Changed => {}
                    Wake::Timeout if Instant::now() < deadline && !state.shutdown.is_cancelled() => {}
                    Wake::Timeout | Wake::Gone => return,
                }
            }
            if Instant::now() >= deadline || state.shutdown.is_cancelled() {
                return;
            }
            chunk = match state.engine.read(&path, ReadFrom::At(offset), state.config.read_chunk_bytes).await {
                Ok(c) => c,
                Err(_) => return,
            };
        }
    };

    let mut resp = (StatusCode::OK, Body::from_stream(events)).into_response();
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
    Ok(resp)
}
