//! Cache poisoning: content that does not match its digest is never served as complete and never
//! stored, whichever way it arrives: a corrupt blob shared by two clients at once, a manifest whose
//! `Docker-Content-Digest` lies, a manifest by digest whose bytes hash to another digest, and a
//! manifest planted in the Redis that replicas share.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::fake::{Fake, Scripted};
use common::metrics::value;
use common::redis::RedisServer;
use common::{blob_path, dir_is_empty, http_get, require_tools, wait_until, Gantry, Options};
use http::{Method, StatusCode};
use sha2::Digest as _;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// A small image manifest, different for each `seed`.
fn manifest(seed: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(seed.as_bytes()), "size": seed.len()},
        "layers": [],
    }))
    .unwrap()
}

/// Every file under `dir`, recursively (a store's `manifests/` or `blobs/`).
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).into_iter().flatten().flatten() {
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found
}

fn manifest_upstream_gets(upstream: &Fake, path: &str) -> usize {
    upstream
        .seen()
        .iter()
        .filter(|s| s.method == Method::GET && s.uri == path)
        .count()
}

/// Two clients share one download of a blob whose bytes are corrupt. The upstream is paced so
/// the second client truly joins the first one's download (`gantry_download_joins_total` = 1);
/// both transfers fail, nothing is stored, and the blob is served once the upstream is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_sharing_a_corrupt_download_both_fail_and_nothing_is_stored() {
    let content: Bytes = (0..(2u32 << 20)).map(|i| (i % 253) as u8).collect();
    let digest = digest_of(&content);
    let corrupt = Arc::new(AtomicBool::new(true));
    let served = content.clone();
    let mode = Arc::clone(&corrupt);
    let upstream = Fake::start(move |seen| {
        if !seen.uri.contains("/blobs/") {
            return Scripted::new(StatusCode::NOT_FOUND);
        }
        let mut body = served.to_vec();
        if mode.load(Ordering::SeqCst) {
            body[served.len() / 3] ^= 0xff;
        }
        let body = Bytes::from(body);
        let quarter = body.len() / 4;
        let mut reply = Scripted::new(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .header("content-length", &body.len().to_string())
            .pace(Duration::from_millis(400));
        for i in 0..4 {
            reply = reply.body(body.slice(i * quarter..(i + 1) * quarter));
        }
        reply
    })
    .await;
    let gantry = Gantry::start(&upstream.url()).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let store = gantry.dir.path().join("store");

    let first = tokio::spawn({
        let url = url.clone();
        async move { http_get(&url, &[]).await }
    });
    // The second client comes once the first one's download is running upstream.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !upstream.seen().is_empty()
                && value(&gantry.metrics().await, "gantry_downloads_in_flight") == 1.0
        })
        .await,
        "the first download started"
    );
    let second = http_get(&url, &[]).await;
    let first = first.await.unwrap();
    let metrics = gantry.metrics().await;
    assert_eq!(
        value(&metrics, "gantry_download_joins_total"),
        1.0,
        "the second client joined the first one's download"
    );
    assert_eq!(upstream.seen().len(), 1, "one upstream download for both");
    for (client, result) in [("first", &first), ("second", &second)] {
        assert!(
            result.is_err(),
            "the {client} client's transfer fails, got {:?}",
            result.as_ref().map(|r| (r.status, r.body.len()))
        );
    }
    assert_eq!(
        value(
            &metrics,
            "gantry_download_failures_total{reason=\"bad_content\"}"
        ),
        1.0
    );
    gantry.settled().await;
    assert!(!blob_path(&store, &digest).exists(), "nothing committed");
    assert!(dir_is_empty(&store.join("tmp")), "tmp/ cleaned");

    corrupt.store(false, Ordering::SeqCst);
    let (a, b) = tokio::join!(http_get(&url, &[]), http_get(&url, &[]));
    assert_eq!(a.unwrap().body, content);
    assert_eq!(b.unwrap().body, content);
    gantry.settled().await;
    assert!(blob_path(&store, &digest).exists());
}

/// An upstream whose `Docker-Content-Digest` names other bytes than it sends: the manifest is
/// refused, by tag and by digest, and nothing is stored; once the header is right it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_with_a_wrong_docker_content_digest_is_refused() {
    let sent = manifest("sent");
    let claimed = digest_of(&manifest("claimed"));
    let lying = Arc::new(AtomicBool::new(true));
    let (body, mode, claimed_header) = (sent.clone(), Arc::clone(&lying), claimed.clone());
    let upstream = Fake::start(move |seen| {
        if !seen.uri.contains("/manifests/") {
            return Scripted::new(StatusCode::NOT_FOUND);
        }
        let header = if mode.load(Ordering::SeqCst) {
            claimed_header.clone()
        } else {
            digest_of(&body)
        };
        Scripted::new(StatusCode::OK)
            .header("content-type", MANIFEST_TYPE)
            .header("docker-content-digest", &header)
            .body(body.clone())
    })
    .await;
    let gantry = Gantry::start(&upstream.url()).await;
    let accept = [("accept", MANIFEST_TYPE)];
    let store = gantry.dir.path().join("store");

    let by_tag = http_get(&gantry.url("/v2/team/app/manifests/v1"), &accept)
        .await
        .unwrap();
    assert_eq!(by_tag.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(by_tag.error_code().as_deref(), Some("UNAVAILABLE"));
    for digest in [&claimed, &digest_of(&sent)] {
        let by_digest = http_get(
            &gantry.url(&format!("/v2/team/app/manifests/{digest}")),
            &accept,
        )
        .await
        .unwrap();
        assert_eq!(
            by_digest.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{digest}"
        );
    }
    assert!(
        files_under(&store.join("manifests")).is_empty(),
        "nothing stored: {:?}",
        files_under(&store.join("manifests"))
    );

    lying.store(false, Ordering::SeqCst);
    let good = http_get(&gantry.url("/v2/team/app/manifests/v1"), &accept)
        .await
        .unwrap();
    assert_eq!(good.status, StatusCode::OK);
    assert_eq!(&good.body[..], &sent[..]);
    assert_eq!(
        good.header("docker-content-digest"),
        Some(digest_of(&sent).as_str())
    );
}

/// A manifest asked for by digest whose bytes hash to another digest is refused, whether the
/// upstream's `Docker-Content-Digest` agrees with the bytes (a consistent liar) or is absent, and
/// it is never cached under the digest asked for: the next request goes upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_by_digest_whose_bytes_hash_to_another_digest_is_refused() {
    let wanted = manifest("wanted");
    let wanted_digest = digest_of(&wanted);
    let other = manifest("other");
    let with_header = Arc::new(AtomicBool::new(true));
    let mode = Arc::clone(&with_header);
    let upstream = Fake::start(move |seen| {
        if !seen.uri.contains("/manifests/") {
            return Scripted::new(StatusCode::NOT_FOUND);
        }
        let reply = Scripted::new(StatusCode::OK).header("content-type", MANIFEST_TYPE);
        let reply = if mode.load(Ordering::SeqCst) {
            reply.header("docker-content-digest", &digest_of(&other))
        } else {
            reply
        };
        reply.body(other.clone())
    })
    .await;
    let gantry = Gantry::start(&upstream.url()).await;
    let path = format!("/v2/team/app/manifests/{wanted_digest}");
    let accept = [("accept", MANIFEST_TYPE)];

    for (round, header) in [true, false, true].into_iter().enumerate() {
        with_header.store(header, Ordering::SeqCst);
        let reply = http_get(&gantry.url(&path), &accept).await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "round {round} (Docker-Content-Digest sent: {header}): {:?}",
            reply.body
        );
        assert_eq!(reply.error_code().as_deref(), Some("UNAVAILABLE"));
        assert_eq!(
            manifest_upstream_gets(&upstream, &path),
            round + 1,
            "round {round}: nothing was cached under the digest asked for"
        );
    }
    let store = gantry.dir.path().join("store");
    let hex = wanted_digest.trim_start_matches("sha256:");
    assert!(!store
        .join("manifests/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists());
}

/// `SET key value` with a raw RESP exchange (no client library needed).
async fn redis_set(port: u16, key: &str, value: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut command = format!(
        "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
        key.len(),
        value.len()
    )
    .into_bytes();
    command.extend_from_slice(value);
    command.extend_from_slice(b"\r\n");
    stream.write_all(&command).await.unwrap();
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"+OK\r\n");
}

/// A manifest planted in Redis under the key replicas share manifests by (`gantry:manifest:v1:`
/// + digest, see src/tags/) with bytes that do not hash to that digest: a second gantry that finds
/// the tag in Redis does not serve the planted bytes; it fetches the manifest upstream instead and
/// stores the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_manifest_in_redis_is_not_served() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let real = manifest("real");
    let real_digest = digest_of(&real);
    let body = real.clone();
    let upstream = Fake::start(move |seen| {
        if !seen.uri.contains("/manifests/") {
            return Scripted::new(StatusCode::NOT_FOUND);
        }
        Scripted::new(StatusCode::OK)
            .header("content-type", MANIFEST_TYPE)
            .header("docker-content-digest", &digest_of(&body))
            .body(body.clone())
    })
    .await;
    let redis = RedisServer::start().await;
    let cache = format!("cache:\n  redis: {}", redis.url());
    let options = Options {
        extra: &cache,
        ..Options::default()
    };
    let accept = [("accept", MANIFEST_TYPE)];
    let tag_path = "/v2/team/app/manifests/v1";
    let first = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let reply = http_get(&first.url(tag_path), &accept).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let shared_key = format!("gantry:manifest:v1:{real_digest}");
    assert_eq!(
        redis.keys("gantry:manifest:*").await,
        vec![shared_key.clone()],
        "the first gantry shared the manifest"
    );
    assert_eq!(manifest_upstream_gets(&upstream, tag_path), 1);

    let planted = manifest("planted");
    let mut value = format!("{MANIFEST_TYPE}\n").into_bytes();
    value.extend_from_slice(&planted);
    redis_set(redis.port, &shared_key, &value).await;

    let second = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let reply = http_get(&second.url(tag_path), &accept).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_ne!(
        &reply.body[..],
        &planted[..],
        "the planted bytes are served"
    );
    assert_eq!(&reply.body[..], &real[..]);
    assert_eq!(
        manifest_upstream_gets(&upstream, tag_path),
        2,
        "the second gantry fetched the manifest upstream instead"
    );
    let stored = files_under(&second.dir.path().join("store/manifests"));
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].ends_with(real_digest.trim_start_matches("sha256:")));
    let on_disk = std::fs::read(&stored[0]).unwrap();
    assert!(on_disk.ends_with(&real), "the real manifest is stored");
}
