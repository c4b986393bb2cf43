//! The in-memory engine.
//!
//! Layout: a registry `path -> Arc<Stream>` behind a read-write lock that is
//! held only for lookups and for inserting/removing entries; every stream has
//! its own mutex for its mutable state. Appends to different streams never
//! contend; appends to one stream (and, within it, each idempotent producer)
//! are serialised by that stream's mutex, which is what the spec requires.
//!
//! Data is kept as one immutable block per append (a JSON append of many
//! messages is one block with the end of each message beside it), so a read
//! hands out reference-counted slices of whole or partial blocks and copies
//! only small blocks; a replay of many messages appended in batches costs a
//! few slices per response, not a step per message.
//!
//! Forks hold an `Arc` to their source: the source's bytes below the fork
//! offset are immutable, so a fork reads them directly. A source that is
//! deleted while forks reference it stays in the registry as soft-deleted
//! (410, path blocked); an expired one leaves the registry (404, path free)
//! and lives on only through its forks' `Arc`s.
//!
//! Lock order: registry, then at most one stream mutex at a time. Code that
//! holds a stream mutex never takes the registry lock.

use crate::rules::{self, Decision, WriterState};
use crate::{
    AppendOutcome, AppendRequest, Clock, CreateOutcome, CreateRequest, Engine, Expiry, ForkSpec,
    ReadChunk, ReadFrom, Signal, StorageError, StreamMeta, SystemClock,
};
use async_trait::async_trait;
use bytes::Bytes;
use durable_streams_protocol::{parse::same_media_type, Offset};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Idempotent-producer state of one producer id on one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerState {
    pub epoch: u64,
    pub last_seq: u64,
}

/// What the producer rules say about a request (PROTOCOL.md 5.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerCheck {
    Accept,
    Duplicate { epoch: u64, last_seq: u64 },
}

/// The idempotent-producer validation, as a pure function so that every
/// engine applies the same rules.
pub fn check_producer(
    state: Option<ProducerState>,
    epoch: u64,
    seq: u64,
) -> Result<ProducerCheck, StorageError> {
    let Some(state) = state else {
        // A producer the stream has never seen may start at any epoch, at seq 0.
        return if seq == 0 {
            Ok(ProducerCheck::Accept)
        } else {
            Err(StorageError::SeqGap {
                expected: 0,
                received: seq,
            })
        };
    };
    if epoch < state.epoch {
        return Err(StorageError::StaleEpoch {
            current: state.epoch,
        });
    }
    if epoch > state.epoch {
        return if seq == 0 {
            Ok(ProducerCheck::Accept)
        } else {
            Err(StorageError::EpochSeqNotZero)
        };
    }
    if seq <= state.last_seq {
        Ok(ProducerCheck::Duplicate {
            epoch,
            last_seq: state.last_seq,
        })
    } else if seq == state.last_seq + 1 {
        Ok(ProducerCheck::Accept)
    } else {
        Err(StorageError::SeqGap {
            expected: state.last_seq + 1,
            received: seq,
        })
    }
}

/// Computes the expiry instant (Unix ms) of a stream.
pub fn expires_at_ms(expiry: &Expiry, last_access_ms: u64) -> Option<u64> {
    match expiry {
        Expiry::Never => None,
        Expiry::TtlSecs(s) => Some(last_access_ms.saturating_add(s.saturating_mul(1000))),
        Expiry::At(t) => Some(t.timestamp_millis().max(0) as u64),
    }
}

#[derive(Debug)]
struct Stream {
    incarnation: u64,
    content_type: String,
    json: bool,
    /// Fork offset: the stream's own records start here.
    base: u64,
    source: Option<Arc<Stream>>,
    /// The create request's identity, for idempotent re-creation.
    requested_expiry: Expiry,
    fork: Option<ForkSpec>,
    state: Mutex<State>,
    signal: watch::Sender<Signal>,
}

#[derive(Debug)]
struct State {
    /// Own data, one block per append, contiguous from `base`.
    blocks: Vec<Block>,
    tail: u64,
    /// Closure, producers and Stream-Seq.
    w: WriterState,
    expiry: Expiry,
    last_access_ms: u64,
    soft_deleted: bool,
    /// Forks that reference this stream.
    fork_refs: u64,
    /// No longer reachable by path (deleted or expired).
    removed: bool,
}

/// The data of one append (or of a create's initial records).
#[derive(Debug)]
struct Block {
    /// Stream offset of the first byte.
    start: u64,
    bytes: Bytes,
    /// JSON streams: the end of each message, relative to `start`, ascending;
    /// the last is `bytes.len()`. Empty for other streams (any byte offset
    /// is a boundary there).
    ends: Box<[u64]>,
}

impl Block {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

/// Appends `records` to `blocks` as one block and returns the new tail. A
/// single record is kept as it is; several are copied into one buffer, once,
/// so that reads never step through them one by one.
fn push_records(blocks: &mut Vec<Block>, json: bool, tail: u64, records: &[Bytes]) -> u64 {
    let mut records = records.iter().filter(|r| !r.is_empty());
    let Some(first) = records.next() else {
        return tail;
    };
    // Message ends are kept for JSON streams only.
    let mut ends = Vec::new();
    let bytes = if records.clone().next().is_none() {
        if json {
            ends.push(first.len() as u64);
        }
        first.clone()
    } else {
        let all = std::iter::once(first).chain(records);
        let mut buf = Vec::with_capacity(all.clone().map(|r| r.len()).sum());
        for r in all {
            buf.extend_from_slice(r);
            if json {
                ends.push(buf.len() as u64);
            }
        }
        Bytes::from(buf)
    };
    let block = Block {
        start: tail,
        bytes,
        ends: ends.into(),
    };
    let tail = block.end();
    blocks.push(block);
    tail
}

impl Stream {
    fn meta_locked(&self, st: &State) -> StreamMeta {
        StreamMeta {
            incarnation: self.incarnation,
            content_type: self.content_type.clone(),
            json: self.json,
            tail: Offset(st.tail),
            closed: st.w.closed,
            expiry: st.expiry.clone(),
            expires_at_ms: expires_at_ms(&st.expiry, st.last_access_ms),
        }
    }

    fn publish(&self, st: &State) {
        Signal {
            tail: Offset(st.tail),
            closed: st.w.closed,
            gone: st.removed,
        }
        .publish(&self.signal);
    }
}

/// Limits on what one read may collect.
#[derive(Debug, Clone, Copy)]
struct Budget {
    bytes: usize,
    records: usize,
}

/// Appends the stored data of `from..upto` to `out`, within `budget`.
/// Returns the offset reached. JSON streams stop at record boundaries, but
/// always make progress by at least one record when nothing was collected.
fn collect(
    s: &Arc<Stream>,
    mut from: u64,
    upto: u64,
    budget: &mut Budget,
    out: &mut Vec<Bytes>,
) -> Result<u64, StorageError> {
    if from < s.base {
        let src = s
            .source
            .as_ref()
            .ok_or(StorageError::Io("fork without source".into()))?;
        let limit = upto.min(s.base);
        let reached = collect(src, from, limit, budget, out)?;
        if reached < limit || reached >= upto {
            return Ok(reached);
        }
        from = reached;
    }
    let st = s.state.lock();
    let upto = upto.min(st.tail);
    if from >= upto {
        return Ok(from);
    }
    let mut idx = st.blocks.partition_point(|b| b.end() <= from);
    // Small blocks are copied into one buffer instead of returned as a
    // handle each: a handle costs two reference-count updates, a list entry
    // and a later copy, which for ~100-byte messages appended one by one is
    // most of a replay's CPU.
    let mut run: Vec<u8> = Vec::new();
    while idx < st.blocks.len() && from < upto && budget.records > 0 {
        let block = &st.blocks[idx];
        // Invariant: blocks are contiguous, so `block.start <= from < block.end()`.
        let within = (from - block.start) as usize;
        let limit = ((upto - block.start) as usize).min(block.bytes.len());
        let take = if s.json {
            let collected = !(out.is_empty() && run.is_empty());
            match json_take(&block.ends, within, limit, budget, collected)? {
                Some((bytes, messages)) => {
                    budget.records -= messages;
                    bytes
                }
                None => break,
            }
        } else {
            if budget.bytes == 0 {
                break;
            }
            budget.records -= 1;
            (limit - within).min(budget.bytes)
        };
        let part = &block.bytes[within..within + take];
        if take <= SMALL_PART_BYTES {
            if run.capacity() == 0 {
                run.reserve(budget.bytes.min((upto - from) as usize).min(MAX_RUN_BYTES));
            }
            run.extend_from_slice(part);
        } else {
            if !run.is_empty() {
                out.push(Bytes::from(std::mem::take(&mut run)));
            }
            out.push(block.bytes.slice(within..within + take));
        }
        budget.bytes = budget.bytes.saturating_sub(take);
        from += take as u64;
        if within + take < block.bytes.len() {
            break; // stopped inside this block (budget or `upto`)
        }
        idx += 1;
    }
    if !run.is_empty() {
        out.push(Bytes::from(run));
    }
    Ok(from)
}

/// How much of a JSON block a read takes, from `within` (which must be a
/// message boundary) up to `limit`: whole messages only, within the budget's
/// bytes and message count, but at least one message when the read has
/// collected nothing yet (`collected` false) so that it always progresses.
/// Returns `(bytes, messages)`, or `None` when nothing fits.
fn json_take(
    ends: &[u64],
    within: usize,
    limit: usize,
    budget: &Budget,
    collected: bool,
) -> Result<Option<(usize, usize)>, StorageError> {
    let first = if within == 0 {
        0
    } else {
        match ends.binary_search(&(within as u64)) {
            Ok(k) => k + 1,
            Err(_) => return Err(StorageError::OffsetNotAligned),
        }
    };
    // Messages `first..below_limit` end at or before `limit`;
    // `first..in_budget` fit the byte budget.
    let below_limit = ends.partition_point(|&e| e <= limit as u64);
    let in_budget =
        ends.partition_point(|&e| e.saturating_sub(within as u64) <= budget.bytes as u64);
    let mut stop = below_limit
        .min(in_budget)
        .min(first.saturating_add(budget.records));
    if stop <= first {
        if collected || below_limit <= first || budget.records == 0 {
            return Ok(None);
        }
        stop = first + 1;
    }
    Ok(Some((ends[stop - 1] as usize - within, stop - first)))
}

/// Parts of blocks up to this size are returned copied into one buffer by
/// [`collect`]; larger ones as slices of the stored block.
const SMALL_PART_BYTES: usize = 4096;
/// The most [`collect`] reserves at once for copied records.
const MAX_RUN_BYTES: usize = 1 << 20;

fn is_expired(st: &State, now_ms: u64) -> bool {
    expires_at_ms(&st.expiry, st.last_access_ms).is_some_and(|t| now_ms >= t)
}

/// The in-memory engine. Everything is lost when the process exits.
#[derive(Debug)]
pub struct MemoryEngine {
    streams: RwLock<HashMap<String, Arc<Stream>>>,
    next_incarnation: AtomicU64,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEngine {
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        // Incarnations start at the wall-clock time in microseconds so that an
        // ETag minted by a previous process never matches a stream of this one.
        let start = clock.now_ms().saturating_mul(1000);
        MemoryEngine {
            streams: RwLock::new(HashMap::new()),
            next_incarnation: AtomicU64::new(start),
            clock,
        }
    }

    /// Looks a stream up for a client operation: expired streams are removed
    /// on the spot (404), soft-deleted ones answer 410.
    fn live(&self, path: &str) -> Result<Arc<Stream>, StorageError> {
        let s = self
            .streams
            .read()
            .get(path)
            .cloned()
            .ok_or(StorageError::NotFound)?;
        let now = self.clock.now_ms();
        let (expired, soft) = {
            let st = s.state.lock();
            (is_expired(&st, now), st.soft_deleted)
        };
        if expired {
            self.remove(path, &s, true);
            return Err(StorageError::NotFound);
        }
        if soft {
            return Err(StorageError::Gone);
        }
        Ok(s)
    }

    /// Removes `s` (registered at `path`) from the registry, or soft-deletes
    /// it while forks reference it (never for expiry: an expired stream
    /// frees its path, its forks keep its data alive). Cascades to sources
    /// that were waiting only for this fork.
    fn remove(&self, path: &str, s: &Arc<Stream>, expired: bool) {
        let mut reg = self.streams.write();
        let mut path = path.to_owned();
        let mut cur = s.clone();
        loop {
            if !reg.get(&path).is_some_and(|e| Arc::ptr_eq(e, &cur)) {
                return; // already removed or replaced by a new incarnation
            }
            {
                let mut st = cur.state.lock();
                if st.fork_refs > 0 && !expired {
                    st.soft_deleted = true;
                    return;
                }
                st.removed = true;
                cur.publish(&st);
            }
            reg.remove(&path);
            // Release this stream's reference on its source; continue the
            // cascade if the source was soft-deleted and this was its last fork.
            let Some(src) = cur.source.clone() else {
                return;
            };
            let Some(fork) = cur.fork.as_ref() else {
                return;
            };
            let cascade = {
                let mut st = src.state.lock();
                st.fork_refs = st.fork_refs.saturating_sub(1);
                st.fork_refs == 0 && st.soft_deleted && !st.removed
            };
            if !cascade {
                return;
            }
            path = fork.source.clone();
            cur = src;
        }
    }

    fn touch(&self, st: &mut State) {
        st.last_access_ms = self.clock.now_ms();
    }

    fn new_stream(
        &self,
        req: &CreateRequest,
        content_type: String,
        json: bool,
        base: u64,
        source: Option<Arc<Stream>>,
        expiry: Expiry,
    ) -> Arc<Stream> {
        let mut blocks = Vec::new();
        let tail = push_records(&mut blocks, json, base, &req.records);
        let state = State {
            blocks,
            tail,
            w: WriterState {
                closed: req.closed,
                ..WriterState::default()
            },
            expiry,
            last_access_ms: self.clock.now_ms(),
            soft_deleted: false,
            fork_refs: 0,
            removed: false,
        };
        let (signal, _) = watch::channel(Signal {
            tail: Offset(tail),
            closed: req.closed,
            gone: false,
        });
        Arc::new(Stream {
            incarnation: self.next_incarnation.fetch_add(1, Ordering::Relaxed),
            content_type,
            json,
            base,
            source,
            requested_expiry: req.expiry.clone(),
            fork: req.fork.clone(),
            state: Mutex::new(state),
            signal,
        })
    }

    /// Resolves a fork's source and exact divergence offset.
    fn resolve_fork(&self, spec: &ForkSpec) -> Result<(Arc<Stream>, u64), StorageError> {
        let src = match self.live(&spec.source) {
            Ok(s) => s,
            Err(StorageError::NotFound) => return Err(StorageError::ForkSourceNotFound),
            Err(StorageError::Gone) => return Err(StorageError::ForkSourceGone),
            Err(e) => return Err(e),
        };
        let tail = src.state.lock().tail;
        let anchor = match spec.offset {
            Some(o) if o.0 > tail => return Err(StorageError::ForkOffsetBeyondTail),
            Some(o) => o.0,
            None => tail,
        };
        let point = if spec.sub_offset == 0 {
            anchor
        } else if src.json {
            let wanted = usize::try_from(spec.sub_offset).unwrap_or(usize::MAX);
            let mut budget = Budget {
                bytes: usize::MAX,
                records: wanted,
            };
            let mut out = Vec::new();
            let reached = collect(&src, anchor, tail, &mut budget, &mut out)?;
            if budget.records != 0 {
                return Err(StorageError::ForkSubOffsetOvershoot);
            }
            reached
        } else {
            match anchor.checked_add(spec.sub_offset) {
                Some(p) if p <= tail => p,
                _ => return Err(StorageError::ForkSubOffsetOvershoot),
            }
        };
        if src.json && spec.sub_offset == 0 && point != tail {
            // Validate alignment of a JSON fork point: it must start a record.
            let mut budget = Budget {
                bytes: 0,
                records: 1,
            };
            collect(&src, point, tail, &mut budget, &mut Vec::new())?;
        }
        Ok((src, point))
    }
}

fn same_config(s: &Stream, st: &State, req: &CreateRequest) -> bool {
    rules::same_config(
        &s.content_type,
        &s.requested_expiry,
        &s.fork,
        st.w.closed,
        req,
    )
}

#[async_trait]
impl Engine for MemoryEngine {
    async fn create(&self, path: &str, req: CreateRequest) -> Result<CreateOutcome, StorageError> {
        // Idempotent re-creation check first (a soft-deleted path blocks re-creation).
        // Bound first: a guard in an `if let` scrutinee lives through the
        // block, and `remove` below takes the write lock (self-deadlock).
        let existing = self.streams.read().get(path).cloned();
        if let Some(existing) = existing {
            let now = self.clock.now_ms();
            let st = existing.state.lock();
            if st.soft_deleted {
                return Err(StorageError::ConfigMismatch);
            }
            if !is_expired(&st, now) {
                return if same_config(&existing, &st, &req) {
                    Ok(CreateOutcome::Existed(existing.meta_locked(&st)))
                } else {
                    Err(StorageError::ConfigMismatch)
                };
            }
            drop(st);
            self.remove(path, &existing, true);
        }

        let stream = match &req.fork {
            None => {
                let ct = req
                    .content_type
                    .clone()
                    .unwrap_or_else(|| "application/octet-stream".into());
                self.new_stream(&req, ct, req.json, 0, None, req.expiry.clone())
            }
            Some(spec) => {
                let (src, point) = self.resolve_fork(spec)?;
                if let Some(ct) = &req.content_type {
                    if !same_media_type(ct, &src.content_type) {
                        return Err(StorageError::ContentTypeMismatch);
                    }
                }
                let expiry = match (&req.expiry, &src.state.lock().expiry) {
                    (Expiry::Never, inherited) => inherited.clone(),
                    (own, _) => own.clone(),
                };
                self.new_stream(
                    &req,
                    src.content_type.clone(),
                    src.json,
                    point,
                    Some(src.clone()),
                    expiry,
                )
            }
        };

        let mut reg = self.streams.write();
        if let Some(existing) = reg.get(path) {
            // Lost a race with a concurrent create of the same path.
            let st = existing.state.lock();
            return if !st.soft_deleted && same_config(existing, &st, &req) {
                Ok(CreateOutcome::Existed(existing.meta_locked(&st)))
            } else {
                Err(StorageError::ConfigMismatch)
            };
        }
        if let Some(src) = &stream.source {
            let mut sst = src.state.lock();
            if sst.removed || sst.soft_deleted {
                return Err(if sst.soft_deleted {
                    StorageError::ForkSourceGone
                } else {
                    StorageError::ForkSourceNotFound
                });
            }
            sst.fork_refs += 1;
        }
        reg.insert(path.to_owned(), stream.clone());
        let st = stream.state.lock();
        Ok(CreateOutcome::Created(stream.meta_locked(&st)))
    }

    async fn append(&self, path: &str, req: AppendRequest) -> Result<AppendOutcome, StorageError> {
        let s = self.live(path)?;
        let mut st = s.state.lock();
        if st.removed {
            return Err(StorageError::NotFound);
        }
        match st.w.decide(&s.content_type, st.tail, &req)? {
            Decision::Apply => {}
            Decision::Duplicate { epoch, seq } => {
                self.touch(&mut st);
                return Ok(AppendOutcome::Duplicate {
                    meta: s.meta_locked(&st),
                    epoch,
                    seq,
                });
            }
            Decision::AlreadyClosed => {
                self.touch(&mut st);
                return Ok(AppendOutcome::AlreadyClosed {
                    meta: s.meta_locked(&st),
                });
            }
        }
        // Commit: data, producer state, Stream-Seq and closure together.
        let accepted = st.w.apply(&req);
        let State { blocks, tail, .. } = &mut *st;
        *tail = push_records(blocks, s.json, *tail, &req.records);
        self.touch(&mut st);
        s.publish(&st);
        Ok(AppendOutcome::Applied {
            meta: s.meta_locked(&st),
            producer: accepted,
        })
    }

    async fn head(&self, path: &str) -> Result<StreamMeta, StorageError> {
        let s = self.live(path)?;
        let st = s.state.lock();
        Ok(s.meta_locked(&st))
    }

    async fn read(
        &self,
        path: &str,
        from: ReadFrom,
        max_bytes: usize,
    ) -> Result<ReadChunk, StorageError> {
        let s = self.live(path)?;
        let tail = {
            let mut st = s.state.lock();
            self.touch(&mut st);
            st.tail
        };
        let start = match from {
            ReadFrom::Start => 0,
            ReadFrom::Tail => tail,
            ReadFrom::At(o) if o.0 > tail => return Err(StorageError::OffsetBeyondTail),
            ReadFrom::At(o) => o.0,
        };
        let mut data = Vec::new();
        let mut budget = Budget {
            bytes: max_bytes.max(1),
            records: usize::MAX,
        };
        let next = collect(&s, start, tail, &mut budget, &mut data)?;
        let meta = {
            let st = s.state.lock();
            let mut m = s.meta_locked(&st);
            // Report the tail the data was read against, so `up_to_date`
            // and closure describe this response, not a later append.
            if m.tail.0 != tail {
                m.tail = Offset(tail);
                m.closed = false;
            }
            m
        };
        Ok(ReadChunk {
            meta,
            start: Offset(start),
            next: Offset(next),
            data,
        })
    }

    async fn delete(&self, path: &str) -> Result<(), StorageError> {
        let s = self.live(path)?;
        self.remove(path, &s, false);
        Ok(())
    }

    async fn watch(&self, path: &str) -> Result<watch::Receiver<Signal>, StorageError> {
        let s = self.live(path)?;
        Ok(s.signal.subscribe())
    }

    fn metrics(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![(
            "ds_streams",
            "Addressable streams",
            self.streams.read().len() as u64,
        )]
    }

    async fn list_paths(&self) -> Vec<String> {
        let now = self.clock.now_ms();
        self.streams
            .read()
            .iter()
            .filter(|(_, s)| {
                let st = s.state.lock();
                !st.soft_deleted && !is_expired(&st, now)
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    async fn sweep_expired(&self) -> usize {
        let now = self.clock.now_ms();
        let expired: Vec<(String, Arc<Stream>)> = self
            .streams
            .read()
            .iter()
            .filter(|(_, s)| is_expired(&s.state.lock(), now))
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect();
        for (p, s) in &expired {
            self.remove(p, s, true);
        }
        expired.len()
    }
}
