use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::sse_cache::{Budget, StreamShare};
use durable_streams_storage::Engine;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A stream lifecycle event passed to hooks.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// Root-relative stream path.
    pub path: String,
    /// Content type (empty for deletions).
    pub content_type: String,
}

pub type Hook = Arc<dyn Fn(&StreamEvent) + Send + Sync>;

/// Lifecycle hooks, called after the operation committed.
#[derive(Clone, Default)]
pub struct Hooks {
    pub on_stream_created: Option<Hook>,
    pub on_stream_deleted: Option<Hook>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("on_stream_created", &self.on_stream_created.is_some())
            .field("on_stream_deleted", &self.on_stream_deleted.is_some())
            .finish()
    }
}

/// Shared state of the HTTP layer.
#[derive(Debug)]
pub struct AppState {
    pub engine: Arc<dyn Engine>,
    pub subscriptions: Arc<crate::subscriptions::Subscriptions>,
    pub config: ServerConfig,
    pub hooks: Hooks,
    pub metrics: crate::metrics::Metrics,
    /// Cancelled when the server shuts down: live readers end at once.
    pub shutdown: CancellationToken,
    live_total: AtomicUsize,
    /// Streams with live readers; the reader count is `StreamShare::readers`.
    live_per_stream: Mutex<HashMap<String, Arc<StreamShare>>>,
    /// Bounds what the SSE fan-out caches hold together.
    sse_cache_budget: Arc<Budget>,
    /// The auth layer's keys, when auth is configured (shared by every
    /// router of the server, replaced on reload).
    pub(crate) auth: Option<Arc<crate::auth::AuthHandle>>,
}

impl AppState {
    pub fn new(
        engine: Arc<dyn Engine>,
        subscriptions: Arc<crate::subscriptions::Subscriptions>,
        config: ServerConfig,
        hooks: Hooks,
    ) -> Self {
        let auth = config.auth.enabled().then(|| {
            Arc::new(crate::auth::AuthHandle::new(
                &config.auth,
                &config.path_prefix,
            ))
        });
        AppState {
            engine,
            subscriptions,
            auth,
            config,
            hooks,
            metrics: crate::metrics::Metrics::default(),
            shutdown: CancellationToken::new(),
            live_total: AtomicUsize::new(0),
            live_per_stream: Mutex::new(HashMap::new()),
            sse_cache_budget: Arc::default(),
        }
    }

    /// Admits a live reader (long-poll or SSE) or refuses with 503.
    pub fn admit_live_reader(self: &Arc<Self>, path: &str) -> Result<LiveGuard, ApiError> {
        if self.shutdown.is_cancelled() {
            return Err(ApiError::ShuttingDown);
        }
        let prev = self.live_total.fetch_add(1, Ordering::AcqRel);
        if prev >= self.config.max_live_readers {
            self.live_total.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::TooManyReaders);
        }
        let mut per = self.live_per_stream.lock();
        let share = match per.get(path) {
            Some(share) => share.clone(),
            None => {
                let share = Arc::new(StreamShare::new(
                    path.to_owned(),
                    self.sse_cache_budget.clone(),
                ));
                per.insert(path.to_owned(), share.clone());
                share
            }
        };
        // Changed only under the `live_per_stream` lock.
        let n = share.readers.load(Ordering::Relaxed);
        if n >= self.config.max_live_readers_per_stream {
            if n == 0 {
                per.remove(path);
            }
            drop(per);
            self.live_total.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::TooManyReaders);
        }
        share.readers.store(n + 1, Ordering::Relaxed);
        Ok(LiveGuard {
            state: self.clone(),
            share,
        })
    }

    pub fn live_readers(&self) -> usize {
        self.live_total.load(Ordering::Acquire)
    }

    /// Bytes held by the SSE fan-out caches of all streams.
    pub fn sse_cache_bytes(&self) -> usize {
        self.sse_cache_budget.used_bytes()
    }
}

/// Holds a live-reader slot; releases it when dropped.
#[derive(Debug)]
pub struct LiveGuard {
    state: Arc<AppState>,
    /// Also names the stream (one copy of the path per stream, not per
    /// reader).
    share: Arc<StreamShare>,
}

impl LiveGuard {
    /// What the live readers of this stream share.
    pub fn share(&self) -> &Arc<StreamShare> {
        &self.share
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.state.live_total.fetch_sub(1, Ordering::AcqRel);
        let mut per = self.state.live_per_stream.lock();
        let n = self.share.readers.load(Ordering::Relaxed) - 1;
        self.share.readers.store(n, Ordering::Relaxed);
        if n == 0 {
            // Drops the stream's cached events once the last reader's
            // guard is gone.
            per.remove(self.share.path());
        }
    }
}
