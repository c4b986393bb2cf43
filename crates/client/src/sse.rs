//! An incremental Server-Sent Events parser that works on bytes, so that
//! events, lines, `\r\n` pairs and multi-byte UTF-8 characters may be split
//! across network chunks anywhere.
//!
//! Rules (WHATWG): lines end at CRLF, LF or CR (and only there: U+0085,
//! U+2028 and U+2029 are data); a blank line dispatches the event; `:`
//! starts a comment; one space after the field's colon is stripped; `data`
//! lines are joined with `\n`.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, `message` if absent.
    pub event: String,
    /// The `data:` lines joined with `\n`, as raw bytes.
    pub data: Vec<u8>,
}

/// Feed it chunks; it returns complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a leading `\n` belongs to it.
    after_cr: bool,
    /// Still at the very start of the stream (a UTF-8 BOM is skipped there).
    at_start: bool,
    event: Option<String>,
    data: Vec<u8>,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        SseParser {
            at_start: true,
            ..SseParser::default()
        }
    }

    /// Consumes a chunk and returns the events it completed.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            if b == b'\n' || b == b'\r' {
                self.at_start = false;
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, &mut out);
                if b == b'\r' {
                    if i + 1 < chunk.len() {
                        if chunk[i + 1] == b'\n' {
                            i += 1;
                        }
                    } else {
                        self.after_cr = true;
                    }
                }
            } else {
                self.line.push(b);
                if self.at_start && self.line.len() == 3 {
                    self.at_start = false;
                    if self.line == [0xEF, 0xBB, 0xBF] {
                        self.line.clear();
                    }
                }
            }
            i += 1;
        }
        out
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: self.event.take().unwrap_or_else(|| "message".to_string()),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event = None;
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            _ => {} // id, retry and unknown fields are ignored
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use durable_streams_protocol::sse::{control_event, data_event, Control};

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        chunks.iter().flat_map(|c| p.feed(c)).collect()
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.as_bytes().to_vec(),
        }
    }

    /// The same events come out whatever byte the input is split at, for every line-ending style.
    #[test]
    fn split_at_every_byte_gives_the_same_events() {
        let base = "event: data\ndata: [\ndata: {\"k\":\"é漢\"},\ndata: {\"k\":\" w\"}\ndata: ]\n\n: comment\nevent: control\ndata: {\"streamNextOffset\":\"1_2\",\"upToDate\":true}\n\nevent: data\ndata:\ndata\n\n";
        for eol in ["\n", "\r\n", "\r"] {
            let input = base.replace('\n', eol);
            let input = input.as_bytes();
            let whole = parse_all(&[input]);
            assert_eq!(
                whole,
                vec![
                    ev("data", "[\n{\"k\":\"é漢\"},\n{\"k\":\" w\"}\n]"),
                    ev(
                        "control",
                        "{\"streamNextOffset\":\"1_2\",\"upToDate\":true}"
                    ),
                    ev("data", "\n"),
                ],
                "eol {eol:?}"
            );
            for i in 0..=input.len() {
                assert_eq!(
                    parse_all(&[&input[..i], &input[i..]]),
                    whole,
                    "eol {eol:?} split at {i}"
                );
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(parse_all(&bytes), whole, "eol {eol:?} byte by byte");
        }
    }

    /// Events produced by the server's own encoder round-trip, split anywhere (binary payload as base64).
    #[test]
    fn server_encoder_round_trip() {
        let payload = "line one\n line two with leading space\r\nthird\u{2028}still third";
        let mut wire = data_event(payload.as_bytes(), false);
        wire.extend(control_event(&Control {
            next_offset: "0000000000000000_0000000000000042".into(),
            cursor: Some("7".into()),
            up_to_date: true,
            closed: false,
        }));
        let expected_text = payload.replace("\r\n", "\n");
        for i in 0..=wire.len() {
            let evs = parse_all(&[&wire[..i], &wire[i..]]);
            assert_eq!(evs.len(), 2, "split at {i}");
            assert_eq!(evs[0].event, "data");
            assert_eq!(
                String::from_utf8(evs[0].data.clone()).unwrap(),
                expected_text
            );
            assert_eq!(evs[1].event, "control");
        }
    }

    /// U+0085, U+2028 and U+2029 are not line terminators; no-colon lines and unknown fields are handled.
    #[test]
    fn unicode_separators_are_data() {
        let input = "data: a\u{85}b\u{2028}c\u{2029}d\nid: 5\nretry: 10\nfoo\ndata\n\n";
        let evs = parse_all(&[input.as_bytes()]);
        assert_eq!(evs, vec![ev("message", "a\u{85}b\u{2028}c\u{2029}d\n")]);
    }

    /// A leading BOM is skipped; events without data are not dispatched.
    #[test]
    fn bom_and_empty_events() {
        let input = b"\xEF\xBB\xBFevent: control\n\nevent: x\ndata: y\n\n";
        for i in 0..=input.len() {
            assert_eq!(
                parse_all(&[&input[..i], &input[i..]]),
                vec![ev("x", "y")],
                "split at {i}"
            );
        }
    }
}
