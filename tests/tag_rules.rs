//! `tag_rules` against the real docker-registry behind the counting pass-through: the first
//! matching rule sets a tag's TTL (`latest` revalidated after its own 1s, `v*` never, even past
//! the global TTL), a tag no rule matches lives `tags_cache_ttl`, and a bad rule is refused with
//! its key.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{request, require_tools, skopeo, Fixture, Gantry, Options, ACCEPT_ALL};
use http::{Method, StatusCode};

const RULES: &str = "  tag_rules:
    - match: latest
      ttl: 1s
    - match: \"v*\"
      ttl: forever
";

async fn get_tag(gantry: &Gantry, tag: &str) -> common::Reply {
    let url = gantry.url(&format!("/v2/test/multi/manifests/{tag}"));
    request(Method::GET, &url, &[("accept", ACCEPT_ALL)])
        .await
        .unwrap()
}

/// `latest` (its rule: 1s) and `dev` (no rule: the global `tags_cache_ttl`, 3s) are revalidated
/// after their own TTLs; `v1` (`forever`) is asked nothing past both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tag_lives_by_its_first_matching_rule_and_forever_is_never_revalidated() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let upstream = fixture.registry.host();
    for tag in ["latest", "dev"] {
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{upstream}/test/multi:v1"),
            &format!("docker://{upstream}/test/multi:{tag}"),
        ])
        .await;
    }
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options {
            ttl: "3s",
            mirroring: RULES,
            ..Options::default()
        },
    )
    .await;
    let tags = ["latest", "dev", "v1"];
    for tag in tags {
        let reply = get_tag(&gantry, tag).await;
        assert_eq!(reply.status, StatusCode::OK, "{tag}: {:?}", reply.body);
        assert_eq!(
            reply.header("docker-content-digest"),
            Some(fixture.multi.manifest_digest.as_str())
        );
    }
    let heads = |tag: &str| {
        fixture
            .proxy
            .count(&Method::HEAD, &format!("/manifests/{tag}"))
    };
    let gets = |tag: &str| {
        fixture
            .proxy
            .count(&Method::GET, &format!("/manifests/{tag}"))
    };
    for tag in tags {
        assert_eq!(gets(tag), 1, "{tag}");
    }

    // Past `latest`'s rule, inside the global TTL.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    for tag in tags {
        assert_eq!(get_tag(&gantry, tag).await.status, StatusCode::OK, "{tag}");
    }
    assert_eq!(heads("latest"), 1, "{:?}", fixture.proxy.seen());
    assert_eq!(heads("dev"), 0, "dev lives the global 3s");
    assert_eq!(heads("v1"), 0);

    // Past the global TTL too.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    for tag in tags {
        assert_eq!(get_tag(&gantry, tag).await.status, StatusCode::OK, "{tag}");
    }
    assert_eq!(heads("dev"), 1, "{:?}", fixture.proxy.seen());
    assert_eq!(heads("v1"), 0, "forever: never revalidated");
    assert_eq!(gets("v1"), 1, "forever: never fetched again");

    // Only a refresh asks the upstream about a `forever` tag.
    let mirror = &gantry.running.as_ref().unwrap().mirror;
    let target = mirror.resolve(None, "test/multi").unwrap();
    let refreshed = mirror.refresh_tag_now(&target, "v1").await.unwrap();
    assert_eq!(refreshed.to_string(), fixture.multi.manifest_digest);
    assert_eq!(heads("v1"), 1);
    gantry.stop().await;
}

/// A registry's own `tag_rules` replace the global list: there, `v1` is not `forever`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_s_rules_replace_the_global_ones() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let extra = format!(
        "registries:\n  - host: mirror.test:5000\n    url: {}\n    insecure: true\n    tag_rules:\n      - match: \"v*\"\n        ttl: 1s\n",
        fixture.proxy.url()
    );
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options {
            mirroring: "  tag_rules:\n    - match: \"v*\"\n      ttl: forever\n",
            extra: &extra,
            ..Options::default()
        },
    )
    .await;
    let get = |path: &'static str| {
        let url = gantry.url(path);
        async move {
            request(Method::GET, &url, &[("accept", ACCEPT_ALL)])
                .await
                .unwrap()
        }
    };
    let default = "/v2/test/multi/manifests/v1";
    let other = "/v2/mirror.test:5000/test/multi/manifests/v1";
    for path in [default, other] {
        assert_eq!(get(path).await.status, StatusCode::OK, "{path}");
    }
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    fixture.proxy.clear();
    for path in [default, other] {
        assert_eq!(get(path).await.status, StatusCode::OK, "{path}");
    }
    assert_eq!(
        fixture.proxy.count(&Method::HEAD, "/manifests/v1"),
        1,
        "only the registry with its own 1s rule revalidates: {:?}",
        fixture.proxy.seen()
    );
    gantry.stop().await;
}

#[test]
fn a_bad_rule_is_refused_naming_its_key() {
    let parse = |yaml: &str| {
        gantry::config::Config::from_yaml(yaml, Path::new("test.yaml"))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let error = parse(
        "mirroring:\n  tag_rules:\n    - match: latest\n      ttl: 1m\n    - match: \"v*\"\n      ttl: someday\n",
    );
    assert!(error.contains("mirroring.tag_rules[1].ttl"), "{error}");
    assert!(error.contains("`forever`"), "{error}");

    let error = parse("mirroring:\n  tag_rules:\n    - match: latest\n");
    assert!(error.contains("mirroring.tag_rules[0]"), "{error}");
    assert!(error.contains("ttl"), "{error}");

    let error = parse(
        "registries:\n  - host: ghcr.io\n    url: https://ghcr.io\n    tag_rules:\n      - match: \"team/*\"\n        ttl: 1m\n      - match: \"\"\n        ttl: 1m\n",
    );
    assert!(
        error.contains("registries[0].tag_rules[0].match"),
        "{error}"
    );
    assert!(
        error.contains("registries[0].tag_rules[1].match"),
        "{error}"
    );
}
