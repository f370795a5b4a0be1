//! Blob origins: where a missing blob's bytes come from, before [`fill`](super::fill) writes,
//! verifies and commits them.
//!
//! An origin answers one question, "give me this digest": its size if it knows it, then its bytes
//! as a stream of chunks. It knows nothing of the store, the flights or the clients, so the fill
//! pipeline is the same whatever the bytes come from. The upstream registry is the one origin
//! today; an object tier below the disk (#14) and a peer replica are the next ones, tried in order
//! with each miss falling through, as mountpoint-s3's caches do. Nothing here assumes HTTP.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use http::{Method, StatusCode};
use prometheus::IntCounter;

use super::error::MirrorError;
use super::send::{content_length, send_ok};
use super::upstream_failure;
use crate::oci::{Digest, RepoName};
use crate::upstream::{Upstream, UpstreamBody, UpstreamRequest};

/// A blob's bytes in the order they are to be written. Errors keep their type, so a failed
/// download is still classified by what failed (see `failure_reason`). Boxed once per download,
/// never per chunk.
pub type Chunks = Pin<Box<dyn Stream<Item = Result<Bytes, MirrorError>> + Send>>;

/// An origin's answer for a digest it holds.
pub struct Opened {
    /// The size the origin announced, if any; [`fill`](super::fill) holds the bytes to it.
    pub size: Option<u64>,
    pub chunks: Chunks,
}

/// A source of blob content. `open` fails with the origin's own error (an upstream's status, an
/// unreachable host) before any byte is written.
pub trait BlobOrigin: Send + Sync {
    /// The registry whose content this is, named by content errors (`BadContent`) and logs.
    fn registry(&self) -> &str;

    fn open(&self, digest: &Digest) -> impl Future<Output = Result<Opened, MirrorError>> + Send;
}

/// The upstream registry, asked under the repository the client named (its credentials, its
/// token scope).
pub struct UpstreamOrigin {
    upstream: Arc<Upstream>,
    repo: RepoName,
    /// `gantry_upstream_bytes_total` for this registry, resolved once per download.
    received: IntCounter,
}

impl UpstreamOrigin {
    pub fn new(upstream: Arc<Upstream>, repo: RepoName, received: IntCounter) -> Self {
        Self {
            upstream,
            repo,
            received,
        }
    }
}

impl BlobOrigin for UpstreamOrigin {
    fn registry(&self) -> &str {
        self.upstream.name()
    }

    async fn open(&self, digest: &Digest) -> Result<Opened, MirrorError> {
        let repo = &self.repo;
        let request = UpstreamRequest::new(
            Method::GET,
            repo.as_str(),
            format!("/v2/{repo}/blobs/{digest}"),
        );
        let upstream = &self.upstream;
        let response = send_ok(upstream, &request, |s| s == StatusCode::OK).await?;
        let size = content_length(response.headers());
        let state = (
            response.into_body(),
            Arc::clone(upstream),
            self.received.clone(),
        );
        let chunks = futures_util::stream::try_unfold(state, next_chunk);
        Ok(Opened {
            size,
            chunks: Box::pin(chunks),
        })
    }
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
