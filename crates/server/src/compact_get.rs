//! Catch-up reads on cleartext HTTP/1.1 connections without hyper, so their
//! bytes go from the stream's data file to the socket with `sendfile`.
//!
//! Through hyper a catch-up body is copied twice in this process: the
//! engine reads it from the page cache into a buffer, then `writev` copies
//! that buffer into the socket. A profile of 4 readers pulling a 64 MiB
//! stream had those two copies, the zeroing of the buffer and the extra
//! softirq work of the small writes at about half of the server's CPU. With
//! `sendfile` the kernel hands page-cache pages to the socket directly.
//!
//! A connection whose first request is a catch-up `GET` (an `offset`, no
//! `live`, no body, HTTP/1.1, no compression accepted) is served here: the
//! request goes through the same axum [`Router`] as any other (auth, rate
//! limits, CORS, request ids and metrics apply unchanged), marked
//! [`ZeroCopy`]; a handler that can leaves the bytes in the file and puts a
//! [`FileBody`] on the response, which is sent here with `sendfile`; any
//! other response is written as it is. The connection stays open while the
//! requests that follow are catch-up reads too; the first one that is not
//! (or that needs hyper: pipelining, a body, h2c) is replayed to hyper with
//! the bytes already read, and hyper serves the rest of the connection.
//!
//! `sendfile` reads the file synchronously: on a page-cache miss it waits
//! for the disk on a runtime thread. The bytes sent are those just written
//! or recently read in the common case; the copying path (through hyper)
//! reads large ranges on the blocking pool instead.

use crate::compact_sse::{encode_head, framing, Framing};
use crate::compression::{negotiate, Algorithm};
use axum::body::Body;
use axum::Router;
use durable_streams_storage::FileSlice;
use http::{HeaderMap, Request, Response};
use std::io;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// Marks a request whose response may carry a [`FileBody`]: the connection
/// sends it with `sendfile`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ZeroCopy;

/// A response body left in a file. The response's `Content-Length` is the
/// slice's length and its `Body` is empty.
#[derive(Debug, Clone)]
pub(crate) struct FileBody(pub(crate) FileSlice);

/// Bytes per `sendfile` call: bounds how long one call holds the runtime
/// thread when the socket buffer keeps draining.
const SENDFILE_MAX_BYTES: usize = 1 << 20;

/// True when the request line is a catch-up read: a query with `offset=`
/// and without `live=`.
pub(crate) fn line_asks_catch_up(line: &[u8]) -> bool {
    let Some(q) = line.iter().position(|&b| b == b'?') else {
        return false;
    };
    let rest = &line[q + 1..];
    let end = rest
        .iter()
        .position(|&b| b == b' ' || b == b'#')
        .unwrap_or(rest.len());
    let mut offset = false;
    for p in rest[..end].split(|&b| b == b'&') {
        if p.starts_with(b"live=") || p == b"live" {
            return false;
        }
        offset |= p.starts_with(b"offset=");
    }
    offset
}

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

/// True when the request asks for the connection to close after it.
fn wants_close(headers: &HeaderMap) -> bool {
    headers.get_all(http::header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// Serves one catch-up request on `stream`. Returns `true` when the
/// connection may carry another request (the response was sent whole and
/// neither side asked to close).
pub(crate) async fn respond(stream: &mut TcpStream, app: Router, req: Box<Request<Body>>) -> bool {
    let close = wants_close(req.headers());
    let resp = tower::ServiceExt::oneshot(app, *req).await;
    let resp: Response<Body> = match resp {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (mut parts, body) = resp.into_parts();
    let file = parts.extensions.remove::<FileBody>();
    let close = close || wants_close(&parts.headers);
    let framing = framing(parts.status, &parts.headers, &body);
    let head = encode_head(parts.status, &parts.headers, framing, close);
    drop(parts);
    let sent = match file {
        Some(FileBody(slice)) => send_file(stream, &head, &slice).await,
        None => send_body(stream, &head, body, framing).await,
    };
    match sent {
        Ok(()) if !close => true,
        _ => {
            let _ = stream.shutdown().await;
            false
        }
    }
}

async fn send_file(stream: &mut TcpStream, head: &[u8], slice: &FileSlice) -> io::Result<()> {
    stream.write_all(head).await?;
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

async fn send_body(
    stream: &mut TcpStream,
    head: &[u8],
    mut body: Body,
    framing: Framing,
) -> io::Result<()> {
    use http_body_util::BodyExt as _;
    stream.write_all(head).await?;
    if framing == Framing::None {
        return Ok(());
    }
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not sent
        };
        if data.is_empty() {
            continue;
        }
        if framing == Framing::Chunked {
            stream
                .write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            stream.write_all(&data).await?;
            stream.write_all(b"\r\n").await?;
        } else {
            stream.write_all(&data).await?;
        }
    }
    if framing == Framing::Chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catch_up_lines() {
        assert!(line_asks_catch_up(b"GET /s?offset=-1 HTTP/1.1\r"));
        assert!(line_asks_catch_up(b"GET /s?a=1&offset=0000_0001 HTTP/1.1"));
        assert!(!line_asks_catch_up(b"GET /s?offset=-1&live=sse HTTP/1.1"));
        assert!(!line_asks_catch_up(
            b"GET /s?live=long-poll&offset=1 HTTP/1.1"
        ));
        assert!(!line_asks_catch_up(b"GET /s HTTP/1.1"));
        assert!(!line_asks_catch_up(b"GET /s?offsets=1 HTTP/1.1"));
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
