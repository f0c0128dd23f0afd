//! Where fetched media files live: a small trait, so another location (an object store) can
//! be added without touching the fetcher or the API, and the local directory behind it.

use async_trait::async_trait;
use std::io;
use std::path::PathBuf;

use crate::domain::MediaId;

/// A place to keep media files by id. Ids are [`MediaId`]s (`med_` + a ULID), never user
/// input, so they are safe as file names or object keys.
#[async_trait]
pub trait MediaStorage: Send + Sync + 'static {
    /// Stores `bytes` under `id`, replacing any earlier file of that id. The file is
    /// complete and durable when this returns; readers never see a partial file.
    async fn put(&self, id: &MediaId, bytes: &[u8]) -> io::Result<()>;
    /// The file stored under `id`, or `None` if there is none.
    async fn get(&self, id: &MediaId) -> io::Result<Option<Vec<u8>>>;
    /// Where the files are, for logs.
    fn describe(&self) -> String;
}

/// Files in one local directory, named by id (created on first use).
#[derive(Debug, Clone)]
pub struct LocalDirStorage {
    dir: PathBuf,
}

impl LocalDirStorage {
    /// Storage in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Creates the directory if needed and checks that a file can be written there.
    /// Errors: the directory cannot be created or written.
    pub fn check(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let probe = self.dir.join(format!(".write-test-{}", ulid::Ulid::new()));
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(&probe)
    }

    fn path(&self, id: &MediaId) -> PathBuf {
        self.dir.join(id.as_str())
    }
}

#[async_trait]
impl MediaStorage for LocalDirStorage {
    async fn put(&self, id: &MediaId, bytes: &[u8]) -> io::Result<()> {
        let dir = self.dir.clone();
        let target = self.path(id);
        let bytes = bytes.to_vec();
        let tmp = dir.join(format!(".{}.{}.tmp", id.as_str(), ulid::Ulid::new()));
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let write = || -> io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &target)?;
                // The rename itself is durable once the directory is synced (best effort:
                // not every platform can open a directory).
                if let Ok(d) = std::fs::File::open(&dir) {
                    let _ = d.sync_all();
                }
                Ok(())
            };
            let r = write();
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            r
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn get(&self, id: &MediaId) -> io::Result<Option<Vec<u8>>> {
        match tokio::fs::read(self.path(id)).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_replaces_atomically_and_get_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalDirStorage::new(dir.path().join("media"));
        s.check().unwrap();
        let id = MediaId::new();
        assert_eq!(s.get(&id).await.unwrap(), None);
        s.put(&id, b"first").await.unwrap();
        s.put(&id, b"second").await.unwrap();
        assert_eq!(s.get(&id).await.unwrap().as_deref(), Some(&b"second"[..]));
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("media"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![id.to_string()]);
    }
}
