//! The Durable Streams HTTP server, as a library.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let server = durable_streams_server::Server::builder().port(0).build();
//! let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
//! server.run(listener, std::future::pending()).await
//! # }
//! ```
//!
//! To mount the protocol inside an existing axum application, use
//! [`Server::router`] and `Router::merge` it.

pub mod auth;
pub mod compression;
pub mod config;
pub mod error;
pub mod handlers;
pub mod layers;
pub mod live;
pub mod metrics;
pub mod ratelimit;
pub mod request;
pub mod state;
pub mod subscriptions;
mod subscriptions_http;

pub use config::ServerConfig;
pub use error::ApiError;
pub use state::{AppState, Hooks, StreamEvent};

use axum::extract::{Request, State};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use durable_streams_storage::{Engine, MemoryEngine};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The TCP peer of a connection, inserted into every request's extensions
/// by [`Server::run`] (absent when the router is mounted elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Builds a [`Server`].
#[derive(Debug, Default)]
pub struct ServerBuilder {
    config: ServerConfig,
    engine: Option<Arc<dyn Engine>>,
    hooks: Hooks,
    subscriptions_dir: Option<std::path::PathBuf>,
}

impl ServerBuilder {
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.config.host = host.into();
        self
    }
    pub fn port(mut self, port: u16) -> Self {
        self.config.port = port;
        self
    }
    pub fn path_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.path_prefix = prefix.into();
        self
    }
    pub fn long_poll_timeout(mut self, d: Duration) -> Self {
        self.config.long_poll_timeout = d;
        self
    }
    pub fn sse_reconnect_interval(mut self, d: Duration) -> Self {
        self.config.sse_reconnect_interval = d;
        self
    }
    pub fn engine(mut self, engine: Arc<dyn Engine>) -> Self {
        self.engine = Some(engine);
        self
    }
    pub fn on_stream_created(mut self, f: impl Fn(&StreamEvent) + Send + Sync + 'static) -> Self {
        self.hooks.on_stream_created = Some(Arc::new(f));
        self
    }
    pub fn on_stream_deleted(mut self, f: impl Fn(&StreamEvent) + Send + Sync + 'static) -> Self {
        self.hooks.on_stream_deleted = Some(Arc::new(f));
        self
    }
    /// Directory where subscription state and the webhook signing key are
    /// persisted (the server binary uses `DATA_DIR/subscriptions`). Without
    /// it subscriptions live in memory with a per-process key.
    pub fn subscriptions_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.subscriptions_dir = Some(dir.into());
        self
    }
    /// Builds the server; fails only if persisted subscription state cannot be read.
    pub fn try_build(self) -> std::io::Result<Server> {
        let engine = self.engine.unwrap_or_else(|| Arc::new(MemoryEngine::new()));
        let subs = Arc::new(subscriptions::Subscriptions::open(
            engine.clone(),
            self.subscriptions_dir,
        )?);
        Ok(Server {
            state: Arc::new(AppState::new(engine, subs, self.config, self.hooks)),
        })
    }
    /// Builds the server. Panics if persisted subscription state cannot be
    /// read; use [`ServerBuilder::try_build`] to handle that.
    pub fn build(self) -> Server {
        match self.try_build() {
            Ok(s) => s,
            Err(e) => panic!("cannot open subscription state: {e}"),
        }
    }
}

/// A configured server: a router plus the accept loop.
#[derive(Debug, Clone)]
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The protocol as an axum router: `GET /healthz` and every stream
    /// operation under the path prefix, with CORS and security headers.
    ///
    /// Layers, outermost first: response policy (CORS preflight, security
    /// headers, logging), authentication, rate limiting, compression. A
    /// feature that is switched off is not installed at all, so it costs
    /// nothing per request.
    pub fn router(&self) -> Router {
        let state = self.state.clone();
        let cfg = &state.config;
        #[allow(unused_mut)] // until the layers below land
        let mut router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(metrics_handler))
            .route("/readyz", get(readyz_handler))
            .fallback(dispatch)
            .with_state(state.clone());
        if cfg.compression.enabled() {
            router = router.layer(axum::middleware::from_fn_with_state(
                state.clone(),
                compression::layer,
            ));
        }
        if cfg.rate_limit.enabled() {
            // The buckets belong to this router: one limiter per served app.
            let limiter = Arc::new(ratelimit::RateLimiter::new(&cfg.rate_limit));
            router = router.layer(axum::middleware::from_fn_with_state(
                limiter,
                ratelimit::layer,
            ));
        }
        if cfg.auth.enabled() {
            // router = router.layer(axum::middleware::from_fn_with_state(state.clone(), auth::layer));
        }
        router.layer(axum::middleware::from_fn_with_state(state, layers::policy))
    }

    /// Serves connections from `listener` until `shutdown` resolves, then
    /// stops accepting, ends live readers, and waits up to the configured
    /// grace period for in-flight requests. Also runs the expiry sweeper.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let app = self.router();
        let cfg = self.state.config.clone();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            // hyper answers 431 when the request head exceeds its read buffer.
            .max_buf_size(cfg.max_header_bytes.max(8192));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let conn_slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
        let sweeper = tokio::spawn(sweep(self.state.clone()));
        let waker = tokio::spawn(
            self.state
                .subscriptions
                .clone()
                .run(self.state.shutdown.clone()),
        );
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                p = conn_slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and similar: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            // The client address, for rate limiting and logs.
            let app = app.clone();
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    let mut app = app.clone();
                    async move {
                        use tower::Service;
                        app.call(req.map(axum::body::Body::new)).await
                    }
                },
            );
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        tracing::info!("shutting down: draining connections");
        self.state.shutdown.cancel();
        sweeper.abort();
        waker.abort();
        drop(listener);
        if tokio::time::timeout(cfg.shutdown_grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing remaining connections");
        }
        self.state.engine.shutdown().await;
        Ok(())
    }
}

/// Ready: recovery is done (the listener only opens after it) and the
/// store accepts writes; 503 once it failed or while shutting down.
async fn readyz_handler(State(state): State<Arc<AppState>>) -> axum::response::Response {
    let failed = state
        .engine
        .metrics()
        .iter()
        .any(|(n, _, v)| *n == "ds_store_failed" && *v != 0);
    if failed || state.shutdown.is_cancelled() {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics_handler(State(state): State<Arc<AppState>>) -> axum::response::Response {
    let body = state
        .metrics
        .render(state.live_readers(), &state.engine.metrics());
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let resp = handlers::dispatch(state.clone(), parts.method, parts.uri, parts.headers, body)
        .await
        .into_response();
    state
        .metrics
        .record(method.as_str(), resp.status().as_u16());
    resp
}

/// Frees expired streams in the background; client requests also check
/// expiry themselves, so this only reclaims memory of untouched streams.
async fn sweep(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let n = state.engine.sweep_expired().await;
        if n > 0 {
            tracing::debug!(expired = n, "swept expired streams");
        }
    }
}
