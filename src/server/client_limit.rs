//! Per-client request budgets (`limits.requests_per_second_per_client`): one token bucket per
//! client, so one noisy CI runner cannot take the whole mirror from everyone else. A request over
//! budget is answered at once with `429 TOOMANYREQUESTS` and a `Retry-After`; nothing queues.
//!
//! Who is a client: the TCP peer's address, never a header (`X-Forwarded-For` is whatever the
//! client writes). An IPv4 address is one client; an IPv6 client is its /64, the smallest prefix
//! a site is given (RFC 6177), because a host picks any address in it at will (privacy addresses
//! rotate by design). Behind a load balancer every client shares its address: the limit then
//! applies to the balancer, so leave it off there or set it to the whole fleet's budget.
//!
//! The table is bounded twice. Entries idle for the time a bucket takes to refill completely are
//! dropped (a full bucket is what a new client gets anyway, so this loses nothing), and the table
//! holds at most [`MAX_CLIENTS`] entries; past that, moka evicts the entries used least (TinyLFU).
//! A client that keeps sending stays in the table while a flood of fresh addresses passes through
//! it; a client whose entry is evicted starts again with a full bucket: a little extra budget,
//! never a refusal. Memory is what the cap guarantees: a client holding more addresses than the
//! table gets a burst per address, as that many real clients would.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::ClientRate;

/// Clients tracked at once. A mirror's real clients are its build hosts and nodes (thousands at
/// most); every entry past them is an address being rotated.
pub const MAX_CLIENTS: u64 = 65_536;

/// Idle entries are kept at most this long, whatever the refill time (a rate of one request an
/// hour with a burst of 100 would otherwise keep an entry for four days).
const MAX_IDLE: Duration = Duration::from_secs(3600);

/// A bucket holding up to `burst` tokens, refilled at `per_second`; a request takes one.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: &ClientRate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    /// Takes a token, or says how many whole seconds until one is there (at least 1).
    fn take(&mut self, rate: &ClientRate, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        // A float-to-int cast saturates, so a very low rate cannot overflow.
        let wait = ((1.0 - self.tokens) / rate.per_second).ceil();
        Err((wait as u64).max(1))
    }
}

/// The bucket table, shared by every connection of the client listener.
pub struct ClientLimiter {
    rate: ClientRate,
    buckets: moka::sync::Cache<IpAddr, Arc<Mutex<Bucket>>>,
}

impl ClientLimiter {
    pub fn new(rate: ClientRate) -> Self {
        Self::with_capacity(rate, MAX_CLIENTS)
    }

    fn with_capacity(rate: ClientRate, capacity: u64) -> Self {
        let refill = Duration::try_from_secs_f64(f64::from(rate.burst) / rate.per_second)
            .unwrap_or(MAX_IDLE)
            .clamp(Duration::from_secs(1), MAX_IDLE);
        Self {
            rate,
            buckets: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_idle(refill)
                .build(),
        }
    }

    /// Takes one request from `peer`'s budget, or returns the `Retry-After` in seconds.
    pub fn check(&self, peer: IpAddr) -> Result<(), u64> {
        self.check_at(peer, Instant::now())
    }

    fn check_at(&self, peer: IpAddr, now: Instant) -> Result<(), u64> {
        let bucket = self.buckets.get_with(client(peer), || {
            Arc::new(Mutex::new(Bucket::full(&self.rate, now)))
        });
        // A poisoned lock only means another request panicked mid-update; the bucket is two floats.
        let mut bucket = bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        bucket.take(&self.rate, now)
    }
}

/// The key a peer address is counted under: IPv4 (also when written IPv4-mapped) as is, IPv6 by
/// its /64.
fn client(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u32) -> ClientRate {
        ClientRate { per_second, burst }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_bucket_serves_its_burst_then_refills_at_the_rate() {
        let rate = rate(2.0, 3);
        let start = Instant::now();
        let mut bucket = Bucket::full(&rate, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(&rate, start), Ok(()));
        }
        // Empty: a token comes back in half a second, announced as a whole second.
        assert_eq!(bucket.take(&rate, start), Err(1));
        let later = start + Duration::from_millis(500);
        assert_eq!(bucket.take(&rate, later), Ok(()));
        assert_eq!(bucket.take(&rate, later), Err(1));
        // A long pause refills to the burst, not beyond it.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(bucket.take(&rate, much_later), Ok(()));
        }
        assert!(bucket.take(&rate, much_later).is_err());
    }

    #[test]
    fn retry_after_is_the_wait_for_one_token_rounded_up() {
        let slow = rate(0.1, 1);
        let start = Instant::now();
        let mut bucket = Bucket::full(&slow, start);
        assert_eq!(bucket.take(&slow, start), Ok(()));
        assert_eq!(bucket.take(&slow, start), Err(10));
        assert_eq!(
            bucket.take(&slow, start + Duration::from_millis(2500)),
            Err(8)
        );
        // Waiting what it was told is enough.
        assert_eq!(bucket.take(&slow, start + Duration::from_secs(10)), Ok(()));
        let crawl = rate(1e-300, 1);
        let mut bucket = Bucket::full(&crawl, start);
        assert_eq!(bucket.take(&crawl, start), Ok(()));
        assert_eq!(bucket.take(&crawl, start), Err(u64::MAX));
    }

    #[test]
    fn clients_have_their_own_buckets() {
        let limiter = ClientLimiter::new(rate(1.0, 2));
        let now = Instant::now();
        let (noisy, quiet) = (ip("192.0.2.1"), ip("192.0.2.2"));
        assert!(limiter.check_at(noisy, now).is_ok());
        assert!(limiter.check_at(noisy, now).is_ok());
        assert_eq!(limiter.check_at(noisy, now), Err(1));
        assert!(limiter.check_at(quiet, now).is_ok());
        assert!(limiter.check_at(quiet, now).is_ok());
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        assert_eq!(
            client(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(client(ip("2001:db8:1:2::1")), client(ip("2001:db8:1:3::1")));
        assert_eq!(client(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        // Rotating addresses inside one /64 draws on one budget.
        let limiter = ClientLimiter::new(rate(1.0, 2));
        let now = Instant::now();
        assert!(limiter.check_at(ip("2001:db8::1"), now).is_ok());
        assert!(limiter.check_at(ip("2001:db8::2"), now).is_ok());
        assert_eq!(limiter.check_at(ip("2001:db8::3"), now), Err(1));
    }

    #[test]
    fn the_table_stays_within_its_capacity() {
        let limiter = ClientLimiter::with_capacity(rate(1.0, 2), 100);
        let now = Instant::now();
        for n in 0..10_000u32 {
            let _ = limiter.check_at(IpAddr::V4(n.into()), now);
        }
        limiter.buckets.run_pending_tasks();
        assert!(
            limiter.buckets.entry_count() <= 100,
            "{} entries",
            limiter.buckets.entry_count()
        );
    }

    /// The busy client comes back every quarter of the table's size (every full table's worth,
    /// it is evicted: the flood can only outrun a client that pauses).
    #[test]
    fn a_flood_of_new_addresses_does_not_refill_a_busy_client() {
        let limiter = ClientLimiter::with_capacity(rate(1.0, 2), 100);
        let now = Instant::now();
        let noisy = ip("198.51.100.1");
        while limiter.check_at(noisy, now).is_ok() {}
        for n in 0..10_000u32 {
            let _ = limiter.check_at(IpAddr::V4(n.into()), now);
            if n % 25 == 0 {
                limiter.buckets.run_pending_tasks();
                assert_eq!(
                    limiter.check_at(noisy, now),
                    Err(1),
                    "after {n} new clients"
                );
            }
        }
    }
}
