//! The disk cache against the real upstream (and a scripted one for faults): one upstream fetch
//! per blob under concurrency, warm pulls with no upstream, outages, corrupt and truncated
//! upstream bodies, and LRU eviction (crashes are in tests/faults.rs).

mod common;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::fake::{Ending, Fake, Scripted};
use common::{
    blob_path, dir_is_empty, file_digest, http_get, pull, require_tools, wait_until, Fixture,
    Gantry, Layout, Options,
};
use http::StatusCode;
use sha2::Digest as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_cold_pulls_fetch_each_blob_once() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let reference = format!("{}/test/multi:v1", gantry.host());
    let pulls = (0..8).map(|_| pull(&reference, false));
    let results = futures_util::future::join_all(pulls).await;
    for (out, result) in &results {
        result.as_ref().expect("every concurrent pull succeeds");
        let image = out.path().join("image");
        assert_eq!(
            file_digest(&image.join("manifest.json")),
            fixture.multi.manifest_digest
        );
        for blob in fixture.multi.blobs() {
            assert_eq!(
                file_digest(&image.join(blob.trim_start_matches("sha256:"))),
                blob
            );
        }
    }
    let gets = fixture.proxy.blob_gets();
    for blob in fixture.multi.blobs() {
        assert_eq!(
            gets.get(&blob),
            Some(&1),
            "exactly one upstream GET for {blob}: {gets:?}"
        );
    }
    assert_eq!(
        gets.len(),
        fixture.multi.blobs().len(),
        "no other blob was fetched: {gets:?}"
    );
    // The tag was resolved upstream once for all eight clients.
    assert_eq!(
        fixture.proxy.count(&http::Method::GET, "/manifests/v1"),
        1,
        "{:?}",
        fixture.proxy.seen()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pulls_need_no_upstream_and_survive_an_outage() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let by_tag = format!("{}/test/multi:v1", gantry.host());
    pull(&by_tag, false).await.1.expect("cold pull");

    fixture.proxy.clear();
    pull(&by_tag, false).await.1.expect("warm pull");
    assert!(
        fixture.proxy.blob_gets().is_empty(),
        "{:?}",
        fixture.proxy.seen()
    );
    assert!(
        fixture.proxy.seen().is_empty(),
        "inside the TTL nothing goes upstream: {:?}",
        fixture.proxy.seen()
    );

    fixture.proxy.set_down(true);
    let by_digest = format!(
        "{}/test/multi@{}",
        gantry.host(),
        fixture.multi.manifest_digest
    );
    let (out, result) = pull(&by_digest, false).await;
    result.expect("a pull by digest works with the upstream down");
    assert_eq!(
        file_digest(&out.path().join("image/manifest.json")),
        fixture.multi.manifest_digest
    );
    pull(&by_tag, false)
        .await
        .1
        .expect("a cached tag pulls with the upstream down");

    // Something never cached is a clear, immediate error.
    let missing = http_get(&gantry.url("/v2/test/other/manifests/v1"), &[])
        .await
        .unwrap();
    assert_eq!(missing.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(missing.error_code().as_deref(), Some("UNAVAILABLE"));
    assert!(fixture.proxy.seen().is_empty());
}

/// A scripted upstream serving one blob; `mode` picks how: 0 good, 1 truncated, 2 corrupt, 3 stall,
/// 4 corrupt in its first half and sent slowly (the damaged part arrives well before the end).
async fn blob_upstream(content: Bytes, mode: Arc<AtomicU8>) -> Fake {
    Fake::start(move |seen| {
        if !seen.uri.contains("/blobs/") {
            return Scripted::new(StatusCode::NOT_FOUND);
        }
        let length = content.len().to_string();
        let reply = Scripted::new(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .header("content-length", &length);
        let half = content.len() / 2;
        match mode.load(Ordering::SeqCst) {
            0 => reply
                .body(content.slice(..half))
                .body(content.slice(half..)),
            1 => reply.body(content.slice(..half)).ending(Ending::Abort),
            2 => {
                let mut corrupt = content.to_vec();
                corrupt[half + 7] ^= 0xff;
                reply.body(corrupt)
            }
            4 => {
                let mut corrupt = content.to_vec();
                corrupt[half / 2] ^= 0xff;
                let corrupt = Bytes::from(corrupt);
                reply
                    .pace(Duration::from_millis(300))
                    .body(corrupt.slice(..half))
                    .body(corrupt.slice(half..))
            }
            _ => reply.body(content.slice(..half)).ending(Ending::Stall),
        }
    })
    .await
}

fn test_blob(size: usize) -> (Bytes, String) {
    let content: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
    (Bytes::from(content), digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_corrupt_upstream_bodies_are_never_committed() {
    let (content, digest) = test_blob(3 << 20);
    let mode = Arc::new(AtomicU8::new(1));
    let upstream = blob_upstream(content.clone(), Arc::clone(&mode)).await;
    let gantry = Gantry::start(&upstream.url()).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let store = gantry.dir.path().join("store");

    for bad_mode in [1, 2] {
        mode.store(bad_mode, Ordering::SeqCst);
        let result = http_get(&url, &[]).await;
        assert!(
            result.is_err(),
            "mode {bad_mode}: the client's transfer must fail, got {result:?}"
        );
        assert!(
            !blob_path(&store, &digest).exists(),
            "mode {bad_mode}: nothing committed"
        );
        assert!(
            wait_until(Duration::from_secs(5), || async {
                dir_is_empty(&store.join("tmp"))
            })
            .await,
            "mode {bad_mode}: tmp/ cleaned"
        );
    }
    let metrics = gantry.metrics().await;
    assert!(
        metrics.contains("gantry_download_failures_total{reason=\"bad_content\"} 1"),
        "{metrics}"
    );

    mode.store(0, Ordering::SeqCst);
    let good = http_get(&url, &[])
        .await
        .expect("served once the upstream is fixed");
    assert_eq!(good.status, StatusCode::OK);
    assert_eq!(good.body, content);
    gantry.settled().await;
    assert!(blob_path(&store, &digest).exists());
}

/// A Range request is answered from the download in progress, but its last byte waits for the
/// whole blob to verify: a range over damaged bytes fails instead of completing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_a_download_that_fails_verification_fails() {
    let (content, digest) = test_blob(2 << 20);
    let upstream = blob_upstream(content.clone(), Arc::new(AtomicU8::new(4))).await;
    let gantry = Gantry::start(&upstream.url()).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let damaged = content.len() / 4;
    let range = format!("bytes={}-{}", damaged - 10, damaged + 10);
    let result = http_get(&url, &[("range", &range)]).await;
    assert!(
        result.is_err(),
        "a range of an unverified download must not complete, got {result:?}"
    );
    assert!(!blob_path(&gantry.dir.path().join("store"), &digest).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_does_not_cancel_the_download() {
    let (content, digest) = test_blob(2 << 20);
    let mode = Arc::new(AtomicU8::new(0));
    let upstream = blob_upstream(content.clone(), Arc::clone(&mode)).await;
    let gantry = Gantry::start(&upstream.url()).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    // A client that gives up right after the headers.
    let response = common::client()
        .request(
            http::Request::get(url.as_str())
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    let store = gantry.dir.path().join("store");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            blob_path(&store, &digest).exists()
        })
        .await,
        "the download finished and committed without its client"
    );
    let again = http_get(&url, &[]).await.unwrap();
    assert_eq!(again.body, content);
    assert_eq!(upstream.seen().len(), 1, "one upstream fetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_stays_under_max_size_keeping_recent_images() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let registry = common::Registry::start().await;
    let layout_dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(layout_dir.path());
    let images: Vec<_> = (0..4u64)
        .map(|i| layout.image("amd64", &[600_000, 500_000], 10 + i))
        .collect();
    for (i, image) in images.iter().enumerate() {
        layout.tag_image(&format!("i{i}"), image);
    }
    layout.write_index();
    for i in 0..images.len() {
        common::push(
            layout_dir.path(),
            &format!("i{i}"),
            &registry.host(),
            "test/evict",
        )
        .await;
    }
    let max_size: u64 = 2_600_000;
    let options = Options {
        storage: "  max_size: 2600000",
        ..Options::default()
    };
    let capped = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &format!("http://{}", registry.host()),
        options,
    )
    .await;
    let store = capped.dir.path().join("store");
    let present = |image: &common::Image| {
        image
            .layers
            .iter()
            .all(|(d, _)| blob_path(&store, d).exists())
    };

    for i in [0, 1, 2] {
        pull(&format!("{}/test/evict:i{i}", capped.host()), false)
            .await
            .1
            .unwrap();
        capped.settled().await;
        let (bytes, _) = capped.running.as_ref().unwrap().mirror.store().usage();
        assert!(bytes <= max_size, "after image {i}: {bytes} > {max_size}");
    }
    assert!(
        present(&images[2]) && present(&images[1]),
        "the two most recent images are kept"
    );
    assert!(!present(&images[0]), "the oldest image was evicted");

    // Using image 1 again makes image 2 the least recently used.
    pull(&format!("{}/test/evict:i1", capped.host()), false)
        .await
        .1
        .unwrap();
    pull(&format!("{}/test/evict:i3", capped.host()), false)
        .await
        .1
        .unwrap();
    capped.settled().await;
    assert!(present(&images[1]) && present(&images[3]));
    assert!(!present(&images[2]));
    let metrics = capped.metrics().await;
    assert!(
        !metrics.contains("gantry_store_evictions_total 0"),
        "{metrics}"
    );
}
