//! Durability of the file engine over a simulated file system that forgets
//! everything unsynced at a power cut (and real-disk tests of the other
//! properties: group commit, open-file bound, 100,000 streams, disk space).

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use durable_streams_protocol::{parse::ProducerHeaders, Offset};
use durable_streams_storage::file::sim::{Faults, SimVfs};
use durable_streams_storage::*;
use std::collections::HashMap;
use std::sync::Arc;

const CT: &str = "text/plain";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn open(vfs: Arc<SimVfs>) -> FileEngine {
    FileEngine::open_with(
        "/db",
        FileOptions {
            max_open_files: 4,
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

fn append_req(body: String, producer: Option<(&str, u64)>, close: bool) -> AppendRequest {
    AppendRequest {
        content_type: Some(CT.into()),
        records: vec![Bytes::from(body)],
        close,
        producer: producer.map(|(id, seq)| ProducerHeaders {
            id: id.into(),
            epoch: 0,
            seq,
        }),
        stream_seq: None,
    }
}

async fn read_all(e: &dyn Engine, path: &str) -> Result<(String, bool), StorageError> {
    let mut out = Vec::new();
    let mut from = ReadFrom::Start;
    loop {
        let c = e.read(path, from, 1 << 20).await?;
        for d in &c.data {
            out.extend_from_slice(d);
        }
        if c.up_to_date() {
            return Ok((String::from_utf8(out).expect("utf8"), c.meta.closed));
        }
        from = ReadFrom::At(c.next);
    }
}

/// Splits `p0:0003;p1:0000;` into records, failing on any torn fragment.
fn records(s: &str) -> Vec<String> {
    assert!(
        s.is_empty() || s.ends_with(';'),
        "torn bytes at the end: {s:?}"
    );
    s.split_terminator(';')
        .map(|r| {
            assert!(
                r.len() == 7 && r.as_bytes()[2] == b':',
                "malformed record {r:?} in {s:?}"
            );
            r.to_owned()
        })
        .collect()
}

/// What the workload saw acknowledged.
#[derive(Debug, Default)]
struct Acked {
    /// producer -> seqs acknowledged (each stream "prod-<i>").
    producers: HashMap<usize, Vec<u64>>,
    /// plain appends acknowledged / attempted on stream "plain".
    plain_acked: Vec<String>,
    plain_attempted: Vec<String>,
    closed_acked: bool,
}

const PRODUCERS: usize = 3;
const SEQS: u64 = 6;

/// Concurrent producers, plain appends and an append-and-close; every
/// outcome is recorded. Stops quietly once the store fails.
async fn workload(e: FileEngine) -> Acked {
    let mut acked = Acked::default();
    for p in ["plain", "final"]
        .into_iter()
        .map(String::from)
        .chain((0..PRODUCERS).map(|i| format!("prod-{i}")))
    {
        if e.create(&p, create_req()).await.is_err() {
            return acked;
        }
    }
    let mut tasks = Vec::new();
    for i in 0..PRODUCERS {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            for seq in 0..SEQS {
                let r = e
                    .append(
                        &format!("prod-{i}"),
                        append_req(
                            format!("p{i}:{seq:04};"),
                            Some((&format!("w{i}"), seq)),
                            false,
                        ),
                    )
                    .await;
                match r {
                    Ok(_) => ok.push(seq),
                    Err(_) => break,
                }
            }
            (i, ok)
        }));
    }
    let plain = {
        let e = e.clone();
        tokio::spawn(async move {
            let (mut acked, mut attempted) = (Vec::new(), Vec::new());
            for k in 0..SEQS {
                let body = format!("xx:{k:04};");
                attempted.push(body.clone());
                match e
                    .append("plain", append_req(body.clone(), None, false))
                    .await
                {
                    Ok(_) => acked.push(body),
                    Err(_) => break,
                }
            }
            (acked, attempted)
        })
    };
    let closed = e
        .append(
            "final",
            append_req("zz:0000;".into(), Some(("closer", 0)), true),
        )
        .await
        .is_ok();
    for t in tasks {
        let (i, ok) = t.await.unwrap();
        acked.producers.insert(i, ok);
    }
    let (a, b) = plain.await.unwrap();
    acked.plain_acked = a;
    acked.plain_attempted = b;
    acked.closed_acked = closed;
    acked
}

/// Checks the invariants after recovery, then lets producers re-send what
/// was not acknowledged: a re-send is applied once (200) or recognised as a
/// duplicate (204), never refused.
async fn verify(e: &FileEngine, acked: &Acked) {
    for i in 0..PRODUCERS {
        let path = format!("prod-{i}");
        let got = match read_all(e, &path).await {
            Ok((s, _)) => records(&s),
            Err(StorageError::NotFound) => {
                assert!(acked.producers.get(&i).is_none_or(|v| v.is_empty()));
                continue;
            }
            Err(err) => panic!("{path}: {err:?}"),
        };
        // In order, no duplicates, and every acknowledged seq present.
        let seqs: Vec<u64> = got.iter().map(|r| r[3..].parse().unwrap()).collect();
        assert_eq!(
            seqs,
            (0..seqs.len() as u64).collect::<Vec<_>>(),
            "{path}: {got:?}"
        );
        for s in acked.producers.get(&i).into_iter().flatten() {
            assert!(seqs.contains(s), "{path}: acknowledged seq {s} lost");
        }
        // Re-send everything from the first unacknowledged seq.
        let first_unacked = acked.producers.get(&i).map(|v| v.len() as u64).unwrap_or(0);
        for seq in first_unacked..SEQS {
            let r = e
                .append(
                    &path,
                    append_req(
                        format!("p{i}:{seq:04};"),
                        Some((&format!("w{i}"), seq)),
                        false,
                    ),
                )
                .await;
            match r {
                Ok(AppendOutcome::Applied { .. }) => {
                    assert!(seq >= seqs.len() as u64, "{path}: seq {seq} applied twice")
                }
                Ok(AppendOutcome::Duplicate { .. }) => assert!(
                    seq < seqs.len() as u64,
                    "{path}: seq {seq} was not applied but called duplicate"
                ),
                other => panic!("{path}: re-send of seq {seq}: {other:?}"),
            }
        }
        let (s, _) = read_all(e, &path).await.unwrap();
        let all: Vec<String> = (0..SEQS).map(|q| format!("p{i}:{q:04}")).collect();
        assert_eq!(records(&s), all, "{path} after re-sends");
    }
    if let Ok((s, _)) = read_all(e, "plain").await {
        let got = records(&s);
        for a in &acked.plain_acked {
            assert_eq!(
                got.iter().filter(|r| format!("{r};") == *a).count(),
                1,
                "acknowledged plain append {a} not present exactly once"
            );
        }
        for r in &got {
            assert!(
                acked.plain_attempted.contains(&format!("{r};")),
                "plain record {r} never sent"
            );
            assert_eq!(got.iter().filter(|x| *x == r).count(), 1);
        }
    }
    if acked.closed_acked {
        let (s, closed) = read_all(e, "final").await.unwrap();
        assert_eq!(s, "zz:0000;");
        assert!(closed, "acknowledged close was lost");
        let again = e
            .append("final", append_req("zz:0001;".into(), None, false))
            .await;
        assert!(
            matches!(again, Err(StorageError::Closed { .. })),
            "closed stream accepted data: {again:?}"
        );
    }
}

/// Snapshot of every stream's content, to compare recoveries.
async fn snapshot(e: &FileEngine) -> Vec<(String, Result<(String, bool), StorageError>)> {
    let mut out = Vec::new();
    for p in ["plain", "final"]
        .into_iter()
        .map(String::from)
        .chain((0..PRODUCERS).map(|i| format!("prod-{i}")))
    {
        out.push((p.clone(), read_all(e, &p).await));
    }
    out
}

/// A power cut at every sync boundary in turn (the k-th sync fails and
/// everything unsynced is lost, optionally leaving a torn tail): after
/// recovery every acknowledged append is present exactly once and in order,
/// unacknowledged ones at most once, closed streams stay closed, producer
/// re-sends are applied exactly once, and recovering the same disk twice
/// gives the same state.
#[test]
fn power_cut_at_every_sync_boundary() {
    let rt = rt();
    // Count the syncs of one clean run.
    let probe = Arc::new(SimVfs::new());
    let e = open(probe.clone());
    let base = probe.syncs();
    rt.block_on(workload(e.clone()));
    let total = probe.syncs() - base;
    e.close();
    assert!(total > 5, "workload too small: {total} syncs");
    let mut cases = 0;
    for k in 1..=total + 2 {
        for torn in [false, true] {
            let vfs = Arc::new(SimVfs::new());
            let e = open(vfs.clone());
            vfs.set_faults(Faults {
                fail_sync_at: Some(vfs.syncs() + k),
                disk_bytes: None,
            });
            let acked = rt.block_on(workload(e.clone()));
            // Power cut: unsynced data is gone (or partly there: torn).
            let disk = vfs.crash(|ino, n| {
                if torn {
                    ((ino as usize * 7919) % (n + 1)).min(n)
                } else {
                    0
                }
            });
            e.close();
            let disk = Arc::new(disk);
            let twin = Arc::new(disk.crash(|_, _| 0));
            let e = open(disk.clone());
            let first = rt.block_on(snapshot(&e));
            // Recovering a copy of the same disk gives the same state.
            let e2 = open(twin);
            assert_eq!(
                format!("{:?}", rt.block_on(snapshot(&e2))),
                format!("{first:?}"),
                "k={k} torn={torn}: recoveries differ"
            );
            e2.close();
            rt.block_on(verify(&e, &acked));
            e.close();
            // And the store keeps working after a clean restart.
            let e = open(disk);
            rt.block_on(verify(&e, &acked));
            e.close();
            cases += 1;
        }
    }
    eprintln!("power-cut cases: {cases} (sync boundaries: {total})");
}

/// A failed fsync poisons the store: the failing append and every later
/// write are refused, reads keep working, and a restart recovers.
#[test]
fn failed_fsync_is_fail_stop() {
    let rt = rt();
    let vfs = Arc::new(SimVfs::new());
    let e = open(vfs.clone());
    rt.block_on(async {
        e.create("s", create_req()).await.unwrap();
        e.append("s", append_req("ok:0000;".into(), None, false))
            .await
            .unwrap();
        vfs.set_faults(Faults {
            fail_sync_at: Some(vfs.syncs() + 1),
            disk_bytes: None,
        });
        assert!(matches!(
            e.append("s", append_req("no:0001;".into(), None, false))
                .await,
            Err(StorageError::Io(_))
        ));
        vfs.set_faults(Faults::default());
        // Even with a healthy disk again, no retry in place: still refused.
        assert!(e
            .append("s", append_req("no:0002;".into(), None, false))
            .await
            .is_err());
        assert!(e.create("t", create_req()).await.is_err());
        assert_eq!(read_all(&e, "s").await.unwrap().0, "ok:0000;");
    });
    let disk = Arc::new(vfs.crash(|_, _| 0));
    e.close();
    let e = open(disk);
    rt.block_on(async {
        assert_eq!(read_all(&e, "s").await.unwrap().0, "ok:0000;");
        e.append("s", append_req("ok:0001;".into(), None, false))
            .await
            .unwrap();
    });
    e.close();
}

/// A full disk: appends are refused with StorageFull (507) once space runs
/// out (found by the WAL's preallocation, or by the write-behind of a data
/// file, which stops the store), every acknowledged append stays readable,
/// and after a restart with space exactly the acknowledged appends are
/// there: a refused append never reappears.
#[test]
fn full_disk_is_refused_cleanly() {
    let rt = rt();
    let vfs = Arc::new(SimVfs::new());
    let e = open(vfs.clone());
    let acked = rt.block_on(async {
        e.create("s", create_req()).await.unwrap();
        e.append("s", append_req("ok:0000;".into(), None, false))
            .await
            .unwrap();
        let mut acked = String::from("ok:0000;");
        vfs.set_faults(Faults {
            fail_sync_at: None,
            disk_bytes: Some(vfs.used_bytes() + 10),
        });
        let mut refused = None;
        for i in 1..=400 {
            let body = format!("ok:{i:04}{};", "x".repeat(100));
            match e.append("s", append_req(body.clone(), None, false)).await {
                Ok(_) => acked.push_str(&body),
                Err(err) => {
                    refused = Some(err);
                    break;
                }
            }
            // Lets the write-behind run (every 100 ms by default).
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(refused, Some(StorageError::StorageFull));
        assert_eq!(
            e.append("s", append_req("late;".into(), None, false))
                .await
                .err(),
            Some(StorageError::StorageFull),
            "the store refuses writes once the disk was found full"
        );
        assert_eq!(read_all(&e, "s").await.unwrap().0, acked);
        acked
    });
    let disk = Arc::new(vfs.crash(|_, _| 0));
    e.close();
    let e = open(disk);
    rt.block_on(async {
        assert_eq!(read_all(&e, "s").await.unwrap().0, acked);
    });
    e.close();
}

/// `ds_unflushed_bytes`: durable bytes not yet in their data files.
fn unflushed(e: &FileEngine) -> u64 {
    e.metrics()
        .into_iter()
        .find(|(n, _, _)| *n == "ds_unflushed_bytes")
        .map(|(_, _, v)| v)
        .expect("ds_unflushed_bytes")
}

/// Data files on the simulated disk.
fn data_files(vfs: &SimVfs) -> usize {
    vfs.files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "dat"))
        .count()
}

/// Write-behind: a stream's newest durable bytes are served from memory,
/// reads across the file/memory boundary are exact, `read_file` leaves only
/// flushed bytes in a file slice, a power cut before the flush loses
/// nothing, and a deleted stream's held bytes never reach the disk.
#[test]
fn held_bytes_are_served_from_memory_and_survive_a_power_cut() {
    let rt = rt();
    let vfs = Arc::new(SimVfs::new());
    let open_held = |vfs: Arc<SimVfs>| {
        FileEngine::open_with(
            "/db",
            FileOptions {
                data_flush_interval: std::time::Duration::from_secs(3600),
                data_flush_stream_bytes: 1000,
                max_unflushed_bytes: u64::MAX,
                ..FileOptions::default()
            },
            vfs,
            Arc::new(SystemClock),
        )
        .expect("recovery")
    };
    let e = open_held(vfs.clone());
    let content: String = (0..1300).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    rt.block_on(async {
        e.create("s", create_req()).await.unwrap();
        e.append("s", append_req(content[..600].into(), None, false))
            .await
            .unwrap();
        assert_eq!(unflushed(&e), 600);
        assert_eq!(data_files(&vfs), 0, "600 bytes are held, no file yet");
        assert_eq!(read_all(&e, "s").await.unwrap().0, content[..600]);
        let fr = e.read_file("s", ReadFrom::Start, 1 << 20).await.unwrap();
        assert!(
            fr.file.is_none(),
            "held bytes are copied, not sent from a file"
        );
        assert_eq!(fr.chunk.data.concat(), &content.as_bytes()[..600]);

        // 1200 held bytes pass the per-stream threshold: written out after
        // the batch (the append may return first).
        e.append("s", append_req(content[600..1200].into(), None, false))
            .await
            .unwrap();
        for _ in 0..1000 {
            if unflushed(&e) == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert_eq!(unflushed(&e), 0);
        assert_eq!(data_files(&vfs), 1);
        e.append("s", append_req(content[1200..].into(), None, false))
            .await
            .unwrap();
        assert_eq!(unflushed(&e), 100);
        // A read across the boundary: 1000..1200 from the file, the rest
        // from memory.
        let c = e.read("s", ReadFrom::At(Offset(1000)), 300).await.unwrap();
        assert_eq!(c.data.concat(), &content.as_bytes()[1000..1300]);
        assert_eq!(c.next, Offset(1300));
        let fr = e.read_file("s", ReadFrom::Start, 1200).await.unwrap();
        let slice = fr.file.expect("flushed bytes are left in the file");
        assert_eq!((slice.len(), fr.chunk.next), (1200, Offset(1200)));
        let fr = e.read_file("s", ReadFrom::Start, 1300).await.unwrap();
        assert!(fr.file.is_none(), "a range reaching held bytes is copied");
        assert_eq!(fr.chunk.data.concat(), content.as_bytes());

        // A stream deleted while it holds bytes never gets a data file.
        e.create("t", create_req()).await.unwrap();
        e.append("t", append_req("gone".into(), None, false))
            .await
            .unwrap();
        e.delete("t").await.unwrap();
        e.checkpoint().await.unwrap();
        assert_eq!(unflushed(&e), 0);
        assert_eq!(data_files(&vfs), 1, "only s has a data file");
        e.append("s", append_req("tail".into(), None, false))
            .await
            .unwrap();
    });
    // Power cut: the last append was never written to its data file.
    let disk = Arc::new(vfs.crash(|_, _| 0));
    e.close();
    let e = open_held(disk);
    rt.block_on(async {
        assert_eq!(read_all(&e, "s").await.unwrap().0, format!("{content}tail"));
        assert_eq!(read_all(&e, "t").await.err(), Some(StorageError::NotFound));
    });
    e.close();
}

/// More streams fall due for a flush at once than one committer cycle
/// writes (`MAX_TIMED_FLUSHES`): the rest are written in the following
/// cycles without any further traffic, and every byte reads back.
#[test]
fn a_backlog_of_due_flushes_drains_without_traffic() {
    let rt = rt();
    let vfs = Arc::new(SimVfs::new());
    let e = FileEngine::open_with(
        "/db",
        FileOptions {
            data_flush_interval: std::time::Duration::from_millis(200),
            ..FileOptions::default()
        },
        vfs.clone(),
        Arc::new(SystemClock),
    )
    .expect("open");
    rt.block_on(async {
        for i in 0..1000 {
            e.create(&format!("s{i}"), create_req()).await.unwrap();
        }
        // Concurrent appends: large batches, so all 1000 streams start
        // holding bytes within a few cycles and fall due together.
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let e = e.clone();
                tokio::spawn(async move {
                    e.append(&format!("s{i}"), append_req(format!("b{i};"), None, false))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(unflushed(&e) > 0);
        let mut waited = 0;
        while unflushed(&e) > 0 && waited < 30_000 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            waited += 10;
        }
        assert_eq!(unflushed(&e), 0, "held bytes left after {waited} ms");
        assert_eq!(data_files(&vfs), 1000);
        for i in [0, 499, 999] {
            assert_eq!(
                read_all(&e, &format!("s{i}")).await.unwrap().0,
                format!("b{i};")
            );
        }
    });
    e.close();
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ds-test-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Apparent size of the files under `d` (sum of lengths).
fn dir_bytes(d: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    n
}

/// Space actually allocated under `d` (blocks, directories included).
fn dir_allocated(d: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = std::fs::metadata(d).unwrap().blocks() * 512;
    for e in std::fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            dir_allocated(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    n
}

/// Concurrent appends to many streams share syncs (group commit): on a
/// real disk, 64 writers need far fewer WAL syncs than appends.
#[test]
fn concurrent_appends_share_syncs() {
    let rt = rt();
    let dir = temp_dir("group");
    let e = FileEngine::open(&dir, FileOptions::default()).unwrap();
    let appends = rt.block_on(async {
        for i in 0..64 {
            e.create(&format!("s{i}"), create_req()).await.unwrap();
        }
        let before = e
            .stats()
            .wal_syncs
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut tasks = Vec::new();
        for i in 0..64 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                for k in 0..20 {
                    e.append(
                        &format!("s{i}"),
                        append_req(format!("{k:07};"), None, false),
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let syncs = e
            .stats()
            .wal_syncs
            .load(std::sync::atomic::Ordering::Relaxed)
            - before;
        eprintln!(
            "group commit: 1280 appends, {syncs} WAL syncs ({:.1} appends per sync)",
            1280.0 / syncs as f64
        );
        assert!(
            syncs * 4 <= 1280,
            "{syncs} syncs for 1280 concurrent appends: no group commit"
        );
        1280
    });
    assert_eq!(appends, 1280);
    e.close();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With max_open_files = 8, thousands of streams are written and read
/// while the engine never holds more than 8 data files open.
#[test]
fn open_files_stay_bounded() {
    let rt = rt();
    let dir = temp_dir("fds");
    let e = FileEngine::open(
        &dir,
        FileOptions {
            max_open_files: 8,
            ..FileOptions::default()
        },
    )
    .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..16 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                for i in (t..3000).step_by(16) {
                    let p = format!("s{i}");
                    e.create(
                        &p,
                        CreateRequest {
                            records: vec![Bytes::from(format!("{i:07};"))],
                            ..create_req()
                        },
                    )
                    .await
                    .unwrap();
                    assert!(e.open_files() <= 8);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for i in 0..3000 {
            assert_eq!(
                read_all(&e, &format!("s{i}")).await.unwrap().0,
                format!("{i:07};")
            );
            assert!(e.open_files() <= 8, "{} files open", e.open_files());
        }
    });
    e.close();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 100,000 streams are created, survive a restart with their content, and
/// the disk cost per stream is reported.
#[test]
fn hundred_thousand_streams_survive_restart() {
    const N: usize = 100_000;
    let rt = rt();
    let dir = temp_dir("many");
    let e = FileEngine::open(&dir, FileOptions::default()).unwrap();
    let started = std::time::Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..256 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                for i in (t..N).step_by(256) {
                    e.create(
                        &format!("tenant/{}/s{i}", i % 100),
                        CreateRequest {
                            records: vec![Bytes::from(format!("{i:07};"))],
                            ..create_req()
                        },
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let created = started.elapsed();
    e.close();
    let bytes = dir_bytes(&dir);
    let allocated = dir_allocated(&dir);
    let started = std::time::Instant::now();
    let e = FileEngine::open(&dir, FileOptions::default()).unwrap();
    let recovery = started.elapsed();
    rt.block_on(async {
        for i in 0..N {
            let p = format!("tenant/{}/s{i}", i % 100);
            let m = e.head(&p).await.unwrap();
            assert_eq!(m.tail.0, 8, "{p}");
            if i % 997 == 0 {
                assert_eq!(read_all(&e, &p).await.unwrap().0, format!("{i:07};"));
            }
        }
    });
    eprintln!(
        "{N} streams: created in {:.1}s ({:.0}/s); on disk {} B apparent ({:.0} B/stream for 8 data bytes), {} B allocated ({:.0} B/stream); restart in {:.2}s",
        created.as_secs_f64(), N as f64 / created.as_secs_f64(), bytes, bytes as f64 / N as f64, allocated, allocated as f64 / N as f64, recovery.as_secs_f64()
    );
    e.close();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Deleting a stream and letting one expire return their disk space (data
/// files removed, WAL truncated at the next checkpoint).
#[test]
fn delete_and_expiry_free_disk_space() {
    let rt = rt();
    let dir = temp_dir("space");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let e = FileEngine::open_with(
        &dir,
        FileOptions::default(),
        Arc::new(file::vfs::StdVfs::default()),
        clock.clone(),
    )
    .unwrap();
    rt.block_on(async {
        let empty = dir_bytes(&dir);
        let mb = Bytes::from(vec![b'x'; 1 << 20]);
        e.create(
            "del",
            CreateRequest {
                records: vec![mb.clone()],
                ..create_req()
            },
        )
        .await
        .unwrap();
        e.create(
            "ttl",
            CreateRequest {
                records: vec![mb],
                expiry: Expiry::TtlSecs(10),
                ..create_req()
            },
        )
        .await
        .unwrap();
        e.checkpoint().await.unwrap();
        let full = dir_bytes(&dir);
        assert!(full >= empty + 2 * (1 << 20), "{full}");
        e.delete("del").await.unwrap();
        clock.advance_ms(11_000);
        assert_eq!(e.sweep_expired().await, 1);
        assert_eq!(e.head("ttl").await.err(), Some(StorageError::NotFound));
        e.checkpoint().await.unwrap();
        let after = dir_bytes(&dir);
        eprintln!(
            "disk: empty {empty} B, with 2 MiB of streams {full} B, after delete+expiry {after} B"
        );
        assert!(
            after < empty + 64 * 1024,
            "space not returned: {after} bytes (empty store: {empty})"
        );
    });
    e.close();
    std::fs::remove_dir_all(&dir).unwrap();
}
