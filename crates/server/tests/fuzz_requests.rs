//! Property test: random, often malformed, protocol requests against an
//! in-process server never produce a server error, never hang, and never
//! change "witness" streams they are not allowed to modify.
//!
//! The server runs for the whole property (state accumulates across cases,
//! which is the point: later requests hit streams, forks and producers that
//! earlier ones created). Requests are sent with hyper's low-level HTTP/1
//! client so paths reach the server verbatim (`..`, `%00`, raw UTF-8 are not
//! normalised away as a URL library would).
//!
//! `PROPTEST_CASES` overrides the number of cases (default 200);
//! `PROPTEST_RNG_SEED` fixes the seed; `FUZZ_DEBUG=1` prints every request
//! and its answer.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PREFIX: &str = "/v1/stream";
/// Per-request budget: every request must be answered (headers, and the whole
/// body unless it is an SSE stream) within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Witness streams: created before the run, must read back identically after.
// ---------------------------------------------------------------------------

struct Witness {
    /// Root-relative stream path.
    path: &'static str,
    content_type: &'static str,
    /// Body of the create, then bodies of appends.
    create: &'static [u8],
    appends: &'static [&'static [u8]],
    /// Closed after the appends.
    close: bool,
}

const WITNESSES: &[Witness] = &[
    Witness {
        path: "witness/bin",
        content_type: "application/octet-stream",
        create: b"\x00\x01\x02\xff\xfe binary \r\n\x80",
        appends: &[b"\xc3\x28second", b"[not json]", b"\x00"],
        close: false,
    },
    Witness {
        path: "witness/text",
        content_type: "text/plain; charset=utf-8",
        create: "h\u{e9}llo\n".as_bytes(),
        appends: &[b"world\n", "\u{2713} done".as_bytes()],
        close: true,
    },
    Witness {
        path: "witness/json",
        content_type: "application/json",
        create: br#"[{"a":1},"x",[1,2],null]"#,
        appends: &[br#"{"b":{"c":[true,false]}}"#, br#"[3,4,"five"]"#],
        close: false,
    },
];

fn is_witness(root_relative: &str) -> bool {
    WITNESSES.iter().any(|w| w.path == root_relative)
}

/// What the server would take as the root-relative stream path of a request
/// path: the part after the prefix, percent-decoded once.
fn decoded_target(path: &str) -> Option<String> {
    let rest = path.strip_prefix(PREFIX)?.strip_prefix('/')?;
    Some(
        percent_encoding::percent_decode_str(rest)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// The reserved subscription namespace, which this server documents as
/// `501 Not Implemented` (README: "The first segment `__ds` is reserved for
/// the subscription API (`501` until it is implemented)").
fn is_reserved(path: &str) -> bool {
    decoded_target(path).is_some_and(|t| t.split('/').next() == Some("__ds"))
}

// ---------------------------------------------------------------------------
// A request and how it is sent.
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct FuzzRequest {
    method: Method,
    /// Path and query exactly as sent (valid for `http::Uri`).
    target: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
    /// Send the body with chunked transfer encoding instead of Content-Length.
    chunked: bool,
}

impl std::fmt::Debug for FuzzRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.target)?;
        for (k, v) in &self.headers {
            write!(f, "\n    {k}: {:?}", String::from_utf8_lossy(v))?;
        }
        let shown: String = String::from_utf8_lossy(&self.body)
            .chars()
            .take(80)
            .collect();
        write!(
            f,
            "\n    body ({} bytes{}): {shown:?}",
            self.body.len(),
            if self.chunked { ", chunked" } else { "" }
        )
    }
}

impl FuzzRequest {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

type ReqBody = BoxBody<Bytes, Infallible>;

/// Sends one request on a fresh connection. SSE responses are dropped after
/// their headers; every other body is read to the end.
async fn send(addr: SocketAddr, req: &FuzzRequest) -> Result<Answer, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, ReqBody>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut builder = http::Request::builder()
        .method(req.method.clone())
        .uri(req.target.as_str());
    builder = builder.header("host", addr.to_string());
    for (name, value) in &req.headers {
        let v = HeaderValue::from_bytes(value)
            .map_err(|e| format!("generator made a bad header value: {e}"))?;
        builder = builder.header(*name, v);
    }
    let body: ReqBody = if req.chunked {
        let size = (req.body.len() / 3).max(1);
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = req
            .body
            .chunks(size)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    } else {
        Full::new(Bytes::from(req.body.clone())).boxed()
    };
    let request = builder
        .body(body)
        .map_err(|e| format!("generator made a bad request: {e}"))?;
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let sse = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let body = if sse {
        Bytes::new()
    } else {
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes()
    };
    conn.abort();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

async fn send_timed(addr: SocketAddr, req: &FuzzRequest) -> Result<Answer, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, send(addr, req)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no complete answer within {REQUEST_TIMEOUT:?}")),
    }
}

fn simple(
    method: Method,
    target: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: &[u8],
) -> FuzzRequest {
    FuzzRequest {
        method,
        target,
        headers,
        body: body.to_vec(),
        chunked: false,
    }
}

// ---------------------------------------------------------------------------
// Witness snapshots.
// ---------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// Bodies of the catch-up reads from -1, following Stream-Next-Offset.
    chunks: Vec<Bytes>,
    final_offset: String,
    /// HEAD: Stream-Next-Offset, Content-Type, Stream-Closed.
    head: (Option<String>, Option<String>, Option<String>),
}

fn hdr(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

async fn snapshot(addr: SocketAddr, w: &Witness) -> Result<Snapshot, String> {
    let url = format!("{PREFIX}/{}", w.path);
    let mut offset = "-1".to_owned();
    let mut chunks = Vec::new();
    loop {
        let a = send_timed(
            addr,
            &simple(Method::GET, format!("{url}?offset={offset}"), vec![], b""),
        )
        .await?;
        if a.status != StatusCode::OK {
            return Err(format!(
                "GET {url}?offset={offset}: {} {:?}",
                a.status, a.body
            ));
        }
        let next =
            hdr(&a.headers, "stream-next-offset").ok_or("read without Stream-Next-Offset")?;
        chunks.push(a.body);
        if a.headers.get("stream-up-to-date").is_some() {
            offset = next;
            break;
        }
        if chunks.len() > 1000 {
            return Err("read never reached Stream-Up-To-Date".into());
        }
        offset = next;
    }
    let a = send_timed(addr, &simple(Method::HEAD, url.clone(), vec![], b"")).await?;
    if a.status != StatusCode::OK {
        return Err(format!("HEAD {url}: {}", a.status));
    }
    let head = (
        hdr(&a.headers, "stream-next-offset"),
        hdr(&a.headers, "content-type"),
        hdr(&a.headers, "stream-closed"),
    );
    Ok(Snapshot {
        chunks,
        final_offset: offset,
        head,
    })
}

async fn create_witnesses(addr: SocketAddr) {
    for w in WITNESSES {
        let url = format!("{PREFIX}/{}", w.path);
        let ct = || ("content-type", w.content_type.as_bytes().to_vec());
        let a = send_timed(
            addr,
            &simple(Method::PUT, url.clone(), vec![ct()], w.create),
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::CREATED, "create witness {url}");
        for (i, body) in w.appends.iter().enumerate() {
            // Some appends go through an idempotent producer, so witnesses carry producer state too.
            let mut headers = vec![ct()];
            if i % 2 == 0 {
                headers.push(("producer-id", b"witness-producer".to_vec()));
                headers.push(("producer-epoch", b"0".to_vec()));
                headers.push(("producer-seq", (i / 2).to_string().into_bytes()));
            }
            let a = send_timed(addr, &simple(Method::POST, url.clone(), headers, body))
                .await
                .unwrap();
            assert!(a.status.is_success(), "append to witness {url}: {a:?}");
        }
        if w.close {
            let a = send_timed(
                addr,
                &simple(
                    Method::POST,
                    url.clone(),
                    vec![("stream-closed", b"true".to_vec())],
                    b"",
                ),
            )
            .await
            .unwrap();
            assert!(a.status.is_success(), "close witness {url}: {a:?}");
        }
    }
}

fn expected_bytes(w: &Witness) -> Vec<u8> {
    let mut all = w.create.to_vec();
    for a in w.appends {
        all.extend_from_slice(a);
    }
    all
}

// ---------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------

/// Stream names the fuzzer may create, append to and delete (never witnesses).
const NAMES: &[&str] = &[
    "s/a",
    "s/b",
    "s/c",
    "f/1",
    "f/2",
    "j/1",
    "t",
    "witness/bin/child",
    "witnessx",
    "witness",
    "a b",
    "\u{fc}/\u{f1}",
    "\u{65e5}\u{672c}",
    "__dsx",
    "x/__ds",
];

const WEIRD_PATHS: &[&str] = &[
    "/v1/stream/..",
    "/v1/stream/.",
    "/v1/stream/a/../b",
    "/v1/stream/witness/../witness/bin",
    "/v1/stream/witness/./bin",
    "/v1/stream/%2e%2e/witness/bin",
    "/v1/stream/%2E",
    "/v1/stream/%00",
    "/v1/stream/a%00b",
    "/v1/stream/witness/bin%00",
    "/v1/stream//x",
    "/v1/stream/s/a/",
    "/v1/stream/",
    "/v1/stream",
    "/v1/streamx/s/a",
    "/v1/stream%2Fs/a",
    "/",
    "/healthz",
    "/v1/stream/__ds",
    "/v1/stream/__ds/",
    "/v1/stream/__ds/subscriptions/x",
    "/v1/stream/__ds/jwks.json",
    "/v1/stream/%5f%5fds/x",
    "/v1/stream/%5F%5Fds",
    "/v1/stream/__ds/../s/a",
    "/v1/stream/%ff",
    "/v1/stream/%c3%28",
    "/v1/stream/%",
    "/v1/stream/%zz",
    "/v1/stream/%2",
    "/v1/stream/s%2Fa",
    "/v1/stream/s%252Fa",
    "/v1/stream/%E2%9C%93",
    "/v1/stream/a%0Ab",
    "/v1/stream/a%7F",
    "/v1/stream/a%C2%85",
    "/v1/stream/%EF%BB%BFbom",
    "/v1/stream/*",
    "/v1/stream/;",
    "/v1/stream/a;b=c",
];

/// Encodes every byte of `s` as `%XX`.
fn encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Makes a generated path acceptable to `http::Uri` without touching what
/// the server should see: bytes that may not appear raw in a request target
/// are percent-encoded; `%`, `/` and non-ASCII UTF-8 stay raw.
fn uri_safe_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        let keep = !c.is_ascii() || c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/%".contains(c);
        if keep {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    out
}

fn path_strategy() -> impl Strategy<Value = String> {
    let witness_paths: Vec<&'static str> = WITNESSES.iter().map(|w| w.path).collect();
    prop_oneof![
        8 => select(NAMES).prop_map(|n| format!("{PREFIX}/{n}")),
        2 => select(NAMES).prop_map(|n| format!("{PREFIX}/{}", encode_all(n))),
        4 => select(WEIRD_PATHS).prop_map(str::to_owned),
        // Witnesses, directly and in disguise; mutating methods are diverted below.
        3 => select(witness_paths.clone()).prop_map(|n| format!("{PREFIX}/{n}")),
        1 => select(witness_paths).prop_map(|n| format!("{PREFIX}/{}", encode_all(n))),
        1 => (1000usize..1050).prop_map(|n| format!("{PREFIX}/{}", "a".repeat(n))),
        1 => (1usize..4000).prop_map(|n| format!("{PREFIX}/{}y", "x/".repeat(n))),
        2 => "[a-z0-9%._~/-]{0,24}".prop_map(|s| format!("{PREFIX}/{s}")),
        1 => any::<String>().prop_map(|s| format!("{PREFIX}/{s}")),
    ]
    .prop_map(|p| uri_safe_path(&p))
}

fn method_strategy() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::PUT),
        4 => Just(Method::POST),
        4 => Just(Method::GET),
        1 => Just(Method::HEAD),
        1 => Just(Method::DELETE),
        1 => Just(Method::OPTIONS),
        1 => Just(Method::PATCH),
    ]
}

/// An offset token for a small position (as the server mints them).
fn token(n: u64) -> String {
    format!(
        "{:016}_{:016}",
        n / 10_000_000_000_000_000,
        n % 10_000_000_000_000_000
    )
}

fn offset_value() -> BoxedStrategy<String> {
    prop_oneof![
        3 => (0u64..120).prop_map(token),
        2 => select(vec![
            "-1", "now", "", "-2", "0", "abc", "NOW", "-1 ", "9999999999999999_9999999999999999",
            "0000000000001844_6744073709551615", "0000000000001844_6744073709551616",
            "0000000000000000_000000000000000a", "0000000000000000-0000000000000001",
            "00000000000000000000000000000000", "0000000000000000_00000000000000001",
            "\u{663}\u{663}", "0000000000000000_0000000000000000,1",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
    .boxed()
}

fn query_strategy() -> impl Strategy<Value = String> {
    (
        proptest::option::weighted(0.75, offset_value()),
        proptest::option::weighted(0.1, offset_value()),
        proptest::option::weighted(
            0.5,
            select(vec![
                "long-poll",
                "sse",
                "long-poll",
                "sse",
                "",
                "bogus",
                "LONG-POLL",
                "true",
            ]),
        ),
        proptest::option::weighted(
            0.3,
            prop_oneof![
                (0u64..u64::MAX).prop_map(|n| n.to_string()),
                any::<String>()
            ],
        ),
        proptest::option::weighted(
            0.1,
            select(vec![
                "&offset=%zz",
                "&&",
                "&=",
                "&live",
                "&offset",
                "&live=sse&live=sse",
                "&cursor",
                "&%FF=%FF",
                "&x=1",
            ]),
        ),
    )
        .prop_map(|(offset, offset2, live, cursor, raw)| {
            let mut s = form_urlencoded::Serializer::new(String::new());
            if let Some(o) = &offset {
                s.append_pair("offset", o);
            }
            if let Some(l) = live {
                s.append_pair("live", l);
            }
            if let Some(c) = &cursor {
                s.append_pair("cursor", c);
            }
            if let Some(o) = &offset2 {
                s.append_pair("offset", o);
            }
            let mut q = s.finish();
            if let Some(r) = raw {
                q.push_str(r);
            }
            q
        })
}

/// Header values that are edge cases for any header.
const EDGE_VALUES: &[&[u8]] = &[
    b"",
    b" ",
    b"0",
    b"1",
    b"-1",
    b"+1",
    b"01",
    b"1.5",
    b"1e3",
    b"0x10",
    b"true",
    b"TRUE",
    b"false",
    b"null",
    b"18446744073709551615",
    b"18446744073709551616",
    b"99999999999999999999999999999999",
    b"9007199254740991",
    b"9007199254740992",
    b"\t1\t",
    b"\x80\xff",
    "\u{e9}t\u{e9}".as_bytes(),
    b"\xc3\x28",
    b"a,b",
    b"\"quoted\"",
];

fn specific_values(name: &str) -> Vec<Vec<u8>> {
    let v = |xs: &[&str]| xs.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
    let witness_sources: Vec<String> = WITNESSES
        .iter()
        .flat_map(|w| {
            [
                format!("{PREFIX}/{}", w.path),
                w.path.to_owned(),
                format!("/{}", w.path),
            ]
        })
        .collect();
    match name {
        "content-type" => v(&[
            "application/json",
            "APPLICATION/JSON; charset=utf-8",
            "application/json;",
            "text/plain",
            "text/plain; charset=utf-8",
            "application/octet-stream",
            "text/event-stream",
            "application/ndjson",
            ";",
            "application/jsonx",
            "multipart/form-data; boundary=x",
            "*/*",
        ]),
        "stream-ttl" => v(&[
            "0",
            "1",
            "60",
            "3600",
            "1000000000000",
            "1000000000001",
            "-5",
            " 10",
        ]),
        "stream-expires-at" => v(&[
            "2000-01-01T00:00:00Z",
            "2099-01-01T00:00:00Z",
            "2099-01-01T00:00:00.123+02:00",
            "9999-12-31T23:59:59Z",
            "2024-02-30T00:00:00Z",
            "+275760-09-13T00:00:00Z",
            "1970-01-01T00:00:00Z",
            "2025-01-01T00:00:00+25:00",
            "2025-01-01",
            "Thu, 01 Jan 2099 00:00:00 GMT",
        ]),
        "stream-closed" => v(&["true", "TRUE", " true ", "false", "1", "yes"]),
        "stream-seq" => v(&["a", "b", "c", "0001", "0002", "zzzz", "A"]),
        "producer-id" => v(&["p", "q", "witness-producer", " ", "a b"]),
        "producer-epoch" | "producer-seq" => {
            v(&["0", "1", "2", "3", "9007199254740991", "9007199254740992"])
        }
        "stream-forked-from" => {
            let mut out: Vec<Vec<u8>> = witness_sources
                .into_iter()
                .map(String::into_bytes)
                .collect();
            out.extend(v(&[
                "/v1/stream/s/a",
                "/v1/stream/f/1",
                "s/b",
                "/v1/stream/missing",
                "/v1/stream/../x",
                "/v1/stream/__ds/x",
                "__ds",
                "http://host/v1/stream/witness/bin",
                "/v1/stream/witness/bin?x=1",
                "/v1/stream/witness/bin#frag",
                "/v1/stream/witness%2Fbin",
                "/v1/stream/%00",
            ]));
            out
        }
        "stream-fork-offset" => {
            let mut out: Vec<Vec<u8>> = [0, 1, 3, 5, 9, 10, 12, 17, 20, 30, 64]
                .iter()
                .map(|&n| token(n).into_bytes())
                .collect();
            out.extend(v(&[
                "9999999999999999_9999999999999999",
                "0000000000001844_6744073709551615",
                "-1",
                "now",
            ]));
            out
        }
        "stream-fork-sub-offset" => {
            v(&["0", "1", "2", "3", "4", "100", "18446744073709551615", "-1"])
        }
        "if-none-match" => v(&[
            "*",
            "\"x\"",
            "W/\"1\"",
            "\"1:0:0\"",
            "\"0:0:0\", *",
            "\"a\", \"b\"",
        ]),
        _ => Vec::new(),
    }
}

/// Arbitrary bytes that HTTP allows in a field value (visible ASCII, space,
/// tab and obs-text), never starting or ending with whitespace-only concerns.
fn arbitrary_field_value() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![4 => 0x21u8..=0x7e, 1 => Just(b' '), 1 => Just(b'\t'), 2 => 0x80u8..=0xff],
        0..40,
    )
}

fn header_value(name: &'static str) -> BoxedStrategy<Vec<u8>> {
    let specific = specific_values(name);
    let edge: Vec<Vec<u8>> = EDGE_VALUES.iter().map(|v| v.to_vec()).collect();
    let mut options: Vec<(u32, BoxedStrategy<Vec<u8>>)> = Vec::new();
    if !specific.is_empty() {
        options.push((5, select(specific).boxed()));
    }
    options.push((2, select(edge).boxed()));
    options.push((1, arbitrary_field_value().boxed()));
    if name.starts_with("stream-fork-offset") || name == "if-none-match" {
        options.push((2, (0u64..80).prop_map(|n| token(n).into_bytes()).boxed()));
    }
    proptest::strategy::Union::new_weighted(options).boxed()
}

const HEADER_NAMES: &[&str] = &[
    "content-type",
    "stream-ttl",
    "stream-expires-at",
    "stream-closed",
    "stream-seq",
    "producer-id",
    "producer-epoch",
    "producer-seq",
    "stream-forked-from",
    "stream-fork-offset",
    "stream-fork-sub-offset",
    "if-none-match",
];

fn one_header() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    select(HEADER_NAMES).prop_flat_map(|name| header_value(name).prop_map(move |v| (name, v)))
}

fn headers_strategy() -> impl Strategy<Value = Vec<(&'static str, Vec<u8>)>> {
    (
        // Usually a content type, as a real client would send.
        proptest::option::weighted(0.7, header_value("content-type")),
        // A consistent idempotent-producer triple now and then.
        proptest::option::weighted(
            0.25,
            (
                header_value("producer-id"),
                header_value("producer-epoch"),
                header_value("producer-seq"),
            ),
        ),
        // A fork request, often of a witness.
        proptest::option::weighted(
            0.3,
            (
                header_value("stream-forked-from"),
                proptest::option::of(header_value("stream-fork-offset")),
                proptest::option::weighted(0.3, header_value("stream-fork-sub-offset")),
            ),
        ),
        proptest::collection::vec(one_header(), 0..5),
    )
        .prop_map(|(ct, producer, fork, extra)| {
            let mut hs = Vec::new();
            if let Some(ct) = ct {
                hs.push(("content-type", ct));
            }
            if let Some((id, epoch, seq)) = producer {
                hs.push(("producer-id", id));
                hs.push(("producer-epoch", epoch));
                hs.push(("producer-seq", seq));
            }
            if let Some((from, offset, sub)) = fork {
                hs.push(("stream-forked-from", from));
                if let Some(o) = offset {
                    hs.push(("stream-fork-offset", o));
                }
                if let Some(s) = sub {
                    hs.push(("stream-fork-sub-offset", s));
                }
            }
            hs.extend(extra);
            hs
        })
}

fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    let json: Vec<&'static [u8]> = vec![
        br#"{"a":1}"#,
        b"[]",
        b"[[]]",
        b"[1,2,3]",
        br#""str""#,
        b"null",
        br#"[{"x":[1,{"y":2}]}]"#,
        b"123",
        b"  [ 1 , 2 ]  ",
        b"[[1],[2,3]]",
        br#"{"\u00e9":"\ud83d\ude00"}"#,
        b"-0.5e-3",
        b"[{}]",
        b"true",
    ];
    let invalid: Vec<&'static [u8]> = vec![
        b"[",
        b"{\"a\":}",
        b"[1,]",
        b"\xff",
        b"[1]]",
        b"{}{}",
        b"1 2",
        b"",
        b" ",
        b"NaN",
        b"[\"\\x\"]",
        b"{\"a\":1",
        b"\"unterminated",
        b"[1,2,3]garbage",
        b"\xef\xbb\xbf[1]",
        b"[\"\xff\"]",
    ];
    prop_oneof![
        3 => Just(Vec::new()),
        3 => proptest::collection::vec(any::<u8>(), 1..256),
        3 => select(json).prop_map(<[u8]>::to_vec),
        2 => select(invalid).prop_map(<[u8]>::to_vec),
        1 => Just(b"[]".to_vec()),
        1 => (1usize..40).prop_map(|n| format!("[{}1]", "1,".repeat(n)).into_bytes()),
        1 => (0usize..64).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()),
        1 => (16_000usize..40_000).prop_map(|n| vec![b'z'; n]),
    ]
}

// Plausible requests: what a real (possibly buggy) client sends. They reach
// the success paths (creates, appends, forks, producers, live reads), which
// build the state that the chaotic requests then poke at.

const SANE_NAMES: &[&str] = &[
    "s/a",
    "s/b",
    "s/c",
    "f/1",
    "f/2",
    "j/1",
    "t",
    "witness/bin/child",
    "\u{fc}/\u{f1}",
];

/// The content type a sane client uses for a stream name (forks: their source's, often).
fn usual_content_type(name: &str) -> &'static str {
    match name {
        "j/1" | "f/2" => "application/json",
        "t" | "\u{fc}/\u{f1}" => "text/plain",
        _ => WITNESSES
            .iter()
            .find(|w| w.path == name)
            .map_or("application/octet-stream", |w| w.content_type),
    }
}

fn sane_headers(name: &'static str) -> impl Strategy<Value = Vec<(&'static str, Vec<u8>)>> {
    let witness_sources: Vec<String> = WITNESSES
        .iter()
        .map(|w| format!("{PREFIX}/{}", w.path))
        .collect();
    let other_sources: Vec<String> = SANE_NAMES.iter().map(|n| format!("{PREFIX}/{n}")).collect();
    (
        proptest::option::weighted(
            0.95,
            prop_oneof![
                6 => Just(usual_content_type(name)),
                1 => select(vec!["application/json", "text/plain", "application/octet-stream", "application/json; charset=utf-8"]),
            ],
        ),
        proptest::option::weighted(0.3, ("p|q", 0u64..3, 0u64..6)),
        proptest::option::weighted(
            0.3,
            (
                prop_oneof![2 => select(witness_sources), 1 => select(other_sources)],
                proptest::option::weighted(0.6, (0u64..70).prop_map(token)),
                proptest::option::weighted(0.2, 0u64..5),
            ),
        ),
        proptest::option::weighted(0.15, "[a-d]{1,3}"),
        proptest::option::weighted(0.07, Just(())),
        // Expiry, including streams that expire at once or during the run.
        proptest::option::weighted(
            0.12,
            select(vec![
                ("stream-ttl", "0"),
                ("stream-ttl", "1"),
                ("stream-ttl", "3600"),
                ("stream-expires-at", "2000-01-01T00:00:00Z"),
                ("stream-expires-at", "2099-01-01T00:00:00Z"),
            ]),
        ),
    )
        .prop_map(|(ct, producer, fork, seq, close, expiry)| {
            let mut hs: Vec<(&'static str, Vec<u8>)> = Vec::new();
            if let Some(ct) = ct {
                hs.push(("content-type", ct.as_bytes().to_vec()));
            }
            if let Some((id, epoch, seq)) = producer {
                hs.push(("producer-id", id.into_bytes()));
                hs.push(("producer-epoch", epoch.to_string().into_bytes()));
                hs.push(("producer-seq", seq.to_string().into_bytes()));
            }
            if let Some((from, offset, sub)) = fork {
                hs.push(("stream-forked-from", from.into_bytes()));
                if let Some(o) = offset {
                    hs.push(("stream-fork-offset", o.into_bytes()));
                }
                if let Some(s) = sub {
                    hs.push(("stream-fork-sub-offset", s.to_string().into_bytes()));
                }
            }
            if let Some(seq) = seq {
                hs.push(("stream-seq", seq.into_bytes()));
            }
            if close.is_some() {
                hs.push(("stream-closed", b"true".to_vec()));
            }
            if let Some((name, value)) = expiry {
                hs.push((name, value.as_bytes().to_vec()));
            }
            hs
        })
}

fn sane_query() -> impl Strategy<Value = String> {
    (
        prop_oneof![3 => Just("-1".to_owned()), 1 => Just("now".to_owned()), 2 => (0u64..70).prop_map(token)],
        select(vec![None, None, None, Some("long-poll"), Some("sse")]),
        proptest::option::weighted(0.3, (0u64..100_000).prop_map(|n| n.to_string())),
    )
        .prop_map(|(offset, live, cursor)| {
            let mut s = form_urlencoded::Serializer::new(String::new());
            s.append_pair("offset", &offset);
            if let Some(l) = live {
                s.append_pair("live", l);
            }
            if let Some(c) = &cursor {
                s.append_pair("cursor", c);
            }
            s.finish()
        })
}

/// Method, path, query, headers, body, chunked.
type RawParts = (
    Method,
    String,
    String,
    Vec<(&'static str, Vec<u8>)>,
    Vec<u8>,
    bool,
);

fn sane_request() -> impl Strategy<Value = RawParts> {
    let witness_paths: Vec<&'static str> = WITNESSES.iter().map(|w| w.path).collect();
    let json: Vec<&'static [u8]> = vec![
        br#"{"a":1}"#,
        b"[1,2,3]",
        br#""s""#,
        b"[]",
        br#"[{"k":[1]},2]"#,
        b"null",
    ];
    prop_oneof![5 => select(SANE_NAMES), 1 => select(witness_paths)].prop_flat_map(move |name| {
        (
            prop_oneof![
                4 => Just(Method::PUT),
                7 => Just(Method::POST),
                5 => Just(Method::GET),
                1 => Just(Method::HEAD),
                1 => Just(Method::DELETE),
            ],
            Just(uri_safe_path(&format!("{PREFIX}/{name}"))),
            sane_query(),
            sane_headers(name),
            // Mostly a body that suits the stream's usual content type.
            if usual_content_type(name).contains("json") {
                prop_oneof![1 => Just(Vec::new()), 6 => select(json.clone()).prop_map(<[u8]>::to_vec), 1 => proptest::collection::vec(any::<u8>(), 1..64)].boxed()
            } else {
                prop_oneof![1 => Just(Vec::new()), 1 => select(json.clone()).prop_map(<[u8]>::to_vec), 6 => proptest::collection::vec(any::<u8>(), 1..64)].boxed()
            },
            proptest::bool::weighted(0.1),
        )
    })
}

fn chaos_request() -> impl Strategy<Value = RawParts> {
    (
        method_strategy(),
        path_strategy(),
        query_strategy(),
        headers_strategy(),
        body_strategy(),
        proptest::bool::weighted(0.15),
    )
}

fn request_strategy() -> impl Strategy<Value = FuzzRequest> {
    prop_oneof![sane_request(), chaos_request()].prop_map(
        |(mut method, path, query, headers, body, chunked)| {
            // Witnesses must not be appended to, created over or deleted.
            let touches_witness = decoded_target(&path).is_some_and(|t| is_witness(&t));
            if touches_witness && matches!(method, Method::PUT | Method::POST | Method::DELETE) {
                method = Method::GET;
            }
            let target = if query.is_empty() {
                path
            } else {
                format!("{path}?{query}")
            };
            FuzzRequest {
                method,
                target,
                headers,
                body,
                chunked,
            }
        },
    )
}

// ---------------------------------------------------------------------------
// The property.
// ---------------------------------------------------------------------------

/// The server's own runtime, separate from the client's: if server code ever
/// blocks its worker threads (a deadlock on a synchronous lock), the client's
/// timers still fire and the test fails instead of hanging. Dropped without
/// waiting for those threads.
struct ServerRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Something that broke the server for good (a hang, a damaged witness):
/// state, not a property of one case, so it is reported as first seen, with
/// the requests that led to it, instead of being shrunk.
#[derive(Default)]
struct Fatal {
    first: Mutex<Option<String>>,
}

impl Fatal {
    fn record(&self, msg: String) -> TestCaseError {
        let mut first = self.first.lock().unwrap();
        if first.is_none() {
            *first = Some(msg);
        }
        TestCaseError::fail("fatal server state; see the report below")
    }
    fn is_set(&self) -> bool {
        self.first.lock().unwrap().is_some()
    }
}

/// The requests sent so far (with their outcome), for reports of
/// state-dependent failures: the last few overall, and the last few per stream.
#[derive(Default)]
struct History {
    recent: Mutex<std::collections::VecDeque<String>>,
    per_stream: Mutex<std::collections::HashMap<String, std::collections::VecDeque<String>>>,
}

impl History {
    fn push(&self, req: &FuzzRequest, line: String) {
        fn bounded(q: &mut std::collections::VecDeque<String>, line: String, cap: usize) {
            if q.len() == cap {
                q.pop_front();
            }
            q.push_back(line);
        }
        if let Some(t) = decoded_target(req.path()) {
            bounded(
                self.per_stream.lock().unwrap().entry(t).or_default(),
                line.clone(),
                10,
            );
        }
        bounded(&mut self.recent.lock().unwrap(), line, 30);
    }
    fn dump(&self, req: &FuzzRequest) -> String {
        let mut out = String::from("last requests overall:\n");
        for l in self.recent.lock().unwrap().iter() {
            out.push_str(&format!("  {l}\n"));
        }
        if let Some(t) = decoded_target(req.path()) {
            out.push_str(&format!("last requests to stream {t:?}:\n"));
            for l in self
                .per_stream
                .lock()
                .unwrap()
                .get(&t)
                .into_iter()
                .flatten()
            {
                out.push_str(&format!("  {l}\n"));
            }
        }
        out
    }
}

/// In-memory engine: no 5xx, no hang, witnesses unchanged.
#[test]
fn random_requests_never_5xx_never_hang_and_leave_witnesses_intact() {
    run_fuzz(None);
}

/// File engine (on a fresh data directory): the same property.
#[test]
fn random_requests_against_the_file_engine() {
    let dir = std::env::temp_dir().join(format!(
        "ds-fuzz-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
    ));
    run_fuzz(Some(dir.clone()));
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_fuzz(data_dir: Option<std::path::PathBuf>) {
    let started = Instant::now();
    let server_rt = ServerRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap(),
    ));
    let srt = server_rt.0.as_ref().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let listener = srt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder =
        durable_streams_server::Server::builder().long_poll_timeout(Duration::from_millis(50));
    if let Some(dir) = &data_dir {
        let engine = durable_streams_storage::FileEngine::open(
            dir,
            durable_streams_storage::FileOptions::default(),
        )
        .unwrap();
        builder = builder.engine(std::sync::Arc::new(engine));
    }
    let server = srt.spawn(builder.build().run(listener, async move {
        let _ = stop_rx.await;
    }));

    rt.block_on(create_witnesses(addr));
    let baseline: Vec<Snapshot> = rt.block_on(async {
        let mut v = Vec::new();
        for w in WITNESSES {
            v.push(snapshot(addr, w).await.unwrap());
        }
        v
    });
    for (w, s) in WITNESSES.iter().zip(&baseline) {
        assert_eq!(
            s.head.1.as_deref(),
            Some(w.content_type),
            "witness {} content type",
            w.path
        );
        assert_eq!(
            s.head.2.as_deref(),
            w.close.then_some("true"),
            "witness {} closure",
            w.path
        );
        assert_eq!(
            s.head.0.as_deref(),
            Some(s.final_offset.as_str()),
            "witness {} tail",
            w.path
        );
        if !w.content_type.contains("json") {
            assert_eq!(
                s.chunks.concat(),
                expected_bytes(w),
                "witness {} content",
                w.path
            );
        }
    }
    let json_witness = &baseline[2];
    assert_eq!(
        json_witness.chunks.concat(),
        br#"[{"a":1},"x",[1,2],null,{"b":{"c":[true,false]}},3,4,"five"]"#.to_vec(),
        "JSON witness content"
    );

    let mut config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 200;
    }
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 256;
    }
    if std::env::var_os("PROPTEST_MAX_SHRINK_TIME").is_none() {
        config.max_shrink_time = 30_000;
    }
    let cases = config.cases;
    let debug = std::env::var_os("FUZZ_DEBUG").is_some();
    let mut runner = TestRunner::new(config);
    let statuses: Mutex<BTreeMap<(String, u16), usize>> = Mutex::new(BTreeMap::new());
    let fatal = Fatal::default();
    let history = History::default();

    let result = runner.run(&proptest::collection::vec(request_strategy(), 1..6), |requests| {
        if fatal.is_set() {
            // Every later case fails at once, so proptest's shrinking ends quickly.
            return Err(TestCaseError::fail("fatal server state; see the report below"));
        }
        rt.block_on(async {
            for req in &requests {
                let answer = match send_timed(addr, req).await {
                    Ok(a) => a,
                    Err(e) => {
                        return Err(fatal.record(format!(
                            "request did not complete: {e}\nrequest: {req:?}\nthis case: {requests:#?}\n{}",
                            history.dump(req)
                        )))
                    }
                };
                let line = format!(
                    "{} {} [{}] -> {} {:?}",
                    req.method,
                    req.target.chars().take(80).collect::<String>(),
                    req.headers
                        .iter()
                        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v)))
                        .collect::<Vec<_>>()
                        .join("; "),
                    answer.status,
                    String::from_utf8_lossy(&answer.body).chars().take(80).collect::<String>()
                );
                if debug {
                    eprintln!("{line}");
                }
                history.push(req, line);
                *statuses.lock().unwrap().entry((req.method.to_string(), answer.status.as_u16())).or_default() += 1;
                let documented_501 = answer.status == StatusCode::NOT_IMPLEMENTED && is_reserved(req.path());
                if answer.status.is_server_error() && !documented_501 {
                    return Err(TestCaseError::fail(format!(
                        "server error {}: {:?}\nrequest: {req:?}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    )));
                }
            }
            for (w, before) in WITNESSES.iter().zip(&baseline) {
                let now = snapshot(addr, w).await;
                if now.as_ref() != Ok(before) {
                    return Err(fatal.record(format!(
                        "witness {} changed (or could not be read) after this case:\n{requests:#?}\nbefore: {before:?}\nafter: {now:?}\n{}",
                        w.path,
                        history.dump(&simple(Method::GET, format!("{PREFIX}/{}", w.path), vec![], b""))
                    )));
                }
            }
            Ok(())
        })
    });
    if let Some(report) = fatal.first.lock().unwrap().take() {
        panic!("{report}");
    }
    if let Err(e) = result {
        panic!("{e}");
    }

    // Final check, and the server still shuts down cleanly and promptly.
    rt.block_on(async {
        for (w, before) in WITNESSES.iter().zip(&baseline) {
            let now = snapshot(addr, w).await.unwrap();
            assert_eq!(&now, before, "witness {} changed", w.path);
        }
    });
    let statuses = statuses.into_inner().unwrap();
    eprintln!(
        "{cases} cases, responses by status: {statuses:?}, {:?}",
        started.elapsed()
    );
    if cases >= 50 {
        let ok = statuses
            .iter()
            .filter(|((_, s), _)| (200..300).contains(s))
            .map(|(_, n)| n)
            .sum::<usize>();
        assert!(
            ok > 0,
            "no request succeeded: the generator only exercises error paths"
        );
    }
    let _ = stop_tx.send(());
    let stopped = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), server).await });
    let outcome = stopped
        .expect("server did not stop within 5 s of shutdown")
        .expect("server task panicked");
    outcome.expect("server returned an error");
}
