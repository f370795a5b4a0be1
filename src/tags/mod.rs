//! The tag cache: tag → digest, in process (moka) and optionally shared across replicas (Redis).
//!
//! A tag has one shared entry for the clients that accept every index and manifest type (most
//! of them: see [`AcceptSet::is_full`]), which any client accepting its media type is answered
//! from, and entries per Accept set for the narrower clients it does not suit.
//!
//! Entries carry the time they were confirmed with the upstream; freshness against
//! `tags_cache_ttl` is the mirror's decision, so an entry past its TTL is still here to be served
//! stale when the upstream is down. A cache failure is only ever a miss.

mod negative;
mod redis_store;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use negative::{Negatives, NotFound};
pub use redis_store::RedisTags;

use crate::metrics::Metrics;
use crate::oci::{AcceptSet, MANIFEST_TYPES};

/// How long an entry is kept at all (to answer stale during an outage), whatever the TTL.
pub const RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// In-process entries; each is well under 1 KiB.
const MEMORY_CAPACITY: u64 = 100_000;
/// Manifests up to this size are shared through Redis with the tags that name them, so a tag
/// cached by one replica is a complete answer on another. Larger ones are fetched by digest.
pub const MAX_SHARED_MANIFEST: usize = 1 << 20;

/// Tag keys are versioned: v1 keyed every client by its Accept set and knew no shared entry, so
/// a v1 replica would neither find nor purge what a v2 one caches. Replicas of both versions on
/// one Redis keep separate tag caches instead of misreading each other's.
const KEY_PREFIX: &str = "gantry:tag:v2:";

/// Every Accept set a client can send (each subset of [`MANIFEST_TYPES`]), built through the
/// parser so the keys match the ones requests make.
fn every_accept_set() -> impl Iterator<Item = AcceptSet> {
    (0u32..1 << MANIFEST_TYPES.len()).map(|bits| {
        let mut headers = http::HeaderMap::new();
        for (index, media_type) in MANIFEST_TYPES.iter().enumerate() {
            if bits & (1 << index) != 0 {
                headers.append(
                    http::header::ACCEPT,
                    http::HeaderValue::from_static(media_type),
                );
            }
        }
        AcceptSet::from_headers(&headers)
    })
}

/// What a tag pointed at when last confirmed with the upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    pub digest: String,
    pub media_type: String,
    /// Unix milliseconds of the last confirmation by the upstream.
    pub confirmed_ms: u64,
}

impl TagEntry {
    pub fn new(digest: String, media_type: String) -> Self {
        Self {
            digest,
            media_type,
            confirmed_ms: now_ms(),
        }
    }

    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.confirmed_ms))
    }

    pub fn confirmed_now(mut self) -> Self {
        self.confirmed_ms = now_ms();
        self
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One level of the tag cache.
pub trait TagStore: Send + Sync {
    /// `Ok(None)` is a miss; `Err` is a cache failure, which callers also treat as a miss.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<TagEntry>, TagError>> + Send;
    fn put(&self, key: &str, entry: &TagEntry)
        -> impl Future<Output = Result<(), TagError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum TagError {
    #[error(transparent)]
    Redis(#[from] crate::redis::Error),
    #[error("unreadable cache entry: {0}")]
    Decode(#[from] serde_json::Error),
}

/// The in-process level, always on. moka's sync cache, so a purge announced by another replica
/// can be applied without an executor.
pub struct MemoryTags {
    cache: moka::sync::Cache<String, TagEntry>,
}

impl MemoryTags {
    pub fn new() -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(MEMORY_CAPACITY)
                .time_to_live(RETENTION)
                .build(),
        }
    }
}

impl Default for MemoryTags {
    fn default() -> Self {
        Self::new()
    }
}

impl TagStore for MemoryTags {
    async fn get(&self, key: &str) -> Result<Option<TagEntry>, TagError> {
        Ok(self.cache.get(key))
    }

    async fn put(&self, key: &str, entry: &TagEntry) -> Result<(), TagError> {
        self.cache.insert(key.to_owned(), entry.clone());
        Ok(())
    }
}

impl MemoryTags {
    pub fn remove(&self, keys: &[String]) {
        for key in keys {
            self.cache.invalidate(key);
        }
    }
}

/// Memory first, Redis second (backfilling memory on a Redis hit).
pub struct Tags {
    memory: MemoryTags,
    shared: Option<RedisTags>,
    metrics: std::sync::Arc<Metrics>,
}

impl Tags {
    pub fn new(shared: Option<RedisTags>, metrics: std::sync::Arc<Metrics>) -> Self {
        Self {
            memory: MemoryTags::new(),
            shared,
            metrics,
        }
    }

    /// The key for a tag on a registry, for clients accepting a given set of manifest types that
    /// the tag's shared entry does not suit.
    pub fn key(registry: &str, repository: &str, tag: &str, accept: &str) -> String {
        format!("{KEY_PREFIX}{registry}/{repository}:{tag}:{accept}")
    }

    /// The key of a tag's shared entry: the upstream's answer to [`AcceptSet::every`], served to
    /// every client that accepts its media type.
    pub fn shared_key(registry: &str, repository: &str, tag: &str) -> String {
        format!("{KEY_PREFIX}{registry}/{repository}:{tag}:shared")
    }

    /// The key for a tag's latest answer to any client, the fallback during an outage.
    pub fn any_key(registry: &str, repository: &str, tag: &str) -> String {
        format!("{KEY_PREFIX}{registry}/{repository}:{tag}:any")
    }

    /// Every key a tag can be cached under: the shared entry's, each Accept set's, and the `any`
    /// fallback.
    pub fn keys_of(registry: &str, repository: &str, tag: &str) -> Vec<String> {
        let mut keys = vec![Self::shared_key(registry, repository, tag)];
        keys.extend(
            every_accept_set().map(|accept| Self::key(registry, repository, tag, &accept.key())),
        );
        keys.push(Self::any_key(registry, repository, tag));
        keys
    }

    pub async fn get(&self, key: &str) -> Option<TagEntry> {
        self.lookup(key).await.map(|(entry, _)| entry)
    }

    /// [`Tags::get`], also telling whether the entry came from Redis (another replica learned
    /// it), so the caller can record what this replica has not seen itself.
    pub async fn lookup(&self, key: &str) -> Option<(TagEntry, bool)> {
        if let Ok(Some(entry)) = self.memory.get(key).await {
            return Some((entry, false));
        }
        let shared = self.shared.as_ref()?;
        match shared.get(key).await {
            Ok(Some(entry)) => {
                let _ = self.memory.put(key, &entry).await;
                Some((entry, true))
            }
            Ok(None) => None,
            Err(error) => {
                self.redis_failed(&error);
                None
            }
        }
    }

    pub async fn put(&self, key: &str, entry: &TagEntry) {
        let _ = self.memory.put(key, entry).await;
        if let Some(shared) = &self.shared {
            if let Err(error) = shared.put(key, entry).await {
                self.redis_failed(&error);
            }
        }
    }

    /// Drops entries from memory and from Redis (a Redis failure is logged and counted: the
    /// entries then age out there, at worst [`RETENTION`]).
    pub async fn remove(&self, keys: &[String]) {
        self.memory.remove(keys);
        if let Some(shared) = &self.shared {
            if let Err(error) = shared.remove(keys).await {
                self.redis_failed(&error);
            }
        }
    }

    /// Drops entries from this process's memory only.
    pub fn remove_locally(&self, keys: &[String]) {
        self.memory.remove(keys);
    }

    fn manifest_key(digest: &str) -> String {
        format!("gantry:manifest:v1:{digest}")
    }

    /// A manifest another replica shared: `(media type, bytes)`, still to be verified.
    pub async fn shared_manifest(&self, digest: &str) -> Option<(String, Vec<u8>)> {
        let shared = self.shared.as_ref()?;
        match shared.manifest(&Self::manifest_key(digest)).await {
            Ok(found) => found,
            Err(error) => {
                self.redis_failed(&error);
                None
            }
        }
    }

    /// Shares a manifest with other replicas (only with Redis, and only small ones).
    pub async fn share_manifest(&self, digest: &str, media_type: &str, bytes: &[u8]) {
        let Some(shared) = &self.shared else { return };
        if bytes.len() > MAX_SHARED_MANIFEST {
            return;
        }
        if let Err(error) = shared
            .put_manifest(&Self::manifest_key(digest), media_type, bytes)
            .await
        {
            self.redis_failed(&error);
        }
    }

    fn link_key(digest: &str) -> String {
        format!("gantry:links:v1:{digest}")
    }

    /// Whether another replica learned that `repository` references `digest` (see
    /// `store::links`); `false` without Redis or when it fails.
    pub async fn shared_link(&self, digest: &str, repository: &str) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        match shared
            .set_contains(&Self::link_key(digest), repository)
            .await
        {
            Ok(linked) => linked,
            Err(error) => {
                self.redis_failed(&error);
                false
            }
        }
    }

    /// Tells other replicas that `repository` references these digests.
    pub async fn share_links(&self, digests: &[crate::oci::Digest], repository: &str) {
        let Some(shared) = &self.shared else { return };
        for digest in digests {
            let key = Self::link_key(&digest.to_string());
            if let Err(error) = shared.add_to_set(&key, repository).await {
                self.redis_failed(&error);
                return;
            }
        }
    }

    fn redis_failed(&self, error: &TagError) {
        self.metrics.redis_errors.inc();
        tracing::warn!(%error, "redis tag cache unavailable; using memory only");
    }

    /// `None` without Redis; otherwise whether Redis answers right now.
    pub async fn redis_reachable(&self) -> Option<bool> {
        Some(self.shared.as_ref()?.ping().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_level_round_trips() {
        let tags = Tags::new(None, std::sync::Arc::new(Metrics::new()));
        let key = Tags::key("docker.io", "library/alpine", "3.20", "a1");
        assert!(tags.get(&key).await.is_none());
        let entry = TagEntry::new(
            "sha256:x".into(),
            "application/vnd.oci.image.index.v1+json".into(),
        );
        tags.put(&key, &entry).await;
        assert_eq!(tags.get(&key).await, Some(entry));
        assert!(tags.redis_reachable().await.is_none());
    }

    #[test]
    fn keys_of_a_tag_cover_every_accept_set_a_request_can_make() {
        let keys = Tags::keys_of("docker.io", "library/alpine", "3.20");
        assert_eq!(keys.len(), 66);
        assert!(keys.contains(&Tags::shared_key("docker.io", "library/alpine", "3.20")));
        let mut headers = http::HeaderMap::new();
        headers.append(
            http::header::ACCEPT,
            http::HeaderValue::from_static("application/vnd.oci.image.index.v1+json, */*"),
        );
        headers.append(
            http::header::ACCEPT,
            http::HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"),
        );
        let accept = AcceptSet::from_headers(&headers).key();
        assert!(keys.contains(&Tags::key("docker.io", "library/alpine", "3.20", &accept)));
        assert!(keys.contains(&Tags::any_key("docker.io", "library/alpine", "3.20")));
    }

    #[tokio::test]
    async fn remove_drops_entries_from_memory() {
        let tags = Tags::new(None, std::sync::Arc::new(Metrics::new()));
        let keys = Tags::keys_of("docker.io", "library/alpine", "3.20");
        let entry = TagEntry::new("sha256:x".into(), "application/json".into());
        tags.put(&keys[3], &entry).await;
        tags.put(&keys[65], &entry).await;
        tags.put(&keys[0], &entry).await;
        tags.remove_locally(&keys);
        assert!(tags.get(&keys[3]).await.is_none());
        assert!(tags.get(&keys[65]).await.is_none());
        assert!(tags.get(&keys[0]).await.is_none());
    }

    #[test]
    fn keys_separate_registries_and_accept_sets() {
        assert_ne!(
            Tags::key("a.io", "x/y", "t", "a1"),
            Tags::key("b.io", "x/y", "t", "a1")
        );
        assert_ne!(
            Tags::key("a.io", "x/y", "t", "a1"),
            Tags::key("a.io", "x/y", "t", "a2")
        );
        let shared = Tags::shared_key("a.io", "x/y", "t");
        assert!(!every_accept_set()
            .any(|accept| Tags::key("a.io", "x/y", "t", &accept.key()) == shared));
        assert_ne!(shared, Tags::any_key("a.io", "x/y", "t"));
    }
}
