//! A fleet: three gantry processes behind a plain round-robin nginx, sharing one Redis and one
//! S3-compatible object tier (Garage), in front of a real upstream registry whose responses the
//! test can hold half-sent. What it proves: one upstream GET per blob for the whole cluster
//! however the load balancer spreads the pulls, clients of every replica receiving bytes while
//! the one upstream download is still running, a fresh fleet served from the object tier, and
//! followers finishing verified pulls when the replica they follow is SIGKILLed.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::garage::Garage;
use common::images::{Image, Layout};
use common::nginx::RoundRobin;
use common::process::GantryProcess;
use common::redis::RedisServer;
use common::registry::{CountingProxy, Gate, Registry};
use common::{push, require_tools, Options};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use sha2::Digest as _;
use tempfile::TempDir;

const SECRET: &str = "a-fleet-secret-for-tests-only";

struct Fleet {
    _registry: Registry,
    proxy: CountingProxy,
    redis: RedisServer,
    garage: Garage,
    replicas: Vec<GantryProcess>,
    dirs: Vec<TempDir>,
    image: Image,
    _layout: TempDir,
}

impl Fleet {
    /// Everything but the replicas' processes, which [`Fleet::start_replicas`] starts.
    async fn start(layer_sizes: &[usize]) -> Option<Self> {
        if !require_tools(&["docker-registry", "skopeo", "redis-server", "nginx"]) {
            return None;
        }
        let garage = Garage::start().await?;
        let registry = Registry::start().await;
        let layout_dir = tempfile::tempdir().unwrap();
        let mut layout = Layout::new(layout_dir.path());
        let image = layout.image("amd64", layer_sizes, 14);
        layout.tag_image("v1", &image);
        layout.write_index();
        push(layout_dir.path(), "v1", &registry.host(), "test/fleet").await;
        let proxy = CountingProxy::start(registry.addr).await;
        let redis = RedisServer::start().await;
        let mut fleet = Self {
            _registry: registry,
            proxy,
            redis,
            garage,
            replicas: Vec::new(),
            dirs: Vec::new(),
            image,
            _layout: layout_dir,
        };
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let storage = fleet.garage.yaml();
            let cache = format!("cache:\n  redis: {}\n", fleet.redis.url());
            // Prefetch off: the tests learn the manifest, then hold and count one blob's
            // download, which a prefetch would have started (or finished) first.
            let options = Options {
                storage: &storage,
                extra: &cache,
                mirroring: common::NO_PREFETCH,
                ..Options::default()
            };
            let replica = GantryProcess::configure(dir.path(), &fleet.proxy.url(), options);
            replica.append_config(&format!(
                "cluster:\n  advertise_url: http://127.0.0.1:{}\n  secret: {SECRET}\n  lease_ttl: 3s\n",
                replica.port
            ));
            fleet.replicas.push(replica);
            fleet.dirs.push(dir);
        }
        fleet.start_replicas().await;
        Some(fleet)
    }

    async fn start_replicas(&mut self) {
        for replica in &mut self.replicas {
            replica.start().await;
        }
    }

    fn ports(&self) -> Vec<u16> {
        self.replicas.iter().map(|r| r.port).collect()
    }

    fn logs(&self) -> String {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| format!("--- replica {i}\n{}", r.log()))
            .collect()
    }

    /// The first layer, held after [`PASS`] bytes upstream, and its path: the repository's
    /// manifest is fetched first through replica 0, so every replica knows (through Redis) that
    /// the repository references its layers.
    async fn hold_first_layer(&self) -> (String, Gate, String) {
        let owner_url = self.replicas[0].url("");
        learn_manifest(owner_url.trim_start_matches("http://")).await;
        let (layer, _) = self.image.layers[0].clone();
        let gate = self.proxy.hold(&layer, PASS);
        let path = format!("/v2/test/fleet/blobs/{layer}");
        (layer, gate, path)
    }

    /// The layers the test holds: the ones larger than what a hold lets through.
    fn big_layers(&self, pass: usize) -> Vec<String> {
        self.image
            .layers
            .iter()
            .filter(|(_, size)| *size as usize > pass)
            .map(|(digest, _)| digest.clone())
            .collect()
    }
}

/// Upstream blob GETs by digest, from the proxy's record.
fn blob_gets(proxy: &CountingProxy) -> HashMap<String, usize> {
    proxy.blob_gets()
}

/// Bytes that pass a hold before it waits: past the fill's 256 KiB write batches, so the owner
/// has bytes on disk that its peers can stream.
const PASS: usize = 700_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_cold_pulls_through_round_robin_fetch_each_blob_once_for_the_cluster() {
    let Some(mut fleet) = Fleet::start(&[1_500_000, 2_000_000, 1_200_000]).await else {
        return;
    };
    let nginx = RoundRobin::start(&fleet.ports()).await;
    let held = fleet.big_layers(PASS);
    assert_eq!(held.len(), 3, "every layer is larger than the hold's pass");
    let gate = fleet.proxy.hold("/blobs/sha256:", PASS);
    let reference = format!("{}/test/fleet:v1", nginx.host());
    let pulls: Vec<_> = (0..8)
        .map(|_| {
            let reference = reference.clone();
            tokio::spawn(async move { common::pull(&reference, false).await })
        })
        .collect();
    // The first layer's one upstream download is under way and held (skopeo fetches an image's
    // layers one after another): the clients asking for it meanwhile, on whichever replica they
    // landed, are answered by that download.
    let downloading =
        common::wait_until(Duration::from_secs(60), || async { gate.held() >= 1 }).await;
    assert!(
        downloading,
        "the layer downloads did not start:\n{}",
        fleet.logs()
    );
    gate.open();
    for pull in pulls {
        let (dir, result) = pull.await.unwrap();
        result.unwrap_or_else(|e| panic!("a pull through nginx failed: {e}\n{}", fleet.logs()));
        for blob in fleet.image.blobs() {
            let hex = blob.trim_start_matches("sha256:");
            assert_eq!(
                common::file_digest(&dir.path().join("image").join(hex)),
                blob,
                "a pulled blob differs from the upstream's"
            );
        }
    }
    let gets = blob_gets(&fleet.proxy);
    for blob in fleet.image.blobs() {
        assert_eq!(
            gets.get(&blob).copied(),
            Some(1),
            "upstream GETs of {blob} for the whole cluster: {gets:?}\n{}",
            fleet.logs()
        );
    }

    // Every blob reaches the object tier; then a fleet that lost every local disk pulls with no
    // upstream blob request at all, and fills its disks again.
    for blob in fleet.image.blobs() {
        let key = object_key(&blob);
        let uploaded = common::wait_until(Duration::from_secs(30), || async {
            fleet.garage.object(&key).await.is_some()
        })
        .await;
        assert!(
            uploaded,
            "{key} never reached the object tier:\n{}",
            fleet.logs()
        );
    }
    for replica in &mut fleet.replicas {
        replica.kill().await;
    }
    for dir in &fleet.dirs {
        std::fs::remove_dir_all(dir.path().join("store")).unwrap();
    }
    fleet.proxy.clear();
    fleet.start_replicas().await;
    for _ in 0..3 {
        let (dir, result) = common::pull(&reference, false).await;
        result.unwrap_or_else(|e| panic!("a warm pull failed: {e}\n{}", fleet.logs()));
        assert!(dir.path().join("image/manifest.json").exists());
    }
    let gets = blob_gets(&fleet.proxy);
    assert!(
        gets.is_empty(),
        "a fresh fleet asked the upstream for blobs: {gets:?}"
    );
    let refilled = fleet
        .dirs
        .iter()
        .filter(|dir| {
            fleet
                .image
                .blobs()
                .iter()
                .any(|blob| common::blob_path(&dir.path().join("store"), blob).exists())
        })
        .count();
    assert!(refilled >= 1, "no replica refilled its local tier");
    nginx.stop().await;
}

/// `blobs/sha256/<2 hex>/<hex>`: the object tier's content key (no prefix configured).
fn object_key(digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("blobs/sha256/{}/{hex}", &hex[..2])
}

/// A blob GET that has received its first bytes and can be read to the end.
struct Reading {
    body: hyper::body::Incoming,
    received: Vec<u8>,
}

async fn start_reading(url: &str) -> Reading {
    let request = Request::builder()
        .method(Method::GET)
        .uri(url)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = common::client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    let mut reading = Reading {
        body: response.into_body(),
        received: Vec::new(),
    };
    while reading.received.is_empty() {
        let frame = tokio::time::timeout(Duration::from_secs(30), reading.body.frame())
            .await
            .unwrap_or_else(|_| panic!("no first bytes from {url} in 30 s"))
            .expect("the body has bytes")
            .expect("the body reads");
        if let Ok(data) = frame.into_data() {
            reading.received.extend_from_slice(&data);
        }
    }
    reading
}

impl Reading {
    async fn finish(mut self) -> Result<Vec<u8>, String> {
        loop {
            match tokio::time::timeout(Duration::from_secs(60), self.body.frame()).await {
                Err(_) => return Err("stalled for 60 s".into()),
                Ok(None) => return Ok(self.received),
                Ok(Some(Err(error))) => return Err(error.to_string()),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.received.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// The repository's manifest, fetched once through `host`: every replica then knows (through
/// Redis) that the repository references its blobs, so blob GETs need no upstream check.
async fn learn_manifest(host: &str) {
    let reply = common::http_get(
        &format!("http://{host}/v2/test/fleet/manifests/v1"),
        &[("accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_every_replica_get_bytes_while_the_one_upstream_download_runs() {
    let Some(fleet) = Fleet::start(&[3_000_000]).await else {
        return;
    };
    let nginx = RoundRobin::start(&fleet.ports()).await;
    learn_manifest(&nginx.host()).await;
    let (layer, _) = fleet.image.layers[0].clone();
    let gate = fleet.proxy.hold(&layer, PASS);
    let url = format!("http://{}/v2/test/fleet/blobs/{layer}", nginx.host());
    let mut readings = Vec::new();
    for _ in 0..8 {
        readings.push(start_reading(&url).await);
    }
    // Eight clients, spread over three replicas, each hold bytes of the blob while its only
    // upstream download is still held half-sent.
    assert_eq!(gate.held(), 1, "one upstream download, still running");
    assert_eq!(blob_gets(&fleet.proxy).get(&layer).copied(), Some(1));
    gate.open();
    for reading in readings {
        let bytes = reading
            .finish()
            .await
            .unwrap_or_else(|e| panic!("a follower's body broke: {e}\n{}", fleet.logs()));
        assert_eq!(sha256(&bytes), layer, "a client got other bytes");
    }
    assert_eq!(
        blob_gets(&fleet.proxy).get(&layer).copied(),
        Some(1),
        "{}",
        fleet.logs()
    );
    nginx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_finish_verified_pulls_when_the_owner_is_killed_mid_download() {
    let Some(mut fleet) = Fleet::start(&[3_000_000]).await else {
        return;
    };
    let (layer, gate, path) = fleet.hold_first_layer().await;
    let owner = start_reading(&fleet.replicas[0].url(&path)).await;
    let followers = vec![
        start_reading(&fleet.replicas[1].url(&path)).await,
        start_reading(&fleet.replicas[2].url(&path)).await,
    ];
    assert_eq!(
        blob_gets(&fleet.proxy).get(&layer).copied(),
        Some(1),
        "the followers stream from the owner, not from the upstream"
    );
    fleet.replicas[0].kill().await;
    assert!(
        owner.finish().await.is_err(),
        "the killed owner's own client cannot have had the whole blob"
    );
    gate.open();
    for follower in followers {
        let bytes = follower.finish().await.unwrap_or_else(|e| {
            panic!(
                "a follower's pull failed after the owner died: {e}\n{}",
                fleet.logs()
            )
        });
        assert_eq!(sha256(&bytes), layer, "a follower got unverified bytes");
    }
    let logs = fleet.logs();
    assert!(
        logs.contains("resuming from the next one"),
        "the followers resumed from another origin:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flight_survives_redis_dying_and_replicas_then_download_alone() {
    let Some(mut fleet) = Fleet::start(&[3_000_000, 1_000_000]).await else {
        return;
    };
    let (layer, gate, path) = fleet.hold_first_layer().await;
    let owner = start_reading(&fleet.replicas[0].url(&path)).await;
    let follower = start_reading(&fleet.replicas[1].url(&path)).await;
    assert_eq!(blob_gets(&fleet.proxy).get(&layer).copied(), Some(1));
    // Redis dies while the owner downloads and the follower streams from it: the lease can no
    // longer be renewed, and neither transfer cares.
    fleet.redis.kill().await;
    gate.open();
    for reading in [owner, follower] {
        let bytes = reading
            .finish()
            .await
            .unwrap_or_else(|e| panic!("a transfer failed with Redis gone: {e}\n{}", fleet.logs()));
        assert_eq!(sha256(&bytes), layer);
    }
    assert_eq!(blob_gets(&fleet.proxy).get(&layer).copied(), Some(1));
    // Without Redis a replica claims nothing and downloads alone, as a single node does.
    let (other, _) = fleet.image.layers[1].clone();
    let reply = common::http_get(
        &fleet.replicas[2].url(&format!("/v2/test/fleet/blobs/{other}")),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", fleet.logs());
    assert_eq!(sha256(&reply.body), other);
}
