use std::time::Duration;

/// Everything the HTTP layer needs to know, with the defaults of `dev`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Streams live under this prefix (`/v1/stream/<path>`).
    pub path_prefix: String,
    pub long_poll_timeout: Duration,
    /// SSE connections are closed after this long so CDNs can collapse.
    pub sse_reconnect_interval: Duration,
    /// Width of a cursor interval (PROTOCOL.md 10.1).
    pub cursor_interval: Duration,
    /// Largest request body accepted (413 above it).
    pub max_append_bytes: u64,
    /// Largest catch-up response body (stored bytes); longer reads are cut.
    pub read_chunk_bytes: usize,
    /// Largest request head (request line + headers); 431 above it.
    pub max_header_bytes: usize,
    /// Concurrent long-poll and SSE readers, in total.
    pub max_live_readers: usize,
    /// Concurrent long-poll and SSE readers on one stream.
    pub max_live_readers_per_stream: usize,
    /// Concurrent connections; a connection beyond it is answered 503
    /// (`Retry-After: 1`) and closed.
    pub max_connections: usize,
    /// How long graceful shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Interval of the background sweep of expired streams.
    pub sweep_interval: Duration,
    /// How long an idempotent producer's out-of-order request waits for its
    /// predecessor before the 409 sequence-gap answer (0 disables).
    pub producer_reorder_wait: Duration,
    /// Authentication and authorisation (off by default).
    pub auth: crate::auth::AuthConfig,
    /// Compression of catch-up and long-poll bodies.
    pub compression: crate::compression::CompressionConfig,
    /// Rate limiting per token or client address (off by default).
    pub rate_limit: crate::ratelimit::RateLimitConfig,
    /// Origins allowed by CORS (`*` = any).
    pub cors_allowed_origins: Vec<String>,
    /// The server's public base URL (e.g. `https://streams.example.com`),
    /// used where the server hands out URLs of its own (subscription
    /// callbacks, JWKS). Without it the request's Host over http is used.
    pub public_url: Option<String>,
}

/// Longest stream path accepted, in bytes after percent-decoding.
pub const MAX_STREAM_PATH_BYTES: usize = 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 4437,
            path_prefix: "/v1/stream".into(),
            long_poll_timeout: Duration::from_secs(30),
            sse_reconnect_interval: Duration::from_secs(60),
            cursor_interval: Duration::from_secs(20),
            max_append_bytes: 64 * 1024 * 1024,
            read_chunk_bytes: 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_live_readers: 50_000,
            max_live_readers_per_stream: 10_000,
            max_connections: 60_000,
            shutdown_grace: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(5),
            producer_reorder_wait: Duration::from_millis(20),
            auth: Default::default(),
            compression: Default::default(),
            rate_limit: Default::default(),
            cors_allowed_origins: vec!["*".into()],
            public_url: None,
        }
    }
}
