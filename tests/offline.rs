//! `mirroring.offline`: a store filled by a first gantry that could reach the upstream, served by
//! a second one that must never contact it (issue #17). The upstream stays up behind a counting
//! pass-through, so any request that leaks out is counted rather than merely failing.

mod common;

use common::{http_get, pull, Fixture, Gantry, Options, ACCEPT_ALL};
use http::StatusCode;

/// An offline gantry on a store a first gantry filled: the cached tag (known only to the store's
/// catalogue after the restart: memory is empty and there is no Redis) and its blobs are served,
/// misses are 404s naming the cure, `/readyz` says offline, and the upstream saw nothing at all.
#[tokio::test(flavor = "multi_thread")]
async fn offline_serves_the_cache_and_never_asks_the_upstream() {
    if !common::require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let first = Gantry::start(&fixture.proxy.url()).await;
    let (_copy, pulled) = pull(&format!("{}/test/multi:v1", first.host()), false).await;
    pulled.expect("the first gantry pulls through the upstream");
    first.settled().await;
    let dir = first.stop().await;
    fixture.proxy.clear();

    let options = Options {
        mirroring: "  offline: true",
        // Past any TTL at once: an offline tag is never revalidated, however old.
        ttl: "0s",
        ..Options::default()
    };
    let gantry = Gantry::start_with(dir, &fixture.proxy.url(), options).await;
    let (copy, pulled) = pull(&format!("{}/test/multi:v1", gantry.host()), false).await;
    pulled.expect("the cached image is served offline");
    let manifest = std::fs::read(copy.path().join("image/manifest.json")).unwrap();
    assert_eq!(
        common::file_digest(&copy.path().join("image/manifest.json")),
        fixture.multi.manifest_digest,
        "{}",
        String::from_utf8_lossy(&manifest)
    );
    for (layer, _) in &fixture.multi.layers {
        let hex = layer.trim_start_matches("sha256:");
        assert!(
            copy.path().join("image").join(hex).exists(),
            "layer {layer}"
        );
    }

    // The answer of a simply cached tag carries no Warning.
    let url = gantry.url("/v2/test/multi/manifests/v1");
    let reply = http_get(&url, &[("accept", ACCEPT_ALL)]).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("warning"), None);

    let url = gantry.url("/v2/test/multi/manifests/v2");
    let reply = http_get(&url, &[("accept", ACCEPT_ALL)]).await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    let body = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(
        body.contains("offline")
            && body.contains("test/multi:v2")
            && body.contains("gantry import"),
        "{body}"
    );

    let missing = format!("sha256:{}", "0".repeat(64));
    let url = gantry.url(&format!("/v2/test/multi/blobs/{missing}"));
    let reply = http_get(&url, &[]).await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code().as_deref(), Some("BLOB_UNKNOWN"));

    // A digest the store holds under another repository: offline cannot ask whether this one
    // references it, so it is a miss too (docs/offline.md).
    let (layer, _) = &fixture.multi.layers[0];
    let url = gantry.url(&format!("/v2/test/other/blobs/{layer}"));
    let reply = http_get(&url, &[]).await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code().as_deref(), Some("BLOB_UNKNOWN"));

    let ready = http_get(&gantry.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(ready.status, StatusCode::OK);
    let ready = ready.json();
    let registry = fixture.proxy.addr.to_string();
    assert_eq!(ready["offline"], serde_json::json!([registry]), "{ready}");

    assert_eq!(
        fixture.proxy.seen().len(),
        0,
        "the offline gantry contacted the upstream: {:?}",
        fixture.proxy.seen()
    );
    gantry.stop().await;
}

/// A per-registry `offline` overrides `mirroring.offline` (here: only the configured registry is
/// offline, and it answers a miss with the offline 404 without any exchange).
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_can_be_offline_alone() {
    let upstream = common::fake::Fake::start(|_| {
        common::fake::Scripted::new(StatusCode::INTERNAL_SERVER_ERROR)
    })
    .await;
    let extra = format!(
        "registries:\n  - host: isolated.example\n    url: {}\n    insecure: true\n    offline: true\n",
        upstream.url()
    );
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let url = gantry.url("/v2/isolated.example/team/app/manifests/v1");
    let reply = http_get(&url, &[("accept", ACCEPT_ALL)]).await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    let ready = http_get(&gantry.admin_url("/readyz"), &[])
        .await
        .unwrap()
        .json();
    assert_eq!(
        ready["offline"],
        serde_json::json!(["isolated.example"]),
        "{ready}"
    );

    // The default registry is not offline: its miss reaches the upstream.
    let url = gantry.url("/v2/team/app/manifests/v1");
    let reply = http_get(&url, &[("accept", ACCEPT_ALL)]).await.unwrap();
    assert_ne!(reply.status, StatusCode::NOT_FOUND);
    assert!(!upstream.seen().is_empty());
    gantry.stop().await;
}
