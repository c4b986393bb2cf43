//! Process-crash durability test of the real `durable-streams-server` binary
//! with the durable file engine (`dev --data-dir DIR`).
//!
//! Each cycle runs a concurrent append workload against the server, kills the
//! process with SIGKILL at a random moment (5–150 ms into the workload, while
//! appends are in flight), restarts it on the same data directory, re-sends
//! every idempotent-producer request whose outcome is unknown, and checks the
//! whole state against a model of what the clients saw:
//!
//! * idempotent producers (one stream each, plus several sharing one stream):
//!   every acknowledged append is present exactly once and in seq order; a
//!   re-send answers 200 (not applied before the crash) or 204 (applied),
//!   never 403/409; a request that never reached the server (connect error)
//!   must answer 200;
//! * plain appends (no producer headers): acknowledged bodies exactly once,
//!   unacknowledged ones at most once, never one that was never sent, in order;
//! * append-and-close on a fresh stream: atomic (closed ⇔ final body present),
//!   an acknowledged close stays closed (HEAD `Stream-Closed: true`, POST 409
//!   with `Stream-Closed: true`), a producer's closing append stays a 204
//!   duplicate across restarts;
//! * every stream parses into whole fixed-width records (no torn bytes), and
//!   bytes read after one restart are a prefix of the bytes read after the
//!   next (immutability by position).
//!
//! `CRASH_CYCLES` (default 20) sets the number of kill/restart cycles and
//! `CRASH_SEED` the random seed (printed at the start). On failure the data
//! directory is kept and its path printed.

#![allow(clippy::unwrap_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;
use std::ffi::OsStr;
const PREFIX: &str = "/v1/stream/crash";
const CT: &str = "text/plain";

// ---------------------------------------------------------------------------
// Server process and data directory
// ---------------------------------------------------------------------------

/// A running server process on a data directory; SIGKILLed (and reaped) on drop.
struct ServerProc {
    child: Option<Child>,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl ServerProc {
    /// Starts `dev --port 0 --data-dir DIR` (the OS picks a free port) and
    /// learns the address from the listening log line.
    fn start(dir: &Path, checkpoint_interval: &str) -> ServerProc {
        let sp = support::spawn([
            OsStr::new("dev"),
            OsStr::new("--host"),
            OsStr::new("127.0.0.1"),
            OsStr::new("--port"),
            OsStr::new("0"),
            OsStr::new("--data-dir"),
            dir.as_os_str(),
            OsStr::new("--checkpoint-interval"),
            OsStr::new(checkpoint_interval),
        ]);
        let rx = sp.addr;
        let mut proc = ServerProc {
            child: Some(sp.child),
            addr: ([127, 0, 0, 1], 0).into(),
            log: sp.log,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => proc.addr = addr,
            Err(_) => panic!(
                "server did not log its listening address; stderr:\n{}",
                proc.log()
            ),
        }
        proc
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until `GET /healthz` answers 200.
    async fn wait_healthy(&mut self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", self.base())).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "server exited ({st}) before becoming healthy; stderr:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "server never answered /healthz 200; stderr:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A unique directory under the system temp dir: removed on drop after a
/// successful run, kept (and its path printed) when the test panics.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("ds-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "crash test failed: data directory kept at {}",
                self.0.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn new_client() -> reqwest::Client {
    // A fresh client per server incarnation: no pooled connection outlives a kill.
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Records: fixed width, self-describing, so torn or mixed bytes are visible
// ---------------------------------------------------------------------------

/// Length of every record: `K II:SSSSSS|` + filler + `;`.
const REC_LEN: usize = 64;
const HEAD_LEN: usize = 11; // "p03:000017|"

fn filler_byte(kind: u8, id: u8, seq: u32, i: usize) -> u8 {
    b'a' + ((kind as u32 + id as u32 * 7 + seq * 13 + i as u32) % 26) as u8
}

/// The body of record (kind, id, seq), e.g. `p03:000017|ghij...;`.
fn record(kind: u8, id: u8, seq: u32) -> Vec<u8> {
    let mut v = format!("{}{:02}:{:06}|", kind as char, id, seq).into_bytes();
    assert_eq!(v.len(), HEAD_LEN);
    for i in HEAD_LEN..REC_LEN - 1 {
        v.push(filler_byte(kind, id, seq, i));
    }
    v.push(b';');
    v
}

/// Splits stream bytes into records; any partial or malformed record is an error.
fn parse_records(bytes: &[u8]) -> Result<Vec<(u8, u8, u32)>, String> {
    if !bytes.chunks_exact(REC_LEN).remainder().is_empty() {
        return Err(format!(
            "stream length {} is not a multiple of the record length {REC_LEN}",
            bytes.len()
        ));
    }
    let mut out = Vec::with_capacity(bytes.len() / REC_LEN);
    for (n, r) in bytes.chunks(REC_LEN).enumerate() {
        let bad = || {
            format!(
                "malformed record #{n} at byte {}: {:?}",
                n * REC_LEN,
                String::from_utf8_lossy(r)
            )
        };
        let head = std::str::from_utf8(&r[..HEAD_LEN]).map_err(|_| bad())?;
        let kind = r[0];
        if !kind.is_ascii_lowercase() || &head[3..4] != ":" || &head[10..11] != "|" {
            return Err(bad());
        }
        let id: u8 = head[1..3].parse().map_err(|_| bad())?;
        let seq: u32 = head[4..10].parse().map_err(|_| bad())?;
        if r != record(kind, id, seq).as_slice() {
            return Err(bad());
        }
        out.push((kind, id, seq));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

/// What the client knows about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A 2xx response was received.
    Acked,
    /// The connection could not be established: the request was never sent.
    NotSent,
    /// Sent (or possibly sent) but no response: may or may not have been applied.
    Unknown,
}

fn classify(e: &reqwest::Error) -> Outcome {
    if e.is_connect() {
        Outcome::NotSent
    } else {
        Outcome::Unknown
    }
}

/// An idempotent producer (epoch 0) appending `record(kind, id, seq)` bodies.
#[derive(Debug, Clone)]
struct Producer {
    producer_id: String,
    kind: u8,
    id: u8,
    stream: String,
    /// Every seq below this was sent; all of them are acknowledged after the re-send phase.
    next_seq: u32,
    /// Requests of this cycle without a 2xx, in seq order.
    pending: Vec<(u32, Outcome)>,
    /// Statuses the live server should not have given.
    unexpected: Vec<String>,
    acked_this_cycle: u64,
}

/// A writer of plain appends (no producer headers); never retries.
#[derive(Debug, Clone)]
struct Plain {
    id: u8,
    stream: String,
    /// outcomes[seq] for every seq ever sent.
    outcomes: Vec<Outcome>,
    unexpected: Vec<String>,
}

/// State of an append-and-close stream once observed after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseState {
    Unverified,
    /// The create never took effect (404).
    Absent,
    /// Created, the (unacknowledged) close never took effect: open and empty.
    OpenEmpty,
    /// Closed with exactly its final record.
    Closed,
}

/// A fresh stream created and then closed with a final append in one cycle.
#[derive(Debug, Clone)]
struct Closer {
    stream: String,
    cycle: u32,
    /// Index within the cycle.
    k: u8,
    /// Closing append carries producer headers (`c<cycle>-<k>`, epoch 0, seq 0).
    producer: bool,
    create: Option<Outcome>,
    close: Option<Outcome>,
    state: CloseState,
    unexpected: Vec<String>,
}

impl Closer {
    fn rec(&self) -> Vec<u8> {
        record(
            if self.producer { b'q' } else { b'c' },
            self.k % 100,
            self.cycle,
        )
    }
    fn producer_id(&self) -> String {
        format!("c{}-{}", self.cycle, self.k)
    }
}

#[derive(Debug, Default)]
struct Stats {
    kills_in_flight: u64,
    unknown_requests: u64,
    not_sent_requests: u64,
    resent_dup_204: u64,
    resent_applied_200: u64,
    plain_unknown_present: u64,
    plain_unknown_absent: u64,
    closes_acked: u64,
    closes_unknown_applied: u64,
    closes_unknown_not_applied: u64,
    checkpoint_fast_incarnations: u64,
}

// ---------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------

fn hdr<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

fn closed_hdr(r: &reqwest::Response) -> bool {
    hdr(r, "stream-closed").is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

async fn producer_post(
    client: &reqwest::Client,
    url: &str,
    producer_id: &str,
    seq: u32,
    body: Vec<u8>,
    close: bool,
) -> reqwest::Result<reqwest::Response> {
    let mut rb = client
        .post(url)
        .header("content-type", CT)
        .header("producer-id", producer_id)
        .header("producer-epoch", "0")
        .header("producer-seq", seq.to_string())
        .body(body);
    if close {
        rb = rb.header("stream-closed", "true");
    }
    rb.send().await
}

/// Reads the whole stream: `?offset=-1`, then `Stream-Next-Offset` until
/// `Stream-Up-To-Date: true`. Returns the bytes and whether the EOF was closed.
async fn read_all(client: &reqwest::Client, url: &str) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut offset = "-1".to_owned();
    for _ in 0..100_000 {
        let r = client
            .get(url)
            .query(&[("offset", offset.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {url}?offset={offset}");
        let next = hdr(&r, "stream-next-offset")
            .expect("Stream-Next-Offset on a read")
            .to_owned();
        let up_to_date = hdr(&r, "stream-up-to-date").is_some_and(|v| v == "true");
        let closed = closed_hdr(&r);
        out.extend_from_slice(&r.bytes().await.unwrap());
        if up_to_date {
            return (out, closed);
        }
        assert_ne!(
            next, offset,
            "read of {url} made no progress at offset {offset}"
        );
        offset = next;
    }
    panic!("read of {url} never became up to date");
}

// ---------------------------------------------------------------------------
// Workload tasks (each runs until its first failure, i.e. the kill)
// ---------------------------------------------------------------------------

async fn run_producer(
    client: reqwest::Client,
    base: String,
    mut p: Producer,
    inflight: Arc<AtomicI64>,
) -> Producer {
    let url = format!("{base}{}", p.stream);
    loop {
        let seq = p.next_seq;
        inflight.fetch_add(1, Ordering::SeqCst);
        let r = producer_post(
            &client,
            &url,
            &p.producer_id,
            seq,
            record(p.kind, p.id, seq),
            false,
        )
        .await;
        inflight.fetch_sub(1, Ordering::SeqCst);
        p.next_seq += 1;
        match r {
            Ok(r)
                if r.status() == 200
                    && hdr(&r, "producer-seq") == Some(seq.to_string().as_str()) =>
            {
                p.acked_this_cycle += 1;
            }
            Ok(r) => {
                // The live server gave a wrong answer: record it and stop (the
                // request may have been applied, so it is re-sent like an unknown one).
                p.unexpected.push(format!(
                    "{} seq {seq}: status {} headers {:?}",
                    p.producer_id,
                    r.status(),
                    r.headers()
                ));
                p.pending.push((seq, Outcome::Unknown));
                return p;
            }
            Err(e) => {
                p.pending.push((seq, classify(&e)));
                return p;
            }
        }
    }
}

async fn run_plain(
    client: reqwest::Client,
    base: String,
    mut w: Plain,
    inflight: Arc<AtomicI64>,
) -> Plain {
    let url = format!("{base}{}", w.stream);
    loop {
        let seq = w.outcomes.len() as u32;
        inflight.fetch_add(1, Ordering::SeqCst);
        let r = client
            .post(&url)
            .header("content-type", CT)
            .body(record(b'a', w.id, seq))
            .send()
            .await;
        inflight.fetch_sub(1, Ordering::SeqCst);
        match r {
            Ok(r) if r.status() == 204 => w.outcomes.push(Outcome::Acked),
            Ok(r) => {
                w.unexpected
                    .push(format!("plain {} seq {seq}: status {}", w.id, r.status()));
                w.outcomes.push(Outcome::Unknown);
                return w;
            }
            Err(e) => {
                w.outcomes.push(classify(&e));
                return w;
            }
        }
    }
}

/// Creates fresh streams and closes each with a final append, one after the
/// other (with random pauses), until the kill; returns every stream touched.
async fn run_closers(
    client: reqwest::Client,
    base: String,
    cycle: u32,
    seed: u64,
    first_delay: Duration,
    inflight: Arc<AtomicI64>,
) -> Vec<Closer> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    tokio::time::sleep(first_delay).await;
    for k in 0..100u8 {
        let c = Closer {
            stream: format!("{PREFIX}/close-{cycle}-{k}"),
            cycle,
            k,
            producer: rng.gen_bool(0.5),
            create: None,
            close: None,
            state: CloseState::Unverified,
            unexpected: Vec::new(),
        };
        let c = run_closer(&client, &base, c, &inflight).await;
        let done = c.close != Some(Outcome::Acked);
        out.push(c);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
    }
    out
}

async fn run_closer(
    client: &reqwest::Client,
    base: &str,
    mut c: Closer,
    inflight: &AtomicI64,
) -> Closer {
    let url = format!("{base}{}", c.stream);
    match client.put(&url).header("content-type", CT).send().await {
        Ok(r) if r.status() == 201 => c.create = Some(Outcome::Acked),
        Ok(r) => {
            c.unexpected
                .push(format!("create {}: status {}", c.stream, r.status()));
            c.create = Some(Outcome::Unknown);
            return c;
        }
        Err(e) => {
            c.create = Some(classify(&e));
            return c;
        }
    }
    inflight.fetch_add(1, Ordering::SeqCst);
    let r = if c.producer {
        producer_post(client, &url, &c.producer_id(), 0, c.rec(), true).await
    } else {
        client
            .post(&url)
            .header("content-type", CT)
            .header("stream-closed", "true")
            .body(c.rec())
            .send()
            .await
    };
    inflight.fetch_sub(1, Ordering::SeqCst);
    let want = if c.producer { 200 } else { 204 };
    match r {
        Ok(r) if r.status() == want && closed_hdr(&r) => c.close = Some(Outcome::Acked),
        Ok(r) => {
            c.unexpected.push(format!(
                "append-and-close {}: status {} headers {:?}",
                c.stream,
                r.status(),
                r.headers()
            ));
            c.close = Some(Outcome::Unknown);
        }
        Err(e) => c.close = Some(classify(&e)),
    }
    c
}

// ---------------------------------------------------------------------------
// Verification after a restart
// ---------------------------------------------------------------------------

struct Checker {
    client: reqwest::Client,
    base: String,
    /// Bytes of each stream as last read (after the previous restart).
    last_bytes: HashMap<String, Vec<u8>>,
}

impl Checker {
    /// Reads a stream, checks the previous read is a prefix, parses it into records.
    async fn records(&mut self, stream: &str, ctx: &str) -> (Vec<(u8, u8, u32)>, bool) {
        let (bytes, closed) = read_all(&self.client, &format!("{}{stream}", self.base)).await;
        if let Some(prev) = self.last_bytes.get(stream) {
            assert!(
                bytes.starts_with(prev),
                "{ctx}: {stream} changed below its old tail: before {} bytes, now {} bytes",
                prev.len(),
                bytes.len()
            );
        }
        let recs = parse_records(&bytes).unwrap_or_else(|e| panic!("{ctx}: {stream}: {e}"));
        self.last_bytes.insert(stream.to_owned(), bytes);
        (recs, closed)
    }
}

/// Checks that the records of `p` in `recs` are exactly seq 0..next_seq, in order.
fn check_producer_records(p: &Producer, recs: &[(u8, u8, u32)], ctx: &str) {
    let mine: Vec<u32> = recs
        .iter()
        .filter(|r| r.0 == p.kind && r.1 == p.id)
        .map(|r| r.2)
        .collect();
    if mine.len() != p.next_seq as usize || mine.iter().enumerate().any(|(i, s)| *s != i as u32) {
        let first_bad = mine.iter().enumerate().find(|(i, s)| **s != *i as u32);
        panic!(
            "{ctx}: producer {} on {}: expected seqs 0..{} exactly once in order, found {} records (first mismatch: {:?}); tail: {:?}",
            p.producer_id,
            p.stream,
            p.next_seq,
            mine.len(),
            first_bad,
            &mine[mine.len().saturating_sub(5)..]
        );
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

/// SIGKILL during concurrent appends never loses or duplicates an acknowledged append, never tears a record, and keeps closed streams closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_appends_loses_nothing_acknowledged() {
    let cycles: u32 = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test: {cycles} cycles, CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = TempDir::new("crash");
    let started = Instant::now();
    let mut stats = Stats::default();

    // Idempotent producers: 4 with a stream each, 3 sharing one stream.
    let mut producers: Vec<Producer> = Vec::new();
    for i in 0..4u8 {
        producers.push(Producer {
            producer_id: format!("own-{i}"),
            kind: b'p',
            id: i,
            stream: format!("{PREFIX}/prod-{i}"),
            next_seq: 0,
            pending: Vec::new(),
            unexpected: Vec::new(),
            acked_this_cycle: 0,
        });
    }
    for i in 0..3u8 {
        producers.push(Producer {
            producer_id: format!("shared-{i}"),
            kind: b's',
            id: i,
            stream: format!("{PREFIX}/shared"),
            next_seq: 0,
            pending: Vec::new(),
            unexpected: Vec::new(),
            acked_this_cycle: 0,
        });
    }
    let mut plains: Vec<Plain> = (0..2u8)
        .map(|i| Plain {
            id: i,
            stream: format!("{PREFIX}/plain-{i}"),
            outcomes: Vec::new(),
            unexpected: Vec::new(),
        })
        .collect();
    let mut closers: Vec<Closer> = Vec::new();

    let mut server = ServerProc::start(&dir.0, "30s");
    let mut client = new_client();
    server.wait_healthy(&client).await;
    let mut streams: Vec<String> = producers.iter().map(|p| p.stream.clone()).collect();
    streams.extend(plains.iter().map(|w| w.stream.clone()));
    streams.dedup();
    for s in &streams {
        let r = client
            .put(format!("{}{s}", server.base()))
            .header("content-type", CT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "create {s}");
    }
    let mut checker = Checker {
        client: client.clone(),
        base: server.base(),
        last_bytes: HashMap::new(),
    };

    for cycle in 0..cycles {
        let ctx = format!("cycle {cycle} (CRASH_SEED={seed})");
        // --- workload, then SIGKILL at a random moment -----------------------
        let inflight = Arc::new(AtomicI64::new(0));
        let base = server.base();
        let kill_after = Duration::from_millis(rng.gen_range(5..=150));
        let ptasks: Vec<_> = producers
            .drain(..)
            .map(|p| {
                tokio::spawn(run_producer(
                    client.clone(),
                    base.clone(),
                    p,
                    inflight.clone(),
                ))
            })
            .collect();
        let wtasks: Vec<_> = plains
            .drain(..)
            .map(|w| tokio::spawn(run_plain(client.clone(), base.clone(), w, inflight.clone())))
            .collect();
        let ctask = rng.gen_bool(0.6).then(|| {
            let delay = Duration::from_millis(rng.gen_range(0..=kill_after.as_millis() as u64));
            tokio::spawn(run_closers(
                client.clone(),
                base.clone(),
                cycle,
                rng.gen(),
                delay,
                inflight.clone(),
            ))
        });
        tokio::time::sleep(kill_after).await;
        let in_flight_at_kill = inflight.load(Ordering::SeqCst);
        server.kill();
        if in_flight_at_kill > 0 {
            stats.kills_in_flight += 1;
        }
        for t in ptasks {
            producers.push(t.await.unwrap());
        }
        for t in wtasks {
            plains.push(t.await.unwrap());
        }
        if let Some(t) = ctask {
            closers.extend(t.await.unwrap());
        }
        let log = server.log();
        for p in &producers {
            assert!(
                p.unexpected.is_empty(),
                "{ctx}: live server answered wrongly: {:?}\nstderr:\n{log}",
                p.unexpected
            );
        }
        for w in &plains {
            assert!(
                w.unexpected.is_empty(),
                "{ctx}: live server answered wrongly: {:?}\nstderr:\n{log}",
                w.unexpected
            );
        }
        for c in &closers {
            assert!(
                c.unexpected.is_empty(),
                "{ctx}: live server answered wrongly: {:?}\nstderr:\n{log}",
                c.unexpected
            );
        }

        // --- restart on the same data directory ------------------------------
        let fast_checkpoints = rng.gen_bool(0.5);
        if fast_checkpoints {
            stats.checkpoint_fast_incarnations += 1;
        }
        server = ServerProc::start(&dir.0, if fast_checkpoints { "10ms" } else { "30s" });
        client = new_client();
        server.wait_healthy(&client).await;
        checker.client = client.clone();
        checker.base = server.base();
        let base = server.base();

        // --- re-send every producer request without a 2xx, in seq order ------
        // First read what survived, to know which answer each re-send must get.
        let mut survived: std::collections::HashSet<(u8, u8, u32)> = Default::default();
        let mut by_stream: Vec<String> = producers.iter().map(|p| p.stream.clone()).collect();
        by_stream.dedup();
        for s in &by_stream {
            survived.extend(checker.records(s, &ctx).await.0);
        }
        for p in &mut producers {
            for (seq, outcome) in std::mem::take(&mut p.pending) {
                match outcome {
                    Outcome::Unknown => stats.unknown_requests += 1,
                    Outcome::NotSent => stats.not_sent_requests += 1,
                    Outcome::Acked => unreachable!(),
                }
                let url = format!("{base}{}", p.stream);
                let r = producer_post(
                    &client,
                    &url,
                    &p.producer_id,
                    seq,
                    record(p.kind, p.id, seq),
                    false,
                )
                .await
                .unwrap();
                let st = r.status().as_u16();
                assert!(
                    st == 200 || st == 204,
                    "{ctx}: re-send of {} seq {seq} ({outcome:?}) answered {st} (want 200 or 204), headers {:?}",
                    p.producer_id,
                    r.headers()
                );
                assert!(
                    !(st == 204 && outcome == Outcome::NotSent),
                    "{ctx}: re-send of {} seq {seq} answered 204 but the original was never sent",
                    p.producer_id
                );
                let was_applied = survived.contains(&(p.kind, p.id, seq));
                assert_eq!(
                    st,
                    if was_applied { 204 } else { 200 },
                    "{ctx}: re-send of {} seq {seq}: the original was {} after the restart",
                    p.producer_id,
                    if was_applied { "present" } else { "absent" }
                );
                assert_eq!(
                    hdr(&r, "producer-seq"),
                    Some(seq.to_string().as_str()),
                    "{ctx}: Producer-Seq of re-send"
                );
                if st == 204 {
                    stats.resent_dup_204 += 1;
                } else {
                    stats.resent_applied_200 += 1;
                }
            }
        }

        // --- verify producer streams -----------------------------------------
        for s in &by_stream {
            let (recs, closed) = checker.records(s, &ctx).await;
            assert!(!closed, "{ctx}: {s} is closed");
            let owners: Vec<&Producer> = producers.iter().filter(|p| &p.stream == s).collect();
            for r in &recs {
                assert!(
                    owners.iter().any(|p| p.kind == r.0 && p.id == r.1),
                    "{ctx}: {s}: foreign record {r:?}"
                );
            }
            for p in owners {
                check_producer_records(p, &recs, &ctx);
            }
        }

        // --- verify plain streams ----------------------------------------------
        for w in &plains {
            let (recs, closed) = checker.records(&w.stream, &ctx).await;
            assert!(!closed, "{ctx}: {} is closed", w.stream);
            let mut present = vec![false; w.outcomes.len()];
            let mut last: Option<u32> = None;
            for r in &recs {
                assert!(
                    r.0 == b'a' && r.1 == w.id,
                    "{ctx}: {}: foreign record {r:?}",
                    w.stream
                );
                assert!(
                    (r.2 as usize) < w.outcomes.len(),
                    "{ctx}: {}: record {r:?} was never sent",
                    w.stream
                );
                if let Some(l) = last {
                    assert!(
                        r.2 > l,
                        "{ctx}: {}: seq {} after {l}: duplicate or out of order",
                        w.stream,
                        r.2
                    );
                }
                last = Some(r.2);
                present[r.2 as usize] = true;
            }
            for (seq, o) in w.outcomes.iter().enumerate() {
                match (o, present[seq]) {
                    (Outcome::Acked, false) => panic!(
                        "{ctx}: {}: acknowledged plain append seq {seq} is missing",
                        w.stream
                    ),
                    (Outcome::NotSent, true) => panic!(
                        "{ctx}: {}: plain append seq {seq} was never sent but is present",
                        w.stream
                    ),
                    _ => {}
                }
            }
            // Count each unknown outcome once: in the cycle it happened.
            if let Some(Outcome::Unknown) = w.outcomes.last() {
                stats.unknown_requests += 1;
                if present[w.outcomes.len() - 1] {
                    stats.plain_unknown_present += 1;
                } else {
                    stats.plain_unknown_absent += 1;
                }
            }
            if let Some(Outcome::NotSent) = w.outcomes.last() {
                stats.not_sent_requests += 1;
            }
        }
        // Unknown outcomes stay unknown to the model but are now decided by
        // the stream: pin them so later cycles check exactly that.
        for w in &mut plains {
            let present: std::collections::HashSet<u32> =
                parse_records(&checker.last_bytes[&w.stream])
                    .unwrap()
                    .iter()
                    .map(|r| r.2)
                    .collect();
            for (seq, o) in w.outcomes.iter_mut().enumerate() {
                if *o != Outcome::Acked {
                    *o = if present.contains(&(seq as u32)) {
                        Outcome::Acked
                    } else {
                        Outcome::NotSent
                    };
                }
            }
        }

        // --- verify append-and-close streams -----------------------------------
        for c in &mut closers {
            let url = format!("{base}{}", c.stream);
            let fresh = c.state == CloseState::Unverified;
            if fresh {
                if c.create == Some(Outcome::Unknown) || c.close == Some(Outcome::Unknown) {
                    stats.unknown_requests += 1;
                }
                if c.create == Some(Outcome::NotSent) || c.close == Some(Outcome::NotSent) {
                    stats.not_sent_requests += 1;
                }
            }
            let head = client.head(&url).send().await.unwrap();
            if head.status() == 404 {
                assert!(
                    matches!(c.state, CloseState::Unverified | CloseState::Absent)
                        && c.create != Some(Outcome::Acked),
                    "{ctx}: {} vanished (state {:?}, create {:?})",
                    c.stream,
                    c.state,
                    c.create
                );
                if c.producer {
                    // Create it now and close it through the producer.
                    let r = client
                        .put(&url)
                        .header("content-type", CT)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201, "{ctx}: re-create {}", c.stream);
                } else {
                    c.state = CloseState::Absent;
                    continue;
                }
            } else {
                assert_eq!(head.status(), 200, "{ctx}: HEAD {}", c.stream);
            }
            let head_closed = head.status() == 200 && closed_hdr(&head);
            if c.producer && c.state == CloseState::Unverified && c.close != Some(Outcome::Acked) {
                // Re-send the closing append: 200 if it was lost, 204 if applied.
                let r = producer_post(&client, &url, &c.producer_id(), 0, c.rec(), true)
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                assert!(
                    st == 200 || st == 204,
                    "{ctx}: re-send of closing append on {} answered {st}",
                    c.stream
                );
                assert!(
                    closed_hdr(&r),
                    "{ctx}: re-sent close on {} lacks Stream-Closed: true",
                    c.stream
                );
                assert!(
                    st == 200 || c.close == Some(Outcome::Unknown),
                    "{ctx}: close never sent on {} but re-send got 204",
                    c.stream
                );
                assert_eq!(
                    st == 204,
                    head_closed,
                    "{ctx}: {}: re-send status {st} vs HEAD closed {head_closed}",
                    c.stream
                );
                if st == 204 {
                    stats.resent_dup_204 += 1;
                } else {
                    stats.resent_applied_200 += 1;
                }
                c.close = Some(Outcome::Acked);
            }
            let (recs, read_closed) = checker.records(&c.stream, &ctx).await;
            let head = client.head(&url).send().await.unwrap();
            let closed = closed_hdr(&head);
            assert_eq!(
                read_closed, closed,
                "{ctx}: {}: read Stream-Closed vs HEAD",
                c.stream
            );
            let rec = parse_records(&c.rec()).unwrap()[0];
            let expected_state = if closed {
                assert_eq!(
                    recs,
                    vec![rec],
                    "{ctx}: closed {} must hold exactly its final record",
                    c.stream
                );
                CloseState::Closed
            } else {
                assert!(
                    recs.is_empty(),
                    "{ctx}: open {} holds {recs:?}: append-and-close was not atomic",
                    c.stream
                );
                CloseState::OpenEmpty
            };
            if c.close == Some(Outcome::Acked) {
                assert_eq!(
                    expected_state,
                    CloseState::Closed,
                    "{ctx}: acknowledged close of {} was lost",
                    c.stream
                );
            }
            if c.state != CloseState::Unverified {
                assert_eq!(
                    c.state, expected_state,
                    "{ctx}: {} changed state across a restart",
                    c.stream
                );
            } else if fresh {
                match (c.close, expected_state) {
                    (Some(Outcome::Acked), _) => stats.closes_acked += 1,
                    (_, CloseState::Closed) => stats.closes_unknown_applied += 1,
                    _ => stats.closes_unknown_not_applied += 1,
                }
            }
            c.state = expected_state;
            if expected_state == CloseState::Closed {
                // A plain append to a closed stream: 409 with Stream-Closed: true.
                let r = client
                    .post(&url)
                    .header("content-type", CT)
                    .body(record(b'x', 0, cycle))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 409, "{ctx}: POST to closed {}", c.stream);
                assert!(
                    closed_hdr(&r),
                    "{ctx}: 409 from closed {} lacks Stream-Closed: true",
                    c.stream
                );
                if c.producer {
                    // The closing tuple is still recognised: duplicate.
                    let r = producer_post(&client, &url, &c.producer_id(), 0, c.rec(), true)
                        .await
                        .unwrap();
                    assert_eq!(
                        r.status(),
                        204,
                        "{ctx}: retry of the closing append on {}",
                        c.stream
                    );
                    assert!(
                        closed_hdr(&r),
                        "{ctx}: {}: duplicate close lacks Stream-Closed: true",
                        c.stream
                    );
                    // Any other seq: 409 closed.
                    let r = producer_post(
                        &client,
                        &url,
                        &c.producer_id(),
                        1,
                        record(b'x', 1, cycle),
                        false,
                    )
                    .await
                    .unwrap();
                    assert_eq!(
                        r.status(),
                        409,
                        "{ctx}: producer append to closed {}",
                        c.stream
                    );
                    assert!(
                        closed_hdr(&r),
                        "{ctx}: {}: 409 lacks Stream-Closed: true",
                        c.stream
                    );
                }
            }
        }
    }

    // Final tally of acknowledged appends verified in the last check.
    let producer_acked: u64 = producers.iter().map(|p| p.next_seq as u64).sum();
    let plain_acked: u64 = plains
        .iter()
        .map(|w| w.outcomes.iter().filter(|o| **o == Outcome::Acked).count() as u64)
        .sum();
    let closed = closers
        .iter()
        .filter(|c| c.state == CloseState::Closed)
        .count();
    drop(server);
    eprintln!(
        "crash summary: cycles={cycles} kills_with_appends_in_flight={} unknown_outcome_requests={} not_sent_requests={} \
         acknowledged_appends_verified={} (producer {producer_acked}, plain {plain_acked}, closing {closed}) \
         resends_duplicate_204={} resends_applied_200={} plain_unknown_applied={} plain_unknown_lost={} \
         closes: acked={} unknown_applied={} unknown_not_applied={} fast_checkpoint_incarnations={} elapsed={:.1}s seed={seed}",
        stats.kills_in_flight,
        stats.unknown_requests,
        stats.not_sent_requests,
        producer_acked + plain_acked + closed as u64,
        stats.resent_dup_204,
        stats.resent_applied_200,
        stats.plain_unknown_present,
        stats.plain_unknown_absent,
        stats.closes_acked,
        stats.closes_unknown_applied,
        stats.closes_unknown_not_applied,
        stats.checkpoint_fast_incarnations,
        started.elapsed().as_secs_f64(),
    );
    assert!(
        producer_acked > 0,
        "the workload acknowledged no producer append"
    );
    drop(dir);
}
