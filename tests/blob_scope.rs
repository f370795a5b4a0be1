//! Cached content is scoped to the repositories that reference it, as in the registry behind the
//! mirror: a client allowed on one repository cannot read another repository's blobs or
//! manifests by digest just because they are cached. One copy per digest stays on disk.

mod common;

use std::time::Duration;

use base64::Engine as _;
use http::{Method, StatusCode};
use sha2::Digest as _;

use common::metrics::value;
use common::process::GantryProcess;
use common::{
    http_get, push, request, require_tools, CountingProxy, Gantry, Layout, Options, Registry,
    ACCEPT_ALL,
};

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A GET with credentials, accepting every manifest type.
async fn get_as(url: String, authorization: String) -> common::Reply {
    http_get(
        &url,
        &[("authorization", &authorization), ("accept", ACCEPT_ALL)],
    )
    .await
    .unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Two repositories on a real upstream; alice may pull only `library/small`, the admin all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_cached_for_one_repository_is_not_served_under_another() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let registry = Registry::start().await;
    let layout_dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(layout_dir.path());
    let small = layout.image("amd64", &[40_000], 61);
    let big = layout.image("amd64", &[300_000, 200_000], 62);
    layout.tag_image("small", &small);
    layout.tag_image("big", &big);
    layout.write_index();
    push(
        layout_dir.path(),
        "small",
        &registry.host(),
        "library/small",
    )
    .await;
    push(layout_dir.path(), "big", &registry.host(), "library/big").await;
    let proxy = CountingProxy::start(registry.addr).await;

    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    let alice = bcrypt::hash("alice-pw", 5).unwrap();
    let admin = bcrypt::hash("admin-pw", 5).unwrap();
    std::fs::write(&users, format!("alice:{alice}\nadmin:{admin}\n")).unwrap();
    let extra = format!(
        "auth:\n  htpasswd: {}\n  rules:\n    - repositories: [\"*/library/small\"]\n      users: [alice, admin]\n    - repositories: [\"*/library/big\"]\n      users: [admin]\n",
        users.display()
    );
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    let mut gantry = GantryProcess::configure(dir.path(), &proxy.url(), options);
    gantry.start().await;
    let alice = basic("alice", "alice-pw");
    let admin = basic("admin", "admin-pw");
    let get = |path: String, auth: String| get_as(gantry.url(&path), auth);

    // The admin pulls library/big: its manifest and blobs are now cached.
    let manifest = get("/v2/library/big/manifests/big".into(), admin.clone()).await;
    assert_eq!(manifest.status, StatusCode::OK, "{}", gantry.log());
    for blob in big.blobs() {
        let reply = get(format!("/v2/library/big/blobs/{blob}"), admin.clone()).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(sha256(&reply.body), blob);
    }

    // alice asks for a big layer under the repository she may pull: the upstream says it does
    // not hold it there, and so does the mirror, cached or not.
    proxy.clear();
    let foreign = &big.layers[0].0;
    let reply = get(format!("/v2/library/small/blobs/{foreign}"), alice.clone()).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{:?}", reply.body);
    assert_eq!(reply.error_code().as_deref(), Some("BLOB_UNKNOWN"));
    let head = request(
        Method::HEAD,
        &gantry.url(&format!("/v2/library/small/blobs/{foreign}")),
        &[("authorization", &alice)],
    )
    .await
    .unwrap();
    assert_eq!(head.status, StatusCode::NOT_FOUND);
    // Asked the upstream, under library/small, and downloaded nothing.
    assert!(proxy.count(&Method::HEAD, &format!("/v2/library/small/blobs/{foreign}")) >= 1);
    assert_eq!(proxy.count(&Method::GET, "/blobs/"), 0);
    // The same for big's manifest by digest.
    let reply = get(
        format!("/v2/library/small/manifests/{}", big.manifest_digest),
        alice.clone(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    // And alice may not ask under library/big at all.
    let reply = get(format!("/v2/library/big/blobs/{foreign}"), alice.clone()).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);

    // Her own repository: its manifest links its blobs, which are then served.
    let reply = get("/v2/library/small/manifests/small".into(), alice.clone()).await;
    assert_eq!(reply.status, StatusCode::OK);
    for blob in small.blobs() {
        let reply = get(format!("/v2/library/small/blobs/{blob}"), alice.clone()).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(sha256(&reply.body), blob);
    }

    // Links survive a restart: with the upstream gone, small's blobs and its manifest by digest
    // are still served to alice, and big's layer is still not.
    gantry.signal("TERM");
    assert!(gantry.wait(Duration::from_secs(20)).await.success());
    gantry.start().await;
    proxy.set_down(true);
    let get = |path: String, auth: String| get_as(gantry.url(&path), auth);
    for blob in small.blobs() {
        let reply = get(format!("/v2/library/small/blobs/{blob}"), alice.clone()).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", gantry.log());
        assert_eq!(sha256(&reply.body), blob);
    }
    let reply = get(
        format!("/v2/library/small/manifests/{}", small.manifest_digest),
        alice.clone(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = get(format!("/v2/library/small/blobs/{foreign}"), alice.clone()).await;
    assert!(
        !reply.status.is_success(),
        "an unlinked blob is never served from the cache: {}",
        reply.status
    );
    // One copy per digest on disk, links beside it.
    let store = dir.path().join("store");
    assert!(common::blob_path(&store, foreign).is_file());
    let hex = foreign.trim_start_matches("sha256:");
    let links =
        std::fs::read_to_string(store.join("links/sha256").join(&hex[..2]).join(hex)).unwrap();
    assert_eq!(links.trim(), format!("{}/library/big", proxy.addr));
}

/// The link check on a warm hit is a lookup; the first request under a new repository costs one
/// upstream HEAD, counted, and none after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_layer_is_confirmed_once_per_repository() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let registry = Registry::start().await;
    let layout_dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(layout_dir.path());
    let image = layout.image("amd64", &[50_000], 63);
    layout.tag_image("v1", &image);
    layout.write_index();
    // The same image in two repositories: the upstream holds its blobs in both.
    push(layout_dir.path(), "v1", &registry.host(), "team/one").await;
    push(layout_dir.path(), "v1", &registry.host(), "team/two").await;
    let proxy = CountingProxy::start(registry.addr).await;
    let gantry = Gantry::start(&proxy.url()).await;
    let layer = &image.layers[0].0;
    let one = http_get(&gantry.url(&format!("/v2/team/one/blobs/{layer}")), &[])
        .await
        .unwrap();
    assert_eq!(one.status, StatusCode::OK);
    gantry.settled().await;
    proxy.clear();
    for _ in 0..3 {
        let two = http_get(&gantry.url(&format!("/v2/team/two/blobs/{layer}")), &[])
            .await
            .unwrap();
        assert_eq!(two.status, StatusCode::OK);
        assert_eq!(sha256(&two.body), *layer);
    }
    assert_eq!(proxy.count(&Method::HEAD, "/v2/team/two/blobs/"), 1);
    assert_eq!(
        proxy.count(&Method::GET, "/blobs/"),
        0,
        "served from the one cached copy"
    );
    let metrics = gantry.metrics().await;
    assert_eq!(
        value(
            &metrics,
            r#"gantry_repository_checks_total{result="linked"}"#
        ),
        1.0
    );
}

/// A download started under one repository is not joined under another without the upstream's
/// word: the second repository's request is checked with a HEAD (here: 404) while the first
/// client's download runs on, held at a gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_in_flight_is_joined_only_under_a_repository_the_upstream_confirms() {
    use common::raw_fake::{Gate, Raw, RawFake};
    let content = bytes::Bytes::from(vec![7u8; 2 << 20]);
    let digest = sha256(&content);
    let gate = Gate::new();
    let (held, body, served) = (gate.clone(), content.clone(), digest.clone());
    let upstream = RawFake::start(move |target| {
        if target.contains(&format!("/v2/team/one/blobs/{served}")) {
            return Raw::head(
                200,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-length", &body.len().to_string()),
                ],
            )
            .bytes(body.slice(..1 << 20))
            .gate(&held)
            .bytes(body.slice(1 << 20..));
        }
        Raw::not_found()
    })
    .await;
    let gantry = Gantry::start(&upstream.url()).await;
    let first = tokio::spawn({
        let url = gantry.url(&format!("/v2/team/one/blobs/{digest}"));
        async move { http_get(&url, &[]).await }
    });
    let in_flight = common::wait_until(Duration::from_secs(10), || async {
        value(&gantry.metrics().await, "gantry_downloads_in_flight") == 1.0
    })
    .await;
    assert!(in_flight, "the first download is running");
    let other = http_get(&gantry.url(&format!("/v2/team/two/blobs/{digest}")), &[])
        .await
        .unwrap();
    assert_eq!(other.status, StatusCode::NOT_FOUND, "{:?}", other.body);
    let seen = upstream.seen();
    assert!(
        seen.iter()
            .any(|r| r.starts_with("HEAD") && r.contains("/v2/team/two/blobs/")),
        "{seen:?}"
    );
    assert!(!gate.is_open());
    gate.open();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(sha256(&first.body), digest);
    let metrics = gantry.metrics().await;
    assert_eq!(value(&metrics, "gantry_download_joins_total"), 1.0);
    assert_eq!(
        value(
            &metrics,
            r#"gantry_repository_checks_total{result="refused"}"#
        ),
        1.0
    );
}

/// With Redis, a link one replica learned is known to the others: the second replica serves the
/// shared layer under the new repository without asking the upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_learned_by_one_replica_is_known_to_another_through_redis() {
    if !require_tools(&["docker-registry", "skopeo", "redis-server"]) {
        return;
    }
    let registry = Registry::start().await;
    let layout_dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(layout_dir.path());
    let image = layout.image("amd64", &[60_000], 64);
    layout.tag_image("v1", &image);
    layout.write_index();
    push(layout_dir.path(), "v1", &registry.host(), "team/one").await;
    push(layout_dir.path(), "v1", &registry.host(), "team/two").await;
    let proxy = CountingProxy::start(registry.addr).await;
    let redis = common::redis::RedisServer::start().await;
    let cache = format!("cache:\n  redis: {}", redis.url());
    let options = Options {
        extra: &cache,
        ..Options::default()
    };
    let a = Gantry::start_with(tempfile::tempdir().unwrap(), &proxy.url(), options).await;
    let b = Gantry::start_with(tempfile::tempdir().unwrap(), &proxy.url(), options).await;
    let layer = &image.layers[0].0;
    // Both replicas cache the layer under team/one.
    for gantry in [&a, &b] {
        let reply = http_get(&gantry.url(&format!("/v2/team/one/blobs/{layer}")), &[])
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        gantry.settled().await;
    }
    proxy.clear();
    let on_a = http_get(&a.url(&format!("/v2/team/two/blobs/{layer}")), &[])
        .await
        .unwrap();
    assert_eq!(on_a.status, StatusCode::OK);
    assert_eq!(
        proxy.count(&Method::HEAD, "/v2/team/two/blobs/"),
        1,
        "a asked"
    );
    let on_b = http_get(&b.url(&format!("/v2/team/two/blobs/{layer}")), &[])
        .await
        .unwrap();
    assert_eq!(on_b.status, StatusCode::OK);
    assert_eq!(sha256(&on_b.body), *layer);
    assert_eq!(
        proxy.count(&Method::HEAD, "/v2/team/two/blobs/"),
        1,
        "b knew the link from Redis: {:?}",
        proxy.seen()
    );
    assert_eq!(proxy.count(&Method::GET, "/blobs/"), 0);
}
