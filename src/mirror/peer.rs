//! What this replica can hand a peer for a digest without fetching anything: the store's file,
//! or a download running here (followed as it grows, its last bytes released only after it
//! verified, as for any client). Never an upstream request, never a new download: a peer asks
//! because this replica owns the digest's lease, and an answer that started work here would
//! turn one request into two fetches.

use std::time::Duration;

use super::body::Download;
use super::{BlobSource, Mirror};
use crate::oci::Digest;

/// How long a peer's request waits for a running download's origin to answer (and announce the
/// size) before it is answered without one: well inside the peer client's 5 s for the response
/// headers, so a slow upstream here does not send the peer upstream too.
const ORIGIN_WAIT: Duration = Duration::from_secs(2);

impl Mirror {
    /// The blob as this replica holds it now, or `None`.
    pub async fn local_blob(&self, digest: &Digest) -> Option<BlobSource> {
        if let Some(blob) = self.store.open_blob(digest).await {
            return Some(BlobSource::Cached(blob));
        }
        let Some(flight) = self.coordinator.running(digest) else {
            // A download may have committed and left between the two looks.
            return self.store.open_blob(digest).await.map(BlobSource::Cached);
        };
        let size = match tokio::time::timeout(ORIGIN_WAIT, flight.started()).await {
            Ok(Ok(size)) => size,
            // A download whose origin failed has nothing to serve.
            Ok(Err(_)) => return None,
            // Still connecting: the body follows it all the same, whole and of unknown length
            // (the peer skips to its offset).
            Err(_) => None,
        };
        Some(BlobSource::Downloading(Download::new(flight, size, None)))
    }
}
