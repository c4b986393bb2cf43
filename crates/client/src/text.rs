//! Incremental UTF-8 decoding: a character split across chunks (network
//! reads, server response limits, SSE events) is held back until its last
//! byte arrives instead of being replaced.

/// Decodes a byte stream into text chunk by chunk.
#[derive(Debug, Default, Clone)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    pub fn new() -> Self {
        Utf8Decoder::default()
    }

    /// Decodes `bytes` after whatever was held back. Invalid sequences become
    /// U+FFFD; an incomplete sequence at the end is held back for the next call.
    pub fn decode(&mut self, bytes: &[u8]) -> String {
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(bytes);
        let mut out = String::with_capacity(buf.len());
        let mut rest = &buf[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: from_utf8 just validated this prefix.
                    out.push_str(&String::from_utf8_lossy(&rest[..valid]));
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &rest[valid + n..];
                        }
                        None => {
                            self.pending = rest[valid..].to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// Ends the stream: a dangling incomplete sequence becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            String::new()
        } else {
            self.pending.clear();
            "\u{FFFD}".to_string()
        }
    }

    /// True if bytes are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splitting valid UTF-8 at every byte (into two and three pieces) decodes to the original text.
    #[test]
    fn split_at_every_byte() {
        let text = "aé漢😀z\u{2028}ß€𝄞";
        let b = text.as_bytes();
        for i in 0..=b.len() {
            let mut d = Utf8Decoder::new();
            let s = d.decode(&b[..i]) + &d.decode(&b[i..]) + &d.finish();
            assert_eq!(s, text, "split at {i}");
            for j in i..=b.len() {
                let mut d = Utf8Decoder::new();
                let s = d.decode(&b[..i]) + &d.decode(&b[i..j]) + &d.decode(&b[j..]) + &d.finish();
                assert_eq!(s, text, "split at {i},{j}");
            }
        }
        let mut d = Utf8Decoder::new();
        let s: String = b.iter().map(|x| d.decode(&[*x])).collect();
        assert_eq!(s, text);
    }

    /// Invalid bytes become U+FFFD without eating valid neighbours; a dangling tail too.
    #[test]
    fn invalid_bytes_are_replaced() {
        let mut d = Utf8Decoder::new();
        assert_eq!(d.decode(b"a\xFFb\xC3"), "a\u{FFFD}b");
        assert!(d.has_pending());
        assert_eq!(d.decode(b"("), "\u{FFFD}(");
        assert_eq!(d.decode(b"\xE6\xBC"), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
