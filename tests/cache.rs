//! The disk cache against the real upstream (and a scripted one for faults): one upstream fetch
//! per blob under concurrency, warm pulls with no upstream, outages, corrupt and truncated
//! upstream bodies, and LRU eviction (crashes are in tests/faults.rs).

mod common;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{Ending, Fake, Scripted};
use common::metrics::value;
use common::{
    blob_path, dir_is_empty, file_digest, http_get, pull, require_tools, wait_until, Fixture,
    Gantry, Layout, Options,
};
use http::StatusCode;
use http_body_util::BodyExt;
use sha2::Digest as _;

const JOINS: &str = "gantry_download_joins_total";
const BLOB_MISSES: &str = r#"gantry_cache_lookups_total{kind="blob",outcome="miss"}"#;

/// Each blob is held at the upstream until all eight pulls have asked for it, so the pulls
/// provably overlap: without the single flight each would make its own upstream GET. skopeo
/// copies the blobs of a `dir:` image one at a time, so the gates open one by one, in the order
/// the pulls ask. Prefetch is off: it would start every download before any pull asks, and this
/// counts the clients' own joins (tests/prefetch.rs has the clients following prefetches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_cold_pulls_fetch_each_blob_once() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    const PULLS: usize = 8;
    let fixture = Fixture::start().await;
    let gantry = Gantry::start_without_prefetch(&fixture.proxy.url()).await;
    let gates: Vec<_> = fixture
        .multi
        .blobs()
        .iter()
        .map(|blob| fixture.proxy.hold(blob, 0))
        .collect();
    let reference = format!("{}/test/multi:v1", gantry.host());
    let pulls = tokio::spawn(async move {
        futures_util::future::join_all((0..PULLS).map(|_| pull(&reference, false))).await
    });
    let mut opened = 0;
    let mut all_joined = true;
    while opened < gates.len() {
        let wanted = ((PULLS - 1) * (opened + 1)) as f64;
        all_joined = wait_until(Duration::from_secs(60), || async {
            value(&gantry.metrics().await, JOINS) >= wanted
        })
        .await;
        if !all_joined {
            break;
        }
        for gate in gates.iter().filter(|gate| gate.held() > 0) {
            assert_eq!(gate.held(), 1, "one upstream response per blob");
            gate.open();
            opened += 1;
        }
    }
    let joins_when_done = value(&gantry.metrics().await, JOINS);
    drop(gates);
    let results = pulls.await.unwrap();
    assert!(
        all_joined,
        "every pull joined the download of each held blob ({opened} released):\n{}",
        gantry.metrics().await
    );
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
    let expected_joins = ((PULLS - 1) * gets.len()) as f64;
    assert_eq!(joins_when_done, expected_joins);
    let metrics = gantry.metrics().await;
    assert_eq!(value(&metrics, JOINS), expected_joins, "{metrics}");
    assert_eq!(
        value(&metrics, BLOB_MISSES),
        (PULLS * gets.len()) as f64,
        "every blob request missed the store and joined or started its download"
    );
    // The tag was resolved upstream once for all eight clients.
    assert_eq!(
        fixture.proxy.count(&http::Method::GET, "/manifests/v1"),
        1,
        "{:?}",
        fixture.proxy.seen()
    );
}

/// Eight clients ask for one blob while its upstream response is held after its first MiB: one
/// upstream GET, seven joins, and every client, followers included, has bytes while the download
/// cannot have finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_stream_a_download_in_progress() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    const CLIENTS: usize = 8;
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let (layer, size) = fixture
        .multi
        .layers
        .iter()
        .max_by_key(|(_, size)| *size)
        .cloned()
        .unwrap();
    let gate = fixture.proxy.hold(&layer, 1 << 20);
    let url = gantry.url(&format!("/v2/test/multi/blobs/{layer}"));
    let received: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (url, received) = (url.clone(), Arc::clone(&received));
            tokio::spawn(async move {
                let response = common::client()
                    .request(
                        http::Request::get(url.as_str())
                            .body(http_body_util::Empty::new())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let mut body = response.into_body();
                let mut bytes = Vec::new();
                while let Some(frame) = body.frame().await {
                    if let Some(data) = frame.expect("the body completes").data_ref() {
                        bytes.extend_from_slice(data);
                        received[i].store(bytes.len() as u64, Ordering::SeqCst);
                    }
                }
                bytes
            })
        })
        .collect();
    let progress = || -> Vec<u64> { received.iter().map(|r| r.load(Ordering::SeqCst)).collect() };
    let overlapped = wait_until(Duration::from_secs(30), || async {
        value(&gantry.metrics().await, JOINS) == (CLIENTS - 1) as f64
            && progress().iter().all(|&bytes| bytes > 0)
    })
    .await;
    // Observed with the upstream response still held: the download cannot have finished.
    let (before_end, held, metrics) = (progress(), gate.held(), gantry.metrics().await);
    let committed = blob_path(&gantry.dir.path().join("store"), &layer).exists();
    gate.open();
    let bodies = futures_util::future::join_all(clients).await;
    assert!(
        overlapped,
        "{} clients joined one download and got bytes before its end: {before_end:?}\n{metrics}",
        CLIENTS
    );
    assert_eq!(held, 1, "one upstream response, held");
    assert!(!committed, "nothing committed while the upstream is held");
    assert_eq!(value(&metrics, "gantry_downloads_in_flight"), 1.0);
    assert!(
        before_end.iter().all(|&bytes| bytes < size),
        "no client had the whole blob before the upstream sent it: {before_end:?}"
    );
    for body in bodies {
        assert_eq!(file_digest_of(&body.unwrap()), layer);
    }
    assert_eq!(fixture.proxy.blob_gets().get(&layer), Some(&1));
    gantry.settled().await;
    assert_eq!(value(&gantry.metrics().await, JOINS), (CLIENTS - 1) as f64);
}

fn file_digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
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

    assert!(
        fixture.proxy.refused().is_empty(),
        "cached content asks nothing of the upstream: {:?}",
        fixture.proxy.refused()
    );

    // Something never cached is a clear, immediate error: one attempt, no retry, no wait.
    let started = Instant::now();
    let missing = http_get(&gantry.url("/v2/test/other/manifests/v1"), &[])
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(missing.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(missing.error_code().as_deref(), Some("UNAVAILABLE"));
    let attempts: Vec<(http::Method, String)> = fixture
        .proxy
        .refused()
        .into_iter()
        .map(|seen| (seen.method, seen.path))
        .collect();
    assert_eq!(
        attempts,
        [(http::Method::GET, "/v2/test/other/manifests/v1".to_owned())],
        "one attempt reached the dead upstream"
    );
    assert!(
        fixture.proxy.seen().is_empty(),
        "{:?}",
        fixture.proxy.seen()
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "the error is immediate, not after a timeout or a retry: {elapsed:?}"
    );
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
    assert_eq!(
        value(
            &metrics,
            r#"gantry_download_failures_total{reason="bad_content"}"#
        ),
        1.0,
        "the corrupt body"
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
    // Each image is two layers, a config and a manifest; what is not in the store was evicted.
    let metrics = capped.metrics().await;
    let stored = (images.len() * 4) as f64;
    assert_eq!(
        value(&metrics, "gantry_store_evictions_total"),
        stored - value(&metrics, "gantry_store_entries"),
        "{metrics}"
    );
    assert!(
        value(&metrics, "gantry_store_evictions_total") >= 4.0,
        "at least the layers of two images: {metrics}"
    );
}
