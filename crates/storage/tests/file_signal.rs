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
