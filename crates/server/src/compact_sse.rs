//! A compact path for HTTP/1.1 SSE on cleartext connections.
//!
//! hyper's HTTP/1 connection keeps an 8 KiB read buffer and an 8 KiB write
//! buffer for the life of a connection, plus its dispatcher and the service
//! futures: about 20 KiB per idle SSE reader. Here the first request head of
//! a cleartext connection is read into a small buffer first. A complete
//! `GET ...?live=sse` HTTP/1.1 request without a body is handed to the same
//! application as any other request ([`crate::direct::App`]: auth, rate
//! limits, CORS, request ids and metrics apply unchanged); its response
//! head is written here, then the body frames go straight to the socket as
//! chunks, and the connection closes when the body ends. While idle such a connection holds only the
//! socket, the response body and this task's small state.
//!
//! Anything else (h2c, other methods, other queries, a head that is not
//! complete within the buffer, a parse error, bytes after the head) goes to
//! hyper unchanged: the bytes already read are replayed in front of the
//! socket by [`Replay`].

use crate::PeerAddr;
use axum::body::Body;
use bytes::Buf;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// First read of a connection; most request heads fit.
const FIRST_READ_BYTES: usize = 2048;
/// The largest head taken on the compact path; larger ones go to hyper,
/// which applies `max_header_bytes`.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Headers httparse accepts (hyper's default limit too).
pub(crate) const MAX_HEADERS: usize = 100;
/// Bytes a client may send after its SSE request before it is cut off;
/// they are read and dropped so the socket buffer does not fill.
const MAX_DISCARD_BYTES: usize = 64 * 1024;

/// How a connection's first request head decided.
pub(crate) enum Head {
    /// The peer left, the head timed out, or the server is shutting down.
    Closed,
    /// Serve with hyper, these bytes first.
    Hyper(Vec<u8>),
    /// An SSE request for the compact path.
    Compact(Box<Request<Body>>),
    /// A catch-up read or a small append for [`crate::compact_get`]: the
    /// connection stays on that path while requests qualify.
    KeepAlive(Box<Request<Body>>),
    /// An append for [`crate::compact_append`], its head and body in the
    /// head buffer (left in place).
    Append(crate::compact_append::AppendHead),
}

/// What a cleartext connection waits for besides its socket while it waits
/// for a request head: the head-read deadline and the server's shutdown.
/// Kept for the connection's life, so a keep-alive request costs neither a
/// timer registration nor a shutdown waiter (a fresh timeout and waiter per
/// read were ~3% of the server's CPU with 256 connections appending). The
/// timer is armed at or before the current deadline and moved only when it
/// fires early: deadlines only move later.
pub(crate) struct HeadWaits {
    timer: Pin<Box<tokio::time::Sleep>>,
    timeout: std::time::Duration,
    shutdown: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl HeadWaits {
    /// Waits of `timeout` per head (hyper's header read timeout), ended by
    /// `shutdown`.
    pub(crate) fn new(timeout: std::time::Duration, shutdown: &CancellationToken) -> Self {
        HeadWaits {
            timer: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
        }
    }

    /// Ready once `deadline` passed or at shutdown.
    fn poll_expired(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.timer.deadline() >= deadline {
                return Poll::Ready(());
            }
            // Fired at an earlier request's deadline: move on to this one.
            self.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// Reads the first request head of a cleartext connection, as far as needed
/// to decide; gives up when the wait's time runs out or at shutdown.
pub(crate) async fn read_head(
    stream: &mut TcpStream,
    peer: std::net::SocketAddr,
    waits: &mut HeadWaits,
    codings: &[crate::compression::Algorithm],
    buf: &mut Vec<u8>,
) -> Head {
    // Read from the clock only when the head is not there at once.
    let mut deadline = None;
    buf.clear();
    if buf.capacity() == 0 {
        buf.reserve(FIRST_READ_BYTES);
    }
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.capacity());
        }
        // `AsyncRead`, not `readable` + `try_read`: tokio then takes a
        // short read as proof the socket is drained and waits for the next
        // request without a `recv` that fails with EAGAIN (measured: two
        // `recvfrom` per keep-alive append before, one after).
        let mut read = std::pin::pin!(tokio::io::AsyncReadExt::read_buf(&mut *stream, buf));
        let n = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = read.as_mut().poll(cx) {
                return Poll::Ready(r.ok());
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + waits.timeout);
            waits.poll_expired(cx, deadline).map(|_| None)
        })
        .await;
        let Some(n) = n else {
            return Head::Closed;
        };
        if n == 0 {
            // EOF inside a head: let hyper answer what it would have.
            return if buf.is_empty() {
                Head::Closed
            } else {
                Head::Hyper(std::mem::take(buf))
            };
        }
        match classify(buf, peer, codings) {
            Decision::NeedMore if buf.len() < MAX_HEAD_BYTES => {}
            Decision::NeedMore | Decision::Hyper => return Head::Hyper(std::mem::take(buf)),
            Decision::Compact(req) => return Head::Compact(req),
            Decision::KeepAlive(req) => return Head::KeepAlive(req),
            Decision::Append(head) => return Head::Append(head),
        }
    }
}

enum Decision {
    NeedMore,
    Hyper,
    Compact(Box<Request<Body>>),
    KeepAlive(Box<Request<Body>>),
    Append(crate::compact_append::AppendHead),
}

/// Decides from the bytes so far; cheap for everything that is not for a
/// compact path (a prefix compare and a scan of the request line).
/// `codings`: the compression codings the server may answer with (none
/// when compression is off).
fn classify(
    buf: &[u8],
    peer: std::net::SocketAddr,
    codings: &[crate::compression::Algorithm],
) -> Decision {
    const GET: &[u8] = b"GET ";
    const POST: &[u8] = b"POST ";
    let starts = |m: &[u8]| {
        let n = buf.len().min(m.len());
        buf[..n] == m[..n]
    };
    let post = if starts(GET) {
        false
    } else if starts(POST) {
        true
    } else {
        return Decision::Hyper;
    };
    let Some(line_end) = buf.iter().position(|&b| b == b'\n') else {
        return Decision::NeedMore;
    };
    let line = &buf[..line_end];
    let sse = !post && line_asks_sse(line);
    let read = if post || sse {
        None
    } else {
        match crate::compact_get::line_read(line) {
            None => return Decision::Hyper,
            read => read,
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) if post => {
            use crate::compact_get::Post;
            let target = match crate::compact_get::post_body(&parsed, &buf[len..]) {
                Ok(target) => target,
                Err(Post::NeedMore) => return Decision::NeedMore,
                Err(_) => return Decision::Hyper,
            };
            if let Some(head) = crate::compact_append::parse(&parsed, buf, len, target) {
                return Decision::Append(head);
            }
            match crate::compact_get::build_post(&parsed, buf, len, peer) {
                Post::Ready(req) => Decision::KeepAlive(req),
                Post::NeedMore => Decision::NeedMore,
                Post::Hyper => Decision::Hyper,
            }
        }
        Ok(httparse::Status::Complete(len)) if len == buf.len() => {
            match build(&parsed, buf, peer) {
                None => Decision::Hyper,
                Some(mut req) if sse => {
                    req.extensions_mut().insert(crate::sse_reactor::Parkable);
                    Decision::Compact(req)
                }
                // Without sendfile (a compressed answer) hyper is as good.
                Some(mut req) if crate::compact_get::identity_only(req.headers(), codings) => {
                    req.extensions_mut().insert(crate::compact_get::ZeroCopy);
                    if read == Some(crate::compact_get::LineRead::LongPoll) {
                        req.extensions_mut().insert(crate::compact_get::WatchClose);
                    }
                    Decision::KeepAlive(req)
                }
                Some(_) => Decision::Hyper,
            }
        }
        // Bytes after the head (pipelining, or a body): hyper's job.
        Ok(httparse::Status::Complete(_)) => Decision::Hyper,
        Ok(httparse::Status::Partial) => Decision::NeedMore,
        Err(_) => Decision::Hyper,
    }
}

/// True when the request line's query has `live=sse`.
fn line_asks_sse(line: &[u8]) -> bool {
    let Some(q) = line.iter().position(|&b| b == b'?') else {
        return false;
    };
    let rest = &line[q + 1..];
    let end = rest
        .iter()
        .position(|&b| b == b' ' || b == b'#')
        .unwrap_or(rest.len());
    rest[..end].split(|&b| b == b'&').any(|p| p == b"live=sse")
}

/// The request as hyper would have built it, or `None` when it is not one
/// for the compact path (hyper then serves it and answers any error).
pub(crate) fn build(
    parsed: &httparse::Request<'_, '_>,
    buf: &[u8],
    peer: std::net::SocketAddr,
) -> Option<Box<Request<Body>>> {
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let shared = SharedHead::new(buf);
    let uri = shared.uri(parsed.path?)?;
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        // A body, an upgrade or an expectation: hyper handles those. An
        // empty body declared as such (`Content-Length: 0`, which some
        // clients send on every request) is no body: the head is all of
        // `buf` (checked by the caller).
        let empty_body = name == http::header::CONTENT_LENGTH && h.value.trim_ascii() == b"0";
        if (name == http::header::CONTENT_LENGTH && !empty_body)
            || name == http::header::TRANSFER_ENCODING
            || name == http::header::UPGRADE
            || name == http::header::EXPECT
        {
            return None;
        }
        headers.append(name, shared.value(h.value)?);
    }
    let mut req = Request::new(Body::empty());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_11;
    *req.headers_mut() = headers;
    req.extensions_mut().insert(PeerAddr(peer));
    Some(Box::new(req))
}

/// A request's head (and body) copied once into shared bytes: the URI,
/// header values and body are slices of it, not an allocation each.
pub(crate) struct SharedHead<'a> {
    buf: &'a [u8],
    bytes: bytes::Bytes,
}

impl<'a> SharedHead<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        SharedHead {
            buf,
            bytes: bytes::Bytes::copy_from_slice(buf),
        }
    }

    /// The same bytes as `part` (a slice of the read buffer), shared.
    pub(crate) fn slice(&self, part: &[u8]) -> Option<bytes::Bytes> {
        let start = (part.as_ptr() as usize).checked_sub(self.buf.as_ptr() as usize)?;
        let end = start.checked_add(part.len())?;
        (end <= self.buf.len()).then(|| self.bytes.slice(start..end))
    }

    pub(crate) fn value(&self, part: &[u8]) -> Option<HeaderValue> {
        HeaderValue::from_maybe_shared(self.slice(part)?).ok()
    }

    /// An origin-form request target (`/path?query`).
    pub(crate) fn uri(&self, target: &str) -> Option<http::Uri> {
        let uri = http::Uri::from_maybe_shared(self.slice(target.as_bytes())?).ok()?;
        uri.path_and_query()?;
        Some(uri)
    }
}

/// What the first response on a compact SSE connection left to do.
pub(crate) enum Started {
    /// Nothing: the response is written, or the connection failed.
    Done,
    /// A body still to send (then the connection closes).
    Sending(Sending),
    /// The first delivery is written: the connection goes to its stream's
    /// reactor ([`crate::sse_reactor`]).
    Park(crate::live::ParkedSse),
}

/// Calls the router with `req` and writes its response head to `stream`;
/// returns what is left to do. Boxed by the caller: the router's future is
/// large and only lives until the head is written.
pub(crate) async fn start(
    stream: &mut TcpStream,
    app: &crate::direct::App,
    req: Box<Request<Body>>,
) -> Started {
    let resp: Response<Body> = app.call(*req).await;
    let (mut parts, body) = resp.into_parts();
    let parked = parts
        .extensions
        .remove::<crate::live::ParkSlot>()
        .and_then(|slot| slot.0.lock().take());
    let framing = framing(parts.status, &parts.headers, &body);
    let mut head = Vec::with_capacity(512);
    encode_head(&mut head, parts.status, &parts.headers, framing, true);
    drop(parts);
    if let Some(parked) = parked {
        if framing != Framing::Chunked {
            return Started::Done;
        }
        // The first delivery goes out with the head, as one chunk.
        use http_body_util::BodyExt as _;
        let Ok(first) = body.collect().await.map(|c| c.to_bytes()) else {
            return Started::Done;
        };
        if !first.is_empty() {
            head.extend_from_slice(format!("{:x}\r\n", first.len()).as_bytes());
            head.extend_from_slice(&first);
            head.extend_from_slice(b"\r\n");
        }
        return match stream.write_all(&head).await {
            Ok(()) => Started::Park(parked),
            Err(_) => Started::Done,
        };
    }
    if stream.write_all(&head).await.is_err() {
        return Started::Done;
    }
    if framing == Framing::None {
        Started::Done
    } else {
        Started::Sending(Sending { body, framing })
    }
}

/// A response body being sent on a compact connection.
pub(crate) struct Sending {
    body: Body,
    framing: Framing,
}

/// Sends the rest of a response, then closes the connection. Spawned as a
/// task of its own so an idle SSE connection holds just this: the socket,
/// the body, the output being written, and the graceful-shutdown watcher
/// and connection slot kept until the end. A hand-written future rather
/// than an `async fn`: readiness is polled directly, with no per-await
/// future state, so it stays a couple of hundred bytes.
pub(crate) fn finish<W: Unpin, P: Unpin>(
    stream: TcpStream,
    sending: Sending,
    watcher: W,
    permit: P,
) -> Finish<W, P> {
    let (body, framing) = (Some(sending.body), sending.framing);
    Finish {
        stream,
        body,
        framing,
        out: None,
        discarded_bytes: 0,
        closing: false,
        _held: (watcher, permit),
    }
}

/// Output being written: a chunk-size line, data, and a CRLF (the first
/// and last empty without chunked coding).
type Out = bytes::buf::Chain<
    bytes::buf::Chain<bytes::buf::Take<io::Cursor<[u8; 18]>>, bytes::Bytes>,
    &'static [u8],
>;

pub(crate) struct Finish<W, P> {
    stream: TcpStream,
    /// `None` once it ended (or failed, or there was none).
    body: Option<Body>,
    framing: Framing,
    out: Option<Out>,
    discarded_bytes: usize,
    /// Shutting the socket down: nothing more is sent.
    closing: bool,
    _held: (W, P),
}

impl<W: Unpin, P: Unpin> std::future::Future for Finish<W, P> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        use axum::body::HttpBody as _;
        let this = self.get_mut();
        loop {
            if let Some(out) = &mut this.out {
                match tokio_util::io::poll_write_buf(Pin::new(&mut this.stream), cx, out) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        if !out.has_remaining() {
                            this.out = None;
                        }
                        continue;
                    }
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if this.closing {
                return Pin::new(&mut this.stream).poll_shutdown(cx).map(|_| ());
            }
            // The peer leaving (EOF, reset) ends the response at once, so
            // the body, and the live-reader slot it holds, go now rather
            // than at the next event. Anything it sends is dropped.
            if let Poll::Ready(r) = this.stream.poll_read_ready(cx) {
                if r.is_err() {
                    return Poll::Ready(());
                }
                let mut scratch = [0u8; 512];
                match this.stream.try_read(&mut scratch) {
                    Ok(0) => return Poll::Ready(()),
                    Ok(n) => {
                        this.discarded_bytes += n;
                        if this.discarded_bytes > MAX_DISCARD_BYTES {
                            return Poll::Ready(());
                        }
                    }
                    // Readiness was stale; cleared by this read.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Poll::Ready(()),
                }
                continue;
            }
            let Some(body) = &mut this.body else {
                this.closing = true;
                continue;
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                // A failed body: close without the last chunk, so the
                // client sees the response cut short, not complete.
                Poll::Ready(Some(Err(_))) => return Poll::Ready(()),
                Poll::Ready(None) => {
                    this.body = None;
                    if this.framing == Framing::Chunked {
                        this.out = Some(out(b"0\r\n", bytes::Bytes::new(), b"\r\n"));
                    }
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers: not sent
                    };
                    if data.is_empty() {
                        continue;
                    }
                    this.out = Some(if this.framing == Framing::Chunked {
                        let mut size = [0u8; 18];
                        let n = chunk_size_line(&mut size, data.len());
                        out(&size[..n], data, b"\r\n")
                    } else {
                        out(b"", data, b"")
                    });
                }
            }
        }
    }
}

fn out(prefix: &[u8], data: bytes::Bytes, suffix: &'static [u8]) -> Out {
    let mut line = [0u8; 18];
    line[..prefix.len()].copy_from_slice(prefix);
    io::Cursor::new(line)
        .take(prefix.len())
        .chain(data)
        .chain(suffix)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (204, 304).
    None,
    /// The body as is: its length is in `Content-Length` (the router's, or
    /// this one from the body's exact size).
    Length(Option<u64>),
    /// Chunked transfer coding, ended by the zero chunk.
    Chunked,
}

pub(crate) fn framing(status: StatusCode, headers: &HeaderMap, body: &Body) -> Framing {
    use axum::body::HttpBody as _;
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if headers.contains_key(http::header::CONTENT_LENGTH) {
        Framing::Length(None)
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(Some(n))
    } else {
        Framing::Chunked
    }
}

/// Status line and headers: the router's, with the connection's framing,
/// `Connection: close` when `close`, and `Date` as hyper adds it.
/// Appended to `out`.
pub(crate) fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    close: bool,
) {
    encode_status_line(out, status);
    for (name, value) in headers {
        // Connection-level headers are this connection's to set.
        if name == http::header::CONNECTION
            || name == http::header::TRANSFER_ENCODING
            || name == "keep-alive"
        {
            continue;
        }
        encode_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    encode_head_end(
        out,
        (!headers.contains_key(http::header::DATE)).then(std::time::Instant::now),
        framing,
        close,
    );
}

/// `HTTP/1.1 {status} {reason}`: a response head's first line.
pub(crate) fn encode_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// One header line.
pub(crate) fn encode_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The connection's own headers (`Date` as of `date` if given,
/// `Connection: close`, the framing) and the blank line ending the head.
pub(crate) fn encode_head_end(
    out: &mut Vec<u8>,
    date: Option<std::time::Instant>,
    framing: Framing,
    close: bool,
) {
    if let Some(now) = date {
        out.extend_from_slice(b"date: ");
        http_date(now, |d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(crate::handlers::decimal(n, &mut [0u8; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length(None) | Framing::None => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Calls `f` with the `Date` value as of `now`, formatted once per second
/// per thread (as hyper does) rather than per response. The caller's
/// instant saves a read of the wall clock per response: the cached value
/// says until when it holds.
fn http_date(now: std::time::Instant, f: impl FnOnce(&[u8])) {
    use std::cell::RefCell;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(Option<std::time::Instant>, String)> =
            const { RefCell::new((None, String::new())) };
    }
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        let stale = match c.0 {
            Some(until) => now >= until,
            None => true,
        };
        if stale {
            let wall = SystemTime::now();
            let into_second = wall
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let until = now + Duration::from_nanos(u64::from(1_000_000_000 - into_second));
            *c = (Some(until), httpdate::fmt_http_date(wall));
        }
        f(c.1.as_bytes());
    });
}

/// Writes `{len:x}\r\n` into `out`; returns its length.
fn chunk_size_line(out: &mut [u8; 18], len: usize) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = 0;
    let mut v = len;
    loop {
        digits[n] = HEX[v & 0xf];
        n += 1;
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = digits[n - 1 - i];
    }
    out[n] = b'\r';
    out[n + 1] = b'\n';
    n + 2
}

/// A socket with bytes already read from it put back in front.
pub(crate) struct Replay<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Replay {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                // Replayed: free the buffer for the rest of the connection.
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    const HEAD: &[u8] = b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n";

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// The head-read deadline of each keep-alive request counts from that
    /// request's wait, though the connection's timer was armed for an
    /// earlier one; an idle wait past it, or a shutdown, ends the connection.
    #[tokio::test(start_paused = true)]
    async fn head_waits_move_with_each_request() {
        let (mut client, mut server) = pair().await;
        let peer = server.peer_addr().unwrap();
        let shutdown = CancellationToken::new();
        let timeout = Duration::from_secs(30);
        let mut waits = HeadWaits::new(timeout, &shutdown);
        let mut buf = Vec::new();
        let started = Instant::now();

        client.write_all(HEAD).await.unwrap();
        let head = read_head(&mut server, peer, &mut waits, &[], &mut buf).await;
        assert!(!matches!(head, Head::Closed), "first head");

        // The next head comes 20 s into a wait that began at 20 s: past the
        // first wait's deadline (30 s), within its own (50 s).
        tokio::time::advance(Duration::from_secs(20)).await;
        let late = async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            client.write_all(HEAD).await.unwrap();
            client
        };
        let (head, client) = tokio::join!(
            read_head(&mut server, peer, &mut waits, &[], &mut buf),
            late
        );
        assert!(!matches!(head, Head::Closed), "second head, 40 s in");

        // No third head: the wait ends at its own deadline.
        let waited = Instant::now();
        let head = read_head(&mut server, peer, &mut waits, &[], &mut buf).await;
        assert!(matches!(head, Head::Closed), "idle wait");
        assert!(waited.elapsed() >= timeout, "closed before the deadline");
        assert!(started.elapsed() < Duration::from_secs(120));

        // A shutdown ends a wait at once.
        let (_client2, mut server2) = pair().await;
        let mut waits = HeadWaits::new(timeout, &shutdown);
        let stop = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            shutdown.cancel();
        };
        let waited = Instant::now();
        let (head, ()) = tokio::join!(
            read_head(&mut server2, peer, &mut waits, &[], &mut buf),
            stop
        );
        assert!(matches!(head, Head::Closed), "shutdown");
        assert!(
            waited.elapsed() < timeout,
            "shutdown waited for the deadline"
        );
        drop(client);
    }
}
