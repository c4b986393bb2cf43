//! The protocol's write rules, shared by every engine so they cannot drift:
//! closure, content type, idempotent producers and `Stream-Seq`
//! (PROTOCOL.md 5.2 and 5.2.1), and idempotent re-creation (5.1).

use crate::memory::{check_producer, ProducerCheck, ProducerState};
use crate::{AppendRequest, CreateRequest, Expiry, ForkSpec, StorageError};
use durable_streams_protocol::{parse::same_media_type, Offset};
use std::collections::HashMap;

/// Writer-side state of one stream.
#[derive(Debug, Clone, Default)]
pub struct WriterState {
    pub closed: bool,
    /// The producer tuple whose request closed the stream.
    pub closed_by: Option<(String, u64, u64)>,
    pub producers: HashMap<String, ProducerState>,
    pub last_stream_seq: Option<String>,
}

/// What an append does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Commit it (then call [`WriterState::apply`]).
    Apply,
    /// An idempotent producer's retry: answer 204 with this `(epoch, seq)`.
    Duplicate { epoch: u64, seq: u64 },
    /// Close-only request on a closed stream: 204.
    AlreadyClosed,
}

impl WriterState {
    /// Decides an append against this state, in the spec's precedence:
    /// closed, content type, producer, `Stream-Seq` (scoped per stream).
    pub fn decide(
        &self,
        content_type: &str,
        tail: u64,
        req: &AppendRequest,
    ) -> Result<Decision, StorageError> {
        if self.closed {
            if let (Some(p), Some((id, e, q))) = (&req.producer, &self.closed_by) {
                if &p.id == id && p.epoch == *e && p.seq == *q {
                    return Ok(Decision::Duplicate { epoch: *e, seq: *q });
                }
            }
            if req.records.is_empty() && req.close {
                return Ok(Decision::AlreadyClosed);
            }
            return Err(StorageError::Closed { tail: Offset(tail) });
        }
        if !req.records.is_empty()
            && !same_media_type(req.content_type.as_deref().unwrap_or(""), content_type)
        {
            return Err(StorageError::ContentTypeMismatch);
        }
        if let Some(p) = &req.producer {
            if let ProducerCheck::Duplicate { epoch, last_seq } =
                check_producer(self.producers.get(&p.id).copied(), p.epoch, p.seq)?
            {
                return Ok(Decision::Duplicate {
                    epoch,
                    seq: last_seq,
                });
            }
        }
        if let Some(seq) = &req.stream_seq {
            if self
                .last_stream_seq
                .as_ref()
                .is_some_and(|last| seq.as_bytes() <= last.as_bytes())
            {
                return Err(StorageError::SeqRegression);
            }
        }
        Ok(Decision::Apply)
    }

    /// Records the writer effects of an applied append; returns the
    /// accepted producer `(epoch, seq)`.
    pub fn apply(&mut self, req: &AppendRequest) -> Option<(u64, u64)> {
        let mut accepted = None;
        if let Some(p) = &req.producer {
            self.producers.insert(
                p.id.clone(),
                ProducerState {
                    epoch: p.epoch,
                    last_seq: p.seq,
                },
            );
            if req.close {
                self.closed_by = Some((p.id.clone(), p.epoch, p.seq));
            }
            accepted = Some((p.epoch, p.seq));
        }
        if let Some(seq) = &req.stream_seq {
            self.last_stream_seq = Some(seq.clone());
        }
        self.closed |= req.close;
        accepted
    }
}

/// Idempotent re-creation: does `req` describe the existing stream?
/// (Content type case-insensitively, the requested expiry, closure status,
/// and for forks the same source, offset and sub-offset.)
pub fn same_config(
    content_type: &str,
    requested_expiry: &Expiry,
    fork: &Option<ForkSpec>,
    closed: bool,
    req: &CreateRequest,
) -> bool {
    let ct_matches = match &req.content_type {
        Some(ct) => same_media_type(ct, content_type),
        None => fork.is_some() || same_media_type(content_type, "application/octet-stream"),
    };
    ct_matches && *requested_expiry == req.expiry && closed == req.closed && *fork == req.fork
}
