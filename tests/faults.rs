//! Fault injection: an upstream that stalls, breaks off, ends a body cleanly at the wrong length
//! or with the wrong bytes, or answers 500/429 storms; a disk that fills during a download; a
//! commit that fails after verification (with clients joined to one paced download); and gantry
//! SIGKILLed during 8 concurrent downloads.
//! Afterwards nothing corrupt is served and nothing committed is lost.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{Ending, Fake, Scripted};
use common::metrics::{sample, value};
use common::process::GantryProcess;
use common::raw_fake::{Gate, Raw, RawFake};
use common::{
    blob_path, dir_is_empty, http_get, skip_unless, stream_into, wait_until, Gantry, Options,
};
use http::StatusCode;
use sha2::Digest as _;

fn blob(size: usize, seed: u8) -> (Bytes, String) {
    let content: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
    (Bytes::from(content), digest)
}

/// Serves the given blobs by digest; `mode`: 0 good, 1 stall halfway, 2 broken off halfway,
/// 3 500, 4 429.
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
            // Announces the full length, sends half, and breaks the connection (a transport error:
            // hyper's framing notices; clean ends at a wrong length are `RawFake`'s).
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

/// A broken upstream body fails its download, instead of being asked for again.
const NO_RESUMES: &str = "limits:\n  download_resumes: 0";

/// `gantry_download_failures_total{reason}` right now.
async fn failures(gantry: &Gantry, reason: &str) -> f64 {
    value(
        &gantry.metrics().await,
        &format!("gantry_download_failures_total{{reason=\"{reason}\"}}"),
    )
}

/// GETs of `digest` an upstream saw, from its request lines or paths.
fn gets_of(requests: impl IntoIterator<Item = String>, digest: &str) -> usize {
    requests
        .into_iter()
        .filter(|request| request.contains(digest))
        .count()
}

/// A body that stalls halfway: gantry gives up after `timeouts.idle` (not `timeouts.download`,
/// an hour), keeps nothing, and serves the blob once the upstream behaves. Then a body that
/// breaks off (a transport error) the same way. With `limits.download_resumes: 0`: this is the
/// failure itself, which a resumed request (tests/resume.rs) would otherwise turn into a blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_broken_upstream_body_fails_cleanly() {
    let (content, digest) = blob(2 << 20, 1);
    let mode = Arc::new(AtomicU8::new(1));
    let upstream = blob_upstream(vec![(content.clone(), digest.clone())], Arc::clone(&mode)).await;
    let options = Options {
        timeouts: "  idle: 1s",
        extra: NO_RESUMES,
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let store = gantry.dir.path().join("store");
    let upstream_gets = || {
        gets_of(
            upstream.seen().into_iter().map(|seen| seen.uri),
            digest.as_str(),
        )
    };

    let started = Instant::now();
    let stalled = http_get(&url, &[]).await;
    let elapsed = started.elapsed();
    assert!(
        stalled.is_err(),
        "a stalled upstream fails the client's transfer: {stalled:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(5),
        "the download gave up after timeouts.idle (1 s), not sooner or much later: {elapsed:?}"
    );
    assert_eq!(
        failures(&gantry, "timeout").await,
        1.0,
        "a stall is a timeout"
    );
    assert_eq!(upstream_gets(), 1);
    assert!(!blob_path(&store, &digest).exists(), "nothing committed");
    assert!(dir_is_empty(&store.join("tmp")), "tmp/ is clean");

    mode.store(2, Ordering::SeqCst);
    assert!(
        http_get(&url, &[]).await.is_err(),
        "a broken-off body fails the client's transfer"
    );
    assert_eq!(failures(&gantry, "upstream_unavailable").await, 1.0);
    assert_eq!(failures(&gantry, "timeout").await, 1.0);
    assert!(!blob_path(&store, &digest).exists());
    assert!(dir_is_empty(&store.join("tmp")));

    // The failures left nothing behind that blocks the blob: the next request downloads it.
    mode.store(0, Ordering::SeqCst);
    let good = http_get(&url, &[]).await.unwrap();
    assert_eq!(good.status, StatusCode::OK);
    assert_eq!(good.body, content);
    assert_eq!(upstream_gets(), 3);
    gantry.settled().await;
    assert!(blob_path(&store, &digest).exists(), "committed this time");
    gantry.stop().await;
}

/// Bodies that end cleanly (chunked, with a proper last chunk) but not at the right length or
/// with the right bytes: only gantry's own checks can refuse them, not hyper's framing. Each case
/// is caught by one check alone, named in its description. With `limits.download_resumes: 0`:
/// a body short of its `Content-Length` would otherwise be asked for again from where it ended
/// (tests/resume.rs), and the size check is what is tested here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_ends_cleanly_with_the_wrong_bytes_is_refused() {
    let (content, digest) = blob(1 << 20, 7);
    let n = content.len();
    let mut flipped = content.to_vec();
    flipped[n / 3] ^= 0x55;
    let cases: Vec<(&str, usize, Bytes)> = vec![
        (
            "half the body, Content-Length the whole (size and digest checks)",
            n,
            content.slice(..n / 2),
        ),
        (
            "the whole blob, Content-Length 1000 more (size check alone)",
            n + 1000,
            content.clone(),
        ),
        (
            "the blob and 1000 bytes more, Content-Length the blob's (size and digest checks)",
            n,
            Bytes::from([&content[..], &[0u8; 1000][..]].concat()),
        ),
        (
            "the whole blob, Content-Length 1000 less (size check alone)",
            n - 1000,
            content.clone(),
        ),
        (
            "the right length, one byte changed (digest check alone)",
            n,
            Bytes::from(flipped),
        ),
    ];
    let case = Arc::new(AtomicUsize::new(0));
    let bodies: Vec<(usize, Bytes)> = cases
        .iter()
        .map(|(_, length, body)| (*length, body.clone()))
        .chain([(n, content.clone())])
        .collect();
    let (served, shared_case) = (digest.clone(), Arc::clone(&case));
    let upstream = RawFake::start(move |target| {
        if !target.ends_with(served.as_str()) {
            return Raw::not_found();
        }
        let (length, body) = &bodies[shared_case.load(Ordering::SeqCst)];
        let mut response = Raw::chunked_claiming(*length);
        for slice in body.chunks(100_000) {
            response = response.chunk(slice);
        }
        response.last_chunk()
    })
    .await;
    let options = Options {
        extra: NO_RESUMES,
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let store = gantry.dir.path().join("store");

    for (i, (description, _, _)) in cases.iter().enumerate() {
        case.store(i, Ordering::SeqCst);
        match http_get(&url, &[]).await {
            Err(_) => {}
            Ok(reply) => assert_ne!(
                reply.status,
                StatusCode::OK,
                "{description}: served as complete ({} bytes)",
                reply.body.len()
            ),
        }
        assert_eq!(
            failures(&gantry, "bad_content").await,
            (i + 1) as f64,
            "{description}: counted as bad content"
        );
        assert!(
            !blob_path(&store, &digest).exists(),
            "{description}: committed"
        );
        assert!(
            dir_is_empty(&store.join("tmp")),
            "{description}: tmp/ is clean"
        );
        assert_eq!(gets_of(upstream.seen(), &digest), i + 1, "{description}");
    }

    case.store(cases.len(), Ordering::SeqCst);
    let good = http_get(&url, &[]).await.unwrap();
    assert_eq!(
        good.body, content,
        "a correct body is served after all that"
    );
    gantry.settled().await;
    assert!(blob_path(&store, &digest).exists());
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
    assert_eq!(
        failures(&gantry, "io").await,
        1.0,
        "the full disk is counted"
    );
    // What was committed before is still served, byte for byte.
    assert_eq!(http_get(&small_url, &[]).await.unwrap().body, small);
    drop(gantry);
}

/// Clients get a blob's last bytes once it is verified, not once it is durable: a commit that
/// fails afterwards (here: its directory cannot be created) costs the cache, not the clients.
///
/// The upstream sends a first MiB and then holds the rest at a gate, so the download is still
/// running while all the clients arrive: the single flight is shown by `CLIENTS - 1` joins and
/// one upstream GET, and the followers get bytes from the growing file before it can finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_blob_reaches_its_clients_even_if_the_store_cannot_keep_it() {
    const CLIENTS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (content, digest) = blob(3 << 20, 6);
    // A file where the blob's fan-out directory should be: the rename into place fails.
    let fan_out = blob_path(&store, &digest).parent().unwrap().to_owned();
    std::fs::create_dir_all(fan_out.parent().unwrap()).unwrap();
    std::fs::write(&fan_out, b"not a directory").unwrap();
    let gate = Gate::new();
    let (served, body, held) = (digest.clone(), content.clone(), gate.clone());
    let upstream = RawFake::start(move |target| {
        if !target.ends_with(served.as_str()) {
            return Raw::not_found();
        }
        Raw::head(
            200,
            &[
                ("content-type", "application/octet-stream"),
                ("content-length", &body.len().to_string()),
            ],
        )
        .bytes(body.slice(..1 << 20))
        .gate(&held)
        .bytes(body.slice(1 << 20..))
    })
    .await;
    let gantry = Gantry::start_with(dir, &upstream.url(), Options::default()).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let joins = || async { sample(&gantry.metrics().await, "gantry_download_joins_total") };

    let received: Vec<Arc<AtomicU64>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let clients: Vec<_> = received
        .iter()
        .map(|counter| tokio::spawn(stream_into(url.clone(), Arc::clone(counter))))
        .collect();
    let overlapping = wait_until(Duration::from_secs(10), || async {
        joins().await == Some((CLIENTS - 1) as f64)
            && received.iter().all(|r| r.load(Ordering::SeqCst) > 0)
    })
    .await;
    let got: Vec<u64> = received.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    assert!(
        overlapping,
        "with the download held at the gate, {} joins (want {}) and bytes per client {got:?} \
         (want all > 0)",
        joins().await.unwrap_or(0.0),
        CLIENTS - 1
    );
    assert!(
        got.iter().all(|&g| g < content.len() as u64),
        "nobody has the whole blob before the upstream sent it: {got:?}"
    );
    assert_eq!(gets_of(upstream.seen(), &digest), 1, "one upstream GET");

    gate.open();
    for client in clients {
        let (status, body) = client
            .await
            .unwrap()
            .expect("a verified blob is delivered whole");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, content);
    }
    assert!(
        wait_until(Duration::from_secs(5), || async {
            sample(
                &gantry.metrics().await,
                "gantry_download_failures_total{reason=\"io\"}",
            )
            .is_some()
        })
        .await,
        "the failed commit is counted"
    );
    gantry.settled().await;
    assert_eq!(
        failures(&gantry, "io").await,
        1.0,
        "one download, one failure"
    );
    assert_eq!(
        value(&gantry.metrics().await, "gantry_download_joins_total"),
        (CLIENTS - 1) as f64
    );
    assert!(dir_is_empty(&store.join("tmp")), "nothing left in tmp/");
    assert!(!blob_path(&store, &digest).exists());
    // Not cached, so the next request goes upstream again, and is still served.
    assert_eq!(http_get(&url, &[]).await.unwrap().body, content);
    assert_eq!(gets_of(upstream.seen(), &digest), 2);
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
    // The upstream sends half of each blob and stalls: eight clients mid-transfer.
    mode.store(1, Ordering::SeqCst);
    let received: Vec<Arc<AtomicU64>> = (0..8).map(|_| Arc::default()).collect();
    let in_flight: Vec<_> = blobs[..8]
        .iter()
        .zip(&received)
        .map(|((_, digest), counter)| tokio::spawn(stream_into(url(digest), Arc::clone(counter))))
        .collect();
    let tmp = store.join("tmp");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            std::fs::read_dir(&tmp)
                .map(|d| d.count() >= 8)
                .unwrap_or(false)
                && received.iter().all(|r| r.load(Ordering::SeqCst) > 0)
        })
        .await,
        "eight downloads in tmp/, each client receiving"
    );
    gantry.kill().await;
    for request in in_flight {
        let outcome = request.await.unwrap();
        let outcome = outcome.map(|(status, body)| (status, body.len()));
        assert!(outcome.is_err(), "the kill cut the transfer: {outcome:?}");
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
