//! The servers under test: how to start each, wait for it, stop it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use tokio::process::{Child, Command};

use crate::conn::Conn;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    OursMem,
    OursFile,
    UpMem,
    UpWal,
    NodeMem,
    NodeFile,
}

pub const ALL: [Kind; 6] = [
    Kind::OursMem,
    Kind::OursFile,
    Kind::UpMem,
    Kind::UpWal,
    Kind::NodeMem,
    Kind::NodeFile,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::OursMem => "ours-mem",
            Kind::OursFile => "ours-file",
            Kind::UpMem => "upstream-mem",
            Kind::UpWal => "upstream-wal",
            Kind::NodeMem => "node-mem",
            Kind::NodeFile => "node-file",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        ALL.into_iter().find(|k| k.name() == s)
    }
    pub fn durable(self) -> bool {
        matches!(self, Kind::OursFile | Kind::UpWal | Kind::NodeFile)
    }
}

#[derive(Clone, Debug)]
pub struct Binaries {
    pub ours: PathBuf,
    pub upstream: Option<PathBuf>,
    pub node_dir: Option<PathBuf>,
    /// CPU list for `taskset -c` (none: no pinning).
    pub server_cpus: Option<String>,
}

pub struct Running {
    pub kind: Kind,
    pub pid: u32,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    child: Child,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub async fn start(kind: Kind, bins: &Binaries, data_dir: &Path, log: &Path) -> Result<Running> {
    let _ = std::fs::remove_dir_all(data_dir);
    std::fs::create_dir_all(data_dir)?;
    let port = free_port()?;
    let p = port.to_string();
    let dd = data_dir.to_string_lossy().to_string();
    let mut argv: Vec<String> = match kind {
        Kind::OursMem | Kind::OursFile => {
            let mut v = vec![
                bins.ours.to_string_lossy().to_string(),
                "dev".into(),
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                p,
                "--long-poll-timeout".into(),
                "30s".into(),
            ];
            if kind == Kind::OursFile {
                v.extend(["--data-dir".into(), dd]);
            }
            v
        }
        Kind::UpMem | Kind::UpWal => {
            let bin = bins
                .upstream
                .as_ref()
                .ok_or_else(|| anyhow!("upstream binary not given (--upstream)"))?;
            let mode = if kind == Kind::UpWal { "wal" } else { "memory" };
            vec![
                bin.to_string_lossy().to_string(),
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                p,
                "--data-dir".into(),
                dd,
                "--long-poll-timeout-ms".into(),
                "30000".into(),
                "--durability".into(),
                mode.into(),
            ]
        }
        Kind::NodeMem | Kind::NodeFile => {
            let dir = bins
                .node_dir
                .as_ref()
                .ok_or_else(|| anyhow!("node server dir not given (--node-dir)"))?;
            let mut v = vec![
                "node".into(),
                dir.join("server.mjs").to_string_lossy().to_string(),
                p,
            ];
            if kind == Kind::NodeFile {
                v.push(dd);
            }
            v
        }
    };
    if let Some(cpus) = &bins.server_cpus {
        argv.splice(
            0..0,
            ["taskset".to_string(), "-c".to_string(), cpus.clone()],
        );
    }
    let logf = std::fs::File::create(log)?;
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow!("spawn {:?}: {e}", argv))?;
    let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut running = Running {
        kind,
        pid,
        addr,
        data_dir: data_dir.to_path_buf(),
        child,
    };
    // Ready when it answers any HTTP response (Node has no health route).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(st)) = running.child.try_wait() {
            bail!(
                "{} exited during start-up ({st}); see {}",
                kind.name(),
                log.display()
            );
        }
        let mut c = Conn::new(addr);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), c.get("/healthz")).await {
            break;
        }
        if Instant::now() > deadline {
            running.stop().await;
            bail!(
                "{} did not answer within 30 s; see {}",
                kind.name(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // taskset execs the server, so the pid is the server's; check it.
    Ok(running)
}

impl Running {
    pub async fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
