//! A real Garage S3 server (single node) on 127.0.0.1 ephemeral ports in a temp dir: the object
//! tier's tests run against it rather than a mock, so signing, path-style addressing, ranged GETs,
//! multipart uploads and error codes are the ones users' storage answers with.
//!
//! Garage's `server --single-node --default-bucket` sets up the layout, an access key with known
//! credentials and the bucket itself before its APIs listen, so start-up is one process and one
//! readiness poll. The same flags are harmless on a restart over the same data (the layout is
//! already at version 1, key and bucket exist), which is what "object tier down, then back" needs.
//!
//! The binary: `$GANTRY_GARAGE`, else `garage` on the PATH, else the one `scripts/test` builds into
//! `${XDG_CACHE_HOME:-$HOME/.cache}/gantry-test/garage/bin/garage`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::{free_port, skip_unless, wait_until, which};

/// How long Garage gets to come up (it opens its database and applies the layout first).
const START_LIMIT: Duration = Duration::from_secs(60);

pub struct Garage {
    /// `http://127.0.0.1:PORT`, the S3 API.
    pub endpoint: String,
    pub region: String,
    /// The bucket created at start-up.
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    pub s3_port: u16,
    pub admin_port: u16,
    pub rpc_port: u16,
    binary: PathBuf,
    child: Option<Child>,
    dir: TempDir,
}

/// Where a Garage binary is, if anywhere.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("GANTRY_GARAGE") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    if let Some(path) = which("garage") {
        return Some(path);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(cache.join("gantry-test/garage/bin/garage")).filter(|p| p.is_file())
}

impl Garage {
    /// A running Garage with bucket `gantry`, or `None` (after `SKIPPED`, or a panic under CI)
    /// when there is no binary.
    pub async fn start() -> Option<Self> {
        let binary = binary();
        if !skip_unless(
            binary.is_some(),
            "no garage binary ($GANTRY_GARAGE, PATH, or the cache scripts/test builds it into)",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut garage = Self {
            endpoint: String::new(),
            region: "garage".into(),
            bucket: "gantry".into(),
            // Garage's own key format: GK + 24 hex digits, a 64-hex-digit secret.
            key_id: "GK0123456789abcdef01234567".into(),
            secret: "c3ea8cb80333d04e208d136698b1a01ae370d463f0d435ab2177510b3478bf44".into(),
            s3_port: free_port(),
            admin_port: free_port(),
            rpc_port: free_port(),
            binary: binary.unwrap(),
            child: None,
            dir,
        };
        garage.endpoint = format!("http://127.0.0.1:{}", garage.s3_port);
        garage.write_config();
        garage.restart().await;
        Some(garage)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("garage.log")
    }

    fn write_config(&self) {
        let dir = self.dir.path().display();
        let config = format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6"

[s3_api]
s3_region = "{region}"
api_bind_addr = "127.0.0.1:{s3}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
            rpc = self.rpc_port,
            s3 = self.s3_port,
            admin = self.admin_port,
            region = self.region,
        );
        std::fs::write(self.config_path(), config).unwrap();
    }

    /// Starts (again) on the same ports over the same data, and waits until the bucket answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "garage is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path())
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret)
            .env("GARAGE_DEFAULT_BUCKET", &self.bucket)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", self.binary.display()));
        self.child = Some(child);
        let store = self.store_for(&self.bucket);
        let up = wait_until(START_LIMIT, || {
            let store = store.clone();
            async move {
                let listed: Result<Vec<_>, _> = store.list(None).try_collect().await;
                listed.is_ok()
            }
        })
        .await;
        if !up {
            let exited = self.child.as_mut().unwrap().try_wait().ok().flatten();
            panic!(
                "garage did not answer on {} within {START_LIMIT:?} (exit: {exited:?}); its log:\n{}",
                self.endpoint,
                self.log()
            );
        }
    }

    /// Garage's output so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL: the object tier disappears mid-run; [`Garage::restart`] brings it back.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM and wait: a clean stop; [`Garage::restart`] brings it back.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                signal(pid, "-TERM");
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    /// SIGSTOP: the object tier hangs (connections are accepted by the kernel, nothing answers).
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    /// SIGCONT after [`Garage::pause`].
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("garage is running")
    }

    /// Runs Garage's CLI against this node (over its RPC port); panics with its output on failure.
    pub async fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path())
            .args(args)
            .env("RUST_LOG", "garage=warn")
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "garage {} failed:\n{text}",
            args.join(" ")
        );
        text
    }

    /// Another bucket, readable and writable with this key.
    pub async fn create_bucket(&self, name: &str) {
        self.cli(&["bucket", "create", name]).await;
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            name,
            "--key",
            &self.key_id,
        ])
        .await;
    }

    /// The lines of gantry's `storage:` section for this server and its bucket (two-space
    /// indented, for `Options.storage`).
    pub fn yaml(&self) -> String {
        self.yaml_for(&self.bucket, "")
    }

    /// [`Garage::yaml`] for another bucket and an optional key prefix (`""`: none).
    pub fn yaml_for(&self, bucket: &str, prefix: &str) -> String {
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("    prefix: {prefix}\n")
        };
        format!(
            "  s3:\n    endpoint: {}\n    bucket: {bucket}\n    region: {}\n    access_key_id: {}\n    secret_access_key: {}\n    allow_http: true\n{prefix}",
            self.endpoint, self.region, self.key_id, self.secret,
        )
    }

    /// An `object_store` client for the default bucket: what tests use to look at, plant or
    /// corrupt objects. No retries, short timeouts: a test sees the server's state as it is.
    pub fn store(&self) -> AmazonS3 {
        self.store_for(&self.bucket)
    }

    pub fn store_for(&self, bucket: &str) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_region(&self.region)
            .with_bucket_name(bucket)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(30)),
            )
            .build()
            .expect("an S3 client for garage")
    }

    /// An object's bytes, `None` when there is no such key.
    pub async fn object(&self, key: &str) -> Option<Vec<u8>> {
        match self.store().get(&ObjectPath::from(key)).await {
            Ok(result) => Some(result.bytes().await.unwrap().to_vec()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("GET {key}: {e}"),
        }
    }

    /// Writes (or overwrites) an object.
    pub async fn put_object(&self, key: &str, bytes: impl Into<bytes::Bytes>) {
        let bytes: bytes::Bytes = bytes.into();
        self.store()
            .put(&ObjectPath::from(key), bytes.into())
            .await
            .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
    }

    pub async fn delete_object(&self, key: &str) {
        self.store()
            .delete(&ObjectPath::from(key))
            .await
            .unwrap_or_else(|e| panic!("DELETE {key}: {e}"));
    }

    /// Every key under `prefix` (`""`: the whole bucket), sorted.
    pub async fn list(&self, prefix: &str) -> Vec<String> {
        let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
        let mut keys: Vec<String> = self
            .store()
            .list(prefix.as_ref())
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("LIST {prefix:?}: {e}"));
        keys.sort();
        keys
    }

    /// The temp dir holding Garage's config, metadata and data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}
