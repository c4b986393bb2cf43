//! ETags for reads: `"<incarnation>:<start>:<end>[:c]"`.
//!
//! The incarnation is unique per created stream (re-creating a path gets a
//! new one), so an ETag from a deleted stream never validates against its
//! successor. `:c` marks a response generated while the stream was closed, so
//! closing a stream changes the ETag of the tail read and a 304 can never hide
//! the EOF signal.

use crate::Offset;

pub fn format(incarnation: u64, start: Offset, end: Offset, closed: bool) -> String {
    format!(
        "\"{:x}:{}:{}{}\"",
        incarnation,
        start.0,
        end.0,
        if closed { ":c" } else { "" }
    )
}

/// RFC 9110 `If-None-Match` evaluation for GET: `*` or any listed tag
/// (weak or strong) equal to `etag`.
pub fn if_none_match_hits(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closure_changes_the_etag() {
        let open = format(7, Offset(0), Offset(5), false);
        let closed = format(7, Offset(0), Offset(5), true);
        assert_ne!(open, closed);
        assert!(if_none_match_hits(&open, &open));
        assert!(!if_none_match_hits(&open, &closed));
    }

    #[test]
    fn incarnation_changes_the_etag() {
        assert_ne!(
            format(1, Offset(0), Offset(5), false),
            format(2, Offset(0), Offset(5), false)
        );
    }

    #[test]
    fn if_none_match_lists_and_weak_tags() {
        let e = format(1, Offset(0), Offset(5), false);
        assert!(if_none_match_hits(&format!("\"x\", W/{e}"), &e));
        assert!(if_none_match_hits("*", &e));
        assert!(!if_none_match_hits("\"x\"", &e));
    }
}
