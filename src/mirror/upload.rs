//! The object tier's uploader: the consumer of the post-commit hook ([`super::hook`]) that copies
//! each verified blob from the disk store into the object tier.
//!
//! It runs beside the clients' transfers and never slows them: the hook's queue is drained at
//! once into a backlog of at most [`MAX_BACKLOG`] blobs (a full backlog drops and counts, it
//! never waits), from which at most `storage.s3.max_uploads` uploads run at a time. Each upload
//! opens the blob with [`Store::open_blob`], whose lease keeps it from eviction while it is read,
//! and is tried [`ATTEMPTS`] times with a growing pause. A failed upload is logged and counted
//! (`gantry_object_tier_uploads_total{result="failed"}`): it costs durability (the blob stays on
//! this replica's disk only), never a pull.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::Committed;
use crate::store::object::{ObjectTier, ObjectTierError, Uploaded};
use crate::store::Store;

/// The hook's queue; drained as fast as events arrive, so it only absorbs bursts.
pub const UPLOAD_QUEUE: usize = 1024;
/// Blobs waiting for an upload slot at most; more are dropped and counted.
pub const MAX_BACKLOG: usize = 4096;
/// Tries per blob.
pub const ATTEMPTS: usize = 3;
/// The pause before the second and third tries: past the tier's breaker, so a brief outage
/// costs no upload.
const BACKOFF: [Duration; ATTEMPTS - 1] = [Duration::from_secs(1), Duration::from_secs(4)];

/// The consumer for [`CommitHook::spawn`](super::CommitHook::spawn): uploads every committed
/// blob to `tier`, at most `max_uploads` at once, until the queue closes and the backlog is done.
pub fn uploader(
    tier: Arc<ObjectTier>,
    store: Arc<Store>,
    max_uploads: usize,
) -> impl FnOnce(mpsc::Receiver<Committed>) -> BoxFuture<'static, ()> {
    move |events| run(tier, store, max_uploads.max(1), events).boxed()
}

async fn run(
    tier: Arc<ObjectTier>,
    store: Arc<Store>,
    max_uploads: usize,
    mut events: mpsc::Receiver<Committed>,
) {
    let metrics = Arc::clone(tier.metrics());
    let mut backlog = VecDeque::new();
    let mut running = JoinSet::new();
    let mut open = true;
    loop {
        while running.len() < max_uploads {
            let Some(event) = backlog.pop_front() else {
                break;
            };
            running.spawn(upload(Arc::clone(&tier), Arc::clone(&store), event));
        }
        metrics
            .object_tier_upload_backlog
            .set(i64::try_from(backlog.len() + running.len()).unwrap_or(i64::MAX));
        if !open && running.is_empty() {
            break;
        }
        tokio::select! {
            event = events.recv(), if open => match event {
                Some(event) if backlog.len() < MAX_BACKLOG => backlog.push_back(event),
                Some(event) => {
                    metrics.object_tier_uploads_dropped.inc();
                    tracing::debug!(digest = %event.digest, "object tier upload backlog full; upload dropped");
                }
                None => open = false,
            },
            Some(joined) = running.join_next(), if !running.is_empty() => {
                if let Err(error) = joined {
                    tracing::warn!(%error, "an object tier upload task failed");
                }
            }
            else => break,
        }
    }
    metrics.object_tier_upload_backlog.set(0);
}

/// Uploads one committed blob, retrying; the outcome is counted by result.
async fn upload(tier: Arc<ObjectTier>, store: Arc<Store>, event: Committed) {
    let uploads = &tier.metrics().object_tier_uploads;
    // Evicted before its turn: another replica may still upload it.
    let Some(file) = store.open_blob(&event.digest).await else {
        uploads.with_label_values(&["gone"]).inc();
        return;
    };
    for attempt in 1..=ATTEMPTS {
        let error = match tier.upload_blob(&event.digest, &file).await {
            Ok(Uploaded::Stored { .. }) => {
                uploads.with_label_values(&["uploaded"]).inc();
                return;
            }
            Ok(Uploaded::Present) => {
                uploads.with_label_values(&["present"]).inc();
                return;
            }
            Err(error) => error,
        };
        match BACKOFF.get(attempt - 1) {
            Some(pause) => {
                tracing::debug!(digest = %event.digest, attempt, %error, "object tier upload failed; retrying");
                tokio::time::sleep(*pause).await;
            }
            None => {
                uploads.with_label_values(&["failed"]).inc();
                // A tier known to be down was logged once already, when it went down.
                if matches!(error, ObjectTierError::Down) {
                    tracing::debug!(digest = %event.digest, "object tier down; blob not uploaded");
                } else {
                    tracing::warn!(
                        digest = %event.digest,
                        %error,
                        "object tier upload failed {ATTEMPTS} times: the blob stays on this replica's disk only"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use object_store::memory::InMemory;
    use object_store::ObjectStore;

    use super::*;
    use crate::metrics::Metrics;
    use crate::mirror::CommitHook;
    use crate::oci::{Algorithm, Digest};
    use crate::store::StoreOptions;

    #[tokio::test]
    async fn every_committed_blob_is_uploaded_and_a_vanished_one_is_counted_gone() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(dir.path(), StoreOptions::default(), Arc::clone(&metrics)).unwrap();
        let bucket = Arc::new(InMemory::new());
        let tier = Arc::new(ObjectTier::over(
            bucket.clone(),
            "",
            None,
            Arc::clone(&metrics),
        ));
        let hook = CommitHook::spawn(
            UPLOAD_QUEUE,
            uploader(Arc::clone(&tier), Arc::clone(&store), 2),
        );
        let mut digests = Vec::new();
        for byte in 1..=5u8 {
            let content = vec![byte; 1000 * usize::from(byte)];
            let digest = Digest::of(Algorithm::Sha256, &content);
            let mut writer = store.begin_blob(&digest, None).unwrap();
            writer.write(Bytes::from(content.clone())).await.unwrap();
            writer.commit().await.unwrap();
            hook.notify(Committed {
                digest: digest.clone(),
                size: content.len() as u64,
            });
            digests.push((digest, content));
        }
        hook.notify(Committed {
            digest: Digest::of(Algorithm::Sha256, b"never stored"),
            size: 12,
        });
        // Closing the queue waits for the backlog to be done.
        hook.finish().await;
        for (digest, content) in &digests {
            let got = bucket.get(&tier.blob_key(digest)).await.unwrap();
            assert_eq!(got.bytes().await.unwrap(), content.as_slice());
        }
        let uploads = |result: &str| {
            metrics
                .object_tier_uploads
                .with_label_values(&[result])
                .get()
        };
        assert_eq!(uploads("uploaded"), 5);
        assert_eq!(uploads("gone"), 1);
        assert_eq!(metrics.object_tier_upload_backlog.get(), 0);
        assert_eq!(metrics.object_tier_uploaded_bytes.get(), 15_000);
    }
}
