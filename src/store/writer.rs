//! Streaming writes into `tmp/`, hashed on the way, committed by rename only when verified.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::{io_error, Key, Kind, Store, StoreError};
use crate::oci::{Digest, DigestHasher};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

struct Open {
    file: File,
    hasher: DigestHasher,
}

/// A blob or manifest being written. Dropped without [`commit`](Self::commit), its temp file is
/// removed, so nothing partial ever outlives the writer.
pub struct BlobWriter {
    store: Arc<Store>,
    kind: Kind,
    digest: Digest,
    expected_size: Option<u64>,
    tmp_path: PathBuf,
    /// `None` only while a blocking write holds it.
    open: Option<Open>,
    /// Content bytes written and hashed so far.
    written: u64,
    /// All bytes in the file, including a manifest's media type line.
    file_bytes: u64,
    /// The file, once [`verify`](Self::verify) found its content matches the digest.
    verified: Option<File>,
    committed: bool,
    /// Set by a purge of this digest while it is written: the content is still verified (and
    /// served to the clients following it) but never committed.
    discard: Arc<AtomicBool>,
}

impl BlobWriter {
    pub(super) fn create(
        store: &Arc<Store>,
        kind: Kind,
        digest: Digest,
        expected_size: Option<u64>,
    ) -> Result<Self, StoreError> {
        let unique = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_path =
            store
                .tmp_dir()
                .join(format!("{}-{}-{unique}", digest.hex(), std::process::id()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io_error(&tmp_path))?;
        let discard = store.register_writer(&digest);
        Ok(Self {
            store: Arc::clone(store),
            kind,
            open: Some(Open {
                file,
                hasher: DigestHasher::new(digest.algorithm()),
            }),
            digest,
            expected_size,
            tmp_path,
            written: 0,
            file_bytes: 0,
            verified: None,
            committed: false,
            discard,
        })
    }

    /// A read handle on the file being written, for requests that follow the download. It stays
    /// valid after the commit renames the file.
    pub fn reader(&self) -> Result<File, StoreError> {
        File::open(&self.tmp_path).map_err(io_error(&self.tmp_path))
    }

    /// The digest the content must hash to.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The size the content must have, if one was announced.
    pub fn expected_size(&self) -> Option<u64> {
        self.expected_size
    }

    /// Content bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Hashes and appends `chunks` in one blocking call (batching keeps thread hops rare).
    pub async fn write_all(&mut self, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        let added: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        self.blocking(move |open| {
            for chunk in &chunks {
                open.hasher.update(chunk);
                open.file.write_all(chunk)?;
            }
            Ok(())
        })
        .await?;
        self.written += added;
        self.file_bytes += added;
        Ok(())
    }

    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.write_all(vec![chunk]).await
    }

    /// Appends bytes that are not part of the content (a manifest's media type line).
    pub(super) async fn write_unhashed(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        let added = bytes.len() as u64;
        self.blocking(move |open| open.file.write_all(&bytes))
            .await?;
        self.file_bytes += added;
        Ok(())
    }

    async fn blocking<F>(&mut self, work: F) -> Result<(), StoreError>
    where
        F: FnOnce(&mut Open) -> io::Result<()> + Send + 'static,
    {
        let Some(mut open) = self.open.take() else {
            return Err(StoreError::Io {
                path: self.tmp_path.clone(),
                source: io::Error::other("an earlier write failed"),
            });
        };
        let (open, result) = tokio::task::spawn_blocking(move || {
            let result = work(&mut open);
            (open, result)
        })
        .await?;
        self.open = Some(open);
        result.map_err(io_error(&self.tmp_path))
    }

    /// Checks size and digest without committing: from here the content may be served, while
    /// [`commit`](Self::commit) makes it durable (fsync is a fifth of a cold 1 GiB download's time,
    /// and no client needs to wait for it). On a mismatch nothing can be committed any more.
    pub fn verify(&mut self) -> Result<(), StoreError> {
        let file = self.check()?;
        self.verified = Some(file);
        Ok(())
    }

    fn check(&mut self) -> Result<File, StoreError> {
        let Some(open) = self.open.take() else {
            return Err(StoreError::Io {
                path: self.tmp_path.clone(),
                source: io::Error::other("an earlier write failed"),
            });
        };
        if let Some(expected) = self.expected_size {
            if expected != self.written {
                return Err(StoreError::SizeMismatch {
                    digest: self.digest.clone(),
                    expected,
                    actual: self.written,
                });
            }
        }
        let actual = open.hasher.finish();
        if actual != self.digest {
            return Err(StoreError::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        Ok(open.file)
    }

    /// Verifies size and digest (unless [`verify`](Self::verify) did), makes the file durable and
    /// moves it into place. On any mismatch the temp file is removed and nothing becomes visible.
    /// Content purged while it was written is verified but discarded, not committed: that is
    /// `Ok`, since its readers got what they asked for, and the store simply does not have it.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        let file = match self.verified.take() {
            Some(file) => file,
            None => self.check()?,
        };
        if self.discarded() {
            return Ok(());
        }
        let final_path = self.store.path(self.kind, &self.digest);
        let tmp_path = self.tmp_path.clone();
        let destination = final_path.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            file.sync_all()?;
            let parent = destination
                .parent()
                .ok_or_else(|| io::Error::other("no parent directory"))?;
            std::fs::create_dir_all(parent)?;
            std::fs::rename(&tmp_path, &destination)?;
            File::open(parent)?.sync_all()
        })
        .await?
        .map_err(io_error(&final_path))?;
        self.committed = true;
        let key = Key {
            kind: self.kind,
            digest: self.digest.clone(),
        };
        if !self.store.insert(key, self.file_bytes, &self.discard) {
            // Purged between the check above and the index: it must not stay on disk unindexed.
            tracing::debug!(digest = %self.digest, "discarding content purged while it was written");
            let _ = std::fs::remove_file(&final_path);
        }
        Ok(())
    }

    /// Whether a purge of this digest ran while it was being written.
    pub fn discarded(&self) -> bool {
        self.discard.load(Ordering::Acquire)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        self.store.unregister_writer(&self.digest, &self.discard);
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}
