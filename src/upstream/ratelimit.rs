//! The upstream's own rate limit, as it announces it: Docker Hub's `ratelimit-limit: 100;w=21600`
//! and `ratelimit-remaining: 87;w=21600`, and the IETF drafts' forms (`RateLimit-Limit`,
//! `RateLimit-Remaining`, `RateLimit-Reset`; `RateLimit: limit=100, remaining=50, reset=30` with
//! `RateLimit-Policy: 100;w=21600`; the later `RateLimit: "default";r=50;t=30` with
//! `RateLimit-Policy: "default";q=100;w=60`). Parsing is pure; each [`Upstream`] keeps the latest
//! answer that carried one, for the operator's stats and gauges now and for a request budget
//! later (#15), which is why it is a typed value and not only a gauge.
//!
//! A 429 to a manifest request also starts a hold-off: until its `Retry-After` has passed, no
//! manifest request goes to that upstream (every one would be another 429 and, on Docker Hub,
//! pushes the window further). The policy of what is served meanwhile is `mirror::budget`'s.

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

/// Until when manifest requests are held back after a 429 (none while not held off).
#[derive(Debug, Default)]
pub(super) struct HoldOff(Mutex<Option<Instant>>);

/// How long to wait when a 429 names no (readable) `Retry-After`.
pub const DEFAULT_HOLD_OFF: Duration = Duration::from_secs(60);

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

impl Upstream {
    /// Holds manifest requests back for the `Retry-After` of a 429 (seconds or an HTTP date;
    /// [`DEFAULT_HOLD_OFF`] when absent or unreadable). A later hold-off never shortens one.
    pub fn hold_off(&self, retry_after: Option<&http::HeaderValue>) {
        let wait = retry_after
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after_delay(v, std::time::SystemTime::now()))
            .unwrap_or(DEFAULT_HOLD_OFF);
        let until = Instant::now() + wait;
        let mut held = self.hold_off.0.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none_or(|current| current < until) {
            *held = Some(until);
        }
        tracing::warn!(registry = %self.name, ?wait, "the upstream answered 429; holding manifest requests back");
    }

    /// What is left of a hold-off, if one is running.
    pub fn held_off_for(&self) -> Option<Duration> {
        let held = *self.hold_off.0.lock().unwrap_or_else(|e| e.into_inner());
        held.and_then(|until| until.checked_duration_since(Instant::now()))
            .filter(|left| !left.is_zero())
    }

    /// A manifest request refused by the running hold-off: counted, and the whole seconds left
    /// (at least 1) for the client's `Retry-After`. `None` when no hold-off runs.
    pub fn refuse_held_off(&self) -> Option<u64> {
        let left = self.held_off_for()?;
        self.pool
            .metrics
            .ratelimit_holdoff_refusals
            .with_label_values(&[&self.name])
            .inc();
        Some(left.as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// `Retry-After` as a delay from `now`: delta-seconds, or an IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`; a date already past is no delay).
fn retry_after_delay(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = http_date(value)?;
    let now = now.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since the epoch of an IMF-fixdate, the only form RFC 9110 requires senders to use.
fn http_date(value: &str) -> Option<u64> {
    let (_, rest) = value.split_once(", ")?;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let name = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == name)? as u64 + 1;
    let year: u64 = parts.next()?.parse().ok()?;
    let mut clock = parts.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (clock.next()??, clock.next()??, clock.next()??);
    if parts.next()? != "GMT"
        || !(1..=31).contains(&day)
        || year < 1970
        || h > 23
        || m > 59
        || s > 60
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), for years from 1970.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3_600 + m * 60 + s)
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
    fn retry_after_in_seconds_or_as_a_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_770);
        assert_eq!(retry_after_delay("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            retry_after_delay("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after_delay("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
            Some(1_835_438_400)
        );
        assert_eq!(retry_after_delay("soon", now), None);
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
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
