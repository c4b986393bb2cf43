//! Catch-up reads and small appends on cleartext HTTP/1.1 connections
//! without hyper: catch-up bytes go from the stream's data file to the
//! socket with `sendfile`, and appends skip hyper's per-request machinery.
//!
//! Through hyper a catch-up body is copied twice in this process: the
//! engine reads it from the page cache into a buffer, then `writev` copies
//! that buffer into the socket. A profile of 4 readers pulling a 64 MiB
//! stream had those two copies, the zeroing of the buffer and the extra
//! softirq work of the small writes at about half of the server's CPU. With
//! `sendfile` the kernel hands page-cache pages to the socket directly.
//!
//! A connection whose request is a catch-up or long-poll `GET` (an
//! `offset`, no `live` or `live=long-poll`, no body, HTTP/1.1, no
//! compression accepted) or a `POST` whose whole
//! `Content-Length` body arrived with its head (within the 16 KiB head
//! buffer) is served here: the request goes through the same application
//! as any other ([`crate::direct::App`]: auth, rate limits, CORS, request
//! ids, body limits and metrics apply unchanged). A catch-up read is marked
//! [`ZeroCopy`]; a handler that can leaves the bytes in the file and puts a
//! [`FileBody`] on the response, which is sent here with `sendfile`; any
//! other response is written as it is (small ones in one write with the
//! head). Appends are usually answered by [`crate::compact_append`]
//! without building a request at all; they come here when authentication or
//! a rate limit is configured, or their target is unusual. The connection
//! stays here while its requests qualify; the first
//! one that does not (another method, pipelining, a chunked or larger body,
//! `Expect`, h2c) is replayed to hyper with the bytes already read, and
//! hyper serves the rest of the connection.
//!
//! `sendfile` reads the file synchronously: on a page-cache miss it waits
//! for the disk on a runtime thread. The bytes sent are those just written
//! or recently read in the common case; the copying path (through hyper)
//! reads large ranges on the blocking pool instead.

use crate::compact_sse::{encode_head, framing, Framing};
use crate::compression::{negotiate, Algorithm};
use axum::body::Body;
use durable_streams_protocol::headers as h;
use durable_streams_storage::FileSlice;
use http::{HeaderMap, Request, Response};
use std::io;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// Marks a request whose response may carry a [`FileBody`]: the connection
/// sends it with `sendfile`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ZeroCopy;

/// A response body left in a file: the slice, as a JSON array (`[`, the
/// slice, `]`) when `json_array`. The response's `Content-Length` is
/// [`FileBody::len`]; its `Body` is not sent.
#[derive(Debug, Clone)]
pub(crate) struct FileBody {
    pub(crate) slice: FileSlice,
    pub(crate) json_array: bool,
}

impl FileBody {
    /// Bytes sent.
    pub(crate) fn len(&self) -> u64 {
        self.slice.len() + if self.json_array { 2 } else { 0 }
    }
}

/// Bytes per `sendfile` call: bounds how long one call holds the runtime
/// thread when the socket buffer keeps draining.
const SENDFILE_MAX_BYTES: usize = 1 << 20;

/// Bodies from this size up (catch-up reads; a live reader's few bytes stay
/// inline) are sent from a blocking-pool thread that keeps the socket full
/// and waits for it with `poll`. Measured, rotated A/B, four rounds, 4
/// readers of a 64 MiB stream: 4661 MB/s against 4047 inline. It also keeps
/// a page-cache miss (a cold catch-up read) from stalling the runtime
/// thread, and every connection on it, for the disk's time.
const BLOCKING_SENDFILE_MIN_BYTES: u64 = 256 * 1024;

/// Most bodies sent from blocking threads at once; the next ones are sent
/// inline rather than waiting for a thread.
const MAX_BLOCKING_SENDFILES: usize = 32;

/// A blocking send gives up after this long without progress: a client
/// that stopped reading must not hold a thread for ever.
const BLOCKING_SENDFILE_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a blocking send waiting for the socket checks whether its
/// connection was dropped (server shutdown, or the connection's task
/// cancelled), so the thread is not held past it.
const BLOCKING_SENDFILE_POLL_MS: i64 = 100;

static BLOCKING_SENDFILES: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_BLOCKING_SENDFILES);

/// A read the compact path serves, by its request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineRead {
    /// A query with `offset=` and without `live=`.
    CatchUp,
    /// A query with `offset=` and `live=long-poll`.
    LongPoll,
}

/// What read the request line asks for, if one served here: `offset=` and
/// no `live=`, or `live=long-poll`.
pub(crate) fn line_read(line: &[u8]) -> Option<LineRead> {
    let q = line.iter().position(|&b| b == b'?')?;
    let rest = &line[q + 1..];
    let end = rest
        .iter()
        .position(|&b| b == b' ' || b == b'#')
        .unwrap_or(rest.len());
    let mut offset = false;
    let mut kind = LineRead::CatchUp;
    for p in rest[..end].split(|&b| b == b'&') {
        if p == b"live=long-poll" && kind == LineRead::CatchUp {
            kind = LineRead::LongPoll;
        } else if p.starts_with(b"live=") || p == b"live" {
            return None;
        }
        offset |= p.starts_with(b"offset=");
    }
    offset.then_some(kind)
}

/// Marks a long-poll: while its handler waits for data, the connection is
/// watched for the client going away, which ends the wait (hyper's
/// connection task does the same).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatchClose;

/// True when the response may be sent uncompressed without overriding the
/// client's preference: no `Accept-Encoding`, or one that negotiates to
/// identity against `codings`, those the server may answer with.
pub(crate) fn identity_only(headers: &HeaderMap, codings: &[Algorithm]) -> bool {
    let mut values = headers.get_all(http::header::ACCEPT_ENCODING).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        _ if codings.is_empty() => true,
        (Some(v), None) => negotiate(v.as_bytes(), codings).is_none(),
        _ => false,
    }
}

/// What a `POST` head (and the bytes after it) decided.
pub(crate) enum Post {
    /// Head and whole body: served here.
    Ready(Box<Request<Body>>),
    /// The body is still arriving (it fits the head buffer).
    NeedMore,
    /// Chunked, `Expect`, an upgrade, pipelined bytes after the body, a
    /// body larger than the head buffer, anything unusual: hyper's job.
    Hyper,
}

/// An append (`POST` with a `Content-Length` body) as hyper would have
/// built it. `rest`: the bytes read after the head.
pub(crate) fn build_post(
    parsed: &httparse::Request<'_, '_>,
    buf: &[u8],
    head_len: usize,
    peer: std::net::SocketAddr,
) -> Post {
    let rest = &buf[head_len..];
    let path = match post_body(parsed, rest) {
        Ok(path) => path,
        Err(not_ready) => return not_ready,
    };
    let shared = crate::compact_sse::SharedHead::new(buf);
    let Some(uri) = shared.uri(path) else {
        return Post::Hyper;
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let Some(name) = header_name(h.name) else {
            return Post::Hyper;
        };
        if name == http::header::TRANSFER_ENCODING
            || name == http::header::UPGRADE
            || name == http::header::EXPECT
        {
            return Post::Hyper;
        }
        let Some(value) = shared.value(h.value) else {
            return Post::Hyper;
        };
        headers.append(name, value);
    }
    let Some(body) = shared.slice(rest) else {
        return Post::Hyper;
    };
    let mut req = Request::new(Body::from(body));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_11;
    *req.headers_mut() = headers;
    req.extensions_mut().insert(crate::PeerAddr(peer));
    Post::Ready(Box::new(req))
}

/// Checks shared by the two ways an append is served here
/// ([`build_post`] and [`crate::compact_append`]): an HTTP/1.1 `POST` with
/// one plain `Content-Length` whose whole body (`rest`, the bytes after the
/// head) has arrived, and nothing after it. Gives the request target.
pub(crate) fn post_body<'b>(
    parsed: &httparse::Request<'_, 'b>,
    rest: &[u8],
) -> Result<&'b str, Post> {
    if parsed.method != Some("POST") || parsed.version != Some(1) {
        return Err(Post::Hyper);
    }
    let Some(path) = parsed.path else {
        return Err(Post::Hyper);
    };
    // Checked before copying: a body still arriving is read first.
    let Some(length) = content_length(parsed) else {
        return Err(Post::Hyper);
    };
    if length > crate::compact_sse::MAX_HEAD_BYTES {
        return Err(Post::Hyper);
    }
    match rest.len().cmp(&length) {
        std::cmp::Ordering::Less => Err(Post::NeedMore),
        std::cmp::Ordering::Greater => Err(Post::Hyper),
        std::cmp::Ordering::Equal => Ok(path),
    }
}

/// The protocol's own request headers, as names that cost no allocation:
/// `HeaderName::from_bytes` copies every name that is not a standard HTTP
/// header into a new buffer (three per idempotent-producer append).
static PROTOCOL_NAMES: std::sync::LazyLock<Vec<http::HeaderName>> =
    std::sync::LazyLock::new(|| {
        [
            h::PRODUCER_ID,
            h::PRODUCER_EPOCH,
            h::PRODUCER_SEQ,
            h::STREAM_SEQ,
            h::STREAM_TTL,
            h::STREAM_EXPIRES_AT,
            h::STREAM_CLOSED,
            h::REQUEST_ID,
        ]
        .into_iter()
        .map(http::HeaderName::from_static)
        .collect()
    });

/// A request header's name, without allocating for the protocol's own.
fn header_name(name: &str) -> Option<http::HeaderName> {
    if let Some(known) = PROTOCOL_NAMES
        .iter()
        .find(|n| n.as_str().eq_ignore_ascii_case(name))
    {
        return Some(known.clone());
    }
    http::HeaderName::from_bytes(name.as_bytes()).ok()
}

/// The request's one plain decimal `Content-Length`; `None` when it has
/// none, several, or one hyper should judge, and with chunked coding, an
/// upgrade or an `Expect` (a client waiting for `100 Continue` must not be
/// waited for here).
fn content_length(parsed: &httparse::Request<'_, '_>) -> Option<usize> {
    let mut length = None;
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("upgrade")
            || h.name.eq_ignore_ascii_case("expect")
        {
            return None;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = h.value;
            if length.is_some() || v.is_empty() || v.len() > 9 || !v.iter().all(u8::is_ascii_digit)
            {
                return None;
            }
            length = std::str::from_utf8(v).ok().and_then(|t| t.parse().ok());
        }
    }
    length
}

/// True when the request asks for the connection to close after it.
fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| connection_close(v.as_bytes()))
}

/// True when a `Connection` value has the `close` token.
pub(crate) fn connection_close(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// Serves one request on `stream`. Returns `true` when the
/// connection may carry another request (the response was sent whole and
/// neither side asked to close). `out`: the connection's response buffer,
/// reused across its requests.
pub(crate) async fn respond(
    stream: &mut TcpStream,
    app: &crate::direct::App,
    req: Box<Request<Body>>,
    out: &mut Vec<u8>,
) -> bool {
    let close = wants_close(req.headers());
    let resp: Response<Body> = if req.extensions().get::<WatchClose>().is_some() {
        let call = app.call(*req);
        tokio::select! {
            resp = call => resp,
            () = peer_closed(stream) => {
                let _ = stream.shutdown().await;
                return false;
            }
        }
    } else {
        app.call(*req).await
    };
    send_response(stream, resp, close, out).await
}

/// Ready when the client closed its side (or the connection failed);
/// pending forever once it sends more bytes (a pipelined request, read
/// after the response).
async fn peer_closed(stream: &TcpStream) {
    let mut byte = [0u8; 1];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_io(Interest::READABLE, || {
            rustix::net::recv(stream, &mut byte, rustix::net::RecvFlags::PEEK)
                .map(|(n, _)| n)
                .map_err(io::Error::from)
        }) {
            Ok(0) => return,
            Ok(_) => return std::future::pending().await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Sends `resp` on `stream`; `close`: the request asked to close. Returns
/// `true` when the connection may carry another request.
pub(crate) async fn send_response(
    stream: &mut TcpStream,
    resp: Response<Body>,
    close: bool,
    out: &mut Vec<u8>,
) -> bool {
    let (mut parts, body) = resp.into_parts();
    let file = parts.extensions.remove::<FileBody>();
    let close = close || wants_close(&parts.headers);
    let framing = framing(parts.status, &parts.headers, &body);
    out.clear();
    encode_head(out, parts.status, &parts.headers, framing, close);
    drop(parts);
    let sent = match file {
        Some(body) => send_file(stream, out, &body).await,
        None => send_body(stream, out, body, framing).await,
    };
    finish(stream, sent, close, out).await
}

/// After a response: keeps `out` for the next one if small; closes the
/// connection when sending failed or `close`. Returns `true` when the
/// connection may carry another request.
pub(crate) async fn finish(
    stream: &mut TcpStream,
    sent: io::Result<()>,
    close: bool,
    out: &mut Vec<u8>,
) -> bool {
    // Kept for the next request only while small: an idle keep-alive
    // connection should not hold a large response's buffer.
    if out.capacity() > KEPT_OUT_BUF_BYTES {
        *out = Vec::new();
    }
    match sent {
        Ok(()) if !close => true,
        _ => {
            let _ = stream.shutdown().await;
            false
        }
    }
}

/// Largest response buffer a connection keeps between requests.
const KEPT_OUT_BUF_BYTES: usize = 4096;

/// `head`: the encoded head (`[` is appended to it for a JSON array).
async fn send_file(stream: &mut TcpStream, head: &mut Vec<u8>, body: &FileBody) -> io::Result<()> {
    if body.json_array {
        head.push(b'[');
    }
    stream.write_all(head).await?;
    send_slice(stream, &body.slice).await?;
    if body.json_array {
        stream.write_all(b"]").await?;
    }
    Ok(())
}

async fn send_slice(stream: &mut TcpStream, slice: &FileSlice) -> io::Result<()> {
    let Some(fd) = slice.fd() else {
        // A file without a descriptor (the simulated file system): copy.
        let mut buf = vec![0u8; (slice.len() as usize).min(SENDFILE_MAX_BYTES)];
        let mut at = 0u64;
        while at < slice.len() {
            let want = ((slice.len() - at) as usize).min(buf.len());
            let n = slice.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            stream.write_all(&buf[..n]).await?;
            at += n as u64;
        }
        return Ok(());
    };
    if slice.len() >= BLOCKING_SENDFILE_MIN_BYTES {
        if let Ok(permit) = BLOCKING_SENDFILES.try_acquire() {
            return send_slice_blocking(stream, slice, permit).await;
        }
    }
    let mut position = slice.position();
    let end = position + slice.len();
    while position < end {
        let want = ((end - position) as usize).min(SENDFILE_MAX_BYTES);
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(&*stream, fd, Some(&mut position), want).map_err(io::Error::from)
        });
        match sent {
            // The file ended before the slice did: cannot happen for bytes
            // below the published tail; end the response short (the client
            // sees fewer bytes than Content-Length) rather than hang.
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `slice` from a blocking-pool thread, on a duplicate of the
/// socket's descriptor (it shares the socket's non-blocking mode, so the
/// thread waits for room with `poll`). The duplicate keeps the socket open
/// if this future is dropped meanwhile; the thread then stops at its next
/// wait. This future holds the socket, so nothing else writes to it until
/// the thread is done.
async fn send_slice_blocking(
    stream: &TcpStream,
    slice: &FileSlice,
    permit: tokio::sync::SemaphorePermit<'static>,
) -> io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    /// Marks the send abandoned when the awaiting future goes away.
    struct Abandon(Arc<AtomicBool>);
    impl Drop for Abandon {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let sock = rustix::io::fcntl_dupfd_cloexec(stream, 0)?;
    let slice = slice.clone();
    let abandoned = Arc::new(AtomicBool::new(false));
    let _abandon = Abandon(abandoned.clone());
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let fd = slice
            .fd()
            .ok_or_else(|| io::Error::other("file without a descriptor"))?;
        let mut position = slice.position();
        let end = position + slice.len();
        let mut progress_at = std::time::Instant::now();
        while position < end {
            let want = (end - position) as usize;
            match rustix::fs::sendfile(&sock, fd, Some(&mut position), want) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => progress_at = std::time::Instant::now(),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    if abandoned.load(Ordering::Relaxed) {
                        return Err(io::ErrorKind::ConnectionAborted.into());
                    }
                    if progress_at.elapsed() > BLOCKING_SENDFILE_STALL {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    let mut fds = [rustix::event::PollFd::new(
                        &sock,
                        rustix::event::PollFlags::OUT,
                    )];
                    let wait = rustix::event::Timespec {
                        tv_sec: 0,
                        tv_nsec: BLOCKING_SENDFILE_POLL_MS * 1_000_000,
                    };
                    match rustix::event::poll(&mut fds, Some(&wait)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
    .await
    .map_err(io::Error::other)?
}

/// `head`: the encoded head; a small body is appended to it.
async fn send_body(
    stream: &mut TcpStream,
    head: &mut Vec<u8>,
    body: Body,
    framing: Framing,
) -> io::Result<()> {
    use axum::body::HttpBody as _;
    use http_body_util::BodyExt as _;
    if framing == Framing::None {
        return stream.write_all(head).await;
    }
    // A small body of known size (most answers): one write with the head.
    if let Some(n) = body.size_hint().exact().filter(|n| *n <= 64 * 1024) {
        let data = body.collect().await.map_err(io::Error::other)?.to_bytes();
        if data.len() as u64 != n {
            return Err(io::ErrorKind::InvalidData.into());
        }
        head.extend_from_slice(&data);
        return stream.write_all(head).await;
    }
    let mut body = body;
    if framing == Framing::Chunked {
        stream.write_all(head).await?;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(io::Error::other)?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers: not sent
            };
            if data.is_empty() {
                continue;
            }
            stream
                .write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            stream.write_all(&data).await?;
            stream.write_all(b"\r\n").await?;
        }
        return stream.write_all(b"0\r\n\r\n").await;
    }
    // A body of known length in several parts (a read's slices of stored
    // blocks between a JSON array's brackets): gathered and sent with the
    // head by `writev`, a few calls per response instead of a `send` per
    // part (two of which would be one-byte brackets).
    let mut head: &[u8] = head;
    let mut parts = Vec::new();
    let mut gathered = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not sent
        };
        gathered += data.len();
        parts.push(data);
        if parts.len() >= MAX_GATHERED_PARTS || gathered >= MAX_GATHERED_BYTES {
            write_all_vectored(stream, std::mem::take(&mut head), &parts).await?;
            parts.clear();
            gathered = 0;
        }
    }
    write_all_vectored(stream, head, &parts).await
}

/// Most parts [`send_body`] gathers for one `writev`.
const MAX_GATHERED_PARTS: usize = 64;
/// Most bytes [`send_body`] gathers before writing.
const MAX_GATHERED_BYTES: usize = 1 << 20;

/// Writes `head` then `parts`, by `writev`, as many at a time as the
/// socket takes.
async fn write_all_vectored(
    stream: &mut TcpStream,
    head: &[u8],
    parts: &[bytes::Bytes],
) -> io::Result<()> {
    let all: Vec<&[u8]> = std::iter::once(head)
        .chain(parts.iter().map(|p| &p[..]))
        .filter(|b| !b.is_empty())
        .collect();
    // The next unwritten byte: `all[index][offset]`.
    let (mut index, mut offset) = (0, 0);
    let mut slices = Vec::with_capacity(all.len());
    while index < all.len() {
        slices.clear();
        slices.push(io::IoSlice::new(&all[index][offset..]));
        slices.extend(all[index + 1..].iter().map(|b| io::IoSlice::new(b)));
        let mut written = stream.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while index < all.len() && written >= all[index].len() - offset {
            written -= all[index].len() - offset;
            index += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `write_all_vectored` sends the head and every part in order, whole,
    /// when the socket takes them in many partial writes.
    #[tokio::test]
    async fn vectored_writes_send_everything_in_order() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let head = b"HEAD".to_vec();
        // Sizes around and far above a socket buffer, and empty parts.
        let parts: Vec<bytes::Bytes> = [1usize, 0, 3 << 20, 7, 0, 1 << 20, 65_537]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (0..n)
                    .map(|j| (i * 31 + j % 251) as u8)
                    .collect::<Vec<u8>>()
                    .into()
            })
            .collect();
        let mut want = head.clone();
        for p in &parts {
            want.extend_from_slice(p);
        }
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        write_all_vectored(&mut server, &head, &parts)
            .await
            .unwrap();
        drop(server);
        assert!(reader.await.unwrap() == want, "bytes differ");
    }

    #[test]
    fn read_lines() {
        use LineRead::*;
        assert_eq!(line_read(b"GET /s?offset=-1 HTTP/1.1\r"), Some(CatchUp));
        assert_eq!(
            line_read(b"GET /s?a=1&offset=0000_0001 HTTP/1.1"),
            Some(CatchUp)
        );
        assert_eq!(line_read(b"GET /s?offset=-1&live=sse HTTP/1.1"), None);
        assert_eq!(
            line_read(b"GET /s?live=long-poll&offset=1 HTTP/1.1"),
            Some(LongPoll)
        );
        assert_eq!(line_read(b"GET /s?live=long-poll HTTP/1.1"), None);
        assert_eq!(
            line_read(b"GET /s?offset=1&live=long-poll&live=sse HTTP/1.1"),
            None
        );
        assert_eq!(
            line_read(b"GET /s?offset=1&live=long-poll&live=long-poll HTTP/1.1"),
            None
        );
        assert_eq!(line_read(b"GET /s?offset=1&live=longpoll HTTP/1.1"), None);
        assert_eq!(line_read(b"GET /s HTTP/1.1"), None);
        assert_eq!(line_read(b"GET /s?offsets=1 HTTP/1.1"), None);
    }

    #[test]
    fn identity_only_by_accept_encoding() {
        let all = [Algorithm::Zstd, Algorithm::Br, Algorithm::Gzip];
        let mut h = HeaderMap::new();
        assert!(identity_only(&h, &all));
        h.insert(http::header::ACCEPT_ENCODING, "identity".parse().unwrap());
        assert!(identity_only(&h, &all));
        h.insert(http::header::ACCEPT_ENCODING, "gzip".parse().unwrap());
        assert!(!identity_only(&h, &all));
        assert!(identity_only(&h, &[Algorithm::Zstd]));
        assert!(identity_only(&h, &[]), "compression off");
        h.insert(http::header::ACCEPT_ENCODING, "deflate".parse().unwrap());
        assert!(identity_only(&h, &all));
    }

    #[test]
    fn connection_close_tokens() {
        let mut h = HeaderMap::new();
        assert!(!wants_close(&h));
        h.insert(
            http::header::CONNECTION,
            "keep-alive, Close".parse().unwrap(),
        );
        assert!(wants_close(&h));
    }
}
