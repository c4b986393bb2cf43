//! One reactor per stream for idle SSE connections on the compact HTTP/1.1
//! path: the connections are parked here as plain records (socket, offset,
//! deadline, cursor head) and one task per stream waits for the stream's
//! changes, its connections' socket events, their deadlines and shutdown.
//!
//! A task per connection costs its own future (the SSE loop with its timer,
//! shutdown waiter and change-feed waiter) plus tokio's task cell: about
//! 1.7 KB per idle connection, measured. Parked, a connection costs its
//! record here (~250 B), the socket's readiness record in tokio's driver,
//! and a small waker. A change of the stream is read once and written to
//! every parked connection from this one task, without waking a task per
//! connection.
//!
//! Each connection gets exactly what the per-connection loop in
//! [`crate::live::sse`] sends: a data event and its control event per
//! delivery (the control event alone when the read found no data and
//! `upToDate` was not yet announced), `streamClosed` last, the response
//! ended at the reconnect deadline, on shutdown, or when the stream goes.
//! The bytes go out as HTTP/1.1 chunks. A connection whose socket buffer
//! is full keeps its unsent bytes and gets nothing new until they drain;
//! it then catches up from its own offset.

use crate::live::{checked_delivery, wake_at_ms, ControlHead, ParkedSse};
use crate::metrics::ReadKind;
use crate::state::AppState;
use bytes::{Buf, Bytes};
use durable_streams_protocol::Offset;
use durable_streams_storage::{ReadFrom, Signal};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

/// Marks a request whose SSE response may be parked here: the compact
/// path serves its connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parkable;

/// Bytes a client may send after its SSE request before it is cut off
/// (read and dropped so the socket buffer does not fill).
const MAX_DISCARD_BYTES: usize = 64 * 1024;

/// The end of a chunked response.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// What a connection holds for the server until it ends: the
/// graceful-shutdown watcher and its connection slot.
pub(crate) type ConnHeld = (
    hyper_util::server::graceful::Watcher,
    tokio::sync::OwnedSemaphorePermit,
);

/// A connection handed over by the compact path.
pub(crate) struct Handover {
    pub(crate) stream: TcpStream,
    pub(crate) parked: ParkedSse,
    /// The graceful-shutdown watcher and the connection slot, released
    /// when the connection ends.
    pub(crate) held: ConnHeld,
}

/// Hands a connection whose first delivery was written to its stream's
/// reactor, starting one if the stream has none.
pub(crate) fn park(h: Handover) {
    let share = h.parked.held.0.share().clone();
    let key = (h.parked.incarnation, h.parked.base64);
    let mut slot = share.reactor.lock();
    let h = match &*slot {
        Some(r) if r.key == key => match r.tx.send(h) {
            Ok(()) => return,
            // The reactor ended; start another.
            Err(mpsc::error::SendError(h)) => h,
        },
        _ => h,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let state = h.parked.state.clone();
    let path = h.parked.path.clone();
    let watch = h.parked.rx.clone();
    let _ = tx.send(h);
    *slot = Some(ReactorHandle {
        key,
        tx: tx.clone(),
    });
    drop(slot);
    let reactor = Reactor {
        state,
        path,
        incarnation: key.0,
        base64: key.1,
        watch,
        conns: HashMap::new(),
        deadlines: VecDeque::new(),
        ready: Arc::new(ReadyQueue::default()),
        next_id: 0,
        expires_at_ms: None,
        share,
        tx,
    };
    tokio::spawn(reactor.run(rx));
}

/// A stream's reactor, as its [`crate::sse_cache::StreamShare`] keeps it.
#[derive(Debug)]
pub(crate) struct ReactorHandle {
    /// Incarnation and data encoding of the connections it serves.
    key: (u64, bool),
    tx: mpsc::UnboundedSender<Handover>,
}

/// Ids of connections whose sockets became ready, and the reactor's wakeup.
#[derive(Default)]
struct ReadyQueue {
    ids: parking_lot::Mutex<Vec<u64>>,
    notify: Notify,
}

/// Wakes the reactor for one connection (registered with the socket's
/// readiness in tokio's driver).
struct ConnWake {
    id: u64,
    queue: Arc<ReadyQueue>,
}

impl Wake for ConnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.queue.ids.lock().push(self.id);
        self.queue.notify.notify_one();
    }
}

struct Conn {
    stream: TcpStream,
    waker: Waker,
    offset: Offset,
    announced_up_to_date: bool,
    head: ControlHead,
    /// Bytes written in part; nothing new is sent until they drain.
    pending: VecDeque<Bytes>,
    /// The response is complete once `pending` drains.
    ending: bool,
    discarded_bytes: u32,
    _held: (
        (crate::state::LiveGuard, crate::metrics::GaugeGuard),
        ConnHeld,
    ),
}

struct Reactor {
    state: Arc<AppState>,
    path: String,
    incarnation: u64,
    base64: bool,
    watch: watch::Receiver<Signal>,
    /// Boxed: a table of inline records would keep twice their size
    /// (the table's spare capacity) per connection.
    conns: HashMap<u64, Box<Conn>>,
    /// `(deadline, id)` in arrival order, which is deadline order (every
    /// connection gets the same reconnect interval); ids of connections
    /// already gone are skipped.
    deadlines: VecDeque<(Instant, u64)>,
    ready: Arc<ReadyQueue>,
    next_id: u64,
    /// When the stream expires, from the latest read.
    expires_at_ms: Option<u64>,
    share: Arc<crate::sse_cache::StreamShare>,
    /// This reactor's own sender, to recognise its handle when retiring.
    tx: mpsc::UnboundedSender<Handover>,
}

enum Event {
    Arrived(Box<Handover>),
    Changed(bool),
    Ready,
    Timer,
    Shutdown,
}

impl Reactor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Handover>) {
        let shutdown = self.state.shutdown.clone();
        loop {
            let ev = {
                let timer = self.next_timer();
                let ready = self.ready.notify.notified();
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => Event::Shutdown,
                    h = rx.recv() => match h {
                        Some(h) => Event::Arrived(Box::new(h)),
                        None => Event::Shutdown,
                    },
                    r = self.watch.changed() => Event::Changed(r.is_ok()),
                    _ = ready => Event::Ready,
                    _ = sleep_until_opt(timer) => Event::Timer,
                }
            };
            match ev {
                Event::Shutdown => {
                    self.end_all();
                    return;
                }
                Event::Arrived(h) => {
                    self.add(*h);
                    // Others may be queued: take them before delivering.
                    while let Ok(h) = rx.try_recv() {
                        self.add(h);
                    }
                }
                Event::Changed(true) => {}
                Event::Changed(false) => {
                    // The engine dropped the stream's feed: it is gone.
                    self.end_all();
                }
                Event::Ready => self.service_ready(),
                Event::Timer => self.on_timer().await,
            }
            self.pump().await;
            if self.conns.is_empty() && self.retire(&mut rx) {
                return;
            }
        }
    }

    /// Ends this reactor if no connection is on its way in: the stream's
    /// handle is cleared under the lock senders hold, so none is lost.
    fn retire(&mut self, rx: &mut mpsc::UnboundedReceiver<Handover>) -> bool {
        let mut slot = self.share.reactor.lock();
        match rx.try_recv() {
            Ok(h) => {
                drop(slot);
                self.add(h);
                false
            }
            Err(_) => {
                if slot.as_ref().is_some_and(|r| r.tx.same_channel(&self.tx)) {
                    *slot = None;
                }
                true
            }
        }
    }

    fn next_timer(&mut self) -> Option<Instant> {
        while let Some(&(at, id)) = self.deadlines.front() {
            if self.conns.contains_key(&id) {
                let expiry = wake_at_ms(at, self.expires_at_ms);
                return Some(expiry);
            }
            self.deadlines.pop_front();
        }
        None
    }

    fn add(&mut self, h: Handover) {
        let Handover {
            stream,
            parked,
            held,
        } = h;
        if parked.incarnation != self.incarnation {
            return; // another incarnation of the path: not this reactor's
        }
        let id = self.next_id;
        self.next_id += 1;
        let waker = Waker::from(Arc::new(ConnWake {
            id,
            queue: self.ready.clone(),
        }));
        if parked.expires_at_ms.is_some() {
            self.expires_at_ms = parked.expires_at_ms;
        }
        let conn = Conn {
            stream,
            waker,
            offset: parked.offset,
            announced_up_to_date: parked.announced_up_to_date,
            head: parked.head,
            pending: VecDeque::new(),
            ending: false,
            discarded_bytes: 0,
            _held: (parked.held, held),
        };
        self.deadlines.push_back((parked.deadline, id));
        self.conns.insert(id, Box::new(conn));
        // Registers the connection's socket events.
        self.service(id);
    }

    fn service_ready(&mut self) {
        let ids = std::mem::take(&mut *self.ready.ids.lock());
        for id in ids {
            self.service(id);
        }
    }

    /// Reads and drops what the peer sent (ending the connection on EOF),
    /// writes pending bytes, and leaves both events registered.
    fn service(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if !poll_io(c) {
            self.conns.remove(&id);
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        while let Some(&(at, id)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(c) = self.conns.get_mut(&id) {
                end(c);
                if c.pending.is_empty() {
                    self.conns.remove(&id);
                }
            }
        }
        // Woken by the stream's expiry time: if it is gone, every response
        // ends (a read would find it missing).
        if self
            .expires_at_ms
            .is_some_and(|ms| ms <= now_ms().saturating_add(1))
        {
            match self.state.engine.head(&self.path).await {
                Ok(meta) if meta.incarnation == self.incarnation => {
                    self.expires_at_ms = meta.expires_at_ms;
                }
                _ => self.end_all(),
            }
        }
    }

    fn end_all(&mut self) {
        for (_, mut c) in self.conns.drain() {
            end(&mut c);
        }
    }

    /// Delivers what the stream has past each connection's offset: one read
    /// per distinct offset, written to every connection waiting there.
    async fn pump(&mut self) {
        loop {
            let signal = *self.watch.borrow_and_update();
            if signal.gone {
                self.end_all();
                return;
            }
            let mut groups: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for (id, c) in &self.conns {
                if !c.pending.is_empty() || c.ending {
                    continue;
                }
                if c.offset.0 < signal.tail.0 || signal.closed || !c.announced_up_to_date {
                    groups.entry(c.offset.0).or_default().push(*id);
                }
            }
            if groups.is_empty() {
                return;
            }
            let mut progress = false;
            for (offset, ids) in groups {
                let read = self
                    .state
                    .engine
                    .read(
                        &self.path,
                        ReadFrom::At(Offset(offset)),
                        self.state.config.read_chunk_bytes,
                    )
                    .await
                    .and_then(|chunk| checked_delivery(&chunk, self.incarnation, self.base64));
                let d = match read {
                    Ok(d) => d,
                    Err(_) => {
                        // Deleted, re-created or failing: these responses end.
                        for id in ids {
                            if let Some(mut c) = self.conns.remove(&id) {
                                end(&mut c);
                            }
                        }
                        continue;
                    }
                };
                if d.expires_at_ms.is_some() {
                    self.expires_at_ms = d.expires_at_ms;
                }
                // No new data, no closure and `upToDate` already announced:
                // these connections wait for the next change.
                progress |= d.next.0 > offset || d.closed || d.data_event.is_some();
                for id in ids {
                    let Some(c) = self.conns.get_mut(&id) else {
                        continue;
                    };
                    progress |= !c.announced_up_to_date;
                    let alive = deliver(c, &d, &self.state);
                    if !alive || (c.ending && c.pending.is_empty()) {
                        self.conns.remove(&id);
                    }
                }
            }
            if !progress {
                return;
            }
            // Connections that were not up to date read again at once.
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes one delivery to `c` as the per-connection loop would: returns
/// false when the connection failed.
fn deliver(c: &mut Conn, d: &crate::sse_cache::Delivery, state: &AppState) -> bool {
    let write_control = d.data_event.is_some() || d.closed || !c.announced_up_to_date;
    if !write_control {
        // An empty read at an announced offset (woken by a change another
        // connection's offset needed): nothing to send.
        c.offset = d.next;
        return true;
    }
    let data = d.data_event.as_ref();
    let data_len = data.map_or(0, |b| b.len());
    let mut tail = Vec::with_capacity(
        192 + if data_len <= COPY_DATA_BYTES {
            data_len
        } else {
            0
        },
    );
    // The control event first: the chunk's size line needs its length.
    c.head.control_into(&mut tail, d);
    let chunk_len = data_len + tail.len();
    state.metrics.sent(ReadKind::Sse, chunk_len as u64);
    tail.extend_from_slice(b"\r\n");
    if d.closed {
        tail.extend_from_slice(LAST_CHUNK);
        c.ending = true;
    }
    c.announced_up_to_date = if data.is_some() { d.up_to_date } else { true };
    c.offset = d.next;
    let mut line = [0u8; 18];
    let line_len = chunk_size_line(&mut line, chunk_len);
    let line = &line[..line_len];
    if !c.pending.is_empty() {
        // Still draining: queue behind. (`pump` skips such connections;
        // kept correct should that change.)
        c.pending.push_back(Bytes::copy_from_slice(line));
        if let Some(data) = data {
            c.pending.push_back(data.clone());
        }
        c.pending.push_back(Bytes::from(tail));
        return poll_io(c);
    }
    // Most deliveries: one buffer, one write, nothing kept.
    let (whole, parts): (Option<Vec<u8>>, [&[u8]; 3]) = match data {
        Some(data) if data.len() <= COPY_DATA_BYTES => {
            let mut buf = Vec::with_capacity(line.len() + data.len() + tail.len());
            buf.extend_from_slice(line);
            buf.extend_from_slice(data);
            buf.extend_from_slice(&tail);
            (Some(buf), [&[], &[], &[]])
        }
        Some(data) => (None, [line, data, &tail]),
        None => {
            let mut buf = Vec::with_capacity(line.len() + tail.len());
            buf.extend_from_slice(line);
            buf.extend_from_slice(&tail);
            (Some(buf), [&[], &[], &[]])
        }
    };
    let written = match &whole {
        Some(buf) => c.stream.try_write(buf),
        None => c.stream.try_write_vectored(&[
            IoSlice::new(parts[0]),
            IoSlice::new(parts[1]),
            IoSlice::new(parts[2]),
        ]),
    };
    let total = whole
        .as_ref()
        .map_or(line.len() + data_len + tail.len(), Vec::len);
    let n = match written {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(_) => return false,
    };
    if n == total {
        if c.ending {
            let _ = shutdown_write(&c.stream);
            return false;
        }
        return true;
    }
    // The socket buffer is full: keep the rest, wait for writability.
    match whole {
        Some(buf) => c.pending.push_back(Bytes::from(buf).slice(n..)),
        None => {
            let mut skip = n;
            for part in [
                Bytes::copy_from_slice(line),
                data.cloned().unwrap_or_default(),
                Bytes::from(tail),
            ] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                c.pending.push_back(part.slice(skip..));
                skip = 0;
            }
        }
    }
    poll_io(c)
}

/// Data events up to this size are copied into the connection's one
/// write; larger ones are written from the shared buffer.
const COPY_DATA_BYTES: usize = 16 * 1024;

/// Writes `{len:x}\r\n` into `out`; returns its length.
fn chunk_size_line(out: &mut [u8; 18], len: usize) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = ((usize::BITS - len.leading_zeros()).div_ceil(4)).max(1) as usize;
    for i in 0..digits {
        out[i] = HEX[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

/// Ends `c`'s response: the last chunk (best effort, after anything
/// pending), then the connection closes when `c` is dropped.
fn end(c: &mut Conn) {
    if c.ending {
        return;
    }
    c.ending = true;
    c.pending.push_back(Bytes::from_static(LAST_CHUNK));
    let _ = poll_io(c);
}

/// Drives `c`'s socket: drops what the peer sends (false on EOF or error),
/// writes pending bytes (false on error, or once an ending response is
/// written), and leaves the events it waits for registered with `c.waker`.
fn poll_io(c: &mut Conn) -> bool {
    let mut cx = Context::from_waker(&c.waker);
    loop {
        match c.stream.poll_read_ready(&mut cx) {
            Poll::Ready(Err(_)) => return false,
            Poll::Ready(Ok(())) => {
                let mut scratch = [0u8; 512];
                match c.stream.try_read(&mut scratch) {
                    Ok(0) => return false,
                    Ok(n) => {
                        c.discarded_bytes = c.discarded_bytes.saturating_add(n as u32);
                        if c.discarded_bytes as usize > MAX_DISCARD_BYTES {
                            return false;
                        }
                    }
                    // Readiness was stale; cleared by this read.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return false,
                }
            }
            Poll::Pending => break,
        }
    }
    while !c.pending.is_empty() {
        match c.stream.poll_write_ready(&mut cx) {
            Poll::Ready(Err(_)) => return false,
            Poll::Ready(Ok(())) => {
                let mut slices = [IoSlice::new(&[]); 4];
                let mut k = 0;
                for b in c.pending.iter().take(slices.len()) {
                    slices[k] = IoSlice::new(b);
                    k += 1;
                }
                match c.stream.try_write_vectored(&slices[..k]) {
                    Ok(mut n) => {
                        while n > 0 {
                            let Some(front) = c.pending.front_mut() else {
                                break;
                            };
                            let k = n.min(front.len());
                            front.advance(k);
                            n -= k;
                            if front.is_empty() {
                                c.pending.pop_front();
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return false,
                }
            }
            Poll::Pending => return true,
        }
    }
    if c.ending {
        // Written whole: close the write side so the client sees the end
        // even before the socket is dropped.
        let _ = shutdown_write(&c.stream);
        return false;
    }
    true
}

fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    rustix::net::shutdown(stream, rustix::net::Shutdown::Write).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines() {
        for (len, want) in [
            (0usize, "0\r\n"),
            (1, "1\r\n"),
            (255, "ff\r\n"),
            (4096, "1000\r\n"),
        ] {
            let mut out = [0u8; 18];
            let n = chunk_size_line(&mut out, len);
            assert_eq!(&out[..n], want.as_bytes());
        }
    }
}
