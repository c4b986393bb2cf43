//! JSON-mode reads cut at message boundaries for every chunk size, in both
//! engines, with and without the file engine's sparse boundary index (which
//! is empty after a restart): chunks are whole messages, in order, none lost;
//! `read_file` (bytes left in the data file) cuts them identically.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use durable_streams_protocol::json::{frame_messages, split_messages, stored_to_array};
use durable_streams_protocol::Offset;
use durable_streams_storage::file::sim::SimVfs;
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
        let body = format!("[{}]", batch.join(","));
        let ranges = split_messages(body.as_bytes(), false).unwrap();
        let (stored, lens) = frame_messages(body.as_bytes(), &ranges);
        let stored = Bytes::from(stored);
        let mut at = 0;
        let records = lens
            .iter()
            .map(|l| {
                let r = stored.slice(at..at + l);
                at += l;
                r
            })
            .collect();
        e.append(
            "j",
            AppendRequest {
                content_type: Some("application/json".into()),
                records,
                ..Default::default()
            },
        )
        .await
        .unwrap();
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
/// the cut, then its own. With `checks_alignment`, a read or fork from any
/// other byte offset is refused (the spec leaves made-up offsets undefined;
/// the file engine does not check them: it knows boundaries only sparsely).
async fn offsets_inside_an_append(e: &dyn Engine, checks_alignment: bool) {
    let msgs: Vec<String> = (0..12).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    fill(e, &msgs).await; // batches of 5: 0-4, 5-9, 10-11
    let whole = e.read("j", ReadFrom::Start, 1 << 20).await.unwrap();
    let stored = stored_bytes(&whole);
    // Message i starts after i stored messages (each framed with a comma).
    let mut starts = vec![0u64];
    for (i, b) in stored.iter().enumerate() {
        if *b == b',' {
            starts.push(i as u64 + 1);
        }
    }
    starts.pop(); // the end of the last message is the tail, not a start
    assert_eq!(starts.len(), msgs.len());
    let parse = |c: &ReadChunk| -> Vec<serde_json::Value> {
        serde_json::from_slice(&stored_to_array(&stored_bytes(c))).unwrap()
    };
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
        if !checks_alignment {
            continue;
        }
        // One byte into the message is not a boundary.
        let err = e.read("j", ReadFrom::At(Offset(at + 1)), 1 << 20).await;
        assert!(
            matches!(err, Err(StorageError::OffsetNotAligned)),
            "read one byte into message {i}: {err:?}"
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
    if !checks_alignment {
        return;
    }
    // A fork point one byte into a message is refused.
    let err = e
        .create(
            "bad",
            CreateRequest {
                content_type: Some("application/json".into()),
                json: true,
                fork: Some(ForkSpec {
                    source: "j".into(),
                    offset: Some(Offset(starts[6] + 1)),
                    sub_offset: 0,
                }),
                ..Default::default()
            },
        )
        .await;
    assert!(err.is_err(), "fork one byte into a message: {err:?}");
}

/// The memory engine.
#[tokio::test]
async fn memory_engine_offsets_inside_an_append() {
    offsets_inside_an_append(&MemoryEngine::new(), true).await;
}

/// The file engine.
#[test]
fn file_engine_offsets_inside_an_append() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let e = FileEngine::open_with(
        "/db",
        FileOptions::default(),
        Arc::new(SimVfs::new()),
        Arc::new(SystemClock),
    )
    .unwrap();
    rt.block_on(offsets_inside_an_append(&e, false));
    e.close();
}
