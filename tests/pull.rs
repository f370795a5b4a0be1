//! End to end: skopeo pulls through gantry from a real `docker-registry`.

mod common;

use common::{file_digest, http_get, pull, require_tools, Fixture, Gantry, ACCEPT_ALL};
use http::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_a_multi_layer_image_with_upstream_digests() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;

    let (out, result) = pull(&format!("{}/test/multi:v1", gantry.host()), false).await;
    result.expect("skopeo pulls through gantry");
    let image = out.path().join("image");
    assert_eq!(
        file_digest(&image.join("manifest.json")),
        fixture.multi.manifest_digest
    );
    for blob in fixture.multi.blobs() {
        let path = image.join(blob.trim_start_matches("sha256:"));
        assert_eq!(file_digest(&path), blob, "blob {blob} arrives intact");
    }

    // The upstream's own answer for the tag names the same digest.
    let upstream = http_get(
        &format!(
            "http://{}/v2/test/multi/manifests/v1",
            fixture.registry.host()
        ),
        &[("accept", ACCEPT_ALL)],
    )
    .await
    .unwrap();
    assert_eq!(
        upstream.header("docker-content-digest"),
        Some(fixture.multi.manifest_digest.as_str())
    );
    // Each blob crossed the upstream link once.
    let gets = fixture.proxy.blob_gets();
    for blob in fixture.multi.blobs() {
        assert_eq!(
            gets.get(&blob),
            Some(&1),
            "one upstream GET for {blob}: {gets:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_all_platforms_of_an_index() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;

    let (out, result) = pull(&format!("{}/test/index:idx", gantry.host()), true).await;
    result.expect("skopeo copies the index through gantry");
    let image = out.path().join("image");
    assert_eq!(
        file_digest(&image.join("manifest.json")),
        fixture.index_digest
    );
    for platform in &fixture.platforms {
        let hex = platform.manifest_digest.trim_start_matches("sha256:");
        assert_eq!(
            file_digest(&image.join(format!("{hex}.manifest.json"))),
            platform.manifest_digest,
            "{} manifest",
            platform.architecture
        );
        for blob in platform.blobs() {
            assert_eq!(
                file_digest(&image.join(blob.trim_start_matches("sha256:"))),
                blob
            );
        }
    }
    // A second copy is served from the store: whatever the clients ask, the index was fetched by
    // tag once, its children by digest once each, and no other manifest was asked for.
    let (_, again) = pull(&format!("{}/test/index:idx", gantry.host()), true).await;
    again.expect("the second copy");
    let mut manifest_gets: Vec<String> = fixture
        .proxy
        .seen()
        .into_iter()
        .filter(|seen| seen.method == Method::GET && seen.path.contains("/manifests/"))
        .map(|seen| seen.path)
        .collect();
    manifest_gets.sort();
    let mut expected: Vec<String> = fixture
        .platforms
        .iter()
        .map(|platform| format!("/v2/test/index/manifests/{}", platform.manifest_digest))
        .chain(["/v2/test/index/manifests/idx".to_owned()])
        .collect();
    expected.sort();
    assert_eq!(manifest_gets, expected);
    // Each blob of each platform crossed the upstream link once.
    let gets = fixture.proxy.blob_gets();
    for blob in fixture.platforms.iter().flat_map(|p| p.blobs()) {
        assert_eq!(gets.get(&blob), Some(&1), "{blob}: {gets:?}");
    }
}
