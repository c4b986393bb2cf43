//! A simulated file system for crash and fault tests.
//!
//! Every file is an inode with its current bytes and its *synced* bytes;
//! directory entries are durable only once their directory is synced.
//! [`SimVfs::crash`] returns the file system a power cut would leave:
//! synced bytes only, durable names only, and optionally a torn tail (a
//! prefix of the unsynced bytes written past the synced length).
//! Faults: fail the n-th `sync_data`, or any write once the disk is full;
//! and a gate that holds every `sync_data` until opened (a slow disk, or a
//! commit stalled behind a checkpoint).

use super::vfs::{Vfs, VfsFile};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default, Clone)]
struct Inode {
    data: Vec<u8>,
    synced: Vec<u8>,
}

#[derive(Debug, Default)]
struct Fs {
    inodes: HashMap<u64, Inode>,
    names: HashMap<PathBuf, u64>,
    durable_names: HashMap<PathBuf, u64>,
    dirs: std::collections::HashSet<PathBuf>,
    next_inode: u64,
}

/// Fault plan of a [`SimVfs`].
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail the sync with this 1-based index (and all later ones).
    pub fail_sync_at: Option<u64>,
    /// Total bytes the disk holds; writes beyond fail with ENOSPC.
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, Default)]
pub struct SimVfs {
    fs: Arc<Mutex<Fs>>,
    counter: Arc<SyncCounter>,
}

#[derive(Debug)]
struct SimFile {
    fs: Arc<Mutex<Fs>>,
    inode: u64,
    vfs_syncs: Arc<SyncCounter>,
}

#[derive(Debug, Default)]
struct SyncCounter {
    count: AtomicU64,
    fail_at: Mutex<Option<u64>>,
    disk_bytes: Mutex<Option<u64>>,
    /// While true, `sync_data` waits (on `gate_open`).
    gate_closed: Mutex<bool>,
    gate_open: parking_lot::Condvar,
}

impl SimVfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of `sync_data` and `sync_dir` calls so far.
    pub fn syncs(&self) -> u64 {
        self.counter().count.load(Ordering::SeqCst)
    }

    pub fn set_faults(&self, f: Faults) {
        *self.counter.fail_at.lock() = f.fail_sync_at;
        *self.counter.disk_bytes.lock() = f.disk_bytes;
    }

    /// Holds every `sync_data` (from any thread) until called again with
    /// `false`.
    pub fn hold_syncs(&self, hold: bool) {
        *self.counter.gate_closed.lock() = hold;
        self.counter.gate_open.notify_all();
    }

    fn counter(&self) -> &Arc<SyncCounter> {
        &self.counter
    }

    /// The state a power cut leaves: synced data and durable names only.
    /// With `torn`, each file also keeps the first `torn(len_unsynced)` bytes
    /// of what was written past its synced length (a partially persisted write).
    pub fn crash(&self, torn: impl Fn(u64, usize) -> usize) -> SimVfs {
        let fs = self.fs.lock();
        let mut out = Fs {
            dirs: fs.dirs.clone(),
            next_inode: fs.next_inode,
            ..Fs::default()
        };
        for (path, ino) in &fs.durable_names {
            let node = &fs.inodes[ino];
            let mut data = node.synced.clone();
            if node.data.len() > data.len() && node.data.starts_with(&data) {
                let extra = torn(*ino, node.data.len() - data.len());
                data.extend_from_slice(&node.data[node.synced.len()..node.synced.len() + extra]);
            }
            out.inodes.insert(
                *ino,
                Inode {
                    data: data.clone(),
                    synced: data,
                },
            );
            out.names.insert(path.clone(), *ino);
            out.durable_names.insert(path.clone(), *ino);
        }
        SimVfs {
            fs: Arc::new(Mutex::new(out)),
            ..SimVfs::default()
        }
    }

    /// Total bytes currently stored (all files).
    pub fn used_bytes(&self) -> u64 {
        let fs = self.fs.lock();
        fs.names
            .values()
            .map(|i| fs.inodes[i].data.len() as u64)
            .sum()
    }

    /// Paths of all files.
    pub fn files(&self) -> Vec<PathBuf> {
        self.fs.lock().names.keys().cloned().collect()
    }
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl VfsFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let fs = self.fs.lock();
        let data = &fs
            .inodes
            .get(&self.inode)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?
            .data;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut fs = self.fs.lock();
        if let Some(limit) = *self.vfs_syncs.disk_bytes.lock() {
            let used: u64 = fs
                .names
                .values()
                .map(|i| fs.inodes[i].data.len() as u64)
                .sum();
            let cur = fs
                .inodes
                .get(&self.inode)
                .map(|n| n.data.len() as u64)
                .unwrap_or(0);
            let grow = (offset + buf.len() as u64).saturating_sub(cur);
            if used + grow > limit {
                return Err(enospc());
            }
        }
        let node = fs
            .inodes
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let end = offset as usize + buf.len();
        if node.data.len() < end {
            node.data.resize(end, 0);
        }
        node.data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        {
            let mut closed = self.vfs_syncs.gate_closed.lock();
            while *closed {
                self.vfs_syncs.gate_open.wait(&mut closed);
            }
        }
        let n = self.vfs_syncs.count.fetch_add(1, Ordering::SeqCst) + 1;
        if self.vfs_syncs.fail_at.lock().is_some_and(|at| n >= at) {
            return Err(io::Error::other("injected fsync failure"));
        }
        let mut fs = self.fs.lock();
        if let Some(node) = fs.inodes.get_mut(&self.inode) {
            node.synced = node.data.clone();
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut fs = self.fs.lock();
        let node = fs
            .inodes
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        node.data.resize(len as usize, 0);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        let fs = self.fs.lock();
        Ok(fs
            .inodes
            .get(&self.inode)
            .map(|n| n.data.len() as u64)
            .unwrap_or(0))
    }
}

impl Vfs for SimVfs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VfsFile>> {
        let mut fs = self.fs.lock();
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if !fs.dirs.contains(&parent) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let inode = match fs.names.get(path) {
            Some(i) => *i,
            None if create => {
                fs.next_inode += 1;
                let i = fs.next_inode;
                fs.inodes.insert(i, Inode::default());
                fs.names.insert(path.to_path_buf(), i);
                i
            }
            None => return Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        Ok(Arc::new(SimFile {
            fs: self.fs.clone(),
            inode,
            vfs_syncs: self.counter.clone(),
        }))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.fs.lock();
        fs.names
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.fs.lock();
        let ino = fs
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        fs.names.insert(to.to_path_buf(), ino);
        Ok(())
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.fs.lock();
        let mut p = path.to_path_buf();
        loop {
            fs.dirs.insert(p.clone());
            if !p.pop() {
                break;
            }
        }
        Ok(())
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let n = self.counter().count.fetch_add(1, Ordering::SeqCst) + 1;
        if self.counter().fail_at.lock().is_some_and(|at| n >= at) {
            return Err(io::Error::other("injected fsync failure"));
        }
        let mut fs = self.fs.lock();
        let in_dir = |p: &PathBuf| p.parent() == Some(path);
        fs.durable_names.retain(|p, _| !in_dir(p));
        let current: Vec<(PathBuf, u64)> = fs
            .names
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        fs.durable_names.extend(current);
        Ok(())
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let fs = self.fs.lock();
        let mut out: Vec<String> = fs
            .names
            .keys()
            .chain(fs.dirs.iter())
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }
    fn exists(&self, path: &Path) -> bool {
        let fs = self.fs.lock();
        fs.names.contains_key(path) || fs.dirs.contains(path)
    }
    fn lock_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}
