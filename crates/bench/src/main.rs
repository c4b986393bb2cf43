//! ds-bench: load generator and benchmark driver for Durable Streams servers.
//!
//! `ds-bench run`    starts each server in turn (fresh data dir each time),
//!                   runs each workload against it, alternating servers over
//!                   rounds, and appends one JSON line per run to a results file.
//! `ds-bench report` turns a results file into docs/benchmarks.md + an SVG chart.
//!
//! See scripts/bench.sh for the one-command entry point.

mod conn;
mod procfs;
mod report;
mod servers;
mod workloads;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use servers::{Binaries, Kind};
use workloads::{Ctx, Scale, VARIANTS};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Record {
    pub variant: String,
    pub server: String,
    pub round: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub metrics: BTreeMap<String, f64>,
}

struct Args {
    map: BTreeMap<String, String>,
    flags: Vec<String>,
}

fn parse_args(a: &[String]) -> Result<Args> {
    let mut map = BTreeMap::new();
    let mut flags = Vec::new();
    let mut i = 0;
    while i < a.len() {
        let k = a[i]
            .strip_prefix("--")
            .ok_or_else(|| anyhow!("unexpected argument {}", a[i]))?;
        if k == "smoke" {
            flags.push(k.to_string());
            i += 1;
        } else {
            let v = a.get(i + 1).ok_or_else(|| anyhow!("--{k} needs a value"))?;
            map.insert(k.to_string(), v.clone());
            i += 2;
        }
    }
    Ok(Args { map, flags })
}

const USAGE: &str = "usage:
  ds-bench run --ours BIN [--upstream BIN] [--node-dir DIR] [--servers a,b,..] [--workloads p,..]
               [--rounds N] [--secs S] [--smoke] [--server-cpus LIST] [--work-dir DIR] [--out FILE]
  ds-bench report --results FILE --md FILE --svg FILE [--command STR] [--conditions STR] [--notes FILE] [--work-dir DIR]
servers: ours-mem ours-file upstream-mem upstream-wal node-mem node-file
workloads (prefixes): append-16-streams append-16-hot append-256-streams append-256-hot producer-seq
  producer-pipe4 catchup replay fanout-sse fanout-longpoll idle-sse streams";

fn main() -> Result<()> {
    raise_nofile();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let args = parse_args(&argv[1..])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cmd.as_str() {
        "run" => rt.block_on(run(args)),
        "report" => rt.block_on(report::report(&args.map)),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

async fn run(args: Args) -> Result<()> {
    let smoke = args.flags.iter().any(|f| f == "smoke");
    let get = |k: &str| args.map.get(k).cloned();
    let ours = PathBuf::from(get("ours").ok_or_else(|| anyhow!("--ours BIN is required"))?);
    let bins = Binaries {
        ours,
        upstream: get("upstream").map(PathBuf::from),
        node_dir: get("node-dir").map(PathBuf::from),
        server_cpus: get("server-cpus"),
    };
    let servers: Vec<Kind> = match get("servers") {
        Some(s) => s
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| Kind::parse(x).ok_or_else(|| anyhow!("unknown server {x}")))
            .collect::<Result<_>>()?,
        None if smoke => vec![Kind::OursMem, Kind::OursFile],
        None => servers::ALL.to_vec(),
    };
    let variants: Vec<&str> = match get("workloads") {
        Some(w) => {
            let pre: Vec<&str> = w.split(',').filter(|x| !x.is_empty()).collect();
            VARIANTS
                .iter()
                .copied()
                .filter(|v| pre.iter().any(|p| v.starts_with(p)))
                .collect()
        }
        None => VARIANTS.to_vec(),
    };
    if variants.is_empty() {
        bail!("no workload matches");
    }
    let rounds: usize = get("rounds")
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(if smoke { 1 } else { 3 });
    let secs: f64 = get("secs").map(|r| r.parse()).transpose()?.unwrap_or(5.0);
    let scale = if smoke {
        Scale::smoke()
    } else {
        Scale::full(secs)
    };
    let work = PathBuf::from(get("work-dir").unwrap_or_else(|| "target/bench".into()));
    std::fs::create_dir_all(work.join("logs"))?;
    let out = PathBuf::from(
        get("out").unwrap_or_else(|| work.join("results.jsonl").to_string_lossy().to_string()),
    );
    let mut outf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .with_context(|| format!("open {}", out.display()))?;
    let count_fsync = procfs::perf_available().await;
    if !count_fsync {
        eprintln!("ds-bench: `perf stat` cannot count syscall tracepoints here; fsync counts will be missing");
    }
    let timeout = Duration::from_secs(if smoke { 120 } else { 600 });
    let mut failures = 0;
    for variant in &variants {
        for round in 0..rounds {
            // Alternate: rotate the server order every round.
            let mut order = servers.clone();
            order.rotate_left(round % servers.len().max(1));
            for kind in order {
                let tag = format!("{variant}-{}-r{round}", kind.name());
                let data_dir = work.join("data").join(&tag);
                let log = work.join("logs").join(format!("{tag}.log"));
                let mut rec = Record {
                    variant: variant.to_string(),
                    server: kind.name().into(),
                    round,
                    ok: false,
                    error: None,
                    metrics: BTreeMap::new(),
                };
                match servers::start(kind, &bins, &data_dir, &log).await {
                    Err(e) => rec.error = Some(format!("{e:#}")),
                    Ok(mut srv) => {
                        let ctx = Ctx {
                            srv: &srv,
                            scale: &scale,
                            count_fsync,
                            tmp: work.clone(),
                        };
                        match tokio::time::timeout(timeout, workloads::run(variant, &ctx)).await {
                            Ok(Ok(m)) => {
                                rec.ok = true;
                                rec.metrics = m.into_iter().collect();
                            }
                            Ok(Err(e)) => rec.error = Some(format!("{e:#}")),
                            Err(_) => {
                                rec.error = Some(format!("timed out after {}s", timeout.as_secs()))
                            }
                        }
                        srv.stop().await;
                    }
                }
                let _ = std::fs::remove_dir_all(&data_dir);
                if !rec.ok {
                    failures += 1;
                }
                let summary: Vec<String> = rec
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k}={}", report::fmt(*v)))
                    .collect();
                eprintln!(
                    "{tag}: {} {}",
                    if rec.ok { "ok" } else { "FAILED" },
                    rec.error.clone().unwrap_or_else(|| summary.join(" "))
                );
                writeln!(outf, "{}", serde_json::to_string(&rec)?)?;
                outf.flush()?;
            }
        }
    }
    if failures > 0 {
        eprintln!(
            "ds-bench: {failures} run(s) failed (see the results file and {}/logs)",
            work.display()
        );
        if smoke {
            std::process::exit(1);
        }
    }
    Ok(())
}
