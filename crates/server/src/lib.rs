//! The Durable Streams HTTP server, as a library.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let server = durable_streams_server::Server::builder().port(0).build();
//! let listener = durable_streams_server::bind("127.0.0.1:0").await?;
//! server.run(listener, std::future::pending()).await
//! # }
//! ```
//!
//! To mount the protocol inside an existing axum application, use
//! [`Server::router`] and `Router::merge` it.

pub mod auth;
mod compact_append;
mod compact_get;
mod compact_sse;
pub mod compression;
pub mod config;
mod direct;
pub mod error;
pub mod handlers;
pub mod layers;
pub mod live;
pub mod metrics;
pub mod ratelimit;
pub mod request;
pub mod settings;
pub mod sse_cache;
mod sse_reactor;
pub mod state;
pub mod subscriptions;
mod subscriptions_http;
pub mod tls;

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

/// Marks requests that arrived over TLS (inserted by [`Server::serve`] on
/// TLS listeners): URLs the server hands out then use `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsConnection;

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

    /// Re-reads the auth key files (see [`auth::AuthHandle::reload`]), for
    /// rotating keys without a restart. `Ok(false)`: auth is off. On an
    /// error the keys in force stay.
    pub fn reload_auth(&self) -> Result<bool, auth::AuthConfigError> {
        match &self.state.auth {
            None => Ok(false),
            Some(h) => h.reload().map(|()| true),
        }
    }

    /// The protocol as an axum router: `GET /healthz` and every stream
    /// operation under the path prefix, with CORS and security headers.
    ///
    /// Layers, outermost first: response policy (CORS preflight, security
    /// headers, logging, and compression when enabled), authentication,
    /// rate limiting. A feature that is switched off is not installed at
    /// all, so it costs nothing per request.
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
        if cfg.rate_limit.enabled() {
            // The buckets belong to this router: one limiter per served app.
            let limiter = Arc::new(ratelimit::RateLimiter::new(&cfg.rate_limit));
            router = router.layer(axum::middleware::from_fn_with_state(
                limiter,
                ratelimit::layer,
            ));
        }
        if let Some(auth) = &state.auth {
            // Keys parsed and clients built once (and on reload), not per
            // request; every router of this server shares them.
            router = router.layer(axum::middleware::from_fn_with_state(
                auth.clone(),
                auth::layer,
            ));
        }
        router.layer(axum::middleware::from_fn_with_state(state, layers::policy))
    }

    /// Serves connections from `listener` (cleartext: HTTP/1.1 and h2c)
    /// until `shutdown` resolves; see [`Server::serve`].
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        self.serve(vec![Listener::plain(listener)], shutdown).await
    }

    /// Serves connections from every listener until `shutdown` resolves,
    /// then stops accepting, ends live readers, and waits up to the
    /// configured grace period for in-flight requests. Also runs the expiry
    /// sweeper and the subscription waker.
    ///
    /// At `max_connections` open connections, further ones are answered
    /// `503` with `Retry-After` and closed rather than left waiting.
    pub async fn serve(
        self,
        listeners: Vec<Listener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        use futures_util::StreamExt;
        let cfg = self.state.config.clone();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            // hyper answers 431 when the request head exceeds its read buffer.
            .max_buf_size(cfg.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            // Browsers multiplex every EventSource of a page on one
            // connection; live readers are bounded by max_live_readers.
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            // Pings keep idle SSE connections through NATs and notice dead peers.
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20))
            .max_header_list_size(
                u32::try_from(cfg.max_header_bytes.max(8192)).unwrap_or(u32::MAX),
            );
        let app = self.router();
        let conns = Arc::new(Connections {
            builder,
            compact: direct::App::new(app.clone(), &self.state),
            app,
            slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_connections)),
            shed_slots: Arc::new(tokio::sync::Semaphore::new(MAX_SHED_CONNECTIONS)),
            max_connections: cfg.max_connections,
            shutdown: self.state.shutdown.clone(),
            last_shed_warning: parking_lot::Mutex::new(None),
            state: self.state.clone(),
            codings: if cfg.compression.enabled() {
                cfg.compression.algorithms.clone().into()
            } else {
                Arc::from([])
            },
        });
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let sweeper = tokio::spawn(sweep(self.state.clone()));
        let waker = tokio::spawn(
            self.state
                .subscriptions
                .clone()
                .run(self.state.shutdown.clone()),
        );
        // One stream of accepted sockets from all listeners; dropping it
        // closes them.
        let mut accepted = futures_util::stream::select_all(listeners.into_iter().map(|l| {
            let tls = l.tls;
            Box::pin(futures_util::stream::unfold(l.tcp, move |tcp| {
                let tls = tls.clone();
                async move {
                    let r = tcp.accept().await;
                    Some(((r, tls), tcp))
                }
            }))
        }));
        tokio::pin!(shutdown);
        loop {
            let (accept, tls) = tokio::select! {
                a = accepted.next() => match a { Some(a) => a, None => break },
                _ = &mut shutdown => break,
            };
            let (stream, peer) = match accept {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and similar: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            tune_accepted(&stream);
            match conns.slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    // Subscribed now, so a shutdown during the TLS handshake
                    // still reaches this connection.
                    let watcher = graceful.watcher();
                    tokio::spawn(conns.clone().serve(stream, peer, tls, watcher, permit));
                }
                Err(_) => {
                    conns
                        .state
                        .metrics
                        .shed_connections
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match conns.shed_slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            conns.warn_shedding();
                            tokio::spawn(conns.clone().shed(stream, tls, permit));
                        }
                        // Over both caps: closing at once is the cheapest answer.
                        Err(_) => drop(stream),
                    }
                }
            }
        }
        tracing::info!("shutting down: draining connections");
        self.state.shutdown.cancel();
        sweeper.abort();
        waker.abort();
        drop(accepted);
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

/// Time a client has to send a complete request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Streams one HTTP/2 connection may carry at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Connections being answered 503 at once (beyond `max_connections`);
/// further ones are closed straight away.
const MAX_SHED_CONNECTIONS: usize = 256;
/// Time allowed to answer a shed connection (TLS handshake included).
const SHED_DEADLINE: Duration = Duration::from_secs(3);

/// Most bytes an accepted socket queues that the kernel has not yet
/// transmitted (`TCP_NOTSENT_LOWAT`): the socket reports room to write, and
/// `sendfile` adds to it, only below this. Bytes in flight are not limited
/// (a distant reader still gets its full congestion window); only the
/// queue behind them is. Why: without it a catch-up `sendfile` fills the
/// autotuned send buffer (up to megabytes) far past the reader's receive
/// window, and the queued bytes are then transmitted from the *reader's*
/// context, when its acknowledgement opens the window: on loopback, the
/// reading process paid for our transmits (5.5% of a reading core in a
/// profile of 4 readers of a 64 MiB stream). Rotated A/B, ten rounds of
/// that workload: 5349 MB/s against 4701 without (ahead in every round),
/// server CPU per MB 0.103 against 0.123 ms. It also keeps a slow SSE or
/// long-poll reader from holding megabytes of kernel memory.
const TCP_NOTSENT_LOWAT_BYTES: u32 = 64 * 1024;

/// Connections the kernel queues for `accept` on a listener made by
/// [`bind`] (capped by the kernel at `net.core.somaxconn`). A burst of
/// clients connecting at once (a fleet of live readers reconnecting after
/// a restart) must fit: past the queue the kernel drops their SYNs, and
/// each such client waits a second for its retransmission. With the 128
/// that `TcpListener::bind` asks for, 200 long-poll subscribers connecting
/// together overflowed it (about 27 dropped SYNs per run), which showed as
/// deliveries ~500 ms late in the fan-out benchmark.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener on `addr` (`host:port`; the first of its addresses
/// that binds) with an accept queue of [`LISTEN_BACKLOG`]; pass it to
/// [`Server::run`].
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does: a restart can bind while old
        // connections linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(a) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// Socket options for every accepted connection; best effort (a failure
/// costs speed, not correctness).
fn tune_accepted(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(TCP_NOTSENT_LOWAT_BYTES);
}

/// A listening socket, cleartext or TLS.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    tls: Option<tls::TlsContext>,
}

impl Listener {
    /// Cleartext: HTTP/1.1 and HTTP/2 with prior knowledge (h2c).
    pub fn plain(tcp: TcpListener) -> Self {
        Listener { tcp, tls: None }
    }
    /// TLS, with HTTP/2 or HTTP/1.1 chosen by ALPN.
    pub fn tls(tcp: TcpListener, tls: tls::TlsContext) -> Self {
        Listener {
            tcp,
            tls: Some(tls),
        }
    }
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// What every connection task shares.
struct Connections {
    builder: auto::Builder<TokioExecutor>,
    app: Router,
    /// The same application, as the compact HTTP/1.1 path calls it.
    compact: direct::App,
    slots: Arc<tokio::sync::Semaphore>,
    shed_slots: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
    /// The server's shutdown signal, for connections not yet handed to
    /// hyper (whose graceful shutdown covers the rest).
    shutdown: tokio_util::sync::CancellationToken,
    last_shed_warning: parking_lot::Mutex<Option<std::time::Instant>>,
    /// For the shed-connection counter.
    state: Arc<AppState>,
    /// Compression codings responses may use (none when compression is
    /// off): catch-up reads that accept one go through hyper.
    codings: Arc<[compression::Algorithm]>,
}

impl Connections {
    async fn serve(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
        tls: Option<tls::TlsContext>,
        watcher: hyper_util::server::graceful::Watcher,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        // The hyper futures are boxed: this task's own state stays small,
        // which is what an idle compact SSE connection costs.
        match tls {
            None => {
                let mut stream = stream;
                // Reused for every request head on this connection.
                let mut head_buf = Vec::new();
                // Reused for every compact response head on it.
                let mut out_buf = Vec::new();
                let mut waits = compact_sse::HeadWaits::new(HEADER_READ_TIMEOUT, &self.shutdown);
                loop {
                    let head = compact_sse::read_head(
                        &mut stream,
                        peer,
                        &mut waits,
                        &self.codings,
                        &mut head_buf,
                    )
                    .await;
                    match head {
                        compact_sse::Head::Closed => {}
                        compact_sse::Head::Hyper(prefix) => {
                            // hyper keeps its own timers.
                            drop(waits);
                            let io = compact_sse::Replay::new(prefix, stream);
                            Box::pin(self.serve_hyper(io, peer, false, watcher)).await
                        }
                        compact_sse::Head::Compact(req) => {
                            let started =
                                Box::pin(compact_sse::start(&mut stream, &self.compact, req)).await;
                            match started {
                                compact_sse::Started::Done => {}
                                // The rest in a task of its own, sized for
                                // just that (this one carries every phase's
                                // state). It holds the watcher, so graceful
                                // shutdown waits for it (the SSE body ends on
                                // shutdown by itself), and the connection
                                // slot.
                                compact_sse::Started::Sending(sending) => {
                                    tokio::spawn(compact_sse::finish(
                                        stream, sending, watcher, permit,
                                    ));
                                }
                                // Parked in the stream's reactor, with the
                                // watcher and the slot.
                                compact_sse::Started::Park(parked) => {
                                    sse_reactor::park(sse_reactor::Handover {
                                        stream,
                                        parked,
                                        held: (watcher, permit),
                                    });
                                }
                            }
                        }
                        compact_sse::Head::Append(head) => {
                            // As `KeepAlive` below, without building a
                            // request.
                            let after = Box::pin(compact_append::respond(
                                &mut stream,
                                &self.compact,
                                &head_buf,
                                &head,
                                peer,
                                &mut out_buf,
                            ))
                            .await;
                            match after {
                                compact_append::After::KeepAlive => continue,
                                compact_append::After::Close => {}
                                compact_append::After::Hyper => {
                                    drop(waits);
                                    let prefix = std::mem::take(&mut head_buf);
                                    let io = compact_sse::Replay::new(prefix, stream);
                                    Box::pin(self.serve_hyper(io, peer, false, watcher)).await
                                }
                            }
                        }
                        compact_sse::Head::KeepAlive(req) => {
                            // Served here (the watcher held, so shutdown
                            // waits for the response); the next request
                            // decides again.
                            let again = Box::pin(compact_get::respond(
                                &mut stream,
                                &self.compact,
                                req,
                                &mut out_buf,
                            ))
                            .await;
                            if again {
                                continue;
                            }
                        }
                    }
                    break;
                }
            }
            Some(tls) => {
                // Boxed: rustls' connection state is large.
                let handshake = Box::pin(tokio::time::timeout(
                    tls.handshake_timeout(),
                    tls.acceptor().accept(stream),
                ));
                let stream = match handshake.await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                Box::pin(self.serve_hyper(stream, peer, true, watcher)).await
            }
        }
    }

    /// Serves a connection with hyper (HTTP/1.1 or HTTP/2).
    async fn serve_hyper<I>(
        &self,
        io: I,
        peer: std::net::SocketAddr,
        is_tls: bool,
        watcher: hyper_util::server::graceful::Watcher,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // The client address, for rate limiting and logs.
        let app = self.app.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                if is_tls {
                    req.extensions_mut().insert(TlsConnection);
                }
                let mut app = app.clone();
                async move {
                    use tower::Service;
                    app.call(req.map(axum::body::Body::new)).await
                }
            });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    /// Answers a connection over the cap with `503` + `Retry-After` and
    /// closes it, all within [`SHED_DEADLINE`].
    async fn shed(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        tls: Option<tls::TlsContext>,
        _permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let _ = tokio::time::timeout(SHED_DEADLINE, async {
            match tls {
                None => self.shed_io(TokioIo::new(stream)).await,
                Some(tls) => {
                    if let Ok(s) = tls.acceptor().accept(stream).await {
                        self.shed_io(TokioIo::new(s)).await;
                    }
                }
            }
        })
        .await;
    }

    async fn shed_io<I>(&self, io: I)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let answered = Arc::new(tokio::sync::Notify::new());
        let notify = answered.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            notify.notify_one();
            let mut resp = hyper::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"server at connection capacity; retry shortly\n"),
            ));
            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            let h = resp.headers_mut();
            h.insert("retry-after", http::HeaderValue::from_static("1"));
            h.insert("content-type", http::HeaderValue::from_static("text/plain"));
            h.insert("cache-control", http::HeaderValue::from_static("no-store"));
            if req.version() < http::Version::HTTP_2 {
                h.insert("connection", http::HeaderValue::from_static("close"));
            }
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        let conn = self.builder.serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = answered.notified() => {}
        }
        // One answer is all: HTTP/1.1 closes after it, HTTP/2 gets GOAWAY.
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }

    /// Logs shedding at most once a second.
    fn warn_shedding(&self) {
        let now = std::time::Instant::now();
        let mut last = self.last_shed_warning.lock();
        let due = match *last {
            None => true,
            Some(t) => now.duration_since(t) >= Duration::from_secs(1),
        };
        if due {
            *last = Some(now);
            tracing::warn!(
                max_connections = self.max_connections,
                "at the connection cap: answering new connections 503"
            );
        }
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
    // Rendering reads /proc (process metrics): off the async workers.
    let body = tokio::task::spawn_blocking(move || {
        let mut gauges = state.engine.metrics();
        gauges.push((
            "ds_sse_cache_bytes",
            "Bytes of encoded SSE events shared by fan-out readers now",
            state.sse_cache_bytes() as u64,
        ));
        state.metrics.render(&gauges, &state.engine.histograms())
    })
    .await;
    let Ok(body) = body else {
        return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> axum::response::Response {
    dispatch_request(state, req).await
}

/// The router's fallback: every request under the stream prefix (and any
/// other path, answered 404 by the handlers).
pub(crate) async fn dispatch_request(
    state: Arc<AppState>,
    req: Request,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let op = metrics::Operation::classify(
        &state.config.path_prefix,
        &parts.method,
        &parts.uri,
        &parts.headers,
    );
    // Only appends are timed: one clock read per append, none otherwise.
    let started = (op == metrics::Operation::Append).then(std::time::Instant::now);
    let conn = handlers::Conn {
        https: parts.extensions.get::<TlsConnection>().is_some()
            || parts.uri.scheme_str() == Some("https"),
        zero_copy: parts.extensions.get::<compact_get::ZeroCopy>().is_some(),
        park_sse: parts.extensions.get::<sse_reactor::Parkable>().is_some(),
    };
    let resp = handlers::dispatch(
        state.clone(),
        parts.method,
        parts.uri,
        parts.headers,
        body,
        conn,
    )
    .await
    .into_response();
    if let Some(t) = started {
        state
            .metrics
            .append_latency_ns
            .observe_duration(t.elapsed());
    }
    state.metrics.record(op, resp.status().as_u16());
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// A listener from `bind` queues `LISTEN_BACKLOG` connections, not 128:
    /// 300 clients connecting at once to a server that has not accepted
    /// yet all complete their handshake (the kernel's accept-queue length,
    /// `rx_queue` of the listening socket in /proc/net/tcp, reaches 300).
    #[tokio::test]
    async fn listener_queues_a_burst_of_connections() {
        let listener = super::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let mut clients = Vec::new();
        for _ in 0..300 {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            // On loopback the handshake completes within the call, unless
            // the accept queue is full (the SYN is dropped).
            let _ = s.connect(&addr.into());
            clients.push(s);
        }
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let queued = tcp
            .lines()
            .skip(1)
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let local_port = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
                // State 0A is LISTEN; `tx_queue:rx_queue`, in hex.
                (local_port == port && f[3] == "0A")
                    .then(|| u32::from_str_radix(f[4].split(':').nth(1)?, 16).ok())?
            })
            .expect("listening socket in /proc/net/tcp");
        // The kernel caps the queue at `net.core.somaxconn` (4096 by
        // default); it holds one more than its length.
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(4096);
        assert_eq!(queued, 300.min(cap + 1), "connections in the accept queue");
        drop(listener);
    }

    /// Accepted connections get `TCP_NODELAY` and the unsent-bytes bound.
    #[tokio::test]
    async fn accepted_sockets_are_tuned() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        super::tune_accepted(&stream);
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.tcp_nodelay().unwrap());
        assert_eq!(
            sock.tcp_notsent_lowat().unwrap(),
            super::TCP_NOTSENT_LOWAT_BYTES
        );
    }
}
