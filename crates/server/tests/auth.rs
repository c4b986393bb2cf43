//! Authentication and authorisation (issue 7): static tokens, JWT (HS256,
//! RS256, EdDSA, JWKS), forward auth, browser credentials (cookie and
//! `?access_token=`), and the routes the layer must leave open. The server
//! runs as a library on port 0 with an `[auth]` configuration per test.
#![allow(clippy::unwrap_used)]

mod served;
mod support;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use base64::Engine as _;
use durable_streams_server::auth::{
    hash_token, AuthConfig, ForwardAuthConfig, Grant, JwtConfig, Op, Secret, StaticToken,
};
use durable_streams_server::{Server, ServerConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A 2048-bit RSA key made with `openssl genpkey` for these tests only; it
/// protects nothing.
const TEST_RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDEISf42Lzfzl6e
yl6ltzMQJoux9ySNCADLPaImLEW3+TWZmaV/IvtOHn5FWyRe2gp3w3QW6/LHJ/Eo
qFePwGNJt3ISojH75/poMi2eGvurOAC0BMFV4Gkqq9h7nndvgR23RChJ7smJUoY1
1yZMc8m0dsQ1RpzGHxYqdLpk03PKFQYGuIhT8F7x57FnVYnMYHgusO7DrMkv0tVV
gq69OfH+GOoMWgcxjy70Xer2PQ9UHEeL/oqSgA/ihRGyOI25emEpDZ/LODE9z1/c
Rb+HSm2FG5lm7NC/KI6QdW5WdhJfZxzA9mhO11lHphI/zicFG0pAwHW3BwMmvZZ4
7V8wdxRDAgMBAAECggEAGp/HndPKO/V3ScX9+C/42hHpd8StbQmvledtehIbesB1
Qr8lRK96ft3L1V1sgAXIUv6w5SWthNSKu7KyhDyhHdItxZLIB0Kz7u4U3Dgcft8w
1T8qAZ7fl9/RGOLnorbb0lOJxpOIP0B5IJjuxYUYVgujUfoecRSqPSQwY1yDBOT9
3ro1gnewCUbEAFCaivhUHfdmPWtdnZYq85M4AJrBNRroVq0pNe6M3qhWJ87xCtF4
cxGT1ZfWOlj+WzHgb+R/bMnU+01Hsh4bfcqlmU4nlN1fMtv2W3ZsWJcIg5MekYgc
wvQHOJS4WBxTYjBANhC4JsFCcNspKCRLJpUhsQHMsQKBgQDj3FeN8/+Cnazeektq
zF6FirYkYNnAyVJ8EeV/dlBEx8njpJtpS/tTymfiP/DBDJTMggkQfeKMB+gkq8B1
u/xjOqLFNA3MxotXAZK6ZFhOblA833aHVImszEGP8GU5euEx0nQjDE7kf+p9FUL5
j2dKePFrWr92eQn8Q3IvC2cEMQKBgQDcWaeK85ThTuXMlCKR4i+GheUAbm6ic17E
SX5g4F1JexQYPlnrsDTGDRubC4ckLG/Vfj1GMZKg9HYWcSWmBIPlaA7O4ARsZXz+
BfWF6FoTYH1KxKJDgVwHIX7tIOou9JbFiUTQ1OaNwxhTagD8nm/H6fQKOkdKSPmP
rkH12zYGswKBgQCmxBQ8a5DcqsPjjEP4JR0kxbGrDEsyouXAsmRyFkiHHmXvOwEX
XqnR2HiRiVSOJcQdrSovLMMK05qehCl2wZ/li/unMwLKlaFTi241Bs3ukSQeeTpJ
r6CXnGJ7k2iyWfHJQgsHv7FZ4RjgdRgwiDkDs2KVvLQWZF3fiAlgzwqVcQKBgBLa
+SNCxLKi9bcT1gF1wWtZeccXrA/qn2lcgJv5lwH6rjWE4FzyrxFjfcE+s0m9I7S5
ILUo+MsdIB27gOU77a1rwhihwr8j0BZMnD3hLBQMZaxINzpfj2hszVetQVzTQTOW
E3VrQm9PCn3YzEzRoe8RbfiSFBefNvu8hZhsMatRAoGAQINnQa57uMYYLuX5+N8W
3FF8jpKQxGQMs6t3XWy7qoMMAdLFQi3e+2wBzmARFEneoIweHJ8+fQqiaL89EIUR
orGYon5mwYYWJ1XeKAc6hpzD0eainEXryzviggWU6AJ2dovsB614pFbt87ZITr00
Cc5dQTsKuSvG5FR2XlCnZhM=
-----END PRIVATE KEY-----\n";
const TEST_RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAxCEn+Ni8385enspepbcz
ECaLsfckjQgAyz2iJixFt/k1mZmlfyL7Th5+RVskXtoKd8N0FuvyxyfxKKhXj8Bj
SbdyEqIx++f6aDItnhr7qzgAtATBVeBpKqvYe553b4Edt0QoSe7JiVKGNdcmTHPJ
tHbENUacxh8WKnS6ZNNzyhUGBriIU/Be8eexZ1WJzGB4LrDuw6zJL9LVVYKuvTnx
/hjqDFoHMY8u9F3q9j0PVBxHi/6KkoAP4oURsjiNuXphKQ2fyzgxPc9f3EW/h0pt
hRuZZuzQvyiOkHVuVnYSX2ccwPZoTtdZR6YSP84nBRtKQMB1twcDJr2WeO1fMHcU
QwIDAQAB
-----END PUBLIC KEY-----\n";

const HS_SECRET: &str = "test-hs-secret-0123456789abcdef-0123456789";
const SVC_TOKEN: &str = "svc-orders-token";
const ADMIN_TOKEN: &str = "admin-token";
const ALL_TOKEN: &str = "all-streams-token";

struct TestServer {
    base: String,
    /// `None` for the server binary.
    server: Option<Server>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    client: reqwest::Client,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl TestServer {
    fn url(&self, rel: &str) -> String {
        format!("{}/v1/stream/{rel}", self.base)
    }
}

async fn start(auth: AuthConfig) -> TestServer {
    let cfg = ServerConfig {
        auth,
        ..Default::default()
    };
    let server = Server::builder().config(cfg).build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.clone().run(listener, async {
        let _ = rx.await;
    }));
    TestServer {
        base: format!("http://{addr}"),
        server: Some(server),
        stop: Some(tx),
        client: reqwest::Client::new(),
    }
}

fn grant(prefix: &str, ops: &[Op]) -> Grant {
    Grant {
        prefix: prefix.into(),
        ops: ops.to_vec(),
    }
}

fn static_tokens() -> Vec<StaticToken> {
    vec![
        StaticToken {
            name: "orders-service".into(),
            sha256: hash_token(SVC_TOKEN),
            grants: vec![grant("orders/", &[Op::Read, Op::Append, Op::Create])],
        },
        StaticToken {
            name: "ops".into(),
            sha256: hash_token(ADMIN_TOKEN).to_uppercase(),
            grants: vec![grant("", &[Op::Admin])],
        },
        StaticToken {
            name: "everything".into(),
            sha256: hash_token(ALL_TOKEN),
            grants: vec![grant("", &[Op::Read, Op::Append, Op::Create, Op::Delete])],
        },
    ]
}

fn static_config() -> AuthConfig {
    AuthConfig {
        tokens: static_tokens(),
        ..Default::default()
    }
}

fn hs_config() -> AuthConfig {
    AuthConfig {
        jwt: Some(JwtConfig {
            hs_secret: Some(Secret::new(HS_SECRET)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims granting `grants` to `sub`, expiring `exp_in` seconds from now.
fn claims(sub: &str, grants: Value, exp_in: i64) -> Value {
    json!({ "sub": sub, "exp": now() + exp_in, "ds": grants })
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn hs_jwt(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
        claims,
    )
}

/// An Ed25519 key pair: the signing key (PKCS#8 DER) and the public key bytes.
struct EdKey {
    encoding: EncodingKey,
    public: [u8; 32],
}

fn ed_key() -> EdKey {
    let seed: [u8; 32] = rand::random();
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    // PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410).
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    EdKey {
        encoding: EncodingKey::from_ed_der(&der),
        public: signing.verifying_key().to_bytes(),
    }
}

impl EdKey {
    /// The public key as an SPKI PEM (RFC 8410).
    fn public_pem(&self) -> String {
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(&self.public);
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
    }
    fn jwk(&self, kid: &str) -> Value {
        json!({
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.public),
        })
    }
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ds-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

async fn send(
    s: &TestServer,
    method: reqwest::Method,
    rel: &str,
    bearer: Option<&str>,
) -> reqwest::Response {
    let mut r = s
        .client
        .request(method.clone(), s.url(rel))
        .header("content-type", "text/plain");
    if method == reqwest::Method::POST {
        r = r.body("x");
    }
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

async fn status(s: &TestServer, method: reqwest::Method, rel: &str, bearer: Option<&str>) -> u16 {
    send(s, method, rel, bearer).await.status().as_u16()
}

fn challenge(r: &reqwest::Response) -> String {
    r.headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

use reqwest::Method as M;

/// A static token may do exactly what it grants: read/append/create under
/// its prefix, 403 on another prefix and on an operation it lacks.
#[tokio::test]
async fn static_token_grants_by_prefix_and_operation() {
    let s = start(static_config()).await;
    assert_eq!(status(&s, M::PUT, "orders/a", Some(SVC_TOKEN)).await, 201);
    assert_eq!(status(&s, M::POST, "orders/a", Some(SVC_TOKEN)).await, 204);
    assert_eq!(
        status(&s, M::GET, "orders/a?offset=-1", Some(SVC_TOKEN)).await,
        200
    );
    assert_eq!(status(&s, M::HEAD, "orders/a", Some(SVC_TOKEN)).await, 200);
    assert_eq!(status(&s, M::PUT, "users/a", Some(SVC_TOKEN)).await, 403);
    assert_eq!(
        status(&s, M::DELETE, "orders/a", Some(SVC_TOKEN)).await,
        403
    );
    assert_eq!(
        status(&s, M::GET, "orders/a?offset=-1", Some(ADMIN_TOKEN)).await,
        403
    );
    assert_eq!(
        status(&s, M::DELETE, "orders/a", Some(ALL_TOKEN)).await,
        204
    );
}

/// No credential: 401 with the Bearer challenge and no invalid_token error;
/// an unknown token: 401 with error="invalid_token", the token not echoed.
#[tokio::test]
async fn missing_and_unknown_tokens_are_401() {
    let s = start(static_config()).await;
    let r = send(&s, M::GET, "orders/a?offset=-1", None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(challenge(&r), r#"Bearer realm="durable-streams""#);
    let r = send(&s, M::PUT, "orders/a", Some("not-a-known-token-zzq")).await;
    assert_eq!(r.status(), 401);
    assert!(
        challenge(&r).contains(r#"error="invalid_token""#),
        "{}",
        challenge(&r)
    );
    let text = r.text().await.unwrap();
    assert!(!text.contains("zzq"), "{text}");
}

/// HS256 JWT: granted operation allowed, wrong prefix and wrong op 403,
/// missing grants claim 403; the principal is the sub.
#[tokio::test]
async fn hs256_jwt_grants() {
    let s = start(hs_config()).await;
    let t = hs_jwt(&claims(
        "alice",
        json!([{ "prefix": "orders/", "ops": ["create", "append", "read"] }]),
        600,
    ));
    assert_eq!(status(&s, M::PUT, "orders/a", Some(&t)).await, 201);
    assert_eq!(status(&s, M::POST, "orders/a", Some(&t)).await, 204);
    assert_eq!(status(&s, M::PUT, "users/a", Some(&t)).await, 403);
    assert_eq!(status(&s, M::DELETE, "orders/a", Some(&t)).await, 403);
    let bare = hs_jwt(&json!({ "sub": "bob", "exp": now() + 600 }));
    assert_eq!(
        status(&s, M::GET, "orders/a?offset=-1", Some(&bare)).await,
        403
    );
}

/// Bad signature, expired, not-yet-valid and exp-less JWTs are 401 invalid_token.
#[tokio::test]
async fn invalid_jwts_are_401() {
    let s = start(hs_config()).await;
    let grants = json!([{ "prefix": "", "ops": ["read", "create"] }]);
    let wrong_key = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        &claims("mallory", grants.clone(), 600),
    );
    let expired = hs_jwt(&claims("alice", grants.clone(), -3600));
    let mut early = claims("alice", grants.clone(), 7200);
    early["nbf"] = json!(now() + 3600);
    let early = hs_jwt(&early);
    let no_exp = hs_jwt(&json!({ "sub": "alice", "ds": grants }));
    for (what, t) in [
        ("bad signature", wrong_key),
        ("expired", expired),
        ("nbf", early),
        ("no exp", no_exp),
    ] {
        let r = send(&s, M::PUT, "orders/a", Some(&t)).await;
        assert_eq!(r.status(), 401, "{what}");
        assert!(challenge(&r).contains("invalid_token"), "{what}");
    }
}

/// RS256 with a PEM public key file and EdDSA with an inline PEM both verify;
/// a token signed by another Ed25519 key does not.
#[tokio::test]
async fn rs256_and_eddsa_jwts() {
    let ed = ed_key();
    let other = ed_key();
    let cfg = AuthConfig {
        jwt: Some(JwtConfig {
            public_key_files: vec![temp_file("rsa.pem", TEST_RSA_PUBLIC_PEM)],
            public_keys: vec![ed.public_pem()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = start(cfg).await;
    let c = claims(
        "svc",
        json!([{ "prefix": "orders/", "ops": ["create"] }]),
        600,
    );
    let rs = sign(
        Algorithm::RS256,
        None,
        &EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE_PEM.as_bytes()).unwrap(),
        &c,
    );
    assert_eq!(status(&s, M::PUT, "orders/rs", Some(&rs)).await, 201);
    let eddsa = sign(Algorithm::EdDSA, None, &ed.encoding, &c);
    assert_eq!(status(&s, M::PUT, "orders/ed", Some(&eddsa)).await, 201);
    let forged = sign(Algorithm::EdDSA, None, &other.encoding, &c);
    assert_eq!(status(&s, M::PUT, "orders/ed2", Some(&forged)).await, 401);
    // An HS256 token is not ours here (no HS key): refused, not crashed.
    assert_eq!(
        status(&s, M::PUT, "orders/hs", Some(&hs_jwt(&c))).await,
        401
    );
}

/// A JWKS file: the key is chosen by kid; the wrong key under a kid, or an
/// unknown kid, is refused.
#[tokio::test]
async fn jwks_file_selects_key_by_kid() {
    let k1 = ed_key();
    let k2 = ed_key();
    let jwks = json!({ "keys": [k1.jwk("k1"), k2.jwk("k2")] });
    let cfg = AuthConfig {
        jwt: Some(JwtConfig {
            jwks_file: Some(temp_file("jwks.json", &jwks.to_string())),
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = start(cfg).await;
    let c = claims("svc", json!([{ "prefix": "", "ops": ["create"] }]), 600);
    let good = sign(Algorithm::EdDSA, Some("k2"), &k2.encoding, &c);
    assert_eq!(status(&s, M::PUT, "a", Some(&good)).await, 201);
    let good1 = sign(Algorithm::EdDSA, Some("k1"), &k1.encoding, &c);
    assert_eq!(status(&s, M::PUT, "b", Some(&good1)).await, 201);
    let mismatched = sign(Algorithm::EdDSA, Some("k1"), &k2.encoding, &c);
    assert_eq!(status(&s, M::PUT, "c", Some(&mismatched)).await, 401);
    let unknown = sign(Algorithm::EdDSA, Some("k9"), &k2.encoding, &c);
    assert_eq!(status(&s, M::PUT, "d", Some(&unknown)).await, 401);
}

/// An HS256 token allowing `create` everywhere, signed with `secret`.
fn create_token(secret: &str) -> String {
    let c = claims("svc", json!([{ "prefix": "", "ops": ["create"] }]), 600);
    sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(secret.as_bytes()),
        &c,
    )
}

/// `reload_auth` re-reads a rotated HS256 secret file: tokens signed with
/// the new secret are accepted and the old ones refused from then on, not
/// before; a reload that cannot read the file fails and keeps the keys.
#[tokio::test]
async fn reload_rotates_key_files() {
    let file = temp_file("rotating-secret", "first-secret-0123456789abcdef0123456789");
    let cfg = AuthConfig {
        jwt: Some(JwtConfig {
            hs_secret_file: Some(file.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = start(cfg).await;
    let first = create_token("first-secret-0123456789abcdef0123456789");
    let second = create_token("second-secret-0123456789abcdef012345678");
    assert_eq!(status(&s, M::PUT, "r1", Some(&first)).await, 201);

    std::fs::write(&file, "second-secret-0123456789abcdef012345678\n").unwrap();
    // Written but not reloaded: the first secret is still the one in force.
    assert_eq!(status(&s, M::PUT, "r2", Some(&second)).await, 401);
    assert_eq!(status(&s, M::PUT, "r2", Some(&first)).await, 201);

    assert!(s.server.as_ref().unwrap().reload_auth().unwrap());
    assert_eq!(status(&s, M::PUT, "r3", Some(&first)).await, 401);
    assert_eq!(status(&s, M::PUT, "r3", Some(&second)).await, 201);

    std::fs::remove_file(&file).unwrap();
    assert!(s.server.as_ref().unwrap().reload_auth().is_err());
    assert_eq!(status(&s, M::PUT, "r4", Some(&second)).await, 201);
}

/// The binary reloads the auth key files on SIGHUP.
#[tokio::test]
async fn sighup_reloads_auth_keys() {
    let dir = served::TempDir::new("auth-hup");
    let key_file = dir.write("secret", "hup-first-secret-0123456789abcdef01234567");
    let cfg = dir.write(
        "ds.toml",
        &format!("[auth.jwt]\nhs_secret_file = {key_file:?}\n"),
    );
    let srv = served::Served::start(&["dev", "--port", "0", "--config", &cfg], &[], 1);
    let s = TestServer {
        base: format!("http://{}", srv.addr(false)),
        server: None,
        stop: None,
        client: reqwest::Client::new(),
    };
    let first = create_token("hup-first-secret-0123456789abcdef01234567");
    let second = create_token("hup-second-secret-0123456789abcdef0123456");
    assert_eq!(status(&s, M::PUT, "h1", Some(&first)).await, 201);
    std::fs::write(&key_file, "hup-second-secret-0123456789abcdef0123456").unwrap();
    let st = std::process::Command::new("kill")
        .args(["-HUP", &srv.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(srv.wait_for_log("auth keys reloaded"), "{}", srv.log());
    assert_eq!(status(&s, M::PUT, "h2", Some(&first)).await, 401);
    assert_eq!(status(&s, M::PUT, "h2", Some(&second)).await, 201);
}

/// State of the stand-in forward-auth backend: calls and the last URI it was asked about.
#[derive(Default)]
struct Backend {
    calls: AtomicUsize,
    last_uri: Mutex<String>,
    last_path: Mutex<String>,
}

/// Decides like a real backend would: "Bearer fa-good" may use orders/,
/// "fa-slow" never answers in time, "fa-broken" gets a 500, else 401.
async fn backend(State(b): State<Arc<Backend>>, headers: HeaderMap) -> axum::response::Response {
    b.calls.fetch_add(1, Ordering::SeqCst);
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    *b.last_uri.lock().unwrap() = h("x-forwarded-uri");
    *b.last_path.lock().unwrap() = h("x-ds-path");
    match h("authorization").as_str() {
        "Bearer fa-good" if h("x-ds-path").starts_with("orders/") => {
            ([("x-auth-user", "carol")], "ok").into_response()
        }
        "Bearer fa-good" => axum::http::StatusCode::FORBIDDEN.into_response(),
        "Bearer fa-slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late".into_response()
        }
        "Bearer fa-broken" => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        _ => axum::http::StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn start_backend() -> (String, Arc<Backend>) {
    let state = Arc::new(Backend::default());
    let app = axum::Router::new()
        .route("/check", axum::routing::get(backend))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/check"), state)
}

fn forward_config(url: String) -> AuthConfig {
    AuthConfig {
        forward: Some(ForwardAuthConfig {
            url,
            // Generous, so a loaded machine never turns an allow into a 503;
            // the slow backend sleeps far longer.
            timeout: Duration::from_secs(2),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Forward auth: 2xx allows, 403 and 401 pass through, a 500 or a timeout
/// is a 503 with Retry-After; the URL token is not forwarded.
#[tokio::test]
async fn forward_auth_decisions() {
    let (url, b) = start_backend().await;
    let s = start(forward_config(url)).await;
    assert_eq!(status(&s, M::PUT, "orders/a", Some("fa-good")).await, 201);
    assert_eq!(status(&s, M::PUT, "users/a", Some("fa-good")).await, 403);
    assert_eq!(
        status(&s, M::PUT, "orders/caf%C3%A9", Some("fa-good")).await,
        201
    );
    assert_eq!(
        b.last_path.lock().unwrap().as_str(),
        "orders/caf%C3%A9",
        "X-DS-Path is percent-encoded"
    );
    let r = send(&s, M::PUT, "orders/b", Some("fa-unknown")).await;
    assert_eq!(r.status(), 401);
    assert!(challenge(&r).starts_with("Bearer realm="));
    for t in ["fa-broken", "fa-slow"] {
        let r = send(&s, M::PUT, "orders/c", Some(t)).await;
        assert_eq!(r.status(), 503, "{t}");
        assert!(r.headers().contains_key("retry-after"), "{t}");
    }
    let r = s
        .client
        .get(s.url("orders/a?offset=-1&access_token=url-secret"))
        .bearer_auth("fa-good")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = b.last_uri.lock().unwrap().clone();
    assert_eq!(seen, "/v1/stream/orders/a?offset=-1");
}

/// Forward-auth decisions are cached per credential, operation and path.
#[tokio::test]
async fn forward_auth_caches_decisions() {
    let (url, b) = start_backend().await;
    let s = start(forward_config(url)).await;
    assert_eq!(status(&s, M::PUT, "orders/a", Some("fa-good")).await, 201);
    let after_create = b.calls.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            status(&s, M::GET, "orders/a?offset=-1", Some("fa-good")).await,
            200
        );
    }
    assert_eq!(b.calls.load(Ordering::SeqCst), after_create + 1);
    assert_eq!(status(&s, M::HEAD, "orders/a", Some("fa-good")).await, 200);
    assert_eq!(
        status(&s, M::GET, "orders/a?offset=-1", Some("fa-other")).await,
        401
    );
    assert_eq!(b.calls.load(Ordering::SeqCst), after_create + 3);
}

/// Reads SSE's first bytes and returns the response's status and content type.
async fn sse_open(s: &TestServer, url: &str, cookie: Option<&str>) -> (u16, String) {
    let mut r = s.client.get(url);
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    let mut resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    if status == 200 {
        // The first event arrives (the stream has data).
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("an SSE event")
            .unwrap();
        assert!(chunk.is_some());
    }
    (status, ct)
}

async fn create_with_data(s: &TestServer, rel: &str, token: &str) {
    let r = s
        .client
        .put(s.url(rel))
        .header("content-type", "text/plain")
        .bearer_auth(token)
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

/// A browser's EventSource authenticates with the cookie for reads; the
/// same cookie does not authorise an append.
#[tokio::test]
async fn cookie_authenticates_sse_reads_only() {
    let s = start(static_config()).await;
    create_with_data(&s, "orders/sse", SVC_TOKEN).await;
    let cookie = format!("theme=dark; ds_token={SVC_TOKEN}");
    let (st, ct) = sse_open(&s, &s.url("orders/sse?offset=-1&live=sse"), Some(&cookie)).await;
    assert_eq!(st, 200);
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let r = s
        .client
        .post(s.url("orders/sse"))
        .header("content-type", "text/plain")
        .header("cookie", &cookie)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// `?access_token=` carries a short-lived JWT for an SSE read; it is refused
/// for an append, when its expiry is beyond the maximum lifetime, and when
/// it is a static token rather than a JWT; the token is never echoed.
#[tokio::test]
async fn access_token_in_url_for_reads_only() {
    let mut cfg = hs_config();
    cfg.tokens = static_tokens();
    let s = start(cfg).await;
    create_with_data(&s, "orders/q", SVC_TOKEN).await;
    let short = hs_jwt(&claims(
        "browser",
        json!([{ "prefix": "orders/", "ops": ["read", "append"] }]),
        300,
    ));
    let (st, ct) = sse_open(
        &s,
        &s.url(&format!("orders/q?offset=-1&live=sse&access_token={short}")),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert!(ct.starts_with("text/event-stream"));

    let r = s
        .client
        .post(s.url(&format!("orders/q?access_token={short}")))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    assert!(!body.contains(&short[short.len() - 20..]), "{body}");

    let long = hs_jwt(&claims(
        "browser",
        json!([{ "prefix": "orders/", "ops": ["read"] }]),
        3600,
    ));
    let (st, _) = sse_open(
        &s,
        &s.url(&format!("orders/q?offset=-1&live=sse&access_token={long}")),
        None,
    )
    .await;
    assert_eq!(st, 401);
    let (st, _) = sse_open(
        &s,
        &s.url(&format!("orders/q?offset=-1&access_token={SVC_TOKEN}")),
        None,
    )
    .await;
    assert_eq!(st, 401);
}

/// The read-token endpoint mints a short read-only token for a granted
/// prefix (usable as ?access_token=, not for appends) and refuses others.
#[tokio::test]
async fn read_token_endpoint_mints_scoped_tokens() {
    let mut cfg = hs_config();
    cfg.tokens = static_tokens();
    cfg.read_token_endpoint = true;
    let s = start(cfg).await;
    create_with_data(&s, "orders/m", SVC_TOKEN).await;
    let r = s
        .client
        .post(s.url("__ds/read-token?prefix=orders/m"))
        .bearer_auth(SVC_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let minted = v["access_token"].as_str().unwrap().to_owned();
    assert!(v["expires_in"].as_u64().unwrap() <= 600);
    let read = s
        .client
        .get(s.url(&format!("orders/m?offset=-1&access_token={minted}")))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(status(&s, M::POST, "orders/m", Some(&minted)).await, 403);
    assert_eq!(
        status(&s, M::GET, "orders/other?offset=-1", Some(&minted)).await,
        403
    );
    let refused = s
        .client
        .post(s.url("__ds/read-token?prefix=users/"))
        .bearer_auth(SVC_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let anonymous = s
        .client
        .post(s.url("__ds/read-token?prefix=orders/"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

/// An authenticated catch-up read is marked private (never public) and
/// varies on Authorization and Cookie.
#[tokio::test]
async fn authenticated_reads_are_private() {
    let s = start(static_config()).await;
    create_with_data(&s, "orders/c", SVC_TOKEN).await;
    let r = send(&s, M::GET, "orders/c?offset=-1", Some(SVC_TOKEN)).await;
    assert_eq!(r.status(), 200);
    let cc = r.headers()["cache-control"].to_str().unwrap().to_owned();
    assert!(cc.starts_with("private"), "{cc}");
    assert!(!cc.contains("public"), "{cc}");
    let vary = r.headers()["vary"].to_str().unwrap().to_owned();
    assert!(
        vary.contains("Authorization") && vary.contains("Cookie"),
        "{vary}"
    );
}

/// CORS preflight is answered without credentials; /healthz, /readyz and
/// the webhook JWKS stay open; /metrics needs an admin grant on "".
#[tokio::test]
async fn open_routes_and_admin() {
    let s = start(static_config()).await;
    let r = s
        .client
        .request(M::OPTIONS, s.url("orders/a"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers().contains_key("access-control-allow-methods"));
    for path in ["/healthz", "/readyz", "/v1/stream/__ds/jwks.json"] {
        let r = s
            .client
            .get(format!("{}{path}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let metrics = format!("{}/metrics", s.base);
    let code = |t: Option<&'static str>| {
        let mut r = s.client.get(&metrics);
        if let Some(t) = t {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(code(None).await, 401);
    assert_eq!(code(Some(ALL_TOKEN)).await, 403);
    assert_eq!(code(Some(ADMIN_TOKEN)).await, 200);
}

/// Subscription callback/ack/release reach subscriptions.rs with their own
/// bearer token (404 for an unknown subscription, not our 401); management
/// and claim need admin.
#[tokio::test]
async fn subscription_routes() {
    let s = start(static_config()).await;
    for action in ["callback", "ack", "release"] {
        let r = s
            .client
            .post(s.url(&format!("__ds/subscriptions/nosuch/{action}")))
            .bearer_auth("per-wake-token")
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{action}");
    }
    let claim = s.url("__ds/subscriptions/nosuch/claim");
    let r = s.client.post(&claim).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .post(&claim)
        .bearer_auth(ALL_TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = s
        .client
        .post(&claim)
        .bearer_auth(ADMIN_TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s
        .client
        .get(s.url("__ds/subscriptions/nosuch"))
        .bearer_auth(SVC_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// A fork needs read on its source as well as create on the target.
#[tokio::test]
async fn fork_needs_read_on_source() {
    let mut cfg = static_config();
    cfg.tokens.push(StaticToken {
        name: "mine".into(),
        sha256: hash_token("mine-token"),
        grants: vec![grant("mine/", &[Op::Create, Op::Read])],
    });
    let s = start(cfg).await;
    create_with_data(&s, "orders/src", SVC_TOKEN).await;
    let fork = |token: &'static str, target: &'static str| {
        s.client
            .put(s.url(target))
            .header("stream-forked-from", "/v1/stream/orders/src")
            .bearer_auth(token)
            .send()
    };
    assert_eq!(fork("mine-token", "mine/copy").await.unwrap().status(), 403);
    assert_eq!(fork(SVC_TOKEN, "orders/copy").await.unwrap().status(), 201);
}

/// A configuration that does not load fails closed: protected routes 503,
/// /healthz still answers.
#[tokio::test]
async fn broken_config_fails_closed() {
    let cfg = AuthConfig {
        jwt: Some(JwtConfig {
            hs_secret: Some(Secret::new("short")),
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = start(cfg).await;
    assert_eq!(status(&s, M::GET, "a?offset=-1", None).await, 503);
    let r = s
        .client
        .get(format!("{}/healthz", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Random garbage in Authorization (and JWT-shaped garbage) never yields a 5xx.
#[tokio::test]
async fn garbage_authorization_never_5xx() {
    use rand::{Rng, SeedableRng};
    let mut cfg = hs_config();
    cfg.tokens = static_tokens();
    let s = start(cfg).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for i in 0..300 {
        let value: Vec<u8> = match i % 4 {
            0 => (0..rng.gen_range(0..80))
                .map(|_| rng.gen_range(0x20u8..=0x7e))
                .collect(),
            1 => {
                let mut v = b"Bearer ".to_vec();
                v.extend((0..rng.gen_range(0..200)).map(|_| {
                    let c = rng.gen_range(0x20u8..=0xff);
                    if c == 0x7f {
                        b'x'
                    } else {
                        c
                    }
                }));
                v
            }
            2 => {
                let seg = |rng: &mut rand::rngs::StdRng| {
                    let raw: Vec<u8> = (0..rng.gen_range(0..60)).map(|_| rng.gen()).collect();
                    b64.encode(raw)
                };
                let header = if rng.gen_bool(0.5) {
                    b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#)
                } else {
                    seg(&mut rng)
                };
                format!("Bearer {header}.{}.{}", seg(&mut rng), seg(&mut rng)).into_bytes()
            }
            _ => {
                let alg =
                    ["HS256", "RS256", "EdDSA", "none", "ES256", "HS512"][rng.gen_range(0..6)];
                let h = b64.encode(format!(r#"{{"alg":"{alg}","kid":"x"}}"#));
                let p = b64.encode(r#"{"sub":"x","exp":99999999999,"ds":"nope"}"#);
                format!("Bearer {h}.{p}.{}", b64.encode([1u8, 2, 3])).into_bytes()
            }
        };
        let Ok(hv) = reqwest::header::HeaderValue::from_bytes(&value) else {
            continue;
        };
        let method = [M::GET, M::POST, M::PUT, M::DELETE][i % 4].clone();
        let r = s
            .client
            .request(method, s.url("orders/fuzz?offset=-1"))
            .header("authorization", hv)
            .header("content-type", "text/plain")
            .send()
            .await
            .unwrap();
        assert!(
            r.status().as_u16() < 500,
            "{} for {:?}",
            r.status(),
            String::from_utf8_lossy(&value)
        );
    }
}
