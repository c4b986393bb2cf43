//! For the config and TLS tests: the real binary started with extra
//! environment variables and any number of listeners, whose addresses (and
//! whether they are TLS) are read from its `listening` log lines; and
//! one-shot runs (`config check`, refused configs) with a time limit.
#![allow(dead_code)] // each test file uses a subset

use crate::support::{parse_listen_line, strip_ansi, BIN};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A running server; killed and reaped on drop.
pub struct Served {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    /// Every listener, in the order logged: (address, is TLS).
    pub listeners: Vec<(SocketAddr, bool)>,
}

impl Served {
    /// Starts `BIN args` with `env` added and waits (up to 20 s) until it
    /// has logged `listeners` listening lines.
    pub fn start(args: &[&str], env: &[(&str, &str)], listeners: usize) -> Served {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the server binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
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
                    let _ = tx.send((addr, line.contains("tls=true")));
                }
            }
        });
        let mut served = Served {
            child,
            log,
            listeners: Vec::new(),
        };
        while served.listeners.len() < listeners {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(l) => served.listeners.push(l),
                Err(_) => panic!(
                    "server did not log {listeners} listening lines; stderr:\n{}",
                    served.log()
                ),
            }
        }
        served
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first listener of the given kind.
    pub fn addr(&self, tls: bool) -> SocketAddr {
        self.listeners
            .iter()
            .find(|l| l.1 == tls)
            .map(|l| l.0)
            .expect("a listener of that kind")
    }

    /// Waits (up to 20 s) until the log contains `needle`; false if it never does.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The outcome of a one-shot run.
#[derive(Debug)]
pub struct Finished {
    /// None if it had to be killed after the time limit (it kept running).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `BIN args` with `env` added; kills it if it is still running after 20 s.
pub fn run_once(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn the server binary");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: strip_ansi(&err_t.join().unwrap_or_default()),
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ds-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }

    /// Writes `name` in the directory and returns its path as a string.
    pub fn write(&self, name: &str, contents: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write a temp file");
        p.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
