//! Live SSE fan-out shares its work: when an append wakes many readers of a
//! stream who all sit at the same offset, the first one reads the engine and
//! encodes the `event: data` frame, and the others clone its `Bytes`.
//!
//! An entry is keyed by what determines the answer: the stream's incarnation
//! (so a deleted and re-created stream never sees its predecessor's data),
//! the offset read from, and the tail and closure the reader was woken by.
//! The stored bytes of `from..next` never change within an incarnation, and
//! the engine returned them, so they were visible when read; any reader that
//! has seen the same signal may be given the same answer.

use bytes::Bytes;
use durable_streams_protocol::Offset;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::OnceCell;

/// Entries kept per stream: readers at the live tail share one; the others
/// cover readers an append or two behind.
const SLOTS_PER_STREAM: usize = 4;
/// A larger data event is still shared by the readers already waiting for
/// it, then dropped from the cache.
const MAX_EVENT_BYTES: usize = 256 * 1024;
/// What the caches of all streams may hold together.
const MAX_TOTAL_BYTES: usize = 64 * 1024 * 1024;

/// One live read as every reader at `from` receives it: the encoded data
/// event (if any) and what its control event reports.
#[derive(Debug)]
pub struct Delivery {
    /// The `event: data` frame; `None` when the read found no data.
    pub data_event: Option<Bytes>,
    pub next: Offset,
    /// The control event from `streamNextOffset` on (it does not depend on
    /// the reader's cursor).
    pub control_tail: Vec<u8>,
    pub up_to_date: bool,
    pub closed: bool,
    /// When the stream expires, as the engine reported it.
    pub expires_at_ms: Option<u64>,
}

impl Delivery {
    fn cost(&self) -> usize {
        self.data_event.as_ref().map_or(0, |b| b.len()) + self.control_tail.len()
    }
}

/// What identifies one shared read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub incarnation: u64,
    pub from: u64,
    /// Tail and closure of the signal that woke the reader.
    pub tail: u64,
    pub closed: bool,
}

/// Bytes held by all streams' caches (one per server).
#[derive(Debug, Default)]
pub struct Budget {
    bytes: AtomicUsize,
}

impl Budget {
    pub fn used_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// A cache entry still to be filled (see [`StreamShare::lookup`]).
#[derive(Debug)]
pub struct Pending(Arc<Slot>);

#[derive(Debug)]
struct Slot {
    key: Key,
    cell: OnceCell<Arc<Delivery>>,
    /// Bytes charged to the budget; changed only under `StreamShare::slots`.
    charged: AtomicUsize,
}

/// Per-stream state shared by its live readers; exists while the stream has
/// at least one (the live-reader registry in `AppState` owns it).
#[derive(Debug)]
pub struct StreamShare {
    path: String,
    /// Live readers of this path; with one there is nothing to share.
    pub(crate) readers: AtomicUsize,
    slots: Mutex<VecDeque<Arc<Slot>>>,
    budget: Arc<Budget>,
    /// The stream's reactor for parked SSE connections, while it runs.
    pub(crate) reactor: parking_lot::Mutex<Option<crate::sse_reactor::ReactorHandle>>,
}

impl StreamShare {
    pub fn new(path: String, budget: Arc<Budget>) -> Self {
        StreamShare {
            path,
            readers: AtomicUsize::new(0),
            slots: Mutex::new(VecDeque::with_capacity(SLOTS_PER_STREAM)),
            budget,
            reactor: parking_lot::Mutex::new(None),
        }
    }

    /// The stream's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// True when more than one live reader could use a shared entry.
    pub fn shared(&self) -> bool {
        self.readers.load(Ordering::Relaxed) > 1
    }

    /// The delivery for `key`: the cached one, or the result of `read`,
    /// which then is cached. Concurrent callers with the same key wait for
    /// the first one's read instead of reading themselves.
    pub async fn get_or_read<E, Fut>(
        &self,
        key: Key,
        read: impl FnOnce() -> Fut,
    ) -> Result<Arc<Delivery>, E>
    where
        Fut: Future<Output = Result<Delivery, E>>,
    {
        match self.lookup(key) {
            Ok(d) => Ok(d),
            Err(pending) => self.fill(pending, read).await,
        }
    }

    /// The cached delivery for `key`, or the entry to [`fill`](Self::fill).
    /// Synchronous, so a reader served from the cache (all but the first
    /// per append) keeps no read future in its connection's state.
    pub fn lookup(&self, key: Key) -> Result<Arc<Delivery>, Pending> {
        let slot = self.slot(key);
        match slot.cell.get() {
            Some(d) => Ok(d.clone()),
            None => Err(Pending(slot)),
        }
    }

    /// Fills an entry [`lookup`](Self::lookup) found empty with the result
    /// of `read`, or waits for a concurrent caller's.
    pub async fn fill<E, Fut>(
        &self,
        pending: Pending,
        read: impl FnOnce() -> Fut,
    ) -> Result<Arc<Delivery>, E>
    where
        Fut: Future<Output = Result<Delivery, E>>,
    {
        let slot = pending.0;
        let mut filled = false;
        let d = slot
            .cell
            .get_or_try_init(|| {
                filled = true;
                let fut = read();
                async move { fut.await.map(Arc::new) }
            })
            .await?
            .clone();
        if filled {
            self.charge(&slot, d.cost());
        }
        Ok(d)
    }

    fn slot(&self, key: Key) -> Arc<Slot> {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.iter().find(|s| s.key == key) {
            return s.clone();
        }
        // Entries of an earlier incarnation can never match again.
        if slots.iter().any(|s| s.key.incarnation != key.incarnation) {
            slots.retain(|s| {
                let keep = s.key.incarnation == key.incarnation;
                if !keep {
                    self.uncharge(s);
                }
                keep
            });
        }
        if slots.len() >= SLOTS_PER_STREAM {
            if let Some(old) = slots.pop_front() {
                self.uncharge(&old);
            }
        }
        let s = Arc::new(Slot {
            key,
            cell: OnceCell::new(),
            charged: AtomicUsize::new(0),
        });
        slots.push_back(s.clone());
        s
    }

    /// Charges a filled slot to the budget, or drops it from the cache when
    /// it is too large or the budget is spent (its waiters still get it).
    fn charge(&self, slot: &Arc<Slot>, cost: usize) {
        let mut slots = self.slots.lock();
        let Some(i) = slots.iter().position(|s| Arc::ptr_eq(s, slot)) else {
            return;
        };
        let fits = cost <= MAX_EVENT_BYTES
            && self
                .budget
                .bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    (used + cost <= MAX_TOTAL_BYTES).then_some(used + cost)
                })
                .is_ok();
        if fits {
            slot.charged.store(cost, Ordering::Relaxed);
        } else {
            slots.remove(i);
        }
    }

    fn uncharge(&self, slot: &Slot) {
        let n = slot.charged.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.budget.bytes.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

impl Drop for StreamShare {
    fn drop(&mut self) {
        let slots = std::mem::take(self.slots.get_mut());
        for s in &slots {
            self.uncharge(s);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn delivery(n: usize) -> Delivery {
        Delivery {
            data_event: Some(Bytes::from(vec![b'x'; n])),
            next: Offset(n as u64),
            control_tail: Vec::new(),
            up_to_date: true,
            closed: false,
            expires_at_ms: None,
        }
    }

    fn key(incarnation: u64, from: u64) -> Key {
        Key {
            incarnation,
            from,
            tail: from + 1,
            closed: false,
        }
    }

    /// The second reader with the same key gets the first one's bytes
    /// without reading; a different key reads again.
    #[tokio::test]
    async fn same_key_reads_once() {
        let share = StreamShare::new("s".into(), Arc::default());
        let a = share
            .get_or_read(key(1, 0), || async { Ok::<_, ()>(delivery(10)) })
            .await
            .unwrap();
        let b = share
            .get_or_read(key(1, 0), || async { Err(()) })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(share
            .get_or_read(key(2, 0), || async { Err(()) })
            .await
            .is_err());
    }

    /// The budget counts what is cached, caps entries per stream, refuses
    /// oversized events and is returned in full when the stream's share goes.
    #[tokio::test]
    async fn budget_is_bounded_and_released() {
        let budget = Arc::new(Budget::default());
        let share = StreamShare::new("s".into(), budget.clone());
        for from in 0..10 {
            share
                .get_or_read(key(1, from), || async { Ok::<_, ()>(delivery(100)) })
                .await
                .unwrap();
        }
        assert_eq!(budget.used_bytes(), SLOTS_PER_STREAM * 100);
        share
            .get_or_read(key(1, 99), || async {
                Ok::<_, ()>(delivery(MAX_EVENT_BYTES + 1))
            })
            .await
            .unwrap();
        assert_eq!(budget.used_bytes(), (SLOTS_PER_STREAM - 1) * 100);
        // A re-created stream (new incarnation) evicts the old entries.
        share
            .get_or_read(key(2, 0), || async { Ok::<_, ()>(delivery(7)) })
            .await
            .unwrap();
        assert_eq!(budget.used_bytes(), 7);
        drop(share);
        assert_eq!(budget.used_bytes(), 0);
    }
}
