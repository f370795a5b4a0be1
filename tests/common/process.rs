//! gantry as a separate process, for what only a process can show: signals (SIGTERM, SIGHUP) and
//! crashes (SIGKILL). It listens on a fixed free port so a restart comes back at the same address.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{config_yaml, free_port, http_get, wait_until, Options};

pub struct GantryProcess {
    pub port: u16,
    config: PathBuf,
    /// stdout and stderr of every run, appended.
    log: PathBuf,
    child: Option<Child>,
    /// Extra environment for the process, e.g. `SSL_CERT_FILE` for a test CA.
    env: Vec<(String, String)>,
}

impl GantryProcess {
    /// Writes the harness config (admin listener off) into `dir`; `start` runs it.
    pub fn configure(dir: &Path, upstream_url: &str, options: Options<'_>) -> Self {
        let port = free_port();
        let config = dir.join("gantry.yaml");
        let yaml = config_yaml(dir, upstream_url, options)
            .replace("admin_listen: 127.0.0.1:0", "admin_listen: null")
            .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
        std::fs::write(&config, yaml).unwrap();
        Self {
            port,
            config,
            log: dir.join("gantry.log"),
            child: None,
            env: Vec::new(),
        }
    }

    /// Appends top-level YAML to the config, for sections that need the port (a cluster's
    /// `advertise_url`).
    pub fn append_config(&self, yaml: &str) {
        let mut config = std::fs::read_to_string(&self.config).unwrap();
        config.push_str(yaml);
        std::fs::write(&self.config, config).unwrap();
    }

    /// Sets an environment variable for every later start.
    pub fn env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// Starts (or restarts) the process; does not wait for it to serve.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the gantry binary runs");
        self.child = Some(child);
    }

    /// Starts the process and waits until it answers plain HTTP.
    pub async fn start(&mut self) {
        self.spawn();
        assert!(
            serving(&self.url("/v2/")).await,
            "gantry did not start serving on port {}:\n{}",
            self.port,
            self.log()
        );
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Sends a signal by name (`TERM`, `HUP`...).
    pub fn signal(&self, name: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("running")
            .to_string();
        let sent = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid)
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{name}");
    }

    /// SIGKILL: a crash, no shutdown at all.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        tokio::time::timeout(limit, child.wait())
            .await
            .expect("gantry exits in time")
            .unwrap()
    }
}

/// Whether a gantry started as a process answers `url` (its `/v2/`) within 20 s.
pub async fn serving(url: &str) -> bool {
    wait_until(Duration::from_secs(20), || async move {
        http_get(url, &[]).await.is_ok()
    })
    .await
}
