//! Observability: `/metrics` content (real binary over the file engine),
//! request ids, the request log line, and `/healthz` / `/readyz`.

#![allow(clippy::unwrap_used)]

use durable_streams_server::Server;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::{temp_dir, ServerProc, TempDir};

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A parsed exposition: series (`name{labels}`) to value, plus the names
/// declared by `# TYPE`.
struct Scrape {
    series: HashMap<String, f64>,
    types: HashMap<String, String>,
    text: String,
}

impl Scrape {
    /// Parses Prometheus text, asserting every line is a comment or
    /// `name{labels} value` with a valid metric name and a numeric value.
    fn parse(text: &str) -> Scrape {
        let mut series = HashMap::new();
        let mut types = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let kind = parts.next().unwrap();
                let name = parts
                    .next()
                    .unwrap_or_else(|| panic!("bad comment {line:?}"));
                assert!(kind == "HELP" || kind == "TYPE", "bad comment {line:?}");
                if kind == "TYPE" {
                    let t = parts.next().unwrap().to_owned();
                    assert!(
                        ["counter", "gauge", "histogram"].contains(&t.as_str()),
                        "{line:?}"
                    );
                    assert!(types.insert(name.to_owned(), t).is_none(), "dup {line:?}");
                }
                continue;
            }
            let (key, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            let name = key.split('{').next().unwrap();
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                    && !name.starts_with(|c: char| c.is_ascii_digit()),
                "bad metric name in {line:?}"
            );
            if let Some(labels) = key.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(
                        labels.starts_with('{') && labels.ends_with('}'),
                        "bad labels in {line:?}"
                    );
                    for pair in labels[1..labels.len() - 1].split(',') {
                        let (k, v) = pair.split_once('=').unwrap();
                        assert!(!k.is_empty() && v.starts_with('"') && v.ends_with('"'));
                    }
                }
            }
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            assert!(series.insert(key.to_owned(), v).is_none(), "dup {line:?}");
        }
        Scrape {
            series,
            types,
            text: text.to_owned(),
        }
    }

    fn get(&self, key: &str) -> f64 {
        *self
            .series
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing in\n{}", self.text))
    }

    fn get_or_zero(&self, key: &str) -> f64 {
        self.series.get(key).copied().unwrap_or(0.0)
    }

    fn requests(&self, op: &str, code: u16) -> f64 {
        self.get_or_zero(&format!(
            "ds_http_requests_total{{operation=\"{op}\",code=\"{code}\"}}"
        ))
    }

    /// Checks a histogram's shape and returns its `_count`.
    fn histogram(&self, name: &str) -> u64 {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some("histogram"),
            "{name}"
        );
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = self
            .series
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                Some((le, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(buckets.len() >= 2, "{name} has buckets");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} buckets are cumulative: {buckets:?}"
        );
        let count = self.get(&format!("{name}_count"));
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count), "{name}");
        assert!(self.get(&format!("{name}_sum")) >= 0.0);
        count as u64
    }
}

async fn scrape(c: &reqwest::Client, p: &ServerProc) -> Scrape {
    let r = c.get(p.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    Scrape::parse(&r.text().await.unwrap())
}

/// Scrapes until `ok` holds (bounded; no timing assertion).
async fn scrape_until(
    c: &reqwest::Client,
    p: &ServerProc,
    what: &str,
    ok: impl Fn(&Scrape) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = scrape(c, p).await;
        if ok(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "never: {what}\n{}", s.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------

/// After creates, appends, a fork, a close, catch-up, long-poll and SSE
/// reads, a HEAD and a delete, `/metrics` parses as Prometheus text and
/// every counter, gauge and histogram moved by exactly what was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_operation() {
    let dir = TempDir(temp_dir("metrics-ops"));
    let p = ServerProc::start(&["--data-dir", dir.0.to_str().unwrap()]);
    let c = client();
    let url = p.url("/v1/stream/a");
    let put = c
        .put(&url)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    for _ in 0..5 {
        let r = c
            .post(&url)
            .header("content-type", "text/plain")
            .body("abcd")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let fork = c
        .put(p.url("/v1/stream/f"))
        .header("stream-forked-from", "/v1/stream/a")
        .send()
        .await
        .unwrap();
    assert_eq!(fork.status(), 201);
    let close = c
        .post(p.url("/v1/stream/f"))
        .header("stream-closed", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(close.status(), 204);
    let catch_up = c.get(format!("{url}?offset=-1")).send().await.unwrap();
    assert_eq!(catch_up.status(), 200);
    let catch_up_body = catch_up.bytes().await.unwrap();
    assert_eq!(&catch_up_body[..], b"helloabcdabcdabcdabcdabcd");
    let tail = c
        .head(&url)
        .send()
        .await
        .unwrap()
        .headers()
        .get("stream-next-offset")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        c.get(p.url("/v1/stream/missing"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // A long-poll waits (gauge 1), an append wakes it (gauge back to 0).
    let lp = tokio::spawn({
        let c = c.clone();
        let u = format!("{url}?offset={tail}&live=long-poll");
        async move {
            let r = c.get(u).send().await.unwrap();
            (r.status(), r.bytes().await.unwrap())
        }
    });
    scrape_until(&c, &p, "a long-poll reader waits", |s| {
        s.get("ds_live_readers{mode=\"long_poll\"}") == 1.0
    })
    .await;
    let r = c
        .post(&url)
        .header("content-type", "text/plain")
        .body("wake")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (status, body) = lp.await.unwrap();
    assert_eq!((status.as_u16(), &body[..]), (200, &b"wake"[..]));

    // An SSE reader is counted while connected, and not after it leaves.
    let mut sse = c
        .get(format!("{url}?offset=-1&live=sse"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse_text = String::new();
    while !sse_text.contains("upToDate") {
        let chunk = sse.chunk().await.unwrap().expect("SSE stream still open");
        sse_text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let sse_bytes = sse_text.len() as u64;
    scrape_until(&c, &p, "one SSE reader", |s| {
        s.get("ds_live_readers{mode=\"sse\"}") == 1.0
    })
    .await;
    drop(sse);
    scrape_until(&c, &p, "no SSE reader", |s| {
        s.get("ds_live_readers{mode=\"sse\"}") == 0.0
            && s.get("ds_live_readers{mode=\"long_poll\"}") == 0.0
    })
    .await;

    let s = scrape(&c, &p).await;
    for (op, code, n) in [
        ("create", 201, 1.0),
        ("append", 204, 6.0),
        ("fork", 201, 1.0),
        ("close", 204, 1.0),
        ("read", 200, 1.0),
        ("read", 404, 1.0),
        ("head", 200, 1.0),
        ("read_live_longpoll", 200, 1.0),
        ("read_sse", 200, 1.0),
    ] {
        assert_eq!(s.requests(op, code), n, "{op} {code}\n{}", s.text);
    }
    assert_eq!(s.histogram("ds_append_duration_seconds"), 6);
    assert!(s.histogram("ds_wal_fsync_duration_seconds") > 0);
    assert!(s.histogram("ds_wal_batch_records") > 0);
    assert!(s.histogram("ds_wal_batch_bytes") > 0);
    assert_eq!(s.get("ds_appends_total"), 6.0);
    assert_eq!(s.get("ds_append_bytes_total"), 24.0);
    assert!(s.get("ds_received_bytes_total") >= s.get("ds_append_bytes_total") + 5.0);
    assert_eq!(
        s.get("ds_sent_bytes_total{read=\"catch_up\"}"),
        catch_up_body.len() as f64
    );
    assert_eq!(s.get("ds_sent_bytes_total{read=\"long_poll\"}"), 4.0);
    assert!(s.get("ds_sent_bytes_total{read=\"sse\"}") >= sse_bytes as f64);
    assert!(sse_bytes > 0);
    assert_eq!(s.get("ds_streams"), 2.0);
    assert_eq!(s.get("ds_store_failed"), 0.0);
    assert!(s.get("ds_disk_bytes") > 0.0);
    // No reader left, so the shared SSE event cache holds nothing; no
    // connection was refused.
    assert_eq!(s.get("ds_sse_cache_bytes"), 0.0);
    assert_eq!(s.get("ds_shed_connections_total"), 0.0);
    if cfg!(target_os = "linux") {
        assert!(s.get("process_resident_memory_bytes") > 0.0);
        assert!(s.get("process_open_fds") > 0.0);
    }

    // Disk usage falls once a large stream is deleted. The data file goes
    // right after the Delete record is durable; the WAL may first grow by a
    // preallocation step if a checkpoint just rotated it, hence a stream
    // larger than that step, and polling rather than one look.
    let big = p.url("/v1/stream/big");
    let r = c
        .put(&big)
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 6 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let before = scrape(&c, &p).await.get("ds_disk_bytes");
    assert!(before >= (6 * 1024 * 1024) as f64, "{before}");
    assert_eq!(c.delete(&big).send().await.unwrap().status(), 204);
    scrape_until(&c, &p, "disk usage drops after delete", |s| {
        s.get("ds_disk_bytes") < before
    })
    .await;
    let s = scrape(&c, &p).await;
    assert_eq!(s.requests("delete", 204), 1.0);
    assert_eq!(s.requests("create", 201), 2.0);
    assert_eq!(s.get("ds_streams"), 2.0);
    assert!(s.get("ds_received_bytes_total") >= (6 * 1024 * 1024 + 29) as f64);
}

/// Appends are counted, and every acknowledged append on the file engine is
/// covered by a WAL sync (syncs > 0 and never more records than syncs allow).
#[tokio::test]
async fn metrics_count_appends_and_syncs() {
    let dir = temp_dir("metrics-lib");
    let engine = durable_streams_storage::FileEngine::open(&dir, Default::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Server::builder().engine(Arc::new(engine)).build().run(
        listener,
        async {
            let _ = rx.await;
        },
    ));
    let c = client();
    let url = format!("http://{addr}/v1/stream/m");
    assert_eq!(
        c.put(&url)
            .header("content-type", "text/plain")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    for _ in 0..5 {
        assert_eq!(
            c.post(&url)
                .header("content-type", "text/plain")
                .body("abcd")
                .send()
                .await
                .unwrap()
                .status(),
            204
        );
    }
    let text = c
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let s = Scrape::parse(&text);
    assert_eq!(s.get("ds_appends_total"), 5.0);
    assert_eq!(s.get("ds_append_bytes_total"), 20.0);
    assert_eq!(s.get("ds_wal_records_total"), 6.0);
    let syncs = s.get("ds_wal_syncs_total");
    assert!(
        (1.0..=6.0).contains(&syncs),
        "{syncs} syncs for 6 sequential records"
    );
    assert_eq!(s.requests("append", 204), 5.0);
    let ready = c.get(format!("http://{addr}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Request ids
// ---------------------------------------------------------------------------

fn request_id(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-request-id")
        .expect("x-request-id in every response")
        .to_str()
        .unwrap()
        .to_owned()
}

fn sane(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// A sane `X-Request-Id` is echoed; an empty, too long, spaced, tab- or
/// non-ASCII-bearing one is replaced by a generated id; without one an id
/// is generated, different for every request; the id is CORS-exposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_replaced_or_generated() {
    let p = ServerProc::start(&[]);
    let c = client();
    let url = p.url("/v1/stream/r");
    let max = "x".repeat(128);
    for good in ["abc-123", "A.b_c:d/e=f", max.as_str()] {
        let r = c
            .put(&url)
            .header("content-type", "text/plain")
            .header("x-request-id", good)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        assert_eq!(request_id(&r), good);
    }
    let too_long = "y".repeat(129);
    let bad: Vec<reqwest::header::HeaderValue> = vec![
        reqwest::header::HeaderValue::from_static(""),
        reqwest::header::HeaderValue::from_str(&too_long).unwrap(),
        reqwest::header::HeaderValue::from_static("has space"),
        reqwest::header::HeaderValue::from_static("tab\there"),
        reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
    ];
    for b in bad {
        let r = c
            .get(format!("{url}?offset=-1"))
            .header("x-request-id", b.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = request_id(&r);
        assert!(sane(&id), "{id:?}");
        assert_ne!(id.as_bytes(), b.as_bytes());
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let r = c.head(&url).send().await.unwrap();
        let id = request_id(&r);
        assert!(sane(&id), "{id:?}");
        assert!(seen.insert(id.clone()), "{id} repeated");
    }
    // Errors and preflights carry one too, and browsers may read and send it.
    let r = c.get(p.url("/v1/stream/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(sane(&request_id(&r)));
    let r = c
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "http://example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(sane(&request_id(&r)));
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        exposed.split(", ").any(|h| h == "x-request-id"),
        "{exposed}"
    );
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        allowed.split(", ").any(|h| h == "x-request-id"),
        "{allowed}"
    );
}

/// A log writer that appends to a shared buffer.
#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The debug request line carries request id, method, path, status,
/// elapsed time and peer address, and never the query string.
#[tokio::test]
async fn request_log_line_has_id_and_no_query() {
    use tower::ServiceExt;
    let buf = LogBuf::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let server = Server::builder().build();
    let mut req = axum::http::Request::builder()
        .method("GET")
        .uri("/v1/stream/secretless?offset=-1&token=hunter2")
        .header("x-request-id", "log-test-1")
        .body(axum::body::Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(durable_streams_server::PeerAddr(
            "192.0.2.7:4242".parse().unwrap(),
        ));
    let resp = server.router().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 404);
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("request_id=\"log-test-1\"") || l.contains("request_id=log-test-1"))
        .unwrap_or_else(|| panic!("no request line in\n{log}"));
    for part in [
        "method=GET",
        "path=\"/v1/stream/secretless\"",
        "status=404",
        "elapsed_us=",
        "peer=192.0.2.7:4242",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
    assert!(!log.contains("hunter2"), "query logged:\n{log}");
}

// ---------------------------------------------------------------------------
// /healthz and /readyz
// ---------------------------------------------------------------------------

async fn get_status(router: &axum::Router, path: &str) -> u16 {
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .uri(path)
        .body(axum::body::Body::empty())
        .unwrap();
    router.clone().oneshot(req).await.unwrap().status().as_u16()
}

/// `/healthz` is 200 throughout; `/readyz` is 200 until shutdown starts,
/// then 503.
#[tokio::test]
async fn readyz_is_503_during_shutdown() {
    let server = Server::builder().build();
    let router = server.router();
    assert_eq!(get_status(&router, "/healthz").await, 200);
    assert_eq!(get_status(&router, "/readyz").await, 200);
    server.state().shutdown.cancel();
    assert_eq!(get_status(&router, "/readyz").await, 503);
    assert_eq!(get_status(&router, "/healthz").await, 200);
}

/// After a failed WAL sync the store refuses writes: `/readyz` turns 503
/// and `ds_store_failed` 1, while `/healthz` (alive) stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_after_a_store_failure() {
    use durable_streams_storage::file::sim::{Faults, SimVfs};
    use tower::ServiceExt;
    let vfs = Arc::new(SimVfs::new());
    let engine = durable_streams_storage::FileEngine::open_with(
        "/db",
        Default::default(),
        vfs.clone(),
        Arc::new(durable_streams_storage::SystemClock),
    )
    .unwrap();
    let server = Server::builder().engine(Arc::new(engine)).build();
    let router = server.router();
    let put = axum::http::Request::builder()
        .method("PUT")
        .uri("/v1/stream/s")
        .header("content-type", "text/plain")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(router.clone().oneshot(put).await.unwrap().status(), 201);
    assert_eq!(get_status(&router, "/readyz").await, 200);
    vfs.set_faults(Faults {
        fail_sync_at: Some(vfs.syncs() + 1),
        ..Faults::default()
    });
    let post = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/stream/s")
        .header("content-type", "text/plain")
        .body(axum::body::Body::from("x"))
        .unwrap();
    assert!(router
        .clone()
        .oneshot(post)
        .await
        .unwrap()
        .status()
        .is_server_error());
    assert_eq!(get_status(&router, "/readyz").await, 503);
    assert_eq!(get_status(&router, "/healthz").await, 200);
    let req = axum::http::Request::builder()
        .uri("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let body = router.clone().oneshot(req).await.unwrap().into_body();
    let text =
        String::from_utf8(axum::body::to_bytes(body, 1 << 20).await.unwrap().to_vec()).unwrap();
    assert_eq!(Scrape::parse(&text).get("ds_store_failed"), 1.0);
}
