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
    let first = read?;
    let mut writer = written.map_err(store_error)?;
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
