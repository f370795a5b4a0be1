//! `gantry gc --verify` run as the real command on a store that gantry filled, with one blob
//! damaged on disk: the damaged entry is removed, the good ones are kept byte for byte, the
//! report names what was checked and removed (and the exit code says so), and gantry fetches the
//! removed blob again on the next request.

mod common;

use std::path::Path;
use std::process::Output;

use bytes::Bytes;
use common::fake::{Fake, Scripted};
use common::{blob_path, config_yaml, file_digest, http_get, Gantry, Options};
use http::StatusCode;
use sha2::Digest as _;

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

async fn gantry_gc(config: &Path, verify: bool) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gantry"));
    command.arg("gc").arg("--config").arg(config);
    if verify {
        command.arg("--verify");
    }
    tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .expect("gc finishes")
        .expect("the gantry binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_verify_removes_a_corrupt_blob_and_keeps_the_rest() {
    let blobs: Vec<(String, Bytes)> = [300_000u32, 500_000]
        .iter()
        .map(|size| {
            let content: Bytes = (0..*size)
                .map(|i| (i % 249) as u8 ^ (*size as u8))
                .collect();
            (digest_of(&content), content)
        })
        .collect();
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    let manifest_digest = digest_of(manifest);
    let served = blobs.clone();
    let upstream = Fake::start(move |seen| {
        if seen.uri.contains("/manifests/") {
            return Scripted::new(StatusCode::OK)
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(&manifest[..]);
        }
        match served.iter().find(|(digest, _)| seen.uri.ends_with(digest)) {
            Some((_, content)) => Scripted::new(StatusCode::OK)
                .header("content-length", &content.len().to_string())
                .body(content.clone()),
            None => Scripted::new(StatusCode::NOT_FOUND),
        }
    })
    .await;

    // gantry fills its store: one manifest and two blobs.
    let gantry = Gantry::start(&upstream.url()).await;
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    let reply = http_get(&gantry.url("/v2/team/app/manifests/v1"), &accept)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    for (digest, content) in &blobs {
        let reply = http_get(&gantry.url(&format!("/v2/team/app/blobs/{digest}")), &[])
            .await
            .unwrap();
        assert_eq!(&reply.body, content);
    }
    gantry.settled().await;
    let dir = gantry.stop().await;
    let store = dir.path().join("store");
    let (good, damaged) = (&blobs[0], &blobs[1]);
    let damaged_path = blob_path(&store, &damaged.0);
    let mut bytes = std::fs::read(&damaged_path).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&damaged_path, &bytes).unwrap();
    let leftover = store.join("tmp/left-by-a-crash");
    std::fs::write(&leftover, b"partial").unwrap();
    let config = dir.path().join("gantry.yaml");
    std::fs::write(
        &config,
        config_yaml(dir.path(), &upstream.url(), Options::default()),
    )
    .unwrap();

    // Without --verify, gc clears tmp/ but does not re-hash: the damage is still there.
    let plain = gantry_gc(&config, false).await;
    assert!(plain.status.success(), "{}", text(&plain));
    let report = String::from_utf8_lossy(&plain.stdout);
    assert!(
        report.contains("3 entries") && report.contains("tmp/ cleared"),
        "{report}"
    );
    assert!(!report.contains("verified"), "{report}");
    assert!(!leftover.exists(), "tmp/ is cleared");
    assert!(damaged_path.exists());

    let verify = gantry_gc(&config, true).await;
    let output = text(&verify);
    assert_eq!(
        verify.status.code(),
        Some(2),
        "removing corrupt entries is reported in the exit code: {output}"
    );
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(
        stdout.contains("verified 3 entries: 2 matched their digests, 1 did not and were removed"),
        "{output}"
    );
    assert!(
        stdout.contains(&format!("removed corrupt blob {}", damaged.0)),
        "the report names the removed entry: {output}"
    );
    assert!(
        String::from_utf8_lossy(&verify.stderr).contains("gc removed 1 corrupt entries"),
        "{output}"
    );
    let hex = manifest_digest.trim_start_matches("sha256:");
    let manifest_path = store.join("manifests/sha256").join(&hex[..2]).join(hex);
    let good_path = blob_path(&store, &good.0);
    let kept = [&manifest_path, &good_path]
        .iter()
        .map(|path| std::fs::metadata(path).unwrap().len())
        .sum::<u64>();
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains(&format!(
            "2 entries, {kept} bytes; tmp/ cleared, every entry verified"
        )),
        "{output}"
    );
    assert!(
        output.contains("removing an entry that does not match its digest")
            && output.contains(&damaged.0.trim_start_matches("sha256:").to_owned()),
        "the removal is reported, naming the file: {output}"
    );
    assert!(!damaged_path.exists(), "the damaged blob is removed");
    assert_eq!(file_digest(&good_path), good.0, "the good blob is kept");
    assert!(
        std::fs::read(&manifest_path).unwrap().ends_with(manifest),
        "the manifest is kept"
    );

    // A second pass finds nothing more to remove.
    let again = gantry_gc(&config, true).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        !text(&again).contains("removing an entry") && !text(&again).contains("removed corrupt"),
        "{}",
        text(&again)
    );
    assert!(
        String::from_utf8_lossy(&again.stdout)
            .contains("verified 2 entries: 2 matched their digests, 0 did not"),
        "{}",
        text(&again)
    );

    // gantry serves the removed blob again, fetched afresh.
    upstream.clear();
    let gantry = Gantry::start_with(dir, &upstream.url(), Options::default()).await;
    let reply = http_get(
        &gantry.url(&format!("/v2/team/app/blobs/{}", damaged.0)),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(reply.body, damaged.1);
    assert_eq!(upstream.seen().len(), 1, "fetched from the upstream again");
    gantry.settled().await;
    assert_eq!(file_digest(&damaged_path), damaged.0);
}

/// A store gc cannot open is a failure with a message and a non-zero exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_fails_loudly_on_a_store_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    // storage.path is a file, so the store cannot be created there.
    std::fs::write(dir.path().join("store"), b"not a directory").unwrap();
    let config = dir.path().join("gantry.yaml");
    std::fs::write(
        &config,
        config_yaml(dir.path(), "http://127.0.0.1:1", Options::default()),
    )
    .unwrap();
    let output = gantry_gc(&config, true).await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("gantry: gc failed"),
        "{}",
        text(&output)
    );
}
