//! The file engine signals live readers before an append returns, whether
//! it was opened inside a runtime (signals sent by a task there) or outside
//! one (sent by the committer thread).

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use durable_streams_storage::file::sim::SimVfs;
use durable_streams_storage::*;
use std::sync::Arc;

fn open() -> FileEngine {
    FileEngine::open_with(
        "/db",
        FileOptions::default(),
        Arc::new(SimVfs::new()),
        Arc::new(SystemClock),
    )
    .unwrap()
}

async fn check(e: &FileEngine) {
    e.create(
        "s",
        CreateRequest {
            content_type: Some("text/plain".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut rx = e.watch("s").await.unwrap();
    for i in 1..=20u64 {
        e.append(
            "s",
            AppendRequest {
                content_type: Some("text/plain".into()),
                records: vec![Bytes::from_static(b"x")],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // No await between the append returning and this check.
        assert!(rx.has_changed().unwrap(), "append {i} returned unsignalled");
        assert_eq!(rx.borrow_and_update().tail.0, i);
    }
    e.delete("s").await.unwrap();
    assert!(rx.borrow_and_update().gone, "delete returned unsignalled");
}

/// Opened inside the runtime: every append and the delete have published
/// the new tail (or `gone`) by the time they return.
#[tokio::test]
async fn signalled_before_append_returns_in_runtime() {
    let e = open();
    check(&e).await;
    e.shutdown().await;
}

/// Opened outside any runtime: the same holds.
#[test]
fn signalled_before_append_returns_outside_runtime() {
    let e = open();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        check(&e).await;
        e.shutdown().await;
    });
}

/// An accepted append shows on `watch_accepted` while its commit still
/// waits for the disk; live readers (`watch`) see it only once durable.
#[tokio::test]
async fn accepted_feed_runs_ahead_of_the_commit() {
    let vfs = Arc::new(SimVfs::new());
    let e = Arc::new(
        FileEngine::open_with(
            "/db",
            FileOptions::default(),
            vfs.clone(),
            Arc::new(SystemClock),
        )
        .unwrap(),
    );
    e.create(
        "s",
        CreateRequest {
            content_type: Some("text/plain".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut durable = e.watch("s").await.unwrap();
    let mut accepted = e.watch_accepted("s").await.unwrap();
    vfs.hold_syncs(true);
    let append = tokio::spawn({
        let e = e.clone();
        async move {
            e.append(
                "s",
                AppendRequest {
                    content_type: Some("text/plain".into()),
                    records: vec![Bytes::from_static(b"abc")],
                    ..Default::default()
                },
            )
            .await
        }
    });
    // A liveness bound, not a speed check: without the feed this waits
    // for as long as the disk is held.
    tokio::time::timeout(std::time::Duration::from_secs(30), accepted.changed())
        .await
        .expect("acceptance not announced while the commit waits")
        .unwrap();
    assert_eq!(accepted.borrow_and_update().tail.0, 3);
    assert!(!durable.has_changed().unwrap(), "not durable yet");
    assert!(!append.is_finished());
    vfs.hold_syncs(false);
    append.await.unwrap().unwrap();
    assert!(durable.has_changed().unwrap());
    assert_eq!(durable.borrow_and_update().tail.0, 3);
    e.delete("s").await.unwrap();
    // Changed, or closed with the stream (waiters then wake as well).
    assert!(accepted.has_changed().unwrap_or(true));
    assert!(accepted.borrow_and_update().gone);
    e.shutdown().await;
}
