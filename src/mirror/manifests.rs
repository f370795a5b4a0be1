//! The manifest path: by digest from the store, by tag through the tag cache and its TTL, and
//! upstream only when the caches cannot answer. Tags are the one mutable thing a registry serves,
//! so this is where the freshness policy lives: fresh inside the TTL, revalidated with a `HEAD`
//! after it, coalesced per tag key, and served stale when the upstream (not the request) fails.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Method, StatusCode};

use super::scope::MAX_LINKS_PER_MANIFEST;
use super::send::{repository_request, send_ok, upstream_failure};
use super::{Mirror, MirrorError, Target};
use crate::oci::manifest::{encode_stored, split_stored, ManifestDoc};
use crate::oci::{AcceptSet, Digest, ErrorCode, OciError, Reference};
use crate::store::StoredManifest;
use crate::tags::{Negatives, TagEntry, Tags};
use crate::upstream::{UpstreamError, UpstreamRequest};

/// Manifest uploads to the object tier running at once, at most.
pub(super) const MANIFEST_UPLOADS: usize = 8;

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

impl Manifest {
    /// A manifest the caches answered with (the store, or another replica through Redis), fresh.
    fn from_stored(digest: Digest, stored: StoredManifest) -> Self {
        Self {
            digest,
            media_type: stored.media_type,
            bytes: stored.bytes,
            stale: false,
            cached: true,
        }
    }
}

impl Mirror {
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

    async fn manifest_by_digest(
        &self,
        target: &Target,
        digest: &Digest,
        accept: AcceptSet,
    ) -> Result<Manifest, MirrorError> {
        if let Some(stored) = self.stored_manifest(digest).await {
            if accept.accepts(&stored.media_type) {
                if !self.knows(target, digest).await {
                    self.confirm_with_upstream(target, "manifests", digest, Some(accept))
                        .await?;
                }
                self.metrics.cache_lookup("manifest", "hit");
                return Ok(Manifest::from_stored(digest.clone(), stored));
            }
        }
        self.metrics.cache_lookup("manifest", "miss");
        let negative = digest_negative_key(target, digest);
        if let Some(not_found) = self.negative_hit(target, &negative, "digest") {
            return Err(not_found);
        }
        let fetched = self
            .fetch_manifest(target, &digest.to_string(), accept)
            .await;
        self.remember_not_found(target, negative, &fetched);
        let fetched = fetched?;
        if fetched.digest != *digest {
            return Err(MirrorError::BadContent {
                registry: target.registry.upstream.name().to_owned(),
                digest: digest.to_string(),
                reason: format!("the manifest hashes to {}", fetched.digest),
            });
        }
        Ok(fetched)
    }

    /// A tag for a client accepting `accept`. Its shared entry answers when the client names the
    /// type it holds (or, for a client taking every index and manifest type, when there is none
    /// yet): one upstream request per tag per TTL, whatever the mix of clients. A client the
    /// shared entry does not suit goes upstream with its own Accept, under its own key.
    async fn manifest_by_tag(
        &self,
        target: &Target,
        tag: &str,
        accept: AcceptSet,
    ) -> Result<Manifest, MirrorError> {
        let upstream = &target.registry.upstream;
        let shared_key = Tags::shared_key(upstream.name(), target.repo.as_str(), tag);
        let shared = self.cached_tag(target, tag, &shared_key).await;
        let suits = match &shared {
            Some((_, manifest)) => accept.names(&manifest.media_type),
            None => accept.is_full(),
        };
        if upstream.is_offline() {
            // Never asked, so the shared entry (if this client takes its type) or this client's
            // own, whatever their age.
            let cached = match shared.filter(|(_, manifest)| accept.names(&manifest.media_type)) {
                Some((_, manifest)) => Some(manifest),
                None => {
                    let key = Tags::key(upstream.name(), target.repo.as_str(), tag, &accept.key());
                    self.cached_tag(target, tag, &key)
                        .await
                        .map(|(_, manifest)| manifest)
                }
            };
            return self.offline_tag(target, tag, accept, cached).await;
        }
        if suits {
            match self
                .tag_through(target, tag, AcceptSet::every(), shared_key, shared)
                .await
            {
                // The tag now names a type this client excludes (it moved, or the upstream
                // answered the canonical Accept with schema 1): it asks for itself below.
                Ok(manifest) if !accept.names(&manifest.media_type) => {}
                answer => return answer,
            }
        }
        let key = Tags::key(upstream.name(), target.repo.as_str(), tag, &accept.key());
        let cached = self.cached_tag(target, tag, &key).await;
        self.tag_through(target, tag, accept, key, cached).await
    }

    /// What the tag cache holds under `key`, with the manifest it names.
    async fn cached_tag(
        &self,
        target: &Target,
        tag: &str,
        key: &str,
    ) -> Option<(TagEntry, Manifest)> {
        let (entry, from_redis) = self.tags.lookup(key).await?;
        let manifest = self.stored_for_tag(&entry).await?;
        if from_redis {
            // Learned from another replica: this one's catalogue (its `gantry ls`, purge and
            // pin) names the tag too.
            self.store.catalogue().record_tag(
                target.registry.upstream.name(),
                target.repo.as_str(),
                tag,
                &manifest.digest,
                &manifest.media_type,
            );
        }
        Some((entry, manifest))
    }

    /// The cached answer under `key` inside the tag's TTL, else the upstream's (asked with
    /// `accept`), or the cached one served stale when the upstream fails.
    async fn tag_through(
        &self,
        target: &Target,
        tag: &str,
        accept: AcceptSet,
        key: String,
        cached: Option<(TagEntry, Manifest)>,
    ) -> Result<Manifest, MirrorError> {
        if let Some((entry, manifest)) = &cached {
            if target.registry.tag_ttl(tag).fresh(entry.age()) {
                self.metrics.cache_lookup("tag", "hit");
                return Ok(manifest.clone());
            }
        }
        let upstream = &target.registry.upstream;
        let negative = Negatives::key(upstream.name(), target.repo.as_str(), tag, &accept.key());
        if let Some(not_found) = self.negative_hit(target, &negative, "tag") {
            return Err(not_found);
        }
        // The slow path runs once per tag key at a time; concurrent requests share its answer, so
        // a burst of cold pulls costs the upstream (and a Docker Hub rate limit) one request.
        let answer = self
            .tag_refreshes
            .run(key.clone(), || {
                self.refresh_tag(target, tag, accept, &key, cached, Stale::Serve)
            })
            .await
            .value;
        self.remember_not_found(target, negative, &answer);
        answer
    }

    /// The upstream's 404 again, if it answered one for `key` inside the negative TTL.
    fn negative_hit(&self, target: &Target, key: &str, kind: &str) -> Option<MirrorError> {
        let not_found = self.negatives.get(key)?;
        self.metrics
            .negative_cache_hits
            .with_label_values(&[kind])
            .inc();
        Some(MirrorError::UpstreamStatus {
            registry: target.registry.upstream.name().to_owned(),
            status: StatusCode::NOT_FOUND,
            retry_after: None,
            body: not_found.body,
        })
    }

    /// Remembers an upstream 404 for the registry's `negative_ttl`. Only a 404: an outage, a
    /// 429 or a 5xx says nothing about whether the manifest exists.
    fn remember_not_found<T>(&self, target: &Target, key: String, answer: &Result<T, MirrorError>) {
        if let Err(MirrorError::UpstreamStatus { status, body, .. }) = answer {
            if *status == StatusCode::NOT_FOUND {
                self.negatives
                    .put(key, body.clone(), self.negative_ttl(target));
            }
        }
    }

    fn negative_ttl(&self, target: &Target) -> std::time::Duration {
        self.negative_ttls
            .get(target.registry.upstream.name())
            .copied()
            .unwrap_or(self.default_negative_ttl)
    }

    /// Forgets the upstream's 404 for a manifest by digest, so the next request asks again.
    pub fn forget_negative_digest(&self, registry: &str, repository: &str, digest: &Digest) {
        self.negatives.remove(&[Negatives::key(
            registry,
            repository,
            &digest.to_string(),
            DIGEST_NEGATIVE,
        )]);
    }

    /// Drops every cached answer for a tag, here and in Redis, so the next request for it goes
    /// upstream. `registry` is the upstream's name (`Upstream::name`), `repository` normalized.
    pub async fn forget_tag(&self, registry: &str, repository: &str, tag: &str) {
        self.tags
            .remove(&Tags::keys_of(registry, repository, tag))
            .await;
        self.negatives
            .remove(&Negatives::keys_of_tag(registry, repository, tag));
    }

    /// [`Self::forget_tag`] in this process only: for a purge another replica announced after
    /// clearing Redis itself.
    pub fn forget_tag_locally(&self, registry: &str, repository: &str, tag: &str) {
        self.tags
            .remove_locally(&Tags::keys_of(registry, repository, tag));
        self.negatives
            .remove(&Negatives::keys_of_tag(registry, repository, tag));
    }

    /// Revalidates a tag's shared entry with the upstream now, whatever its TTL (`forever`
    /// included), and updates the caches as an expired entry's revalidation does; returns the
    /// digest it names for a client accepting every manifest type. An upstream failure is an
    /// error here, never a stale answer (the operator asked for the upstream's word); an
    /// upstream 404 also drops the tag's cache.
    pub async fn refresh_tag_now(&self, target: &Target, tag: &str) -> Result<Digest, MirrorError> {
        let accept = AcceptSet::every();
        let registry = target.registry.upstream.name();
        let key = Tags::shared_key(registry, target.repo.as_str(), tag);
        let cached = match self.tags.get(&key).await {
            Some(entry) => self
                .stored_for_tag(&entry)
                .await
                .map(|manifest| (entry, manifest)),
            None => None,
        };
        // Its own flight: joining a request's would hand back a stale answer on a failure.
        let refreshed = self
            .tag_refreshes
            .run(format!("refresh:{key}"), || {
                self.refresh_tag(target, tag, accept, &key, cached, Stale::Fail)
            })
            .await
            .value;
        match refreshed {
            Ok(manifest) => {
                // What other Accept sets were answered was not revalidated: dropped, each is
                // fetched again on its next request rather than served from before the refresh.
                let any = Tags::any_key(registry, target.repo.as_str(), tag);
                let others: Vec<String> = Tags::keys_of(registry, target.repo.as_str(), tag)
                    .into_iter()
                    .filter(|other| *other != key && *other != any)
                    .collect();
                self.tags.remove(&others).await;
                self.negatives
                    .remove(&Negatives::keys_of_tag(registry, target.repo.as_str(), tag));
                self.link_manifest(target, &manifest).await;
                Ok(manifest.digest)
            }
            Err(error) => {
                if is_not_found(&error) {
                    self.forget_tag(registry, target.repo.as_str(), tag).await;
                }
                Err(error)
            }
        }
    }

    /// A tag that is not cached, or cached past its TTL: fetch it, or revalidate it with a HEAD.
    async fn refresh_tag(
        &self,
        target: &Target,
        tag: &str,
        accept: AcceptSet,
        key: &str,
        cached: Option<(TagEntry, Manifest)>,
        stale: Stale,
    ) -> Result<Manifest, MirrorError> {
        let Some((entry, manifest)) = cached else {
            self.metrics.cache_lookup("tag", "miss");
            return match self.fetch_manifest(target, tag, accept).await {
                Ok(manifest) => {
                    self.remember_tag(target, tag, key, &manifest).await;
                    Ok(manifest)
                }
                Err(error) if stale.allowed(&error) => {
                    match self.any_cached_answer(target, tag, accept).await {
                        Some(manifest) => Ok(self.stale(manifest, &error)),
                        None => Err(error),
                    }
                }
                Err(error) => Err(error),
            };
        };
        if matches!(stale, Stale::Serve) && self.spare_revalidation(target) {
            self.metrics.cache_lookup("tag", "stale");
            return Ok(Manifest {
                stale: true,
                ..manifest
            });
        }
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
                    Err(error) if stale.allowed(&error) => Ok(self.stale(manifest, &error)),
                    Err(error) => Err(error),
                }
            }
            Err(error) if stale.allowed(&error) => {
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
        let registry = target.registry.upstream.name();
        let any = Tags::any_key(registry, target.repo.as_str(), tag);
        self.tags.put(&any, &entry).await;
        self.store.catalogue().record_tag(
            registry,
            target.repo.as_str(),
            tag,
            &manifest.digest,
            &manifest.media_type,
        );
    }

    /// Records a manifest just stored, and what it references, in the store's catalogue.
    fn catalogue_manifest(&self, digest: &Digest, media_type: &str, bytes: &[u8]) {
        let references = ManifestDoc::parse(bytes)
            .map(|doc| doc.references(MAX_LINKS_PER_MANIFEST))
            .unwrap_or_default();
        self.store
            .catalogue()
            .record_manifest(digest, media_type, bytes.len() as u64, &references);
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
            return Some(Manifest::from_stored(digest, stored));
        }
        let Some((media_type, bytes)) = self.tags.shared_manifest(&entry.digest).await else {
            return self
                .tier_manifest(&digest)
                .await
                .map(|stored| Manifest::from_stored(digest, stored));
        };
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
        self.catalogue_manifest(&digest, &media_type, &bytes);
        Some(Manifest::from_stored(
            digest,
            StoredManifest { media_type, bytes },
        ))
    }

    /// A manifest from the store, else from the object tier (then stored here).
    async fn stored_manifest(&self, digest: &Digest) -> Option<StoredManifest> {
        match self.store.read_manifest(digest).await {
            Some(stored) => Some(stored),
            None => self.tier_manifest(digest).await,
        }
    }

    /// A manifest the object tier holds, checked against its digest and stored on this disk.
    async fn tier_manifest(&self, digest: &Digest) -> Option<StoredManifest> {
        let tier = self.object_tier.as_ref()?;
        let raw = match tier.read_manifest(digest).await {
            Ok(found) => found?,
            Err(error) => {
                tracing::debug!(%digest, %error, "object tier manifest read failed; a miss");
                return None;
            }
        };
        let (media_type, start) = split_stored(&raw)?;
        let media_type = media_type.to_owned();
        let bytes = raw.slice(start..);
        // write_manifest refuses bytes that do not hash to the digest.
        if let Err(error) = self
            .store
            .write_manifest(digest, &media_type, bytes.clone())
            .await
        {
            tracing::warn!(%digest, %error, "ignoring an object tier manifest that cannot be stored");
            return None;
        }
        self.catalogue_manifest(digest, &media_type, &bytes);
        Some(StoredManifest { media_type, bytes })
    }

    /// Copies a manifest just fetched to the object tier, beside the request: at most
    /// [`MANIFEST_UPLOADS`] at once, more are dropped (the next replica to fetch it uploads it),
    /// each bounded by the tier's own timeouts.
    fn upload_manifest(&self, digest: &Digest, media_type: &str, bytes: &[u8]) {
        let Some(tier) = &self.object_tier else {
            return;
        };
        let Ok(permit) = Arc::clone(&self.manifest_uploads).try_acquire_owned() else {
            self.metrics.object_tier_uploads_dropped.inc();
            return;
        };
        let (tier, digest) = (Arc::clone(tier), digest.clone());
        let stored = Bytes::from(encode_stored(media_type, bytes));
        tokio::spawn(async move {
            if let Err(error) = tier.write_manifest(&digest, stored).await {
                tracing::debug!(%digest, %error, "manifest upload to the object tier failed");
            }
            drop(permit);
        });
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
        Ok(content_digest(response.headers()))
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
            .map_err(|e| match e {
                // A property of the content, not an outage: never retried, never served stale.
                UpstreamError::TooLarge { limit, .. } => MirrorError::Request(OciError::new(
                    ErrorCode::ManifestInvalid,
                    format!(
                        "{} sent a manifest of more than {limit} bytes (limits.max_manifest_size): \
                         gantry does not serve it",
                        upstream.name()
                    ),
                )),
                e => upstream_failure(upstream, e),
            })?;
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
        let claimed = content_digest(&headers);
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
        self.catalogue_manifest(&digest, &media_type, &bytes);
        self.upload_manifest(&digest, &media_type, &bytes);
        self.tags
            .share_manifest(&digest.to_string(), &media_type, &bytes)
            .await;
        self.prefetch(target, &digest, &bytes);
        Ok(Manifest {
            digest,
            media_type,
            bytes,
            stale: false,
            cached: false,
        })
    }
}

/// Where a digest's negative key has a tag's Accept set (a tag cannot contain a `:`).
const DIGEST_NEGATIVE: &str = "digest";

fn digest_negative_key(target: &Target, digest: &Digest) -> String {
    Negatives::key(
        target.registry.upstream.name(),
        target.repo.as_str(),
        &digest.to_string(),
        DIGEST_NEGATIVE,
    )
}

/// Whether a failed revalidation may answer with the cached manifest.
#[derive(Clone, Copy)]
enum Stale {
    /// A client's request: an upstream failure serves what is cached.
    Serve,
    /// An operator's refresh: it reports the failure.
    Fail,
}

impl Stale {
    fn allowed(self, error: &MirrorError) -> bool {
        matches!(self, Self::Serve) && error.serves_stale()
    }
}

/// The upstream's "no such manifest": a 404, whatever its OCI code (`MANIFEST_UNKNOWN`,
/// `NAME_UNKNOWN`, or none).
fn is_not_found(error: &MirrorError) -> bool {
    matches!(
        error,
        MirrorError::UpstreamStatus { status, .. } if *status == StatusCode::NOT_FOUND
    )
}

fn manifest_request(
    method: Method,
    target: &Target,
    reference: &str,
    accept: AcceptSet,
) -> UpstreamRequest {
    repository_request(method, target, "manifests", reference, Some(accept))
}

/// The upstream's `Docker-Content-Digest`, if it sent a readable one.
fn content_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok())
}
