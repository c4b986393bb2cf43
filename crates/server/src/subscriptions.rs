//! Subscriptions (PROTOCOL.md sections 6 and 7): durable cursors over a set
//! of streams that wake workers by signed webhook or through a wake stream.
//!
//! All subscription state lives in one [`Registry`] behind a mutex (it is
//! small and changes rarely compared with appends); every change is written
//! to `DATA_DIR/subscriptions/state.json` (write, fsync, rename, fsync dir)
//! before the request that caused it is answered, so cursors, generations,
//! leases and retry schedules survive a restart. The Ed25519 signing key is
//! kept beside it (`signing.key`, mode 0600); only its public half is served.
//!
//! A background task ([`Subscriptions::run`]) issues wakes: whenever a linked
//! stream has data past its acked offset and no wake is in flight, it starts
//! a new generation and either POSTs a signed webhook or appends a wake event
//! to the wake stream. Leases expire; failed webhooks are retried with
//! exponential backoff (1 s to 60 s, 20 % jitter).

use crate::request::{validate_stream_path, Target};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use bytes::Bytes;
use durable_streams_protocol::Offset;
use durable_streams_storage::{AppendRequest, Engine};
use ed25519_dalek::{Signer, SigningKey};
use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Lease bounds and default (PROTOCOL.md 6.2).
const LEASE_MIN_MS: u64 = 1_000;
const LEASE_MAX_MS: u64 = 600_000;
const LEASE_DEFAULT_MS: u64 = 30_000;
/// Webhook calls in flight at once, and how long one may take.
const MAX_WEBHOOKS_IN_FLIGHT: usize = 64;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    B64URL.encode(b)
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A subscription's normalised configuration (hashed for re-confirmation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Config {
    kind: String,
    pattern: Option<String>,
    streams: Vec<String>,
    webhook_url: Option<String>,
    wake_stream: Option<String>,
    lease_ttl_ms: u64,
    description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Link {
    glob: bool,
    explicit: bool,
    acked: u64,
    /// `acked` when a create of this path began ([`Subscriptions::stream_creating`]).
    /// The create's [`Subscriptions::stream_created`] resets the cursor
    /// only if no ack moved it since: an ack in between was for the new
    /// stream's own data, delivered while the create was finishing. Not
    /// persisted (a crash in between leaves the cursor as it was).
    #[serde(skip)]
    acked_before_create: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Wake {
    wake_id: String,
    generation: u64,
    holder: Option<String>,
    /// SHA-256 of the bearer token for this wake (the token itself is never stored).
    token_sha256: Option<String>,
    lease_until_ms: Option<u64>,
    /// Tail offsets at wake time, auto-acked by a webhook's `{"done":true}`.
    snapshot: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Retry {
    attempt: u32,
    next_attempt_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sub {
    id: String,
    config: Config,
    hash: String,
    created_at: String,
    /// `http://host/prefix` as seen when created: callback and JWKS URLs.
    root_url: String,
    links: BTreeMap<String, Link>,
    generation: u64,
    wake: Option<Wake>,
    retry: Option<Retry>,
    deleted: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    subs: BTreeMap<String, Sub>,
    /// Subscriptions whose pending work must be re-evaluated.
    #[serde(skip)]
    dirty: HashSet<String>,
}

/// `*` matches one path segment, `**` zero or more.
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    fn go(p: &[&str], s: &[&str]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((&"**", rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some((seg, rest)) => match s.split_first() {
                Some((x, srest)) => (*seg == "*" || seg == x) && go(rest, srest),
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    go(&p, &s)
}

fn ip_is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return ip_is_forbidden(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
        }
    }
}

/// The localhost development exception: `localhost` and 127.0.0.x (and `::1`).
fn is_dev_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.octets()[..3] == [127, 0, 0],
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// Validates a webhook URL against SSRF (PROTOCOL.md 12.8): https, except
/// the localhost development exception; no private, loopback, link-local or
/// metadata addresses, literally or after DNS resolution.
pub async fn validate_webhook_url(raw: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("invalid URL: {e}"))?;
    let host = url.host().ok_or("URL has no host")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in webhook URLs are not allowed".into());
    }
    if is_dev_host(&host) {
        return match url.scheme() {
            "http" | "https" => Ok(url),
            _ => Err("webhook URLs must use https".into()),
        };
    }
    if url.scheme() != "https" {
        return Err("webhook URLs must use https (http only for localhost)".into());
    }
    match host {
        url::Host::Ipv4(ip) if ip_is_forbidden(IpAddr::V4(ip)) => {
            Err("private or local address".into())
        }
        url::Host::Ipv6(ip) if ip_is_forbidden(IpAddr::V6(ip)) => {
            Err("private or local address".into())
        }
        url::Host::Domain(d) => {
            let port = url.port_or_known_default().unwrap_or(443);
            // A name that resolves to a private address is refused too. A
            // name that does not resolve now is accepted; it is checked again
            // before every delivery.
            if let Ok(addrs) = tokio::net::lookup_host((d, port)).await {
                for a in addrs {
                    if ip_is_forbidden(a.ip()) {
                        return Err(format!("{d} resolves to a private or local address"));
                    }
                }
            }
            Ok(url)
        }
        _ => Ok(url),
    }
}

/// The subscription service of one server.
#[derive(Debug)]
pub struct Subscriptions {
    reg: Mutex<Registry>,
    /// Number of live subscriptions, so stream hooks skip the lock when 0.
    active: std::sync::atomic::AtomicUsize,
    engine: Arc<dyn Engine>,
    key: SigningKey,
    kid: String,
    dir: Option<PathBuf>,
    notify: tokio::sync::Notify,
    http: reqwest::Client,
    webhooks: Arc<tokio::sync::Semaphore>,
}

/// A subscription API answer: status and JSON body (or none).
pub type Reply = (u16, Option<Value>);

fn error(status: u16, code: &str, message: &str) -> Reply {
    (
        status,
        Some(json!({ "error": { "code": code, "message": message } })),
    )
}

impl Subscriptions {
    /// Loads (or creates) the state and signing key under `dir`; in memory
    /// (key per process) without one.
    pub fn open(engine: Arc<dyn Engine>, dir: Option<PathBuf>) -> std::io::Result<Self> {
        let mut reg = Registry::default();
        let key = match &dir {
            None => {
                let mut seed = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut seed);
                SigningKey::from_bytes(&seed)
            }
            Some(d) => {
                std::fs::create_dir_all(d)?;
                let key_path = d.join("signing.key");
                let seed = match std::fs::read(&key_path) {
                    Ok(b) if b.len() == 32 => {
                        let mut s = [0u8; 32];
                        s.copy_from_slice(&b);
                        s
                    }
                    Ok(_) => {
                        return Err(std::io::Error::other(
                            "subscriptions/signing.key is corrupt",
                        ))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let mut s = [0u8; 32];
                        rand::thread_rng().fill_bytes(&mut s);
                        write_durably(d, "signing.key", &s, true)?;
                        s
                    }
                    Err(e) => return Err(e),
                };
                match std::fs::read(d.join("state.json")) {
                    Ok(b) => reg = serde_json::from_slice(&b).map_err(std::io::Error::other)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                SigningKey::from_bytes(&seed)
            }
        };
        // Re-evaluate everything after a restart. A pull wake that was never
        // claimed may never have been announced (the process died between
        // deciding it and writing the event): forget it, the scheduler
        // issues a fresh one if work is pending.
        for s in reg.subs.values_mut() {
            if s.wake
                .as_ref()
                .is_some_and(|w| w.holder.is_none() && w.lease_until_ms.is_none())
            {
                s.wake = None;
            }
        }
        reg.dirty = reg.subs.keys().cloned().collect();
        let active = reg.subs.values().filter(|s| !s.deleted).count();
        let public = key.verifying_key().to_bytes();
        let kid = format!("ds_{}", &B64URL.encode(Sha256::digest(public))[..22]);
        let http = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Subscriptions {
            reg: Mutex::new(reg),
            active: std::sync::atomic::AtomicUsize::new(active),
            engine,
            key,
            kid,
            dir,
            notify: tokio::sync::Notify::new(),
            http,
            webhooks: Arc::new(tokio::sync::Semaphore::new(MAX_WEBHOOKS_IN_FLIGHT)),
        })
    }

    /// Persists the registry before the caller answers (see module docs).
    fn persist(&self, reg: &Registry) -> Result<(), Reply> {
        let Some(d) = &self.dir else { return Ok(()) };
        let body =
            serde_json::to_vec(reg).map_err(|_| error(500, "INTERNAL", "cannot encode state"))?;
        write_durably(d, "state.json", &body, false).map_err(|e| {
            tracing::error!(error = %e, "cannot persist subscriptions");
            error(503, "STORAGE_FAILED", "cannot persist subscription state")
        })
    }

    pub fn jwks(&self) -> Value {
        json!({ "keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": self.kid, "use": "sig", "alg": "EdDSA",
            "x": B64URL.encode(self.key.verifying_key().to_bytes()),
        }]})
    }

    /// Called BEFORE a stream is created: links it at offset 0 to every
    /// subscription whose pattern matches, durably, so that a crash between
    /// the create and the link cannot leave its data unwatched ("linked
    /// before that append"). Linking a stream that then fails to be created
    /// is harmless: it has no data to be pending.
    pub fn stream_creating(&self, path: &str) {
        self.link_matching(path, false);
    }

    /// Called after a stream was created anew (201): any cursor left from a
    /// deleted or expired stream at this path starts over at 0, unless an
    /// ack moved it since [`Subscriptions::stream_creating`] (that ack was
    /// for the new stream's own data).
    pub fn stream_created(&self, path: &str) {
        self.link_matching(path, true);
    }

    /// Called after a stream was deleted: cursors at this path start over,
    /// so a re-created stream's data is pending again.
    pub fn stream_deleted(&self, path: &str) {
        if self.active.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        let mut reg = self.reg.lock();
        let mut changed = false;
        for s in reg.subs.values_mut().filter(|s| !s.deleted) {
            if let Some(l) = s.links.get_mut(path) {
                changed |= l.acked != 0;
                l.acked = 0;
            }
        }
        if changed {
            let _ = self.persist(&reg);
        }
    }

    fn link_matching(&self, path: &str, reset: bool) {
        if self.active.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        let mut reg = self.reg.lock();
        let mut touched = Vec::new();
        for s in reg.subs.values_mut().filter(|s| !s.deleted) {
            let matches = s
                .config
                .pattern
                .as_deref()
                .is_some_and(|p| glob_matches(p, path));
            if let Some(l) = s.links.get_mut(path) {
                l.glob |= matches;
                if reset {
                    let before = l.acked_before_create.take();
                    if l.acked != 0 && before.is_none_or(|b| b == l.acked) {
                        l.acked = 0;
                        touched.push(s.id.clone());
                    }
                } else {
                    l.acked_before_create = Some(l.acked);
                }
            } else if matches {
                s.links.insert(
                    path.to_owned(),
                    Link {
                        glob: true,
                        explicit: false,
                        acked: 0,
                        acked_before_create: (!reset).then_some(0),
                    },
                );
                touched.push(s.id.clone());
            }
        }
        if !touched.is_empty() {
            let _ = self.persist(&reg);
            reg.dirty.extend(touched);
            self.notify.notify_one();
        }
    }

    /// Called after data was appended to a stream.
    pub fn stream_changed(&self, path: &str) {
        if self.active.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return; // no subscriptions: no lock on the append path
        }
        let mut reg = self.reg.lock();
        let ids: Vec<String> = reg
            .subs
            .values()
            .filter(|s| !s.deleted && s.links.contains_key(path))
            .map(|s| s.id.clone())
            .collect();
        if !ids.is_empty() {
            reg.dirty.extend(ids);
            self.notify.notify_one();
        }
    }

    async fn tail_of(&self, path: &str) -> u64 {
        self.engine.head(path).await.map(|m| m.tail.0).unwrap_or(0)
    }

    fn link_json(path: &str, l: &Link, tail: Option<u64>) -> Value {
        let mut v = json!({
            "path": path,
            "link_type": if l.explicit { "explicit" } else { "glob" },
            "acked_offset": Offset(l.acked).to_string(),
        });
        if let Some(t) = tail {
            v["tail_offset"] = json!(Offset(t.max(l.acked)).to_string());
            v["has_pending"] = json!(t > l.acked);
        }
        v
    }

    fn describe(&self, s: &Sub) -> Value {
        let c = &s.config;
        let webhook = c.webhook_url.as_ref().map(|u| {
            json!({ "url": u, "signing": {
                "alg": "ed25519", "kid": self.kid, "jwks_url": format!("{}/__ds/jwks.json", s.root_url),
            }})
        });
        let failed = s.retry.is_some();
        json!({
            "id": s.id,
            "subscription_id": s.id,
            "type": c.kind,
            "pattern": c.pattern,
            "streams": s.links.iter().map(|(p, l)| Self::link_json(p, l, None)).collect::<Vec<_>>(),
            "webhook": webhook,
            "wake_stream": c.wake_stream,
            "lease_ttl_ms": c.lease_ttl_ms,
            "created_at": s.created_at,
            "status": if failed { "failed" } else { "active" },
            "description": c.description,
        })
    }

    async fn parse_config(body: &[u8]) -> Result<Config, Reply> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| error(400, "INVALID_REQUEST", &format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| error(400, "INVALID_REQUEST", "body must be a JSON object"))?;
        let str_field = |k: &str| -> Result<Option<String>, Reply> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(error(
                    400,
                    "INVALID_REQUEST",
                    &format!("{k} must be a string"),
                )),
            }
        };
        let kind =
            str_field("type")?.ok_or_else(|| error(400, "INVALID_REQUEST", "type is required"))?;
        if kind != "webhook" && kind != "pull-wake" {
            return Err(error(
                400,
                "INVALID_REQUEST",
                "type must be webhook or pull-wake",
            ));
        }
        let pattern = str_field("pattern")?;
        if let Some(p) = &pattern {
            if p.is_empty() || p.split('/').any(str::is_empty) {
                return Err(error(400, "INVALID_REQUEST", "invalid pattern"));
            }
        }
        let mut streams = Vec::new();
        match obj.get("streams") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for s in a {
                    let s = s
                        .as_str()
                        .ok_or_else(|| error(400, "INVALID_REQUEST", "streams must be strings"))?;
                    streams.push(normalize_path(s)?);
                }
            }
            Some(_) => return Err(error(400, "INVALID_REQUEST", "streams must be an array")),
        }
        streams.sort();
        streams.dedup();
        if pattern.is_none() && streams.is_empty() {
            return Err(error(
                400,
                "INVALID_REQUEST",
                "pattern or streams is required",
            ));
        }
        let webhook_url = match obj.get("webhook") {
            None | Some(Value::Null) => None,
            Some(w) => Some(
                w.get("url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| error(400, "INVALID_REQUEST", "webhook.url is required"))?
                    .to_owned(),
            ),
        };
        let wake_stream = str_field("wake_stream")?
            .map(|s| normalize_path(&s))
            .transpose()?;
        match kind.as_str() {
            "webhook" => {
                let url = webhook_url
                    .as_deref()
                    .ok_or_else(|| error(400, "INVALID_REQUEST", "webhook.url is required"))?;
                validate_webhook_url(url)
                    .await
                    .map_err(|m| error(400, "WEBHOOK_URL_REJECTED", &m))?;
            }
            _ => {
                if wake_stream.is_none() {
                    return Err(error(
                        400,
                        "INVALID_REQUEST",
                        "wake_stream is required for pull-wake",
                    ));
                }
            }
        }
        let lease_ttl_ms = match obj.get("lease_ttl_ms") {
            None | Some(Value::Null) => LEASE_DEFAULT_MS,
            Some(v) => v
                .as_u64()
                .filter(|n| (LEASE_MIN_MS..=LEASE_MAX_MS).contains(n))
                .ok_or_else(|| {
                    error(400, "INVALID_REQUEST", "lease_ttl_ms must be 1000..=600000")
                })?,
        };
        Ok(Config {
            kind,
            pattern,
            streams,
            webhook_url,
            wake_stream,
            lease_ttl_ms,
            description: str_field("description")?,
        })
    }

    /// `PUT __ds/subscriptions/:id`
    pub async fn put(&self, id: &str, body: &[u8], root_url: String) -> Reply {
        let config = match Self::parse_config(body).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let hash = sha256_hex(&serde_json::to_vec(&config).unwrap_or_default());
        {
            let reg = self.reg.lock();
            if let Some(s) = reg.subs.get(id).filter(|s| !s.deleted) {
                return if s.hash == hash {
                    (200, Some(self.describe(s)))
                } else {
                    error(
                        409,
                        "CONFIG_MISMATCH",
                        "subscription exists with a different configuration",
                    )
                };
            }
        }
        // Link existing streams at their current tail (no historical replay).
        let mut links = BTreeMap::new();
        if let Some(p) = &config.pattern {
            for path in self.engine.list_paths().await {
                if glob_matches(p, &path) {
                    let tail = self.tail_of(&path).await;
                    links.insert(
                        path,
                        Link {
                            glob: true,
                            explicit: false,
                            acked: tail,
                            acked_before_create: None,
                        },
                    );
                }
            }
        }
        for path in &config.streams {
            let tail = self.tail_of(path).await;
            links
                .entry(path.clone())
                .or_insert(Link {
                    glob: false,
                    explicit: true,
                    acked: tail,
                    acked_before_create: None,
                })
                .explicit = true;
        }
        let sub = Sub {
            id: id.to_owned(),
            config,
            hash,
            created_at: durable_streams_protocol::parse::format_expires_at(&chrono::Utc::now()),
            root_url,
            links,
            generation: 0,
            wake: None,
            retry: None,
            deleted: false,
        };
        let mut reg = self.reg.lock();
        if let Some(s) = reg.subs.get(id).filter(|s| !s.deleted) {
            // A concurrent PUT of the same id won.
            return if s.hash == sub.hash {
                (200, Some(self.describe(s)))
            } else {
                error(409, "CONFIG_MISMATCH", "subscription exists")
            };
        }
        let desc = self.describe(&sub);
        reg.subs.insert(id.to_owned(), sub);
        if let Err(r) = self.persist(&reg) {
            reg.subs.remove(id);
            return r;
        }
        reg.dirty.insert(id.to_owned());
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.notify.notify_one();
        (201, Some(desc))
    }

    pub fn get(&self, id: &str) -> Reply {
        let reg = self.reg.lock();
        match reg.subs.get(id).filter(|s| !s.deleted) {
            Some(s) => (200, Some(self.describe(s))),
            None => error(404, "NOT_FOUND", "no such subscription"),
        }
    }

    /// Tombstones the subscription: in-flight callbacks, acks and releases
    /// fail from now on.
    pub fn delete(&self, id: &str) -> Reply {
        let mut reg = self.reg.lock();
        let Some(s) = reg.subs.get_mut(id).filter(|s| !s.deleted) else {
            return error(404, "NOT_FOUND", "no such subscription");
        };
        s.deleted = true;
        s.wake = None;
        s.retry = None;
        s.links.clear();
        match self.persist(&reg) {
            Ok(()) => {
                self.active
                    .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                (204, None)
            }
            Err(r) => r,
        }
    }

    pub async fn add_streams(&self, id: &str, body: &[u8]) -> Reply {
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return error(400, "INVALID_REQUEST", &format!("invalid JSON: {e}")),
        };
        let Some(list) = v.get("streams").and_then(Value::as_array) else {
            return error(400, "INVALID_REQUEST", "streams must be an array");
        };
        let mut paths = Vec::new();
        for s in list {
            match s.as_str().map(normalize_path) {
                Some(Ok(p)) => paths.push(p),
                Some(Err(r)) => return r,
                None => return error(400, "INVALID_REQUEST", "streams must be strings"),
            }
        }
        let mut tails = Vec::new();
        for p in &paths {
            tails.push(self.tail_of(p).await);
        }
        let mut reg = self.reg.lock();
        let Some(s) = reg.subs.get_mut(id).filter(|s| !s.deleted) else {
            return error(404, "NOT_FOUND", "no such subscription");
        };
        for (p, tail) in paths.into_iter().zip(tails) {
            s.links
                .entry(p)
                .or_insert(Link {
                    glob: false,
                    explicit: true,
                    acked: tail,
                    acked_before_create: None,
                })
                .explicit = true;
        }
        match self.persist(&reg) {
            Ok(()) => (204, None),
            Err(r) => r,
        }
    }

    pub fn remove_stream(&self, id: &str, path: &str) -> Reply {
        let mut reg = self.reg.lock();
        let Some(s) = reg.subs.get_mut(id).filter(|s| !s.deleted) else {
            return error(404, "NOT_FOUND", "no such subscription");
        };
        let glob_still = s
            .config
            .pattern
            .as_deref()
            .is_some_and(|p| glob_matches(p, path));
        if let Some(l) = s.links.get_mut(path) {
            l.explicit = false;
            if !(l.glob && glob_still) {
                s.links.remove(path);
            }
        }
        match self.persist(&reg) {
            Ok(()) => (204, None),
            Err(r) => r,
        }
    }

    /// Current tail of every link of `id`, fetched without holding the lock.
    async fn tails(&self, id: &str) -> BTreeMap<String, u64> {
        let paths: Vec<String> = self
            .reg
            .lock()
            .subs
            .get(id)
            .map(|s| s.links.keys().cloned().collect())
            .unwrap_or_default();
        let mut out = BTreeMap::new();
        for p in paths {
            let t = self.tail_of(&p).await;
            out.insert(p, t);
        }
        out
    }

    fn has_pending(s: &Sub, tails: &BTreeMap<String, u64>) -> bool {
        s.links
            .iter()
            .any(|(p, l)| tails.get(p).is_some_and(|t| *t > l.acked))
    }

    fn streams_json(s: &Sub, tails: &BTreeMap<String, u64>) -> Vec<Value> {
        s.links
            .iter()
            .map(|(p, l)| Self::link_json(p, l, Some(*tails.get(p).unwrap_or(&l.acked))))
            .collect()
    }

    fn new_wake(
        s: &mut Sub,
        tails: &BTreeMap<String, u64>,
        holder: Option<String>,
        lease: bool,
    ) -> (Wake, String) {
        s.generation += 1;
        let token = random_token();
        let wake = Wake {
            wake_id: format!("w_{}", &random_token()[..16]),
            generation: s.generation,
            holder,
            token_sha256: Some(sha256_hex(token.as_bytes())),
            lease_until_ms: lease.then(|| now_ms() + s.config.lease_ttl_ms),
            snapshot: s
                .links
                .keys()
                .map(|p| (p.clone(), *tails.get(p).unwrap_or(&0)))
                .collect(),
        };
        s.wake = Some(wake.clone());
        (wake, token)
    }

    /// Checks a callback/ack/release against the current wake (7.3).
    fn fenced(s: &Sub, token: &str, wake_id: &str, generation: u64) -> bool {
        match &s.wake {
            None => true,
            Some(w) => {
                w.wake_id != wake_id
                    || w.generation != generation
                    || w.token_sha256.as_deref() != Some(sha256_hex(token.as_bytes()).as_str())
                    || w.lease_until_ms.is_some_and(|t| t < now_ms())
            }
        }
    }

    /// `callback` (webhook) and `ack` (pull-wake): apply acks; `done`
    /// releases the lease, otherwise the lease is extended (heartbeat).
    pub async fn ack(&self, id: &str, token: Option<&str>, body: &[u8]) -> Reply {
        let Some(token) = token else {
            return error(401, "UNAUTHORIZED", "a Bearer token is required");
        };
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return error(400, "INVALID_REQUEST", &format!("invalid JSON: {e}")),
        };
        let wake_id = v.get("wake_id").and_then(Value::as_str).unwrap_or("");
        let generation = v.get("generation").and_then(Value::as_u64).unwrap_or(0);
        let done = v.get("done").and_then(Value::as_bool).unwrap_or(false);
        let mut acks = Vec::new();
        for a in v
            .get("acks")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let (Some(stream), Some(off)) = (
                a.get("stream").and_then(Value::as_str),
                a.get("offset").and_then(Value::as_str),
            ) else {
                return error(400, "INVALID_REQUEST", "acks need stream and offset");
            };
            match Offset::parse(off) {
                Ok(o) => acks.push((stream.to_owned(), o.0)),
                Err(_) => return error(400, "INVALID_REQUEST", "invalid offset in acks"),
            }
        }
        let tails = self.tails(id).await;
        let mut reg = self.reg.lock();
        let Some(s) = reg.subs.get_mut(id).filter(|s| !s.deleted) else {
            return error(404, "NOT_FOUND", "no such subscription");
        };
        if Self::fenced(s, token, wake_id, generation) {
            return error(409, "FENCED", "stale wake_id, generation or token");
        }
        for (stream, off) in acks {
            if let Some(l) = s.links.get_mut(&stream) {
                // Never past the data that exists.
                let cap = tails.get(&stream).copied().unwrap_or(l.acked).max(l.acked);
                l.acked = l.acked.max(off.min(cap));
            }
        }
        let next_wake = if done {
            s.wake = None;
            s.retry = None;
            Self::has_pending(s, &tails)
        } else {
            if let Some(w) = &mut s.wake {
                w.lease_until_ms = Some(now_ms() + s.config.lease_ttl_ms);
            }
            false
        };
        if let Err(r) = self.persist(&reg) {
            return r;
        }
        if done {
            reg.dirty.insert(id.to_owned());
            self.notify.notify_one();
        }
        (200, Some(json!({ "ok": true, "next_wake": next_wake })))
    }

    /// `claim`: a pull-wake worker takes the lease of the current wake, or
    /// of a new one when work is pending.
    pub async fn claim(&self, id: &str, body: &[u8]) -> Reply {
        let worker = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("worker").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "anonymous".into());
        let tails = self.tails(id).await;
        let mut reg = self.reg.lock();
        let Some(s) = reg.subs.get_mut(id).filter(|s| !s.deleted) else {
            return error(404, "NOT_FOUND", "no such subscription");
        };
        if s.config.kind != "pull-wake" {
            return error(
                400,
                "INVALID_REQUEST",
                "only pull-wake subscriptions can be claimed",
            );
        }
        let now = now_ms();
        if let Some(w) = &s.wake {
            if let (Some(holder), Some(until)) = (&w.holder, w.lease_until_ms) {
                if until >= now {
                    return (
                        409,
                        Some(json!({ "error": {
                            "code": "ALREADY_CLAIMED", "current_holder": holder, "generation": w.generation,
                        }})),
                    );
                }
            }
        }
        let unclaimed = s.wake.as_ref().is_some_and(|w| w.holder.is_none());
        if !unclaimed && !Self::has_pending(s, &tails) {
            return error(409, "NO_PENDING_WORK", "nothing to claim");
        }
        // Claiming an announced wake keeps its generation; otherwise (an
        // expired lease, or work found without a wake) a new generation.
        let (wake, token) = if unclaimed {
            let token = random_token();
            let lease = s.config.lease_ttl_ms;
            let w = s.wake.as_mut().expect("checked above");
            w.holder = Some(worker.clone());
            w.token_sha256 = Some(sha256_hex(token.as_bytes()));
            w.lease_until_ms = Some(now + lease);
            w.snapshot = s
                .links
                .keys()
                .map(|p| (p.clone(), *tails.get(p).unwrap_or(&0)))
                .collect();
            (w.clone(), token)
        } else {
            Self::new_wake(s, &tails, Some(worker), true)
        };
        let reply = json!({
            "wake_id": wake.wake_id,
            "generation": wake.generation,
            "token": token,
            "streams": Self::streams_json(s, &tails),
            "lease_ttl_ms": s.config.lease_ttl_ms,
        });
        match self.persist(&reg) {
            Ok(()) => (200, Some(reply)),
            Err(r) => r,
        }
    }

    /// `release`: gives the lease back without acking.
    pub fn release(&self, id: &str, token: Option<&str>, body: &[u8]) -> Reply {
        let Some(token) = token else {
            return error(401, "UNAUTHORIZED", "a Bearer token is required");
        };
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let wake_id = v.get("wake_id").and_then(Value::as_str).unwrap_or("");
        let generation = v.get("generation").and_then(Value::as_u64).unwrap_or(0);
        let mut reg = self.reg.lock();
        let Some(s) = reg.subs.get_mut(id).filter(|s| !s.deleted) else {
            return error(404, "NOT_FOUND", "no such subscription");
        };
        if Self::fenced(s, token, wake_id, generation) {
            return error(409, "FENCED", "stale wake_id, generation or token");
        }
        s.wake = None;
        if let Err(r) = self.persist(&reg) {
            return r;
        }
        reg.dirty.insert(id.to_owned());
        self.notify.notify_one();
        (204, None)
    }

    /// The wake scheduler: runs until `shutdown` is cancelled.
    pub async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        // Link streams that match a pattern but were created while the
        // process was dying before their link was saved.
        if self.active.load(std::sync::atomic::Ordering::Acquire) > 0 {
            for path in self.engine.list_paths().await {
                self.link_matching(&path, false);
            }
        }
        loop {
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.cancelled() => return,
            }
            self.tick().await;
        }
    }

    /// Expires leases, honours retry schedules, and issues wakes for
    /// subscriptions with pending work.
    async fn tick(self: &Arc<Self>) {
        let now = now_ms();
        let candidates: Vec<String> = {
            let mut reg = self.reg.lock();
            let mut expired = false;
            let mut due = Vec::new();
            for s in reg.subs.values_mut().filter(|s| !s.deleted) {
                if let Some(w) = &s.wake {
                    if w.lease_until_ms.is_some_and(|t| t < now) {
                        // Lease expired: clear holder and token, wake again if needed.
                        s.wake = None;
                        expired = true;
                        due.push(s.id.clone());
                    }
                }
                if s.retry
                    .as_ref()
                    .is_some_and(|r| r.next_attempt_at_ms <= now)
                    && s.wake.is_none()
                {
                    due.push(s.id.clone());
                }
            }
            if expired {
                let _ = self.persist(&reg);
            }
            reg.dirty.extend(due);
            reg.dirty.drain().collect()
        };
        for id in candidates {
            let tails = self.tails(&id).await;
            let action = {
                let mut reg = self.reg.lock();
                let Some(s) = reg.subs.get_mut(&id).filter(|s| !s.deleted) else {
                    continue;
                };
                if s.wake.is_some() || s.retry.as_ref().is_some_and(|r| r.next_attempt_at_ms > now)
                {
                    continue;
                }
                if !Self::has_pending(s, &tails) {
                    if s.retry.take().is_some() {
                        // Nothing left to deliver: no longer "failed".
                        let _ = self.persist(&reg);
                    }
                    continue;
                }
                let pending: Vec<String> = s
                    .links
                    .iter()
                    .filter(|(p, l)| tails.get(*p).is_some_and(|t| *t > l.acked))
                    .map(|(p, _)| p.clone())
                    .collect();
                if s.config.kind == "webhook" {
                    let (wake, token) = Self::new_wake(s, &tails, None, true);
                    let body = json!({
                        "subscription_id": s.id,
                        "wake_id": wake.wake_id,
                        "generation": wake.generation,
                        "streams": Self::streams_json(s, &tails),
                        "callback_url": format!("{}/__ds/subscriptions/{}/callback", s.root_url, s.id),
                        "callback_token": token,
                    });
                    let action = Action::Webhook(
                        s.config.webhook_url.clone().unwrap_or_default(),
                        body,
                        wake.wake_id.clone(),
                    );
                    // Persisted before delivery: the wake has a lease, so
                    // after a crash it expires and is issued again.
                    if self.persist(&reg).is_err() {
                        continue;
                    }
                    action
                } else {
                    // Pull wake: the event is written first and the wake
                    // recorded after, so a crash in between only causes a
                    // second (harmless) wake event, never a lost one.
                    Action::WakeStream(
                        s.config.wake_stream.clone().unwrap_or_default(),
                        pending,
                        s.generation + 1,
                    )
                }
            };
            match action {
                Action::Webhook(url, body, wake_id) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.deliver(id, url, body, wake_id).await });
                }
                Action::WakeStream(stream, pending, generation) => {
                    let events: Vec<Value> = pending
                        .iter()
                        .map(|p| json!({ "type": "wake", "subscription_id": id, "stream": p, "generation": generation, "ts": now_ms() }))
                        .collect();
                    let records = events
                        .iter()
                        .map(|e| Bytes::from(format!("{e},")))
                        .collect();
                    let req = AppendRequest {
                        content_type: Some("application/json".into()),
                        records,
                        ..Default::default()
                    };
                    let written = self.engine.append(&stream, req).await;
                    let mut reg = self.reg.lock();
                    let Some(s) = reg.subs.get_mut(&id).filter(|s| !s.deleted) else {
                        continue;
                    };
                    match written {
                        Ok(_) => {
                            // Unless a claim already created a wake meanwhile.
                            if s.wake.is_none() && s.generation + 1 == generation {
                                Self::new_wake(s, &tails, None, false);
                                s.retry = None;
                            }
                        }
                        Err(e) => {
                            // Missing, closed or mistyped wake stream: try again later.
                            let attempt = s.retry.as_ref().map_or(0, |r| r.attempt) + 1;
                            let delay = backoff_ms(attempt);
                            tracing::warn!(subscription = %id, wake_stream = %stream, error = %e, delay_ms = delay, "cannot write wake event");
                            s.retry = Some(Retry {
                                attempt,
                                next_attempt_at_ms: now_ms() + delay,
                            });
                        }
                    }
                    let _ = self.persist(&reg);
                }
            }
        }
    }

    fn sign(&self, t: u64, body: &[u8]) -> String {
        let mut msg = t.to_string().into_bytes();
        msg.push(b'.');
        msg.extend_from_slice(body);
        let sig = self.key.sign(&msg);
        format!(
            "t={t},kid={},ed25519={}",
            self.kid,
            B64URL.encode(sig.to_bytes())
        )
    }

    async fn deliver(self: Arc<Self>, id: String, url: String, body: Value, wake_id: String) {
        let _slot = self.webhooks.clone().acquire_owned().await;
        let raw = serde_json::to_vec(&body).unwrap_or_default();
        let t = now_ms() / 1000;
        let signature = self.sign(t, &raw);
        let outcome = match validate_webhook_url(&url).await {
            Err(e) => Err(e),
            Ok(u) => match self
                .http
                .post(u)
                .header("content-type", "application/json")
                .header("webhook-signature", signature)
                .body(raw)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let done = r
                        .bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                        .and_then(|v| v.get("done").and_then(Value::as_bool))
                        .unwrap_or(false);
                    Ok(done)
                }
                Ok(r) => Err(format!("webhook answered {}", r.status())),
                Err(e) => Err(e.to_string()),
            },
        };
        let mut reg = self.reg.lock();
        let Some(s) = reg.subs.get_mut(&id).filter(|s| !s.deleted) else {
            return;
        };
        if s.wake.as_ref().map(|w| w.wake_id.as_str()) != Some(wake_id.as_str()) {
            return; // superseded (callback, expiry, deletion)
        }
        match outcome {
            Ok(true) => {
                // `{"done":true}`: ack the snapshot and release.
                let snapshot = s.wake.take().map(|w| w.snapshot).unwrap_or_default();
                for (p, tail) in snapshot {
                    if let Some(l) = s.links.get_mut(&p) {
                        l.acked = l.acked.max(tail);
                    }
                }
                s.retry = None;
                reg.dirty.insert(id.clone());
            }
            Ok(false) => s.retry = None,
            Err(e) => {
                let attempt = s.retry.as_ref().map_or(0, |r| r.attempt) + 1;
                let delay = backoff_ms(attempt);
                tracing::warn!(subscription = %id, attempt, delay_ms = delay, error = %e, "webhook delivery failed");
                s.wake = None;
                s.retry = Some(Retry {
                    attempt,
                    next_attempt_at_ms: now_ms() + delay,
                });
            }
        }
        let _ = self.persist(&reg);
        self.notify.notify_one();
    }
}

/// Exponential backoff from 1 s to 60 s with ±20 % jitter (PROTOCOL.md 7.1).
fn backoff_ms(attempt: u32) -> u64 {
    let base = (1000u64 << attempt.saturating_sub(1).min(6)).min(60_000) as f64;
    let jitter = 1.0 + (rand::random::<f64>() * 0.4 - 0.2);
    (base * jitter) as u64
}

enum Action {
    Webhook(String, Value, String),
    WakeStream(String, Vec<String>, u64),
}

fn normalize_path(p: &str) -> Result<String, Reply> {
    match validate_stream_path(p.trim_start_matches('/')) {
        Ok(Target::Stream(s)) => Ok(s),
        Ok(Target::Reserved(_)) => Err(error(400, "INVALID_REQUEST", "reserved path")),
        Err(e) => Err(error(400, "INVALID_REQUEST", &e.to_string())),
    }
}

/// Writes `name` in `dir` atomically and durably.
fn write_durably(
    dir: &std::path::Path,
    name: &str,
    data: &[u8],
    secret: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A create resets a cursor left at its path by an earlier stream, but
    /// keeps one an ack moved while the create was finishing (the new
    /// stream's own data, delivered between the engine's create and
    /// `stream_created`): resetting that re-delivered it.
    #[tokio::test]
    async fn a_create_keeps_acks_of_its_own_data() {
        let engine: Arc<dyn Engine> = Arc::new(durable_streams_storage::MemoryEngine::new());
        let subs = Subscriptions::open(engine, None).unwrap();
        let config =
            br#"{"type":"webhook","pattern":"p/*","webhook":{"url":"http://127.0.0.1:9/h"}}"#;
        let (status, body) = subs.put("s", config, "http://x".into()).await;
        assert_eq!(status, 201, "{body:?}");
        let acked = |path: &str| subs.reg.lock().subs["s"].links.get(path).map(|l| l.acked);
        let ack = |path: &str, to: u64| {
            if let Some(l) = subs
                .reg
                .lock()
                .subs
                .get_mut("s")
                .unwrap()
                .links
                .get_mut(path)
            {
                l.acked = l.acked.max(to);
            }
        };
        // A new path, acked during its create.
        subs.stream_creating("p/a");
        ack("p/a", 8);
        subs.stream_created("p/a");
        assert_eq!(acked("p/a"), Some(8));
        // A cursor left by an earlier stream, nothing acked during the create.
        subs.stream_creating("p/b");
        ack("p/b", 100);
        subs.stream_created("p/b"); // the earlier stream's acks stand
        subs.stream_creating("p/b");
        subs.stream_created("p/b");
        assert_eq!(acked("p/b"), Some(0));
        // A stale cursor below the new stream's data, which is acked during the create.
        ack("p/b", 5);
        subs.stream_creating("p/b");
        ack("p/b", 8);
        subs.stream_created("p/b");
        assert_eq!(acked("p/b"), Some(8));
    }

    #[test]
    fn globs() {
        assert!(glob_matches("events/*", "events/a"));
        assert!(!glob_matches("events/*", "events/a/b"));
        assert!(!glob_matches("events/*", "events"));
        assert!(glob_matches("events/**", "events"));
        assert!(glob_matches("events/**", "events/a/b"));
        assert!(glob_matches("**/x", "a/b/x"));
        assert!(!glob_matches("events/*", "other/a"));
    }

    #[tokio::test]
    async fn webhook_urls() {
        for ok in [
            "https://example.com/hook",
            "http://localhost:8080/h",
            "http://127.0.0.1:9/h",
            "http://[::1]:9/h",
        ] {
            assert!(validate_webhook_url(ok).await.is_ok(), "{ok}");
        }
        for bad in [
            "http://example.com/h",
            "https://10.0.0.1/h",
            "https://192.168.1.1/h",
            "https://169.254.169.254/latest",
            "https://127.0.0.2.nip.invalid@10.0.0.1/",
            "ftp://localhost/x",
            "https://[fd00::1]/h",
            "https://100.64.0.1/",
            "http://10.0.0.1/hook",
            "not a url",
        ] {
            assert!(validate_webhook_url(bad).await.is_err(), "{bad}");
        }
    }
}
