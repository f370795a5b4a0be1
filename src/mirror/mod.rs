//! The pull-through policy: answer from the cache when it can, go upstream when it must.
//!
//! This is the only module that decides *whether* to contact an upstream. Manifests by digest and
//! blobs are immutable: once verified and stored they are served without upstream contact. Tags
//! are mutable: inside the registry's `tags_cache_ttl` they are answered from the tag cache; after
//! it they are revalidated with a `HEAD`, and when the upstream fails the stale answer is served.

mod download;
mod error;
mod registries;
mod send;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::sync::mpsc;

pub use download::{Flight, Follower};
pub use error::MirrorError;
pub use registries::{Registry, Target};
pub(crate) use send::{status_error, upstream_failure};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::oci::manifest::ManifestDoc;
use crate::oci::{AcceptSet, Digest, Reference};
use crate::single_flight::SingleFlight;
use crate::store::{BlobFile, Store};
use crate::tags::{TagEntry, Tags};
use crate::upstream::{CredentialError, Pool, Upstream, UpstreamRequest};
use registries::Registries;
use send::{repository_request, send_ok};

/// Tag lists and referrers indexes are passed through whole, so they are capped.
const MAX_LISTING: usize = 4 << 20;

/// References of one manifest linked to its repository, at most; content past them is checked
/// with the upstream when asked for (a manifest of 8 MiB could otherwise list ~50,000).
const MAX_LINKS_PER_MANIFEST: usize = 1_000;

/// Cached tag lists and referrers indexes (each at most `MAX_LISTING` bytes, most far smaller).
const MAX_LISTINGS: u64 = 10_000;

/// A manifest ready to be served.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// Served past its TTL because the upstream failed.
    pub stale: bool,
    /// Answered from the caches (store, tag cache, Redis) rather than fetched upstream now.
    pub cached: bool,
}

/// Where a blob's bytes come from.
pub enum BlobSource {
    /// Verified and on disk.
    Cached(BlobFile),
    /// Being downloaded; `first` is set for the request that started the download.
    Downloading {
        flight: Arc<Flight>,
        size: Option<u64>,
        first: Option<mpsc::Receiver<Bytes>>,
    },
    /// A HEAD answered by the upstream without downloading.
    Upstream { size: Option<u64> },
}

/// An upstream answer passed through as it is (tag lists, referrers).
#[derive(Clone)]
pub struct Passthrough {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Mirror {
    store: Arc<Store>,
    tags: Tags,
    registries: Registries,
    flights: Mutex<HashMap<Digest, Arc<Flight>>>,
    /// Tag fetches and revalidations in progress, by tag key.
    tag_refreshes: SingleFlight<String, Result<Manifest, MirrorError>>,
    /// Tag lists and referrers, with when they were fetched; fresh for the registry's tag TTL.
    listings: moka::future::Cache<String, (Instant, Passthrough)>,
    metrics: Arc<Metrics>,
    max_manifest_size: usize,
    download_timeout: Duration,
    /// Permits for upstream blob downloads (`limits.max_downloads`).
    download_slots: Arc<tokio::sync::Semaphore>,
    /// Downloads waiting for a slot now, at most `limits.max_queued_downloads`.
    queued_downloads: Arc<std::sync::atomic::AtomicUsize>,
    max_queued_downloads: usize,
    download_queue_wait: Duration,
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
            flights: Mutex::new(HashMap::new()),
            tag_refreshes: SingleFlight::counting_joins({
                let joins = metrics.tag_refresh_joins.clone();
                move || joins.inc()
            }),
            listings: moka::future::Cache::builder()
                .max_capacity(MAX_LISTINGS)
                .time_to_live(crate::tags::RETENTION)
                .build(),
            metrics,
            max_manifest_size: usize::try_from(config.limits.max_manifest_size.0)
                .unwrap_or(usize::MAX),
            download_timeout: config.timeouts.download.0,
            download_slots: Arc::new(tokio::sync::Semaphore::new(config.limits.max_downloads)),
            queued_downloads: Arc::default(),
            max_queued_downloads: config.limits.max_queued_downloads,
            download_queue_wait: config.timeouts.download_queue.0,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn tags(&self) -> &Tags {
        &self.tags
    }

    /// Picks the registry for a request: containerd's `ns` parameter, else a first path component
    /// naming a configured host, else the default source.
    pub fn resolve(&self, ns: Option<&str>, name: &str) -> Result<Target, MirrorError> {
        self.registries.resolve(ns, name)
    }

    /// A manifest by tag or digest, for a client accepting `accept`.
    pub async fn manifest(
        &self,
        target: &Target,
        reference: &Reference,
        accept: AcceptSet,
    ) -> Result<Manifest, MirrorError> {
        let manifest = match reference {
            Reference::Digest(digest) => self.manifest_by_digest(target, digest, accept).await?,
            Reference::Tag(tag) => self.manifest_by_tag(target, tag.as_str(), accept).await?,
        };
        self.link_manifest(target, &manifest).await;
        Ok(manifest)
    }

    /// Whether the target's repository is known to reference `digest`: from the store's links,
    /// else from another replica through Redis (then recorded here too).
    async fn knows(&self, target: &Target, digest: &Digest) -> bool {
        let registry = target.registry.upstream.name();
        if self.store.is_linked(digest, registry, target.repo.as_str()) {
            return true;
        }
        let repository = repository_key(target);
        if self
            .tags
            .shared_link(&digest.to_string(), &repository)
            .await
        {
            self.store.link(vec![digest.clone()], &repository).await;
            return true;
        }
        false
    }

    /// Blob content served under the target's repository must be known to be its own: from the
    /// links (here or through Redis), else by the upstream's word.
    async fn ensure_known(&self, target: &Target, digest: &Digest) -> Result<(), MirrorError> {
        if self.knows(target, digest).await {
            return Ok(());
        }
        self.confirm_with_upstream(target, "blobs", digest, None)
            .await
    }

    /// Links a blob the upstream just served under the target's repository, unless known already
    /// (so a repeated answer costs no Redis write).
    async fn link_if_new(&self, target: &Target, digest: &Digest) {
        let registry = target.registry.upstream.name();
        if !self.store.is_linked(digest, registry, target.repo.as_str()) {
            self.link(target, vec![digest.clone()]).await;
        }
    }

    /// Records that the target's repository references these digests, here and for other replicas.
    async fn link(&self, target: &Target, digests: Vec<Digest>) {
        let repository = repository_key(target);
        self.tags.share_links(&digests, &repository).await;
        self.store.link(digests, &repository).await;
    }

    /// A manifest served under a repository links it there, with everything it references: the
    /// platform manifests of an index, the config and layers of an image. Once linked, this is a
    /// single lookup.
    async fn link_manifest(&self, target: &Target, manifest: &Manifest) {
        let registry = target.registry.upstream.name();
        if self
            .store
            .is_linked(&manifest.digest, registry, target.repo.as_str())
        {
            return;
        }
        let mut digests = vec![manifest.digest.clone()];
        match ManifestDoc::parse(&manifest.bytes) {
            Ok(doc) => digests.extend(doc.references(MAX_LINKS_PER_MANIFEST)),
            Err(error) => {
                tracing::debug!(digest = %manifest.digest, %error, "a manifest whose references cannot be read")
            }
        }
        self.link(target, digests).await;
    }

    /// Cached content asked for under a repository not known to reference it: the upstream
    /// decides, with a `HEAD` under that repository (its credentials, its token scope). A yes
    /// links it; a no is the upstream's own answer, so the cache is never weaker than the
    /// registry behind it.
    async fn confirm_with_upstream(
        &self,
        target: &Target,
        kind: &str,
        digest: &Digest,
        accept: Option<AcceptSet>,
    ) -> Result<(), MirrorError> {
        let request = repository_request(Method::HEAD, target, kind, &digest.to_string(), accept);
        let result = send_ok(&target.registry.upstream, &request, |s| s.is_success()).await;
        let outcome = match &result {
            Ok(_) => "linked",
            // An error answer is the upstream's no; anything else is a failure to ask.
            Err(MirrorError::UpstreamStatus { .. }) => "refused",
            Err(_) => "failed",
        };
        self.metrics
            .repository_checks
            .with_label_values(&[outcome])
            .inc();
        result?;
        self.link(target, vec![digest.clone()]).await;
        Ok(())
    }

    async fn manifest_by_digest(
        &self,
        target: &Target,
        digest: &Digest,
        accept: AcceptSet,
    ) -> Result<Manifest, MirrorError> {
        if let Some(stored) = self.store.read_manifest(digest).await {
            if accept.accepts(&stored.media_type) {
                if !self.knows(target, digest).await {
                    self.confirm_with_upstream(target, "manifests", digest, Some(accept))
                        .await?;
                }
                self.metrics.cache_lookup("manifest", "hit");
                return Ok(Manifest {
                    digest: digest.clone(),
                    media_type: stored.media_type,
                    bytes: stored.bytes,
                    stale: false,
                    cached: true,
                });
            }
        }
        self.metrics.cache_lookup("manifest", "miss");
        let fetched = self
            .fetch_manifest(target, &digest.to_string(), accept)
            .await?;
        if fetched.digest != *digest {
            return Err(MirrorError::BadContent {
                registry: target.registry.upstream.name().to_owned(),
                digest: digest.to_string(),
                reason: format!("the manifest hashes to {}", fetched.digest),
            });
        }
        Ok(fetched)
    }

    async fn manifest_by_tag(
        &self,
        target: &Target,
        tag: &str,
        accept: AcceptSet,
    ) -> Result<Manifest, MirrorError> {
        let upstream = &target.registry.upstream;
        let key = Tags::key(upstream.name(), target.repo.as_str(), tag, &accept.key());
        let cached = match self.tags.get(&key).await {
            Some(entry) => self
                .stored_for_tag(&entry)
                .await
                .map(|manifest| (entry, manifest)),
            None => None,
        };
        if let Some((entry, manifest)) = &cached {
            if entry.age() < target.registry.tags_ttl {
                self.metrics.cache_lookup("tag", "hit");
                return Ok(manifest.clone());
            }
        }
        // The slow path runs once per tag key at a time; concurrent requests share its answer, so
        // a burst of cold pulls costs the upstream (and a Docker Hub rate limit) one request.
        self.tag_refreshes
            .run(key.clone(), || {
                self.refresh_tag(target, tag, accept, &key, cached)
            })
            .await
            .value
    }

    /// A tag that is not cached, or cached past its TTL: fetch it, or revalidate it with a HEAD.
    async fn refresh_tag(
        &self,
        target: &Target,
        tag: &str,
        accept: AcceptSet,
        key: &str,
        cached: Option<(TagEntry, Manifest)>,
    ) -> Result<Manifest, MirrorError> {
        let Some((entry, manifest)) = cached else {
            self.metrics.cache_lookup("tag", "miss");
            return match self.fetch_manifest(target, tag, accept).await {
                Ok(manifest) => {
                    self.remember_tag(target, tag, key, &manifest).await;
                    Ok(manifest)
                }
                Err(error) if serves_stale(&error) => {
                    match self.any_cached_answer(target, tag, accept).await {
                        Some(manifest) => Ok(self.stale(manifest, &error)),
                        None => Err(error),
                    }
                }
                Err(error) => Err(error),
            };
        };
        // Past the TTL: a HEAD (free against Docker Hub's pull limit) tells whether the tag moved.
        match self.head_manifest(target, tag, accept).await {
            Ok(Some(current)) if current == manifest.digest => {
                self.metrics
                    .tag_revalidations
                    .with_label_values(&["unchanged"])
                    .inc();
                self.metrics.cache_lookup("tag", "hit");
                self.tags.put(key, &entry.confirmed_now()).await;
                Ok(manifest)
            }
            Ok(_) => {
                self.metrics
                    .tag_revalidations
                    .with_label_values(&["changed"])
                    .inc();
                self.metrics.cache_lookup("tag", "miss");
                let fresh = self.fetch_manifest(target, tag, accept).await;
                match fresh {
                    Ok(fresh) => {
                        self.remember_tag(target, tag, key, &fresh).await;
                        Ok(fresh)
                    }
                    Err(error) if serves_stale(&error) => Ok(self.stale(manifest, &error)),
                    Err(error) => Err(error),
                }
            }
            Err(error) if serves_stale(&error) => {
                self.metrics
                    .tag_revalidations
                    .with_label_values(&["failed"])
                    .inc();
                Ok(self.stale(manifest, &error))
            }
            Err(error) => Err(error),
        }
    }

    /// Records what a tag names for this Accept set, and as the tag's latest answer for any.
    async fn remember_tag(&self, target: &Target, tag: &str, key: &str, manifest: &Manifest) {
        let entry = TagEntry::new(manifest.digest.to_string(), manifest.media_type.clone());
        self.tags.put(key, &entry).await;
        let any = Tags::any_key(target.registry.upstream.name(), target.repo.as_str(), tag);
        self.tags.put(&any, &entry).await;
    }

    /// During an outage, a client whose Accept set never asked for this tag can still be served
    /// what another client got, if it accepts that media type.
    async fn any_cached_answer(
        &self,
        target: &Target,
        tag: &str,
        accept: AcceptSet,
    ) -> Option<Manifest> {
        let any = Tags::any_key(target.registry.upstream.name(), target.repo.as_str(), tag);
        let entry = self.tags.get(&any).await?;
        if !accept.accepts(&entry.media_type) {
            return None;
        }
        self.stored_for_tag(&entry).await
    }

    fn stale(&self, mut manifest: Manifest, error: &MirrorError) -> Manifest {
        tracing::warn!(%error, digest = %manifest.digest, "upstream failed; serving the cached tag");
        self.metrics.cache_lookup("tag", "stale");
        manifest.stale = true;
        manifest
    }

    /// The manifest a tag entry names: from the store, else shared by another replica through
    /// Redis (verified against its digest, then stored).
    async fn stored_for_tag(&self, entry: &TagEntry) -> Option<Manifest> {
        let digest = Digest::parse(&entry.digest).ok()?;
        if let Some(stored) = self.store.read_manifest(&digest).await {
            return Some(Manifest {
                digest,
                media_type: stored.media_type,
                bytes: stored.bytes,
                stale: false,
                cached: true,
            });
        }
        let (media_type, bytes) = self.tags.shared_manifest(&entry.digest).await?;
        let bytes = Bytes::from(bytes);
        // write_manifest refuses bytes that do not hash to the digest.
        if let Err(error) = self
            .store
            .write_manifest(&digest, &media_type, bytes.clone())
            .await
        {
            tracing::warn!(%digest, %error, "ignoring a shared manifest that cannot be stored");
            return None;
        }
        Some(Manifest {
            digest,
            media_type,
            bytes,
            stale: false,
            cached: true,
        })
    }

    /// `Ok(Some(digest))` from the upstream's `Docker-Content-Digest`, `Ok(None)` if it sent none.
    async fn head_manifest(
        &self,
        target: &Target,
        reference: &str,
        accept: AcceptSet,
    ) -> Result<Option<Digest>, MirrorError> {
        let request = manifest_request(Method::HEAD, target, reference, accept);
        let response = send_ok(&target.registry.upstream, &request, |s| s.is_success()).await?;
        Ok(response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok()))
    }

    /// GETs a manifest, verifies it and stores it.
    async fn fetch_manifest(
        &self,
        target: &Target,
        reference: &str,
        accept: AcceptSet,
    ) -> Result<Manifest, MirrorError> {
        let upstream = &target.registry.upstream;
        let request = manifest_request(Method::GET, target, reference, accept);
        let response = send_ok(upstream, &request, |s| s == StatusCode::OK).await?;
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect_limited(self.max_manifest_size)
            .await
            .map_err(|e| upstream_failure(upstream, e))?;
        let bad = |reason: String| MirrorError::BadContent {
            registry: upstream.name().to_owned(),
            digest: reference.to_owned(),
            reason,
        };
        let media_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|v| !v.is_empty() && !v.contains('\n'))
            .ok_or_else(|| bad("the manifest has no Content-Type".into()))?;
        // The digest is over the exact bytes; the upstream's header, if any, must agree with them.
        let claimed = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let algorithm = claimed
            .as_ref()
            .map_or(crate::oci::Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(algorithm, &bytes);
        if let Some(claimed) = claimed {
            if claimed != digest {
                return Err(bad(format!(
                    "Docker-Content-Digest says {claimed}, the bytes hash to {digest}"
                )));
            }
        }
        if !accept.accepts(&media_type) {
            return Err(bad(format!(
                "the upstream answered {media_type}, which the client did not ask for"
            )));
        }
        self.store
            .write_manifest(&digest, &media_type, bytes.clone())
            .await
            .map_err(|e| MirrorError::Store(Arc::new(e)))?;
        self.tags
            .share_manifest(&digest.to_string(), &media_type, &bytes)
            .await;
        Ok(Manifest {
            digest,
            media_type,
            bytes,
            stale: false,
            cached: false,
        })
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
            let running = self
                .flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(digest)
                .cloned();
            if let Some(flight) = running {
                if !flight.asked_under(&repository_key(target)) {
                    self.ensure_known(target, digest).await?;
                }
                let size = flight.started().await?;
                return Ok(BlobSource::Downloading {
                    flight,
                    size,
                    first: None,
                });
            }
            let request = UpstreamRequest::new(
                Method::HEAD,
                target.repo.as_str(),
                format!("/v2/{}/blobs/{digest}", target.repo),
            );
            let response = upstream
                .send(&request)
                .await
                .map_err(|e| upstream_failure(upstream, e))?;
            if response.status() != StatusCode::OK {
                return Err(status_error(upstream, response).await);
            }
            let size = response
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            self.link_if_new(target, digest).await;
            return Ok(BlobSource::Upstream { size });
        }
        let (flight, first) = self.join_or_start(upstream, &target.repo, digest);
        // A download started under another repository proves nothing about this one.
        if first.is_none() && !flight.asked_under(&repository_key(target)) {
            self.ensure_known(target, digest).await?;
        }
        let size = flight.started().await?;
        if first.is_some() {
            // The upstream answered this repository's GET: it references the blob.
            self.link_if_new(target, digest).await;
        }
        Ok(BlobSource::Downloading {
            flight,
            size,
            first,
        })
    }

    /// Tag lists and referrers: passed through with the client's query, cached for the
    /// registry's tag TTL, and served stale when the upstream fails.
    pub async fn listing(
        &self,
        target: &Target,
        path_suffix: &str,
        query: Option<&str>,
    ) -> Result<Passthrough, MirrorError> {
        let upstream = &target.registry.upstream;
        let mut path = format!("/v2/{}/{path_suffix}", target.repo);
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            path.push('?');
            path.push_str(query);
        }
        let key = format!("{}{path}", upstream.name());
        let cached = self.listings.get(&key).await;
        if let Some((fetched, listing)) = &cached {
            if fetched.elapsed() < target.registry.tags_ttl {
                self.metrics.cache_lookup("listing", "hit");
                return Ok(listing.clone());
            }
        }
        match self.fetch_listing(upstream, target, path).await {
            Ok(listing) => {
                self.metrics.cache_lookup("listing", "miss");
                self.listings
                    .insert(key, (Instant::now(), listing.clone()))
                    .await;
                Ok(listing)
            }
            Err(error) if serves_stale(&error) && cached.is_some() => {
                tracing::warn!(%error, %key, "upstream failed; serving the cached listing");
                self.metrics.cache_lookup("listing", "stale");
                let (_, mut listing) = cached.expect("checked above");
                listing.headers.insert(
                    http::header::WARNING,
                    HeaderValue::from_static(STALE_WARNING),
                );
                Ok(listing)
            }
            Err(error) => Err(error),
        }
    }

    async fn fetch_listing(
        &self,
        upstream: &Upstream,
        target: &Target,
        path: String,
    ) -> Result<Passthrough, MirrorError> {
        let request = UpstreamRequest::new(Method::GET, target.repo.as_str(), path);
        let response = send_ok(upstream, &request, |s| s.is_success()).await?;
        let status = response.status();
        let mut headers = HeaderMap::new();
        for name in [CONTENT_TYPE, http::header::LINK] {
            if let Some(value) = response.headers().get(&name) {
                headers.insert(name, value.clone());
            }
        }
        if let Some(value) = response.headers().get("oci-filters-applied") {
            headers.insert("oci-filters-applied", value.clone());
        }
        let body = response
            .into_body()
            .collect_limited(MAX_LISTING)
            .await
            .map_err(|e| upstream_failure(upstream, e))?;
        Ok(Passthrough {
            status,
            headers,
            body,
        })
    }
}

/// RFC 7234's "Response is Stale", on answers served past their TTL because the upstream failed.
pub const STALE_WARNING: &str = "110 gantry \"Response is Stale\"";

fn manifest_request(
    method: Method,
    target: &Target,
    reference: &str,
    accept: AcceptSet,
) -> UpstreamRequest {
    repository_request(method, target, "manifests", reference, Some(accept))
}

/// `<registry>/<repository>`, the name links are recorded under.
fn repository_key(target: &Target) -> String {
    format!("{}/{}", target.registry.upstream.name(), target.repo)
}

/// Failures of the upstream (not of the request) allow a cached tag to be served past its TTL.
fn serves_stale(error: &MirrorError) -> bool {
    match error {
        MirrorError::Unavailable { .. }
        | MirrorError::DownloadTimeout { .. }
        | MirrorError::BadContent { .. } => true,
        MirrorError::UpstreamStatus { status, .. } => {
            status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
        }
        MirrorError::Request(_)
        | MirrorError::Store(_)
        | MirrorError::Internal(_)
        | MirrorError::Overloaded { .. } => false,
    }
}
