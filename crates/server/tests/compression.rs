//! Response compression on a library server: negotiation, thresholds, what
//! is never compressed, and ETag/If-None-Match per representation.
#![allow(clippy::unwrap_used)]

use durable_streams_server::compression::CompressionConfig;
use durable_streams_server::{Server, ServerConfig};
use std::io::Read;
use std::net::SocketAddr;

struct Running {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(compression: CompressionConfig) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .config(ServerConfig {
            compression,
            ..Default::default()
        })
        .build();
    tokio::spawn(server.run(listener, async {
        let _ = rx.await;
    }));
    Running { addr, _stop: tx }
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}/v1/stream/{path}", self.addr)
    }
}

/// Text that compresses well, `n` bytes long.
fn text(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 64);
    let mut i = 0u64;
    while out.len() < n {
        out.extend_from_slice(format!("event {i} value {}\n", i * 7 % 13).as_bytes());
        i += 1;
    }
    out.truncate(n);
    out
}

async fn stream_with(c: &reqwest::Client, url: &str, content_type: &str, data: Vec<u8>) {
    let r = c
        .put(url)
        .header("content-type", content_type)
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn vary_has(r: &reqwest::Response, token: &str) -> bool {
    r.headers()
        .get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn decode(encoding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => brotli::BrotliDecompress(&mut &body[..], &mut out).unwrap(),
        "zstd" => out = zstd::decode_all(body).unwrap(),
        other => panic!("unexpected encoding {other}"),
    }
    out
}

async fn get(c: &reqwest::Client, url: &str, accept: Option<&str>) -> reqwest::Response {
    let mut req = c.get(url);
    if let Some(a) = accept {
        req = req.header("accept-encoding", a);
    }
    req.send().await.unwrap()
}

/// Each coding is used when it is the one accepted, with Vary, the right
/// Content-Length, and a body that decodes to the stream's bytes; both the
/// inline (8 KiB) and the blocking-pool (300 KiB) paths.
#[tokio::test]
async fn each_algorithm_round_trips() {
    let srv = start(CompressionConfig::default()).await;
    let c = reqwest::Client::new();
    for size in [8 * 1024, 300 * 1024] {
        let url = srv.url(&format!("rt{size}"));
        let data = text(size);
        stream_with(&c, &url, "text/plain", data.clone()).await;
        for enc in ["gzip", "br", "zstd"] {
            let r = get(&c, &format!("{url}?offset=-1"), Some(enc)).await;
            assert_eq!(r.status(), 200);
            assert_eq!(header(&r, "content-encoding").as_deref(), Some(enc));
            assert!(vary_has(&r, "accept-encoding"));
            let len: usize = header(&r, "content-length").unwrap().parse().unwrap();
            let body = r.bytes().await.unwrap();
            assert_eq!(len, body.len());
            assert!(body.len() < data.len() / 2, "{enc} did not compress");
            assert_eq!(decode(enc, &body), data, "{enc} at {size} bytes");
        }
    }
}

/// A JSON stream's compressed body decodes to the JSON array of its messages.
#[tokio::test]
async fn json_stream_body_compresses() {
    let srv = start(CompressionConfig::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("json");
    let msgs: Vec<serde_json::Value> = (0..200)
        .map(|i| serde_json::json!({"id": i, "kind": "order.created"}))
        .collect();
    stream_with(
        &c,
        &url,
        "application/json",
        serde_json::to_vec(&msgs).unwrap(),
    )
    .await;
    let r = get(&c, &format!("{url}?offset=-1"), Some("gzip")).await;
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("gzip"));
    let body = decode("gzip", &r.bytes().await.unwrap());
    let got: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(got, msgs);
}

/// The server's order (zstd > br > gzip) decides ties; q-values, q=0,
/// `*;q=0` and a preferred `identity` are honoured; identity answers to a
/// response that could have been compressed still carry Vary.
#[tokio::test]
async fn negotiation_honours_q_values() {
    let srv = start(CompressionConfig::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("neg");
    stream_with(&c, &url, "text/plain", text(4096)).await;
    let read = format!("{url}?offset=-1");
    let cases: [(Option<&str>, Option<&str>); 9] = [
        (Some("gzip, deflate, br, zstd"), Some("zstd")),
        (Some("gzip, br"), Some("br")),
        (Some("zstd;q=0.2, gzip;q=0.8"), Some("gzip")),
        (Some("zstd;q=0, br;q=0, gzip"), Some("gzip")),
        (Some("gzip;q=0"), None),
        (Some("*;q=0"), None),
        (Some("identity"), None),
        (Some("identity, gzip;q=0.5"), None),
        (None, None),
    ];
    for (accept, expected) in cases {
        let r = get(&c, &read, accept).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "content-encoding").as_deref(),
            expected,
            "Accept-Encoding {accept:?}"
        );
        assert!(vary_has(&r, "accept-encoding"), "{accept:?}");
        let body = r.bytes().await.unwrap();
        if expected.is_none() {
            assert_eq!(body.len(), 4096);
        }
    }
}

/// The server's own order is configurable.
#[tokio::test]
async fn configured_preference_order() {
    use durable_streams_server::compression::Algorithm;
    let srv = start(CompressionConfig {
        algorithms: vec![Algorithm::Gzip, Algorithm::Zstd],
        ..Default::default()
    })
    .await;
    let c = reqwest::Client::new();
    let url = srv.url("pref");
    stream_with(&c, &url, "text/plain", text(4096)).await;
    let read = format!("{url}?offset=-1");
    let r = get(&c, &read, Some("zstd, br, gzip")).await;
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("gzip"));
    // br is not offered at all.
    let r = get(&c, &read, Some("br")).await;
    assert_eq!(header(&r, "content-encoding"), None);
}

/// Bodies under min_bytes, already-compressed types, HEAD, and a server
/// with compression disabled are sent as they are.
#[tokio::test]
async fn what_is_not_compressed() {
    let srv = start(CompressionConfig::default()).await;
    let c = reqwest::Client::new();

    let small = srv.url("small");
    stream_with(&c, &small, "text/plain", text(1000)).await;
    let r = get(&c, &format!("{small}?offset=-1"), Some("gzip")).await;
    assert_eq!(header(&r, "content-encoding"), None);
    assert!(vary_has(&r, "accept-encoding"));
    assert_eq!(r.bytes().await.unwrap().len(), 1000);

    let png = srv.url("png");
    stream_with(&c, &png, "image/png", text(8192)).await;
    let r = get(&c, &format!("{png}?offset=-1"), Some("gzip")).await;
    assert_eq!(header(&r, "content-encoding"), None);
    assert!(!vary_has(&r, "accept-encoding"));
    assert_eq!(r.bytes().await.unwrap().len(), 8192);

    let big = srv.url("big");
    stream_with(&c, &big, "text/plain", text(8192)).await;
    let r = c
        .head(&big)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-encoding"), None);
    assert!(!vary_has(&r, "accept-encoding"));

    let off = start(CompressionConfig {
        enabled: false,
        ..Default::default()
    })
    .await;
    let url = off.url("off");
    stream_with(&c, &url, "text/plain", text(8192)).await;
    let r = get(&c, &format!("{url}?offset=-1"), Some("gzip")).await;
    assert_eq!(header(&r, "content-encoding"), None);
    assert!(!vary_has(&r, "accept-encoding"));
    assert_eq!(r.bytes().await.unwrap().len(), 8192);
}

/// SSE is never compressed, even when the client accepts every coding.
#[tokio::test]
async fn sse_is_never_compressed() {
    let srv = start(CompressionConfig::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("sse");
    stream_with(&c, &url, "text/plain", text(8192)).await;
    let mut r = get(
        &c,
        &format!("{url}?offset=-1&live=sse"),
        Some("zstd, br, gzip"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(header(&r, "content-encoding"), None);
    // The first frame arrives as plain SSE text carrying the data.
    let first = r.chunk().await.unwrap().unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(first.starts_with("event: data"), "{first:.80}");
    assert!(first.contains("event 0 value 0"));
}

/// A long-poll that receives data gets it compressed, both when data is
/// there at once and when it arrives while the poll waits.
#[tokio::test]
async fn long_poll_body_is_compressed() {
    let srv = start(CompressionConfig::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("lp");
    let first = text(5000);
    stream_with(&c, &url, "text/plain", first.clone()).await;

    let r = get(&c, &format!("{url}?offset=-1&live=long-poll"), Some("gzip")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("gzip"));
    let next = header(&r, "stream-next-offset").unwrap();
    assert_eq!(decode("gzip", &r.bytes().await.unwrap()), first);

    let poll = {
        let c = c.clone();
        let url = format!("{url}?offset={next}&live=long-poll");
        tokio::spawn(async move { get(&c, &url, Some("br")).await })
    };
    // Whether the append lands before the poll or while it waits, the poll
    // answers with exactly this data.
    let second = text(6000);
    let r = c
        .post(&url)
        .header("content-type", "text/plain")
        .body(second.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = poll.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("br"));
    assert!(vary_has(&r, "accept-encoding"));
    assert_eq!(decode("br", &r.bytes().await.unwrap()), second);
}

/// Each representation has its own strong ETag; If-None-Match with a tag
/// gives 304 (carrying that tag and Vary) exactly when that tag's
/// representation would be sent, and 200 otherwise.
#[tokio::test]
async fn etag_per_representation_and_304() {
    let srv = start(CompressionConfig::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("etag");
    stream_with(&c, &url, "text/plain", text(8192)).await;
    let read = format!("{url}?offset=-1");

    let etag_of = |r: &reqwest::Response| header(r, "etag").unwrap();
    let identity = etag_of(&get(&c, &read, None).await);
    let gzip = etag_of(&get(&c, &read, Some("gzip")).await);
    let zstd = etag_of(&get(&c, &read, Some("zstd")).await);
    assert_ne!(identity, gzip);
    assert_ne!(gzip, zstd);
    assert!(gzip.starts_with('"') && gzip.ends_with(":gzip\""), "{gzip}");

    let conditional = |accept: Option<&'static str>, inm: String| {
        let mut req = c.get(&read).header("if-none-match", inm);
        if let Some(a) = accept {
            req = req.header("accept-encoding", a);
        }
        req.send()
    };
    // Same representation: 304 with its tag.
    for (accept, tag) in [
        (None, &identity),
        (Some("gzip"), &gzip),
        (Some("zstd"), &zstd),
    ] {
        let r = conditional(accept, tag.clone()).await.unwrap();
        assert_eq!(r.status(), 304, "{accept:?} {tag}");
        assert_eq!(&etag_of(&r), tag);
        assert!(vary_has(&r, "accept-encoding"));
        assert!(header(&r, "stream-next-offset").is_some());
        assert_eq!(header(&r, "content-encoding"), None);
        assert!(r.bytes().await.unwrap().is_empty());
    }
    // A tag of another representation: the full response.
    for (accept, tag) in [
        (Some("gzip"), &identity),
        (Some("br"), &gzip),
        (None, &gzip),
    ] {
        let r = conditional(accept, tag.clone()).await.unwrap();
        assert_eq!(r.status(), 200, "{accept:?} {tag}");
        assert_eq!(header(&r, "content-encoding").as_deref(), accept);
    }
    // A list with the matching tag among others, and `*`.
    let r = conditional(Some("gzip"), format!("\"x\", {identity}, W/{gzip}"))
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(etag_of(&r), gzip);
    let r = conditional(Some("zstd"), "*".into()).await.unwrap();
    assert_eq!(r.status(), 304);

    // Below the threshold the identity representation (and tag) is sent
    // even to a client accepting gzip, so its tag revalidates.
    let small = srv.url("etag-small");
    stream_with(&c, &small, "text/plain", text(100)).await;
    let small_read = format!("{small}?offset=-1");
    let r = get(&c, &small_read, Some("gzip")).await;
    let small_tag = etag_of(&r);
    assert!(!small_tag.contains("gzip"));
    let r = c
        .get(&small_read)
        .header("accept-encoding", "gzip")
        .header("if-none-match", &small_tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(etag_of(&r), small_tag);
}
