//! Prometheus text exposition at `GET /metrics`.
//!
//! Everything counted per request is a relaxed atomic in a preallocated
//! table: no lock, no allocation and no string formatting on the request
//! path. Text is produced only when `/metrics` is scraped. Histograms are
//! the storage crate's fixed-bucket [`Histogram`] (hand-written for the
//! same reason: a generic metrics crate would cost a label lookup per
//! observation).

use axum::http::{HeaderMap, Method, Uri};
use durable_streams_protocol::{headers as h, parse};
use durable_streams_storage::metrics::LATENCY_BUCKETS_NS;
use durable_streams_storage::{Histogram, HistogramSnapshot};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a request under the stream prefix does, derived cheaply from its
/// method, query and headers (the `operation` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Append,
    Read,
    ReadLiveLongPoll,
    ReadSse,
    Head,
    Delete,
    /// An append with `Stream-Closed: true` (with or without data).
    Close,
    /// A create with `Stream-Forked-From`.
    Fork,
    /// The reserved `__ds/...` subscription API.
    Subscription,
    /// Anything else (unknown methods, paths outside the prefix).
    Other,
}

impl Operation {
    pub const ALL: [Operation; 11] = [
        Operation::Create,
        Operation::Append,
        Operation::Read,
        Operation::ReadLiveLongPoll,
        Operation::ReadSse,
        Operation::Head,
        Operation::Delete,
        Operation::Close,
        Operation::Fork,
        Operation::Subscription,
        Operation::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Append => "append",
            Operation::Read => "read",
            Operation::ReadLiveLongPoll => "read_live_longpoll",
            Operation::ReadSse => "read_sse",
            Operation::Head => "head",
            Operation::Delete => "delete",
            Operation::Close => "close",
            Operation::Fork => "fork",
            Operation::Subscription => "subscription",
            Operation::Other => "other",
        }
    }

    /// Classifies a request. Allocation-free: a prefix check on the path,
    /// a scan of the query for `live=`, one or two header lookups. A
    /// percent-encoded `__ds` segment is classified by method like a
    /// stream path (the label is for dashboards, not for routing).
    pub fn classify(prefix: &str, method: &Method, uri: &Uri, headers: &HeaderMap) -> Operation {
        let Some(rest) = uri
            .path()
            .strip_prefix(prefix.trim_end_matches('/'))
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Operation::Other;
        };
        if rest == "__ds" || rest.starts_with("__ds/") {
            return Operation::Subscription;
        }
        match *method {
            Method::PUT if headers.contains_key(h::STREAM_FORKED_FROM) => Operation::Fork,
            Method::PUT => Operation::Create,
            Method::POST
                if parse::is_closed_flag(headers.get(h::STREAM_CLOSED).map(|v| v.as_bytes())) =>
            {
                Operation::Close
            }
            Method::POST => Operation::Append,
            Method::GET => {
                let live = uri
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("live="));
                match live {
                    Some("long-poll") => Operation::ReadLiveLongPoll,
                    Some("sse") => Operation::ReadSse,
                    _ => Operation::Read,
                }
            }
            Method::HEAD => Operation::Head,
            Method::DELETE => Operation::Delete,
            _ => Operation::Other,
        }
    }
}

/// Status codes 100..=599 each get a counter per operation, so the `code`
/// label is exact without any lookup.
const CODES: usize = 500;

/// Which kind of read served response bytes (the `read` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    CatchUp = 0,
    LongPoll = 1,
    Sse = 2,
}

const READ_KINDS: [&str; 3] = ["catch_up", "long_poll", "sse"];

#[derive(Debug)]
pub struct Metrics {
    /// `[operation][status - 100]`.
    requests: Box<[AtomicU64]>,
    /// Appends committed with data.
    pub appends: AtomicU64,
    /// Payload bytes of committed appends.
    pub append_bytes: AtomicU64,
    /// Request body bytes accepted (read within the size limit) by creates
    /// and appends.
    pub received_bytes: AtomicU64,
    /// Response body bytes of reads, by [`ReadKind`].
    sent_bytes: [AtomicU64; 3],
    /// Catch-up bytes of those handed to `sendfile` (left in the engine's
    /// files rather than copied).
    pub sent_zero_copy_bytes: AtomicU64,
    /// Long-poll readers waiting now.
    pub live_long_poll: AtomicU64,
    /// SSE connections open now.
    pub live_sse: AtomicU64,
    /// Server-side time of `append` requests, nanoseconds.
    pub append_latency_ns: Histogram,
    /// Connections refused over `max_connections` (answered 503, or closed
    /// at once when too many were already being answered).
    pub shed_connections: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: (0..Operation::ALL.len() * CODES)
                .map(|_| AtomicU64::new(0))
                .collect(),
            appends: AtomicU64::new(0),
            append_bytes: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            sent_bytes: Default::default(),
            sent_zero_copy_bytes: AtomicU64::new(0),
            live_long_poll: AtomicU64::new(0),
            live_sse: AtomicU64::new(0),
            append_latency_ns: Histogram::new(LATENCY_BUCKETS_NS),
            shed_connections: AtomicU64::new(0),
        }
    }
}

/// Increments a gauge for as long as it lives (a live reader's lifetime).
#[derive(Debug)]
pub struct GaugeGuard {
    state: Arc<crate::AppState>,
    sse: bool,
}

impl GaugeGuard {
    fn gauge(&self) -> &AtomicU64 {
        if self.sse {
            &self.state.metrics.live_sse
        } else {
            &self.state.metrics.live_long_poll
        }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.gauge().fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts a finished request.
    #[inline]
    pub fn record(&self, op: Operation, status: u16) {
        let code = usize::from(status.clamp(100, 599)) - 100;
        if let Some(c) = self.requests.get(op as usize * CODES + code) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts response body bytes served by a read.
    #[inline]
    pub fn sent(&self, kind: ReadKind, bytes: u64) {
        self.sent_bytes[kind as usize].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a live reader (long-poll or SSE) until the guard drops.
    pub fn live_reader(state: &Arc<crate::AppState>, sse: bool) -> GaugeGuard {
        let g = GaugeGuard {
            state: state.clone(),
            sse,
        };
        g.gauge().fetch_add(1, Ordering::Relaxed);
        g
    }

    /// The Prometheus text (format 0.0.4) of the server's and the engine's metrics.
    pub fn render(
        &self,
        engine: &[(&'static str, &'static str, u64)],
        engine_histograms: &[HistogramSnapshot],
    ) -> String {
        let mut out = String::with_capacity(8 * 1024);
        header(
            &mut out,
            "ds_http_requests_total",
            "Requests under the stream prefix by operation and status code",
            "counter",
        );
        for op in Operation::ALL {
            for code in 0..CODES {
                let v = self.requests[op as usize * CODES + code].load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "ds_http_requests_total{{operation=\"{}\",code=\"{}\"}} {v}",
                        op.label(),
                        code + 100
                    );
                }
            }
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        single(
            &mut out,
            "ds_appends_total",
            "Appends committed with data",
            "counter",
            load(&self.appends),
        );
        single(
            &mut out,
            "ds_append_bytes_total",
            "Payload bytes of committed appends",
            "counter",
            load(&self.append_bytes),
        );
        single(
            &mut out,
            "ds_shed_connections_total",
            "Connections refused over max_connections (503 Retry-After, or closed)",
            "counter",
            load(&self.shed_connections),
        );
        single(
            &mut out,
            "ds_received_bytes_total",
            "Request body bytes accepted by creates and appends",
            "counter",
            load(&self.received_bytes),
        );
        header(
            &mut out,
            "ds_sent_bytes_total",
            "Response body bytes served by reads (catch-up, long-poll, SSE)",
            "counter",
        );
        for (i, kind) in READ_KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ds_sent_bytes_total{{read=\"{kind}\"}} {}",
                load(&self.sent_bytes[i])
            );
        }
        single(
            &mut out,
            "ds_sent_zero_copy_bytes_total",
            "Catch-up response bytes sent from the engine's files with sendfile (part of ds_sent_bytes_total)",
            "counter",
            load(&self.sent_zero_copy_bytes),
        );
        header(
            &mut out,
            "ds_live_readers",
            "Live readers now: long-poll requests waiting, SSE connections open",
            "gauge",
        );
        let _ = writeln!(
            out,
            "ds_live_readers{{mode=\"long_poll\"}} {}",
            load(&self.live_long_poll)
        );
        let _ = writeln!(
            out,
            "ds_live_readers{{mode=\"sse\"}} {}",
            load(&self.live_sse)
        );
        histogram(
            &mut out,
            &self.append_latency_ns.snapshot(
                "ds_append_duration_seconds",
                "Server-side time of append requests, from dispatch to response ready",
                1e-9,
            ),
        );
        for (name, help, v) in engine {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            single(&mut out, name, help, kind, *v);
        }
        for h in engine_histograms {
            histogram(&mut out, h);
        }
        process_metrics(&mut out);
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, help: &str, kind: &str, v: u64) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {v}");
}

fn histogram(out: &mut String, h: &HistogramSnapshot) {
    header(out, h.name, h.help, "histogram");
    for (le, n) in &h.buckets {
        let _ = writeln!(out, "{}_bucket{{le=\"{le}\"}} {n}", h.name);
    }
    let _ = writeln!(out, "{}_bucket{{le=\"+Inf\"}} {}", h.name, h.count);
    let _ = writeln!(out, "{}_sum {}", h.name, h.sum);
    let _ = writeln!(out, "{}_count {}", h.name, h.count);
}

/// Resident memory and open descriptors from `/proc/self` (Linux only; one
/// small file read and one directory listing per scrape).
fn process_metrics(out: &mut String) {
    #[cfg(target_os = "linux")]
    {
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            });
        if let Some(kib) = rss_kib {
            single(
                out,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                "gauge",
                kib * 1024,
            );
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            single(
                out,
                "process_open_fds",
                "Open file descriptors",
                "gauge",
                dir.count() as u64,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn classify(method: Method, uri: &str, headers: &[(&'static str, &'static str)]) -> Operation {
        let mut hm = HeaderMap::new();
        for (k, v) in headers {
            hm.insert(*k, v.parse().unwrap());
        }
        Operation::classify("/v1/stream", &method, &uri.parse().unwrap(), &hm)
    }

    /// Each protocol operation gets its own label from method, query and headers.
    #[test]
    fn operations_are_classified() {
        use Operation::*;
        let cases = [
            (classify(Method::PUT, "/v1/stream/a", &[]), Create),
            (
                classify(
                    Method::PUT,
                    "/v1/stream/a",
                    &[("stream-forked-from", "/v1/stream/b")],
                ),
                Fork,
            ),
            (classify(Method::POST, "/v1/stream/a", &[]), Append),
            (
                classify(Method::POST, "/v1/stream/a", &[("stream-closed", "true")]),
                Close,
            ),
            (
                classify(Method::POST, "/v1/stream/a", &[("stream-closed", "false")]),
                Append,
            ),
            (classify(Method::GET, "/v1/stream/a?offset=-1", &[]), Read),
            (
                classify(Method::GET, "/v1/stream/a?offset=-1&live=long-poll", &[]),
                ReadLiveLongPoll,
            ),
            (
                classify(Method::GET, "/v1/stream/a?live=sse&offset=now", &[]),
                ReadSse,
            ),
            (classify(Method::HEAD, "/v1/stream/a", &[]), Head),
            (classify(Method::DELETE, "/v1/stream/a", &[]), Delete),
            (
                classify(Method::POST, "/v1/stream/__ds/subscriptions/x", &[]),
                Subscription,
            ),
            (classify(Method::GET, "/elsewhere", &[]), Other),
            (classify(Method::PATCH, "/v1/stream/a", &[]), Other),
        ];
        for (i, (got, want)) in cases.iter().enumerate() {
            assert_eq!(got, want, "case {i}");
        }
    }

    /// Counted requests render with their exact code; zero series are omitted.
    #[test]
    fn render_shows_exact_codes() {
        let m = Metrics::default();
        m.record(Operation::Append, 204);
        m.record(Operation::Append, 204);
        m.record(Operation::Read, 404);
        let text = m.render(&[], &[]);
        assert!(text.contains("ds_http_requests_total{operation=\"append\",code=\"204\"} 2\n"));
        assert!(text.contains("ds_http_requests_total{operation=\"read\",code=\"404\"} 1\n"));
        assert!(!text.contains("operation=\"head\""));
    }
}
