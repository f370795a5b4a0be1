//! Prefetch on manifest: when an image manifest has just been fetched from the upstream, the
//! downloads of its config and layers start at once, before the client asks for them.
//!
//! A client pulls the manifest, parses it, then asks for each blob: over a WAN that is one round
//! trip (and, cold, one upstream fetch) after another. Starting the downloads as the manifest
//! arrives overlaps them with the client's own work, so its blob requests find the blobs on disk
//! or in flight and follow them (the single flight in [`coordinator`](super::coordinator)).
//!
//! A prefetch is an ordinary download (same origins, verification, commit, drain at shutdown),
//! at the lowest priority: it starts only into a download slot free right now, never one a
//! client is queued for, and at most `limits.max_downloads / 2` run at once, so half the slots
//! stay for clients whatever an image holds. What finds no slot is skipped, not queued: the
//! client's own request fetches it as it would without prefetch. At most
//! [`MAX_LINKS_PER_MANIFEST`] blobs per manifest are considered, like the links. Indexes
//! prefetch nothing: which platform the client wants is not known until it asks.
//!
//! The blobs need no scope check: the manifest served under the repository links them to it
//! ([`scope`](super::scope)), and the download asks the upstream under that same repository.

use std::sync::{Arc, OnceLock, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::scope::MAX_LINKS_PER_MANIFEST;
use super::{Mirror, Target};
use crate::config::Config;
use crate::oci::manifest::ManifestDoc;
use crate::oci::Digest;

/// What became of one blob of a fetched manifest (the `result` of `gantry_prefetch_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Prefetched {
    Started,
    /// Already in the store.
    Cached,
    /// Already downloading (a client, or another manifest's prefetch).
    InFlight,
    /// No free download slot, or `limits.max_downloads / 2` prefetches already running.
    Busy,
}

impl Prefetched {
    fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Cached => "cached",
            Self::InFlight => "in_flight",
            Self::Busy => "busy",
        }
    }
}

pub(super) struct Prefetch {
    /// `mirroring.prefetch`.
    enabled: bool,
    /// Prefetches running at once, at most `limits.max_downloads / 2`.
    running: Arc<Semaphore>,
    /// The mirror's own handle: a prefetch is started from a `&self` path (the manifest fetch)
    /// but its download is a task the mirror owns, which needs the `Arc`. Recorded the first
    /// time the mirror is used through its `Arc` ([`Mirror::resolve`], which every request
    /// passes before asking for a manifest); weak, so the mirror does not keep itself alive.
    mirror: OnceLock<Weak<Mirror>>,
}

impl Prefetch {
    pub(super) fn new(config: &Config) -> Self {
        Self {
            enabled: config.mirroring.prefetch,
            running: Arc::new(Semaphore::new(config.limits.max_downloads / 2)),
            mirror: OnceLock::new(),
        }
    }

    pub(super) fn bind(&self, mirror: &Arc<Mirror>) {
        if self.enabled && self.mirror.get().is_none() {
            // A race between two first requests sets the same handle: either one wins.
            let _ = self.mirror.set(Arc::downgrade(mirror));
        }
    }

    /// One of the `limits.max_downloads / 2` prefetch permits, if one is free now.
    pub(super) fn permit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.running).try_acquire_owned().ok()
    }
}

impl Mirror {
    /// Starts the downloads of what the manifest `bytes`, just fetched from the upstream,
    /// reference, if it is an image manifest and `mirroring.prefetch` is on. Returns at once.
    pub(super) fn prefetch(&self, target: &Target, digest: &Digest, bytes: &[u8]) {
        if !self.prefetch.enabled {
            return;
        }
        let Some(mirror) = self.prefetch.mirror.get().and_then(Weak::upgrade) else {
            return;
        };
        let doc = match ManifestDoc::parse(bytes) {
            Ok(doc) => doc,
            Err(error) => {
                tracing::debug!(%digest, %error, "a manifest whose references cannot be read; nothing prefetched");
                return;
            }
        };
        if !doc.manifests.is_empty() {
            return;
        }
        let upstream = &target.registry.upstream;
        for (blob, _) in doc.references(MAX_LINKS_PER_MANIFEST) {
            let result = mirror.prefetch_blob(upstream, &target.repo, &blob);
            self.metrics
                .prefetches
                .with_label_values(&[result.as_str()])
                .inc();
        }
    }
}
