//! `/metrics` after a cold and a warm pull: hit, miss and byte counters move as they should.

mod common;

use common::metrics::{sample, value};
use common::{http_get, pull, require_tools, Fixture, Gantry};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_follow_a_cold_then_a_warm_pull() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    // Prefetch off: with it, whether a blob request misses or hits depends on whether the
    // prefetch committed first, and this counts them exactly.
    let gantry = Gantry::start_without_prefetch(&fixture.proxy.url()).await;
    let blobs = fixture.multi.blobs().len() as f64;
    let layer_bytes: u64 = fixture.multi.layers.iter().map(|(_, size)| size).sum();
    let reference = format!("{}/test/multi:v1", gantry.host());

    pull(&reference, false).await.1.expect("cold pull");
    gantry.settled().await;
    let cold = gantry.metrics().await;
    let blob_miss = r#"gantry_cache_lookups_total{kind="blob",outcome="miss"}"#;
    let blob_hit = r#"gantry_cache_lookups_total{kind="blob",outcome="hit"}"#;
    let from_upstream = r#"gantry_bytes_served_total{source="upstream"}"#;
    let from_cache = r#"gantry_bytes_served_total{source="cache"}"#;
    let upstream_bytes = format!(
        "gantry_upstream_bytes_total{{registry=\"{}\"}}",
        fixture.proxy.addr
    );
    assert_eq!(value(&cold, blob_miss), blobs, "{cold}");
    // A label set appears with its first use: no hit yet may mean no series yet (the warm
    // scrape below reads it with `value`, so a renamed series still fails).
    assert_eq!(sample(&cold, blob_hit).unwrap_or(0.0), 0.0);
    assert_eq!(
        value(
            &cold,
            r#"gantry_cache_lookups_total{kind="tag",outcome="miss"}"#
        ),
        1.0
    );
    assert!(
        value(&cold, &upstream_bytes) >= layer_bytes as f64,
        "{cold}"
    );
    assert!(value(&cold, from_upstream) >= layer_bytes as f64, "{cold}");
    assert_eq!(value(&cold, "gantry_downloads_in_flight"), 0.0);
    assert!(value(&cold, "gantry_store_bytes") >= layer_bytes as f64);
    assert!(value(&cold, "gantry_store_entries") >= blobs + 1.0);
    assert!(
        value(
            &cold,
            r#"gantry_http_requests_total{method="GET",route="blob",status="200"}"#
        ) >= blobs
    );

    pull(&reference, false).await.1.expect("warm pull");
    let warm = gantry.metrics().await;
    assert_eq!(value(&warm, blob_miss), blobs, "no new misses");
    assert_eq!(value(&warm, blob_hit), blobs, "{warm}");
    assert_eq!(
        value(
            &warm,
            r#"gantry_cache_lookups_total{kind="tag",outcome="hit"}"#
        ),
        1.0
    );
    assert_eq!(
        value(&warm, &upstream_bytes),
        value(&cold, &upstream_bytes),
        "nothing new fetched"
    );
    assert!(
        value(&warm, from_cache) - sample(&cold, from_cache).unwrap_or(0.0) >= layer_bytes as f64,
        "{warm}"
    );
    assert_eq!(value(&warm, from_upstream), value(&cold, from_upstream));

    let health = http_get(&gantry.admin_url("/healthz"), &[]).await.unwrap();
    assert_eq!(health.status, StatusCode::OK);
    let ready = http_get(&gantry.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["store"], "writable");
    assert_eq!(ready.json()["redis"], "not configured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_the_store_is_not_writable() {
    let upstream =
        common::fake::Fake::start(|_| common::fake::Scripted::new(StatusCode::NOT_FOUND)).await;
    let gantry = Gantry::start(&upstream.url()).await;
    let tmp = gantry.dir.path().join("store/tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let ready = http_get(&gantry.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["ready"], false);
}
