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
    let mut obj = serde_json::Map::new();
    obj.insert("streamNextOffset".into(), c.next_offset.clone().into());
    if let Some(cursor) = &c.cursor {
        obj.insert("streamCursor".into(), cursor.clone().into());
    }
    if c.up_to_date || c.closed {
        obj.insert("upToDate".into(), true.into());
    }
    if c.closed {
        obj.insert("streamClosed".into(), true.into());
    }
    let json = serde_json::Value::Object(obj).to_string();
    let mut out = Vec::with_capacity(json.len() + 32);
    out.extend_from_slice(b"event: control\ndata:");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\n\n");
    out
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
