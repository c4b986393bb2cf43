//! Test harness: runs the real `durable-streams-server` binary, and a small
//! TCP proxy that injects failures between the client and the server.

#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The server binary next to this test executable (`target/<profile>/`),
/// built with `cargo build -p durable-streams-server` if it is missing (as
/// with `cargo test -p durable-streams-client` alone; `cargo test --workspace`
/// builds it because the server crate has integration tests of its own).
pub fn server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("DURABLE_STREAMS_SERVER_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test-exe>
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let bin = profile_dir.join(format!(
            "durable-streams-server{}",
            std::env::consts::EXE_SUFFIX
        ));
        if !bin.exists() {
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let target_dir = profile_dir.parent().unwrap();
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args([
                "build",
                "-p",
                "durable-streams-server",
                "--bin",
                "durable-streams-server",
            ]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd
                .env("CARGO_TARGET_DIR", target_dir)
                .status()
                .expect("run cargo build for the server");
            assert!(status.success(), "building durable-streams-server failed");
        }
        assert!(bin.exists(), "server binary missing at {}", bin.display());
        bin
    })
    .clone()
}

/// A running server process; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// `durable-streams-server dev --port 0 <args>`, waiting for its listening line.
    pub fn start(args: &[&str]) -> Server {
        Server::start_on(0, args)
    }

    pub fn start_on(port: u16, args: &[&str]) -> Server {
        let mut child = Command::new(server_bin())
            .arg("dev")
            .args(["--port", &port.to_string()])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = parse_listen_line(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server did not report its address");
        Server { child, addr }
    }

    /// Base URL of the stream namespace.
    pub fn base(&self) -> String {
        format!("http://{}/v1/stream", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base(), path)
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_listen_line(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    let rest = &line[line.find("addr=")? + 5..];
    rest.split_whitespace()
        .next()?
        .trim_matches('"')
        .parse()
        .ok()
}

/// Unique stream names per test.
pub fn name(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A TCP proxy in front of a server that can fail requests on demand.
#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

struct ProxyState {
    upstream: Mutex<SocketAddr>,
    /// Answer this many requests with `503 Retry-After: 0` without forwarding them.
    fail_next: AtomicUsize,
    /// Forward this many requests but drop their responses (close the connection).
    drop_responses: AtomicUsize,
    /// Close every new connection immediately.
    refuse: AtomicBool,
    /// Start refusing connections as soon as a response is dropped.
    refuse_after_drop: AtomicBool,
    /// Everything clients sent, for header assertions.
    log: Mutex<Vec<u8>>,
    /// Requests whose responses were dropped.
    dropped: AtomicUsize,
    /// 503s actually injected (tests assert it so a reused connection
    /// cannot make a failure test pass vacuously).
    injected: AtomicUsize,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState {
            upstream: Mutex::new(upstream),
            fail_next: AtomicUsize::new(0),
            drop_responses: AtomicUsize::new(0),
            refuse: AtomicBool::new(false),
            refuse_after_drop: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            dropped: AtomicUsize::new(0),
            injected: AtomicUsize::new(0),
        });
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = handle(client, st).await;
                });
            }
        });
        Proxy { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/v1/stream/{}", self.addr, path)
    }
    pub fn fail_next(&self, n: usize) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }
    pub fn drop_responses(&self, n: usize) {
        self.state.drop_responses.store(n, Ordering::SeqCst);
    }
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::SeqCst);
    }
    pub fn refuse_after_drop(&self, on: bool) {
        self.state.refuse_after_drop.store(on, Ordering::SeqCst);
    }
    pub fn set_upstream(&self, addr: SocketAddr) {
        *self.state.upstream.lock().unwrap() = addr;
    }
    /// How many 503s were injected so far. `fail_next` only hits the first
    /// request of a connection, so tests that need every failure to land use
    /// a client without connection pooling and check this count.
    pub fn injected(&self) -> usize {
        self.state.injected.load(Ordering::SeqCst)
    }
    pub fn dropped(&self) -> usize {
        self.state.dropped.load(Ordering::SeqCst)
    }
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.state.log.lock().unwrap()).to_lowercase()
    }
}

fn take_one(a: &AtomicUsize) -> bool {
    a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

async fn handle(mut client: TcpStream, st: Arc<ProxyState>) -> std::io::Result<()> {
    if st.refuse.load(Ordering::SeqCst) {
        return Ok(());
    }
    let upstream_addr = *st.upstream.lock().unwrap();
    let mut first = vec![0u8; 64 * 1024];
    let n = client.read(&mut first).await?;
    if n == 0 {
        return Ok(());
    }
    st.log.lock().unwrap().extend_from_slice(&first[..n]);
    if take_one(&st.fail_next) {
        st.injected.fetch_add(1, Ordering::SeqCst);
        client
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 0\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await?;
        return Ok(());
    }
    let upstream = TcpStream::connect(upstream_addr).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    uw.write_all(&first[..n]).await?;
    let st2 = st.clone();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            st2.log.lock().unwrap().extend_from_slice(&buf[..n]);
            uw.write_all(&buf[..n]).await?;
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = ur.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if take_one(&st.drop_responses) {
            if st.refuse_after_drop.load(Ordering::SeqCst) {
                st.refuse.store(true, Ordering::SeqCst);
            }
            st.dropped.fetch_add(1, Ordering::SeqCst);
            break; // the server applied the request; the client never hears
        }
        cw.write_all(&buf[..n]).await?;
    }
    up.abort();
    Ok(())
}
