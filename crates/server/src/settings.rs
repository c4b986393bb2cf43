//! The configuration file (TOML), its merging with environment variables
//! and command-line flags, and its validation.
//!
//! Precedence, highest first: command-line flags, `DS_*` environment
//! variables (both handled by clap through [`Overrides`]), the file, the
//! defaults. Every section denies unknown keys, so a misspelt key is an
//! error naming the key and its line rather than a silently ignored setting.
//!
//! The auth, compression and rate-limit sections are the structs of their
//! own modules, embedded whole; this module does not look inside them.

use crate::auth::AuthConfig;
use crate::compression::CompressionConfig;
use crate::config::ServerConfig;
use crate::ratelimit::RateLimitConfig;
use durable_streams_protocol::parse::parse_duration;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest configuration file read, in bytes (a config file is a few KiB).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Serde adapter for durations written as strings (`"500ms"`, `"30s"`,
/// `"2m"`, `"1h"`), for `#[serde(with = "crate::settings::duration_str")]`.
pub mod duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} (use e.g. \"500ms\", \"30s\", \"2m\", \"1h\")"
            ))
        })
    }

    /// The shortest exact spelling `parse_duration` reads back.
    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        let (s, sub_ms) = (ms / 1000, ms % 1000);
        match (s / 3600, s % 3600, s / 60, s % 60) {
            _ if sub_ms > 0 => format!("{ms}ms"),
            (h, 0, _, _) if h > 0 => format!("{h}h"),
            (_, _, m, 0) if m > 0 => format!("{m}m"),
            _ => format!("{s}s"),
        }
    }
}

/// The whole configuration file; every section and key is optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSection,
    pub limits: LimitsSection,
    pub timeouts: TimeoutsSection,
    pub tls: TlsSection,
    pub cors: CorsSection,
    pub logging: LoggingSection,
    pub auth: AuthConfig,
    pub compression: CompressionConfig,
    pub rate_limit: RateLimitConfig,
}

/// `[server]`: where to listen and where the data lives.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Listen addresses (`host:port`, `[v6]:port`); TLS ones when `[tls]` is set.
    pub listen: Vec<String>,
    /// Extra cleartext listeners (HTTP/1.1 and h2c), e.g. a local port
    /// beside the TLS one.
    pub plain_listen: Vec<String>,
    /// URL path under which streams live.
    pub path_prefix: String,
    /// Directory of the durable file engine; without it `dev` keeps
    /// streams in memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// The public base URL, used in URLs the server hands out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: vec!["127.0.0.1:4437".into()],
            plain_listen: Vec::new(),
            path_prefix: "/v1/stream".into(),
            data_dir: None,
            public_url: None,
        }
    }
}

/// `[limits]`: sizes and counts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_append_bytes: u64,
    pub read_chunk_bytes: usize,
    pub max_header_bytes: usize,
    pub max_live_readers: usize,
    pub max_live_readers_per_stream: usize,
    pub max_connections: usize,
    pub max_open_files: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let d = ServerConfig::default();
        LimitsSection {
            max_append_bytes: d.max_append_bytes,
            read_chunk_bytes: d.read_chunk_bytes,
            max_header_bytes: d.max_header_bytes,
            max_live_readers: d.max_live_readers,
            max_live_readers_per_stream: d.max_live_readers_per_stream,
            max_connections: d.max_connections,
            max_open_files: 1024,
        }
    }
}

/// `[timeouts]`: durations as strings (`"500ms"`, `"30s"`, `"2m"`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsSection {
    #[serde(with = "duration_str")]
    pub long_poll: Duration,
    #[serde(with = "duration_str")]
    pub sse_reconnect_interval: Duration,
    #[serde(with = "duration_str")]
    pub cursor_interval: Duration,
    #[serde(with = "duration_str")]
    pub shutdown_grace: Duration,
    #[serde(with = "duration_str")]
    pub producer_reorder_wait: Duration,
    #[serde(with = "duration_str")]
    pub checkpoint_interval: Duration,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        let d = ServerConfig::default();
        TimeoutsSection {
            long_poll: d.long_poll_timeout,
            sse_reconnect_interval: d.sse_reconnect_interval,
            cursor_interval: d.cursor_interval,
            shutdown_grace: d.shutdown_grace,
            producer_reorder_wait: d.producer_reorder_wait,
            checkpoint_interval: Duration::from_secs(30),
        }
    }
}

/// `[tls]`: PEM certificate chain and private key. Both or neither.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// A TLS handshake not finished within this is dropped.
    #[serde(with = "duration_str")]
    pub handshake_timeout: Duration,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: None,
            key: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl TlsSection {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

/// `[cors]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CorsSection {
    /// Origins allowed by CORS; `"*"` allows any.
    pub allowed_origins: Vec<String>,
}

impl Default for CorsSection {
    fn default() -> Self {
        CorsSection {
            allowed_origins: vec!["*".into()],
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[logging]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    pub format: LogFormat,
    /// `RUST_LOG` syntax, e.g. `"info"` or `"info,durable_streams_server=debug"`.
    pub level: String,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// A configuration that cannot be used. Names the key (`section.key`) and,
/// when the value came from the file, the file's line and column.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {}{}", location(path, *line_column), key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default(), message)]
    Parse {
        path: PathBuf,
        key: Option<String>,
        line_column: Option<(usize, usize)>,
        message: String,
    },
    #[error("{}key `{key}`: {message}", invalid_location(path, *line_column))]
    Invalid {
        key: String,
        path: Option<PathBuf>,
        line_column: Option<(usize, usize)>,
        message: String,
    },
}

fn location(path: &Path, lc: Option<(usize, usize)>) -> String {
    match lc {
        Some((l, c)) => format!("{}: line {l}, column {c}", path.display()),
        None => path.display().to_string(),
    }
}

fn invalid_location(path: &Option<PathBuf>, lc: Option<(usize, usize)>) -> String {
    match (path, lc) {
        (Some(p), Some(_)) => format!("{}: ", location(p, lc)),
        _ => String::new(),
    }
}

impl SettingsError {
    /// The offending key, `section.key`, when known.
    pub fn key(&self) -> Option<&str> {
        match self {
            SettingsError::Read { .. } => None,
            SettingsError::Parse { key, .. } => key.as_deref(),
            SettingsError::Invalid { key, .. } => Some(key),
        }
    }

    fn invalid(key: &str, message: impl Into<String>) -> Self {
        SettingsError::Invalid {
            key: key.into(),
            path: None,
            line_column: None,
            message: message.into(),
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.chars().count(), |nl| {
        before[nl + 1..].chars().count()
    }) + 1;
    (line, column)
}

/// Where `key` (`section.key`) is written in the TOML `text`, if it is.
pub fn locate_key(text: &str, key: &str) -> Option<(usize, usize)> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut parts = key.split('.');
    let first = parts.next()?;
    let mut value = root.get_ref().get(first)?;
    for part in parts {
        value = value.get_ref().get(part)?;
    }
    Some(line_column(text, value.span().start))
}

impl Settings {
    /// Parses a configuration file's text; `path` is only used in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Settings, SettingsError> {
        let parse_error = |e: toml::de::Error, key: Option<String>| SettingsError::Parse {
            path: path.to_owned(),
            key,
            line_column: e.span().map(|s| line_column(text, s.start)),
            message: e.message().trim().to_owned(),
        };
        let de = toml::Deserializer::parse(text).map_err(|e| parse_error(e, None))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = (key != ".").then_some(key);
            parse_error(e.into_inner(), key)
        })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Settings, SettingsError> {
        let text = read_file(path)?;
        Settings::from_toml(&text, path)
    }

    /// The effective configuration: defaults, then the file (if any), then
    /// `overrides` (flags and environment), validated. Errors in values
    /// taken from the file carry the file's line and column.
    pub fn resolve(file: Option<&Path>, overrides: &Overrides) -> Result<Settings, SettingsError> {
        let (mut settings, text) = match file {
            Some(path) => {
                let text = read_file(path)?;
                (Settings::from_toml(&text, path)?, Some(text))
            }
            None => (Settings::default(), None),
        };
        let overridden = overrides.apply(&mut settings);
        settings.validate().map_err(|e| match (e, file, text) {
            (SettingsError::Invalid { key, message, .. }, Some(path), Some(text))
                if !overridden.contains(&key.as_str()) =>
            {
                SettingsError::Invalid {
                    line_column: locate_key(&text, &key),
                    path: Some(path.to_owned()),
                    key,
                    message,
                }
            }
            (
                SettingsError::Invalid {
                    key,
                    path,
                    line_column,
                    message,
                },
                _,
                _,
            ) if overridden.contains(&key.as_str()) => SettingsError::Invalid {
                message: format!("{message} (set by a command-line flag or environment variable)"),
                key,
                path,
                line_column,
            },
            (e, _, _) => e,
        })?;
        Ok(settings)
    }

    /// Checks values that parse but cannot work; the error names the key.
    /// Reads the TLS certificate and key to check them.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let s = &self.server;
        if s.listen.is_empty() {
            return Err(SettingsError::invalid(
                "server.listen",
                "needs at least one address",
            ));
        }
        for a in &s.listen {
            split_host_port(a).map_err(|m| SettingsError::invalid("server.listen", m))?;
        }
        for a in &s.plain_listen {
            split_host_port(a).map_err(|m| SettingsError::invalid("server.plain_listen", m))?;
        }
        if !s.path_prefix.starts_with('/') {
            return Err(SettingsError::invalid(
                "server.path_prefix",
                format!("{:?} must start with '/'", s.path_prefix),
            ));
        }
        if let Some(u) = &s.public_url {
            check_public_url(u).map_err(|m| SettingsError::invalid("server.public_url", m))?;
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.read_chunk_bytes", l.read_chunk_bytes),
            ("limits.max_live_readers", l.max_live_readers),
            (
                "limits.max_live_readers_per_stream",
                l.max_live_readers_per_stream,
            ),
            ("limits.max_connections", l.max_connections),
        ] {
            if v == 0 {
                return Err(SettingsError::invalid(key, "must be positive"));
            }
        }
        if l.max_append_bytes == 0 {
            return Err(SettingsError::invalid(
                "limits.max_append_bytes",
                "must be positive",
            ));
        }
        if self.timeouts.long_poll.is_zero() {
            return Err(SettingsError::invalid(
                "timeouts.long_poll",
                "must be positive",
            ));
        }
        if self.timeouts.checkpoint_interval.is_zero() {
            return Err(SettingsError::invalid(
                "timeouts.checkpoint_interval",
                "must be positive",
            ));
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => {
                return Err(SettingsError::invalid(
                    "tls.key",
                    "missing: tls.cert is set, so tls.key must be too",
                ))
            }
            (None, Some(_)) => {
                return Err(SettingsError::invalid(
                    "tls.cert",
                    "missing: tls.key is set, so tls.cert must be too",
                ))
            }
            (Some(cert), Some(key)) => {
                crate::tls::load_certified_key(cert, key).map_err(|e| {
                    let k = if e.is_key_error() {
                        "tls.key"
                    } else {
                        "tls.cert"
                    };
                    SettingsError::invalid(k, e.to_string())
                })?;
            }
            (None, None) => {}
        }
        if self.tls.handshake_timeout.is_zero() {
            return Err(SettingsError::invalid(
                "tls.handshake_timeout",
                "must be positive",
            ));
        }
        if self.cors.allowed_origins.is_empty() {
            return Err(SettingsError::invalid(
                "cors.allowed_origins",
                "needs at least one origin (\"*\" allows any)",
            ));
        }
        for o in &self.cors.allowed_origins {
            if o != "*" && http::HeaderValue::from_str(o).is_err() {
                return Err(SettingsError::invalid(
                    "cors.allowed_origins",
                    format!("{o:?} is not a valid origin"),
                ));
            }
        }
        // Keys, key files and grants are parsed once here so a bad value is
        // a start-up error naming its field, not a fail-closed server.
        if self.auth.enabled() {
            crate::auth::Auth::from_config(&self.auth, &self.server.path_prefix)
                .map_err(|e| SettingsError::invalid(&e.field, e.message))?;
        }
        tracing_subscriber::EnvFilter::try_new(&self.logging.level).map_err(|e| {
            SettingsError::invalid("logging.level", format!("{:?}: {e}", self.logging.level))
        })?;
        Ok(())
    }

    /// The HTTP layer's configuration (listeners, TLS and the engine's
    /// options are used by the binary directly).
    pub fn server_config(&self) -> ServerConfig {
        let (host, port) = self
            .server
            .listen
            .first()
            .and_then(|a| split_host_port(a).ok())
            .unwrap_or_else(|| ("127.0.0.1".into(), 4437));
        let t = &self.timeouts;
        let l = &self.limits;
        ServerConfig {
            host,
            port,
            path_prefix: self.server.path_prefix.trim_end_matches('/').to_owned(),
            long_poll_timeout: t.long_poll,
            sse_reconnect_interval: t.sse_reconnect_interval,
            cursor_interval: t.cursor_interval.max(Duration::from_secs(1)),
            max_append_bytes: l.max_append_bytes,
            read_chunk_bytes: l.read_chunk_bytes,
            max_header_bytes: l.max_header_bytes,
            max_live_readers: l.max_live_readers,
            max_live_readers_per_stream: l.max_live_readers_per_stream,
            max_connections: l.max_connections,
            shutdown_grace: t.shutdown_grace,
            producer_reorder_wait: t.producer_reorder_wait,
            auth: self.auth.clone(),
            compression: self.compression.clone(),
            rate_limit: self.rate_limit.clone(),
            cors_allowed_origins: self.cors.allowed_origins.clone(),
            public_url: self
                .server
                .public_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_owned()),
            ..ServerConfig::default()
        }
    }

    /// The effective configuration as TOML (secrets masked by the
    /// sections' `Serialize` impls).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

fn read_file(path: &Path) -> Result<String, SettingsError> {
    use std::io::Read;
    let read = |path: &Path| -> std::io::Result<String> {
        let mut text = String::new();
        std::fs::File::open(path)?
            .take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(std::io::Error::other(format!(
                "larger than {MAX_FILE_BYTES} bytes"
            )));
        }
        Ok(text)
    };
    read(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Splits `host:port` / `[v6]:port` into a host and a port.
pub fn split_host_port(addr: &str) -> Result<(String, u16), String> {
    let bad = || format!("{addr:?} is not host:port (e.g. \"0.0.0.0:4437\", \"[::]:4437\")");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['[', ']', '/', ' ']) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn check_public_url(u: &str) -> Result<(), String> {
    let parsed = url::Url::parse(u).map_err(|e| format!("{u:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{u:?} must be an http:// or https:// URL"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || parsed.host().is_none() {
        return Err(format!(
            "{u:?} must be a base URL (scheme, host, optional port and path)"
        ));
    }
    Ok(())
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("invalid duration {s:?} (use e.g. 500ms, 30s, 2m)"))
}

/// Command-line flags, each also readable from a `DS_*` environment
/// variable; unset ones leave the file's value (or the default) alone.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Host of the first listen address (replaces the host of server.listen[0]).
    /// Default: 127.0.0.1.
    #[arg(long, env = "DS_HOST", value_name = "HOST")]
    pub host: Option<String>,
    /// TCP port of the first listen address (0 picks a free port; the chosen
    /// address is logged). Default: 4437.
    #[arg(long, env = "DS_PORT", value_name = "PORT")]
    pub port: Option<u16>,
    /// Listen address, `host:port` (repeat, or comma-separate in the
    /// environment, for several); replaces server.listen. TLS when a
    /// certificate is configured. Default: 127.0.0.1:4437.
    #[arg(long, env = "DS_LISTEN", value_name = "ADDR", value_delimiter = ',')]
    pub listen: Option<Vec<String>>,
    /// Extra cleartext listener (HTTP/1.1 and h2c) beside TLS ones; replaces
    /// server.plain_listen. Default: none.
    #[arg(
        long,
        env = "DS_PLAIN_LISTEN",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub plain_listen: Option<Vec<String>>,
    /// Directory of the durable file engine (created if missing). Without
    /// it, `dev` keeps streams in memory; `run` requires it. Default: none.
    #[arg(long, env = "DS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// URL path under which streams live. Default: /v1/stream.
    #[arg(long, env = "DS_PATH_PREFIX", value_name = "PATH")]
    pub path_prefix: Option<String>,
    /// The server's public base URL (e.g. https://streams.example.com), used
    /// in subscription callback and JWKS URLs. Default: http://<Host header>.
    #[arg(long, env = "DS_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
    /// How long a long-poll read waits for data before answering 204. Default: 30s.
    #[arg(long, env = "DS_LONG_POLL_TIMEOUT", value_name = "DURATION", value_parser = duration_arg)]
    pub long_poll_timeout: Option<Duration>,
    /// How long an SSE connection stays open before the server closes it
    /// (clients reconnect from their last offset; lets CDNs collapse). Default: 60s.
    #[arg(long, env = "DS_SSE_RECONNECT_INTERVAL", value_name = "DURATION", value_parser = duration_arg)]
    pub sse_reconnect_interval: Option<Duration>,
    /// Width of the cursor interval used for CDN cache-busting cursors
    /// (at least 1s). Default: 20s.
    #[arg(long, env = "DS_CURSOR_INTERVAL", value_name = "DURATION", value_parser = duration_arg)]
    pub cursor_interval: Option<Duration>,
    /// How long shutdown (SIGINT/SIGTERM) waits for in-flight requests. Default: 10s.
    #[arg(long, env = "DS_SHUTDOWN_GRACE", value_name = "DURATION", value_parser = duration_arg)]
    pub shutdown_grace: Option<Duration>,
    /// How long an idempotent producer's out-of-order request (a sequence
    /// gap) waits for its predecessor before answering 409 (0 disables). Default: 20ms.
    #[arg(long, env = "DS_PRODUCER_REORDER_WAIT", value_name = "DURATION", value_parser = duration_arg)]
    pub producer_reorder_wait: Option<Duration>,
    /// How often the file engine checkpoints (bounds WAL replay at start-up). Default: 30s.
    #[arg(long, env = "DS_CHECKPOINT_INTERVAL", value_name = "DURATION", value_parser = duration_arg)]
    pub checkpoint_interval: Option<Duration>,
    /// Largest request body accepted for an append or create, in bytes (413
    /// above). Default: 67108864 (64 MiB).
    #[arg(long, env = "DS_MAX_APPEND_BYTES", value_name = "BYTES")]
    pub max_append_bytes: Option<u64>,
    /// Largest catch-up response body, in bytes; longer reads are cut and the
    /// client continues from Stream-Next-Offset. Default: 1048576 (1 MiB).
    #[arg(long, env = "DS_READ_CHUNK_BYTES", value_name = "BYTES")]
    pub read_chunk_bytes: Option<usize>,
    /// Largest request head (request line and headers), in bytes (431 above;
    /// minimum 8192). Default: 65536.
    #[arg(long, env = "DS_MAX_HEADER_BYTES", value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Maximum concurrent live readers (long-poll and SSE) in total; more get
    /// 503 with Retry-After. Default: 50000.
    #[arg(long, env = "DS_MAX_LIVE_READERS", value_name = "N")]
    pub max_live_readers: Option<usize>,
    /// Maximum concurrent live readers on a single stream. Default: 10000.
    #[arg(long, env = "DS_MAX_LIVE_READERS_PER_STREAM", value_name = "N")]
    pub max_live_readers_per_stream: Option<usize>,
    /// Maximum concurrent connections; a connection beyond it is answered
    /// `503 Service Unavailable` with `Retry-After: 1` and closed. Default: 60000.
    #[arg(long, env = "DS_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Data files the file engine keeps open at once (at least 16). Default: 1024.
    #[arg(long, env = "DS_MAX_OPEN_FILES", value_name = "N")]
    pub max_open_files: Option<usize>,
    /// PEM certificate chain; with --tls-key, the `listen` addresses serve
    /// HTTPS (HTTP/2 and HTTP/1.1 by ALPN). SIGHUP re-reads both files. Default: none.
    #[arg(long, env = "DS_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert. Default: none.
    #[arg(long, env = "DS_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Log line format. Default: text.
    #[arg(long, env = "DS_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter in RUST_LOG syntax (e.g. `info`, `warn,durable_streams_server=debug`).
    /// Default: info.
    #[arg(long, env = "RUST_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
}

impl Overrides {
    /// Writes every given value into `s`; returns the keys it replaced.
    pub fn apply(&self, s: &mut Settings) -> Vec<&'static str> {
        let mut keys = Vec::new();
        macro_rules! set {
            ($opt:expr, $key:literal, $slot:expr) => {
                if let Some(v) = &$opt {
                    $slot = v.clone().into();
                    keys.push($key);
                }
            };
        }
        set!(self.listen, "server.listen", s.server.listen);
        set!(
            self.plain_listen,
            "server.plain_listen",
            s.server.plain_listen
        );
        set!(self.data_dir, "server.data_dir", s.server.data_dir);
        set!(self.path_prefix, "server.path_prefix", s.server.path_prefix);
        set!(self.public_url, "server.public_url", s.server.public_url);
        set!(
            self.long_poll_timeout,
            "timeouts.long_poll",
            s.timeouts.long_poll
        );
        set!(
            self.sse_reconnect_interval,
            "timeouts.sse_reconnect_interval",
            s.timeouts.sse_reconnect_interval
        );
        set!(
            self.cursor_interval,
            "timeouts.cursor_interval",
            s.timeouts.cursor_interval
        );
        set!(
            self.shutdown_grace,
            "timeouts.shutdown_grace",
            s.timeouts.shutdown_grace
        );
        set!(
            self.producer_reorder_wait,
            "timeouts.producer_reorder_wait",
            s.timeouts.producer_reorder_wait
        );
        set!(
            self.checkpoint_interval,
            "timeouts.checkpoint_interval",
            s.timeouts.checkpoint_interval
        );
        set!(
            self.max_append_bytes,
            "limits.max_append_bytes",
            s.limits.max_append_bytes
        );
        set!(
            self.read_chunk_bytes,
            "limits.read_chunk_bytes",
            s.limits.read_chunk_bytes
        );
        set!(
            self.max_header_bytes,
            "limits.max_header_bytes",
            s.limits.max_header_bytes
        );
        set!(
            self.max_live_readers,
            "limits.max_live_readers",
            s.limits.max_live_readers
        );
        set!(
            self.max_live_readers_per_stream,
            "limits.max_live_readers_per_stream",
            s.limits.max_live_readers_per_stream
        );
        set!(
            self.max_connections,
            "limits.max_connections",
            s.limits.max_connections
        );
        set!(
            self.max_open_files,
            "limits.max_open_files",
            s.limits.max_open_files
        );
        set!(self.tls_cert, "tls.cert", s.tls.cert);
        set!(self.tls_key, "tls.key", s.tls.key);
        set!(self.log_format, "logging.format", s.logging.format);
        set!(self.log_level, "logging.level", s.logging.level);
        // --host/--port edit the first listen address (kept for scripts that
        // predate `listen`).
        if self.host.is_some() || self.port.is_some() {
            let first = s
                .server
                .listen
                .first()
                .and_then(|a| split_host_port(a).ok());
            let (host, port) = first.unwrap_or_else(|| ("127.0.0.1".into(), 4437));
            let host = self.host.clone().unwrap_or(host);
            let port = self.port.unwrap_or(port);
            let addr = join_host_port(&host, port);
            match s.server.listen.first_mut() {
                Some(a) => *a = addr,
                None => s.server.listen.push(addr),
            }
            keys.push("server.listen");
        }
        keys
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, SettingsError> {
        Settings::from_toml(text, Path::new("test.toml"))
    }

    /// An empty file yields exactly the defaults.
    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Settings::default());
    }

    /// Values of each section are read, and reach the server configuration.
    #[test]
    fn values_are_read() {
        let s = parse(
            "[server]\nlisten = [\"0.0.0.0:80\", \"[::]:80\"]\npath_prefix = \"/s\"\n\
             [timeouts]\nlong_poll = \"2m\"\n[limits]\nmax_connections = 7\n\
             [logging]\nformat = \"json\"\n",
        )
        .unwrap();
        assert_eq!(s.server.listen, ["0.0.0.0:80", "[::]:80"]);
        assert_eq!(s.timeouts.long_poll, Duration::from_secs(120));
        assert_eq!(s.limits.max_connections, 7);
        assert_eq!(s.logging.format, LogFormat::Json);
        assert_eq!(s.server_config().path_prefix, "/s");
        assert_eq!(s.server_config().host, "0.0.0.0");
    }

    /// An unknown key is an error naming the key and its line.
    #[test]
    fn unknown_key_names_key_and_line() {
        let e = parse("[server]\npath_prefix = \"/x\"\nlisten_addr = \"x\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("listen_addr"), "{msg}");
    }

    /// A bad duration names the full key path and its line.
    #[test]
    fn bad_duration_names_key_and_line() {
        let e = parse("\n[timeouts]\nlong_poll = \"soon\"\n").unwrap_err();
        assert_eq!(e.key(), Some("timeouts.long_poll"));
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    /// A semantic error in a file value carries the line; a flag overriding it clears the error.
    #[test]
    fn semantic_error_located_in_file() {
        let dir = std::env::temp_dir().join(format!("ds-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[server]\n\npath_prefix = \"v1\"\n").unwrap();
        let e = Settings::resolve(Some(&f), &Overrides::default()).unwrap_err();
        assert_eq!(e.key(), Some("server.path_prefix"));
        assert!(e.to_string().contains("line 3"), "{e}");
        // Overridden by a flag: valid again.
        let o = Overrides {
            path_prefix: Some("/v2".into()),
            ..Overrides::default()
        };
        let s = Settings::resolve(Some(&f), &o).unwrap();
        assert_eq!(s.server.path_prefix, "/v2");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// --port replaces only the port of the first listen address.
    #[test]
    fn host_and_port_edit_first_listen_address() {
        let mut s = parse("[server]\nlisten = [\"10.0.0.1:1\", \"10.0.0.2:2\"]\n").unwrap();
        let o = Overrides {
            port: Some(9),
            ..Overrides::default()
        };
        o.apply(&mut s);
        assert_eq!(s.server.listen, ["10.0.0.1:9", "10.0.0.2:2"]);
    }

    /// The printed configuration parses back to the same settings (durations round-trip).
    #[test]
    fn printed_config_reads_back_identically() {
        let s =
            parse("[timeouts]\nproducer_reorder_wait = \"1500ms\"\nlong_poll = \"1h\"\n").unwrap();
        assert_eq!(parse(&s.to_toml()).unwrap(), s);
    }

    /// A TLS certificate without a key is refused, naming tls.key.
    #[test]
    fn tls_cert_without_key_is_refused() {
        let s = Settings {
            tls: TlsSection {
                cert: Some("c.pem".into()),
                ..TlsSection::default()
            },
            ..Settings::default()
        };
        assert_eq!(s.validate().unwrap_err().key(), Some("tls.key"));
    }
}
