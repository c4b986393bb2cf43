//! `IdempotentProducer`: exactly-once appends with batching, pipelining and
//! retries (PROTOCOL.md 5.2.1).
//!
//! A background task owns the producer state. Appended messages are grouped
//! into batches (up to `max_batch_bytes`, or whatever arrived within
//! `linger`); each batch is one `POST` carrying `(Producer-Id, epoch, seq)`.
//! Up to `max_in_flight` batches are sent concurrently. Because the server
//! deduplicates on that tuple, every transient failure (network error,
//! `5xx`, `429`) is retried. Concurrent requests can reach the server out of
//! order; a `409` sequence gap while lower sequence numbers are still
//! unacknowledged is therefore expected, and the batch is re-sent once they
//! are acknowledged. The first batch of every epoch is sent alone, since a
//! new epoch must start at sequence 0.

use crate::client::{error_from_response, header_string, header_u64, Ctx, Req};
use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::stream::{CloseOutcome, DurableStream};
use bytes::Bytes;
use durable_streams_protocol::{headers as h, parse};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use reqwest::Method;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Called with every error that stops the producer.
pub type ErrorCallback = Arc<dyn Fn(&Error) + Send + Sync>;

/// Options of an [`IdempotentProducer`].
#[derive(Clone)]
pub struct ProducerOptions {
    /// The epoch to start with (bump it when restarting a producer whose state is persisted).
    pub epoch: u64,
    /// On `403` (a newer epoch exists), take over with `server epoch + 1`.
    pub auto_claim: bool,
    /// Largest batch body (a single larger message is sent alone).
    pub max_batch_bytes: usize,
    /// Most messages in one batch.
    pub max_batch_items: usize,
    /// How long a partial batch waits for more messages.
    pub linger: Duration,
    /// Batches sent concurrently.
    pub max_in_flight: usize,
    /// Retry policy for batches (default: the client's).
    pub retry: Option<RetryPolicy>,
    /// Told about the error that stops the producer.
    pub on_error: Option<ErrorCallback>,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            epoch: 0,
            auto_claim: false,
            max_batch_bytes: 1024 * 1024,
            max_batch_items: usize::MAX,
            linger: Duration::from_millis(5),
            max_in_flight: 5,
            retry: None,
            on_error: None,
        }
    }
}

impl fmt::Debug for ProducerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProducerOptions")
            .field("epoch", &self.epoch)
            .field("auto_claim", &self.auto_claim)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_batch_items", &self.max_batch_items)
            .field("linger", &self.linger)
            .field("max_in_flight", &self.max_in_flight)
            .field("retry", &self.retry)
            .finish()
    }
}

impl ProducerOptions {
    pub fn validate(&self) -> Result<()> {
        if self.max_batch_bytes == 0 {
            return Err(Error::InvalidArgument("max_batch_bytes must be > 0".into()));
        }
        if self.max_batch_items == 0 {
            return Err(Error::InvalidArgument("max_batch_items must be > 0".into()));
        }
        if self.max_in_flight == 0 {
            return Err(Error::InvalidArgument("max_in_flight must be > 0".into()));
        }
        if self.epoch > parse::MAX_SAFE_INTEGER {
            return Err(Error::InvalidArgument("epoch must be <= 2^53-1".into()));
        }
        if let Some(r) = &self.retry {
            r.validate()?;
        }
        Ok(())
    }
}

/// The acknowledgement of one appended message (of the batch that carried it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendAck {
    /// The stream's tail after the batch (absent on some duplicate answers).
    pub offset: Option<String>,
    /// The server had already stored this batch (a retry was deduplicated).
    pub duplicate: bool,
    pub epoch: u64,
    pub seq: u64,
}

/// Counters, for monitoring and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerStats {
    pub epoch: u64,
    /// The next sequence number to be assigned.
    pub next_seq: u64,
    pub batches_acked: u64,
    pub duplicates: u64,
    pub messages_acked: u64,
    /// The stream's tail after the latest acknowledged batch.
    pub last_offset: Option<String>,
}

type AckTx = oneshot::Sender<Result<AppendAck>>;

enum Cmd {
    Append(Bytes, Option<AckTx>),
    Flush(oneshot::Sender<Result<()>>),
    Close(Option<Bytes>, oneshot::Sender<Result<CloseOutcome>>),
    Restart(oneshot::Sender<Result<()>>),
    Detach(oneshot::Sender<Result<()>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Open,
    Closed,
    Failed,
}

struct Shared {
    status: Mutex<(Status, Option<String>)>,
    stats: Mutex<ProducerStats>,
}

/// Exactly-once writer. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct IdempotentProducer {
    tx: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    json: Arc<tokio::sync::OnceCell<bool>>,
    stream: DurableStream,
    id: String,
}

impl fmt::Debug for IdempotentProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentProducer")
            .field("id", &self.id)
            .field("url", &self.stream.url().as_str())
            .finish()
    }
}

impl IdempotentProducer {
    /// Starts a producer (needs a Tokio runtime). No I/O until the first append.
    pub fn new(stream: DurableStream, producer_id: &str, options: ProducerOptions) -> Result<Self> {
        if producer_id.trim().is_empty() {
            return Err(Error::InvalidArgument(
                "producer id must not be empty".into(),
            ));
        }
        options.validate()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            status: Mutex::new((Status::Open, None)),
            stats: Mutex::new(ProducerStats {
                epoch: options.epoch,
                ..ProducerStats::default()
            }),
        });
        let json = Arc::new(tokio::sync::OnceCell::new());
        let actor = Actor {
            retry: options
                .retry
                .clone()
                .unwrap_or_else(|| stream.client().retry_policy().clone()),
            stream: stream.clone(),
            id: producer_id.to_string(),
            epoch: options.epoch,
            opts: options,
            next_seq: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_acks: Vec::new(),
            linger_deadline: None,
            batches: BTreeMap::new(),
            queue: VecDeque::new(),
            gap_wait: Vec::new(),
            epoch_started: false,
            claim: None,
            in_flight: FuturesUnordered::new(),
            flush_waiters: Vec::new(),
            failed: None,
            shared: shared.clone(),
            json: json.clone(),
            content_type: None,
        };
        tokio::spawn(actor.run(rx));
        Ok(IdempotentProducer {
            tx,
            shared,
            json,
            stream,
            id: producer_id.to_string(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.stats().epoch
    }

    pub fn stats(&self) -> ProducerStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn check_open(&self) -> Result<()> {
        let g = self
            .shared
            .status
            .lock()
            .map_err(|_| Error::ProducerClosed)?;
        match g.0 {
            Status::Open => Ok(()),
            Status::Closed => Err(Error::ProducerClosed),
            Status::Failed => Err(Error::ProducerFailed(g.1.clone().unwrap_or_default())),
        }
    }

    /// Queues one message (fire and forget): bytes, or for a JSON stream one
    /// JSON value. Errors surface from [`flush`](Self::flush), and via `on_error`.
    pub fn append(&self, data: impl Into<Bytes>) -> Result<()> {
        self.check_open()?;
        let data = data.into();
        if data.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot append an empty message".into(),
            ));
        }
        self.tx
            .send(Cmd::Append(data, None))
            .map_err(|_| Error::ProducerClosed)
    }

    /// Queues one serializable value as one JSON message.
    pub fn append_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<()> {
        let v = serde_json::to_vec(value).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.append(v)
    }

    /// Queues one message and waits for the acknowledgement of its batch.
    pub async fn send(&self, data: impl Into<Bytes>) -> Result<AppendAck> {
        self.check_open()?;
        let data = data.into();
        if data.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot append an empty message".into(),
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Append(data, Some(tx)))
            .map_err(|_| Error::ProducerClosed)?;
        rx.await.map_err(|_| Error::ProducerClosed)?
    }

    /// Sends everything queued and waits until all of it is acknowledged.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(tx))
            .map_err(|_| Error::ProducerClosed)?;
        rx.await.map_err(|_| Error::ProducerClosed)?
    }

    /// Flushes, then closes the stream (with an optional final message,
    /// atomically). The producer accepts nothing afterwards. Calling it again
    /// returns the same outcome without another request.
    pub async fn close(&self, final_message: Option<Bytes>) -> Result<CloseOutcome> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Close(final_message, tx))
            .map_err(|_| Error::ProducerClosed)?;
        rx.await.map_err(|_| Error::ProducerClosed)?
    }

    /// Flushes and stops the producer without closing the stream.
    pub async fn detach(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Detach(tx))
            .map_err(|_| Error::ProducerClosed)?;
        rx.await.map_err(|_| Error::ProducerClosed)?
    }

    /// Starts a new session: waits for requests in flight, bumps the epoch,
    /// restarts sequence numbers at 0 and clears a previous failure. Messages
    /// that were not acknowledged when the producer failed are dropped.
    pub async fn restart(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Restart(tx))
            .map_err(|_| Error::ProducerClosed)?;
        rx.await.map_err(|_| Error::ProducerClosed)?
    }

    /// The stream this producer writes to.
    pub fn stream(&self) -> &DurableStream {
        &self.stream
    }

    #[doc(hidden)]
    pub fn is_json_known(&self) -> Option<bool> {
        self.json.get().copied()
    }
}

struct Batch {
    body: Bytes,
    messages: usize,
    acks: Vec<AckTx>,
    /// Times this batch was re-sent after a sequence gap with nothing left below it.
    gap_resends: u32,
}

/// Re-sends of one batch after a gap whose predecessors were all acknowledged.
const MAX_GAP_RESENDS: u32 = 3;

type Outcome = (u64, u64, Result<AppendAck>);

struct Actor {
    stream: DurableStream,
    id: String,
    opts: ProducerOptions,
    retry: RetryPolicy,
    epoch: u64,
    next_seq: u64,
    pending: Vec<Bytes>,
    pending_bytes: usize,
    pending_acks: Vec<AckTx>,
    linger_deadline: Option<Instant>,
    /// Every unacknowledged batch of the current epoch, by sequence number.
    batches: BTreeMap<u64, Batch>,
    /// Sealed batches waiting to be sent.
    queue: VecDeque<u64>,
    /// Batches that hit a sequence gap; re-sent once everything below them is acknowledged.
    gap_wait: Vec<u64>,
    /// The first batch of the current epoch was acknowledged.
    epoch_started: bool,
    /// An auto-claim is pending: the server's epoch.
    claim: Option<u64>,
    in_flight: FuturesUnordered<BoxFuture<'static, Outcome>>,
    flush_waiters: Vec<oneshot::Sender<Result<()>>>,
    failed: Option<String>,
    shared: Arc<Shared>,
    json: Arc<tokio::sync::OnceCell<bool>>,
    content_type: Option<String>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            self.dispatch();
            let linger = self.linger_deadline;
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Append(data, ack)) => self.on_append(data, ack).await,
                    Some(Cmd::Flush(tx)) => {
                        self.seal();
                        self.flush_waiters.push(tx);
                        self.check_flushed();
                    }
                    Some(Cmd::Close(final_message, tx)) => {
                        match self.close(final_message).await {
                            Ok(outcome) => {
                                let _ = tx.send(Ok(outcome.clone()));
                                // Later closes answer with the same outcome.
                                while let Some(cmd) = rx.recv().await {
                                    match cmd {
                                        Cmd::Close(_, tx) => { let _ = tx.send(Ok(outcome.clone())); }
                                        Cmd::Flush(tx) | Cmd::Detach(tx) | Cmd::Restart(tx) => { let _ = tx.send(Ok(())); }
                                        Cmd::Append(_, Some(tx)) => { let _ = tx.send(Err(Error::ProducerClosed)); }
                                        Cmd::Append(_, None) => {}
                                    }
                                }
                                return;
                            }
                            // The typed error (e.g. StreamClosed) goes to the caller as is.
                            Err(e) => { let _ = tx.send(Err(e)); }
                        }
                    }
                    Some(Cmd::Detach(tx)) => {
                        let r = self.drain().await;
                        self.set_status(Status::Closed, None);
                        let _ = tx.send(r);
                        return;
                    }
                    Some(Cmd::Restart(tx)) => {
                        self.seal();
                        while let Some(o) = self.in_flight.next().await {
                            self.on_outcome(o);
                        }
                        self.restart();
                        let _ = tx.send(Ok(()));
                    }
                    None => {
                        // The handle was dropped: deliver what is queued, then stop.
                        let _ = self.drain().await;
                        return;
                    }
                },
                Some(outcome) = self.in_flight.next(), if !self.in_flight.is_empty() => self.on_outcome(outcome),
                _ = sleep_until(linger), if linger.is_some() => self.seal(),
            }
        }
    }

    async fn content_type(&mut self) -> Result<String> {
        if let Some(ct) = &self.content_type {
            return Ok(ct.clone());
        }
        let ct = self.stream.resolve_content_type().await?;
        let _ = self.json.set(parse::is_json(&ct));
        self.content_type = Some(ct.clone());
        Ok(ct)
    }

    fn is_json(&self) -> bool {
        self.content_type.as_deref().is_some_and(parse::is_json)
    }

    async fn on_append(&mut self, data: Bytes, ack: Option<AckTx>) {
        if let Some(msg) = &self.failed {
            if let Some(tx) = ack {
                let _ = tx.send(Err(Error::ProducerFailed(msg.clone())));
            }
            return;
        }
        if let Err(e) = self.content_type().await {
            self.fail(e);
            if let Some(tx) = ack {
                let _ = tx.send(Err(Error::ProducerFailed(
                    self.failed.clone().unwrap_or_default(),
                )));
            }
            return;
        }
        if self.pending_bytes > 0 && self.pending_bytes + data.len() + 1 > self.opts.max_batch_bytes
        {
            self.seal();
        }
        self.pending_bytes += data.len() + 1;
        self.pending.push(data);
        if let Some(tx) = ack {
            self.pending_acks.push(tx);
        }
        if self.pending_bytes >= self.opts.max_batch_bytes
            || self.pending.len() >= self.opts.max_batch_items
        {
            self.seal();
        } else if self.linger_deadline.is_none() {
            self.linger_deadline = Some(Instant::now() + self.opts.linger);
        }
    }

    /// Turns the pending messages into a batch with the next sequence number.
    fn seal(&mut self) {
        self.linger_deadline = None;
        if self.pending.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let body = if self.is_json() {
            let mut v = Vec::new();
            v.push(b'[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    v.push(b',');
                }
                v.extend_from_slice(it);
            }
            v.push(b']');
            Bytes::from(v)
        } else if items.len() == 1 {
            items[0].clone()
        } else {
            Bytes::from(items.concat())
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.batches.insert(
            seq,
            Batch {
                body,
                messages: items.len(),
                acks: std::mem::take(&mut self.pending_acks),
                gap_resends: 0,
            },
        );
        self.queue.push_back(seq);
        self.update_stats(|s| s.next_seq = seq + 1);
    }

    /// Sends queued batches as far as the pipelining rules allow.
    fn dispatch(&mut self) {
        if self.failed.is_some() || self.claim.is_some() {
            return;
        }
        while let Some(&seq) = self.queue.front() {
            if self.in_flight.len() >= self.opts.max_in_flight {
                break;
            }
            // A new epoch must be established by its first batch alone.
            if !self.epoch_started && !self.in_flight.is_empty() {
                break;
            }
            self.queue.pop_front();
            self.send(seq);
        }
    }

    fn send(&mut self, seq: u64) {
        let Some(batch) = self.batches.get(&seq) else {
            return;
        };
        let stream = self.stream.clone();
        let ct = self.content_type.clone().unwrap_or_default();
        let id = self.id.clone();
        let epoch = self.epoch;
        let body = batch.body.clone();
        let retry = self.retry.clone();
        self.in_flight.push(Box::pin(async move {
            let r = send_batch(&stream, &ct, &id, epoch, seq, body, None, &retry).await;
            (epoch, seq, r)
        }));
    }

    fn on_outcome(&mut self, (epoch, seq, result): Outcome) {
        if epoch != self.epoch {
            return; // from before a restart
        }
        match result {
            Ok(ack) => {
                if seq == 0 || !self.epoch_started {
                    self.epoch_started = true;
                }
                if let Some(b) = self.batches.remove(&seq) {
                    self.update_stats(|s| {
                        s.batches_acked += 1;
                        s.messages_acked += b.messages as u64;
                        if ack.duplicate {
                            s.duplicates += 1;
                        }
                        if ack.offset.is_some() {
                            s.last_offset = ack.offset.clone();
                        }
                    });
                    for tx in b.acks {
                        let _ = tx.send(Ok(ack.clone()));
                    }
                }
                self.release_gap_waiters();
                self.check_flushed();
            }
            Err(Error::SequenceGap { expected, received }) => {
                // Lower batches still unacknowledged: they were overtaken; retry after them.
                if self.batches.range(..seq).next().is_some() {
                    self.gap_wait.push(seq);
                } else if let Some(b) = self
                    .batches
                    .get_mut(&seq)
                    .filter(|b| expected < seq && b.gap_resends < MAX_GAP_RESENDS)
                {
                    // Everything below was acknowledged after the server had
                    // answered this one (the responses crossed): send it again.
                    b.gap_resends += 1;
                    self.queue.push_front(seq);
                } else {
                    self.fail(Error::SequenceGap { expected, received });
                }
            }
            Err(Error::StaleEpoch { current }) if self.opts.auto_claim => {
                let c = self.claim.map_or(current, |c| c.max(current));
                self.claim = Some(c);
                self.maybe_claim();
            }
            Err(e) => self.fail(e),
        }
        if self.claim.is_some() {
            self.maybe_claim();
        }
    }

    fn release_gap_waiters(&mut self) {
        let lowest = self.batches.keys().next().copied();
        let mut still = Vec::new();
        for seq in std::mem::take(&mut self.gap_wait) {
            if lowest == Some(seq) {
                // Everything below is acknowledged: resend now, ahead of the queue.
                self.queue.push_front(seq);
            } else {
                still.push(seq);
            }
        }
        self.gap_wait = still;
    }

    /// Once nothing is in flight, takes over the producer id with a new epoch
    /// and re-sends every unacknowledged batch, renumbered from 0.
    fn maybe_claim(&mut self) {
        let Some(server_epoch) = self.claim else {
            return;
        };
        if !self.in_flight.is_empty() {
            return;
        }
        self.claim = None;
        self.epoch = server_epoch.max(self.epoch) + 1;
        let old = std::mem::take(&mut self.batches);
        self.queue.clear();
        self.gap_wait.clear();
        for (i, (_, b)) in old.into_iter().enumerate() {
            self.batches.insert(i as u64, b);
            self.queue.push_back(i as u64);
        }
        self.next_seq = self.batches.len() as u64;
        self.epoch_started = false;
        let (epoch, next_seq) = (self.epoch, self.next_seq);
        self.update_stats(|s| {
            s.epoch = epoch;
            s.next_seq = next_seq;
        });
    }

    fn fail(&mut self, e: Error) {
        if let Some(cb) = &self.opts.on_error {
            cb(&e);
        }
        let msg = e.to_string();
        self.failed = Some(msg.clone());
        self.set_status(Status::Failed, Some(msg.clone()));
        for (_, b) in std::mem::take(&mut self.batches) {
            for tx in b.acks {
                let _ = tx.send(Err(Error::ProducerFailed(msg.clone())));
            }
        }
        for tx in std::mem::take(&mut self.pending_acks) {
            let _ = tx.send(Err(Error::ProducerFailed(msg.clone())));
        }
        self.pending.clear();
        self.pending_bytes = 0;
        self.queue.clear();
        self.gap_wait.clear();
        self.check_flushed();
    }

    fn restart(&mut self) {
        self.epoch += 1;
        self.next_seq = 0;
        self.epoch_started = false;
        self.failed = None;
        self.claim = None;
        // Unacknowledged batches of the old epoch are dropped (their fate is unknown).
        for (_, b) in std::mem::take(&mut self.batches) {
            for tx in b.acks {
                let _ = tx.send(Err(Error::ProducerFailed("dropped by restart".into())));
            }
        }
        self.queue.clear();
        self.gap_wait.clear();
        let epoch = self.epoch;
        self.update_stats(|s| {
            s.epoch = epoch;
            s.next_seq = 0;
        });
        self.set_status(Status::Open, None);
    }

    fn check_flushed(&mut self) {
        let idle = self.batches.is_empty() && self.pending.is_empty();
        if !(idle || self.failed.is_some()) {
            return;
        }
        for tx in std::mem::take(&mut self.flush_waiters) {
            let _ = tx.send(match &self.failed {
                Some(m) => Err(Error::ProducerFailed(m.clone())),
                None => Ok(()),
            });
        }
    }

    /// Sends everything and waits for all outcomes.
    async fn drain(&mut self) -> Result<()> {
        self.seal();
        loop {
            self.dispatch();
            match self.in_flight.next().await {
                Some(o) => self.on_outcome(o),
                None => break,
            }
        }
        match &self.failed {
            Some(m) => Err(Error::ProducerFailed(m.clone())),
            None if !self.batches.is_empty() => {
                Err(Error::ProducerFailed("batches left unacknowledged".into()))
            }
            None => Ok(()),
        }
    }

    async fn close(&mut self, final_message: Option<Bytes>) -> Result<CloseOutcome> {
        self.drain().await?;
        let ct = match self.content_type().await {
            Ok(ct) => ct,
            Err(e) => return Err(e),
        };
        let body = final_message.map(|m| if parse::is_json(&ct) { wrap(&m) } else { m });
        let seq = self.next_seq;
        self.next_seq += 1;
        let r = send_batch(
            &self.stream,
            &ct,
            &self.id,
            self.epoch,
            seq,
            body.unwrap_or_default(),
            Some(()),
            &self.retry,
        )
        .await;
        match r {
            Ok(ack) => {
                self.set_status(Status::Closed, None);
                let offset = match ack.offset {
                    Some(o) => o,
                    None => self.stream.head().await?.next_offset,
                };
                Ok(CloseOutcome {
                    final_offset: offset,
                })
            }
            Err(e) => Err(e),
        }
    }

    fn set_status(&self, st: Status, msg: Option<String>) {
        if let Ok(mut g) = self.shared.status.lock() {
            *g = (st, msg);
        }
    }

    fn update_stats(&self, f: impl FnOnce(&mut ProducerStats)) {
        if let Ok(mut g) = self.shared.stats.lock() {
            f(&mut g);
        }
    }
}

fn wrap(m: &Bytes) -> Bytes {
    let mut v = Vec::with_capacity(m.len() + 2);
    v.push(b'[');
    v.extend_from_slice(m);
    v.push(b']');
    v.into()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One producer request, retried on transient failures.
#[allow(clippy::too_many_arguments)]
async fn send_batch(
    stream: &DurableStream,
    content_type: &str,
    id: &str,
    epoch: u64,
    seq: u64,
    body: Bytes,
    close: Option<()>,
    retry: &RetryPolicy,
) -> Result<AppendAck> {
    let mut req = Req::new(Method::POST, stream.url().clone())
        .header(h::PRODUCER_ID, id)?
        .header(h::PRODUCER_EPOCH, epoch.to_string())?
        .header(h::PRODUCER_SEQ, seq.to_string())?;
    if !body.is_empty() {
        req = req.header("content-type", content_type)?.body(body);
    }
    if close.is_some() {
        req = req.header(h::STREAM_CLOSED, "true")?;
    }
    let resp = stream.client().execute(&req, Some(retry)).await?;
    let status = resp.status().as_u16();
    if !resp.status().is_success() {
        return Err(error_from_response(resp, Ctx::Plain).await);
    }
    let hs = resp.headers();
    Ok(AppendAck {
        offset: header_string(hs, h::STREAM_NEXT_OFFSET),
        duplicate: status == 204,
        epoch: header_u64(hs, h::PRODUCER_EPOCH).unwrap_or(epoch),
        seq,
    })
}
