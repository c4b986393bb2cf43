//! Crash tests of subscriptions (PROTOCOL.md sections 6 and 7) against the
//! real `durable-streams-server` binary with the durable file engine
//! (`dev --port .. --data-dir DIR`), killed with SIGKILL and restarted on the
//! same data directory:
//!
//! * a pull-wake cycle killed after a claim (before its ack) and between an
//!   append and its wake event: no lost wake, no double ack;
//! * a webhook retry schedule killed while a retry is pending: the retry is
//!   delivered after the restart, honouring the persisted schedule;
//! * webhook signatures after a restart verify with the JWKS key fetched
//!   after the restart (persisted key, stable `kid`, no private key served);
//! * callback, ack and release tokens: missing → 401, wrong → 409 FENCED,
//!   no cursor movement, deleted subscriptions stay dead.
//!
//! The `regression_*` tests at the end reproduce server bugs this file found
//! (lost wakes and links after a crash, stale cursors on re-created streams)
//! and now guard their fixes.
//!
//! Webhooks go to a tiny HTTP/1.1 receiver in the test (the localhost
//! development exception allows `http://127.0.0.1`). On failure the data
//! directory is kept and its path printed, with the server's log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod support;
use std::ffi::OsStr;
const PREFIX: &str = "/v1/stream";
/// Generous bound for anything that should happen "soon" (a wake, a lease
/// expiry of 1 s, a retry of at most ~2.4 s, a restart).
const SOON: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Server process and data directory
// ---------------------------------------------------------------------------

/// A running server on a data directory; SIGKILLed (and reaped) on drop.
struct Server {
    child: Option<Child>,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `dev --port PORT --data-dir DIR` (PORT 0: the OS picks one)
    /// and learns the address from the listening log line.
    fn spawn(dir: &Path, port: u16) -> Result<Server, String> {
        let port = port.to_string();
        let sp = support::spawn([
            OsStr::new("dev"),
            OsStr::new("--host"),
            OsStr::new("127.0.0.1"),
            OsStr::new("--port"),
            OsStr::new(&port),
            OsStr::new("--data-dir"),
            dir.as_os_str(),
        ]);
        let rx = sp.addr;
        let mut server = Server {
            child: Some(sp.child),
            addr: ([127, 0, 0, 1], 0).into(),
            log: sp.log,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => {
                server.addr = addr;
                Ok(server)
            }
            Err(_) => Err(format!(
                "server did not log its listening address; stderr:\n{}",
                server.log()
            )),
        }
    }

    /// Starts the server and waits for `GET /healthz` 200. A fixed port is
    /// retried for a while (the previous process may still hold it).
    async fn start(dir: &Path, port: u16) -> Server {
        let deadline = Instant::now() + SOON;
        let mut server = loop {
            match Server::spawn(dir, port) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("{e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        server.wait_healthy().await;
        server
    }

    /// SIGKILL on the same data directory and start again (on `port`).
    async fn restart(&mut self, dir: &Path, port: u16) {
        self.kill();
        *self = Server::start(dir, port).await;
    }

    fn base(&self) -> String {
        format!("http://{}{PREFIX}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn wait_healthy(&mut self) {
        let client = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client
                .get(format!("http://{}/healthz", self.addr))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "server exited ({st}) before becoming healthy; stderr:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "server never answered /healthz 200; stderr:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- server log ----\n{}", self.log());
        }
        self.kill();
    }
}

/// A unique directory, removed after a successful test and kept (path
/// printed) after a failure.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p =
            std::env::temp_dir().join(format!("ds-subcrash-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "subscriptions crash test failed: data directory kept at {}",
                self.0.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------

/// A response: status, JSON body (Null when empty or not JSON), headers.
struct Resp {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

async fn call(method: &str, url: &str, auth: Option<&str>, body: Option<&Value>) -> Resp {
    let c = client();
    let mut rb = c.request(method.parse().unwrap(), url);
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        status,
        body,
        headers,
    }
}

fn next_offset(r: &Resp) -> String {
    r.headers
        .get("stream-next-offset")
        .expect("Stream-Next-Offset")
        .to_str()
        .unwrap()
        .to_owned()
}

/// Creates a JSON stream (with optional initial messages); returns its tail.
async fn create_stream(base: &str, path: &str, initial: Option<Value>) -> String {
    let mut rb = client()
        .put(format!("{base}/{path}"))
        .header("content-type", "application/json");
    if let Some(v) = initial {
        rb = rb.body(v.to_string());
    }
    let r = rb.send().await.unwrap();
    assert!(
        matches!(r.status().as_u16(), 200 | 201),
        "create {path}: {}",
        r.status()
    );
    r.headers()
        .get("stream-next-offset")
        .expect("Stream-Next-Offset")
        .to_str()
        .unwrap()
        .to_owned()
}

/// Appends one JSON message; returns the new tail.
async fn append(base: &str, path: &str, msg: Value) -> String {
    let r = call("POST", &format!("{base}/{path}"), None, Some(&msg)).await;
    assert!(
        matches!(r.status, 200 | 204),
        "append to {path}: {} {}",
        r.status,
        r.body
    );
    next_offset(&r)
}

async fn tail(base: &str, path: &str) -> String {
    let r = client()
        .head(format!("{base}/{path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "HEAD {path}");
    r.headers()
        .get("stream-next-offset")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

/// Every message of a JSON stream.
async fn read_json(base: &str, path: &str) -> Vec<Value> {
    let r = call("GET", &format!("{base}/{path}?offset=-1"), None, None).await;
    assert_eq!(r.status, 200, "read {path}");
    r.body.as_array().cloned().unwrap_or_default()
}

fn sub_url(base: &str, id: &str) -> String {
    format!("{base}/__ds/subscriptions/{id}")
}

async fn put_sub(base: &str, id: &str, config: Value) -> Resp {
    call("PUT", &sub_url(base, id), None, Some(&config)).await
}

/// `GET` the subscription: (status, body).
async fn get_sub(base: &str, id: &str) -> Resp {
    call("GET", &sub_url(base, id), None, None).await
}

/// path → acked_offset of a subscription description (or a claim's streams).
fn acked(streams: &Value) -> BTreeMap<String, String> {
    streams
        .as_array()
        .expect("streams array")
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_owned(),
                s["acked_offset"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn acked_of(base: &str, id: &str) -> BTreeMap<String, String> {
    let r = get_sub(base, id).await;
    assert_eq!(r.status, 200, "GET subscription {id}: {}", r.body);
    acked(&r.body["streams"])
}

async fn claim(base: &str, id: &str, worker: &str) -> Resp {
    call(
        "POST",
        &format!("{}/claim", sub_url(base, id)),
        None,
        Some(&json!({ "worker": worker })),
    )
    .await
}

/// POSTs `{wake_id, generation, acks, done}` to `endpoint` (ack or callback).
#[allow(clippy::too_many_arguments)]
async fn ack(
    base: &str,
    id: &str,
    endpoint: &str,
    token: Option<&str>,
    wake_id: &str,
    generation: u64,
    acks: &[(&str, &str)],
    done: bool,
) -> Resp {
    let acks: Vec<Value> = acks
        .iter()
        .map(|(s, o)| json!({ "stream": s, "offset": o }))
        .collect();
    let body = json!({ "wake_id": wake_id, "generation": generation, "acks": acks, "done": done });
    let auth = token.map(|t| format!("Bearer {t}"));
    call(
        "POST",
        &format!("{}/{endpoint}", sub_url(base, id)),
        auth.as_deref(),
        Some(&body),
    )
    .await
}

async fn release(
    base: &str,
    id: &str,
    token: Option<&str>,
    wake_id: &str,
    generation: u64,
) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let body = json!({ "wake_id": wake_id, "generation": generation });
    call(
        "POST",
        &format!("{}/release", sub_url(base, id)),
        auth.as_deref(),
        Some(&body),
    )
    .await
}

fn assert_fenced(r: &Resp, what: &str) {
    assert_eq!(
        r.status, 409,
        "{what}: expected 409 FENCED, got {} {}",
        r.status, r.body
    );
    assert_eq!(r.body["error"]["code"], "FENCED", "{what}: {}", r.body);
}

fn assert_ok(r: &Resp, next_wake: bool, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.body);
    assert_eq!(
        r.body,
        json!({ "ok": true, "next_wake": next_wake }),
        "{what}"
    );
}

/// Waits for a wake event of `sub` with a generation above `after` in the
/// wake stream; returns the newest such event.
async fn wait_wake(base: &str, wake_stream: &str, sub: &str, after: u64) -> Value {
    wait_wake_within(base, wake_stream, sub, after, SOON).await
}

async fn wait_wake_within(
    base: &str,
    wake_stream: &str,
    sub: &str,
    after: u64,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let events = read_json(base, wake_stream).await;
        let newest = events
            .into_iter()
            .filter(|e| e["type"] == "wake" && e["subscription_id"] == sub)
            .filter(|e| e["generation"].as_u64().unwrap() > after)
            .max_by_key(|e| e["generation"].as_u64().unwrap());
        if let Some(e) = newest {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no wake event of {sub} with generation > {after} in {wake_stream} within {within:?} (lost wake); events: {:?}",
            read_json(base, wake_stream).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Claims `sub` until it succeeds (an unexpired lease of `holder` answers
/// 409 ALREADY_CLAIMED meanwhile).
async fn claim_eventually(base: &str, sub: &str, worker: &str, holder: Option<&str>) -> Value {
    let deadline = Instant::now() + SOON;
    loop {
        let r = claim(base, sub, worker).await;
        if r.status == 200 {
            return r.body;
        }
        assert_eq!(r.status, 409, "claim by {worker}: {}", r.body);
        assert_eq!(
            r.body["error"]["code"], "ALREADY_CLAIMED",
            "claim by {worker}: {}",
            r.body
        );
        if let Some(h) = holder {
            assert_eq!(
                r.body["error"]["current_holder"], h,
                "claim by {worker}: {}",
                r.body
            );
        }
        assert!(
            Instant::now() < deadline,
            "the lease of {:?} never expired",
            r.body["error"]["current_holder"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The claim's streams as path → (acked_offset, tail_offset, has_pending).
fn claim_streams(c: &Value) -> BTreeMap<String, (String, String, bool)> {
    c["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_owned(),
                (
                    s["acked_offset"].as_str().unwrap().to_owned(),
                    s["tail_offset"].as_str().unwrap().to_owned(),
                    s["has_pending"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

// ---------------------------------------------------------------------------
// Webhook receiver
// ---------------------------------------------------------------------------

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// 500: the server schedules a retry.
    Fail,
    /// 200 `{"done":true}`: auto-ack.
    Done,
    /// 200 `{}`: the worker will call back.
    Accept,
}

#[derive(Debug, Clone)]
struct Delivery {
    at: Instant,
    signature: Option<String>,
    raw: Vec<u8>,
    body: Value,
    answered: Answer,
}

/// A tiny HTTP/1.1 server recording every request (one per connection).
struct Receiver {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(answer: Answer) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let (a, d) = (answer.clone(), deliveries.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (a, d) = (a.clone(), d.clone());
                tokio::spawn(async move {
                    let _ = Receiver::serve(sock, a, d).await;
                });
            }
        });
        Receiver {
            addr,
            answer,
            deliveries,
            task,
        }
    }

    async fn serve(
        mut sock: tokio::net::TcpStream,
        answer: Arc<Mutex<Answer>>,
        deliveries: Arc<Mutex<Vec<Delivery>>>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut headers = BTreeMap::new();
        for line in head.split("\r\n").skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let raw = buf[head_end..(head_end + len).min(buf.len())].to_vec();
        let answered = *answer.lock().unwrap();
        deliveries.lock().unwrap().push(Delivery {
            at: Instant::now(),
            signature: headers.get("webhook-signature").cloned(),
            body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
            raw,
            answered,
        });
        let (status, body) = match answered {
            Answer::Fail => ("500 Internal Server Error", r#"{"error":"try again"}"#),
            Answer::Done => ("200 OK", r#"{"done":true}"#),
            Answer::Accept => ("200 OK", "{}"),
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(resp.as_bytes()).await?;
        sock.shutdown().await
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn set(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }

    /// Waits until at least `n` deliveries arrived; returns all of them.
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + within;
        loop {
            let d = self.deliveries();
            if d.len() >= n {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} webhook deliveries within {within:?}",
                d.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Parses `t=..,kid=..,ed25519=..`.
fn parse_signature(h: &str) -> (u64, String, Vec<u8>) {
    let mut t = None;
    let mut kid = None;
    let mut sig = None;
    for part in h.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .unwrap_or_else(|| panic!("bad signature header {h:?}"));
        match k {
            "t" => t = Some(v.parse::<u64>().unwrap()),
            "kid" => kid = Some(v.to_owned()),
            "ed25519" => sig = Some(B64URL.decode(v).expect("unpadded base64url signature")),
            _ => {}
        }
    }
    (t.expect("t="), kid.expect("kid="), sig.expect("ed25519="))
}

/// Ed25519 verification of `<t>.<raw body>` with a JWK's `x`.
fn verifies(jwk: &Value, t: u64, raw: &[u8], sig: &[u8]) -> bool {
    let x: [u8; 32] = B64URL
        .decode(s(&jwk["x"]))
        .unwrap()
        .try_into()
        .expect("32-byte Ed25519 key");
    let key = VerifyingKey::from_bytes(&x).expect("valid Ed25519 public key");
    let Ok(sig) = <[u8; 64]>::try_from(sig) else {
        return false;
    };
    let mut msg = t.to_string().into_bytes();
    msg.push(b'.');
    msg.extend_from_slice(raw);
    key.verify(&msg, &Signature::from_bytes(&sig)).is_ok()
}

/// Fetches the JWKS and checks its shape (one public Ed25519 key, no private part).
async fn jwks(base: &str) -> Value {
    let r = call("GET", &format!("{base}/__ds/jwks.json"), None, None).await;
    assert_eq!(r.status, 200);
    let ct = r.headers.get("content-type").unwrap().to_str().unwrap();
    assert!(ct.starts_with("application/jwk-set+json"), "{ct}");
    let keys = r.body["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1, "{}", r.body);
    let k = &keys[0];
    let fields: Vec<&str> = k.as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted = fields.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        ["alg", "crv", "kid", "kty", "use", "x"],
        "JWK must hold only public fields: {k}"
    );
    assert_eq!(
        (s(&k["kty"]), s(&k["crv"]), s(&k["use"]), s(&k["alg"])),
        ("OKP", "Ed25519", "sig", "EdDSA")
    );
    k.clone()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Pull-wake survives SIGKILL after a claim and between an append and its wake event: no lost wake, no double ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_wake_cycle_survives_sigkill() {
    let dir = TempDir::new("pull");
    let mut srv = Server::start(&dir.0, 0).await;
    let mut b = srv.base();
    let zero = create_stream(&b, "wake/pool", None).await;
    let config = json!({ "type": "pull-wake", "pattern": "events/*", "wake_stream": "wake/pool", "lease_ttl_ms": 1000 });
    let r = put_sub(&b, "pull", config.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);

    // Streams created after the subscription are linked before their first data.
    let a1 = create_stream(&b, "events/a", Some(json!([{ "n": 1 }]))).await;
    let a2 = append(&b, "events/a", json!({ "n": 2 })).await;
    let b1 = create_stream(&b, "events/b", Some(json!([{ "n": 1 }]))).await;
    let ev = wait_wake(&b, "wake/pool", "pull", 0).await;
    let g0 = ev["generation"].as_u64().unwrap();

    // worker-1 claims and heartbeats with a partial ack (events/a up to its first message).
    let c1 = claim(&b, "pull", "worker-1").await;
    let claimed_at = Instant::now();
    assert_eq!(c1.status, 200, "{}", c1.body);
    let c1 = c1.body;
    let (t1, w1, g1) = (
        s(&c1["token"]).to_owned(),
        s(&c1["wake_id"]).to_owned(),
        c1["generation"].as_u64().unwrap(),
    );
    assert!(
        g1 >= g0,
        "claim generation {g1} below the announced wake {g0}"
    );
    let st = claim_streams(&c1);
    assert_eq!(st["events/a"], (zero.clone(), a2.clone(), true));
    assert_eq!(st["events/b"], (zero.clone(), b1.clone(), true));
    let r = claim(&b, "pull", "worker-2").await;
    if claimed_at.elapsed() < Duration::from_millis(900) {
        assert_eq!(r.status, 409, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "ALREADY_CLAIMED");
        assert_eq!(r.body["error"]["current_holder"], "worker-1");
        assert_eq!(r.body["error"]["generation"], g1);
    }
    let hb = ack(
        &b,
        "pull",
        "ack",
        Some(&t1),
        &w1,
        g1,
        &[("events/a", &a1)],
        false,
    )
    .await;
    if claimed_at.elapsed() < Duration::from_millis(900) {
        assert_ok(&hb, false, "heartbeat with a partial ack");
        assert_eq!(acked_of(&b, "pull").await["events/a"], a1);
    }
    let acked_before = acked_of(&b, "pull").await;

    // SIGKILL mid-cycle: claimed, not acked.
    srv.restart(&dir.0, 0).await;
    b = srv.base();
    let r = get_sub(&b, "pull").await;
    assert_eq!(
        r.status, 200,
        "subscription lost by the restart: {}",
        r.body
    );
    assert_eq!(r.body["lease_ttl_ms"], 1000);
    assert_eq!(
        acked(&r.body["streams"]),
        acked_before,
        "acked offsets changed across the restart"
    );
    assert_eq!(
        put_sub(&b, "pull", config.clone()).await.status,
        200,
        "re-confirmation after restart"
    );

    // The lease (persisted) expires; the work is re-claimable with a new generation.
    let c2 = claim_eventually(&b, "pull", "worker-2", Some("worker-1")).await;
    let (t2, w2, g2) = (
        s(&c2["token"]).to_owned(),
        s(&c2["wake_id"]).to_owned(),
        c2["generation"].as_u64().unwrap(),
    );
    assert!(
        g2 > g1,
        "re-claim after lease expiry must be a new generation ({g2} <= {g1})"
    );
    assert_ne!(w2, w1);
    let st = claim_streams(&c2);
    assert_eq!(
        st["events/a"],
        (acked_before["events/a"].clone(), a2.clone(), true)
    );
    assert_eq!(st["events/b"], (zero.clone(), b1.clone(), true));

    // The pre-crash claim is fenced and moves nothing.
    let r = ack(
        &b,
        "pull",
        "ack",
        Some(&t1),
        &w1,
        g1,
        &[("events/a", &a2), ("events/b", &b1)],
        true,
    )
    .await;
    assert_fenced(&r, "ack with the pre-crash token");
    assert_fenced(
        &release(&b, "pull", Some(&t1), &w1, g1).await,
        "release with the pre-crash token",
    );
    assert_eq!(
        acked_of(&b, "pull").await,
        acked_before,
        "a fenced ack moved a cursor"
    );

    // worker-2 finishes.
    let done = ack(
        &b,
        "pull",
        "ack",
        Some(&t2),
        &w2,
        g2,
        &[("events/a", &a2), ("events/b", &b1)],
        true,
    )
    .await;
    assert_ok(&done, false, "final ack");
    let cur = acked_of(&b, "pull").await;
    assert_eq!(cur["events/a"], tail(&b, "events/a").await);
    assert_eq!(cur["events/b"], tail(&b, "events/b").await);

    // No double ack: the same ack again, or a release, is fenced.
    let again = ack(
        &b,
        "pull",
        "ack",
        Some(&t2),
        &w2,
        g2,
        &[("events/a", &a2), ("events/b", &b1)],
        true,
    )
    .await;
    assert_fenced(&again, "repeated ack");
    assert_fenced(
        &release(&b, "pull", Some(&t2), &w2, g2).await,
        "release after done",
    );
    let r = claim(&b, "pull", "worker-x").await;
    assert_eq!(
        (r.status, &r.body["error"]["code"]),
        (409, &json!("NO_PENDING_WORK")),
        "{}",
        r.body
    );

    // SIGKILL after appends made while a lease is held (no wake event yet for them).
    let last = read_json(&b, "wake/pool")
        .await
        .iter()
        .filter_map(|e| e["generation"].as_u64())
        .max()
        .unwrap_or(0);
    append(&b, "events/a", json!({ "n": 3 })).await;
    let ev = wait_wake(&b, "wake/pool", "pull", last.max(g2)).await;
    assert_eq!(ev["stream"], "events/a");
    let c3 = claim_eventually(&b, "pull", "worker-3", None).await;
    let g3 = c3["generation"].as_u64().unwrap();
    let a4 = append(&b, "events/a", json!({ "n": 4 })).await;
    let c1_tail = create_stream(&b, "events/c", Some(json!([{ "n": 1 }]))).await;
    srv.restart(&dir.0, 0).await;
    b = srv.base();
    let ev = wait_wake(&b, "wake/pool", "pull", g3).await;
    assert!(
        ev["stream"] == "events/a" || ev["stream"] == "events/c",
        "{ev}"
    );
    let c4 = claim_eventually(&b, "pull", "worker-4", Some("worker-3")).await;
    let g4 = c4["generation"].as_u64().unwrap();
    assert!(g4 > g3);
    let st = claim_streams(&c4);
    assert_eq!((&st["events/a"].1, st["events/a"].2), (&a4, true));
    assert_eq!(st["events/c"], (zero.clone(), c1_tail.clone(), true));
    assert!(!st["events/b"].2, "events/b has nothing pending");
    let r = ack(
        &b,
        "pull",
        "ack",
        Some(s(&c4["token"])),
        s(&c4["wake_id"]),
        g4,
        &[("events/a", &a4), ("events/c", &c1_tail)],
        true,
    )
    .await;
    assert_ok(&r, false, "ack after the second restart");

    // No lost wake: every appended event is covered by an ack, also after one more SIGKILL.
    srv.restart(&dir.0, 0).await;
    b = srv.base();
    let cur = acked_of(&b, "pull").await;
    for p in ["events/a", "events/b", "events/c"] {
        assert_eq!(cur[p], tail(&b, p).await, "{p} not fully acked");
    }
    let r = ack(
        &b,
        "pull",
        "ack",
        Some(s(&c4["token"])),
        s(&c4["wake_id"]),
        g4,
        &[("events/a", &a4)],
        true,
    )
    .await;
    assert_fenced(&r, "replayed ack after a restart");
    let r = claim(&b, "pull", "worker-x").await;
    assert_eq!(
        (r.status, &r.body["error"]["code"]),
        (409, &json!("NO_PENDING_WORK")),
        "{}",
        r.body
    );
}

/// A webhook retry scheduled before a SIGKILL is honoured and delivered after the restart; the cursor reaches the tail and status returns to active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_retry_schedule_survives_sigkill() {
    let rx = Receiver::start(Answer::Fail).await;
    let dir = TempDir::new("retry");
    let mut srv = Server::start(&dir.0, 0).await;
    let port = srv.addr.port();
    let b = srv.base();
    let config = json!({ "type": "webhook", "pattern": "jobs/*", "webhook": { "url": rx.url() }, "lease_ttl_ms": 30000 });
    let r = put_sub(&b, "hook", config.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "active");
    let j1 = create_stream(&b, "jobs/a", Some(json!([{ "n": 1 }]))).await;

    // Two failed attempts (500): the next retry is 2 s ± 20 % after the second.
    let d = rx.wait_for(2, SOON).await;
    let second_at = d[1].at;
    for x in &d[..2] {
        assert_eq!(x.answered, Answer::Fail);
        assert_eq!(x.body["subscription_id"], "hook");
        assert_eq!(x.body["streams"][0]["path"], "jobs/a");
        assert_eq!(x.body["streams"][0]["tail_offset"], j1.as_str());
        assert_eq!(x.body["streams"][0]["has_pending"], true);
    }
    assert!(
        d[1].body["generation"].as_u64() > d[0].body["generation"].as_u64(),
        "every attempt is a new wake"
    );
    // Let the server persist the second failure's schedule before the kill
    // (state.json is the persisted state; without it, skip the lower bound below).
    let state = dir.0.join("subscriptions/state.json");
    let deadline = Instant::now() + Duration::from_secs(5);
    let persisted = loop {
        if std::fs::read_to_string(&state)
            .unwrap_or_default()
            .contains("\"attempt\":2")
        {
            break true;
        }
        if Instant::now() > deadline {
            eprintln!(
                "note: second retry schedule not seen in {}; not checking the lower bound",
                state.display()
            );
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let r = get_sub(&b, "hook").await;
    assert_eq!(
        r.body["status"], "failed",
        "a retry is scheduled: {}",
        r.body
    );

    // SIGKILL while the retry is scheduled; restart on the same address.
    srv.restart(&dir.0, port).await;
    let b = srv.base();
    let r = get_sub(&b, "hook").await;
    assert_eq!(r.status, 200, "{}", r.body);
    if rx.deliveries().len() == 2 {
        assert_eq!(
            r.body["status"], "failed",
            "the retry schedule was lost by the restart: {}",
            r.body
        );
    }
    assert_eq!(
        acked(&r.body["streams"])["jobs/a"],
        "0000000000000000_0000000000000000"
    );
    rx.set(Answer::Done);

    // The retry is delivered after the restart, not earlier than scheduled.
    let deadline = Instant::now() + Duration::from_secs(70);
    let ok = loop {
        if let Some(x) = rx
            .deliveries()
            .into_iter()
            .find(|x| x.answered == Answer::Done)
        {
            break x;
        }
        assert!(
            Instant::now() < deadline,
            "no retry after the restart: {:?}",
            rx.deliveries().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first_after = &rx.deliveries()[2];
    assert!(
        !persisted || first_after.at >= second_at + Duration::from_millis(1500),
        "the restart retried at once ({:?} after the second failure) instead of honouring the persisted schedule",
        first_after.at - second_at
    );
    assert_eq!(ok.body["streams"][0]["tail_offset"], j1.as_str());
    assert!(ok.body["generation"].as_u64() > d[1].body["generation"].as_u64());

    // Auto-ack of {"done":true}: the cursor reaches the tail, status is active again.
    let deadline = Instant::now() + SOON;
    loop {
        let r = get_sub(&b, "hook").await;
        if r.body["status"] == "active" && acked(&r.body["streams"])["jobs/a"] == j1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not acked/active after the retry: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tail(&b, "jobs/a").await, j1);

    // Delivery keeps working after the restart: a new append is delivered and acked.
    let n = rx.deliveries().len();
    let j2 = append(&b, "jobs/a", json!({ "n": 2 })).await;
    let d = rx.wait_for(n + 1, SOON).await;
    assert_eq!(d[n].body["streams"][0]["tail_offset"], j2.as_str());
    let deadline = Instant::now() + SOON;
    while acked_of(&b, "hook").await["jobs/a"] != j2 {
        assert!(Instant::now() < deadline, "second append never acked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get_sub(&b, "hook").await.body["status"], "active");
}

/// A webhook delivered after a restart carries a signature that verifies with the JWKS key fetched after the restart; the kid is stable and the private key is never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_signatures_verify_across_restart() {
    let rx = Receiver::start(Answer::Done).await;
    let dir = TempDir::new("sig");
    let mut srv = Server::start(&dir.0, 0).await;
    let b = srv.base();
    let r = call("GET", &format!("{b}/__ds/jwks.json"), None, None).await;
    let cc = r.headers.get("cache-control").unwrap().to_str().unwrap();
    assert!(cc.contains("public") && cc.contains("max-age=300"), "{cc}");
    let key1 = jwks(&b).await;
    let kid = s(&key1["kid"]).to_owned();

    let r = put_sub(
        &b,
        "sig",
        json!({ "type": "webhook", "pattern": "sig/*", "webhook": { "url": rx.url() } }),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let signing = &r.body["webhook"]["signing"];
    assert_eq!(signing["alg"], "ed25519");
    assert_eq!(signing["kid"], kid.as_str());
    assert!(
        s(&signing["jwks_url"]).ends_with(&format!("{PREFIX}/__ds/jwks.json")),
        "{signing}"
    );
    assert!(
        !r.body.to_string().contains("secret"),
        "no shared secret in the subscription: {}",
        r.body
    );

    let t1 = create_stream(&b, "sig/a", Some(json!([{ "n": 1 }]))).await;
    let d1 = rx.wait_for(1, SOON).await.remove(0);
    let (ts1, kid1, sig1) = parse_signature(d1.signature.as_deref().expect("Webhook-Signature"));
    assert_eq!(kid1, kid);
    assert!(
        verifies(&key1, ts1, &d1.raw, &sig1),
        "pre-restart delivery does not verify"
    );

    let deadline = Instant::now() + SOON;
    while acked_of(&b, "sig").await["sig/a"] != t1 {
        assert!(
            Instant::now() < deadline,
            "pre-restart delivery never acked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGKILL and restart (on a new port).
    srv.restart(&dir.0, 0).await;
    let b = srv.base();
    let key2 = jwks(&b).await;
    assert_eq!(
        key2, key1,
        "the signing key (kid and x) must survive the restart"
    );
    let r = get_sub(&b, "sig").await;
    assert_eq!(r.body["webhook"]["signing"]["kid"], kid.as_str());
    assert_eq!(acked(&r.body["streams"])["sig/a"], t1);

    // A delivery after the restart verifies with the key fetched after the restart.
    let t2 = append(&b, "sig/a", json!({ "n": 2 })).await;
    let d2 = rx.wait_for(2, SOON).await.remove(1);
    let header = d2.signature.as_deref().expect("Webhook-Signature");
    let (ts2, kid2, sig2) = parse_signature(header);
    assert_eq!(
        kid2,
        s(&key2["kid"]),
        "signature kid must select the JWKS key"
    );
    assert!(
        verifies(&key2, ts2, &d2.raw, &sig2),
        "post-restart delivery does not verify: {header}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        ts2.abs_diff(now) < 300,
        "t={ts2} is outside a 5 minute replay window of {now}"
    );
    let mut tampered = d2.raw.clone();
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    assert!(
        !verifies(&key2, ts2, &tampered, &sig2),
        "a tampered body must not verify"
    );
    assert!(
        !verifies(&key2, ts2 + 1, &d2.raw, &sig2),
        "another timestamp must not verify"
    );
    assert!(
        verifies(&key2, ts1, &d1.raw, &sig1),
        "pre-restart delivery verifies with the post-restart key"
    );
    assert_eq!(d2.body["subscription_id"], "sig");
    assert!(d2.body["generation"].as_u64() > d1.body["generation"].as_u64());
    assert_eq!(d2.body["streams"][0]["tail_offset"], t2.as_str());
    assert!(d2.body["callback_token"].is_string() && d2.body["wake_id"].is_string());
    assert!(
        s(&d2.body["callback_url"]).ends_with(&format!("{PREFIX}/__ds/subscriptions/sig/callback"))
    );

    // The private key stays private: not in the JWKS, 0600 on disk; tokens are not stored.
    let seed = std::fs::read(dir.0.join("subscriptions/signing.key")).unwrap();
    assert_eq!(seed.len(), 32);
    let jwks_text = call("GET", &format!("{b}/__ds/jwks.json"), None, None)
        .await
        .body
        .to_string();
    assert!(
        !jwks_text.contains(&B64URL.encode(&seed)),
        "the JWKS serves the private key"
    );
    assert!(!jwks_text.contains("\"d\""), "{jwks_text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.0.join("subscriptions/signing.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "signing.key is readable by others: {mode:o}"
    );
    let state = std::fs::read_to_string(dir.0.join("subscriptions/state.json")).unwrap();
    for d in [&d1, &d2] {
        assert!(
            !state.contains(s(&d.body["callback_token"])),
            "a callback token is stored in clear"
        );
    }
    let deadline = Instant::now() + SOON;
    while acked_of(&b, "sig").await["sig/a"] != t2 {
        assert!(
            Instant::now() < deadline,
            "post-restart delivery never acked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A claim of subscription `tok` and the cursor it must keep.
struct PullWake {
    t: String,
    w: String,
    g: u64,
    ta: String,
    zero: String,
}

/// Every refused ack/callback/release of `tok` (see `tokens_are_required_and_scoped`).
async fn check_refusals(b: &str, pw: &PullWake, wrong: &str, other_token: &str) {
    let PullWake { t, w, g, ta, zero } = pw;
    let (g, u) = (*g, sub_url(b, "tok"));
    // No Authorization (token in the body or query instead), or another scheme: 401.
    let body = json!({ "wake_id": w, "generation": g, "acks": [{ "stream": "tok/a", "offset": ta }], "done": true, "token": t });
    for ep in ["ack", "callback", "release"] {
        for auth in [
            None,
            Some("Basic Zm9vOmJhcg==".to_owned()),
            Some(t.clone()),
            Some("Bearer".to_owned()),
        ] {
            let r = call(
                "POST",
                &format!("{u}/{ep}?token={t}"),
                auth.as_deref(),
                Some(&body),
            )
            .await;
            assert_eq!(
                r.status, 401,
                "{ep} with Authorization {auth:?}: {} {}",
                r.status, r.body
            );
            let www = r
                .headers
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            assert!(
                www.is_some_and(|v| v.starts_with("Bearer")),
                "{ep}: 401 without WWW-Authenticate: Bearer"
            );
        }
    }
    // A wrong token, another subscription's token, a wrong wake_id or generation: 409 FENCED.
    for ep in ["ack", "callback"] {
        let acks = &[("tok/a", ta.as_str())];
        assert_fenced(
            &ack(b, "tok", ep, Some(wrong), w, g, acks, true).await,
            "random token",
        );
        assert_fenced(
            &ack(b, "tok", ep, Some(other_token), w, g, acks, true).await,
            "token of tok2",
        );
        assert_fenced(
            &ack(b, "tok", ep, Some(t), "w_not_this_one", g, acks, true).await,
            "wrong wake_id",
        );
        assert_fenced(
            &ack(b, "tok", ep, Some(t), w, g + 1, acks, true).await,
            "wrong generation",
        );
        assert_fenced(
            &ack(b, "tok", ep, Some(wrong), w, g, acks, false).await,
            "heartbeat with a random token",
        );
    }
    assert_fenced(
        &release(b, "tok", Some(wrong), w, g).await,
        "release with a random token",
    );
    assert_fenced(
        &release(b, "tok", Some(other_token), w, g).await,
        "release with tok2's token",
    );
    assert_fenced(
        &release(b, "tok", Some(t), w, g + 1).await,
        "release with a wrong generation",
    );
    // Nothing moved, and the lease is still worker-1's.
    let r = get_sub(b, "tok").await;
    assert_eq!(
        &acked(&r.body["streams"])["tok/a"],
        zero,
        "a refused request moved the cursor"
    );
    let r = claim(b, "tok", "worker-2").await;
    assert_eq!(
        (r.status, &r.body["error"]["current_holder"]),
        (409, &json!("worker-1")),
        "{}",
        r.body
    );
}

/// Callback, ack and release need their own bearer token (missing → 401, wrong → 409 FENCED, no cursor moves, also after a restart); a deleted subscription's callback fails and moves no cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_scoped() {
    let rx = Receiver::start(Answer::Accept).await;
    let dir = TempDir::new("tok");
    let mut srv = Server::start(&dir.0, 0).await;
    let port = srv.addr.port();
    let b = srv.base();
    let zero = create_stream(&b, "wake/tok", None).await;
    for id in ["tok", "tok2"] {
        let c = json!({ "type": "pull-wake", "pattern": "tok/*", "wake_stream": "wake/tok", "lease_ttl_ms": 60000 });
        assert_eq!(put_sub(&b, id, c).await.status, 201);
    }
    let ta = create_stream(&b, "tok/a", Some(json!([{ "n": 1 }]))).await;
    let c = claim(&b, "tok", "worker-1").await;
    assert_eq!(c.status, 200, "{}", c.body);
    let (t, w, g) = (
        s(&c.body["token"]).to_owned(),
        s(&c.body["wake_id"]).to_owned(),
        c.body["generation"].as_u64().unwrap(),
    );
    let other = claim(&b, "tok2", "worker-1").await;
    assert_eq!(other.status, 200, "{}", other.body);
    let other_token = s(&other.body["token"]).to_owned();
    let wrong = B64URL.encode(rand::random::<[u8; 32]>());
    let pw = PullWake {
        t: t.clone(),
        w: w.clone(),
        g,
        ta: ta.clone(),
        zero: zero.clone(),
    };

    check_refusals(&b, &pw, &wrong, &other_token).await;

    // Same after a SIGKILL: the persisted lease keeps the real token valid, nothing else.
    srv.restart(&dir.0, port).await;
    let b = srv.base();
    check_refusals(&b, &pw, &wrong, &other_token).await;
    assert_ok(
        &ack(&b, "tok", "ack", Some(&t), &w, g, &[("tok/a", &ta)], true).await,
        false,
        "the real token after restart",
    );
    assert_eq!(acked_of(&b, "tok").await["tok/a"], ta);
    assert_fenced(
        &ack(&b, "tok", "ack", Some(&t), &w, g, &[("tok/a", &ta)], true).await,
        "replayed ack",
    );
    assert_eq!(
        acked_of(&b, "tok2").await["tok/a"],
        zero,
        "tok's ack moved tok2's cursor"
    );

    // Webhook callback tokens.
    let cfg = json!({ "type": "webhook", "pattern": "cb/*", "webhook": { "url": rx.url() }, "lease_ttl_ms": 60000 });
    assert_eq!(put_sub(&b, "cb", cfg.clone()).await.status, 201);
    let c1 = create_stream(&b, "cb/a", Some(json!([{ "n": 1 }]))).await;
    let d = rx.wait_for(1, SOON).await.remove(0);
    let (ct, cw, cg) = (
        s(&d.body["callback_token"]).to_owned(),
        s(&d.body["wake_id"]).to_owned(),
        d.body["generation"].as_u64().unwrap(),
    );
    let cu = s(&d.body["callback_url"]).to_owned();
    assert_eq!(
        cu,
        format!("{}/callback", sub_url(&b, "cb")),
        "callback_url"
    );
    let acks = &[("cb/a", c1.as_str())];
    assert_eq!(
        ack(&b, "cb", "callback", None, &cw, cg, acks, true)
            .await
            .status,
        401
    );
    assert_fenced(
        &ack(&b, "cb", "callback", Some(&wrong), &cw, cg, acks, true).await,
        "callback with a random token",
    );
    assert_fenced(
        &ack(&b, "cb", "callback", Some(&t), &cw, cg, acks, true).await,
        "callback with a claim token of tok",
    );
    assert_fenced(
        &ack(&b, "tok", "ack", Some(&ct), &cw, cg, acks, true).await,
        "callback token on another subscription",
    );
    assert_eq!(
        acked_of(&b, "cb").await["cb/a"],
        zero,
        "a refused callback moved the cursor"
    );
    assert_ok(
        &ack(&b, "cb", "callback", Some(&ct), &cw, cg, &[], false).await,
        false,
        "callback heartbeat",
    );

    // Deleted: the in-flight wake's callback fails, also after a restart.
    assert_eq!(
        call("DELETE", &sub_url(&b, "cb"), None, None).await.status,
        204
    );
    let r = ack(&b, "cb", "callback", Some(&ct), &cw, cg, acks, true).await;
    assert!(
        matches!(r.status, 404 | 409 | 410),
        "callback of a deleted subscription: {} {}",
        r.status,
        r.body
    );
    assert_eq!(get_sub(&b, "cb").await.status, 404);
    srv.restart(&dir.0, port).await;
    let b = srv.base();
    assert_eq!(
        get_sub(&b, "cb").await.status,
        404,
        "the deletion did not survive the restart"
    );
    let r = ack(&b, "cb", "callback", Some(&ct), &cw, cg, acks, true).await;
    assert!(
        matches!(r.status, 404 | 409 | 410),
        "callback of a deleted subscription after restart: {} {}",
        r.status,
        r.body
    );

    // Re-created under the same id: a fresh subscription the old token cannot touch.
    let r = put_sub(&b, "cb", cfg).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        acked(&r.body["streams"])["cb/a"],
        c1,
        "re-created subscription links at the tail"
    );
    let n = rx.deliveries().len();
    let c2 = append(&b, "cb/a", json!({ "n": 2 })).await;
    let d = rx.wait_for(n + 1, SOON).await.remove(n);
    let (ct2, cw2, cg2) = (
        s(&d.body["callback_token"]).to_owned(),
        s(&d.body["wake_id"]).to_owned(),
        d.body["generation"].as_u64().unwrap(),
    );
    let acks2 = &[("cb/a", c2.as_str())];
    assert_fenced(
        &ack(&b, "cb", "callback", Some(&ct), &cw, cg, acks2, true).await,
        "old token, old wake",
    );
    assert_fenced(
        &ack(&b, "cb", "callback", Some(&ct), &cw2, cg2, acks2, true).await,
        "old token, new wake",
    );
    assert_eq!(
        acked_of(&b, "cb").await["cb/a"],
        c1,
        "the deleted subscription's token moved a cursor"
    );
    assert_ok(
        &ack(&b, "cb", "callback", Some(&ct2), &cw2, cg2, acks2, true).await,
        false,
        "new token",
    );
    assert_eq!(acked_of(&b, "cb").await["cb/a"], c2);
}

// ---------------------------------------------------------------------------
// Reproductions of server bugs found while writing these tests. They fail
// against the current server and are ignored so the suite stays green; run
// them with `-- --ignored` and un-ignore once fixed.
// ---------------------------------------------------------------------------

/// A pull-wake subscription `pull` on `events/*` with wake stream `wake/pool`.
async fn pull_setup(b: &str, lease_ttl_ms: u64) {
    create_stream(b, "wake/pool", None).await;
    let config = json!({ "type": "pull-wake", "pattern": "events/*", "wake_stream": "wake/pool", "lease_ttl_ms": lease_ttl_ms });
    assert_eq!(put_sub(b, "pull", config).await.status, 201);
}

/// Claims `pull` and acks every stream at its tail with done.
async fn drain(b: &str) {
    let c = claim_eventually(b, "pull", "drainer", None).await;
    let mut acks = Vec::new();
    for (p, (_, tail, _)) in claim_streams(&c) {
        acks.push((p, tail));
    }
    let acks: Vec<(&str, &str)> = acks.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
    let r = ack(
        b,
        "pull",
        "ack",
        Some(s(&c["token"])),
        s(&c["wake_id"]),
        c["generation"].as_u64().unwrap(),
        &acks,
        true,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn max_generation(b: &str) -> u64 {
    read_json(b, "wake/pool")
        .await
        .iter()
        .filter_map(|e| e["generation"].as_u64())
        .max()
        .unwrap_or(0)
}

/// BUG: a SIGKILL while a glob-matching stream is created can leave it unlinked for good, so its data never wakes anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_glob_link_lost_when_killed_during_create() {
    let dir = TempDir::new("bug-link");
    let mut srv = Server::start(&dir.0, 0).await;
    let mut b = srv.base();
    pull_setup(&b, 1000).await;
    for i in 0..20 {
        let path = format!("events/k{i}");
        let url = format!("{b}/{path}");
        let create = tokio::spawn(async move {
            client()
                .put(url)
                .header("content-type", "application/json")
                .send()
                .await
        });
        std::thread::sleep(Duration::from_micros(rand::random::<u64>() % 4000));
        srv.restart(&dir.0, 0).await;
        let _ = create.await;
        b = srv.base();
        // What a client does after losing the response: retry the idempotent create, then append.
        create_stream(&b, &path, None).await;
        let last = max_generation(&b).await;
        append(&b, &path, json!({ "i": i })).await;
        let links = acked_of(&b, "pull").await;
        assert!(
            links.contains_key(&path),
            "iteration {i}: {path} matches events/* but is not linked: {links:?}"
        );
        wait_wake_within(&b, "wake/pool", "pull", last, Duration::from_secs(5)).await;
        drain(&b).await;
    }
}

/// BUG: a SIGKILL right after an append can persist a new wake without its wake event; it is never re-announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_kill_right_after_append_can_lose_the_wake() {
    let dir = TempDir::new("bug-wake");
    let mut srv = Server::start(&dir.0, 0).await;
    let mut b = srv.base();
    pull_setup(&b, 1000).await;
    create_stream(&b, "events/a", None).await;
    // Probabilistic: the window was hit in roughly 1 of 15 to 60 kills here.
    for i in 0..100 {
        let last = max_generation(&b).await;
        append(&b, "events/a", json!({ "i": i })).await;
        srv.restart(&dir.0, 0).await;
        b = srv.base();
        let events = async {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if max_generation(&b).await > last {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        };
        if !events.await {
            let c = claim(&b, "pull", "blind").await;
            panic!(
                "iteration {i}: no wake event after the restart (wake generations in the stream end at {last}); \
                 a blind claim finds the unannounced wake: {} {}",
                c.status, c.body
            );
        }
        drain(&b).await;
    }
}

/// BUG: the crash state above, reached deterministically: a wake whose event could not be written is never re-announced, not even after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_unannounced_wake_is_never_reannounced() {
    let dir = TempDir::new("bug-unann");
    let mut srv = Server::start(&dir.0, 0).await;
    let b = srv.base();
    let config = json!({ "type": "pull-wake", "pattern": "events/*", "wake_stream": "wake/pool", "lease_ttl_ms": 1000 });
    assert_eq!(put_sub(&b, "pull", config).await.status, 201);
    // The wake for this append cannot be written: the wake stream does not exist yet.
    create_stream(&b, "events/a", Some(json!([{ "n": 1 }]))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    create_stream(&b, "wake/pool", None).await;
    append(&b, "events/a", json!({ "n": 2 })).await;
    srv.restart(&dir.0, 0).await;
    let b = srv.base();
    append(&b, "events/a", json!({ "n": 3 })).await;
    create_stream(&b, "events/b", Some(json!([{ "n": 1 }]))).await;
    wait_wake_within(&b, "wake/pool", "pull", 0, Duration::from_secs(5)).await;
}

/// BUG: a deleted and re-created stream keeps its old acked_offset, so the new stream's data is treated as acked and wakes nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_recreated_stream_keeps_stale_cursor() {
    let dir = TempDir::new("bug-recreate");
    let srv = Server::start(&dir.0, 0).await;
    let b = srv.base();
    pull_setup(&b, 1000).await;
    create_stream(
        &b,
        "events/a",
        Some(json!([{ "n": 1 }, { "n": 2 }, { "n": 3 }, { "n": 4 }])),
    )
    .await;
    wait_wake(&b, "wake/pool", "pull", 0).await;
    drain(&b).await;
    let last = max_generation(&b).await;
    assert_eq!(
        call("DELETE", &format!("{b}/events/a"), None, None)
            .await
            .status,
        204
    );
    let t = create_stream(&b, "events/a", Some(json!([{ "n": 5 }]))).await;
    let links = acked_of(&b, "pull").await;
    assert!(
        links["events/a"] <= t,
        "acked_offset {} is past the new stream's tail {t}",
        links["events/a"]
    );
    wait_wake_within(&b, "wake/pool", "pull", last, Duration::from_secs(5)).await;
}
