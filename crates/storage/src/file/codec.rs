//! Byte layout of WAL records and checkpoints (docs/storage.md).

use crate::{Expiry, ForkSpec};
use bytes::Bytes;
use durable_streams_protocol::Offset;

pub const WAL_MAGIC: &[u8; 8] = b"DSWAL001";
pub const WAL_HEADER_LEN: u64 = 16;
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"DSCKP001";
/// Largest payload a record may declare; anything larger is a torn or
/// corrupt length field.
pub const MAX_RECORD_BYTES: u32 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkRec {
    pub source_id: u64,
    pub fork_offset: u64,
    pub spec: ForkSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRec {
    pub id: u64,
    pub path: String,
    pub content_type: String,
    pub json: bool,
    pub expiry: Expiry,
    pub requested_expiry: Expiry,
    pub closed: bool,
    pub now_ms: u64,
    pub fork: Option<ForkRec>,
    pub data: Vec<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRec {
    pub id: u64,
    pub start: u64,
    pub now_ms: u64,
    pub close: bool,
    pub producer: Option<(String, u64, u64)>,
    pub stream_seq: Option<String>,
    pub data: Vec<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Create(CreateRec),
    Append(AppendRec),
    Delete { id: u64, expired: bool, now_ms: u64 },
    Touch(Vec<(u64, u64)>),
}

impl Record {
    pub fn data_len(&self) -> u64 {
        let d = match self {
            Record::Create(c) => &c.data,
            Record::Append(a) => &a.data,
            _ => return 0,
        };
        d.iter().map(|b| b.len() as u64).sum()
    }
}

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.0.push(v as u8);
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
    pub fn opt_str(&mut self, s: &Option<String>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    pub fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
        }
    }
    pub fn data(&mut self, parts: &[Bytes]) {
        let len: u64 = parts.iter().map(|b| b.len() as u64).sum();
        self.u64(len);
        for p in parts {
            self.0.extend_from_slice(p);
        }
    }
    pub fn expiry(&mut self, e: &Expiry) {
        match e {
            Expiry::Never => self.u8(0),
            Expiry::TtlSecs(s) => {
                self.u8(1);
                self.u64(*s);
            }
            Expiry::At(t) => {
                self.u8(2);
                self.i64(t.timestamp_millis());
            }
        }
    }
    pub fn producer(&mut self, p: &Option<(String, u64, u64)>) {
        match p {
            None => self.u8(0),
            Some((id, e, s)) => {
                self.u8(1);
                self.str(id);
                self.u64(*e);
                self.u64(*s);
            }
        }
    }
    pub fn fork(&mut self, f: &Option<ForkRec>) {
        match f {
            None => self.u8(0),
            Some(f) => {
                self.u8(1);
                self.u64(f.source_id);
                self.u64(f.fork_offset);
                self.str(&f.spec.source);
                self.opt_u64(f.spec.offset.map(|o| o.0));
                self.u64(f.spec.sub_offset);
            }
        }
    }
}

/// Reads little-endian fields; every getter returns `None` on truncation or
/// an invalid value, so a corrupt record can never panic the decoder.
#[derive(Debug)]
pub struct Dec {
    buf: Bytes,
    pos: usize,
}

impl Dec {
    pub fn new(buf: Bytes) -> Self {
        Dec { buf, pos: 0 }
    }
    pub fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
    fn take(&mut self, n: usize) -> Option<Bytes> {
        let end = self.pos.checked_add(n)?;
        if end > self.buf.len() {
            return None;
        }
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Some(b)
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])))
    }
    pub fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }
    pub fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    pub fn opt_str(&mut self) -> Option<Option<String>> {
        Some(if self.bool()? {
            Some(self.str()?)
        } else {
            None
        })
    }
    pub fn opt_u64(&mut self) -> Option<Option<u64>> {
        Some(if self.bool()? {
            Some(self.u64()?)
        } else {
            None
        })
    }
    pub fn data(&mut self) -> Option<Vec<Bytes>> {
        let n = usize::try_from(self.u64()?).ok()?;
        let b = self.take(n)?;
        Some(if b.is_empty() { Vec::new() } else { vec![b] })
    }
    pub fn expiry(&mut self) -> Option<Expiry> {
        Some(match self.u8()? {
            0 => Expiry::Never,
            1 => Expiry::TtlSecs(self.u64()?),
            2 => Expiry::At(chrono::DateTime::from_timestamp_millis(self.i64()?)?),
            _ => return None,
        })
    }
    pub fn producer(&mut self) -> Option<Option<(String, u64, u64)>> {
        Some(if self.bool()? {
            Some((self.str()?, self.u64()?, self.u64()?))
        } else {
            None
        })
    }
    pub fn fork(&mut self) -> Option<Option<ForkRec>> {
        if !self.bool()? {
            return Some(None);
        }
        let source_id = self.u64()?;
        let fork_offset = self.u64()?;
        let source = self.str()?;
        let offset = self.opt_u64()?.map(Offset);
        let sub_offset = self.u64()?;
        Some(Some(ForkRec {
            source_id,
            fork_offset,
            spec: ForkSpec {
                source,
                offset,
                sub_offset,
            },
        }))
    }
}

pub fn encode_record(r: &Record, out: &mut Enc) {
    match r {
        Record::Create(c) => {
            out.u8(1);
            out.u64(c.id);
            out.str(&c.path);
            out.str(&c.content_type);
            out.bool(c.json);
            out.expiry(&c.expiry);
            out.expiry(&c.requested_expiry);
            out.bool(c.closed);
            out.u64(c.now_ms);
            out.fork(&c.fork);
            out.data(&c.data);
        }
        Record::Append(a) => {
            out.u8(2);
            out.u64(a.id);
            out.u64(a.start);
            out.u64(a.now_ms);
            out.bool(a.close);
            out.producer(&a.producer);
            out.opt_str(&a.stream_seq);
            out.data(&a.data);
        }
        Record::Delete {
            id,
            expired,
            now_ms,
        } => {
            out.u8(3);
            out.u64(*id);
            out.bool(*expired);
            out.u64(*now_ms);
        }
        Record::Touch(list) => {
            out.u8(4);
            out.u32(list.len() as u32);
            for (id, ms) in list {
                out.u64(*id);
                out.u64(*ms);
            }
        }
    }
}

pub fn decode_record(payload: Bytes) -> Option<Record> {
    let mut d = Dec::new(payload);
    let r = match d.u8()? {
        1 => Record::Create(CreateRec {
            id: d.u64()?,
            path: d.str()?,
            content_type: d.str()?,
            json: d.bool()?,
            expiry: d.expiry()?,
            requested_expiry: d.expiry()?,
            closed: d.bool()?,
            now_ms: d.u64()?,
            fork: d.fork()?,
            data: d.data()?,
        }),
        2 => Record::Append(AppendRec {
            id: d.u64()?,
            start: d.u64()?,
            now_ms: d.u64()?,
            close: d.bool()?,
            producer: d.producer()?,
            stream_seq: d.opt_str()?,
            data: d.data()?,
        }),
        3 => Record::Delete {
            id: d.u64()?,
            expired: d.bool()?,
            now_ms: d.u64()?,
        },
        4 => {
            let n = d.u32()?;
            let mut list = Vec::new();
            for _ in 0..n {
                list.push((d.u64()?, d.u64()?));
            }
            Record::Touch(list)
        }
        _ => return None,
    };
    d.done().then_some(r)
}

/// Frames a record for the WAL: length, checksum, payload.
pub fn frame_record(r: &Record, out: &mut Vec<u8>) {
    let mut enc = Enc(Vec::with_capacity(64 + r.data_len() as usize));
    encode_record(r, &mut enc);
    out.extend_from_slice(&(enc.0.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&enc.0).to_le_bytes());
    out.extend_from_slice(&enc.0);
}

/// Result of scanning one WAL segment.
#[derive(Debug)]
pub struct Scan {
    pub records: Vec<(u64, Record)>,
    /// Offset just past the last valid record.
    pub valid_end: u64,
    /// Whether the segment ends in bytes that are not a valid record.
    pub torn: bool,
}

/// Parses the records of a segment (after its header) until the first
/// invalid one.
pub fn scan_segment(buf: &Bytes) -> Scan {
    let mut pos = WAL_HEADER_LEN as usize;
    let mut records = Vec::new();
    loop {
        if pos == buf.len() {
            return Scan {
                records,
                valid_end: pos as u64,
                torn: false,
            };
        }
        let valid = (|| {
            let hdr = buf.get(pos..pos + 8)?;
            let len = u32::from_le_bytes(hdr[..4].try_into().ok()?);
            let crc = u32::from_le_bytes(hdr[4..8].try_into().ok()?);
            if len > MAX_RECORD_BYTES {
                return None;
            }
            let end = pos + 8 + len as usize;
            let payload = buf.get(pos + 8..end)?;
            if crc32c::crc32c(payload) != crc {
                return None;
            }
            Some((decode_record(buf.slice(pos + 8..end))?, end))
        })();
        match valid {
            Some((r, end)) => {
                records.push((pos as u64, r));
                pos = end;
            }
            None => {
                // A zero-filled (preallocated) tail is the clean end.
                let torn = buf[pos..].iter().any(|b| *b != 0);
                return Scan {
                    records,
                    valid_end: pos as u64,
                    torn,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::Create(CreateRec {
                id: 7,
                path: "a/b".into(),
                content_type: "application/json".into(),
                json: true,
                expiry: Expiry::TtlSecs(5),
                requested_expiry: Expiry::Never,
                closed: false,
                now_ms: 99,
                fork: Some(ForkRec {
                    source_id: 3,
                    fork_offset: 10,
                    spec: ForkSpec {
                        source: "s".into(),
                        offset: Some(Offset(4)),
                        sub_offset: 2,
                    },
                }),
                data: vec![Bytes::from_static(b"1,2,")],
            }),
            Record::Append(AppendRec {
                id: 7,
                start: 14,
                now_ms: 100,
                close: true,
                producer: Some(("p".into(), 1, 2)),
                stream_seq: Some("x".into()),
                data: vec![Bytes::from_static(b"3,")],
            }),
            Record::Delete {
                id: 7,
                expired: true,
                now_ms: 5,
            },
            Record::Touch(vec![(1, 2), (3, 4)]),
        ]
    }

    fn segment(records: &[Record]) -> Vec<u8> {
        let mut buf = WAL_MAGIC.to_vec();
        buf.extend_from_slice(&1u64.to_le_bytes());
        for r in records {
            frame_record(r, &mut buf);
        }
        buf
    }

    #[test]
    fn records_round_trip() {
        let recs = sample();
        let scan = scan_segment(&Bytes::from(segment(&recs)));
        assert!(!scan.torn);
        assert_eq!(
            scan.records.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
            recs
        );
    }

    /// A preallocated (zero-filled) tail after the records is a clean end;
    /// a partial record before the zeros is still a torn tail.
    #[test]
    fn zero_tail_is_clean_but_partial_record_is_torn() {
        let recs = sample();
        let mut seg = segment(&recs);
        let full = seg.len();
        seg.extend(std::iter::repeat_n(0u8, 4096));
        let scan = scan_segment(&Bytes::from(seg.clone()));
        assert!(!scan.torn);
        assert_eq!(scan.records.len(), recs.len());
        assert_eq!(scan.valid_end, full as u64);
        let mut partial = segment(&recs[..1]);
        let one = partial.len();
        partial.extend_from_slice(&seg[one..one + 5]);
        partial.extend(std::iter::repeat_n(0u8, 4096));
        let scan = scan_segment(&Bytes::from(partial));
        assert!(scan.torn);
        assert_eq!(scan.records.len(), 1);
    }

    /// Cutting a segment anywhere yields exactly the records that were
    /// complete before the cut, and flipping any byte of the last record
    /// drops only that record.
    #[test]
    fn torn_and_corrupt_tails_are_detected() {
        let recs = sample();
        let full = segment(&recs);
        let ends: Vec<usize> = {
            let s = scan_segment(&Bytes::from(full.clone()));
            let mut e: Vec<usize> = s.records.iter().skip(1).map(|(p, _)| *p as usize).collect();
            e.push(full.len());
            e
        };
        for cut in WAL_HEADER_LEN as usize..full.len() {
            let scan = scan_segment(&Bytes::from(full[..cut].to_vec()));
            let complete = ends.iter().filter(|e| **e <= cut).count();
            assert_eq!(scan.records.len(), complete, "cut at {cut}");
            assert_eq!(
                scan.torn,
                cut != WAL_HEADER_LEN as usize && !ends.contains(&cut),
                "cut at {cut}"
            );
        }
        let last_start = ends[ends.len() - 2];
        for i in last_start..full.len() {
            let mut bad = full.clone();
            bad[i] ^= 0x40;
            let scan = scan_segment(&Bytes::from(bad));
            assert_eq!(scan.records.len(), recs.len() - 1, "flip at {i}");
            assert!(scan.torn);
        }
    }
}
