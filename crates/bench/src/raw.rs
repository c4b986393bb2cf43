//! A lean HTTP/1.1 client for the request-per-operation workloads (durable
//! appends, idempotent producers) and catch-up reads: one request in flight
//! per connection, the request written with one `write` from a reused
//! buffer, the response head parsed in place with `httparse`, nothing else
//! allocated but the response body (or, streaming, nothing at all: a large
//! body is read into one reused buffer and handed over slice by slice).
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
/// Largest body (or chunk) accepted whole: these workloads' responses are
/// small (streamed bodies have no limit).
const MAX_BODY: usize = 64 << 20;
/// The reused buffer a streamed body is read into.
const STREAM_BUF_BYTES: usize = 256 << 10;

pub struct RawConn {
    addr: SocketAddr,
    host: String,
    sock: Option<TcpStream>,
    out: Vec<u8>,
    inp: BytesMut,
    /// For streamed bodies (allocated at the first).
    big: Vec<u8>,
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
                framing = Framing::Length(v.parse().context("bad content-length")?);
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

/// Incremental decoder of a chunked body that hands the data on in place.
#[derive(Default)]
struct Chunked {
    /// Data bytes left in the current chunk.
    left: usize,
    /// Bytes of the CRLF after the current chunk's data still to skip.
    crlf: usize,
    /// In the trailer section, after the last chunk.
    trailer: bool,
    done: bool,
}

impl Chunked {
    /// Decodes what it can of `buf`; returns the bytes used (the rest, a
    /// partial line, is to be fed again with more after it).
    fn feed(
        &mut self,
        buf: &[u8],
        f: &mut impl FnMut(&[u8]) -> Result<()>,
        total: &mut u64,
    ) -> Result<usize> {
        let mut at = 0;
        while at < buf.len() && !self.done {
            if self.left > 0 {
                let k = self.left.min(buf.len() - at);
                f(&buf[at..at + k])?;
                *total += k as u64;
                self.left -= k;
                at += k;
                if self.left == 0 {
                    self.crlf = 2;
                }
            } else if self.crlf > 0 {
                let k = self.crlf.min(buf.len() - at);
                ensure!(
                    buf[at..at + k].iter().all(|&b| b == b'\r' || b == b'\n'),
                    "chunk without CRLF"
                );
                self.crlf -= k;
                at += k;
            } else {
                let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') else {
                    ensure!(buf.len() - at < 1024, "chunk size line too long");
                    break;
                };
                let line = &buf[at..at + nl];
                at += nl + 1;
                if self.trailer {
                    self.done = line.iter().all(|&b| b == b'\r');
                    continue;
                }
                let line = std::str::from_utf8(line).context("bad chunk size line")?;
                let hex = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(hex, 16)
                    .map_err(|_| anyhow!("bad chunk size line {line:?}"))?;
                if size == 0 {
                    self.trailer = true;
                } else {
                    self.left = size;
                }
            }
        }
        Ok(at)
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
            big: Vec::new(),
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
        self.drop_on_err(r)
    }

    /// Passes `r` on; an error also drops the connection (its state is
    /// unknown), so the next request opens a fresh one.
    fn drop_on_err<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.sock = None;
        }
        r
    }

    /// Sends a GET and hands its body to `f` as it arrives, slice by slice
    /// (chunked encoding removed), without keeping it. Returns the response
    /// (with an empty body) and the body's length. Errors drop the
    /// connection, as [`RawConn::call`].
    pub async fn get_each(
        &mut self,
        path: &str,
        f: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<(RawResp, u64)> {
        let r = self.get_each_inner(path, f).await;
        self.drop_on_err(r)
    }

    async fn get_each_inner(
        &mut self,
        path: &str,
        mut f: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<(RawResp, u64)> {
        let head = self.send_and_read_head("GET", path, &[], &[]).await?;
        let head_bytes = self.inp.split_to(head.len).freeze();
        if self.big.is_empty() {
            self.big = vec![0u8; STREAM_BUF_BYTES];
        }
        let (sock, inp, big) = match self.sock.as_mut() {
            Some(sock) => (sock, &mut self.inp, &mut self.big),
            None => bail!("no connection"),
        };
        let mut total = 0u64;
        match head.framing {
            Framing::Empty => {}
            Framing::Length(n) => {
                let first = inp.len().min(n);
                f(&inp[..first])?;
                inp.advance(first);
                let mut left = n - first;
                total += first as u64;
                while left > 0 {
                    let want = left.min(big.len());
                    let k = sock.read(&mut big[..want]).await?;
                    ensure!(k > 0, "connection closed inside the body");
                    f(&big[..k])?;
                    left -= k;
                    total += k as u64;
                }
            }
            Framing::Chunked => {
                let mut dec = Chunked::default();
                let used = dec.feed(inp, &mut f, &mut total)?;
                inp.advance(used);
                while !dec.done {
                    // Bytes left over (a partial size line) go first.
                    let carried = inp.len();
                    big[..carried].copy_from_slice(inp);
                    inp.clear();
                    let k = sock.read(&mut big[carried..]).await?;
                    ensure!(k > 0, "connection closed inside the body");
                    let all = &big[..carried + k];
                    let used = dec.feed(all, &mut f, &mut total)?;
                    inp.extend_from_slice(&all[used..]);
                }
            }
            Framing::UntilClose => {
                f(inp)?;
                total += inp.len() as u64;
                inp.clear();
                loop {
                    let k = sock.read(big).await?;
                    if k == 0 {
                        break;
                    }
                    f(&big[..k])?;
                    total += k as u64;
                }
                self.sock = None;
            }
        }
        if head.close {
            self.sock = None;
        }
        Ok((
            RawResp {
                status: head.status,
                head: head_bytes,
                body: Bytes::new(),
            },
            total,
        ))
    }

    /// Writes a request and reads up to the end of its response head (a
    /// final one: 1xx heads are skipped), which starts `self.inp`.
    async fn send_and_read_head(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Head> {
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
        if body.is_empty() && (method == "GET" || method == "HEAD") {
            // As common clients do: no body, no length.
            out.extend_from_slice(b"\r\n\r\n");
        } else {
            write!(out, "\r\ncontent-length: {}\r\n\r\n", body.len())?;
        }
        out.extend_from_slice(body);
        let sock = self.sock.as_mut().ok_or_else(|| anyhow!("no connection"))?;
        sock.write_all(out).await?;
        let inp = &mut self.inp;
        if !inp.is_empty() {
            bail!("{} bytes the server sent unasked", inp.len());
        }
        loop {
            if let Some(h) = parse_head(inp)? {
                if (100..200).contains(&h.status) {
                    inp.advance(h.len);
                    continue;
                }
                return Ok(h);
            }
            inp.reserve(4096);
            if sock.read_buf(inp).await? == 0 {
                bail!("connection closed before the response");
            }
        }
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<RawResp> {
        let head = self.send_and_read_head(method, path, headers, body).await?;
        let (sock, inp) = match self.sock.as_mut() {
            Some(sock) => (sock, &mut self.inp),
            None => bail!("no connection"),
        };
        let head_bytes = inp.split_to(head.len).freeze();
        let body = match head.framing {
            Framing::Empty => Bytes::new(),
            Framing::Length(n) => {
                ensure!(n <= MAX_BODY, "content-length {n}");
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

/// Catch-up reads from the start until the server says the reader is up to
/// date, each body handed to `f` as it arrives. Returns the bytes read and the final offset.
pub async fn read_to_tail(
    conn: &mut RawConn,
    path: &str,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<(u64, String)> {
    let mut off = "-1".to_string();
    let mut total = 0u64;
    loop {
        let target = format!("{path}?offset={}", crate::conn::enc(&off));
        let (resp, n) = conn.get_each(&target, &mut f).await?;
        ensure!(
            resp.status == 200,
            "catch-up read of {path} at {off}: HTTP {}",
            resp.status
        );
        let next = resp
            .header("stream-next-offset")
            .ok_or_else(|| anyhow!("no Stream-Next-Offset"))?
            .to_string();
        let up_to_date = resp.header("stream-up-to-date").is_some();
        total += n;
        if up_to_date || (n == 0 && next == off) {
            return Ok((total, next));
        }
        off = next;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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

    /// The incremental chunked decoder gives the same body, and stops at
    /// the same byte, however its input is split.
    #[test]
    fn chunked_decoder_any_split() {
        let wire = b"5;x=1\r\nhello\r\n1\r\n!\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = wire.len() - 4;
        for a in 0..wire.len() {
            for b in a..wire.len() {
                let mut dec = Chunked::default();
                let mut out = Vec::new();
                let mut total = 0;
                let mut sink = |d: &[u8]| {
                    out.extend_from_slice(d);
                    Ok(())
                };
                // Feed the pieces as the reader does: the unused rest of a
                // piece goes again, in front of the next one.
                let mut pending: Vec<u8> = Vec::new();
                let mut consumed = 0;
                for piece in [&wire[..a], &wire[a..b], &wire[b..]] {
                    if dec.done {
                        break;
                    }
                    pending.extend_from_slice(piece);
                    let used = dec.feed(&pending, &mut sink, &mut total).unwrap();
                    consumed += used;
                    pending.drain(..used);
                }
                assert!(dec.done, "split {a} {b}");
                assert_eq!(consumed, end, "split {a} {b}");
                assert_eq!(out, b"hello!");
                assert_eq!(total, 6);
            }
        }
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
