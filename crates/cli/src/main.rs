//! `durable-stream`: create, write, read, inspect, close, fork and delete
//! Durable Streams from the command line.

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use durable_streams_client::{
    AppendOptions, Client, CreateOptions, DurableStream, Error, ForkOptions, LiveMode,
    ProducerOptions, RetryPolicy, StreamOptions,
};
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

const EXIT_CODES: &str = "\
Exit codes:
  0  success (read: the stream was closed, or caught up with --no-follow)
  1  other error
  2  invalid usage
  3  stream not found (404) or gone (410)
  4  conflict: exists with another configuration, stream closed, sequence conflict (409)
  5  network error (server unreachable, connection lost)
  6  request rejected (400, 403, 413)";

/// Command-line client for Durable Streams servers.
#[derive(Parser, Debug)]
#[command(name = "durable-stream", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Base URL of the stream server.
    #[arg(
        long,
        env = "STREAM_URL",
        default_value = "http://localhost:4437/v1/stream",
        global = true
    )]
    url: String,
    /// Authorization header value (e.g. "Bearer my-token").
    #[arg(long, env = "STREAM_AUTH", global = true, hide_env_values = true)]
    auth: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a stream (succeeds if it exists with the same configuration).
    Create {
        stream_id: String,
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        /// Shorthand for --content-type application/json.
        #[arg(long)]
        json: bool,
        /// Sliding time-to-live in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        /// Absolute expiry (RFC 3339).
        #[arg(long)]
        expires_at: Option<String>,
        /// Create it closed (with the optional content as its whole body).
        #[arg(long)]
        closed: bool,
        /// Initial content.
        content: Option<String>,
    },
    /// Write data from the argument or stdin (large stdin goes through an exactly-once producer).
    Write {
        stream_id: String,
        /// Content (escapes \n \t \r \\ are converted); stdin if absent.
        content: Option<String>,
        /// Accepted for compatibility; the stream's own content type is always used.
        #[arg(long)]
        content_type: Option<String>,
        /// The content is one JSON value (one message).
        #[arg(long)]
        json: bool,
        /// The content is a JSON array; store each element as a message.
        #[arg(long)]
        batch_json: bool,
        /// Close the stream with this write (atomically).
        #[arg(long)]
        close: bool,
    },
    /// Print the stream's data, then follow it until it is closed.
    Read {
        stream_id: String,
        /// Start offset: -1 (beginning), now, or a saved offset.
        #[arg(long, default_value = "-1")]
        from: String,
        /// Stop once caught up instead of following.
        #[arg(long)]
        no_follow: bool,
        /// Live mode when following: auto, sse or long-poll.
        #[arg(long, default_value = "auto")]
        live: String,
        /// Print the offset to resume from on stderr at the end.
        #[arg(long)]
        print_offset: bool,
    },
    /// Show metadata: content type, tail offset, closure, TTL, expiry.
    Head { stream_id: String },
    /// Close the stream (EOF for readers), optionally with a final message.
    Close {
        stream_id: String,
        content: Option<String>,
    },
    /// Fork a stream into a new one sharing its data up to an offset.
    Fork {
        source_id: String,
        target_id: String,
        /// Divergence offset (default: the source's tail).
        #[arg(long)]
        offset: Option<String>,
    },
    /// Delete a stream.
    Delete { stream_id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Error>() {
        Some(Error::NotFound { .. } | Error::Gone { .. }) => 3,
        Some(
            Error::Conflict { .. }
            | Error::StreamClosed { .. }
            | Error::SequenceConflict { .. }
            | Error::SequenceGap { .. },
        ) => 4,
        Some(Error::Network(_)) => 5,
        Some(
            Error::BadRequest { .. } | Error::StaleEpoch { .. } | Error::PayloadTooLarge { .. },
        ) => 6,
        Some(Error::InvalidArgument(_)) => 2,
        _ => 1,
    }
}

fn stream_url(base: &str, id: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        id.trim_start_matches('/')
    )
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(o) => {
                out.push('\\');
                out.push(o);
            }
            None => out.push('\\'),
        }
    }
    out
}

async fn run(cli: Cli) -> Result<()> {
    // Scripts want an answer soon: a few retries, short backoff.
    let retry = RetryPolicy {
        max_retries: 4,
        max_backoff: std::time::Duration::from_secs(2),
        ..RetryPolicy::default()
    };
    let mut builder = Client::builder().retry_policy(retry);
    if let Some(auth) = &cli.auth {
        builder = builder.header("authorization", auth);
    }
    let client = builder.build()?;
    let handle = |id: &str| DurableStream::with_client(&client, &stream_url(&cli.url, id));
    match cli.command {
        Command::Create {
            stream_id,
            content_type,
            json,
            ttl,
            expires_at,
            closed,
            content,
        } => {
            let s = handle(&stream_id)?;
            let mut o = CreateOptions::new().content_type(if json {
                "application/json".to_string()
            } else {
                content_type
            });
            o.ttl_secs = ttl;
            if let Some(at) = expires_at {
                let at = chrono_parse(&at)?;
                o.expires_at = Some(at);
            }
            o.closed = closed;
            o.body = content.map(|c| Bytes::from(unescape(&c)));
            let out = s.create_stream(o).await?;
            eprintln!(
                "{} {}",
                if out.created { "created" } else { "exists" },
                s.url()
            );
        }
        Command::Write {
            stream_id,
            content,
            content_type: _,
            json,
            batch_json,
            close,
        } => {
            let s = handle(&stream_id)?;
            match content {
                Some(c) => {
                    write_once(&s, Bytes::from(unescape(&c)), json, batch_json, close).await?
                }
                None => {
                    let stdin = std::io::stdin();
                    if stdin.is_terminal() {
                        anyhow::bail!(Error::InvalidArgument(
                            "no content: give it as an argument or pipe it to stdin".into()
                        ));
                    }
                    if json || batch_json || s.is_json().await? {
                        let mut buf = Vec::new();
                        stdin
                            .lock()
                            .read_to_end(&mut buf)
                            .context("reading stdin")?;
                        write_once(&s, Bytes::from(buf), json, batch_json, close).await?;
                    } else {
                        write_stdin_bytes(&s, close).await?;
                    }
                }
            }
        }
        Command::Read {
            stream_id,
            from,
            no_follow,
            live,
            print_offset,
        } => {
            let s = handle(&stream_id)?;
            let live = match (no_follow, live.as_str()) {
                (true, _) => LiveMode::Off,
                (false, "auto") => LiveMode::Auto,
                (false, "sse") => LiveMode::Sse,
                (false, "long-poll") => LiveMode::LongPoll,
                (false, other) => anyhow::bail!(Error::InvalidArgument(format!(
                    "unknown live mode {other:?}"
                ))),
            };
            let mut r = s
                .stream(StreamOptions::new().offset(from.as_str()).live(live))
                .await?;
            let json = r.is_json();
            let stdout = std::io::stdout();
            while let Some(b) = r.next_batch().await? {
                let mut out = stdout.lock();
                if json {
                    for item in b.raw_items()? {
                        writeln!(out, "{}", item.get())?;
                    }
                } else {
                    out.write_all(&b.data)?;
                }
                out.flush()?;
            }
            if print_offset {
                eprintln!("offset: {}", r.offset());
            }
        }
        Command::Head { stream_id } => {
            let info = handle(&stream_id)?.head().await?;
            println!("content-type: {}", info.content_type.unwrap_or_default());
            println!("next-offset: {}", info.next_offset);
            println!("closed: {}", info.closed);
            if let Some(t) = info.ttl_secs {
                println!("ttl: {t}");
            }
            if let Some(e) = info.expires_at {
                println!("expires-at: {e}");
            }
        }
        Command::Close { stream_id, content } => {
            let s = handle(&stream_id)?;
            let out = match content {
                Some(c) => s.close_with(Bytes::from(unescape(&c))).await?,
                None => s.close().await?,
            };
            println!("{}", out.final_offset);
        }
        Command::Fork {
            source_id,
            target_id,
            offset,
        } => {
            let src = handle(&source_id)?;
            let target = stream_url(&cli.url, &target_id);
            let fork = src
                .fork(
                    &target,
                    ForkOptions {
                        offset,
                        ..ForkOptions::default()
                    },
                )
                .await?;
            eprintln!("forked {} -> {}", src.url(), fork.url());
        }
        Command::Delete { stream_id } => {
            handle(&stream_id)?.delete().await?;
            eprintln!("deleted {}", stream_url(&cli.url, &stream_id));
        }
    }
    Ok(())
}

fn chrono_parse(s: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| anyhow::anyhow!(Error::InvalidArgument(format!("--expires-at {s:?}: {e}"))))
}

async fn write_once(
    s: &DurableStream,
    data: Bytes,
    json: bool,
    batch_json: bool,
    close: bool,
) -> Result<()> {
    if (json || batch_json) && serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_err() {
        anyhow::bail!(Error::InvalidArgument(
            "the content is not valid JSON".into()
        ));
    }
    let o = AppendOptions {
        close,
        json_batch: batch_json,
        ..AppendOptions::default()
    };
    let out = s.append_with(data, o).await?;
    eprintln!("next offset: {}", out.next_offset);
    Ok(())
}

/// Streams stdin in chunks through an idempotent producer (each chunk is
/// retried safely), with a progress bar when stderr is a terminal.
async fn write_stdin_bytes(s: &DurableStream, close: bool) -> Result<()> {
    const CHUNK: usize = 1024 * 1024;
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {bytes} written ({bytes_per_sec}) {elapsed}",
    ) {
        bar.set_style(style);
    }
    let interactive = std::io::stderr().is_terminal();
    if !interactive {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let id = format!(
        "cli-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    let producer = s.producer(
        &id,
        ProducerOptions {
            max_batch_bytes: CHUNK,
            ..ProducerOptions::default()
        },
    )?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut buf = vec![0u8; CHUNK];
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(buf)).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let mut total = 0u64;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.context("reading stdin")?;
        total += chunk.len() as u64;
        producer.append(chunk)?;
        bar.set_position(total);
    }
    if total == 0 {
        producer.detach().await?;
        if close {
            let out = s.close().await?;
            eprintln!("stdin was empty; closed at {}", out.final_offset);
            return Ok(());
        }
        anyhow::bail!(Error::InvalidArgument("stdin was empty".into()));
    }
    if close {
        let out = producer.close(None).await?;
        bar.finish_and_clear();
        eprintln!("wrote {total} bytes; closed at {}", out.final_offset);
    } else {
        producer.flush().await?;
        bar.finish_and_clear();
        let offset = producer.stats().last_offset.unwrap_or_default();
        producer.detach().await?;
        eprintln!("wrote {total} bytes; next offset: {offset}");
    }
    Ok(())
}
