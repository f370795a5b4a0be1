//! Is it working: hit ratios, bytes saved, downloads in flight, store usage, upstream headroom.
//! Everything here is read from the metrics the pull path already keeps (globally and per
//! registry), the coordinator's flights and each upstream's last announced rate limit, so the
//! stats cost the pull path nothing.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::{Control, ControlError};
use crate::mirror::budget::at_reserve;
use crate::upstream::ObservedRateLimit;

/// The lookup kinds the hit ratio is over (listings pass through; they are not the cache's job).
const LOOKUP_KINDS: [&str; 3] = ["manifest", "blob", "tag"];

/// `GET /api/v1/stats`.
pub(super) async fn stats(control: &Control) -> Result<Value, ControlError> {
    let metrics = &control.metrics;
    let lookup = |outcome: &str| -> u64 {
        LOOKUP_KINDS
            .iter()
            .map(|kind| {
                metrics
                    .cache_lookups
                    .with_label_values(&[kind, outcome])
                    .get()
            })
            .sum()
    };
    // A stale answer during an upstream outage came from the cache.
    let hits = lookup("hit") + lookup("stale");
    let misses = lookup("miss");
    let from_cache = metrics.bytes_served.with_label_values(&["cache"]).get();
    let from_upstream = metrics.bytes_served.with_label_values(&["upstream"]).get();
    let (store_bytes, store_entries) = control.mirror.store().usage();
    let object_tier = control.object_tier.as_deref().map(|tier| {
        let health = tier.health();
        json!({"up": health.up, "last_error": health.last_error})
    });
    Ok(json!({
        "uptime_seconds": control.started.elapsed().as_secs(),
        "lookups": {"hits": hits, "misses": misses, "hit_ratio": ratio(hits, misses)},
        "bytes": {
            "from_cache": from_cache,
            "from_upstream": from_upstream,
            "saved_ratio": ratio(from_cache, from_upstream),
        },
        "registries": registries(control),
        "downloads": downloads(control),
        "store": {
            "bytes": store_bytes,
            "entries": store_entries,
            "max_size": max_size(control),
            "pinned_bytes": pinned_bytes(control),
        },
        "object_tier": object_tier,
    }))
}

/// `part / (part + rest)`, or `null` before anything was counted.
fn ratio(part: u64, rest: u64) -> Value {
    let total = part + rest;
    if total == 0 {
        Value::Null
    } else {
        json!(part as f64 / total as f64)
    }
}

/// Every registry that served a request, failed one or announced a rate limit, and the default
/// one even before its first request.
fn registries(control: &Control) -> Vec<Value> {
    let metrics = &control.metrics;
    let errors = metrics.upstream_errors_by_registry();
    let series = metrics.per_registry.all();
    let mut names: BTreeSet<String> = series.iter().map(|(name, _)| name.clone()).collect();
    names.extend(errors.keys().cloned());
    if let Ok(default) = control.mirror.resolve(None, "gantry") {
        names.insert(default.registry.upstream.name().to_owned());
    }
    // An offline registry is listed before any pull: that it is offline is what to show.
    names.extend(control.mirror.offline_registries());
    names
        .into_iter()
        .map(|name| {
            let counters = metrics.per_registry.of(&name);
            let (hits, misses) = (counters.hits.get(), counters.misses.get());
            // The registry's own upstream, as a pull naming it would resolve it.
            let target = control.mirror.resolve(Some(&name), "gantry").ok();
            let registry = target.as_ref().map(|target| &target.registry);
            let rate_limit = registry
                .and_then(|registry| registry.upstream.rate_limit())
                .map(|observed| rate_limit_json(&observed));
            let budget = registry.map(|registry| {
                let upstream = &registry.upstream;
                json!({
                    "reserve": registry.rate_limit_reserve.to_string(),
                    "at_reserve": at_reserve(upstream.rate_limit(), registry.rate_limit_reserve),
                    "held_off_seconds": upstream.held_off_for().map(|left| left.as_secs().max(1)),
                })
            });
            json!({
                "registry": name,
                "hits": hits,
                "misses": misses,
                "hit_ratio": ratio(hits, misses),
                "bytes_from_cache": counters.bytes_from_cache.get(),
                "bytes_from_upstream": counters.bytes_from_upstream.get(),
                "upstream_errors": errors.get(&name).copied().unwrap_or(0),
                "rate_limit": rate_limit,
                "offline": registry.is_some_and(|registry| registry.upstream.is_offline()),
                "budget": budget,
            })
        })
        .collect()
}

fn rate_limit_json(observed: &ObservedRateLimit) -> Value {
    let limit = &observed.rate_limit;
    json!({
        "limit": limit.limit,
        "remaining": limit.remaining,
        "window_seconds": limit.window.map(|w| w.as_secs()),
        "reset_seconds": limit.reset.map(|r| r.as_secs()),
        "observed_seconds_ago": observed.at.elapsed().as_secs(),
    })
}

fn downloads(control: &Control) -> Vec<Value> {
    control
        .mirror
        .downloads()
        .into_iter()
        .map(|download| {
            json!({
                "digest": download.digest.to_string(),
                "received": download.received,
                "size": download.size,
                "seconds": download.elapsed.as_secs(),
            })
        })
        .collect()
}

fn max_size(control: &Control) -> Option<u64> {
    control.mirror.store().max_size()
}

fn pinned_bytes(control: &Control) -> u64 {
    control.mirror.store().pinned_bytes()
}
