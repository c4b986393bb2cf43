//! Appends on the compact HTTP/1.1 path, answered without building an
//! `http::Request` or `Response`.
//!
//! A 256-byte append through the application ([`crate::direct::App`]) built
//! a request (a shared copy of the head, a header map, extensions for the
//! peer address, a boxed body), passed it through the policy, the
//! dispatcher and the handler, and encoded the response's header map: with
//! 256 connections, `perf` put that work at about a quarter of the server's
//! CPU, more than the storage engine's. Here the head's byte ranges go
//! straight to the same append code the handler uses
//! ([`crate::handlers::AppendInput`], [`crate::handlers::append_body`]),
//! and the response head is written from the reply and the same policy
//! header list ([`crate::layers::for_each_policy_header`]): one
//! implementation of what an append means and answers, two ways to carry
//! it. Errors are rendered as the handler renders them.
//!
//! Only what the application would answer the same way is taken: a cleartext
//! HTTP/1.1 `POST` whose whole `Content-Length` body arrived with its head
//! ([`crate::compact_get::post_body`]), with a plain request target, to a
//! stream path under the prefix, on a server whose layers are the policy
//! alone (no authentication, no rate limit). Anything else goes through
//! [`crate::compact_get`] as before, or to hyper.

use crate::compact_get::{self, Post};
use crate::compact_sse::{encode_head_end, encode_header, encode_status_line, Framing};
use crate::handlers::{append_body, AppendHeaders, AppendInput};
use crate::layers;
use crate::metrics::Operation;
use crate::request::Target;
use axum::response::IntoResponse;
use http::{HeaderValue, Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

/// A part of the connection's head buffer, by position (the buffer is at
/// most a few tens of KiB: see [`crate::compact_sse::MAX_HEAD_BYTES`]).
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// Where `part`, a slice of `buf`, lies in it.
    fn of(buf: &[u8], part: &[u8]) -> Option<Span> {
        let start = (part.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
        let end = start.checked_add(part.len())?;
        (end <= buf.len()).then_some(Span {
            start: u32::try_from(start).ok()?,
            end: u32::try_from(end).ok()?,
        })
    }

    fn get(self, buf: &[u8]) -> &[u8] {
        buf.get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }
}

/// An append's head, as positions in the connection's head buffer: what
/// [`respond`] reads.
#[derive(Debug)]
pub(crate) struct AppendHead {
    target: Span,
    body: Span,
    fields: AppendHeaders<Span>,
    request_id: Option<Span>,
    origin: Option<Span>,
    /// The request asked to close the connection after it.
    close: bool,
}

/// The head of an append [`compact_get::post_body`] accepted (`target`, its
/// request target), when its target is plain enough to be taken here:
/// origin-form and only characters every URI parser takes as they are.
pub(crate) fn parse(
    parsed: &httparse::Request<'_, '_>,
    buf: &[u8],
    head_len: usize,
    target: &str,
) -> Option<AppendHead> {
    if !target.starts_with('/') || !target.bytes().all(plain_target_byte) {
        return None;
    }
    let span = |part: &[u8]| Span::of(buf, part);
    let mut head = AppendHead {
        target: span(target.as_bytes())?,
        body: span(buf.get(head_len..)?)?,
        fields: AppendHeaders::none(),
        request_id: None,
        origin: None,
        close: false,
    };
    // The headers the append reads, and where the first value of each goes
    // (as `HeaderMap::get` gives).
    let [a, b, c, d, e, f] = head.fields.by_name();
    let mut slots: [(&str, &mut Option<Span>); 8] = [
        a,
        b,
        c,
        d,
        e,
        f,
        (
            durable_streams_protocol::headers::REQUEST_ID,
            &mut head.request_id,
        ),
        ("origin", &mut head.origin),
    ];
    for field in parsed.headers.iter() {
        if let Some((_, slot)) = slots
            .iter_mut()
            .find(|(name, _)| name.eq_ignore_ascii_case(field.name))
        {
            if slot.is_none() {
                **slot = Some(span(field.value)?);
            }
        } else if field.name.eq_ignore_ascii_case("connection") {
            head.close |= compact_get::connection_close(field.value);
        }
    }
    Some(head)
}

/// Unreserved, sub-delimiter, `:`, `@`, `/`, `?` and `%` bytes: a target
/// made of these parses the same everywhere (`http::Uri` included).
fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// What the connection does after [`respond`].
pub(crate) enum After {
    /// Read the next request.
    KeepAlive,
    /// Closed (asked for, or sending failed).
    Close,
    /// Not an append for this path after all: hyper serves the connection,
    /// the head buffer's bytes first.
    Hyper,
}

/// Serves the append whose head (and body) is in `buf`.
pub(crate) async fn respond(
    stream: &mut TcpStream,
    app: &crate::direct::App,
    buf: &[u8],
    head: &AppendHead,
    peer: std::net::SocketAddr,
    out: &mut Vec<u8>,
) -> After {
    let after = |again: bool| {
        if again {
            After::KeepAlive
        } else {
            After::Close
        }
    };
    // Checked ASCII by `parse`.
    let target = std::str::from_utf8(head.target.get(buf)).unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    let stream_path = app.direct_state().and_then(|state| {
        if crate::direct::is_router_route(path) {
            return None;
        }
        match crate::request::resolve_path(&state.config.path_prefix, path) {
            Some(Ok(Target::Stream(p))) => Some((state, p)),
            _ => None,
        }
    });
    let Some((state, stream_path)) = stream_path else {
        // Authentication, a rate limit, or not a stream path: through the
        // application, as any other compact append.
        return match rebuild(buf, peer) {
            // Boxed: that future is ~4 KiB, and inline it would make every
            // append's future (boxed by the caller per request) that large.
            Some(req) => after(Box::pin(compact_get::respond(stream, app, req, out)).await),
            None => After::Hyper,
        };
    };
    let started = std::time::Instant::now();
    let field = |s: Option<Span>| s.map(|s| s.get(buf));
    let fields = head.fields.map(|s| s.get(buf));
    let mut generated = [0u8; layers::GENERATED_ID_MAX_LEN];
    let request_id = match field(head.request_id) {
        Some(id) if layers::is_sane_request_id_bytes(id) => id,
        _ => {
            let n = layers::write_generated_request_id(&mut generated);
            &generated[..n]
        }
    };
    // Sane and generated ids are visible ASCII.
    let request_id_text = std::str::from_utf8(request_id).unwrap_or_default();
    let body = head.body.get(buf);
    // The span is at debug level: off by default, and then not entered at
    // every poll. The future is built at each await, not bound first: a
    // bound future and its instrumented copy would each take a slot in this
    // future, which the caller boxes per request.
    let span = tracing::debug_span!("request", request_id = request_id_text);
    let result = if span.is_disabled() {
        append_answer(state, &stream_path, &fields, body).await
    } else {
        append_answer(state, &stream_path, &fields, body)
            .instrument(span)
            .await
    };
    // As `dispatch_request`: appends without a close are timed.
    let op = if fields.closes() {
        Operation::Close
    } else {
        Operation::Append
    };
    if op == Operation::Append {
        state
            .metrics
            .append_latency_ns
            .observe_duration(started.elapsed());
    }
    let allow_origin =
        layers::cors_allow_origin(&state.config.cors_allowed_origins, field(head.origin));
    let status = match &result {
        Ok(reply) => reply.status,
        Err(resp) => resp.status(),
    };
    state.metrics.record(op, status.as_u16());
    layers::log_request(
        request_id_text,
        &Method::POST,
        path,
        status,
        started,
        Some(peer),
    );
    match result {
        Ok(reply) => {
            out.clear();
            encode_status_line(out, reply.status);
            reply
                .for_each_header(|name, value| encode_header(out, name.as_str().as_bytes(), value));
            layers::for_each_policy_header(&allow_origin, |name, value, _| {
                encode_header(out, name.as_str().as_bytes(), value.as_bytes());
            });
            encode_header(out, layers::REQUEST_ID.as_str().as_bytes(), request_id);
            // As hyper frames an empty body: none for a 204, else a length.
            let framing = if reply.status == StatusCode::NO_CONTENT {
                Framing::None
            } else {
                Framing::Length(Some(0))
            };
            encode_head_end(out, Some(started), framing, head.close);
            let sent = stream.write_all(out).await;
            after(compact_get::finish(stream, sent, head.close, out).await)
        }
        Err(mut resp) => {
            let hs = resp.headers_mut();
            layers::for_each_policy_header(&allow_origin, |name, value, add| {
                if add {
                    hs.append(name, value.clone());
                } else {
                    hs.insert(name, value.clone());
                }
            });
            if let Ok(id) = HeaderValue::from_bytes(request_id) {
                hs.insert(layers::REQUEST_ID, id);
            }
            after(compact_get::send_response(stream, resp, head.close, out).await)
        }
    }
}

/// The handler's append on the head's fields and body: headers judged
/// first, then the body's size; an error rendered as the handler renders it
/// (inside the request's span, when it has one).
async fn append_answer(
    state: &crate::state::AppState,
    stream_path: &str,
    fields: &AppendHeaders<&[u8]>,
    body: &[u8],
) -> Result<crate::handlers::AppendReply, http::Response<axum::body::Body>> {
    let input = AppendInput::parse(fields).map_err(IntoResponse::into_response)?;
    let max = state.config.max_append_bytes;
    if body.len() as u64 > max {
        return Err(crate::error::ApiError::PayloadTooLarge(max).into_response());
    }
    append_body(state, stream_path, input, body, None)
        .await
        .map_err(IntoResponse::into_response)
}

/// The request as [`compact_get::build_post`] builds it from the same
/// head; `None` if it would not (then hyper serves it).
fn rebuild(buf: &[u8], peer: std::net::SocketAddr) -> Option<Box<http::Request<axum::body::Body>>> {
    let mut headers = [httparse::EMPTY_HEADER; crate::compact_sse::MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = parsed.parse(buf) else {
        return None;
    };
    match compact_get::build_post(&parsed, buf, len, peer) {
        Post::Ready(req) => Some(req),
        Post::NeedMore | Post::Hyper => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn head_of(raw: &[u8]) -> Option<AppendHead> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(len) = parsed.parse(raw).unwrap() else {
            panic!("partial");
        };
        let target = compact_get::post_body(&parsed, &raw[len..]).ok()?;
        parse(&parsed, raw, len, target)
    }

    /// The fields an append reads are found (first value of a name wins),
    /// and `Connection: close` is seen among other tokens.
    #[test]
    fn head_fields_are_located() {
        let raw = b"POST /v1/stream/a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\n\
Producer-Id: p\r\nProducer-Epoch: 0\r\nProducer-Seq: 7\r\nProducer-Seq: 8\r\n\
X-Request-Id: abc\r\nConnection: keep-alive, close\r\nContent-Length: 3\r\n\r\nxyz";
        let h = head_of(raw).unwrap();
        assert_eq!(h.target.get(raw), b"/v1/stream/a?x=1");
        assert_eq!(h.body.get(raw), b"xyz");
        assert_eq!(h.fields.content_type.unwrap().get(raw), b"text/plain");
        assert_eq!(h.fields.producer_seq.unwrap().get(raw), b"7");
        assert_eq!(h.request_id.unwrap().get(raw), b"abc");
        assert!(h.fields.stream_closed.is_none() && h.origin.is_none());
        assert!(h.close);
    }

    /// Targets that are not plain origin-form paths are left to the
    /// request-building path.
    #[test]
    fn unusual_targets_are_not_taken() {
        for target in [
            "http://h/v1/stream/a",
            "/v1/stream/a\"b",
            "/v1/stream/{a}",
            "/v1/stream/a#f",
            "*",
        ] {
            let raw = format!("POST {target} HTTP/1.1\r\nContent-Length: 1\r\n\r\nx");
            assert!(head_of(raw.as_bytes()).is_none(), "{target}");
        }
        let raw = b"POST /v1/stream/a%20b HTTP/1.1\r\nContent-Length: 1\r\n\r\nx";
        assert!(head_of(raw).is_some());
    }
}
