//! The pull-through policy: answer from the cache when it can, go upstream when it must.
//!
//! This is the only module that decides *whether* to contact an upstream. Manifests by digest and
//! blobs are immutable: once verified and stored they are served without upstream contact. Tags
//! are mutable: inside the registry's `tags_cache_ttl` they are answered from the tag cache; after
//! it they are revalidated with a `HEAD`, and when the upstream fails the stale answer is served.

mod body;
mod coordinator;
mod download;
mod error;
mod fill;
mod hook;
mod origin;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};

pub use body::{Download, SourceBody};
pub use error::MirrorError;
pub use hook::{CommitHook, Committed};

use crate::config::{BaseUrl, Config, UpstreamAccess};
use crate::metrics::Metrics;
use crate::oci::host;
use crate::oci::manifest::ManifestDoc;
use crate::oci::{AcceptSet, Digest, ErrorCode, OciError, Reference, RepoName};
use crate::single_flight::SingleFlight;
use crate::store::{BlobFile, Store};
use crate::tags::{TagEntry, Tags};
use crate::upstream::{
    AddressPolicy, CredentialError, CredentialSource, Pool, Upstream, UpstreamBody, UpstreamError,
    UpstreamRequest,
};

/// Upstream error bodies are read for their OCI code; anything larger is not an error document.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Tag lists and referrers indexes are passed through whole, so they are capped.
const MAX_LISTING: usize = 4 << 20;

/// References of one manifest linked to its repository, at most; content past them is checked
/// with the upstream when asked for (a manifest of 8 MiB could otherwise list ~50,000).
const MAX_LINKS_PER_MANIFEST: usize = 1_000;

/// Registries created on demand under `allow_any_registry`, at most.
const MAX_ANY_REGISTRIES: usize = 1_000;
/// Cached tag lists and referrers indexes (each at most `MAX_LISTING` bytes, most far smaller).
const MAX_LISTINGS: u64 = 10_000;

/// Host names under which Docker Hub is known to clients (`ns=docker.io`, `/v2/docker.io/...`).
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "registry-1.docker.io", "index.docker.io"];

/// One upstream registry and its policy.
pub struct Registry {
    pub upstream: Arc<Upstream>,
    pub tags_ttl: Duration,
    /// Docker Hub puts single-component names under `library/`.
    pub docker_hub: bool,
}

/// A request's repository, resolved to the registry that serves it.
#[derive(Clone)]
pub struct Target {
    pub registry: Arc<Registry>,
    pub repo: RepoName,
}

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
    default_registry: Arc<Registry>,
    /// Every registry by each host name clients may use for it.
    by_host: HashMap<String, Arc<Registry>>,
    any_registry: Option<AnyRegistry>,
    /// Blob downloads in progress, one per digest.
    coordinator: coordinator::LocalCoordinator,
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
    /// Told of every committed download (see `hook`); `None` costs the commit nothing.
    commit_hook: Option<CommitHook>,
}

impl Registry {
    fn new(
        name: String,
        access: &UpstreamAccess<'_>,
        tags_ttl: Duration,
        pool: &Pool,
    ) -> Result<Self, CredentialError> {
        let docker_hub = is_docker_hub(access.url);
        let credentials = CredentialSource::from_access(access, &name, docker_hub)?;
        let realms = access
            .token_realms
            .iter()
            .map(|r| (*r).to_owned())
            .collect();
        Ok(Self {
            upstream: Arc::new(Upstream::new(
                name,
                access.url.clone(),
                credentials,
                realms,
                pool.clone(),
            )),
            tags_ttl,
            docker_hub,
        })
    }
}

/// Registries created on demand under `allow_any_registry`.
struct AnyRegistry {
    pool: Pool,
    tags_ttl: Duration,
    seen: Mutex<HashMap<String, Arc<Registry>>>,
}

impl Mirror {
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        tags: Tags,
        pool: Pool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CredentialError> {
        let source = &config.mirroring.source;
        let docker_hub = is_docker_hub(source);
        let default_name = if docker_hub {
            "docker.io".to_owned()
        } else {
            source.authority().to_owned()
        };
        let default_registry = Arc::new(Registry::new(
            default_name.clone(),
            &config.mirroring.access(),
            config.mirroring.tags_cache_ttl.0,
            &pool,
        )?);
        // `mirroring.source` is what this mirror serves as Docker Hub (dockerd's `registry-mirrors`
        // and containerd's `ns=docker.io` mean exactly that), whatever its URL.
        let mut by_host = HashMap::new();
        by_host.insert(default_name, Arc::clone(&default_registry));
        by_host.insert(source.authority().to_owned(), Arc::clone(&default_registry));
        for alias in DOCKER_HUB_ALIASES {
            by_host.insert(alias.to_owned(), Arc::clone(&default_registry));
        }
        for (index, entry) in config.registries.iter().enumerate() {
            let host = entry.host.0.to_ascii_lowercase();
            let ttl = entry
                .tags_cache_ttl
                .unwrap_or(config.mirroring.tags_cache_ttl)
                .0;
            let registry = Registry::new(host.clone(), &entry.access(index), ttl, &pool)?;
            by_host.insert(host, Arc::new(registry));
        }
        Ok(Self {
            store,
            tags,
            default_registry,
            by_host,
            any_registry: config.allow_any_registry.then(|| AnyRegistry {
                // Hosts named by clients reach only public addresses, or the ranges allowed.
                pool: pool.checked(AddressPolicy {
                    allowed: config.allow_any_registry_networks.clone(),
                }),
                tags_ttl: config.mirroring.tags_cache_ttl.0,
                seen: Mutex::new(HashMap::new()),
            }),
            coordinator: coordinator::LocalCoordinator::default(),
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
            commit_hook: None,
        })
    }

    /// The registry for a host name clients used, creating an anonymous https one when
    /// `allow_any_registry` is on.
    /// `Some(Err(reason))` for a host a client named that gantry will not dial.
    fn registry_for(&self, host: &str) -> Option<Result<Arc<Registry>, String>> {
        let host = host.to_ascii_lowercase();
        if let Some(registry) = self.by_host.get(&host) {
            return Some(Ok(Arc::clone(registry)));
        }
        let any = self.any_registry.as_ref()?;
        if let Err(reason) = dialable_host(&host) {
            return Some(Err(reason));
        }
        let mut seen = any.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(registry) = seen.get(&host) {
            return Some(Ok(Arc::clone(registry)));
        }
        if seen.len() >= MAX_ANY_REGISTRIES {
            tracing::warn!(%host, "allow_any_registry: too many registries already; refusing a new one");
            return None;
        }
        let url = BaseUrl::parse(&format!("https://{host}")).ok()?;
        let registry = Arc::new(Registry {
            upstream: Arc::new(Upstream::new(
                host.clone(),
                url.clone(),
                CredentialSource::None,
                Vec::new(),
                any.pool.clone(),
            )),
            tags_ttl: any.tags_ttl,
            docker_hub: is_docker_hub(&url),
        });
        seen.insert(host, Arc::clone(&registry));
        Some(Ok(registry))
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
        let unknown = |host: &str| {
            OciError::new(
                ErrorCode::NameUnknown,
                format!("registry {host} is not mirrored here"),
            )
        };
        let registry_named = |host: &str| match self.registry_for(host) {
            Some(Ok(registry)) => Ok(registry),
            Some(Err(reason)) => Err(OciError::new(ErrorCode::Denied, reason)),
            None => Err(unknown(host)),
        };
        let (registry, repo) = if let Some(ns) = ns {
            if !host::looks_like_host(ns) {
                return Err(unknown(ns).into());
            }
            (registry_named(ns)?, name)
        } else {
            match name.split_once('/') {
                Some((first, rest)) if host::looks_like_host(first) => {
                    (registry_named(first)?, rest)
                }
                _ => (Arc::clone(&self.default_registry), name),
            }
        };
        let mut repo = RepoName::parse(repo)?;
        if registry.docker_hub {
            repo = repo.with_library_prefix();
        }
        Ok(Target { registry, repo })
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
        let upstream = &target.registry.upstream;
        let mut request = UpstreamRequest::new(
            Method::HEAD,
            target.repo.as_str(),
            format!("/v2/{}/{kind}/{digest}", target.repo),
        );
        if let Some(accept) = accept.filter(|a| !a.is_empty()) {
            request.accept = HeaderValue::from_str(&accept.header_value()).ok();
        }
        let checks = &self.metrics.repository_checks;
        let response = match upstream.send(&request).await {
            Ok(response) => response,
            Err(error) => {
                checks.with_label_values(&["failed"]).inc();
                return Err(upstream_failure(upstream, error));
            }
        };
        if !response.status().is_success() {
            checks.with_label_values(&["refused"]).inc();
            return Err(status_error(upstream, response).await);
        }
        checks.with_label_values(&["linked"]).inc();
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
        let upstream = &target.registry.upstream;
        let response = upstream
            .send(&manifest_request(Method::HEAD, target, reference, accept))
            .await
            .map_err(|e| upstream_failure(upstream, e))?;
        if !response.status().is_success() {
            return Err(status_error(upstream, response).await);
        }
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
        let response = upstream
            .send(&manifest_request(Method::GET, target, reference, accept))
            .await
            .map_err(|e| upstream_failure(upstream, e))?;
        if response.status() != StatusCode::OK {
            return Err(status_error(upstream, response).await);
        }
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
            if let Some(flight) = self.coordinator.running(digest) {
                if !flight.asked_under(&repository_key(target)) {
                    self.ensure_known(target, digest).await?;
                }
                let size = flight.started().await?;
                return Ok(BlobSource::Downloading(Download::new(flight, size, None)));
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
        Ok(BlobSource::Downloading(Download::new(flight, size, first)))
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
        let response = upstream
            .send(&request)
            .await
            .map_err(|e| upstream_failure(upstream, e))?;
        if !response.status().is_success() {
            return Err(status_error(upstream, response).await);
        }
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
    let mut request = UpstreamRequest::new(
        method,
        target.repo.as_str(),
        format!("/v2/{}/manifests/{reference}", target.repo),
    );
    if !accept.is_empty() {
        request.accept = HeaderValue::from_str(&accept.header_value()).ok();
    }
    request
}

/// `<registry>/<repository>`, the name links are recorded under.
fn repository_key(target: &Target) -> String {
    format!("{}/{}", target.registry.upstream.name(), target.repo)
}

fn is_docker_hub(url: &BaseUrl) -> bool {
    host::is_docker_hub(url.host())
}

/// A host named by a client is dialed only as a DNS name or a dotted-quad IPv4 address. The other
/// IPv4 spellings getaddrinfo accepts (`127.1`, `2130706433`, `0x7f.1`, `0177.0.0.1`) all end
/// in a numeric label, which no DNS name does; refusing them keeps one reading of every host.
fn dialable_host(authority: &str) -> Result<(), String> {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let last = host.rsplit('.').next().unwrap_or(host);
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return Err(format!(
            "{host} is neither a host name nor a dotted-quad IPv4 address; gantry does not dial it"
        ));
    }
    Ok(())
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

pub(crate) fn upstream_failure(upstream: &Upstream, error: UpstreamError) -> MirrorError {
    // A host the client named that resolves to a forbidden address is the request's fault: a
    // clear 403, never a retryable 503 or a stale answer.
    if let UpstreamError::Refused { source, .. } = &error {
        return MirrorError::Request(OciError::new(ErrorCode::Denied, source.to_string()));
    }
    MirrorError::Unavailable {
        registry: upstream.name().to_owned(),
        source: Arc::new(error),
    }
}

/// Turns an upstream error response into a [`MirrorError`], keeping its OCI body if readable.
pub(crate) async fn status_error(
    upstream: &Upstream,
    response: Response<UpstreamBody>,
) -> MirrorError {
    let status = response.status();
    let retry_after = response.headers().get(RETRY_AFTER).cloned();
    let body = response
        .into_body()
        .collect_limited(MAX_ERROR_BODY)
        .await
        .ok();
    let body = body.filter(|b| {
        serde_json::from_slice::<serde_json::Value>(b).is_ok_and(|v| v.get("errors").is_some())
    });
    MirrorError::UpstreamStatus {
        registry: upstream.name().to_owned(),
        status,
        retry_after,
        body,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_one_spelling_of_an_address_is_dialed() {
        for host in [
            "ghcr.io",
            "127.0.0.1:5000",
            "localhost:5000",
            "my-registry.internal",
        ] {
            assert!(super::dialable_host(host).is_ok(), "{host}");
        }
        for host in [
            "127.1",
            "2130706433:80",
            "0x7f.1",
            "0177.0.0.1",
            "0x7f000001",
            "10.1",
        ] {
            assert!(super::dialable_host(host).is_err(), "{host}");
        }
    }
}
