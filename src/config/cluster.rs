//! The `cluster:` section: how replicas sharing one Redis find each other, so that a blob is
//! fetched from the upstream once for the whole fleet (see `crate::cluster`).
//!
//! It needs `cache.redis` (the download leases live there) and says where this replica's client
//! port is reachable by the others, and the secret they prove themselves with on its peer route.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{BaseUrl, Seconds, Secret};

/// The shortest secret accepted: a peer route guarded by a guessable secret would hand blobs to
/// anyone on the cluster network who can reach the client port.
pub const MIN_SECRET_LEN: usize = 16;

/// Below this a lease could expire during one slow renewal (each Redis command may take up to
/// 500 ms, and the renewal runs every third of the TTL).
const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `http://ADDR:PORT` where the other replicas reach this one's client port.
    pub advertise_url: BaseUrl,
    /// Shared by every replica; peers send it as `Authorization: Bearer <secret>`.
    pub secret: Secret,
    /// How long a download lease outlives its owner: a replica that dies mid-download holds the
    /// blob's lease this long before another replica fetches it itself.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Seconds,
}

fn default_lease_ttl() -> Seconds {
    Seconds(Duration::from_secs(10))
}

impl ClusterConfig {
    /// Every problem of the section, each naming its key. `redis`: whether `cache.redis` is
    /// set; `tls`: whether the client port serves https only.
    pub(super) fn problems(&self, redis: bool, tls: bool, problems: &mut Vec<String>) {
        if !redis {
            problems.push(
                "cluster: needs cache.redis (replicas agree on who downloads a blob through Redis)"
                    .to_owned(),
            );
        }
        let url = &self.advertise_url;
        if url.is_https() {
            problems.push(format!(
                "cluster.advertise_url: `{}` must be http:// (peers talk plain http on the cluster network)",
                url.origin()
            ));
        }
        if url.0.port_u16().is_none() {
            problems.push(format!(
                "cluster.advertise_url: `{}` needs the client port, e.g. http://10.0.0.5:5000",
                url.origin()
            ));
        }
        let host = url.host().trim_start_matches('[').trim_end_matches(']');
        if host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
        {
            problems.push(format!(
                "cluster.advertise_url: `{}` is not an address other replicas can dial: name this replica's own address",
                url.origin()
            ));
        }
        if tls {
            problems.push(
                "cluster: peers reach each other over plain http on the client port, which `tls:` makes https-only"
                    .to_owned(),
            );
        }
        let secret = self.secret.expose();
        if secret.trim().is_empty() {
            problems.push("cluster.secret: must not be empty".to_owned());
        } else if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            problems.push(
                "cluster.secret: must be printable ASCII without spaces (it is sent in a header)"
                    .to_owned(),
            );
        } else if secret.len() < MIN_SECRET_LEN {
            problems.push(format!(
                "cluster.secret: must be at least {MIN_SECRET_LEN} characters (e.g. `openssl rand -hex 32`)"
            ));
        }
        if self.lease_ttl.0 < MIN_LEASE_TTL {
            problems.push(format!(
                "cluster.lease_ttl: must be at least {}s (a renewal may take 500 ms)",
                MIN_LEASE_TTL.as_secs()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_yaml(text, Path::new("test.yaml")).map_err(|e| e.to_string())
    }

    const REDIS: &str = "cache:\n  redis: redis://127.0.0.1:6379/0\n";

    #[test]
    fn the_contract_parses_with_its_default_ttl() {
        std::env::set_var("GANTRY_CONFIG_TEST_CLUSTER_SECRET", "0123456789abcdef0123");
        let config = parse(&format!(
            "{REDIS}cluster:\n  advertise_url: http://10.0.0.5:5000\n  secret: _env:GANTRY_CONFIG_TEST_CLUSTER_SECRET\n"
        ))
        .unwrap();
        let cluster = config.cluster.expect("the cluster section");
        assert_eq!(cluster.advertise_url.origin(), "http://10.0.0.5:5000");
        assert_eq!(cluster.secret.expose(), "0123456789abcdef0123");
        assert_eq!(cluster.lease_ttl.0.as_secs(), 10);
        let config = parse(&format!(
            "{REDIS}cluster:\n  advertise_url: http://10.0.0.5:5000\n  secret: 0123456789abcdef\n  lease_ttl: 30s\n"
        ))
        .unwrap();
        assert_eq!(config.cluster.unwrap().lease_ttl.0.as_secs(), 30);
        assert!(parse("").unwrap().cluster.is_none());
    }

    #[test]
    fn it_needs_redis_a_long_secret_and_a_dialable_http_url() {
        let err =
            parse("cluster:\n  advertise_url: http://10.0.0.5:5000\n  secret: 0123456789abcdef\n")
                .unwrap_err();
        assert!(err.contains("cluster: needs cache.redis"), "{err}");
        for (secret, expected) in [
            ("short", "cluster.secret: must be at least 16"),
            ("\"\"", "cluster.secret: must not be empty"),
            (
                "\"0123456789 abcdef\"",
                "cluster.secret: must be printable ASCII",
            ),
        ] {
            let err = parse(&format!(
                "{REDIS}cluster:\n  advertise_url: http://10.0.0.5:5000\n  secret: {secret}\n"
            ))
            .unwrap_err();
            assert!(err.contains(expected), "{secret}: {err}");
        }
        for (url, expected) in [
            ("https://10.0.0.5:5000", "must be http://"),
            ("http://10.0.0.5", "needs the client port"),
            (
                "http://0.0.0.0:5000",
                "not an address other replicas can dial",
            ),
            ("http://10.0.0.5:5000/peer", "cluster.advertise_url"),
            ("gopher://x:1", "cluster.advertise_url"),
        ] {
            let err = parse(&format!(
                "{REDIS}cluster:\n  advertise_url: {url}\n  secret: 0123456789abcdef\n"
            ))
            .unwrap_err();
            assert!(err.contains(expected), "{url}: {err}");
        }
        let err = parse(&format!(
            "{REDIS}cluster:\n  advertise_url: http://10.0.0.5:5000\n  secret: 0123456789abcdef\n  lease_ttl: 200ms\n"
        ))
        .unwrap_err();
        assert!(err.contains("cluster.lease_ttl"), "{err}");
        let err = parse(&format!(
            "{REDIS}cluster:\n  advertise_url: http://10.0.0.5:5000\n  secret: 0123456789abcdef\n  secrets: x\n"
        ))
        .unwrap_err();
        assert!(err.contains("secrets"), "{err}");
    }
}
