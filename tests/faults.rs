//! Fault injection: an upstream that stalls, lies about Content-Length or answers 500/429 storms,
//! a disk that fills during a download, a commit that fails after verification, and gantry
//! SIGKILLed during 8 concurrent downloads.
//! Afterwards nothing corrupt is served and nothing committed is lost.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{Ending, Fake, Scripted};
use common::process::GantryProcess;
use common::{blob_path, dir_is_empty, http_get, skip_unless, wait_until, Gantry, Options};
use http::StatusCode;
use sha2::Digest as _;

fn blob(size: usize, seed: u8) -> (Bytes, String) {
    let content: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
    (Bytes::from(content), digest)
}

/// Serves the given blobs by digest; `mode`: 0 good, 1 stall halfway, 2 short body, 3 500, 4 429.
async fn blob_upstream(blobs: Vec<(Bytes, String)>, mode: Arc<AtomicU8>) -> Fake {
    Fake::start(move |seen| {
        let Some((content, _)) = blobs
            .iter()
            .find(|(_, digest)| seen.uri.contains(digest.as_str()))
        else {
            return Scripted::new(StatusCode::NOT_FOUND);
        };
        let ok = Scripted::new(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .header("content-length", &content.len().to_string());
        let half = content.len() / 2;
        match mode.load(Ordering::SeqCst) {
            0 => ok.body(content.slice(..half)).body(content.slice(half..)),
            1 => ok.body(content.slice(..half)).ending(Ending::Stall),
            // Announces the full length, sends half, and ends the response as if complete.
            2 => ok.body(content.slice(..half)).ending(Ending::Abort),
            3 => Scripted::json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"errors": []}),
            ),
            _ => Scripted::json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"errors": []}),
            )
            .header("retry-after", "30"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_short_upstream_body_fails_cleanly() {
    let (content, digest) = blob(2 << 20, 1);
    let mode = Arc::new(AtomicU8::new(1));
    let upstream = blob_upstream(vec![(content.clone(), digest.clone())], Arc::clone(&mode)).await;
    let options = Options {
        timeouts: "  idle: 1s",
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let store = gantry.dir.path().join("store");

    let started = Instant::now();
    assert!(
        http_get(&url, &[]).await.is_err(),
        "a stalled upstream fails the client's transfer"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by timeouts.idle"
    );
    mode.store(2, Ordering::SeqCst);
    assert!(
        http_get(&url, &[]).await.is_err(),
        "a short body fails the client's transfer"
    );
    assert!(!blob_path(&store, &digest).exists());
    assert!(
        wait_until(Duration::from_secs(5), || async {
            dir_is_empty(&store.join("tmp"))
        })
        .await
    );

    mode.store(0, Ordering::SeqCst);
    let good = http_get(&url, &[]).await.unwrap();
    assert_eq!(good.body, content);
    gantry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_storms_get_quick_clear_answers_and_gantry_stays_healthy() {
    let (content, digest) = blob(64 << 10, 2);
    let (cached_content, cached_digest) = blob(32 << 10, 3);
    let mode = Arc::new(AtomicU8::new(0));
    let upstream = blob_upstream(
        vec![
            (content, digest.clone()),
            (cached_content.clone(), cached_digest.clone()),
        ],
        Arc::clone(&mode),
    )
    .await;
    let gantry = Gantry::start(&upstream.url()).await;
    let cached_url = gantry.url(&format!("/v2/team/app/blobs/{cached_digest}"));
    assert_eq!(
        http_get(&cached_url, &[]).await.unwrap().body,
        cached_content
    );

    for (storm, status, code) in [
        (3, StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        (4, StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
    ] {
        mode.store(storm, Ordering::SeqCst);
        let started = Instant::now();
        let requests = (0..200).map(|i| {
            let url = gantry.url(&format!("/v2/team/app{}/blobs/{digest}", i % 7));
            async move { http_get(&url, &[]).await.unwrap() }
        });
        for reply in futures_util::future::join_all(requests).await {
            assert_eq!(reply.status, status);
            assert_eq!(reply.error_code().as_deref(), Some(code));
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "storm {storm} answered promptly"
        );
        // What was cached is still served, and the process is healthy.
        assert_eq!(
            http_get(&cached_url, &[]).await.unwrap().body,
            cached_content
        );
        assert_eq!(
            http_get(&gantry.admin_url("/healthz"), &[])
                .await
                .unwrap()
                .status,
            StatusCode::OK
        );
    }
    assert_eq!(
        gantry
            .metrics()
            .await
            .matches("gantry_downloads_in_flight 0")
            .count(),
        1
    );
}

/// Mounts a small tmpfs as the store; returns false (mount's complaint printed) when mounting is
/// not permitted here.
fn mount_small_tmpfs(dir: &Path, size: &str) -> bool {
    let output = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output();
    match output {
        Ok(output) if output.status.success() => true,
        Ok(output) => {
            eprintln!("mount: {}", String::from_utf8_lossy(&output.stderr).trim());
            false
        }
        Err(error) => {
            eprintln!("mount: {error}");
            false
        }
    }
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_download_and_keeps_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    if !skip_unless(
        mount_small_tmpfs(&store, "3m"),
        "cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)",
    ) {
        return;
    }
    let _unmount = Unmount(store.clone());
    let (small, small_digest) = blob(256 << 10, 4);
    let (large, large_digest) = blob(4 << 20, 5);
    let mode = Arc::new(AtomicU8::new(0));
    let upstream = blob_upstream(
        vec![
            (small.clone(), small_digest.clone()),
            (large, large_digest.clone()),
        ],
        Arc::clone(&mode),
    )
    .await;
    let gantry = Gantry::start_with(dir, &upstream.url(), Options::default()).await;
    let small_url = gantry.url(&format!("/v2/team/app/blobs/{small_digest}"));
    assert_eq!(http_get(&small_url, &[]).await.unwrap().body, small);

    let large_url = gantry.url(&format!("/v2/team/app/blobs/{large_digest}"));
    assert!(
        http_get(&large_url, &[]).await.is_err(),
        "the disk fills: the transfer fails"
    );
    assert!(!blob_path(&store, &large_digest).exists());
    assert!(
        wait_until(Duration::from_secs(5), || async {
            dir_is_empty(&store.join("tmp"))
        })
        .await,
        "tmp/ freed"
    );
    let metrics = gantry.metrics().await;
    assert!(
        metrics.contains("gantry_download_failures_total{reason=\"io\"} 1"),
        "{metrics}"
    );
    // What was committed before is still served, byte for byte.
    assert_eq!(http_get(&small_url, &[]).await.unwrap().body, small);
    drop(gantry);
}

/// Clients get a blob's last bytes once it is verified, not once it is durable: a commit that
/// fails afterwards (here: its directory cannot be created) costs the cache, not the clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_blob_reaches_its_clients_even_if_the_store_cannot_keep_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (content, digest) = blob(3 << 20, 6);
    // A file where the blob's fan-out directory should be: the rename into place fails.
    let fan_out = blob_path(&store, &digest).parent().unwrap().to_owned();
    std::fs::create_dir_all(fan_out.parent().unwrap()).unwrap();
    std::fs::write(&fan_out, b"not a directory").unwrap();
    let upstream = blob_upstream(
        vec![(content.clone(), digest.clone())],
        Arc::new(AtomicU8::new(0)),
    )
    .await;
    let gantry = Gantry::start_with(dir, &upstream.url(), Options::default()).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let (first, second) = tokio::join!(http_get(&url, &[]), http_get(&url, &[]));
    for answer in [first, second] {
        let answer = answer.expect("a verified blob is delivered whole");
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, content);
    }
    assert!(
        wait_until(Duration::from_secs(5), || async {
            gantry
                .metrics()
                .await
                .contains("gantry_download_failures_total{reason=\"io\"} 1")
        })
        .await,
        "the failed commit is counted"
    );
    assert!(dir_is_empty(&store.join("tmp")), "nothing left in tmp/");
    assert!(!blob_path(&store, &digest).exists());
    // Not cached, so the next request goes upstream again, and is still served.
    let upstream_gets = || {
        upstream
            .seen()
            .iter()
            .filter(|seen| seen.method == http::Method::GET && seen.uri.contains(&digest))
            .count()
    };
    let before = upstream_gets();
    assert_eq!(http_get(&url, &[]).await.unwrap().body, content);
    assert_eq!(upstream_gets(), before + 1);
    drop(gantry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_eight_downloads_loses_nothing_committed() {
    let blobs: Vec<(Bytes, String)> = (0..9)
        .map(|i| blob((1 << 20) + i * 1000, 10 + i as u8))
        .collect();
    let mode = Arc::new(AtomicU8::new(0));
    let upstream = blob_upstream(blobs.clone(), Arc::clone(&mode)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut gantry = GantryProcess::configure(dir.path(), &upstream.url(), Options::default());
    let base = gantry.url("/v2/team/app/blobs");
    let url = |digest: &str| format!("{base}/{digest}");

    gantry.start().await;
    // One blob is committed before the crash; eight are mid-download when it comes.
    let (committed, committed_digest) = &blobs[8];
    assert_eq!(
        &http_get(&url(committed_digest), &[]).await.unwrap().body,
        committed
    );
    // The client has it once verified; the commit (fsync, rename) follows.
    let committed_path = blob_path(&store, committed_digest);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            committed_path.exists()
        })
        .await,
        "committed before the crash"
    );
    mode.store(1, Ordering::SeqCst);
    let in_flight: Vec<_> = blobs[..8]
        .iter()
        .map(|(_, digest)| {
            let url = url(digest);
            tokio::spawn(async move { http_get(&url, &[]).await })
        })
        .collect();
    let tmp = store.join("tmp");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            std::fs::read_dir(&tmp)
                .map(|d| d.count() >= 8)
                .unwrap_or(false)
        })
        .await,
        "eight downloads in tmp/"
    );
    gantry.kill().await;
    for request in in_flight {
        assert!(
            request.await.unwrap().is_err(),
            "no client saw a complete blob"
        );
    }

    mode.store(0, Ordering::SeqCst);
    gantry.start().await;
    assert!(dir_is_empty(&tmp), "tmp/ is cleaned at start-up");
    for (_, digest) in &blobs[..8] {
        assert!(
            !blob_path(&store, digest).exists(),
            "nothing partial was committed"
        );
    }
    upstream.clear();
    assert_eq!(
        &http_get(&url(committed_digest), &[]).await.unwrap().body,
        committed
    );
    assert!(
        upstream.seen().is_empty(),
        "the committed blob survived the crash"
    );
    for (content, digest) in &blobs[..8] {
        assert_eq!(&http_get(&url(digest), &[]).await.unwrap().body, content);
    }
}
