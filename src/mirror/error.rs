//! What can go wrong while answering from the cache or the upstream, and on which side.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};

use crate::oci::OciError;
use crate::store::StoreError;
use crate::upstream::UpstreamError;

/// Clone, because one failed download is reported to every request that followed it; typed
/// sources are shared (`Arc`), so what failed can be classified by matching, never by text.
#[derive(Clone, Debug, thiserror::Error)]
pub enum MirrorError {
    /// The client's request is wrong (bad name, unknown registry...): not worth a retry.
    #[error(transparent)]
    Request(#[from] OciError),
    /// The upstream answered with an error status.
    #[error("{registry} answered {status}")]
    UpstreamStatus {
        registry: String,
        status: StatusCode,
        retry_after: Option<HeaderValue>,
        /// The upstream's own OCI error body, when it sent a readable one.
        body: Option<bytes::Bytes>,
    },
    /// The upstream could not be reached or broke off (connection, timeout, stalled body).
    #[error("{registry} is unavailable: {source}")]
    Unavailable {
        registry: String,
        #[source]
        source: Arc<UpstreamError>,
    },
    /// An origin below the upstream (the object tier, a peer replica) failed. Never shown to a
    /// client as such: the next origin takes over, and only the upstream's own failures end a pull.
    #[error("{origin}: {source}")]
    Origin {
        origin: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A whole blob download took longer than `timeouts.download`.
    #[error("{registry}: the download took longer than {limit:?}")]
    DownloadTimeout {
        registry: String,
        limit: std::time::Duration,
    },
    /// The upstream sent content that does not match its digest or size.
    #[error("{registry} sent bad content for {digest}: {reason}")]
    BadContent {
        registry: String,
        digest: String,
        reason: String,
    },
    /// The mirror is at its limit of downloads and queued downloads: shed, to be retried.
    #[error("too many downloads in progress; shed after {waited:?}")]
    Overloaded {
        waited: std::time::Duration,
        retry_after_secs: u64,
    },
    /// The registry is `offline` and what was asked is not cached: nothing was sent upstream.
    #[error("{registry} is offline: the {kind} {reference} is not cached")]
    Offline {
        registry: String,
        kind: super::offline::Kind,
        /// What was asked, as a client would name it (`library/alpine:3.19`).
        reference: String,
    },
    /// Our own disk failed.
    #[error("store: {0}")]
    Store(#[source] Arc<StoreError>),
    /// gantry's own machinery failed (a download task lost, its disk writer gone).
    #[error("internal: {0}")]
    Internal(&'static str),
}

impl MirrorError {
    /// Failures of the upstream (not of the request, not our own) allow a cached tag or listing to
    /// be served past its TTL.
    pub(super) fn serves_stale(&self) -> bool {
        match self {
            Self::Unavailable { .. }
            | Self::DownloadTimeout { .. }
            | Self::BadContent { .. }
            | Self::Origin { .. } => true,
            Self::UpstreamStatus { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            // Offline, nothing could answer later: the cache is all there is, and it was asked.
            Self::Request(_)
            | Self::Store(_)
            | Self::Internal(_)
            | Self::Overloaded { .. }
            | Self::Offline { .. } => false,
        }
    }
}
