//! Response compression of catch-up and long-poll bodies (issue 7).
//!
//! A middleware rather than `tower-http`'s `CompressionLayer`, because the
//! encoded representation must get its own strong ETag (`"…:gzip"`) and
//! `If-None-Match` must be evaluated against the tag of the representation
//! that would actually be sent; `CompressionLayer` leaves the ETag alone, so
//! a 304 could confirm an identity body to a client holding a gzip one.
//!
//! Read bodies are already fully buffered by the handlers (at most
//! `read_chunk_bytes`, or one larger record), so the body is collected and
//! compressed in one piece: inline when small, on the blocking pool when
//! large, so a big chunk never stalls the async workers.
//!
//! Cost without `Accept-Encoding`: one header lookup on the request, and on
//! a GET response a content-type check plus a `Vary` header.

use crate::state::AppState;
use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::header::{
    ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_NONE_MATCH, VARY,
};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use durable_streams_protocol::etag;
use http_body_util::BodyExt;
use serde::{Deserialize, Deserializer, Serialize};
use std::io::Write;

/// Bodies up to this size are compressed on the async worker (at most
/// ~0.2 ms, br 3 being the slowest default at ~25 ms/MiB); larger ones on
/// the blocking pool, whose hop costs tens of microseconds.
const INLINE_MAX_BYTES: usize = 8 * 1024;

/// A content coding the server can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Zstd,
    #[serde(alias = "brotli")]
    Br,
    Gzip,
}

impl Algorithm {
    /// The `Content-Encoding` token, also the ETag suffix.
    pub fn token(self) -> &'static str {
        match self {
            Algorithm::Zstd => "zstd",
            Algorithm::Br => "br",
            Algorithm::Gzip => "gzip",
        }
    }
}

/// `[compression]` section of the config file. On by default.
///
/// ```toml
/// [compression]
/// enabled = true
/// min_bytes = 1024                       # smaller bodies are sent as they are
/// algorithms = ["zstd", "br", "gzip"]    # server preference among equal q-values
/// gzip_level = 1                         # 0..=9
/// br_level = 3                           # 0..=11
/// zstd_level = 1                         # 1..=19
/// ```
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    pub enabled: bool,
    /// Bodies shorter than this are never compressed.
    pub min_bytes: u64,
    /// Codings offered, most preferred first; an empty list disables compression.
    pub algorithms: Vec<Algorithm>,
    #[serde(deserialize_with = "gzip_level")]
    pub gzip_level: u32,
    #[serde(deserialize_with = "br_level")]
    pub br_level: u32,
    #[serde(deserialize_with = "zstd_level")]
    pub zstd_level: u32,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        // Levels measured on 1 MiB of JSON events (release build): zstd 1
        // ~5 ms/MiB (ratio 0.16), br 3 ~25 ms/MiB (0.16), gzip 1 ~12 ms/MiB
        // (0.24). Higher levels cost 1.5-5x the CPU for a few percent.
        CompressionConfig {
            enabled: true,
            min_bytes: 1024,
            algorithms: vec![Algorithm::Zstd, Algorithm::Br, Algorithm::Gzip],
            gzip_level: 1,
            br_level: 3,
            zstd_level: 1,
        }
    }
}

impl CompressionConfig {
    pub fn enabled(&self) -> bool {
        self.enabled && !self.algorithms.is_empty()
    }
}

fn bounded<'de, D: Deserializer<'de>>(d: D, min: u32, max: u32) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "level {v} out of range {min}..={max}"
        )))
    }
}

fn gzip_level<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    bounded(d, 0, 9)
}

fn br_level<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    bounded(d, 0, 11)
}

fn zstd_level<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    // 20..=22 ("ultra") need far more memory per call than a server should
    // spend on one response.
    bounded(d, 1, 19)
}

/// Picks the coding for an `Accept-Encoding` value (RFC 9110 12.5.3): the
/// highest q-value wins, ties go to the server's order; `q=0` refuses a
/// coding, `*` stands for codings not listed, and an explicit `identity`
/// with a higher q than every coding means no compression. `None` = identity.
pub fn negotiate(accept_encoding: &[u8], preference: &[Algorithm]) -> Option<Algorithm> {
    let text = std::str::from_utf8(accept_encoding).ok()?;
    let mut star: Option<f32> = None;
    let mut identity: Option<f32> = None;
    let mut listed: [Option<f32>; 3] = [None; 3];
    for element in text.split(',') {
        let mut params = element.split(';');
        let coding = params.next().unwrap_or("").trim();
        if coding.is_empty() {
            continue;
        }
        let mut q = Some(1.0f32);
        for p in params {
            let p = p.trim();
            if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                q = v
                    .trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|q| (0.0..=1.0).contains(q));
            }
        }
        // A malformed q-value makes the element unusable rather than preferred.
        let Some(q) = q else { continue };
        let slot = if coding.eq_ignore_ascii_case("zstd") {
            &mut listed[0]
        } else if coding.eq_ignore_ascii_case("br") {
            &mut listed[1]
        } else if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            &mut listed[2]
        } else if coding.eq_ignore_ascii_case("identity") {
            &mut identity
        } else if coding == "*" {
            &mut star
        } else {
            continue;
        };
        *slot = Some(slot.map_or(q, |old: f32| old.max(q)));
    }
    let mut best: Option<(Algorithm, f32)> = None;
    for &alg in preference {
        let q = match alg {
            Algorithm::Zstd => listed[0],
            Algorithm::Br => listed[1],
            Algorithm::Gzip => listed[2],
        }
        .or(star)
        .unwrap_or(0.0);
        let better = match best {
            Some((_, b)) => q > b,
            None => q > 0.0,
        };
        if better {
            best = Some((alg, q));
        }
    }
    let (alg, q) = best?;
    match identity {
        Some(iq) if iq > q => None,
        _ => Some(alg),
    }
}

/// Whether a response of this content type is worth compressing: everything
/// except SSE (an open-ended event stream a proxy must see unbuffered) and
/// formats that are already compressed.
pub fn compressible(content_type: Option<&HeaderValue>) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let media = ct.split(';').next().unwrap_or("").trim();
    let is = |s: &str| media.eq_ignore_ascii_case(s);
    let starts = |p: &str| {
        media
            .get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p))
    };
    if is("text/event-stream") {
        return false;
    }
    if starts("image/") {
        return is("image/svg+xml") || is("image/bmp") || is("image/x-icon");
    }
    if starts("video/") || starts("audio/") || starts("font/woff") {
        return false;
    }
    ![
        "application/zip",
        "application/gzip",
        "application/x-gzip",
        "application/zstd",
        "application/x-bzip2",
        "application/x-xz",
        "application/x-7z-compressed",
        "application/x-rar-compressed",
        "application/vnd.rar",
        "application/x-brotli",
        "application/x-lz4",
        "application/x-snappy-framed",
    ]
    .iter()
    .any(|t| is(t))
}

/// The strong ETag of the encoded representation: the coding appended
/// inside the quotes (`"1:0:5"` → `"1:0:5:gzip"`), so a cache or client never
/// confuses it with the identity body.
pub fn encoded_etag(tag: &HeaderValue, alg: Algorithm) -> HeaderValue {
    let Ok(s) = tag.to_str() else {
        return tag.clone();
    };
    let encoded = match s.strip_suffix('"') {
        Some(head) => format!("{head}:{}\"", alg.token()),
        None => format!("{s}:{}", alg.token()),
    };
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| tag.clone())
}

/// Compresses `data` with `alg` at the configured level.
pub fn compress(data: &[u8], alg: Algorithm, cfg: &CompressionConfig) -> std::io::Result<Vec<u8>> {
    // Compressed JSON/text is typically a fifth of the input.
    let mut out = Vec::with_capacity(data.len() / 4 + 64);
    match alg {
        Algorithm::Gzip => {
            let mut enc =
                flate2::write::GzEncoder::new(out, flate2::Compression::new(cfg.gzip_level));
            enc.write_all(data)?;
            out = enc.finish()?;
        }
        Algorithm::Br => {
            let params = brotli::enc::BrotliEncoderParams {
                quality: cfg.br_level as i32,
                // 4 MiB window: covers a whole read chunk, bounded memory.
                lgwin: 22,
                size_hint: data.len(),
                ..Default::default()
            };
            brotli::BrotliCompress(&mut &data[..], &mut out, &params)?;
        }
        Algorithm::Zstd => {
            out = zstd::bulk::compress(data, cfg.zstd_level as i32)?;
        }
    }
    Ok(out)
}

fn add_vary(resp: &mut Response) {
    resp.headers_mut()
        .append(VARY, HeaderValue::from_static("accept-encoding"));
}

/// Turns a 200 into the 304 the handler would have sent: same protocol and
/// cache headers, no body.
fn not_modified(mut resp: Response, tag: HeaderValue) -> Response {
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    *resp.body_mut() = Body::empty();
    let hs = resp.headers_mut();
    hs.remove(CONTENT_TYPE);
    hs.remove(CONTENT_LENGTH);
    hs.insert(ETAG, tag);
    resp
}

/// The compression middleware (installed only when enabled).
/// Compresses the response to `req` (run by `next`) when the client
/// accepts a configured coding. Called by the response policy layer
/// ([`crate::layers::policy`]) rather than installed as a layer of its
/// own: every axum middleware layer boxes the request's future and clones
/// a boxed service (the layer's own share was ~3.5% of the server's CPU
/// samples on 256-byte appends, `perf record`).
/// Outermost or innermost makes no difference to what it does: it only
/// changes 200 and 304 answers to GETs.
pub async fn apply<F, Fut>(state: &AppState, mut req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    if req.method() != Method::GET {
        return next(req).await;
    }
    let cfg = &state.config.compression;
    let chosen = req
        .headers()
        .get(ACCEPT_ENCODING)
        .and_then(|v| negotiate(v.as_bytes(), &cfg.algorithms));
    // When an encoding may be chosen, the handler must not answer 304 for
    // the identity tag: If-None-Match is evaluated here instead, against the
    // tag of the representation that would be sent.
    let if_none_match = match chosen {
        Some(_) => req.headers_mut().remove(IF_NONE_MATCH),
        None => None,
    };
    let mut resp = next(req).await;
    let status = resp.status();
    if !(status == StatusCode::OK || status == StatusCode::NOT_MODIFIED)
        || resp.headers().contains_key(CONTENT_ENCODING)
    {
        return resp;
    }
    if !compressible(resp.headers().get(CONTENT_TYPE)) {
        // Sent as it is to every client, so there is nothing to vary on;
        // the handler's own If-None-Match result would have been the same.
        return match (if_none_match, resp.headers().get(ETAG).cloned()) {
            (Some(inm), Some(tag)) if inm_hits(&inm, &tag) => not_modified(resp, tag),
            _ => resp,
        };
    }
    add_vary(&mut resp);
    let Some(alg) = chosen else {
        return resp;
    };
    if status != StatusCode::OK {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let min = cfg.min_bytes;
    let body = if body.size_hint().upper().is_some_and(|n| n < min) {
        Err(body)
    } else {
        match body.collect().await {
            Ok(c) => Ok(c.to_bytes()),
            // Our bodies are in memory and cannot fail; if one ever does,
            // ending the response is the only honest report left.
            Err(e) => {
                tracing::warn!(error = %e, "response body failed before compression");
                return Response::from_parts(parts, Body::empty());
            }
        }
    };
    let (data, body) = match body {
        Ok(d) if d.len() as u64 >= min => (d, None),
        Ok(d) => (Bytes::new(), Some(Body::from(d))),
        Err(body) => (Bytes::new(), Some(body)),
    };
    if let Some(body) = body {
        // Below the threshold: the identity representation.
        let resp = Response::from_parts(parts, body);
        return match (if_none_match, resp.headers().get(ETAG).cloned()) {
            (Some(inm), Some(tag)) if inm_hits(&inm, &tag) => not_modified(resp, tag),
            _ => resp,
        };
    }
    let tag = parts.headers.get(ETAG).map(|t| encoded_etag(t, alg));
    if let (Some(inm), Some(tag)) = (&if_none_match, &tag) {
        if inm_hits(inm, tag) {
            return not_modified(Response::from_parts(parts, Body::empty()), tag.clone());
        }
    }
    let encoded = if data.len() <= INLINE_MAX_BYTES {
        compress(&data, alg, cfg)
    } else {
        let cfg = cfg.clone();
        let input = data.clone();
        match tokio::task::spawn_blocking(move || compress(&input, alg, &cfg)).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    };
    match encoded {
        Ok(out) => {
            let hs = &mut parts.headers;
            hs.insert(CONTENT_ENCODING, HeaderValue::from_static(alg.token()));
            hs.remove(CONTENT_LENGTH);
            if let Some(tag) = tag {
                hs.insert(ETAG, tag);
            }
            Response::from_parts(parts, Body::from(out))
        }
        Err(e) => {
            // Identity is always a valid answer; it keeps the identity tag.
            tracing::warn!(error = %e, coding = alg.token(), "compression failed; sending identity");
            Response::from_parts(parts, Body::from(data))
        }
    }
}

fn inm_hits(inm: &HeaderValue, tag: &HeaderValue) -> bool {
    match (inm.to_str(), tag.to_str()) {
        (Ok(inm), Ok(tag)) => etag::if_none_match_hits(inm, tag),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use Algorithm::*;

    const ALL: [Algorithm; 3] = [Zstd, Br, Gzip];

    /// Without q-values the server's order decides among accepted codings.
    #[test]
    fn server_preference_breaks_ties() {
        assert_eq!(negotiate(b"gzip, deflate, br, zstd", &ALL), Some(Zstd));
        assert_eq!(negotiate(b"gzip, br", &ALL), Some(Br));
        assert_eq!(negotiate(b"gzip, br", &[Gzip, Br]), Some(Gzip));
        assert_eq!(negotiate(b"deflate", &ALL), None);
        assert_eq!(negotiate(b"", &ALL), None);
    }

    /// q-values outrank the server order; q=0 refuses; identity can win.
    #[test]
    fn q_values_are_honoured() {
        assert_eq!(negotiate(b"zstd;q=0.5, gzip;q=0.9", &ALL), Some(Gzip));
        assert_eq!(negotiate(b"zstd;q=0, gzip", &ALL), Some(Gzip));
        assert_eq!(negotiate(b"*;q=0", &ALL), None);
        assert_eq!(negotiate(b"*", &ALL), Some(Zstd));
        assert_eq!(negotiate(b"*, zstd;q=0, br;q=0", &ALL), Some(Gzip));
        assert_eq!(negotiate(b"identity", &ALL), None);
        assert_eq!(negotiate(b"identity, gzip;q=0.5", &ALL), None);
        assert_eq!(negotiate(b"identity;q=0.1, gzip;q=0.5", &ALL), Some(Gzip));
        assert_eq!(negotiate(b"GZIP ; Q=0.7", &ALL), Some(Gzip));
        assert_eq!(negotiate(b"x-gzip", &ALL), Some(Gzip));
        // A malformed q-value does not make a coding acceptable.
        assert_eq!(negotiate(b"zstd;q=2, gzip;q=abc", &ALL), None);
    }

    /// Already-compressed formats and SSE are left alone; bytes are not.
    #[test]
    fn compressible_types() {
        let ct = |s: &'static str| HeaderValue::from_static(s);
        assert!(compressible(None));
        assert!(compressible(Some(&ct("application/octet-stream"))));
        assert!(compressible(Some(&ct("application/json; charset=utf-8"))));
        assert!(compressible(Some(&ct("image/svg+xml"))));
        assert!(!compressible(Some(&ct("text/event-stream"))));
        assert!(!compressible(Some(&ct("Image/PNG"))));
        assert!(!compressible(Some(&ct("video/mp4"))));
        assert!(!compressible(Some(&ct("application/zstd"))));
        assert!(!compressible(Some(&ct("application/gzip"))));
    }

    /// The encoded tag differs from the identity tag and stays a quoted tag.
    #[test]
    fn encoded_etag_suffixes_inside_quotes() {
        let t = HeaderValue::from_static("\"a:0:5:c\"");
        assert_eq!(encoded_etag(&t, Gzip), "\"a:0:5:c:gzip\"");
        assert_eq!(
            encoded_etag(&HeaderValue::from_static("W/\"x\""), Br),
            "W/\"x:br\""
        );
    }

    /// Levels out of range are refused with the range in the message.
    #[test]
    fn config_levels_are_validated() {
        let bad: Result<CompressionConfig, _> = serde_json::from_str(r#"{"gzip_level": 12}"#);
        assert!(bad.unwrap_err().to_string().contains("0..=9"));
        let bad: Result<CompressionConfig, _> = serde_json::from_str(r#"{"algorithms": ["lz4"]}"#);
        assert!(bad.is_err());
        let ok: CompressionConfig =
            serde_json::from_str(r#"{"algorithms": ["gzip", "brotli"], "zstd_level": 3}"#).unwrap();
        assert_eq!(ok.algorithms, vec![Gzip, Br]);
        assert_eq!(ok.zstd_level, 3);
        assert_eq!(ok.min_bytes, 1024);
        let off: CompressionConfig = serde_json::from_str(r#"{"algorithms": []}"#).unwrap();
        assert!(!off.enabled());
    }

    /// Each coding round-trips through its decoder.
    #[test]
    fn compress_round_trips() {
        use std::io::Read;
        let data = b"hello hello hello hello hello hello".repeat(100);
        let cfg = CompressionConfig::default();
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&compress(&data, Gzip, &cfg).unwrap()[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        out.clear();
        brotli::BrotliDecompress(&mut &compress(&data, Br, &cfg).unwrap()[..], &mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(
            zstd::decode_all(&compress(&data, Zstd, &cfg).unwrap()[..]).unwrap(),
            data
        );
    }
}
