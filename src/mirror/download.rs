//! Single-flight blob downloads: one fetch per digest, however many clients ask.
//!
//! A download belongs to the mirror, not to the request that started it: the request claims the
//! digest ([`coordinator`](super::coordinator)), and the owner runs the download in its own task,
//! bounded by `timeouts.download`, which finishes even if every client leaves. The download picks
//! an [origin](super::origin), opens it and [fills](super::fill) the store from it. The first
//! client gets the origin's `Bytes` through a bounded channel (no copy); everyone else, and the
//! first client too if it falls behind, follows the growing temp file
//! ([`Download`](super::body::Download)). The last bytes are released only after the digest is
//! verified, so a corrupt or truncated download never looks complete to anyone.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

use super::coordinator::{Claim, Owner};
use super::error::MirrorError;
use super::fill::{fill, store_error};
use super::hook::Committed;
use super::origin::{BlobOrigin, ObjectOrigin, Origin, PeerOrigin, UpstreamOrigin};
use super::prefetch::Prefetched;
use super::resume::open_first;
use super::Mirror;
use crate::cluster::LeaseClaim;
use crate::metrics::FailureReason;
use crate::oci::{Digest, RepoName};
use crate::upstream::{Upstream, UpstreamError};

/// Chunks buffered for the first client before it is switched to following the file. Each chunk
/// can pin a whole upstream read buffer: 64 of them took peak RSS through the 8-client cold pull to
/// 59-63 MiB, 16 to 36-43 MiB, at the same wall time (a client that falls behind reads the file).
const FIRST_CLIENT_CHANNEL: usize = 16;

#[derive(Clone, Debug)]
pub enum Phase {
    /// Waiting for the origin's answer.
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
    /// As the origin announced it (the upstream's `Content-Length`), once known.
    pub size: Option<u64>,
    /// The blob's size once every byte is on disk and matches the digest. Set before the commit
    /// and never cleared, so a body that looks after the commit failed still finds it: the
    /// verified bytes stay readable through its file handle.
    pub(super) verified: Option<u64>,
    pub(super) file: Option<Arc<File>>,
}

/// A download in progress, shared by every request for its digest.
pub struct Flight {
    progress: watch::Receiver<Progress>,
    /// `<registry>/<repository>` the upstream is asked under: joiners asking under the same one
    /// need no check that it references the blob (see `store::links`).
    repository: String,
}

impl Flight {
    /// A flight about to connect, and the sender its download publishes progress on.
    pub(super) fn new(repository: String) -> (Arc<Self>, watch::Sender<Progress>) {
        let (progress, receiver) = watch::channel(Progress {
            phase: Phase::Connecting,
            size: None,
            verified: None,
            file: None,
        });
        let flight = Self {
            progress: receiver,
            repository,
        };
        (Arc::new(flight), progress)
    }

    pub fn asked_under(&self, repository: &str) -> bool {
        self.repository == repository
    }

    pub(super) fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Waits for the origin's answer: the blob's size (if the origin sent one) or the error.
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
}

/// Who a download runs for, which decides how it gets its slot.
enum Priority {
    /// A client's request: waits for a slot (or is shed), and streams to that client first.
    Client(mpsc::Sender<Bytes>),
    /// A prefetch: both permits taken before it was started, no client to stream to.
    Prefetch {
        slot: OwnedSemaphorePermit,
        prefetch: OwnedSemaphorePermit,
    },
}

/// The permits a running download holds until it ends: its slot, and a prefetch's own permit.
struct Held {
    _slot: OwnedSemaphorePermit,
    _prefetch: Option<OwnedSemaphorePermit>,
}

impl Held {
    fn client(slot: OwnedSemaphorePermit) -> Self {
        Self {
            _slot: slot,
            _prefetch: None,
        }
    }
}

pub(super) fn lost() -> MirrorError {
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
        let repository = || format!("{}/{repo}", upstream.name());
        let owner = match self.coordinator.claim(digest, repository) {
            Claim::Follow(flight) => {
                self.metrics.download_joins.inc();
                return (flight, None);
            }
            Claim::Owner(owner) => owner,
        };
        let flight = Arc::clone(&owner.flight);
        let (first_tx, first_rx) = mpsc::channel(FIRST_CLIENT_CHANNEL);
        self.start(owner, upstream, repo, digest, Priority::Client(first_tx));
        (flight, Some(first_rx))
    }

    /// Starts the download of `digest` at the lowest priority (see `prefetch`), unless it is
    /// stored or downloading already, or no slot is free right now. A client asking for it
    /// meanwhile follows the flight like any other.
    pub(super) fn prefetch_blob(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Prefetched {
        if self.store.contains_blob(digest) {
            return Prefetched::Cached;
        }
        if self.coordinator.running(digest).is_some() {
            return Prefetched::InFlight;
        }
        // Both now or not at all: a prefetch never waits, so it never queues before a client.
        let Some(prefetch) = self.prefetch.permit() else {
            return Prefetched::Busy;
        };
        let Ok(slot) = Arc::clone(&self.download_slots).try_acquire_owned() else {
            return Prefetched::Busy;
        };
        let repository = || format!("{}/{repo}", upstream.name());
        match self.coordinator.claim(digest, repository) {
            Claim::Follow(_) => Prefetched::InFlight,
            Claim::Owner(owner) => {
                self.start(
                    owner,
                    upstream,
                    repo,
                    digest,
                    Priority::Prefetch { slot, prefetch },
                );
                Prefetched::Started
            }
        }
    }

    /// Runs a claimed download in its own task, owned by the mirror through the claim; it ends
    /// when the download commits, fails or times out.
    fn start(
        self: &Arc<Self>,
        owner: Owner,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        priority: Priority,
    ) {
        let received = self
            .metrics
            .upstream_bytes
            .with_label_values(&[upstream.name()]);
        let origin = UpstreamOrigin::new(
            Arc::clone(upstream),
            repo.clone(),
            received,
            self.resumes.refetched(),
        );
        self.metrics.downloads_in_flight.inc();
        tokio::spawn(Arc::clone(self).run(owner, origin, digest.clone(), priority));
    }

    /// Waits for the running downloads to end, their commits included, until `deadline`; returns
    /// how many were abandoned. A graceful shutdown calls it once no request is left, so a blob a
    /// client just received is in the store after a restart.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> usize {
        self.coordinator.drain(deadline).await
    }

    /// Runs one flight to its end: a download slot, the download under `timeouts.download`, then
    /// the outcome published to everyone following.
    async fn run(
        self: Arc<Self>,
        owner: Owner,
        origin: UpstreamOrigin,
        digest: Digest,
        priority: Priority,
    ) {
        // `_task` counts this task as running (see `drain`) until the function returns.
        let Owner {
            progress,
            claim,
            task: _task,
            ..
        } = owner;
        let limit = self.download_timeout;
        // A prefetch arrives with its slot (and its prefetch permit), held until the end.
        let (slot, first) = match priority {
            Priority::Client(first) => (self.download_slot().await, Some(first)),
            Priority::Prefetch { slot, prefetch } => (
                Ok(Held {
                    _slot: slot,
                    _prefetch: Some(prefetch),
                }),
                None,
            ),
        };
        let outcome = match slot {
            Err(shed) => Err(shed),
            Ok(_slot) => {
                tokio::time::timeout(limit, self.download(&origin, &digest, &progress, first))
                    .await
                    .unwrap_or_else(|_| {
                        Err(MirrorError::DownloadTimeout {
                            registry: origin.name().to_owned(),
                            limit,
                        })
                    })
            }
        };
        // Release the claim before publishing the outcome: a request arriving now finds the blob
        // in the store (or starts afresh after a failure).
        claim.release();
        self.metrics.downloads_in_flight.dec();
        match outcome {
            Ok(size) => {
                if let Some(hook) = &self.commit_hook {
                    hook.notify(Committed { digest, size });
                }
                progress.send_modify(|p| p.phase = Phase::Committed);
            }
            Err(error) => {
                tracing::warn!(%digest, registry = origin.name(), %error, "blob download failed; nothing was cached");
                self.metrics
                    .download_failures
                    .with_label_values(&[failure_reason(&error).as_str()])
                    .inc();
                progress.send_modify(|p| p.phase = Phase::Failed(error));
            }
        }
    }

    /// One of `limits.max_downloads` slots. With every slot busy a download waits, but only
    /// `timeouts.download_queue` long and only behind `limits.max_queued_downloads` others; past
    /// either it is shed with a quick `503` and `Retry-After` (linkerd's load shedding) instead of
    /// holding its clients for up to `timeouts.download`.
    async fn download_slot(&self) -> Result<Held, MirrorError> {
        use std::sync::atomic::Ordering;
        let slots = Arc::clone(&self.download_slots);
        if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
            return Ok(Held::client(slot));
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
                Ok(slot) => slot.map(Held::client).map_err(|_| lost()),
                Err(_) => Err(shed(wait)),
            }
        };
        self.queued_downloads.fetch_sub(1, Ordering::SeqCst);
        waited
    }

    /// Fetches, verifies and commits one blob from the first of its origins that holds it:
    /// the object tier, then (in a fleet) the replica holding the digest's lease, then the
    /// upstream, each taking over from the one before at the byte it broke off, and the upstream
    /// asked again from there when it breaks off itself (`limits.download_resumes`). Returns its
    /// size.
    async fn download(
        &self,
        upstream: &UpstreamOrigin,
        digest: &Digest,
        progress: &watch::Sender<Progress>,
        first: Option<mpsc::Sender<Bytes>>,
    ) -> Result<u64, MirrorError> {
        let registry = upstream.name().to_owned();
        let mut origins = Vec::with_capacity(3);
        let object = self
            .object_tier
            .as_ref()
            .map(|tier| Origin::Object(ObjectOrigin(Arc::clone(tier))));
        let mut lease = None;
        match self.cluster.as_ref() {
            None => origins.extend(object),
            Some(cluster) => match cluster.leases.claim(digest).await {
                // Another replica is downloading it: read its flight, and should that replica
                // die, go on from the object tier (if the blob reached it) or the upstream.
                LeaseClaim::HeldBy(owner_url) => {
                    origins.push(Origin::Peer(PeerOrigin {
                        peers: Arc::clone(&cluster.peers),
                        owner_url,
                    }));
                    origins.extend(object);
                }
                LeaseClaim::Owned(owned) => {
                    lease = Some(owned);
                    origins.extend(object);
                }
                LeaseClaim::Unavailable => origins.extend(object),
            },
        }
        origins.push(Origin::Upstream(upstream.clone()));
        let result = self
            .fill_from(origins, digest, progress, first, &registry)
            .await;
        if let Some(lease) = lease {
            match &result {
                // Kept until it lapses (one `cluster.lease_ttl`): a replica asking meanwhile
                // reads this replica's store while the upload to the object tier runs, instead of
                // finding neither a lease nor the object and fetching the blob again.
                Ok(_) => lease.abandon(),
                Err(_) => lease.release().await,
            }
        }
        if let (Err(MirrorError::BadContent { .. }), Some(tier)) = (&result, &self.object_tier) {
            // Part of it may have come from the object tier: a copy there that does not match
            // its digest must not be served again.
            if let Err(error) = tier.remove_blob(digest).await {
                tracing::warn!(%digest, %error, "could not remove a blob that failed verification from the object tier");
            }
        }
        result
    }

    async fn fill_from(
        &self,
        origins: Vec<Origin>,
        digest: &Digest,
        progress: &watch::Sender<Progress>,
        first: Option<mpsc::Sender<Bytes>>,
        registry: &str,
    ) -> Result<u64, MirrorError> {
        let opened = open_first(digest, origins, self.resumes.clone()).await?;
        let writer = self
            .store
            .begin_blob(digest, opened.size)
            .map_err(store_error)?;
        fill(writer, opened.chunks, progress, first, registry).await
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
        MirrorError::Origin { .. } => FailureReason::UpstreamUnavailable,
        MirrorError::UpstreamStatus { .. }
        | MirrorError::Request(_)
        | MirrorError::Offline { .. } => FailureReason::UpstreamStatus,
    }
}
