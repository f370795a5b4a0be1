//! The object tier (`storage.s3`) against a real S3-compatible server (Garage, started by
//! [`common::garage`]): uploads after commit under content keys, ranged reads, start-up errors
//! that name their key, an endpoint down at start-up, and keys never overwritten.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;

use common::garage::Garage;
use common::metrics::sample;
use common::{http_get, pull, require_tools, wait_until, Fixture, Gantry, Options};
use gantry::config::{Config, ObjectTierConfig};
use gantry::metrics::Metrics;
use gantry::oci::Digest;
use gantry::store::object::{ObjectTier, Uploaded};
use gantry::store::{Store, StoreOptions};

/// `storage.s3` lines for a config, as `Options.storage` takes them.
fn s3_yaml(endpoint: &str, bucket: &str, key_id: &str, secret: &str) -> String {
    format!(
        "  s3:\n    endpoint: {endpoint}\n    bucket: {bucket}\n    region: garage\n    access_key_id: {key_id}\n    secret_access_key: {secret}\n    allow_http: true\n"
    )
}

fn tier_config(storage: &str) -> ObjectTierConfig {
    let yaml = format!("storage:\n{storage}");
    let config = Config::from_yaml(&yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}"));
    config.storage.s3.expect("storage.s3")
}

fn blob_key(digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("blobs/sha256/{}/{hex}", &hex[..2])
}

/// Waits until gantry has finished (uploaded or skipped) `count` uploads.
async fn uploads_done(gantry: &Gantry, count: f64) {
    let done = wait_until(Duration::from_secs(30), || async {
        let metrics = gantry.metrics().await;
        let finished: f64 = ["uploaded", "present", "gone", "failed"]
            .iter()
            .filter_map(|result| {
                sample(
                    &metrics,
                    &format!("gantry_object_tier_uploads_total{{result=\"{result}\"}}"),
                )
            })
            .sum();
        finished >= count
    })
    .await;
    assert!(done, "uploads not finished:\n{}", gantry.metrics().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_image_lands_in_the_bucket_under_its_content_keys() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let Some(garage) = Garage::start().await else {
        return;
    };
    let fixture = Fixture::start().await;
    let storage = garage.yaml();
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options {
            storage: &storage,
            ..Options::default()
        },
    )
    .await;
    let (out, result) = pull(&format!("{}/test/multi:v1", gantry.host()), false).await;
    result.expect("skopeo pulls through gantry");
    gantry.settled().await;
    let blobs = fixture.multi.blobs();
    uploads_done(&gantry, blobs.len() as f64).await;
    let metrics = gantry.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"gantry_object_tier_uploads_total{result="uploaded"}"#
        ),
        Some(blobs.len() as f64),
        "{metrics}"
    );
    let image = out.path().join("image");
    let mut total = 0;
    for blob in &blobs {
        let pulled = std::fs::read(image.join(blob.trim_start_matches("sha256:"))).unwrap();
        let stored = garage.object(&blob_key(blob)).await;
        assert_eq!(
            stored.as_deref(),
            Some(pulled.as_slice()),
            "blob {blob} is in the bucket byte for byte"
        );
        total += pulled.len();
    }
    assert_eq!(
        sample(&metrics, "gantry_object_tier_uploaded_bytes_total"),
        Some(total as f64)
    );
    let ready = http_get(&gantry.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(ready.json()["object_tier"], "up", "{:?}", ready.body);
    gantry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_blob_gives_the_tail_from_an_offset_and_the_whole_size() {
    let Some(garage) = Garage::start().await else {
        return;
    };
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let digest = {
        use sha2::Digest as _;
        Digest::parse(&format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&content))
        ))
        .unwrap()
    };
    garage
        .put_object(&blob_key(&digest.to_string()), content.clone())
        .await;
    let tier = ObjectTier::connect(&tier_config(&garage.yaml()), Arc::new(Metrics::new()))
        .await
        .unwrap();
    assert!(tier.health().up);
    for offset in [0u64, 1, 123_456, 199_999] {
        let read = tier
            .read_blob(&digest, offset)
            .await
            .unwrap()
            .expect("a hit");
        assert_eq!(
            read.size, 200_000,
            "the whole object's size at offset {offset}"
        );
        let tail: Vec<u8> = read
            .chunks
            .try_fold(Vec::new(), |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            })
            .await
            .unwrap();
        assert_eq!(tail, &content[offset as usize..], "offset {offset}");
    }
    let absent = Digest::parse(&format!("sha256:{}", "0".repeat(64))).unwrap();
    assert!(tier.read_blob(&absent, 0).await.unwrap().is_none());
    assert!(tier.read_manifest(&absent).await.unwrap().is_none());
    assert!(tier.health().up, "a miss is an answer, not an outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_or_a_wrong_secret_refuses_start_up_naming_the_key() {
    let Some(garage) = Garage::start().await else {
        return;
    };
    let start = |storage: String| async move {
        let dir = tempfile::tempdir().unwrap();
        let yaml = common::config_yaml(
            dir.path(),
            "http://127.0.0.1:9",
            Options {
                storage: &storage,
                ..Options::default()
            },
        );
        let config = Config::from_yaml(&yaml, Path::new("test.yaml")).unwrap();
        match gantry::server::start(config).await {
            Ok(_) => panic!("gantry started with {storage}"),
            Err(error) => error.to_string(),
        }
    };
    let error = start(s3_yaml(
        &garage.endpoint,
        "no-such-bucket",
        &garage.key_id,
        &garage.secret,
    ))
    .await;
    assert!(error.contains("storage.s3.bucket"), "{error}");
    assert!(error.contains("no-such-bucket"), "{error}");

    let wrong = "0".repeat(garage.secret.len());
    let error = start(s3_yaml(
        &garage.endpoint,
        &garage.bucket,
        &garage.key_id,
        &wrong,
    ))
    .await;
    assert!(error.contains("storage.s3.secret_access_key"), "{error}");
    assert!(
        !error.contains(&wrong),
        "the secret is not printed: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_down_at_start_up_costs_no_pull_and_shows_in_readyz() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    let storage = s3_yaml(&closed, "gantry", "GKkey", "secret");
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options {
            storage: &storage,
            ..Options::default()
        },
    )
    .await;
    let (_out, result) = pull(&format!("{}/test/multi:v1", gantry.host()), false).await;
    result.expect("the pull succeeds without the object tier");
    gantry.settled().await;
    let ready = http_get(&gantry.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(ready.status, http::StatusCode::OK);
    let body = ready.json();
    let tier = body["object_tier"].as_str().unwrap_or_default().to_owned();
    assert!(tier.starts_with("down"), "{body}");
    let metrics = gantry.metrics().await;
    assert_eq!(
        sample(&metrics, "gantry_object_tier_up"),
        Some(0.0),
        "{metrics}"
    );
    gantry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_key_is_never_overwritten() {
    let Some(garage) = Garage::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), StoreOptions::default(), Arc::clone(&metrics)).unwrap();
    let tier = ObjectTier::connect(&tier_config(&garage.yaml()), Arc::clone(&metrics))
        .await
        .unwrap();
    let commit = |content: Vec<u8>| {
        let store = Arc::clone(&store);
        async move {
            use sha2::Digest as _;
            let digest = Digest::parse(&format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(&content))
            ))
            .unwrap();
            let mut writer = store
                .begin_blob(&digest, Some(content.len() as u64))
                .unwrap();
            writer.write(Bytes::from(content)).await.unwrap();
            writer.commit().await.unwrap();
            let file = store.open_blob(&digest).await.unwrap();
            (digest, file)
        }
    };

    // Uploaded once, then skipped.
    let fresh = vec![7u8; 10_000];
    let (digest, file) = commit(fresh.clone()).await;
    assert_eq!(
        tier.upload_blob(&digest, &file).await.unwrap(),
        Uploaded::Stored { bytes: 10_000 }
    );
    assert_eq!(
        tier.upload_blob(&digest, &file).await.unwrap(),
        Uploaded::Present
    );
    assert_eq!(
        garage.object(&blob_key(&digest.to_string())).await,
        Some(fresh)
    );

    // A planted object stays as planted, even when it is not the content.
    let (digest, file) = commit(vec![9u8; 20_000]).await;
    let key = blob_key(&digest.to_string());
    garage.put_object(&key, b"planted".to_vec()).await;
    assert_eq!(
        tier.upload_blob(&digest, &file).await.unwrap(),
        Uploaded::Present
    );
    assert_eq!(garage.object(&key).await, Some(b"planted".to_vec()));
}
