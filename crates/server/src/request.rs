//! Extraction and validation of what a client sends: stream paths, query
//! parameters, headers and bodies. Every function returns a 4xx-mapped
//! error for bad input; none of them panic.

use crate::config::MAX_STREAM_PATH_BYTES;
use crate::error::ApiError;
use axum::body::Body;
use axum::http::HeaderMap;
use bytes::Bytes;
use durable_streams_protocol::OffsetParam;
use http_body_util::BodyExt;

/// What a request path under the server's root addresses.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// A stream, by its root-relative path (percent-decoded once).
    Stream(String),
    /// The reserved `__ds` control namespace, with the decoded root-relative path.
    Reserved(String),
}

/// Resolves a raw request path (still percent-encoded) against the prefix.
/// Returns `None` when the path is not under the prefix.
///
/// Rules, documented in README.md: decoded once; UTF-8; no empty, `.` or `..`
/// segments; no control characters (NUL included); at most
/// [`MAX_STREAM_PATH_BYTES`] bytes.
pub fn resolve_path(prefix: &str, raw_path: &str) -> Option<Result<Target, ApiError>> {
    let rest = raw_path.strip_prefix(prefix.trim_end_matches('/'))?;
    let rest = rest.strip_prefix('/')?;
    Some(validate_stream_path(rest))
}

/// Validates a root-relative, still-encoded stream path.
pub fn validate_stream_path(encoded: &str) -> Result<Target, ApiError> {
    let decoded = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("stream path is not valid UTF-8"))?;
    if decoded.is_empty() {
        return Err(ApiError::bad_request("stream path is empty"));
    }
    if decoded.len() > MAX_STREAM_PATH_BYTES {
        return Err(ApiError::bad_request(format!(
            "stream path exceeds {MAX_STREAM_PATH_BYTES} bytes"
        )));
    }
    if decoded.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "stream path contains control characters",
        ));
    }
    for seg in decoded.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(ApiError::bad_request(
                "stream path has an empty, '.' or '..' segment",
            ));
        }
    }
    if decoded.split('/').next() == Some("__ds") {
        return Ok(Target::Reserved(decoded.into_owned()));
    }
    Ok(Target::Stream(decoded.into_owned()))
}

/// Resolves a `Stream-Forked-From` value: the source's URL path, normally
/// including the same prefix as the request; a value without the prefix is
/// taken as root-relative.
pub fn resolve_fork_source(prefix: &str, value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    let path = value.split(['?', '#']).next().unwrap_or("");
    let rel = match resolve_path(prefix, path) {
        Some(r) => r?,
        None => validate_stream_path(path.trim_start_matches('/'))?,
    };
    match rel {
        Target::Stream(p) => Ok(p),
        Target::Reserved(_) => Err(ApiError::bad_request("cannot fork a reserved __ds path")),
    }
}

/// Read mode of a GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveMode {
    CatchUp,
    LongPoll,
    Sse,
}

#[derive(Debug)]
pub struct ReadQuery {
    pub offset: OffsetParam,
    pub live: LiveMode,
    pub cursor: Option<String>,
}

/// Stores a query parameter's value; a second value is an error.
fn set_once(slot: &mut Option<String>, v: String, name: &str) -> Result<(), ApiError> {
    match slot.replace(v) {
        Some(_) => Err(ApiError::bad_request(format!(
            "{name} given more than once"
        ))),
        None => Ok(()),
    }
}

/// Parses the query of a GET. Unknown parameters are ignored; a repeated
/// or empty `offset` is an error; live modes require an offset.
pub fn parse_read_query(query: Option<&str>) -> Result<ReadQuery, ApiError> {
    let mut offset: Option<String> = None;
    let mut live: Option<String> = None;
    let mut cursor = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "offset" => set_once(&mut offset, v.into_owned(), "offset")?,
            "live" => set_once(&mut live, v.into_owned(), "live")?,
            "cursor" => cursor = Some(v.into_owned()),
            _ => {}
        }
    }
    let live = match live.as_deref() {
        None => LiveMode::CatchUp,
        Some("long-poll") => LiveMode::LongPoll,
        Some("sse") => LiveMode::Sse,
        Some(_) => return Err(ApiError::bad_request("live must be long-poll or sse")),
    };
    let offset = match offset {
        None if live != LiveMode::CatchUp => {
            return Err(ApiError::bad_request("offset is required for live reads"))
        }
        None => OffsetParam::Start,
        Some(o) => OffsetParam::parse(&o)?,
    };
    Ok(ReadQuery {
        offset,
        live,
        cursor,
    })
}

/// A header as text; a value with other than visible ASCII (and tabs) is
/// a 400.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    header_text(name, headers.get(name).map(|v| v.as_bytes()))
}

/// [`header_str`] over a raw value: text exactly when
/// `HeaderValue::to_str` would give it (visible ASCII, spaces and tabs).
pub fn header_text<'a>(name: &str, value: Option<&'a [u8]>) -> Result<Option<&'a str>, ApiError> {
    let Some(v) = value else {
        return Ok(None);
    };
    let text = v
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(v).ok())
        .flatten();
    match text {
        Some(t) => Ok(Some(t)),
        None => Err(ApiError::bad_request(format!(
            "header {name} is not valid text"
        ))),
    }
}

/// Reads the whole body, refusing more than `max` bytes: at once when a
/// Content-Length announces it, otherwise as soon as the limit is crossed.
pub async fn read_body(headers: &HeaderMap, body: Body, max: u64) -> Result<Bytes, ApiError> {
    if let Some(len) = headers.get("content-length").and_then(|v| v.to_str().ok()) {
        match len.trim().parse::<u64>() {
            Ok(n) if n > max => return Err(ApiError::PayloadTooLarge(max)),
            Ok(_) => {}
            Err(_) => return Err(ApiError::bad_request("invalid Content-Length")),
        }
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::PayloadTooLarge(max))
        }
        Err(_) => Err(ApiError::bad_request("failed to read the request body")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_decoded_once_and_checked() {
        let ok = |p: &str| resolve_path("/v1/stream", p).unwrap().unwrap();
        assert_eq!(ok("/v1/stream/a/b"), Target::Stream("a/b".into()));
        assert_eq!(ok("/v1/stream/a%20b"), Target::Stream("a b".into()));
        assert_eq!(ok("/v1/stream/a%252F"), Target::Stream("a%2F".into()));
        assert_eq!(
            ok("/v1/stream/__ds/subscriptions/x"),
            Target::Reserved("__ds/subscriptions/x".into())
        );
        assert!(resolve_path("/v1/stream", "/v1/streamx").is_none());
        assert!(resolve_path("/v1/stream", "/other").is_none());
        for bad in [
            "/v1/stream/",
            "/v1/stream/a//b",
            "/v1/stream/a/../b",
            "/v1/stream/%2e%2e",
            "/v1/stream/a%00",
            "/v1/stream/a/",
            "/v1/stream/%ff",
        ] {
            assert!(
                resolve_path("/v1/stream", bad).unwrap().is_err(),
                "{bad} accepted"
            );
        }
        let long = format!("/v1/stream/{}", "a".repeat(MAX_STREAM_PATH_BYTES + 1));
        assert!(resolve_path("/v1/stream", &long).unwrap().is_err());
    }

    #[test]
    fn fork_source_resolution() {
        assert_eq!(
            resolve_fork_source("/v1/stream", "/v1/stream/src").unwrap(),
            "src"
        );
        assert_eq!(resolve_fork_source("/v1/stream", "src/x").unwrap(), "src/x");
        assert!(resolve_fork_source("/v1/stream", "/v1/stream/../x").is_err());
    }

    #[test]
    fn read_query_rules() {
        assert_eq!(parse_read_query(None).unwrap().offset, OffsetParam::Start);
        assert_eq!(
            parse_read_query(Some("offset=-1&foo=bar")).unwrap().offset,
            OffsetParam::Start
        );
        assert!(parse_read_query(Some("offset=")).is_err());
        assert!(parse_read_query(Some("offset=-1&offset=now")).is_err());
        assert!(parse_read_query(Some("live=sse")).is_err());
        assert!(parse_read_query(Some("offset=now&live=bogus")).is_err());
        assert!(parse_read_query(Some("offset=0%2C1")).is_err());
        let q = parse_read_query(Some("offset=now&live=long-poll&cursor=12")).unwrap();
        assert_eq!(
            (q.offset, q.live, q.cursor.as_deref()),
            (OffsetParam::Now, LiveMode::LongPoll, Some("12"))
        );
    }
}
