//! The open-file limit. Every client connection, upstream socket, download temp file and blob
//! being served is a file descriptor, and the usual soft `RLIMIT_NOFILE` of 1024 would make
//! `accept` fail (EMFILE) long before `limits.max_connections`. At start-up gantry raises the soft
//! limit to the hard one, as nginx's `worker_rlimit_nofile` and the Go runtime do (the soft limit
//! stays low by default only for programs that still use `select`), and warns when even the hard
//! limit cannot hold what the configuration allows. It never fails start-up: a tighter limit
//! costs refused connections under load, not correctness.

// `getrlimit`/`setrlimit` have no safe wrapper in std or in gantry's dependencies; the two calls
// below only read and write one `rlimit` on this stack frame.
#![allow(unsafe_code)]

use crate::config::Config;

/// hyper's idle pool keeps up to this many connections per upstream host
/// (`pool_max_idle_per_host` in `upstream/mod.rs`).
const IDLE_PER_HOST: u64 = 32;

/// Hosts per configured upstream that keep idle connections: the registry itself and the token
/// realm or blob CDN it sends clients to.
const HOSTS_PER_UPSTREAM: u64 = 2;

/// Descriptors gantry holds regardless of load: stdio, the listeners, epoll and its wakers, the
/// log writer, Redis, store directories and credential-helper pipes, with room to spare.
const BASE: u64 = 64;

/// Descriptors the configuration can use at once.
///
/// - two per client connection: its socket, and the blob file it is being served from (cached
///   blobs are read or mapped through their own open file). An HTTP/2 connection can stream more
///   than one blob; one each is the working figure, since 256 streams times `max_connections`
///   would ask for millions;
/// - two per blob download: the upstream socket and the temp file;
/// - the idle upstream pool of each configured upstream;
/// - a fixed base.
pub fn needed(config: &Config) -> u64 {
    let connections = config.limits.max_connections as u64;
    let downloads = config.limits.max_downloads as u64;
    let upstreams = 1 + config.registries.len() as u64;
    connections
        .saturating_mul(2)
        .saturating_add(downloads.saturating_mul(2))
        .saturating_add(upstreams * HOSTS_PER_UPSTREAM * IDLE_PER_HOST)
        .saturating_add(BASE)
}

/// The soft limit to ask for, or `None` when it is already as high as allowed.
fn raise_to(soft: u64, hard: u64) -> Option<u64> {
    (soft < hard).then_some(hard)
}

/// Whether `limit` descriptors fall short of `needed`.
fn short(limit: u64, needed: u64) -> bool {
    limit < needed
}

fn get() -> std::io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        Ok(limit)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set(limit: libc::rlimit) -> std::io::Result<()> {
    // SAFETY: setrlimit only reads the `rlimit` it is pointed at.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises the soft open-file limit to the hard one and warns, naming both numbers, when what the
/// configuration allows does not fit. Returns the soft limit in effect afterwards.
pub fn raise(config: &Config) -> Option<u64> {
    let current = match get() {
        Ok(current) => current,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return None;
        }
    };
    let (soft, hard) = (current.rlim_cur, current.rlim_max);
    let mut effective = soft;
    if let Some(target) = raise_to(soft, hard) {
        let wanted = libc::rlimit {
            rlim_cur: target,
            rlim_max: current.rlim_max,
        };
        match set(wanted) {
            Ok(()) => {
                effective = target;
                tracing::debug!(from = soft, to = target, "raised the open-file limit");
            }
            Err(error) => {
                tracing::warn!(%error, soft, hard, "cannot raise the open-file limit");
            }
        }
    }
    let needed = needed(config);
    if short(effective, needed) {
        tracing::warn!(
            limit = effective,
            needed,
            max_connections = config.limits.max_connections,
            max_downloads = config.limits.max_downloads,
            "the open-file limit is {effective} but the configuration can use {needed} file descriptors \
             (2 per limits.max_connections, 2 per limits.max_downloads, idle upstream connections and {BASE} more): \
             raise the hard limit (LimitNOFILE=, ulimit -Hn, docker --ulimit nofile=) or lower limits.max_connections"
        );
    }
    Some(effective)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_needs_a_little_over_twice_its_connections() {
        let config = Config::default();
        // 2 × 4096 connections + 2 × 64 downloads + 2 × 32 idle upstream + 64.
        assert_eq!(needed(&config), 8192 + 128 + 64 + 64);
        let two_registries = Config {
            registries: serde_yaml::from_str(
                "[{host: ghcr.io, url: 'https://ghcr.io'}, {host: quay.io, url: 'https://quay.io'}]",
            )
            .unwrap(),
            ..Config::default()
        };
        assert_eq!(needed(&two_registries), needed(&config) + 2 * 64);
        let mut huge = Config::default();
        huge.limits.max_connections = usize::MAX;
        assert_eq!(needed(&huge), u64::MAX);
    }

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one_and_never_down() {
        assert_eq!(raise_to(1024, 524_288), Some(524_288));
        assert_eq!(raise_to(1024, 1024), None);
        assert_eq!(raise_to(libc::RLIM_INFINITY, libc::RLIM_INFINITY), None);
    }

    #[test]
    fn a_limit_below_the_need_is_short() {
        let needed = needed(&Config::default());
        assert!(short(1024, needed));
        assert!(short(needed - 1, needed));
        assert!(!short(needed, needed));
        assert!(!short(524_288, needed));
    }
}
