//! HTTP routes of the reserved `__ds` namespace (PROTOCOL.md 6 and 7).
//! Routed before streams, so no application stream can claim them.

use crate::request::{header_str, read_body};
use crate::state::AppState;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Control-API request bodies are small JSON documents.
const MAX_CONTROL_BODY: u64 = 1024 * 1024;

fn reply(status: u16, body: Option<serde_json::Value>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match body {
        None => (status, Body::empty()).into_response(),
        Some(v) => (
            status,
            [("content-type", "application/json")],
            v.to_string(),
        )
            .into_response(),
    }
}

fn not_found() -> Response {
    reply(
        404,
        Some(json!({ "error": { "code": "NOT_FOUND", "message": "unknown __ds endpoint" } })),
    )
}

fn method_not_allowed() -> Response {
    reply(
        405,
        Some(json!({ "error": { "code": "METHOD_NOT_ALLOWED", "message": "method not allowed" } })),
    )
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

pub async fn dispatch(
    state: &AppState,
    method: Method,
    rel: &str,
    headers: &HeaderMap,
    body: Body,
    https: bool,
    authority: Option<&str>,
) -> Response {
    let subs = &state.subscriptions;
    let segs: Vec<&str> = rel.split('/').collect();
    let body = match method {
        Method::PUT | Method::POST => match read_body(headers, body, MAX_CONTROL_BODY).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        },
        _ => Default::default(),
    };
    let (status, value) = match (method.clone(), segs.as_slice()) {
        (Method::GET | Method::HEAD, ["__ds", "jwks.json"]) => {
            let mut r = reply(200, Some(subs.jwks()));
            let hs = r.headers_mut();
            hs.insert(
                "content-type",
                HeaderValue::from_static("application/jwk-set+json"),
            );
            hs.insert(
                "cache-control",
                HeaderValue::from_static("public, max-age=300"),
            );
            return r;
        }
        (_, ["__ds", "jwks.json"]) => return method_not_allowed(),
        (m, ["__ds", "subscriptions", id]) => match m {
            Method::PUT => {
                // The configured public URL when there is one: behind TLS or
                // a proxy the Host header alone does not give the scheme.
                let root = match &state.config.public_url {
                    Some(base) => {
                        format!("{}{}", base.trim_end_matches('/'), state.config.path_prefix)
                    }
                    None => {
                        let host = header_str(headers, "host")
                            .ok()
                            .flatten()
                            .or(authority)
                            .unwrap_or("localhost");
                        let scheme = if https { "https" } else { "http" };
                        format!("{scheme}://{host}{}", state.config.path_prefix)
                    }
                };
                subs.put(id, &body, root).await
            }
            Method::GET => subs.get(id),
            Method::DELETE => subs.delete(id),
            _ => return method_not_allowed(),
        },
        (Method::POST, ["__ds", "subscriptions", id, "streams"]) => {
            subs.add_streams(id, &body).await
        }
        (Method::DELETE, ["__ds", "subscriptions", id, "streams", rest @ ..])
            if !rest.is_empty() =>
        {
            subs.remove_stream(id, &rest.join("/"))
        }
        (Method::POST, ["__ds", "subscriptions", id, "callback" | "ack"]) => {
            subs.ack(id, bearer(headers), &body).await
        }
        (Method::POST, ["__ds", "subscriptions", id, "claim"]) => subs.claim(id, &body).await,
        (Method::POST, ["__ds", "subscriptions", id, "release"]) => {
            subs.release(id, bearer(headers), &body)
        }
        (_, ["__ds", "subscriptions", _, ..]) => return method_not_allowed(),
        _ => return not_found(),
    };
    let mut r = reply(status, value);
    if status == 401 {
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    r
}
