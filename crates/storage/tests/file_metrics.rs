//! The file engine's metrics surface: disk usage kept by the engine matches
//! what is really on the (simulated) disk, and the commit histograms agree
//! with the commit counters.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use durable_streams_storage::file::sim::SimVfs;
use durable_streams_storage::*;
use std::sync::Arc;

const CT: &str = "text/plain";

/// Held bytes are written to data files only by checkpoints here, so what
/// is on disk never changes between two looks.
fn open(vfs: Arc<SimVfs>) -> FileEngine {
    FileEngine::open_with(
        "/db",
        FileOptions {
            max_open_files: 4,
            data_flush_interval: std::time::Duration::from_secs(3600),
            data_flush_stream_bytes: u64::MAX,
            max_unflushed_bytes: u64::MAX,
            ..FileOptions::default()
        },
        vfs,
        Arc::new(SystemClock),
    )
    .expect("recovery")
}

fn create_req() -> CreateRequest {
    CreateRequest {
        content_type: Some(CT.into()),
        ..Default::default()
    }
}

fn append_req(len: usize) -> AppendRequest {
    AppendRequest {
        content_type: Some(CT.into()),
        records: vec![Bytes::from(vec![b'x'; len])],
        ..Default::default()
    }
}

fn metric(e: &FileEngine, name: &str) -> u64 {
    e.metrics()
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, v)| *v)
        .unwrap_or_else(|| panic!("{name} missing"))
}

fn histogram(e: &FileEngine, name: &str) -> HistogramSnapshot {
    e.histograms()
        .into_iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// `ds_disk_bytes` equals the bytes of every file on disk after creates,
/// appends, a fork, checkpoints, deletes (soft and cascading) and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_bytes_match_the_files_on_disk() {
    let vfs = Arc::new(SimVfs::new());
    let e = open(vfs.clone());
    assert_eq!(metric(&e, "ds_disk_bytes"), vfs.used_bytes(), "fresh");
    for p in ["a", "b"] {
        e.create(p, create_req()).await.unwrap();
        for i in 0..20 {
            e.append(p, append_req(1000 + i)).await.unwrap();
        }
    }
    e.create(
        "c",
        CreateRequest {
            content_type: None,
            fork: Some(ForkSpec {
                source: "a".into(),
                offset: None,
                sub_offset: 0,
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    e.append("c", append_req(5000)).await.unwrap();
    assert_eq!(metric(&e, "ds_disk_bytes"), vfs.used_bytes(), "written");

    assert_eq!(
        metric(&e, "ds_unflushed_bytes"),
        2 * 20 * 1000 + 2 * 190 + 5000
    );
    // A checkpoint writes the held bytes to the data files.
    e.checkpoint().await.unwrap();
    assert_eq!(metric(&e, "ds_unflushed_bytes"), 0);
    assert_eq!(metric(&e, "ds_disk_bytes"), vfs.used_bytes(), "flushed");
    // The first record after a checkpoint grows the fresh WAL segment by a
    // preallocation step; the Delete record then fits in its zeros, so the
    // freed data file shows at once.
    e.append("a", append_req(10)).await.unwrap();
    let before = metric(&e, "ds_disk_bytes");
    e.delete("b").await.unwrap();
    let after = metric(&e, "ds_disk_bytes");
    assert_eq!(after, vfs.used_bytes(), "b deleted");
    assert!(
        after < before,
        "deleting b frees space: {before} -> {after}"
    );
    e.checkpoint().await.unwrap();
    assert_eq!(
        metric(&e, "ds_disk_bytes"),
        vfs.used_bytes(),
        "checkpointed"
    );

    // `a` is only soft-deleted while its fork exists; deleting the fork
    // removes both data files.
    e.delete("a").await.unwrap();
    assert_eq!(metric(&e, "ds_disk_bytes"), vfs.used_bytes(), "a soft");
    e.delete("c").await.unwrap();
    assert_eq!(metric(&e, "ds_disk_bytes"), vfs.used_bytes(), "cascade");
    e.create("d", create_req()).await.unwrap();
    e.append("d", append_req(777)).await.unwrap();
    e.shutdown().await;

    let e = open(vfs.clone());
    assert_eq!(metric(&e, "ds_disk_bytes"), vfs.used_bytes(), "reopened");
    e.shutdown().await;
}

/// Every WAL sync is one fsync observation and one batch observation; the
/// batches' record counts add up to the records committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_histograms_agree_with_counters() {
    let vfs = Arc::new(SimVfs::new());
    let e = open(vfs.clone());
    e.create("s", create_req()).await.unwrap();
    let appends: Vec<_> = (0..32)
        .map(|_| {
            let e = e.clone();
            tokio::spawn(async move { e.append("s", append_req(100)).await.unwrap() })
        })
        .collect();
    for a in appends {
        a.await.unwrap();
    }
    let syncs = metric(&e, "ds_wal_syncs_total");
    let records = metric(&e, "ds_wal_records_total");
    assert!(
        syncs >= 1 && records >= 33,
        "{syncs} syncs, {records} records"
    );
    let fsync = histogram(&e, "ds_wal_fsync_duration_seconds");
    let batch = histogram(&e, "ds_wal_batch_records");
    let bytes = histogram(&e, "ds_wal_batch_bytes");
    assert_eq!(fsync.count, syncs);
    assert_eq!(batch.count, syncs);
    assert_eq!(bytes.count, syncs);
    assert_eq!(batch.sum as u64, records);
    assert!(bytes.sum as u64 >= 33 * 100, "{} WAL bytes", bytes.sum);
    for h in [&fsync, &batch, &bytes] {
        assert!(
            h.buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{} buckets ascending and cumulative: {:?}",
            h.name,
            h.buckets
        );
        assert!(h.buckets.last().is_some_and(|b| b.1 <= h.count));
    }
    e.shutdown().await;
}
