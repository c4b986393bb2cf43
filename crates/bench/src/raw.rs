//! A lean HTTP/1.1 client for the request-per-operation workloads (durable
//! appends, idempotent producers): one request in flight per connection,
//! the request written with one `write` from a reused buffer, the response
//! head parsed in place with `httparse`, nothing else allocated but the
//! response body.
//!
//! Why not hyper's client (`conn.rs`, still used for reads and fan-out): at
//! 256 connections the generator has one core and was the side that ran out
//! of it. A profile of that core (system-wide, 256 connections on one
//! stream) showed it 94% busy at 63k appends/s, ~15 µs per append, about
//! half of it in user space (request building and header maps, the
//! connection task's channel hop, `malloc`), more than either server spent
//! per append. A generator at its limit caps every server at about the same
//! rate, so the throughput ratio said little about the servers.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most headers a response may carry.
const MAX_HEADERS: usize = 64;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body (or chunk) accepted: these workloads' responses are small.
const MAX_BODY: usize = 64 << 20;

pub struct RawConn {
    addr: SocketAddr,
    host: String,
    sock: Option<TcpStream>,
    out: Vec<u8>,
    inp: BytesMut,
}

/// A fully read response: its status, head (for header lookups on demand)
/// and body (chunked encoding removed).
pub struct RawResp {
    pub status: u16,
    head: Bytes,
    pub body: Bytes,
}

impl RawResp {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A header's value (the first, by case-insensitive name), parsed from
    /// the head when asked: most callers never ask.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut hs);
        r.parse(&self.head).ok()?;
        let v = r
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))?
            .value;
        // The value borrows from `self.head`, not from the parser.
        let at = v.as_ptr() as usize - self.head.as_ptr() as usize;
        std::str::from_utf8(&self.head[at..at + v.len()]).ok()
    }
}

/// How a response's body ends.
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// A parsed response head: status, its length in bytes, body framing, and
/// whether the server closes the connection after it.
struct Head {
    status: u16,
    len: usize,
    framing: Framing,
    close: bool,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut hs);
    let len = match r.parse(buf).context("bad response head")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            ensure!(buf.len() < MAX_HEAD, "response head too large");
            return Ok(None);
        }
    };
    let status = r.code.ok_or_else(|| anyhow!("no status"))?;
    let mut framing = Framing::UntilClose;
    let mut close = r.version == Some(0);
    for h in r.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            if !matches!(framing, Framing::Chunked) {
                let n: usize = v.parse().context("bad content-length")?;
                ensure!(n <= MAX_BODY, "content-length {n}");
                framing = Framing::Length(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if v.to_ascii_lowercase().contains("chunked") {
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = v.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Empty;
    }
    Ok(Some(Head {
        status,
        len,
        framing,
        close,
    }))
}

/// Decodes a complete chunked body at the start of `buf`: the body and the
/// bytes it took (through the trailer's final CRLF), or `None` if more
/// bytes are needed.
fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') else {
            ensure!(buf.len() - at < 1024, "chunk size line too long");
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[at..at + nl]).context("bad chunk size line")?;
        let hex = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(hex, 16).map_err(|_| anyhow!("bad chunk size line {line:?}"))?;
        ensure!(size <= MAX_BODY, "chunk of {size} bytes");
        at += nl + 1;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') else {
                    return Ok(None);
                };
                let empty = buf[at..at + nl].iter().all(|&b| b == b'\r');
                at += nl + 1;
                if empty {
                    return Ok(Some((body, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        ensure!(
            &buf[at + size..at + size + 2] == b"\r\n",
            "chunk without CRLF"
        );
        at += size + 2;
    }
}

impl RawConn {
    pub fn new(addr: SocketAddr) -> Self {
        RawConn {
            addr,
            host: addr.to_string(),
            sock: None,
            out: Vec::with_capacity(1024),
            inp: BytesMut::with_capacity(8 * 1024),
        }
    }

    /// Sends one request and reads its whole response. On any error the
    /// connection is dropped (the next call opens a new one): whether the
    /// request took effect is then unknown to the caller.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<RawResp> {
        let r = self.exchange(method, path, headers, body).await;
        if r.is_err() {
            self.sock = None;
        }
        r
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<RawResp> {
        if self.sock.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connect {}", self.addr))?;
            s.set_nodelay(true)?;
            self.inp.clear();
            self.sock = Some(s);
        }
        let out = &mut self.out;
        out.clear();
        for part in [method, " ", path, " HTTP/1.1\r\nhost: ", &self.host] {
            out.extend_from_slice(part.as_bytes());
        }
        for (k, v) in headers {
            for part in ["\r\n", k, ": ", v] {
                out.extend_from_slice(part.as_bytes());
            }
        }
        use std::io::Write;
        write!(out, "\r\ncontent-length: {}\r\n\r\n", body.len())?;
        out.extend_from_slice(body);
        let sock = self.sock.as_mut().ok_or_else(|| anyhow!("no connection"))?;
        sock.write_all(out).await?;
        let inp = &mut self.inp;
        if !inp.is_empty() {
            bail!("{} bytes the server sent unasked", inp.len());
        }
        let head = loop {
            if let Some(h) = parse_head(inp)? {
                if (100..200).contains(&h.status) {
                    inp.advance(h.len);
                    continue;
                }
                break h;
            }
            inp.reserve(4096);
            if sock.read_buf(inp).await? == 0 {
                bail!("connection closed before the response");
            }
        };
        let head_bytes = inp.split_to(head.len).freeze();
        let body = match head.framing {
            Framing::Empty => Bytes::new(),
            Framing::Length(n) => {
                while inp.len() < n {
                    inp.reserve(n - inp.len());
                    if sock.read_buf(inp).await? == 0 {
                        bail!("connection closed inside the body");
                    }
                }
                inp.split_to(n).freeze()
            }
            Framing::Chunked => loop {
                if let Some((b, used)) = parse_chunked(inp)? {
                    inp.advance(used);
                    break Bytes::from(b);
                }
                inp.reserve(4096);
                if sock.read_buf(inp).await? == 0 {
                    bail!("connection closed inside the body");
                }
            },
            Framing::UntilClose => {
                while sock.read_buf(inp).await? != 0 {
                    inp.reserve(4096);
                }
                self.sock = None;
                inp.split().freeze()
            }
        };
        if head.close {
            self.sock = None;
        }
        Ok(RawResp {
            status: head.status,
            head: head_bytes,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunked body decodes only once complete, through its last CRLF, at
    /// every split point.
    #[test]
    fn chunked_body_needs_every_byte() {
        let wire = b"5;x=1\r\nhello\r\n1\r\n!\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = wire.len() - 4;
        for cut in 0..end {
            assert!(parse_chunked(&wire[..cut]).unwrap().is_none(), "cut {cut}");
        }
        let (b, used) = parse_chunked(wire).unwrap().unwrap();
        assert_eq!(b, b"hello!");
        assert_eq!(used, end);
        assert!(parse_chunked(b"zz\r\n").is_err());
        assert!(parse_chunked(b"1\r\nab\r\n").is_err());
    }

    /// The head tells the body's framing and whether the connection closes.
    #[test]
    fn head_framing() {
        let h = parse_head(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Empty) && !h.close && h.status == 204);
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Length(7)) && h.close);
        let h = parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Chunked));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n").unwrap().is_none());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
    }

    /// Header values are found by name, case-insensitively.
    #[test]
    fn header_lookup() {
        let r = RawResp {
            status: 200,
            head: Bytes::from_static(b"HTTP/1.1 200 OK\r\nStream-Next-Offset: 12_34\r\n\r\n"),
            body: Bytes::new(),
        };
        assert_eq!(r.header("stream-next-offset"), Some("12_34"));
        assert_eq!(r.header("etag"), None);
    }
}
