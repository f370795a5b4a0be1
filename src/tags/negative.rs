//! The negative cache: an upstream's "no such manifest" (a 404 for a tag or a digest),
//! remembered for `mirroring.negative_ttl`, so CI polling for a tag that does not exist yet costs
//! the upstream (and a Docker Hub pull budget) one request per TTL, not one per poll.
//!
//! In process only: a replica that has not seen the 404 asks once itself, which keeps the
//! answers of the replicas independent of a Redis round trip on every miss.

use std::time::{Duration, Instant};

use bytes::Bytes;

/// Remembered 404s, at most; each is a key and a small error body.
const CAPACITY: u64 = 10_000;

/// What the upstream answered: its OCI error body, replayed to the clients it stands for.
#[derive(Clone, Debug)]
pub struct NotFound {
    pub body: Option<Bytes>,
    ttl: Duration,
}

/// Each entry lives its own registry's `negative_ttl`.
struct PerEntry;

impl moka::Expiry<String, NotFound> for PerEntry {
    fn expire_after_create(&self, _: &String, value: &NotFound, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        value: &NotFound,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

pub struct Negatives {
    cache: moka::sync::Cache<String, NotFound>,
}

impl Negatives {
    pub fn new() -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .expire_after(PerEntry)
                .build(),
        }
    }

    /// The key for a tag asked for with one Accept set (a 404 can depend on what the client
    /// accepts), or for a manifest by digest (`reference` is then the digest).
    pub fn key(registry: &str, repository: &str, reference: &str, accept: &str) -> String {
        format!("{registry}/{repository}:{reference}:{accept}")
    }

    /// Every key a tag's 404s can be remembered under, one per Accept set.
    pub fn keys_of_tag(registry: &str, repository: &str, tag: &str) -> Vec<String> {
        super::every_accept_set()
            .map(|accept| Self::key(registry, repository, tag, &accept.key()))
            .collect()
    }

    pub fn get(&self, key: &str) -> Option<NotFound> {
        self.cache.get(key)
    }

    /// Remembers a 404 for `ttl`; a zero `ttl` (the negative cache off) remembers nothing.
    pub fn put(&self, key: String, body: Option<Bytes>, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        self.cache.insert(key, NotFound { body, ttl });
    }

    pub fn remove(&self, keys: &[String]) {
        for key in keys {
            self.cache.invalidate(key);
        }
    }
}

impl Default for Negatives {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_their_own_ttl_and_zero_stores_nothing() {
        let negatives = Negatives::new();
        negatives.put("a".into(), None, Duration::from_millis(50));
        negatives.put("b".into(), None, Duration::from_secs(60));
        negatives.put("c".into(), None, Duration::ZERO);
        assert!(negatives.get("a").is_some());
        assert!(negatives.get("c").is_none());
        std::thread::sleep(Duration::from_millis(120));
        assert!(negatives.get("a").is_none(), "past its ttl");
        assert!(negatives.get("b").is_some());
        negatives.remove(&["b".into()]);
        assert!(negatives.get("b").is_none());
    }
}
