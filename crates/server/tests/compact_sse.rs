//! The compact HTTP/1.1 SSE path (crates/server/src/compact_sse.rs), tested
//! through the real binary: cleartext `GET ...?live=sse` requests are
//! answered outside hyper (visible as `connection: close` with chunked
//! coding), with the same events, auth, rate limits and live-reader
//! accounting as before; every other request on a fresh connection still
//! reaches hyper intact, the bytes read to decide replayed first.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
use support::ServerProc;

/// Generous bound for anything a test waits for; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(15);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// A config file in a fresh temporary directory.
fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ds-compact-sse-{}-{name}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn create(c: &reqwest::Client, url: &str, content_type: &str, bearer: Option<&str>) {
    let mut r = c.put(url).header("content-type", content_type);
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    assert!(r.status().is_success(), "create {url}: {}", r.status());
}

async fn append(c: &reqwest::Client, url: &str, content_type: &str, body: &'static [u8]) {
    let r = c
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "append {url}: {}", r.status());
}

async fn close_stream(c: &reqwest::Client, url: &str) {
    let r = c
        .post(url)
        .header("stream-closed", "true")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "close {url}: {}", r.status());
}

/// Sends `request` on a fresh connection, in one write.
async fn send_raw(addr: SocketAddr, request: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    s
}

fn sse_request(path: &str, extra_headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: test\r\naccept: text/event-stream\r\n{extra_headers}\r\n")
}

/// Reads until EOF (bounded by [`PATIENCE`]).
async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("connection not closed in time")
        .unwrap();
    out
}

/// Reads until `done(bytes so far)` holds (bounded by [`PATIENCE`]).
async fn read_until(s: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done(&out) {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("timed out; got:\n{}", String::from_utf8_lossy(&out)))
            .unwrap();
        assert!(n > 0, "EOF; got:\n{}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A parsed HTTP/1.1 response: status, lowercased headers, body bytes as sent.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn parse(bytes: &[u8]) -> Raw {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete response head");
        let head = std::str::from_utf8(&bytes[..end]).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status = status_line[9..12].parse().unwrap();
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        Raw {
            status,
            headers,
            body: bytes[end + 4..].to_vec(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body with chunked coding removed; panics unless it ends with
    /// the last (zero) chunk.
    fn dechunked(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = &self.body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size line");
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
            rest = &rest[eol + 2..];
            if size == 0 {
                assert_eq!(rest, b"\r\n", "bytes after the last chunk");
                return out;
            }
            out.extend_from_slice(&rest[..size]);
            assert_eq!(&rest[size..size + 2], b"\r\n");
            rest = &rest[size + 2..];
        }
    }
}

/// The same SSE request over HTTP/2 (h2c), which hyper serves.
async fn via_hyper_h2(url: &str) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let r = c.get(url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    (h, r.bytes().await.unwrap().to_vec())
}

/// Text, JSON and binary (base64) streams: the compact path answers with
/// exactly the events hyper sends for the same closed stream, the headers
/// the router set (request id, CORS, data encoding), chunked coding ended
/// by the last chunk, and `connection: close`.
#[tokio::test]
async fn compact_sse_sends_the_same_events_as_hyper() {
    let srv = ServerProc::start(&[]);
    let c = client();
    // (name, content type, appends, expected data encoding header)
    type Case = (
        &'static str,
        &'static str,
        &'static [&'static [u8]],
        Option<&'static str>,
    );
    let cases: [Case; 3] = [
        (
            "text",
            "text/plain",
            &[b"hello", b"line one\nline two"],
            None,
        ),
        (
            "json",
            "application/json",
            &[br#"{"a":1}"#, br#"[{"b":"x"},{"c":null}]"#],
            None,
        ),
        (
            "bin",
            "application/octet-stream",
            &[b"\x00\x01\xff\xfe", b"\r\n\x7f"],
            Some("base64"),
        ),
    ];
    for (name, ct, bodies, encoding) in cases {
        let path = format!("/v1/stream/compact-{name}");
        let url = srv.url(&path);
        create(&c, &url, ct, None).await;
        for b in bodies {
            append(&c, &url, ct, b).await;
        }
        close_stream(&c, &url).await;

        let q = format!("{path}?offset=-1&live=sse");
        let mut s = send_raw(srv.addr, &sse_request(&q, "")).await;
        let raw = Raw::parse(&read_to_end(&mut s).await);
        assert_eq!(raw.status, 200, "{name}");
        assert_eq!(raw.header("content-type"), Some("text/event-stream"));
        assert_eq!(raw.header("connection"), Some("close"));
        assert_eq!(raw.header("transfer-encoding"), Some("chunked"));
        assert!(raw.header("x-request-id").is_some());
        assert!(raw.header("date").is_some());
        assert_eq!(raw.header("access-control-allow-origin"), Some("*"));
        assert_eq!(raw.header("stream-sse-data-encoding"), encoding);
        let compact = raw.dechunked();

        let (h2_headers, h2_body) = via_hyper_h2(&srv.url(&q)).await;
        assert_eq!(
            h2_headers
                .get("stream-sse-data-encoding")
                .map(|v| v.to_str().unwrap()),
            encoding
        );
        assert_eq!(
            String::from_utf8_lossy(&compact),
            String::from_utf8_lossy(&h2_body),
            "{name}: compact and hyper bodies differ"
        );
        assert!(contains(&compact, b"event: data"), "{name}");
        assert!(contains(&compact, b"\"streamClosed\":true"), "{name}");
    }
}

/// With auth on, an SSE request without a token is answered 401 on the
/// compact path (complete body, `Content-Length`, connection closed) and
/// the same request with the token gets the event stream.
#[tokio::test]
async fn auth_applies_to_compact_sse() {
    let token = "compact-sse-token-1";
    let cfg = config_file(
        "auth",
        &format!(
            "[[auth.tokens]]\nname = \"t\"\nsha256 = \"{}\"\n\
             grants = [{{ prefix = \"\", ops = [\"read\", \"append\", \"create\"] }}]\n",
            durable_streams_server::auth::hash_token(token)
        ),
    );
    let srv = ServerProc::start(&["--config", cfg.to_str().unwrap()]);
    let c = client();
    create(&c, &srv.url("/v1/stream/secret"), "text/plain", Some(token)).await;
    let q = "/v1/stream/secret?offset=-1&live=sse";

    let mut s = send_raw(srv.addr, &sse_request(q, "")).await;
    let raw = Raw::parse(&read_to_end(&mut s).await);
    assert_eq!(raw.status, 401);
    assert_eq!(raw.header("connection"), Some("close"));
    assert!(raw
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer"));
    let len: usize = raw.header("content-length").unwrap().parse().unwrap();
    assert_eq!(raw.body.len(), len);

    let mut s = send_raw(
        srv.addr,
        &sse_request(q, &format!("authorization: Bearer {token}\r\n")),
    )
    .await;
    let got = read_until(&mut s, |b| contains(b, b"event: control")).await;
    let raw = Raw::parse(&got);
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("content-type"), Some("text/event-stream"));
    assert_eq!(raw.header("connection"), Some("close"));
}

/// Rate limiting keys compact SSE requests by the client address like any
/// other: past the burst they are answered 429 with `Retry-After`.
#[tokio::test]
async fn rate_limit_applies_to_compact_sse() {
    let cfg = config_file(
        "ratelimit",
        "[rate_limit]\nenabled = true\nrequests_per_second = 0.01\nburst = 3\n",
    );
    let srv = ServerProc::start(&["--config", cfg.to_str().unwrap()]);
    let c = client();
    create(&c, &srv.url("/v1/stream/limited"), "text/plain", None).await;
    let q = "/v1/stream/limited?offset=-1&live=sse";
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..4 {
        let mut s = send_raw(srv.addr, &sse_request(q, "")).await;
        let got = read_until(&mut s, |b| contains(b, b"\r\n\r\n")).await;
        let raw = Raw::parse(&got);
        statuses.push(raw.status);
        if raw.status == 429 {
            limited = Some(raw);
            break;
        }
    }
    let raw = limited.unwrap_or_else(|| panic!("never limited: {statuses:?}"));
    assert!(statuses[..statuses.len() - 1].iter().all(|s| *s == 200));
    assert!(raw.header("retry-after").is_some());
    assert_eq!(raw.header("connection"), Some("close"));
}

async fn sse_gauge(c: &reqwest::Client, srv: &ServerProc) -> u64 {
    let text = c
        .get(srv.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("ds_live_readers{mode=\"sse\"}"))
        .expect("the SSE live-reader gauge");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// An idle compact SSE reader counts in the live-reader gauge, and when the
/// client goes away the gauge drops back to 0 without any new event on the
/// stream (the socket's EOF is noticed while idle).
#[tokio::test]
async fn live_reader_gauge_drops_when_the_client_leaves() {
    let srv = ServerProc::start(&["--sse-reconnect-interval", "10m"]);
    let c = client();
    create(&c, &srv.url("/v1/stream/gauge"), "text/plain", None).await;
    let mut s = send_raw(
        srv.addr,
        &sse_request("/v1/stream/gauge?offset=-1&live=sse", ""),
    )
    .await;
    read_until(&mut s, |b| contains(b, b"event: control")).await;
    assert_eq!(sse_gauge(&c, &srv).await, 1);
    drop(s);
    let deadline = Instant::now() + PATIENCE;
    let mut last = 1;
    while Instant::now() < deadline {
        last = sse_gauge(&c, &srv).await;
        if last == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last, 0, "the SSE reader was not released");
}

/// Requests that are not compact SSE reach hyper intact on a fresh
/// connection: a POST append, a plain GET, and two pipelined GETs in one
/// write (both answered, in order, on the same connection).
#[tokio::test]
async fn other_requests_are_replayed_to_hyper() {
    let srv = ServerProc::start(&[]);
    let c = client();
    create(&c, &srv.url("/v1/stream/replay"), "text/plain", None).await;

    let mut s = send_raw(
        srv.addr,
        "POST /v1/stream/replay HTTP/1.1\r\nhost: t\r\ncontent-type: text/plain\r\n\
         content-length: 5\r\nconnection: close\r\n\r\nabcde",
    )
    .await;
    let raw = Raw::parse(&read_to_end(&mut s).await);
    assert!(raw.status == 200 || raw.status == 204, "{}", raw.status);

    let mut s = send_raw(
        srv.addr,
        "GET /v1/stream/replay?offset=-1 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    let raw = Raw::parse(&read_to_end(&mut s).await);
    assert_eq!(raw.status, 200);
    assert!(raw.body.ends_with(b"abcde"));

    let mut s = send_raw(
        srv.addr,
        "GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n\
         GET /v1/stream/replay?offset=-1 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    let all = read_to_end(&mut s).await;
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    let first = text.find("ok\n").expect("the healthz body");
    let second = text.find("abcde").expect("the read body");
    assert!(first < second, "{text}");
}

/// HTTP/2 with prior knowledge (h2c) still works on cleartext connections,
/// for a plain read and for SSE.
#[tokio::test]
async fn h2c_prior_knowledge_still_works() {
    let srv = ServerProc::start(&[]);
    let c = client();
    let url = srv.url("/v1/stream/h2c");
    create(&c, &url, "text/plain", None).await;
    append(&c, &url, "text/plain", b"over-h2").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let r = h2.get(format!("{url}?offset=-1")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), "over-h2");
    let mut r = h2
        .get(format!("{url}?offset=-1&live=sse"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let mut got = Vec::new();
    while !contains(&got, b"event: control") {
        let chunk = tokio::time::timeout(PATIENCE, r.chunk())
            .await
            .unwrap()
            .unwrap()
            .expect("more SSE data");
        got.extend_from_slice(&chunk);
    }
    assert!(contains(&got, b"over-h2"));
}

/// A request head that arrives in several TCP writes (split inside the
/// request line and inside a header) is still served on the compact path.
#[tokio::test]
async fn split_request_head_is_served() {
    let srv = ServerProc::start(&[]);
    let c = client();
    let url = srv.url("/v1/stream/split");
    create(&c, &url, "text/plain", None).await;
    append(&c, &url, "text/plain", b"pieces").await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for part in [
        "GE",
        "T /v1/stream/split?off",
        "set=-1&live=sse HTTP/1.1\r\nho",
        "st: t\r\n",
        "\r\n",
    ] {
        s.write_all(part.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let got = read_until(&mut s, |b| contains(b, b"event: control")).await;
    let raw = Raw::parse(&got);
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("connection"), Some("close"));
    assert!(contains(&raw.body, b"pieces"));
}

/// SIGTERM with idle compact SSE connections: each gets the end of its
/// response (the last chunk) and the process exits with status 0 without
/// waiting out its 60 s grace period.
#[tokio::test]
async fn sigterm_with_idle_compact_sse_exits_with_status_0() {
    let mut srv =
        ServerProc::start(&["--sse-reconnect-interval", "10m", "--shutdown-grace", "60s"]);
    let c = client();
    create(&c, &srv.url("/v1/stream/term"), "text/plain", None).await;
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut s = send_raw(
            srv.addr,
            &sse_request("/v1/stream/term?offset=-1&live=sse", ""),
        )
        .await;
        read_until(&mut s, |b| contains(b, b"event: control")).await;
        conns.push(s);
    }
    let st = Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(st.success());
    for s in &mut conns {
        let rest = read_to_end(s).await;
        assert!(
            rest.ends_with(b"0\r\n\r\n"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    let status = srv
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("still running 30 s after SIGTERM; log:\n{}", srv.log()));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        srv.log()
    );
}
