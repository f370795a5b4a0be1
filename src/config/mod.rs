//! The YAML configuration: schema, embedded defaults, loading and validation.
//!
//! Parsed once at start-up into typed structs; unknown keys and impossible values are errors that
//! name the key and the line. Nothing downstream re-reads or re-validates configuration.

mod values;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use values::{substitute_env, BaseUrl, ByteSize, ListenAddr, Seconds, Secret, Text};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Client-facing address.
    pub listen: ListenAddr,
    /// `/metrics`, `/healthz`, `/readyz`; `null` turns the admin listener off.
    pub admin_listen: Option<ListenAddr>,
    pub storage: Storage,
    pub mirroring: Mirroring,
    pub cache: Cache,
    /// Extra upstreams, addressed by `?ns=<host>` or a `/v2/<host>/...` path prefix.
    pub registries: Vec<Registry>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log: Log,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    pub path: PathBuf,
    /// Least recently used blobs are evicted above this size.
    pub max_size: Option<ByteSize>,
}

/// The default upstream; the names are those of the classic docker-registry mirror settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mirroring {
    pub source: BaseUrl,
    /// Accepted for compatibility; the token realm comes from `WWW-Authenticate`.
    pub source_index: Option<BaseUrl>,
    pub tags_cache_ttl: Seconds,
    pub username: Option<Text>,
    pub password: Option<Secret>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    /// A shared second-level tag cache, e.g. `redis://127.0.0.1:6379/0`.
    pub redis: Option<Secret>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// The name clients use, e.g. `ghcr.io`.
    pub host: Text,
    pub url: BaseUrl,
    #[serde(default)]
    pub username: Option<Text>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// Overrides `mirroring.tags_cache_ttl` for this registry.
    #[serde(default)]
    pub tags_cache_ttl: Option<Seconds>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP (and TLS) connection set-up to an upstream.
    pub connect: Seconds,
    /// From sending a request upstream to its response headers.
    pub first_byte: Seconds,
    /// Longest pause between two chunks of an upstream body.
    pub idle: Seconds,
    /// Longest a whole blob download may take; it belongs to the mirror, not to a client.
    pub download: Seconds,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown: Seconds,
    /// How long a client may take to send its request headers.
    pub header_read: Seconds,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Manifests are held in memory to be verified, so they have a hard cap.
    pub max_manifest_size: ByteSize,
    /// Client connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    #[default]
    Pretty,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `info`, `debug`, or per target: `warn,gantry=debug`.
    pub level: Text,
    pub format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ListenAddr(([0, 0, 0, 0], 5000).into()),
            admin_listen: Some(ListenAddr(([127, 0, 0, 1], 9090).into())),
            storage: Storage::default(),
            mirroring: Mirroring::default(),
            cache: Cache::default(),
            registries: Vec::new(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            log: Log::default(),
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./data"),
            max_size: None,
        }
    }
}

impl Default for Mirroring {
    fn default() -> Self {
        Self {
            source: BaseUrl(http::Uri::from_static("https://registry-1.docker.io")),
            source_index: None,
            tags_cache_ttl: Seconds(std::time::Duration::from_secs(600)),
            username: None,
            password: None,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        let secs = |s| Seconds(std::time::Duration::from_secs(s));
        Self {
            connect: secs(10),
            first_byte: secs(30),
            idle: secs(60),
            download: secs(3600),
            shutdown: secs(30),
            header_read: secs(30),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_manifest_size: ByteSize(8 << 20),
            max_connections: 4096,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: Text("info".into()),
            format: LogFormat::Pretty,
        }
    }
}

/// A configuration that could not be used; the message names the file, the key and the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {key}: {message}")]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: invalid configuration:\n  {}", problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Parses YAML text; `origin` names the file in error messages.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        // An empty file is the embedded defaults, not a parse error.
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            let deserializer = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(deserializer).map_err(|e| parse_error(origin, e))?
        };
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_owned(),
                problems,
            })
        }
    }

    /// Every semantic problem at once, each naming its key.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.storage.path.as_os_str().is_empty() {
            problems.push("storage.path: must not be empty".to_owned());
        }
        if self.storage.max_size.is_some_and(|size| size.0 == 0) {
            problems.push(
                "storage.max_size: must be more than 0 (leave it out for no limit)".to_owned(),
            );
        }
        if self.mirroring.username.is_some() != self.mirroring.password.is_some() {
            problems
                .push("mirroring.username, mirroring.password: give both or neither".to_owned());
        }
        if let Some(redis) = &self.cache.redis {
            if !(redis.expose().starts_with("redis://") || redis.expose().starts_with("rediss://"))
            {
                problems.push("cache.redis: must be a redis:// or rediss:// URL".to_owned());
            }
        }
        let mut hosts = std::collections::HashSet::new();
        for (i, registry) in self.registries.iter().enumerate() {
            let host = &registry.host.0;
            let valid_host = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
                && (host.contains('.') || host.contains(':') || host == "localhost");
            if !valid_host {
                problems.push(format!(
                    "registries[{i}].host: `{host}` is not a registry host name (it needs a dot or a port, like ghcr.io)"
                ));
            }
            if !hosts.insert(host.to_ascii_lowercase()) {
                problems.push(format!("registries[{i}].host: `{host}` is listed twice"));
            }
            if registry.username.is_some() != registry.password.is_some() {
                problems.push(format!(
                    "registries[{i}].username, registries[{i}].password: give both or neither"
                ));
            }
        }
        if self.limits.max_connections == 0 {
            problems.push("limits.max_connections: must be at least 1".to_owned());
        }
        if self.limits.max_manifest_size.0 < 4 << 20 {
            problems.push(
                "limits.max_manifest_size: must be at least 4MiB (manifests of 4 MB are common)"
                    .to_owned(),
            );
        }
        for (key, value) in [
            ("timeouts.connect", self.timeouts.connect),
            ("timeouts.first_byte", self.timeouts.first_byte),
            ("timeouts.idle", self.timeouts.idle),
            ("timeouts.download", self.timeouts.download),
            ("timeouts.header_read", self.timeouts.header_read),
        ] {
            if value.0.is_zero() {
                problems.push(format!("{key}: must be more than 0"));
            }
        }
        if let Err(e) = self
            .log
            .level
            .0
            .parse::<tracing_subscriber::filter::Targets>()
        {
            problems.push(format!(
                "log.level: `{}` is not a level or target list: {e}",
                self.log.level.0
            ));
        }
        problems
    }

    /// The effective configuration as YAML, with secrets shown as `<redacted>`.
    pub fn to_redacted_yaml(&self) -> String {
        serde_yaml::to_string(self)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

/// serde_yaml reports the parent map's path; serde_path_to_error knows the full key. Build
/// `key: message (line L, column C)` from both.
fn parse_error(origin: &Path, error: serde_path_to_error::Error<serde_yaml::Error>) -> ConfigError {
    let key = match error.path().to_string() {
        path if path == "." => "(top level)".to_owned(),
        path => path,
    };
    let inner = error.into_inner();
    let mut message = inner.to_string();
    if let Some(location) = inner.location() {
        let suffix = format!(" at line {} column {}", location.line(), location.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = format!(
                "{stripped} (line {}, column {})",
                location.line(),
                location.column()
            );
        }
    }
    // Drop serde_yaml's own (shorter) path prefix, which the full key replaces.
    if let Some((prefix, rest)) = message.split_once(": ") {
        if key.starts_with(prefix) {
            message = rest.to_owned();
        }
    }
    ConfigError::Parse {
        path: origin.to_owned(),
        key,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_yaml(text, Path::new("test.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_is_the_embedded_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.listen.0.to_string(), "0.0.0.0:5000");
        assert_eq!(
            config.mirroring.source.origin(),
            "https://registry-1.docker.io"
        );
        assert_eq!(config.storage.path, PathBuf::from("./data"));
        assert!(config.cache.redis.is_none());
    }

    #[test]
    fn the_design_contract_parses() {
        std::env::set_var("GANTRY_CONFIG_TEST_TOKEN", "s3cret");
        let config = parse(
            r#"
listen: 0.0.0.0:5000
admin_listen: 127.0.0.1:9090
storage:
  path: ./data
  max_size: 50GiB
mirroring:
  source: https://registry-1.docker.io
  source_index: https://index.docker.io
  tags_cache_ttl: 864000
  username: _env:GANTRY_CONFIG_TEST_USER:someone
  password: _env:GANTRY_CONFIG_TEST_TOKEN
cache:
  redis: redis://127.0.0.1:6379/0
registries:
  - host: ghcr.io
    url: https://ghcr.io
log:
  level: info
  format: json
"#,
        )
        .unwrap();
        assert_eq!(config.storage.max_size, Some(ByteSize(50 << 30)));
        assert_eq!(config.mirroring.tags_cache_ttl.0.as_secs(), 864_000);
        assert_eq!(config.mirroring.username.as_ref().unwrap().0, "someone");
        assert_eq!(
            config.mirroring.password.as_ref().unwrap().expose(),
            "s3cret"
        );
        assert_eq!(config.log.format, LogFormat::Json);
        let printed = config.to_redacted_yaml();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let example = include_str!("../../config/gantry.example.yaml");
        let config = parse(example).unwrap();
        assert_eq!(config.registries[0].host.0, "ghcr.io");
        assert_eq!(config.storage.max_size, Some(ByteSize(50 << 30)));
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let err = parse("listen: 0.0.0.0:5000\nmirroring:\n  sorce: https://x\n").unwrap_err();
        assert!(err.contains("sorce"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key_and_line() {
        let err = parse("mirroring:\n  tags_cache_ttl: 10 minutes\n").unwrap_err();
        assert!(err.contains("mirroring.tags_cache_ttl"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let err = parse("storage:\n  max_size: lots\n").unwrap_err();
        assert!(err.contains("storage.max_size"), "{err}");
        let err = parse("mirroring:\n  source: _env:GANTRY_CONFIG_TEST_NEVER_SET\n").unwrap_err();
        assert!(err.contains("GANTRY_CONFIG_TEST_NEVER_SET"), "{err}");
    }

    #[test]
    fn semantic_problems_are_all_reported() {
        let err = parse("mirroring:\n  username: me\ncache:\n  redis: http://x\nlimits:\n  max_connections: 0\n")
            .unwrap_err();
        assert!(err.contains("mirroring.username"), "{err}");
        assert!(err.contains("cache.redis"), "{err}");
        assert!(err.contains("limits.max_connections"), "{err}");
    }
}
