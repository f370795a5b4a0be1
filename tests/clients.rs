//! End to end with the real container clients: dockerd (`registry-mirrors`), containerd + ctr
//! (`hosts.toml`), podman and skopeo (`registries.conf`) pull through gantry from a real
//! `docker-registry`. Each test starts its own upstream, gantry, client daemons and a trap proxy
//! that catches any fallback to the real registries (which are unreachable here anyway).
//!
//! Every test checks the pulled digests against the upstream's, that each blob crossed the
//! upstream link once, and that a second pull (image removed, or a fresh client data dir) made no
//! upstream blob GET at all while gantry served the blobs from its store.
//!
//! `skopeo copy --all` addressed to gantry directly is covered by `tests/pull.rs`; here skopeo
//! goes through a `registries.conf` mirror, as podman and CRI-O do.

mod common;

use std::time::Instant;

use common::clients::{
    assert_second_pull_from_cache, basic_auth, blob_hits, gantry_on_ipv6_loopback, has_repo_digest,
    host_arch, https_get, private_mounts, registries_conf, skopeo_with_registries_conf,
    test_certificate, upstream_context, Containerd, Dockerd, DockerdSetup, Hub, Podman, Run, Trap,
    DOCKER_TOOLS,
};
use common::{file_digest, require_tools, skip_unless, Fixture, Gantry, Options};

const CONTAINERD_TOOLS: &[&str] = &["docker-registry", "skopeo", "containerd", "ctr"];
const PODMAN_TOOLS: &[&str] = &["docker-registry", "skopeo", "podman"];

fn done(test: &str, started: Instant) {
    eprintln!("{test}: {:.1}s", started.elapsed().as_secs_f64());
}

/// gantry mirroring `hub` by default and `other` as the configured registry `host`.
async fn gantry_with_registry(hub: &Hub, host: &str, other: &Hub) -> Gantry {
    let extra = format!(
        "registries:\n  - host: \"{host}\"\n    url: {}\n    insecure: true\n",
        other.proxy.url()
    );
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    Gantry::start_with(tempfile::tempdir().unwrap(), &hub.proxy.url(), options).await
}

// ---------------------------------------------------------------------------------------------
// dockerd

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_pulls_a_single_platform_image_through_registry_mirrors() {
    if !require_tools(DOCKER_TOOLS) {
        return;
    }
    let started = Instant::now();
    let hub = Hub::start("library", 100).await;
    let gantry = Gantry::start(&hub.proxy.url()).await;
    let trap = Trap::start().await;
    let dockerd = Dockerd::start(&gantry.host(), &trap).await;
    assert!(
        !dockerd.uses_containerd_image_store().await,
        "the classic image store: {}",
        dockerd.logs()
    );

    let out = dockerd.pull("single:v1", &trap, &[&hub]).await;
    let image = dockerd.inspect("single:v1").await;
    assert!(
        has_repo_digest(&image["RepoDigests"], &hub.single.manifest_digest),
        "RepoDigests {} should name {}",
        image["RepoDigests"],
        hub.single.manifest_digest
    );
    assert_eq!(image["Id"], hub.single.config_digest.as_str());
    assert_eq!(image["Architecture"], "amd64");
    hub.assert_fetched_once(&hub.single.blobs(), &[], &out.text());
    trap.assert_untouched(&dockerd.logs());

    dockerd.remove("single:v1").await;
    hub.proxy.clear();
    let hits = blob_hits(&gantry).await;
    let out = dockerd.pull("single:v1", &trap, &[&hub]).await;
    assert_eq!(
        dockerd.inspect("single:v1").await["Id"],
        hub.single.config_digest.as_str()
    );
    assert_second_pull_from_cache(&hub, &gantry, hits, hub.single.blobs().len(), &out.text()).await;
    trap.assert_untouched(&dockerd.logs());
    done("dockerd single-platform", started);
}

/// Pulls `multiarch:v1` (an OCI index) and checks this machine's platform was chosen, then
/// again after `docker rmi`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_picks_this_platform_from_a_multi_arch_index() {
    if !require_tools(DOCKER_TOOLS) {
        return;
    }
    let started = Instant::now();
    let hub = Hub::start("library", 200).await;
    let gantry = Gantry::start(&hub.proxy.url()).await;
    let trap = Trap::start().await;
    let dockerd = Dockerd::start(&gantry.host(), &trap).await;
    assert!(
        !dockerd.uses_containerd_image_store().await,
        "the classic image store: {}",
        dockerd.logs()
    );
    let (native, other) = hub.platforms();

    let out = dockerd.pull("multiarch:v1", &trap, &[&hub]).await;
    let image = dockerd.inspect("multiarch:v1").await;
    assert!(
        has_repo_digest(&image["RepoDigests"], &hub.index_digest),
        "RepoDigests {} should name the index {}",
        image["RepoDigests"],
        hub.index_digest
    );
    assert_eq!(image["Architecture"], host_arch(), "{image}");
    assert_eq!(image["Id"], native.config_digest.as_str());
    hub.assert_fetched_once(&native.blobs(), &other.blobs(), &out.text());
    trap.assert_untouched(&dockerd.logs());

    dockerd.remove("multiarch:v1").await;
    hub.proxy.clear();
    let hits = blob_hits(&gantry).await;
    let out = dockerd.pull("multiarch:v1", &trap, &[&hub]).await;
    assert_eq!(
        dockerd.inspect("multiarch:v1").await["Architecture"],
        host_arch()
    );
    assert_second_pull_from_cache(&hub, &gantry, hits, native.blobs().len(), &out.text()).await;
    trap.assert_untouched(&dockerd.logs());
    done("dockerd multi-arch index", started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_pulls_by_digest() {
    if !require_tools(DOCKER_TOOLS) {
        return;
    }
    let started = Instant::now();
    let hub = Hub::start("library", 300).await;
    let gantry = Gantry::start(&hub.proxy.url()).await;
    let trap = Trap::start().await;
    let dockerd = Dockerd::start(&gantry.host(), &trap).await;
    let (native, other) = hub.platforms();

    // An image manifest by digest.
    let single = format!("single@{}", hub.single.manifest_digest);
    let out = dockerd.pull(&single, &trap, &[&hub]).await;
    let image = dockerd.inspect(&single).await;
    assert!(
        has_repo_digest(&image["RepoDigests"], &hub.single.manifest_digest),
        "{}",
        image["RepoDigests"]
    );
    assert_eq!(image["Id"], hub.single.config_digest.as_str());
    hub.assert_fetched_once(&hub.single.blobs(), &[], &out.text());

    // An index by digest: still this machine's platform.
    let index = format!("multiarch@{}", hub.index_digest);
    let out = dockerd.pull(&index, &trap, &[&hub]).await;
    let image = dockerd.inspect(&index).await;
    assert_eq!(image["Architecture"], host_arch());
    assert_eq!(image["Id"], native.config_digest.as_str());
    hub.assert_fetched_once(&native.blobs(), &other.blobs(), &out.text());
    // By digest, nothing asks for a tag.
    let tag_requests: Vec<_> = hub
        .proxy
        .seen()
        .into_iter()
        .filter(|s| s.path.contains("/manifests/v1"))
        .collect();
    assert!(tag_requests.is_empty(), "{tag_requests:?}");
    trap.assert_untouched(&dockerd.logs());

    dockerd.remove(&single).await;
    dockerd.remove(&index).await;
    hub.proxy.clear();
    let hits = blob_hits(&gantry).await;
    let out = dockerd.pull(&single, &trap, &[&hub]).await;
    let out2 = dockerd.pull(&index, &trap, &[&hub]).await;
    assert_second_pull_from_cache(
        &hub,
        &gantry,
        hits,
        hub.single.blobs().len() + native.blobs().len(),
        &format!("{}\n{}", out.text(), out2.text()),
    )
    .await;
    trap.assert_untouched(&dockerd.logs());
    done("dockerd by digest", started);
}

// ---------------------------------------------------------------------------------------------
// dockerd + docker login: gantry as an HTTPS registry with htpasswd users

/// What gantry asked the fixture's upstream, one request a line.
fn fixture_seen(fixture: &Fixture) -> String {
    let lines: Vec<String> = fixture
        .proxy
        .seen()
        .iter()
        .map(|s| format!("  {} {}", s.method, s.path))
        .collect();
    format!("requests gantry sent upstream:\n{}", lines.join("\n"))
}

/// Whether a failed command's output mentions one of `words` (case-insensitive).
fn mentions(out: &Run, words: &[&str]) -> bool {
    let text = format!("{}\n{}", out.stdout, out.stderr).to_lowercase();
    words.iter().any(|word| text.contains(word))
}

/// gantry serves HTTPS with a certificate from a test CA and requires htpasswd users; a real
/// dockerd trusts the CA through `/etc/docker/certs.d/localhost:PORT/ca.crt` in its own mount
/// namespace (its `/etc/docker` is a temp dir; the real one is never touched).
///
/// The daemon resolves `localhost` to `::1` only, where gantry listens: dockerd always treats
/// registries in 127.0.0.0/8 as insecure (no certificate check, certs.d ignored), so on
/// 127.0.0.1 the CA would not be exercised at all. The first login, before the CA is trusted,
/// proves the certificate is checked.
///
/// Then: `docker login -u alice --password-stdin` succeeds and lands in the CLI's own
/// DOCKER_CONFIG; `docker pull localhost:PORT/test/multi:v1` gets the upstream's digest; a wrong
/// password fails `docker login`; bob (a valid user that no rule for `test/index` names) is
/// denied `test/index`: the CLI says so, gantry answers 403 DENIED, and nothing of `test/index`
/// was asked upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_login_and_pull_over_tls_with_htpasswd() {
    let mut tools = DOCKER_TOOLS.to_vec();
    tools.push("openssl");
    if !require_tools(&tools) {
        return;
    }
    if !skip_unless(
        private_mounts(),
        "dockerd needs a private mount namespace (`unshare --mount`) to trust the test CA \
         without writing the real /etc/docker",
    ) {
        return;
    }
    let started = Instant::now();
    let fixture = Fixture::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificate(secrets.path());
    let htpasswd = secrets.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!(
            "alice:{}\nbob:{}\n",
            bcrypt::hash("alice-pw", 5).unwrap(),
            bcrypt::hash("bob-pw", 5).unwrap()
        ),
    )
    .unwrap();
    let extra = format!(
        "tls:\n  cert: {}\n  key: {}\nauth:\n  htpasswd: {}\n  rules:\n    - repositories: [\"*/test/multi\"]\n      users: [alice]\n    - repositories: [\"*/test/index\"]\n      users: [alice]\n",
        cert.display(),
        key.display(),
        htpasswd.display()
    );
    let gantry = gantry_on_ipv6_loopback(
        &fixture.proxy.url(),
        Options {
            extra: &extra,
            ..Options::default()
        },
    )
    .await;
    let port = gantry.running.as_ref().unwrap().addr.port();
    // What docker is told (login, certs.d, pull), and the same server for direct requests.
    let registry = format!("localhost:{port}");
    let direct = format!("https://[::1]:{port}");
    let trap = Trap::start().await;
    let dockerd = Dockerd::start_with(
        &trap,
        DockerdSetup {
            own_etc_docker: true,
            hosts: Some("::1 localhost\n"),
            ..DockerdSetup::default()
        },
    )
    .await;
    let context = |out: &Run| {
        format!(
            "{}\n{}\n{}\n{}",
            out.text(),
            trap.describe(),
            fixture_seen(&fixture),
            dockerd.logs()
        )
    };

    // Not trusted yet: the certificate is checked (dockerd does not take gantry as insecure).
    let out = dockerd.login(&registry, "alice", "alice-pw").await;
    assert!(
        !out.ok && mentions(&out, &["x509", "certificate"]),
        "before the CA is in certs.d, login must fail on gantry's certificate\n{}",
        context(&out)
    );

    dockerd.trust_ca(&registry, &ca);
    let out = dockerd.login(&registry, "alice", "alice-pw").await;
    assert!(out.ok, "docker login as alice\n{}", context(&out));
    let cli_config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dockerd.cli_config_dir().join("config.json")).unwrap(),
    )
    .unwrap();
    assert!(
        cli_config["auths"][&registry].is_object(),
        "docker login stores alice's credentials in the CLI's own DOCKER_CONFIG: {cli_config}"
    );

    let reference = format!("{registry}/test/multi:v1");
    let out = dockerd.docker(&["pull", &reference]).await;
    assert!(out.ok, "docker pull {reference}\n{}", context(&out));
    let image = dockerd.inspect(&reference).await;
    let repo_digest = format!("{registry}/test/multi@{}", fixture.multi.manifest_digest);
    assert!(
        image["RepoDigests"]
            .as_array()
            .is_some_and(|list| list.iter().any(|entry| entry == repo_digest.as_str())),
        "RepoDigests {} should hold {repo_digest}\n{}",
        image["RepoDigests"],
        context(&out)
    );
    assert_eq!(image["Id"], fixture.multi.config_digest.as_str());
    let gets = fixture.proxy.blob_gets();
    for blob in fixture.multi.blobs() {
        assert_eq!(
            gets.get(&blob),
            Some(&1),
            "one upstream GET for {blob}\n{}",
            context(&out)
        );
    }

    let out = dockerd.login(&registry, "alice", "not-her-password").await;
    assert!(
        !out.ok && mentions(&out, &["unauthorized", "401"]),
        "docker login with a wrong password must fail as unauthorized\n{}",
        context(&out)
    );

    // bob is a valid user (login pings /v2/ with his credentials) but no rule for test/index
    // names him.
    let out = dockerd.login(&registry, "bob", "bob-pw").await;
    assert!(out.ok, "docker login as bob\n{}", context(&out));
    let denied = format!("{registry}/test/index:idx");
    let out = dockerd.docker(&["pull", &denied]).await;
    assert!(
        !out.ok && mentions(&out, &["denied", "unauthorized"]),
        "bob's pull of {denied} must be denied\n{}",
        context(&out)
    );
    let upstream_index: Vec<String> = fixture
        .proxy
        .seen()
        .iter()
        .filter(|s| s.path.contains("test/index"))
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert!(
        upstream_index.is_empty(),
        "a denied pull must not reach the upstream: {upstream_index:?}\n{}",
        context(&out)
    );
    let manifest = format!("{direct}/v2/test/index/manifests/idx");
    let reply = https_get(&ca, &manifest, Some(&basic_auth("bob", "bob-pw")))
        .await
        .unwrap();
    assert_eq!(
        (reply.status.as_u16(), reply.error_code().as_deref()),
        (403, Some("DENIED")),
        "GET {manifest} as bob: {reply:?}"
    );
    // The repository is there for alice: bob was refused access, not told it is missing.
    let reply = https_get(&ca, &manifest, Some(&basic_auth("alice", "alice-pw")))
        .await
        .unwrap();
    assert_eq!(
        reply.status.as_u16(),
        200,
        "GET {manifest} as alice: {reply:?}"
    );
    trap.assert_untouched(&dockerd.logs());
    done("dockerd login + pull over TLS with htpasswd", started);
}

// ---------------------------------------------------------------------------------------------
// containerd + ctr

/// What a containerd should hold after a pull.
struct Expected<'a> {
    hub: &'a Hub,
    reference: &'a str,
    /// The image's target digest (`ctr images ls`).
    target: &'a str,
    /// Digests that must be in the content store, and digests that must not.
    present: &'a [String],
    absent: &'a [String],
    trap: &'a Trap,
}

impl Expected<'_> {
    async fn check(&self, containerd: &Containerd, out: &Run) {
        let trap = self.trap;
        assert_eq!(
            containerd
                .image_digest(self.reference, trap)
                .await
                .as_deref(),
            Some(self.target),
            "{}\n{}",
            out.text(),
            upstream_context(&[self.hub])
        );
        let content = containerd.content(trap).await;
        for digest in self.present {
            assert!(
                content.contains(digest),
                "{digest} missing from the content store {content:?}\n{}",
                out.text()
            );
        }
        for digest in self.absent {
            assert!(
                !content.contains(digest),
                "{digest} (another platform) was fetched\n{}",
                out.text()
            );
        }
        trap.assert_untouched(&containerd.log());
    }
}

/// Pulls `docker.io/library/multiarch:v1` with `ctr --hosts-dir` (docker.io → gantry) and
/// `platform` args (`all`: every platform is expected), twice.
async fn containerd_pulls_an_index(platform: &[&str], all: bool) {
    let started = Instant::now();
    let hub = Hub::start("library", if all { 500 } else { 400 }).await;
    let gantry = Gantry::start(&hub.proxy.url()).await;
    let trap = Trap::start().await;
    let hosts = tempfile::tempdir().unwrap();
    Containerd::write_hosts_toml(
        hosts.path(),
        "docker.io",
        "https://registry-1.docker.io",
        &gantry.url(""),
    );
    let (native, other) = hub.platforms();
    let (wanted, unwanted): (Vec<String>, Vec<String>) = if all {
        let mut wanted = native.blobs();
        wanted.extend(other.blobs());
        (wanted, vec![])
    } else {
        (native.blobs(), other.blobs())
    };
    let reference = "docker.io/library/multiarch:v1";

    let mut expected = wanted.clone();
    expected.push(hub.index_digest.clone());
    expected.push(native.manifest_digest.clone());
    if all {
        expected.push(other.manifest_digest.clone());
    }
    let expect = Expected {
        hub: &hub,
        reference,
        target: &hub.index_digest,
        present: &expected,
        absent: &unwanted,
        trap: &trap,
    };

    let containerd = Containerd::start().await;
    let out = containerd
        .pull(hosts.path(), platform, reference, &trap, &[&hub])
        .await;
    expect.check(&containerd, &out).await;
    hub.assert_fetched_once(&wanted, &unwanted, &out.text());
    drop(containerd);

    // A second containerd with an empty content store.
    hub.proxy.clear();
    let hits = blob_hits(&gantry).await;
    let containerd = Containerd::start().await;
    let out = containerd
        .pull(hosts.path(), platform, reference, &trap, &[&hub])
        .await;
    expect.check(&containerd, &out).await;
    assert_second_pull_from_cache(&hub, &gantry, hits, wanted.len(), &out.text()).await;
    done(&format!("containerd {}", platform.join(" ")), started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_this_platform_through_hosts_toml() {
    if !require_tools(CONTAINERD_TOOLS) {
        return;
    }
    let platform = format!("linux/{}", host_arch());
    containerd_pulls_an_index(&["--platform", &platform], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_all_platforms_through_hosts_toml() {
    if !require_tools(CONTAINERD_TOOLS) {
        return;
    }
    containerd_pulls_an_index(&["--all-platforms"], true).await;
}

/// containerd adds `?ns=<host>` when it asks the mirror for another registry's image; gantry
/// routes it to the `registries:` entry of that host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_ns_reaches_a_configured_registry() {
    if !require_tools(CONTAINERD_TOOLS) {
        return;
    }
    containerd_pulls_from_a_configured_registry("other.example", 600).await;
}

/// With a port, containerd percent-encodes the colon: `?ns=other.example%3A5000`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_ns_with_a_port_reaches_a_configured_registry() {
    if !require_tools(CONTAINERD_TOOLS) {
        return;
    }
    containerd_pulls_from_a_configured_registry("other.example:5000", 650).await;
}

/// `ctr pull <host>/team/single:v1` with `DIR/<host>/hosts.toml` naming gantry; gantry has
/// `registries: [{host: <host>, url: <second upstream>}]`. The host does not resolve: only
/// gantry can serve it.
async fn containerd_pulls_from_a_configured_registry(host: &str, seed: u64) {
    let started = Instant::now();
    let hub = Hub::start("library", seed).await;
    let other = Hub::start("team", seed + 10).await;
    let gantry = gantry_with_registry(&hub, host, &other).await;
    let trap = Trap::start().await;
    let hosts = tempfile::tempdir().unwrap();
    Containerd::write_hosts_toml(
        hosts.path(),
        host,
        &format!("https://{host}"),
        &gantry.url(""),
    );
    let reference = format!("{host}/team/single:v1");
    let platform = format!("linux/{}", host_arch());
    let platform = ["--platform", platform.as_str()];
    let mut present = other.single.blobs();
    present.push(other.single.manifest_digest.clone());
    let expect = Expected {
        hub: &other,
        reference: &reference,
        target: &other.single.manifest_digest,
        present: &present,
        absent: &[],
        trap: &trap,
    };

    let containerd = Containerd::start().await;
    let out = containerd
        .pull(hosts.path(), &platform, &reference, &trap, &[&hub, &other])
        .await;
    expect.check(&containerd, &out).await;
    other.assert_fetched_once(&other.single.blobs(), &[], &out.text());
    assert!(
        hub.proxy.seen().is_empty(),
        "ns={host} must not reach the default upstream\n{}",
        upstream_context(&[&hub, &other])
    );
    drop(containerd);

    other.proxy.clear();
    let hits = blob_hits(&gantry).await;
    let containerd = Containerd::start().await;
    let out = containerd
        .pull(hosts.path(), &platform, &reference, &trap, &[&hub, &other])
        .await;
    expect.check(&containerd, &out).await;
    assert_second_pull_from_cache(
        &other,
        &gantry,
        hits,
        other.single.blobs().len(),
        &out.text(),
    )
    .await;
    done(&format!("containerd ns={host}"), started);
}

// ---------------------------------------------------------------------------------------------
// podman

/// podman with `[[registry]] prefix = "docker.io"` and gantry as its mirror; the primary
/// (docker.io) is unreachable, so only the mirror can serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_this_platform_through_a_registries_conf_mirror() {
    if !require_tools(PODMAN_TOOLS) {
        return;
    }
    let started = Instant::now();
    let hub = Hub::start("library", 800).await;
    let gantry = Gantry::start(&hub.proxy.url()).await;
    let trap = Trap::start().await;
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("registries.conf");
    registries_conf(&conf, &[("docker.io", "docker.io", &gantry.host())]);
    let (native, other) = hub.platforms();
    let reference = "docker.io/library/multiarch:v1";

    let podman = Podman::new(&conf);
    let out = podman.pull(reference, &trap, &[&hub]).await;
    check_podman_image(&podman, &hub, reference, &trap).await;
    hub.assert_fetched_once(&native.blobs(), &other.blobs(), &out.text());
    trap.assert_untouched(&out.text());

    hub.proxy.clear();
    let hits = blob_hits(&gantry).await;
    let podman = Podman::new(&conf);
    let out = podman.pull(reference, &trap, &[&hub]).await;
    check_podman_image(&podman, &hub, reference, &trap).await;
    assert_second_pull_from_cache(&hub, &gantry, hits, native.blobs().len(), &out.text()).await;
    trap.assert_untouched(&out.text());
    done("podman registries.conf mirror", started);
}

/// `multiarch:v1` as podman stored it: the index's digest, this machine's platform.
async fn check_podman_image(podman: &Podman, hub: &Hub, reference: &str, trap: &Trap) {
    let (native, _) = hub.platforms();
    let image = podman.inspect(reference, trap).await;
    assert_eq!(image["Digest"], hub.index_digest.as_str(), "{image}");
    assert!(
        has_repo_digest(&image["RepoDigests"], &native.manifest_digest),
        "{}",
        image["RepoDigests"]
    );
    assert_eq!(image["Architecture"], host_arch());
    assert_eq!(
        format!("sha256:{}", image["Id"].as_str().unwrap_or_default()),
        native.config_digest
    );
}

/// A mirror location with a path prefix (`gantry/other.example`) reaches the `registries:`
/// entry for that host: `/v2/other.example/team/single/...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_mirror_location_with_a_registry_prefix() {
    if !require_tools(PODMAN_TOOLS) {
        return;
    }
    let started = Instant::now();
    let hub = Hub::start("library", 900).await;
    let other = Hub::start("team", 1000).await;
    let host = "other.example";
    let gantry = gantry_with_registry(&hub, host, &other).await;
    let trap = Trap::start().await;
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("registries.conf");
    registries_conf(&conf, &[(host, host, &format!("{}/{host}", gantry.host()))]);
    let reference = format!("{host}/team/single:v1");

    let podman = Podman::new(&conf);
    let out = podman.pull(&reference, &trap, &[&hub, &other]).await;
    let image = podman.inspect(&reference, &trap).await;
    assert_eq!(image["Digest"], other.single.manifest_digest.as_str());
    other.assert_fetched_once(&other.single.blobs(), &[], &out.text());
    assert!(
        hub.proxy.seen().is_empty(),
        "{host} must not reach the default upstream\n{}",
        upstream_context(&[&hub, &other])
    );
    trap.assert_untouched(&out.text());

    other.proxy.clear();
    let hits = blob_hits(&gantry).await;
    let podman = Podman::new(&conf);
    let out = podman.pull(&reference, &trap, &[&hub, &other]).await;
    assert_eq!(
        podman.inspect(&reference, &trap).await["Digest"],
        other.single.manifest_digest.as_str()
    );
    assert_second_pull_from_cache(
        &other,
        &gantry,
        hits,
        other.single.blobs().len(),
        &out.text(),
    )
    .await;
    trap.assert_untouched(&out.text());
    done("podman mirror path prefix", started);
}

// ---------------------------------------------------------------------------------------------
// skopeo

/// `skopeo copy --all` of an index through a `registries.conf` mirror (the way CRI-O, podman and
/// skopeo use gantry), twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_all_platforms_through_a_registries_conf_mirror() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let started = Instant::now();
    let hub = Hub::start("library", 1100).await;
    let gantry = Gantry::start(&hub.proxy.url()).await;
    let trap = Trap::start().await;
    let work = tempfile::tempdir().unwrap();
    let conf = work.path().join("registries.conf");
    registries_conf(&conf, &[("docker.io", "docker.io", &gantry.host())]);
    let mut all_blobs = hub.amd64.blobs();
    all_blobs.extend(hub.arm64.blobs());

    let copy = |n: u32| {
        let (work, conf, trap, hub) = (work.path(), &conf, &trap, &hub);
        async move {
            let out_dir = work.join(format!("copy-{n}"));
            let target = format!("dir:{}", out_dir.display());
            let out = skopeo_with_registries_conf(
                work,
                conf,
                &[
                    "copy",
                    "--all",
                    "--retry-times=0",
                    "docker://docker.io/library/multiarch:v1",
                    &target,
                ],
                trap,
            )
            .await;
            assert!(
                out.ok,
                "skopeo copy failed\n{}\n{}\n{}",
                out.text(),
                trap.describe(),
                upstream_context(&[hub])
            );
            assert_eq!(
                file_digest(&out_dir.join("manifest.json")),
                hub.index_digest,
                "{}",
                out.text()
            );
            for image in [&hub.amd64, &hub.arm64] {
                let hex = image.manifest_digest.trim_start_matches("sha256:");
                assert_eq!(
                    file_digest(&out_dir.join(format!("{hex}.manifest.json"))),
                    image.manifest_digest
                );
                for blob in image.blobs() {
                    assert_eq!(
                        file_digest(&out_dir.join(blob.trim_start_matches("sha256:"))),
                        blob
                    );
                }
            }
            trap.assert_untouched(&out.text());
            out
        }
    };

    let out = copy(1).await;
    hub.assert_fetched_once(&all_blobs, &[], &out.text());
    hub.proxy.clear();
    let hits = blob_hits(&gantry).await;
    let out = copy(2).await;
    assert_second_pull_from_cache(&hub, &gantry, hits, all_blobs.len(), &out.text()).await;
    done("skopeo registries.conf mirror --all", started);
}
