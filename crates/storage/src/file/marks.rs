//! The sparse index of JSON message boundaries, and its file
//! (`DIR/data/<id%256:02x>/<id:016x>.idx`; docs/storage.md, "Boundary
//! index").
//!
//! A JSON stream's data file is raw `message,` bytes with no framing, so a
//! boundary is found by scanning from a known one. The index keeps one
//! known boundary (a *mark*) at least every [`SPACING`] bytes: a read cuts
//! its response, and an offset a client sends is checked to be a boundary,
//! by scanning at most about `SPACING` bytes from the nearest mark.
//!
//! The file is derived data, like the data file: it only ever lists true
//! boundaries of durable bytes, so a mark, once written, never changes. It
//! is appended at checkpoints and synced with the data files; on start-up
//! its longest valid prefix is kept, and whatever it lacks is found again
//! by scanning the data file (see [`Loaded`]).

use bytes::Bytes;
use durable_streams_protocol::json::BoundaryScanner;
use std::path::{Path, PathBuf};

/// Spacing of the marks (bytes): bounds the scan per read or check.
pub(crate) const SPACING: u64 = 16 * 1024;

/// Bytes per entry: `u64 offset | u32 crc32c(u64 stream id | u64 offset)`,
/// little-endian. The checksum covers the stream id, so an entry is only
/// valid in its own stream's file.
pub(crate) const ENTRY_BYTES: usize = 12;

pub(crate) fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join("data")
        .join(format!("{:02x}", id % 256))
        .join(format!("{id:016x}.idx"))
}

fn checksum(id: u64, offset: u64) -> u32 {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..].copy_from_slice(&offset.to_le_bytes());
    crc32c::crc32c(&b)
}

/// The entries for `marks`, in order.
pub(crate) fn encode(id: u64, marks: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(marks.len() * ENTRY_BYTES);
    for &m in marks {
        out.extend_from_slice(&m.to_le_bytes());
        out.extend_from_slice(&checksum(id, m).to_le_bytes());
    }
    out
}

/// The longest valid prefix of an index file of stream `id` whose bytes
/// lie in `base..=tail`: entries with a matching checksum, strictly
/// increasing, each inside `(base, tail]`. Anything after the first entry
/// that is not (a torn or lost write, a file cut short) is ignored.
/// Returns the marks and the bytes they take.
pub(crate) fn decode(id: u64, buf: &[u8], base: u64, tail: u64) -> (Vec<u64>, usize) {
    let mut marks: Vec<u64> = Vec::new();
    for entry in buf.chunks_exact(ENTRY_BYTES) {
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&entry[..8]);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&entry[8..]);
        let offset = u64::from_le_bytes(offset);
        let valid = u32::from_le_bytes(crc) == checksum(id, offset)
            && offset > marks.last().copied().unwrap_or(base)
            && offset <= tail;
        if !valid {
            break;
        }
        marks.push(offset);
    }
    let len = marks.len() * ENTRY_BYTES;
    (marks, len)
}

/// Records the ends of `records` (one JSON message each, stored from
/// `start`, which is a boundary) as marks, at least [`SPACING`] apart.
/// Marks inside an append matter: with 100 KB appends, marks at append ends
/// only made every read scan up to 100 KB for its cut (a quarter of the
/// server's CPU in a JSON replay).
pub(crate) fn push_records(marks: &mut Vec<u64>, start: u64, records: &[Bytes]) {
    let mut at = start;
    for r in records {
        at += r.len() as u64;
        push(marks, at);
    }
}

/// Adds the boundary `at` as a mark if it is at least [`SPACING`] past the
/// last one.
pub(crate) fn push(marks: &mut Vec<u64>, at: u64) {
    if marks.last().is_none_or(|m| at >= m.saturating_add(SPACING)) {
        marks.push(at);
    }
}

/// Scans consecutive stored bytes (`bytes` starting at stream offset `at`;
/// `sc` started at a boundary and keeps its state across calls) and adds
/// the boundaries it finds as marks.
pub(crate) fn scan(marks: &mut Vec<u64>, sc: &mut BoundaryScanner, bytes: &[u8], at: u64) {
    sc.feed(bytes, |i| {
        push(marks, at + i as u64);
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_keeps_the_valid_prefix() {
        let marks = [20_000, 40_000, 60_000];
        let mut file = encode(7, &marks);
        assert_eq!(decode(7, &file, 0, 60_000), (marks.to_vec(), 36));
        // A torn last entry and trailing zeros (a write lost on power loss
        // after the size reached the disk) end the valid prefix.
        file.extend_from_slice(&[1, 2, 3]);
        file.extend_from_slice(&[0; 24]);
        assert_eq!(decode(7, &file, 0, 60_000), (marks.to_vec(), 36));
        // Another stream's entries do not validate.
        assert_eq!(decode(8, &file, 0, 60_000), (vec![], 0));
        // A flipped bit in the second entry's offset ends it there.
        let mut flipped = file.clone();
        flipped[ENTRY_BYTES] ^= 0x10;
        assert_eq!(decode(7, &flipped, 0, 60_000), (vec![20_000], 12));
        // Marks past the tail, at or below the base, or not increasing are
        // not boundaries of these bytes.
        assert_eq!(decode(7, &file, 0, 50_000), (vec![20_000, 40_000], 24));
        assert_eq!(decode(7, &file, 20_000, 60_000), (vec![], 0));
        let backwards = encode(7, &[40_000, 20_000]);
        assert_eq!(decode(7, &backwards, 0, 60_000), (vec![40_000], 12));
    }

    #[test]
    fn scanned_marks_match_appended_ones() {
        // The same messages give the same marks whether recorded from their
        // appends or found by scanning the stored bytes in odd-sized chunks.
        let msgs: Vec<Bytes> = (0..10_000)
            .map(|i| Bytes::from(format!(r#"{{"i":{i},"s":"a,\"b]"}},"#)))
            .collect();
        let mut appended = Vec::new();
        push_records(&mut appended, 0, &msgs);
        let stored: Vec<u8> = msgs.concat();
        let mut scanned = Vec::new();
        let mut sc = BoundaryScanner::default();
        let mut at = 0;
        for chunk in stored.chunks(777) {
            scan(&mut scanned, &mut sc, chunk, at);
            at += chunk.len() as u64;
        }
        assert!(appended.len() > 10, "{} marks", appended.len());
        assert_eq!(scanned, appended);
    }
}
