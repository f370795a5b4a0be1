//! Single-flight blob downloads: one upstream fetch per digest, however many clients ask.
//!
//! A download belongs to the mirror, not to the request that started it: it runs in its own task,
//! bounded by `timeouts.download`, and finishes even if every client leaves. The first client gets
//! the upstream's `Bytes` through a bounded channel (no copy); everyone else, and the first client
//! too if it falls behind, follows the growing temp file. The last bytes are released only after
//! the digest is verified, so a corrupt or truncated download never looks complete to anyone.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::sync::{mpsc, watch};

use super::error::MirrorError;
use super::{upstream_failure, Mirror};
use crate::metrics::FailureReason;
use crate::oci::{Digest, RepoName};
use crate::store::{read_exact_at, StoreError, READ_CHUNK};
use crate::upstream::{Upstream, UpstreamError, UpstreamRequest};

/// Chunks buffered for the first client before it is switched to following the file. Each chunk
/// can pin a whole upstream read buffer: 64 of them took peak RSS through the 8-client cold pull to
/// 59-63 MiB, 16 to 36-43 MiB, at the same wall time (a client that falls behind reads the file).
const FIRST_CLIENT_CHANNEL: usize = 16;
/// Upstream chunks are written to disk in batches of about this size.
const WRITE_BATCH: usize = 256 << 10;
/// Batches read ahead of the disk writer, at most (bounds memory per download to ~1 MiB).
const WRITE_QUEUE: usize = 4;

#[derive(Clone, Debug)]
pub enum Phase {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Streaming into the temp file; `written` bytes are on disk.
    Streaming {
        written: u64,
    },
    /// Verified (see [`Progress::verified`]) and in the store.
    Committed,
    Failed(MirrorError),
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: Phase,
    /// From the upstream's `Content-Length`, once known.
    pub size: Option<u64>,
    /// The blob's size once every byte is on disk and matches the digest. Set before the commit
    /// and never cleared, so a body that looks after the commit failed still finds it: the
    /// verified bytes stay readable through its file handle.
    verified: Option<u64>,
    file: Option<Arc<File>>,
}

/// A download in progress, shared by every request for its digest.
pub struct Flight {
    progress: watch::Receiver<Progress>,
    /// `<registry>/<repository>` the upstream is asked under: joiners asking under the same one
    /// need no check that it references the blob (see `store::links`).
    repository: String,
}

impl Flight {
    pub fn asked_under(&self, repository: &str) -> bool {
        self.repository == repository
    }

    /// Waits for the upstream's answer: the blob's size (if the upstream sent one) or the error.
    pub async fn started(&self) -> Result<Option<u64>, MirrorError> {
        let mut progress = self.progress.clone();
        let state = progress
            .wait_for(|p| !matches!(p.phase, Phase::Connecting))
            .await
            .map_err(|_| lost())?
            .clone();
        match state.phase {
            Phase::Failed(error) => Err(error),
            _ => Ok(state.size),
        }
    }

    /// A body for `[offset, end)` (`end = None`: to the end) that follows the download.
    /// `first` is the channel of the request that started it, if this is that request.
    pub fn body(
        &self,
        offset: u64,
        end: Option<u64>,
        first: Option<mpsc::Receiver<Bytes>>,
    ) -> Follower {
        Follower {
            channel: first,
            progress: self.progress.clone(),
            offset,
            end,
            finished: false,
        }
    }
}

fn lost() -> MirrorError {
    MirrorError::Internal("the download task ended without a result")
}

impl Mirror {
    /// Joins the download of `digest`, starting it if none is running. The second value is the
    /// first-client channel, given only to the request that started the download.
    pub(super) fn join_or_start(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> (Arc<Flight>, Option<mpsc::Receiver<Bytes>>) {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.get(digest) {
            self.metrics.download_joins.inc();
            return (Arc::clone(flight), None);
        }
        let (progress_tx, progress_rx) = watch::channel(Progress {
            phase: Phase::Connecting,
            size: None,
            verified: None,
            file: None,
        });
        let (first_tx, first_rx) = mpsc::channel(FIRST_CLIENT_CHANNEL);
        let flight = Arc::new(Flight {
            progress: progress_rx,
            repository: format!("{}/{repo}", upstream.name()),
        });
        flights.insert(digest.clone(), Arc::clone(&flight));
        drop(flights);

        let mirror = Arc::clone(self);
        let upstream = Arc::clone(upstream);
        let repo = repo.clone();
        let digest = digest.clone();
        self.metrics.downloads_in_flight.inc();
        // Owned by the mirror through `flights`; ends when the download commits, fails or times out.
        tokio::spawn(async move {
            let limit = mirror.download_timeout;
            let outcome = match mirror.download_slot().await {
                Err(shed) => Err(shed),
                Ok(_slot) => tokio::time::timeout(
                    limit,
                    mirror.download(&upstream, &repo, &digest, &progress_tx, Some(first_tx)),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(MirrorError::DownloadTimeout {
                        registry: upstream.name().to_owned(),
                        limit,
                    })
                }),
            };
            // Leave the map before publishing the outcome: a request arriving now finds the blob
            // in the store (or starts afresh after a failure).
            mirror
                .flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&digest);
            mirror.metrics.downloads_in_flight.dec();
            match outcome {
                Ok(_) => progress_tx.send_modify(|p| p.phase = Phase::Committed),
                Err(error) => {
                    tracing::warn!(%digest, registry = upstream.name(), %error, "blob download failed; nothing was cached");
                    mirror
                        .metrics
                        .download_failures
                        .with_label_values(&[failure_reason(&error).as_str()])
                        .inc();
                    progress_tx.send_modify(|p| p.phase = Phase::Failed(error));
                }
            }
        });
        (flight, Some(first_rx))
    }

    /// One of `limits.max_downloads` slots. With every slot busy a download waits, but only
    /// `timeouts.download_queue` long and only behind `limits.max_queued_downloads` others; past
    /// either it is shed with a quick `503` and `Retry-After` (linkerd's load shedding) instead of
    /// holding its clients for up to `timeouts.download`.
    async fn download_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, MirrorError> {
        use std::sync::atomic::Ordering;
        let slots = Arc::clone(&self.download_slots);
        if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
            return Ok(slot);
        }
        let wait = self.download_queue_wait;
        let shed = |waited| {
            self.metrics.downloads_shed.inc();
            MirrorError::Overloaded {
                waited,
                retry_after_secs: wait.as_secs().max(1),
            }
        };
        let queued = self.queued_downloads.fetch_add(1, Ordering::SeqCst);
        let waited = if queued >= self.max_queued_downloads {
            Err(shed(std::time::Duration::ZERO))
        } else {
            match tokio::time::timeout(wait, slots.acquire_owned()).await {
                Ok(slot) => slot.map_err(|_| lost()),
                Err(_) => Err(shed(wait)),
            }
        };
        self.queued_downloads.fetch_sub(1, Ordering::SeqCst);
        waited
    }

    /// Fetches, verifies and commits one blob. Returns its size.
    async fn download(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        progress: &watch::Sender<Progress>,
        mut first: Option<mpsc::Sender<Bytes>>,
    ) -> Result<u64, MirrorError> {
        let request = UpstreamRequest::new(
            Method::GET,
            repo.as_str(),
            format!("/v2/{repo}/blobs/{digest}"),
        );
        let response = upstream
            .send(&request)
            .await
            .map_err(|e| upstream_failure(upstream, e))?;
        if response.status() != StatusCode::OK {
            return Err(super::status_error(upstream, response).await);
        }
        let size = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let store_error = |e: StoreError| MirrorError::Store(Arc::new(e));
        let mut writer = self.store.begin_blob(digest, size).map_err(store_error)?;
        let file = Arc::new(
            writer
                .reader()
                .map_err(|e| MirrorError::Store(Arc::new(e)))?,
        );
        progress.send_modify(|p| {
            p.phase = Phase::Streaming { written: 0 };
            p.size = size;
            p.file = Some(Arc::clone(&file));
        });

        let mut body = response.into_body();
        let bad_content = |reason: String| MirrorError::BadContent {
            registry: upstream.name().to_owned(),
            digest: digest.to_string(),
            reason,
        };
        // Reading the upstream and writing the disk overlap: full batches queue for the writer
        // (at most WRITE_QUEUE of them) while the next one is read.
        let (batches, mut queue) = mpsc::channel::<Vec<Bytes>>(WRITE_QUEUE);
        let reading = async move {
            // The newest chunk is held back from the first client until the next one arrives,
            // and the very last one until the digest is verified.
            let mut held_back: Option<Bytes> = None;
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            let mut received: u64 = 0;
            let writer_gone = || MirrorError::Internal("the disk writer stopped");
            loop {
                let chunk = body
                    .chunk()
                    .await
                    .map_err(|e| upstream_failure(upstream, e))?;
                let Some(chunk) = chunk else { break };
                received += chunk.len() as u64;
                if size.is_some_and(|size| received > size) {
                    return Err(bad_content(format!(
                        "more than the announced {} bytes",
                        size.unwrap_or(0)
                    )));
                }
                self.metrics
                    .upstream_bytes
                    .with_label_values(&[upstream.name()])
                    .inc_by(chunk.len() as u64);
                if let Some(previous) = held_back.replace(chunk.clone()) {
                    offer(&mut first, previous);
                }
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
            Ok((held_back, first))
        };
        let writing = async move {
            while let Some(batch) = queue.recv().await {
                writer.write_all(batch).await?;
                let written = writer.written();
                progress.send_modify(|p| p.phase = Phase::Streaming { written });
            }
            Ok::<_, StoreError>(writer)
        };
        let (read, written) = tokio::join!(reading, writing);
        let (held_back, mut first) = read?;
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
        if let Some(last) = held_back {
            offer(&mut first, last);
        }
        drop(first);
        writer.commit().await.map_err(store_error)?;
        Ok(total)
    }
}

/// Hands a chunk to the first client; if it is gone or behind, it follows the file from here on.
fn offer(first: &mut Option<mpsc::Sender<Bytes>>, chunk: Bytes) {
    if let Some(sender) = first {
        if sender.try_send(chunk).is_err() {
            *first = None;
        }
    }
}

fn failure_reason(error: &MirrorError) -> FailureReason {
    match error {
        MirrorError::BadContent { .. } => FailureReason::BadContent,
        MirrorError::Store(_) => FailureReason::Io,
        MirrorError::Internal(_) => FailureReason::Internal,
        MirrorError::DownloadTimeout { .. } => FailureReason::Timeout,
        MirrorError::Unavailable { source, .. } => match source.as_ref() {
            UpstreamError::Timeout { .. } | UpstreamError::Stalled { .. } => FailureReason::Timeout,
            _ => FailureReason::UpstreamUnavailable,
        },
        MirrorError::Overloaded { .. } => FailureReason::Shed,
        MirrorError::UpstreamStatus { .. } | MirrorError::Request(_) => {
            FailureReason::UpstreamStatus
        }
    }
}

/// A response body that follows a download: from the first-client channel while it lasts, then
/// from the temp file as it grows. It ends only after the download is verified, and fails if the
/// download fails.
pub struct Follower {
    channel: Option<mpsc::Receiver<Bytes>>,
    progress: watch::Receiver<Progress>,
    offset: u64,
    end: Option<u64>,
    finished: bool,
}

impl Follower {
    /// The next chunk, `Ok(None)` at the verified end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, io::Error> {
        if self.finished {
            return Ok(None);
        }
        let result = self.advance().await;
        if !matches!(result, Ok(Some(_))) {
            self.finished = true;
        }
        result
    }

    async fn advance(&mut self) -> Result<Option<Bytes>, io::Error> {
        loop {
            if self.end.is_some_and(|end| self.offset >= end) {
                return Ok(None);
            }
            if let Some(channel) = &mut self.channel {
                match channel.recv().await {
                    Some(chunk) => {
                        self.offset += chunk.len() as u64;
                        return Ok(Some(chunk));
                    }
                    None => self.channel = None,
                }
                continue;
            }
            let state = self.progress.borrow_and_update().clone();
            let end = self.end.unwrap_or(u64::MAX);
            // Until the blob is verified, no body may end: the last byte of its range (of the
            // whole blob, or of a Range request) is held back, so a bad download fails it.
            let limit = match (state.verified, &state.phase) {
                (Some(size), _) => end.min(size),
                (None, Phase::Streaming { written }) => end.saturating_sub(1).min(*written),
                (None, Phase::Failed(error)) => return Err(io::Error::other(error.to_string())),
                (None, _) => 0,
            };
            if self.offset < limit {
                let file = state
                    .file
                    .ok_or_else(|| io::Error::other("download has no file"))?;
                let len = (limit - self.offset).min(READ_CHUNK as u64) as usize;
                let offset = self.offset;
                let chunk = tokio::task::spawn_blocking(move || read_exact_at(&file, offset, len))
                    .await
                    .map_err(io::Error::other)??;
                self.offset += chunk.len() as u64;
                return Ok(Some(chunk));
            }
            if let Some(size) = state.verified {
                if self.offset >= size {
                    return Ok(None);
                }
                return Err(io::Error::other("range beyond the end of the blob"));
            }
            if self.progress.changed().await.is_err() {
                // The task published its final state before ending; a closed channel without one is a bug.
                let last = self.progress.borrow().clone();
                if last.verified.is_some()
                    || matches!(last.phase, Phase::Committed | Phase::Failed(_))
                {
                    continue;
                }
                return Err(io::Error::other(lost().to_string()));
            }
        }
    }
}
