//! Results file -> docs/benchmarks.md (medians, ratios, targets) + SVG chart.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::servers::ALL;
use crate::workloads::VARIANTS;
use crate::Record;

pub fn fmt(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 100.0 {
        format!("{:.1}", v)
    } else if v.abs() >= 1.0 {
        format!("{:.2}", v)
    } else if v == 0.0 {
        "0".into()
    } else {
        format!("{:.3}", v)
    }
}

fn higher_is_better(metric: &str) -> bool {
    matches!(
        metric,
        "ops_s" | "mb_s" | "events_s" | "creates_s" | "delivered"
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// (ours, theirs, label)
const PAIRS: [(&str, &str, &str); 4] = [
    ("ours-file", "upstream-wal", "ours-file / upstream-wal"),
    ("ours-mem", "upstream-mem", "ours-mem / upstream-mem"),
    ("ours-file", "node-file", "ours-file / node-file"),
    ("ours-mem", "node-mem", "ours-mem / node-mem"),
];

const CHART: [(&str, &str); 17] = [
    ("append-16-streams", "ops_s"),
    ("append-16-hot", "ops_s"),
    ("append-256-streams", "ops_s"),
    ("append-256-hot", "ops_s"),
    ("append-16-streams", "cpu_us_per_op"),
    ("append-256-streams", "cpu_us_per_op"),
    ("producer-seq", "ops_s"),
    ("producer-pipe4", "ops_s"),
    ("catchup", "mb_s"),
    ("catchup", "cpu_ms_per_mb"),
    ("replay", "events_s"),
    ("fanout-sse", "p99_ms"),
    ("fanout-longpoll", "p99_ms"),
    ("idle-sse", "kb_per_conn"),
    ("streams", "creates_s"),
    ("streams", "mem_kb_per_stream"),
    ("streams", "disk_kb_per_stream"),
];

struct Data {
    /// variant -> server -> metric -> values of ok rounds
    vals: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>,
    /// variant -> server -> runs
    runs: BTreeMap<String, BTreeMap<String, RunCount>>,
}

/// Runs of one workload on one server: (ok, total, errors).
type RunCount = (usize, usize, Vec<String>);

impl Data {
    fn med(&self, variant: &str, server: &str, metric: &str) -> f64 {
        self.vals
            .get(variant)
            .and_then(|s| s.get(server))
            .and_then(|m| m.get(metric))
            .map(|v| median(v.clone()))
            .unwrap_or(f64::NAN)
    }
    fn ratio(&self, variant: &str, a: &str, b: &str, metric: &str) -> f64 {
        self.med(variant, a, metric) / self.med(variant, b, metric)
    }
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Median latency of a 4 KiB write + fdatasync on the disk holding `dir`.
fn fsync_probe(dir: &Path) -> Option<f64> {
    use std::io::Write;
    std::fs::create_dir_all(dir).ok()?;
    let p = dir.join("fsync-probe.tmp");
    let mut f = std::fs::File::create(&p).ok()?;
    let buf = vec![7u8; 4096];
    let mut lat = Vec::new();
    for _ in 0..200 {
        let t = std::time::Instant::now();
        f.write_all(&buf).ok()?;
        f.sync_data().ok()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_file(&p);
    Some(median(lat))
}

/// `ds-bench report`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Results file written by `ds-bench run`.
    #[arg(long, value_name = "FILE")]
    results: String,
    /// Markdown report to write.
    #[arg(long, value_name = "FILE")]
    md: String,
    /// SVG chart to write.
    #[arg(long, value_name = "FILE")]
    svg: String,
    /// The command line that produced the results, quoted in the report.
    #[arg(long)]
    command: Option<String>,
    /// Run conditions, quoted in the report.
    #[arg(long)]
    conditions: Option<String>,
    /// Hand-written notes (markdown) appended to the report.
    #[arg(long, value_name = "FILE")]
    notes: Option<String>,
    /// The run's work directory (for the disk description).
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    work_dir: String,
}

pub async fn report(args: &ReportArgs) -> Result<()> {
    let results = &args.results;
    let md_path = &args.md;
    let svg_path = &args.svg;
    let text = std::fs::read_to_string(results).with_context(|| format!("read {results}"))?;
    let mut d = Data {
        vals: BTreeMap::new(),
        runs: BTreeMap::new(),
    };
    let mut rounds = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let r: Record = serde_json::from_str(line)?;
        rounds = rounds.max(r.round + 1);
        let e = d
            .runs
            .entry(r.variant.clone())
            .or_default()
            .entry(r.server.clone())
            .or_insert((0, 0, Vec::new()));
        e.1 += 1;
        if r.ok {
            e.0 += 1;
            let s = d
                .vals
                .entry(r.variant.clone())
                .or_default()
                .entry(r.server.clone())
                .or_default();
            for (k, v) in r.metrics {
                s.entry(k).or_default().push(v);
            }
        } else if let Some(err) = r.error {
            e.2.push(format!("round {}: {err}", r.round));
        }
    }
    let work = args.work_dir.as_str();
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(md, "Generated by `ds-bench report` from the results of `ds-bench run` (crate `crates/bench`, driven by `scripts/bench.sh`). Do not edit by hand; re-run the benchmark.\n");
    let _ = writeln!(md, "![ratios](benchmarks.svg)\n");
    let _ = writeln!(md, "## Run\n");
    let _ = writeln!(md, "- date: {}", sh("date -u '+%Y-%m-%d %H:%M UTC'"));
    if let Some(c) = &args.command {
        let _ = writeln!(md, "- command: `{c}`");
    }
    if let Some(c) = &args.conditions {
        let _ = writeln!(md, "- conditions: {c}");
    }
    let _ = writeln!(md, "- rounds: {rounds} (each server started fresh, with a fresh data directory, for every workload and round; server order rotated every round); figures are medians of the successful rounds");
    let _ = writeln!(md, "\n## Machine\n");
    let _ = writeln!(md, "- `nproc`: {}", sh("nproc"));
    let _ = writeln!(
        md,
        "- CPU: {}",
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'")
    );
    let _ = writeln!(
        md,
        "- memory: {}",
        sh("grep MemTotal /proc/meminfo | awk '{printf \"%.1f GiB\", $2/1048576}'")
    );
    let _ = writeln!(md, "- kernel: {}", sh("uname -sr"));
    let _ = writeln!(
        md,
        "- disk (data dirs under `{work}`): {}",
        sh(&format!(
            "df -hT {work} | tail -1 | awk '{{print $1\" \"$2\", \"$3\" total\"}}'"
        ))
    );
    if let Some(ms) = fsync_probe(&Path::new(work).join("probe")) {
        let _ = writeln!(
            md,
            "- one 4 KiB write + `fdatasync` on that disk: {ms:.3} ms (median of 200)"
        );
    }
    let _ = writeln!(md, "- servers: ours = `target/release/durable-streams-server dev` (`--data-dir` for the file engine); upstream = `durable-streams` 0.1.5 from crates.io (`--durability memory|wal`); node = `@durable-streams/server` (see bench/node/package-lock.json), in-memory or `dataDir`");
    let _ = writeln!(md, "- pinning: each server runs under `taskset -c 0`, the load generator under `taskset -c 1` (one core each)");
    md.push_str(METHOD);

    // Targets.
    let _ = writeln!(
        md,
        "\n## Targets of issue 5 (ours-file / upstream-wal, same run)\n"
    );
    let _ = writeln!(md, "| target | ratio | met? |\n| --- | --- | --- |");
    let t = |md: &mut String, name: &str, r: f64, ok: bool| {
        let _ = writeln!(
            md,
            "| {name} | {} | {} |",
            fmt(r),
            if r.is_nan() {
                "no data"
            } else if ok {
                "yes"
            } else {
                "**no**"
            }
        );
    };
    for (v, th) in [("append-16-streams", 1.0), ("append-16-hot", 1.0)] {
        let r = d.ratio(v, "ours-file", "upstream-wal", "ops_s");
        t(
            &mut md,
            &format!("durable appends `{v}` ≥ {th}"),
            r,
            r >= th,
        );
    }
    for (v, th) in [("append-256-streams", 1.25), ("append-256-hot", 1.25)] {
        let r = d.ratio(v, "ours-file", "upstream-wal", "ops_s");
        t(
            &mut md,
            &format!("durable appends `{v}` ≥ {th}"),
            r,
            r >= th,
        );
    }
    for v in ["append-16-streams", "append-256-streams"] {
        let r = d.ratio(v, "ours-file", "upstream-wal", "cpu_us_per_op");
        t(
            &mut md,
            &format!("server CPU per append `{v}` ≤ 0.8"),
            r,
            r <= 0.8,
        );
    }
    let r = d.ratio("producer-pipe4", "ours-file", "upstream-wal", "ops_s");
    t(&mut md, "pipelined producer throughput ≥ 1.5", r, r >= 1.5);
    let g = d.med("producer-pipe4", "ours-file", "gap_409");
    let _ = writeln!(
        md,
        "| pipelined producer: zero 409 gap retries (ours-file count) | {} | {} |",
        fmt(g),
        if g == 0.0 { "yes" } else { "**no**" }
    );
    let r = d.ratio("catchup", "ours-file", "upstream-wal", "mb_s");
    t(&mut md, "catch-up MB/s ≥ 1.0", r, r >= 1.0);
    let r = d.ratio("catchup", "ours-file", "upstream-wal", "cpu_ms_per_mb");
    t(&mut md, "catch-up CPU per MB ≤ 1.0", r, r <= 1.0);
    let r = d.ratio("replay", "ours-file", "upstream-wal", "events_s");
    t(&mut md, "JSON replay events/s ≥ 1.0", r, r >= 1.0);
    let r = d.ratio("fanout-sse", "ours-file", "upstream-wal", "p99_ms");
    t(&mut md, "SSE fan-out p99 ≤ 1.0", r, r <= 1.0);
    let r = d.ratio("fanout-longpoll", "ours-file", "upstream-wal", "p99_ms");
    t(&mut md, "long-poll fan-out p99 ≤ 1.0", r, r <= 1.0);
    let r = d.ratio("idle-sse", "ours-file", "upstream-wal", "kb_per_conn");
    t(&mut md, "idle SSE memory per connection ≤ 1.0", r, r <= 1.0);
    let r = d.ratio("append-16-streams", "ours-file", "node-file", "ops_s");
    t(
        &mut md,
        "durable appends ≥ 20× node-file (`append-16-streams`)",
        r,
        r >= 20.0,
    );
    let r = d.ratio("append-256-streams", "ours-file", "node-file", "ops_s");
    t(
        &mut md,
        "durable appends ≥ 20× node-file (`append-256-streams`)",
        r,
        r >= 20.0,
    );

    if let Some(notes) = &args.notes {
        if let Ok(n) = std::fs::read_to_string(notes) {
            let _ = writeln!(
                md,
                "\n## Notes on this run (hand-written, from `{notes}`)\n\n{}",
                n.trim()
            );
        }
    }

    // Per-workload tables.
    let _ = writeln!(md, "\n## Results\n");
    let _ = writeln!(md, "Units: `ops_s` operations/s; `*_ms` milliseconds; `mb_s` 10^6 bytes/s; `cpu_us_per_op` server CPU µs (user+system, all threads) per acknowledged operation; `fsync_per_op` fsync-family syscalls per acknowledged operation; `kb_*` KiB. Ratios are ours/theirs of the medians: above 1 is better for throughputs, below 1 is better for latencies and costs.\n");
    for v in VARIANTS {
        let Some(runs) = d.runs.get(v) else { continue };
        let mut metrics: BTreeSet<String> = BTreeSet::new();
        if let Some(s) = d.vals.get(v) {
            for m in s.values() {
                metrics.extend(m.keys().cloned());
            }
        }
        let metrics: Vec<String> = metrics.into_iter().collect();
        let _ = writeln!(md, "### {v}\n\n{}\n", describe(v));
        let _ = write!(md, "| server | ok runs |");
        for m in &metrics {
            let _ = write!(md, " {m} |");
        }
        let _ = write!(md, "\n| --- | --- |");
        for _ in &metrics {
            md.push_str(" --- |");
        }
        md.push('\n');
        for k in ALL {
            let Some((ok, total, _)) = runs.get(k.name()) else {
                continue;
            };
            let _ = write!(md, "| {} | {ok}/{total} |", k.name());
            for m in &metrics {
                let _ = write!(md, " {} |", fmt(d.med(v, k.name(), m)));
            }
            md.push('\n');
        }
        for (a, b, label) in PAIRS {
            if !(runs.contains_key(a) && runs.contains_key(b)) {
                continue;
            }
            let _ = write!(md, "| *{label}* | |");
            for m in &metrics {
                let _ = write!(md, " *{}* |", fmt(d.ratio(v, a, b, m)));
            }
            md.push('\n');
        }
        for k in ALL {
            if let Some((_, _, errs)) = runs.get(k.name()) {
                for e in errs {
                    let _ = writeln!(md, "\n- **{} failed** {e}", k.name());
                }
            }
        }
        md.push('\n');
    }
    std::fs::write(md_path, md)?;
    std::fs::write(svg_path, svg(&d))?;
    eprintln!("wrote {md_path} and {svg_path}");
    Ok(())
}

const METHOD: &str = "
## Method

Every figure counts only 2xx responses, and everything written is read back
and verified after the measured phase (a verification failure fails the run).

| workload | what runs |
| --- | --- |
| append-N-streams / append-N-hot | N connections, each appending 256 B records (`POST`, binary stream) back to back for the run's duration, each to its own stream / all to one stream. Records carry writer id + sequence number; read back, every writer's records must be present once, in order. |
| producer-seq / producer-pipe4 | 8 idempotent producers (`Producer-Id/Epoch/Seq`), each on its own stream, 1 / 4 requests in flight per producer (4 connections). On a 409 sequence gap the client waits for the predecessor's acknowledgement and retries; the 409s are counted. Read back: each producer's seqs exactly once, in order. |
| catchup | a 64 MiB binary stream (filled in 256 KiB appends), read from offset -1 to the tail 3 times by each of 4 concurrent readers, every byte compared. |
| replay | 100,000 JSON events of ~100 B (appended as arrays of 1,000), read from offset -1 to the tail 3 times by a consumer on a connection of its own (not the producer's); every response parsed, ids checked in order. |
| fanout-sse / fanout-longpoll | 200 subscribers on one JSON stream (SSE, or long-poll echoing the cursor); one writer appends 100 messages/s for 10 s, each carrying its send time (wall clock); delivery latency = receive time − send time, same clock. SSE: receive time = when the bytes reached the subscriber's socket (the kernel's `SO_TIMESTAMPNS` receive timestamp), as the generator's one core reads a burst of 200 events more slowly than the servers write it; `read_p50_ms`/`read_p99_ms` give the time the generator read them. Long-poll: when the response was read. Order and duplicates checked. |
| idle-sse | 2,000 SSE connections on one stream, idle; (RSS after − RSS before) / 2,000; then one append must reach all of them. |
| streams | 100,000 streams created by `PUT` with a ~45 B first message, 64 connections; RSS and data-dir growth (allocated blocks) per stream; a sample of 500 read back. |

The load generator (`ds-bench`, one core) sends appends, producer requests
and catch-up reads through a lean HTTP/1.1 client of its own (one request in
flight per connection, each written with one `write`, the response head
parsed in place, a catch-up body compared as it arrives in one reused
buffer); reads for fan-out and replay use hyper's client or a plain socket.
With hyper's client for everything, the generator's core was saturated at
256 connections (~15 µs per append) and in catch-up reads while the
servers' cores still had time to spare, so every server met the same
ceiling and the throughput ratios said little. The generator allocates
with mimalloc: with glibc's allocator, a replay read in 1 MiB responses
spent much of the generator's core faulting in each response's freshly
mapped body, a cost that grows with the number of responses, not with the
server's work. A generator core that is still the limit shows as a ratio
near 1.0 with a lower CPU per operation.

Server CPU is utime+stime from `/proc/PID/stat` over the measured phase; memory is VmRSS/VmHWM from `/proc/PID/status`.
fsync calls are counted by the kernel: `perf stat -e syscalls:sys_enter_{fsync,fdatasync,syncfs,sync_file_range,msync} -p PID`
over the measured phase (all threads). Writes opened with O_SYNC/O_DSYNC would not be counted; neither Rust server uses them (both call `fdatasync`).
";

fn describe(v: &str) -> &'static str {
    match v {
        "append-16-streams" => "Durable appends, 256 B, 16 connections, one stream each.",
        "append-16-hot" => "Durable appends, 256 B, 16 connections, all on one hot stream.",
        "append-256-streams" => "Durable appends, 256 B, 256 connections, one stream each.",
        "append-256-hot" => "Durable appends, 256 B, 256 connections, all on one hot stream.",
        "producer-seq" => "Idempotent producers, one request in flight each.",
        "producer-pipe4" => "Idempotent producers, 4 requests in flight each.",
        "catchup" => "Catch-up read of a 64 MiB stream by 4 readers.",
        "replay" => "Replay of 100,000 JSON events from offset -1.",
        "fanout-sse" => "Live fan-out to 200 SSE subscribers, 100 appends/s.",
        "fanout-longpoll" => "Live fan-out to 200 long-poll subscribers, 100 appends/s.",
        "idle-sse" => "2,000 idle SSE connections.",
        "streams" => "100,000 streams.",
        _ => "",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Horizontal bars on a log scale of "advantage" (>1: ours better), one group
/// per metric, one bar per comparison.
fn svg(d: &Data) -> String {
    let colors = ["#1f6feb", "#7ab7ff", "#d1242f", "#ff9a9f"];
    let (lo, hi) = (0.1f64, 100.0f64);
    let left = 300.0;
    let width = 560.0;
    let bar = 11.0;
    let group = bar * 4.0 + 10.0;
    let top = 70.0;
    let h = top + group * CHART.len() as f64 + 40.0;
    let x =
        |v: f64| left + (v.clamp(lo, hi).log10() - lo.log10()) / (hi.log10() - lo.log10()) * width;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{h}" font-family="sans-serif" font-size="11">"#,
        left + width + 80.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="14" font-weight="bold">Durable Streams servers: our advantage per metric (log scale; right of 1 = ours better)</text>"#
    );
    for (i, (_, _, label)) in PAIRS.iter().enumerate() {
        let lx = 10.0 + i as f64 * 210.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="30" width="12" height="10" fill="{}"/><text x="{}" y="39">{}</text>"#,
            colors[i],
            lx + 16.0,
            esc(label)
        );
    }
    for t in [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0] {
        let xx = x(t);
        let _ = writeln!(
            s,
            r#"<line x1="{xx}" y1="{}" x2="{xx}" y2="{}" stroke="{}" stroke-width="{}"/><text x="{xx}" y="{}" text-anchor="middle">{t}×</text>"#,
            top - 8.0,
            h - 30.0,
            if t == 1.0 { "black" } else { "lightgray" },
            if t == 1.0 { 1.5 } else { 1.0 },
            h - 16.0
        );
    }
    for (gi, (v, m)) in CHART.iter().enumerate() {
        let gy = top + gi as f64 * group;
        let dir = if higher_is_better(m) {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{} {}</text>"#,
            left - 8.0,
            gy + 2.0 * bar,
            esc(v),
            esc(m)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end" fill="gray" font-size="9">({dir})</text>"#,
            left - 8.0,
            gy + 3.0 * bar
        );
        for (pi, (a, b, _)) in PAIRS.iter().enumerate() {
            let r = d.ratio(v, a, b, m);
            let y = gy + pi as f64 * bar;
            if r.is_nan() || r <= 0.0 || r.is_infinite() {
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" fill="gray" font-size="9">no data</text>"#,
                    x(1.0) + 4.0,
                    y + bar - 2.0
                );
                continue;
            }
            let adv = if higher_is_better(m) { r } else { 1.0 / r };
            let (x0, x1) = (x(1.0).min(x(adv)), x(1.0).max(x(adv)));
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"#,
                (x1 - x0).max(1.0),
                bar - 2.0,
                colors[pi]
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="9">ours/theirs {}</text>"#,
                x1 + 3.0,
                y + bar - 3.0,
                fmt(r)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
