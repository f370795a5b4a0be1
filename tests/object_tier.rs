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

/// gantry in front of the fixture's upstream, with `storage` lines (its `s3:` section).
async fn with_storage(fixture: &Fixture, storage: &str) -> Gantry {
    // Prefetch off: these tests place objects in the bucket after the manifest is fetched and
    // then ask for the blob, which a prefetch would already have put on the local disk.
    let options = Options {
        storage,
        mirroring: common::NO_PREFETCH,
        ..Options::default()
    };
    Gantry::start_with(tempfile::tempdir().unwrap(), &fixture.proxy.url(), options).await
}

/// A real upstream (the standard fixture), a Garage, and gantry in front of the one over the
/// other; `None` (SKIPPED, or a failure under CI) without the tools.
async fn gantry_over_garage() -> Option<(Garage, Fixture, Gantry)> {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return None;
    }
    let garage = Garage::start().await?;
    let fixture = Fixture::start().await;
    let gantry = with_storage(&fixture, &garage.yaml()).await;
    Some((garage, fixture, gantry))
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
    let Some((garage, fixture, gantry)) = gantry_over_garage().await else {
        return;
    };
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
    // The manifest goes up too, in the disk store's form (its media type line, then its bytes),
    // so a replica with an empty disk answers it without the upstream.
    let manifest = fixture.multi.manifest_digest.trim_start_matches("sha256:");
    let key = format!("manifests/sha256/{}/{manifest}", &manifest[..2]);
    let stored = common::wait_until(Duration::from_secs(10), || async {
        garage.object(&key).await.is_some()
    })
    .await;
    assert!(stored, "the manifest reached the bucket under {key}");
    let manifest_object = garage.object(&key).await.unwrap();
    assert!(manifest_object.starts_with(b"application/vnd.oci.image.manifest.v1+json\n"));
    assert_eq!(
        manifest_object.len() - manifest_object.iter().position(|b| *b == b'\n').unwrap() - 1,
        fixture.multi.manifest_size
    );
    let metrics = gantry.metrics().await;
    assert_eq!(
        sample(&metrics, "gantry_object_tier_uploaded_bytes_total"),
        Some((total + manifest_object.len()) as f64)
    );
    let ready = http_get(&gantry.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(ready.json()["object_tier"], "up", "{:?}", ready.body);
    // The operator's inspection says where each blob is: here, and in the bucket too.
    let inspected = http_get(
        &gantry.admin_url("/api/v1/images/inspect?image=test/multi:v1"),
        &[],
    )
    .await
    .unwrap();
    let inspected = inspected.json();
    let listed: Vec<(String, bool, bool)> = inspected["manifests"][0]["blobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no blobs in {inspected}"))
        .iter()
        .map(|blob| {
            (
                blob["digest"].as_str().unwrap().to_owned(),
                blob["local"] == true,
                blob["object_tier"] == true,
            )
        })
        .collect();
    assert_eq!(listed.len(), blobs.len(), "{inspected}");
    assert!(
        listed.iter().all(|(_, local, tier)| *local && *tier),
        "every blob is local and in the object tier: {inspected}"
    );
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
    let gantry = with_storage(&fixture, &storage).await;
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

/// What a client gets for `url`: the status, and the whole body or the error that broke it.
async fn get_body(url: &str) -> (http::StatusCode, Result<Vec<u8>, String>) {
    use http_body_util::BodyExt;
    let request = http::Request::get(url)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = common::client().request(request).await.unwrap();
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes().to_vec())
        .map_err(|e| e.to_string());
    (status, body)
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_truncated_object_is_never_served_whole_and_is_replaced_from_the_upstream() {
    let Some((garage, fixture, gantry)) = gantry_over_garage().await else {
        return;
    };
    // The manifest links the layers to the repository, as in a pull.
    let accept = ("accept", "application/vnd.oci.image.manifest.v1+json");
    let manifest = http_get(&gantry.url("/v2/test/multi/manifests/v1"), &[accept]).await;
    assert_eq!(manifest.unwrap().status, http::StatusCode::OK);
    let layers = &fixture.multi.layers;
    let (flipped, flipped_size) = layers[1].clone();
    let (short, short_size) = layers[3].clone();
    // The bucket holds, under the layers' content keys, one with a byte changed and one cut short.
    let mut wrong = vec![0x5a; flipped_size as usize];
    wrong[0] = 1;
    garage.put_object(&blob_key(&flipped), wrong).await;
    garage
        .put_object(&blob_key(&short), vec![0x5a; short_size as usize / 2])
        .await;
    fixture.proxy.clear();
    for (layer, size) in [(&flipped, flipped_size), (&short, short_size)] {
        let url = gantry.url(&format!("/v2/test/multi/blobs/{layer}"));
        let (_, first) = get_body(&url).await;
        if let Ok(bytes) = &first {
            assert_ne!(
                bytes.len() as u64,
                size,
                "bad object bytes were served as a complete blob"
            );
        }
        // The bad object is gone from the bucket, so the next request goes upstream.
        let removed = wait_until(Duration::from_secs(10), || async {
            garage.object(&blob_key(layer)).await.is_none()
                || garage
                    .object(&blob_key(layer))
                    .await
                    .map(|b| sha256(&b))
                    .as_deref()
                    == Some(layer.as_str())
        })
        .await;
        assert!(removed, "the bad object of {layer} stayed in the bucket");
        let (status, second) = get_body(&url).await;
        assert_eq!(status, http::StatusCode::OK);
        assert_eq!(sha256(&second.expect("the second GET completes")), *layer);
    }
    let gets = fixture.proxy.blob_gets();
    assert_eq!(gets.get(&flipped), Some(&1), "{gets:?}");
    assert_eq!(gets.get(&short), Some(&1), "{gets:?}");
    // The verified blobs replace them in the bucket.
    gantry.settled().await;
    for layer in [&flipped, &short] {
        let replaced = wait_until(Duration::from_secs(20), || async {
            garage
                .object(&blob_key(layer))
                .await
                .map(|b| sha256(&b))
                .as_deref()
                == Some(layer.as_str())
        })
        .await;
        assert!(
            replaced,
            "{layer} was not uploaded again after verification"
        );
    }
}
