//! The negative cache (`mirroring.negative_ttl`) against the real upstream: a tag that does not
//! exist costs one upstream request per TTL however often it is polled, a tag pushed meanwhile is
//! served once the TTL has passed, and `negative_ttl: 0` asks the upstream every time.

mod common;

use std::time::Duration;

use common::metrics::{sample, value};
use common::{http_get, push, require_tools, wait_until, Gantry, Layout, Options, Registry};
use http::StatusCode;

/// gantry's own count of upstream requests answered `status` (its `/metrics`).
async fn upstream_answers(gantry: &Gantry, registry: &Registry, status: u16) -> f64 {
    let series = format!(
        r#"gantry_upstream_requests_total{{method="GET",registry="{}",route="registry",status="{status}"}}"#,
        registry.host()
    );
    sample(&gantry.metrics().await, &series).unwrap_or(0.0)
}

async fn start(registry: &Registry, negative_ttl: &str) -> Gantry {
    let mirroring = format!("  negative_ttl: {negative_ttl}");
    let options = Options {
        mirroring: &mirroring,
        ..Options::default()
    };
    Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &format!("http://{}", registry.host()),
        options,
    )
    .await
}

async fn get_tag(gantry: &Gantry, tag: &str) -> common::Reply {
    let url = gantry.url(&format!("/v2/test/late/manifests/{tag}"));
    http_get(&url, &[("accept", common::ACCEPT_ALL)])
        .await
        .unwrap()
}

/// Pushes a small image as `test/late:<tag>`; the layout directory must outlive the push only.
async fn push_tag(registry: &Registry, tag: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(dir.path());
    let image = layout.image("amd64", &[1_000], 7);
    layout.tag_image(tag, &image);
    layout.write_index();
    push(dir.path(), tag, &registry.host(), "test/late").await;
    image.manifest_digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tag_polled_a_hundred_times_costs_one_upstream_request() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let registry = Registry::start().await;
    let gantry = start(&registry, "30s").await;
    let first = get_tag(&gantry, "v1").await;
    assert_eq!(first.status, StatusCode::NOT_FOUND);
    let code = first.error_code();
    assert!(code.is_some(), "an OCI error body: {:?}", first.body);
    for batch in 0..10 {
        let replies = futures_util::future::join_all((0..10).map(|_| get_tag(&gantry, "v1"))).await;
        for reply in replies {
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "batch {batch}");
            assert_eq!(reply.error_code(), code, "the upstream's own error again");
        }
    }
    assert_eq!(upstream_answers(&gantry, &registry, 404).await, 1.0);
    assert_eq!(
        value(
            &gantry.metrics().await,
            r#"gantry_negative_cache_hits_total{kind="tag"}"#
        ),
        100.0
    );
    // Inside the TTL even a tag pushed since is answered 404 without asking: that is the price.
    push_tag(&registry, "v1").await;
    assert_eq!(get_tag(&gantry, "v1").await.status, StatusCode::NOT_FOUND);
    assert_eq!(upstream_answers(&gantry, &registry, 404).await, 1.0);
    assert_eq!(upstream_answers(&gantry, &registry, 200).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_pushed_after_a_404_is_served_once_the_negative_ttl_passes() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let registry = Registry::start().await;
    let gantry = start(&registry, "1s").await;
    assert_eq!(get_tag(&gantry, "v2").await.status, StatusCode::NOT_FOUND);
    let digest = push_tag(&registry, "v2").await;
    let served = wait_until(Duration::from_secs(15), || async {
        get_tag(&gantry, "v2").await.status == StatusCode::OK
    })
    .await;
    assert!(served, "the pushed tag is served after negative_ttl");
    let reply = get_tag(&gantry, "v2").await;
    assert_eq!(reply.header("docker-content-digest"), Some(digest.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_negative_ttl_zero_every_request_goes_upstream() {
    if !require_tools(&["docker-registry"]) {
        return;
    }
    let registry = Registry::start().await;
    let gantry = start(&registry, "0").await;
    for _ in 0..5 {
        assert_eq!(get_tag(&gantry, "v3").await.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(upstream_answers(&gantry, &registry, 404).await, 5.0);
    let hits = sample(
        &gantry.metrics().await,
        r#"gantry_negative_cache_hits_total{kind="tag"}"#,
    );
    assert!(hits.unwrap_or(0.0) == 0.0, "{hits:?}");
}
