//! JSON mode (PROTOCOL.md section 9.1).
//!
//! Stored representation: every message's exact bytes (surrounding
//! whitespace trimmed) followed by one `,`. A read of any message-aligned
//! range is then `[` + the stored bytes without the final `,` + `]`, which
//! the server can emit without copying the stored data.

use crate::ProtocolError;
use std::ops::Range;

/// Validates a JSON body and returns the byte range of each message: the
/// elements of a top-level array (flattened exactly one level), or the
/// whole (trimmed) value otherwise. `allow_empty_array` is true for PUT,
/// where `[]` creates an empty stream; a POST of `[]` is an error.
pub fn split_messages(
    body: &[u8],
    allow_empty_array: bool,
) -> Result<Vec<Range<usize>>, ProtocolError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ProtocolError::BadJson("body is not UTF-8".into()))?;
    let base = text.as_ptr() as usize;
    let range_of = |raw: &serde_json::value::RawValue| {
        let s = raw.get();
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let trimmed = text.trim_start_matches([' ', '\t', '\n', '\r']);
    if trimmed.starts_with('[') {
        let items: Vec<&serde_json::value::RawValue> =
            serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
        if items.is_empty() && !allow_empty_array {
            return Err(ProtocolError::EmptyJsonArray);
        }
        Ok(items.into_iter().map(range_of).collect())
    } else {
        let raw: &serde_json::value::RawValue =
            serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
        Ok(vec![range_of(raw)])
    }
}

/// Builds the stored form of the messages: each message followed by `,`.
/// Returns the stored bytes and the stored length of each message.
pub fn frame_messages(body: &[u8], messages: &[Range<usize>]) -> (Vec<u8>, Vec<usize>) {
    let total: usize = messages.iter().map(|r| r.len() + 1).sum();
    let mut out = Vec::with_capacity(total);
    let mut lens = Vec::with_capacity(messages.len());
    for r in messages {
        out.extend_from_slice(&body[r.clone()]);
        out.push(b',');
        lens.push(r.len() + 1);
    }
    (out, lens)
}

/// Turns a message-aligned stored range into a JSON array body.
pub fn stored_to_array(stored: &[u8]) -> Vec<u8> {
    let inner = stored.strip_suffix(b",").unwrap_or(stored);
    let mut out = Vec::with_capacity(inner.len() + 2);
    out.push(b'[');
    out.extend_from_slice(inner);
    out.push(b']');
    out
}

/// Finds message boundaries in stored JSON-mode bytes without an index.
///
/// Stored data is a sequence of `message,`; a boundary is the position just
/// past a separator at nesting depth 0 outside strings. The scanner is
/// incremental (its state carries across chunks) and must start at a
/// boundary. Stored data was validated on append, so the scan is exact.
#[derive(Debug, Default, Clone)]
pub struct BoundaryScanner {
    depth: u32,
    in_string: bool,
    escape: bool,
}

impl BoundaryScanner {
    /// Scans `bytes`; calls `on_boundary(i)` with each index just past a
    /// separator (relative to `bytes`). Stops early when it returns false.
    pub fn feed(&mut self, bytes: &[u8], mut on_boundary: impl FnMut(usize) -> bool) {
        for (i, &b) in bytes.iter().enumerate() {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                b',' if self.depth == 0 && !on_boundary(i + 1) => return,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msgs(body: &str) -> Vec<String> {
        split_messages(body.as_bytes(), false)
            .unwrap()
            .into_iter()
            .map(|r| body[r].to_string())
            .collect()
    }

    #[test]
    fn flattens_exactly_one_level() {
        assert_eq!(
            msgs(r#"{"event": "created"}"#),
            vec![r#"{"event": "created"}"#]
        );
        assert_eq!(
            msgs(r#"[{"a":1}, {"b":2}]"#),
            vec![r#"{"a":1}"#, r#"{"b":2}"#]
        );
        assert_eq!(msgs("[[1,2], [3,4]]"), vec!["[1,2]", "[3,4]"]);
        assert_eq!(msgs("[[[1,2,3]]]"), vec!["[[1,2,3]]"]);
        assert_eq!(msgs("  42 \n"), vec!["42"]);
        assert_eq!(msgs(r#""a,b""#), vec![r#""a,b""#]);
    }

    #[test]
    fn rejects_invalid_and_empty() {
        assert_eq!(
            split_messages(b"[]", false),
            Err(ProtocolError::EmptyJsonArray)
        );
        assert_eq!(split_messages(b" [ ] ", true), Ok(vec![]));
        for bad in [
            &b"{"[..],
            b"",
            b"   ",
            b"[1,]",
            b"{\"a\":1}{",
            b"\xff",
            b"[1] x",
            b"NaN",
        ] {
            assert!(split_messages(bad, false).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn framing_round_trips_to_an_array() {
        let body = br#"[{"a":1}, "x,y", [2]]"#;
        let ranges = split_messages(body, false).unwrap();
        let (stored, lens) = frame_messages(body, &ranges);
        assert_eq!(lens.iter().sum::<usize>(), stored.len());
        assert_eq!(stored_to_array(&stored), br#"[{"a":1},"x,y",[2]]"#.to_vec());
        assert_eq!(stored_to_array(b""), b"[]".to_vec());
    }

    #[test]
    fn scanner_finds_exactly_the_message_ends() {
        let body = br#"[{"a":"x,\",]"}, [1,[2,3]], "q\\", 4]"#;
        let ranges = split_messages(body, false).unwrap();
        let (stored, lens) = frame_messages(body, &ranges);
        let mut want = vec![];
        let mut at = 0;
        for l in lens {
            at += l;
            want.push(at);
        }
        // Fed whole and byte by byte, the scanner agrees with the framing.
        let mut got = vec![];
        BoundaryScanner::default().feed(&stored, |i| {
            got.push(i);
            true
        });
        assert_eq!(got, want);
        let mut sc = BoundaryScanner::default();
        let mut got = vec![];
        for (k, b) in stored.iter().enumerate() {
            sc.feed(std::slice::from_ref(b), |_| {
                got.push(k + 1);
                true
            });
        }
        assert_eq!(got, want);
    }

    proptest! {
        /// The scanner finds one boundary per stored message for any values.
        #[test]
        fn scanner_counts_messages(values in proptest::collection::vec(arb_json(), 1..8)) {
            let body = serde_json::to_vec(&values).unwrap();
            let ranges = split_messages(&body, false).unwrap();
            let (stored, _) = frame_messages(&body, &ranges);
            let mut n = 0;
            BoundaryScanner::default().feed(&stored, |_| { n += 1; true });
            prop_assert_eq!(n, values.len());
        }

        /// Any sequence of JSON values sent as one array is stored as exactly
        /// those values and read back as an equal array.
        #[test]
        fn array_append_reads_back_equal(values in proptest::collection::vec(arb_json(), 1..8)) {
            let body = serde_json::to_vec(&values).unwrap();
            let ranges = split_messages(&body, false).unwrap();
            prop_assert_eq!(ranges.len(), values.len());
            let (stored, _) = frame_messages(&body, &ranges);
            let back: Vec<serde_json::Value> = serde_json::from_slice(&stored_to_array(&stored)).unwrap();
            prop_assert_eq!(back, values);
        }
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".*".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z,]{0,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
