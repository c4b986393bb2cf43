use durable_streams_protocol::Offset;

/// Everything an engine operation can refuse. The server maps each variant
/// to one status code in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("stream not found")]
    NotFound,
    #[error("stream was deleted and is retained only for its forks")]
    Gone,
    #[error("stream already exists with a different configuration")]
    ConfigMismatch,
    #[error("stream is closed")]
    Closed { tail: Offset },
    #[error("content type does not match the stream's content type")]
    ContentTypeMismatch,
    #[error("Stream-Seq must be greater than the last sequence on this stream")]
    SeqRegression,
    #[error("stale producer epoch")]
    StaleEpoch { current: u64 },
    #[error("a new producer epoch must start at Producer-Seq 0")]
    EpochSeqNotZero,
    #[error("producer sequence gap")]
    SeqGap { expected: u64, received: u64 },
    #[error("fork source stream not found")]
    ForkSourceNotFound,
    #[error("fork source stream was deleted")]
    ForkSourceGone,
    #[error("fork offset is beyond the source stream's tail")]
    ForkOffsetBeyondTail,
    #[error("fork sub-offset is past the next data boundary")]
    ForkSubOffsetOvershoot,
    #[error("offset is beyond the stream's tail")]
    OffsetBeyondTail,
    #[error("offset is not a message boundary of this stream")]
    OffsetNotAligned,
    #[error("stream exceeds the maximum size")]
    StreamTooLarge,
    #[error("too many writes queued; retry later")]
    Overloaded,
    #[error("storage is full")]
    StorageFull,
    #[error("storage failed: {0}")]
    Io(String),
}
