//! Download leases in Redis: one replica downloads a blob, the others follow it.
//!
//! The shape is pingora-cache's lock (`pingora-cache/src/lock.rs`) spread over replicas: the
//! first claim of a digest owns it (`SET gantry:lease:blob:<digest> "<advertise_url> <nonce>" NX
//! PX <ttl>`), later claims learn the owner's address and read from it. The owner's lease is
//! renewed every third of the TTL by a task the [`OwnerLease`] owns, and released when the
//! download ends; an owner that dies stops renewing, so its lease lapses after one TTL and the
//! next claim owns the digest. Renewal and release go through compare-and-act scripts: a
//! late owner (one whose lease lapsed while it was stalled) never extends or deletes the lease of
//! the replica that took over.
//!
//! Every Redis failure is [`LeaseClaim::Unavailable`], answered within the shared handle's
//! command timeout (500 ms, at once while Redis is known to be down): the replica downloads on
//! its own, as it would without a cluster. A lease saves upstream traffic; it is never needed for
//! a pull to succeed.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use tokio::task::JoinHandle;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::redis::Redis;

/// Claims the lease (`SET NX PX`) and answers its value, ours or the holder's. A value left by
/// an earlier process at this replica's own address (ARGV[3], the URL and a space) is taken
/// over: this process claims a digest only as its single local owner, so that lease belongs to
/// a process that is gone, and its followers would find nothing here.
const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return ARGV[1]
end
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, string.len(ARGV[3])) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return held
";

/// Extends the lease only while it is still this owner's: 1 if it was, 0 if not.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes the lease only while it is still this owner's: 1 if it was, 0 if not.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The Redis key of a digest's download lease.
pub fn lease_key(digest: &Digest) -> String {
    format!("gantry:lease:blob:{digest}")
}

/// Claims download leases for this replica.
pub struct Leases {
    redis: Redis,
    /// This replica's `cluster.advertise_url`: what followers are told to read from.
    owner: Arc<str>,
    ttl: Duration,
    metrics: Arc<Metrics>,
}

/// The answer to a claim.
#[derive(Debug)]
pub enum LeaseClaim {
    /// This replica downloads the blob; the lease lives until the [`OwnerLease`] is released or
    /// dropped.
    Owned(OwnerLease),
    /// Another replica is downloading it: its `advertise_url`, to follow.
    HeldBy(String),
    /// Redis did not answer: download alone.
    Unavailable,
}

impl Leases {
    /// Leases as `cluster:` configures them, over the process's shared Redis handle.
    pub fn new(redis: Redis, cluster: &ClusterConfig, metrics: Arc<Metrics>) -> Self {
        Self::with_ttl(
            redis,
            &cluster.advertise_url.origin(),
            cluster.lease_ttl.0,
            metrics,
        )
    }

    /// Leases for the replica at `advertise_url` that lapse `ttl` after their last renewal. Any
    /// TTL is taken, so tests can wait out an expiry; the configuration admits 1 s and more.
    pub fn with_ttl(
        redis: Redis,
        advertise_url: &str,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            redis,
            owner: Arc::from(advertise_url.trim_end_matches('/')),
            ttl,
            metrics,
        }
    }

    /// This replica's address, as followers are given it.
    pub fn advertise_url(&self) -> &str {
        &self.owner
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Claims `digest`'s download. Call it only as this process's local owner of the digest
    /// (the mirror's coordinator admits one download per digest): a lease held under this
    /// replica's own address is taken over as left by an earlier process.
    pub async fn claim(&self, digest: &Digest) -> LeaseClaim {
        let key = lease_key(digest);
        let value = format!("{} {}", self.owner, nonce());
        let mut command = ::redis::cmd("EVAL");
        command
            .arg(CLAIM)
            .arg(1)
            .arg(&key)
            .arg(&value)
            .arg(millis(self.ttl))
            .arg(format!("{} ", self.owner));
        let claims = &self.metrics.cluster_lease_claims;
        match self.redis.run::<Option<String>>(&command).await {
            Ok(Some(held)) if held == value => {
                claims.with_label_values(&["owned"]).inc();
                LeaseClaim::Owned(OwnerLease::start(self, key, value))
            }
            Ok(Some(held)) => {
                claims.with_label_values(&["held_by_peer"]).inc();
                let owner = held.split_once(' ').map_or(held.as_str(), |(url, _)| url);
                LeaseClaim::HeldBy(owner.to_owned())
            }
            Ok(None) => {
                // The script answers a value whenever the key exists; nothing means a Redis
                // that does not run it as written.
                tracing::warn!(%digest, "download lease claim answered nothing; downloading alone");
                claims.with_label_values(&["redis_unavailable"]).inc();
                LeaseClaim::Unavailable
            }
            Err(error) => {
                tracing::debug!(%digest, %error, "no download lease (redis); downloading alone");
                self.metrics.redis_errors.inc();
                claims.with_label_values(&["redis_unavailable"]).inc();
                LeaseClaim::Unavailable
            }
        }
    }
}

/// A download lease this replica holds, renewed by its own task until it is released or
/// dropped (dropping releases it too, from a spawned task).
pub struct OwnerLease {
    redis: Redis,
    key: String,
    /// `<advertise_url> <nonce>`: what renewal and release compare before acting.
    value: String,
    /// Cleared when a renewal finds the lease gone or someone else's.
    held: Arc<AtomicBool>,
    renewal: JoinHandle<()>,
    /// Released (or abandoned) already: `Drop` has nothing left to do.
    done: bool,
}

impl std::fmt::Debug for OwnerLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerLease")
            .field("key", &self.key)
            .field("held", &self.is_held())
            .finish()
    }
}

impl OwnerLease {
    fn start(leases: &Leases, key: String, value: String) -> Self {
        let held = Arc::new(AtomicBool::new(true));
        let renewal = tokio::spawn(renew(
            leases.redis.clone(),
            key.clone(),
            value.clone(),
            leases.ttl,
            Arc::clone(&held),
            Arc::clone(&leases.metrics),
        ));
        Self {
            redis: leases.redis.clone(),
            key,
            value,
            held,
            renewal,
            done: false,
        }
    }

    /// False once a renewal found that the lease lapsed or passed to another replica (which may
    /// then be downloading too); true while renewals succeed or Redis does not answer them.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    /// Ends the lease: stops renewing it and deletes it if it is still this owner's, so the next
    /// claim (the blob is in the store by then, or the download failed) owns it at once.
    pub async fn release(mut self) {
        self.done = true;
        self.renewal.abort();
        release(&self.redis, &self.key, &self.value).await;
    }

    /// Stops renewing without releasing, as a killed process would: the lease lapses after its
    /// TTL. For tests of what followers do when an owner dies.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.done = true;
        self.renewal.abort();
    }
}

impl Drop for OwnerLease {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.renewal.abort();
        // Bounded by the handle's command timeout. Outside a runtime (a process exiting) the
        // lease lapses by its TTL instead.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (redis, key, value) = (
                self.redis.clone(),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.value),
            );
            runtime.spawn(async move { release(&redis, &key, &value).await });
        }
    }
}

/// Renews every third of the TTL while the lease is this owner's. A renewal Redis does not
/// answer is counted and tried again at the next tick: one missed renewal leaves two thirds of
/// the TTL.
async fn renew(
    redis: Redis,
    key: String,
    value: String,
    ttl: Duration,
    held: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let period = (ttl / 3).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut command = ::redis::cmd("EVAL");
        command
            .arg(RENEW)
            .arg(1)
            .arg(&key)
            .arg(&value)
            .arg(millis(ttl));
        match redis.run::<i64>(&command).await {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(%key, "download lease lapsed or was taken over; another replica may download the blob too");
                held.store(false, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                tracing::debug!(%key, %error, "download lease renewal failed");
                metrics.cluster_lease_renew_failures.inc();
            }
        }
    }
}

/// Compare-and-delete; a failure leaves the lease to lapse by its TTL.
async fn release(redis: &Redis, key: &str, value: &str) {
    let mut command = ::redis::cmd("EVAL");
    command.arg(RELEASE).arg(1).arg(key).arg(value);
    if let Err(error) = redis.run::<i64>(&command).await {
        tracing::debug!(%key, %error, "download lease release failed; it lapses by its TTL");
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// 128 bits that tell this claim apart from every other, in this process and any other (only
/// uniqueness matters: a nonce is compared, never trusted). std's `RandomState` is seeded from
/// the OS once per thread; the counter, process id and clock separate what it might repeat.
fn nonce() -> String {
    static CLAIMS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = Sha256::new();
    let count = CLAIMS.fetch_add(1, Ordering::Relaxed);
    hasher.update(RandomState::new().hash_one(count).to_le_bytes());
    hasher.update(count.to_le_bytes());
    hasher.update(std::process::id().to_le_bytes());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    hasher.update(now.as_nanos().to_le_bytes());
    hex::encode(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_differ() {
        let nonces: std::collections::HashSet<String> = (0..1000).map(|_| nonce()).collect();
        assert_eq!(nonces.len(), 1000);
        assert!(nonces.iter().all(|n| n.len() == 32));
    }
}
