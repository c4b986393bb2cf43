//! Header names used by the protocol, lower-case as HTTP/2 sends them.

pub const STREAM_NEXT_OFFSET: &str = "stream-next-offset";
pub const STREAM_UP_TO_DATE: &str = "stream-up-to-date";
pub const STREAM_CURSOR: &str = "stream-cursor";
pub const STREAM_CLOSED: &str = "stream-closed";
pub const STREAM_SEQ: &str = "stream-seq";
pub const STREAM_TTL: &str = "stream-ttl";
pub const STREAM_EXPIRES_AT: &str = "stream-expires-at";
pub const STREAM_FORKED_FROM: &str = "stream-forked-from";
pub const STREAM_FORK_OFFSET: &str = "stream-fork-offset";
pub const STREAM_FORK_SUB_OFFSET: &str = "stream-fork-sub-offset";
pub const STREAM_SSE_DATA_ENCODING: &str = "stream-sse-data-encoding";
pub const PRODUCER_ID: &str = "producer-id";
pub const PRODUCER_EPOCH: &str = "producer-epoch";
pub const PRODUCER_SEQ: &str = "producer-seq";
pub const PRODUCER_EXPECTED_SEQ: &str = "producer-expected-seq";
pub const PRODUCER_RECEIVED_SEQ: &str = "producer-received-seq";
/// Not a protocol header: the server's request id (echoed or generated),
/// listed so browsers may send and read it.
pub const REQUEST_ID: &str = "x-request-id";

/// Every protocol header a browser client may send (CORS allow list).
pub const REQUEST_HEADERS: &[&str] = &[
    "content-type",
    "authorization",
    "if-none-match",
    "cache-control",
    "last-event-id",
    STREAM_SEQ,
    STREAM_TTL,
    STREAM_EXPIRES_AT,
    STREAM_CLOSED,
    STREAM_FORKED_FROM,
    STREAM_FORK_OFFSET,
    STREAM_FORK_SUB_OFFSET,
    PRODUCER_ID,
    PRODUCER_EPOCH,
    PRODUCER_SEQ,
    REQUEST_ID,
];

/// Every protocol header a browser client must be able to read (CORS expose list).
pub const RESPONSE_HEADERS: &[&str] = &[
    STREAM_NEXT_OFFSET,
    STREAM_UP_TO_DATE,
    STREAM_CURSOR,
    STREAM_CLOSED,
    STREAM_TTL,
    STREAM_EXPIRES_AT,
    STREAM_SSE_DATA_ENCODING,
    PRODUCER_EPOCH,
    PRODUCER_SEQ,
    PRODUCER_EXPECTED_SEQ,
    PRODUCER_RECEIVED_SEQ,
    "etag",
    "location",
    "content-type",
    "retry-after",
    REQUEST_ID,
];
