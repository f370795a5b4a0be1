//! Tag lists and referrers indexes: upstream answers passed through as they are, with the
//! client's query, kept for the registry's tag TTL and served stale when the upstream fails. They
//! are mutable like tags but not content-addressed, so they live in a bounded in-memory cache of
//! their own rather than in the store.

use std::time::Instant;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::send::{send_ok, upstream_failure};
use super::{Mirror, MirrorError, Target, STALE_WARNING};
use crate::upstream::{Upstream, UpstreamRequest};

/// Tag lists and referrers indexes are passed through whole, so they are capped.
const MAX_LISTING: usize = 4 << 20;
/// Cached tag lists and referrers indexes (each at most `MAX_LISTING` bytes, most far smaller).
const MAX_LISTINGS: u64 = 10_000;

/// An upstream answer passed through as it is (tag lists, referrers).
#[derive(Clone)]
pub struct Passthrough {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Tag lists and referrers by registry and path with query, with when they were fetched.
pub(super) type Listings = moka::future::Cache<String, (Instant, Passthrough)>;

/// Bounded in count; kept as long as tags are, so a stale answer outlives the TTL.
pub(super) fn listings() -> Listings {
    moka::future::Cache::builder()
        .max_capacity(MAX_LISTINGS)
        .time_to_live(crate::tags::RETENTION)
        .build()
}

impl Mirror {
    /// Tag lists and referrers: passed through with the client's query, cached for the
    /// registry's tag TTL, and served stale when the upstream fails.
    pub async fn listing(
        &self,
        target: &Target,
        path_suffix: &str,
        query: Option<&str>,
    ) -> Result<Passthrough, MirrorError> {
        let upstream = &target.registry.upstream;
        let mut path = format!("/v2/{}/{path_suffix}", target.repo);
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            path.push('?');
            path.push_str(query);
        }
        let key = format!("{}{path}", upstream.name());
        let cached = self.listings.get(&key).await;
        if let Some((fetched, listing)) = &cached {
            if fetched.elapsed() < target.registry.tags_ttl {
                self.metrics.cache_lookup("listing", "hit");
                return Ok(listing.clone());
            }
        }
        match self.fetch_listing(upstream, target, path).await {
            Ok(listing) => {
                self.metrics.cache_lookup("listing", "miss");
                self.listings
                    .insert(key, (Instant::now(), listing.clone()))
                    .await;
                Ok(listing)
            }
            Err(error) if error.serves_stale() && cached.is_some() => {
                tracing::warn!(%error, %key, "upstream failed; serving the cached listing");
                self.metrics.cache_lookup("listing", "stale");
                let (_, mut listing) = cached.expect("checked above");
                listing.headers.insert(
                    http::header::WARNING,
                    HeaderValue::from_static(STALE_WARNING),
                );
                Ok(listing)
            }
            Err(error) => Err(error),
        }
    }

    async fn fetch_listing(
        &self,
        upstream: &Upstream,
        target: &Target,
        path: String,
    ) -> Result<Passthrough, MirrorError> {
        let request = UpstreamRequest::new(Method::GET, target.repo.as_str(), path);
        let response = send_ok(upstream, &request, |s| s.is_success()).await?;
        let status = response.status();
        let mut headers = HeaderMap::new();
        for name in [CONTENT_TYPE, http::header::LINK] {
            if let Some(value) = response.headers().get(&name) {
                headers.insert(name, value.clone());
            }
        }
        if let Some(value) = response.headers().get("oci-filters-applied") {
            headers.insert("oci-filters-applied", value.clone());
        }
        let body = response
            .into_body()
            .collect_limited(MAX_LISTING)
            .await
            .map_err(|e| upstream_failure(upstream, e))?;
        Ok(Passthrough {
            status,
            headers,
            body,
        })
    }
}
