//! The application as the compact HTTP/1.1 path calls it.
//!
//! With no authentication and no rate limit configured, the router's layer
//! stack is the response policy around the stream handlers. The compact
//! path then calls exactly that, [`crate::layers::policy_around`] around
//! [`crate::dispatch_request`], without the router: axum's per-request
//! service clone, boxed futures and route lookup were ~5% of the server's
//! CPU on 256-byte appends (`perf record`, 256 connections). With either
//! layer on, or for the router's own routes (`/healthz`, `/metrics`,
//! `/readyz`), the request goes through the router as hyper's do, so
//! authentication and rate limiting stay layers with one implementation.

use crate::state::AppState;
use axum::body::Body;
use axum::response::Response;
use axum::Router;
use http::Request;
use std::sync::Arc;

#[derive(Clone)]
pub(crate) struct App {
    router: Router,
    /// Set when the router's layers are the policy alone.
    direct: Option<Arc<AppState>>,
}

impl App {
    pub(crate) fn new(router: Router, state: &Arc<AppState>) -> Self {
        let cfg = &state.config;
        let policy_only = !cfg.auth.enabled() && !cfg.rate_limit.enabled();
        App {
            router,
            direct: policy_only.then(|| state.clone()),
        }
    }

    /// The state, when the router's layers are the policy alone (what
    /// [`crate::compact_append`] needs to answer an append itself).
    pub(crate) fn direct_state(&self) -> Option<&Arc<AppState>> {
        self.direct.as_ref()
    }

    pub(crate) async fn call(&self, req: Request<Body>) -> Response {
        match &self.direct {
            Some(state) if !is_router_route(req.uri().path()) => {
                crate::layers::policy_around(state, req, |r| {
                    crate::dispatch_request(state.clone(), r)
                })
                .await
            }
            _ => match tower::ServiceExt::oneshot(self.router.clone(), req).await {
                Ok(r) => r,
                Err(never) => match never {},
            },
        }
    }
}

/// The paths [`crate::Server::router`] routes itself; everything else goes
/// to its fallback.
pub(crate) fn is_router_route(path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/readyz")
}
