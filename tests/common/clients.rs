//! Real container clients pulling through gantry: `dockerd` (+ the `docker` CLI), `containerd`
//! (+ `ctr`), `podman` and `skopeo` with a `registries.conf`. Each is started by the test on unix
//! sockets and data directories in temp dirs, and killed (and reaped) when its handle drops.
//!
//! Hermeticity:
//! - every client gets HTTP(S)_PROXY pointing at a [`Trap`]: a local listener that records and
//!   refuses whatever a client sends to a registry that is not gantry (Docker Hub, the primary
//!   location of a `registries.conf` entry, the `server` of a `hosts.toml`). Loopback is never
//!   proxied, so gantry is reached directly, and a fallback never leaves the machine: it shows up
//!   as a failed pull and as an entry in the trap;
//! - daemons and podman/skopeo run in a private mount namespace (`unshare --mount`) with empty
//!   tmpfs over `/run`, `/opt` and `/var/lib/containers` (or `/var/lib` when that does not exist),
//!   so what they create by default (`/run/docker/plugins`, `/opt/containerd`,
//!   `/var/lib/containers/cache/blob-info-cache-v1.boltdb`, `/run/containers/networks`) lands in
//!   memory that vanishes with them. Where `unshare` cannot mount, they run without it (once
//!   said loudly); every path they are told about is in a temp dir either way;
//! - they also run under `setpriv --pdeathsig KILL`, so they die with the test process even when
//!   it is killed outright and no `Drop` runs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use super::{CountingProxy, Gantry, Image, Layout, Options, Registry};

/// How long one client command (a pull, an inspect) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a daemon may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Upstream content

/// A real upstream (`docker-registry` behind a [`CountingProxy`]) holding, under `<namespace>/`:
/// - `single:v1`: one amd64 image manifest with three layers;
/// - `multiarch:v1`: an OCI index over an amd64 and an arm64 image (no layer in common).
///
/// Different seeds give different bytes, so two hubs never share a digest.
pub struct Hub {
    pub registry: Registry,
    pub proxy: CountingProxy,
    pub namespace: String,
    pub single: Image,
    pub index_digest: String,
    pub amd64: Image,
    pub arm64: Image,
    _layout: TempDir,
}

impl Hub {
    pub async fn start(namespace: &str, seed: u64) -> Self {
        let registry = Registry::start().await;
        let layout_dir = tempfile::tempdir().unwrap();
        let mut layout = Layout::new(layout_dir.path());
        let single = layout.image("amd64", &[700_000, 1_300_000, 90_000], seed);
        layout.tag_image("single", &single);
        let amd64 = layout.image("amd64", &[400_000, 250_000], seed + 1);
        let arm64 = layout.image("arm64", &[410_000, 240_000], seed + 2);
        let index_digest = layout.tag_index("multiarch", &[amd64.clone(), arm64.clone()]);
        layout.write_index();
        for name in ["single", "multiarch"] {
            // skopeo in the sandbox: its blob-info cache stays out of /var/lib/containers.
            let mut command = sandboxed("skopeo");
            command
                .args([
                    "--insecure-policy",
                    "copy",
                    "--all",
                    "--dest-tls-verify=false",
                ])
                .arg(format!("oci:{}:{name}", layout_dir.path().display()))
                .arg(format!(
                    "docker://{}/{namespace}/{name}:v1",
                    registry.host()
                ))
                .env("TMPDIR", layout_dir.path());
            let out = run(command, COMMAND_TIMEOUT).await;
            assert!(out.ok, "pushing {namespace}/{name}:v1\n{}", out.text());
        }
        let proxy = CountingProxy::start(registry.addr).await;
        Self {
            registry,
            proxy,
            namespace: namespace.to_owned(),
            single,
            index_digest,
            amd64,
            arm64,
            _layout: layout_dir,
        }
    }

    /// (the image for this machine's architecture, the other one) of `multiarch:v1`.
    pub fn platforms(&self) -> (&Image, &Image) {
        match host_arch() {
            "amd64" => (&self.amd64, &self.arm64),
            "arm64" => (&self.arm64, &self.amd64),
            other => {
                panic!("the fixture index has amd64 and arm64 images, this machine is {other}")
            }
        }
    }

    /// Asserts each of `blobs` crossed the upstream link exactly once and none of `absent` did.
    pub fn assert_fetched_once(&self, blobs: &[String], absent: &[String], context: &str) {
        let gets = self.proxy.blob_gets();
        for blob in blobs {
            assert_eq!(
                gets.get(blob),
                Some(&1),
                "one upstream GET for {blob}; upstream blob GETs: {gets:?}\n{context}"
            );
        }
        for blob in absent {
            assert_eq!(
                gets.get(blob),
                None,
                "no upstream GET for {blob} (another platform); upstream blob GETs: {gets:?}\n{context}"
            );
        }
    }

    /// What gantry asked this upstream, one request a line (for failure messages).
    pub fn seen(&self) -> String {
        let lines: Vec<String> = self
            .proxy
            .seen()
            .iter()
            .map(|s| format!("  {} {}", s.method, s.path))
            .collect();
        format!(
            "requests gantry sent to upstream {}:\n{}",
            self.registry.host(),
            lines.join("\n")
        )
    }
}

/// This machine's architecture in OCI terms.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// What gantry asked each upstream, and how to see what gantry itself was asked.
pub fn upstream_context(hubs: &[&Hub]) -> String {
    let mut text: Vec<String> = hubs.iter().map(|hub| hub.seen()).collect();
    text.push(
        "(gantry's own request log: rerun with GANTRY_TEST_LOG=info, or debug for more)".to_owned(),
    );
    text.join("\n")
}

/// `gantry_cache_lookups_total{kind="blob",outcome="hit"}`: blobs gantry answered from its store.
pub async fn blob_hits(gantry: &Gantry) -> u64 {
    let metrics = gantry.metrics().await;
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("gantry_cache_lookups_total{")
                && line.contains("kind=\"blob\"")
                && line.contains("outcome=\"hit\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// After [`CountingProxy::clear`] and a second pull: no upstream blob GET at all, and gantry
/// served at least `blobs` blobs from its store (so the client did fetch them, from gantry).
pub async fn assert_second_pull_from_cache(
    hub: &Hub,
    gantry: &Gantry,
    hits_before: u64,
    blobs: usize,
    context: &str,
) {
    let gets = hub.proxy.blob_gets();
    assert!(
        gets.is_empty(),
        "the second pull made upstream blob GETs: {gets:?}\n{}\n{context}",
        hub.seen()
    );
    let hits = blob_hits(gantry).await - hits_before;
    assert!(
        hits >= blobs as u64,
        "the second pull should have fetched {blobs} blobs from gantry's store, gantry counted {hits} blob hits\n{context}"
    );
}

/// Whether any of `repo_digests` (`name@sha256:…`, maybe with a `docker.io/library/` prefix)
/// names `digest`.
pub fn has_repo_digest(repo_digests: &Value, digest: &str) -> bool {
    repo_digests
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(Value::as_str)
                .any(|entry| entry.ends_with(&format!("@{digest}")))
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// gantry over TLS

/// gantry as [`Gantry::start_with`] starts it, but listening on `[::1]` (ephemeral port).
///
/// dockerd treats every registry whose host resolves into 127.0.0.0/8 as insecure, whatever its
/// configuration says (that range is always added to `insecure-registries`): it then skips
/// certificate verification and never reads `certs.d`. A daemon that resolves `localhost` to
/// `::1` only (its own `/etc/hosts`, [`DockerdSetup::hosts`]) treats `localhost:PORT` as a
/// secure registry and verifies gantry's certificate against the CA in `certs.d`.
pub async fn gantry_on_ipv6_loopback(upstream_url: &str, options: Options<'_>) -> Gantry {
    super::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let yaml = super::config_yaml(dir.path(), upstream_url, options);
    let rest = yaml
        .strip_prefix("listen: 127.0.0.1:0\n")
        .unwrap_or_else(|| panic!("the harness config starts with its listen address:\n{yaml}"));
    let yaml = format!("listen: \"[::1]:0\"\n{rest}");
    let config = gantry::config::Config::from_yaml(&yaml, Path::new("test.yaml"))
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let running = gantry::server::start(config).await.expect("gantry starts");
    Gantry {
        running: Some(running),
        dir,
    }
}

/// A test CA and a server certificate it signed for `localhost`, `127.0.0.1` and `::1` (EC
/// P-256, valid 2 days), made with openssl in `dir`: (ca.crt, server.crt, server.key).
pub fn test_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let path = |name: &str| dir.join(name);
    let (ca, ca_key, cert, key, csr, ext) = (
        path("ca.crt"),
        path("ca.key"),
        path("server.crt"),
        path("server.key"),
        path("server.csr"),
        path("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let output = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "openssl {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let s = |p: &PathBuf| p.display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509", "-days", "2", "-subj", "/CN=gantry test CA"];
    args.extend(ec);
    let (ca_key_s, ca_s) = (s(&ca_key), s(&ca));
    args.extend(["-keyout", &ca_key_s, "-out", &ca_s]);
    openssl(&args);
    let mut args = vec!["req", "-subj", "/CN=localhost"];
    args.extend(ec);
    let (key_s, csr_s) = (s(&key), s(&csr));
    args.extend(["-keyout", &key_s, "-out", &csr_s]);
    openssl(&args);
    let (cert_s, ext_s) = (s(&cert), s(&ext));
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &csr_s,
        "-CA",
        &ca_s,
        "-CAkey",
        &ca_key_s,
        "-CAcreateserial",
        "-out",
        &cert_s,
        "-extfile",
        &ext_s,
    ]);
    (ca, cert, key)
}

/// `Authorization: Basic …`
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// One HTTPS GET (any manifest type accepted) with a client that trusts only `ca`.
pub async fn https_get(
    ca: &Path,
    url: &str,
    authorization: Option<&str>,
) -> Result<super::Reply, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_all_versions()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
    let mut request = http::Request::get(url).header("accept", super::ACCEPT_ALL);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let request = request
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = response.into_parts();
    use http_body_util::BodyExt as _;
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(super::Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// The trap: where clients' non-loopback registry traffic goes

/// A local HTTP proxy that refuses everything and records the first line of each request
/// (`CONNECT registry-1.docker.io:443 HTTP/1.1`). Clients get it as HTTP_PROXY/HTTPS_PROXY, so
/// any attempt to reach a registry other than gantry (on loopback, never proxied) lands here.
pub struct Trap {
    pub addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Trap {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let task_seen = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = Arc::clone(&task_seen);
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 2048];
                    let mut filled = 0;
                    let read = tokio::time::timeout(Duration::from_secs(2), async {
                        while filled < buffer.len() {
                            match stream.read(&mut buffer[filled..]).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => filled += n,
                            }
                            if buffer[..filled].windows(2).any(|w| w == b"\r\n") {
                                break;
                            }
                        }
                    });
                    let _ = read.await;
                    let text = String::from_utf8_lossy(&buffer[..filled]);
                    let line = text.lines().next().unwrap_or("(nothing sent)").to_owned();
                    seen.lock().unwrap().push(line);
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    /// Proxy variables for a client process (upper and lower case: Go reads both, curl-style
    /// tools the lower). Loopback goes direct.
    pub fn env(&self) -> Vec<(String, String)> {
        let proxy = format!("http://{}", self.addr);
        let mut env = Vec::new();
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.push((name.to_owned(), proxy.clone()));
        }
        for name in ["NO_PROXY", "no_proxy"] {
            env.push((name.to_owned(), "127.0.0.1,localhost".to_owned()));
        }
        env
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    pub fn describe(&self) -> String {
        format!(
            "requests to registries other than gantry (refused by the trap proxy): {:?}",
            self.seen()
        )
    }

    /// Asserts no client tried to go around gantry.
    pub fn assert_untouched(&self, context: &str) {
        let seen = self.seen();
        assert!(
            seen.is_empty(),
            "a client went around the mirror (fallback to the primary registry): {seen:?}\n{context}"
        );
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A finished command.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    /// The command line and how it ended.
    pub what: String,
}

impl Run {
    pub fn text(&self) -> String {
        format!(
            "$ {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            tail(&self.stdout, 80),
            tail(&self.stderr, 200)
        )
    }
}

/// Runs `command` to completion within `limit` (killed when it overruns or the test unwinds).
pub async fn run(command: Command, limit: Duration) -> Run {
    run_with_input(command, None, limit).await
}

/// [`run`] with `input` written to the command's stdin (then closed); `None`: stdin is null.
pub async fn run_with_input(mut command: Command, input: Option<&[u8]>, limit: Duration) -> Run {
    let line = describe(&command);
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let finished = async {
        let mut child = command.spawn()?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // A command that exits without reading its stdin is reported by its status.
            let _ = stdin.write_all(input).await;
        }
        child.wait_with_output().await
    };
    match tokio::time::timeout(limit, finished).await {
        Ok(Ok(output)) => Run {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            what: format!(
                "{line}  [{}, {:.1}s]",
                output.status,
                started.elapsed().as_secs_f64()
            ),
        },
        Ok(Err(e)) => Run {
            ok: false,
            stdout: String::new(),
            stderr: format!("could not run: {e}"),
            what: line,
        },
        Err(_) => Run {
            ok: false,
            stdout: String::new(),
            stderr: format!("timed out after {limit:?} (killed)"),
            what: line,
        },
    }
}

fn describe(command: &Command) -> String {
    let std = command.as_std();
    let mut parts = vec![std.get_program().to_string_lossy().into_owned()];
    parts.extend(std.get_args().map(|a| a.to_string_lossy().into_owned()));
    // The sandbox wrapper's script is noise in messages.
    if let Some(i) = parts.iter().position(|p| p == SANDBOX_NAME) {
        parts.drain(..=i);
        parts.insert(0, "[sandbox]".to_owned());
    }
    parts.join(" ")
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[… {start} earlier lines]\n"));
    }
    out.push_str(&all[start..].join("\n"));
    out
}

fn read_log(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => tail(&text, lines),
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// A long-running child that is SIGKILLed and reaped when dropped (so its temp dir can go).
struct Daemon {
    child: Child,
}

impl Daemon {
    /// `Some(status)` when the process has already exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// `$0` of the sandbox script, to find where the real command starts.
const SANDBOX_NAME: &str = "gantry-test-sandbox";

/// Environment variable: a directory the sandbox bind-mounts over `/etc/docker` (dockerd's
/// `certs.d/<host:port>/ca.crt`), so that a daemon trusts a test CA without the real
/// `/etc/docker` being touched. Without `/etc/docker`, `/etc` gets a copy-on-write overlay (its
/// upper layer in the sandbox's `/run` tmpfs) to hold the mount point.
const SANDBOX_ETC_DOCKER: &str = "GANTRY_TEST_ETC_DOCKER";
/// Environment variable: a file the sandbox bind-mounts over `/etc/hosts`.
const SANDBOX_HOSTS: &str = "GANTRY_TEST_HOSTS";

/// Empty tmpfs over the default global paths of the clients, in a private mount namespace; the
/// optional mounts above; then the command. `-n`: do not write /run/mount/utab.
const SANDBOX_SCRIPT: &str = r#"set -e
mount -n -t tmpfs -o mode=0755 gantry-test /run
if [ -d /opt ]; then mount -n -t tmpfs -o mode=0755 gantry-test /opt; fi
if [ -d /var/lib/containers ]; then
  mount -n -t tmpfs -o mode=0700 gantry-test /var/lib/containers
else
  mount -n -t tmpfs -o mode=0755 gantry-test /var/lib
fi
if [ -n "${GANTRY_TEST_ETC_DOCKER:-}" ]; then
  if [ ! -d /etc/docker ]; then
    mkdir -p /run/gantry-test-etc/upper /run/gantry-test-etc/work
    mount -n -t overlay gantry-test -o lowerdir=/etc,upperdir=/run/gantry-test-etc/upper,workdir=/run/gantry-test-etc/work /etc
    mkdir /etc/docker
  fi
  mount -n --bind "$GANTRY_TEST_ETC_DOCKER" /etc/docker
fi
if [ -n "${GANTRY_TEST_HOSTS:-}" ]; then mount -n --bind "$GANTRY_TEST_HOSTS" /etc/hosts; fi
unset GANTRY_TEST_ETC_DOCKER GANTRY_TEST_HOSTS
exec "$@""#;

/// `unshare --mount` with the sandbox script works here (root with CAP_SYS_ADMIN).
pub fn private_mounts() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let ok = super::which("unshare").is_some()
            && std::process::Command::new("unshare")
                .args(["--mount", "--propagation", "private", "--"])
                .args(["sh", "-c", SANDBOX_SCRIPT, SANDBOX_NAME, "true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
        if !ok {
            eprintln!(
                "WARNING: `unshare --mount` is not available: clients run without a private mount \
                 namespace and may create their default directories (/run/docker/plugins, \
                 /var/lib/containers/cache, /run/containers/networks)"
            );
        }
        ok
    })
}

/// `setpriv --pdeathsig KILL` works here: a daemon dies with the test process even when that is
/// killed outright (no Drop runs then).
fn death_signal() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::process::Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
}

/// A command for `program`: in the private mount namespace and with a parent-death signal when
/// available. Every wrapper execs, so the child's pid is the program's.
pub fn sandboxed(program: &str) -> Command {
    let mut argv: Vec<&str> = Vec::new();
    if private_mounts() {
        argv.extend(["unshare", "--mount", "--propagation", "private", "--"]);
    }
    if death_signal() {
        argv.extend(["setpriv", "--pdeathsig", "KILL", "--"]);
    }
    if private_mounts() {
        argv.extend(["sh", "-c", SANDBOX_SCRIPT, SANDBOX_NAME]);
    }
    argv.push(program);
    let mut command = Command::new(argv[0]);
    command.args(&argv[1..]);
    command
}

async fn unix_socket_answers(socket: &Path, request: Option<&[u8]>, expect: &str) -> bool {
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::UnixStream::connect(socket),
    )
    .await
    else {
        return false;
    };
    let Some(request) = request else {
        return true;
    };
    if stream.write_all(request).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).contains(expect)
}

/// The major version in `<tool> --version` output (`Docker version 20.10.24+dfsg1, …` → 20),
/// and that output.
pub async fn tool_version(tool: &str) -> (Option<u32>, String) {
    let mut command = Command::new(tool);
    command.arg("--version");
    let out = run(command, Duration::from_secs(20)).await;
    let text = format!("{}{}", out.stdout, out.stderr).trim().to_owned();
    let major = text
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|word| word.contains('.') && word.starts_with(|c: char| c.is_ascii_digit()))
        .and_then(|version| version.split('.').next()?.parse().ok());
    (major, text)
}

// ---------------------------------------------------------------------------------------------
// containerd + ctr

/// A `containerd` with its own root, state, sockets and config in a temp dir (CRI disabled).
pub struct Containerd {
    daemon: Daemon,
    pub dir: TempDir,
    pub socket: PathBuf,
}

impl Containerd {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            socket = socket.display(),
            opt = d.join("opt").display(),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = sandboxed("containerd")
            .arg("--config")
            .arg(&config_path)
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("containerd starts");
        let mut this = Self {
            daemon: Daemon { child },
            dir,
            socket,
        };
        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            if let Some(status) = this.daemon.exited() {
                panic!("containerd exited ({status}); its log:\n{}", this.log());
            }
            if unix_socket_answers(&this.socket, None, "").await {
                return this;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "containerd did not serve within {START_TIMEOUT:?}; its log:\n{}",
            this.log()
        );
    }

    pub fn log(&self) -> String {
        format!(
            "--- containerd log ({}) ---\n{}",
            self.dir.path().join("containerd.log").display(),
            read_log(&self.dir.path().join("containerd.log"), 150)
        )
    }

    /// `DIR/<registry>/hosts.toml` for `ctr --hosts-dir DIR`: `mirror` (http://host:port) first
    /// for pull and resolve, `server` as the fallback.
    pub fn write_hosts_toml(hosts_dir: &Path, registry: &str, server: &str, mirror: &str) {
        let dir = hosts_dir.join(registry);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"{server}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
    }

    /// `ctr --address SOCK <args>` with the trap's proxy environment.
    pub async fn ctr(&self, args: &[&str], trap: &Trap) -> Run {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "gantry-test"])
            .args(args)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .envs(trap.env());
        run(command, COMMAND_TIMEOUT).await
    }

    /// `ctr images pull --hosts-dir DIR --snapshotter native <platform args> REF`; panics with
    /// ctr's output and containerd's log on failure.
    pub async fn pull(
        &self,
        hosts_dir: &Path,
        platform: &[&str],
        reference: &str,
        trap: &Trap,
        hubs: &[&Hub],
    ) -> Run {
        let hosts = hosts_dir.display().to_string();
        let mut args = vec![
            "--debug",
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
        ];
        args.extend_from_slice(platform);
        args.push(reference);
        let out = self.ctr(&args, trap).await;
        assert!(
            out.ok,
            "ctr pull {reference} failed\n{}\n{}\n{}\n{}",
            out.text(),
            trap.describe(),
            self.log(),
            upstream_context(hubs)
        );
        out
    }

    /// The target digest of an image in `ctr images ls`.
    pub async fn image_digest(&self, reference: &str, trap: &Trap) -> Option<String> {
        let out = self.ctr(&["images", "ls"], trap).await;
        assert!(out.ok, "{}", out.text());
        out.stdout.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == reference)
                .then(|| words.nth(1).map(str::to_owned))
                .flatten()
        })
    }

    /// Digests in the content store.
    pub async fn content(&self, trap: &Trap) -> Vec<String> {
        let out = self.ctr(&["content", "ls", "-q"], trap).await;
        assert!(out.ok, "{}", out.text());
        out.stdout
            .split_whitespace()
            .filter(|w| w.starts_with("sha256:"))
            .map(str::to_owned)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// dockerd + docker

/// What a test of dockerd needs: the upstream, skopeo to fill it, and the daemons.
pub const DOCKER_TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "dockerd",
    "docker",
    "containerd",
];

/// A `dockerd` with its own containerd, data-root, exec-root, pidfile, key file and API socket
/// in temp dirs; no iptables, no bridge, no forwarding. It runs the classic image store (`vfs`
/// graph driver): the containerd image store needs Engine 24+ (docs/clients.md says what that
/// leaves untested). [`Dockerd::start`]: with
/// `registry-mirrors: [gantry]`; [`Dockerd::start_with`] for other setups.
pub struct Dockerd {
    daemon: Daemon,
    pub containerd: Containerd,
    pub dir: TempDir,
    pub socket: PathBuf,
    /// What dockerd sees as `/etc/docker` (when [`DockerdSetup::own_etc_docker`]).
    etc_docker: Option<PathBuf>,
}

/// How [`Dockerd::start_with`] sets a daemon up.
#[derive(Clone, Copy, Default)]
pub struct DockerdSetup<'a> {
    /// gantry's `host:port` as a plain-HTTP `registry-mirrors` entry (and in
    /// `insecure-registries`).
    pub mirror: Option<&'a str>,
    /// An empty directory of the daemon's temp dir is bind-mounted over `/etc/docker` in its
    /// private mount namespace, so that [`Dockerd::trust_ca`] can put a `certs.d/<host:port>/ca.crt`
    /// there (needs [`private_mounts`]).
    pub own_etc_docker: bool,
    /// The daemon's `/etc/hosts` (bind-mounted over the real one; needs [`private_mounts`]).
    pub hosts: Option<&'a str>,
}

impl Dockerd {
    /// `mirror` is gantry's `host:port`.
    pub async fn start(mirror: &str, trap: &Trap) -> Self {
        Self::start_with(
            trap,
            DockerdSetup {
                mirror: Some(mirror),
                ..DockerdSetup::default()
            },
        )
        .await
    }

    pub async fn start_with(trap: &Trap, setup: DockerdSetup<'_>) -> Self {
        let major = tool_version("dockerd").await.0.unwrap_or(0);
        let containerd = Containerd::start().await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let socket = d.join("docker.sock");
        let mut config = json!({
            "hosts": [format!("unix://{}", socket.display())],
            "data-root": d.join("data"),
            "exec-root": d.join("exec"),
            "pidfile": d.join("docker.pid"),
            "containerd": containerd.socket,
            "storage-driver": "vfs",
            "iptables": false,
            "ip6tables": false,
            "ip-forward": false,
            "ip-masq": false,
            "bridge": "none",
            "debug": true,
        });
        if let Some(mirror) = setup.mirror {
            config["registry-mirrors"] = json!([format!("http://{mirror}")]);
            config["insecure-registries"] = json!([mirror]);
        }
        if major <= 24 {
            // libtrust's key, /etc/docker/key.json by default (removed in Engine 25).
            config["deprecated-key-path"] = json!(d.join("key.json"));
        }
        let mut mounts: Vec<(&str, PathBuf)> = Vec::new();
        let etc_docker = setup.own_etc_docker.then(|| {
            let etc_docker = d.join("etc-docker");
            std::fs::create_dir_all(etc_docker.join("certs.d")).unwrap();
            mounts.push((SANDBOX_ETC_DOCKER, etc_docker.clone()));
            etc_docker
        });
        if let Some(hosts) = setup.hosts {
            std::fs::write(d.join("hosts"), hosts).unwrap();
            mounts.push((SANDBOX_HOSTS, d.join("hosts")));
        }
        assert!(
            mounts.is_empty() || private_mounts(),
            "dockerd's own /etc/docker or /etc/hosts needs a private mount namespace (`unshare --mount`)"
        );
        let config_path = d.join("daemon.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let child = sandboxed("dockerd")
            .arg("--config-file")
            .arg(&config_path)
            .env("DOCKER_TMPDIR", d.join("tmp"))
            .env_remove("DOCKER_DRIVER")
            .env_remove("DOCKER_HOST")
            .envs(trap.env())
            .envs(mounts)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("dockerd starts");
        Self {
            daemon: Daemon { child },
            containerd,
            dir,
            socket,
            etc_docker,
        }
        .answering()
        .await
    }

    /// Waits for the started daemon to answer `/_ping`; panics with its logs if it exits or
    /// stays silent for `START_TIMEOUT`.
    async fn answering(mut self) -> Self {
        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            if let Some(status) = self.daemon.exited() {
                panic!("dockerd exited ({status})\n{}", self.logs());
            }
            if unix_socket_answers(
                &self.socket,
                Some(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n"),
                "OK",
            )
            .await
            {
                return self;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "dockerd did not answer /_ping within {START_TIMEOUT:?}\n{}",
            self.logs()
        );
    }

    /// dockerd's and its containerd's logs.
    pub fn logs(&self) -> String {
        format!(
            "--- dockerd log ({}) ---\n{}\n{}",
            self.dir.path().join("dockerd.log").display(),
            read_log(&self.dir.path().join("dockerd.log"), 200),
            self.containerd.log()
        )
    }

    /// The `docker` CLI against this daemon, with its own config dir.
    pub async fn docker(&self, args: &[&str]) -> Run {
        self.docker_with_input(args, None).await
    }

    /// [`Dockerd::docker`] with `input` on the CLI's stdin.
    pub async fn docker_with_input(&self, args: &[&str], input: Option<&[u8]>) -> Run {
        let mut command = Command::new("docker");
        command
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.cli_config_dir())
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH")
            .env_remove("DOCKER_AUTH_CONFIG")
            .args(args);
        run_with_input(command, input, COMMAND_TIMEOUT).await
    }

    /// The CLI's `DOCKER_CONFIG` (`docker login` stores credentials in its `config.json`).
    pub fn cli_config_dir(&self) -> PathBuf {
        self.dir.path().join("cli")
    }

    /// `docker login REGISTRY -u USER --password-stdin` (the password on stdin).
    pub async fn login(&self, registry: &str, user: &str, password: &str) -> Run {
        self.docker_with_input(
            &["login", registry, "-u", user, "--password-stdin"],
            Some(password.as_bytes()),
        )
        .await
    }

    /// Makes this daemon trust `ca` for `registry` (`host:port`): copies it to
    /// `/etc/docker/certs.d/<registry>/ca.crt` as the daemon sees it (its own `/etc/docker`,
    /// [`DockerdSetup::own_etc_docker`]). dockerd reads certs.d whenever it connects to a
    /// registry, so this works on a running daemon.
    pub fn trust_ca(&self, registry: &str, ca: &Path) {
        let etc_docker = self
            .etc_docker
            .as_ref()
            .expect("trust_ca needs DockerdSetup::own_etc_docker");
        let dir = etc_docker.join("certs.d").join(registry);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(ca, dir.join("ca.crt")).unwrap();
    }

    /// `docker pull REF`; panics with the CLI's output and the daemons' logs on failure.
    pub async fn pull(&self, reference: &str, trap: &Trap, hubs: &[&Hub]) -> Run {
        let out = self.docker(&["pull", reference]).await;
        assert!(
            out.ok,
            "docker pull {reference} failed\n{}\n{}\n{}\n{}",
            out.text(),
            trap.describe(),
            self.logs(),
            upstream_context(hubs)
        );
        out
    }

    /// `docker image inspect REF` (the one object).
    pub async fn inspect(&self, reference: &str) -> Value {
        let out = self.docker(&["image", "inspect", reference]).await;
        assert!(out.ok, "{}\n{}", out.text(), self.logs());
        let list: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("docker image inspect: {e}\n{}", out.text()));
        list[0].clone()
    }

    /// `docker rmi REF`.
    pub async fn remove(&self, reference: &str) {
        let out = self.docker(&["rmi", reference]).await;
        assert!(out.ok, "{}\n{}", out.text(), self.logs());
    }

    /// Whether dockerd runs the containerd image store: its `DriverStatus` then holds
    /// `driver-type io.containerd.snapshotter.v1` (a newer Engine may default to it).
    pub async fn uses_containerd_image_store(&self) -> bool {
        let out = self
            .docker(&["info", "--format", "{{json .DriverStatus}}"])
            .await;
        assert!(out.ok, "{}\n{}", out.text(), self.logs());
        out.stdout.contains("io.containerd.snapshotter")
    }
}

// ---------------------------------------------------------------------------------------------
// podman and skopeo with registries.conf

/// A `registries.conf` (v2) with one `[[registry]]` per `(prefix, location, mirror location)`;
/// every mirror is `insecure` (plain HTTP).
pub fn registries_conf(path: &Path, entries: &[(&str, &str, &str)]) {
    let mut text =
        String::from("unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n");
    for (prefix, location, mirror) in entries {
        text.push_str(&format!(
            "\n[[registry]]\nprefix = \"{prefix}\"\nlocation = \"{location}\"\n\n[[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}

/// Environment shared by podman and skopeo: our registries.conf, an empty auth file, a private
/// containers.conf and storage.conf, TMPDIR in the temp dir, and the trap as proxy.
fn containers_env(command: &mut Command, dir: &Path, registries: &Path, trap: &Trap) {
    let auth = dir.join("auth.json");
    if !auth.exists() {
        std::fs::write(&auth, "{\"auths\":{}}").unwrap();
    }
    let containers_conf = dir.join("containers.conf");
    if !containers_conf.exists() {
        std::fs::write(&containers_conf, "").unwrap();
    }
    let storage_conf = dir.join("storage.conf");
    if !storage_conf.exists() {
        std::fs::write(
            &storage_conf,
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                dir.join("run").display(),
                dir.join("root").display()
            ),
        )
        .unwrap();
    }
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    command
        .env("CONTAINERS_REGISTRIES_CONF", registries)
        .env("REGISTRY_AUTH_FILE", &auth)
        .env("CONTAINERS_CONF", &containers_conf)
        .env("CONTAINERS_STORAGE_CONF", &storage_conf)
        .env("TMPDIR", &tmp)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("XDG_CONFIG_HOME")
        .envs(trap.env());
}

/// podman with a private root, runroot, tmpdir, network config dir and vfs storage.
pub struct Podman {
    pub dir: TempDir,
    pub registries: PathBuf,
}

impl Podman {
    pub fn new(registries: &Path) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            registries: registries.to_owned(),
        }
    }

    pub async fn podman(&self, args: &[&str], trap: &Trap) -> Run {
        let d = self.dir.path();
        let mut command = sandboxed("podman");
        command
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("libpod"))
            .arg("--network-config-dir")
            .arg(d.join("networks"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args);
        containers_env(&mut command, d, &self.registries, trap);
        run(command, COMMAND_TIMEOUT).await
    }

    /// `podman pull REF`; panics with podman's (debug) stderr on failure.
    pub async fn pull(&self, reference: &str, trap: &Trap, hubs: &[&Hub]) -> Run {
        let out = self
            .podman(&["--log-level", "debug", "pull", reference], trap)
            .await;
        assert!(
            out.ok,
            "podman pull {reference} failed\n{}\n{}\n--- registries.conf ---\n{}\n{}",
            out.text(),
            trap.describe(),
            std::fs::read_to_string(&self.registries).unwrap_or_default(),
            upstream_context(hubs)
        );
        out
    }

    pub async fn inspect(&self, reference: &str, trap: &Trap) -> Value {
        let out = self.podman(&["image", "inspect", reference], trap).await;
        assert!(out.ok, "{}", out.text());
        let list: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("podman image inspect: {e}\n{}", out.text()));
        list[0].clone()
    }
}

/// `skopeo --registries-conf FILE copy …` with the same private environment as podman; its
/// output (with --debug) is in the result.
pub async fn skopeo_with_registries_conf(
    dir: &Path,
    registries: &Path,
    args: &[&str],
    trap: &Trap,
) -> Run {
    let mut command = sandboxed("skopeo");
    command
        .arg("--debug")
        .arg("--insecure-policy")
        .arg("--registries-conf")
        .arg(registries)
        .args(args);
    containers_env(&mut command, dir, registries, trap);
    run(command, COMMAND_TIMEOUT).await
}

// ---------------------------------------------------------------------------------------------
// dockerd on a daemon.json someone else edits (tests/configure.rs)

impl Dockerd {
    /// A `dockerd` like [`Dockerd::start_with`] with no mirror, except that `prepare` gets the
    /// path of its `daemon.json` (holding only the sandbox settings) before the daemon starts, to
    /// edit it (`gantry configure docker --path`); the daemon then runs on what `prepare` left.
    pub async fn start_on_edited_config(trap: &Trap, prepare: impl FnOnce(&Path)) -> Self {
        let major = tool_version("dockerd").await.0.unwrap_or(0);
        let containerd = Containerd::start().await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let socket = d.join("docker.sock");
        let mut config = json!({
            "hosts": [format!("unix://{}", socket.display())],
            "data-root": d.join("data"),
            "exec-root": d.join("exec"),
            "pidfile": d.join("docker.pid"),
            "containerd": containerd.socket,
            "storage-driver": "vfs",
            "iptables": false,
            "ip6tables": false,
            "ip-forward": false,
            "ip-masq": false,
            "bridge": "none",
            "debug": true,
        });
        if major <= 24 {
            config["deprecated-key-path"] = json!(d.join("key.json"));
        }
        let config_path = d.join("daemon.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        prepare(&config_path);
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let child = sandboxed("dockerd")
            .arg("--config-file")
            .arg(&config_path)
            .env("DOCKER_TMPDIR", d.join("tmp"))
            .env_remove("DOCKER_DRIVER")
            .env_remove("DOCKER_HOST")
            .envs(trap.env())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("dockerd starts");
        Self {
            daemon: Daemon { child },
            containerd,
            dir,
            socket,
            etc_docker: None,
        }
        .answering()
        .await
    }
}
