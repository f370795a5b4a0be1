//! The upstream's rate limit as a budget (issue #15): at `rate_limit_reserve` cached tags are not
//! revalidated while uncached ones still pull, and after a 429 no manifest request is sent until
//! its `Retry-After` has passed. A fake upstream, because a real registry announces no limit.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::fake::{Fake, Scripted, Seen};
use common::{http_get, Gantry, Options, ACCEPT_ALL};
use http::{Method, StatusCode};
use sha2::{Digest as _, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A small image manifest naming `tag` (so each tag has its own digest), and its digest.
fn manifest_for(tag: &str) -> (Vec<u8>, String) {
    let empty = format!("sha256:{:x}", Sha256::digest(b"{}"));
    let bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [],
        "annotations": {"tag": tag},
    }))
    .unwrap();
    let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
    (bytes, digest)
}

/// Answers `/v2/team/app/manifests/<tag>` (GET and HEAD) with `headers` added.
fn manifest_answer(seen: &Seen, headers: &[(&str, &str)]) -> Scripted {
    let Some(tag) = seen.uri.strip_prefix("/v2/team/app/manifests/") else {
        return Scripted::new(StatusCode::NOT_FOUND);
    };
    let (bytes, digest) = manifest_for(tag);
    let mut scripted = Scripted::new(StatusCode::OK)
        .header("content-type", OCI_MANIFEST)
        .header("docker-content-digest", &digest)
        .header("content-length", &bytes.len().to_string());
    for (name, value) in headers {
        scripted = scripted.header(name, value);
    }
    if seen.method == Method::GET {
        scripted = scripted.body(bytes);
    }
    scripted
}

fn manifest_requests(upstream: &Fake, tag: &str) -> usize {
    let path = format!("/v2/team/app/manifests/{tag}");
    upstream.seen().iter().filter(|s| s.uri == path).count()
}

async fn get_tag(gantry: &Gantry, tag: &str) -> common::Reply {
    let url = gantry.url(&format!("/v2/team/app/manifests/{tag}"));
    http_get(&url, &[("accept", ACCEPT_ALL)]).await.unwrap()
}

/// Every tag is past its TTL at once (`0s`), so each request for a cached tag is a revalidation.
fn expired() -> Options<'static> {
    Options {
        ttl: "0s",
        ..Options::default()
    }
}

/// With the budget at the reserve (5 left of 100; the default reserve is 10%), a cached tag past
/// its TTL costs the upstream nothing and is served stale, and an uncached tag still pulls. Both
/// header forms: Docker Hub's and the IETF draft's.
#[tokio::test(flavor = "multi_thread")]
async fn at_the_reserve_cached_tags_are_not_revalidated() {
    let forms: [&[(&str, &str)]; 2] = [
        &[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "5;w=21600"),
        ],
        &[
            ("RateLimit", "limit=100, remaining=5, reset=30"),
            ("RateLimit-Policy", "100;w=21600"),
        ],
    ];
    for headers in forms {
        let upstream = Fake::start(move |seen| manifest_answer(seen, headers)).await;
        let gantry =
            Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), expired()).await;
        let registry = upstream.addr.to_string();

        assert_eq!(get_tag(&gantry, "v1").await.status, StatusCode::OK);
        assert_eq!(manifest_requests(&upstream, "v1"), 1, "{headers:?}");

        let again = get_tag(&gantry, "v1").await;
        assert_eq!(again.status, StatusCode::OK);
        assert!(
            again
                .header("warning")
                .is_some_and(|w| w.starts_with("110")),
            "{headers:?}: {:?}",
            again.headers
        );
        assert_eq!(
            manifest_requests(&upstream, "v1"),
            1,
            "{headers:?}: the revalidation went upstream"
        );
        let metrics = gantry.metrics().await;
        let skipped =
            format!("gantry_ratelimit_revalidations_skipped_total{{registry=\"{registry}\"}}");
        assert_eq!(
            common::metrics::value(&metrics, &skipped),
            1.0,
            "{headers:?}"
        );

        assert_eq!(get_tag(&gantry, "v2").await.status, StatusCode::OK);
        assert_eq!(manifest_requests(&upstream, "v2"), 1, "{headers:?}");
        gantry.stop().await;
    }
}

/// Above the reserve the same expired tag is revalidated (one HEAD): what the test above
/// counts as spared is a request that would otherwise be sent.
#[tokio::test(flavor = "multi_thread")]
async fn above_the_reserve_cached_tags_are_revalidated() {
    let headers: &[(&str, &str)] = &[
        ("ratelimit-limit", "100;w=21600"),
        ("ratelimit-remaining", "50;w=21600"),
    ];
    let upstream = Fake::start(move |seen| manifest_answer(seen, headers)).await;
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), expired()).await;
    assert_eq!(get_tag(&gantry, "v1").await.status, StatusCode::OK);
    let again = get_tag(&gantry, "v1").await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.header("warning"), None);
    assert_eq!(manifest_requests(&upstream, "v1"), 2);
    gantry.stop().await;
}

/// A 429 with `Retry-After: 2` to a manifest request: until it has passed, an uncached tag is
/// answered 429 without reaching the upstream and a cached one is served stale; after it,
/// requests go upstream again.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_429_manifest_requests_wait_for_retry_after() {
    let limited = Arc::new(AtomicBool::new(false));
    let upstream = {
        let limited = Arc::clone(&limited);
        Fake::start(move |seen| {
            if limited.load(Ordering::SeqCst) {
                return Scripted::json(
                    StatusCode::TOO_MANY_REQUESTS,
                    serde_json::json!({"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}),
                )
                .header("retry-after", "2");
            }
            manifest_answer(seen, &[])
        })
        .await
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), expired()).await;
    let registry = upstream.addr.to_string();
    assert_eq!(get_tag(&gantry, "v1").await.status, StatusCode::OK);

    limited.store(true, Ordering::SeqCst);
    let refused = get_tag(&gantry, "v2").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(manifest_requests(&upstream, "v2"), 1);
    // The upstream would answer now; the hold-off is what keeps gantry from asking.
    limited.store(false, Ordering::SeqCst);

    let held = get_tag(&gantry, "v3").await;
    assert_eq!(held.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(held.error_code().as_deref(), Some("TOOMANYREQUESTS"));
    let retry_after: u64 = held
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in whole seconds");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        manifest_requests(&upstream, "v3"),
        0,
        "the hold-off let a request out"
    );
    let metrics = gantry.metrics().await;
    let refusals = format!("gantry_ratelimit_holdoff_refusals_total{{registry=\"{registry}\"}}");
    assert!(common::metrics::value(&metrics, &refusals) >= 1.0);

    let stale = get_tag(&gantry, "v1").await;
    assert_eq!(stale.status, StatusCode::OK);
    assert!(stale.header("warning").is_some(), "{:?}", stale.headers);
    assert_eq!(
        manifest_requests(&upstream, "v1"),
        1,
        "the cached tag was revalidated"
    );

    // Bounded by more than the Retry-After: each request before it passes is refused unsent.
    let resumed = common::wait_until(Duration::from_secs(6), || async {
        get_tag(&gantry, "v3").await.status == StatusCode::OK
    })
    .await;
    assert!(
        resumed,
        "requests did not go upstream again after Retry-After"
    );
    assert_eq!(manifest_requests(&upstream, "v3"), 1);
    gantry.stop().await;
}
