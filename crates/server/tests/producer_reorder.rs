//! Pipelined idempotent producers: a request that overtakes its predecessor
//! is held briefly instead of failing with a spurious 409.

#![allow(clippy::unwrap_used)]

use durable_streams_server::{Server, ServerConfig};
use std::time::Duration;

async fn start(reorder_wait: Duration) -> (String, tokio::sync::oneshot::Sender<()>) {
    start_with(reorder_wait, None).await
}

async fn start_with(
    reorder_wait: Duration,
    engine: Option<std::sync::Arc<dyn durable_streams_storage::Engine>>,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        producer_reorder_wait: reorder_wait,
        ..ServerConfig::default()
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = Server::builder().config(config);
    if let Some(engine) = engine {
        builder = builder.engine(engine);
    }
    tokio::spawn(builder.build().run(listener, async {
        let _ = rx.await;
    }));
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

/// The stream's whole body, read from the start.
async fn read_all(c: &reqwest::Client, url: &str) -> String {
    c.get(format!("{url}?offset=-1"))
        .send()
        .await
        .unwrap()
        .text()
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
    let body = read_all(&c, &url).await;
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

/// Requests 2, 1, 0 arriving in that order while the disk holds every
/// commit for longer than the reorder wait are all accepted once it lets
/// go: each waits for its predecessor's acceptance, not for its commit.
/// (Waiting for commits, request 2 timed out while request 1 still waited,
/// and a correct pipelining client got a 409.)
#[tokio::test]
async fn reordered_chain_is_accepted_while_commits_stall() {
    use durable_streams_storage::file::sim::SimVfs;
    use durable_streams_storage::{FileEngine, FileOptions, SystemClock};
    use std::sync::Arc;
    let vfs = Arc::new(SimVfs::new());
    let engine = FileEngine::open_with(
        "/db",
        FileOptions::default(),
        vfs.clone(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let (base, _stop) = start_with(Duration::from_millis(200), Some(Arc::new(engine))).await;
    let c = reqwest::Client::new();
    let url = format!("{base}/stall");
    let created = c
        .put(&url)
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    vfs.hold_syncs(true);
    let mut sent = Vec::new();
    for seq in [2, 1, 0] {
        sent.push(tokio::spawn({
            let (c, url) = (c.clone(), url.clone());
            async move { post(&c, &url, seq).await.status() }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past every request's reorder wait, the disk still held.
    tokio::time::sleep(Duration::from_millis(400)).await;
    vfs.hold_syncs(false);
    for (seq, r) in [2, 1, 0].into_iter().zip(sent) {
        assert_eq!(r.await.unwrap(), 200, "seq {seq}");
    }
    let body = read_all(&c, &url).await;
    assert_eq!(body, "m0;m1;m2;");
}
