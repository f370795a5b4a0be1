//! The cluster's parts against real components: download leases over a real `redis-server`, and
//! the peer route of a real gantry (mirroring the real `docker-registry` through the counting
//! proxy), read raw and through `cluster::Peers`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::{Method, StatusCode};

use common::metrics::value;
use common::redis::{RedisServer, Resp};
use common::{request, require_tools, wait_until, Fixture, Gantry, Options};
use gantry::cluster::{lease::lease_key, LeaseClaim, Leases, OwnerLease, PeerError, Peers};
use gantry::metrics::Metrics;
use gantry::oci::Digest;
use gantry::redis::Redis;

const SECRET: &str = "cluster-test-secret-0123456789";

fn digest(text: &str) -> Digest {
    Digest::of(gantry::oci::Algorithm::Sha256, text.as_bytes())
}

fn leases(redis: &RedisServer, url: &str, ttl: Duration) -> (Leases, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let handle = Redis::open(&redis.url()).unwrap();
    (
        Leases::with_ttl(handle, url, ttl, Arc::clone(&metrics)),
        metrics,
    )
}

fn owned(claim: LeaseClaim) -> OwnerLease {
    match claim {
        LeaseClaim::Owned(lease) => lease,
        other => panic!("expected to own the lease, got {other:?}"),
    }
}

fn held_by(claim: LeaseClaim) -> String {
    match claim {
        LeaseClaim::HeldBy(owner) => owner,
        other => panic!("expected another owner, got {other:?}"),
    }
}

/// The lease's value in Redis (`<advertise_url> <nonce>`), `None` without one.
async fn lease_value(redis: &RedisServer, digest: &Digest) -> Option<String> {
    match redis.command(&["GET", &lease_key(digest)]).await {
        Resp::Bulk(value) => value.map(|v| String::from_utf8(v).unwrap()),
        other => panic!("GET answered {other:?}"),
    }
}

#[tokio::test]
async fn the_first_claim_owns_the_rest_learn_the_owner_until_it_releases() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let redis = RedisServer::start().await;
    let (a, a_metrics) = leases(&redis, "http://10.0.0.1:5000", Duration::from_secs(10));
    let (b, b_metrics) = leases(&redis, "http://10.0.0.2:5000/", Duration::from_secs(10));
    let blob = digest("one");
    let lease = owned(a.claim(&blob).await);
    assert!(lease.is_held());
    let stored = lease_value(&redis, &blob)
        .await
        .expect("the lease is in redis");
    assert!(stored.starts_with("http://10.0.0.1:5000 "), "{stored}");
    assert_eq!(held_by(b.claim(&blob).await), "http://10.0.0.1:5000");
    // Another digest is another lease.
    let other = owned(b.claim(&digest("two")).await);
    lease.release().await;
    assert_eq!(lease_value(&redis, &blob).await, None, "released");
    let successor = owned(b.claim(&blob).await);
    assert!(lease_value(&redis, &blob)
        .await
        .unwrap()
        .starts_with("http://10.0.0.2:5000 "));
    assert_eq!(held_by(a.claim(&blob).await), "http://10.0.0.2:5000");
    // Dropping a lease (a download task that died) releases it too.
    drop(successor);
    drop(other);
    let dropped = wait_until(Duration::from_secs(5), || async {
        redis.keys("gantry:lease:*").await.is_empty()
    })
    .await;
    assert!(dropped, "dropped leases are released");
    let claims = |metrics: &Metrics, outcome: &str| {
        value(
            &String::from_utf8(metrics.render()).unwrap(),
            &format!("gantry_cluster_lease_claims_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(claims(&a_metrics, "owned"), 1.0);
    assert_eq!(claims(&a_metrics, "held_by_peer"), 1.0);
    assert_eq!(claims(&b_metrics, "owned"), 2.0);
    assert_eq!(claims(&b_metrics, "held_by_peer"), 1.0);
}

#[tokio::test]
async fn a_lease_is_renewed_while_held_and_lapses_when_its_owner_stops() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let redis = RedisServer::start().await;
    let ttl = Duration::from_millis(900);
    let (a, _) = leases(&redis, "http://10.0.0.1:5000", ttl);
    let (b, _) = leases(&redis, "http://10.0.0.2:5000", ttl);
    let blob = digest("renewed");
    let started = Instant::now();
    let lease = owned(a.claim(&blob).await);
    // Three TTLs later the lease is still there: only renewals keep it.
    tokio::time::sleep(ttl * 3).await;
    assert_eq!(held_by(b.claim(&blob).await), "http://10.0.0.1:5000");
    let remaining = match redis.command(&["PTTL", &lease_key(&blob)]).await {
        Resp::Integer(ms) => ms,
        other => panic!("PTTL answered {other:?}"),
    };
    assert!(remaining > 0, "the lease has an expiry: {remaining}");
    assert!(lease.is_held());
    // An owner that stops renewing (as a killed one does) keeps it for at most one TTL.
    lease.abandon();
    let stopped = Instant::now();
    assert_eq!(held_by(b.claim(&blob).await), "http://10.0.0.1:5000");
    let taken = wait_until(Duration::from_secs(10), || async {
        match b.claim(&blob).await {
            LeaseClaim::Owned(lease) => {
                lease.abandon();
                true
            }
            _ => false,
        }
    })
    .await;
    assert!(taken, "the lease lapsed after its owner stopped renewing");
    assert!(
        stopped.elapsed() < ttl + Duration::from_millis(500),
        "lapsed within a TTL of the last renewal: {:?} (held {:?})",
        stopped.elapsed(),
        stopped - started
    );
}

#[tokio::test]
async fn a_late_owner_neither_renews_nor_releases_its_successors_lease() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let redis = RedisServer::start().await;
    let ttl = Duration::from_millis(600);
    let (a, _) = leases(&redis, "http://10.0.0.1:5000", ttl);
    let (b, _) = leases(&redis, "http://10.0.0.2:5000", Duration::from_secs(30));
    let blob = digest("taken over");
    let stale = owned(a.claim(&blob).await);
    // As if a's lease had lapsed while it stalled: the key is gone, and b takes it.
    redis.command(&["DEL", &lease_key(&blob)]).await;
    let successor = owned(b.claim(&blob).await);
    let successors = lease_value(&redis, &blob).await.unwrap();
    // a's next renewal finds the lease someone else's and stops.
    let noticed = wait_until(Duration::from_secs(5), || async { !stale.is_held() }).await;
    assert!(noticed, "the late owner learns it lost the lease");
    stale.release().await;
    assert_eq!(
        lease_value(&redis, &blob).await.as_deref(),
        Some(successors.as_str()),
        "the successor's lease is untouched"
    );
    let remaining = match redis.command(&["PTTL", &lease_key(&blob)]).await {
        Resp::Integer(ms) => ms,
        other => panic!("PTTL answered {other:?}"),
    };
    assert!(
        remaining > 10_000,
        "the late owner did not shorten it: {remaining} ms"
    );
    assert!(successor.is_held());
    successor.release().await;
    assert_eq!(lease_value(&redis, &blob).await, None);
}

#[tokio::test]
async fn with_redis_gone_a_claim_is_unavailable_at_once() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let mut redis = RedisServer::start().await;
    let (a, metrics) = leases(&redis, "http://10.0.0.1:5000", Duration::from_secs(10));
    owned(a.claim(&digest("before")).await).release().await;
    redis.kill().await;
    for attempt in 0..3 {
        let started = Instant::now();
        let claim = a.claim(&digest(&format!("after {attempt}"))).await;
        assert!(
            matches!(claim, LeaseClaim::Unavailable),
            "{attempt}: {claim:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{attempt}: answered in {:?}",
            started.elapsed()
        );
    }
    let text = String::from_utf8(metrics.render()).unwrap();
    assert_eq!(
        value(
            &text,
            "gantry_cluster_lease_claims_total{outcome=\"redis_unavailable\"}"
        ),
        3.0
    );
}

/// `cluster:` and `cache.redis` for a gantry whose peer route is served.
fn cluster_options(redis: &RedisServer) -> String {
    format!(
        "cache:\n  redis: {}\ncluster:\n  advertise_url: http://127.0.0.1:1\n  secret: {SECRET}\n",
        redis.url()
    )
}

fn peer_url(gantry: &Gantry, digest: &str) -> String {
    gantry.url(&format!("/_gantry/cluster/v1/blobs/{digest}"))
}

fn base64_alice() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode("alice:alice-pw")
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[tokio::test]
async fn the_peer_route_serves_what_this_replica_holds_to_the_secret_only() {
    if !require_tools(&["docker-registry", "skopeo", "redis-server"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let redis = RedisServer::start().await;
    // Clients must authenticate (htpasswd); peers need only the cluster secret.
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("htpasswd");
    let alice = bcrypt::hash("alice-pw", 5).unwrap();
    std::fs::write(&users, format!("alice:{alice}\n")).unwrap();
    let extra = format!(
        "{}auth:\n  htpasswd: {}\n",
        cluster_options(&redis),
        users.display()
    );
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    let gantry = Gantry::start_with(dir, &fixture.proxy.url(), options).await;
    let (layer, size) = fixture.multi.layers[1].clone();
    let blob_url = gantry.url(&format!("/v2/test/multi/blobs/{layer}"));
    let anonymous = request(Method::GET, &blob_url, &[]).await.unwrap();
    assert_eq!(
        anonymous.status,
        StatusCode::UNAUTHORIZED,
        "clients authenticate"
    );
    let basic = format!("Basic {}", base64_alice());
    let pulled = request(Method::GET, &blob_url, &[("authorization", &basic)])
        .await
        .unwrap();
    assert_eq!(pulled.status, StatusCode::OK);
    gantry.settled().await;
    fixture.proxy.clear();

    let bearer = format!("Bearer {SECRET}");
    let url = peer_url(&gantry, &layer);
    for headers in [
        vec![],
        vec![("authorization", "Bearer not-the-cluster-secret")],
        vec![("authorization", SECRET)],
        vec![("authorization", "Basic dXNlcjpwYXNz")],
    ] {
        let reply = request(Method::GET, &url, &headers).await.unwrap();
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(reply.error_code().as_deref(), Some("UNAUTHORIZED"));
        assert!(reply.header("www-authenticate").is_none());
    }
    let whole = request(Method::GET, &url, &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body.len() as u64, size);
    assert_eq!(sha256(&whole.body), layer);
    let head = request(Method::HEAD, &url, &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-length"),
        Some(size.to_string().as_str())
    );
    let tail = request(
        Method::GET,
        &url,
        &[("authorization", &bearer), ("range", "bytes=1000-")],
    )
    .await
    .unwrap();
    assert_eq!(tail.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        tail.header("content-range"),
        Some(format!("bytes 1000-{}/{size}", size - 1).as_str())
    );
    assert_eq!(&tail.body[..], &whole.body[1000..]);
    // A blob the upstream has but this replica does not: 404, and nothing is fetched.
    let elsewhere = fixture.platforms[0].layers[0].0.clone();
    let unknown = request(
        Method::GET,
        &peer_url(&gantry, &elsewhere),
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.error_code().as_deref(), Some("BLOB_UNKNOWN"));
    let invalid = request(
        Method::GET,
        &peer_url(&gantry, "sha256:nothex"),
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    // The client side: the same answers through `Peers`.
    let metrics = Arc::new(Metrics::new());
    let peers = Peers::with_secret(SECRET, Arc::clone(&metrics));
    let base = gantry.url("");
    let read = peers
        .open(&base, &Digest::parse(&layer).unwrap(), 1000)
        .await
        .unwrap()
        .expect("the peer holds the blob");
    assert_eq!(read.size, Some(size));
    let bytes = collect(read.chunks).await.unwrap();
    assert_eq!(&bytes[..], &whole.body[1000..]);
    assert!(peers
        .open(&base, &Digest::parse(&elsewhere).unwrap(), 0)
        .await
        .unwrap()
        .is_none());
    let wrong = Peers::with_secret("another-secret-0123456789", Arc::clone(&metrics));
    assert!(matches!(
        wrong.open(&base, &Digest::parse(&layer).unwrap(), 0).await,
        Err(PeerError::Unauthorized)
    ));
    assert!(
        fixture.proxy.seen().is_empty(),
        "peer requests reach no upstream: {:?}",
        fixture.proxy.seen()
    );
    let scrape = gantry.metrics().await;
    assert_eq!(
        value(&scrape, "gantry_cluster_peer_streams_served_total"),
        3.0
    );
    assert_eq!(
        value(
            &String::from_utf8(metrics.render()).unwrap(),
            "gantry_cluster_peer_streams_followed_total"
        ),
        1.0
    );
    gantry.stop().await;
}

#[tokio::test]
async fn without_a_cluster_section_the_peer_route_is_an_unknown_path() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let layer = fixture.multi.layers[0].0.clone();
    let pulled = request(
        Method::GET,
        &gantry.url(&format!("/v2/test/multi/blobs/{layer}")),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(pulled.status, StatusCode::OK);
    let bearer = format!("Bearer {SECRET}");
    let reply = request(
        Method::GET,
        &peer_url(&gantry, &layer),
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let unknown = request(Method::GET, &gantry.url("/no/such/path"), &[])
        .await
        .unwrap();
    assert_eq!(
        reply.body, unknown.body,
        "the same answer as any unknown path"
    );
    gantry.stop().await;
}

async fn collect(
    mut chunks: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, PeerError>> + Send>,
    >,
) -> Result<Vec<u8>, PeerError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        bytes.extend_from_slice(&chunk?);
    }
    Ok(bytes)
}

#[tokio::test]
async fn a_peer_follows_a_download_in_progress_from_its_first_bytes() {
    if !require_tools(&["docker-registry", "skopeo", "redis-server"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let redis = RedisServer::start().await;
    let extra = cluster_options(&redis);
    // Prefetch off: the manifest below would start the layer's download before the client does.
    let options = Options {
        extra: &extra,
        mirroring: common::NO_PREFETCH,
        ..Options::default()
    };
    let gantry =
        Gantry::start_with(tempfile::tempdir().unwrap(), &fixture.proxy.url(), options).await;
    let (layer, size) = fixture.multi.layers[3].clone();
    let digest = Digest::parse(&layer).unwrap();
    // The manifest links the layer to its repository, as in any pull: a replica with a cluster
    // checks a blob's repository before downloading it (the upstream's GET no longer vouches).
    let manifest = gantry.url("/v2/test/multi/manifests/v1");
    let accept = ("accept", "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        request(Method::GET, &manifest, &[accept])
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    fixture.proxy.clear();
    let gate = fixture.proxy.hold(&layer, 1 << 20);
    // A client starts the download and reads along.
    let client_url = gantry.url(&format!("/v2/test/multi/blobs/{layer}"));
    let client = tokio::spawn(async move { request(Method::GET, &client_url, &[]).await });
    let started = wait_until(Duration::from_secs(30), || async { gate.held() == 1 }).await;
    assert!(started, "the download reached the held upstream response");

    let peers = Arc::new(Peers::with_secret(SECRET, Arc::new(Metrics::new())));
    let base = gantry.url("");
    let offset = 100_000;
    let readers: Vec<_> = [0, offset]
        .into_iter()
        .map(|from| {
            let (peers, base, digest) = (Arc::clone(&peers), base.clone(), digest.clone());
            let received = Arc::new(AtomicU64::new(0));
            let counter = Arc::clone(&received);
            let task = tokio::spawn(async move {
                let read = peers
                    .open(&base, &digest, from)
                    .await
                    .expect("the owner answers")
                    .expect("the owner serves its running download");
                let mut chunks = read.chunks;
                let mut bytes = Vec::new();
                while let Some(chunk) = chunks.next().await {
                    bytes.extend_from_slice(&chunk.expect("the body completes"));
                    counter.store(bytes.len() as u64, Ordering::SeqCst);
                }
                (read.size, bytes)
            });
            (received, task)
        })
        .collect();
    let streaming = wait_until(Duration::from_secs(30), || async {
        readers
            .iter()
            .all(|(received, _)| received.load(Ordering::SeqCst) > 0)
    })
    .await;
    let (held, seen_before) = (
        gate.held(),
        readers
            .iter()
            .map(|(received, _)| received.load(Ordering::SeqCst))
            .collect::<Vec<_>>(),
    );
    gate.open();
    assert!(
        streaming,
        "both peers had bytes before the upstream finished"
    );
    assert_eq!(
        held, 1,
        "the upstream response was still held: {seen_before:?}"
    );
    let mut bodies = Vec::new();
    for (_, task) in readers {
        bodies.push(task.await.unwrap());
    }
    let whole = client.await.unwrap().unwrap();
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(sha256(&whole.body), layer);
    assert_eq!(bodies[0].0, Some(size));
    assert_eq!(sha256(&bodies[0].1), layer, "the whole blob, verified");
    assert_eq!(&bodies[1].1[..], &whole.body[offset as usize..], "the tail");
    assert_eq!(
        fixture.proxy.blob_gets().get(&layer),
        Some(&1),
        "one upstream GET, the client's: {:?}",
        fixture.proxy.seen()
    );
    assert_eq!(
        fixture.proxy.seen().len(),
        1,
        "no peer GET reached the upstream: {:?}",
        fixture.proxy.seen()
    );
    gantry.stop().await;
}
