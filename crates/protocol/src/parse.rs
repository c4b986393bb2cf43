//! Parsing of protocol header values. Every function is total: bad input is
//! an error value, never a panic.

use crate::ProtocolError;
use chrono::{DateTime, Utc};

/// Largest integer JavaScript clients can represent exactly (2^53 - 1).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// `Stream-Closed` counts only when its value is `true`, case-insensitively;
/// any other value is treated as if the header were absent.
pub fn is_closed_flag(value: Option<&[u8]>) -> bool {
    value.is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"true"))
}

/// Parses a strict non-negative decimal integer: digits only, no sign, no
/// leading zeros (except `0` itself), at most `max`.
pub fn parse_strict_uint(value: &str, max: u64) -> Option<u64> {
    let b = value.as_bytes();
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if b.len() > 1 && b[0] == b'0' {
        return None;
    }
    value.parse::<u64>().ok().filter(|v| *v <= max)
}

/// `Stream-TTL`, in seconds.
pub fn parse_ttl_secs(value: &str) -> Result<u64, ProtocolError> {
    // Bounded so that `now + ttl` can never overflow a timestamp (~31,700 years).
    parse_strict_uint(value, 1_000_000_000_000).ok_or(ProtocolError::BadTtl)
}

/// `Stream-Expires-At`, an RFC 3339 timestamp.
pub fn parse_expires_at(value: &str) -> Result<DateTime<Utc>, ProtocolError> {
    DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| ProtocolError::BadExpiresAt)
}

/// Formats an expiry time as RFC 3339 with millisecond precision, UTC.
pub fn format_expires_at(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `Stream-Fork-Sub-Offset`.
pub fn parse_sub_offset(value: &str) -> Result<u64, ProtocolError> {
    parse_strict_uint(value.trim(), u64::MAX).ok_or(ProtocolError::BadSubOffset)
}

/// The three idempotent-producer headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerHeaders {
    pub id: String,
    pub epoch: u64,
    pub seq: u64,
}

/// Validates the producer headers: all three or none, a non-empty id, and
/// integers in `0..=2^53-1`.
pub fn parse_producer(
    id: Option<&str>,
    epoch: Option<&str>,
    seq: Option<&str>,
) -> Result<Option<ProducerHeaders>, ProtocolError> {
    match (id, epoch, seq) {
        (None, None, None) => Ok(None),
        (Some(id), Some(epoch), Some(seq)) => {
            if id.trim().is_empty() {
                return Err(ProtocolError::BadProducer("Producer-Id must not be empty"));
            }
            let epoch = parse_strict_uint(epoch.trim(), MAX_SAFE_INTEGER).ok_or(
                ProtocolError::BadProducer("Producer-Epoch must be an integer in 0..=2^53-1"),
            )?;
            let seq = parse_strict_uint(seq.trim(), MAX_SAFE_INTEGER).ok_or(
                ProtocolError::BadProducer("Producer-Seq must be an integer in 0..=2^53-1"),
            )?;
            Ok(Some(ProducerHeaders {
                id: id.to_owned(),
                epoch,
                seq,
            }))
        }
        _ => Err(ProtocolError::BadProducer(
            "Producer-Id, Producer-Epoch and Producer-Seq must be sent together",
        )),
    }
}

/// A duration flag value such as `500ms`, `30s`, `2m`, `1h` or a bare number
/// of seconds.
pub fn parse_duration(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Normalises a content type for comparison: the media type (before any
/// parameters), trimmed and lower-cased.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The media type of `content_type` as it is written (before any
/// parameters, trimmed): compared case-insensitively without allocating.
fn media_type_raw(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// `media_type(a) == media_type(b)`, without allocating (checked on every
/// append).
pub fn same_media_type(a: &str, b: &str) -> bool {
    media_type_raw(a).eq_ignore_ascii_case(media_type_raw(b))
}

/// True for `application/json` (JSON mode).
pub fn is_json(content_type: &str) -> bool {
    media_type_raw(content_type).eq_ignore_ascii_case("application/json")
}

/// True when SSE data events carry text natively (`text/*`, `application/json`);
/// everything else is base64 encoded.
pub fn is_sse_text(content_type: &str) -> bool {
    let m = media_type_raw(content_type);
    m.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("text/"))
        || m.eq_ignore_ascii_case("application/json")
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The allocation-free comparisons agree with comparing normalised
        /// media types.
        #[test]
        fn media_type_comparisons_match_normalised(
            a in "[ a-zA-Z/+;=-]{0,24}",
            b in proptest::sample::select(vec!["application/json", "Application/JSON; charset=utf-8",
                "text/plain", " TEXT/html ", "application/octet-stream", "", ";", "text/"]),
        ) {
            proptest::prop_assert_eq!(same_media_type(&a, b), media_type(&a) == media_type(b));
            proptest::prop_assert_eq!(is_json(&a), media_type(&a) == "application/json");
            let m = media_type(&a);
            proptest::prop_assert_eq!(is_sse_text(&a), m.starts_with("text/") || m == "application/json");
            proptest::prop_assert_eq!(is_json(b), media_type(b) == "application/json");
        }
    }

    #[test]
    fn ttl_accepts_only_plain_decimal() {
        assert_eq!(parse_ttl_secs("3600"), Ok(3600));
        assert_eq!(parse_ttl_secs("0"), Ok(0));
        for bad in [
            "",
            "+3600",
            "03600",
            "3600.0",
            "3.6e3",
            "-1",
            " 1",
            "abc",
            "99999999999999999999999",
        ] {
            assert!(parse_ttl_secs(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn closed_flag_is_true_only() {
        assert!(is_closed_flag(Some(b"true")));
        assert!(is_closed_flag(Some(b"TRUE")));
        assert!(is_closed_flag(Some(b"True")));
        for v in [&b"false"[..], b"yes", b"1", b""] {
            assert!(!is_closed_flag(Some(v)));
        }
        assert!(!is_closed_flag(None));
    }

    #[test]
    fn producer_headers_all_or_none() {
        assert_eq!(parse_producer(None, None, None), Ok(None));
        assert!(parse_producer(Some("p"), Some("0"), None).is_err());
        assert!(parse_producer(Some(""), Some("0"), Some("0")).is_err());
        assert!(parse_producer(Some("p"), Some("-1"), Some("0")).is_err());
        assert!(parse_producer(Some("p"), Some("0"), Some("9007199254740992")).is_err());
        assert_eq!(
            parse_producer(Some("p"), Some("9007199254740991"), Some("0")),
            Ok(Some(ProducerHeaders {
                id: "p".into(),
                epoch: MAX_SAFE_INTEGER,
                seq: 0
            }))
        );
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5d"), None);
    }

    #[test]
    fn content_type_modes() {
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("application/jsonx"));
        assert!(is_sse_text("text/plain"));
        assert!(is_sse_text("application/json"));
        assert!(!is_sse_text("application/octet-stream"));
        assert!(!is_sse_text("application/ndjson"));
    }
}
