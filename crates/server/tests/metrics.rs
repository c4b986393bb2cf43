//! `/metrics` reports what happened: requests, appends, and the file
//! engine's WAL syncs (so benchmarks can show fsyncs per append).

use durable_streams_server::Server;
use std::sync::Arc;

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
}

/// Appends are counted, and every acknowledged append on the file engine is
/// covered by a WAL sync (syncs > 0 and never more records than syncs allow).
#[tokio::test]
async fn metrics_count_appends_and_syncs() {
    let dir = std::env::temp_dir().join(format!("ds-metrics-{}", std::process::id()));
    let engine = durable_streams_storage::FileEngine::open(&dir, Default::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Server::builder().engine(Arc::new(engine)).build().run(
        listener,
        async {
            let _ = rx.await;
        },
    ));
    let c = reqwest::Client::new();
    let url = format!("http://{addr}/v1/stream/m");
    assert_eq!(
        c.put(&url)
            .header("content-type", "text/plain")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    for _ in 0..5 {
        assert_eq!(
            c.post(&url)
                .header("content-type", "text/plain")
                .body("abcd")
                .send()
                .await
                .unwrap()
                .status(),
            204
        );
    }
    let text = c
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&text, "ds_appends_total"), 5);
    assert_eq!(metric(&text, "ds_append_bytes_total"), 20);
    assert_eq!(metric(&text, "ds_wal_records_total"), 6);
    let syncs = metric(&text, "ds_wal_syncs_total");
    assert!(
        (1..=6).contains(&syncs),
        "{syncs} syncs for 6 sequential records"
    );
    assert!(text.contains("ds_http_requests_total{method=\"POST\",status=\"2xx\"} 5"));
    let ready = c.get(format!("http://{addr}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
