//! CORS origins: `*` (the default) answers any origin; an allow-list echoes
//! listed origins with `Vary: Origin` and gives others no ACAO header.
#![allow(clippy::unwrap_used)]

use durable_streams_server::{Server, ServerConfig};
use std::net::SocketAddr;

struct Running {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(cors_allowed_origins: &[&str]) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .config(ServerConfig {
            cors_allowed_origins: cors_allowed_origins.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .build();
    tokio::spawn(server.run(listener, async {
        let _ = rx.await;
    }));
    Running { addr, _stop: tx }
}

fn acao(r: &reqwest::Response) -> Option<&str> {
    r.headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap())
}

fn varies_on_origin(r: &reqwest::Response) -> bool {
    r.headers()
        .get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("origin"))
}

async fn request(
    srv: &Running,
    method: reqwest::Method,
    origin: Option<&str>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .request(method, format!("http://{}/v1/stream/some/stream", srv.addr));
    if let Some(o) = origin {
        req = req
            .header("origin", o)
            .header("access-control-request-method", "POST");
    }
    req.send().await.unwrap()
}

/// The default `*` keeps `Access-Control-Allow-Origin: *` for any origin,
/// without varying on it.
#[tokio::test]
async fn default_star_is_unchanged() {
    assert_eq!(ServerConfig::default().cors_allowed_origins, vec!["*"]);
    let srv = start(&["*"]).await;
    for origin in [Some("https://a.example"), None] {
        let r = request(&srv, reqwest::Method::GET, origin).await;
        assert_eq!(r.status(), 404);
        assert_eq!(acao(&r), Some("*"));
        assert!(!varies_on_origin(&r));
    }
}

/// A listed origin is echoed (case-insensitively matched, trailing slash in
/// the config tolerated) on responses and preflights, with Vary: Origin.
#[tokio::test]
async fn listed_origin_is_echoed() {
    let srv = start(&["https://app.example", "HTTPS://Other.Example:8443/"]).await;
    for origin in ["https://app.example", "https://other.example:8443"] {
        for method in [reqwest::Method::GET, reqwest::Method::OPTIONS] {
            let r = request(&srv, method.clone(), Some(origin)).await;
            assert_eq!(acao(&r), Some(origin), "{method} {origin}");
            assert!(varies_on_origin(&r));
        }
    }
}

/// An unlisted origin (or none) gets no ACAO header; the preflight is still
/// answered (204 with the allowed methods) so the browser refuses cleanly.
#[tokio::test]
async fn unlisted_origin_gets_no_acao() {
    let srv = start(&["https://app.example"]).await;
    let r = request(&srv, reqwest::Method::OPTIONS, Some("https://evil.example")).await;
    assert_eq!(r.status(), 204);
    assert!(r.headers().contains_key("access-control-allow-methods"));
    assert_eq!(acao(&r), None);
    assert!(varies_on_origin(&r));
    for origin in [
        Some("https://evil.example"),
        Some("https://app.example.evil"),
        None,
    ] {
        let r = request(&srv, reqwest::Method::GET, origin).await;
        assert_eq!(r.status(), 404);
        assert_eq!(acao(&r), None, "{origin:?}");
        assert!(varies_on_origin(&r));
    }
}
