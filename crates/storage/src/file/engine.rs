use super::catalog::{Catalog, Effect};
use super::codec::{self, AppendRec, CreateRec, ForkRec, Record, WAL_HEADER_LEN, WAL_MAGIC};
use super::marks;
use super::vfs::{Vfs, VfsFile};
use crate::memory::expires_at_ms;
use crate::metrics::{
    Histogram, HistogramSnapshot, BATCH_BYTE_BUCKETS, BATCH_RECORD_BUCKETS, LATENCY_BUCKETS_NS,
};
use crate::rules::{self, Decision, WriterState};
use crate::{
    AppendOutcome, AppendRequest, Clock, CreateOutcome, CreateRequest, Engine, Expiry, FileRead,
    FileSlice, ForkSpec, ReadChunk, ReadFrom, Signal, StorageError, StreamMeta, SystemClock,
};
use async_trait::async_trait;
use bytes::Bytes;
use durable_streams_protocol::json::BoundaryScanner;
use durable_streams_protocol::{parse::same_media_type, Offset};
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Tuning of the file engine.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Data files kept open at once (least recently used are closed).
    pub max_open_files: usize,
    /// A checkpoint is taken this often while anything was written...
    pub checkpoint_interval: Duration,
    /// ...or as soon as the WAL grew by this much since the last one.
    pub checkpoint_wal_bytes: u64,
    /// Largest batch (bytes of records) written with one sync.
    pub max_batch_bytes: usize,
    /// How often read-only TTL refreshes are persisted.
    pub touch_flush_interval: Duration,
    /// Bytes queued for the committer before appends are refused (503).
    pub max_pending_bytes: u64,
    /// The WAL is zero-filled this far ahead of its records (0 disables).
    pub wal_prealloc_bytes: u64,
    /// Write-behind of the data files (docs/storage.md): a stream's durable
    /// bytes stay in memory (and are read from there) for up to this long
    /// before they are written to its data file; zero writes them after
    /// every sync.
    pub data_flush_interval: Duration,
    /// ...or until the stream has this many unflushed bytes...
    pub data_flush_stream_bytes: u64,
    /// ...or until all streams together have this many.
    pub max_unflushed_bytes: u64,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            max_open_files: 1024,
            checkpoint_interval: Duration::from_secs(30),
            checkpoint_wal_bytes: 64 * 1024 * 1024,
            max_batch_bytes: 8 * 1024 * 1024,
            touch_flush_interval: Duration::from_secs(1),
            max_pending_bytes: 1024 * 1024 * 1024,
            wal_prealloc_bytes: 4 * 1024 * 1024,
            data_flush_interval: Duration::from_millis(100),
            data_flush_stream_bytes: 64 * 1024,
            max_unflushed_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Counters for tests and metrics.
#[derive(Debug)]
pub struct FileStats {
    /// WAL `fdatasync` calls (one per batch).
    pub wal_syncs: AtomicU64,
    /// Records committed.
    pub records: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Duration of each WAL `fdatasync`, in nanoseconds.
    pub wal_sync_ns: Histogram,
    /// Records made durable by each WAL sync (group-commit batch size).
    pub batch_records: Histogram,
    /// WAL bytes made durable by each WAL sync.
    pub batch_bytes: Histogram,
    /// Bytes of the data files (apparent size): set at open from the
    /// recovered catalog, then moved by every write and removal, so disk
    /// usage is known without walking the directory.
    pub data_file_bytes: AtomicU64,
    /// Size of the current WAL segment, preallocated zeros included (older
    /// segments exist only inside a checkpoint, which removes them).
    pub wal_file_bytes: AtomicU64,
    /// Size of the checkpoint file.
    pub checkpoint_file_bytes: AtomicU64,
    /// Durable bytes held in memory, not yet written to their data files.
    pub unflushed_bytes: AtomicU64,
    /// Writes of held bytes to data files (one per stream per flush).
    pub data_flushes: AtomicU64,
    /// Bytes of JSON data scanned at start-up for message boundaries the
    /// persisted index lacked (docs/storage.md, "Boundary index").
    pub recovery_boundary_scan_bytes: AtomicU64,
}

impl Default for FileStats {
    fn default() -> Self {
        FileStats {
            wal_syncs: AtomicU64::new(0),
            records: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            wal_sync_ns: Histogram::new(LATENCY_BUCKETS_NS),
            batch_records: Histogram::new(BATCH_RECORD_BUCKETS),
            batch_bytes: Histogram::new(BATCH_BYTE_BUCKETS),
            data_file_bytes: AtomicU64::new(0),
            wal_file_bytes: AtomicU64::new(0),
            checkpoint_file_bytes: AtomicU64::new(0),
            unflushed_bytes: AtomicU64::new(0),
            data_flushes: AtomicU64::new(0),
            recovery_boundary_scan_bytes: AtomicU64::new(0),
        }
    }
}

impl FileStats {
    /// Bytes the engine's files take in the data directory (apparent size).
    pub fn disk_bytes(&self) -> u64 {
        self.data_file_bytes.load(Ordering::Relaxed)
            + self.wal_file_bytes.load(Ordering::Relaxed)
            + self.checkpoint_file_bytes.load(Ordering::Relaxed)
    }
}

type Ack = oneshot::Sender<Result<(), StorageError>>;

enum Publish {
    None,
    Created,
    Tail { tail: u64, closed: bool },
}

// Most jobs are writes: boxing them to shrink the rare variants would add an
// allocation to every append.
#[allow(clippy::large_enum_variant)]
enum Job {
    Write {
        record: Record,
        stream: Option<Arc<FStream>>,
        publish: Publish,
        ack: Option<Ack>,
        bytes: u64,
    },
    /// Acknowledged once every job queued before it is durable.
    Barrier(Ack),
    Checkpoint(Ack),
    Stop,
}

#[derive(Debug)]
struct FStream {
    id: u64,
    path: String,
    content_type: String,
    json: bool,
    base: u64,
    source: Option<Arc<FStream>>,
    requested_expiry: Expiry,
    fork: Option<ForkSpec>,
    state: Mutex<PState>,
    /// The stream's durable bytes not yet in its data file (write-behind).
    mem: Mutex<MemTail>,
    /// The durable state, for live readers.
    signal: watch::Sender<Signal>,
    /// The pending state (appends accepted, durable or not), for producers
    /// waiting out a sequence gap: what they wait for is their
    /// predecessor's acceptance. Waiting for its commit instead made a
    /// chain of reordered requests time out in arrival order during a
    /// checkpoint's commit stall (~60 ms), answering a correct pipelining
    /// client with 409s. Made at the first subscription: most streams never
    /// have such a waiter, and a channel is ~0.3 KB (measured on 100,000
    /// streams). A sender made while an append is accepted may miss it;
    /// the subscriber then tries its append again, which sees it.
    accepted: std::sync::OnceLock<watch::Sender<Signal>>,
}

/// Invariant: stream offsets `base..start` are in the data file (page cache
/// at least), `start..start + buf.len()` are in `buf`, and the published
/// (durable) tail never exceeds `start + buf.len()`. Only the committer
/// changes it: it appends a batch's bytes after the WAL sync and before
/// publishing the new tail, and a flush writes the file before advancing
/// `start`, so a reader that saw `start` finds every byte below it in the
/// file.
#[derive(Debug, Default)]
struct MemTail {
    start: u64,
    buf: Vec<u8>,
}

/// Per-stream state. The first group is the *pending* state requests are
/// validated against (it includes queued, not yet durable appends); the
/// `durable_*` fields are what readers see, advanced by the committer after
/// the sync.
#[derive(Debug)]
struct PState {
    tail: u64,
    /// Closure, producers and Stream-Seq.
    w: WriterState,
    expiry: Expiry,
    last_access_ms: u64,
    soft_deleted: bool,
    /// Expired while forks still read it: no path, data retained.
    detached: bool,
    fork_refs: u64,
    removed: bool,
    created: bool,
    durable_tail: u64,
    durable_closed: bool,
    /// JSON streams: the sparse boundary index (`marks`), recorded as
    /// appends are accepted and loaded at start-up.
    json_marks: Vec<u64>,
    /// How many of `json_marks` are in the stream's index file (only the
    /// committer changes it, at checkpoints).
    marks_persisted: usize,
    /// JSON streams: where the last few reads ended, and offsets checked.
    recent_cuts: RecentCuts,
}

/// The last few offsets at which reads of a JSON stream ended (a cut, or
/// the tail then) or that a check found to be boundaries: the offsets
/// their readers' next reads start from, so checking those needs no scan. Without them a replay in 1 MiB responses
/// scanned up to 16 KiB again per response, and every live reader up to
/// 16 KiB per delivery (its offset is the tail before the append). Zeros
/// are offset 0, a boundary too.
#[derive(Debug, Default)]
struct RecentCuts {
    at: [u64; 8],
    next: usize,
}

impl RecentCuts {
    fn push(&mut self, cut: u64) {
        if !self.at.contains(&cut) {
            self.at[self.next] = cut;
            self.next = (self.next + 1) % self.at.len();
        }
    }
}

/// Streams flushed per committer cycle because their time was up: when
/// thousands of streams fall due together, their writes are spread over
/// several cycles (with batches committed in between) instead of stalling
/// one cycle for all of them.
const MAX_TIMED_FLUSHES: usize = 256;

/// Reads up to this size are done on the calling task, larger ones on the
/// blocking pool.
const INLINE_READ_BYTES: u64 = 64 * 1024;

impl PState {
    /// The last sparse-index mark at or before `at`.
    fn mark_at_or_before(&self, at: u64) -> Option<u64> {
        let i = self.json_marks.partition_point(|m| *m <= at);
        i.checked_sub(1).map(|i| self.json_marks[i])
    }
}

impl FStream {
    fn meta(&self, st: &PState) -> StreamMeta {
        StreamMeta {
            incarnation: self.id,
            content_type: self.content_type.clone(),
            json: self.json,
            tail: Offset(st.durable_tail),
            closed: st.durable_closed,
            expiry: st.expiry.clone(),
            expires_at_ms: expires_at_ms(&st.expiry, st.last_access_ms),
        }
    }
    /// The last sparse-index JSON boundary at or before `end`: where a
    /// boundary scan up to `end` can start.
    fn json_mark_at_or_before(&self, end: u64) -> Option<u64> {
        self.state.lock().mark_at_or_before(end)
    }

    /// Where a scan checking that `at` is a JSON boundary can start: `at`
    /// itself when it is a recent read end, else the last mark at or
    /// before it.
    fn json_scan_start(&self, at: u64) -> Option<u64> {
        let st = self.state.lock();
        if st.recent_cuts.at.contains(&at) {
            return Some(at);
        }
        st.mark_at_or_before(at)
    }

    fn remember_cut(&self, cut: u64) {
        self.state.lock().recent_cuts.push(cut);
    }

    fn publish(&self, st: &PState) {
        Signal {
            tail: Offset(st.durable_tail),
            closed: st.durable_closed,
            gone: st.removed || st.detached,
        }
        .publish(&self.signal);
    }

    fn accepted_signal(st: &PState) -> Signal {
        Signal {
            tail: Offset(st.tail),
            closed: st.w.closed,
            gone: st.removed || st.detached || st.soft_deleted,
        }
    }

    fn publish_accepted(&self, st: &PState) {
        if let Some(tx) = self.accepted.get() {
            Self::accepted_signal(st).publish(tx);
        }
    }
}

/// Bounded cache of open data files.
#[derive(Debug)]
struct FileCache {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    open: Mutex<lru::LruCache<u64, Arc<dyn VfsFile>>>,
    made_dirs: Mutex<HashSet<u64>>,
}

impl FileCache {
    fn path(dir: &Path, id: u64) -> PathBuf {
        dir.join("data")
            .join(format!("{:02x}", id % 256))
            .join(format!("{id:016x}.dat"))
    }
    fn get(&self, id: u64, create: bool) -> io::Result<Arc<dyn VfsFile>> {
        let mut open = self.open.lock();
        if let Some(f) = open.get(&id) {
            return Ok(f.clone());
        }
        let path = Self::path(&self.dir, id);
        if create && self.made_dirs.lock().insert(id % 256) {
            if let Some(parent) = path.parent() {
                self.vfs.create_dir_all(parent)?;
            }
        }
        let f = self.vfs.open(&path, create)?;
        open.put(id, f.clone());
        Ok(f)
    }
    /// Removes a data file; returns its size (for disk-usage accounting).
    fn remove(&self, id: u64) -> u64 {
        let open = self.open.lock().pop(&id);
        let path = Self::path(&self.dir, id);
        // Deletions are rare: a stat here keeps the accounting exact.
        let len = match open {
            Some(f) => f.len(),
            None => self.vfs.open(&path, false).and_then(|f| f.len()),
        }
        .unwrap_or(0);
        // A JSON stream's boundary index goes with its data (most streams
        // have none).
        let _ = self.vfs.remove_file(&marks::path(&self.dir, id));
        match self.vfs.remove_file(&path) {
            Ok(()) => len,
            Err(_) => 0,
        }
    }
    fn open_count(&self) -> usize {
        self.open.lock().len()
    }
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    vfs: Arc<dyn Vfs>,
    clock: Arc<dyn Clock>,
    opts: FileOptions,
    registry: RwLock<HashMap<String, Arc<FStream>>>,
    next_id: AtomicU64,
    files: FileCache,
    tx: Mutex<mpsc::Sender<Job>>,
    poisoned: Mutex<Option<StorageError>>,
    poisoned_flag: AtomicBool,
    touches: Mutex<HashMap<u64, u64>>,
    pending_bytes: AtomicU64,
    stats: FileStats,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The durable, file-backed engine (docs/storage.md).
#[derive(Debug, Clone)]
pub struct FileEngine {
    inner: Arc<Inner>,
}

fn io_err(e: io::Error) -> StorageError {
    if e.raw_os_error() == Some(28) {
        StorageError::StorageFull
    } else {
        StorageError::Io(e.to_string())
    }
}

fn is_expired(st: &PState, now_ms: u64) -> bool {
    expires_at_ms(&st.expiry, st.last_access_ms).is_some_and(|t| now_ms >= t)
}

/// Feeds `parts` (consecutive bytes from offset `at`) to `sc`, from offset
/// `from` on; the last JSON message boundary it reports, if any. `sc` keeps
/// its state, so a scan can go on past the parts.
fn last_boundary(sc: &mut BoundaryScanner, parts: &[Bytes], mut at: u64, from: u64) -> Option<u64> {
    let mut last = None;
    for d in parts {
        let d_end = at + d.len() as u64;
        if d_end > from {
            let skip = from.saturating_sub(at) as usize;
            let base = at + skip as u64;
            sc.feed(&d[skip..], |i| {
                last = Some(base + i as u64);
                true
            });
        }
        at = d_end;
    }
    last
}

fn wal_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

fn read_all(f: &dyn VfsFile) -> io::Result<Vec<u8>> {
    let len = f.len()? as usize;
    let mut buf = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let n = f.read_at(&mut buf[at..], at as u64)?;
        if n == 0 {
            buf.truncate(at);
            break;
        }
        at += n;
    }
    Ok(buf)
}

fn read_exact_at(f: &dyn VfsFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let n = f.read_at(&mut buf[at..], offset + at as u64)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "data file shorter than its stream",
            ));
        }
        at += n;
    }
    Ok(())
}

fn write_effects(
    files: &FileCache,
    effects: &[Effect],
    dirty: &mut HashSet<u64>,
    stats: &FileStats,
) -> io::Result<()> {
    for e in effects {
        match e {
            Effect::Write {
                id,
                base,
                start,
                data,
            } => {
                let f = files.get(*id, true)?;
                let mut at = start - base;
                for d in data {
                    f.write_all_at(d, at)?;
                    at += d.len() as u64;
                    // Records are written at the end of their stream's file.
                    stats
                        .data_file_bytes
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                dirty.insert(*id);
            }
            Effect::RemoveData { id } => {
                let freed = files.remove(*id);
                let _ =
                    stats
                        .data_file_bytes
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                            Some(v.saturating_sub(freed))
                        });
                dirty.remove(id);
            }
        }
    }
    Ok(())
}

/// The WAL's current segment.
struct Wal {
    seq: u64,
    file: Arc<dyn VfsFile>,
    len: u64,
    /// The file is filled with zeros up to here (preallocation).
    zeroed_to: u64,
}

impl FileEngine {
    /// Opens (creating if needed) a data directory on the real file system.
    pub fn open(dir: impl AsRef<Path>, opts: FileOptions) -> Result<FileEngine, StorageError> {
        Self::open_with(
            dir,
            opts,
            Arc::new(super::vfs::StdVfs::default()),
            Arc::new(SystemClock),
        )
    }

    /// Opens over any file system and clock (tests use the simulated ones).
    /// Runs recovery: see docs/storage.md.
    pub fn open_with(
        dir: impl AsRef<Path>,
        opts: FileOptions,
        vfs: Arc<dyn Vfs>,
        clock: Arc<dyn Clock>,
    ) -> Result<FileEngine, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        let (catalog, wal, (marks, scanned)) = recover(&dir, vfs.as_ref()).map_err(io_err)?;
        let files = FileCache {
            vfs: vfs.clone(),
            dir: dir.clone(),
            open: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(opts.max_open_files.max(1))
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            made_dirs: Mutex::new(HashSet::new()),
        };
        let (tx, rx) = mpsc::channel();
        let next_id = catalog.next_id.max(clock.now_ms().saturating_mul(1000));
        let inner = Arc::new(Inner {
            dir,
            vfs,
            clock,
            opts,
            registry: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(next_id),
            files,
            tx: Mutex::new(tx),
            poisoned: Mutex::new(None),
            poisoned_flag: AtomicBool::new(false),
            touches: Mutex::new(HashMap::new()),
            pending_bytes: AtomicU64::new(0),
            stats: FileStats::default(),
            committer: Mutex::new(None),
        });
        inner.load_live(&catalog, marks);
        inner
            .stats
            .recovery_boundary_scan_bytes
            .store(scanned, Ordering::Relaxed);
        // Disk usage after recovery: every data file was cut to its
        // stream's length, one fresh WAL segment and one checkpoint remain.
        inner.stats.data_file_bytes.store(
            catalog.streams.values().map(|s| s.tail - s.base).sum(),
            Ordering::Relaxed,
        );
        inner
            .stats
            .wal_file_bytes
            .store(wal.len.max(wal.zeroed_to), Ordering::Relaxed);
        let checkpoint_bytes = inner
            .vfs
            .open(&inner.dir.join("checkpoint"), false)
            .and_then(|f| f.len())
            .unwrap_or(0);
        inner
            .stats
            .checkpoint_file_bytes
            .store(checkpoint_bytes, Ordering::Relaxed);
        let worker = inner.clone();
        let runtime = tokio::runtime::Handle::try_current().ok();
        let handle = std::thread::Builder::new()
            .name("ds-committer".into())
            .spawn(move || {
                Committer {
                    inner: worker,
                    catalog,
                    wal,
                    dirty: HashSet::new(),
                    runtime,
                    held: HashMap::new(),
                    held_order: std::collections::VecDeque::new(),
                    held_bytes: 0,
                    flush_now: Vec::new(),
                    flush_buf: Vec::new(),
                    json_written: HashMap::new(),
                }
                .run(rx)
            })
            .map_err(io_err)?;
        *inner.committer.lock() = Some(handle);
        Ok(FileEngine { inner })
    }

    pub fn stats(&self) -> &FileStats {
        &self.inner.stats
    }

    /// Data files currently open.
    pub fn open_files(&self) -> usize {
        self.inner.files.open_count()
    }

    /// Forces a checkpoint (tests, shutdown).
    pub async fn checkpoint(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.inner.send(Job::Checkpoint(tx))?;
        rx.await
            .map_err(|_| StorageError::Io("committer stopped".into()))?
    }

    /// Stops the committer after a final checkpoint. Further writes fail.
    pub fn close(&self) {
        let _ = self.inner.tx.lock().send(Job::Stop);
        if let Some(h) = self.inner.committer.lock().take() {
            let _ = h.join();
            self.inner.vfs.unlock_dir(&self.inner.dir);
        }
    }
}

impl Inner {
    /// Builds the streams of the recovered catalog; `marks` holds the JSON
    /// streams' boundary indexes (all persisted).
    fn load_live(&self, cat: &Catalog, mut marks: HashMap<u64, Vec<u64>>) {
        let now = self.clock.now_ms();
        let slack = self.opts.touch_flush_interval.as_millis() as u64 + 1000;
        let mut by_id: HashMap<u64, Arc<FStream>> = HashMap::new();
        let mut reg = self.registry.write();
        // Ids grow with creation time and a fork is created after its
        // source, so ascending id order builds sources first.
        for s in cat.streams.values() {
            let last_access = match s.expiry {
                // Never expire early after a restart: reads after the last
                // persisted touch may have been lost.
                Expiry::TtlSecs(_) => (s.last_access_ms + slack).min(now.max(s.last_access_ms)),
                _ => s.last_access_ms,
            };
            let mut st = PState {
                tail: s.tail,
                w: WriterState {
                    closed: s.closed,
                    closed_by: s.closed_by.clone(),
                    producers: s.producers.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    last_stream_seq: s.last_stream_seq.clone(),
                },
                expiry: s.expiry.clone(),
                last_access_ms: last_access,
                soft_deleted: s.soft_deleted,
                detached: s.path.is_none(),
                fork_refs: s.fork_refs,
                removed: false,
                created: true,
                durable_tail: s.tail,
                durable_closed: s.closed,
                json_marks: marks.remove(&s.id).unwrap_or_default(),
                marks_persisted: 0,
                recent_cuts: RecentCuts::default(),
            };
            st.marks_persisted = st.json_marks.len();
            let (signal, _) = watch::channel(Signal {
                tail: Offset(s.tail),
                closed: s.closed,
                gone: s.path.is_none(),
            });
            let f = Arc::new(FStream {
                id: s.id,
                path: s.path.clone().unwrap_or_default(),
                content_type: s.content_type.clone(),
                json: s.json,
                base: s.base,
                source: s.source_id.and_then(|i| by_id.get(&i).cloned()),
                requested_expiry: s.requested_expiry.clone(),
                fork: s.fork.clone(),
                state: Mutex::new(st),
                mem: Mutex::new(MemTail {
                    start: s.tail,
                    buf: Vec::new(),
                }),
                signal,
                accepted: std::sync::OnceLock::new(),
            });
            if let Some(p) = &s.path {
                reg.insert(p.clone(), f.clone());
            }
            by_id.insert(s.id, f);
        }
    }

    fn check_writable(&self) -> Result<(), StorageError> {
        if self.poisoned_flag.load(Ordering::Acquire) {
            return Err(self
                .poisoned
                .lock()
                .clone()
                .unwrap_or(StorageError::Io("store failed".into())));
        }
        if self.pending_bytes.load(Ordering::Acquire) > self.opts.max_pending_bytes {
            return Err(StorageError::Overloaded);
        }
        Ok(())
    }

    fn send(&self, job: Job) -> Result<(), StorageError> {
        self.tx
            .lock()
            .send(job)
            .map_err(|_| StorageError::Io("committer stopped".into()))
    }

    /// Queues a record; returns the receiver of its acknowledgement.
    fn submit(
        &self,
        record: Record,
        stream: Option<Arc<FStream>>,
        publish: Publish,
    ) -> Result<oneshot::Receiver<Result<(), StorageError>>, StorageError> {
        let (tx, rx) = oneshot::channel();
        let bytes = record.data_len() + 64;
        self.pending_bytes.fetch_add(bytes, Ordering::AcqRel);
        if let Err(e) = self.send(Job::Write {
            record,
            stream,
            publish,
            ack: Some(tx),
            bytes,
        }) {
            self.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(e);
        }
        Ok(rx)
    }

    async fn barrier(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Barrier(tx))?;
        rx.await
            .map_err(|_| StorageError::Io("committer stopped".into()))?
    }

    async fn live(&self, path: &str) -> Result<Arc<FStream>, StorageError> {
        let s = self
            .registry
            .read()
            .get(path)
            .cloned()
            .ok_or(StorageError::NotFound)?;
        let created = s.state.lock().created;
        if !created {
            // Created but not yet durable: wait for its record.
            self.barrier().await?;
            if !s.state.lock().created {
                return Err(StorageError::NotFound);
            }
        }
        let (expired, soft) = {
            let st = s.state.lock();
            // The clock is read only for a stream that can expire (most
            // never do: one system call fewer per request).
            let expired = expires_at_ms(&st.expiry, st.last_access_ms)
                .is_some_and(|t| self.clock.now_ms() >= t);
            (expired, st.soft_deleted)
        };
        if expired {
            let _ = self.remove_live(path, &s, true);
            return Err(StorageError::NotFound);
        }
        if soft {
            return Err(StorageError::Gone);
        }
        Ok(s)
    }

    /// Deletes or expires `s` (registered at `path`) in the live state and
    /// queues the Delete record, mirroring `Catalog::delete`.
    fn remove_live(
        &self,
        path: &str,
        s: &Arc<FStream>,
        expired: bool,
    ) -> Option<oneshot::Receiver<Result<(), StorageError>>> {
        let mut reg = self.registry.write();
        if !reg.get(path).is_some_and(|e| Arc::ptr_eq(e, s)) {
            return None;
        }
        {
            let mut st = s.state.lock();
            if st.fork_refs > 0 {
                if expired {
                    st.detached = true;
                    reg.remove(path);
                } else {
                    st.soft_deleted = true;
                }
            } else {
                st.removed = true;
                reg.remove(path);
            }
            s.publish(&st);
            s.publish_accepted(&st);
        }
        let fully_removed = s.state.lock().removed;
        if fully_removed {
            // Cascade: release sources retained only for this stream.
            let mut cur = s.clone();
            while let Some(src) = cur.source.clone() {
                let mut sst = src.state.lock();
                sst.fork_refs = sst.fork_refs.saturating_sub(1);
                if sst.fork_refs > 0 || !(sst.soft_deleted || sst.detached) {
                    break;
                }
                sst.removed = true;
                src.publish(&sst);
                drop(sst);
                if reg.get(&src.path).is_some_and(|e| Arc::ptr_eq(e, &src)) {
                    reg.remove(&src.path);
                }
                cur = src;
            }
        }
        let rec = Record::Delete {
            id: s.id,
            expired,
            now_ms: self.clock.now_ms(),
        };
        self.submit(rec, None, Publish::None).ok()
    }

    /// The start of a read: refreshes a sliding TTL and resolves `from`
    /// against the published tail.
    fn begin_read(
        &self,
        s: &Arc<FStream>,
        from: ReadFrom,
    ) -> Result<(StreamMeta, u64), StorageError> {
        let meta = {
            let mut st = s.state.lock();
            let now = self.clock.now_ms();
            st.last_access_ms = now;
            if matches!(st.expiry, Expiry::TtlSecs(_)) {
                self.touches.lock().insert(s.id, now);
            }
            s.meta(&st)
        };
        let tail = meta.tail.0;
        let start = match from {
            ReadFrom::Start => 0,
            ReadFrom::Tail => tail,
            ReadFrom::At(o) if o.0 > tail => return Err(StorageError::OffsetBeyondTail),
            ReadFrom::At(o) => o.0,
        };
        if s.json && matches!(from, ReadFrom::At(_)) && !self.json_is_boundary(s, start, tail)? {
            return Err(StorageError::OffsetNotAligned);
        }
        Ok((meta, start))
    }

    /// Whether `at` (at most `tail`, a boundary) is a message boundary of
    /// the JSON stream `s`: a scan from the nearest mark at or before `at`,
    /// so at most about `marks::SPACING` bytes. An offset below a fork's
    /// base is checked in its source (the base itself is a boundary of
    /// both: fork points are checked when the fork is made).
    fn json_is_boundary(&self, s: &Arc<FStream>, at: u64, tail: u64) -> Result<bool, StorageError> {
        if at == tail || at == s.base || at == 0 {
            return Ok(true);
        }
        if at < s.base {
            let src = s
                .source
                .as_ref()
                .ok_or_else(|| StorageError::Io("fork without source".into()))?;
            return self.json_is_boundary(src, at, s.base);
        }
        let mut from = s.json_scan_start(at).unwrap_or(s.base).max(s.base);
        let mut sc = BoundaryScanner::default();
        let mut last = from;
        while from < at {
            let end = (from + 64 * 1024).min(at);
            let mut parts = Vec::new();
            self.read_range(s, from, end, &mut parts)?;
            last = last_boundary(&mut sc, &parts, from, from).unwrap_or(last);
            from = end;
        }
        if last == at {
            // A read that falls back from `read_file` to `read`, or the next
            // reader from here, checks it again without a scan.
            s.remember_cut(at);
        }
        Ok(last == at)
    }

    /// Reads stored bytes `from..end` across the fork chain.
    fn read_range(
        &self,
        s: &Arc<FStream>,
        from: u64,
        end: u64,
        out: &mut Vec<Bytes>,
    ) -> Result<(), StorageError> {
        let mut from = from;
        if from < s.base {
            let src = s
                .source
                .as_ref()
                .ok_or_else(|| StorageError::Io("fork without source".into()))?;
            let upto = end.min(s.base);
            self.read_range(src, from, upto, out)?;
            from = upto;
        }
        if from < end {
            // Bytes from the memory tail's start on are copied from memory,
            // those below it are in the file (see `MemTail`).
            let (file_end, held) = {
                let m = s.mem.lock();
                let held = if end > m.start {
                    let lo = (from.max(m.start) - m.start) as usize;
                    let hi = (end - m.start) as usize;
                    let bytes = m.buf.get(lo..hi).ok_or_else(|| {
                        StorageError::Io("read past a stream's held bytes".into())
                    })?;
                    Some(Bytes::copy_from_slice(bytes))
                } else {
                    None
                };
                (end.min(m.start), held)
            };
            if from < file_end {
                let f = self.files.get(s.id, false).map_err(io_err)?;
                let mut buf = vec![0u8; (file_end - from) as usize];
                read_exact_at(f.as_ref(), &mut buf, from - s.base).map_err(io_err)?;
                out.push(Bytes::from(buf));
            }
            out.extend(held);
        }
        Ok(())
    }

    /// The last JSON message boundary in `(start, end]`, scanning only from
    /// the nearest sparse-index mark at or before `end` (at most
    /// `marks::SPACING` bytes, plus one message). `None` when the range
    /// holds no boundary (its first message is longer than the range).
    fn json_cut(
        &self,
        s: &Arc<FStream>,
        start: u64,
        end: u64,
    ) -> Result<Option<u64>, StorageError> {
        let hint = s.json_mark_at_or_before(end);
        let from = hint.filter(|h| *h > start && *h <= end).unwrap_or(start);
        let mut last = (from > start).then_some(from);
        if from < end {
            let mut parts = Vec::new();
            self.read_range(s, from, end, &mut parts)?;
            let mut sc = BoundaryScanner::default();
            last = last_boundary(&mut sc, &parts, from, from).or(last);
        }
        Ok(last)
    }

    /// For JSON streams: the end of the `n`-th message after `from`, reading
    /// no further than `tail`. `None` when fewer messages exist.
    fn json_advance(
        &self,
        s: &Arc<FStream>,
        from: u64,
        tail: u64,
        n: u64,
    ) -> Result<Option<u64>, StorageError> {
        if n == 0 {
            return Ok(Some(from));
        }
        let mut sc = BoundaryScanner::default();
        let mut at = from;
        let mut seen = 0;
        while at < tail {
            let end = (at + 64 * 1024).min(tail);
            let mut parts = Vec::new();
            self.read_range(s, at, end, &mut parts)?;
            let mut base = at;
            for p in parts {
                let mut found = None;
                sc.feed(&p, |i| {
                    seen += 1;
                    if seen == n {
                        found = Some(base + i as u64);
                        false
                    } else {
                        true
                    }
                });
                if found.is_some() {
                    return Ok(found);
                }
                base += p.len() as u64;
            }
            at = end;
        }
        Ok(None)
    }
}

struct Committer {
    inner: Arc<Inner>,
    catalog: Catalog,
    wal: Wal,
    dirty: HashSet<u64>,
    /// The runtime the engine was opened in: a committed batch's signals
    /// and acknowledgements are sent from one task there (see `announce`).
    runtime: Option<tokio::runtime::Handle>,
    /// Streams holding durable bytes not yet written to their data files,
    /// with when they started holding them.
    held: HashMap<u64, (Arc<FStream>, Instant)>,
    /// `held` entries in the order they started (stale entries, whose
    /// stream was flushed since, are skipped).
    held_order: std::collections::VecDeque<(u64, Instant)>,
    held_bytes: u64,
    /// Streams that reached `data_flush_stream_bytes` in the last batch.
    flush_now: Vec<u64>,
    /// Reused buffer a stream's held bytes are copied to for writing, so
    /// readers are not blocked during the write.
    flush_buf: Vec<u8>,
    /// JSON streams written since the last checkpoint: their new marks go
    /// to their index files at the next one.
    json_written: HashMap<u64, Arc<FStream>>,
}

impl Committer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut last_checkpoint = Instant::now();
        let mut last_touch_flush = Instant::now();
        let mut wal_since_checkpoint = 0u64;
        let tick = self
            .inner
            .opts
            .touch_flush_interval
            .min(Duration::from_secs(1));
        loop {
            let mut batch = Vec::new();
            let interval = self.inner.opts.data_flush_interval;
            let wait = if self.held.is_empty() {
                tick
            } else if self
                .held_order
                .front()
                .is_some_and(|(_, since)| since.elapsed() >= interval)
            {
                // A backlog of due flushes (see `MAX_TIMED_FLUSHES`): go on
                // with it as soon as no batch is waiting.
                Duration::ZERO
            } else {
                tick.min(interval)
            };
            match rx.recv_timeout(wait) {
                Ok(j) => batch.push(j),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if !batch.is_empty() {
                // Let the threads producing appends run before the batch is
                // sealed. A finished fsync wakes this thread at once, often
                // while the runtime has more appends ready to submit; where
                // they share a core, sealing now makes small batches and
                // one fsync (and one round of wake-ups) per few appends.
                // Measured with the server pinned to one core (5 rotated
                // rounds, medians): 16 connections, fsyncs per append 0.21
                // -> 0.07, appends/s +23%, CPU per append -26%; one
                // sequential producer per connection +18%; 256 connections
                // on one stream 0.035 -> 0.006 fsyncs per append, +4%.
                // Latencies did not rise (p50 and p99 within noise, mostly
                // lower). Where nothing else wants the core it returns at
                // once.
                std::thread::yield_now();
            }
            let mut bytes = 0usize;
            while bytes < self.inner.opts.max_batch_bytes {
                match rx.try_recv() {
                    Ok(j) => {
                        if let Job::Write { bytes: b, .. } = &j {
                            bytes += *b as usize;
                        }
                        batch.push(j)
                    }
                    Err(_) => break,
                }
            }
            if last_touch_flush.elapsed() >= self.inner.opts.touch_flush_interval {
                last_touch_flush = Instant::now();
                let touches: Vec<(u64, u64)> = self.inner.touches.lock().drain().collect();
                if !touches.is_empty() {
                    batch.push(Job::Write {
                        record: Record::Touch(touches),
                        stream: None,
                        publish: Publish::None,
                        ack: None,
                        bytes: 0,
                    });
                }
            }
            let mut stop = false;
            let mut checkpoint_acks = Vec::new();
            let mut writes = Vec::new();
            let mut barriers = Vec::new();
            for j in batch {
                match j {
                    Job::Write { .. } => writes.push(j),
                    Job::Barrier(a) => barriers.push(a),
                    Job::Checkpoint(a) => checkpoint_acks.push(a),
                    Job::Stop => stop = true,
                }
            }
            if !writes.is_empty() {
                wal_since_checkpoint += self.commit(writes);
            }
            if !self.inner.poisoned_flag.load(Ordering::Acquire) {
                if let Err(e) = self.flush_due() {
                    self.poison(io_err(e));
                }
            }
            let result = self.inner.poisoned.lock().clone().map_or(Ok(()), Err);
            for b in barriers {
                let _ = b.send(result.clone());
            }
            let due = wal_since_checkpoint > 0
                && (last_checkpoint.elapsed() >= self.inner.opts.checkpoint_interval
                    || wal_since_checkpoint >= self.inner.opts.checkpoint_wal_bytes);
            if (due || !checkpoint_acks.is_empty() || stop)
                && !self.inner.poisoned_flag.load(Ordering::Acquire)
            {
                let r = self.checkpoint().map_err(io_err);
                if let Err(e) = &r {
                    self.poison(e.clone());
                } else {
                    wal_since_checkpoint = 0;
                    last_checkpoint = Instant::now();
                }
                for a in checkpoint_acks.drain(..) {
                    let _ = a.send(r.clone());
                }
            }
            for a in checkpoint_acks {
                let _ = a.send(Err(self
                    .inner
                    .poisoned
                    .lock()
                    .clone()
                    .unwrap_or(StorageError::Io("store failed".into()))));
            }
            if stop {
                break;
            }
        }
    }

    fn poison(&self, e: StorageError) {
        tracing::error!(error = %e, "storage failed: refusing further writes (restart to recover)");
        let mut p = self.inner.poisoned.lock();
        if p.is_none() {
            *p = Some(e);
        }
        self.inner.poisoned_flag.store(true, Ordering::Release);
    }

    /// Writes and syncs one batch, then applies and acknowledges it.
    /// Returns the WAL bytes written.
    fn commit(&mut self, jobs: Vec<Job>) -> u64 {
        let mut buf = Vec::new();
        for j in &jobs {
            if let Job::Write { record, .. } = j {
                codec::frame_record(record, &mut buf);
            }
        }
        let mut result = self.inner.poisoned.lock().clone().map_or(Ok(()), Err);
        if result.is_ok() {
            result = self.write_and_sync(&jobs, &buf);
        }
        let mut changed: Vec<Arc<FStream>> = Vec::new();
        let mut changed_ids = HashSet::new();
        let mut acks = Vec::new();
        for j in jobs {
            let Job::Write {
                record,
                stream,
                publish,
                ack,
                bytes,
            } = j
            else {
                continue;
            };
            self.inner.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
            if let Err(e) = &result {
                if let Some(a) = ack {
                    let _ = a.send(Err(e.clone()));
                }
                continue;
            }
            self.inner.stats.records.fetch_add(1, Ordering::Relaxed);
            if let Some(s) = stream {
                let mut st = s.state.lock();
                match publish {
                    Publish::None => {}
                    Publish::Created => {
                        st.created = true;
                        st.durable_tail = st.durable_tail.max(s.base + record.data_len());
                        st.durable_closed |= matches!(&record, Record::Create(c) if c.closed);
                    }
                    Publish::Tail { tail, closed } => {
                        st.durable_tail = st.durable_tail.max(tail);
                        st.durable_closed |= closed;
                    }
                }
                drop(st);
                if changed_ids.insert(s.id) {
                    changed.push(s);
                }
            }
            if let Some(a) = ack {
                acks.push(a);
            }
        }
        self.announce(changed, acks);
        buf.len() as u64
    }

    /// Publishes the new state of the streams a batch changed, then
    /// acknowledges its writes (so an append returns only once live readers
    /// were signalled). Done by one task on the runtime when there is one:
    /// waking a stream's live readers from this thread would hand each of
    /// them to the runtime's shared queue, and a fan-out stream can have
    /// thousands.
    fn announce(&self, changed: Vec<Arc<FStream>>, acks: Vec<Ack>) {
        if changed.is_empty() && acks.is_empty() {
            return;
        }
        let run = move || {
            for s in &changed {
                let st = s.state.lock();
                s.publish(&st);
            }
            for a in acks {
                let _ = a.send(Ok(()));
            }
        };
        match &self.runtime {
            Some(rt) => {
                rt.spawn(async move { run() });
            }
            None => run(),
        }
    }

    /// Makes one batch durable. Order: WAL bytes written (not synced), the
    /// batch applied to the catalog and its data written to the data files
    /// (page cache), then one `fdatasync` of the WAL, then file removals.
    /// Writing the data files before the sync means a full disk or a failed
    /// data write is found while the batch is not yet durable: it is then
    /// answered with an error and erased from the WAL (overwritten with
    /// zeros, never synced), so an append refused with 507 never reappears
    /// after a restart. Removals wait for the sync: a file deleted before
    /// its Delete record is durable would break recovery.
    fn write_and_sync(&mut self, jobs: &[Job], buf: &[u8]) -> Result<(), StorageError> {
        let start = self.wal.len;
        let fail = |me: &mut Self, e: io::Error, erase: bool| -> Result<(), StorageError> {
            if erase {
                let _ = me.wal.file.write_all_at(&vec![0u8; buf.len()], start);
            }
            let e = io_err(e);
            me.poison(e.clone());
            Err(e)
        };
        if let Err(e) = self
            .preallocate(buf.len() as u64)
            .and_then(|_| self.wal.file.write_all_at(buf, start))
        {
            return fail(self, e, true);
        }
        let mut removals = Vec::new();
        let mut held = Vec::new();
        for j in jobs {
            let Job::Write { record, stream, .. } = j else {
                continue;
            };
            let mut effects = Vec::new();
            self.catalog.apply(record, &mut effects);
            let mut direct = Vec::new();
            for e in effects {
                match (&e, stream) {
                    (Effect::RemoveData { .. }, _) => removals.push(e),
                    // A record's own stream holds its bytes in memory once
                    // the batch is durable (write-behind).
                    (Effect::Write { id, .. }, Some(s)) if *id == s.id => held.push((s.clone(), e)),
                    // Any other write (none today) goes to its file before
                    // the sync, as a full disk must be found before then.
                    (Effect::Write { .. }, _) => direct.push(e),
                }
            }
            if let Err(e) = write_effects(
                &self.inner.files,
                &direct,
                &mut self.dirty,
                &self.inner.stats,
            ) {
                return fail(self, e, true);
            }
        }
        self.inner.stats.wal_syncs.fetch_add(1, Ordering::Relaxed);
        let sync_started = Instant::now();
        if let Err(e) = self.wal.file.sync_data() {
            // Never retried in place: after a failed fsync the kernel may
            // have dropped the dirty pages (fail-stop).
            return fail(self, e, false);
        }
        let stats = &self.inner.stats;
        stats.wal_sync_ns.observe_duration(sync_started.elapsed());
        stats.batch_records.observe(
            jobs.iter()
                .filter(|j| matches!(j, Job::Write { .. }))
                .count() as u64,
        );
        stats.batch_bytes.observe(buf.len() as u64);
        self.wal.len += buf.len() as u64;
        stats
            .wal_file_bytes
            .store(self.wal.len.max(self.wal.zeroed_to), Ordering::Relaxed);
        for (s, e) in held {
            self.hold(s, e);
        }
        let stats = &self.inner.stats;
        for e in &removals {
            if let Effect::RemoveData { id } = e {
                // A removed stream's held bytes are never written.
                if let Some((s, _)) = self.held.remove(id) {
                    let n = std::mem::take(&mut s.mem.lock().buf).len() as u64;
                    self.held_bytes -= n;
                }
            }
        }
        stats
            .unflushed_bytes
            .store(self.held_bytes, Ordering::Relaxed);
        if let Err(e) = write_effects(
            &self.inner.files,
            &removals,
            &mut self.dirty,
            &self.inner.stats,
        ) {
            // The batch is durable; a leftover file is removed by recovery.
            tracing::warn!(error = %e, "cannot remove a data file");
        }
        Ok(())
    }

    /// Appends a durable write's bytes to its stream's memory tail (before
    /// the new tail is published).
    fn hold(&mut self, s: Arc<FStream>, e: Effect) {
        let Effect::Write { start, data, .. } = e else {
            return;
        };
        let len: u64 = data.iter().map(|d| d.len() as u64).sum();
        let mut m = s.mem.lock();
        if start != m.start + m.buf.len() as u64 {
            // Not contiguous with what is held: cannot happen (a stream's
            // records are applied in tail order). Written through instead,
            // so nothing is lost.
            drop(m);
            tracing::error!(stream = s.id, start, "write not contiguous with held bytes");
            let r = self.flush_stream(s.id).and_then(|_| {
                write_effects(
                    &self.inner.files,
                    &[Effect::Write {
                        id: s.id,
                        base: s.base,
                        start,
                        data,
                    }],
                    &mut self.dirty,
                    &self.inner.stats,
                )
            });
            let mut m = s.mem.lock();
            if m.buf.is_empty() {
                m.start = start + len;
            }
            drop(m);
            if let Err(e) = r {
                self.poison(io_err(e));
            }
            return;
        }
        for d in &data {
            m.buf.extend_from_slice(d);
        }
        if s.json {
            self.json_written.entry(s.id).or_insert_with(|| s.clone());
        }
        if m.buf.len() as u64 >= self.inner.opts.data_flush_stream_bytes {
            self.flush_now.push(s.id);
        }
        drop(m);
        self.held_bytes += len;
        if let std::collections::hash_map::Entry::Vacant(v) = self.held.entry(s.id) {
            let now = Instant::now();
            self.held_order.push_back((s.id, now));
            v.insert((s, now));
        }
    }

    /// Writes a stream's held bytes to its data file, then releases them.
    fn flush_stream(&mut self, id: u64) -> io::Result<()> {
        let Some((s, since)) = self.held.remove(&id) else {
            return Ok(());
        };
        let mut out = std::mem::take(&mut self.flush_buf);
        out.clear();
        let at = {
            let m = s.mem.lock();
            out.extend_from_slice(&m.buf);
            m.start
        };
        let r = if out.is_empty() {
            Ok(())
        } else {
            self.inner
                .files
                .get(id, true)
                .and_then(|f| f.write_all_at(&out, at - s.base))
        };
        if let Err(e) = r {
            // Still held (and readable); the caller poisons the store.
            self.held.insert(id, (s, since));
            self.flush_buf = out;
            return Err(e);
        }
        let n = out.len();
        {
            // Only this thread adds to `buf`, so it still starts with `out`.
            let mut m = s.mem.lock();
            m.buf.drain(..n);
            m.start += n as u64;
            if m.buf.is_empty() && m.buf.capacity() > 16 * 1024 {
                // Idle streams keep no large buffers.
                m.buf = Vec::new();
            }
        }
        // Kept for the next flush unless a burst made it large.
        let keep = self
            .inner
            .opts
            .data_flush_stream_bytes
            .saturating_mul(4)
            .min(4 << 20);
        if out.capacity() as u64 <= keep {
            self.flush_buf = out;
        }
        let stats = &self.inner.stats;
        self.held_bytes -= n as u64;
        stats
            .unflushed_bytes
            .store(self.held_bytes, Ordering::Relaxed);
        stats.data_file_bytes.fetch_add(n as u64, Ordering::Relaxed);
        stats.data_flushes.fetch_add(1, Ordering::Relaxed);
        self.dirty.insert(id);
        Ok(())
    }

    /// Flushes what is due: streams holding `data_flush_stream_bytes`
    /// (listed in `flush_now` by `hold`),
    /// streams that started holding `data_flush_interval` ago, and
    /// everything once `max_unflushed_bytes` are held.
    fn flush_due(&mut self) -> io::Result<()> {
        let opts = &self.inner.opts;
        let (interval, max) = (opts.data_flush_interval, opts.max_unflushed_bytes);
        if self.held_bytes > max {
            return self.flush_all();
        }
        for id in std::mem::take(&mut self.flush_now) {
            self.flush_stream(id)?;
        }
        let now = Instant::now();
        let mut flushed = 0;
        while let Some(&(id, since)) = self.held_order.front() {
            if now.duration_since(since) < interval || flushed == MAX_TIMED_FLUSHES {
                break;
            }
            self.held_order.pop_front();
            if self.held.get(&id).is_some_and(|(_, t)| *t == since) {
                self.flush_stream(id)?;
                flushed += 1;
            }
        }
        Ok(())
    }

    fn flush_all(&mut self) -> io::Result<()> {
        let ids: Vec<u64> = self.held.keys().copied().collect();
        for id in ids {
            self.flush_stream(id)?;
        }
        self.held_order.clear();
        self.flush_now.clear();
        Ok(())
    }

    /// Keeps the WAL segment filled with zeros ahead of the records, in
    /// steps of `wal_prealloc_bytes`. Overwriting already-allocated blocks
    /// lets `fdatasync` skip the file-size metadata update most of the time
    /// (measured here: 170 µs per append+fdatasync vs 132 µs overwriting).
    /// Recovery treats an all-zero tail as the clean end of a segment.
    fn preallocate(&mut self, need: u64) -> io::Result<()> {
        let step = self.inner.opts.wal_prealloc_bytes;
        if step == 0 || self.wal.len + need <= self.wal.zeroed_to {
            return Ok(());
        }
        let target = self.wal.len + need + step;
        let zeros = vec![0u8; 1 << 20];
        while self.wal.zeroed_to < target {
            let n = (target - self.wal.zeroed_to).min(zeros.len() as u64) as usize;
            self.wal
                .file
                .write_all_at(&zeros[..n], self.wal.zeroed_to)?;
            self.wal.zeroed_to += n as u64;
        }
        Ok(())
    }

    /// Appends the marks of the JSON streams written since the last
    /// checkpoint to their index files (called after `flush_all`, so every
    /// durable byte is in its data file); returns the files written, for
    /// the checkpoint to sync. A mark of bytes not yet durable (accepted
    /// into the batch being built) waits for the next checkpoint.
    fn write_marks(&mut self) -> io::Result<Vec<(u64, Arc<dyn VfsFile>)>> {
        let mut written = Vec::new();
        for (id, s) in std::mem::take(&mut self.json_written) {
            let flushed = s.mem.lock().start;
            let (from, new) = {
                let st = s.state.lock();
                if st.removed {
                    continue; // its files are gone or going
                }
                let from = st.marks_persisted;
                let upto = st.json_marks.partition_point(|m| *m <= flushed);
                if upto <= from {
                    continue;
                }
                (from, marks::encode(id, &st.json_marks[from..upto]))
            };
            let path = marks::path(&self.inner.dir, id);
            // The data file's directory exists: it was written to.
            let f = self.inner.vfs.open(&path, true)?;
            f.write_all_at(&new, (from * marks::ENTRY_BYTES) as u64)?;
            s.state.lock().marks_persisted = from + new.len() / marks::ENTRY_BYTES;
            written.push((id, f));
        }
        Ok(written)
    }

    /// Syncs data files and boundary indexes, rotates the WAL, writes the
    /// catalog, and drops the segments it covers. Order matters: see
    /// docs/storage.md.
    fn checkpoint(&mut self) -> io::Result<()> {
        // The checkpoint stops covering WAL records: their bytes must be in
        // the data files first.
        self.flush_all()?;
        let vfs = self.inner.vfs.clone();
        let dir = self.inner.dir.clone();
        let dirty: Vec<u64> = self.dirty.drain().collect();
        let indexes = self.write_marks()?;
        // Many files: one file-system-wide sync beats one sync per file.
        if !(dirty.len() + indexes.len() > 16 && vfs.sync_filesystem(&dir.join("data"))?) {
            let mut shards = HashSet::new();
            for id in &dirty {
                // A file removed since it was written needs no sync.
                if let Ok(f) = self.inner.files.get(*id, false) {
                    f.sync_data()?;
                }
                shards.insert(id % 256);
            }
            for (id, f) in &indexes {
                f.sync_data()?;
                shards.insert(id % 256);
            }
            for s in &shards {
                vfs.sync_dir(&dir.join("data").join(format!("{s:02x}")))?;
            }
            if !shards.is_empty() {
                vfs.sync_dir(&dir.join("data"))?;
            }
        }
        let old = self.wal.seq;
        self.wal = new_segment(vfs.as_ref(), &dir, old + 1)?;
        let checkpoint_bytes = write_checkpoint(
            vfs.as_ref(),
            &dir,
            &self.catalog,
            self.wal.seq,
            WAL_HEADER_LEN,
        )?;
        for name in vfs.list_dir(&dir.join("wal"))? {
            if let Some(seq) = parse_wal_name(&name) {
                if seq < self.wal.seq {
                    vfs.remove_file(&dir.join("wal").join(name))?;
                }
            }
        }
        let stats = &self.inner.stats;
        stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        stats
            .checkpoint_file_bytes
            .store(checkpoint_bytes, Ordering::Relaxed);
        stats.wal_file_bytes.store(self.wal.len, Ordering::Relaxed);
        Ok(())
    }
}

fn parse_wal_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

fn new_segment(vfs: &dyn Vfs, dir: &Path, seq: u64) -> io::Result<Wal> {
    let path = dir.join("wal").join(wal_name(seq));
    let f = vfs.open(&path, true)?;
    f.set_len(0)?;
    let mut hdr = WAL_MAGIC.to_vec();
    hdr.extend_from_slice(&seq.to_le_bytes());
    f.write_all_at(&hdr, 0)?;
    f.sync_data()?;
    vfs.sync_dir(&dir.join("wal"))?;
    Ok(Wal {
        seq,
        file: f,
        len: WAL_HEADER_LEN,
        zeroed_to: WAL_HEADER_LEN,
    })
}

fn write_checkpoint(
    vfs: &dyn Vfs,
    dir: &Path,
    cat: &Catalog,
    seg: u64,
    off: u64,
) -> io::Result<u64> {
    let tmp = dir.join("checkpoint.tmp");
    let f = vfs.open(&tmp, true)?;
    f.set_len(0)?;
    let encoded = cat.encode_checkpoint(seg, off);
    f.write_all_at(&encoded, 0)?;
    f.sync_data()?;
    vfs.rename(&tmp, &dir.join("checkpoint"))?;
    vfs.sync_dir(dir)?;
    Ok(encoded.len() as u64)
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Recovery (docs/storage.md): checkpoint + WAL replay, torn-tail repair,
/// data-file repair, then a fresh checkpoint and segment.
fn recover(dir: &Path, vfs: &dyn Vfs) -> io::Result<(Catalog, Wal, RecoveredMarks)> {
    vfs.create_dir_all(&dir.join("wal"))?;
    vfs.create_dir_all(&dir.join("data"))?;
    vfs.lock_dir(dir)?;
    if vfs.exists(&dir.join("checkpoint.tmp")) {
        vfs.remove_file(&dir.join("checkpoint.tmp"))?;
    }
    let (mut cat, start_seg, start_off) = if vfs.exists(&dir.join("checkpoint")) {
        let buf = read_all(vfs.open(&dir.join("checkpoint"), false)?.as_ref())?;
        Catalog::decode_checkpoint(&buf).ok_or_else(|| corrupt("checkpoint is corrupt".into()))?
    } else {
        (Catalog::default(), 0, WAL_HEADER_LEN)
    };
    let mut segs: Vec<u64> = vfs
        .list_dir(&dir.join("wal"))?
        .iter()
        .filter_map(|n| parse_wal_name(n))
        .collect();
    segs.sort_unstable();
    let mut effects_all: Vec<Effect> = Vec::new();
    let live_segs: Vec<u64> = segs.iter().copied().filter(|s| *s >= start_seg).collect();
    for (i, seg) in live_segs.iter().enumerate() {
        let path = dir.join("wal").join(wal_name(*seg));
        let f = vfs.open(&path, false)?;
        let buf = Bytes::from(read_all(f.as_ref())?);
        let last = i + 1 == live_segs.len();
        if buf.len() < WAL_HEADER_LEN as usize || &buf[..8] != WAL_MAGIC {
            if last {
                // A segment whose header never became durable holds no records.
                vfs.remove_file(&path)?;
                continue;
            }
            return Err(corrupt(format!(
                "WAL segment {seg:016x} has no valid header"
            )));
        }
        let scan = codec::scan_segment(&buf);
        for (pos, r) in &scan.records {
            if *seg == start_seg && *pos < start_off {
                continue;
            }
            cat.apply(r, &mut effects_all);
        }
        if scan.torn {
            if !last {
                return Err(corrupt(format!(
                    "WAL segment {seg:016x} is corrupt at byte {}",
                    scan.valid_end
                )));
            }
            tracing::warn!(
                segment = seg,
                at = scan.valid_end,
                "dropping a torn record at the WAL tail"
            );
            f.set_len(scan.valid_end)?;
            f.sync_data()?;
        }
    }
    finish_recovery(dir, vfs, cat, effects_all, segs)
}

fn finish_recovery(
    dir: &Path,
    vfs: &dyn Vfs,
    cat: Catalog,
    effects: Vec<Effect>,
    segs: Vec<u64>,
) -> io::Result<(Catalog, Wal, RecoveredMarks)> {
    // Re-apply the replayed data to the data files (idempotent positional
    // writes), then cut every data file to its stream's length. At most 64
    // files are open at once, whatever the number of streams.
    let mut open: lru::LruCache<u64, Arc<dyn VfsFile>> =
        lru::LruCache::new(std::num::NonZeroUsize::new(64).unwrap_or(std::num::NonZeroUsize::MIN));
    let mut new_dirs: HashSet<PathBuf> = HashSet::new();
    let mut get = |id: u64, create: bool| -> io::Result<Option<Arc<dyn VfsFile>>> {
        if let Some(f) = open.get(&id) {
            return Ok(Some(f.clone()));
        }
        let path = FileCache::path(dir, id);
        let existed = vfs.exists(&path);
        if !create && !existed {
            return Ok(None);
        }
        if let Some(p) = path.parent() {
            vfs.create_dir_all(p)?;
            if !existed {
                // A new name is durable only once its directory is synced.
                new_dirs.insert(p.to_path_buf());
            }
        }
        let f = vfs.open(&path, create)?;
        open.put(id, f.clone());
        Ok(Some(f))
    };
    let mut touched: HashSet<u64> = HashSet::new();
    for e in &effects {
        if let Effect::Write {
            id,
            base,
            start,
            data,
        } = e
        {
            if !cat.streams.contains_key(id) {
                continue; // deleted later in the replay
            }
            let Some(f) = get(*id, true)? else { continue };
            let mut at = start - base;
            for d in data {
                f.write_all_at(d, at)?;
                at += d.len() as u64;
            }
            touched.insert(*id);
        }
    }
    for s in cat.streams.values() {
        let len = s.tail - s.base;
        match get(s.id, len > 0)? {
            Some(f) => {
                let have = f.len()?;
                if have < len {
                    return Err(corrupt(format!(
                        "data file of stream {} is {have} bytes, expected {len}",
                        s.id
                    )));
                }
                if have > len {
                    f.set_len(len)?;
                    touched.insert(s.id);
                }
                // Files untouched by the replay were synced by the checkpoint.
                if touched.contains(&s.id) {
                    f.sync_data()?;
                }
            }
            None if len > 0 => {
                return Err(corrupt(format!("data file of stream {} is missing", s.id)))
            }
            None => {}
        }
    }
    for d in &new_dirs {
        vfs.sync_dir(d)?;
    }
    // Remove data files of streams the catalog does not know (deleted
    // streams whose removal did not reach the disk), and boundary indexes
    // of streams that are not JSON streams the catalog knows.
    let mut has_index = HashSet::new();
    for shard in vfs.list_dir(&dir.join("data"))? {
        let sdir = dir.join("data").join(&shard);
        if vfs.list_dir(&sdir).is_err() {
            continue;
        }
        for name in vfs.list_dir(&sdir)? {
            // `<id>.dat`, or `<id>.idx` (a JSON stream's boundary index):
            // `(id, is_index)` when the catalog has a use for the file.
            let kept = name
                .strip_suffix(".dat")
                .map(|stem| (stem, false))
                .or_else(|| name.strip_suffix(".idx").map(|stem| (stem, true)))
                .and_then(|(stem, index)| {
                    let s = cat.streams.get(&u64::from_str_radix(stem, 16).ok()?)?;
                    (!index || s.json).then_some((s.id, index))
                });
            match kept {
                Some((id, true)) => {
                    has_index.insert(id);
                }
                Some((_, false)) => {}
                None => vfs.remove_file(&sdir.join(&name))?,
            }
        }
        vfs.sync_dir(&sdir)?;
    }
    let marks = recover_marks(dir, vfs, &cat, &has_index)?;
    vfs.sync_dir(&dir.join("data"))?;
    let next = segs.last().copied().unwrap_or(0) + 1;
    let wal = new_segment(vfs, dir, next)?;
    write_checkpoint(vfs, dir, &cat, wal.seq, WAL_HEADER_LEN)?;
    for seq in segs {
        let p = dir.join("wal").join(wal_name(seq));
        if vfs.exists(&p) {
            vfs.remove_file(&p)?;
        }
    }
    vfs.sync_dir(&dir.join("wal"))?;
    Ok((cat, wal, marks))
}

/// The JSON streams' marks by stream id, and the bytes scanned to find
/// those their index files lacked.
type RecoveredMarks = (HashMap<u64, Vec<u64>>, u64);

/// Loads the boundary index of every JSON stream (docs/storage.md,
/// "Boundary index"), after the data files were repaired: keeps the valid
/// prefix of each index file (cutting off the rest); where more than
/// `marks::SPACING` bytes past the last mark lack one (bytes replayed from
/// the WAL, an index lost, or data written before indexes existed), scans
/// the data file from that mark to the tail, appends the marks it finds to
/// the file and syncs it.
fn recover_marks(
    dir: &Path,
    vfs: &dyn Vfs,
    cat: &Catalog,
    has_index: &HashSet<u64>,
) -> io::Result<RecoveredMarks> {
    let mut out = HashMap::new();
    let mut new_files = HashSet::new();
    let mut scanned: u64 = 0;
    let mut buf = Vec::new();
    for s in cat.streams.values().filter(|s| s.json) {
        let index_path = marks::path(dir, s.id);
        let mut file = None;
        let (mut found, valid_len, mut changed) = if has_index.contains(&s.id) {
            let f = vfs.open(&index_path, false)?;
            // Marks are at least `SPACING` apart: a longer file holds
            // garbage past that, which is not read (a damaged length must
            // not make start-up read gigabytes).
            let file_len = f.len()?;
            let most = ((s.tail - s.base) / marks::SPACING + 1) * marks::ENTRY_BYTES as u64;
            let mut bytes = vec![0u8; file_len.min(most) as usize];
            read_exact_at(f.as_ref(), &mut bytes, 0)?;
            let (found, valid_len) = marks::decode(s.id, &bytes, s.base, s.tail);
            let cut = (valid_len as u64) < file_len;
            if cut {
                f.set_len(valid_len as u64)?;
            }
            file = Some(f);
            (found, valid_len, cut)
        } else {
            (Vec::new(), 0, false)
        };
        let known = found.len();
        let from = found.last().copied().unwrap_or(s.base);
        if s.tail - from > marks::SPACING {
            // `from` is a boundary (a mark, or the stream's own start).
            let data = vfs.open(&FileCache::path(dir, s.id), false)?;
            let mut sc = BoundaryScanner::default();
            buf.resize(1 << 20, 0);
            let mut at = from;
            while at < s.tail {
                let n = ((s.tail - at) as usize).min(buf.len());
                read_exact_at(data.as_ref(), &mut buf[..n], at - s.base)?;
                marks::scan(&mut found, &mut sc, &buf[..n], at);
                at += n as u64;
            }
            scanned += s.tail - from;
        }
        if found.len() > known {
            let f = match file.take() {
                Some(f) => f,
                None => {
                    new_files.insert(s.id % 256);
                    vfs.open(&index_path, true)?
                }
            };
            f.write_all_at(&marks::encode(s.id, &found[known..]), valid_len as u64)?;
            file = Some(f);
            changed = true;
        }
        if let (true, Some(f)) = (changed, &file) {
            f.sync_data()?;
        }
        if !found.is_empty() {
            out.insert(s.id, found);
        }
    }
    for shard in new_files {
        vfs.sync_dir(&dir.join("data").join(format!("{shard:02x}")))?;
    }
    if scanned > 0 {
        tracing::info!(
            bytes = scanned,
            "scanned JSON data for message boundaries its index lacked"
        );
    }
    Ok((out, scanned))
}

fn same_config(s: &FStream, st: &PState, req: &CreateRequest) -> bool {
    rules::same_config(
        &s.content_type,
        &s.requested_expiry,
        &s.fork,
        st.w.closed,
        req,
    )
}

async fn await_ack(rx: oneshot::Receiver<Result<(), StorageError>>) -> Result<(), StorageError> {
    rx.await
        .map_err(|_| StorageError::Io("committer stopped".into()))?
}

impl FileEngine {
    /// Resolves a fork's source and divergence point against the source's
    /// durable tail (clients only ever saw durable offsets).
    fn resolve_fork(
        inner: &Inner,
        src: &Arc<FStream>,
        spec: &ForkSpec,
    ) -> Result<u64, StorageError> {
        let tail = src.state.lock().durable_tail;
        let anchor = match spec.offset {
            Some(o) if o.0 > tail => return Err(StorageError::ForkOffsetBeyondTail),
            Some(o) => o.0,
            None => tail,
        };
        if src.json && !inner.json_is_boundary(src, anchor, tail)? {
            return Err(StorageError::OffsetNotAligned);
        }
        if spec.sub_offset == 0 {
            return Ok(anchor);
        }
        if src.json {
            inner
                .json_advance(src, anchor, tail, spec.sub_offset)?
                .ok_or(StorageError::ForkSubOffsetOvershoot)
        } else {
            match anchor.checked_add(spec.sub_offset) {
                Some(p) if p <= tail => Ok(p),
                _ => Err(StorageError::ForkSubOffsetOvershoot),
            }
        }
    }
}

#[async_trait]
impl Engine for FileEngine {
    async fn create(&self, path: &str, req: CreateRequest) -> Result<CreateOutcome, StorageError> {
        let inner = &self.inner;
        let existing = inner.registry.read().get(path).cloned();
        if let Some(existing) = existing {
            match inner.live(path).await {
                Ok(s) => {
                    let st = s.state.lock();
                    return if same_config(&s, &st, &req) {
                        Ok(CreateOutcome::Existed(s.meta(&st)))
                    } else {
                        Err(StorageError::ConfigMismatch)
                    };
                }
                Err(StorageError::Gone) => return Err(StorageError::ConfigMismatch),
                Err(StorageError::NotFound) => {} // expired just now: re-create
                Err(e) => return Err(e),
            }
            let _ = existing;
        }
        inner.check_writable()?;
        let (source, base, content_type, json, expiry) = match &req.fork {
            None => {
                let ct = req
                    .content_type
                    .clone()
                    .unwrap_or_else(|| "application/octet-stream".into());
                (None, 0, ct, req.json, req.expiry.clone())
            }
            Some(spec) => {
                let src = match inner.live(&spec.source).await {
                    Ok(s) => s,
                    Err(StorageError::NotFound) => return Err(StorageError::ForkSourceNotFound),
                    Err(StorageError::Gone) => return Err(StorageError::ForkSourceGone),
                    Err(e) => return Err(e),
                };
                if let Some(ct) = &req.content_type {
                    if !same_media_type(ct, &src.content_type) {
                        return Err(StorageError::ContentTypeMismatch);
                    }
                }
                let point = Self::resolve_fork(inner, &src, spec)?;
                let expiry = match (&req.expiry, &src.state.lock().expiry) {
                    (Expiry::Never, inherited) => inherited.clone(),
                    (own, _) => own.clone(),
                };
                (
                    Some(src.clone()),
                    point,
                    src.content_type.clone(),
                    src.json,
                    expiry,
                )
            }
        };
        let now = inner.clock.now_ms();
        let data: Vec<Bytes> = req
            .records
            .iter()
            .filter(|r| !r.is_empty())
            .cloned()
            .collect();
        let len: u64 = data.iter().map(|b| b.len() as u64).sum();
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (signal, _) = watch::channel(Signal {
            tail: Offset(base),
            closed: false,
            gone: false,
        });
        let stream = Arc::new(FStream {
            id,
            path: path.to_owned(),
            content_type: content_type.clone(),
            json,
            base,
            source: source.clone(),
            requested_expiry: req.expiry.clone(),
            fork: req.fork.clone(),
            state: Mutex::new(PState {
                tail: base + len,
                w: WriterState {
                    closed: req.closed,
                    ..WriterState::default()
                },
                expiry: expiry.clone(),
                last_access_ms: now,
                soft_deleted: false,
                detached: false,
                fork_refs: 0,
                removed: false,
                created: false,
                durable_tail: base,
                durable_closed: false,
                json_marks: {
                    let mut marks = Vec::new();
                    if json {
                        marks::push_records(&mut marks, base, &data);
                    }
                    marks
                },
                marks_persisted: 0,
                recent_cuts: RecentCuts::default(),
            }),
            mem: Mutex::new(MemTail {
                start: base,
                buf: Vec::new(),
            }),
            signal,
            accepted: std::sync::OnceLock::new(),
        });
        let record = Record::Create(CreateRec {
            id,
            path: path.to_owned(),
            content_type,
            json,
            expiry,
            requested_expiry: req.expiry.clone(),
            closed: req.closed,
            now_ms: now,
            fork: req
                .fork
                .as_ref()
                .zip(source.as_ref())
                .map(|(spec, src)| ForkRec {
                    source_id: src.id,
                    fork_offset: base,
                    spec: spec.clone(),
                }),
            data,
        });
        let raced = {
            let mut reg = inner.registry.write();
            match reg.get(path).cloned() {
                Some(existing) => {
                    // Lost a race with a concurrent create of the same path.
                    let st = existing.state.lock();
                    let ok = !st.soft_deleted
                        && !is_expired(&st, now)
                        && same_config(&existing, &st, &req);
                    drop(st);
                    if !ok {
                        return Err(StorageError::ConfigMismatch);
                    }
                    Err(existing)
                }
                None => {
                    if let Some(src) = &source {
                        let mut sst = src.state.lock();
                        if sst.removed || sst.detached {
                            return Err(StorageError::ForkSourceNotFound);
                        }
                        if sst.soft_deleted {
                            return Err(StorageError::ForkSourceGone);
                        }
                        sst.fork_refs += 1;
                    }
                    reg.insert(path.to_owned(), stream.clone());
                    Ok(inner.submit(record, Some(stream.clone()), Publish::Created)?)
                }
            }
        };
        let rx = match raced {
            Ok(rx) => rx,
            Err(existing) => {
                inner.barrier().await?;
                let st = existing.state.lock();
                return Ok(CreateOutcome::Existed(existing.meta(&st)));
            }
        };
        await_ack(rx).await?;
        let st = stream.state.lock();
        Ok(CreateOutcome::Created(stream.meta(&st)))
    }

    async fn append(&self, path: &str, req: AppendRequest) -> Result<AppendOutcome, StorageError> {
        let inner = &self.inner;
        let s = inner.live(path).await?;
        inner.check_writable()?;
        enum Next {
            Wait(
                oneshot::Receiver<Result<(), StorageError>>,
                u64,
                bool,
                Option<(u64, u64)>,
            ),
            Dup(u64, u64),
            AlreadyClosed,
        }
        let next = {
            let mut st = s.state.lock();
            if st.removed {
                return Err(StorageError::NotFound);
            }
            let now = inner.clock.now_ms();
            match st.w.decide(&s.content_type, st.tail, &req)? {
                Decision::Duplicate { epoch, seq } => {
                    st.last_access_ms = now;
                    inner.touches.lock().insert(s.id, now);
                    Next::Dup(epoch, seq)
                }
                Decision::AlreadyClosed => {
                    st.last_access_ms = now;
                    inner.touches.lock().insert(s.id, now);
                    Next::AlreadyClosed
                }
                Decision::Apply => {
                    let accepted = st.w.apply(&req);
                    let data: Vec<Bytes> =
                        req.records.into_iter().filter(|r| !r.is_empty()).collect();
                    let len: u64 = data.iter().map(|b| b.len() as u64).sum();
                    let start = st.tail;
                    st.tail += len;
                    st.last_access_ms = now;
                    if s.json {
                        marks::push_records(&mut st.json_marks, start, &data);
                    }
                    let record = Record::Append(AppendRec {
                        id: s.id,
                        start,
                        now_ms: now,
                        close: req.close,
                        producer: req.producer.map(|p| (p.id, p.epoch, p.seq)),
                        stream_seq: req.stream_seq,
                        data,
                    });
                    let tail = st.tail;
                    let closed = st.w.closed;
                    // Queued while the stream's lock is held: WAL order is
                    // validation order (invariant 3).
                    let rx =
                        inner.submit(record, Some(s.clone()), Publish::Tail { tail, closed })?;
                    s.publish_accepted(&st);
                    Next::Wait(rx, tail, closed, accepted)
                }
            }
        };
        match next {
            Next::Wait(rx, tail, closed, producer) => {
                await_ack(rx).await?;
                let st = s.state.lock();
                let mut meta = s.meta(&st);
                meta.tail = Offset(tail);
                meta.closed = closed;
                Ok(AppendOutcome::Applied { meta, producer })
            }
            Next::Dup(epoch, seq) => {
                // The original may still be in flight: answer once it is durable.
                inner.barrier().await?;
                let st = s.state.lock();
                Ok(AppendOutcome::Duplicate {
                    meta: s.meta(&st),
                    epoch,
                    seq,
                })
            }
            Next::AlreadyClosed => {
                inner.barrier().await?;
                let st = s.state.lock();
                Ok(AppendOutcome::AlreadyClosed { meta: s.meta(&st) })
            }
        }
    }

    async fn head(&self, path: &str) -> Result<StreamMeta, StorageError> {
        let s = self.inner.live(path).await?;
        let st = s.state.lock();
        Ok(s.meta(&st))
    }

    async fn read(
        &self,
        path: &str,
        from: ReadFrom,
        max_bytes: usize,
    ) -> Result<ReadChunk, StorageError> {
        let inner = self.inner.clone();
        let s = inner.live(path).await?;
        let (meta, start) = inner.begin_read(&s, from)?;
        let tail = meta.tail.0;
        let max = max_bytes.max(1) as u64;
        let hint = if s.json {
            s.json_mark_at_or_before(tail.min(start.saturating_add(max)))
        } else {
            None
        };
        let s2 = s.clone();
        let small = tail.min(start.saturating_add(max)) - start <= INLINE_READ_BYTES;
        let work = move || -> Result<(u64, Vec<Bytes>), StorageError> {
            let mut end = tail.min(start.saturating_add(max));
            let mut data = Vec::new();
            inner.read_range(&s2, start, end, &mut data)?;
            if s2.json && end < tail {
                // Cut at the last message boundary inside the budget; a
                // single message larger than the budget is returned whole.
                // The scan starts at the latest known boundary (`hint`, from
                // the sparse index) so at most ~16 KiB is scanned per read.
                let from = hint.filter(|h| *h > start && *h <= end).unwrap_or(start);
                let mut sc = BoundaryScanner::default();
                let last =
                    last_boundary(&mut sc, &data, start, from).or((from > start).then_some(from));
                match last {
                    Some(cut) => end = cut,
                    None => {
                        // `end` is inside the first message: continue the
                        // same scan until that message ends.
                        let mut cut = None;
                        while cut.is_none() && end < tail {
                            let next = (end + 64 * 1024).min(tail);
                            let mut more = Vec::new();
                            inner.read_range(&s2, end, next, &mut more)?;
                            let mut base = end;
                            for d in more {
                                if cut.is_none() {
                                    let b = base;
                                    sc.feed(&d, |i| {
                                        cut = Some(b + i as u64);
                                        false
                                    });
                                    data.push(d.clone());
                                }
                                base += d.len() as u64;
                            }
                            end = next;
                        }
                        end = cut.unwrap_or(tail);
                    }
                }
                let mut trimmed = Vec::new();
                let mut at = start;
                for d in data {
                    if at >= end {
                        break;
                    }
                    let take = ((end - at) as usize).min(d.len());
                    trimmed.push(d.slice(..take));
                    at += d.len() as u64;
                }
                data = trimmed;
            }
            Ok((end, data))
        };
        // Small reads (live readers at the tail: typically a few hundred
        // bytes, from the page cache) run inline; handing them to the
        // blocking pool costs more than the read. Large catch-up reads go to
        // the pool so they never stall the runtime.
        let (next, data) = if small {
            work()?
        } else {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| StorageError::Io(e.to_string()))??
        };
        let mut meta = meta;
        if next != tail {
            meta.closed = meta.closed && next == tail;
        }
        if s.json && next > start {
            s.remember_cut(next);
        }
        Ok(ReadChunk {
            meta,
            start: Offset(start),
            next: Offset(next),
            data,
        })
    }

    async fn read_file(
        &self,
        path: &str,
        from: ReadFrom,
        max_bytes: usize,
    ) -> Result<FileRead, StorageError> {
        let s = self.inner.live(path).await?;
        // Bytes below a fork's base live in its source's file: those take
        // the copying path.
        let own_file = match from {
            ReadFrom::Start => s.base == 0,
            ReadFrom::Tail => true,
            ReadFrom::At(o) => o.0 >= s.base,
        };
        if !own_file {
            let chunk = self.read(path, from, max_bytes).await?;
            return Ok(FileRead { chunk, file: None });
        }
        let (mut meta, start) = self.inner.begin_read(&s, from)?;
        let tail = meta.tail.0;
        let mut next = tail.min(start.saturating_add(max_bytes.max(1) as u64));
        if s.json && next < tail {
            // Cut at the last message boundary within the budget, as `read`
            // does; a first message larger than the budget (no boundary in
            // range) takes the copying path, which returns it whole.
            match self.inner.json_cut(&s, start, next)? {
                Some(cut) => next = cut,
                None => {
                    let chunk = self.read(path, from, max_bytes).await?;
                    return Ok(FileRead { chunk, file: None });
                }
            }
        }
        if s.json && next > start {
            s.remember_cut(next);
        }
        if next > s.mem.lock().start {
            // The end of the range is still held in memory (write-behind):
            // the copying path serves it (the same chunk `read` returns, so
            // a reader sees one answer whichever path it takes).
            let chunk = self.read(path, from, max_bytes).await?;
            return Ok(FileRead { chunk, file: None });
        }
        let file = if next > start {
            // Bytes below the memory tail's start are in the file and never
            // rewritten, so the range is stable. Opening may touch the disk (LRU miss), like
            // the small inline reads of `read`.
            let f = self.inner.files.get(s.id, false).map_err(io_err)?;
            Some(FileSlice {
                file: f,
                position: start - s.base,
                len: next - start,
            })
        } else {
            None
        };
        if next != tail {
            meta.closed = false;
        }
        Ok(FileRead {
            chunk: ReadChunk {
                meta,
                start: Offset(start),
                next: Offset(next),
                data: Vec::new(),
            },
            file,
        })
    }

    async fn delete(&self, path: &str) -> Result<(), StorageError> {
        let s = self.inner.live(path).await?;
        self.inner.check_writable()?;
        match self.inner.remove_live(path, &s, false) {
            Some(rx) => await_ack(rx).await,
            None => Err(StorageError::NotFound),
        }
    }

    async fn watch(&self, path: &str) -> Result<watch::Receiver<Signal>, StorageError> {
        let s = self.inner.live(path).await?;
        Ok(s.signal.subscribe())
    }

    async fn watch_accepted(&self, path: &str) -> Result<watch::Receiver<Signal>, StorageError> {
        let s = self.inner.live(path).await?;
        let tx = s
            .accepted
            .get_or_init(|| watch::Sender::new(FStream::accepted_signal(&s.state.lock())));
        Ok(tx.subscribe())
    }

    async fn list_paths(&self) -> Vec<String> {
        let now = self.inner.clock.now_ms();
        self.inner
            .registry
            .read()
            .iter()
            .filter(|(_, s)| {
                let st = s.state.lock();
                st.created && !st.soft_deleted && !is_expired(&st, now)
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    async fn sweep_expired(&self) -> usize {
        let now = self.inner.clock.now_ms();
        let expired: Vec<(String, Arc<FStream>)> = self
            .inner
            .registry
            .read()
            .iter()
            .filter(|(_, s)| is_expired(&s.state.lock(), now))
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect();
        for (p, s) in &expired {
            let _ = self.inner.remove_live(p, s, true);
        }
        expired.len()
    }

    fn metrics(&self) -> Vec<(&'static str, &'static str, u64)> {
        let st = &self.inner.stats;
        vec![
            (
                "ds_wal_syncs_total",
                "WAL fdatasync calls (one per group commit)",
                st.wal_syncs.load(Ordering::Relaxed),
            ),
            (
                "ds_wal_records_total",
                "WAL records committed",
                st.records.load(Ordering::Relaxed),
            ),
            (
                "ds_checkpoints_total",
                "Checkpoints written",
                st.checkpoints.load(Ordering::Relaxed),
            ),
            (
                "ds_open_data_files",
                "Data files currently open",
                self.open_files() as u64,
            ),
            (
                "ds_streams",
                "Addressable streams",
                self.inner.registry.read().len() as u64,
            ),
            (
                "ds_store_failed",
                "1 once a write or sync failed (store refuses writes)",
                self.inner.poisoned_flag.load(Ordering::Acquire) as u64,
            ),
            (
                "ds_unflushed_bytes",
                "Durable bytes held in memory, not yet written to data files (write-behind)",
                st.unflushed_bytes.load(Ordering::Relaxed),
            ),
            (
                "ds_data_flushes_total",
                "Writes of held bytes to data files (one per stream per flush)",
                st.data_flushes.load(Ordering::Relaxed),
            ),
            (
                "ds_disk_bytes",
                "Bytes of the data directory's WAL, checkpoint and data files (apparent size, kept by the engine)",
                st.disk_bytes(),
            ),
        ]
    }

    fn histograms(&self) -> Vec<HistogramSnapshot> {
        let st = &self.inner.stats;
        vec![
            st.wal_sync_ns.snapshot(
                "ds_wal_fsync_duration_seconds",
                "Duration of each WAL fdatasync (one per group commit)",
                1e-9,
            ),
            st.batch_records.snapshot(
                "ds_wal_batch_records",
                "Records made durable by one WAL sync (group-commit batch size)",
                1.0,
            ),
            st.batch_bytes.snapshot(
                "ds_wal_batch_bytes",
                "WAL bytes made durable by one WAL sync",
                1.0,
            ),
        ]
    }

    async fn shutdown(&self) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.close()).await;
    }
}
