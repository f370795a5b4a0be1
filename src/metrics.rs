//! Every Prometheus metric gantry exports, named and described in this one place.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The `reason` label of `gantry_download_failures_total`, named once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The body does not match its digest or its announced size.
    BadContent,
    /// Connection refused or reset, a broken body.
    UpstreamUnavailable,
    /// No response in `timeouts.first_byte`, a pause over `timeouts.idle`, or the whole download
    /// over `timeouts.download`.
    Timeout,
    /// The upstream answered an error status.
    UpstreamStatus,
    /// Our own disk: a full disk, a failed commit.
    Io,
    /// gantry's own machinery: a lost download task, a stopped disk writer.
    Internal,
    /// No download slot in time (`limits.max_queued_downloads`, `timeouts.download_queue`).
    Shed,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadContent => "bad_content",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::Timeout => "timeout",
            Self::UpstreamStatus => "upstream_status",
            Self::Io => "io",
            Self::Internal => "internal",
            Self::Shed => "shed",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Client requests by route, method and status.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// Cache lookups by kind (`blob`, `manifest`, `tag`, `listing`: tag lists and referrers) and
    /// outcome (`hit`, `miss`, `stale`; `stale` only for `tag` and `listing`, served during an
    /// upstream outage).
    pub cache_lookups: IntCounterVec,
    /// Bytes sent to clients, by where they came from (`cache`, `upstream`).
    pub bytes_served: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    /// Blob bytes fetched from upstreams, by registry.
    pub upstream_bytes: IntCounterVec,
    pub downloads_in_flight: IntGauge,
    /// Requests that followed a download another request had started.
    pub download_joins: IntCounter,
    /// Tag fetches and revalidations that waited for one another request had started.
    pub tag_refresh_joins: IntCounter,
    /// Downloads shed because every slot was busy and the queue full or its wait over.
    pub downloads_shed: IntCounter,
    /// Downloads discarded, by [`FailureReason`].
    pub download_failures: IntCounterVec,
    pub store_bytes: IntGauge,
    pub store_entries: IntGauge,
    pub store_evictions: IntCounter,
    /// Tag revalidations by result (`unchanged`, `changed`, `failed`).
    pub tag_revalidations: IntCounterVec,
    pub redis_errors: IntCounter,
    /// Connections refused by the address policy of registries named by clients, by address class.
    pub outbound_refused: IntCounterVec,
    /// Cached blobs and manifests asked for under a repository not yet known to reference them,
    /// by what the upstream said (`linked`, `refused`, `failed`).
    pub repository_checks: IntCounterVec,
    /// Requests refused because their client was over `limits.requests_per_second_per_client`.
    pub client_rate_limited: IntCounter,
    /// Object tier (`storage.s3`) lookups by kind (`blob`, `manifest`) and outcome (`hit`,
    /// `miss`, `error`; an error is served as a miss).
    pub object_tier_lookups: IntCounterVec,
    /// Bytes read from the object tier.
    pub object_tier_read_bytes: IntCounter,
    /// Bytes uploaded to the object tier.
    pub object_tier_uploaded_bytes: IntCounter,
    /// Blob uploads by result (`uploaded`, `present`: the key existed, `gone`: evicted from the
    /// disk before its turn, `failed`: every attempt failed).
    pub object_tier_uploads: IntCounterVec,
    /// Failed object tier operations, by operation (`probe`, `read`, `head`, `upload`, `delete`,
    /// `list`).
    pub object_tier_errors: IntCounterVec,
    /// Blobs waiting for an upload or being uploaded.
    pub object_tier_upload_backlog: IntGauge,
    /// Committed blobs never uploaded because the upload backlog was full.
    pub object_tier_uploads_dropped: IntCounter,
    /// 1 while the object tier answers, 0 while it is skipped as down.
    pub object_tier_up: IntGauge,
    /// Blobs deleted from the object tier to keep it under `storage.s3.max_size`.
    pub object_tier_evictions: IntCounter,
    /// Blob bodies this replica served to peers on its cluster route.
    pub cluster_peer_streams_served: IntCounter,
    /// Blob bodies this replica opened on a peer that was downloading them.
    pub cluster_peer_streams_followed: IntCounter,
    /// Download lease claims by outcome (`owned`, `held_by_peer`, `redis_unavailable`).
    pub cluster_lease_claims: IntCounterVec,
    /// Lease renewals that got no answer from Redis (the lease may lapse to another replica).
    pub cluster_lease_renew_failures: IntCounter,
    /// Manifest requests answered 404 from the negative cache, by kind (`tag`, `digest`).
    pub negative_cache_hits: IntCounterVec,
    /// Revalidations of cached tags past their TTL not sent because the upstream's remaining
    /// rate limit was at `rate_limit_reserve` (served stale), by registry.
    pub ratelimit_revalidations_skipped: IntCounterVec,
    /// Manifest requests not sent because the upstream's 429 `Retry-After` had not passed
    /// (cached tags served stale, the rest answered 429), by registry.
    pub ratelimit_holdoff_refusals: IntCounterVec,
    /// Blob prefetches on a fetched manifest, by result (`started`, `cached`, `in_flight`, `busy`).
    pub prefetches: IntCounterVec,
    /// See [`ControlEventMetrics`].
    control_announce_failures: IntCounter,
    control_events_applied: IntCounterVec,
    /// See [`ResumeMetrics`].
    download_resumes: IntCounterVec,
    download_refetched_bytes: IntCounter,
    /// Lookups, bytes served and upstream rate limits by registry (see [`PerRegistry`]).
    pub per_registry: PerRegistry,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric registered once");
            metric
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let metric = HistogramVec::new(opts, labels).expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric registered once");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric registered once");
            metric
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric registered once");
            metric
        };
        Self {
            requests: counter_vec(
                "gantry_http_requests_total",
                "Client requests by route, method and status.",
                &["route", "method", "status"],
            ),
            request_duration: histogram_vec(
                "gantry_http_request_duration_seconds",
                "Duration of client requests, from the request to the end of the response body.",
                &["route"],
            ),
            cache_lookups: counter_vec(
                "gantry_cache_lookups_total",
                "Cache lookups by kind (blob, manifest, tag) and outcome (hit, miss, stale).",
                &["kind", "outcome"],
            ),
            bytes_served: counter_vec(
                "gantry_bytes_served_total",
                "Blob and manifest bytes sent to clients, by source (cache, upstream).",
                &["source"],
            ),
            upstream_requests: counter_vec(
                "gantry_upstream_requests_total",
                "Requests sent to upstream registries.",
                &["registry", "method", "route", "status"],
            ),
            upstream_duration: histogram_vec(
                "gantry_upstream_request_duration_seconds",
                "Time to the response headers of upstream requests.",
                &["registry"],
            ),
            upstream_bytes: counter_vec(
                "gantry_upstream_bytes_total",
                "Blob bytes fetched from upstream registries.",
                &["registry"],
            ),
            downloads_in_flight: gauge("gantry_downloads_in_flight", "Blob downloads in progress."),
            download_joins: counter(
                "gantry_download_joins_total",
                "Requests that followed a download already in progress instead of starting one.",
            ),
            tag_refresh_joins: counter(
                "gantry_tag_refresh_joins_total",
                "Tag requests that waited for a fetch or revalidation another request had started instead of asking the upstream.",
            ),
            downloads_shed: counter(
                "gantry_downloads_shed_total",
                "Blob downloads answered 503 because limits.max_downloads were busy and the queue was full or timeouts.download_queue passed.",
            ),
            download_failures: counter_vec(
                "gantry_download_failures_total",
                "Blob downloads discarded, by reason.",
                &["reason"],
            ),
            store_bytes: gauge(
                "gantry_store_bytes",
                "Bytes of blobs and manifests in the store.",
            ),
            store_entries: gauge("gantry_store_entries", "Blobs and manifests in the store."),
            store_evictions: counter(
                "gantry_store_evictions_total",
                "Entries evicted to stay under storage.max_size.",
            ),
            tag_revalidations: counter_vec(
                "gantry_tag_revalidations_total",
                "Tag revalidations with the upstream, by result (unchanged, changed, failed).",
                &["result"],
            ),
            redis_errors: counter(
                "gantry_redis_errors_total",
                "Redis operations that failed (treated as misses).",
            ),
            outbound_refused: counter_vec(
                "gantry_outbound_refused_total",
                "Upstream connections refused because a registry named by a client resolved to a non-public address, by address class.",
                &["class"],
            ),
            repository_checks: counter_vec(
                "gantry_repository_checks_total",
                "Cached content asked for under a repository not known to reference it, checked with the upstream, by result (linked, refused, failed).",
                &["result"],
            ),
            client_rate_limited: counter(
                "gantry_client_rate_limited_total",
                "Client requests answered 429 because their client was over limits.requests_per_second_per_client.",
            ),
            object_tier_lookups: counter_vec(
                "gantry_object_tier_lookups_total",
                "Object tier lookups by kind (blob, manifest) and outcome (hit, miss, error; an error is served as a miss).",
                &["kind", "outcome"],
            ),
            object_tier_read_bytes: counter(
                "gantry_object_tier_read_bytes_total",
                "Bytes read from the object tier.",
            ),
            object_tier_uploaded_bytes: counter(
                "gantry_object_tier_uploaded_bytes_total",
                "Bytes uploaded to the object tier.",
            ),
            object_tier_uploads: counter_vec(
                "gantry_object_tier_uploads_total",
                "Blob uploads to the object tier by result (uploaded, present, gone, failed).",
                &["result"],
            ),
            object_tier_errors: counter_vec(
                "gantry_object_tier_errors_total",
                "Failed object tier operations, by operation.",
                &["operation"],
            ),
            object_tier_upload_backlog: gauge(
                "gantry_object_tier_upload_backlog",
                "Committed blobs waiting for their upload to the object tier or being uploaded.",
            ),
            object_tier_uploads_dropped: counter(
                "gantry_object_tier_uploads_dropped_total",
                "Committed blobs never uploaded to the object tier because the upload backlog was full.",
            ),
            object_tier_up: gauge(
                "gantry_object_tier_up",
                "1 while the object tier answers, 0 while it is skipped as down.",
            ),
            object_tier_evictions: counter(
                "gantry_object_tier_evictions_total",
                "Blobs deleted from the object tier to stay under storage.s3.max_size.",
            ),
            cluster_peer_streams_served: counter(
                "gantry_cluster_peer_streams_served_total",
                "Blob bodies served to peer replicas on the cluster route (stored or still downloading).",
            ),
            cluster_peer_streams_followed: counter(
                "gantry_cluster_peer_streams_followed_total",
                "Blob bodies opened on a peer replica that owned their download, instead of the upstream.",
            ),
            cluster_lease_claims: counter_vec(
                "gantry_cluster_lease_claims_total",
                "Blob download lease claims in Redis, by outcome (owned, held_by_peer, redis_unavailable: downloading alone).",
                &["outcome"],
            ),
            cluster_lease_renew_failures: counter(
                "gantry_cluster_lease_renew_failures_total",
                "Download lease renewals Redis did not answer; the lease lapses after cluster.lease_ttl without one.",
            ),
            negative_cache_hits: counter_vec(
                "gantry_negative_cache_hits_total",
                "Manifest requests answered 404 from the negative cache (mirroring.negative_ttl) without asking the upstream, by kind (tag, digest).",
                &["kind"],
            ),
            ratelimit_revalidations_skipped: counter_vec(
                "gantry_ratelimit_revalidations_skipped_total",
                "Cached tags past their TTL served stale without a revalidation because the upstream's remaining rate limit was at mirroring.rate_limit_reserve, by registry.",
                &["registry"],
            ),
            ratelimit_holdoff_refusals: counter_vec(
                "gantry_ratelimit_holdoff_refusals_total",
                "Manifest requests not sent to an upstream that answered 429 until its Retry-After passed (cached tags served stale, others answered 429), by registry.",
                &["registry"],
            ),
            prefetches: counter_vec(
                "gantry_prefetch_total",
                "Config and layer downloads considered when an image manifest was fetched upstream (mirroring.prefetch), by result: started, cached (already on disk), in_flight (already downloading), busy (no free download slot or limits.max_downloads / 2 prefetches running).",
                &["result"],
            ),
            control_announce_failures: counter(
                "gantry_control_announce_failures_total",
                "Purges, pins, unpins and refreshes applied here whose announcement to the other replicas failed.",
            ),
            control_events_applied: counter_vec(
                "gantry_control_events_applied_total",
                "Purges, pins, unpins and refreshes announced by another replica and applied here, by action.",
                &["action"],
            ),
            download_resumes: counter_vec(
                "gantry_download_resumes_total",
                "Upstream requests made again from the byte a broken download reached, by origin and result (resumed, failed, gave_up).",
                &["origin", "result"],
            ),
            download_refetched_bytes: counter(
                "gantry_download_refetched_bytes_total",
                "Bytes received again because an origin answered a resumed request whole (200) instead of from the byte asked.",
            ),
            per_registry: PerRegistry::new(&registry),
            registry,
        }
    }

    pub fn upstream_request(
        &self,
        registry: &str,
        method: &str,
        route: &str,
        status: &str,
        elapsed: Duration,
    ) {
        self.upstream_requests
            .with_label_values(&[registry, method, route, status])
            .inc();
        self.upstream_duration
            .with_label_values(&[registry])
            .observe(elapsed.as_secs_f64());
    }

    pub fn cache_lookup(&self, kind: &str, outcome: &str) {
        self.cache_lookups.with_label_values(&[kind, outcome]).inc();
    }

    /// The text exposition format for `/metrics`.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The series by registry the control plane's stats read (#20): cache lookups and bytes served
/// per registry (the global `gantry_cache_lookups_total` and `gantry_bytes_served_total` do not
/// say which registry), and the rate limit each upstream last announced.
pub struct PerRegistry {
    lookups: IntCounterVec,
    bytes_served: IntCounterVec,
    ratelimit_limit: IntGaugeVec,
    ratelimit_remaining: IntGaugeVec,
    /// Resolved once per registry: a request only looks its registry up here, it never hashes
    /// label values (`with_label_values`) on the hot path.
    resolved: RwLock<HashMap<String, Arc<RegistrySeries>>>,
}

/// One registry's counters, resolved.
pub struct RegistrySeries {
    /// Manifest and blob requests answered from the caches.
    pub hits: IntCounter,
    /// Manifest and blob requests that went to the upstream (or followed a download).
    pub misses: IntCounter,
    pub bytes_from_cache: IntCounter,
    pub bytes_from_upstream: IntCounter,
}

impl PerRegistry {
    fn new(registry: &Registry) -> Self {
        fn registered<M: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            metric: M,
        ) -> M {
            registry
                .register(Box::new(metric.clone()))
                .expect("metric registered once");
            metric
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registered(registry, metric)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric =
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registered(registry, metric)
        };
        Self {
            lookups: counter_vec(
                "gantry_registry_lookups_total",
                "Manifest and blob requests by registry and outcome (hit: answered from the caches, miss: from the upstream).",
                &["registry", "outcome"],
            ),
            bytes_served: counter_vec(
                "gantry_registry_bytes_served_total",
                "Blob and manifest bytes sent to clients, by registry and source (cache, upstream).",
                &["registry", "source"],
            ),
            ratelimit_limit: gauge_vec(
                "gantry_upstream_ratelimit_limit",
                "The request quota per window the upstream last announced (ratelimit-limit).",
                &["registry"],
            ),
            ratelimit_remaining: gauge_vec(
                "gantry_upstream_ratelimit_remaining",
                "The requests left in the window the upstream last announced (ratelimit-remaining).",
                &["registry"],
            ),
            resolved: RwLock::default(),
        }
    }

    /// The counters of `registry` (an upstream's name), resolved at its first request.
    pub fn of(&self, registry: &str) -> Arc<RegistrySeries> {
        if let Some(series) = self
            .resolved
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(registry)
        {
            return Arc::clone(series);
        }
        let mut resolved = self.resolved.write().unwrap_or_else(|e| e.into_inner());
        let series = resolved.entry(registry.to_owned()).or_insert_with(|| {
            Arc::new(RegistrySeries {
                hits: self.lookups.with_label_values(&[registry, "hit"]),
                misses: self.lookups.with_label_values(&[registry, "miss"]),
                bytes_from_cache: self.bytes_served.with_label_values(&[registry, "cache"]),
                bytes_from_upstream: self.bytes_served.with_label_values(&[registry, "upstream"]),
            })
        });
        Arc::clone(series)
    }

    /// Every registry with counters, by name.
    pub fn all(&self) -> Vec<(String, Arc<RegistrySeries>)> {
        let resolved = self.resolved.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = resolved
            .iter()
            .map(|(name, series)| (name.clone(), Arc::clone(series)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Exports the rate limit `registry`'s upstream announced last. Only announced limits get a
    /// series: a registry that never sent one shows none rather than a misleading 0 remaining.
    pub fn set_rate_limit(&self, registry: &str, limit: u64, remaining: u64) {
        // Listed in the stats from now on, even if none of its answers reached a client.
        self.of(registry);
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.ratelimit_limit
            .with_label_values(&[registry])
            .set(gauge(limit));
        self.ratelimit_remaining
            .with_label_values(&[registry])
            .set(gauge(remaining));
    }
}

impl Metrics {
    /// Upstream answers that were failures, by registry: no answer at all, a 429 or a 5xx (a 404
    /// or a 401 is the registry working).
    pub fn upstream_errors_by_registry(&self) -> HashMap<String, u64> {
        use prometheus::core::Collector;
        let mut errors = HashMap::new();
        for family in self.upstream_requests.collect() {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                let registry = label("registry");
                let status = label("status");
                let failed = status == "error" || status == "429" || status.starts_with('5');
                let count = errors.entry(registry).or_insert(0);
                if failed {
                    // Counters hold whole numbers; the float is the exposition type.
                    *count += metric.get_counter().get_value() as u64;
                }
            }
        }
        errors
    }

    /// The resume series, for the mirror's downloads (`limits.download_resumes`).
    pub fn download_resumes(&self) -> ResumeMetrics {
        ResumeMetrics {
            resumes: self.download_resumes.clone(),
            refetched: self.download_refetched_bytes.clone(),
        }
    }
}

/// Resumed upstream downloads (`limits.download_resumes`).
#[derive(Clone)]
pub struct ResumeMetrics {
    /// Requests made again from the byte reached, by origin and result (`resumed`: it answered
    /// and the download goes on; `failed`: it did not answer; `gave_up`: no attempt left or an
    /// answer not worth another).
    pub resumes: IntCounterVec,
    /// Bytes received again: the part before the offset of a resumed request that an origin
    /// answered whole (`200`, ignoring `Range`), dropped as it arrives.
    pub refetched: IntCounter,
}

/// Control-plane changes announced to, and applied from, the other replicas (through Redis).
pub struct ControlEventMetrics {
    /// Local changes whose announcement failed (Redis down or refusing): other replicas miss them.
    pub announce_failures: IntCounter,
    /// Other replicas' changes applied here, by action.
    pub applied: IntCounterVec,
}

impl Metrics {
    /// The control-plane event series, for the control plane's announcer and subscriber.
    pub fn control_events(&self) -> ControlEventMetrics {
        ControlEventMetrics {
            announce_failures: self.control_announce_failures.clone(),
            applied: self.control_events_applied.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        let metrics = Metrics::new();
        metrics.cache_lookup("blob", "hit");
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains("gantry_cache_lookups_total{kind=\"blob\",outcome=\"hit\"} 1"),
            "{text}"
        );
    }
}
