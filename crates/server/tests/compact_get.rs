//! Catch-up reads (with `sendfile`) and small appends served outside hyper
//! (crates/server/src/compact_get.rs), through the real binary over raw
//! keep-alive HTTP/1.1 connections: the bytes are exactly the stream's, the
//! connection carries many requests and then hands whatever it does not
//! take (pipelining, chunked or large bodies, `Expect`) to hyper intact,
//! and the protocol's answers (304, 404, closed streams, producers,
//! compression) are unchanged.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
use support::ServerProc;

/// Generous bound for anything a test waits for; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(15);

/// A fresh data directory, removed when dropped.
struct DataDir(std::path::PathBuf);

impl DataDir {
    fn new(name: &str) -> DataDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "ds-compact-get-{}-{name}-{nanos}",
            std::process::id()
        ));
        DataDir(dir)
    }
    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A response read off a raw connection (Content-Length or chunked framing).
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive HTTP/1.1 client connection over a raw socket.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(PATIENCE, self.s.read(&mut chunk))
            .await
            .expect("server answered in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed inside a body");
        }
        self.buf.drain(..n).collect()
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf.drain(..i + 2).collect()).unwrap();
                return line.trim_end().to_string();
            }
            assert!(self.fill().await, "connection closed inside a head");
        }
    }

    /// Sends a request (no body unless given) and reads its response; HEAD
    /// and bodiless statuses are read without a body.
    async fn request(&mut self, method: &str, target: &str, extra: &str, body: &[u8]) -> Raw {
        let mut req = format!("{method} {target} HTTP/1.1\r\nhost: t\r\n{extra}");
        if !body.is_empty() || method == "POST" || method == "PUT" {
            req.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.s.write_all(&bytes).await.unwrap();
        self.response(method == "HEAD").await
    }

    async fn response(&mut self, head_only: bool) -> Raw {
        let status_line = self.line().await;
        let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let l = self.line().await;
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let mut raw = Raw {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 204 || status == 304 {
            return raw;
        }
        if let Some(n) = raw.header("content-length") {
            let n: usize = n.parse().unwrap();
            raw.body = self.take(n).await;
        } else if raw
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            loop {
                let size = usize::from_str_radix(self.line().await.trim(), 16).unwrap();
                let data = self.take(size).await;
                self.line().await;
                if size == 0 {
                    break;
                }
                raw.body.extend_from_slice(&data);
            }
        }
        raw
    }

    /// True when the server closed the connection (EOF with nothing left).
    async fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

/// Deterministic bytes that differ at every position of interest.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

async fn create_with(conn: &mut Conn, path: &str, data: &[u8]) {
    let r = conn
        .request(
            "PUT",
            path,
            "content-type: application/octet-stream\r\n",
            &[],
        )
        .await;
    assert_eq!(r.status, 201);
    // Several appends so the bytes span many records.
    for part in data.chunks(700 * 1024) {
        let r = conn
            .request(
                "POST",
                path,
                "content-type: application/octet-stream\r\n",
                part,
            )
            .await;
        assert_eq!(r.status, 204, "append");
    }
}

/// The value of the /metrics line starting with `name ` (a counter or
/// gauge without labels beyond those in `name`), if the server has it.
async fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    let mut c = Conn::open(addr).await;
    let r = c.request("GET", "/metrics", "", &[]).await;
    let text = String::from_utf8(r.body).unwrap();
    let prefix = format!("{name} ");
    let value = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()))?;
    Some(value.trim().parse().unwrap())
}

/// `ds_sent_zero_copy_bytes_total` from /metrics.
async fn zero_copy_bytes(addr: SocketAddr) -> u64 {
    metric(addr, "ds_sent_zero_copy_bytes_total")
        .await
        .expect("zero-copy counter in /metrics")
}

/// Waits until the file engine wrote every held byte to its data file
/// (write-behind: recent bytes are served from memory, not by `sendfile`).
/// The memory engine has no such gauge.
async fn wait_written(addr: SocketAddr) {
    for _ in 0..2000 {
        match metric(addr, "ds_unflushed_bytes").await {
            Some(v) if v != 0 => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            _ => return,
        }
    }
    panic!("held bytes never reached the data files");
}

/// Reads `path` from -1 to the tail on one connection; returns the bytes
/// and how many responses it took.
async fn read_all(conn: &mut Conn, path: &str, extra: &str) -> (Vec<u8>, usize, Raw) {
    let mut off = "-1".to_string();
    let mut out = Vec::new();
    let mut n = 0;
    loop {
        let r = conn
            .request("GET", &format!("{path}?offset={off}"), extra, &[])
            .await;
        assert_eq!(r.status, 200, "catch-up read at {off}");
        n += 1;
        out.extend_from_slice(&r.body);
        let next = r.header("stream-next-offset").unwrap().to_string();
        if r.header("stream-up-to-date").is_some() {
            return (out, n, r);
        }
        off = next;
    }
}

/// Many catch-up reads on one connection return exactly the stored bytes
/// (file engine: sendfile; memory engine: the same path without a file),
/// after which a write on the same connection still reaches hyper.
#[tokio::test]
async fn keep_alive_catch_up_is_byte_exact_on_both_engines() {
    let dir = DataDir::new("exact");
    for args in [vec!["--data-dir", dir.arg()], vec![]] {
        let srv = ServerProc::start(&args);
        let data = pattern(3 * 1024 * 1024 + 12_345);
        let mut w = Conn::open(srv.addr).await;
        create_with(&mut w, "/v1/stream/big", &data).await;
        wait_written(srv.addr).await;

        let zero_copy_before = zero_copy_bytes(srv.addr).await;
        let mut c = Conn::open(srv.addr).await;
        for _ in 0..2 {
            let (got, responses, last) = read_all(&mut c, "/v1/stream/big", "").await;
            assert_eq!(got.len(), data.len());
            assert!(got == data, "bytes differ ({args:?})");
            assert!(responses >= 4, "1 MiB chunks expected, got {responses}");
            assert!(last.header("connection").is_none(), "kept alive");
        }
        // The file engine's bytes went through sendfile; the memory
        // engine has no files.
        let zero_copy = zero_copy_bytes(srv.addr).await - zero_copy_before;
        if args.is_empty() {
            assert_eq!(zero_copy, 0);
        } else {
            assert_eq!(zero_copy, 2 * data.len() as u64);
        }
        // A write on the same connection: replayed to hyper, then more reads
        // (now through hyper) see it.
        let r = c
            .request(
                "POST",
                "/v1/stream/big",
                "content-type: application/octet-stream\r\n",
                b"tail!",
            )
            .await;
        assert_eq!(r.status, 204);
        let (got, _, _) = read_all(&mut c, "/v1/stream/big", "").await;
        assert_eq!(&got[data.len()..], b"tail!");
        assert!(got[..data.len()] == data[..]);
    }
}

/// A catch-up GET that declares an empty body (`Content-Length: 0`, which
/// some clients send on every request) is still served by sendfile, and
/// byte-exact; a GET declaring a body is left to hyper, which answers it.
#[tokio::test]
async fn get_with_empty_content_length_is_zero_copy() {
    let dir = DataDir::new("cl0");
    let srv = ServerProc::start(&["--data-dir", dir.arg()]);
    let data = pattern(300_000);
    let mut w = Conn::open(srv.addr).await;
    create_with(&mut w, "/v1/stream/cl0", &data).await;
    wait_written(srv.addr).await;
    let before = zero_copy_bytes(srv.addr).await;
    let mut c = Conn::open(srv.addr).await;
    let (got, _, _) = read_all(&mut c, "/v1/stream/cl0", "content-length: 0\r\n").await;
    assert!(got == data, "bytes differ");
    assert_eq!(zero_copy_bytes(srv.addr).await - before, data.len() as u64);
    let r = c
        .request(
            "GET",
            "/v1/stream/cl0?offset=-1",
            "content-length: 2\r\n",
            b"xy",
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(zero_copy_bytes(srv.addr).await - before, data.len() as u64);
}

/// ETag revalidation, missing streams, reads past the tail, closed streams
/// and `Connection: close` keep their meaning on this path.
#[tokio::test]
async fn protocol_answers_are_unchanged() {
    let dir = DataDir::new("answers");
    let srv = ServerProc::start(&["--data-dir", dir.arg()]);
    let mut c = Conn::open(srv.addr).await;
    create_with(&mut c, "/v1/stream/s", b"hello world").await;

    let r = c.request("GET", "/v1/stream/s?offset=-1", "", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello world");
    let etag = r.header("etag").unwrap().to_string();
    assert_eq!(r.header("stream-up-to-date"), Some("true"));

    let r = c
        .request(
            "GET",
            "/v1/stream/s?offset=-1",
            &format!("if-none-match: {etag}\r\n"),
            &[],
        )
        .await;
    assert_eq!(r.status, 304);
    assert!(r.header("content-length").is_none_or(|v| v == "0"));

    let r = c.request("GET", "/v1/stream/nope?offset=-1", "", &[]).await;
    assert_eq!(r.status, 404);

    let r = c
        .request(
            "GET",
            "/v1/stream/s?offset=0000000000000000_0000000000000099",
            "",
            &[],
        )
        .await;
    assert!(
        (400..500).contains(&r.status),
        "read past the tail: {}",
        r.status
    );

    let r = c
        .request(
            "GET",
            "/v1/stream/s?offset=0000000000000000_0000000000000006",
            "",
            &[],
        )
        .await;
    assert_eq!(r.body, b"world");

    // Close the stream (through hyper), then read again on a new connection.
    let r = c
        .request(
            "POST",
            "/v1/stream/s",
            "stream-closed: true\r\ncontent-type: application/octet-stream\r\n",
            &[],
        )
        .await;
    assert!(r.status == 204 || r.status == 200, "close: {}", r.status);
    let mut c = Conn::open(srv.addr).await;
    let r = c.request("GET", "/v1/stream/s?offset=-1", "", &[]).await;
    assert_eq!(r.body, b"hello world");
    assert_eq!(r.header("stream-closed"), Some("true"));

    // `Connection: close` is honoured.
    let r = c
        .request(
            "GET",
            "/v1/stream/s?offset=-1",
            "connection: close\r\n",
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed().await, "server closes after Connection: close");
}

/// A client that accepts compression gets a compressed body (served by
/// hyper as before), never the uncompressed file bytes.
#[tokio::test]
async fn compression_still_applies_when_accepted() {
    let dir = DataDir::new("gzip");
    let srv = ServerProc::start(&["--data-dir", dir.arg()]);
    let mut c = Conn::open(srv.addr).await;
    let data = vec![b'a'; 64 * 1024];
    create_with(&mut c, "/v1/stream/z", &data).await;
    let mut c = Conn::open(srv.addr).await;
    let r = c
        .request(
            "GET",
            "/v1/stream/z?offset=-1",
            "accept-encoding: gzip\r\n",
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert!(r.body.len() < data.len() / 10);
}

/// Bytes a fork shares with its source (in the source's file) and its own
/// bytes read back exactly on this path.
#[tokio::test]
async fn forks_read_exactly() {
    let dir = DataDir::new("fork");
    let srv = ServerProc::start(&["--data-dir", dir.arg()]);
    let mut c = Conn::open(srv.addr).await;
    let src = pattern(1536 * 1024);
    create_with(&mut c, "/v1/stream/src", &src).await;
    let r = c
        .request(
            "PUT",
            "/v1/stream/fork",
            "content-type: application/octet-stream\r\nstream-forked-from: /v1/stream/src\r\n",
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "fork");
    let r = c
        .request(
            "POST",
            "/v1/stream/fork",
            "content-type: application/octet-stream\r\n",
            b"own bytes",
        )
        .await;
    assert_eq!(r.status, 204);
    let mut c = Conn::open(srv.addr).await;
    let (got, _, _) = read_all(&mut c, "/v1/stream/fork", "").await;
    assert_eq!(got.len(), src.len() + 9);
    assert!(got[..src.len()] == src[..]);
    assert_eq!(&got[src.len()..], b"own bytes");
}

/// A reader that leaves in the middle of a large body does not disturb the
/// server: the next reader gets every byte.
#[tokio::test]
async fn reader_leaving_mid_body_is_harmless() {
    let dir = DataDir::new("leave");
    let srv = ServerProc::start(&["--data-dir", dir.arg()]);
    let data = pattern(2 * 1024 * 1024);
    let mut c = Conn::open(srv.addr).await;
    create_with(&mut c, "/v1/stream/l", &data).await;
    for _ in 0..20 {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /v1/stream/l?offset=-1 HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut some = [0u8; 1000];
        let _ = s.read(&mut some).await.unwrap();
        drop(s);
    }
    let mut c = Conn::open(srv.addr).await;
    let (got, _, _) = read_all(&mut c, "/v1/stream/l", "").await;
    assert!(got == data);
}

/// A reader slower than the server, behind a tiny receive buffer, makes
/// the send wait for room in the socket again and again (the blocking-pool
/// `sendfile` and its `poll`); every byte still arrives, in order, through
/// `sendfile`, and the connection serves the next request.
#[tokio::test]
async fn slow_reader_gets_every_byte_of_a_large_body() {
    let dir = DataDir::new("slow");
    let srv = ServerProc::start(&["--data-dir", dir.arg()]);
    let data = pattern(3 * 1024 * 1024 + 7);
    let mut w = Conn::open(srv.addr).await;
    create_with(&mut w, "/v1/stream/slow", &data).await;
    wait_written(srv.addr).await;
    let zero_copy_before = zero_copy_bytes(srv.addr).await;

    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let s = sock.connect(srv.addr).await.unwrap();
    let mut c = Conn { s, buf: Vec::new() };
    let mut got = Vec::new();
    let mut offset = "-1".to_string();
    loop {
        let req = format!("GET /v1/stream/slow?offset={offset} HTTP/1.1\r\nhost: t\r\n\r\n");
        c.s.write_all(req.as_bytes()).await.unwrap();
        // Read the head, then the body a few KiB at a time with pauses, so
        // the server keeps finding the socket full.
        let head = c.response(true).await;
        assert_eq!(head.status, 200);
        let mut left: usize = head
            .header("content-length")
            .expect("a sized body")
            .parse()
            .unwrap();
        let mut reads = 0u32;
        while left > 0 {
            let piece = c.take(left.min(4096)).await;
            left -= piece.len();
            got.extend_from_slice(&piece);
            reads += 1;
            if reads.is_multiple_of(32) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        offset = head
            .header("stream-next-offset")
            .expect("Stream-Next-Offset")
            .to_string();
        if head.header("stream-up-to-date").is_some() {
            break;
        }
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    assert_eq!(
        zero_copy_bytes(srv.addr).await - zero_copy_before,
        data.len() as u64
    );
    let r = c.request("GET", "/healthz", "", b"").await;
    assert_eq!(r.status, 200);
}

/// Appends on one keep-alive connection, with the body in the same packet
/// as the head, in a later packet, or byte by byte, all land once and in
/// order; idempotent-producer answers are unchanged on this path.
#[tokio::test]
async fn small_appends_land_exactly_once_in_order() {
    let dir = DataDir::new("post");
    let srv = ServerProc::start(&["--data-dir", dir.arg()]);
    let mut c = Conn::open(srv.addr).await;
    create_with(&mut c, "/v1/stream/p", b"").await;
    let mut want = Vec::new();
    for i in 0..50u32 {
        let body = format!("record-{i};");
        let r = c
            .request(
                "POST",
                "/v1/stream/p",
                "content-type: application/octet-stream\r\n",
                body.as_bytes(),
            )
            .await;
        assert_eq!(r.status, 204, "append {i}");
        want.extend_from_slice(body.as_bytes());
    }
    // Head, then the body in a later write; then a request written one
    // byte at a time.
    let head = "POST /v1/stream/p HTTP/1.1\r\nhost: t\r\ncontent-type: application/octet-stream\r\ncontent-length: 5\r\n\r\n";
    c.s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.s.write_all(b"late;").await.unwrap();
    assert_eq!(c.response(false).await.status, 204);
    want.extend_from_slice(b"late;");
    let slow = format!("{}slow;", head);
    for b in slow.as_bytes() {
        c.s.write_all(&[*b]).await.unwrap();
    }
    assert_eq!(c.response(false).await.status, 204);
    want.extend_from_slice(b"slow;");

    // Idempotent producer: a retry is a duplicate (204), a gap is 409.
    let producer = |seq: u32| {
        format!(
            "content-type: application/octet-stream\r\nproducer-id: w\r\nproducer-epoch: 0\r\nproducer-seq: {seq}\r\n"
        )
    };
    let r = c
        .request("POST", "/v1/stream/p", &producer(0), b"p0;")
        .await;
    assert_eq!(r.status, 200, "first producer append");
    want.extend_from_slice(b"p0;");
    let r = c
        .request("POST", "/v1/stream/p", &producer(0), b"p0;")
        .await;
    assert_eq!(r.status, 204, "retry is a duplicate");
    let r = c
        .request("POST", "/v1/stream/p", &producer(5), b"p5;")
        .await;
    assert_eq!(r.status, 409, "gap");
    assert_eq!(r.header("producer-expected-seq"), Some("1"));

    let mut c = Conn::open(srv.addr).await;
    let (got, _, _) = read_all(&mut c, "/v1/stream/p", "").await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
}

/// Requests this path does not take reach hyper with every byte: two
/// pipelined appends, a chunked body, `Expect: 100-continue`, a body larger
/// than the head buffer, and a malformed length (hyper's 400).
#[tokio::test]
async fn appends_it_does_not_take_reach_hyper_intact() {
    let dir = DataDir::new("post-hyper");
    let srv = ServerProc::start(&["--data-dir", dir.arg()]);
    let mut c = Conn::open(srv.addr).await;
    create_with(&mut c, "/v1/stream/h", b"").await;
    let post = |body: &str| {
        format!(
            "POST /v1/stream/h HTTP/1.1\r\nhost: t\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // Pipelined.
    let two = format!("{}{}", post("one;"), post("two;"));
    c.s.write_all(two.as_bytes()).await.unwrap();
    assert_eq!(c.response(false).await.status, 204);
    assert_eq!(c.response(false).await.status, 204);
    // Chunked.
    let mut c = Conn::open(srv.addr).await;
    c.s.write_all(
        b"POST /v1/stream/h HTTP/1.1\r\nhost: t\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nchnk;\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(c.response(false).await.status, 204);
    // Expect: 100-continue.
    let mut c = Conn::open(srv.addr).await;
    c.s.write_all(
        b"POST /v1/stream/h HTTP/1.1\r\nhost: t\r\ncontent-type: application/octet-stream\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let r = c.response(false).await;
    assert_eq!(r.status, 100);
    c.s.write_all(b"exp;").await.unwrap();
    assert_eq!(c.response(false).await.status, 204);
    // Larger than the head buffer.
    let big = "B".repeat(40_000);
    let r = c
        .request(
            "POST",
            "/v1/stream/h",
            "content-type: application/octet-stream\r\n",
            big.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 204);
    // Malformed length: refused, nothing appended.
    let mut c = Conn::open(srv.addr).await;
    c.s.write_all(
        b"POST /v1/stream/h HTTP/1.1\r\nhost: t\r\ncontent-type: application/octet-stream\r\ncontent-length: 4x\r\n\r\nbad;",
    )
    .await
    .unwrap();
    assert_eq!(c.response(false).await.status, 400);

    let mut c = Conn::open(srv.addr).await;
    let (got, _, _) = read_all(&mut c, "/v1/stream/h", "").await;
    let want = format!("one;two;chnk;exp;{big}");
    assert!(got == want.as_bytes(), "stream holds {} bytes", got.len());
}

/// The compact path skips the router only where that changes nothing: the
/// router's own routes still answer as the router does (`POST /healthz` is
/// 405, not a stream 404), and with auth on a small append without a token
/// is refused 401 and appends nothing, while the same append with the token
/// lands.
#[tokio::test]
async fn compact_appends_keep_the_routers_routes_and_layers() {
    let srv = ServerProc::start(&[]);
    let mut c = Conn::open(srv.addr).await;
    let r = c
        .request("POST", "/healthz", "content-type: text/plain\r\n", b"x")
        .await;
    assert_eq!(r.status, 405);

    let token = "compact-append-token-1";
    let dir = DataDir::new("auth-append");
    std::fs::create_dir_all(dir.arg()).unwrap();
    let cfg = std::path::Path::new(dir.arg()).join("auth.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[auth.tokens]]\nname = \"t\"\nsha256 = \"{}\"\n\
             grants = [{{ prefix = \"\", ops = [\"read\", \"append\", \"create\"] }}]\n",
            durable_streams_server::auth::hash_token(token)
        ),
    )
    .unwrap();
    let srv = ServerProc::start(&["--config", cfg.to_str().unwrap()]);
    let mut c = Conn::open(srv.addr).await;
    let bearer = format!("authorization: Bearer {token}\r\n");
    let ct = "content-type: application/octet-stream\r\n";
    let r = c
        .request("PUT", "/v1/stream/a", &format!("{bearer}{ct}"), b"")
        .await;
    assert_eq!(r.status, 201);
    let r = c.request("POST", "/v1/stream/a", ct, b"nope").await;
    assert_eq!(r.status, 401);
    let mut c = Conn::open(srv.addr).await;
    let r = c
        .request("POST", "/v1/stream/a", &format!("{bearer}{ct}"), b"yes")
        .await;
    assert_eq!(r.status, 204);
    let r = c
        .request("GET", "/v1/stream/a?offset=-1", &bearer, &[])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"yes");
}

/// JSON catch-ups are sent from the data file too (`[`, the stored range
/// without its last comma, `]`): on one keep-alive connection, with a small
/// read budget so the stream takes many responses, each response is a JSON
/// array of whole messages (its `Content-Length`, when sent, matches), every message
/// comes back once and in order (commas and brackets inside strings
/// included), a message larger than the budget comes back whole, and the
/// bytes went out by `sendfile`.
#[tokio::test]
async fn json_catch_up_by_sendfile_is_exact() {
    let dir = DataDir::new("json");
    std::fs::create_dir_all(dir.arg()).unwrap();
    let cfg = std::path::Path::new(dir.arg()).join("small-reads.toml");
    std::fs::write(&cfg, "[limits]\nread_chunk_bytes = 4096\n").unwrap();
    let data = std::path::Path::new(dir.arg()).join("data");
    let srv = ServerProc::start(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let mut c = Conn::open(srv.addr).await;
    let json = "content-type: application/json\r\n";
    let r = c.request("PUT", "/v1/stream/j", json, &[]).await;
    assert_eq!(r.status, 201);
    let mut want = Vec::new();
    for batch in 0..40 {
        let msgs: Vec<serde_json::Value> = (0..25)
            .map(|i| {
                let n = batch * 25 + i;
                match n % 5 {
                    0 => serde_json::json!({ "n": n, "s": "a,b],\"c" }),
                    1 => serde_json::json!([n, [1, 2], { "x": [3] }]),
                    2 => serde_json::json!(n),
                    3 => serde_json::json!({ "n": n, "pad": "p".repeat(n % 300) }),
                    _ => serde_json::json!({ "n": n, "big": "b".repeat(if n == 504 { 9000 } else { 10 }) }),
                }
            })
            .collect();
        let body = serde_json::to_vec(&msgs).unwrap();
        let r = c.request("POST", "/v1/stream/j", json, &body).await;
        assert_eq!(r.status, 204, "append batch {batch}");
        want.extend(msgs);
    }
    wait_written(srv.addr).await;
    let before = zero_copy_bytes(srv.addr).await;
    let mut c = Conn::open(srv.addr).await;
    let mut off = "-1".to_string();
    let mut got = Vec::new();
    let mut responses = 0;
    let mut sent = 0u64;
    loop {
        let r = c
            .request("GET", &format!("/v1/stream/j?offset={off}"), "", &[])
            .await;
        assert_eq!(r.status, 200, "catch-up at {off}");
        responses += 1;
        // Sent from the file: a Content-Length; the copying path may chunk.
        if let Some(len) = r.header("content-length") {
            assert_eq!(r.body.len(), len.parse::<usize>().unwrap());
        }
        sent += r.body.len() as u64;
        let arr: Vec<serde_json::Value> = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("response at {off} is not a JSON array: {e}"));
        assert!(!arr.is_empty() || r.header("stream-up-to-date").is_some());
        got.extend(arr);
        if r.header("stream-up-to-date").is_some() {
            break;
        }
        off = r.header("stream-next-offset").unwrap().to_string();
    }
    assert!(
        got == want,
        "{} messages back, {} sent",
        got.len(),
        want.len()
    );
    assert!(
        responses > 10,
        "only {responses} responses: the budget did not cut"
    );
    // Everything but the brackets went out of the file, except the one
    // message larger than the budget (answered whole by the copying path).
    let big = serde_json::to_vec(&want[504]).unwrap().len() as u64;
    let zero_copy = zero_copy_bytes(srv.addr).await - before;
    assert_eq!(zero_copy, sent - 2 * responses as u64 - big);
}

/// The answer to `req` on `conn`, normalised for comparison: status, the
/// headers sorted without `date` and without a generated request id (a
/// client's id is kept), and the body.
async fn answer(
    conn: &mut Conn,
    req: &AppendCase<'_>,
    stream: &str,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let target = req.target.replace("{S}", stream);
    let r = conn.request("POST", &target, req.headers, req.body).await;
    let id = r
        .header("x-request-id")
        .expect("every answer has a request id");
    assert!(!id.is_empty() && id.len() <= 128, "{id:?}");
    // The client's id, echoed (a sane one is kept, else one is generated).
    let client_id = req.headers.contains(&format!("x-request-id: {id}\r\n"));
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.replace(stream, "{S}")))
        .filter(|(n, _)| n != "date" && (client_id || n != "x-request-id"))
        .collect();
    headers.sort();
    let body = String::from_utf8_lossy(&r.body).replace(stream, "{S}");
    (r.status, headers, body.into_bytes())
}

/// One append request of [`compact_and_hyper_appends_answer_alike`]:
/// `{S}` in the target is the stream's name.
struct AppendCase<'a> {
    target: &'a str,
    headers: &'a str,
    body: &'a [u8],
}

/// The compact append path (crates/server/src/compact_append.rs) answers
/// every append exactly as hyper and the handler do: the same status,
/// headers and body for successes, producer duplicates, gaps and stale
/// epochs, bad headers (non-text values included), missing or mismatched
/// content types, JSON framing errors, closed streams, missing streams,
/// over-limit bodies, client request ids and CORS (any origin, a listed
/// one, an unlisted one), and the streams end up holding the same bytes.
/// Each case is sent on a connection the compact path serves, and on one
/// hyper serves (its first request is an `OPTIONS`, which the compact path
/// never takes), to two streams that saw the same requests.
#[tokio::test]
async fn compact_and_hyper_appends_answer_alike() {
    let ct = "content-type: application/octet-stream\r\n";
    let json = "content-type: application/json\r\n";
    let cases = [
        AppendCase {
            target: "/v1/stream/{S}",
            headers: ct,
            body: b"one;",
        },
        AppendCase {
            target: "/v1/stream/{S}?x=1",
            headers: &format!("{ct}x-request-id: client-id-1\r\n"),
            body: b"two;",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}x-request-id: has space\r\n"),
            body: b"three;",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}origin: https://app.example\r\n"),
            body: b"four;",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}origin: https://other.example\r\n"),
            body: b"five;",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: ct,
            body: b"",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: "",
            body: b"no type",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: "content-type: text/plain\r\n",
            body: b"wrong type",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}producer-id: p\r\nproducer-epoch: 0\r\nproducer-seq: 0\r\n"),
            body: b"p0;",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}producer-id: p\r\nproducer-epoch: 0\r\nproducer-seq: 0\r\n"),
            body: b"p0;",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}producer-id: p\r\nproducer-epoch: 0\r\nproducer-seq: 5\r\n"),
            body: b"gap",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}producer-id: p\r\nproducer-epoch: 1\r\nproducer-seq: 0\r\n"),
            body: b"p1;",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}producer-id: p\r\nproducer-epoch: 0\r\nproducer-seq: 1\r\n"),
            body: b"stale",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}producer-id: p\r\nproducer-epoch: x\r\nproducer-seq: 1\r\n"),
            body: b"bad",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}producer-id: p\r\n"),
            body: b"partial",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!(
                "{ct}producer-id: caf\u{e9}\r\nproducer-epoch: 0\r\nproducer-seq: 0\r\n"
            ),
            body: b"obs",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}stream-seq: b\r\n"),
            body: b"seq-b;",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}stream-seq: a\r\n"),
            body: b"seq-a",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: ct,
            body: &[b'L'; 1500],
        },
        AppendCase {
            target: "/v1/stream/{S}-missing",
            headers: ct,
            body: b"x",
        },
        AppendCase {
            target: "/v1/stream/{S}-json",
            headers: json,
            body: br#"[{"a":1},{"b":"],"}]"#,
        },
        AppendCase {
            target: "/v1/stream/{S}-json",
            headers: json,
            body: b"[]",
        },
        AppendCase {
            target: "/v1/stream/{S}-json",
            headers: json,
            body: b"{\"a\":",
        },
        AppendCase {
            target: "/v1/stream/{S}-json",
            headers: json,
            body: b"7",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: "stream-closed: true\r\n",
            body: b"",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: "stream-closed: true\r\n",
            body: b"",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: ct,
            body: b"after close",
        },
        AppendCase {
            target: "/v1/stream/{S}",
            headers: &format!("{ct}producer-id: p\r\nproducer-epoch: 1\r\nproducer-seq: 1\r\n"),
            body: b"closed",
        },
        AppendCase {
            target: "/v1/stream/__ds/x{S}",
            headers: ct,
            body: b"reserved",
        },
        AppendCase {
            target: "/other/{S}",
            headers: ct,
            body: b"outside",
        },
        AppendCase {
            target: "/v1/stream/a//{S}",
            headers: ct,
            body: b"empty segment",
        },
    ];
    let dir = DataDir::new("alike");
    std::fs::create_dir_all(dir.arg()).unwrap();
    let cfg = std::path::Path::new(dir.arg()).join("cors.toml");
    std::fs::write(
        &cfg,
        "[cors]\nallowed_origins = [\"https://app.example\"]\n",
    )
    .unwrap();
    let data = std::path::Path::new(dir.arg()).join("data");
    let servers = [
        ServerProc::start(&["--max-append-bytes", "1000"]),
        ServerProc::start(&[
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--max-append-bytes",
            "1000",
        ]),
    ];
    for srv in &servers {
        let mut setup = Conn::open(srv.addr).await;
        for s in ["via-compact", "via-hyper"] {
            create_with(&mut setup, &format!("/v1/stream/{s}"), b"").await;
            let r = setup
                .request("PUT", &format!("/v1/stream/{s}-json"), json, &[])
                .await;
            assert_eq!(r.status, 201);
        }
        let mut hyper = Conn::open(srv.addr).await;
        let r = hyper
            .request("OPTIONS", "/v1/stream/via-hyper", "", &[])
            .await;
        assert_eq!(r.status, 204);
        let mut compact = Conn::open(srv.addr).await;
        for case in &cases {
            let via_compact = answer(&mut compact, case, "via-compact").await;
            let via_hyper = answer(&mut hyper, case, "via-hyper").await;
            assert_eq!(
                via_compact, via_hyper,
                "POST {} {:?}: compact (left) and hyper (right) differ",
                case.target, case.headers
            );
        }
        for s in ["via-compact", "via-compact-json"] {
            let (a, _, _) = read_all(&mut setup, &format!("/v1/stream/{s}"), "").await;
            let h = s.replace("compact", "hyper");
            let (b, _, _) = read_all(&mut setup, &format!("/v1/stream/{h}"), "").await;
            assert_eq!(a, b, "{s} and {h} hold different bytes");
            assert!(!a.is_empty());
        }
    }
}

/// `Connection: close` on a compact append is answered with
/// `Connection: close`, and the server then closes; the append landed.
#[tokio::test]
async fn compact_append_honours_connection_close() {
    let srv = ServerProc::start(&[]);
    let mut c = Conn::open(srv.addr).await;
    create_with(&mut c, "/v1/stream/cc", b"").await;
    let mut c = Conn::open(srv.addr).await;
    let r = c
        .request(
            "POST",
            "/v1/stream/cc",
            "content-type: application/octet-stream\r\nconnection: close\r\n",
            b"last",
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed().await, "server closes after Connection: close");
    let mut c = Conn::open(srv.addr).await;
    let (got, _, _) = read_all(&mut c, "/v1/stream/cc", "").await;
    assert_eq!(got, b"last");
}

/// `ds_live_readers{mode="long_poll"}` from /metrics.
async fn long_polls_waiting(addr: SocketAddr) -> u64 {
    metric(addr, "ds_live_readers{mode=\"long_poll\"}")
        .await
        .expect("long-poll gauge in /metrics")
}

/// Waits (bounded) until `n` long-polls are parked on the server.
async fn wait_long_polls(addr: SocketAddr, n: u64) {
    let until = tokio::time::Instant::now() + PATIENCE;
    while long_polls_waiting(addr).await != n {
        assert!(
            tokio::time::Instant::now() < until,
            "never {n} long-polls waiting"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Long-polls on one keep-alive connection, each woken by an append from
/// another connection, return exactly the appended bytes and offsets on both
/// engines; the connection then serves a catch-up read and an append.
#[tokio::test]
async fn keep_alive_long_polls_deliver_each_append() {
    let dir = DataDir::new("long-poll");
    for args in [vec!["--data-dir", dir.arg()], vec![]] {
        let srv = ServerProc::start(&args);
        let mut w = Conn::open(srv.addr).await;
        create_with(&mut w, "/v1/stream/lp", b"").await;
        let mut r = Conn::open(srv.addr).await;
        let mut off = "-1".to_string();
        let mut want = Vec::new();
        for i in 0..5u8 {
            // Up to date: the long-poll waits for the next append.
            let catch_up = format!("/v1/stream/lp?offset={off}");
            let first = r.request("GET", &catch_up, "", &[]).await;
            assert_eq!(first.status, 200);
            assert_eq!(first.body, want);
            off = first.header("stream-next-offset").unwrap().to_string();
            let target = format!("/v1/stream/lp?offset={off}&live=long-poll");
            r.s.write_all(format!("GET {target} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
                .await
                .unwrap();
            wait_long_polls(srv.addr, 1).await;
            let data = vec![b'a' + i; 100 + usize::from(i)];
            let a = w
                .request(
                    "POST",
                    "/v1/stream/lp",
                    "content-type: application/octet-stream\r\n",
                    &data,
                )
                .await;
            assert_eq!(a.status, 204);
            let woke = r.response(false).await;
            assert_eq!(woke.status, 200, "long-poll {i}");
            assert_eq!(woke.body, data, "long-poll {i}");
            assert_eq!(
                woke.header("stream-next-offset"),
                a.header("stream-next-offset"),
                "long-poll {i}"
            );
            want.extend_from_slice(&data);
            off = "-1".to_string();
        }
        let (got, _, _) = read_all(&mut r, "/v1/stream/lp", "").await;
        assert_eq!(got, want);
        let a = r
            .request(
                "POST",
                "/v1/stream/lp",
                "content-type: application/octet-stream\r\n",
                b"end",
            )
            .await;
        assert_eq!(
            a.status, 204,
            "an append after long-polls on the connection"
        );
    }
}

/// A long-poll whose client goes away stops waiting then, not at the
/// long-poll timeout (a minute here, longer than this test waits).
#[tokio::test]
async fn long_poll_ends_when_its_client_leaves() {
    let srv = ServerProc::start(&["--long-poll-timeout", "60s"]);
    let mut w = Conn::open(srv.addr).await;
    create_with(&mut w, "/v1/stream/gone", b"x").await;
    let tail = w.request("GET", "/v1/stream/gone?offset=-1", "", &[]).await;
    let off = tail.header("stream-next-offset").unwrap().to_string();
    let mut r = Conn::open(srv.addr).await;
    let target = format!("/v1/stream/gone?offset={off}&live=long-poll");
    r.s.write_all(format!("GET {target} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    wait_long_polls(srv.addr, 1).await;
    drop(r);
    wait_long_polls(srv.addr, 0).await;
}
