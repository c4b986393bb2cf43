//! Cross-cutting response policy, applied to every response (errors too):
//! CORS (with preflight), browser security headers, and request logging.

use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use durable_streams_protocol::headers as h;
use std::sync::{Arc, OnceLock};

fn expose_list() -> &'static HeaderValue {
    static V: OnceLock<HeaderValue> = OnceLock::new();
    V.get_or_init(|| {
        HeaderValue::from_str(&h::RESPONSE_HEADERS.join(", "))
            .unwrap_or(HeaderValue::from_static("*"))
    })
}

fn allow_list() -> &'static HeaderValue {
    static V: OnceLock<HeaderValue> = OnceLock::new();
    V.get_or_init(|| {
        HeaderValue::from_str(&h::REQUEST_HEADERS.join(", "))
            .unwrap_or(HeaderValue::from_static("*"))
    })
}

/// The CORS answer for a request's `Origin`.
enum AllowOrigin {
    /// `*` is configured: `Access-Control-Allow-Origin: *`.
    Any,
    /// The request's origin is listed: echoed back.
    Listed(HeaderValue),
    /// Not listed, or no Origin: no ACAO header.
    Refused,
}

fn cors_allow_origin(allowed: &[String], req: &Request) -> AllowOrigin {
    if allowed.iter().any(|o| o == "*") {
        return AllowOrigin::Any;
    }
    let Some(origin) = req.headers().get("origin") else {
        return AllowOrigin::Refused;
    };
    let Ok(text) = origin.to_str() else {
        return AllowOrigin::Refused;
    };
    // Scheme and host are case-insensitive; a configured trailing slash is
    // a common slip, not a different origin.
    if allowed
        .iter()
        .any(|o| o.trim().trim_end_matches('/').eq_ignore_ascii_case(text))
    {
        AllowOrigin::Listed(origin.clone())
    } else {
        AllowOrigin::Refused
    }
}

const METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS";

pub async fn policy(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let allow_origin = cors_allow_origin(&state.config.cors_allowed_origins, &req);
    let started = std::time::Instant::now();
    let path = tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned());
    let mut resp = if method == Method::OPTIONS {
        // Preflight: answered for any path, existing stream or not.
        let mut r = (StatusCode::NO_CONTENT, Body::empty()).into_response();
        let requested = req.headers().get("access-control-request-headers").cloned();
        let hs = r.headers_mut();
        hs.insert(
            "access-control-allow-methods",
            HeaderValue::from_static(METHODS),
        );
        hs.insert(
            "access-control-allow-headers",
            requested.unwrap_or_else(|| allow_list().clone()),
        );
        hs.insert("access-control-max-age", HeaderValue::from_static("86400"));
        hs.insert("allow", HeaderValue::from_static(METHODS));
        r
    } else {
        next.run(req).await
    };
    let hs = resp.headers_mut();
    match allow_origin {
        AllowOrigin::Any => {
            hs.insert("access-control-allow-origin", HeaderValue::from_static("*"));
        }
        AllowOrigin::Listed(origin) => {
            hs.insert("access-control-allow-origin", origin);
            hs.append("vary", HeaderValue::from_static("origin"));
        }
        // No ACAO: the browser refuses the response (a preflight too).
        AllowOrigin::Refused => {
            hs.append("vary", HeaderValue::from_static("origin"));
        }
    }
    hs.insert("access-control-expose-headers", expose_list().clone());
    hs.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    hs.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("cross-origin"),
    );
    if let Some(path) = path {
        tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    }
    resp
}
