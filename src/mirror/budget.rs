//! The upstream's rate limit as a budget (`rate_limit_reserve`, docs/offline.md's sibling section
//! in docs/ARCHITECTURE.md): when the requests an upstream last announced as remaining are at the
//! reserve, revalidations of cached tags past their TTL are skipped and those tags served stale,
//! so what is left of the window goes to tags nobody has cached. A tag served stale costs a
//! client nothing it can see beyond the `Warning`; a tag that cannot be fetched costs it the pull.
//!
//! The 429 hold-off is the upstream's own budget running out: its state lives with the
//! [`Upstream`](crate::upstream::Upstream) (`hold_off`), and its refusals reach clients through
//! [`send_ok`](super::send) as the upstream's 429, so a cached tag is served stale and an uncached
//! one is refused with the time left, exactly as if the upstream had been asked.

use crate::config::Reserve;
use crate::upstream::ObservedRateLimit;

use super::{Mirror, Target};

/// Whether the budget `observed` leaves is at or below `reserve`. No announcement seen yet: no
/// budget is known, so nothing is skipped.
pub fn at_reserve(observed: Option<ObservedRateLimit>, reserve: Reserve) -> bool {
    observed.is_some_and(|o| o.rate_limit.remaining <= reserve.of(o.rate_limit.limit))
}

impl Mirror {
    /// Whether the revalidation of a cached tag past its TTL is to be skipped to spare the
    /// upstream's rate limit; counted and logged when it is.
    pub(super) fn spare_revalidation(&self, target: &Target) -> bool {
        let upstream = &target.registry.upstream;
        let observed = upstream.rate_limit();
        if !at_reserve(observed, target.registry.rate_limit_reserve) {
            return false;
        }
        self.metrics
            .ratelimit_revalidations_skipped
            .with_label_values(&[upstream.name()])
            .inc();
        tracing::debug!(registry = %upstream.name(), repository = %target.repo, reserve = %target.registry.rate_limit_reserve, "rate limit at the reserve; serving the cached tag without revalidating it");
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::upstream::RateLimit;

    fn seen(limit: u64, remaining: u64) -> Option<ObservedRateLimit> {
        Some(ObservedRateLimit {
            rate_limit: RateLimit {
                limit,
                remaining,
                window: None,
                reset: None,
            },
            at: Instant::now(),
        })
    }

    #[test]
    fn the_reserve_is_a_count_or_a_share_of_the_limit() {
        assert!(!at_reserve(None, Reserve::Percent(10)));
        assert!(at_reserve(seen(100, 10), Reserve::Percent(10)));
        assert!(!at_reserve(seen(100, 11), Reserve::Percent(10)));
        assert!(at_reserve(seen(100, 5), Reserve::Requests(5)));
        assert!(!at_reserve(seen(100, 6), Reserve::Requests(5)));
        assert!(!at_reserve(seen(100, 1), Reserve::Percent(0)));
        assert!(at_reserve(seen(100, 0), Reserve::Percent(0)));
    }
}
