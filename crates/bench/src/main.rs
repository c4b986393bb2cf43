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
mod raw;
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

/// The generator's allocator. With glibc's, reading 1 MiB responses (a
/// JSON replay) spent much of the generator's core in page faults: each
/// response's body is a fresh large allocation that glibc maps or trims
/// back to the kernel when freed, so the next one faults its pages in again.
/// That cost grows with the number of responses per byte, so it charged a
/// server answering in 1 MiB pieces for the generator's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Record {
    pub variant: String,
    pub server: String,
    pub round: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub metrics: BTreeMap<String, f64>,
}

/// Load generator and benchmark driver for Durable Streams servers.
#[derive(clap::Parser, Debug)]
#[command(name = "ds-bench", version)]
enum Cli {
    /// Runs workloads against servers; one JSON line per run to the results file.
    Run(RunArgs),
    /// Turns a results file into docs/benchmarks.md and its SVG chart.
    Report(report::ReportArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Our server binary (`durable-streams-server`).
    #[arg(long, value_name = "BIN")]
    ours: PathBuf,
    /// The upstream Rust server's binary.
    #[arg(long, value_name = "BIN")]
    upstream: Option<PathBuf>,
    /// Directory with the Node reference server installed (node_modules).
    #[arg(long, value_name = "DIR")]
    node_dir: Option<PathBuf>,
    /// Servers, comma-separated: ours-mem ours-file upstream-mem upstream-wal
    /// node-mem node-file (default: all; ours only with --smoke).
    #[arg(long, value_name = "LIST")]
    servers: Option<String>,
    /// Workload name prefixes, comma-separated: append-16-streams
    /// append-16-hot append-256-streams append-256-hot producer-seq
    /// producer-pipe4 catchup replay fanout-sse fanout-longpoll idle-sse
    /// streams (default: all).
    #[arg(long, value_name = "LIST")]
    workloads: Option<String>,
    /// Rounds per workload and server (default 3; 1 with --smoke).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds of measurement per run.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Small sizes, to check that everything runs and verifies, not speed.
    #[arg(long)]
    smoke: bool,
    /// CPUs the servers are pinned to (`taskset -c` list).
    #[arg(long, value_name = "LIST")]
    server_cpus: Option<String>,
    /// Data directories and logs go here.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    work_dir: PathBuf,
    /// Results file (default: WORK_DIR/results.jsonl); appended to.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = <Cli as clap::Parser>::parse();
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli {
        Cli::Run(args) => rt.block_on(run(args)),
        Cli::Report(args) => rt.block_on(report::report(&args)),
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

async fn run(args: RunArgs) -> Result<()> {
    let smoke = args.smoke;
    let bins = Binaries {
        ours: args.ours,
        upstream: args.upstream,
        node_dir: args.node_dir,
        server_cpus: args.server_cpus,
    };
    let servers: Vec<Kind> = match args.servers {
        Some(s) => s
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| Kind::parse(x).ok_or_else(|| anyhow!("unknown server {x}")))
            .collect::<Result<_>>()?,
        None if smoke => vec![Kind::OursMem, Kind::OursFile],
        None => servers::ALL.to_vec(),
    };
    let variants: Vec<&str> = match &args.workloads {
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
    let rounds = args.rounds.unwrap_or(if smoke { 1 } else { 3 });
    let scale = if smoke {
        Scale::smoke()
    } else {
        Scale::full(args.secs)
    };
    let work = args.work_dir;
    std::fs::create_dir_all(work.join("logs"))?;
    let out = args.out.unwrap_or_else(|| work.join("results.jsonl"));
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
