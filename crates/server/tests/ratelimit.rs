//! Rate limiting on a library server: a burst, then 429 with Retry-After,
//! separate buckets per client address, refill, and what is not counted.
#![allow(clippy::unwrap_used)]

use durable_streams_server::ratelimit::RateLimitConfig;
use durable_streams_server::{Server, ServerConfig};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

struct Running {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(rate_limit: RateLimitConfig) -> Running {
    // Linux accepts any 127.0.0.0/8 source on loopback, so clients can
    // come from 127.0.0.1 and 127.0.0.2.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .config(ServerConfig {
            rate_limit,
            ..Default::default()
        })
        .build();
    tokio::spawn(server.run(listener, async {
        let _ = rx.await;
    }));
    Running { addr, _stop: tx }
}

fn limit(requests_per_second: f64, burst: u32) -> RateLimitConfig {
    RateLimitConfig {
        enabled: true,
        requests_per_second,
        burst,
        ..Default::default()
    }
}

/// A client bound to a loopback source address.
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}/v1/stream/{path}", self.addr)
    }
}

async fn append(c: &reqwest::Client, url: &str, body: &'static str) -> reqwest::Response {
    c.post(url)
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The burst is served; the next request gets 429 with a whole-second
/// Retry-After of at least 1 and a short body, and its append is not applied.
#[tokio::test]
async fn burst_then_429_changes_nothing() {
    let srv = start(limit(0.5, 3)).await;
    let a = client_from("127.0.0.1");
    let url = srv.url("s");
    let r = a
        .put(&url)
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(append(&a, &url, "one").await.status(), 204);
    assert_eq!(append(&a, &url, "two").await.status(), 204);
    let r = append(&a, &url, "three").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    // CORS headers still apply to the refusal (the policy layer is outside).
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let body = r.text().await.unwrap();
    assert!(body.contains("rate limit"), "{body}");

    // Another client address reads the stream: the refused append is absent.
    let b = client_from("127.0.0.2");
    let r = b.get(format!("{url}?offset=-1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "onetwo");
}

/// Two client addresses have separate buckets: exhausting one leaves the
/// other untouched, and X-Forwarded-For from an untrusted peer changes
/// nothing.
#[tokio::test]
async fn buckets_are_per_client_address() {
    let srv = start(limit(0.5, 2)).await;
    let a = client_from("127.0.0.1");
    let b = client_from("127.0.0.2");
    let url = srv.url("missing");
    for _ in 0..2 {
        assert_eq!(a.get(&url).send().await.unwrap().status(), 404);
    }
    assert_eq!(a.get(&url).send().await.unwrap().status(), 429);
    let r = a
        .get(&url)
        .header("x-forwarded-for", "198.51.100.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "spoofed X-Forwarded-For must not help");
    for _ in 0..2 {
        assert_eq!(b.get(&url).send().await.unwrap().status(), 404);
    }
    assert_eq!(b.get(&url).send().await.unwrap().status(), 429);
}

/// Behind a trusted proxy, each X-Forwarded-For client has its own bucket.
#[tokio::test]
async fn trusted_proxy_forwarded_for_keys_buckets() {
    let srv = start(RateLimitConfig {
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        ..limit(0.5, 1)
    })
    .await;
    let proxy = client_from("127.0.0.1");
    let url = srv.url("missing");
    let via = |client: &'static str| proxy.get(&url).header("x-forwarded-for", client).send();
    assert_eq!(via("198.51.100.1").await.unwrap().status(), 404);
    assert_eq!(via("198.51.100.1").await.unwrap().status(), 429);
    assert_eq!(via("198.51.100.2").await.unwrap().status(), 404);
}

/// After waiting the advertised Retry-After, the client is served again.
#[tokio::test]
async fn tokens_refill_after_retry_after() {
    let srv = start(limit(1.0, 1)).await;
    let a = client_from("127.0.0.1");
    let url = srv.url("missing");
    assert_eq!(a.get(&url).send().await.unwrap().status(), 404);
    let r = a.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(a.get(&url).send().await.unwrap().status(), 404);
}

/// Health, readiness and metrics are never limited.
#[tokio::test]
async fn probes_are_not_counted() {
    let srv = start(limit(0.5, 1)).await;
    let a = client_from("127.0.0.1");
    assert_eq!(a.get(srv.url("x")).send().await.unwrap().status(), 404);
    assert_eq!(a.get(srv.url("x")).send().await.unwrap().status(), 429);
    for path in ["/healthz", "/readyz", "/metrics"] {
        for _ in 0..3 {
            let r = a
                .get(format!("http://{}{path}", srv.addr))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
        }
    }
}

/// With rate limiting off (the default) nothing is ever refused.
#[tokio::test]
async fn off_by_default() {
    let srv = start(RateLimitConfig::default()).await;
    let a = client_from("127.0.0.1");
    for _ in 0..300 {
        assert_eq!(a.get(srv.url("x")).send().await.unwrap().status(), 404);
    }
}
