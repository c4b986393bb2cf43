//! The file-system seam. The engine does all its I/O through [`Vfs`], so
//! tests can run it over [`crate::file::sim::SimVfs`], which remembers what
//! was synced, simulates power loss, and injects torn writes, failed syncs
//! and full disks.

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open file, used with positional I/O only (no shared cursor).
// `len` is an I/O call (`fstat`); an `is_empty` would only be a second one.
#[allow(clippy::len_without_is_empty)]
pub trait VfsFile: Send + Sync + Debug {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: the file's data (and size) are durable when this returns.
    fn sync_data(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// The OS file descriptor, when the file is a real one (so a server can
    /// `sendfile` from it); simulated files have none.
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

pub trait Vfs: Send + Sync + Debug + 'static {
    /// Opens a file for reading and writing, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VfsFile>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// File names (not paths) in a directory; empty if it does not exist.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// Takes the data directory's exclusive lock (held until `unlock_dir`
    /// or process exit).
    fn lock_dir(&self, dir: &Path) -> io::Result<()>;

    /// Releases the lock taken by `lock_dir`.
    fn unlock_dir(&self, _dir: &Path) {}

    /// Makes everything written on the file system holding `dir` durable
    /// (data and directory entries) in one call, if the file system can.
    /// Returns `false` when it cannot; the caller then syncs one by one.
    fn sync_filesystem(&self, _dir: &Path) -> io::Result<bool> {
        Ok(false)
    }
}

/// The real file system.
#[derive(Debug, Default)]
pub struct StdVfs {
    locks: parking_lot::Mutex<Vec<(PathBuf, std::fs::File)>>,
}

#[derive(Debug)]
struct StdFile(std::fs::File);

impl VfsFile for StdFile {
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.0))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Vfs for StdVfs {
    fn unlock_dir(&self, dir: &Path) {
        // Dropping the file releases the lock.
        self.locks.lock().retain(|(d, _)| d != dir);
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VfsFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Arc::new(StdFile(f)))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        match std::fs::read_dir(path) {
            Ok(rd) => rd
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    /// One `syncfs(2)` replaces thousands of `fdatasync` calls: a
    /// checkpoint after writes to 100,000 streams is one system call.
    fn sync_filesystem(&self, dir: &Path) -> io::Result<bool> {
        let d = std::fs::File::open(dir)?;
        rustix::fs::syncfs(&d).map_err(io::Error::from)?;
        Ok(true)
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("LOCK"))?;
        match f.try_lock() {
            Ok(()) => {
                self.locks.lock().push((dir.to_path_buf(), f));
                Ok(())
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another process", dir.display()),
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Joins path components (a helper for engine paths).
pub fn join(dir: &Path, parts: &[&str]) -> PathBuf {
    let mut p = dir.to_path_buf();
    for part in parts {
        p.push(part);
    }
    p
}
