//! The fill pipeline: an origin's chunks into a [`BlobWriter`], whatever the origin.
//!
//! Reading the origin and writing the disk overlap: chunks gather into batches of about
//! [`WRITE_BATCH`], and full batches queue for the writer (at most [`WRITE_QUEUE`] of them, so a
//! download holds about 1 MiB) while the next one is read. The writer hashes as it writes and
//! publishes how much is on disk, which is what followers read up to. The first client gets the
//! chunks themselves (no copy), always one behind the origin and the last only once the digest is
//! verified, so no client ever sees the end of a blob that turns out to be corrupt or truncated.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::download::{Phase, Progress};
use super::error::MirrorError;
use super::origin::Chunks;
use crate::store::{BlobWriter, StoreError};

/// Origin chunks are written to disk in batches of about this size.
const WRITE_BATCH: usize = 256 << 10;
/// Batches read ahead of the disk writer, at most (bounds memory per download to ~1 MiB).
const WRITE_QUEUE: usize = 4;

/// Writes `chunks` through `writer`, verifies them against its digest and size, and commits the
/// blob. `progress` is published as the bytes reach the disk; `first` is the first client's
/// channel. `registry` is named in the error if the content is bad. Returns the blob's size.
pub(super) async fn fill(
    writer: BlobWriter,
    chunks: Chunks,
    progress: &watch::Sender<Progress>,
    first: Option<mpsc::Sender<Bytes>>,
    registry: &str,
) -> Result<u64, MirrorError> {
    let size = writer.expected_size();
    let file = Arc::new(writer.reader().map_err(store_error)?);
    progress.send_modify(|p| {
        p.phase = Phase::Streaming { written: 0 };
        p.size = size;
        p.file = Some(Arc::clone(&file));
    });
    let digest = writer.digest().to_string();
    let bad_content = |reason: String| MirrorError::BadContent {
        registry: registry.to_owned(),
        digest: digest.clone(),
        reason,
    };
    let first = FirstClient {
        sender: first,
        held_back: None,
    };
    let (batches, queue) = mpsc::channel(WRITE_QUEUE);
    let (read, written) = tokio::join!(
        read_batches(chunks, size, batches, first, &bad_content),
        write_batches(writer, queue, progress),
    );
    let (first, mut writer) = both(read, written)?;
    let total = writer.written();
    writer.verify().map_err(|e| match e {
        StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. } => {
            bad_content(e.to_string())
        }
        other => store_error(other),
    })?;
    // The content is verified: clients get their last bytes now, not after the fsync.
    progress.send_modify(|p| p.verified = Some(total));
    first.release();
    writer.commit().await.map_err(store_error)?;
    Ok(total)
}

/// The reader's and the writer's results together, or the error that caused the failure. A disk
/// that fails stops the writer, and the reader then finds its queue closed: the writer's error is
/// the cause, so it wins (`failure_reason` says `io`, not `internal`).
fn both<R, W>(
    read: Result<R, MirrorError>,
    written: Result<W, StoreError>,
) -> Result<(R, W), MirrorError> {
    let written = written.map_err(store_error)?;
    Ok((read?, written))
}

pub(super) fn store_error(error: StoreError) -> MirrorError {
    MirrorError::Store(Arc::new(error))
}

/// Reads the origin into batches for the writer, handing each chunk to the first client on the
/// way. More bytes than the origin announced fail the download at once.
async fn read_batches(
    mut chunks: Chunks,
    size: Option<u64>,
    batches: mpsc::Sender<Vec<Bytes>>,
    mut first: FirstClient,
    bad_content: &(dyn Fn(String) -> MirrorError + Sync),
) -> Result<FirstClient, MirrorError> {
    let writer_gone = || MirrorError::Internal("the disk writer stopped");
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let mut received: u64 = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        received += chunk.len() as u64;
        if let Some(size) = size.filter(|&size| received > size) {
            return Err(bad_content(format!("more than the announced {size} bytes")));
        }
        first.push(&chunk);
        batch_bytes += chunk.len();
        batch.push(chunk);
        if batch_bytes >= WRITE_BATCH {
            batches
                .send(std::mem::take(&mut batch))
                .await
                .map_err(|_| writer_gone())?;
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        batches.send(batch).await.map_err(|_| writer_gone())?;
    }
    Ok(first)
}

/// Hashes and writes the batches as they come, publishing how much is on disk.
async fn write_batches(
    mut writer: BlobWriter,
    mut queue: mpsc::Receiver<Vec<Bytes>>,
    progress: &watch::Sender<Progress>,
) -> Result<BlobWriter, StoreError> {
    while let Some(batch) = queue.recv().await {
        writer.write_all(batch).await?;
        let written = writer.written();
        progress.send_modify(|p| p.phase = Phase::Streaming { written });
    }
    Ok(writer)
}

/// The first client's channel, one chunk behind the origin: the newest chunk is held back until
/// the next one arrives, and the very last one until the digest is verified.
struct FirstClient {
    sender: Option<mpsc::Sender<Bytes>>,
    held_back: Option<Bytes>,
}

impl FirstClient {
    fn push(&mut self, chunk: &Bytes) {
        if self.sender.is_none() {
            return;
        }
        if let Some(previous) = self.held_back.replace(chunk.clone()) {
            self.offer(previous);
        }
    }

    /// Hands over the last chunk, once the content is verified, and closes the channel.
    fn release(mut self) {
        if let Some(last) = self.held_back.take() {
            self.offer(last);
        }
    }

    /// If the client is gone or behind, it follows the file from here on.
    fn offer(&mut self, chunk: Bytes) {
        if let Some(sender) = &self.sender {
            if sender.try_send(chunk).is_err() {
                self.sender = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::mirror::download::Flight;
    use crate::oci::{Algorithm, Digest};
    use crate::store::{Store, StoreOptions};

    const PARTS: [&[u8]; 3] = [b"abc", b"def", b"ghi"];

    fn store(dir: &std::path::Path) -> Arc<Store> {
        let options = StoreOptions {
            max_size: None,
            map_files: false,
        };
        Store::open(dir, options, Arc::new(Metrics::new())).unwrap()
    }

    fn chunks(parts: Vec<Result<Bytes, MirrorError>>) -> Chunks {
        Box::pin(futures_util::stream::iter(parts))
    }

    fn parts() -> Vec<Result<Bytes, MirrorError>> {
        PARTS.iter().map(|p| Ok(Bytes::from_static(p))).collect()
    }

    /// Fills `digest` from `parts` with a first client; returns the result and what it received.
    async fn run(
        store: &Arc<Store>,
        digest: &Digest,
        size: Option<u64>,
        parts: Vec<Result<Bytes, MirrorError>>,
    ) -> (Result<u64, MirrorError>, Vec<Bytes>, Progress) {
        let writer = store.begin_blob(digest, size).unwrap();
        let (flight, progress) = Flight::new("registry/repo".into());
        let (first, mut received) = mpsc::channel(16);
        let result = fill(writer, chunks(parts), &progress, Some(first), "registry").await;
        let mut got = Vec::new();
        while let Some(chunk) = received.recv().await {
            got.push(chunk);
        }
        let state = flight.progress().borrow().clone();
        (result, got, state)
    }

    #[tokio::test]
    async fn a_good_blob_reaches_the_first_client_and_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let digest = Digest::of(Algorithm::Sha256, b"abcdefghi");
        let (result, got, state) = run(&store, &digest, Some(9), parts()).await;
        assert_eq!(result.unwrap(), 9);
        assert_eq!(got, PARTS.to_vec());
        assert_eq!(state.verified, Some(9));
        assert!(store.open_blob(&digest).await.is_some());
    }

    #[tokio::test]
    async fn the_last_chunk_waits_for_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let digest = Digest::of(Algorithm::Sha256, b"not the content");
        let (result, got, state) = run(&store, &digest, None, parts()).await;
        assert!(
            matches!(&result, Err(MirrorError::BadContent { registry, .. }) if registry == "registry"),
            "{result:?}"
        );
        // The client never sees the end of a blob that fails verification.
        assert_eq!(got, PARTS[..2].to_vec());
        assert_eq!(state.verified, None);
        assert!(store.open_blob(&digest).await.is_none());
    }

    #[tokio::test]
    async fn more_than_announced_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let digest = Digest::of(Algorithm::Sha256, b"abcdefghi");
        let (result, got, _) = run(&store, &digest, Some(4), parts()).await;
        match result {
            Err(MirrorError::BadContent { reason, .. }) => {
                assert!(
                    reason.contains("more than the announced 4 bytes"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        // "abc" was still held back when "def" went past the announced size.
        assert!(got.is_empty(), "{got:?}");
        assert!(store.open_blob(&digest).await.is_none());
    }

    #[tokio::test]
    async fn an_origin_error_keeps_its_type() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let digest = Digest::of(Algorithm::Sha256, b"abcdefghi");
        let mut parts = parts();
        parts[1] = Err(MirrorError::Internal("the origin broke"));
        let (result, _, state) = run(&store, &digest, Some(9), parts).await;
        assert!(
            matches!(result, Err(MirrorError::Internal("the origin broke"))),
            "{result:?}"
        );
        assert_eq!(state.verified, None);
        assert!(store.open_blob(&digest).await.is_none());
    }

    #[test]
    fn a_failed_disk_write_is_reported_over_the_closed_queue() {
        let disk = || StoreError::Io {
            path: "tmp/blob".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let writer_gone = || Err::<(), _>(MirrorError::Internal("the disk writer stopped"));
        let result = both(writer_gone(), Err::<(), _>(disk()));
        assert!(matches!(result, Err(MirrorError::Store(_))), "{result:?}");
        // The origin's own error stands when the disk was fine.
        let origin_broke = Err::<(), _>(MirrorError::Internal("the origin broke"));
        let result = both(origin_broke, Ok(()));
        assert!(
            matches!(result, Err(MirrorError::Internal("the origin broke"))),
            "{result:?}"
        );
        assert!(both(Ok(1), Ok(2)).is_ok_and(|pair| pair == (1, 2)));
    }
}
