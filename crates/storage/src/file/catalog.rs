//! The durable state machine: what the WAL (from a checkpoint on) says the
//! streams are. Recovery and the committer apply records with the same
//! [`Catalog::apply`], so a checkpoint written by the committer is exactly
//! the state a replay would rebuild.

use super::codec::{Dec, Enc, Record, CHECKPOINT_MAGIC};
use crate::memory::ProducerState;
use crate::{Expiry, ForkSpec};
use bytes::Bytes;
use durable_streams_protocol::Offset;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CStream {
    pub id: u64,
    /// `None` once the stream is no longer addressable (expired) but is
    /// retained because forks read its data.
    pub path: Option<String>,
    pub content_type: String,
    pub json: bool,
    pub expiry: Expiry,
    pub requested_expiry: Expiry,
    pub closed: bool,
    pub closed_by: Option<(String, u64, u64)>,
    pub base: u64,
    pub tail: u64,
    pub source_id: Option<u64>,
    pub fork: Option<ForkSpec>,
    pub producers: BTreeMap<String, ProducerState>,
    pub last_stream_seq: Option<String>,
    pub last_access_ms: u64,
    pub soft_deleted: bool,
    pub fork_refs: u64,
}

/// A side effect of applying a record to the catalog, carried out on files.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Write `data` at stream offset `start` of stream `id` (file offset `start - base`).
    Write {
        id: u64,
        base: u64,
        start: u64,
        data: Vec<Bytes>,
    },
    /// The stream is gone for good: remove its data file.
    RemoveData { id: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub streams: BTreeMap<u64, CStream>,
    pub paths: HashMap<String, u64>,
    pub next_id: u64,
}

impl Catalog {
    pub fn apply(&mut self, r: &Record, effects: &mut Vec<Effect>) {
        match r {
            Record::Create(c) => {
                if let Some(old) = self.paths.get(&c.path).copied() {
                    // The live layer only re-creates a path after the old
                    // stream expired; make sure it no longer owns the path.
                    self.delete(old, true, effects);
                    self.paths.remove(&c.path);
                }
                let base = c.fork.as_ref().map(|f| f.fork_offset).unwrap_or(0);
                if let Some(f) = &c.fork {
                    if let Some(src) = self.streams.get_mut(&f.source_id) {
                        src.fork_refs += 1;
                    }
                }
                let len: u64 = c.data.iter().map(|b| b.len() as u64).sum();
                if len > 0 {
                    effects.push(Effect::Write {
                        id: c.id,
                        base,
                        start: base,
                        data: c.data.clone(),
                    });
                }
                self.streams.insert(
                    c.id,
                    CStream {
                        id: c.id,
                        path: Some(c.path.clone()),
                        content_type: c.content_type.clone(),
                        json: c.json,
                        expiry: c.expiry.clone(),
                        requested_expiry: c.requested_expiry.clone(),
                        closed: c.closed,
                        closed_by: None,
                        base,
                        tail: base + len,
                        source_id: c.fork.as_ref().map(|f| f.source_id),
                        fork: c.fork.as_ref().map(|f| f.spec.clone()),
                        producers: BTreeMap::new(),
                        last_stream_seq: None,
                        last_access_ms: c.now_ms,
                        soft_deleted: false,
                        fork_refs: 0,
                    },
                );
                self.paths.insert(c.path.clone(), c.id);
                self.next_id = self.next_id.max(c.id + 1);
            }
            Record::Append(a) => {
                let Some(s) = self.streams.get_mut(&a.id) else {
                    return;
                };
                let len: u64 = a.data.iter().map(|b| b.len() as u64).sum();
                if len > 0 {
                    effects.push(Effect::Write {
                        id: a.id,
                        base: s.base,
                        start: a.start,
                        data: a.data.clone(),
                    });
                }
                s.tail = a.start + len;
                if let Some((pid, epoch, seq)) = &a.producer {
                    s.producers.insert(
                        pid.clone(),
                        ProducerState {
                            epoch: *epoch,
                            last_seq: *seq,
                        },
                    );
                    if a.close {
                        s.closed_by = Some((pid.clone(), *epoch, *seq));
                    }
                }
                if a.stream_seq.is_some() {
                    s.last_stream_seq = a.stream_seq.clone();
                }
                s.closed |= a.close;
                s.last_access_ms = s.last_access_ms.max(a.now_ms);
            }
            Record::Delete { id, expired, .. } => self.delete(*id, *expired, effects),
            Record::Touch(list) => {
                for (id, ms) in list {
                    if let Some(s) = self.streams.get_mut(id) {
                        s.last_access_ms = s.last_access_ms.max(*ms);
                    }
                }
            }
        }
    }

    /// Deletes (or expires) a stream: removed at once without forks;
    /// otherwise retained for them, soft-deleted (410, path kept) for a
    /// delete, detached from its path (404) for an expiry.
    fn delete(&mut self, id: u64, expired: bool, effects: &mut Vec<Effect>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.fork_refs > 0 {
            if expired {
                if let Some(p) = s.path.take() {
                    if self.paths.get(&p) == Some(&id) {
                        self.paths.remove(&p);
                    }
                }
            } else {
                s.soft_deleted = true;
            }
            return;
        }
        self.remove(id, effects);
    }

    /// Removes a stream with no forks, cascading to sources that were
    /// retained only for it.
    fn remove(&mut self, mut id: u64, effects: &mut Vec<Effect>) {
        loop {
            let Some(s) = self.streams.remove(&id) else {
                return;
            };
            if let Some(p) = &s.path {
                if self.paths.get(p) == Some(&id) {
                    self.paths.remove(p);
                }
            }
            effects.push(Effect::RemoveData { id });
            let Some(src_id) = s.source_id else { return };
            let Some(src) = self.streams.get_mut(&src_id) else {
                return;
            };
            src.fork_refs = src.fork_refs.saturating_sub(1);
            if src.fork_refs > 0 || !(src.soft_deleted || src.path.is_none()) {
                return;
            }
            id = src_id;
        }
    }

    pub fn encode_checkpoint(&self, wal_segment: u64, wal_offset: u64) -> Vec<u8> {
        let mut b = Enc::default();
        b.u64(wal_segment);
        b.u64(wal_offset);
        b.u64(self.next_id);
        b.u64(self.streams.len() as u64);
        for s in self.streams.values() {
            b.u64(s.id);
            b.opt_str(&s.path);
            b.str(&s.content_type);
            b.bool(s.json);
            b.expiry(&s.expiry);
            b.expiry(&s.requested_expiry);
            b.bool(s.closed);
            b.producer(&s.closed_by);
            b.u64(s.base);
            b.u64(s.tail);
            b.opt_u64(s.source_id);
            match &s.fork {
                None => b.u8(0),
                Some(f) => {
                    b.u8(1);
                    b.str(&f.source);
                    b.opt_u64(f.offset.map(|o| o.0));
                    b.u64(f.sub_offset);
                }
            }
            b.u32(s.producers.len() as u32);
            for (id, p) in &s.producers {
                b.str(id);
                b.u64(p.epoch);
                b.u64(p.last_seq);
            }
            b.opt_str(&s.last_stream_seq);
            b.u64(s.last_access_ms);
            b.bool(s.soft_deleted);
            b.u64(s.fork_refs);
        }
        let body = b.0;
        let mut out = CHECKPOINT_MAGIC.to_vec();
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a checkpoint: `(catalog, wal_segment, wal_offset)`, or `None`
    /// if it is not a complete, intact checkpoint.
    pub fn decode_checkpoint(buf: &[u8]) -> Option<(Catalog, u64, u64)> {
        if buf.get(..8)? != CHECKPOINT_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(buf.get(8..12)?.try_into().ok()?);
        let len = usize::try_from(u64::from_le_bytes(buf.get(12..20)?.try_into().ok()?)).ok()?;
        let body = buf.get(20..20usize.checked_add(len)?)?;
        if crc32c::crc32c(body) != crc {
            return None;
        }
        let mut d = Dec::new(Bytes::copy_from_slice(body));
        let seg = d.u64()?;
        let off = d.u64()?;
        let mut cat = Catalog {
            next_id: d.u64()?,
            ..Catalog::default()
        };
        let n = d.u64()?;
        for _ in 0..n {
            let id = d.u64()?;
            let path = d.opt_str()?;
            let content_type = d.str()?;
            let json = d.bool()?;
            let expiry = d.expiry()?;
            let requested_expiry = d.expiry()?;
            let closed = d.bool()?;
            let closed_by = d.producer()?;
            let base = d.u64()?;
            let tail = d.u64()?;
            let source_id = d.opt_u64()?;
            let fork = if d.bool()? {
                Some(ForkSpec {
                    source: d.str()?,
                    offset: d.opt_u64()?.map(Offset),
                    sub_offset: d.u64()?,
                })
            } else {
                None
            };
            let np = d.u32()?;
            let mut producers = BTreeMap::new();
            for _ in 0..np {
                let pid = d.str()?;
                producers.insert(
                    pid,
                    ProducerState {
                        epoch: d.u64()?,
                        last_seq: d.u64()?,
                    },
                );
            }
            let last_stream_seq = d.opt_str()?;
            let last_access_ms = d.u64()?;
            let soft_deleted = d.bool()?;
            let fork_refs = d.u64()?;
            if let Some(p) = &path {
                cat.paths.insert(p.clone(), id);
            }
            cat.streams.insert(
                id,
                CStream {
                    id,
                    path,
                    content_type,
                    json,
                    expiry,
                    requested_expiry,
                    closed,
                    closed_by,
                    base,
                    tail,
                    source_id,
                    fork,
                    producers,
                    last_stream_seq,
                    last_access_ms,
                    soft_deleted,
                    fork_refs,
                },
            );
        }
        d.done().then_some((cat, seg, off))
    }
}
