//! `gantry configure docker|containerd|podman`: writes the client's own configuration file so
//! that it pulls through a gantry mirror (issue #17's node set-up half).
//!
//! Each client has its own file and format (docker's `daemon.json`, containerd's
//! `certs.d/<host>/hosts.toml` per registry, podman's and CRI-O's `registries.conf`); the layouts
//! written here are the ones docs/clients.md documents and tests/clients.rs pulls through. The
//! command is meant to run on every node (deploy/kubernetes/configure-daemonset.yaml), so it is
//! idempotent (a file that already says what is wanted keeps its bytes and is reported
//! unchanged), edits in place (every key it does not own is kept), refuses a file it cannot parse
//! rather than overwriting what an operator wrote, and writes atomically (temp file + rename,
//! keeping the file's mode) so a client never reads half a file.
//!
//! Work is split into [`plan`], which reads every file and computes what each should hold (all
//! files are checked before any is written, so a refused file leaves the others untouched too),
//! and [`apply`], which writes the ones that change.

mod containerd;
mod diff;
mod docker;
mod podman;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::BaseUrl;

pub use diff::unified;

/// The client whose file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    Docker,
    Containerd,
    Podman,
}

impl Client {
    /// Where the client reads its configuration on a standard install.
    pub fn default_path(self) -> &'static Path {
        Path::new(match self {
            Client::Docker => "/etc/docker/daemon.json",
            Client::Containerd => "/etc/containerd/certs.d",
            Client::Podman => "/etc/containers/registries.conf",
        })
    }
}

/// What to configure, validated ([`Request::new`]).
#[derive(Clone, Debug)]
pub struct Request {
    pub client: Client,
    pub mirror: BaseUrl,
    /// Registry hosts to mirror, `docker.io` first when none are given; Docker Hub's other names
    /// are folded into `docker.io`, duplicates removed.
    pub registries: Vec<String>,
    pub insecure: bool,
    /// An absolute path to a CA bundle the client should trust for the mirror.
    pub ca: Option<PathBuf>,
    /// `daemon.json`, `registries.conf`, or containerd's hosts directory.
    pub path: PathBuf,
}

/// Why `configure` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad flag: nothing was read or written.
    #[error("{0}")]
    Usage(String),
    /// An existing file that does not parse (or has a shape the client would not accept): left
    /// as it is.
    #[error("{path}: {message}; left unchanged", path = path.display())]
    Malformed { path: PathBuf, message: String },
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn malformed(path: &Path, message: impl fmt::Display) -> Error {
        Error::Malformed {
            path: path.to_owned(),
            message: message.to_string().trim_end().to_owned(),
        }
    }
}

impl Request {
    /// Checks the flags as the user typed them: `mirror` must be an http(s) URL with no path,
    /// query or credentials, every registry a host name (with an optional port).
    pub fn new(
        client: Client,
        mirror: &str,
        registries: &[String],
        insecure: bool,
        ca: Option<&Path>,
        path: Option<&Path>,
    ) -> Result<Self, Error> {
        let mirror = BaseUrl::parse(mirror)
            .map_err(|message| Error::Usage(format!("--mirror: {message}")))?;
        let mut hosts: Vec<String> = Vec::new();
        let given: Vec<&str> = if registries.is_empty() {
            vec!["docker.io"]
        } else {
            registries.iter().map(String::as_str).collect()
        };
        for registry in given {
            let host = registry.trim().to_ascii_lowercase();
            if !crate::oci::host::looks_like_host(&host) {
                return Err(Error::Usage(format!(
                    "--registry `{registry}` is not a registry host name (such as docker.io, ghcr.io or registry.lab:5000)"
                )));
            }
            let host = if crate::oci::host::is_docker_hub(&host) {
                "docker.io".to_owned()
            } else {
                host
            };
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
        let ca = match ca {
            Some(ca) => {
                let ca = std::path::absolute(ca).map_err(Error::io(ca))?;
                if !ca.is_file() {
                    return Err(Error::Usage(format!("--ca {}: no such file", ca.display())));
                }
                Some(ca)
            }
            None => None,
        };
        Ok(Request {
            client,
            mirror,
            registries: hosts,
            insecure,
            ca,
            path: path
                .map(Path::to_owned)
                .unwrap_or_else(|| client.default_path().to_owned()),
        })
    }
}

/// One file as it is and as it should be.
#[derive(Clone, Debug)]
pub struct Change {
    pub path: PathBuf,
    /// `None`: the file does not exist yet.
    pub before: Option<String>,
    pub after: String,
}

impl Change {
    pub fn is_unchanged(&self) -> bool {
        self.before.as_deref() == Some(self.after.as_str())
    }

    /// A unified diff from `before` to `after` (empty when unchanged).
    pub fn diff(&self) -> String {
        let old_name = match self.before {
            Some(_) => self.path.display().to_string(),
            None => "/dev/null".to_owned(),
        };
        unified(
            self.before.as_deref().unwrap_or(""),
            &self.after,
            &old_name,
            &self.path.display().to_string(),
        )
    }
}

/// What a run would do: the files and the notes for the user (settings the client cannot take).
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub warnings: Vec<String>,
}

/// Reads every file the request touches and computes its new content; writes nothing.
pub fn plan(request: &Request) -> Result<Plan, Error> {
    match request.client {
        Client::Docker => docker::plan(request),
        Client::Containerd => containerd::plan(request),
        Client::Podman => podman::plan(request),
    }
}

/// What [`apply`] did to one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
        })
    }
}

/// Writes the files of `plan` that change, each atomically; an unchanged file is not touched
/// (not even its mtime, so a watcher sees nothing).
pub fn apply(plan: &Plan) -> Result<Vec<(PathBuf, Outcome)>, Error> {
    let mut done = Vec::new();
    for change in &plan.changes {
        let outcome = if change.is_unchanged() {
            Outcome::Unchanged
        } else {
            write_atomically(&change.path, change.after.as_bytes())?;
            if change.before.is_some() {
                Outcome::Updated
            } else {
                Outcome::Created
            }
        };
        done.push((change.path.clone(), outcome));
    }
    Ok(done)
}

/// Reads `path`: `None` when it does not exist.
fn read_existing(path: &Path) -> Result<Option<String>, Error> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|e| Error::malformed(path, format!("not UTF-8 text: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path)(e)),
    }
}

/// Temp file next to `path`, fsync, the old file's mode (0644 for a new one), rename over
/// `path`: a client reading concurrently sees the old file or the new one, never a mix. The temp
/// file is removed if anything fails before the rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let mode = match std::fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(_) => 0o644,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.gantry-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(Error::Io {
            path: path.to_owned(),
            source,
        });
    }
    // The rename is durable once the directory entry is.
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}
