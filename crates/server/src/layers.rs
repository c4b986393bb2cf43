//! Cross-cutting response policy, applied to every response (errors too):
//! CORS (with preflight), browser security headers, request ids and
//! request logging.

use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use durable_streams_protocol::headers as h;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tracing::Instrument;

/// The request's id: the client's `X-Request-Id` when it is sane, else one
/// generated here. Inserted into the request's extensions by [`policy`]
/// (for layers and handlers that log) and echoed in the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        // Only visible ASCII is ever stored (checked or generated).
        self.0.to_str().unwrap_or("")
    }
}

/// Longest client-supplied request id kept; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A client's id is kept if it is 1 to 128 visible ASCII characters (no
/// spaces, no control characters): safe to log and to echo.
fn is_sane_request_id(v: &HeaderValue) -> bool {
    is_sane_request_id_bytes(v.as_bytes())
}

pub(crate) fn is_sane_request_id_bytes(b: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&b.len()) && b.iter().all(|c| (0x21..=0x7e).contains(c))
}

/// A fresh id: a random per-process prefix and a counter, hex
/// (`3f9a0c1e-2a`). Unique within the process and, with high probability,
/// across restarts and replicas; no system call and one allocation.
fn generate_request_id() -> HeaderValue {
    let mut buf = [0u8; GENERATED_ID_MAX_LEN];
    let n = write_generated_request_id(&mut buf);
    HeaderValue::from_bytes(&buf[..n]).unwrap_or(HeaderValue::from_static("0"))
}

/// Longest generated id: 8 hex digits, `-`, up to 16 hex digits.
pub(crate) const GENERATED_ID_MAX_LEN: usize = 8 + 1 + 16;

/// Writes a fresh id into `buf`; returns its length.
pub(crate) fn write_generated_request_id(buf: &mut [u8; GENERATED_ID_MAX_LEN]) -> usize {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(rand::random::<u32>);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in buf[..8].iter_mut().enumerate() {
        *b = HEX[((prefix >> (28 - 4 * i)) & 0xf) as usize];
    }
    buf[8] = b'-';
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        buf[9 + i] = HEX[((n >> (4 * (digits - 1 - i))) & 0xf) as usize];
    }
    9 + digits
}

fn request_id_of(req: &Request) -> HeaderValue {
    match req.headers().get(h::REQUEST_ID) {
        Some(v) if is_sane_request_id(v) => v.clone(),
        _ => generate_request_id(),
    }
}

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
pub(crate) enum AllowOrigin {
    /// `*` is configured: `Access-Control-Allow-Origin: *`.
    Any,
    /// The request's origin is listed: echoed back.
    Listed(HeaderValue),
    /// Not listed, or no Origin: no ACAO header.
    Refused,
}

/// `origin`: the request's first `Origin` value, if any.
pub(crate) fn cors_allow_origin(allowed: &[String], origin: Option<&[u8]>) -> AllowOrigin {
    if allowed.iter().any(|o| o == "*") {
        return AllowOrigin::Any;
    }
    let Some(origin) = origin else {
        return AllowOrigin::Refused;
    };
    let Ok(text) = std::str::from_utf8(origin) else {
        return AllowOrigin::Refused;
    };
    // Scheme and host are case-insensitive; a configured trailing slash is
    // a common slip, not a different origin.
    let listed = allowed
        .iter()
        .any(|o| o.trim().trim_end_matches('/').eq_ignore_ascii_case(text));
    match HeaderValue::from_bytes(origin) {
        Ok(v) if listed && v.to_str().is_ok() => AllowOrigin::Listed(v),
        _ => AllowOrigin::Refused,
    }
}

/// Calls `f` with each header the policy adds to a response besides the
/// request id: the CORS answer, then the fixed security headers. The flag
/// is true for a header that adds to others of its name (`Vary`) rather
/// than replacing them. One list for both the layer and the compact append
/// path ([`crate::compact_append`]).
pub(crate) fn for_each_policy_header(
    allow_origin: &AllowOrigin,
    mut f: impl FnMut(HeaderName, &HeaderValue, bool),
) {
    static ANY: HeaderValue = HeaderValue::from_static("*");
    static ORIGIN: HeaderValue = HeaderValue::from_static("origin");
    static NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
    static CROSS_ORIGIN: HeaderValue = HeaderValue::from_static("cross-origin");
    match allow_origin {
        AllowOrigin::Any => f(header::ACCESS_CONTROL_ALLOW_ORIGIN, &ANY, false),
        AllowOrigin::Listed(origin) => {
            f(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin, false);
            f(header::VARY, &ORIGIN, true);
        }
        // No ACAO: the browser refuses the response (a preflight too).
        AllowOrigin::Refused => f(header::VARY, &ORIGIN, true),
    }
    f(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose_list(), false);
    f(header::X_CONTENT_TYPE_OPTIONS, &NOSNIFF, false);
    f(CORP, &CROSS_ORIGIN, false);
}

const METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS";

// Names parsed once, not on every insert (`insert("name", ..)` parses).
const CORP: HeaderName = HeaderName::from_static("cross-origin-resource-policy");
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static(h::REQUEST_ID);

pub async fn policy(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    policy_around(&state, req, |r| next.run(r)).await
}

/// [`policy`] around any inner service `next`: the axum layer above, and
/// the compact HTTP/1.1 path calling the handlers directly
/// ([`crate::direct`]).
pub(crate) async fn policy_around<F, Fut>(state: &AppState, mut req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let method = req.method().clone();
    let allow_origin = cors_allow_origin(
        &state.config.cors_allowed_origins,
        req.headers().get("origin").map(HeaderValue::as_bytes),
    );
    let started = std::time::Instant::now();
    let request_id = RequestId(request_id_of(&req));
    // A reference-counted clone, for the log line's path.
    let uri = req.uri().clone();
    let peer = req.extensions().get::<crate::PeerAddr>().map(|p| p.0);
    req.extensions_mut().insert(request_id.clone());
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
        // Every line logged while handling the request carries its id. At
        // debug level: an enabled span costs ~0.4 µs per request (measured
        // with the fmt subscriber), too much for the default read path;
        // failures are logged below with their id at any level.
        let span = tracing::debug_span!("request", request_id = request_id.as_str());
        if state.config.compression.enabled() {
            crate::compression::apply(state, req, next)
                .instrument(span)
                .await
        } else {
            next(req).instrument(span).await
        }
    };
    let hs = resp.headers_mut();
    // The headers added below, in one growth of the map.
    hs.reserve(6);
    for_each_policy_header(&allow_origin, |name, value, add| {
        if add {
            hs.append(name, value.clone());
        } else {
            hs.insert(name, value.clone());
        }
    });
    log_request(
        request_id.as_str(),
        &method,
        uri.path(),
        resp.status(),
        started,
        peer,
    );
    resp.headers_mut().insert(REQUEST_ID, request_id.0);
    resp
}

/// The request log line: at debug, or at warn for a server error so a
/// failure's id reaches the default log. Never the query string: it may
/// carry tokens.
pub(crate) fn log_request(
    id: &str,
    method: &Method,
    path: &str,
    status: StatusCode,
    started: std::time::Instant,
    peer: Option<std::net::SocketAddr>,
) {
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                request_id = id,
                %method,
                path,
                status = status.as_u16(),
                elapsed_us = started.elapsed().as_micros() as u64,
                peer = peer.map(tracing::field::display),
                "request"
            )
        };
    }
    if status.is_server_error() {
        line!(warn);
    } else {
        line!(debug);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Ids of 1 to 128 visible ASCII characters are kept; empty, longer,
    /// spaced or control-character ids are not.
    #[test]
    fn request_id_sanity() {
        for ok in ["a", "abc-123_X.y:z/=", &"x".repeat(128)] {
            assert!(
                is_sane_request_id(&HeaderValue::from_str(ok).unwrap()),
                "{ok}"
            );
        }
        for bad in [&b""[..], b"a b", b"a\tb", &[b'x'; 129], b"caf\xc3\xa9"] {
            assert!(
                !is_sane_request_id(&HeaderValue::from_bytes(bad).unwrap()),
                "{bad:?}"
            );
        }
    }

    /// Generated ids are sane themselves, share the process prefix and never repeat.
    #[test]
    fn generated_ids_are_sane_and_unique() {
        let ids: Vec<HeaderValue> = (0..1000).map(|_| generate_request_id()).collect();
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
        for id in &ids {
            assert!(is_sane_request_id(id), "{id:?}");
            assert_eq!(&id.as_bytes()[..9], &ids[0].as_bytes()[..9]);
        }
    }
}
