//! Offset tokens.
//!
//! Format: `HHHHHHHHHHHHHHHH_LLLLLLLLLLLLLLLL`, two 16-digit zero-padded
//! decimal numbers, where the stream's logical byte position is
//! `H * 10^16 + L` (so `H` is 0 below 10 PB). This is the shape every
//! existing implementation mints and the conformance suite constructs, which
//! keeps offsets interchangeable in tooling. Fixed width makes byte-wise
//! lexicographic order equal numeric order; the token is URL-safe and can
//! never collide with the sentinels `-1` and `now`.
//!
//! The position counts bytes of the stream's stored representation. For
//! `application/json` streams that representation is each message followed
//! by one `,` separator, so every message boundary has its own offset. A fork
//! shares its source's offsets up to the fork point (the spec requires one
//! offset space across a fork chain), so the token carries no stream identity;
//! staleness across re-creation is caught by the ETag's incarnation instead.

use crate::ProtocolError;
use std::fmt;

/// Length of an offset token: 16 digits, `_`, 16 digits.
pub const OFFSET_LEN: usize = 33;
const PART: u64 = 10_000_000_000_000_000;

/// A position in a stream, in bytes of its stored representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl Offset {
    pub const ZERO: Offset = Offset(0);

    /// Parses a server-minted token. Anything else is rejected: the spec lets
    /// servers refuse offsets they did not mint.
    pub fn parse(token: &str) -> Result<Offset, ProtocolError> {
        let b = token.as_bytes();
        let well_formed = b.len() == OFFSET_LEN
            && b[16] == b'_'
            && b[..16].iter().all(u8::is_ascii_digit)
            && b[17..].iter().all(u8::is_ascii_digit);
        if !well_formed {
            return Err(ProtocolError::BadOffset(truncate(token)));
        }
        let hi: u64 = token[..16]
            .parse()
            .map_err(|_| ProtocolError::BadOffset(truncate(token)))?;
        let lo: u64 = token[17..]
            .parse()
            .map_err(|_| ProtocolError::BadOffset(truncate(token)))?;
        hi.checked_mul(PART)
            .and_then(|h| h.checked_add(lo))
            .map(Offset)
            .ok_or_else(|| ProtocolError::BadOffset(truncate(token)))
    }
}

impl Offset {
    /// The token as `Display` writes it, without the formatting machinery
    /// (every append answer carries one).
    pub fn encode(&self) -> [u8; 33] {
        let mut out = [b'0'; 33];
        out[16] = b'_';
        let mut hi = self.0 / PART;
        let mut lo = self.0 % PART;
        for i in (0..16).rev() {
            out[i] = b'0' + (hi % 10) as u8;
            hi /= 10;
            out[17 + i] = b'0' + (lo % 10) as u8;
            lo /= 10;
        }
        out
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016}_{:016}", self.0 / PART, self.0 % PART)
    }
}

/// The `offset` query parameter of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetParam {
    /// `-1` or absent: the beginning of the stream.
    Start,
    /// `now`: the current tail.
    Now,
    /// A server-minted position.
    At(Offset),
}

impl OffsetParam {
    pub fn parse(value: &str) -> Result<OffsetParam, ProtocolError> {
        match value {
            "-1" => Ok(OffsetParam::Start),
            "now" => Ok(OffsetParam::Now),
            other => Offset::parse(other).map(OffsetParam::At),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `encode` writes exactly what `Display` does.
        #[test]
        fn encode_matches_display(v in any::<u64>()) {
            let o = Offset(v);
            let (encoded, shown) = (o.encode(), o.to_string());
            prop_assert_eq!(&encoded[..], shown.as_bytes());
        }
    }

    #[test]
    fn sentinels_parse_and_are_never_minted() {
        assert_eq!(OffsetParam::parse("-1"), Ok(OffsetParam::Start));
        assert_eq!(OffsetParam::parse("now"), Ok(OffsetParam::Now));
        assert_ne!(Offset(0).to_string(), "-1");
        assert_eq!(Offset(0).to_string(), "0000000000000000_0000000000000000");
        assert_eq!(
            Offset(u64::MAX).to_string(),
            "0000000000001844_6744073709551615"
        );
        assert!(Offset::parse("9999999999999999_9999999999999999").is_err());
    }

    #[test]
    fn malformed_offsets_are_rejected() {
        for bad in [
            "",
            "abc",
            "-2",
            "1",
            "0000000000000000_000000000000000a",
            "0000000000000000_00000000000000000",
            "00000000000000000000000000000000",
            " 0000000000000000_000000000000000",
            "0000000000000000,0000000000000000",
            "0000000000000000_-000000000000001",
        ] {
            assert!(Offset::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        /// Lexicographic order of tokens equals numeric order of positions.
        #[test]
        fn token_order_matches_position_order(a: u64, b: u64) {
            let (ta, tb) = (Offset(a).to_string(), Offset(b).to_string());
            prop_assert_eq!(ta.cmp(&tb), a.cmp(&b));
        }

        /// Every minted token parses back to itself and uses no reserved characters.
        #[test]
        fn token_round_trips(a: u64) {
            let t = Offset(a).to_string();
            prop_assert!(!t.contains([',', '&', '=', '?', '/']));
            prop_assert_eq!(Offset::parse(&t), Ok(Offset(a)));
        }
    }
}
