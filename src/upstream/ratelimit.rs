//! The upstream's own rate limit, as it announces it: Docker Hub's `ratelimit-limit: 100;w=21600`
//! and `ratelimit-remaining: 87;w=21600`, and the IETF drafts' forms (`RateLimit-Limit`,
//! `RateLimit-Remaining`, `RateLimit-Reset`; `RateLimit: limit=100, remaining=50, reset=30` with
//! `RateLimit-Policy: 100;w=21600`; the later `RateLimit: "default";r=50;t=30` with
//! `RateLimit-Policy: "default";q=100;w=60`). Parsing is pure; each [`Upstream`] keeps the latest
//! answer that carried one, for the operator's stats and gauges now and for a request budget
//! later (#15), which is why it is a typed value and not only a gauge.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;

use super::Upstream;

/// A rate limit as one upstream answer announced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per window.
    pub limit: u64,
    /// Requests left in the current window.
    pub remaining: u64,
    /// The window (`w=`), when announced.
    pub window: Option<Duration>,
    /// Until the quota resets (`RateLimit-Reset`, `reset=`, `t=`), when announced.
    pub reset: Option<Duration>,
}

/// A [`RateLimit`] and when it was seen.
#[derive(Clone, Copy, Debug)]
pub struct Observed {
    pub rate_limit: RateLimit,
    pub at: Instant,
}

/// The latest rate limit an upstream announced (none until one does).
#[derive(Debug, Default)]
pub(super) struct Latest(Mutex<Option<Observed>>);

impl RateLimit {
    /// The rate limit `headers` announce, if they carry both a limit and a remaining count.
    pub fn parse(headers: &HeaderMap) -> Option<Self> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let policy = text("ratelimit-policy").and_then(policy);
        let (mut limit, mut window) = match text("ratelimit-limit").and_then(quota) {
            Some((limit, window)) => (Some(limit), window),
            None => (None, None),
        };
        let mut remaining = text("ratelimit-remaining").and_then(|v| quota(v).map(|(n, _)| n));
        let mut reset = text("ratelimit-reset")
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_secs);
        if let Some(combined) = text("ratelimit") {
            for (key, value) in parameters(combined) {
                let number = value.parse::<u64>().ok();
                match key {
                    "limit" => limit = limit.or(number),
                    "remaining" | "r" => remaining = remaining.or(number),
                    "reset" | "t" => reset = reset.or(number.map(Duration::from_secs)),
                    _ => {}
                }
            }
        }
        if let Some((quota, policy_window)) = policy {
            limit = limit.or(quota);
            window = window.or(policy_window);
        }
        Some(Self {
            limit: limit?,
            remaining: remaining?,
            window,
            reset,
        })
    }
}

/// `100;w=21600` (also the first item of `100, 100;w=60`): the quota and its window.
fn quota(value: &str) -> Option<(u64, Option<Duration>)> {
    let first = value.split(',').next()?;
    let mut parts = first.split(';');
    let count = parts.next()?.trim().parse().ok()?;
    let window = parts
        .filter_map(|p| p.trim().strip_prefix("w="))
        .find_map(|w| w.trim().parse().ok())
        .map(Duration::from_secs);
    Some((count, window))
}

/// `RateLimit-Policy`: `100;w=21600` or `"default";q=100;w=60`.
fn policy(value: &str) -> Option<(Option<u64>, Option<Duration>)> {
    if let Some((count, window)) = quota(value) {
        return Some((Some(count), window));
    }
    let first = value.split(',').next()?;
    let mut limit = None;
    let mut window = None;
    for (key, value) in parameters(first) {
        match key {
            "q" => limit = value.parse().ok(),
            "w" => window = value.parse().ok().map(Duration::from_secs),
            _ => {}
        }
    }
    Some((limit, window))
}

/// `key=value` pairs separated by `,` or `;` (a quoted policy name is skipped).
fn parameters(value: &str) -> impl Iterator<Item = (&str, &str)> {
    value.split([',', ';']).filter_map(|part| {
        let (key, value) = part.split_once('=')?;
        Some((key.trim(), value.trim().trim_matches('"')))
    })
}

impl Upstream {
    /// The latest rate limit this upstream announced, if it ever did.
    pub fn rate_limit(&self) -> Option<Observed> {
        *self.rate_limit.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the rate limit `headers` announce, if any, as this upstream's latest, and exports
    /// it as `gantry_upstream_ratelimit_limit` / `_remaining`. Called for every upstream answer.
    pub fn observe_rate_limit(&self, headers: &HeaderMap) {
        let Some(rate_limit) = RateLimit::parse(headers) else {
            return;
        };
        *self.rate_limit.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Observed {
            rate_limit,
            at: Instant::now(),
        });
        self.pool.metrics.per_registry.set_rate_limit(
            &self.name,
            rate_limit.limit,
            rate_limit.remaining,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&'static str, &'static str)]) -> Option<RateLimit> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().unwrap());
        }
        RateLimit::parse(&headers)
    }

    const SIX_HOURS: Option<Duration> = Some(Duration::from_secs(21600));

    #[test]
    fn docker_hub() {
        assert_eq!(
            parse(&[
                ("ratelimit-limit", "100;w=21600"),
                ("ratelimit-remaining", "87;w=21600"),
                ("docker-ratelimit-source", "203.0.113.7"),
            ]),
            Some(RateLimit {
                limit: 100,
                remaining: 87,
                window: SIX_HOURS,
                reset: None
            })
        );
    }

    #[test]
    fn ietf_separate_fields() {
        assert_eq!(
            parse(&[
                ("RateLimit-Limit", "100, 100;w=60"),
                ("RateLimit-Remaining", "50"),
                ("RateLimit-Reset", "30"),
            ]),
            Some(RateLimit {
                limit: 100,
                remaining: 50,
                window: None,
                reset: Some(Duration::from_secs(30))
            })
        );
    }

    #[test]
    fn ietf_combined_field_with_policy() {
        assert_eq!(
            parse(&[
                ("RateLimit", "limit=100, remaining=50, reset=30"),
                ("RateLimit-Policy", "100;w=21600"),
            ]),
            Some(RateLimit {
                limit: 100,
                remaining: 50,
                window: SIX_HOURS,
                reset: Some(Duration::from_secs(30))
            })
        );
        assert_eq!(
            parse(&[
                ("RateLimit", "\"default\";r=7;t=12"),
                ("RateLimit-Policy", "\"default\";q=10;w=60"),
            ]),
            Some(RateLimit {
                limit: 10,
                remaining: 7,
                window: Some(Duration::from_secs(60)),
                reset: Some(Duration::from_secs(12))
            })
        );
    }

    #[test]
    fn incomplete_or_garbage_is_none() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[("ratelimit-limit", "100;w=21600")]), None);
        assert_eq!(parse(&[("ratelimit-remaining", "87")]), None);
        assert_eq!(
            parse(&[("ratelimit-limit", "lots"), ("ratelimit-remaining", "87")]),
            None
        );
        assert_eq!(parse(&[("RateLimit", "remaining=5")]), None);
    }
}
