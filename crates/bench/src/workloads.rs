//! The workloads of issue 5. Each runs against one freshly started server,
//! verifies what it wrote by reading it back, and returns named metrics.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use bytes::Bytes;
use http::Method;
use parking_lot::Mutex;
use serde::Deserialize;

use crate::conn::{enc, for_each_frame, Conn, SseEvent, SseParser};
use crate::procfs::{self, Window};
use crate::raw::RawConn;
use crate::servers::Running;

const PREFIX: &str = "/v1/stream/bench";
const REC: usize = 256;
const OCTET: &str = "application/octet-stream";
const JSON: &str = "application/json";

/// Every variant, in run order. `BENCH_WORKLOADS` selects by prefix.
pub const VARIANTS: [&str; 12] = [
    "append-16-streams",
    "append-16-hot",
    "append-256-streams",
    "append-256-hot",
    "producer-seq",
    "producer-pipe4",
    "catchup",
    "replay",
    "fanout-sse",
    "fanout-longpoll",
    "idle-sse",
    "streams",
];

#[derive(Clone, Debug)]
pub struct Scale {
    pub secs: f64,
    pub conns_small: usize,
    pub conns_large: usize,
    pub producers: usize,
    pub catchup_bytes: usize,
    pub catchup_reps: usize,
    pub replay_events: usize,
    pub replay_reps: usize,
    pub fan_subs: usize,
    pub fan_secs: f64,
    pub fan_rate: f64,
    pub idle_conns: usize,
    pub streams: usize,
}

impl Scale {
    pub fn full(secs: f64) -> Self {
        Scale {
            secs,
            conns_small: 16,
            conns_large: 256,
            producers: 8,
            catchup_bytes: 64 << 20,
            catchup_reps: 3,
            replay_events: 100_000,
            replay_reps: 3,
            fan_subs: 200,
            fan_secs: 10.0,
            fan_rate: 100.0,
            idle_conns: 2000,
            streams: 100_000,
        }
    }
    pub fn smoke() -> Self {
        Scale {
            secs: 0.5,
            conns_small: 16,
            conns_large: 64,
            producers: 4,
            catchup_bytes: 2 << 20,
            catchup_reps: 1,
            replay_events: 5_000,
            replay_reps: 1,
            fan_subs: 20,
            fan_secs: 1.0,
            fan_rate: 100.0,
            idle_conns: 100,
            streams: 500,
        }
    }
}

pub struct Ctx<'a> {
    pub srv: &'a Running,
    pub scale: &'a Scale,
    pub count_fsync: bool,
    pub tmp: PathBuf,
}

pub type Metrics = Vec<(String, f64)>;

fn m(v: &mut Metrics, k: &str, x: f64) {
    v.push((k.to_string(), x));
}

pub async fn run(variant: &str, ctx: &Ctx<'_>) -> Result<Metrics> {
    let s = ctx.scale;
    match variant {
        "append-16-streams" => appends(ctx, s.conns_small, false).await,
        "append-16-hot" => appends(ctx, s.conns_small, true).await,
        "append-256-streams" => appends(ctx, s.conns_large, false).await,
        "append-256-hot" => appends(ctx, s.conns_large, true).await,
        "producer-seq" => producers(ctx, 1).await,
        "producer-pipe4" => producers(ctx, 4).await,
        "catchup" => catchup(ctx).await,
        "replay" => replay(ctx).await,
        "fanout-sse" => fanout(ctx, true).await,
        "fanout-longpoll" => fanout(ctx, false).await,
        "idle-sse" => idle_sse(ctx).await,
        "streams" => many_streams(ctx).await,
        other => bail!("unknown workload {other}"),
    }
}

// ---------- helpers ----------

async fn create(c: &mut Conn, path: &str, ctype: &str, body: Bytes) -> Result<()> {
    let r = c
        .call(Method::PUT, path, &[("content-type", ctype)], body)
        .await?;
    ensure!(
        r.status == 201 || r.status == 200,
        "create {path}: HTTP {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    Ok(())
}

/// A 256-byte record: writer id, sequence number, magic, deterministic filler.
fn record(w: u32, seq: u64) -> Bytes {
    let mut b = vec![0u8; REC];
    b[0..4].copy_from_slice(&w.to_le_bytes());
    b[4..12].copy_from_slice(&seq.to_le_bytes());
    b[12..16].copy_from_slice(b"DSBR");
    for (i, x) in b[16..].iter_mut().enumerate() {
        *x = (w as u8) ^ (seq as u8) ^ (i as u8).wrapping_mul(7);
    }
    Bytes::from(b)
}

fn parse_record(r: &[u8]) -> Result<(u32, u64)> {
    ensure!(r.len() == REC && &r[12..16] == b"DSBR", "corrupt record");
    let w = u32::from_le_bytes(r[0..4].try_into()?);
    let seq = u64::from_le_bytes(r[4..12].try_into()?);
    ensure!(
        r[16..]
            .iter()
            .enumerate()
            .all(|(i, x)| *x == (w as u8) ^ (seq as u8) ^ (i as u8).wrapping_mul(7)),
        "corrupt record filler"
    );
    Ok((w, seq))
}

/// Checks a stream of records: per writer, seqs 0..acked in order, each once;
/// one extra record is allowed after a request whose outcome is unknown.
fn verify_records(data: &[u8], acked: &[(u32, u64, bool)]) -> Result<()> {
    ensure!(
        data.len().is_multiple_of(REC),
        "stream length {} is not a multiple of {REC}",
        data.len()
    );
    let mut next: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for r in data.chunks(REC) {
        let (w, seq) = parse_record(r)?;
        let n = next.entry(w).or_insert(0);
        ensure!(
            seq == *n,
            "writer {w}: record seq {seq} where {} was expected (duplicate, loss or reorder)",
            *n
        );
        *n += 1;
    }
    for &(w, n, unknown) in acked {
        let got = next.get(&w).copied().unwrap_or(0);
        ensure!(
            got == n || (unknown && got == n + 1),
            "writer {w}: {n} appends acknowledged, {got} stored"
        );
    }
    Ok(())
}

async fn read_all(c: &mut RawConn, path: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    crate::raw::read_to_tail(c, path, |d| {
        out.extend_from_slice(d);
        Ok(())
    })
    .await?;
    Ok(out)
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn cost_metrics(v: &mut Metrics, w: &procfs::WindowResult, ops: f64, per: &str) {
    if let Some(c) = w.cpu_secs {
        if ops > 0.0 {
            m(v, &format!("cpu_us_per_{per}"), c * 1e6 / ops);
        }
    }
    if let Some(f) = w.fsyncs {
        if ops > 0.0 {
            m(v, &format!("fsync_per_{per}"), f as f64 / ops);
        }
    }
}

fn rss_metric(v: &mut Metrics, pid: u32) {
    if let Some(r) = procfs::hwm_bytes(pid) {
        m(v, "peak_rss_mb", r / 1e6);
    }
}

// ---------- 1. durable appends ----------

async fn appends(ctx: &Ctx<'_>, conns: usize, hot: bool) -> Result<Metrics> {
    let addr = ctx.srv.addr;
    let paths: Vec<String> = (0..conns)
        .map(|i| {
            if hot {
                format!("{PREFIX}/hot")
            } else {
                format!("{PREFIX}/s{i}")
            }
        })
        .collect();
    let mut c = Conn::new(addr);
    let mut uniq: Vec<&String> = paths.iter().collect();
    uniq.dedup();
    for p in uniq {
        create(&mut c, p, OCTET, Bytes::new()).await?;
    }
    let win = Window::start(ctx.srv.pid, ctx.count_fsync, &ctx.tmp).await?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(ctx.scale.secs);
    let mut tasks = Vec::new();
    for (w, path) in paths.iter().enumerate() {
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = RawConn::new(addr);
            let mut seq = 0u64;
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 14);
            let mut errors = 0u64;
            let mut unknown = false;
            while Instant::now() < deadline {
                let body = record(w as u32, seq);
                let t = Instant::now();
                match conn
                    .call("POST", &path, &[("content-type", OCTET)], &body)
                    .await
                {
                    Ok(r) if r.ok() => {
                        lat.push(t.elapsed().as_micros() as u32);
                        seq += 1;
                    }
                    Ok(_) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => {
                        errors += 1;
                        unknown = true;
                        break;
                    }
                }
            }
            (w as u32, seq, unknown, lat, errors)
        }));
    }
    let mut acked = Vec::new();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (w, n, unknown, l, e) = t.await?;
        acked.push((w, n, unknown));
        lat.extend(l);
        errors += e;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let wr = win.stop().await;
    let ops = lat.len() as f64;
    lat.sort_unstable();
    // Read back and verify.
    if hot {
        let data = read_all(&mut RawConn::new(addr), &paths[0]).await?;
        verify_records(&data, &acked)?;
    } else {
        for (i, p) in paths.iter().enumerate() {
            let data = read_all(&mut RawConn::new(addr), p).await?;
            verify_records(&data, &acked[i..=i])?;
        }
    }
    let mut v = Metrics::new();
    m(&mut v, "ops_s", ops / elapsed);
    m(&mut v, "p50_ms", pct(&lat, 0.5));
    m(&mut v, "p99_ms", pct(&lat, 0.99));
    cost_metrics(&mut v, &wr, ops, "op");
    m(&mut v, "errors", errors as f64);
    rss_metric(&mut v, ctx.srv.pid);
    Ok(v)
}

// ---------- 2. idempotent producers ----------

struct Producer {
    next: AtomicU64,
    acked: Mutex<(u64, BTreeSet<u64>)>,
    contiguous: tokio::sync::watch::Sender<u64>,
}

impl Producer {
    fn ack(&self, seq: u64) {
        let mut g = self.acked.lock();
        g.1.insert(seq);
        loop {
            let c = g.0;
            if !g.1.remove(&c) {
                break;
            }
            g.0 += 1;
        }
        let c = g.0;
        drop(g);
        self.contiguous.send_replace(c);
    }
}

async fn producers(ctx: &Ctx<'_>, inflight: usize) -> Result<Metrics> {
    let addr = ctx.srv.addr;
    let np = ctx.scale.producers;
    let mut c = Conn::new(addr);
    for i in 0..np {
        create(&mut c, &format!("{PREFIX}/p{i}"), OCTET, Bytes::new()).await?;
    }
    let prods: Vec<Arc<Producer>> = (0..np)
        .map(|_| {
            Arc::new(Producer {
                next: AtomicU64::new(0),
                acked: Mutex::new((0, BTreeSet::new())),
                contiguous: tokio::sync::watch::channel(0).0,
            })
        })
        .collect();
    let gaps = Arc::new(AtomicU64::new(0));
    let dups = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let win = Window::start(ctx.srv.pid, ctx.count_fsync, &ctx.tmp).await?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(ctx.scale.secs);
    let mut tasks = Vec::new();
    for (i, p) in prods.iter().enumerate() {
        for _lane in 0..inflight {
            let p = p.clone();
            let (gaps, dups, errors) = (gaps.clone(), dups.clone(), errors.clone());
            let path = format!("{PREFIX}/p{i}");
            tasks.push(tokio::spawn(async move {
                let mut conn = RawConn::new(addr);
                let mut lat: Vec<u32> = Vec::with_capacity(1 << 12);
                let id = format!("bench-{i}");
                let mut rx = p.contiguous.subscribe();
                'outer: while Instant::now() < deadline {
                    let seq = p.next.fetch_add(1, Ordering::SeqCst);
                    let seq_s = seq.to_string();
                    let t = Instant::now();
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        if tries > 1000 {
                            return Err(anyhow!("producer {i} seq {seq}: gave up after 1000 attempts"));
                        }
                        let hdrs = [("content-type", OCTET), ("producer-id", id.as_str()), ("producer-epoch", "0"), ("producer-seq", seq_s.as_str())];
                        let r = conn.call("POST", &path, &hdrs, &record(i as u32, seq)).await?;
                        match r.status {
                            200 | 201 | 204 => {
                                if r.status == 204 {
                                    dups.fetch_add(1, Ordering::Relaxed);
                                }
                                lat.push(t.elapsed().as_micros() as u32);
                                p.ack(seq);
                                continue 'outer;
                            }
                            409 => {
                                let expected: Option<u64> = r.header("producer-expected-seq").and_then(|v| v.parse().ok());
                                match expected {
                                    Some(e) if e < seq => {
                                        // Sequence gap: our predecessor is still in flight.
                                        // A correct pipelined client waits for it, then retries.
                                        gaps.fetch_add(1, Ordering::Relaxed);
                                        let w = rx.wait_for(|c| *c >= seq);
                                        if tokio::time::timeout(Duration::from_secs(10), w).await.is_err() {
                                            return Err(anyhow!("producer {i} seq {seq}: predecessor never acknowledged"));
                                        }
                                    }
                                    _ => return Err(anyhow!("producer {i} seq {seq}: 409 {:?}", String::from_utf8_lossy(&r.body))),
                                }
                            }
                            s => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                if s == 400 || s == 403 || s == 404 {
                                    return Err(anyhow!("producer {i} seq {seq}: HTTP {s} {}", String::from_utf8_lossy(&r.body)));
                                }
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let wr = win.stop().await;
    lat.sort_unstable();
    let ops = lat.len() as f64;
    // Exactly-once: every issued seq stored once, in order.
    for (i, p) in prods.iter().enumerate() {
        let data = read_all(&mut RawConn::new(addr), &format!("{PREFIX}/p{i}")).await?;
        let issued = p.next.load(Ordering::SeqCst);
        verify_records(&data, &[(i as u32, issued, false)])?;
    }
    let mut v = Metrics::new();
    m(&mut v, "ops_s", ops / elapsed);
    m(&mut v, "p50_ms", pct(&lat, 0.5));
    m(&mut v, "p99_ms", pct(&lat, 0.99));
    m(&mut v, "gap_409", gaps.load(Ordering::Relaxed) as f64);
    m(
        &mut v,
        "gap_409_per_op",
        gaps.load(Ordering::Relaxed) as f64 / ops.max(1.0),
    );
    m(&mut v, "dup_204", dups.load(Ordering::Relaxed) as f64);
    cost_metrics(&mut v, &wr, ops, "op");
    m(&mut v, "errors", errors.load(Ordering::Relaxed) as f64);
    Ok(v)
}

// ---------- 3. catch-up reads ----------

fn pattern(n: usize) -> Bytes {
    let mut b = vec![0u8; n];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    Bytes::from(b)
}

/// The catch-up stream's bytes: a 1 MiB random block repeated, each 4 KiB
/// page stamped with its index in its first 8 bytes, so a byte out of
/// place, a page served twice or a shifted range all fail the comparison.
/// Readers check every byte against the block (which stays in the cache)
/// and the stamps instead of against a 64 MiB copy: that comparison, from
/// memory, took ~40% of the generator's core at 4 GB/s.
struct CatchupData {
    block: Bytes,
}

const CATCHUP_PAGE: usize = 4096;
const CATCHUP_BLOCK: usize = 1 << 20;

impl CatchupData {
    fn new() -> Self {
        CatchupData {
            block: pattern(CATCHUP_BLOCK),
        }
    }

    /// The stream's first `n` bytes.
    fn bytes(&self, n: usize) -> Bytes {
        let mut v = Vec::with_capacity(n);
        for pos in (0..n).step_by(CATCHUP_PAGE) {
            let take = CATCHUP_PAGE.min(n - pos);
            let b = pos % CATCHUP_BLOCK;
            v.extend_from_slice(&self.block[b..b + take]);
            let stamp = ((pos / CATCHUP_PAGE) as u64).to_le_bytes();
            let k = stamp.len().min(take);
            v[pos..pos + k].copy_from_slice(&stamp[..k]);
        }
        Bytes::from(v)
    }

    /// Whether `d` is what the stream holds from `pos` on.
    fn matches(&self, mut pos: usize, mut d: &[u8]) -> bool {
        while !d.is_empty() {
            let in_page = pos % CATCHUP_PAGE;
            let take = (CATCHUP_PAGE - in_page).min(d.len());
            let (seg, rest) = d.split_at(take);
            let stamp = ((pos / CATCHUP_PAGE) as u64).to_le_bytes();
            let k = stamp.len().saturating_sub(in_page).min(take);
            let b = pos % CATCHUP_BLOCK;
            let stamped = k == 0 || seg[..k] == stamp[in_page..in_page + k];
            if !stamped || seg[k..] != self.block[b + k..b + take] {
                return false;
            }
            pos += take;
            d = rest;
        }
        true
    }
}

async fn catchup(ctx: &Ctx<'_>) -> Result<Metrics> {
    let addr = ctx.srv.addr;
    let path = format!("{PREFIX}/big");
    let reference = Arc::new(CatchupData::new());
    let data = reference.bytes(ctx.scale.catchup_bytes);
    let mut c = Conn::new(addr);
    create(&mut c, &path, OCTET, Bytes::new()).await?;
    for piece in data.chunks(256 << 10) {
        let r = c
            .call(
                Method::POST,
                &path,
                &[("content-type", OCTET)],
                data.slice_ref(piece),
            )
            .await?;
        ensure!(r.ok(), "fill: HTTP {}", r.status);
    }
    let readers = 4;
    let reps = ctx.scale.catchup_reps;
    // Read at least `reps` times, and for at least half the run duration, so
    // fast servers are timed over a long enough phase.
    let until = Instant::now() + Duration::from_secs_f64(ctx.scale.secs / 2.0);
    let win = Window::start(ctx.srv.pid, false, &ctx.tmp).await?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let len = data.len();
    drop(data);
    for _ in 0..readers {
        let (reference, path) = (reference.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = RawConn::new(addr);
            let mut total = 0u64;
            let mut rep = 0;
            while rep < reps || Instant::now() < until {
                rep += 1;
                let mut pos = 0usize;
                let (n, _) = crate::raw::read_to_tail(&mut conn, &path, |d| {
                    ensure!(
                        pos + d.len() <= len && reference.matches(pos, d),
                        "catch-up bytes differ at {pos}"
                    );
                    pos += d.len();
                    Ok(())
                })
                .await?;
                ensure!(pos == len, "catch-up read {pos} of {len} bytes");
                total += n;
            }
            Ok::<_, anyhow::Error>(total)
        }));
    }
    let mut bytes = 0u64;
    for t in tasks {
        bytes += t.await??;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let wr = win.stop().await;
    let mb = bytes as f64 / 1e6;
    let mut v = Metrics::new();
    m(&mut v, "mb_s", mb / elapsed);
    if let Some(cpu) = wr.cpu_secs {
        m(&mut v, "cpu_ms_per_mb", cpu * 1e3 / mb);
    }
    rss_metric(&mut v, ctx.srv.pid);
    Ok(v)
}

// ---------- 4. JSON replay ----------

#[derive(Deserialize)]
struct Ev {
    id: u64,
}

async fn replay(ctx: &Ctx<'_>) -> Result<Metrics> {
    let addr = ctx.srv.addr;
    let path = format!("{PREFIX}/events");
    let n = ctx.scale.replay_events;
    let mut c = Conn::new(addr);
    create(&mut c, &path, JSON, Bytes::new()).await?;
    let pad = "x".repeat(52);
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        let mut body = String::from("[");
        for id in i..end {
            if id > i {
                body.push(',');
            }
            // ~100 bytes per event
            body.push_str(&format!(
                r#"{{"id":{id},"type":"bench.event","v":{{"pad":"{pad}"}}}}"#
            ));
        }
        body.push(']');
        let r = c
            .call(
                Method::POST,
                &path,
                &[("content-type", JSON)],
                Bytes::from(body),
            )
            .await?;
        ensure!(
            r.ok(),
            "fill: HTTP {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        i = end;
    }
    // The replaying consumer is a client of its own (a connection of its
    // own), not the producer that filled the stream.
    let mut c = Conn::new(addr);
    let reps = ctx.scale.replay_reps;
    let win = Window::start(ctx.srv.pid, false, &ctx.tmp).await?;
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(ctx.scale.secs / 2.0);
    let mut first: Option<Vec<Bytes>> = None;
    let mut first_cat: Vec<u8> = Vec::new();
    let mut cat: Vec<u8> = Vec::new();
    let mut bytes = 0usize;
    let mut done = 0usize;
    while done < reps || Instant::now() < until {
        done += 1;
        let mut off = "-1".to_string();
        let mut got = Vec::new();
        loop {
            let r = c.get(&format!("{path}?offset={}", enc(&off))).await?;
            ensure!(r.status == 200, "replay: HTTP {}", r.status);
            let next = r
                .header("stream-next-offset")
                .ok_or_else(|| anyhow!("no Stream-Next-Offset"))?
                .to_string();
            let utd = r.headers.contains_key("stream-up-to-date");
            bytes += r.body.len();
            let empty = r.body.is_empty();
            got.push(r.body);
            if utd || (empty && next == off) {
                break;
            }
            off = next;
        }
        // Later replays must return exactly the bytes of the first one.
        if first.is_none() {
            first_cat = got.iter().flat_map(|b| b.iter().copied()).collect();
            first = Some(got);
        } else {
            cat.clear();
            for b in &got {
                cat.extend_from_slice(b);
            }
            ensure!(
                cat == first_cat,
                "replay {done} returned different bytes than the first"
            );
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let wr = win.stop().await;
    if let Some(got) = &first {
        let mut expect = 0u64;
        for b in got {
            let evs: Vec<Ev> = serde_json::from_slice(b)
                .map_err(|e| anyhow!("replay body is not a JSON array of events: {e}"))?;
            for e in evs {
                ensure!(
                    e.id == expect,
                    "replay: event {} where {expect} was expected",
                    e.id
                );
                expect += 1;
            }
        }
        ensure!(expect == n as u64, "replay returned {expect} of {n} events");
    }
    let events = (n * done) as f64;
    let mut v = Metrics::new();
    m(&mut v, "events_s", events / elapsed);
    m(&mut v, "mb_s", bytes as f64 / 1e6 / elapsed);
    if let Some(cpu) = wr.cpu_secs {
        m(&mut v, "cpu_ns_per_event", cpu * 1e9 / events);
    }
    Ok(v)
}

// ---------- 5. live fan-out ----------

#[derive(Deserialize)]
struct FanEv {
    i: u64,
    t: u64,
}

#[derive(Default)]
struct Sub {
    /// Delivery latencies (µs) by arrival at the subscriber's socket.
    lat: Vec<u32>,
    /// The same deliveries by when the generator read them.
    lat_read: Vec<u32>,
    next: u64,
    got: u64,
    bad: u64,
    reconnects: u64,
}

/// Records one delivery: `arrived_us` is when its bytes reached the
/// socket, `read_us` when the generator read them (wall clock, µs).
fn deliver(sub: &Mutex<Sub>, arrived_us: u64, read_us: u64, body: &[u8]) -> Result<()> {
    let evs: Vec<FanEv> = serde_json::from_slice(body)?;
    let mut s = sub.lock();
    for e in evs {
        if e.i != s.next {
            s.bad += 1;
        }
        s.next = e.i + 1;
        s.got += 1;
        s.lat.push(arrived_us.saturating_sub(e.t) as u32);
        s.lat_read.push(read_us.saturating_sub(e.t) as u32);
    }
    Ok(())
}

/// Microseconds since the Unix epoch: the clock of the kernel's receive
/// timestamps, so send and arrival times compare.
fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Reads once from a socket with `SO_TIMESTAMPNS` on: the bytes read and
/// when the last of them arrived (µs since the Unix epoch; `None` if the
/// kernel gave no timestamp).
async fn read_stamped(
    sock: &tokio::net::TcpStream,
    buf: &mut [u8],
) -> std::io::Result<(usize, Option<u64>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    loop {
        sock.readable().await?;
        let r = sock.try_io(tokio::io::Interest::READABLE, || {
            let mut iov = [std::io::IoSliceMut::new(&mut *buf)];
            let mut space = nix::cmsg_space!(nix::sys::time::TimeSpec);
            let msg = recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .map_err(std::io::Error::from)?;
            let mut at = None;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmTimestampns(t) = c {
                    at = Some(t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000);
                }
            }
            Ok((msg.bytes, at))
        });
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// One SSE subscriber on a plain socket, reconnecting from its last offset
/// when the server ends the response. A delivery's time is when its bytes
/// reached the socket, by the kernel's receive timestamp: the generator's
/// one core reads a burst of 200 events more slowly than a server writes
/// them (about 5 µs each), so the time it reads them measures its own
/// backlog more than the server (docs/benchmarks.md). That read time is
/// kept as a second figure.
async fn sse_subscriber(
    addr: std::net::SocketAddr,
    path: String,
    sub: Arc<Mutex<Sub>>,
    ready: Arc<AtomicUsize>,
) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut off = "-1".to_string();
    let mut first = true;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
            .map_err(std::io::Error::from)?;
        let req = format!(
            "GET {path}?offset={}&live=sse HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n\r\n",
            enc(&off)
        );
        sock.write_all(req.as_bytes()).await?;
        let mut head = Vec::new();
        let mut body = HttpBody::default();
        let mut parser = SseParser::default();
        let mut evs: Vec<SseEvent> = Vec::new();
        let mut data = Vec::new();
        loop {
            let (n, arrived) = read_stamped(&sock, &mut buf).await?;
            let read_us = wall_us();
            if n == 0 {
                break;
            }
            data.clear();
            if body.chunked.is_none() {
                head.extend_from_slice(&buf[..n]);
                let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                    ensure!(head.len() < 64 * 1024, "SSE: response head too large");
                    continue;
                };
                let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                ensure!(
                    text.starts_with("http/1.1 200"),
                    "SSE: {}",
                    text.lines().next().unwrap_or("")
                );
                body.chunked = Some(text.contains("transfer-encoding: chunked"));
                let rest = head.split_off(end + 4);
                body.decode(&rest, &mut data)?;
            } else {
                body.decode(&buf[..n], &mut data)?;
            }
            parser.push(&data, &mut evs);
            for e in evs.drain(..) {
                if e.event == "data" {
                    deliver(&sub, arrived.unwrap_or(read_us), read_us, e.data.as_bytes())?;
                } else if e.event == "control" {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&e.data) {
                        if let Some(o) = v.get("streamNextOffset").and_then(|o| o.as_str()) {
                            off = o.to_string();
                        }
                    }
                    if first {
                        first = false;
                        ready.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            if body.done {
                break;
            }
        }
        sub.lock().reconnects += 1;
    }
}

/// Incremental decoder of a response body: chunked, or read to the end.
#[derive(Default)]
struct HttpBody {
    /// Unknown until the head was read.
    chunked: Option<bool>,
    /// Bytes left in the current chunk (then its CRLF).
    left: usize,
    /// The chunk-size line read so far.
    line: Vec<u8>,
    /// Inside a chunk's trailing CRLF.
    crlf: usize,
    done: bool,
}

impl HttpBody {
    fn decode(&mut self, mut inp: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if self.chunked != Some(true) {
            out.extend_from_slice(inp);
            return Ok(());
        }
        while !inp.is_empty() && !self.done {
            if self.crlf > 0 {
                let k = self.crlf.min(inp.len());
                inp = &inp[k..];
                self.crlf -= k;
            } else if self.left > 0 {
                let k = self.left.min(inp.len());
                out.extend_from_slice(&inp[..k]);
                inp = &inp[k..];
                self.left -= k;
                if self.left == 0 {
                    self.crlf = 2;
                }
            } else if let Some(nl) = inp.iter().position(|&b| b == b'\n') {
                self.line.extend_from_slice(&inp[..nl]);
                inp = &inp[nl + 1..];
                let line = String::from_utf8_lossy(&self.line).trim().to_string();
                self.line.clear();
                let hex = line.split(';').next().unwrap_or("");
                let size = usize::from_str_radix(hex, 16)
                    .map_err(|_| anyhow!("SSE: bad chunk size line {line:?}"))?;
                if size == 0 {
                    self.done = true;
                } else {
                    self.left = size;
                }
            } else {
                ensure!(self.line.len() < 1024, "SSE: chunk size line too long");
                self.line.extend_from_slice(inp);
                inp = &[];
            }
        }
        Ok(())
    }
}

async fn lp_subscriber(
    addr: std::net::SocketAddr,
    path: String,
    sub: Arc<Mutex<Sub>>,
    ready: Arc<AtomicUsize>,
) -> Result<()> {
    let (_, mut off) = crate::raw::read_to_tail(&mut RawConn::new(addr), &path, |_| Ok(())).await?;
    let mut conn = Conn::new(addr);
    let mut cursor: Option<String> = None;
    ready.fetch_add(1, Ordering::SeqCst);
    loop {
        let mut q = format!("{path}?offset={}&live=long-poll", enc(&off));
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={}", enc(c)));
        }
        let r = conn.get(&q).await?;
        match r.status {
            200 => {
                let now = wall_us();
                deliver(&sub, now, now, &r.body)?
            }
            204 => {}
            s => bail!("long-poll: HTTP {s}"),
        }
        if let Some(n) = r.header("stream-next-offset") {
            off = n.to_string();
        }
        cursor = r.header("stream-cursor").map(str::to_string);
    }
}

async fn fanout(ctx: &Ctx<'_>, sse: bool) -> Result<Metrics> {
    let addr = ctx.srv.addr;
    let path = format!("{PREFIX}/fan");
    let nsubs = ctx.scale.fan_subs;
    let mut c = Conn::new(addr);
    create(&mut c, &path, JSON, Bytes::new()).await?;
    let ready = Arc::new(AtomicUsize::new(0));
    let subs: Vec<Arc<Mutex<Sub>>> = (0..nsubs)
        .map(|_| Arc::new(Mutex::new(Sub::default())))
        .collect();
    let mut tasks = Vec::new();
    for s in &subs {
        let (s, ready, path) = (s.clone(), ready.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            if sse {
                sse_subscriber(addr, path, s, ready).await
            } else {
                lp_subscriber(addr, path, s, ready).await
            }
        }));
    }
    let wait_until = Instant::now() + Duration::from_secs(30);
    while ready.load(Ordering::SeqCst) < nsubs {
        if Instant::now() > wait_until || tasks.iter().any(|t| t.is_finished()) {
            for t in &tasks {
                t.abort();
            }
            bail!(
                "only {} of {nsubs} subscribers connected",
                ready.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let long-polls park on the server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let win = Window::start(ctx.srv.pid, false, &ctx.tmp).await?;
    let total = (ctx.scale.fan_secs * ctx.scale.fan_rate) as u64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / ctx.scale.fan_rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let errors = 0u64;
    let mut sent = 0u64;
    let w0 = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let body = format!(r#"{{"i":{i},"t":{}}}"#, wall_us());
        let r = c
            .call(
                Method::POST,
                &path,
                &[("content-type", JSON)],
                Bytes::from(body),
            )
            .await?;
        if r.ok() {
            sent += 1;
        } else {
            bail!("fan-out append {i}: HTTP {}", r.status);
        }
    }
    let drain = Instant::now() + Duration::from_secs(5);
    while Instant::now() < drain && subs.iter().any(|s| s.lock().got < sent) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = w0.elapsed().as_secs_f64();
    let wr = win.stop().await;
    let mut failed = None;
    for t in &tasks {
        if t.is_finished() {
            failed = Some(());
        }
        t.abort();
    }
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            bail!("subscriber failed: {e:#}");
        }
    }
    ensure!(failed.is_none(), "a subscriber ended early");
    let mut lat = Vec::new();
    let mut lat_read = Vec::new();
    let mut got = 0u64;
    let mut bad = 0u64;
    for s in &subs {
        let s = s.lock();
        lat.extend_from_slice(&s.lat);
        lat_read.extend_from_slice(&s.lat_read);
        got += s.got;
        bad += s.bad;
    }
    ensure!(bad == 0, "{bad} deliveries out of order or duplicated");
    lat.sort_unstable();
    lat_read.sort_unstable();
    let mut v = Metrics::new();
    m(&mut v, "p50_ms", pct(&lat, 0.5));
    m(&mut v, "p99_ms", pct(&lat, 0.99));
    m(&mut v, "max_ms", pct(&lat, 1.0));
    if sse {
        // Long-poll deliveries are timed when read (one response each).
        m(&mut v, "read_p50_ms", pct(&lat_read, 0.5));
        m(&mut v, "read_p99_ms", pct(&lat_read, 0.99));
    }
    m(
        &mut v,
        "delivered",
        got as f64 / (sent as f64 * nsubs as f64),
    );
    if let Some(cpu) = wr.cpu_secs {
        m(&mut v, "cpu_pct", cpu * 100.0 / elapsed);
        m(
            &mut v,
            "cpu_us_per_delivery",
            cpu * 1e6 / (got.max(1) as f64),
        );
    }
    m(&mut v, "errors", errors as f64);
    Ok(v)
}

// ---------- 6. idle SSE connections ----------

async fn idle_sse(ctx: &Ctx<'_>) -> Result<Metrics> {
    let addr = ctx.srv.addr;
    let pid = ctx.srv.pid;
    let path = format!("{PREFIX}/idle");
    let n = ctx.scale.idle_conns;
    let mut c = Conn::new(addr);
    create(&mut c, &path, "text/plain", Bytes::new()).await?;
    // Warm the server's read path once, then take the baseline.
    {
        let _ = read_all(&mut RawConn::new(addr), &path).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = procfs::rss_bytes(pid).ok_or_else(|| anyhow!("no RSS"))?;
    let ready = Arc::new(AtomicUsize::new(0));
    let pinged = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (ready, pinged, gate, path) =
            (ready.clone(), pinged.clone(), gate.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let mut conn = Conn::new(addr);
            let resp = conn
                .send(
                    Method::GET,
                    &format!("{path}?offset=-1&live=sse"),
                    &[],
                    Bytes::new(),
                )
                .await?;
            ensure!(resp.status() == 200, "SSE: HTTP {}", resp.status());
            let mut parser = SseParser::default();
            let mut evs = Vec::new();
            let mut permit = Some(permit);
            for_each_frame(resp.into_body(), |d| {
                parser.push(d, &mut evs);
                for e in evs.drain(..) {
                    if e.event == "control" && permit.is_some() {
                        permit = None;
                        ready.fetch_add(1, Ordering::SeqCst);
                    } else if e.event == "data" && e.data.contains("ping") {
                        pinged.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(())
            })
            .await?;
            Ok::<_, anyhow::Error>(())
        }));
    }
    let until = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::SeqCst) < n && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = ready.load(Ordering::SeqCst);
    let result = async {
        ensure!(
            connected == n,
            "only {connected} of {n} SSE connections established"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let win = Window::start(pid, false, &ctx.tmp).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let wr = win.stop().await;
        let rss1 = procfs::rss_bytes(pid).ok_or_else(|| anyhow!("no RSS"))?;
        // Prove they are live: one append must reach every connection.
        let t = Instant::now();
        let r = c
            .call(
                Method::POST,
                &path,
                &[("content-type", "text/plain")],
                Bytes::from_static(b"ping"),
            )
            .await?;
        ensure!(r.ok(), "ping append: HTTP {}", r.status);
        while pinged.load(Ordering::SeqCst) < n && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let fanout_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut v = Metrics::new();
        m(&mut v, "kb_per_conn", (rss1 - rss0) / n as f64 / 1024.0);
        m(&mut v, "rss_mb", rss1 / 1e6);
        if let Some(cpu) = wr.cpu_secs {
            m(&mut v, "idle_cpu_pct", cpu * 100.0);
        }
        m(
            &mut v,
            "delivered",
            pinged.load(Ordering::SeqCst) as f64 / n as f64,
        );
        m(&mut v, "ping_all_ms", fanout_ms);
        Ok(v)
    }
    .await;
    for t in &tasks {
        t.abort();
    }
    result
}

// ---------- 7. many streams ----------

async fn many_streams(ctx: &Ctx<'_>) -> Result<Metrics> {
    let addr = ctx.srv.addr;
    let pid = ctx.srv.pid;
    let n = ctx.scale.streams;
    let workers = 64usize;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = procfs::rss_bytes(pid).ok_or_else(|| anyhow!("no RSS"))?;
    let (disk0, _) = procfs::disk_usage(&ctx.srv.data_dir);
    let body = |i: usize| format!("stream {i:08} first message 0123456789abcdef\n");
    let win = Window::start(pid, ctx.count_fsync, &ctx.tmp).await?;
    let t0 = Instant::now();
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (errors, stop) = (errors.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut done = 0u64;
            for i in (w..n).step_by(workers) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = conn
                    .call(
                        Method::PUT,
                        &format!("{PREFIX}/m/{i}"),
                        &[("content-type", "text/plain")],
                        Bytes::from(body(i)),
                    )
                    .await?;
                if r.status == 201 {
                    done += 1;
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    stop.store(true, Ordering::Relaxed);
                    bail!(
                        "create {i}: HTTP {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                }
            }
            Ok::<_, anyhow::Error>(done)
        }));
    }
    let mut created = 0u64;
    for t in tasks {
        created += t.await??;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let wr = win.stop().await;
    ensure!(created == n as u64, "{created} of {n} streams created");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = procfs::rss_bytes(pid).ok_or_else(|| anyhow!("no RSS"))?;
    let (disk1, apparent1) = procfs::disk_usage(&ctx.srv.data_dir);
    // Verify a sample (and the first and last).
    let mut c = RawConn::new(addr);
    let step = (n / 500).max(1);
    for i in (0..n).step_by(step).chain([n - 1]) {
        let data = read_all(&mut c, &format!("{PREFIX}/m/{i}")).await?;
        ensure!(data == body(i).as_bytes(), "stream {i}: content differs");
    }
    let mut v = Metrics::new();
    m(&mut v, "creates_s", created as f64 / elapsed);
    m(
        &mut v,
        "mem_kb_per_stream",
        (rss1 - rss0) / n as f64 / 1024.0,
    );
    if ctx.srv.kind.durable() {
        m(
            &mut v,
            "disk_kb_per_stream",
            (disk1.saturating_sub(disk0)) as f64 / n as f64 / 1024.0,
        );
        m(
            &mut v,
            "disk_apparent_kb_per_stream",
            apparent1 as f64 / n as f64 / 1024.0,
        );
    }
    cost_metrics(&mut v, &wr, created as f64, "create");
    m(&mut v, "errors", errors.load(Ordering::Relaxed) as f64);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::{CatchupData, HttpBody};

    /// The catch-up reference accepts the stream's bytes however they are
    /// split, and refuses a byte changed, a page repeated or a range shifted.
    #[test]
    fn catchup_reference_checks_every_byte() {
        let r = CatchupData::new();
        let n = 3 * (1 << 20) + 12_345;
        let data = r.bytes(n);
        for split in [1, 7, 4096, 4099, 65_536, 1 << 20, 1_500_001] {
            let mut pos = 0;
            for d in data.chunks(split) {
                assert!(r.matches(pos, d), "split {split} at {pos}");
                pos += d.len();
            }
        }
        let mut bad = data.to_vec();
        bad[2_000_000] ^= 1;
        assert!(!r.matches(0, &bad));
        // The same bytes a block (1 MiB) later: only the stamps differ.
        assert!(!r.matches(1 << 20, &data[..8192]));
        // Shifted by one byte.
        assert!(!r.matches(1, &data[..8192]));
    }

    /// The chunked decoder gives the same bytes however the input is split.
    #[test]
    fn chunked_body_decodes_across_any_split() {
        let wire = b"5\r\nhello\r\n1a;ext=1\r\nevent: data\ndata:[1,2,3]\n\n\r\n0\r\n\r\n";
        for cut in 0..wire.len() {
            for cut2 in cut..wire.len() {
                let mut b = HttpBody {
                    chunked: Some(true),
                    ..HttpBody::default()
                };
                let mut out = Vec::new();
                for part in [&wire[..cut], &wire[cut..cut2], &wire[cut2..]] {
                    b.decode(part, &mut out).expect("valid chunked body");
                }
                assert_eq!(
                    out, b"helloevent: data\ndata:[1,2,3]\n\n",
                    "cut {cut} {cut2}"
                );
                assert!(b.done);
            }
        }
    }

    /// A bad chunk-size line is an error, not a guess.
    #[test]
    fn chunked_body_rejects_a_bad_size_line() {
        let mut b = HttpBody {
            chunked: Some(true),
            ..HttpBody::default()
        };
        assert!(b.decode(b"zz\r\n", &mut Vec::new()).is_err());
    }
}
