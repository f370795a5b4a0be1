//! Response bodies for blobs, whatever their source: the store's file, or a download followed as
//! it grows. `api` sees only [`SourceBody`]; flights, channels and progress stay in the mirror.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{mpsc, watch};

use super::download::{lost, Flight, Phase, Progress};
use crate::store::{read_exact_at, BlobBody, BlobFile, READ_CHUNK};

/// A blob being downloaded, as the request that asked for it holds it.
pub struct Download {
    flight: Arc<Flight>,
    size: Option<u64>,
    /// The first-client channel, for the request that started the download.
    first: Option<mpsc::Receiver<Bytes>>,
}

impl Download {
    pub(super) fn new(
        flight: Arc<Flight>,
        size: Option<u64>,
        first: Option<mpsc::Receiver<Bytes>>,
    ) -> Self {
        Self {
            flight,
            size,
            first,
        }
    }

    /// The size the origin announced, if it did.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Follows the download over `range` (`None`: the whole blob). Only a request for the whole
    /// blob can take the origin's chunks as they come.
    pub(super) fn body(self, range: Option<Range<u64>>) -> SourceBody {
        let (offset, end) = match range {
            Some(range) => (range.start, Some(range.end)),
            None => (0, self.size),
        };
        let first = if offset == 0 && end == self.size {
            self.first
        } else {
            None
        };
        let follower = Follower {
            channel: first,
            progress: self.flight.progress(),
            offset,
            end,
            finished: false,
        };
        let chunks = futures_util::stream::unfold(follower, |mut follower| async move {
            match follower.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), follower)),
                Ok(None) => None,
                Err(error) => Some((Err(error), follower)),
            }
        });
        SourceBody::Following(Box::pin(chunks))
    }
}

/// A blob's response body.
pub enum SourceBody {
    /// Verified and on disk.
    Stored(BlobBody),
    /// Following a download (boxed once per response).
    Following(Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>),
    /// No content (a `HEAD` answered upstream).
    Empty,
}

impl SourceBody {
    /// `range` (`None`: the whole blob) of a stored blob, leased until the body is dropped.
    pub(super) fn stored(blob: BlobFile, range: Option<Range<u64>>) -> Self {
        let range = range.unwrap_or(0..blob.size);
        Self::Stored(BlobBody::new(blob, range.start, range.end))
    }
}

impl Body for SourceBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Self::Stored(body) => Pin::new(body).poll_frame(cx),
            Self::Following(chunks) => chunks
                .poll_next_unpin(cx)
                .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data))),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Stored(body) => body.is_end_stream(),
            Self::Following(_) => false,
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Stored(body) => body.size_hint(),
            Self::Following(_) => SizeHint::default(),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Follows a download: from the first-client channel while it lasts, then from the temp file as
/// it grows. It ends only after the download is verified, and fails if the download fails.
struct Follower {
    channel: Option<mpsc::Receiver<Bytes>>,
    progress: watch::Receiver<Progress>,
    offset: u64,
    end: Option<u64>,
    finished: bool,
}

impl Follower {
    /// The next chunk, `Ok(None)` at the verified end.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, io::Error> {
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
                return self.read_file(state, limit).await.map(Some);
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

    /// Up to one read's worth of the file, from the offset to `limit`.
    async fn read_file(&mut self, state: Progress, limit: u64) -> Result<Bytes, io::Error> {
        let file = state
            .file
            .ok_or_else(|| io::Error::other("download has no file"))?;
        let len = (limit - self.offset).min(READ_CHUNK as u64) as usize;
        let offset = self.offset;
        let chunk = tokio::task::spawn_blocking(move || read_exact_at(&file, offset, len))
            .await
            .map_err(io::Error::other)??;
        self.offset += chunk.len() as u64;
        Ok(chunk)
    }
}
