//! The tag cache against the real upstream and a real `redis-server`: no upstream contact inside
//! the TTL, HEAD revalidation after it, stale answers during outages, Redis shared by two
//! instances, a Redis outage, and Accept negotiation identical to the upstream's.

mod common;

use std::time::{Duration, Instant};

use common::fake::{Fake, Scripted};
use common::metrics::value;
use common::redis::RedisServer;
use common::{
    http_get, pull, request, require_tools, skopeo, wait_until, Fixture, Gantry, Options,
    ACCEPT_ALL,
};
use http::{Method, StatusCode};

const TTL_SECS: f64 = 1.0;

async fn get_tag(gantry: &Gantry, repo_tag: &str, accept: &str) -> common::Reply {
    let (repo, tag) = repo_tag.split_once(':').unwrap();
    let url = gantry.url(&format!("/v2/{repo}/manifests/{tag}"));
    http_get(&url, &[("accept", accept)]).await.unwrap()
}

fn short_ttl() -> Options<'static> {
    Options {
        ttl: "1s",
        ..Options::default()
    }
}

async fn past_the_ttl() {
    tokio::time::sleep(Duration::from_secs_f64(TTL_SECS + 0.2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_the_ttl_a_thousand_tag_requests_make_no_upstream_request() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let first = get_tag(&gantry, "test/multi:v1", ACCEPT_ALL).await;
    assert_eq!(first.status, StatusCode::OK);
    fixture.proxy.clear();
    for batch in 0..20 {
        let requests = (0..50).map(|_| get_tag(&gantry, "test/multi:v1", ACCEPT_ALL));
        for reply in futures_util::future::join_all(requests).await {
            assert_eq!(reply.status, StatusCode::OK, "batch {batch}");
            assert_eq!(reply.body, first.body);
        }
    }
    assert!(
        fixture.proxy.seen().is_empty(),
        "{:?}",
        fixture.proxy.seen()
    );
    assert_eq!(
        value(
            &gantry.metrics().await,
            r#"gantry_cache_lookups_total{kind="tag",outcome="hit"}"#
        ),
        1000.0
    );
}

/// The upstream's answer to the first GET is held until Redis has seen every request's tag lookup
/// miss: all twenty were in flight together, past the cache, so without the single flight each
/// would have sent its own GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_and_revalidations_reach_the_upstream_once() {
    if !require_tools(&["docker-registry", "skopeo", "redis-server"]) {
        return;
    }
    const CLIENTS: u64 = 20;
    let fixture = Fixture::start().await;
    let redis = RedisServer::start().await;
    let cache = format!("cache:\n  redis: {}", redis.url());
    let options = Options {
        extra: &cache,
        ..short_ttl()
    };
    let gantry =
        Gantry::start_with(tempfile::tempdir().unwrap(), &fixture.proxy.url(), options).await;
    let gantry = std::sync::Arc::new(gantry);
    let burst = |gantry: &std::sync::Arc<Gantry>| {
        let gantry = std::sync::Arc::clone(gantry);
        tokio::spawn(async move {
            futures_util::future::join_all(
                (0..CLIENTS).map(|_| get_tag(&gantry, "test/multi:v1", ACCEPT_ALL)),
            )
            .await
        })
    };
    let lookups_before = redis.calls("get").await;
    let gate = fixture.proxy.hold("/manifests/v1", 0);
    let misses = burst(&gantry);
    let all_missed = wait_until(Duration::from_secs(30), || async {
        gate.held() >= 1 && redis.calls("get").await >= lookups_before + CLIENTS
    })
    .await;
    let held = gate.held();
    gate.open();
    for reply in misses.await.unwrap() {
        assert_eq!(
            reply.header("docker-content-digest"),
            Some(fixture.multi.manifest_digest.as_str())
        );
    }
    assert!(
        all_missed,
        "all {CLIENTS} lookups missed while the upstream answer was held"
    );
    assert_eq!(held, 1, "one upstream answer was held");
    assert_eq!(
        fixture.proxy.count(&Method::GET, "/manifests/v1"),
        1,
        "{:?}",
        fixture.proxy.seen()
    );
    // Past the TTL the revalidating HEAD is held until every other request has joined it.
    let joins = || async { value(&gantry.metrics().await, "gantry_tag_refresh_joins_total") };
    let joins_before = joins().await;
    assert_eq!(
        joins_before,
        (CLIENTS - 1) as f64,
        "the misses joined one fetch"
    );
    past_the_ttl().await;
    fixture.proxy.clear();
    let gate = fixture.proxy.hold("/manifests/v1", 0);
    let revalidations = burst(&gantry);
    let all_joined = wait_until(Duration::from_secs(30), || async {
        gate.held() >= 1 && joins().await >= joins_before + (CLIENTS - 1) as f64
    })
    .await;
    let held = gate.held();
    gate.open();
    for reply in revalidations.await.unwrap() {
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert!(
        all_joined,
        "{} of {CLIENTS} revalidations joined while the HEAD was held",
        joins().await - joins_before
    );
    assert_eq!(held, 1, "one upstream HEAD was held");
    assert_eq!(
        fixture.proxy.count(&Method::HEAD, "/manifests/v1"),
        1,
        "{:?}",
        fixture.proxy.seen()
    );
    assert_eq!(fixture.proxy.count(&Method::GET, "/manifests/v1"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_ttl_a_head_revalidates_and_a_retag_is_served() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        short_ttl(),
    )
    .await;
    let steady = Gantry::start(&fixture.proxy.url()).await;
    for instance in [&gantry, &steady] {
        assert_eq!(
            get_tag(instance, "test/multi:v1", ACCEPT_ALL).await.status,
            StatusCode::OK
        );
    }

    past_the_ttl().await;
    fixture.proxy.clear();
    let unchanged = get_tag(&gantry, "test/multi:v1", ACCEPT_ALL).await;
    assert_eq!(
        unchanged.header("docker-content-digest"),
        Some(fixture.multi.manifest_digest.as_str())
    );
    assert_eq!(fixture.proxy.count(&Method::HEAD, "/manifests/v1"), 1);
    assert_eq!(fixture.proxy.count(&Method::GET, "/manifests/"), 0);
    assert_eq!(fixture.proxy.seen().len(), 1, "{:?}", fixture.proxy.seen());

    // Retag upstream: v1 now names the arm64 image.
    let arm64 = &fixture.platforms[1];
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!(
            "docker://{}/test/index@{}",
            fixture.registry.host(),
            arm64.manifest_digest
        ),
        &format!("docker://{}/test/multi:v1", fixture.registry.host()),
    ])
    .await;
    // Inside its TTL a tag is not asked about, however long the retag took: `steady` (10 minutes)
    // still names the old image and asks the upstream nothing.
    fixture.proxy.clear();
    let still_cached = get_tag(&steady, "test/multi:v1", ACCEPT_ALL).await;
    assert_eq!(
        still_cached.header("docker-content-digest"),
        Some(fixture.multi.manifest_digest.as_str())
    );
    assert!(
        fixture.proxy.seen().is_empty(),
        "{:?}",
        fixture.proxy.seen()
    );
    past_the_ttl().await;
    let retagged = get_tag(&gantry, "test/multi:v1", ACCEPT_ALL).await;
    assert_eq!(
        retagged.header("docker-content-digest"),
        Some(arm64.manifest_digest.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tags_still_pull_when_the_upstream_is_down() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        short_ttl(),
    )
    .await;
    let reference = format!("{}/test/multi:v1", gantry.host());
    pull(&reference, false).await.1.expect("cold pull");
    past_the_ttl().await;
    fixture.proxy.set_down(true);
    let (out, result) = pull(&reference, false).await;
    result.expect("the stale tag pulls end to end");
    assert_eq!(
        common::file_digest(&out.path().join("image/manifest.json")),
        fixture.multi.manifest_digest
    );
    past_the_ttl().await;
    let stale = get_tag(&gantry, "test/multi:v1", ACCEPT_ALL).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert!(
        stale
            .header("warning")
            .is_some_and(|w| w.starts_with("110")),
        "{:?}",
        stale.headers
    );
    assert!(
        value(
            &gantry.metrics().await,
            r#"gantry_cache_lookups_total{kind="tag",outcome="stale"}"#
        ) >= 2.0,
        "the stale pull and the stale GET"
    );

    let started = Instant::now();
    let unseen = get_tag(&gantry, "test/multi:never-pulled", ACCEPT_ALL).await;
    assert_eq!(unseen.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unseen.error_code().as_deref(), Some("UNAVAILABLE"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a clear error at once, not a hang"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_pass_through_on_a_miss_and_serve_stale_on_a_hit() {
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(0));
    let status = std::sync::Arc::clone(&failing);
    let upstream = Fake::start(move |seen| {
        let failure = status.load(std::sync::atomic::Ordering::SeqCst);
        if failure != 0 {
            return Scripted::json(
                StatusCode::from_u16(failure).unwrap(),
                serde_json::json!({"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}),
            )
            .header("retry-after", "1");
        }
        if seen.uri.contains("/manifests/") {
            return Scripted::new(StatusCode::OK)
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(&manifest[..]);
        }
        Scripted::new(StatusCode::NOT_FOUND)
    })
    .await;
    let gantry =
        Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), short_ttl()).await;

    failing.store(429, std::sync::atomic::Ordering::SeqCst);
    let limited = get_tag(&gantry, "team/app:v1", ACCEPT_ALL).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        limited.error_code().as_deref(),
        Some("TOOMANYREQUESTS"),
        "never DENIED for a rate limit"
    );
    assert_eq!(limited.header("retry-after"), Some("1"));

    // The 429 holds manifest requests back for its Retry-After (tests/rate_budget.rs): past it,
    // the upstream is asked again.
    failing.store(0, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        get_tag(&gantry, "team/app:v1", ACCEPT_ALL).await.status,
        StatusCode::OK
    );
    for failure in [429, 500, 503] {
        past_the_ttl().await;
        failing.store(failure, std::sync::atomic::Ordering::SeqCst);
        let stale = get_tag(&gantry, "team/app:v1", ACCEPT_ALL).await;
        assert_eq!(
            stale.status,
            StatusCode::OK,
            "upstream {failure}: served stale"
        );
        assert_eq!(&stale.body[..], &manifest[..]);
        assert!(stale.header("warning").is_some(), "upstream {failure}");
    }
    let metrics = gantry.metrics().await;
    assert_eq!(
        value(
            &metrics,
            r#"gantry_tag_revalidations_total{result="failed"}"#
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_tags_through_redis() {
    if !require_tools(&["docker-registry", "skopeo", "redis-server"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let redis = RedisServer::start().await;
    let cache = format!("cache:\n  redis: {}", redis.url());
    let options = Options {
        extra: &cache,
        ..Options::default()
    };
    let first =
        Gantry::start_with(tempfile::tempdir().unwrap(), &fixture.proxy.url(), options).await;
    let second =
        Gantry::start_with(tempfile::tempdir().unwrap(), &fixture.proxy.url(), options).await;

    let from_first = get_tag(&first, "test/multi:v1", ACCEPT_ALL).await;
    assert_eq!(from_first.status, StatusCode::OK);
    fixture.proxy.clear();
    let from_second = get_tag(&second, "test/multi:v1", ACCEPT_ALL).await;
    assert_eq!(from_second.status, StatusCode::OK);
    assert_eq!(from_second.body, from_first.body);
    assert_eq!(
        fixture.proxy.count(&Method::GET, "/manifests/"),
        0,
        "{:?}",
        fixture.proxy.seen()
    );
    assert_eq!(
        fixture.proxy.count(&Method::HEAD, "/manifests/"),
        0,
        "{:?}",
        fixture.proxy.seen()
    );
    // The second instance then pulls the rest (blobs) through its own store.
    pull(&format!("{}/test/multi:v1", second.host()), false)
        .await
        .1
        .expect("pull from the second instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_degrades_to_memory_and_recovers() {
    if !require_tools(&["docker-registry", "skopeo", "redis-server"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let mut redis = RedisServer::start().await;
    let cache = format!("cache:\n  redis: {}", redis.url());
    let options = Options {
        extra: &cache,
        ..Options::default()
    };
    let gantry =
        Gantry::start_with(tempfile::tempdir().unwrap(), &fixture.proxy.url(), options).await;
    assert_eq!(
        get_tag(&gantry, "test/multi:v1", ACCEPT_ALL).await.status,
        StatusCode::OK
    );
    assert!(!redis.keys("gantry:tag:*").await.is_empty());

    redis.kill().await;
    pull(&format!("{}/test/multi:v1", gantry.host()), false)
        .await
        .1
        .expect("cached tag with Redis down");
    pull(&format!("{}/test/index:idx", gantry.host()), true)
        .await
        .1
        .expect("a new tag with Redis down");
    let ready = http_get(&gantry.admin_url("/readyz"), &[]).await.unwrap();
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "a Redis outage degrades, it does not unready"
    );
    assert!(String::from_utf8_lossy(&ready.body).contains("unreachable"));

    let errors_during_outage = value(&gantry.metrics().await, "gantry_redis_errors_total");
    assert!(
        errors_during_outage >= 1.0,
        "the outage was noticed (a new tag was looked up and stored)"
    );

    redis.restart().await;
    // Reconnected once /readyz's PING gets through again.
    let reconnected = wait_until(Duration::from_secs(10), || async {
        http_get(&gantry.admin_url("/readyz"), &[])
            .await
            .is_ok_and(|ready| ready.json()["redis"] == "ok")
    })
    .await;
    assert!(reconnected, "gantry reconnects to Redis without a restart");
    let errors_before = value(&gantry.metrics().await, "gantry_redis_errors_total");
    // Every client naming the manifest's type is answered from the tag's shared entry, still in
    // this process's memory: dropped here, the next request is a miss, written to Redis.
    let mirror = &gantry.running.as_ref().unwrap().mirror;
    let target = mirror.resolve(None, "test/multi").unwrap();
    mirror.forget_tag_locally(target.registry.upstream.name(), target.repo.as_str(), "v1");
    let oci_only = "application/vnd.oci.image.manifest.v1+json";
    assert_eq!(
        get_tag(&gantry, "test/multi:v1", oci_only).await.status,
        StatusCode::OK
    );
    assert!(
        !redis.keys("gantry:tag:*").await.is_empty(),
        "gantry writes to Redis again without a restart"
    );
    assert_eq!(
        value(&gantry.metrics().await, "gantry_redis_errors_total"),
        errors_before,
        "no Redis error once reconnected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_negotiation_matches_the_upstream() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let gantry = Gantry::start(&fixture.proxy.url()).await;
    let accepts = [
        ACCEPT_ALL,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "*/*",
    ];
    for path in [
        "/v2/test/index/manifests/idx",
        "/v2/test/multi/manifests/v1",
    ] {
        for accept in accepts {
            let upstream = http_get(
                &format!("http://{}{path}", fixture.registry.host()),
                &[("accept", accept)],
            )
            .await
            .unwrap();
            // Twice through gantry: the miss and the cache hit answer alike.
            for round in ["miss", "hit"] {
                let mirrored = request(Method::GET, &gantry.url(path), &[("accept", accept)])
                    .await
                    .unwrap();
                let what = format!("{path} accept={accept} ({round})");
                assert_eq!(
                    mirrored.status, upstream.status,
                    "{what}: {:?}",
                    mirrored.body
                );
                if upstream.status == StatusCode::OK {
                    assert_eq!(
                        mirrored.header("content-type"),
                        upstream.header("content-type"),
                        "{what}"
                    );
                    assert_eq!(
                        mirrored.header("docker-content-digest"),
                        upstream.header("docker-content-digest"),
                        "{what}"
                    );
                    assert_eq!(mirrored.body, upstream.body, "{what}");
                }
            }
        }
    }
}

/// A hung Redis (SIGSTOP: connections are accepted, nothing is answered) costs a burst of
/// concurrent lookups one command timeout each; after that, lookups fail at once instead of
/// queueing behind a reconnect to the hung server (watched for longer than gantry used to wait
/// between reconnects); once Redis answers again, lookups hit again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_hung_concurrent_lookups_end_within_the_command_timeout() {
    use gantry::tags::{RedisTags, TagEntry, TagStore};
    if !require_tools(&["redis-server"]) {
        return;
    }
    const LOOKUPS: usize = 20;
    const WATCHED: Duration = Duration::from_millis(1500);
    let timeout = gantry::redis::COMMAND_TIMEOUT;
    let redis = RedisServer::start().await;
    let tags = std::sync::Arc::new(RedisTags::new(&redis.url()).unwrap());
    let key = "gantry:tag:v1:test/hung:v1:any";
    let entry = TagEntry::new("sha256:feed".into(), "application/json".into());
    tags.put(key, &entry).await.unwrap();
    assert_eq!(tags.get(key).await.unwrap(), Some(entry.clone()));

    // Each lookup's own duration, and whether it failed (a miss to the caller).
    let burst = || {
        futures_util::future::join_all((0..LOOKUPS).map(|_| {
            let tags = std::sync::Arc::clone(&tags);
            tokio::spawn(async move {
                let started = Instant::now();
                let found = tags.get(key).await;
                (started.elapsed(), found.is_err())
            })
        }))
    };
    redis.pause();
    for (took, failed) in burst().await.into_iter().map(Result::unwrap) {
        assert!(failed, "a hung Redis answers nothing");
        assert!(
            took < timeout + Duration::from_secs(1),
            "a lookup took {took:?} with Redis hung"
        );
    }
    // Redis is known to be down now: nobody waits on it.
    let watching = Instant::now();
    let mut bursts = 0;
    while watching.elapsed() < WATCHED {
        for (took, failed) in burst().await.into_iter().map(Result::unwrap) {
            assert!(failed);
            assert!(
                took < timeout / 2,
                "a lookup took {took:?}, {:?} after Redis was found hung (queued behind a reconnect?)",
                watching.elapsed()
            );
        }
        bursts += 1;
        // Pacing, not synchronization: a burst every few milliseconds is plenty of lookups.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bursts > 10, "{bursts} bursts");

    redis.resume();
    let hits_again = wait_until(Duration::from_secs(10), || async {
        tags.get(key).await.ok().flatten().as_ref() == Some(&entry)
    })
    .await;
    assert!(hits_again, "lookups hit again once Redis answers");
}

/// Redis down when the cache is made: nothing connects up front, a lookup fails (a miss) within
/// the command timeout, and once Redis runs the cache reaches it without being made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_is_picked_up_when_it_runs() {
    use gantry::tags::{RedisTags, TagEntry, TagStore};
    if !require_tools(&["redis-server"]) {
        return;
    }
    let port = common::free_port();
    let tags = RedisTags::new(&format!("redis://127.0.0.1:{port}/0")).unwrap();
    let key = "gantry:tag:v1:test/late:v1:any";
    let started = Instant::now();
    assert!(tags.get(key).await.is_err(), "no Redis yet");
    assert!(
        started.elapsed() < gantry::redis::COMMAND_TIMEOUT + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let redis = RedisServer::start_on(port).await;
    let entry = TagEntry::new("sha256:late".into(), "application/json".into());
    let reached = wait_until(Duration::from_secs(10), || async {
        tags.put(key, &entry).await.is_ok()
    })
    .await;
    assert!(reached, "the cache reaches Redis once it runs");
    assert_eq!(redis.keys(key).await, vec![key.to_owned()]);
    assert_eq!(tags.get(key).await.unwrap(), Some(entry));
}

/// The control plane's facade on the mirror itself: a retag upstream is invisible inside the TTL
/// until `refresh_tag_now`, which returns the new digest and makes every client see it; after
/// `forget_tag` the next request goes upstream; a tag gone upstream is the upstream's 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_tag_now_shows_a_retag_inside_the_ttl_and_forget_tag_sends_the_next_request_upstream(
) {
    use gantry::mirror::MirrorError;
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let registry = common::Registry::start().await;
    let gantry = Gantry::start(&format!("http://{}", registry.host())).await;
    let layout_dir = tempfile::tempdir().unwrap();
    let mut layout = common::Layout::new(layout_dir.path());
    let first = layout.image("amd64", &[1_000], 11);
    layout.tag_image("v1", &first);
    layout.write_index();
    common::push(layout_dir.path(), "v1", &registry.host(), "test/retag").await;
    let reply = get_tag(&gantry, "test/retag:v1", ACCEPT_ALL).await;
    assert_eq!(
        reply.header("docker-content-digest"),
        Some(first.manifest_digest.as_str())
    );

    let second_dir = tempfile::tempdir().unwrap();
    let mut second_layout = common::Layout::new(second_dir.path());
    let second = second_layout.image("amd64", &[2_000], 12);
    second_layout.tag_image("v1", &second);
    second_layout.write_index();
    common::push(second_dir.path(), "v1", &registry.host(), "test/retag").await;
    let reply = get_tag(&gantry, "test/retag:v1", ACCEPT_ALL).await;
    assert_eq!(
        reply.header("docker-content-digest"),
        Some(first.manifest_digest.as_str()),
        "inside the TTL the retag is not seen"
    );

    let mirror = &gantry.running.as_ref().unwrap().mirror;
    let target = mirror.resolve(None, "test/retag").unwrap();
    let refreshed = mirror.refresh_tag_now(&target, "v1").await.unwrap();
    assert_eq!(refreshed.to_string(), second.manifest_digest);
    let reply = get_tag(&gantry, "test/retag:v1", ACCEPT_ALL).await;
    assert_eq!(
        reply.header("docker-content-digest"),
        Some(second.manifest_digest.as_str()),
        "after the refresh, inside the TTL"
    );

    let upstream_gets = || async {
        let series = format!(
            r#"gantry_upstream_requests_total{{method="GET",registry="{}",route="registry",status="200"}}"#,
            registry.host()
        );
        value(&gantry.metrics().await, &series)
    };
    // The refresh fetched a new image manifest, whose blobs are prefetched: their GETs count too.
    gantry.settled().await;
    let before = upstream_gets().await;
    assert_eq!(
        get_tag(&gantry, "test/retag:v1", ACCEPT_ALL).await.status,
        StatusCode::OK
    );
    assert_eq!(upstream_gets().await, before, "a cached tag asks nothing");
    mirror
        .forget_tag(target.registry.upstream.name(), target.repo.as_str(), "v1")
        .await;
    let reply = get_tag(&gantry, "test/retag:v1", ACCEPT_ALL).await;
    assert_eq!(
        reply.header("docker-content-digest"),
        Some(second.manifest_digest.as_str())
    );
    assert_eq!(
        upstream_gets().await,
        before + 1.0,
        "forgotten: fetched again"
    );

    match mirror.refresh_tag_now(&target, "missing").await {
        Err(MirrorError::UpstreamStatus { status, .. }) => {
            assert_eq!(status, StatusCode::NOT_FOUND)
        }
        other => panic!("expected the upstream's 404, got {other:?}"),
    }
}
