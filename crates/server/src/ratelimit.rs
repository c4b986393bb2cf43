//! Rate limiting per token or client address (issue 7).
//!
//! A token bucket per client: the authenticated principal when the auth
//! layer set one, else the client's IP address (IPv6 by its /64, which one
//! host usually owns whole). `X-Forwarded-For` is believed only when the
//! connection comes from a configured trusted proxy. Every request counts
//! once, live reads included (a long-poll or SSE request is one token however
//! long it stays open). Health, readiness and metrics are not counted.
//!
//! The buckets live in a sharded map: a request locks one shard only. The
//! map is bounded: when a shard is full, buckets that have refilled (which
//! behave exactly like absent ones) are dropped, then the least recently
//! used one.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// `[rate_limit]` section of the config file. Off by default.
///
/// ```toml
/// [rate_limit]
/// enabled = true
/// requests_per_second = 50.0     # sustained rate per client
/// burst = 100                    # requests allowed at once after idling
/// max_clients = 100000           # buckets tracked; idle ones are evicted first
/// trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]  # whose X-Forwarded-For is believed
/// ```
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    #[serde(deserialize_with = "positive_rate")]
    pub requests_per_second: f64,
    #[serde(deserialize_with = "at_least_one_u32")]
    pub burst: u32,
    #[serde(deserialize_with = "at_least_one_usize")]
    pub max_clients: usize,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the
    /// client. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<IpRange>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: false,
            requests_per_second: 50.0,
            burst: 100,
            max_clients: 100_000,
            trusted_proxies: Vec::new(),
        }
    }
}

impl RateLimitConfig {
    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

fn positive_rate<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "requests_per_second must be a positive number, got {v}"
        )))
    }
}

fn at_least_one_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match u32::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1")),
        v => Ok(v),
    }
}

fn at_least_one_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1")),
        v => Ok(v),
    }
}

/// An IP address or CIDR range, written `10.0.0.0/8` or `::1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - self.prefix_len as u32)
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - self.prefix_len as u32)
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("not an IP address or CIDR range: {s:?}"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("bad prefix length in {s:?}"))?,
        };
        Ok(IpRange { addr, prefix_len })
    }
}

impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl<'de> Deserialize<'de> for IpRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for IpRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// IPv4-mapped IPv6 addresses (dual-stack listeners) as the IPv4 they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whom a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Principal(String),
    /// An IPv4 address, or an IPv6 address with the host half zeroed.
    Addr(IpAddr),
}

impl ClientKey {
    pub fn addr(ip: IpAddr) -> Self {
        ClientKey::Addr(match canonical(ip) {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
            v4 => v4,
        })
    }
}

/// The outcome of counting one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Over the limit; a token is available again after this many seconds.
    Limited {
        retry_after_secs: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets per client, in a bounded sharded map.
#[derive(Debug)]
pub struct RateLimiter {
    rate_per_sec: f64,
    burst: f64,
    shard_capacity: usize,
    shards: Box<[Mutex<HashMap<ClientKey, Bucket>>]>,
    hasher: RandomState,
    trusted_proxies: Vec<IpRange>,
}

impl RateLimiter {
    pub fn new(cfg: &RateLimitConfig) -> Self {
        let max_clients = cfg.max_clients.max(1);
        let shard_count = max_clients.min(64);
        RateLimiter {
            rate_per_sec: cfg.requests_per_second.max(f64::MIN_POSITIVE),
            burst: f64::from(cfg.burst.max(1)),
            // Rounded down so the shards together never exceed max_clients.
            shard_capacity: max_clients / shard_count,
            shards: (0..shard_count)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            hasher: RandomState::new(),
            trusted_proxies: cfg.trusted_proxies.clone(),
        }
    }

    /// Buckets currently tracked.
    pub fn tracked_clients(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Counts one request of `key` at `now`.
    pub fn check(&self, key: ClientKey, now: Instant) -> Decision {
        let shard = &self.shards[(self.hasher.hash_one(&key) as usize) % self.shards.len()];
        let mut map = shard.lock();
        if let Some(b) = map.get_mut(&key) {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens = (b.tokens + elapsed * self.rate_per_sec).min(self.burst);
            b.updated = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                return Decision::Allowed;
            }
            let wait = (1.0 - b.tokens) / self.rate_per_sec;
            return Decision::Limited {
                retry_after_secs: (wait.ceil() as u64).max(1),
            };
        }
        if map.len() >= self.shard_capacity {
            self.make_room(&mut map, now);
        }
        map.insert(
            key,
            Bucket {
                tokens: self.burst - 1.0,
                updated: now,
            },
        );
        Decision::Allowed
    }

    /// Frees at least one slot: refilled buckets go first (forgetting them
    /// changes nothing), else the least recently used one.
    fn make_room(&self, map: &mut HashMap<ClientKey, Bucket>, now: Instant) {
        let (rate, burst) = (self.rate_per_sec, self.burst);
        map.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
        });
        while map.len() >= self.shard_capacity {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
    }

    /// The client a request is counted against, if it can be told.
    pub fn key_of(&self, req: &Request) -> Option<ClientKey> {
        if let Some(p) = req.extensions().get::<crate::auth::Principal>() {
            return Some(ClientKey::Principal(p.name.clone()));
        }
        let peer = req.extensions().get::<crate::PeerAddr>()?.0.ip();
        Some(ClientKey::addr(self.client_ip(peer, req)))
    }

    /// The peer, or when the peer is a trusted proxy, the nearest address in
    /// `X-Forwarded-For` that is not itself a trusted proxy.
    fn client_ip(&self, peer: IpAddr, req: &Request) -> IpAddr {
        let trusted = |ip: IpAddr| self.trusted_proxies.iter().any(|r| r.contains(ip));
        if self.trusted_proxies.is_empty() || !trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for value in req.headers().get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else {
                return client;
            };
            for hop in value.rsplit(',') {
                let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                    // Garbage from before our proxies: stop at the last sane hop.
                    return client;
                };
                client = ip;
                if !trusted(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

fn exempt(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// The rate-limit middleware (installed only when enabled).
pub async fn layer(State(limiter): State<Arc<RateLimiter>>, req: Request, next: Next) -> Response {
    if exempt(req.uri().path()) {
        return next.run(req).await;
    }
    let Some(key) = limiter.key_of(&req) else {
        // Mounted without Server::run and without auth: nothing to key on.
        return next.run(req).await;
    };
    match limiter.check(key, Instant::now()) {
        Decision::Allowed => next.run(req).await,
        Decision::Limited { retry_after_secs } => too_many_requests(retry_after_secs),
    }
}

fn too_many_requests(retry_after_secs: u64) -> Response {
    let mut resp = (
        StatusCode::TOO_MANY_REQUESTS,
        [("content-type", "text/plain; charset=utf-8")],
        Body::from(format!(
            "rate limit exceeded; retry after {retry_after_secs} s\n"
        )),
    )
        .into_response();
    resp.headers_mut()
        .insert("retry-after", HeaderValue::from(retry_after_secs));
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limiter(rps: f64, burst: u32, max_clients: usize) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig {
            enabled: true,
            requests_per_second: rps,
            burst,
            max_clients,
            trusted_proxies: Vec::new(),
        })
    }

    fn ip(s: &str) -> ClientKey {
        ClientKey::addr(s.parse().unwrap())
    }

    /// A burst is allowed, the next request is refused with a whole-second
    /// Retry-After, and tokens come back at the configured rate.
    #[tokio::test(start_paused = true)]
    async fn burst_then_refill() {
        let l = limiter(2.0, 3, 100);
        let key = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(l.check(key.clone(), Instant::now()), Decision::Allowed);
        }
        assert_eq!(
            l.check(key.clone(), Instant::now()),
            Decision::Limited {
                retry_after_secs: 1
            }
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(l.check(key.clone(), Instant::now()), Decision::Allowed);
        assert!(matches!(
            l.check(key.clone(), Instant::now()),
            Decision::Limited { .. }
        ));
        // Idle long enough: the whole burst again, never more.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert_eq!(l.check(key.clone(), Instant::now()), Decision::Allowed);
        }
        assert!(matches!(
            l.check(key, Instant::now()),
            Decision::Limited { .. }
        ));
    }

    /// A slow rate gives a Retry-After of several seconds, rounded up.
    #[test]
    fn retry_after_rounds_up() {
        let l = limiter(0.25, 1, 10);
        let now = Instant::now();
        assert_eq!(l.check(ip("192.0.2.1"), now), Decision::Allowed);
        assert_eq!(
            l.check(ip("192.0.2.1"), now),
            Decision::Limited {
                retry_after_secs: 4
            }
        );
    }

    /// Clients have separate buckets; IPv6 clients are keyed by their /64.
    #[test]
    fn buckets_are_per_client() {
        let l = limiter(1.0, 1, 100);
        let now = Instant::now();
        assert_eq!(l.check(ip("192.0.2.1"), now), Decision::Allowed);
        assert_eq!(l.check(ip("192.0.2.2"), now), Decision::Allowed);
        assert_eq!(
            l.check(ClientKey::Principal("a".into()), now),
            Decision::Allowed
        );
        assert!(matches!(
            l.check(ip("192.0.2.1"), now),
            Decision::Limited { .. }
        ));
        assert_eq!(l.check(ip("2001:db8::1"), now), Decision::Allowed);
        assert!(matches!(
            l.check(ip("2001:db8::ffff"), now),
            Decision::Limited { .. }
        ));
        assert_eq!(l.check(ip("2001:db8:0:1::1"), now), Decision::Allowed);
    }

    /// The map never tracks more than max_clients; the least recently used
    /// bucket is evicted when none has refilled.
    #[tokio::test(start_paused = true)]
    async fn tracked_clients_are_bounded() {
        let l = limiter(0.001, 1, 8);
        for i in 0..200u32 {
            let key = ClientKey::Principal(format!("p{i}"));
            assert_eq!(l.check(key, Instant::now()), Decision::Allowed);
            assert!(l.tracked_clients() <= 8, "{} tracked", l.tracked_clients());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // The most recent client is still tracked (and limited).
        assert!(matches!(
            l.check(ClientKey::Principal("p199".into()), Instant::now()),
            Decision::Limited { .. }
        ));
    }

    /// X-Forwarded-For counts only from a trusted proxy, and the nearest
    /// untrusted hop is the client.
    #[test]
    fn forwarded_for_from_trusted_proxies_only() {
        let l = RateLimiter::new(&RateLimitConfig {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        });
        let req = |peer: &str, xff: &str| {
            let mut r = Request::new(Body::empty());
            r.headers_mut()
                .insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
            r.extensions_mut()
                .insert(crate::PeerAddr(format!("{peer}:1000").parse().unwrap()));
            r
        };
        assert_eq!(
            l.key_of(&req("10.1.2.3", "198.51.100.7, 10.0.0.9")),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(
            l.key_of(&req("192.0.2.50", "198.51.100.7")),
            Some(ip("192.0.2.50"))
        );
        assert_eq!(
            l.key_of(&req("10.1.2.3", "spoofed, 198.51.100.8")),
            Some(ip("198.51.100.8"))
        );
    }

    /// Ranges parse and match; bad ones are errors.
    #[test]
    fn ip_ranges() {
        let r: IpRange = "10.0.0.0/8".parse().unwrap();
        assert!(r.contains("10.200.0.1".parse().unwrap()));
        assert!(r.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!r.contains("11.0.0.1".parse().unwrap()));
        let all: IpRange = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpRange>().is_err());
        assert!("host".parse::<IpRange>().is_err());
    }

    /// Nonsense limits are refused when the config is read.
    #[test]
    fn config_is_validated() {
        let parse = |s: &str| serde_json::from_str::<RateLimitConfig>(s);
        assert!(parse(r#"{"requests_per_second": 0}"#).is_err());
        assert!(parse(r#"{"burst": 0}"#).is_err());
        assert!(parse(r#"{"trusted_proxies": ["nope"]}"#).is_err());
        let ok = parse(r#"{"enabled": true, "requests_per_second": 5}"#).unwrap();
        assert!(ok.enabled() && ok.burst == 100);
        assert!(!RateLimitConfig::default().enabled());
    }
}
