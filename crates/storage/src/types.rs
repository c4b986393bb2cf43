use bytes::Bytes;
use chrono::{DateTime, Utc};
use durable_streams_protocol::{parse::ProducerHeaders, Offset};

/// Expiry policy of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Expiry {
    #[default]
    Never,
    /// Sliding window: expires this many seconds after the last read or write.
    TtlSecs(u64),
    /// Absolute deadline.
    At(DateTime<Utc>),
}

/// Where a fork branches off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkSpec {
    /// Stream path of the source, relative to the same root as the fork.
    pub source: String,
    /// Divergence point; `None` means the source's tail.
    pub offset: Option<Offset>,
    /// Records (JSON) or bytes past `offset` also inherited.
    pub sub_offset: u64,
}

#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// `None` only for forks, which then inherit the source's type.
    pub content_type: Option<String>,
    pub expiry: Expiry,
    pub closed: bool,
    /// JSON mode: each record is one message and records are atomic.
    pub json: bool,
    /// Initial records (already framed by the caller).
    pub records: Vec<Bytes>,
    pub fork: Option<ForkSpec>,
}

#[derive(Debug, Clone)]
pub enum CreateOutcome {
    Created(StreamMeta),
    /// The stream already existed with the same configuration.
    Existed(StreamMeta),
}

#[derive(Debug, Clone, Default)]
pub struct AppendRequest {
    /// The request's content type; checked against the stream's only when
    /// `records` is non-empty.
    pub content_type: Option<String>,
    /// Records to append; empty for a close-only request.
    pub records: Vec<Bytes>,
    pub close: bool,
    pub producer: Option<ProducerHeaders>,
    pub stream_seq: Option<String>,
}

#[derive(Debug, Clone)]
pub enum AppendOutcome {
    /// New data (or a new close) was committed.
    Applied {
        meta: StreamMeta,
        /// `(epoch, seq)` accepted for an idempotent producer.
        producer: Option<(u64, u64)>,
    },
    /// An idempotent producer retried something already committed.
    Duplicate {
        meta: StreamMeta,
        epoch: u64,
        seq: u64,
    },
    /// Close-only request on an already closed stream.
    AlreadyClosed { meta: StreamMeta },
}

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    Start,
    Tail,
    At(Offset),
}

/// A snapshot of a stream's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMeta {
    /// Unique per created stream, never reused (ETags carry it).
    pub incarnation: u64,
    pub content_type: String,
    pub json: bool,
    pub tail: Offset,
    pub closed: bool,
    pub expiry: Expiry,
    /// Unix ms at which the stream expires, if it can.
    pub expires_at_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ReadChunk {
    pub meta: StreamMeta,
    pub start: Offset,
    /// Offset after the returned data.
    pub next: Offset,
    /// The data, in order; concatenated it is exactly the stored bytes of
    /// `start..next`.
    pub data: Vec<Bytes>,
}

impl ReadChunk {
    pub fn len(&self) -> u64 {
        self.next.0 - self.start.0
    }
    pub fn is_empty(&self) -> bool {
        self.next == self.start
    }
    /// True when the chunk reaches the tail as it was when read.
    pub fn up_to_date(&self) -> bool {
        self.next == self.meta.tail
    }
}

/// Stored bytes of a byte stream as a range of an open file, for sending
/// without copying them through user space (`sendfile`). The range is below
/// the stream's published tail, so it never changes; the file stays open
/// (even if the stream is deleted meanwhile) while this is held.
#[derive(Clone)]
pub struct FileSlice {
    pub(crate) file: std::sync::Arc<dyn crate::file::vfs::VfsFile>,
    /// Position of the first byte in the file.
    pub(crate) position: u64,
    pub(crate) len: u64,
}

impl FileSlice {
    /// The file's descriptor (`None` for simulated files: read the bytes
    /// with [`FileSlice::read_at`] instead).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.file.fd()
    }
    /// Position of the first byte in the file.
    pub fn position(&self) -> u64 {
        self.position
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The first `len` bytes of this slice (all of it if `len` is larger).
    pub fn truncated(&self, len: u64) -> FileSlice {
        FileSlice {
            file: self.file.clone(),
            position: self.position,
            len: len.min(self.len),
        }
    }
    /// Reads `buf.len()` bytes of the slice starting `at` bytes into it (a
    /// positional read; for tests and fallbacks).
    pub fn read_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(at)) as usize;
        self.file.read_at(&mut buf[..n], self.position + at)
    }
    /// Every byte of the slice (for tests and small fallbacks); an error
    /// if the file is shorter than the slice.
    pub fn read_all(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.len as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], done as u64)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file slice shorter than its length",
                ));
            }
            done += n;
        }
        Ok(buf)
    }
}

impl std::fmt::Debug for FileSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSlice")
            .field("position", &self.position)
            .field("len", &self.len)
            .finish()
    }
}

/// A read whose bytes may be left in a file ([`Engine::read_file`]).
#[derive(Debug, Clone)]
pub struct FileRead {
    /// Metadata and offsets; when `file` is set, `chunk.data` is empty and
    /// the bytes `chunk.start..chunk.next` are the file slice.
    pub chunk: ReadChunk,
    pub file: Option<FileSlice>,
}

/// State published to live readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal {
    pub tail: Offset,
    pub closed: bool,
    /// Deleted or expired: waiters must answer at once.
    pub gone: bool,
}

impl Signal {
    /// Stores this as `tx`'s value; wakes its watchers only if it has any.
    /// `send_replace` locks each of the channel's eight wait lists even
    /// with no receiver (~2% of the server's CPU on appends to 256 streams
    /// no one reads live). Skipping the wake-up is safe: the value is
    /// stored either way, and a receiver subscribing after the count was
    /// read sees it when it first borrows.
    pub(crate) fn publish(self, tx: &tokio::sync::watch::Sender<Signal>) {
        tx.send_if_modified(|v| {
            *v = self;
            tx.receiver_count() > 0
        });
    }
}
