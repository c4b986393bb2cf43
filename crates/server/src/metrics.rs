//! Prometheus text exposition at `GET /metrics`. Counters are lock-free
//! atomics indexed by method and status class, so counting adds no
//! contention to the request path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "OTHER"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; 5]; 7],
    pub appends: AtomicU64,
    pub append_bytes: AtomicU64,
    pub read_bytes: AtomicU64,
}

impl Metrics {
    pub fn record(&self, method: &str, status: u16) {
        let m = METHODS.iter().position(|x| *x == method).unwrap_or(6);
        let c = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[m][c].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(
        &self,
        live_readers: usize,
        engine: &[(&'static str, &'static str, u64)],
    ) -> String {
        let mut out = String::new();
        out.push_str("# HELP ds_http_requests_total HTTP requests by method and status class\n# TYPE ds_http_requests_total counter\n");
        for (mi, m) in METHODS.iter().enumerate() {
            for (ci, c) in CLASSES.iter().enumerate() {
                let v = self.requests[mi][ci].load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "ds_http_requests_total{{method=\"{m}\",status=\"{c}\"}} {v}"
                    );
                }
            }
        }
        let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        counter(
            "ds_appends_total",
            "Appends committed",
            "counter",
            self.appends.load(Ordering::Relaxed),
        );
        counter(
            "ds_append_bytes_total",
            "Bytes appended",
            "counter",
            self.append_bytes.load(Ordering::Relaxed),
        );
        counter(
            "ds_read_bytes_total",
            "Stored bytes served by catch-up and long-poll reads",
            "counter",
            self.read_bytes.load(Ordering::Relaxed),
        );
        counter(
            "ds_live_readers",
            "Long-poll and SSE readers waiting now",
            "gauge",
            live_readers as u64,
        );
        for (name, help, v) in engine {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            counter(name, help, kind, *v);
        }
        out
    }
}
