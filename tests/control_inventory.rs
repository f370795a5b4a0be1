//! The control plane's read side against the real upstream: after a pull, `gantry ls` lists the
//! image with the upstream's digest and size, `gantry inspect` shows its blobs held locally and
//! an index's platforms, `gantry stats` counts the warm pull's hits, and an upstream's rate-limit
//! headers show in the stats and in `/metrics`. gantry runs as a process; the CLI is the binary.

mod common;

use common::control::Operated;
use common::fake::{Fake, Scripted};
use common::images::{OCI_INDEX, OCI_MANIFEST};
use common::{http_get, pull, require_tools, Fixture, Options};
use http::StatusCode;
use serde_json::Value;

/// The manifest `repo:tag` as the upstream serves it, and the total it declares: its own bytes
/// plus every blob it references (an index: plus each child and the child's blobs).
async fn declared_size(registry: &str, repo: &str, reference: &str) -> (String, u64) {
    let accept = format!("{OCI_MANIFEST}, {OCI_INDEX}");
    let url = format!("http://{registry}/v2/{repo}/manifests/{reference}");
    let reply = http_get(&url, &[("accept", &accept)]).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{url}");
    let digest = reply.header("docker-content-digest").unwrap().to_owned();
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    let mut total = reply.body.len() as u64;
    for layer in doc["layers"].as_array().into_iter().flatten() {
        total += layer["size"].as_u64().unwrap();
    }
    if let Some(config) = doc.get("config") {
        total += config["size"].as_u64().unwrap();
    }
    for child in doc["manifests"].as_array().into_iter().flatten() {
        let child_digest = child["digest"].as_str().unwrap();
        let (_, child_total) = Box::pin(declared_size(registry, repo, child_digest)).await;
        total += child_total;
    }
    (digest, total)
}

fn image<'a>(listing: &'a Value, repository: &str, tag: &str) -> &'a Value {
    listing["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["repository"] == repository && i["tag"] == tag)
        .unwrap_or_else(|| panic!("{repository}:{tag} is not listed: {listing:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn ls_inspect_and_stats_show_what_a_pull_cached() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let operated = Operated::start(dir.path(), &fixture.proxy.url(), Options::default()).await;
    let mirror = format!("127.0.0.1:{}", operated.gantry.port);

    // Nothing cached yet: an empty listing is a success.
    let empty = operated.ctl_json(&["ls"]).await;
    assert_eq!(empty["images"], serde_json::json!([]), "{empty:#}");

    let (_out, pulled) = pull(&format!("{mirror}/test/multi:v1"), false).await;
    pulled.unwrap();
    let (_out, pulled) = pull(&format!("{mirror}/test/index:idx"), true).await;
    pulled.unwrap();
    operated.settled().await;

    // `ls --json`: the upstream's digest and the total its manifest declares.
    let listing = operated.ctl_json(&["ls"]).await;
    let upstream = fixture.registry.host();
    let (digest, size) = declared_size(&upstream, "test/multi", "v1").await;
    assert_eq!(digest, fixture.multi.manifest_digest);
    let multi = image(&listing, "test/multi", "v1");
    assert_eq!(multi["digest"], digest, "{multi:#}");
    assert_eq!(multi["size"], size, "{multi:#}");
    assert_eq!(multi["cached"], true, "{multi:#}");
    assert_eq!(multi["media_type"], OCI_MANIFEST, "{multi:#}");
    let (index_digest, index_size) = declared_size(&upstream, "test/index", "idx").await;
    assert_eq!(index_digest, fixture.index_digest);
    let index = image(&listing, "test/index", "idx");
    assert_eq!(index["digest"], index_digest, "{index:#}");
    assert_eq!(
        index["size"], index_size,
        "an index counts its children: {index:#}"
    );
    assert_eq!(listing["next_cursor"], Value::Null);

    // Paging: one image per page, the cursor leads to the other.
    let first = operated.ctl_json(&["ls", "--limit", "1"]).await;
    assert_eq!(first["images"].as_array().unwrap().len(), 1, "{first:#}");
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let reply = http_get(
        &operated.admin_url(&format!("/api/v1/images?limit=1&cursor={cursor}")),
        &[],
    )
    .await
    .unwrap();
    let second = reply.json();
    assert_eq!(second["images"].as_array().unwrap().len(), 1, "{second:#}");
    assert_ne!(second["images"][0], first["images"][0]);
    assert_eq!(second["next_cursor"], Value::Null);

    // The table.
    let table = operated.ctl(&["ls"]).await;
    assert!(table.success, "{table:?}");
    let short = &fixture.multi.manifest_digest[..7 + 12];
    let line = table
        .stdout
        .lines()
        .find(|l| l.contains("/test/multi:v1"))
        .unwrap_or_else(|| panic!("no row for test/multi:v1:\n{}", table.stdout));
    assert!(line.contains(short), "{line}");
    assert!(table.stdout.starts_with("IMAGE "), "{}", table.stdout);

    // Globs: one repository, then none (empty, exit 0).
    let only = operated
        .ctl_json(&["ls", "--repository", "test/mul*"])
        .await;
    assert_eq!(only["images"].as_array().unwrap().len(), 1, "{only:#}");
    let none = operated
        .ctl_json(&["ls", "--repository", "nothing-*"])
        .await;
    assert_eq!(none["images"], serde_json::json!([]), "{none:#}");
    let none_table = operated.ctl(&["ls", "--registry", "nowhere.example"]).await;
    assert!(none_table.success, "{none_table:?}");
    assert!(!none_table.stdout.contains("test/"), "{none_table:?}");

    // `inspect --json`: every blob of the manifest, each held locally.
    let inspected = operated.ctl_json(&["inspect", "test/multi:v1"]).await;
    assert_eq!(inspected["digest"], digest, "{inspected:#}");
    let blobs = inspected["manifests"][0]["blobs"].as_array().unwrap();
    let mut listed: Vec<&str> = blobs
        .iter()
        .map(|b| b["digest"].as_str().unwrap())
        .collect();
    let mut expected: Vec<String> = fixture.multi.blobs();
    listed.sort_unstable();
    expected.sort_unstable();
    assert_eq!(listed, expected, "{inspected:#}");
    assert!(
        blobs.iter().all(|b| b["local"] == true),
        "every blob is on disk: {inspected:#}"
    );
    // An index: its platforms, and each child with its blobs.
    let inspected = operated.ctl_json(&["inspect", "test/index:idx"]).await;
    let platforms: Vec<&str> = inspected["manifests"][0]["platforms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["amd64", "arm64"], "{inspected:#}");
    assert_eq!(
        inspected["manifests"].as_array().unwrap().len(),
        3,
        "{inspected:#}"
    );
    let human = operated.ctl(&["inspect", "test/index:idx"]).await;
    assert!(human.success, "{human:?}");
    assert!(human.stdout.contains("linux/arm64"), "{}", human.stdout);

    // Bad input: a malformed reference, and one with nothing cached, name themselves.
    let malformed = operated.ctl(&["inspect", "Test/Multi:v1!"]).await;
    assert!(!malformed.success, "{malformed:?}");
    assert!(malformed.stderr.contains("Test/Multi:v1!"), "{malformed:?}");
    let unknown = operated.ctl(&["inspect", "test/multi:v2"]).await;
    assert!(!unknown.success, "{unknown:?}");
    assert!(unknown.stderr.contains("test/multi:v2"), "{unknown:?}");
    assert!(unknown.stderr.contains("404"), "{unknown:?}");

    // A warm pull: hits, a hit ratio, bytes from the cache, for this registry too.
    let (_out, pulled) = pull(&format!("{mirror}/test/multi:v1"), false).await;
    pulled.unwrap();
    let stats = operated.ctl_json(&["stats"]).await;
    let hits = stats["lookups"]["hits"].as_u64().unwrap();
    assert!(hits > 0, "{stats:#}");
    let ratio = stats["lookups"]["hit_ratio"].as_f64().unwrap();
    assert!(
        ratio > 0.0 && ratio < 1.0,
        "a cold and a warm pull: {stats:#}"
    );
    assert!(
        stats["bytes"]["from_cache"].as_u64().unwrap() >= size,
        "{stats:#}"
    );
    let registry_name = fixture.proxy.url().trim_start_matches("http://").to_owned();
    let registry = stats["registries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["registry"] == registry_name)
        .unwrap_or_else(|| panic!("{registry_name} is not in the stats: {stats:#}"));
    assert!(registry["hits"].as_u64().unwrap() > 0, "{stats:#}");
    assert!(
        registry["bytes_from_cache"].as_u64().unwrap() >= size,
        "{stats:#}"
    );
    assert!(
        registry["bytes_from_upstream"].as_u64().unwrap() > 0,
        "{stats:#}"
    );
    assert_eq!(
        registry["rate_limit"],
        Value::Null,
        "docker-registry sends none"
    );
    assert_eq!(stats["downloads"], serde_json::json!([]), "{stats:#}");
    assert!(
        stats["store"]["bytes"].as_u64().unwrap() >= size,
        "{stats:#}"
    );
    let human = operated.ctl(&["stats"]).await;
    assert!(human.success, "{human:?}");
    assert!(human.stdout.contains("hit ratio:"), "{}", human.stdout);
    assert!(human.stdout.contains(&registry_name), "{}", human.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_rate_limit_headers_show_in_stats_and_metrics() {
    let upstream = Fake::start(|_| {
        Scripted::json(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}),
        )
        .header("ratelimit-limit", "100;w=21600")
        .header("ratelimit-remaining", "87;w=21600")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let operated = Operated::start(dir.path(), &upstream.url(), Options::default()).await;
    let registry_name = upstream.addr.to_string();

    // Before any upstream answer: the registry is listed, with no rate limit known.
    let before = operated.ctl_json(&["stats"]).await;
    assert_eq!(
        before["registries"][0]["registry"], registry_name,
        "{before:#}"
    );
    assert_eq!(
        before["registries"][0]["rate_limit"],
        Value::Null,
        "{before:#}"
    );

    let url = operated.gantry.url("/v2/team/app/manifests/v1");
    let reply = http_get(&url, &[]).await.unwrap();
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);

    let stats = operated.ctl_json(&["stats"]).await;
    let registry = &stats["registries"][0];
    assert_eq!(registry["registry"], registry_name, "{stats:#}");
    assert_eq!(registry["rate_limit"]["limit"], 100, "{stats:#}");
    assert_eq!(registry["rate_limit"]["remaining"], 87, "{stats:#}");
    assert_eq!(registry["rate_limit"]["window_seconds"], 21600, "{stats:#}");
    assert!(
        registry["upstream_errors"].as_u64().unwrap() >= 1,
        "{stats:#}"
    );
    let human = operated.ctl(&["stats"]).await;
    assert!(human.stdout.contains("87/100 per 6h"), "{}", human.stdout);

    let metrics = operated.metrics().await;
    let series = |name: &str| format!("{name}{{registry=\"{registry_name}\"}}");
    assert_eq!(
        common::metrics::value(&metrics, &series("gantry_upstream_ratelimit_limit")),
        100.0
    );
    assert_eq!(
        common::metrics::value(&metrics, &series("gantry_upstream_ratelimit_remaining")),
        87.0
    );
}

/// docs/openapi.yaml documents exactly `gantry::control::ROUTES`, and the router answers each of
/// them (an unknown path is `NO_ROUTE`, so a route the router lacks would show).
#[tokio::test(flavor = "multi_thread")]
async fn openapi_paths_are_the_routers_routes() {
    use std::collections::BTreeSet;

    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    let spec: Value = serde_yaml::from_str(&text).unwrap();
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let routes: BTreeSet<(String, String)> = gantry::control::ROUTES
        .iter()
        .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(documented, routes);

    let upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;
    let gantry = common::Gantry::start(&upstream.url()).await;
    let answer = |method: &str, path: &str| {
        let url = gantry.admin_url(path);
        let method: http::Method = method.parse().unwrap();
        async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            let body = if method == http::Method::POST {
                bytes::Bytes::from_static(br#"{"references": []}"#)
            } else {
                bytes::Bytes::new()
            };
            let request = http::Request::builder()
                .method(method)
                .uri(url)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(body))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            let code = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
            (status, code)
        }
    };
    for (method, path) in gantry::control::ROUTES {
        let (status, code) = answer(method, path).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_ne!(
            code.as_deref(),
            Some("NO_ROUTE"),
            "{method} {path}: {status}"
        );
    }
    for (method, path) in [("GET", "/api/v1/nothing"), ("POST", "/api/v1/nothing")] {
        let (_, code) = answer(method, path).await;
        assert_eq!(code.as_deref(), Some("NO_ROUTE"), "{method} {path}");
    }
    gantry.stop().await;
}
