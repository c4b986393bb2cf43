//! JSON-mode reads cut at message boundaries for every chunk size, in both
//! engines, with and without the file engine's sparse boundary index (which
//! is empty after a restart): chunks are whole messages, in order, none lost;
//! `read_file` (bytes left in the data file) cuts them identically.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use durable_streams_protocol::json::{frame_messages, split_messages, stored_to_array};
use durable_streams_protocol::Offset;
use durable_streams_storage::file::sim::{Faults, SimVfs};
use durable_streams_storage::file::vfs::Vfs;
use durable_streams_storage::*;
use std::sync::Arc;

fn messages() -> Vec<String> {
    // Varied sizes, including messages far larger than small read budgets,
    // and separators inside strings and nested arrays.
    (0..400)
        .map(|i| match i % 7 {
            0 => format!(r#"{{"i":{i},"s":"a,b]}},\"c"}}"#),
            1 => format!("[{i},[1,2],{{\"x\":[3]}}]"),
            2 => format!(r#"{{"i":{i},"big":"{}"}}"#, "x".repeat(20_000 + i)),
            3 => format!("{i}"),
            4 => "null".into(),
            5 => format!(r#""str,{i}""#),
            _ => format!(r#"{{"i":{i},"pad":"{}"}}"#, "y".repeat(i * 3)),
        })
        .collect()
}

async fn fill(e: &dyn Engine, msgs: &[String]) {
    e.create(
        "j",
        CreateRequest {
            content_type: Some("application/json".into()),
            json: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for batch in msgs.chunks(5) {
        e.append("j", json_append(batch)).await.unwrap();
    }
}

/// An append of `batch` sent as one JSON array: its messages as the stored
/// records the server would make of it.
fn json_append(batch: &[String]) -> AppendRequest {
    let body = format!("[{}]", batch.join(","));
    let ranges = split_messages(body.as_bytes(), false).unwrap();
    let (stored, lens) = frame_messages(body.as_bytes(), &ranges);
    let stored = Bytes::from(stored);
    let mut at = 0;
    let records = lens
        .iter()
        .map(|l| {
            at += l;
            stored.slice(at - l..at)
        })
        .collect();
    AppendRequest {
        content_type: Some("application/json".into()),
        records,
        ..Default::default()
    }
}

/// A chunk's stored bytes (`message,` records), joined.
fn stored_bytes(c: &ReadChunk) -> Vec<u8> {
    c.data.iter().flat_map(|d| d.iter().copied()).collect()
}

async fn check(e: &dyn Engine, msgs: &[String]) {
    let want: Vec<serde_json::Value> = msgs
        .iter()
        .map(|m| serde_json::from_str(m).unwrap())
        .collect();
    for max in [1usize, 7, 100, 4096, 20_000, 65_536, 1 << 20] {
        let mut got = Vec::new();
        let mut from = ReadFrom::Start;
        loop {
            let c = e.read("j", from, max).await.unwrap();
            let stored = stored_bytes(&c);
            // The same read left in the file (file engine: a slice of the
            // data file) cuts at the same boundary with the same bytes.
            let f = e.read_file("j", from, max).await.unwrap();
            assert_eq!(f.chunk.next, c.next, "max {max}: read_file cut elsewhere");
            let in_file = match &f.file {
                Some(slice) => {
                    assert!(f.chunk.data.is_empty(), "file slice and data both set");
                    slice
                        .read_all()
                        .expect("file slice shorter than its length")
                }
                None => stored_bytes(&f.chunk),
            };
            assert_eq!(in_file, stored, "max {max}: read_file bytes differ");
            let arr: Vec<serde_json::Value> = serde_json::from_slice(&stored_to_array(&stored))
                .unwrap_or_else(|err| panic!("max {max}: chunk is not a JSON array: {err}"));
            assert!(
                !arr.is_empty() || c.up_to_date(),
                "max {max}: empty chunk before the tail"
            );
            got.extend(arr);
            if c.up_to_date() {
                break;
            }
            from = ReadFrom::At(c.next);
        }
        assert_eq!(got, want, "max {max}");
    }
}

/// The memory engine.
#[tokio::test]
async fn memory_engine_json_chunks() {
    let e = MemoryEngine::new();
    let msgs = messages();
    fill(&e, &msgs).await;
    check(&e, &msgs).await;
}

/// The file engine, with its boundary index, then after a restart without it.
#[test]
fn file_engine_json_chunks() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let vfs = Arc::new(SimVfs::new());
    let open = |v: Arc<SimVfs>| {
        FileEngine::open_with("/db", FileOptions::default(), v, Arc::new(SystemClock)).unwrap()
    };
    let msgs = messages();
    let e = open(vfs.clone());
    rt.block_on(async {
        fill(&e, &msgs).await;
        check(&e, &msgs).await;
    });
    e.close();
    let e = open(vfs);
    rt.block_on(check(&e, &msgs));
    e.close();
}

/// Offsets inside one append of many messages: every message start is a
/// valid read offset and fork point (with or without a message count past
/// it), and a fork cut inside the append reads the source's messages before
/// the cut, then its own. A read or fork from any other byte offset is
/// refused (the spec leaves made-up offsets undefined; returning the bytes
/// from there would answer with a broken JSON array). Returns the message
/// starts.
async fn offsets_inside_an_append(e: &dyn Engine) -> Vec<u64> {
    let msgs: Vec<String> = (0..12).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    fill(e, &msgs).await; // batches of 5: 0-4, 5-9, 10-11
    let starts = message_starts(e, "j").await;
    assert_eq!(starts.len(), msgs.len());
    for (i, &at) in starts.iter().enumerate() {
        let c = e
            .read("j", ReadFrom::At(Offset(at)), 1 << 20)
            .await
            .unwrap();
        let got = parse(&c);
        assert_eq!(got.len(), msgs.len() - i, "read from message {i}");
        assert_eq!(
            got[0],
            serde_json::json!({ "n": i }),
            "read from message {i}"
        );
    }
    // Forks cut at message 7 (inside the second append): by its offset, by
    // a message count past the second append's start, and by a count from
    // the stream's start.
    for (name, offset, sub_offset) in [("f1", starts[7], 0), ("f2", starts[5], 2), ("f3", 0, 7)] {
        let spec = ForkSpec {
            source: "j".into(),
            offset: Some(Offset(offset)),
            sub_offset,
        };
        e.create(
            name,
            CreateRequest {
                content_type: Some("application/json".into()),
                json: true,
                fork: Some(spec),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        e.append(
            name,
            AppendRequest {
                content_type: Some("application/json".into()),
                records: vec![Bytes::from_static(b"\"own\",")],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // A budget of one byte reads one message at a time.
        let mut got = Vec::new();
        let mut from = ReadFrom::Start;
        loop {
            let c = e.read(name, from, 1).await.unwrap();
            let part = parse(&c);
            assert!(part.len() <= 1, "{name}: a 1-byte budget read {part:?}");
            got.extend(part);
            if c.up_to_date() {
                break;
            }
            from = ReadFrom::At(c.next);
        }
        let mut want: Vec<serde_json::Value> =
            (0..7).map(|i| serde_json::json!({ "n": i })).collect();
        want.push(serde_json::json!("own"));
        assert_eq!(got, want, "{name}, a message per read");
        // One read across the cut.
        let c = e.read(name, ReadFrom::Start, 1 << 20).await.unwrap();
        assert_eq!(parse(&c), want, "{name}, one read");
    }
    check_alignment(e, "j", &starts).await;
    // The fork's inherited offsets are the source's boundaries.
    check_alignment(e, "f1", &starts[..8]).await;
    starts
}

fn parse(c: &ReadChunk) -> Vec<serde_json::Value> {
    serde_json::from_slice(&stored_to_array(&stored_bytes(c))).unwrap()
}

/// The offset at which each message of stream `path` starts.
async fn message_starts(e: &dyn Engine, path: &str) -> Vec<u64> {
    let whole = e.read(path, ReadFrom::Start, usize::MAX).await.unwrap();
    assert!(whole.up_to_date());
    let stored = stored_bytes(&whole);
    let mut starts = Vec::new();
    let mut at = 0;
    while at < stored.len() {
        starts.push(at as u64);
        let mut values =
            serde_json::Deserializer::from_slice(&stored[at..]).into_iter::<serde_json::Value>();
        values.next().unwrap().unwrap();
        at += values.byte_offset();
        assert_eq!(stored[at], b',', "stored messages end with a comma");
        at += 1;
    }
    starts
}

/// Reads and forks from every message start of `path` are accepted; from
/// one byte into a message, the middle of one, or its last byte, refused.
async fn check_alignment(e: &dyn Engine, path: &str, starts: &[u64]) {
    for (i, w) in starts.windows(2).enumerate() {
        let c = e.read(path, ReadFrom::At(Offset(w[0])), 1).await;
        assert!(c.is_ok(), "{path}: read from message {i}: {:?}", c.err());
        for at in [w[0] + 1, (w[0] + w[1]) / 2, w[1] - 1] {
            let err = e.read(path, ReadFrom::At(Offset(at)), 1 << 20).await;
            assert!(
                matches!(err, Err(StorageError::OffsetNotAligned)),
                "{path}: read from {at}, inside message {i}: {:?}",
                err.map(|c| c.next)
            );
        }
        let err = e
            .create(
                "bad",
                CreateRequest {
                    content_type: Some("application/json".into()),
                    json: true,
                    fork: Some(ForkSpec {
                        source: path.into(),
                        offset: Some(Offset(w[0] + 1)),
                        sub_offset: 0,
                    }),
                    ..Default::default()
                },
            )
            .await;
        assert!(
            matches!(err, Err(StorageError::OffsetNotAligned)),
            "{path}: fork one byte into message {i}: {:?}",
            err.map(|_| "created")
        );
    }
}

/// The memory engine.
#[tokio::test]
async fn memory_engine_offsets_inside_an_append() {
    offsets_inside_an_append(&MemoryEngine::new()).await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn open_sim(vfs: &Arc<SimVfs>) -> FileEngine {
    FileEngine::open_with(
        "/db",
        FileOptions::default(),
        vfs.clone(),
        Arc::new(SystemClock),
    )
    .unwrap()
}

/// The file engine, and again after a restart.
#[test]
fn file_engine_offsets_inside_an_append() {
    let rt = runtime();
    let vfs = Arc::new(SimVfs::new());
    let e = open_sim(&vfs);
    let starts = rt.block_on(offsets_inside_an_append(&e));
    e.close();
    let e = open_sim(&vfs);
    rt.block_on(async {
        check_alignment(&e, "j", &starts).await;
        check_alignment(&e, "f1", &starts[..8]).await;
    });
    e.close();
}

/// The tail of stream `j` in a closed engine's files.
async fn closed_tail(vfs: &Arc<SimVfs>) -> u64 {
    let e = open_sim(vfs);
    let tail = e.head("j").await.unwrap().tail.0;
    e.close();
    tail
}

/// The bytes of the one boundary index file (`.idx`) in `vfs`.
fn index_file(vfs: &SimVfs) -> Option<(std::path::PathBuf, Vec<u8>)> {
    let mut found = vfs
        .files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "idx"));
    let path = found.next()?;
    assert!(found.next().is_none(), "more than one index file");
    let f = vfs.open(&path, false).unwrap();
    let mut buf = vec![0u8; f.len().unwrap() as usize];
    assert_eq!(f.read_at(&mut buf, 0).unwrap(), buf.len());
    Some((path, buf))
}

/// A damage to a boundary index file: its name, the most start-up may scan
/// to repair it, and what it does to the simulated disk.
type Damage<'a> = (&'a str, u64, &'a dyn Fn(&SimVfs));

/// A large JSON stream's boundary index is written to disk, read back
/// after a restart, and repaired when damaged or missing (a torn tail, a
/// flipped bit, megabytes of garbage after it, a data directory from before
/// indexes existed): the file comes back byte for byte, and boundaries are
/// checked right each time.
#[test]
fn file_engine_boundary_index_survives_restart_and_damage() {
    let rt = runtime();
    let vfs = Arc::new(SimVfs::new());
    let msgs = messages();
    let e = open_sim(&vfs);
    rt.block_on(fill(&e, &msgs));
    let starts = rt.block_on(message_starts(&e, "j"));
    e.close();
    let (path, original) = index_file(&vfs).expect("no index file after a checkpoint");
    // ~1.3 MB of messages, a 20 KB one in every 7: an entry (12 bytes)
    // at the first boundary 16 KiB past the last entry.
    assert!(
        original.len() >= 12 * 50,
        "index of {} bytes",
        original.len()
    );
    assert_eq!(original.len() % 12, 0);
    let tail = rt.block_on(closed_tail(&vfs));
    // Each damage, and the most data start-up may scan to repair it: none
    // with the index intact (less than one spacing after its last entry),
    // from the damaged entry on, or everything without an index.
    let spacing = 16 * 1024;
    let damages: [Damage; 5] = [
        ("none", 0, &|_| {}),
        ("torn tail", 2 * spacing + 30_000, &|v| {
            let f = v.open(&path, false).unwrap();
            f.set_len(original.len() as u64 - 5).unwrap();
        }),
        ("flipped bit", tail / 2 + 2 * spacing + 30_000, &|v| {
            let f = v.open(&path, false).unwrap();
            let at = (original.len() / 24 * 12 + 3) as u64;
            f.write_all_at(&[original[at as usize] ^ 0x40], at).unwrap();
            f.write_all_at(&[0xAB; 7], original.len() as u64).unwrap();
        }),
        ("long garbage", 0, &|v| {
            let f = v.open(&path, false).unwrap();
            f.write_all_at(&[0xFF; 4096], original.len() as u64 + (8 << 20))
                .unwrap();
        }),
        ("missing", tail, &|v| v.remove_file(&path).unwrap()),
    ];
    for (name, most_scanned, damage) in damages {
        damage(&vfs);
        let e = open_sim(&vfs);
        let scanned = e
            .stats()
            .recovery_boundary_scan_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            scanned <= most_scanned,
            "{name}: start-up scanned {scanned} of {tail} bytes"
        );
        if name == "missing" {
            assert!(scanned > tail - spacing, "{name}: scanned {scanned}");
        }
        let (_, repaired) = index_file(&vfs).expect("index file gone");
        assert!(repaired == original, "{name}: index not restored");
        rt.block_on(async {
            check(&e, &msgs).await;
            check_alignment(&e, "j", &starts).await;
        });
        e.close();
    }
}

/// A power cut at every sync boundary of a JSON workload that checkpoints
/// often (so boundary index files are written, synced, torn and lost in
/// every state), with and without a torn tail: after recovery the stream
/// holds every acknowledged message, reads in small and large budgets
/// return whole messages in order, message starts are served and offsets
/// inside messages refused, and the repaired index survives a second
/// restart unchanged.
#[test]
fn power_cut_with_boundary_indexes() {
    let rt = runtime();
    let msgs: Vec<String> = (0..150)
        .map(|i| match i % 5 {
            0 => format!(r#"{{"i":{i},"big":"{}"}}"#, "z".repeat(6_000 + i * 10)),
            1 => format!(r#"{{"i":{i},"s":"a,b]}},\"c"}}"#),
            2 => format!("[{i},[1,2]]"),
            3 => format!(r#""s,{i}""#),
            _ => format!("{i}"),
        })
        .collect();
    let opts = FileOptions {
        checkpoint_wal_bytes: 48 * 1024,
        ..FileOptions::default()
    };
    let open = |v: &Arc<SimVfs>| {
        FileEngine::open_with("/db", opts.clone(), v.clone(), Arc::new(SystemClock)).unwrap()
    };
    // Appends of three messages until one fails; returns how many succeeded.
    let workload = |e: &FileEngine| {
        rt.block_on(async {
            let mut acked = 0;
            for batch in msgs.chunks(3) {
                let r = e.append("j", json_append(batch)).await;
                if r.is_err() {
                    break;
                }
                acked += batch.len();
            }
            acked
        })
    };
    let create = |e: &FileEngine| {
        rt.block_on(e.create(
            "j",
            CreateRequest {
                content_type: Some("application/json".into()),
                json: true,
                ..Default::default()
            },
        ))
        .unwrap();
    };
    // Count the syncs of one clean run.
    let probe = Arc::new(SimVfs::new());
    let e = open(&probe);
    create(&e);
    let base = probe.syncs();
    assert_eq!(workload(&e), msgs.len());
    let total = probe.syncs() - base;
    e.close();
    assert!(
        index_file(&probe).is_some_and(|(_, b)| b.len() >= 12 * 8),
        "the clean run wrote no index"
    );
    assert!(total > 60, "too few syncs: {total}");
    let want: Vec<serde_json::Value> = msgs
        .iter()
        .map(|m| serde_json::from_str(m).unwrap())
        .collect();
    for k in 1..=total + 1 {
        for torn in [false, true] {
            let vfs = Arc::new(SimVfs::new());
            let e = open(&vfs);
            create(&e);
            vfs.set_faults(Faults {
                fail_sync_at: Some(vfs.syncs() + k),
                disk_bytes: None,
            });
            let acked = workload(&e);
            let disk = Arc::new(vfs.crash(|ino, n| {
                if torn {
                    ((ino as usize * 7919) % (n + 1)).min(n)
                } else {
                    0
                }
            }));
            e.close();
            let e = open(&disk);
            let ctx = format!("k={k} torn={torn} acked={acked}");
            let (starts, index) = rt.block_on(async {
                let starts = message_starts(&e, "j").await;
                assert!(starts.len() >= acked, "{ctx}: {} messages", starts.len());
                // Whole messages in order, whatever the budget.
                for max in [100usize, 1 << 20] {
                    let mut got = Vec::new();
                    let mut from = ReadFrom::Start;
                    loop {
                        let c = e.read("j", from, max).await.unwrap();
                        got.extend(parse(&c));
                        if c.up_to_date() {
                            break;
                        }
                        from = ReadFrom::At(c.next);
                    }
                    assert_eq!(got[..], want[..got.len()], "{ctx}: max {max}");
                    assert_eq!(got.len(), starts.len(), "{ctx}: max {max}");
                }
                // Every 7th message: its start served, inside it refused.
                let sample: Vec<u64> = starts.iter().copied().step_by(7).collect();
                for &at in &sample {
                    assert!(
                        e.read("j", ReadFrom::At(Offset(at)), 1).await.is_ok(),
                        "{ctx}: start {at}"
                    );
                    let err = e.read("j", ReadFrom::At(Offset(at + 1)), 1).await;
                    assert!(
                        matches!(err, Err(StorageError::OffsetNotAligned)),
                        "{ctx}: read from {}: {:?}",
                        at + 1,
                        err.map(|c| c.next)
                    );
                }
                (starts, index_file(&disk))
            });
            e.close();
            // A clean restart keeps the repaired index as it is.
            let e = open(&disk);
            assert_eq!(
                index_file(&disk),
                index,
                "{ctx}: the index changed on a clean restart"
            );
            let scanned = e
                .stats()
                .recovery_boundary_scan_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            assert!(
                scanned <= 16 * 1024 + 7_500,
                "{ctx}: scanned {scanned} after a clean restart"
            );
            assert_eq!(rt.block_on(message_starts(&e, "j")), starts, "{ctx}");
            e.close();
        }
    }
}
