//! What can go wrong while answering from the cache or the upstream, and on which side.

use http::{HeaderValue, StatusCode};

use crate::oci::OciError;

/// Clone, because one failed download is reported to every request that followed it; sources are
/// logged where the failure happens and kept here as text.
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
    #[error("{registry} is unavailable: {reason}")]
    Unavailable { registry: String, reason: String },
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
    /// Our own disk failed.
    #[error("store: {0}")]
    Store(String),
}
