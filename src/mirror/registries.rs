//! Which registry serves a request: the configured ones by every host name clients use for them,
//! Docker Hub under its aliases, and (under `allow_any_registry`) registries created on demand for
//! hosts a client names. Routing is policy, not plumbing: a host a client names is the one input
//! that decides where gantry dials, so the rules about which names are dialed live here, once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::MirrorError;
use crate::config::{BaseUrl, Config, Reserve, TagRule, TagTtl, UpstreamAccess};
use crate::oci::host;
use crate::oci::{ErrorCode, OciError, RepoName};
use crate::upstream::{AddressPolicy, CredentialError, CredentialSource, Pool, Upstream};

/// Registries created on demand under `allow_any_registry`, at most.
const MAX_ANY_REGISTRIES: usize = 1_000;

/// One upstream registry and its policy.
pub struct Registry {
    pub upstream: Arc<Upstream>,
    pub tags_ttl: Duration,
    /// Per-tag TTLs before `tags_ttl` (the registry's `tag_rules`, else `mirroring.tag_rules`).
    pub tag_rules: Arc<[TagRule]>,
    /// Docker Hub puts single-component names under `library/`.
    pub docker_hub: bool,
    /// `rate_limit_reserve`: the announced remaining requests at which cached tags are no longer
    /// revalidated (see `mirror::budget`). Whether the registry is `offline` is its upstream's.
    pub rate_limit_reserve: Reserve,
}

/// A registry's `offline` and `rate_limit_reserve`, resolved against `mirroring`'s.
#[derive(Clone, Copy)]
struct Budget {
    offline: bool,
    reserve: Reserve,
}

/// A request's repository, resolved to the registry that serves it.
#[derive(Clone)]
pub struct Target {
    pub registry: Arc<Registry>,
    pub repo: RepoName,
}

/// Every registry this mirror serves, by host name.
pub(super) struct Registries {
    default: Arc<Registry>,
    /// Every registry by each host name clients may use for it.
    by_host: HashMap<String, Arc<Registry>>,
    any: Option<AnyRegistry>,
}

/// Registries created on demand under `allow_any_registry`.
struct AnyRegistry {
    pool: Pool,
    tags_ttl: Duration,
    tag_rules: Arc<[TagRule]>,
    budget: Budget,
    seen: Mutex<HashMap<String, Arc<Registry>>>,
}

impl Registry {
    fn new(
        name: String,
        access: &UpstreamAccess<'_>,
        tags_ttl: Duration,
        tag_rules: Arc<[TagRule]>,
        budget: Budget,
        pool: &Pool,
    ) -> Result<Self, CredentialError> {
        let docker_hub = is_docker_hub(access.url);
        let credentials = CredentialSource::from_access(access, &name, docker_hub)?;
        let realms = access
            .token_realms
            .iter()
            .map(|r| (*r).to_owned())
            .collect();
        Ok(Self {
            upstream: Arc::new(
                Upstream::new(name, access.url.clone(), credentials, realms, pool.clone())
                    .with_offline(budget.offline),
            ),
            tags_ttl,
            tag_rules,
            docker_hub,
            rate_limit_reserve: budget.reserve,
        })
    }

    /// How long a cached `tag` is answered without asking the upstream: the first of the
    /// registry's tag rules that matches it, else `tags_ttl`.
    pub fn tag_ttl(&self, tag: &str) -> TagTtl {
        crate::config::tag_ttl(&self.tag_rules, tag, self.tags_ttl)
    }
}

impl Registries {
    pub(super) fn new(config: &Config, pool: &Pool) -> Result<Self, CredentialError> {
        let source = &config.mirroring.source;
        let default_name = if is_docker_hub(source) {
            "docker.io".to_owned()
        } else {
            source.authority().to_owned()
        };
        let global_rules: Arc<[TagRule]> = config.mirroring.tag_rules.clone().into();
        let budget = Budget {
            offline: config.mirroring.offline,
            reserve: config.mirroring.rate_limit_reserve,
        };
        let default = Arc::new(Registry::new(
            default_name.clone(),
            &config.mirroring.access(),
            config.mirroring.tags_cache_ttl.0,
            Arc::clone(&global_rules),
            budget,
            pool,
        )?);
        // `mirroring.source` is what this mirror serves as Docker Hub (dockerd's `registry-mirrors`
        // and containerd's `ns=docker.io` mean exactly that), whatever its URL.
        let mut by_host = HashMap::new();
        by_host.insert(default_name, Arc::clone(&default));
        by_host.insert(source.authority().to_owned(), Arc::clone(&default));
        for alias in host::DOCKER_HUB_NAMES {
            by_host.insert(alias.to_owned(), Arc::clone(&default));
        }
        for (index, entry) in config.registries.iter().enumerate() {
            let host = entry.host.0.to_ascii_lowercase();
            let ttl = entry
                .tags_cache_ttl
                .unwrap_or(config.mirroring.tags_cache_ttl)
                .0;
            let own = Budget {
                offline: entry.offline.unwrap_or(budget.offline),
                reserve: entry.rate_limit_reserve.unwrap_or(budget.reserve),
            };
            let rules = entry
                .tag_rules
                .as_ref()
                .map_or_else(|| Arc::clone(&global_rules), |rules| rules.clone().into());
            let registry =
                Registry::new(host.clone(), &entry.access(index), ttl, rules, own, pool)?;
            by_host.insert(host, Arc::new(registry));
        }
        Ok(Self {
            default,
            by_host,
            any: config.allow_any_registry.then(|| AnyRegistry {
                // Hosts named by clients reach only public addresses, or the ranges allowed.
                pool: pool.checked(AddressPolicy {
                    allowed: config.allow_any_registry_networks.clone(),
                }),
                tags_ttl: config.mirroring.tags_cache_ttl.0,
                tag_rules: Arc::clone(&global_rules),
                budget,
                seen: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Every configured registry (once per host name it is known by; registries created on
    /// demand are not included).
    pub(super) fn all(&self) -> impl Iterator<Item = &Arc<Registry>> {
        std::iter::once(&self.default).chain(self.by_host.values())
    }

    /// Picks the registry for a request: containerd's `ns` parameter, else a first path component
    /// naming a configured host, else the default source.
    pub(super) fn resolve(&self, ns: Option<&str>, name: &str) -> Result<Target, MirrorError> {
        let unknown = |host: &str| {
            OciError::new(
                ErrorCode::NameUnknown,
                format!("registry {host} is not mirrored here"),
            )
        };
        let registry_named = |host: &str| match self.for_host(host) {
            Some(Ok(registry)) => Ok(registry),
            Some(Err(reason)) => Err(OciError::new(ErrorCode::Denied, reason)),
            None => Err(unknown(host)),
        };
        let (registry, repo) = if let Some(ns) = ns {
            if !host::looks_like_host(ns) {
                return Err(unknown(ns).into());
            }
            (registry_named(ns)?, name)
        } else {
            match name.split_once('/') {
                Some((first, rest)) if host::looks_like_host(first) => {
                    (registry_named(first)?, rest)
                }
                _ => (Arc::clone(&self.default), name),
            }
        };
        let mut repo = RepoName::parse(repo)?;
        if registry.docker_hub {
            repo = repo.with_library_prefix();
        }
        Ok(Target { registry, repo })
    }

    /// The registry for a host name clients used, creating an anonymous https one when
    /// `allow_any_registry` is on.
    /// `Some(Err(reason))` for a host a client named that gantry will not dial.
    fn for_host(&self, host: &str) -> Option<Result<Arc<Registry>, String>> {
        let host = host.to_ascii_lowercase();
        if let Some(registry) = self.by_host.get(&host) {
            return Some(Ok(Arc::clone(registry)));
        }
        let any = self.any.as_ref()?;
        if let Err(reason) = dialable_host(&host) {
            return Some(Err(reason));
        }
        let mut seen = any.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(registry) = seen.get(&host) {
            return Some(Ok(Arc::clone(registry)));
        }
        if seen.len() >= MAX_ANY_REGISTRIES {
            tracing::warn!(%host, "allow_any_registry: too many registries already; refusing a new one");
            return None;
        }
        let url = BaseUrl::parse(&format!("https://{host}")).ok()?;
        let registry = Arc::new(Registry {
            upstream: Arc::new(
                Upstream::new(
                    host.clone(),
                    url.clone(),
                    CredentialSource::None,
                    Vec::new(),
                    any.pool.clone(),
                )
                .with_offline(any.budget.offline),
            ),
            tags_ttl: any.tags_ttl,
            tag_rules: Arc::clone(&any.tag_rules),
            docker_hub: is_docker_hub(&url),
            rate_limit_reserve: any.budget.reserve,
        });
        seen.insert(host, Arc::clone(&registry));
        Some(Ok(registry))
    }
}

fn is_docker_hub(url: &BaseUrl) -> bool {
    host::is_docker_hub(url.host())
}

/// A host named by a client is dialed only as a DNS name or a dotted-quad IPv4 address. The other
/// IPv4 spellings getaddrinfo accepts (`127.1`, `2130706433`, `0x7f.1`, `0177.0.0.1`) all end
/// in a numeric label, which no DNS name does; refusing them keeps one reading of every host.
fn dialable_host(authority: &str) -> Result<(), String> {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let last = host.rsplit('.').next().unwrap_or(host);
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return Err(format!(
            "{host} is neither a host name nor a dotted-quad IPv4 address; gantry does not dial it"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_one_spelling_of_an_address_is_dialed() {
        for host in [
            "ghcr.io",
            "127.0.0.1:5000",
            "localhost:5000",
            "my-registry.internal",
        ] {
            assert!(super::dialable_host(host).is_ok(), "{host}");
        }
        for host in [
            "127.1",
            "2130706433:80",
            "0x7f.1",
            "0177.0.0.1",
            "0x7f000001",
            "10.1",
        ] {
            assert!(super::dialable_host(host).is_err(), "{host}");
        }
    }
}
