//! Server-side measurements: CPU time and memory from /proc, fsync-family
//! syscalls counted by the kernel (`perf stat` on syscall tracepoints), disk
//! usage of a data directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use tokio::process::{Child, Command};

/// Clock ticks per second for /proc/PID/stat (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// utime + stime of the whole process (all threads, living and dead), seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after ")": state(3) ... utime is field 14, stime 15 (1-based).
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / TICKS)
}

fn status_kb(pid: u32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Resident set size in bytes.
pub fn rss_bytes(pid: u32) -> Option<f64> {
    status_kb(pid, "VmRSS:").map(|k| k * 1024.0)
}

/// Peak resident set size in bytes.
pub fn hwm_bytes(pid: u32) -> Option<f64> {
    status_kb(pid, "VmHWM:").map(|k| k * 1024.0)
}

/// Allocated bytes (st_blocks * 512) and apparent bytes under `dir`.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut alloc = 0;
    let mut apparent = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                alloc += md.blocks() * 512;
                apparent += md.len();
            }
        }
    }
    (alloc, apparent)
}

const FSYNC_EVENTS: &str = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,syscalls:sys_enter_syncfs,syscalls:sys_enter_sync_file_range,syscalls:sys_enter_msync";

/// True if `perf stat` can count syscall tracepoints here.
pub async fn perf_available() -> bool {
    let out = Command::new("perf")
        .args(["stat", "-x,", "-e", "syscalls:sys_enter_fsync", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await;
    match out {
        Ok(o) => {
            o.status.success() && String::from_utf8_lossy(&o.stderr).contains("sys_enter_fsync")
        }
        Err(_) => false,
    }
}

/// Counts fsync-family syscalls of a process (all its threads, including ones
/// it starts later) between `start` and `stop`.
pub struct FsyncCounter {
    child: Child,
    out: PathBuf,
}

impl FsyncCounter {
    pub async fn start(pid: u32, out: PathBuf) -> Option<Self> {
        let child = Command::new("perf")
            .args(["stat", "-x,", "-o"])
            .arg(&out)
            .args(["-e", FSYNC_EVENTS, "-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        // Let perf attach before the measured phase starts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some(FsyncCounter { child, out })
    }

    pub async fn stop(mut self) -> Option<u64> {
        let pid = self.child.id()?;
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let text = std::fs::read_to_string(&self.out).ok()?;
        let _ = std::fs::remove_file(&self.out);
        let mut total = 0u64;
        let mut seen = false;
        for line in text.lines() {
            if !line.contains("sys_enter_") {
                continue;
            }
            seen = true;
            total += line
                .split(',')
                .next()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        seen.then_some(total)
    }
}

/// A measurement window over one server process.
pub struct Window {
    pid: u32,
    cpu0: Option<f64>,
    fsync: Option<FsyncCounter>,
}

pub struct WindowResult {
    pub cpu_secs: Option<f64>,
    pub fsyncs: Option<u64>,
}

impl Window {
    pub async fn start(pid: u32, count_fsync: bool, tmp: &Path) -> Result<Self> {
        let fsync = if count_fsync {
            FsyncCounter::start(pid, tmp.join(format!("perf-{pid}.txt"))).await
        } else {
            None
        };
        Ok(Window {
            pid,
            cpu0: cpu_secs(pid),
            fsync,
        })
    }

    pub async fn stop(self) -> WindowResult {
        let cpu1 = cpu_secs(self.pid);
        let fsyncs = match self.fsync {
            Some(f) => f.stop().await,
            None => None,
        };
        WindowResult {
            cpu_secs: self.cpu0.zip(cpu1).map(|(a, b)| b - a),
            fsyncs,
        }
    }
}
