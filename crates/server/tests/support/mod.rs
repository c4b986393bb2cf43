//! Shared by the tests that run the real `durable-streams-server` binary:
//! spawning it with its stderr drained, and learning its address from the
//! `listening addr=...` log line.
#![allow(dead_code)] // each test file uses a subset

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_durable-streams-server");

/// Removes ANSI escape sequences (CSI ... final byte), in case the logger colours its output.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The address of a `... listening addr=127.0.0.1:PORT ...` log line.
pub fn parse_listen_line(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    let token = rest.split_whitespace().next()?.trim_matches('"');
    token.parse().ok()
}

/// A just-spawned server: the child, everything it logged so far, and a
/// channel that yields its address once it logs the listening line.
pub struct Spawned {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub addr: mpsc::Receiver<SocketAddr>,
}

/// Spawns the binary with `args` (the subcommand included). A thread keeps
/// draining stderr for the life of the process so it never blocks on a
/// full pipe. The caller wraps `child` in its kill-on-drop guard before
/// waiting on `addr`, so a failed start never leaks the process.
pub fn spawn<I, S>(args: I) -> Spawned
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the server binary");
    let stderr = child.stderr.take().expect("piped stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut tx = Some(tx);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = strip_ansi(&String::from_utf8_lossy(&raw));
            sink.lock().unwrap().push_str(&line);
            if let Some(addr) = parse_listen_line(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    Spawned {
        child,
        log,
        addr: rx,
    }
}

/// A running server process; killed (and reaped) on drop.
pub struct ServerProc {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    exited: Option<ExitStatus>,
}

impl ServerProc {
    /// Starts `durable-streams-server dev --port 0 <args>` and waits for its listening line.
    pub fn start(args: &[&str]) -> ServerProc {
        let sp = spawn(
            ["dev", "--port", "0"]
                .iter()
                .copied()
                .chain(args.iter().copied()),
        );
        let rx = sp.addr;
        let log = sp.log;
        // The guard exists before anything can panic, so the child never leaks.
        let mut proc = ServerProc {
            child: sp.child,
            addr: ([0, 0, 0, 0], 0).into(),
            log,
            exited: None,
        };
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(addr) => proc.addr = addr,
            Err(_) => panic!(
                "server did not log its listening address; stderr:\n{}",
                proc.log()
            ),
        }
        proc
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(st);
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A directory removed (with its contents) on drop.
pub struct TempDir(pub std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh path under the system temp dir, unique to this process and
/// moment: `ds-<tag>-<pid>-<nanos>` (removed first if it exists).
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ds-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}
