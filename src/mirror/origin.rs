//! Blob origins: where a missing blob's bytes come from, before [`fill`](super::fill) writes,
//! verifies and commits them.
//!
//! An origin answers one question, "give me this digest from byte N": the whole blob's size if it
//! knows it, then its bytes from N as a stream of chunks, or `None` when it does not hold the
//! blob. It knows nothing of the store, the flights or the clients, so the fill pipeline is the
//! same whatever the bytes come from. The upstream registry is one origin; the object tier below
//! the disk and a peer replica are others. A download tries its origins in order, each miss or
//! error falling through, as mountpoint-s3's caches do; when the origin feeding it breaks off, the
//! [`resume`](super::resume) chain goes on from the next one at the same byte.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http::{Method, StatusCode};
use prometheus::IntCounter;

use super::error::MirrorError;
use super::send::{content_length, send_ok};
use super::upstream_failure;
use crate::cluster::Peers;
use crate::oci::{Digest, RepoName};
use crate::store::object::ObjectTier;
use crate::upstream::{Upstream, UpstreamBody, UpstreamRequest};

/// A blob's bytes in the order they are to be written. Errors keep their type, so a failed
/// download is still classified by what failed (see `failure_reason`). Boxed once per download,
/// never per chunk.
pub type Chunks = Pin<Box<dyn Stream<Item = Result<Bytes, MirrorError>> + Send>>;

/// An origin's answer for a digest it holds.
pub struct Opened {
    /// The whole blob's size as the origin announced it, if it did; [`fill`](super::fill) holds
    /// the bytes to it.
    pub size: Option<u64>,
    /// The bytes from the offset asked for.
    pub chunks: Chunks,
}

/// A source of blob content. `open` answers `None` when the origin does not hold the blob, and
/// fails with the origin's own error (an upstream's status, an unreachable host) before any byte
/// is written.
pub trait BlobOrigin: Send + Sync {
    /// Where the bytes come from, for logs (`docker.io`, `object tier`, a peer's URL).
    fn name(&self) -> &str;

    fn open(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> impl Future<Output = Result<Option<Opened>, MirrorError>> + Send;
}

/// The origins a download may use, in one type so that they can be tried in order.
pub(super) enum Origin {
    /// The object tier below the disk (`storage.s3`).
    Object(ObjectOrigin),
    /// The replica that holds the digest's download lease.
    Peer(PeerOrigin),
    Upstream(UpstreamOrigin),
}

impl BlobOrigin for Origin {
    fn name(&self) -> &str {
        match self {
            Self::Object(object) => object.name(),
            Self::Peer(peer) => peer.name(),
            Self::Upstream(upstream) => upstream.name(),
        }
    }

    async fn open(&self, digest: &Digest, offset: u64) -> Result<Option<Opened>, MirrorError> {
        match self {
            Self::Object(object) => object.open(digest, offset).await,
            Self::Peer(peer) => peer.open(digest, offset).await,
            Self::Upstream(upstream) => upstream.open(digest, offset).await,
        }
    }
}

/// A failure of an origin below the upstream, typed, for the resume chain to take over from.
fn below<E: std::error::Error + Send + Sync + 'static>(origin: &str, error: E) -> MirrorError {
    MirrorError::Origin {
        origin: origin.to_owned(),
        source: Arc::new(error),
    }
}

/// The object tier: content it holds was verified before it was uploaded, and is verified again
/// as it is written to this disk (the tier is trusted with nothing).
pub(super) struct ObjectOrigin(pub Arc<ObjectTier>);

impl BlobOrigin for ObjectOrigin {
    fn name(&self) -> &str {
        "object tier"
    }

    async fn open(&self, digest: &Digest, offset: u64) -> Result<Option<Opened>, MirrorError> {
        let Some(read) = self
            .0
            .read_blob(digest, offset)
            .await
            .map_err(|e| below(self.name(), e))?
        else {
            return Ok(None);
        };
        let chunks = read.chunks.map_err(|e| below("object tier", e));
        Ok(Some(Opened {
            size: Some(read.size),
            chunks: Box::pin(chunks),
        }))
    }
}

/// The replica downloading the digest now (its lease's holder), read on its cluster route while
/// its own download runs.
pub(super) struct PeerOrigin {
    pub peers: Arc<Peers>,
    pub owner_url: String,
}

impl BlobOrigin for PeerOrigin {
    fn name(&self) -> &str {
        &self.owner_url
    }

    async fn open(&self, digest: &Digest, offset: u64) -> Result<Option<Opened>, MirrorError> {
        let Some(read) = self
            .peers
            .open(&self.owner_url, digest, offset)
            .await
            .map_err(|e| below(&self.owner_url, e))?
        else {
            return Ok(None);
        };
        let owner = self.owner_url.clone();
        let chunks = read.chunks.map_err(move |e| below(&owner, e));
        Ok(Some(Opened {
            size: read.size,
            chunks: Box::pin(chunks),
        }))
    }
}

/// The upstream registry, asked under the repository the client named (its credentials, its
/// token scope).
#[derive(Clone)]
pub struct UpstreamOrigin {
    upstream: Arc<Upstream>,
    repo: RepoName,
    /// `gantry_upstream_bytes_total` for this registry, resolved once per download.
    received: IntCounter,
    /// `gantry_download_refetched_bytes_total`: bytes before the offset of a resumed request
    /// that the upstream sent again (it ignored `Range`).
    refetched: Option<IntCounter>,
}

impl UpstreamOrigin {
    pub fn new(
        upstream: Arc<Upstream>,
        repo: RepoName,
        received: IntCounter,
        refetched: Option<IntCounter>,
    ) -> Self {
        Self {
            upstream,
            repo,
            received,
            refetched,
        }
    }
}

impl BlobOrigin for UpstreamOrigin {
    fn name(&self) -> &str {
        self.upstream.name()
    }

    async fn open(&self, digest: &Digest, offset: u64) -> Result<Option<Opened>, MirrorError> {
        let repo = &self.repo;
        let mut request = UpstreamRequest::new(
            Method::GET,
            repo.as_str(),
            format!("/v2/{repo}/blobs/{digest}"),
        );
        request.range_from = (offset > 0).then_some(offset);
        let upstream = &self.upstream;
        let ok = |s| s == StatusCode::OK || (offset > 0 && s == StatusCode::PARTIAL_CONTENT);
        let response = send_ok(upstream, &request, ok).await?;
        let (size, skip) = if response.status() == StatusCode::PARTIAL_CONTENT {
            (content_range_total(response.headers(), offset), 0)
        } else {
            // A registry that ignores `Range` sends it all: the bytes before `offset` are dropped.
            (content_length(response.headers()), offset)
        };
        let state = (
            response.into_body(),
            Arc::clone(upstream),
            self.received.clone(),
        );
        let chunks = futures_util::stream::try_unfold(state, next_chunk);
        Ok(Some(Opened {
            size,
            chunks: skip_bytes(Box::pin(chunks), skip, self.refetched.clone()),
        }))
    }
}

/// The whole size from a `Content-Range: bytes N-M/TOTAL` that starts where it was asked to.
fn content_range_total(headers: &http::HeaderMap, offset: u64) -> Option<u64> {
    let value = headers.get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    let (range, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    (start.parse::<u64>().ok()? == offset)
        .then(|| total.parse().ok())
        .flatten()
}

/// `chunks` without their first `skip` bytes, each dropped byte counted in `dropped` as it
/// arrives (what a resumed download paid for an origin that ignored `Range`).
pub(super) fn skip_bytes(chunks: Chunks, skip: u64, dropped: Option<IntCounter>) -> Chunks {
    if skip == 0 {
        return chunks;
    }
    let count = move |n: u64| {
        if let Some(dropped) = &dropped {
            dropped.inc_by(n);
        }
    };
    let skipping = futures_util::stream::try_unfold(
        (chunks, skip, count),
        |(mut chunks, mut skip, count)| async move {
            use futures_util::StreamExt;
            while let Some(chunk) = chunks.next().await {
                let mut chunk = chunk?;
                if skip >= chunk.len() as u64 {
                    skip -= chunk.len() as u64;
                    count(chunk.len() as u64);
                    continue;
                }
                if skip == 0 {
                    return Ok(Some((chunk, (chunks, 0, count))));
                }
                count(skip);
                let rest = chunk.split_off(skip as usize);
                return Ok(Some((rest, (chunks, 0, count))));
            }
            Ok(None)
        },
    );
    Box::pin(skipping)
}

type BodyState = (UpstreamBody, Arc<Upstream>, IntCounter);

async fn next_chunk(state: BodyState) -> Result<Option<(Bytes, BodyState)>, MirrorError> {
    let (mut body, upstream, received) = state;
    match body.chunk().await {
        Ok(Some(chunk)) => {
            received.inc_by(chunk.len() as u64);
            Ok(Some((chunk, (body, upstream, received))))
        }
        Ok(None) => Ok(None),
        Err(error) => Err(upstream_failure(&upstream, error)),
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[test]
    fn content_range_gives_the_total_only_from_the_asked_offset() {
        let headers = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::CONTENT_RANGE, value.parse().unwrap());
            headers
        };
        assert_eq!(content_range_total(&headers("bytes 4-9/10"), 4), Some(10));
        assert_eq!(content_range_total(&headers("bytes 0-9/10"), 4), None);
        assert_eq!(content_range_total(&headers("bytes 4-9/*"), 4), None);
        assert_eq!(content_range_total(&http::HeaderMap::new(), 4), None);
    }

    #[tokio::test]
    async fn skipping_drops_exactly_the_first_bytes_across_chunks() {
        for skip in 0..=7 {
            let dropped = IntCounter::new("dropped", "dropped").unwrap();
            let parts =
                [&b"abc"[..], b"de", b"fg"].map(|p| Ok::<_, MirrorError>(Bytes::from_static(p)));
            let chunks: Chunks = Box::pin(futures_util::stream::iter(parts));
            let rest: Vec<u8> = skip_bytes(chunks, skip, Some(dropped.clone()))
                .map(|c| c.unwrap().to_vec())
                .concat()
                .await;
            assert_eq!(rest, &b"abcdefg"[skip as usize..], "skip {skip}");
            assert_eq!(
                dropped.get(),
                skip,
                "skip {skip}: every dropped byte counted"
            );
        }
    }
}
