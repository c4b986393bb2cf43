//! JSON-mode reads cut at message boundaries for every chunk size, in both
//! engines, with and without the file engine's sparse boundary index (which
//! is empty after a restart): chunks are whole messages, in order, none lost;
//! `read_file` (bytes left in the data file) cuts them identically.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use durable_streams_protocol::json::{frame_messages, split_messages, stored_to_array};
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
            let stored: Vec<u8> = c.data.iter().flat_map(|d| d.iter().copied()).collect();
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
                None => f
                    .chunk
                    .data
                    .iter()
                    .flat_map(|d| d.iter().copied())
                    .collect(),
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
