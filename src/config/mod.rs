//! The YAML configuration: schema, embedded defaults, loading and validation.
//!
//! Parsed once at start-up into typed structs; unknown keys and impossible values are errors that
//! name the key and the line. Nothing downstream re-reads or re-validates configuration.

mod cluster;
mod object_tier;
mod tag_rules;
mod values;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cluster::ClusterConfig;
pub use object_tier::{ObjectTierConfig, DEFAULT_MAX_UPLOADS};
pub use tag_rules::{tag_ttl, TagRule, TagTtl};
pub use values::{
    substitute_env, BaseUrl, ByteSize, ListenAddr, Network, Reserve, Seconds, Secret, Text,
};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Client-facing address.
    pub listen: ListenAddr,
    /// HTTPS on `listen` (HTTP/2 by ALPN); the files are read again on SIGHUP.
    pub tls: Option<Tls>,
    /// Client authentication and per-repository pull rules; everyone may pull when absent.
    pub auth: Option<ClientAuth>,
    /// `/metrics`, `/healthz`, `/readyz`; `null` turns the admin listener off.
    pub admin_listen: Option<ListenAddr>,
    pub storage: Storage,
    pub mirroring: Mirroring,
    pub cache: Cache,
    /// Extra upstreams, addressed by `?ns=<host>` or a `/v2/<host>/...` path prefix.
    pub registries: Vec<Registry>,
    /// Serve any https registry a client names, anonymously (an open proxy: off by default).
    pub allow_any_registry: bool,
    /// Networks a registry named by a client (under `allow_any_registry`) may resolve to although
    /// they are not public: loopback, private, link-local and the like are refused otherwise.
    pub allow_any_registry_networks: Vec<Network>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log: Log,
    /// Replicas sharing one Redis that fetch each blob from the upstream once between them.
    pub cluster: Option<ClusterConfig>,
    /// The control plane on the admin listener (`/api/v1/`, the status page).
    pub admin: Admin,
}

/// The `admin:` section: who may change the cache through the control plane.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Mutating control-plane calls need `Authorization: Bearer <token>`. Without one they are
    /// accepted only from loopback, so an admin listener bound to a network address is read-only.
    pub token: Option<Secret>,
}

/// The shortest admin token accepted: it guards purging the whole cache.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// An htpasswd file with bcrypt entries (`htpasswd -B`); read again on SIGHUP.
    pub htpasswd: PathBuf,
    /// The realm named in `WWW-Authenticate: Basic realm=...`.
    #[serde(default = "default_realm")]
    pub realm: Text,
    /// Let requests without credentials pull what the rules allow `anonymous`.
    #[serde(default)]
    pub anonymous_pull: bool,
    /// First matching rule decides; with no rules every authenticated user may pull everything.
    #[serde(default)]
    pub rules: Vec<AccessRule>,
}

fn default_realm() -> Text {
    Text("gantry".into())
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Globs over `<registry>/<repository>` (e.g. `docker.io/library/*`, `ghcr.io/team/**`):
    /// `*` stays within a path component, `**` crosses them.
    pub repositories: Vec<Text>,
    /// User names, `*` for any authenticated user, `anonymous` for requests without credentials.
    pub users: Vec<Text>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    pub path: PathBuf,
    /// Least recently used blobs are evicted above this size.
    pub max_size: Option<ByteSize>,
    /// Serve blobs from memory mappings of their files. Off for network filesystems: there a
    /// read error on a mapped page kills the process (SIGBUS) instead of failing one request.
    pub mmap: bool,
    /// The object tier below the local disk: S3-compatible storage shared by replicas.
    pub s3: Option<ObjectTierConfig>,
}

/// The default upstream; the names are those of the classic docker-registry mirror settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mirroring {
    pub source: BaseUrl,
    /// Accepted for compatibility; the token realm comes from `WWW-Authenticate`.
    pub source_index: Option<BaseUrl>,
    pub tags_cache_ttl: Seconds,
    /// Per-tag TTLs, tried in order (first match wins); tags no rule matches live
    /// `tags_cache_ttl`.
    pub tag_rules: Vec<TagRule>,
    /// How long an upstream 404 for a tag or manifest is answered without asking again (0: off).
    pub negative_ttl: Seconds,
    pub username: Option<Text>,
    pub password: Option<Secret>,
    /// A docker `config.json` whose `auths` (or `credHelpers`/`credsStore`) hold the credentials.
    pub docker_config: Option<PathBuf>,
    /// `NAME` runs `docker-credential-NAME get`; a value with a `/` is run as a path.
    pub credential_helper: Option<Text>,
    /// Token realms on other hosts that may receive the credentials (URL prefixes).
    pub token_realms: Vec<Text>,
    /// Allows a plain `http://` upstream.
    pub insecure: bool,
    /// Acknowledges that every client of the mirror may pull what the credentials can read.
    pub public: bool,
    /// Never contact the upstream: answer from the cache alone, tags with no TTL (docs/offline.md).
    pub offline: bool,
    /// When the upstream's announced remaining requests fall to this, cached tags are not
    /// revalidated, so what is left goes to tags nobody has cached.
    pub rate_limit_reserve: Reserve,
    /// Starts downloading an image's config and layers when its manifest is fetched upstream,
    /// at the lowest priority, so the client's blob requests find them on disk or in flight.
    pub prefetch: bool,
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
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    #[serde(default)]
    pub credential_helper: Option<Text>,
    #[serde(default)]
    pub token_realms: Vec<Text>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub public: bool,
    /// Overrides `mirroring.tags_cache_ttl` for this registry.
    #[serde(default)]
    pub tags_cache_ttl: Option<Seconds>,
    /// Replaces `mirroring.tag_rules` for this registry when set (`[]`: no rules here).
    #[serde(default)]
    pub tag_rules: Option<Vec<TagRule>>,
    /// Overrides `mirroring.negative_ttl` for this registry.
    #[serde(default)]
    pub negative_ttl: Option<Seconds>,
    /// Overrides `mirroring.offline` for this registry.
    #[serde(default)]
    pub offline: Option<bool>,
    /// Overrides `mirroring.rate_limit_reserve` for this registry.
    #[serde(default)]
    pub rate_limit_reserve: Option<Reserve>,
}

/// How gantry reaches and authenticates to one upstream, the same for `mirroring` and each
/// `registries[]` entry.
pub struct UpstreamAccess<'a> {
    /// The config key, for messages: `mirroring` or `registries[2]`.
    pub key: String,
    pub url: &'a BaseUrl,
    pub username: Option<&'a str>,
    pub password: Option<&'a Secret>,
    pub docker_config: Option<&'a Path>,
    pub credential_helper: Option<&'a str>,
    pub token_realms: Vec<&'a str>,
    pub insecure: bool,
    pub public: bool,
}

impl UpstreamAccess<'_> {
    fn has_credentials(&self) -> bool {
        self.username.is_some_and(|u| !u.is_empty())
            || self.docker_config.is_some()
            || self.credential_helper.is_some()
    }

    fn problems(&self, problems: &mut Vec<String>, client_auth: bool) {
        let key = &self.key;
        if self.username.is_some() != self.password.is_some() {
            problems.push(format!(
                "{key}.username, {key}.password: give both or neither"
            ));
        }
        let sources = [
            self.username.is_some_and(|u| !u.is_empty()),
            self.docker_config.is_some(),
            self.credential_helper.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            problems.push(format!(
                "{key}: use one of username/password, docker_config and credential_helper"
            ));
        }
        if !self.url.is_https() && !self.insecure {
            problems.push(format!(
                "{key}: `{}` is plain http: set `insecure: true` to allow it",
                self.url.origin()
            ));
        }
        if self.has_credentials() && !self.public && !client_auth {
            problems.push(format!(
                "{key}: gantry holds credentials for this upstream, so every client of the mirror could pull \
                 what they can read: configure `auth:` (client authentication) or set `public: true` to accept that"
            ));
        }
        if let Some(path) = self.docker_config {
            if !path.is_file() {
                problems.push(format!(
                    "{key}.docker_config: {} is not a readable file",
                    path.display()
                ));
            }
        }
        for realm in &self.token_realms {
            if BaseUrl::parse(
                realm
                    .split('/')
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("/")
                    .as_str(),
            )
            .is_err()
            {
                problems.push(format!(
                    "{key}.token_realms: `{realm}` is not an http(s) URL"
                ));
            }
        }
    }
}

impl Mirroring {
    pub fn access(&self) -> UpstreamAccess<'_> {
        UpstreamAccess {
            key: "mirroring".into(),
            url: &self.source,
            username: self.username.as_ref().map(|t| t.0.as_str()),
            password: self.password.as_ref(),
            docker_config: self.docker_config.as_deref(),
            credential_helper: self.credential_helper.as_ref().map(|t| t.0.as_str()),
            token_realms: self.token_realms.iter().map(|t| t.0.as_str()).collect(),
            insecure: self.insecure,
            public: self.public,
        }
    }
}

impl Registry {
    pub fn access(&self, index: usize) -> UpstreamAccess<'_> {
        UpstreamAccess {
            key: format!("registries[{index}]"),
            url: &self.url,
            username: self.username.as_ref().map(|t| t.0.as_str()),
            password: self.password.as_ref(),
            docker_config: self.docker_config.as_deref(),
            credential_helper: self.credential_helper.as_ref().map(|t| t.0.as_str()),
            token_realms: self.token_realms.iter().map(|t| t.0.as_str()).collect(),
            insecure: self.insecure,
            public: self.public,
        }
    }
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
    /// Longest a download waits for a `limits.max_downloads` slot before it is shed with `503`
    /// and `Retry-After`; the wait does not count against `download`.
    pub download_queue: Seconds,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown: Seconds,
    /// How long a client may take to send its request headers.
    pub header_read: Seconds,
    /// Longest a client may leave a response unread (its socket accepting nothing) before its
    /// connection is closed; nginx's `send_timeout`.
    pub send: Seconds,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Manifests are held in memory to be verified, so they have a hard cap.
    pub max_manifest_size: ByteSize,
    /// Client connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Blob downloads from upstreams at once; more wait their turn (`timeouts.download_queue`).
    pub max_downloads: usize,
    /// Downloads waiting for one of `max_downloads` at once; past it a new download is shed
    /// at once (`503` with `Retry-After`) rather than queued.
    pub max_queued_downloads: usize,
    /// Requests per second one client (an IPv4 address or an IPv6 /64) may make on the client
    /// listener, as a token bucket; more are answered `429` with `Retry-After`. Absent: no limit.
    pub requests_per_second_per_client: Option<f64>,
    /// The bucket's size: requests a client may make at once after a pause. Default twice the
    /// rate (at least 1); a pull opens with a request per layer at once.
    pub requests_burst_per_client: Option<u32>,
    /// Times a download whose upstream body breaks off (reset, `timeouts.idle`, a clean end
    /// short of its size) asks the upstream again from the byte it reached (`Range: bytes=N-`),
    /// with a backoff, inside `timeouts.download`. 0: a broken body fails the download.
    pub download_resumes: u32,
}

/// A per-client request budget, from `limits.requests_per_second_per_client` and its burst.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClientRate {
    pub per_second: f64,
    pub burst: u32,
}

impl Limits {
    /// The per-client budget, `None` when there is none.
    pub fn client_rate(&self) -> Option<ClientRate> {
        let per_second = self.requests_per_second_per_client?;
        // A float-to-int cast saturates: an absurd rate gets the largest burst, not a panic.
        let burst = self
            .requests_burst_per_client
            .unwrap_or(((2.0 * per_second).ceil() as u32).max(1));
        Some(ClientRate { per_second, burst })
    }

    fn problems(&self, problems: &mut Vec<String>) {
        if let Some(rate) = self.requests_per_second_per_client {
            if !(rate.is_finite() && rate > 0.0) {
                problems.push(format!(
                    "limits.requests_per_second_per_client: `{rate}` must be a number more than 0 (leave it out for no limit)"
                ));
            }
        }
        match (
            self.requests_burst_per_client,
            self.requests_per_second_per_client,
        ) {
            (Some(0), _) => {
                problems.push("limits.requests_burst_per_client: must be at least 1".to_owned())
            }
            (Some(_), None) => problems.push(
                "limits.requests_burst_per_client: set limits.requests_per_second_per_client too"
                    .to_owned(),
            ),
            _ => {}
        }
    }
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
            tls: None,
            auth: None,
            admin_listen: Some(ListenAddr(([127, 0, 0, 1], 9090).into())),
            storage: Storage::default(),
            mirroring: Mirroring::default(),
            cache: Cache::default(),
            registries: Vec::new(),
            allow_any_registry: false,
            allow_any_registry_networks: Vec::new(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            log: Log::default(),
            cluster: None,
            admin: Admin::default(),
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./data"),
            max_size: None,
            mmap: true,
            s3: None,
        }
    }
}

impl Default for Mirroring {
    fn default() -> Self {
        Self {
            source: BaseUrl(http::Uri::from_static("https://registry-1.docker.io")),
            source_index: None,
            tags_cache_ttl: Seconds(std::time::Duration::from_secs(600)),
            tag_rules: Vec::new(),
            negative_ttl: Seconds(std::time::Duration::from_secs(30)),
            username: None,
            password: None,
            docker_config: None,
            credential_helper: None,
            token_realms: Vec::new(),
            insecure: false,
            public: false,
            offline: false,
            rate_limit_reserve: Reserve::default(),
            prefetch: true,
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
            download_queue: secs(10),
            shutdown: secs(30),
            header_read: secs(30),
            send: secs(60),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_manifest_size: ByteSize(8 << 20),
            max_connections: 4096,
            max_downloads: 64,
            max_queued_downloads: 256,
            requests_per_second_per_client: None,
            requests_burst_per_client: None,
            download_resumes: 3,
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
        if let Some(s3) = &self.storage.s3 {
            s3.problems(&mut problems);
        }
        let client_auth = self.auth.is_some();
        self.mirroring.access().problems(&mut problems, client_auth);
        tag_rules::problems(
            "mirroring.tag_rules",
            &self.mirroring.tag_rules,
            &mut problems,
        );
        if let Some(redis) = &self.cache.redis {
            if !(redis.expose().starts_with("redis://") || redis.expose().starts_with("rediss://"))
            {
                problems.push("cache.redis: must be a redis:// or rediss:// URL".to_owned());
            }
        }
        let mut hosts = std::collections::HashSet::new();
        for (i, registry) in self.registries.iter().enumerate() {
            let host = &registry.host.0;
            if !crate::oci::host::looks_like_host(host) {
                problems.push(format!(
                    "registries[{i}].host: `{host}` is not a registry host name (it needs a dot or a port, like ghcr.io)"
                ));
            }
            if !hosts.insert(host.to_ascii_lowercase()) {
                problems.push(format!("registries[{i}].host: `{host}` is listed twice"));
            }
            registry.access(i).problems(&mut problems, client_auth);
            if let Some(rules) = &registry.tag_rules {
                tag_rules::problems(&format!("registries[{i}].tag_rules"), rules, &mut problems);
            }
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if !path.is_file() {
                    problems.push(format!("{key}: {} is not a readable file", path.display()));
                }
            }
        }
        if let Some(auth) = &self.auth {
            if !auth.htpasswd.is_file() {
                problems.push(format!(
                    "auth.htpasswd: {} is not a readable file",
                    auth.htpasswd.display()
                ));
            }
            for (i, rule) in auth.rules.iter().enumerate() {
                if rule.repositories.is_empty() || rule.users.is_empty() {
                    problems.push(format!(
                        "auth.rules[{i}]: needs at least one repository and one user"
                    ));
                }
            }
        }
        if !self.allow_any_registry && !self.allow_any_registry_networks.is_empty() {
            problems.push(
                "allow_any_registry_networks: has no effect without `allow_any_registry: true`"
                    .to_owned(),
            );
        }
        if self.limits.max_downloads == 0 {
            problems.push("limits.max_downloads: must be at least 1".to_owned());
        }
        if self.limits.max_connections == 0 {
            problems.push("limits.max_connections: must be at least 1".to_owned());
        }
        self.limits.problems(&mut problems);
        if let Some(cluster) = &self.cluster {
            cluster.problems(
                self.cache.redis.is_some(),
                self.tls.is_some(),
                &mut problems,
            );
        }
        if let Some(token) = &self.admin.token {
            let token = token.expose();
            if token.len() < MIN_ADMIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push(format!(
                    "admin.token: must be at least {MIN_ADMIN_TOKEN_LEN} printable characters without spaces"
                ));
            }
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
            ("timeouts.download_queue", self.timeouts.download_queue),
            ("timeouts.header_read", self.timeouts.header_read),
            ("timeouts.send", self.timeouts.send),
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
  public: true
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

    /// Every YAML block in docs/registries.md parses. Variables get a default and the files it
    /// names are swapped for one that exists here.
    #[test]
    fn docs_registry_snippets_are_valid() {
        let docs = include_str!("../../docs/registries.md");
        let blocks: Vec<&str> = docs
            .split("```yaml\n")
            .skip(1)
            .map(|rest| rest.split("```").next().unwrap_or(""))
            .collect();
        assert!(blocks.len() >= 9, "found {} blocks", blocks.len());
        for block in blocks {
            let runnable: String = block
                .replace("/etc/gantry/docker-config.json", file!())
                .lines()
                .map(|line| match line.find("_env:") {
                    Some(_) if !line.trim_end().ends_with(":x") => {
                        format!("{}:x\n", line.trim_end())
                    }
                    _ => format!("{line}\n"),
                })
                .collect();
            if let Err(error) = parse(&runnable) {
                panic!("{error}\n{block}");
            }
        }
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
    fn upstream_access_is_checked() {
        let err = parse("mirroring:\n  source: http://10.0.0.1:5000\n").unwrap_err();
        assert!(
            err.contains("mirroring: `http://10.0.0.1:5000` is plain http"),
            "{err}"
        );
        assert!(parse("mirroring:\n  source: http://10.0.0.1:5000\n  insecure: true\n").is_ok());
        let private = "registries:\n  - host: ghcr.io\n    url: https://ghcr.io\n    username: u\n    password: p\n";
        let err = parse(private).unwrap_err();
        assert!(
            err.contains("registries[0]: gantry holds credentials"),
            "{err}"
        );
        assert!(parse(&format!("{private}    public: true\n")).is_ok());
        let both = "mirroring:\n  username: u\n  password: p\n  credential_helper: ecr-login\n  public: true\n";
        assert!(parse(both).unwrap_err().contains("use one of"));
        let missing = "mirroring:\n  docker_config: /nonexistent/config.json\n  public: true\n";
        assert!(parse(missing)
            .unwrap_err()
            .contains("mirroring.docker_config"));
    }

    #[test]
    fn the_per_client_rate_is_checked_and_its_burst_defaults_to_twice_it() {
        assert_eq!(parse("").unwrap().limits.client_rate(), None);
        let rate = |yaml: &str| parse(yaml).map(|c| c.limits.client_rate());
        let expect = |per_second, burst| Ok(Some(ClientRate { per_second, burst }));
        assert_eq!(
            rate("limits:\n  requests_per_second_per_client: 10\n"),
            expect(10.0, 20)
        );
        assert_eq!(
            rate("limits:\n  requests_per_second_per_client: 0.2\n"),
            expect(0.2, 1)
        );
        assert_eq!(
            rate(
                "limits:\n  requests_per_second_per_client: 2.5\n  requests_burst_per_client: 50\n"
            ),
            expect(2.5, 50)
        );
        for bad in ["0", "-1", ".nan", ".inf"] {
            let err = parse(&format!(
                "limits:\n  requests_per_second_per_client: {bad}\n"
            ))
            .unwrap_err();
            assert!(
                err.contains("limits.requests_per_second_per_client: `"),
                "{bad}: {err}"
            );
        }
        let err =
            parse("limits:\n  requests_per_second_per_client: 1\n  requests_burst_per_client: 0\n")
                .unwrap_err();
        assert!(
            err.contains("limits.requests_burst_per_client: must be at least 1"),
            "{err}"
        );
        let err = parse("limits:\n  requests_burst_per_client: 5\n").unwrap_err();
        assert!(
            err.contains(
                "limits.requests_burst_per_client: set limits.requests_per_second_per_client"
            ),
            "{err}"
        );
        let err = parse("limits:\n  requests_per_second_per_client: lots\n").unwrap_err();
        assert!(
            err.contains("limits.requests_per_second_per_client"),
            "{err}"
        );
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
