//! Listeners of the real binary: HTTPS with HTTP/2 by ALPN (certificates
//! generated here with rcgen), h2c on cleartext listeners, many live reads
//! multiplexed on one HTTP/2 connection, certificate reload on SIGHUP
//! without dropping open connections, and 503 shedding at the connection cap.

#![allow(clippy::unwrap_used)]

mod served;
mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use served::{Served, TempDir};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A test CA and a server certificate for localhost / 127.0.0.1 it signed.
struct TestPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki(name: &str) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    TestPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Writes the server's cert.pem/key.pem and the CA file `ca-<tag>.pem`.
fn install(dir: &TempDir, p: &TestPki, tag: &str) -> (String, String, String) {
    (
        dir.write("cert.pem", &p.cert_pem),
        dir.write("key.pem", &p.key_pem),
        dir.write(&format!("ca-{tag}.pem"), &p.ca_pem),
    )
}

/// Runs curl; returns (exit code, stdout). `-w` output goes to stdout.
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `%{http_version} %{http_code}` of a curl request, body discarded.
fn curl_status(args: &[&str]) -> String {
    let mut a = vec!["-o", "/dev/null", "-w", "%{http_version} %{http_code}"];
    a.extend_from_slice(args);
    let (code, out) = curl(&a);
    assert_eq!(code, 0, "curl {args:?} failed: {out}");
    out
}

fn start_tls(dir: &TempDir, extra: &[&str]) -> Served {
    let cert = dir.0.join("cert.pem");
    let key = dir.0.join("key.pem");
    let mut args = vec![
        "dev",
        "--port",
        "0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--plain-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Served::start(&args, &[], 2)
}

/// One HTTP/2 connection over TLS, trusting only `ca_pem`.
async fn h2_connect(addr: SocketAddr, ca_pem: &str) -> SendRequest<Full<Bytes>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

async fn h2_request(
    send: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &'static str,
) -> hyper::Response<hyper::body::Incoming> {
    send.ready().await.unwrap();
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    send.send_request(req).await.unwrap()
}

/// Reads `body` until it contains `needle` (true) or ends (false).
async fn body_until(mut body: hyper::body::Incoming, needle: &str) -> bool {
    let mut seen = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        if let Some(d) = frame.data_ref() {
            seen.extend_from_slice(d);
            if String::from_utf8_lossy(&seen).contains(needle) {
                return true;
            }
        }
    }
    false
}

/// HTTPS negotiates HTTP/2 by ALPN (and HTTP/1.1 for clients that only
/// offer it), protocol operations work over it, and a client that connects
/// without ever handshaking does not hold up other clients.
#[test]
fn https_negotiates_http2_and_serves_the_protocol() {
    let dir = TempDir::new("tls");
    let (_, _, ca) = install(&dir, &pki("a"), "a");
    let srv = start_tls(&dir, &[]);
    let tls = srv.addr(true);
    // Silent: connected, never sends a ClientHello.
    let _silent = TcpStream::connect(tls).unwrap();
    let base = format!("https://127.0.0.1:{}", tls.port());
    assert_eq!(
        curl_status(&["--http2", "--cacert", &ca, &format!("{base}/healthz")]),
        "2 200"
    );
    assert_eq!(
        curl_status(&["--http1.1", "--cacert", &ca, &format!("{base}/healthz")]),
        "1.1 200"
    );
    let url = format!("{base}/v1/stream/tls-ops");
    let ct = "content-type: text/plain";
    assert_eq!(
        curl_status(&["--http2", "--cacert", &ca, "-X", "PUT", "-H", ct, &url]),
        "2 201"
    );
    let appended = curl_status(&[
        "--http2",
        "--cacert",
        &ca,
        "-X",
        "POST",
        "-H",
        ct,
        "--data-binary",
        "hello ",
        &url,
    ]);
    assert!(appended.starts_with("2 2"), "{appended}");
    curl_status(&[
        "--http2",
        "--cacert",
        &ca,
        "-X",
        "POST",
        "-H",
        ct,
        "--data-binary",
        "over h2",
        &url,
    ]);
    let (code, body) = curl(&["--http2", "--cacert", &ca, &format!("{url}?offset=-1")]);
    assert_eq!((code, body.as_str()), (0, "hello over h2"));
    // Without the CA the server's certificate is refused (it really is TLS).
    let (code, _) = curl(&["--http2", &format!("{base}/healthz")]);
    assert_ne!(code, 0);
}

/// Cleartext listeners speak HTTP/2 with prior knowledge (h2c) as well as
/// HTTP/1.1, both the extra plain listener beside TLS and a plain-only server.
#[test]
fn plain_listeners_speak_h2c_with_prior_knowledge() {
    let dir = TempDir::new("tls");
    install(&dir, &pki("a"), "a");
    let srv = start_tls(&dir, &[]);
    let plain = format!("http://{}/healthz", srv.addr(false));
    assert_eq!(curl_status(&["--http2-prior-knowledge", &plain]), "2 200");
    assert_eq!(curl_status(&["--http1.1", &plain]), "1.1 200");
    let only_plain = Served::start(&["dev", "--port", "0"], &[], 1);
    let url = format!("http://{}/v1/stream/h2c", only_plain.addr(false));
    assert_eq!(
        curl_status(&[
            "--http2-prior-knowledge",
            "-X",
            "PUT",
            "-H",
            "content-type: text/plain",
            "--data-binary",
            "x",
            &url
        ]),
        "2 201"
    );
}

/// One HTTP/2 connection over TLS carries 50 SSE reads and 50 long-polls
/// at once (a browser page's EventSources share a connection), and every
/// one of them receives the append made to its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_live_reads_share_one_http2_connection() {
    const EACH: usize = 50;
    let dir = TempDir::new("tls");
    let p = pki("a");
    install(&dir, &p, "a");
    let srv = start_tls(&dir, &[]);
    let mut send = h2_connect(srv.addr(true), &p.ca_pem).await;
    for i in 0..2 * EACH {
        let r = h2_request(&mut send, "PUT", &format!("/v1/stream/live/{i}"), "").await;
        assert_eq!(r.status(), 201);
    }
    let mut readers = Vec::new();
    for i in 0..2 * EACH {
        let live = if i < EACH { "sse" } else { "long-poll" };
        let req = hyper::Request::get(format!(
            "https://localhost/v1/stream/live/{i}?offset=-1&live={live}"
        ))
        .body(Full::new(Bytes::new()))
        .unwrap();
        send.ready().await.unwrap();
        // Queued on the connection now, before any append below.
        let response = send.send_request(req);
        readers.push(tokio::spawn(async move {
            let r = response.await.unwrap();
            assert_eq!(r.version(), hyper::Version::HTTP_2);
            assert_eq!(r.status(), 200, "reader {i}");
            body_until(r.into_body(), &format!("payload-{i}")).await
        }));
    }
    // Appends go over the same connection while all readers are open.
    for i in 0..2 * EACH {
        let body: &'static str = Box::leak(format!("payload-{i}").into_boxed_str());
        let r = h2_request(&mut send, "POST", &format!("/v1/stream/live/{i}"), body).await;
        assert!(r.status().is_success(), "append {i}: {}", r.status());
    }
    for (i, r) in readers.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .unwrap_or_else(|_| panic!("reader {i} never got its append"))
            .unwrap();
        assert!(got, "reader {i} ended without its append");
    }
}

/// SIGHUP reloads a replaced certificate: new connections present it (the
/// new CA is accepted, the old one refused) while an SSE connection opened
/// before the reload stays open and receives a later append; a reload from
/// a broken file logs an error and keeps the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificate_without_dropping_connections() {
    let dir = TempDir::new("tls");
    let old = pki("old");
    let (cert, _, ca_old) = install(&dir, &old, "old");
    let srv = start_tls(&dir, &[]);
    let tls = srv.addr(true);
    let base = format!("https://127.0.0.1:{}", tls.port());
    let mut send = h2_connect(tls, &old.ca_pem).await;
    assert_eq!(
        h2_request(&mut send, "PUT", "/v1/stream/reload", "")
            .await
            .status(),
        201
    );
    let sse = h2_request(&mut send, "GET", "/v1/stream/reload?offset=-1&live=sse", "").await;
    assert_eq!(sse.status(), 200);

    let new = pki("new");
    let (_, _, ca_new) = install(&dir, &new, "new");
    let hup = |pid: u32| {
        let st = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    hup(srv.pid());
    assert!(
        srv.wait_for_log("TLS certificate reloaded"),
        "{}",
        srv.log()
    );
    let health = format!("{base}/healthz");
    assert_eq!(
        curl_status(&["--http2", "--cacert", &ca_new, &health]),
        "2 200"
    );
    let (code, _) = curl(&["--http2", "--cacert", &ca_old, &health]);
    assert_ne!(code, 0, "the old CA still verifies a new connection");

    // The connection from before the reload is still alive and live.
    let (code, _) = curl(&[
        "--http2",
        "--cacert",
        &ca_new,
        "-X",
        "POST",
        "-H",
        "content-type: text/plain",
        "--data-binary",
        "after-reload",
        &format!("{base}/v1/stream/reload"),
    ]);
    assert_eq!(code, 0);
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        body_until(sse.into_body(), "after-reload"),
    )
    .await
    .expect("the SSE connection opened before the reload got no append");
    assert!(got, "the SSE connection ended");

    // A broken replacement is refused; the new certificate stays in use.
    std::fs::write(&cert, "not a certificate").unwrap();
    hup(srv.pid());
    assert!(srv.wait_for_log("TLS reload failed"), "{}", srv.log());
    assert_eq!(
        curl_status(&["--http2", "--cacert", &ca_new, &health]),
        "2 200"
    );
}

/// At --max-connections, a further connection is answered `503` with
/// `Retry-After: 1` and closed rather than left waiting, and counted in
/// /metrics; once a connection closes, new ones are served again.
#[test]
fn connection_cap_sheds_with_503_and_retry_after() {
    let srv = Served::start(&["dev", "--port", "0", "--max-connections", "2"], &[], 1);
    let addr = srv.addr(false);
    let held = [
        TcpStream::connect(addr).unwrap(),
        TcpStream::connect(addr).unwrap(),
    ];
    let mut third = TcpStream::connect(addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    // read_to_string returns only at EOF: the server closed the connection.
    third.read_to_string(&mut resp).unwrap();
    let lower = resp.to_ascii_lowercase();
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(lower.contains("retry-after: 1\r\n"), "{resp}");
    assert!(lower.contains("connection: close\r\n"), "{resp}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out) = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{addr}/healthz"),
        ]);
        if code == 0 && out == "200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served again after the held connections closed: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The refusal is counted for operators.
    let (code, metrics) = curl(&[&format!("http://{addr}/metrics")]);
    assert_eq!(code, 0, "{metrics}");
    let shed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ds_shed_connections_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ds_shed_connections_total in:\n{metrics}"));
    assert!(shed >= 1, "shed {shed}");
}

/// Without a configured public URL, the URLs a subscription hands out
/// (JWKS) use https when the creating request came over TLS (over HTTP/1.1
/// and HTTP/2 alike), and http on the cleartext listener.
#[test]
fn handed_out_urls_follow_the_connection_scheme() {
    let dir = TempDir::new("tls-scheme");
    let (_, _, ca) = install(&dir, &pki("s"), "s");
    let srv = start_tls(&dir, &[]);
    let body =
        r#"{"type":"webhook","streams":["jobs/a"],"webhook":{"url":"http://127.0.0.1:9/hook"}}"#;
    let put = |base: &str, id: &str, extra: &[&str]| -> String {
        let url = format!("{base}/v1/stream/__ds/subscriptions/{id}");
        let mut args = vec![
            "-X",
            "PUT",
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        let (code, out) = curl(&args);
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["webhook"]["signing"]["jwks_url"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let tls = format!("https://localhost:{}", srv.addr(true).port());
    for (id, proto) in [("h1", "--http1.1"), ("h2", "--http2")] {
        let jwks = put(&tls, id, &["--cacert", &ca, proto]);
        assert!(jwks.starts_with("https://localhost:"), "{proto}: {jwks}");
    }
    let plain = format!("http://127.0.0.1:{}", srv.addr(false).port());
    let jwks = put(&plain, "plain", &[]);
    assert!(jwks.starts_with("http://127.0.0.1:"), "{jwks}");
}
