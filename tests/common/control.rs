//! The control plane from the outside: gantry as a process with its admin listener on, and the
//! operator CLI (`gantry ls`, `inspect`, `stats`, …) run as the binary against it.

use std::path::Path;
use std::time::Duration;

use super::process::GantryProcess;
use super::{free_port, http_get, wait_until, Options};

/// A gantry process whose admin listener (`/metrics`, `/api/v1/`) is on a known port.
pub struct Operated {
    pub gantry: GantryProcess,
    /// `127.0.0.1:PORT` of the admin listener.
    pub admin: String,
}

impl Operated {
    /// Configures and starts gantry over `upstream_url` in `dir`, and waits until both its
    /// client port and its admin listener answer.
    pub async fn start(dir: &Path, upstream_url: &str, options: Options<'_>) -> Self {
        let mut gantry = GantryProcess::configure(dir, upstream_url, options);
        let admin = format!("127.0.0.1:{}", free_port());
        let config = dir.join("gantry.yaml");
        let yaml = std::fs::read_to_string(&config).unwrap();
        assert!(yaml.contains("admin_listen: null"), "{yaml}");
        std::fs::write(
            &config,
            yaml.replace("admin_listen: null", &format!("admin_listen: {admin}")),
        )
        .unwrap();
        gantry.start().await;
        let healthz = format!("http://{admin}/healthz");
        let up = wait_until(Duration::from_secs(20), || {
            let healthz = healthz.clone();
            async move { http_get(&healthz, &[]).await.is_ok() }
        })
        .await;
        assert!(up, "the admin listener did not answer:\n{}", gantry.log());
        Self { gantry, admin }
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub async fn metrics(&self) -> String {
        let reply = http_get(&self.admin_url("/metrics"), &[]).await.unwrap();
        String::from_utf8(reply.body.to_vec()).unwrap()
    }

    /// Waits until no blob download is in flight (committed, so the catalogue has it).
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

    /// Runs `gantry ARGS… --admin http://ADMIN` and returns what it did.
    pub async fn ctl(&self, args: &[&str]) -> Ctl {
        gantry_ctl(&format!("http://{}", self.admin), args).await
    }

    /// Runs a `--json` command that must succeed, and parses what it printed.
    pub async fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let run = self.ctl(&args).await;
        assert!(run.success, "gantry {args:?} failed: {run:?}");
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("gantry {args:?} printed no JSON ({e}): {run:?}"))
    }
}

/// Runs `gantry ARGS… --admin ADMIN_URL` (without any GANTRY_ADMIN_TOKEN of the environment),
/// bounded, and returns what it did.
pub async fn gantry_ctl(admin_url: &str, args: &[&str]) -> Ctl {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gantry"));
    command
        .args(args)
        .arg("--admin")
        .arg(admin_url)
        .env_remove("GANTRY_ADMIN_TOKEN")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the command finishes within 120 s")
        .expect("the gantry binary runs");
    Ctl {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// One CLI run.
#[derive(Debug)]
pub struct Ctl {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    /// Everything it printed, stdout then stderr.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Every file under the store's `blobs/` or `manifests/` (a digest's hex each).
pub fn store_files(store: &Path, kind: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(algorithms) = std::fs::read_dir(store.join(kind)) else {
        return found;
    };
    for algorithm in algorithms.flatten() {
        for prefix in std::fs::read_dir(algorithm.path()).unwrap().flatten() {
            for entry in std::fs::read_dir(prefix.path()).unwrap().flatten() {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}
