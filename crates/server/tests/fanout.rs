//! Live SSE fan-out against the real binary: many readers of one stream share
//! the server's read and encoding of each append (see `sse_cache.rs`), so
//! these tests check that every reader still gets exactly the right bytes,
//! correctly framed, for text, JSON and binary (base64) streams, on both
//! engines, including a reader that joins at an older offset and readers of
//! a stream deleted and re-created under the same path.

#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;
use tokio::sync::mpsc;

mod support;

/// A running server; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: Option<TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Server {
    /// `dev` on the memory engine, or on the file engine in a fresh directory.
    fn start(file_engine: bool) -> Server {
        let dir = file_engine.then(|| {
            let p = std::env::temp_dir().join(format!(
                "ds-fanout-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        });
        let mut args = vec!["dev".to_owned(), "--port".into(), "0".into()];
        if let Some(d) = &dir {
            args.push("--data-dir".into());
            args.push(d.0.to_string_lossy().into_owned());
        }
        let sp = support::spawn(&args);
        let mut server = Server {
            child: sp.child,
            addr: ([0, 0, 0, 0], 0).into(),
            _dir: dir,
        };
        server.addr = sp
            .addr
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("no listening line: {}", sp.log.lock().unwrap()));
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/v1/stream/{}", self.addr, path)
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// One SSE event: its type, its data (lines joined with LF, as a browser
/// would), and its exact bytes on the wire.
#[derive(Debug, Clone)]
struct Event {
    kind: String,
    data: String,
    raw: Vec<u8>,
}

/// Splits complete events (terminated by a blank line) off the front of `buf`.
fn parse_events(buf: &mut Vec<u8>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
        let raw: Vec<u8> = buf.drain(..end + 2).collect();
        let text = String::from_utf8(raw.clone()).expect("SSE is UTF-8");
        assert!(!text.contains('\r'), "the server frames with LF only");
        let mut kind = String::from("message");
        let mut data = Vec::new();
        for line in text.trim_end_matches('\n').split('\n') {
            if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim_start().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
            } else {
                panic!("unexpected SSE line {line:?}");
            }
        }
        out.push(Event {
            kind,
            data: data.join("\n"),
            raw,
        });
    }
    out
}

/// An SSE reader running in its own task; its events arrive on a channel
/// that closes when the server ends the response.
struct Reader {
    events: mpsc::UnboundedReceiver<Event>,
}

impl Reader {
    async fn open(c: &reqwest::Client, url: &str, offset: &str) -> Reader {
        let mut resp = c
            .get(format!("{url}?offset={offset}&live=sse"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "SSE open at {offset}");
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.extend_from_slice(&chunk);
                for ev in parse_events(&mut buf) {
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            }
        });
        Reader { events }
    }

    async fn next(&mut self) -> Option<Event> {
        tokio::time::timeout(Duration::from_secs(20), self.events.recv())
            .await
            .expect("no SSE event within 20 s")
    }

    /// The next control event's fields.
    async fn control(&mut self) -> serde_json::Value {
        let ev = self
            .next()
            .await
            .expect("stream ended before a control event");
        assert_eq!(ev.kind, "control", "expected a control event: {ev:?}");
        serde_json::from_str(&ev.data).unwrap()
    }

    /// The next data event and the `streamNextOffset` of the control event
    /// that follows it.
    async fn data(&mut self) -> (Event, String) {
        let ev = self.next().await.expect("stream ended before a data event");
        assert_eq!(ev.kind, "data", "expected a data event: {ev:?}");
        let ctl = self.control().await;
        (ev, ctl["streamNextOffset"].as_str().unwrap().to_owned())
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Json,
    Binary,
}

impl Kind {
    fn content_type(self) -> &'static str {
        match self {
            Kind::Text => "text/plain",
            Kind::Json => "application/json",
            Kind::Binary => "application/octet-stream",
        }
    }

    /// The body of append `i`; the same length for the same `i` whatever
    /// `salt` is (so a re-created stream's offsets coincide with the old
    /// one's). Append 3 is large, over the size the server copies into
    /// one frame with its control event.
    fn body(self, i: usize, salt: u8) -> Vec<u8> {
        let n = if i == 3 { 20_000 } else { 10 + i * 7 };
        match self {
            Kind::Text => {
                let c = (b'a' + salt) as char;
                let mut s: String = std::iter::repeat_n(c, n).collect();
                // Several lines, one starting with a space.
                s.replace_range(3..4, "\n");
                s.replace_range(5..6, "\n");
                s.replace_range(6..7, " ");
                s.into_bytes()
            }
            Kind::Json => {
                let v: String = std::iter::repeat_n((b'a' + salt) as char, n).collect();
                format!(r#"[{{"i":{i},"v":"{v}"}},{{"i":{i},"n":{salt}}}]"#).into_bytes()
            }
            Kind::Binary => (0..n).map(|j| (j as u8).wrapping_mul(31) ^ salt).collect(),
        }
    }

    /// What a reader decodes from one data event.
    fn decode(self, ev: &Event) -> Vec<u8> {
        match self {
            Kind::Text => ev.data.as_bytes().to_vec(),
            Kind::Json => {
                let v: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
                assert!(v.is_array(), "JSON data is framed as an array");
                serde_json::to_vec(&v).unwrap()
            }
            Kind::Binary => base64::engine::general_purpose::STANDARD
                .decode(&ev.data)
                .unwrap(),
        }
    }

    /// The decoded form of `bodies` appended in order.
    fn expected(self, bodies: &[Vec<u8>]) -> Vec<u8> {
        match self {
            Kind::Text | Kind::Binary => bodies.concat(),
            Kind::Json => {
                let mut all = Vec::new();
                for b in bodies {
                    let v: serde_json::Value = serde_json::from_slice(b).unwrap();
                    all.extend(v.as_array().unwrap().iter().cloned());
                }
                serde_json::to_vec(&serde_json::Value::Array(all)).unwrap()
            }
        }
    }
}

async fn append(c: &reqwest::Client, url: &str, kind: Kind, body: Vec<u8>) -> String {
    let r = c
        .post(url)
        .header("content-type", kind.content_type())
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "append: {}", r.status());
    r.headers()["stream-next-offset"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn create(c: &reqwest::Client, url: &str, kind: Kind) {
    let r = c
        .put(url)
        .header("content-type", kind.content_type())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "create {url}");
}

/// Waits for the initial up-to-date control event of readers opened on an
/// empty stream (after it the server is subscribed for them).
async fn await_ready(readers: &mut [Reader]) {
    for r in readers {
        let ctl = r.control().await;
        assert_eq!(ctl["upToDate"], true);
    }
}

const READERS: usize = 12;
const APPENDS: usize = 5;

/// Runs the fan-out scenario for one kind of stream on one server.
async fn scenario(server: &Server, kind: Kind) {
    let c = reqwest::Client::new();
    let url = server.url(&format!("fan-{kind:?}"));
    create(&c, &url, kind).await;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        readers.push(Reader::open(&c, &url, "-1").await);
    }
    await_ready(&mut readers).await;

    let mut bodies = Vec::new();
    let mut offsets: Vec<String> = Vec::new();
    let mut joiner: Option<Reader> = None;
    for i in 0..APPENDS {
        if i == 2 {
            // Joins at the offset after append 0, behind the tail: its
            // first event catches up on append 1; from then on it waits at
            // the same offset as the others.
            joiner = Some(Reader::open(&c, &url, &offsets[0]).await);
            let (ev, next) = joiner.as_mut().unwrap().data().await;
            assert_eq!(next, offsets[1]);
            assert_eq!(kind.decode(&ev), kind.expected(&bodies[1..2]));
        }
        let body = kind.body(i, 0);
        bodies.push(body.clone());
        let next = append(&c, &url, kind, body).await;
        offsets.push(next.clone());
        let mut first_raw: Option<Vec<u8>> = None;
        for r in readers.iter_mut().chain(joiner.iter_mut()) {
            let (ev, at) = r.data().await;
            assert_eq!(at, next, "append {i}: control event offset");
            assert_eq!(
                kind.decode(&ev),
                kind.expected(&bodies[i..=i]),
                "append {i}: payload"
            );
            match &first_raw {
                None => first_raw = Some(ev.raw),
                Some(raw) => assert_eq!(&ev.raw, raw, "append {i}: readers got different bytes"),
            }
        }
    }

    // Deletion ends every reader.
    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 204);
    for r in readers.iter_mut().chain(joiner.iter_mut()) {
        while let Some(ev) = r.next().await {
            assert_ne!(ev.kind, "data", "data after deletion: {ev:?}");
        }
    }

    // The same path again, with appends of the same sizes (so the offsets
    // coincide with the deleted stream's) but different bytes.
    create(&c, &url, kind).await;
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(Reader::open(&c, &url, "-1").await);
    }
    await_ready(&mut readers).await;
    for i in 0..2 {
        let body = kind.body(i, 1);
        assert_ne!(body, bodies[i]);
        assert_eq!(body.len(), bodies[i].len());
        let next = append(&c, &url, kind, body.clone()).await;
        assert_eq!(next, offsets[i], "the re-created stream reuses offsets");
        for r in &mut readers {
            let (ev, at) = r.data().await;
            assert_eq!(at, next);
            assert_eq!(
                kind.decode(&ev),
                kind.expected(std::slice::from_ref(&body)),
                "re-created stream, append {i}: stale or wrong payload"
            );
        }
    }
}

/// On the memory engine, every reader of a text, JSON or binary stream gets
/// byte-identical, correctly framed events through several appends, a late
/// reader at an older offset catches up and then gets the same bytes, and a
/// re-created stream never shows its predecessor's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_memory_engine() {
    let server = Server::start(false);
    for kind in [Kind::Text, Kind::Json, Kind::Binary] {
        scenario(&server, kind).await;
    }
}

/// The same on the durable file engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_file_engine() {
    let server = Server::start(true);
    for kind in [Kind::Text, Kind::Json, Kind::Binary] {
        scenario(&server, kind).await;
    }
}
