//! Authentication and authorisation of stream routes (issue 7).
//!
//! One middleware ([`layer`]) runs before any stream work. It decides the
//! operation a request performs ([`Op`]) and the resource it touches (the
//! stream path relative to the path prefix, or `__ds/subscriptions/<id>`),
//! authenticates the credential and checks the grants. Modes, tried in this
//! order for a bearer credential:
//!
//! 1. static tokens from the config (SHA-256 hashes, constant-time compare);
//! 2. JWTs (HS*, RS*/PS*, EdDSA) verified against configured keys / a JWKS
//!    file; a JWT that selects one of our keys and fails verification is
//!    refused at once (401 `invalid_token`), it is never passed on;
//! 3. forward auth: anything the local modes do not recognise (and requests
//!    without a credential) is asked of an external URL, with a bounded
//!    cache of decisions.
//!
//! Credentials come from `Authorization: Bearer`, else (reads only) from the
//! `ds_token` cookie, else (reads only, JWT only, short-lived) from the
//! `access_token` query parameter, which is removed from the URI before the
//! handlers see it. See docs/auth.md for the operator's view.

use crate::request::{self, Target};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

// ---------------------------------------------------------------------------
// Configuration (the `[auth]` section of the config file)
// ---------------------------------------------------------------------------

/// `[auth]` section of the config file. Off (the default) means every
/// request is allowed, as in `dev`: the layer is installed only when at least
/// one mode (`tokens`, `jwt`, `forward`) is configured.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Realm of the `WWW-Authenticate: Bearer realm="..."` challenge.
    pub realm: String,
    /// Cookie that may carry a token (static or JWT) for read requests, for
    /// browsers whose EventSource cannot set headers. Empty disables it.
    pub cookie_name: String,
    /// Accept a JWT in the `access_token` query parameter for reads.
    pub query_token: bool,
    /// A query-parameter JWT must expire within this long from now.
    #[serde(with = "duration_str")]
    pub query_token_max_lifetime: Duration,
    /// Serve `POST <prefix>/__ds/read-token?prefix=...`, which exchanges a
    /// bearer credential for a short-lived HS256 read token (needs
    /// `jwt.hs_secret` or `jwt.hs_secret_file`).
    pub read_token_endpoint: bool,
    /// Lifetime of tokens minted by the read-token endpoint.
    #[serde(with = "duration_str")]
    pub read_token_lifetime: Duration,
    /// Static bearer tokens, stored as SHA-256 hashes.
    pub tokens: Vec<StaticToken>,
    /// JWT verification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// Forward auth to an external URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward: Option<ForwardAuthConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            realm: "durable-streams".into(),
            cookie_name: "ds_token".into(),
            query_token: true,
            query_token_max_lifetime: Duration::from_secs(600),
            read_token_endpoint: false,
            read_token_lifetime: Duration::from_secs(300),
            tokens: Vec::new(),
            jwt: None,
            forward: None,
        }
    }
}

impl AuthConfig {
    /// Whether any authentication mode is configured (the layer is only
    /// installed then, so a server without auth pays nothing for it).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || self.jwt.is_some() || self.forward.is_some()
    }

    /// Checks the section completely (hashes, key files, URLs), as start-up
    /// would; the error names the offending field, e.g.
    /// `auth.tokens[1].sha256: expected 64 hex digits`.
    pub fn validate(&self) -> Result<(), String> {
        Auth::from_config(self, "/")
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// One static bearer token: `[[auth.tokens]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    /// The principal name (logs, rate limiting).
    pub name: String,
    /// Lower- or upper-case hex SHA-256 of the token (see [`hash_token`]).
    pub sha256: String,
    #[serde(default)]
    pub grants: Vec<Grant>,
}

/// What a credential may do: `ops` on every resource whose path (relative
/// to the stream path prefix) starts with `prefix`. `""` means everything;
/// end directory-like prefixes with `/` (`"orders"` also matches
/// `"orders-archive/x"`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub prefix: String,
    pub ops: Vec<Op>,
}

/// An operation, as named in grants and JWT claims.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// GET/HEAD of a stream (catch-up, long-poll, SSE).
    Read,
    /// POST to a stream.
    Append,
    /// PUT of a stream (forks also need `read` on the source).
    Create,
    /// DELETE of a stream.
    Delete,
    /// `/metrics` (prefix `""` only) and the subscription API
    /// (`__ds/subscriptions/<id>`, claim included).
    Admin,
}

impl Op {
    fn bit(self) -> u8 {
        match self {
            Op::Read => 1,
            Op::Append => 2,
            Op::Create => 4,
            Op::Delete => 8,
            Op::Admin => 16,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Append => "append",
            Op::Create => "create",
            Op::Delete => "delete",
            Op::Admin => "admin",
        }
    }
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "read" => Op::Read,
            "append" => Op::Append,
            "create" => Op::Create,
            "delete" => Op::Delete,
            "admin" => Op::Admin,
            _ => return None,
        })
    }
}

/// `[auth.jwt]`: keys and checks for JWT bearer tokens.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Shared secret for HS256/384/512 (at least 32 bytes). Printed masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hs_secret: Option<Secret>,
    /// File holding the HS secret (trailing newline ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hs_secret_file: Option<PathBuf>,
    /// Inline PEM public keys (RSA or Ed25519 `PUBLIC KEY`, or
    /// `RSA PUBLIC KEY`).
    pub public_keys: Vec<String>,
    /// PEM public key files, same kinds as `public_keys`.
    pub public_key_files: Vec<PathBuf>,
    /// A JWK Set file; its keys are selected by the token's `kid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud` (one of), when set; without it a token carrying `aud`
    /// is still accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "duration_str")]
    pub leeway: Duration,
    /// Name of the claim carrying the grants:
    /// `[{"prefix": "orders/", "ops": ["read", "append"]}]`.
    pub claim: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            hs_secret: None,
            hs_secret_file: None,
            public_keys: Vec::new(),
            public_key_files: Vec::new(),
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            claim: "ds".into(),
        }
    }
}

/// `[auth.forward]`: ask an external URL (like Caddy's `forward_auth`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardAuthConfig {
    /// `http(s)://...` URL receiving a GET per (uncached) decision.
    pub url: String,
    /// Longer than this is a failure: 503 with `Retry-After`.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// How long a 2xx/401/403 decision is reused ("0s" disables caching).
    #[serde(with = "duration_str")]
    pub cache_ttl: Duration,
    /// Most decisions kept.
    pub cache_max_entries: usize,
    /// Response header of the backend naming the principal.
    pub principal_header: String,
}

impl Default for ForwardAuthConfig {
    fn default() -> Self {
        ForwardAuthConfig {
            url: String::new(),
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(30),
            cache_max_entries: 10_000,
            principal_header: "x-auth-user".into(),
        }
    }
}

/// A secret string: deserialised as is, printed (Debug and Serialize) as `***`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// Durations as strings ("30s", "500ms", "10m"), both ways.
mod duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let ms = d.as_millis();
        let text = if !ms.is_multiple_of(1000) {
            format!("{ms}ms")
        } else {
            let secs = d.as_secs();
            if secs != 0 && secs.is_multiple_of(3600) {
                format!("{}h", secs / 3600)
            } else if secs != 0 && secs.is_multiple_of(60) {
                format!("{}m", secs / 60)
            } else {
                format!("{secs}s")
            }
        };
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        durable_streams_protocol::parse::parse_duration(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} (expected e.g. \"500ms\", \"30s\", \"10m\", \"1h\")"
            ))
        })
    }
}

/// A configuration error naming the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error("{field}: {message}")]
pub struct AuthConfigError {
    pub field: String,
    pub message: String,
}

fn cfg_err(field: impl Into<String>, message: impl Into<String>) -> AuthConfigError {
    AuthConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// The hex SHA-256 of a token, as `[[auth.tokens]] sha256` expects it.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        out[i] = val(pair[0])? << 4 | val(pair[1])?;
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Runtime structure, built once at start-up
// ---------------------------------------------------------------------------

/// What a principal may do: (prefix, operation bit set) pairs.
#[derive(Debug, Clone, Default)]
struct Grants(Vec<(String, u8)>);

impl Grants {
    fn allows(&self, op: Op, resource: &str) -> bool {
        self.0
            .iter()
            .any(|(p, ops)| ops & op.bit() != 0 && resource.starts_with(p.as_str()))
    }
}

fn grants_from_config(grants: &[Grant], field: &str) -> Result<Grants, AuthConfigError> {
    let mut out = Vec::with_capacity(grants.len());
    for (i, g) in grants.iter().enumerate() {
        check_prefix(&g.prefix).map_err(|m| cfg_err(format!("{field}[{i}].prefix"), m))?;
        if g.ops.is_empty() {
            return Err(cfg_err(format!("{field}[{i}].ops"), "no operations listed"));
        }
        out.push((g.prefix.clone(), g.ops.iter().fold(0, |m, o| m | o.bit())));
    }
    Ok(Grants(out))
}

fn check_prefix(p: &str) -> Result<(), &'static str> {
    if p.starts_with('/') {
        return Err("must be relative to the stream path prefix (no leading '/')");
    }
    if p.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    if p.len() > crate::config::MAX_STREAM_PATH_BYTES {
        return Err("too long");
    }
    Ok(())
}

#[derive(Debug)]
struct LocalToken {
    name: String,
    hash: [u8; 32],
    grants: Grants,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ed,
}

fn family_of(alg: Algorithm) -> Option<Family> {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => Some(Family::Hmac),
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Family::Rsa),
        EdDSA => Some(Family::Ed),
        _ => None,
    }
}

struct JwtKey {
    kid: Option<String>,
    family: Family,
    key: DecodingKey,
}

struct JwtVerifier {
    keys: Vec<JwtKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
    claim: String,
}

// Keys (HMAC secrets included) must never reach a log line.
impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// An authenticated local identity.
#[derive(Debug)]
struct Identity {
    name: String,
    grants: Grants,
}

enum JwtOutcome {
    /// Not a JWT, or none of our keys fits its algorithm/`kid`.
    NotOurs,
    /// Ours, and refused; the reason is safe to show (no token content).
    Invalid(&'static str),
    Valid {
        identity: Identity,
        exp: u64,
    },
}

impl JwtVerifier {
    fn from_config(c: &JwtConfig) -> Result<JwtVerifier, AuthConfigError> {
        let mut keys = Vec::new();
        let secret = match (&c.hs_secret, &c.hs_secret_file) {
            (Some(_), Some(_)) => {
                return Err(cfg_err(
                    "auth.jwt.hs_secret_file",
                    "give either hs_secret or hs_secret_file, not both",
                ))
            }
            (Some(s), None) => Some((s.expose().to_owned(), "auth.jwt.hs_secret")),
            (None, Some(path)) => {
                let s = std::fs::read_to_string(path).map_err(|e| {
                    cfg_err(
                        "auth.jwt.hs_secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some((
                    s.trim_end_matches(['\r', '\n']).to_owned(),
                    "auth.jwt.hs_secret_file",
                ))
            }
            (None, None) => None,
        };
        if let Some((s, field)) = secret {
            if s.len() < 32 {
                return Err(cfg_err(field, "HS secret must be at least 32 bytes"));
            }
            keys.push(JwtKey {
                kid: None,
                family: Family::Hmac,
                key: DecodingKey::from_secret(s.as_bytes()),
            });
        }
        for (i, pem) in c.public_keys.iter().enumerate() {
            keys.push(
                pem_key(pem.as_bytes())
                    .map_err(|m| cfg_err(format!("auth.jwt.public_keys[{i}]"), m))?,
            );
        }
        for (i, path) in c.public_key_files.iter().enumerate() {
            let field = format!("auth.jwt.public_key_files[{i}]");
            let pem = std::fs::read(path)
                .map_err(|e| cfg_err(&field, format!("cannot read {}: {e}", path.display())))?;
            keys.push(
                pem_key(&pem).map_err(|m| cfg_err(&field, format!("{}: {m}", path.display())))?,
            );
        }
        if let Some(path) = &c.jwks_file {
            let field = "auth.jwt.jwks_file";
            let text = std::fs::read(path)
                .map_err(|e| cfg_err(field, format!("cannot read {}: {e}", path.display())))?;
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&text)
                .map_err(|e| cfg_err(field, format!("{} is not a JWK Set: {e}", path.display())))?;
            for (i, jwk) in set.keys.iter().enumerate() {
                use jsonwebtoken::jwk::AlgorithmParameters as P;
                let family = match &jwk.algorithm {
                    P::RSA(_) => Family::Rsa,
                    P::OctetKeyPair(_) => Family::Ed,
                    P::OctetKey(_) => Family::Hmac,
                    P::EllipticCurve(_) => {
                        return Err(cfg_err(
                            field,
                            format!(
                                "key {i}: EC keys are not supported (use RSA, Ed25519 or HMAC)"
                            ),
                        ))
                    }
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| cfg_err(field, format!("key {i}: {e}")))?;
                keys.push(JwtKey {
                    kid: jwk.common.key_id.clone(),
                    family,
                    key,
                });
            }
        }
        if keys.is_empty() {
            return Err(cfg_err(
                "auth.jwt",
                "no keys: set hs_secret, hs_secret_file, public_keys, public_key_files or jwks_file",
            ));
        }
        if c.claim.is_empty() {
            return Err(cfg_err("auth.jwt.claim", "must not be empty"));
        }
        Ok(JwtVerifier {
            keys,
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            leeway_secs: c.leeway.as_secs(),
            claim: c.claim.clone(),
        })
    }

    fn verify(&self, token: &str) -> JwtOutcome {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return JwtOutcome::NotOurs;
        };
        let Some(family) = family_of(header.alg) else {
            return JwtOutcome::NotOurs;
        };
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| {
                k.family == family
                    && match (&header.kid, &k.kid) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    }
            })
            .peekable();
        if candidates.peek().is_none() {
            return JwtOutcome::NotOurs;
        }
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway_secs;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
        }
        match &self.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        for k in candidates {
            use jsonwebtoken::errors::ErrorKind as K;
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &v) {
                Ok(data) => return self.identity(data.claims),
                Err(e) if matches!(e.kind(), K::InvalidSignature) => continue,
                Err(e) => {
                    return JwtOutcome::Invalid(match e.kind() {
                        K::ExpiredSignature => "token expired",
                        K::ImmatureSignature => "token not yet valid",
                        K::InvalidIssuer => "wrong issuer",
                        K::InvalidAudience => "wrong audience",
                        K::MissingRequiredClaim(_) => "token has no valid exp claim",
                        _ => "malformed token",
                    })
                }
            }
        }
        JwtOutcome::Invalid("bad signature")
    }

    fn identity(&self, claims: serde_json::Value) -> JwtOutcome {
        let exp = claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0);
        let name = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or("jwt")
            .to_owned();
        let mut grants = Vec::new();
        match claims.get(&self.claim) {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(items)) => {
                for item in items {
                    let Some(prefix) = item.get("prefix").and_then(|p| p.as_str()) else {
                        return JwtOutcome::Invalid("malformed grants claim");
                    };
                    let Some(ops) = item.get("ops").and_then(|o| o.as_array()) else {
                        return JwtOutcome::Invalid("malformed grants claim");
                    };
                    if check_prefix(prefix).is_err() {
                        return JwtOutcome::Invalid("malformed grants claim");
                    }
                    // Unknown operation names only narrow what is granted,
                    // so they are skipped (forward compatibility).
                    let mask = ops
                        .iter()
                        .filter_map(|o| o.as_str().and_then(Op::parse))
                        .fold(0, |m, o| m | o.bit());
                    grants.push((prefix.to_owned(), mask));
                }
            }
            Some(_) => return JwtOutcome::Invalid("malformed grants claim"),
        }
        JwtOutcome::Valid {
            identity: Identity {
                name,
                grants: Grants(grants),
            },
            exp,
        }
    }
}

fn pem_key(pem: &[u8]) -> Result<JwtKey, String> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok(JwtKey {
            kid: None,
            family: Family::Rsa,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok(JwtKey {
            kid: None,
            family: Family::Ed,
            key,
        });
    }
    Err("not an RSA or Ed25519 public key in PEM form".into())
}

/// Mints short-lived read tokens (HS256) for the read-token endpoint.
struct Minter {
    key: EncodingKey,
    lifetime_secs: u64,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("lifetime_secs", &self.lifetime_secs)
            .finish_non_exhaustive()
    }
}

/// A forward-auth decision that may be cached.
#[derive(Debug, Clone)]
enum ForwardDecision {
    Allow(String),
    Unauthorized,
    Forbidden,
}

const CACHE_SHARDS: usize = 16;

type CacheShard = parking_lot::Mutex<HashMap<[u8; 32], (Instant, ForwardDecision)>>;

/// Bounded TTL cache of forward-auth decisions, sharded so concurrent
/// requests rarely contend (keys are SHA-256 digests, so uniform).
#[derive(Debug)]
struct DecisionCache {
    shards: Vec<CacheShard>,
    per_shard: usize,
    ttl: Duration,
}

impl DecisionCache {
    fn new(max_entries: usize, ttl: Duration) -> Self {
        DecisionCache {
            shards: (0..CACHE_SHARDS)
                .map(|_| parking_lot::Mutex::new(HashMap::new()))
                .collect(),
            per_shard: max_entries.div_ceil(CACHE_SHARDS).max(1),
            ttl,
        }
    }
    fn shard(&self, key: &[u8; 32]) -> &CacheShard {
        &self.shards[key[0] as usize % CACHE_SHARDS]
    }
    fn get(&self, key: &[u8; 32]) -> Option<ForwardDecision> {
        let mut shard = self.shard(key).lock();
        match shard.get(key) {
            Some((at, d)) if at.elapsed() < self.ttl => Some(d.clone()),
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }
    fn put(&self, key: [u8; 32], d: ForwardDecision) {
        let mut shard = self.shard(&key).lock();
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            let ttl = self.ttl;
            shard.retain(|_, (at, _)| at.elapsed() < ttl);
            if shard.len() >= self.per_shard {
                // Still full of live entries: drop one (any) to stay bounded.
                if let Some(k) = shard.keys().next().copied() {
                    shard.remove(&k);
                }
            }
        }
        shard.insert(key, (Instant::now(), d));
    }
}

#[derive(Debug)]
struct ForwardAuth {
    url: String,
    client: reqwest::Client,
    cache: Option<DecisionCache>,
    principal_header: HeaderName,
}

/// `X-DS-Path` is the decoded stream path re-encoded so that it is ASCII:
/// controls, space, `%` and non-ASCII are percent-encoded, `/` is kept.
const DS_PATH_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'%')
    .add(b'"')
    .add(b'?')
    .add(b'#');

/// What the backend is told about one decision.
struct ForwardQuery<'a> {
    method: &'a str,
    uri: &'a str,
    op: Option<Op>,
    resource: &'a str,
}

impl ForwardAuth {
    fn from_config(c: &ForwardAuthConfig) -> Result<ForwardAuth, AuthConfigError> {
        let url = url::Url::parse(&c.url)
            .map_err(|e| cfg_err("auth.forward.url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(cfg_err(
                "auth.forward.url",
                "must be an http:// or https:// URL",
            ));
        }
        if c.timeout.is_zero() {
            return Err(cfg_err("auth.forward.timeout", "must be above zero"));
        }
        let principal_header = HeaderName::from_bytes(c.principal_header.as_bytes())
            .map_err(|_| cfg_err("auth.forward.principal_header", "not a valid header name"))?;
        let client = reqwest::Client::builder()
            .timeout(c.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| cfg_err("auth.forward", format!("cannot build the HTTP client: {e}")))?;
        let cache = (!c.cache_ttl.is_zero() && c.cache_max_entries > 0)
            .then(|| DecisionCache::new(c.cache_max_entries, c.cache_ttl));
        Ok(ForwardAuth {
            url: c.url.clone(),
            client,
            cache,
            principal_header,
        })
    }

    /// Asks the backend (or the cache). `Err` means it could not decide.
    async fn check(
        &self,
        headers: &HeaderMap,
        q: &ForwardQuery<'_>,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<ForwardDecision, ()> {
        let authz = headers.get(header::AUTHORIZATION);
        let cookie = headers.get(header::COOKIE);
        let cred_hash: [u8; 32] = {
            let mut h = Sha256::new();
            h.update(authz.map(|v| v.as_bytes()).unwrap_or(b""));
            h.update([0]);
            h.update(cookie.map(|v| v.as_bytes()).unwrap_or(b""));
            h.finalize().into()
        };
        let key: [u8; 32] = {
            let mut h = Sha256::new();
            h.update(cred_hash);
            h.update(q.method.as_bytes());
            h.update([0]);
            h.update(q.op.map(Op::as_str).unwrap_or("").as_bytes());
            h.update([0]);
            h.update(q.resource.as_bytes());
            h.finalize().into()
        };
        if let Some(d) = self.cache.as_ref().and_then(|c| c.get(&key)) {
            return Ok(d);
        }
        let mut req = self
            .client
            .get(&self.url)
            .header("x-forwarded-method", q.method)
            .header("x-forwarded-uri", q.uri)
            .header(
                "x-ds-path",
                percent_encoding::utf8_percent_encode(q.resource, DS_PATH_ENCODE).to_string(),
            );
        if let Some(op) = q.op {
            req = req.header("x-ds-operation", op.as_str());
        }
        if let Some(host) = headers.get(header::HOST) {
            req = req.header("x-forwarded-host", host.as_bytes());
        }
        if let Some(peer) = peer {
            req = req.header("x-forwarded-for", peer.ip().to_string());
        }
        if let Some(v) = authz {
            req = req.header(header::AUTHORIZATION, v.as_bytes());
        }
        if let Some(v) = cookie {
            req = req.header(header::COOKIE, v.as_bytes());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e.without_url(), url = %self.url, "forward auth request failed");
                return Err(());
            }
        };
        let status = resp.status().as_u16();
        let decision = match status {
            200..=299 => {
                let name = resp
                    .headers()
                    .get(&self.principal_header)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.len() <= 256)
                    .map(str::to_owned)
                    .unwrap_or_else(|| {
                        if authz.is_none() && cookie.is_none() {
                            "anonymous".to_owned()
                        } else {
                            format!("forward:{}", &hex(&cred_hash)[..16])
                        }
                    });
                ForwardDecision::Allow(name)
            }
            401 => ForwardDecision::Unauthorized,
            403 => ForwardDecision::Forbidden,
            _ => {
                tracing::warn!(status, url = %self.url, "forward auth answered neither 2xx, 401 nor 403");
                return Err(());
            }
        };
        if let Some(c) = &self.cache {
            c.put(key, decision.clone());
        }
        Ok(decision)
    }
}

/// The auth layer's state, replaceable while the server runs:
/// [`AuthHandle::reload`] builds a new [`Auth`] from the same configuration,
/// re-reading the key files (`hs_secret_file`, `public_key_files`,
/// `jwks_file`), so signing keys rotate without a restart (the server
/// binary reloads on SIGHUP). A request keeps the keys it started with.
#[derive(Debug)]
pub struct AuthHandle {
    config: AuthConfig,
    prefix: String,
    current: parking_lot::RwLock<Arc<Auth>>,
}

impl AuthHandle {
    /// A configuration that does not load fails closed, as
    /// [`Auth::for_router`].
    pub fn new(c: &AuthConfig, path_prefix: &str) -> AuthHandle {
        AuthHandle {
            config: c.clone(),
            prefix: path_prefix.to_owned(),
            current: parking_lot::RwLock::new(Auth::for_router(c, path_prefix)),
        }
    }

    fn current(&self) -> Arc<Auth> {
        self.current.read().clone()
    }

    /// Rebuilds the auth state from the configuration, re-reading its key
    /// files. On an error (a file missing or not parsing) the keys in force
    /// stay, so a botched rotation does not lock every client out. Cached
    /// forward-auth decisions are dropped with the old state.
    pub fn reload(&self) -> Result<(), AuthConfigError> {
        let fresh = Auth::from_config(&self.config, &self.prefix)?;
        *self.current.write() = Arc::new(fresh);
        Ok(())
    }
}

/// The auth layer's state: every key parsed and every client built once.
#[derive(Debug)]
pub struct Auth {
    prefix: String,
    challenge: HeaderValue,
    realm: String,
    tokens: Vec<LocalToken>,
    jwt: Option<JwtVerifier>,
    forward: Option<ForwardAuth>,
    cookie_name: Option<String>,
    query_token: bool,
    query_max_lifetime_secs: u64,
    minter: Option<Minter>,
    /// Set when the configuration could not be loaded: every protected
    /// request is refused with 503 (fail closed).
    broken: bool,
}

impl Auth {
    /// Builds the runtime structure; `path_prefix` is the stream prefix
    /// (`/v1/stream`).
    pub fn from_config(c: &AuthConfig, path_prefix: &str) -> Result<Auth, AuthConfigError> {
        if c.realm.is_empty()
            || c.realm
                .chars()
                .any(|ch| ch == '"' || ch == '\\' || !(' '..='~').contains(&ch))
        {
            return Err(cfg_err(
                "auth.realm",
                "must be non-empty printable ASCII without quotes or backslashes",
            ));
        }
        let challenge = HeaderValue::from_str(&format!("Bearer realm=\"{}\"", c.realm))
            .map_err(|_| cfg_err("auth.realm", "not a valid header value"))?;
        if !c.cookie_name.is_empty()
            && !c
                .cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(cfg_err("auth.cookie_name", "not a valid cookie name"));
        }
        let mut tokens = Vec::with_capacity(c.tokens.len());
        for (i, t) in c.tokens.iter().enumerate() {
            if t.name.is_empty() {
                return Err(cfg_err(
                    format!("auth.tokens[{i}].name"),
                    "must not be empty",
                ));
            }
            let hash = unhex32(t.sha256.trim()).ok_or_else(|| {
                cfg_err(
                    format!("auth.tokens[{i}].sha256"),
                    "expected 64 hex digits (the SHA-256 of the token; see `hash-token`)",
                )
            })?;
            if tokens.iter().any(|o: &LocalToken| o.hash == hash) {
                return Err(cfg_err(
                    format!("auth.tokens[{i}].sha256"),
                    "the same token is listed twice",
                ));
            }
            tokens.push(LocalToken {
                name: t.name.clone(),
                hash,
                grants: grants_from_config(&t.grants, &format!("auth.tokens[{i}].grants"))?,
            });
        }
        let jwt = c.jwt.as_ref().map(JwtVerifier::from_config).transpose()?;
        let forward = c
            .forward
            .as_ref()
            .map(ForwardAuth::from_config)
            .transpose()?;
        if c.query_token && c.query_token_max_lifetime.is_zero() {
            return Err(cfg_err(
                "auth.query_token_max_lifetime",
                "must be above zero",
            ));
        }
        let minter = if c.read_token_endpoint {
            let j = c.jwt.as_ref().ok_or_else(|| {
                cfg_err(
                    "auth.read_token_endpoint",
                    "needs [auth.jwt] with hs_secret or hs_secret_file",
                )
            })?;
            let secret = match (&j.hs_secret, &j.hs_secret_file) {
                (Some(s), _) => s.expose().to_owned(),
                (None, Some(p)) => std::fs::read_to_string(p)
                    .map_err(|e| {
                        cfg_err(
                            "auth.jwt.hs_secret_file",
                            format!("cannot read {}: {e}", p.display()),
                        )
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
                (None, None) => {
                    return Err(cfg_err(
                        "auth.read_token_endpoint",
                        "needs auth.jwt.hs_secret or auth.jwt.hs_secret_file to sign tokens",
                    ))
                }
            };
            if !c.query_token {
                return Err(cfg_err(
                    "auth.read_token_endpoint",
                    "minted tokens are URL tokens: needs query_token = true",
                ));
            }
            if c.read_token_lifetime.is_zero() || c.read_token_lifetime > c.query_token_max_lifetime
            {
                return Err(cfg_err(
                    "auth.read_token_lifetime",
                    "must be above zero and at most query_token_max_lifetime",
                ));
            }
            Some(Minter {
                key: EncodingKey::from_secret(secret.as_bytes()),
                lifetime_secs: c.read_token_lifetime.as_secs().max(1),
                issuer: j.issuer.clone(),
                audience: j.audience.clone(),
            })
        } else {
            None
        };
        Ok(Auth {
            prefix: path_prefix.to_owned(),
            challenge,
            realm: c.realm.clone(),
            tokens,
            jwt,
            forward,
            cookie_name: (!c.cookie_name.is_empty()).then(|| c.cookie_name.clone()),
            query_token: c.query_token,
            query_max_lifetime_secs: c.query_token_max_lifetime.as_secs(),
            minter,
            broken: false,
        })
    }

    /// The layer state for [`crate::Server::router`]. A configuration that
    /// does not load (the config loader validates first, so only library
    /// users get here) fails closed: protected routes answer 503.
    pub fn for_router(c: &AuthConfig, path_prefix: &str) -> Arc<Auth> {
        match Auth::from_config(c, path_prefix) {
            Ok(a) => Arc::new(a),
            Err(e) => {
                tracing::error!(error = %e, "auth configuration invalid: refusing all protected requests");
                Arc::new(Auth {
                    prefix: path_prefix.to_owned(),
                    challenge: HeaderValue::from_static("Bearer"),
                    realm: String::new(),
                    tokens: Vec::new(),
                    jwt: None,
                    forward: None,
                    cookie_name: None,
                    query_token: false,
                    query_max_lifetime_secs: 0,
                    minter: None,
                    broken: true,
                })
            }
        }
    }

    fn static_lookup(&self, token: &str) -> Option<Identity> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare with every configured hash, without an early exit.
        let mut found: Option<&LocalToken> = None;
        for t in &self.tokens {
            if bool::from(t.hash.ct_eq(&presented)) {
                found = Some(t);
            }
        }
        found.map(|t| Identity {
            name: t.name.clone(),
            grants: t.grants.clone(),
        })
    }

    fn classify(&self, method: &Method, path: &str, headers: &HeaderMap) -> Class {
        match path {
            "/healthz" | "/readyz" => return Class::Open,
            "/metrics" => return Class::protected(Some(Op::Admin), String::new()),
            _ => {}
        }
        match request::resolve_path(&self.prefix, path) {
            // Other routes outside the prefix: admin only (fail closed for
            // any route added later).
            None => Class::protected(Some(Op::Admin), String::new()),
            Some(Err(e)) => Class::Refuse(e.into_response()),
            Some(Ok(Target::Reserved(rel))) => {
                let segs: Vec<&str> = rel.split('/').collect();
                match segs.as_slice() {
                    ["__ds", "jwks.json"] => Class::Open,
                    // Per-wake bearer tokens, checked by subscriptions.rs.
                    ["__ds", "subscriptions", _, "callback" | "ack" | "release"] => Class::Open,
                    ["__ds", "read-token"] if self.minter.is_some() => Class::Mint,
                    ["__ds", "subscriptions", id, ..] => {
                        Class::protected(Some(Op::Admin), format!("__ds/subscriptions/{id}"))
                    }
                    _ => Class::protected(Some(Op::Admin), rel.clone()),
                }
            }
            Some(Ok(Target::Stream(p))) => {
                let op = match *method {
                    Method::GET | Method::HEAD => Some(Op::Read),
                    Method::POST => Some(Op::Append),
                    Method::PUT => Some(Op::Create),
                    Method::DELETE => Some(Op::Delete),
                    // Answered 405 by the handlers; any valid principal may learn that.
                    _ => None,
                };
                let mut class = Class::protected(op, p);
                if op == Some(Op::Create) {
                    if let Some(src) =
                        headers.get(durable_streams_protocol::headers::STREAM_FORKED_FROM)
                    {
                        let src = match src.to_str() {
                            Ok(s) => s,
                            Err(_) => {
                                return Class::Refuse(
                                    crate::ApiError::bad_request(
                                        "Stream-Forked-From is not valid text",
                                    )
                                    .into_response(),
                                )
                            }
                        };
                        match request::resolve_fork_source(&self.prefix, src) {
                            Ok(s) => {
                                if let Class::Protected { fork_source, .. } = &mut class {
                                    *fork_source = Some(s);
                                }
                            }
                            Err(e) => return Class::Refuse(e.into_response()),
                        }
                    }
                }
                class
            }
        }
    }

    fn unauthorized(&self, invalid: Option<&'static str>, message: &str) -> Response {
        let challenge = match invalid {
            None => self.challenge.clone(),
            Some(why) => HeaderValue::from_str(&format!(
                "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{why}\"",
                self.realm
            ))
            .unwrap_or_else(|_| self.challenge.clone()),
        };
        let mut r = plain(StatusCode::UNAUTHORIZED, message);
        r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
        r
    }
}

/// How the layer treats one request.
enum Class {
    Open,
    Refuse(Response),
    Mint,
    Protected {
        op: Option<Op>,
        resource: String,
        /// A fork's source: `read` is required on it too.
        fork_source: Option<String>,
    },
}

impl Class {
    fn protected(op: Option<Op>, resource: String) -> Class {
        Class::Protected {
            op,
            resource,
            fork_source: None,
        }
    }
}

fn plain(status: StatusCode, message: &str) -> Response {
    (
        status,
        [
            ("content-type", "text/plain; charset=utf-8"),
            ("cache-control", "no-store"),
        ],
        format!("{message}\n"),
    )
        .into_response()
}

fn forbidden() -> Response {
    plain(
        StatusCode::FORBIDDEN,
        "forbidden: the credential does not grant this operation on this path",
    )
}

fn unavailable() -> Response {
    let mut r = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "authorisation service unavailable",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Header,
    Cookie,
    Query,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// Removes every `access_token` parameter from the URI's query, returning
/// the first one's value; other parameters keep their exact encoding.
fn strip_access_token(uri: &mut Uri) -> Option<String> {
    let query = uri.query()?;
    let is_token = |pair: &str| {
        let key = pair.split('=').next().unwrap_or("");
        form_urlencoded::parse(key.as_bytes())
            .next()
            .is_some_and(|(k, _)| k == "access_token")
    };
    if !query.split('&').any(is_token) {
        return None;
    }
    let mut token = None;
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        if is_token(pair) {
            if token.is_none() {
                token = form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned());
            }
        } else {
            kept.push(pair);
        }
    }
    let pq = if kept.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    // The parts came from a valid URI, so this cannot fail; if it did, the
    // request is refused rather than passed on with the token in it.
    parts.path_and_query = pq.parse().ok();
    *uri = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
    token.filter(|t| !t.is_empty())
}

/// Authenticated reads must never be shared by a CDN.
fn mark_private(resp: &mut Response) {
    let s = resp.status();
    if !(s.is_success() || s == StatusCode::NOT_MODIFIED) {
        return;
    }
    let hs = resp.headers_mut();
    let cc = hs
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let new = match cc {
        None => Some("private".to_owned()),
        Some(v) => {
            let lower = v.to_ascii_lowercase();
            if lower.contains("no-store") || lower.split(',').any(|d| d.trim() == "private") {
                None
            } else {
                let rest: Vec<&str> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.eq_ignore_ascii_case("public") && !d.is_empty())
                    .collect();
                Some(if rest.is_empty() {
                    "private".to_owned()
                } else {
                    format!("private, {}", rest.join(", "))
                })
            }
        }
    };
    if let Some(v) = new.and_then(|v| HeaderValue::from_str(&v).ok()) {
        hs.insert(header::CACHE_CONTROL, v);
    }
    let vary = hs
        .get(header::VARY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let vary = match vary {
        None => "Authorization, Cookie".to_owned(),
        Some(v) => {
            let mut v = v;
            for name in ["Authorization", "Cookie"] {
                if !v
                    .split(',')
                    .any(|x| x.trim().eq_ignore_ascii_case(name) || x.trim() == "*")
                {
                    v.push_str(", ");
                    v.push_str(name);
                }
            }
            v
        }
    };
    if let Ok(v) = HeaderValue::from_str(&vary) {
        hs.insert(header::VARY, v);
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Who a request was authenticated as; inserted as a request extension by
/// the auth layer (rate limiting keys on it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// A stable name: the static token's name, the JWT `sub`, or the
    /// forward-auth identity.
    pub name: String,
}

/// The middleware: authenticate, authorise, then run the rest of the stack.
pub async fn layer(State(handle): State<Arc<AuthHandle>>, req: Request, next: Next) -> Response {
    let auth = handle.current();
    // Preflight is answered by the outer policy layer; if this router is
    // mounted without it, preflight still needs no credential.
    if req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let query_token = strip_access_token(&mut parts.uri);
    let (op, resource, fork_source) =
        match auth.classify(&parts.method, parts.uri.path(), &parts.headers) {
            Class::Open => return next.run(Request::from_parts(parts, body)).await,
            Class::Refuse(r) => return r,
            Class::Mint => return mint(&auth, &parts).await,
            Class::Protected {
                op,
                resource,
                fork_source,
            } => (op, resource, fork_source),
        };
    if auth.broken {
        return unavailable();
    }
    let reading = op == Some(Op::Read);

    // The credential: header first, then (reads only) cookie, then URL.
    let has_authz = parts.headers.contains_key(header::AUTHORIZATION);
    let mut cred: Option<(Source, String)> =
        bearer(&parts.headers).map(|t| (Source::Header, t.to_owned()));
    if cred.is_none() && !has_authz {
        if let Some(c) = auth
            .cookie_name
            .as_deref()
            .and_then(|n| cookie(&parts.headers, n))
        {
            if reading {
                cred = Some((Source::Cookie, c.to_owned()));
            } else if auth.forward.is_none() {
                return auth.unauthorized(None, "unauthorized: cookie credentials are accepted only for reads; send Authorization: Bearer");
            }
        }
    }
    // URL tokens are JWTs only, so they need [auth.jwt]; otherwise the
    // parameter is just removed.
    if cred.is_none() && !has_authz && auth.query_token && auth.jwt.is_some() {
        if let Some(t) = query_token {
            if !reading {
                return auth.unauthorized(
                    Some("access_token is accepted only for reads"),
                    "unauthorized: the access_token URL parameter is accepted only for reads",
                );
            }
            cred = Some((Source::Query, t));
        }
    }

    let identity = match cred {
        Some((source, token)) => {
            let mut found = if source == Source::Query {
                None
            } else {
                auth.static_lookup(&token)
            };
            if found.is_none() {
                if let Some(j) = &auth.jwt {
                    match j.verify(&token) {
                        JwtOutcome::Valid { identity, exp } => {
                            if source == Source::Query
                                && exp > now_secs().saturating_add(auth.query_max_lifetime_secs)
                            {
                                return auth.unauthorized(
                                    Some("URL token lifetime too long"),
                                    "unauthorized: an access_token in the URL must expire soon (see query_token_max_lifetime)",
                                );
                            }
                            found = Some(identity);
                        }
                        JwtOutcome::Invalid(why) => {
                            return auth.unauthorized(Some(why), &format!("unauthorized: {why}"))
                        }
                        JwtOutcome::NotOurs => {}
                    }
                }
            }
            match found {
                Some(id) => Some(id),
                // Header and cookie credentials we do not know may be the
                // forward-auth backend's; URL tokens are ours or nothing.
                None if source != Source::Query && auth.forward.is_some() => None,
                None => {
                    return auth.unauthorized(
                        Some("unknown token"),
                        "unauthorized: unknown or invalid token",
                    )
                }
            }
        }
        None if auth.forward.is_some() => None,
        None => return auth.unauthorized(None, "unauthorized: credentials required"),
    };

    let name = match identity {
        Some(id) => {
            let allowed = op.is_none_or(|o| id.grants.allows(o, &resource))
                && fork_source
                    .as_deref()
                    .is_none_or(|s| id.grants.allows(Op::Read, s));
            if !allowed {
                return forbidden();
            }
            id.name
        }
        None => {
            let Some(fwd) = &auth.forward else {
                return auth.unauthorized(None, "unauthorized: credentials required");
            };
            let peer = parts.extensions.get::<crate::PeerAddr>().map(|p| p.0);
            let uri = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_owned();
            let main = ForwardQuery {
                method: parts.method.as_str(),
                uri: &uri,
                op,
                resource: &resource,
            };
            let mut name = match fwd.check(&parts.headers, &main, peer).await {
                Err(()) => return unavailable(),
                Ok(ForwardDecision::Unauthorized) => {
                    return auth
                        .unauthorized(None, "unauthorized: refused by the authorisation service")
                }
                Ok(ForwardDecision::Forbidden) => return forbidden(),
                Ok(ForwardDecision::Allow(n)) => n,
            };
            if let Some(src) = &fork_source {
                let src_uri = format!("{}/{}", auth.prefix.trim_end_matches('/'), src);
                let q = ForwardQuery {
                    method: "GET",
                    uri: &src_uri,
                    op: Some(Op::Read),
                    resource: src,
                };
                match fwd.check(&parts.headers, &q, peer).await {
                    Err(()) => return unavailable(),
                    Ok(ForwardDecision::Unauthorized) => {
                        return auth.unauthorized(
                            None,
                            "unauthorized: refused by the authorisation service",
                        )
                    }
                    Ok(ForwardDecision::Forbidden) => return forbidden(),
                    Ok(ForwardDecision::Allow(n)) => name = n,
                }
            }
            name
        }
    };
    parts.extensions.insert(Principal { name });
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    if reading {
        mark_private(&mut resp);
    }
    resp
}

/// `POST <prefix>/__ds/read-token?prefix=<relative prefix>`: exchanges the
/// request's bearer credential (static token or JWT, in the Authorization
/// header) for a short-lived HS256 JWT granting `read` on that prefix, to
/// be used as `?access_token=` by EventSource.
async fn mint(auth: &Auth, parts: &axum::http::request::Parts) -> Response {
    let Some(minter) = &auth.minter else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    if parts.method != Method::POST {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let Some(token) = bearer(&parts.headers) else {
        return auth.unauthorized(None, "unauthorized: send Authorization: Bearer");
    };
    let mut identity = auth.static_lookup(token);
    if identity.is_none() {
        if let Some(j) = &auth.jwt {
            match j.verify(token) {
                JwtOutcome::Valid { identity: id, .. } => identity = Some(id),
                JwtOutcome::Invalid(why) => {
                    return auth.unauthorized(Some(why), &format!("unauthorized: {why}"))
                }
                JwtOutcome::NotOurs => {}
            }
        }
    }
    let Some(identity) = identity else {
        // Forward-auth identities have no grants to narrow from.
        return auth.unauthorized(
            Some("unknown token"),
            "unauthorized: read tokens are minted for static tokens and JWTs only",
        );
    };
    let prefix = form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "prefix")
        .map(|(_, v)| v.into_owned());
    let Some(prefix) = prefix else {
        return plain(
            StatusCode::BAD_REQUEST,
            "the prefix query parameter is required",
        );
    };
    if let Err(m) = check_prefix(&prefix) {
        return plain(StatusCode::BAD_REQUEST, &format!("prefix {m}"));
    }
    // Every path under `prefix` is under some granted read prefix iff
    // `prefix` itself is.
    if !identity.grants.allows(Op::Read, &prefix) {
        return forbidden();
    }
    let now = now_secs();
    let exp = now + minter.lifetime_secs;
    let mut claims = serde_json::json!({
        "sub": identity.name,
        "iat": now,
        "exp": exp,
        "ds": [{ "prefix": prefix, "ops": ["read"] }],
    });
    if let Some(j) = &auth.jwt {
        if j.claim != "ds" {
            if let Some(obj) = claims.as_object_mut() {
                if let Some(g) = obj.remove("ds") {
                    obj.insert(j.claim.clone(), g);
                }
            }
        }
    }
    if let Some(iss) = &minter.issuer {
        claims["iss"] = iss.clone().into();
    }
    if let Some(aud) = &minter.audience {
        claims["aud"] = aud.clone().into();
    }
    let jwt = match jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &minter.key,
    ) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot sign a read token");
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot sign a read token",
            );
        }
    };
    let body = serde_json::json!({
        "access_token": jwt,
        "token_type": "Bearer",
        "expires_in": minter.lifetime_secs,
        "prefix": prefix,
    });
    (
        StatusCode::OK,
        [
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ],
        Body::from(body.to_string()),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example hash of "secret" round-trips through hash_token.
    #[test]
    fn hash_token_is_sha256_hex() {
        assert_eq!(
            hash_token("secret"),
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert_eq!(
            unhex32(&hash_token("x")).map(|h| hex(&h)),
            Some(hash_token("x"))
        );
    }

    /// Serialising the config masks the HS secret and keeps durations as strings.
    #[test]
    fn serialize_masks_secrets() {
        let c = AuthConfig {
            jwt: Some(JwtConfig {
                hs_secret: Some(Secret::new("a-very-long-secret-that-must-not-leak")),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(&c).expect("serialise");
        let text = v.to_string();
        assert!(!text.contains("must-not-leak"), "{text}");
        assert_eq!(v["jwt"]["hs_secret"], "***");
        assert_eq!(v["query_token_max_lifetime"], "10m");
        assert!(!format!("{c:?}").contains("must-not-leak"));
    }

    /// Deserialising accepts duration strings, fills defaults and refuses unknown keys and ops.
    #[test]
    fn deserialize_defaults_and_errors() {
        let c: AuthConfig = serde_json::from_value(serde_json::json!({
            "forward": { "url": "http://127.0.0.1:1/check", "timeout": "500ms" }
        }))
        .expect("parse");
        assert!(c.enabled());
        let f = c.forward.as_ref().expect("forward");
        assert_eq!(f.timeout, Duration::from_millis(500));
        assert_eq!(f.cache_ttl, Duration::from_secs(30));
        assert_eq!(c.cookie_name, "ds_token");
        assert!(!AuthConfig::default().enabled());

        let e = serde_json::from_value::<AuthConfig>(serde_json::json!({ "tokenz": [] }))
            .expect_err("unknown key");
        assert!(e.to_string().contains("tokenz"), "{e}");
        let e = serde_json::from_value::<AuthConfig>(serde_json::json!({
            "tokens": [{ "name": "a", "sha256": hash_token("a"), "grants": [{ "prefix": "", "ops": ["raed"] }] }]
        }))
        .expect_err("unknown op");
        assert!(e.to_string().contains("raed"), "{e}");
        let e = serde_json::from_value::<AuthConfig>(
            serde_json::json!({ "jwt": { "leeway": "soon" } }),
        )
        .expect_err("bad duration");
        assert!(e.to_string().contains("soon"), "{e}");
    }

    /// validate() names the field for a bad hash, a missing key file and a short secret.
    #[test]
    fn validate_names_the_field() {
        let mut c = AuthConfig::default();
        c.tokens.push(StaticToken {
            name: "svc".into(),
            sha256: "xyz".into(),
            grants: vec![],
        });
        let e = c.validate().expect_err("bad hash");
        assert!(e.starts_with("auth.tokens[0].sha256"), "{e}");

        let c = AuthConfig {
            jwt: Some(JwtConfig {
                public_key_files: vec!["/nonexistent/key.pem".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = c.validate().expect_err("missing file");
        assert!(e.starts_with("auth.jwt.public_key_files[0]"), "{e}");

        let c = AuthConfig {
            jwt: Some(JwtConfig {
                hs_secret: Some(Secret::new("short")),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = c.validate().expect_err("short secret");
        assert!(e.starts_with("auth.jwt.hs_secret"), "{e}");
        assert!(!e.contains("short\""), "{e}");

        let mut c = AuthConfig::default();
        c.tokens.push(StaticToken {
            name: "svc".into(),
            sha256: hash_token("t"),
            grants: vec![Grant {
                prefix: "/abs".into(),
                ops: vec![Op::Read],
            }],
        });
        let e = c.validate().expect_err("absolute prefix");
        assert!(e.starts_with("auth.tokens[0].grants[0].prefix"), "{e}");
    }

    /// access_token is removed from the query, other parameters keep their encoding.
    #[test]
    fn strips_access_token() {
        let mut uri: Uri = "/v1/stream/a?offset=-1&access_token=abc.def&live=sse&x=%20"
            .parse()
            .expect("uri");
        assert_eq!(strip_access_token(&mut uri).as_deref(), Some("abc.def"));
        assert_eq!(uri.to_string(), "/v1/stream/a?offset=-1&live=sse&x=%20");
        let mut uri: Uri = "/v1/stream/a?access_token=t".parse().expect("uri");
        assert_eq!(strip_access_token(&mut uri).as_deref(), Some("t"));
        assert_eq!(uri.to_string(), "/v1/stream/a");
        let mut uri: Uri = "/v1/stream/a?offset=1".parse().expect("uri");
        assert_eq!(strip_access_token(&mut uri), None);
        assert_eq!(uri.to_string(), "/v1/stream/a?offset=1");
    }

    /// Grants match by prefix and operation.
    #[test]
    fn grants_match_prefix_and_op() {
        let g = Grants(vec![("orders/".into(), Op::Read.bit() | Op::Append.bit())]);
        assert!(g.allows(Op::Read, "orders/1"));
        assert!(!g.allows(Op::Create, "orders/1"));
        assert!(!g.allows(Op::Read, "users/1"));
        let all = Grants(vec![(String::new(), Op::Admin.bit())]);
        assert!(all.allows(Op::Admin, ""));
        assert!(!g.allows(Op::Admin, ""));
    }

    /// The decision cache stays within its bound.
    #[test]
    fn cache_is_bounded() {
        let c = DecisionCache::new(32, Duration::from_secs(60));
        for i in 0..1000u32 {
            let key: [u8; 32] = Sha256::digest(i.to_be_bytes()).into();
            c.put(key, ForwardDecision::Forbidden);
        }
        let total: usize = c.shards.iter().map(|s| s.lock().len()).sum();
        assert!(total <= 32, "{total}");
    }
}
