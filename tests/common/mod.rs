//! Shared test harness: real components on 127.0.0.1 ephemeral ports in temp dirs.
//!
//! - [`registry`]: the real upstream (`docker-registry`) and a counting pass-through in front of it;
//! - [`images`]: OCI layouts built from scratch and pushed with skopeo;
//! - [`fake`]: a small scripted upstream for what a real registry will not do on demand;
//! - this file: tool checks, an HTTP client, gantry started in-process, skopeo helpers.
//!
//! A test skips only through [`skip_unless`] (a missing tool: [`require_tools`]): under CI (`CI` set)
//! that fails the test, otherwise it says `SKIPPED` and why.
#![allow(dead_code)]

pub mod browser;
pub mod clients;
pub mod control;
pub mod fake;
pub mod garage;
pub mod gauge;
pub mod images;
pub mod metrics;
pub mod nginx;
pub mod process;
pub mod raw_fake;
pub mod realm;
pub mod redis;
pub mod registry;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;

use gantry::config::Config;
use gantry::server::Running;

pub use images::{Image, Layout};
pub use registry::{CountingProxy, Registry};

/// The only way a test skips: true when `condition` holds; otherwise false after printing
/// `SKIPPED: reason`, or a panic when `CI` is set, so a skip never passes as coverage in CI.
/// Use as `if !skip_unless(cond, "why") { return; }`.
pub fn skip_unless(condition: bool, reason: &str) -> bool {
    if condition {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{reason} (CI is set, so this test may not skip)");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

/// [`skip_unless`] every tool is on the PATH.
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| which(tool).is_none())
        .collect();
    skip_unless(
        missing.is_empty(),
        &format!(
            "missing tools: {} (scripts/test installs them)",
            missing.join(", ")
        ),
    )
}

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Log gantry's warnings and errors into the test output (`GANTRY_TEST_LOG=debug` for more).
pub fn init_logging() {
    let level = std::env::var("GANTRY_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let filter: tracing_subscriber::filter::Targets = level.parse().unwrap_or_default();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .try_init();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where gantry's store keeps a committed blob (`storage.path` = `store`).
pub fn blob_path(store: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    store.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// True for an empty or missing directory (a store's `tmp/` after downloads end).
pub fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

/// Polls `check` every 50 ms until it is true or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The OCI error code of an error body.
    pub fn error_code(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        value["errors"][0]["code"].as_str().map(str::to_owned)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub async fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        client().request(builder.body(Empty::new()).unwrap()),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub async fn http_get(url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    request(Method::GET, url, headers).await
}

/// Every manifest type, as containerd sends when resolving a tag.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// gantry started in-process on 127.0.0.1 ephemeral ports with its own store.
pub struct Gantry {
    pub running: Option<Running>,
    pub dir: TempDir,
}

/// `mirroring:` lines turning prefetch off (it is on by default).
pub const NO_PREFETCH: &str = "  prefetch: false";

/// Lines added to the harness's YAML config, each indented for its section.
#[derive(Clone, Copy, Default)]
pub struct Options<'a> {
    /// Lines inside `storage:` (two-space indent), e.g. `  max_size: 3MiB`.
    pub storage: &'a str,
    /// Lines inside `mirroring:` (two-space indent), e.g. `  username: me`.
    pub mirroring: &'a str,
    /// Top-level sections, e.g. `cache:` or `registries:`.
    pub extra: &'a str,
    /// `mirroring.tags_cache_ttl` (10m when empty).
    pub ttl: &'a str,
    /// Lines inside `timeouts:` besides the harness's `shutdown: 5s`, e.g. `  idle: 1s`.
    pub timeouts: &'a str,
}

impl Gantry {
    /// Mirrors `upstream_url` with a config written as YAML (the contract users write).
    pub async fn start(upstream_url: &str) -> Self {
        Self::start_with(
            tempfile::tempdir().unwrap(),
            upstream_url,
            Options::default(),
        )
        .await
    }

    /// [`Gantry::start`] with `mirroring.prefetch: false`, for tests that count a client's own
    /// blob requests (misses, joins, upstream GETs) and would see prefetches among them.
    pub async fn start_without_prefetch(upstream_url: &str) -> Self {
        Self::start_with(
            tempfile::tempdir().unwrap(),
            upstream_url,
            Options {
                mirroring: NO_PREFETCH,
                ..Options::default()
            },
        )
        .await
    }

    pub async fn start_with(dir: TempDir, upstream_url: &str, options: Options<'_>) -> Self {
        init_logging();
        let yaml = config_yaml(dir.path(), upstream_url, options);
        let config = Config::from_yaml(&yaml, Path::new("test.yaml"))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let running = gantry::server::start(config).await.expect("gantry starts");
        Self {
            running: Some(running),
            dir,
        }
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("gantry is running")
    }

    pub fn host(&self) -> String {
        self.running().addr.to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running().addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.running().admin_addr.expect("admin listener")
        )
    }

    pub async fn metrics(&self) -> String {
        let reply = http_get(&self.admin_url("/metrics"), &[]).await.unwrap();
        String::from_utf8(reply.body.to_vec()).unwrap()
    }

    /// Waits until no blob download is in flight. A client has its blob once it is verified;
    /// the commit into the store (fsync, rename) follows, so tests that look at the store wait.
    pub async fn settled(&self) {
        let idle = wait_until(Duration::from_secs(10), || async {
            self.metrics()
                .await
                .lines()
                .any(|line| line == "gantry_downloads_in_flight 0")
        })
        .await;
        assert!(idle, "downloads still in flight after 10 s");
    }

    pub async fn stop(mut self) -> TempDir {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        self.dir
    }
}

/// The YAML config the harness runs gantry with.
pub fn config_yaml(dir: &Path, upstream_url: &str, options: Options<'_>) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstorage:\n  path: {}\n{}\nmirroring:\n  source: {upstream_url}\n  insecure: true\n  tags_cache_ttl: {}\n{}\ntimeouts:\n  shutdown: 5s\n{}\n{}\n",
        dir.join("store").display(),
        options.storage,
        if options.ttl.is_empty() { "10m" } else { options.ttl },
        options.mirroring,
        options.timeouts,
        options.extra,
    )
}

/// Runs skopeo with the given arguments; panics with its output on failure.
pub async fn skopeo(args: &[&str]) -> String {
    let output = skopeo_output(args).await;
    assert!(output.0, "skopeo {} failed:\n{}", args.join(" "), output.1);
    output.1
}

/// (success, combined output) of a skopeo run.
pub async fn skopeo_output(args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("skopeo runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Pushes the tag `tag` of an OCI layout to `registry_host/repo:tag`.
pub async fn push(layout: &Path, tag: &str, registry_host: &str, repo: &str) {
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{registry_host}/{repo}:{tag}"),
    ])
    .await;
}

/// Pulls `reference` (host/repo:tag or @digest) into a `dir:` copy and returns the directory.
/// `dir:` keeps the manifest and blobs byte for byte, so digests can be compared.
pub async fn pull(reference: &str, all: bool) -> (TempDir, Result<String, String>) {
    let out = tempfile::tempdir().unwrap();
    let target = format!("dir:{}", out.path().join("image").display());
    let source = format!("docker://{reference}");
    let mut args = vec!["copy", "--src-tls-verify=false", "--retry-times=0"];
    if all {
        args.push("--all");
    }
    args.push(&source);
    args.push(&target);
    let (ok, text) = skopeo_output(&args).await;
    (out, if ok { Ok(text) } else { Err(text) })
}

/// sha256 of a file, as `sha256:<hex>`.
pub fn file_digest(path: &Path) -> String {
    use sha2::Digest as _;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// The standard fixture: a real upstream with a counting pass-through, holding
/// `test/multi:v1` (one platform, 4 layers) and `test/index:v1` (amd64 + arm64 index).
pub struct Fixture {
    pub registry: Registry,
    pub proxy: CountingProxy,
    pub multi: Image,
    pub index_digest: String,
    pub platforms: Vec<Image>,
    _layout: TempDir,
}

impl Fixture {
    pub async fn start() -> Self {
        let registry = Registry::start().await;
        let layout_dir = tempfile::tempdir().unwrap();
        let mut layout = Layout::new(layout_dir.path());
        let multi = layout.image("amd64", &[300_000, 1_500_000, 50_000, 2_500_000], 1);
        layout.tag_image("v1", &multi);
        let amd64 = layout.image("amd64", &[200_000, 100_000], 2);
        let arm64 = layout.image("arm64", &[210_000, 90_000], 3);
        let index_digest = layout.tag_index("idx", &[amd64.clone(), arm64.clone()]);
        layout.write_index();
        push(layout_dir.path(), "v1", &registry.host(), "test/multi").await;
        push(layout_dir.path(), "idx", &registry.host(), "test/index").await;
        let proxy = CountingProxy::start(registry.addr).await;
        Self {
            registry,
            proxy,
            multi,
            index_digest,
            platforms: vec![amd64, arm64],
            _layout: layout_dir,
        }
    }
}

/// Streams a response body, adding each frame's length to `received` as it arrives.
pub async fn stream_into(
    url: String,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<(StatusCode, Bytes), String> {
    let response = client()
        .get(url.parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            received.fetch_add(data.len() as u64, std::sync::atomic::Ordering::SeqCst);
            bytes.extend_from_slice(&data);
        }
    }
    Ok((status, Bytes::from(bytes)))
}
