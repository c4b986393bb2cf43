//! Server-Sent Events framing (PROTOCOL.md section 5.8).

use base64::Engine as _;

/// Encodes one `event: data` frame. Text payloads are split into one
/// `data:` line per line of text (CR, LF and CRLF all end a line, as the SSE
/// parser will treat them); binary payloads are standard base64 on one line.
pub fn data_event(payload: &[u8], base64: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() * 4 / 3 + 32);
    out.extend_from_slice(b"event: data\n");
    if base64 {
        out.extend_from_slice(b"data:");
        out.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(payload)
                .as_bytes(),
        );
        out.push(b'\n');
    } else {
        let mut rest = payload;
        loop {
            let end = rest.iter().position(|b| *b == b'\n' || *b == b'\r');
            let (line, next) = match end {
                Some(i) => {
                    let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                        2
                    } else {
                        1
                    };
                    (&rest[..i], Some(&rest[i + skip..]))
                }
                None => (rest, None),
            };
            // `data:` is followed directly by the payload (the form clients
            // and the conformance suite expect). A line that itself starts
            // with a space gets one extra space, which SSE parsers strip.
            out.extend_from_slice(if line.first() == Some(&b' ') {
                b"data: "
            } else {
                b"data:"
            });
            out.extend_from_slice(line);
            out.push(b'\n');
            match next {
                Some(n) => rest = n,
                None => break,
            }
        }
    }
    out.push(b'\n');
    out
}

/// The fields of a `control` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub next_offset: String,
    /// Omitted once the stream is closed.
    pub cursor: Option<String>,
    pub up_to_date: bool,
    pub closed: bool,
}

/// Encodes one `event: control` frame.
pub fn control_event(c: &Control) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_control_event(
        &mut out,
        &c.next_offset,
        c.cursor.as_deref(),
        c.up_to_date,
        c.closed,
    );
    out
}

/// Appends one `event: control` frame to `out` without building a JSON
/// value (live readers write one per delivery). Keys come in sorted order,
/// the order a `serde_json::Map` gives them.
pub fn write_control_event(
    out: &mut Vec<u8>,
    next_offset: &str,
    cursor: Option<&str>,
    up_to_date: bool,
    closed: bool,
) {
    write_control_head(out, cursor, closed);
    write_control_tail(out, next_offset, up_to_date, closed);
}

/// The part of a control event before `streamNextOffset`: what stays the
/// same for one connection, so a live reader can write it once.
pub fn write_control_head(out: &mut Vec<u8>, cursor: Option<&str>, closed: bool) {
    out.extend_from_slice(b"event: control\ndata:{");
    if closed {
        out.extend_from_slice(b"\"streamClosed\":true,");
    }
    if let Some(cursor) = cursor {
        out.extend_from_slice(b"\"streamCursor\":");
        write_json_str(out, cursor);
        out.push(b',');
    }
}

/// The rest of a control event from `streamNextOffset` on: the same for
/// every reader of one read, whatever its cursor.
pub fn write_control_tail(out: &mut Vec<u8>, next_offset: &str, up_to_date: bool, closed: bool) {
    out.extend_from_slice(b"\"streamNextOffset\":");
    write_json_str(out, next_offset);
    if up_to_date || closed {
        out.extend_from_slice(b",\"upToDate\":true");
    }
    out.extend_from_slice(b"}\n\n");
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Offsets and cursors are plain ASCII; anything else goes through
    // serde_json's escaping.
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Minimal SSE parser per the WHATWG rules, used to check round trips.
    fn parse(stream: &[u8]) -> Vec<(String, String)> {
        let text = String::from_utf8_lossy(stream)
            .replace("\r\n", "\n")
            .replace('\r', "\n");
        let mut events = vec![];
        let (mut ev, mut data, mut has) = (String::from("message"), Vec::<String>::new(), false);
        for line in text.split('\n') {
            if line.is_empty() {
                if has {
                    events.push((ev.clone(), data.join("\n")));
                }
                ev = "message".into();
                data.clear();
                has = false;
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                has = true;
            } else if let Some(v) = line.strip_prefix("event:") {
                ev = v.trim_start().to_string();
            }
        }
        events
    }

    #[test]
    fn control_fields() {
        let c = control_event(&Control {
            next_offset: "1".into(),
            cursor: Some("5".into()),
            up_to_date: true,
            closed: false,
        });
        let ev = parse(&c);
        assert_eq!(ev[0].0, "control");
        let v: serde_json::Value = serde_json::from_str(&ev[0].1).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"streamNextOffset":"1","streamCursor":"5","upToDate":true})
        );
        let c = control_event(&Control {
            next_offset: "1".into(),
            cursor: None,
            up_to_date: false,
            closed: true,
        });
        let v: serde_json::Value = serde_json::from_str(&parse(&c)[0].1).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"streamNextOffset":"1","upToDate":true,"streamClosed":true})
        );
    }

    /// The hand-written control encoder gives the same bytes as a
    /// `serde_json::Map`, including cursors that need escaping.
    #[test]
    fn control_matches_json_map() {
        for cursor in [None, Some("123"), Some("a\"b\\c\u{1}é")] {
            for (up, closed) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut obj = serde_json::Map::new();
                obj.insert(
                    "streamNextOffset".into(),
                    "0000000000000000_0000000000000042".into(),
                );
                if let Some(c) = cursor {
                    obj.insert("streamCursor".into(), c.into());
                }
                if up || closed {
                    obj.insert("upToDate".into(), true.into());
                }
                if closed {
                    obj.insert("streamClosed".into(), true.into());
                }
                let want = format!(
                    "event: control\ndata:{}\n\n",
                    serde_json::Value::Object(obj)
                );
                let mut got = Vec::new();
                write_control_event(
                    &mut got,
                    "0000000000000000_0000000000000042",
                    cursor,
                    up,
                    closed,
                );
                assert_eq!(String::from_utf8(got).expect("UTF-8"), want);
            }
        }
    }

    proptest! {
        /// Binary payloads survive base64 framing exactly.
        #[test]
        fn base64_round_trips(payload: Vec<u8>) {
            let ev = parse(&data_event(&payload, true));
            prop_assert_eq!(ev.len(), 1);
            let decoded = base64::engine::general_purpose::STANDARD.decode(ev[0].1.replace(['\n', '\r'], "")).unwrap();
            prop_assert_eq!(decoded, payload);
        }

        /// Text payloads without CR survive line framing exactly, including
        /// leading spaces and empty lines.
        #[test]
        fn text_round_trips(payload in "[^\r]*") {
            let ev = parse(&data_event(payload.as_bytes(), false));
            prop_assert_eq!(ev.len(), 1);
            prop_assert_eq!(&ev[0].1, &payload);
        }
    }
}
