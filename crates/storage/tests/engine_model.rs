//! The engine against a simple reference model: random sequences of
//! creates, appends (plain, idempotent-producer, Stream-Seq, closing),
//! forks, deletes and chunked reads must give the same outcomes and bytes
//! as a model that stores each stream as one plain `Vec<u8>`.
//!
//! `check_engine` is generic so every engine runs the same suite.

use bytes::Bytes;
use durable_streams_protocol::{parse::ProducerHeaders, Offset};
use durable_streams_storage::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

const PATHS: usize = 4;
const PRODUCERS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    Create {
        s: usize,
        closed: bool,
        initial: Vec<u8>,
        ttl: bool,
    },
    Append {
        s: usize,
        data: Vec<u8>,
        close: bool,
        producer: Option<(usize, u64, u64)>,
        seq: Option<u8>,
    },
    Fork {
        src: usize,
        dst: usize,
        at: Option<u8>,
        sub: u8,
    },
    Delete {
        s: usize,
    },
    Read {
        s: usize,
        from: u8,
        max: usize,
    },
    /// Restart the engine (clean, or after a simulated power cut).
    Restart {
        crash: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let data = proptest::collection::vec(any::<u8>(), 0..12);
    prop_oneof![
        1 => (0..PATHS, any::<bool>(), data.clone(), any::<bool>())
            .prop_map(|(s, closed, initial, ttl)| Op::Create { s, closed: closed && initial.len() % 3 == 0, initial, ttl }),
        4 => (0..PATHS, data, any::<bool>(), proptest::option::of((0..PRODUCERS, 0u64..3, 0u64..4)), proptest::option::of(0u8..6))
            .prop_map(|(s, data, close, producer, seq)| Op::Append { s, data, close: close && seq.is_none(), producer, seq }),
        1 => (0..PATHS, 0..PATHS, proptest::option::of(any::<u8>()), 0u8..3)
            .prop_map(|(src, dst, at, sub)| Op::Fork { src, dst, at, sub }),
        1 => (0..PATHS).prop_map(|s| Op::Delete { s }),
        2 => (0..PATHS, any::<u8>(), 1usize..8).prop_map(|(s, from, max)| Op::Read { s, from, max }),
        1 => any::<bool>().prop_map(|crash| Op::Restart { crash }),
    ]
}

#[derive(Debug, Clone)]
struct MStream {
    data: Vec<u8>,
    closed: bool,
    closed_by: Option<(usize, u64, u64)>,
    producers: HashMap<usize, (u64, u64)>,
    last_seq: Option<u8>,
    ttl: bool,
    /// Source stream id and fork config, for idempotent re-creation.
    fork: Option<(usize, Option<u8>, u8)>,
    source: Option<usize>,
    forks: usize,
    soft_deleted: bool,
}

/// Model: streams by id; paths map to ids (a soft-deleted stream keeps its path).
#[derive(Default)]
struct Model {
    streams: Vec<MStream>,
    paths: HashMap<usize, usize>,
}

impl Model {
    fn live(&self, s: usize) -> Result<usize, StorageError> {
        let id = *self.paths.get(&s).ok_or(StorageError::NotFound)?;
        if self.streams[id].soft_deleted {
            return Err(StorageError::Gone);
        }
        Ok(id)
    }

    fn remove(&mut self, path: usize) {
        let mut path = Some(path);
        while let Some(p) = path.take() {
            let id = self.paths[&p];
            if self.streams[id].forks > 0 {
                self.streams[id].soft_deleted = true;
                return;
            }
            self.paths.remove(&p);
            if let Some(src) = self.streams[id].source {
                self.streams[src].forks -= 1;
                if self.streams[src].forks == 0 && self.streams[src].soft_deleted {
                    path = self.paths.iter().find(|(_, v)| **v == src).map(|(k, _)| *k);
                }
            }
        }
    }
}

fn path(s: usize) -> String {
    format!("stream-{s}")
}

/// Offsets used by the tests: a position, clamped into the stream.
fn pos(len: usize, at: u8) -> u64 {
    (at as usize % (len + 1)) as u64
}

async fn read_all(e: &dyn Engine, p: &str) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    let mut from = ReadFrom::Start;
    loop {
        let c = e.read(p, from, 5).await?;
        for d in &c.data {
            out.extend_from_slice(d);
        }
        if c.up_to_date() {
            return Ok(out);
        }
        assert!(
            !c.is_empty(),
            "a read that is not up to date must make progress"
        );
        from = ReadFrom::At(c.next);
    }
}

/// An engine under test that can be restarted.
trait Harness {
    fn engine(&self) -> Arc<dyn Engine>;
    /// Restarts; `crash` simulates a power cut (unsynced writes lost).
    fn restart(&mut self, crash: bool);
}

struct Memory(Arc<dyn Engine>);
impl Harness for Memory {
    fn engine(&self) -> Arc<dyn Engine> {
        self.0.clone()
    }
    fn restart(&mut self, _crash: bool) {} // nothing survives; not modelled
}

struct File {
    vfs: Arc<file::sim::SimVfs>,
    engine: FileEngine,
}
impl File {
    fn open(vfs: Arc<file::sim::SimVfs>) -> Self {
        let opts = FileOptions {
            max_open_files: 3,
            // Streams pass a few bytes from memory to their files now and
            // then, so reads meet both and the boundary between them.
            data_flush_stream_bytes: 16,
            ..FileOptions::default()
        };
        let engine =
            FileEngine::open_with("/db", opts, vfs.clone(), Arc::new(SystemClock)).expect("open");
        File { vfs, engine }
    }
}
impl Harness for File {
    fn engine(&self) -> Arc<dyn Engine> {
        Arc::new(self.engine.clone())
    }
    fn restart(&mut self, crash: bool) {
        let next = if crash {
            Arc::new(self.vfs.crash(|_, _| 0))
        } else {
            self.vfs.clone()
        };
        self.engine.close();
        *self = File::open(next);
    }
}

async fn check_engine(h: &mut dyn Harness, ops: Vec<Op>) {
    let mut m = Model::default();
    for op in ops {
        let engine = h.engine();
        match op {
            Op::Restart { crash } => h.restart(crash),
            Op::Create {
                s,
                closed,
                initial,
                ttl,
            } => {
                let req = CreateRequest {
                    content_type: Some("application/octet-stream".into()),
                    expiry: if ttl {
                        Expiry::TtlSecs(3600)
                    } else {
                        Expiry::Never
                    },
                    closed,
                    json: false,
                    records: vec![Bytes::from(initial.clone())],
                    fork: None,
                };
                let got = engine.create(&path(s), req).await;
                let want = match m.paths.get(&s).copied() {
                    Some(id) => {
                        let st = &m.streams[id];
                        if !st.soft_deleted
                            && st.fork.is_none()
                            && st.closed == closed
                            && st.ttl == ttl
                        {
                            Ok(false)
                        } else {
                            Err(StorageError::ConfigMismatch)
                        }
                    }
                    None => {
                        m.streams.push(MStream {
                            data: initial,
                            closed,
                            closed_by: None,
                            producers: HashMap::new(),
                            last_seq: None,
                            ttl,
                            fork: None,
                            source: None,
                            forks: 0,
                            soft_deleted: false,
                        });
                        m.paths.insert(s, m.streams.len() - 1);
                        Ok(true)
                    }
                };
                match (got, want) {
                    (Ok(CreateOutcome::Created(_)), Ok(true))
                    | (Ok(CreateOutcome::Existed(_)), Ok(false)) => {}
                    (Err(g), Err(w)) => assert_eq!(g, w),
                    (g, w) => panic!("create {s}: engine {g:?}, model {w:?}"),
                }
            }
            Op::Append {
                s,
                data,
                close,
                producer,
                seq,
            } => {
                let req = AppendRequest {
                    content_type: Some("application/octet-stream".into()),
                    records: if data.is_empty() {
                        vec![]
                    } else {
                        vec![Bytes::from(data.clone())]
                    },
                    close: close || data.is_empty(),
                    producer: producer.map(|(id, epoch, seq)| ProducerHeaders {
                        id: format!("p{id}"),
                        epoch,
                        seq,
                    }),
                    stream_seq: seq.map(|q| format!("{q}")),
                };
                let close = req.close;
                let got = engine.append(&path(s), req).await;
                let want = (|| {
                    let id = m.live(s)?;
                    let st = &mut m.streams[id];
                    if st.closed {
                        if producer.is_some() && producer == st.closed_by {
                            return Ok("dup");
                        }
                        if data.is_empty() && close {
                            return Ok("already-closed");
                        }
                        return Err(StorageError::Closed {
                            tail: Offset(st.data.len() as u64),
                        });
                    }
                    if let Some((pid, epoch, pseq)) = producer {
                        match st.producers.get(&pid).copied() {
                            None if pseq != 0 => {
                                return Err(StorageError::SeqGap {
                                    expected: 0,
                                    received: pseq,
                                })
                            }
                            None => {}
                            Some((e, _)) if epoch < e => {
                                return Err(StorageError::StaleEpoch { current: e })
                            }
                            Some((e, _)) if epoch > e && pseq != 0 => {
                                return Err(StorageError::EpochSeqNotZero)
                            }
                            Some((e, _)) if epoch > e => {}
                            Some((_, last)) if pseq <= last => return Ok("dup"),
                            Some((_, last)) if pseq != last + 1 => {
                                return Err(StorageError::SeqGap {
                                    expected: last + 1,
                                    received: pseq,
                                })
                            }
                            Some(_) => {}
                        }
                    }
                    if let (Some(q), Some(last)) = (seq, st.last_seq) {
                        if format!("{q}") <= format!("{last}") {
                            return Err(StorageError::SeqRegression);
                        }
                    }
                    st.data.extend_from_slice(&data);
                    if let Some((pid, epoch, pseq)) = producer {
                        st.producers.insert(pid, (epoch, pseq));
                        if close {
                            st.closed_by = Some((pid, epoch, pseq));
                        }
                    }
                    if seq.is_some() {
                        st.last_seq = seq;
                    }
                    st.closed |= close;
                    Ok("applied")
                })();
                match (&got, want) {
                    (Ok(AppendOutcome::Applied { .. }), Ok("applied"))
                    | (Ok(AppendOutcome::Duplicate { .. }), Ok("dup"))
                    | (Ok(AppendOutcome::AlreadyClosed { .. }), Ok("already-closed")) => {}
                    (Err(g), Err(w)) => assert_eq!(g, &w),
                    (g, w) => panic!("append {s}: engine {g:?}, model {w:?}"),
                }
            }
            Op::Fork { src, dst, at, sub } => {
                let spec = ForkSpec {
                    source: path(src),
                    offset: None,
                    sub_offset: sub as u64,
                };
                let (want, spec) = (|| {
                    let mut spec = spec;
                    let sid = match m.live(src) {
                        Ok(id) => id,
                        Err(StorageError::NotFound) => {
                            return (Err(StorageError::ForkSourceNotFound), spec)
                        }
                        Err(_) => return (Err(StorageError::ForkSourceGone), spec),
                    };
                    let len = m.streams[sid].data.len();
                    let anchor = at.map(|a| pos(len, a)).unwrap_or(len as u64);
                    spec.offset = at.map(|_| Offset(anchor));
                    (Ok((sid, anchor + sub as u64, len)), spec)
                })();
                let got = engine
                    .create(
                        &path(dst),
                        CreateRequest {
                            content_type: None,
                            fork: Some(spec),
                            ..Default::default()
                        },
                    )
                    .await;
                // Existing target: the model only checks the outcome class.
                if let Some(id) = m.paths.get(&dst).copied() {
                    let st = &m.streams[id];
                    let same = !st.soft_deleted
                        && st.fork
                            == Some((
                                src,
                                at.map(|a| {
                                    pos(
                                        m.streams[m.paths.get(&src).copied().unwrap_or(id)]
                                            .data
                                            .len(),
                                        a,
                                    ) as u8
                                }),
                                sub,
                            ));
                    match got {
                        Ok(CreateOutcome::Existed(_)) | Err(StorageError::ConfigMismatch) => {}
                        Ok(CreateOutcome::Created(_)) => {
                            panic!("fork over an existing path created a stream")
                        }
                        Err(_) if !same => {}
                        Err(e) => panic!("fork {src}->{dst}: {e:?}"),
                    }
                    continue;
                }
                match (got, want) {
                    (Ok(CreateOutcome::Created(meta)), Ok((sid, point, len))) => {
                        assert!(point <= len as u64, "engine accepted a fork past the tail");
                        assert_eq!(meta.tail, Offset(point));
                        let data = m.streams[sid].data[..point as usize].to_vec();
                        let ttl = m.streams[sid].ttl;
                        m.streams[sid].forks += 1;
                        m.streams.push(MStream {
                            data,
                            closed: false,
                            closed_by: None,
                            producers: HashMap::new(),
                            last_seq: None,
                            ttl,
                            fork: Some((src, None, sub)),
                            source: Some(sid),
                            forks: 0,
                            soft_deleted: false,
                        });
                        m.paths.insert(dst, m.streams.len() - 1);
                    }
                    (Err(StorageError::ForkSubOffsetOvershoot), Ok((_, point, len))) => {
                        assert!(point > len as u64)
                    }
                    (Err(g), Err(w)) => assert_eq!(g, w),
                    (g, w) => panic!("fork {src}->{dst}: engine {g:?}, model {w:?}"),
                }
            }
            Op::Delete { s } => {
                let got = engine.delete(&path(s)).await;
                let want = m.live(s);
                match (got, want) {
                    (Ok(()), Ok(_)) => m.remove(s),
                    (Err(g), Err(w)) => assert_eq!(g, w),
                    (g, w) => panic!("delete {s}: engine {g:?}, model {w:?}"),
                }
            }
            Op::Read { s, from, max } => {
                let want = m.live(s).map(|id| m.streams[id].data.clone());
                let whole = read_all(engine.as_ref(), &path(s)).await;
                match (&whole, &want) {
                    (Ok(g), Ok(w)) => assert_eq!(g, w, "stream {s} bytes differ"),
                    (Err(g), Err(w)) => assert_eq!(g, w),
                    (g, w) => panic!("read {s}: engine {g:?}, model {w:?}"),
                }
                if let Ok(w) = want {
                    let at = pos(w.len(), from);
                    let c = engine
                        .read(&path(s), ReadFrom::At(Offset(at)), max)
                        .await
                        .expect("read at a valid offset");
                    let got: Vec<u8> = c.data.iter().flat_map(|d| d.iter().copied()).collect();
                    let end = (at as usize + max).min(w.len());
                    assert_eq!(
                        got,
                        w[at as usize..end].to_vec(),
                        "read {s} at {at} max {max}"
                    );
                    assert_eq!(c.next, Offset(end as u64));
                    assert_eq!(c.up_to_date(), end == w.len());
                    // The same range through `read_file`: bytes left in a
                    // file slice or returned as data are the same bytes.
                    let fr = engine
                        .read_file(&path(s), ReadFrom::At(Offset(at)), max)
                        .await
                        .expect("read_file at a valid offset");
                    let got = match &fr.file {
                        Some(slice) => {
                            assert!(fr.chunk.data.is_empty(), "file slice and data both set");
                            assert_eq!(slice.len(), fr.chunk.len());
                            slice
                                .read_all()
                                .expect("file slice shorter than its length")
                        }
                        None => fr
                            .chunk
                            .data
                            .iter()
                            .flat_map(|d| d.iter().copied())
                            .collect(),
                    };
                    assert_eq!(fr.chunk.start, Offset(at));
                    assert_eq!(
                        got,
                        w[at as usize..fr.chunk.next.0 as usize].to_vec(),
                        "read_file {s} at {at}"
                    );
                    assert_eq!(
                        fr.chunk.next,
                        Offset(end as u64),
                        "read_file {s} at {at} max {max}"
                    );
                    assert_eq!(fr.chunk.up_to_date(), c.up_to_date());
                    assert_eq!(fr.chunk.meta.closed, c.meta.closed);
                    let beyond = engine
                        .read(&path(s), ReadFrom::At(Offset(w.len() as u64 + 1)), max)
                        .await;
                    assert_eq!(beyond.err(), Some(StorageError::OffsetBeyondTail));
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]

    /// The in-memory engine behaves like the reference model.
    #[test]
    fn memory_engine_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check_engine(&mut Memory(Arc::new(MemoryEngine::new())), ops));
    }

    /// The file engine behaves like the model, across clean restarts and
    /// simulated power cuts (every acknowledged operation survives).
    #[test]
    fn file_engine_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut h = File::open(Arc::new(file::sim::SimVfs::new()));
        rt.block_on(check_engine(&mut h, ops));
        h.engine.close();
    }
}
