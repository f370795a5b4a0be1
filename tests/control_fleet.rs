//! The control plane across replicas: two gantry processes over one real redis-server and one
//! real upstream (docker-registry behind a counting proxy). A purge or pin on one replica takes
//! effect on the other, a replica that was down applies what it missed when it comes back; and a
//! purge racing a pull of the same image leaves verified bytes or a clean failure, and nothing
//! of the image behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::control::{store_files as files, Operated};
use common::metrics::sample;
use common::redis::RedisServer;
use common::{http_get, pull, require_tools, wait_until, Fixture, Options, ACCEPT_ALL};
use http::{Method, StatusCode};
use tempfile::TempDir;

/// How long a change may take to reach the other replica (it polls every 500 ms).
const PROPAGATION: Duration = Duration::from_secs(10);

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_owned()
}

struct Pair {
    fixture: Fixture,
    redis: RedisServer,
    a: Operated,
    b: Operated,
    dirs: [TempDir; 2],
}

impl Pair {
    async fn start() -> Option<Self> {
        if !require_tools(&["docker-registry", "skopeo", "redis-server"]) {
            return None;
        }
        let fixture = Fixture::start().await;
        let redis = RedisServer::start().await;
        let extra = format!("cache:\n  redis: {}\n", redis.url());
        let options = Options {
            extra: &extra,
            ..Options::default()
        };
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = Operated::start(dirs[0].path(), &fixture.proxy.url(), options).await;
        let b = Operated::start(dirs[1].path(), &fixture.proxy.url(), options).await;
        Some(Self {
            fixture,
            redis,
            a,
            b,
            dirs,
        })
    }

    fn store(&self, replica: usize) -> PathBuf {
        self.dirs[replica].path().join("store")
    }

    /// `test/multi:v1` pulled through both replicas, each holding its manifest afterwards.
    async fn pull_through_both(&self) {
        for (replica, operated) in [&self.a, &self.b].into_iter().enumerate() {
            let image = format!("127.0.0.1:{}/test/multi:v1", operated.gantry.port);
            pull(&image, false).await.1.expect("pull");
            operated.settled().await;
            assert!(
                files(&self.store(replica), "manifests")
                    .contains(&hex(&self.fixture.multi.manifest_digest)),
                "replica {replica} holds the manifest after its pull"
            );
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- A\n{}\n--- B\n{}",
            self.a.gantry.log(),
            self.b.gantry.log()
        )
    }
}

/// Whether `store` holds no file of `image` (its manifest, config or layers).
fn holds_nothing_of(store: &Path, image: &common::Image) -> bool {
    let manifests = files(store, "manifests");
    let blobs = files(store, "blobs");
    !manifests.contains(&hex(&image.manifest_digest))
        && image.blobs().iter().all(|blob| !blobs.contains(&hex(blob)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_on_one_replica_and_the_other_no_longer_answers_the_tag_from_cache() {
    let Some(pair) = Pair::start().await else {
        return;
    };
    pair.pull_through_both().await;

    let answer = pair.a.ctl_json(&["rm", "test/multi:v1"]).await;
    assert_eq!(answer["announced"], true, "{answer:#}");

    let b_store = pair.store(1);
    let gone = wait_until(PROPAGATION, || async {
        holds_nothing_of(&b_store, &pair.fixture.multi)
    })
    .await;
    assert!(
        gone,
        "B still holds the image purged on A: {:?}\n{}",
        files(&b_store, "manifests"),
        pair.logs()
    );
    // Counted once applied, so it can trail the store by a moment.
    let counted = wait_until(PROPAGATION, || async {
        let metrics = pair.b.metrics().await;
        sample(
            &metrics,
            "gantry_control_events_applied_total{action=\"purge\"}",
        ) == Some(1.0)
    })
    .await;
    assert!(counted, "{}", pair.b.metrics().await);

    // B's next request for the tag is not answered from its memory tag cache or its store.
    pair.fixture.proxy.clear();
    let reply = http_get(
        &pair.b.gantry.url("/v2/test/multi/manifests/v1"),
        &[("accept", ACCEPT_ALL)],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        pair.fixture.proxy.count(&Method::GET, "/manifests/v1") >= 1,
        "B resolved the purged tag without the upstream: {:?}",
        pair.fixture.proxy.seen()
    );
}

/// Whether `gantry ls` on `operated` lists `test/multi:v1` as pinned (B learned the tag through
/// Redis: its catalogue names it all the same).
async fn pinned(operated: &Operated) -> bool {
    let listed = operated
        .ctl_json(&["ls", "--repository", "test/multi"])
        .await;
    let images = listed["images"].as_array().cloned().unwrap_or_default();
    assert_eq!(images.len(), 1, "{listed:#}");
    images[0]["tag"] == "v1" && images[0]["pinned"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_on_one_replica_is_listed_as_pinned_on_the_other_and_not_reapplied_by_its_origin() {
    let Some(pair) = Pair::start().await else {
        return;
    };
    pair.pull_through_both().await;

    assert!(!pinned(&pair.b).await);
    let answer = pair.a.ctl_json(&["pin", "test/multi:v1"]).await;
    assert_eq!(answer["announced"], true, "{answer:#}");
    let on_b = wait_until(PROPAGATION, || async { pinned(&pair.b).await }).await;
    assert!(on_b, "B never listed the pin made on A\n{}", pair.logs());

    // B's unpin reaches A after A's own pin in the stream: once A shows it, A has read past its
    // own event, which it must not have applied.
    pair.b.ctl_json(&["unpin", "test/multi:v1"]).await;
    let on_a = wait_until(PROPAGATION, || async {
        // Counted once applied: both say A is done with B's event.
        let unpins = sample(
            &pair.a.metrics().await,
            "gantry_control_events_applied_total{action=\"unpin\"}",
        );
        unpins == Some(1.0) && !pinned(&pair.a).await
    })
    .await;
    assert!(on_a, "A never applied the unpin made on B\n{}", pair.logs());
    let a_metrics = pair.a.metrics().await;
    assert_eq!(
        sample(
            &a_metrics,
            "gantry_control_events_applied_total{action=\"pin\"}"
        ),
        None,
        "A applied its own pin from the stream: {a_metrics}"
    );
    let b_metrics = pair.b.metrics().await;
    assert_eq!(
        sample(
            &b_metrics,
            "gantry_control_events_applied_total{action=\"pin\"}"
        ),
        Some(1.0),
        "{b_metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_was_down_applies_the_purge_it_missed_when_it_comes_back() {
    let Some(mut pair) = Pair::start().await else {
        return;
    };
    pair.pull_through_both().await;

    pair.b.gantry.signal("TERM");
    assert!(pair.b.gantry.wait(Duration::from_secs(20)).await.success());
    let answer = pair.a.ctl_json(&["rm", "test/multi:v1"]).await;
    assert_eq!(answer["announced"], true, "{answer:#}");
    let b_store = pair.store(1);
    assert!(
        !holds_nothing_of(&b_store, &pair.fixture.multi),
        "B's store is untouched while B is down"
    );

    pair.b.gantry.start().await;
    let gone = wait_until(PROPAGATION, || async {
        holds_nothing_of(&b_store, &pair.fixture.multi)
    })
    .await;
    assert!(
        gone,
        "B did not catch up on the purge made while it was down: {:?}\n{}",
        files(&b_store, "manifests"),
        pair.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_purge_still_applies_here_and_says_it_was_not_announced() {
    let Some(mut pair) = Pair::start().await else {
        return;
    };
    pair.pull_through_both().await;
    pair.redis.kill().await;

    let answer = pair.a.ctl_json(&["rm", "test/multi:v1"]).await;
    assert_eq!(answer["announced"], false, "{answer:#}");
    assert_eq!(answer["results"][0]["announced"], false, "{answer:#}");
    assert!(
        holds_nothing_of(&pair.store(0), &pair.fixture.multi),
        "the purge applies locally with Redis down"
    );
    let metrics = pair.a.metrics().await;
    assert_eq!(
        sample(&metrics, "gantry_control_announce_failures_total"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_racing_a_pull_leaves_verified_bytes_or_a_clean_failure_and_nothing_behind() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Prefetch off: the upstream GETs seen before the purge are then the client's own, which is
    // what tells the blobs the purge must take from those a request after it caches anew (a
    // prefetch asks for every blob at once, before the client asks for any).
    let options = Options {
        mirroring: common::NO_PREFETCH,
        ..Options::default()
    };
    let gantry = Operated::start(dir.path(), &fixture.proxy.url(), options).await;
    let store = dir.path().join("store");
    let image = format!("127.0.0.1:{}/test/multi:v1", gantry.gantry.port);

    // The largest layer stops half-way from the upstream, so the purge lands mid-download.
    let (layer, size) = fixture
        .multi
        .layers
        .iter()
        .max_by_key(|(_, size)| *size)
        .cloned()
        .unwrap();
    let gate = fixture.proxy.hold(&layer, (size / 3) as usize);
    let pulling = tokio::spawn({
        let image = image.clone();
        async move { pull(&image, false).await }
    });
    let held = wait_until(Duration::from_secs(30), || async { gate.held() == 1 }).await;
    assert!(
        held,
        "the layer download never started\n{}",
        gantry.gantry.log()
    );

    // Blobs first asked for after the purge are a new pull's, cached anew; these are the ones the
    // purge must take, whether already stored or still downloading.
    let requested: Vec<String> = fixture.proxy.blob_gets().into_keys().collect();
    assert!(requested.contains(&layer), "{requested:?}");
    let purge = gantry.ctl(&["rm", "test/multi:v1"]).await;
    assert!(purge.success, "{purge:?}");
    gate.open();
    let (out, result) = pulling.await.unwrap();
    match result {
        Ok(_) => {
            // skopeo's `dir:` names each blob by its digest: every byte it kept verifies.
            let image_dir = out.path().join("image");
            for blob in fixture.multi.blobs() {
                let path = image_dir.join(hex(&blob));
                assert_eq!(common::file_digest(&path), blob, "{}", path.display());
            }
        }
        Err(error) => assert!(
            !error.is_empty(),
            "a failed pull says why (and is not claimed complete)"
        ),
    }
    gantry.settled().await;
    let blobs = files(&store, "blobs");
    assert!(
        !files(&store, "manifests").contains(&hex(&fixture.multi.manifest_digest))
            && requested.iter().all(|blob| !blobs.contains(&hex(blob))),
        "the purged image is still (partly) stored: manifests {:?}, blobs {:?}",
        files(&store, "manifests"),
        files(&store, "blobs")
    );
    assert!(
        common::dir_is_empty(&store.join("tmp")),
        "leftovers in tmp/: {:?}",
        std::fs::read_dir(store.join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );

    fixture.proxy.clear();
    let (out, result) = pull(&image, false).await;
    result.expect("the pull after the purge");
    gantry.settled().await;
    let gets = fixture.proxy.blob_gets();
    for blob in fixture.multi.blobs() {
        if requested.contains(&blob) {
            assert_eq!(
                gets.get(&blob).copied(),
                Some(1),
                "{blob} from upstream again: {gets:?}"
            );
        }
        let path = out.path().join("image").join(hex(&blob));
        assert_eq!(common::file_digest(&path), blob);
    }
}
