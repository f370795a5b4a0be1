//! The control plane's mutations against a real upstream (docker-registry behind a counting
//! proxy), driven through the real `gantry` binary's `rm`, `pin` and `refresh` against the
//! admin listener of a gantry that skopeo pulls through.

mod common;

use common::control::{gantry_ctl, store_files as files};
use common::images::Layout;
use common::{pull, push, Fixture, Gantry, Options};

fn admin(gantry: &Gantry) -> String {
    gantry.admin_url("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_purges_an_image_and_the_next_pull_goes_upstream_with_no_orphan_left() {
    let fixture = Fixture::start().await;
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options::default(),
    )
    .await;
    let store = gantry.dir.path().join("store");
    let image = format!("{}/test/multi:v1", gantry.host());
    pull(&image, false).await.1.expect("first pull");
    gantry.settled().await;
    assert_eq!(files(&store, "blobs").len(), fixture.multi.blobs().len());
    assert!(!files(&store, "manifests").is_empty());

    let output = gantry_ctl(&admin(&gantry), &["rm", "test/multi:v1"]).await;
    assert!(output.success, "{}", output.text());
    assert!(
        output
            .text()
            .contains("removed 1 tag(s), 1 manifest(s), 5 blob(s)"),
        "{}",
        output.text()
    );
    assert!(
        files(&store, "blobs").is_empty(),
        "{:?}",
        files(&store, "blobs")
    );
    assert!(files(&store, "manifests").is_empty());
    assert!(common::dir_is_empty(&store.join("tmp")));

    fixture.proxy.clear();
    pull(&image, false)
        .await
        .1
        .expect("the pull after the purge");
    gantry.settled().await;
    let gets = fixture.proxy.blob_gets();
    for blob in fixture.multi.blobs() {
        assert_eq!(
            gets.get(&blob).copied(),
            Some(1),
            "{blob} again from upstream: {gets:?}"
        );
    }
    assert!(
        fixture.proxy.count(&http::Method::GET, "/manifests/") >= 1,
        "the purged manifest is fetched upstream again"
    );

    // One reference that matches nothing: named, non-zero, and the other one still applies.
    let output = gantry_ctl(&admin(&gantry), &["rm", "test/nothing:v9", "test/multi:v1"]).await;
    assert!(!output.success, "{}", output.text());
    assert!(
        output.text().contains("test/nothing:v9"),
        "{}",
        output.text()
    );
    assert!(files(&store, "blobs").is_empty());
    let output = gantry_ctl(&admin(&gantry), &["rm", "--json", "test/multi:v1"]).await;
    assert!(!output.success, "purged already: {}", output.text());
    let answer: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(answer["error"]["code"], "NOT_FOUND", "{answer}");
    gantry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_is_refused_and_nothing_changes() {
    let fixture = Fixture::start().await;
    let token = "an-admin-token-of-24-chars";
    let extra = format!("admin:\n  token: {token}\n");
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options {
            extra: &extra,
            ..Options::default()
        },
    )
    .await;
    let store = gantry.dir.path().join("store");
    pull(&format!("{}/test/multi:v1", gantry.host()), false)
        .await
        .1
        .expect("pull");
    gantry.settled().await;
    let before = files(&store, "blobs");
    for args in [
        vec!["rm", "test/multi:v1"],
        vec![
            "rm",
            "--token",
            "not-the-admin-token-at-all",
            "test/multi:v1",
        ],
        vec![
            "pin",
            "--token",
            "not-the-admin-token-at-all",
            "test/multi:v1",
        ],
    ] {
        let output = gantry_ctl(&admin(&gantry), &args).await;
        assert!(!output.success, "{args:?}: {}", output.text());
        assert!(output.text().contains("401"), "{args:?}: {}", output.text());
        assert_eq!(files(&store, "blobs"), before, "{args:?} changed nothing");
    }
    assert!(!store.join("pins").exists(), "nothing was pinned");
    let output = gantry_ctl(&admin(&gantry), &["rm", "--token", token, "test/multi:v1"]).await;
    assert!(output.success, "{}", output.text());
    assert!(files(&store, "blobs").is_empty());
    gantry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_image_outlives_a_store_filled_past_max_size() {
    let fixture = Fixture::start().await;
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options {
            storage: "  max_size: 1MiB",
            ..Options::default()
        },
    )
    .await;
    let pinned = format!("{}/test/index:idx", gantry.host());
    pull(&pinned, true).await.1.expect("pull of the index");
    gantry.settled().await;
    let output = gantry_ctl(&admin(&gantry), &["pin", "test/index:idx"]).await;
    assert!(output.success, "{}", output.text());
    // The index, two platform manifests, two configs and four layers.
    assert!(
        output.text().contains("pinned 9 digest(s) (9 new)"),
        "{}",
        output.text()
    );

    // 4.35 MB of other content through a 1 MiB store.
    pull(&format!("{}/test/multi:v1", gantry.host()), false)
        .await
        .1
        .expect("pull of the filler");
    gantry.settled().await;
    let store = gantry.dir.path().join("store");
    assert!(
        files(&store, "blobs").len() < fixture.multi.blobs().len() + 6,
        "the filler was evicted at least in part"
    );

    fixture.proxy.clear();
    let (_copy, pulled) = pull(&pinned, true).await;
    pulled.expect("the pinned image is served");
    assert!(
        fixture.proxy.seen().is_empty(),
        "no upstream request: {:?}",
        fixture
            .proxy
            .seen()
            .iter()
            .map(|s| s.path.clone())
            .collect::<Vec<_>>()
    );
    // Unpinned, nothing is pinned any more, durably.
    let output = gantry_ctl(&admin(&gantry), &["unpin", "test/index:idx"]).await;
    assert!(output.success, "{}", output.text());
    assert_eq!(std::fs::read_to_string(store.join("pins")).unwrap(), "");
    gantry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_after_a_retag_upstream_shows_the_new_digest_inside_the_ttl() {
    let fixture = Fixture::start().await;
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options::default(),
    )
    .await;
    let image = format!("{}/test/multi:v1", gantry.host());
    pull(&image, false).await.1.expect("pull");
    gantry.settled().await;
    let url = gantry.url("/v2/test/multi/manifests/v1");
    let headers = [("accept", common::ACCEPT_ALL)];
    common::http_get(&url, &headers).await.unwrap();

    let layout_dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(layout_dir.path());
    let retagged = layout.image("amd64", &[40_000], 77);
    layout.tag_image("v1", &retagged);
    layout.write_index();
    push(
        layout_dir.path(),
        "v1",
        &fixture.registry.host(),
        "test/multi",
    )
    .await;

    // Inside the 10 minute TTL the mirror still answers the old digest, to skopeo too…
    let old = common::http_get(&url, &headers).await.unwrap();
    assert_eq!(
        old.header("docker-content-digest"),
        Some(fixture.multi.manifest_digest.as_str())
    );
    // …until a refresh.
    let output = gantry_ctl(&admin(&gantry), &["refresh", "--json", "test/multi:v1"]).await;
    assert!(output.success, "{}", output.text());
    let answer: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    let result = &answer["results"][0];
    assert_eq!(
        result["before"],
        fixture.multi.manifest_digest.as_str(),
        "{answer}"
    );
    assert_eq!(
        result["after"],
        retagged.manifest_digest.as_str(),
        "{answer}"
    );
    let new = common::http_get(&url, &headers).await.unwrap();
    assert_eq!(
        new.header("docker-content-digest"),
        Some(retagged.manifest_digest.as_str())
    );
    let (copy, pulled) = pull(&image, false).await;
    pulled.expect("pull after the refresh");
    let manifest = copy.path().join("image/manifest.json");
    assert_eq!(common::file_digest(&manifest), retagged.manifest_digest);
    gantry.stop().await;
}
