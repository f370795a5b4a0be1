//! The pull-through policy: answer from the cache when it can, go upstream when it must.
//!
//! This is the only module that decides *whether* to contact an upstream. Manifests by digest and
//! blobs are immutable: once verified and stored they are served without upstream contact. Tags
//! are mutable: inside the registry's `tags_cache_ttl` they are answered from the tag cache; after
//! it they are revalidated with a `HEAD`, and when the upstream fails the stale answer is served.
//!
//! [`Mirror`] is the facade; each policy has its own room: `registries` (which upstream serves a
//! request), `manifests` (digests, tags and their TTL), `listing` (tag lists and referrers),
//! `scope` (which repository may be served cached content), `download` (one download per blob,
//! shared by every request for it), `prefetch` (an image's blobs started as its manifest arrives)
//! and `send` (one exchange with an upstream, failures classified).

mod body;
pub mod budget;
mod coordinator;
mod download;
mod error;
mod fill;
mod hook;
mod listing;
mod manifests;
pub mod offline;
mod origin;
mod peer;
mod prefetch;
mod registries;
mod resume;
mod scope;
mod send;
mod upload;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

pub use body::{Download, SourceBody};
pub use coordinator::InFlight;
pub use error::MirrorError;
pub use hook::{CommitHook, Committed};
pub use listing::Passthrough;
pub use manifests::Manifest;
pub use registries::{Registry, Target};
pub(crate) use send::upstream_failure;
pub use upload::{uploader, UPLOAD_QUEUE};

use crate::cluster::{Leases, Peers};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::single_flight::SingleFlight;
use crate::store::object::ObjectTier;
use crate::store::{BlobFile, Store};
use crate::tags::Tags;
use crate::upstream::{CredentialError, Pool};
use registries::Registries;
use scope::repository_key;

/// Where a blob's bytes come from.
pub enum BlobSource {
    /// Verified and on disk.
    Cached(BlobFile),
    /// Being downloaded.
    Downloading(Download),
    /// A HEAD answered by the upstream without downloading.
    Upstream { size: Option<u64> },
}

impl BlobSource {
    /// The blob's size, if known (a download's origin may not announce it).
    pub fn size(&self) -> Option<u64> {
        match self {
            Self::Cached(blob) => Some(blob.size),
            Self::Downloading(download) => download.size(),
            Self::Upstream { size } => *size,
        }
    }

    /// The response body for `range` (`None`: the whole blob): the store's file, or the download
    /// followed as it grows. A HEAD answered upstream has none.
    pub fn body(self, range: Option<std::ops::Range<u64>>) -> SourceBody {
        match self {
            Self::Cached(blob) => SourceBody::stored(blob, range),
            Self::Downloading(download) => download.body(range),
            Self::Upstream { .. } => SourceBody::Empty,
        }
    }
}

pub struct Mirror {
    store: Arc<Store>,
    tags: Tags,
    registries: Registries,
    /// Blob downloads in progress, one per digest.
    coordinator: coordinator::LocalCoordinator,
    /// Tag fetches and revalidations in progress, by tag key.
    tag_refreshes: SingleFlight<String, Result<Manifest, MirrorError>>,
    /// Tag lists and referrers, with when they were fetched; fresh for the registry's tag TTL.
    listings: listing::Listings,
    metrics: Arc<Metrics>,
    max_manifest_size: usize,
    download_timeout: Duration,
    /// Permits for upstream blob downloads (`limits.max_downloads`).
    download_slots: Arc<tokio::sync::Semaphore>,
    /// Downloads waiting for a slot now, at most `limits.max_queued_downloads`.
    queued_downloads: Arc<std::sync::atomic::AtomicUsize>,
    max_queued_downloads: usize,
    download_queue_wait: Duration,
    /// Told of every committed download (see `hook`); `None` costs the commit nothing.
    commit_hook: Option<CommitHook>,
    /// The object tier below the disk (`storage.s3`): an origin for blobs and manifests.
    object_tier: Option<Arc<ObjectTier>>,
    /// Manifest uploads to the object tier in flight (see `manifests::MANIFEST_UPLOADS`).
    manifest_uploads: Arc<tokio::sync::Semaphore>,
    /// Download leases and peer reads across replicas (`cluster:`).
    cluster: Option<Cluster>,
    /// Upstream 404s for tags and manifests, answered again for `mirroring.negative_ttl`.
    negatives: crate::tags::Negatives,
    /// `negative_ttl` by upstream name, for the registries that override `mirroring.negative_ttl`.
    negative_ttls: std::collections::HashMap<String, Duration>,
    default_negative_ttl: Duration,
    /// How a download whose upstream body breaks off asks again (`limits.download_resumes`).
    resumes: resume::Retries,
    /// Downloads started when an image manifest is fetched (`mirroring.prefetch`).
    prefetch: prefetch::Prefetch,
}

/// What a replica of a fleet uses to make one upstream fetch per blob for all of them.
pub struct Cluster {
    pub leases: Leases,
    pub peers: Arc<Peers>,
}

impl Mirror {
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        tags: Tags,
        pool: Pool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CredentialError> {
        Ok(Self {
            store,
            tags,
            registries: Registries::new(config, &pool)?,
            coordinator: coordinator::LocalCoordinator::default(),
            tag_refreshes: SingleFlight::counting_joins({
                let joins = metrics.tag_refresh_joins.clone();
                move || joins.inc()
            }),
            listings: listing::listings(),
            resumes: resume::Retries::new(
                config.limits.download_resumes,
                metrics.download_resumes(),
            ),
            metrics,
            max_manifest_size: usize::try_from(config.limits.max_manifest_size.0)
                .unwrap_or(usize::MAX),
            download_timeout: config.timeouts.download.0,
            download_slots: Arc::new(tokio::sync::Semaphore::new(config.limits.max_downloads)),
            queued_downloads: Arc::default(),
            max_queued_downloads: config.limits.max_queued_downloads,
            download_queue_wait: config.timeouts.download_queue.0,
            commit_hook: None,
            object_tier: None,
            manifest_uploads: Arc::new(tokio::sync::Semaphore::new(manifests::MANIFEST_UPLOADS)),
            cluster: None,
            negatives: crate::tags::Negatives::new(),
            negative_ttls: config
                .registries
                .iter()
                .filter_map(|entry| {
                    let ttl = entry.negative_ttl?;
                    Some((entry.host.0.to_ascii_lowercase(), ttl.0))
                })
                .collect(),
            default_negative_ttl: config.mirroring.negative_ttl.0,
            prefetch: prefetch::Prefetch::new(config),
        })
    }

    /// Reads blobs and manifests the disk lacks from `tier` before asking the upstream.
    pub fn with_object_tier(mut self, tier: Arc<ObjectTier>) -> Self {
        self.object_tier = Some(tier);
        self
    }

    /// Claims each upstream download across the fleet, and follows the replica that owns one.
    pub fn with_cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Whether a blob may come from somewhere other than the upstream, which then does not vouch
    /// for the requesting repository: its scope must be known first.
    fn has_origins_below(&self) -> bool {
        self.object_tier.is_some() || self.cluster.is_some()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn tags(&self) -> &Tags {
        &self.tags
    }

    /// Picks the registry for a request: containerd's `ns` parameter, else a first path component
    /// naming a configured host, else the default source.
    pub fn resolve(self: &Arc<Self>, ns: Option<&str>, name: &str) -> Result<Target, MirrorError> {
        self.prefetch.bind(self);
        self.registries.resolve(ns, name)
    }

    /// A blob: from the store, from a download in flight, or by starting one. A HEAD for an
    /// uncached blob asks the upstream without downloading.
    pub async fn blob(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        head: bool,
    ) -> Result<BlobSource, MirrorError> {
        if let Some(blob) = self.store.open_blob(digest).await {
            self.ensure_known(target, digest).await?;
            self.metrics.cache_lookup("blob", "hit");
            return Ok(BlobSource::Cached(blob));
        }
        self.metrics.cache_lookup("blob", "miss");
        let upstream = &target.registry.upstream;
        if head {
            if let Some(flight) = self.coordinator.running(digest) {
                if !flight.asked_under(&repository_key(target)) {
                    self.ensure_known(target, digest).await?;
                }
                let size = flight.started().await?;
                return Ok(BlobSource::Downloading(Download::new(flight, size, None)));
            }
            let request =
                send::repository_request(Method::HEAD, target, "blobs", &digest.to_string(), None);
            let response = send::send_ok(upstream, &request, |s| s == StatusCode::OK).await?;
            let size = send::content_length(response.headers());
            self.link_if_new(target, digest).await;
            return Ok(BlobSource::Upstream { size });
        }
        // Only the upstream's own answer proves that a repository references a blob; another
        // origin (the object tier, a peer) holds content of every repository.
        let vouched_by_upstream = !self.has_origins_below();
        if !vouched_by_upstream {
            self.ensure_known(target, digest).await?;
        }
        let (flight, first) = self.join_or_start(upstream, &target.repo, digest);
        // A download started under another repository proves nothing about this one.
        if vouched_by_upstream && first.is_none() && !flight.asked_under(&repository_key(target)) {
            self.ensure_known(target, digest).await?;
        }
        let size = flight.started().await?;
        if first.is_some() {
            // The upstream answered this repository's GET: it references the blob.
            self.link_if_new(target, digest).await;
        }
        Ok(BlobSource::Downloading(Download::new(flight, size, first)))
    }
}

impl Mirror {
    /// The blob downloads in flight in this process, with their progress (for the stats).
    pub fn downloads(&self) -> Vec<InFlight> {
        self.coordinator.in_flight()
    }
}

/// RFC 7234's "Response is Stale", on answers served past their TTL because the upstream failed.
pub const STALE_WARNING: &str = "110 gantry \"Response is Stale\"";
