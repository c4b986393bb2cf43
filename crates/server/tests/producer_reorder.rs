//! Pipelined idempotent producers: a request that overtakes its predecessor
//! is held briefly instead of failing with a spurious 409.

use durable_streams_server::{Server, ServerConfig};
use std::time::Duration;

async fn start(reorder_wait: Duration) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        producer_reorder_wait: reorder_wait,
        ..ServerConfig::default()
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        Server::builder()
            .config(config)
            .build()
            .run(listener, async {
                let _ = rx.await;
            }),
    );
    (format!("http://{addr}/v1/stream"), tx)
}

async fn post(c: &reqwest::Client, url: &str, seq: u64) -> reqwest::Response {
    c.post(url)
        .header("content-type", "text/plain")
        .header("producer-id", "p")
        .header("producer-epoch", "0")
        .header("producer-seq", seq.to_string())
        .body(format!("m{seq};"))
        .send()
        .await
        .unwrap()
}

/// seq 1 sent before seq 0 is accepted once seq 0 arrives: both 200, in order.
#[tokio::test]
async fn overtaking_request_waits_for_its_predecessor() {
    let (base, _stop) = start(Duration::from_secs(5)).await;
    let c = reqwest::Client::new();
    let url = format!("{base}/reorder");
    assert_eq!(
        c.put(&url)
            .header("content-type", "text/plain")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let first = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { post(&c, &url, 1).await.status() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(post(&c, &url, 0).await.status(), 200);
    assert_eq!(first.await.unwrap(), 200);
    let body = c
        .get(format!("{url}?offset=-1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "m0;m1;");
}

/// Without its predecessor, a gap still gets the spec's 409 with the expected seq.
#[tokio::test]
async fn gap_without_predecessor_is_409() {
    let (base, _stop) = start(Duration::from_millis(30)).await;
    let c = reqwest::Client::new();
    let url = format!("{base}/gap");
    c.put(&url)
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(post(&c, &url, 0).await.status(), 200);
    let r = post(&c, &url, 2).await;
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["producer-expected-seq"], "1");
    assert_eq!(r.headers()["producer-received-seq"], "2");
}
