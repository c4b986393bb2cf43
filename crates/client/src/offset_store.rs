//! Where consumers keep the offset they have processed up to, so they resume
//! there after a restart.

use crate::error::{Error, Result};
use async_trait::async_trait;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Saves and loads one offset per consumer key.
#[async_trait]
pub trait OffsetStore: Send + Sync {
    /// The saved offset for `key`, if any.
    async fn load(&self, key: &str) -> Result<Option<String>>;
    /// Saves `offset` for `key` (durably, for persistent stores).
    async fn save(&self, key: &str, offset: &str) -> Result<()>;
}

/// Keeps offsets in memory (tests, short-lived consumers).
#[derive(Debug, Default)]
pub struct MemoryOffsetStore {
    map: Mutex<HashMap<String, String>>,
}

impl MemoryOffsetStore {
    pub fn new() -> Self {
        MemoryOffsetStore::default()
    }
}

#[async_trait]
impl OffsetStore for MemoryOffsetStore {
    async fn load(&self, key: &str) -> Result<Option<String>> {
        let map = self
            .map
            .lock()
            .map_err(|_| Error::InvalidArgument("offset store lock poisoned".into()))?;
        Ok(map.get(key).cloned())
    }
    async fn save(&self, key: &str, offset: &str) -> Result<()> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| Error::InvalidArgument("offset store lock poisoned".into()))?;
        map.insert(key.to_string(), offset.to_string());
        Ok(())
    }
}

/// One file per key in a directory. Saves are atomic and durable: write a
/// temporary file, fsync it, rename it over the old one, fsync the directory.
#[derive(Debug, Clone)]
pub struct FileOffsetStore {
    dir: PathBuf,
}

impl FileOffsetStore {
    /// Uses (and creates if needed) `dir`.
    pub fn new(dir: impl AsRef<Path>) -> Result<Self> {
        std::fs::create_dir_all(dir.as_ref())?;
        Ok(FileOffsetStore {
            dir: dir.as_ref().to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "offset store key must not be empty".into(),
            ));
        }
        // Any key maps to a safe, unique file name.
        let mut name = String::with_capacity(key.len() + 7);
        for b in key.bytes() {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        name.push_str(".offset");
        Ok(self.dir.join(name))
    }
}

#[async_trait]
impl OffsetStore for FileOffsetStore {
    async fn load(&self, key: &str) -> Result<Option<String>> {
        let path = self.path(key)?;
        match tokio::fs::read_to_string(&path).await {
            Ok(s) => {
                let s = s.trim();
                Ok((!s.is_empty()).then(|| s.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn save(&self, key: &str, offset: &str) -> Result<()> {
        let path = self.path(key)?;
        let dir = self.dir.clone();
        let offset = offset.to_string();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(offset.as_bytes())?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets survive a new store instance on the same directory; keys never collide or escape.
    #[tokio::test]
    async fn file_store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileOffsetStore::new(dir.path()).unwrap();
        assert_eq!(s.load("a/b").await.unwrap(), None);
        s.save("a/b", "0000_1").await.unwrap();
        s.save("a_b", "0000_2").await.unwrap();
        s.save("../x", "0000_3").await.unwrap();
        s.save("a/b", "0000_4").await.unwrap();
        let s2 = FileOffsetStore::new(dir.path()).unwrap();
        assert_eq!(s2.load("a/b").await.unwrap().as_deref(), Some("0000_4"));
        assert_eq!(s2.load("a_b").await.unwrap().as_deref(), Some("0000_2"));
        assert_eq!(s2.load("../x").await.unwrap().as_deref(), Some("0000_3"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        assert!(s2.load("").await.is_err());
    }

    /// The memory store keeps the latest offset per key.
    #[tokio::test]
    async fn memory_store() {
        let s = MemoryOffsetStore::new();
        s.save("k", "1").await.unwrap();
        s.save("k", "2").await.unwrap();
        assert_eq!(s.load("k").await.unwrap().as_deref(), Some("2"));
        assert_eq!(s.load("j").await.unwrap(), None);
    }
}
