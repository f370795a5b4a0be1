//! From an image as users write it to the names the catalogue records it under, offline: the
//! same rules as `mirror::registries` (a host names a configured registry, Docker Hub's names
//! and `mirroring.source`'s own host mean the default one, `library/` for Docker Hub's
//! one-component names), read from the config alone since no upstream is dialed.

use crate::config::Config;
use crate::oci::{host, ImageRef, Reference, RepoName};

/// The registries a config serves, by the names the catalogue uses.
pub struct Names {
    default: String,
    default_is_hub: bool,
    source_authority: String,
    /// Configured registries: host and whether its URL is Docker Hub.
    registries: Vec<(String, bool)>,
    any: bool,
}

impl Names {
    pub fn new(config: &Config) -> Self {
        let source = &config.mirroring.source;
        let default_is_hub = host::is_docker_hub(source.host());
        Self {
            default: if default_is_hub {
                "docker.io".to_owned()
            } else {
                source.authority().to_owned()
            },
            default_is_hub,
            source_authority: source.authority().to_ascii_lowercase(),
            registries: config
                .registries
                .iter()
                .map(|entry| {
                    (
                        entry.host.0.to_ascii_lowercase(),
                        host::is_docker_hub(entry.url.host()),
                    )
                })
                .collect(),
            any: config.allow_any_registry,
        }
    }

    /// Names as docker reads them, for a mirror whose config is not at hand (`export
    /// --mirror`): no host is Docker Hub, any host names itself.
    pub fn as_written() -> Self {
        Self {
            default: "docker.io".to_owned(),
            default_is_hub: true,
            source_authority: "docker.io".to_owned(),
            registries: Vec::new(),
            any: true,
        }
    }

    /// The registry (as catalogued), repository and reference `text` names.
    pub fn resolve(&self, text: &str) -> Result<(String, String, Reference), String> {
        let image = ImageRef::parse(text)?;
        let (registry, hub) = self.registry(image.prefix.strip_suffix('/'))?;
        let mut repository = RepoName::parse(&image.repository).map_err(|e| e.to_string())?;
        if hub {
            repository = repository.with_library_prefix();
        }
        let reference = Reference::parse(&image.reference).map_err(|e| e.to_string())?;
        Ok((registry, repository.as_str().to_owned(), reference))
    }

    /// Whether this config serves `registry` (a catalogue name): imports into a mirror that
    /// does not are kept, but nothing can pull them until the config names it.
    pub fn serves(&self, registry: &str) -> bool {
        registry == self.default
            || self.any
            || self.registries.iter().any(|(host, _)| host == registry)
    }

    fn registry(&self, host: Option<&str>) -> Result<(String, bool), String> {
        let Some(host) = host else {
            return Ok((self.default.clone(), self.default_is_hub));
        };
        let host = host.to_ascii_lowercase();
        if host == self.source_authority || host::DOCKER_HUB_NAMES.contains(&host.as_str()) {
            return Ok((self.default.clone(), self.default_is_hub));
        }
        if let Some((name, hub)) = self.registries.iter().find(|(name, _)| *name == host) {
            return Ok((name.clone(), *hub));
        }
        if self.any {
            let hub = host::is_docker_hub(&host);
            return Ok((host, hub));
        }
        Err(format!("registry {host} is not mirrored here"))
    }
}

/// How users write an image of `registry`: `docker.io/library/alpine:3.20`,
/// `ghcr.io/o/app@sha256:…` (the name `docker pull` and `podman load` show).
pub fn display_name(registry: &str, repository: &str, reference: &Reference) -> String {
    match reference {
        Reference::Digest(digest) => format!("{registry}/{repository}@{digest}"),
        Reference::Tag(tag) => format!("{registry}/{repository}:{tag}"),
    }
}
