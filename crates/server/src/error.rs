//! The one place where errors become HTTP responses.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use durable_streams_protocol::{headers as h, ProtocolError};
use durable_streams_storage::StorageError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
    #[error("request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(u64),
    #[error("too many live readers; retry later")]
    TooManyReaders,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("server is shutting down")]
    ShuttingDown,
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }

    pub fn status(&self) -> StatusCode {
        use StorageError as S;
        match self {
            ApiError::Protocol(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyReaders | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Storage(e) => match e {
                S::NotFound | S::ForkSourceNotFound => StatusCode::NOT_FOUND,
                S::Gone => StatusCode::GONE,
                S::ConfigMismatch
                | S::Closed { .. }
                | S::ContentTypeMismatch
                | S::SeqRegression
                | S::SeqGap { .. }
                | S::ForkSourceGone => StatusCode::CONFLICT,
                S::StaleEpoch { .. } => StatusCode::FORBIDDEN,
                S::EpochSeqNotZero
                | S::ForkOffsetBeyondTail
                | S::ForkSubOffsetOvershoot
                | S::OffsetBeyondTail
                | S::OffsetNotAligned => StatusCode::BAD_REQUEST,
                S::StreamTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                S::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
                S::Io(_) | S::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut resp = (
            status,
            [("content-type", "text/plain; charset=utf-8")],
            format!("{self}\n"),
        )
            .into_response();
        let hs = resp.headers_mut();
        let num = |n: u64| HeaderValue::from(n);
        match &self {
            ApiError::Storage(StorageError::Closed { tail }) => {
                hs.insert(h::STREAM_CLOSED, HeaderValue::from_static("true"));
                if let Ok(v) = HeaderValue::from_str(&tail.to_string()) {
                    hs.insert(h::STREAM_NEXT_OFFSET, v);
                }
            }
            ApiError::Storage(StorageError::StaleEpoch { current }) => {
                hs.insert(h::PRODUCER_EPOCH, num(*current));
            }
            ApiError::Storage(StorageError::SeqGap { expected, received }) => {
                hs.insert(h::PRODUCER_EXPECTED_SEQ, num(*expected));
                hs.insert(h::PRODUCER_RECEIVED_SEQ, num(*received));
            }
            ApiError::TooManyReaders
            | ApiError::ShuttingDown
            | ApiError::Storage(StorageError::Io(_) | StorageError::Overloaded) => {
                hs.insert("retry-after", HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}
