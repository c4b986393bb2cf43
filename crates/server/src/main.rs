//! `durable-streams-server`: parses arguments and runs the library.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use durable_streams_protocol::parse::parse_duration;
use durable_streams_server::{Server, ServerConfig};
use durable_streams_storage::{Engine, FileEngine, FileOptions, MemoryEngine};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "durable-streams-server", version, about = "A Durable Streams protocol server.", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Zero-configuration development server: in-memory (or durable with
    /// --data-dir), 127.0.0.1:4437, streams under /v1/stream/*.
    Dev(ServeArgs),
    /// Production server: the durable file engine; requires --data-dir.
    Run(ServeArgs),
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("invalid duration {s:?} (use e.g. 500ms, 30s, 2m)"))
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port to listen on (0 picks a free port; the chosen address is logged).
    #[arg(long, default_value_t = 4437)]
    port: u16,
    /// How long a long-poll read waits for data before answering 204.
    #[arg(long, value_parser = duration, default_value = "30s")]
    long_poll_timeout: Duration,
    /// How long an SSE connection stays open before the server closes it
    /// (clients reconnect from their last offset; lets CDNs collapse).
    #[arg(long, value_parser = duration, default_value = "60s")]
    sse_reconnect_interval: Duration,
    /// Width of the cursor interval used for CDN cache-busting cursors.
    #[arg(long, value_parser = duration, default_value = "20s")]
    cursor_interval: Duration,
    /// Largest request body accepted for an append or create, in bytes (413 above).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_append_bytes: u64,
    /// Largest catch-up response body, in bytes; longer reads are cut and
    /// the client continues from Stream-Next-Offset.
    #[arg(long, default_value_t = 1024 * 1024)]
    read_chunk_bytes: usize,
    /// Largest request head (request line and headers), in bytes (431 above; minimum 8192).
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Maximum concurrent live readers (long-poll and SSE) in total; more get 503 with Retry-After.
    #[arg(long, default_value_t = 50_000)]
    max_live_readers: usize,
    /// Maximum concurrent live readers on a single stream.
    #[arg(long, default_value_t = 10_000)]
    max_live_readers_per_stream: usize,
    /// Maximum concurrent connections; further connections wait to be accepted.
    #[arg(long, default_value_t = 60_000)]
    max_connections: usize,
    /// How long an idempotent producer's out-of-order request (a sequence
    /// gap) waits for its predecessor before answering 409 (0 disables).
    #[arg(long, value_parser = duration, default_value = "20ms")]
    producer_reorder_wait: Duration,
    /// URL path under which streams live.
    #[arg(long, default_value = "/v1/stream")]
    path_prefix: String,
    /// How long shutdown (SIGINT/SIGTERM) waits for in-flight requests.
    #[arg(long, value_parser = duration, default_value = "10s")]
    shutdown_grace: Duration,
    /// Directory of the durable file engine (created if missing). Without
    /// it, `dev` keeps streams in memory; `run` requires it.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Data files the file engine keeps open at once.
    #[arg(long, default_value_t = 1024)]
    max_open_files: usize,
    /// How often the file engine checkpoints (bounds WAL replay at start-up).
    #[arg(long, value_parser = duration, default_value = "30s")]
    checkpoint_interval: Duration,
}

fn config_from(a: &ServeArgs) -> anyhow::Result<ServerConfig> {
    if !a.path_prefix.starts_with('/') {
        bail!("--path-prefix must start with '/'");
    }
    if a.read_chunk_bytes == 0 || a.max_live_readers == 0 || a.max_connections == 0 {
        bail!("--read-chunk-bytes, --max-live-readers and --max-connections must be positive");
    }
    Ok(ServerConfig {
        host: a.host.clone(),
        port: a.port,
        path_prefix: a.path_prefix.trim_end_matches('/').to_owned(),
        long_poll_timeout: a.long_poll_timeout,
        sse_reconnect_interval: a.sse_reconnect_interval,
        cursor_interval: a.cursor_interval.max(Duration::from_secs(1)),
        max_append_bytes: a.max_append_bytes,
        read_chunk_bytes: a.read_chunk_bytes,
        max_header_bytes: a.max_header_bytes,
        max_live_readers: a.max_live_readers,
        max_live_readers_per_stream: a.max_live_readers_per_stream,
        max_connections: a.max_connections,
        shutdown_grace: a.shutdown_grace,
        producer_reorder_wait: a.producer_reorder_wait,
        ..ServerConfig::default()
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, no backtrace: this is for operators.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let (args, production) = match cli.command {
        Command::Dev(a) => (a, false),
        Command::Run(a) => (a, true),
    };
    if production && args.data_dir.is_none() {
        bail!("`run` needs --data-dir DIR (use `dev` for an in-memory server)");
    }
    let config = config_from(&args)?;
    let (engine, engine_name): (Arc<dyn Engine>, &str) = match &args.data_dir {
        None => (Arc::new(MemoryEngine::new()), "memory"),
        Some(dir) => {
            let opts = FileOptions {
                max_open_files: args.max_open_files.max(16),
                checkpoint_interval: args.checkpoint_interval,
                ..FileOptions::default()
            };
            let started = std::time::Instant::now();
            let e = FileEngine::open(dir, opts)
                .with_context(|| format!("cannot open data directory {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), recovery_ms = started.elapsed().as_millis() as u64, "file engine ready");
            (Arc::new(e), "file")
        }
    };
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, prefix = %config.path_prefix, engine = engine_name, "durable-streams-server listening");
    let mut builder = Server::builder().config(config).engine(engine);
    if let Some(dir) = &args.data_dir {
        builder = builder.subscriptions_dir(dir.join("subscriptions"));
    }
    let server = builder
        .try_build()
        .context("cannot open subscription state")?;
    server.run(listener, shutdown_signal()).await?;
    Ok(())
}
