//! End-to-end tests of the real `durable-streams-server` binary: command-line
//! flags, request limits, routing, live readers and signal handling.
//!
//! Every test spawns its own server process with `dev --port 0`, learns the
//! chosen address from the `listening addr=...` log line on stderr, and talks
//! HTTP to it (reqwest, or a raw TCP socket for requests reqwest would
//! normalise or refuse to send). The process is killed when the test ends,
//! whatever the outcome.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

mod support;
use support::{temp_dir, ServerProc, TempDir, BIN};

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header"))
}

/// A response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
}

/// Sends `request` verbatim on a fresh connection and reads the response head.
/// A connection reset after the response has arrived is tolerated: servers may
/// reset a connection on which they left request bytes unread.
fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (and close) before it has read everything; a
    // failed write is fine as long as a response comes back.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if buf.is_empty() => panic!("no response to raw request: {e}"),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unparsable response: {text:?}"));
    RawResponse { status, head }
}

async fn create(
    c: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) {
    let r = c
        .put(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "create {url}");
}

/// Reads a whole stream from the beginning with catch-up GETs: the bytes, the
/// size of each chunk, and the final Stream-Next-Offset.
async fn read_all(c: &reqwest::Client, url: &str) -> (Vec<u8>, Vec<usize>, String) {
    let mut offset = "-1".to_owned();
    let mut data = Vec::new();
    let mut sizes = Vec::new();
    for _ in 0..10_000 {
        let r = c
            .get(format!("{url}?offset={offset}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "read {url} at {offset}");
        let next = header(&r, "stream-next-offset")
            .expect("Stream-Next-Offset")
            .to_owned();
        let up_to_date = header(&r, "stream-up-to-date") == Some("true");
        let body = r.bytes().await.unwrap();
        sizes.push(body.len());
        data.extend_from_slice(&body);
        if up_to_date {
            return (data, sizes, next);
        }
        assert!(
            !body.is_empty(),
            "a chunk short of the tail carried no data"
        );
        assert!(
            next > offset || offset == "-1",
            "offset did not advance: {offset} -> {next}"
        );
        offset = next;
    }
    panic!("never reached Stream-Up-To-Date");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// `GET /healthz` answers 200 as soon as the listening line has been logged.
#[tokio::test]
async fn healthz_is_200_once_listening() {
    let srv = ServerProc::start(&[]);
    let r = client().get(srv.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok\n");
}

/// `dev --help` documents every server flag.
#[test]
fn help_mentions_every_flag() {
    let out = Command::new(BIN)
        .args(["dev", "--help"])
        .output()
        .expect("run --help");
    assert!(out.status.success(), "dev --help failed: {out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--host",
        "--port",
        "--long-poll-timeout",
        "--sse-reconnect-interval",
        "--cursor-interval",
        "--max-append-bytes",
        "--read-chunk-bytes",
        "--max-header-bytes",
        "--max-live-readers",
        "--path-prefix",
        "--data-dir",
    ] {
        assert!(
            help.contains(flag),
            "`dev --help` does not mention {flag}:\n{help}"
        );
    }
    // The top-level help leads to the subcommand.
    let top = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(top.status.success());
    assert!(String::from_utf8(top.stdout).unwrap().contains("dev"));
}

/// A body over `--max-append-bytes` is refused with 413, announced by
/// Content-Length or streamed chunked, for appends and creates, and leaves the
/// stream exactly as it was; a body of exactly the limit is accepted.
#[tokio::test]
async fn oversized_bodies_get_413_and_change_nothing() {
    const LIMIT: usize = 1024;
    let srv = ServerProc::start(&["--max-append-bytes", "1024"]);
    let c = client();
    let url = srv.url("/v1/stream/limits");
    let initial: Vec<u8> = (0..100u8).collect();
    create(&c, &url, "application/octet-stream", initial.clone()).await;
    let head_before = c.head(&url).send().await.unwrap();
    let tail_before = header(&head_before, "stream-next-offset")
        .unwrap()
        .to_owned();

    // Content-Length announces too much: refused before the body is read.
    let big = vec![0xABu8; LIMIT + 1];
    let r = c
        .post(&url)
        .header("content-type", "application/octet-stream")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "Content-Length over the limit");

    // Chunked transfer encoding: no length up front; refused once the limit is crossed.
    let pieces: Vec<Result<Bytes, std::io::Error>> = big
        .chunks(256)
        .map(|p| Ok(Bytes::copy_from_slice(p)))
        .collect();
    let r = c
        .post(&url)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "chunked body over the limit");
    assert!(
        r.headers().get("content-length").is_some()
            || r.headers().get("transfer-encoding").is_some()
    );

    // The stream is unchanged.
    let (data, _, next) = read_all(&c, &url).await;
    assert_eq!(data, initial, "stream content changed by a refused append");
    assert_eq!(next, tail_before);
    let head_after = c.head(&url).send().await.unwrap();
    assert_eq!(
        header(&head_after, "stream-next-offset"),
        Some(tail_before.as_str())
    );

    // A create with an oversized body (both framings) creates nothing.
    let other = srv.url("/v1/stream/limits-create");
    let r = c
        .put(&other)
        .header("content-type", "application/octet-stream")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "create with Content-Length over the limit");
    let pieces: Vec<Result<Bytes, std::io::Error>> = big
        .chunks(100)
        .map(|p| Ok(Bytes::copy_from_slice(p)))
        .collect();
    let r = c
        .put(&other)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "chunked create over the limit");
    assert_eq!(
        c.head(&other).send().await.unwrap().status(),
        404,
        "a refused create left a stream behind"
    );

    // Exactly the limit is fine, with either framing.
    let exact = vec![0x5Au8; LIMIT];
    let r = c
        .post(&url)
        .header("content-type", "application/octet-stream")
        .body(exact.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "a body of exactly --max-append-bytes");
    let r = c
        .post(&url)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            vec![
                Ok::<_, std::io::Error>(Bytes::from(exact[..512].to_vec())),
                Ok(Bytes::from(exact[512..].to_vec())),
            ],
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        204,
        "a chunked body of exactly --max-append-bytes"
    );
    let (data, _, _) = read_all(&c, &url).await;
    let mut expected = initial.clone();
    expected.extend_from_slice(&exact);
    expected.extend_from_slice(&exact);
    assert_eq!(data, expected);
}

/// A request head larger than `--max-header-bytes` gets 431, while a head
/// below it (but above hyper's 8 KiB minimum) is served.
#[test]
fn oversized_request_head_gets_431() {
    let srv = ServerProc::start(&["--max-header-bytes", "16384"]);
    let request = |pad: usize| {
        format!(
            "GET /healthz HTTP/1.1\r\nHost: {}\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            srv.addr,
            "p".repeat(pad)
        )
        .into_bytes()
    };
    let ok = raw_request(srv.addr, &request(12 * 1024));
    assert_eq!(
        ok.status, 200,
        "a 12 KiB head under a 16 KiB limit: {}",
        ok.head
    );
    let too_big = raw_request(srv.addr, &request(32 * 1024));
    assert_eq!(
        too_big.status, 431,
        "a 32 KiB head over a 16 KiB limit: {}",
        too_big.head
    );
    // The server is still healthy afterwards.
    let again = raw_request(srv.addr, &request(10));
    assert_eq!(again.status, 200);
}

/// `--read-chunk-bytes` cuts a catch-up read: partial chunks carry no
/// Stream-Up-To-Date, and following Stream-Next-Offset reassembles the exact bytes.
#[tokio::test]
async fn read_chunk_bytes_cuts_catch_up_reads() {
    let srv = ServerProc::start(&["--read-chunk-bytes", "16"]);
    let c = client();
    let url = srv.url("/v1/stream/chunked/read");
    // All 256 byte values, including invalid UTF-8, across several appends.
    let all: Vec<u8> = (0..=255u8).rev().chain(0..=40u8).collect();
    create(&c, &url, "application/octet-stream", all[..20].to_vec()).await;
    for part in all[20..].chunks(37) {
        let r = c
            .post(&url)
            .header("content-type", "application/octet-stream")
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }

    // The first read is cut and says nothing about being up to date.
    let r = c.get(format!("{url}?offset=-1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "stream-up-to-date"),
        None,
        "a cut chunk claimed to be up to date"
    );
    assert_eq!(r.bytes().await.unwrap().len(), 16);

    let (data, sizes, next) = read_all(&c, &url).await;
    assert_eq!(data, all, "reassembled bytes differ");
    assert!(
        sizes.iter().all(|&n| n <= 16),
        "a chunk exceeded --read-chunk-bytes: {sizes:?}"
    );
    assert_eq!(sizes.len(), all.len().div_ceil(16), "chunk sizes {sizes:?}");
    let head = c.head(&url).send().await.unwrap();
    assert_eq!(header(&head, "stream-next-offset"), Some(next.as_str()));
}

/// With `--max-live-readers 2`, a third concurrent long-poll is answered at
/// once with 503 and Retry-After, the two admitted ones still get their data,
/// and their slots are released afterwards.
#[tokio::test]
async fn live_reader_limit_answers_503_with_retry_after() {
    let srv = ServerProc::start(&["--max-live-readers", "2", "--long-poll-timeout", "30s"]);
    let c = client();
    let url = srv.url("/v1/stream/crowded");
    create(&c, &url, "text/plain", "").await;
    let poll_url = format!("{url}?offset=now&live=long-poll");

    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            let u = poll_url.clone();
            tokio::spawn(async move {
                let r = c
                    .get(&u)
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await
                    .unwrap();
                (r.status(), r.text().await.unwrap())
            })
        })
        .collect();
    // Give both time to be admitted and start waiting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "a long-poll on an idle stream returned early"
    );

    let third = tokio::time::timeout(Duration::from_secs(5), c.get(&poll_url).send())
        .await
        .expect("the third long-poll hung instead of being refused")
        .unwrap();
    assert_eq!(third.status(), 503);
    let retry = header(&third, "retry-after")
        .expect("503 without Retry-After")
        .to_owned();
    assert!(
        retry.trim().parse::<u64>().is_ok(),
        "Retry-After {retry:?} is not delta-seconds"
    );
    // SSE readers count against the same limit.
    let sse = tokio::time::timeout(
        Duration::from_secs(5),
        c.get(format!("{url}?offset=now&live=sse")).send(),
    )
    .await
    .expect("the SSE reader hung instead of being refused")
    .unwrap();
    assert_eq!(sse.status(), 503);
    assert!(sse.headers().contains_key("retry-after"));

    // The two admitted waiters get the data.
    let r = c
        .post(&url)
        .header("content-type", "text/plain")
        .body("wake")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for w in waiters {
        let (status, body) = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("waiter not woken")
            .unwrap();
        assert_eq!((status.as_u16(), body.as_str()), (200, "wake"));
    }

    // Their slots are free again: a new long-poll is admitted and woken.
    let c2 = c.clone();
    let u = poll_url.clone();
    let again = tokio::spawn(async move {
        c2.get(&u)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !again.is_finished(),
        "long-poll after the slots were released returned early (503?)"
    );
    c.post(&url)
        .header("content-type", "text/plain")
        .body("again")
        .send()
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), again)
        .await
        .expect("not woken")
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "again");
}

/// `--path-prefix /custom` serves streams under /custom, and the default
/// prefix /v1/stream then addresses nothing (404).
#[tokio::test]
async fn custom_path_prefix() {
    let srv = ServerProc::start(&["--path-prefix", "/custom"]);
    let c = client();
    let url = srv.url("/custom/a/b");
    create(&c, &url, "text/plain", "hello").await;
    let r = c
        .post(&url)
        .header("content-type", "text/plain")
        .body(" world")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (data, _, _) = read_all(&c, &url).await;
    assert_eq!(data, b"hello world");

    for (method, path) in [
        (reqwest::Method::PUT, "/v1/stream/a/b"),
        (reqwest::Method::GET, "/v1/stream/a/b"),
        (reqwest::Method::HEAD, "/v1/stream/a/b"),
        (reqwest::Method::POST, "/v1/stream/a/b"),
        (reqwest::Method::PUT, "/v1/stream/other"),
        (reqwest::Method::PUT, "/customx/a"),
    ] {
        let r = c
            .request(method.clone(), srv.url(path))
            .header("content-type", "text/plain")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{method} {path}");
    }
    // The stream is still there, and /healthz stays at the root.
    assert_eq!(c.head(&url).send().await.unwrap().status(), 200);
    assert_eq!(
        c.get(srv.url("/healthz")).send().await.unwrap().status(),
        200
    );
}

/// SIGTERM with a long-poll and an SSE reader connected makes the process
/// exit with status 0 promptly, far within its 10 s grace period, and the
/// live readers are ended rather than cut off mid-response.
#[tokio::test]
async fn sigterm_with_live_readers_exits_promptly_with_status_0() {
    let mut srv = ServerProc::start(&[
        "--long-poll-timeout",
        "30s",
        "--sse-reconnect-interval",
        "60s",
        "--shutdown-grace",
        "10s",
    ]);
    let c = client();
    let url = srv.url("/v1/stream/term");
    create(&c, &url, "text/plain", "x").await;

    let lp_client = c.clone();
    let lp_url = format!("{url}?offset=now&live=long-poll");
    let long_poll = tokio::spawn(async move {
        let r = lp_client
            .get(&lp_url)
            .timeout(Duration::from_secs(20))
            .send()
            .await?;
        let status = r.status();
        r.bytes().await?;
        Ok::<_, reqwest::Error>(status)
    });

    let mut sse = c
        .get(format!("{url}?offset=-1&live=sse"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    // The first event proves the SSE reader is live.
    let first = tokio::time::timeout(Duration::from_secs(5), sse.chunk())
        .await
        .expect("no SSE event")
        .unwrap();
    assert!(first.is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !long_poll.is_finished(),
        "long-poll returned before shutdown"
    );

    let sent = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &srv.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(st.success());
    let status = srv
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM; log:\n{}", srv.log()));
    let took = sent.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        srv.log()
    );
    assert!(
        took < Duration::from_secs(3),
        "exit took {took:?} (grace period 10 s)"
    );

    // The long-poll got an answer (not a reset) and the SSE body ended.
    let lp = tokio::time::timeout(Duration::from_secs(2), long_poll)
        .await
        .expect("long-poll hung")
        .unwrap();
    let lp = lp.expect("long-poll failed instead of being answered on shutdown");
    assert_eq!(lp, 204, "long-poll answer on shutdown");
    let end = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match sse.chunk().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("SSE body did not end");
    assert!(end.is_ok(), "SSE body ended with an error: {end:?}");
}

/// The reserved `__ds` namespace is never a stream: PUT does not create
/// `/v1/stream/__ds/anything` and no other method finds a stream there,
/// while `__ds` as a later segment is an ordinary stream name.
#[tokio::test]
async fn reserved_ds_path_is_not_a_stream() {
    let srv = ServerProc::start(&[]);
    let c = client();
    for path in [
        "/v1/stream/__ds/anything",
        "/v1/stream/__ds",
        "/v1/stream/__ds/subscriptions/x",
        "/v1/stream/%5F%5Fds/y",
    ] {
        let url = srv.url(path);
        let r = c
            .put(&url)
            .header("content-type", "text/plain")
            .body("data")
            .send()
            .await
            .unwrap();
        assert!(
            !r.status().is_success(),
            "PUT {path} answered {}",
            r.status()
        );
        for method in [
            reqwest::Method::GET,
            reqwest::Method::HEAD,
            reqwest::Method::POST,
            reqwest::Method::DELETE,
        ] {
            let r = c
                .request(method.clone(), &url)
                .header("content-type", "text/plain")
                .body("more")
                .send()
                .await
                .unwrap();
            assert!(
                !r.status().is_success(),
                "{method} {path} answered {} after the PUT",
                r.status()
            );
        }
    }
    let normal = srv.url("/v1/stream/app/__ds/x");
    create(&c, &normal, "text/plain", "ok").await;
    assert_eq!(c.head(&normal).send().await.unwrap().status(), 200);
}

/// A long-poll waiting on a stream that gets deleted is answered 404 at once
/// instead of waiting out its 30 s timeout.
#[tokio::test]
async fn long_poll_on_deleted_stream_answers_404_at_once() {
    let srv = ServerProc::start(&["--long-poll-timeout", "30s"]);
    let c = client();
    let url = srv.url("/v1/stream/doomed");
    create(&c, &url, "application/json", "[1,2]").await;
    let c2 = c.clone();
    let u = format!("{url}?offset=now&live=long-poll");
    let waiter = tokio::spawn(async move {
        let r = c2
            .get(&u)
            .timeout(Duration::from_secs(25))
            .send()
            .await
            .unwrap();
        r.status()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "long-poll on an idle stream returned early"
    );
    let deleted = Instant::now();
    assert_eq!(c.delete(&url).send().await.unwrap().status(), 204);
    // Generous bound: this asserts "not waiting for the 30 s timeout", not speed.
    let status = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("long-poll kept waiting after its stream was deleted")
        .unwrap();
    assert_eq!(status, 404);
    assert!(deleted.elapsed() < Duration::from_secs(5));
}

/// Stream paths with `..` or `.` segments, empty segments, NUL or other
/// control characters (raw or percent-encoded) are refused with 400 by every method.
#[test]
fn invalid_stream_paths_get_400() {
    let srv = ServerProc::start(&[]);
    let paths = [
        "/v1/stream/..",
        "/v1/stream/a/../b",
        "/v1/stream/a/..",
        "/v1/stream/%2e%2e/b",
        "/v1/stream/a/%2E%2E",
        "/v1/stream/./a",
        "/v1/stream/a/%2e",
        "/v1/stream/",
        "/v1/stream//a",
        "/v1/stream/a//b",
        "/v1/stream/a/",
        "/v1/stream/a%2F%2Fb",
        "/v1/stream/a%00",
        "/v1/stream/%00",
        "/v1/stream/a%00b/c",
        "/v1/stream/a%0Ab",
        "/v1/stream/a%1F",
        "/v1/stream/%ff%fe",
    ];
    for path in paths {
        for method in ["PUT", "POST", "GET", "HEAD", "DELETE"] {
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
                srv.addr
            );
            let r = raw_request(srv.addr, req.as_bytes());
            assert_eq!(r.status, 400, "{method} {path}: {}", r.head);
        }
    }
    // Over the length limit (1024 decoded bytes) as well.
    let long = format!("/v1/stream/{}", "a".repeat(1025));
    let req = format!("PUT {long} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(
        raw_request(srv.addr, req.as_bytes()).status,
        400,
        "1025-byte stream path"
    );
    // And nothing was created along the way: a sibling valid path is still free.
    let req = format!(
        "HEAD /v1/stream/a HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        srv.addr
    );
    assert_eq!(raw_request(srv.addr, req.as_bytes()).status, 404);
}

/// Re-creating a stream whose TTL or Expires-At has passed (before the
/// background sweep freed it) creates it afresh (201), and the server keeps
/// answering other requests.
#[tokio::test]
async fn recreating_an_expired_stream_does_not_wedge_the_server() {
    let srv = ServerProc::start(&[]);
    let c = client();
    for (i, (name, value)) in [
        ("stream-ttl", "0"),
        ("stream-expires-at", "2000-01-01T00:00:00Z"),
    ]
    .into_iter()
    .enumerate()
    {
        let url = srv.url(&format!("/v1/stream/expiring/{i}"));
        let r = c
            .put(&url)
            .header("content-type", "text/plain")
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "create with {name}: {value}");
        // Expired at once: the next create must replace it, not hang.
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.put(&url)
                .header("content-type", "text/plain")
                .body("fresh")
                .send(),
        )
        .await
        .unwrap_or_else(|_| panic!("PUT over a stream expired by {name} hung (server wedged?)"))
        .unwrap();
        assert_eq!(r.status(), 201, "re-create over a stream expired by {name}");
        let (data, _, _) = read_all(&c, &url).await;
        assert_eq!(data, b"fresh");
    }
    let r = tokio::time::timeout(Duration::from_secs(5), c.get(srv.url("/healthz")).send())
        .await
        .expect("server stopped answering")
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A JSON stream read or forked from an offset inside a message gets 400 and
/// changes nothing, while every message start is served, on the memory
/// engine and the file engine, and on the file engine again after a SIGKILL
/// restart (its boundary index comes back from disk and a rescan).
#[tokio::test]
async fn json_offsets_inside_a_message_get_400() {
    let dir = TempDir(temp_dir("json-offsets"));
    let data_dir = dir.0.to_str().unwrap().to_owned();
    // Messages of varied sizes (some over the index's 16 KiB spacing), sent
    // compact so that each is stored as its own text followed by a comma.
    let msgs: Vec<String> = (0..60)
        .map(|i| match i % 4 {
            0 => format!(r#"{{"i":{i},"s":"a,b]}},\"c"}}"#),
            1 => format!(r#"{{"i":{i},"big":"{}"}}"#, "x".repeat(9_000 * (i % 3 + 1))),
            2 => format!("[{i},[1,2],{{\"x\":[3]}}]"),
            _ => format!(r#""str,{i}""#),
        })
        .collect();
    let mut starts = vec![0u64];
    for m in &msgs {
        starts.push(starts.last().unwrap() + m.len() as u64 + 1);
    }
    let offset = |o: u64| format!("{:016}_{:016}", 0, o);
    let c = client();
    let check = |srv: &ServerProc, when: &str| {
        let (c, url, msgs, starts, when) = (
            c.clone(),
            srv.url("/v1/stream/j"),
            &msgs,
            &starts,
            when.to_owned(),
        );
        let fork_url = srv.url("/v1/stream/fork");
        async move {
            for (i, w) in starts.windows(2).enumerate() {
                let r = c
                    .get(format!("{url}?offset={}", offset(w[0])))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{when}: read from message {i}");
                let got: Vec<serde_json::Value> =
                    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                let want: serde_json::Value = serde_json::from_str(&msgs[i]).unwrap();
                assert_eq!(got[0], want, "{when}: read from message {i}");
                for at in [w[0] + 1, (w[0] + w[1]) / 2, w[1] - 1] {
                    let r = c
                        .get(format!("{url}?offset={}", offset(at)))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 400, "{when}: read from {at}, in message {i}");
                }
                let r = c
                    .put(&fork_url)
                    .header("content-type", "application/json")
                    .header("stream-forked-from", "/v1/stream/j")
                    .header("stream-fork-offset", offset(w[0] + 1))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 400, "{when}: fork inside message {i}");
            }
            let r = c.head(&fork_url).send().await.unwrap();
            assert_eq!(r.status(), 404, "{when}: a refused fork was created");
            let r = c.head(&url).send().await.unwrap();
            assert_eq!(
                header(&r, "stream-next-offset"),
                Some(offset(*starts.last().unwrap()).as_str()),
                "{when}: the stream changed"
            );
        }
    };
    for engine in ["memory", "file"] {
        let args: &[&str] = if engine == "file" {
            &["--data-dir", &data_dir]
        } else {
            &[]
        };
        let srv = ServerProc::start(args);
        let url = srv.url("/v1/stream/j");
        create(&c, &url, "application/json", Vec::new()).await;
        for batch in msgs.chunks(7) {
            let r = c
                .post(&url)
                .header("content-type", "application/json")
                .body(format!("[{}]", batch.join(",")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 204, "{engine}: append");
        }
        check(&srv, engine).await;
        if engine == "file" {
            drop(srv); // SIGKILL
            let srv = ServerProc::start(args);
            check(&srv, "file, after SIGKILL").await;
        }
    }
}
