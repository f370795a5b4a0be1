//! Where an upstream's credentials come from: the config, a docker `config.json`, or a
//! `docker-credential-<name>` helper (asked on demand, cached, and asked again after a 401 — which
//! is how ECR's 12-hour tokens stay fresh).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::auth::Credentials;
use crate::config::{Secret, UpstreamAccess};
use crate::oci::host::DOCKER_HUB_NAMES;
use crate::single_flight::SingleFlight;

/// A helper that does not answer in this time is treated as having no credentials.
const HELPER_TIMEOUT: Duration = Duration::from_secs(20);
/// Docker Hub's key in `config.json` and its credential helpers' server URL.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

pub enum CredentialSource {
    None,
    Static(Credentials),
    Helper(Helper),
}

/// A `docker-credential-*` program and its last answer.
pub struct Helper {
    program: PathBuf,
    server_url: String,
    cached: Mutex<Option<Credentials>>,
    /// One run of the program at a time: callers arriving while it runs share its answer.
    asking: SingleFlight<(), Option<Credentials>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{key}.docker_config: cannot read {path}: {reason}")]
    DockerConfig {
        key: String,
        path: PathBuf,
        reason: String,
    },
}

/// The parts of `~/.docker/config.json` that hold credentials.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl CredentialSource {
    /// Builds the source named by the config. `docker_hub` selects Docker Hub's key in config.json.
    pub fn from_access(
        access: &UpstreamAccess<'_>,
        host: &str,
        docker_hub: bool,
    ) -> Result<Self, CredentialError> {
        let server_url = if docker_hub {
            DOCKER_HUB_KEY.to_owned()
        } else {
            host.to_owned()
        };
        if let (Some(username), Some(password)) = (access.username, access.password) {
            if !username.is_empty() {
                return Ok(CredentialSource::Static(Credentials {
                    username: username.to_owned(),
                    password: password.clone(),
                }));
            }
        }
        if let Some(helper) = access.credential_helper {
            return Ok(CredentialSource::Helper(Helper::new(helper, server_url)));
        }
        if let Some(path) = access.docker_config {
            return Self::from_docker_config(
                &access.key,
                path,
                host,
                access.url.authority(),
                docker_hub,
                server_url,
            );
        }
        Ok(CredentialSource::None)
    }

    fn from_docker_config(
        key: &str,
        path: &Path,
        host: &str,
        authority: &str,
        docker_hub: bool,
        server_url: String,
    ) -> Result<Self, CredentialError> {
        let error = |reason: String| CredentialError::DockerConfig {
            key: key.to_owned(),
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let config: DockerConfig = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
        let mut names = vec![
            host.to_owned(),
            authority.to_owned(),
            format!("https://{host}"),
            format!("https://{authority}"),
        ];
        if docker_hub {
            names.push(DOCKER_HUB_KEY.to_owned());
            names.extend(DOCKER_HUB_NAMES.map(str::to_owned));
        }
        if let Some(helper) = names.iter().find_map(|n| config.cred_helpers.get(n)) {
            return Ok(CredentialSource::Helper(Helper::new(helper, server_url)));
        }
        if let Some(entry) = names.iter().find_map(|n| config.auths.get(n)) {
            if let Some(credentials) = entry.credentials() {
                return Ok(CredentialSource::Static(credentials));
            }
        }
        if let Some(store) = &config.creds_store {
            return Ok(CredentialSource::Helper(Helper::new(store, server_url)));
        }
        Ok(CredentialSource::None)
    }

    pub async fn get(&self) -> Option<Credentials> {
        match self {
            CredentialSource::None => None,
            CredentialSource::Static(credentials) => Some(credentials.clone()),
            CredentialSource::Helper(helper) => helper.get().await,
        }
    }

    /// Forgets cached credentials after the upstream rejected them; true if asking again may help.
    pub async fn invalidate(&self) -> bool {
        match self {
            CredentialSource::Helper(helper) => {
                *helper.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
                true
            }
            _ => false,
        }
    }

    pub fn is_some(&self) -> bool {
        !matches!(self, CredentialSource::None)
    }
}

impl AuthEntry {
    fn credentials(&self) -> Option<Credentials> {
        if let (Some(username), Some(password)) = (&self.username, &self.password) {
            return Some(Credentials {
                username: username.clone(),
                password: Secret::new(password.clone()),
            });
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(self.auth.as_deref()?.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (username, password) = text.split_once(':')?;
        Some(Credentials {
            username: username.to_owned(),
            password: Secret::new(password.to_owned()),
        })
    }
}

impl Helper {
    fn new(name: &str, server_url: String) -> Self {
        let program = if name.contains('/') {
            PathBuf::from(name)
        } else {
            PathBuf::from(format!("docker-credential-{name}"))
        };
        Self {
            program,
            server_url,
            cached: Mutex::new(None),
            asking: SingleFlight::new(),
        }
    }

    async fn get(&self) -> Option<Credentials> {
        if let Some(cached) = self.cached() {
            return Some(cached);
        }
        let ask = || async {
            match tokio::time::timeout(HELPER_TIMEOUT, self.ask()).await {
                Ok(Ok(credentials)) => {
                    *self.cached.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(credentials.clone());
                    Some(credentials)
                }
                Ok(Err(reason)) => {
                    tracing::warn!(helper = %self.program.display(), %reason, "credential helper failed");
                    None
                }
                Err(_) => {
                    tracing::warn!(helper = %self.program.display(), "credential helper timed out");
                    None
                }
            }
        };
        self.asking.run((), ask).await.value
    }

    fn cached(&self) -> Option<Credentials> {
        self.cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `<program> get` with the server URL on stdin; JSON `{"Username", "Secret"}` on stdout.
    async fn ask(&self) -> Result<Credentials, String> {
        let mut child = tokio::process::Command::new(&self.program)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run it: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.server_url.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
        }
        let output = child.wait_with_output().await.map_err(|e| e.to_string())?;
        if !output.status.success() {
            // Helpers print their error on stdout ("credentials not found in native keychain").
            return Err(String::from_utf8_lossy(&output.stdout).trim().to_owned());
        }
        #[derive(Deserialize)]
        struct Answer {
            #[serde(rename = "Username")]
            username: String,
            #[serde(rename = "Secret")]
            secret: String,
        }
        let answer: Answer = serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("unreadable answer: {e}"))?;
        if answer.username == "<token>" {
            return Err(
                "identity tokens are not supported; configure a username and password".into(),
            );
        }
        tracing::debug!(helper = %self.program.display(), "credential helper answered");
        Ok(Credentials {
            username: answer.username,
            password: Secret::new(answer.secret),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A helper that records each run in `runs` and answers once the file `go` exists.
    fn blocking_helper(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join("docker-credential-blocking");
        let script = format!(
            "#!/bin/sh\nread -r url\necho \"$url\" >> '{dir}/runs'\nwhile [ ! -e '{dir}/go' ]; do sleep 0.01; done\nprintf '{{\"Username\":\"u\",\"Secret\":\"s\"}}'\n",
            dir = dir.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn runs(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("runs"))
            .map(|runs| runs.lines().count())
            .unwrap_or(0)
    }

    /// Callers arriving while the helper runs share its answer, and forgetting the credentials
    /// (after a 401) does not wait for a run in progress.
    #[tokio::test]
    async fn callers_share_one_helper_run_and_invalidating_does_not_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let program = blocking_helper(dir.path());
        let source = Arc::new(CredentialSource::Helper(Helper::new(
            &program.display().to_string(),
            "registry.example".into(),
        )));
        let first = tokio::spawn({
            let source = Arc::clone(&source);
            async move { source.get().await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while runs(dir.path()) == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(runs(dir.path()), 1, "the helper is running");
        let invalidated = tokio::time::timeout(Duration::from_secs(5), source.invalidate()).await;
        assert_eq!(
            invalidated.ok(),
            Some(true),
            "invalidate waited for the helper"
        );

        let mut joiners: Vec<_> = (0..4).map(|_| Box::pin(source.get())).collect();
        for joiner in &mut joiners {
            assert!(futures_util::poll!(joiner.as_mut()).is_pending());
        }
        std::fs::write(dir.path().join("go"), "").unwrap();
        let answers = futures_util::future::join_all(joiners).await;
        let first = first.await.unwrap();
        for answer in answers.iter().chain([&first]) {
            assert_eq!(answer.as_ref().map(|c| c.username.as_str()), Some("u"));
        }
        assert_eq!(runs(dir.path()), 1, "one helper run for every caller");
    }

    #[test]
    fn auth_entries_decode_both_forms() {
        let encoded = AuthEntry {
            auth: Some(base64::engine::general_purpose::STANDARD.encode("me:s3cret")),
            ..AuthEntry::default()
        };
        let credentials = encoded.credentials().unwrap();
        assert_eq!(
            (credentials.username.as_str(), credentials.password.expose()),
            ("me", "s3cret")
        );
        let split = AuthEntry {
            username: Some("you".into()),
            password: Some("pw".into()),
            ..AuthEntry::default()
        };
        assert_eq!(split.credentials().unwrap().username, "you");
        assert!(AuthEntry::default().credentials().is_none());
    }
}
