//! Prefetch on manifest (`mirroring.prefetch`): an image manifest fetched from the upstream starts
//! the downloads of its config and layers before any client asks for them, at the lowest
//! priority; an index prefetches nothing, and the switch turns it off.

mod common;

use std::path::Path;
use std::time::Duration;

use common::metrics::{sample, value};
use common::{blob_path, http_get, pull, require_tools, wait_until, Fixture, Gantry, Options};

const STARTED: &str = r#"gantry_prefetch_total{result="started"}"#;
const BUSY: &str = r#"gantry_prefetch_total{result="busy"}"#;
const IMAGE_ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
const INDEX_ACCEPT: &str = "application/vnd.oci.image.index.v1+json";

/// A gantry in front of the fixture's upstream, prefetch on as by default unless `options` say.
async fn start(fixture: &Fixture, options: Options<'_>) -> Gantry {
    Gantry::start_with(tempfile::tempdir().unwrap(), &fixture.proxy.url(), options).await
}

fn store(gantry: &Gantry) -> std::path::PathBuf {
    gantry.dir.path().join("store")
}

fn stored(store: &Path, blobs: &[String]) -> Vec<String> {
    blobs
        .iter()
        .filter(|blob| blob_path(store, blob).exists())
        .cloned()
        .collect()
}

async fn get_manifest(gantry: &Gantry, repo: &str, reference: &str, accept: &str) {
    let reply = http_get(
        &gantry.url(&format!("/v2/{repo}/manifests/{reference}")),
        &[("accept", accept)],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{repo}:{reference}");
}

/// Fetching only the manifest puts the config and every layer in the store, one upstream GET
/// each; the pull that follows is served from the store without another upstream blob GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_manifest_prefetches_its_config_and_layers() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = start(&fixture, Options::default()).await;
    let blobs = fixture.multi.blobs();
    assert!(stored(&store(&gantry), &blobs).is_empty());

    get_manifest(&gantry, "test/multi", "v1", IMAGE_ACCEPT).await;
    let all_stored = wait_until(Duration::from_secs(30), || async {
        stored(&store(&gantry), &blobs).len() == blobs.len()
    })
    .await;
    assert!(
        all_stored,
        "without any client asking, the store holds {:?} of {blobs:?}",
        stored(&store(&gantry), &blobs)
    );
    assert_eq!(
        value(&gantry.metrics().await, STARTED),
        blobs.len() as f64,
        "one prefetch per blob (config and layers)"
    );
    let gets = fixture.proxy.blob_gets();
    for blob in &blobs {
        assert_eq!(
            gets.get(blob),
            Some(&1),
            "upstream GETs of {blob}: {gets:?}"
        );
    }
    assert_eq!(gets.len(), blobs.len(), "nothing else fetched: {gets:?}");

    gantry.settled().await;
    let (_copy, pulled) = pull(&format!("{}/test/multi:v1", gantry.host()), false).await;
    pulled.unwrap();
    assert_eq!(
        fixture.proxy.blob_gets(),
        gets,
        "the pull after the prefetch made no upstream blob GET"
    );
    gantry.stop().await;
}

/// Blobs a pull found prefetched (on disk, or in flight and followed) are linked to the
/// repository like the ones it fetched itself: the next pull of every platform makes no upstream
/// request at all. (A platform manifest linked by its index used to skip linking its own layers,
/// which only the client's own blob GETs then linked: a client following a prefetch left them
/// unlinked, and the next pull sent one upstream HEAD per such blob.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_blobs_are_linked_to_the_repository() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = start(&fixture, Options::default()).await;
    let image = format!("{}/test/index:idx", gantry.host());
    pull(&image, true).await.1.expect("the first pull");
    gantry.settled().await;
    assert!(
        value(&gantry.metrics().await, STARTED) > 0.0,
        "the first pull followed prefetches"
    );

    fixture.proxy.clear();
    pull(&image, true).await.1.expect("the second pull");
    let seen: Vec<String> = fixture.proxy.seen().into_iter().map(|s| s.path).collect();
    assert!(seen.is_empty(), "no upstream request: {seen:?}");
    gantry.stop().await;
}

/// With `mirroring.prefetch: false` the same manifest fetch downloads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_off_leaves_the_layers_upstream() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = start(
        &fixture,
        Options {
            mirroring: common::NO_PREFETCH,
            ..Options::default()
        },
    )
    .await;
    get_manifest(&gantry, "test/multi", "v1", IMAGE_ACCEPT).await;
    // A prefetch is started (and counted) before the manifest is answered, and `settled` waits
    // for every download it would have started to be committed.
    assert_eq!(sample(&gantry.metrics().await, STARTED), None);
    gantry.settled().await;
    assert_eq!(
        stored(&store(&gantry), &fixture.multi.blobs()),
        Vec::<String>::new()
    );
    assert!(fixture.proxy.blob_gets().is_empty());
    gantry.stop().await;
}

/// An index names platform manifests, not blobs: fetching it prefetches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_prefetches_nothing() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = start(&fixture, Options::default()).await;
    get_manifest(&gantry, "test/index", "idx", INDEX_ACCEPT).await;
    assert_eq!(sample(&gantry.metrics().await, STARTED), None);
    gantry.settled().await;
    let blobs: Vec<String> = fixture.platforms.iter().flat_map(|p| p.blobs()).collect();
    assert_eq!(stored(&store(&gantry), &blobs), Vec::<String>::new());
    assert!(fixture.proxy.blob_gets().is_empty());

    // A platform manifest of it, fetched by digest, is an image manifest: it prefetches.
    let amd64 = &fixture.platforms[0];
    get_manifest(&gantry, "test/index", &amd64.manifest_digest, IMAGE_ACCEPT).await;
    assert_eq!(
        value(&gantry.metrics().await, STARTED),
        amd64.blobs().len() as f64
    );
    gantry.settled().await;
    assert_eq!(
        stored(&store(&gantry), &amd64.blobs()).len(),
        amd64.blobs().len()
    );
    gantry.stop().await;
}

/// Prefetches take at most half of `limits.max_downloads`, and only slots free now: with 4 slots
/// and every upstream blob answer held, 2 of the image's 5 blobs start and 3 are skipped; a client
/// asking for a skipped one still gets a slot and its blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetches_leave_half_the_download_slots_to_clients() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = start(
        &fixture,
        Options {
            extra: "limits:\n  max_downloads: 4",
            ..Options::default()
        },
    )
    .await;
    let gate = fixture.proxy.hold("/blobs/", 0);
    get_manifest(&gantry, "test/multi", "v1", IMAGE_ACCEPT).await;
    let metrics = gantry.metrics().await;
    assert_eq!(value(&metrics, STARTED), 2.0, "limits.max_downloads / 2");
    assert_eq!(value(&metrics, BUSY), 3.0);

    let held = wait_until(Duration::from_secs(10), || async { gate.held() == 2 }).await;
    assert!(
        held,
        "the two prefetches reached the upstream ({} held)",
        gate.held()
    );
    let prefetched: Vec<String> = fixture.proxy.blob_gets().into_keys().collect();
    let skipped = fixture
        .multi
        .blobs()
        .into_iter()
        .find(|blob| !prefetched.contains(blob))
        .unwrap();
    let url = gantry.url(&format!("/v2/test/multi/blobs/{skipped}"));
    let client = tokio::spawn(async move { http_get(&url, &[]).await });
    let asked = wait_until(Duration::from_secs(10), || async { gate.held() == 3 }).await;
    assert!(
        asked,
        "the client's download took a free slot beside the prefetches"
    );
    gate.open();
    let reply = client.await.unwrap().unwrap();
    assert_eq!(reply.status, 200);
    gantry.settled().await;
    gantry.stop().await;
}
