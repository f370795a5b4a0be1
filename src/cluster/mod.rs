//! The fleet: replicas sharing one Redis fetch each blob from the upstream once between them.
//!
//! A replica that misses a blob claims it in Redis ([`Leases`]): the first claim owns the
//! download, and every other replica follows the owner instead of going upstream ([`Peers`]),
//! reading the owner's in-progress download from its client port, on a route only replicas that
//! know `cluster.secret` may use ([`PEER_BLOBS_PATH`], [`bearer_matches`]). The lease is renewed
//! while the download runs and released when it ends, so a dead owner costs its followers at most
//! `cluster.lease_ttl` before one of them fetches the blob itself. Redis down means every replica
//! is on its own again, as without a cluster: a claim never fails a pull.
//!
//! This module is the mechanism only; the mirror decides when to claim and whom to follow.

pub mod lease;
pub mod peer;

pub use lease::{LeaseClaim, Leases, OwnerLease};
pub use peer::{PeerError, PeerRead, Peers};

use http::HeaderValue;
use sha2::{Digest as _, Sha256};

/// The peer route's prefix on the client port; the digest follows it.
pub const PEER_BLOBS_PATH: &str = "/_gantry/cluster/v1/blobs/";

/// Whether `authorization` is `Bearer <secret>`. The comparison takes the same time wherever the
/// first difference is (over hashes, so not even the length leaks): the route is on the client
/// port, reachable by whoever can reach a replica.
pub fn bearer_matches(authorization: Option<&HeaderValue>, secret: &str) -> bool {
    let Some(token) = authorization
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (given, expected) = (Sha256::digest(token.trim()), Sha256::digest(secret));
    given
        .iter()
        .zip(expected.iter())
        .fold(0u8, |differ, (a, b)| differ | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_secret_matches() {
        let secret = "0123456789abcdef";
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert!(bearer_matches(
            Some(&header("Bearer 0123456789abcdef")),
            secret
        ));
        assert!(!bearer_matches(None, secret));
        for wrong in [
            "Bearer 0123456789abcdeF",
            "Bearer 0123456789abcde",
            "Bearer 0123456789abcdef0",
            "Basic 0123456789abcdef",
            "0123456789abcdef",
            "Bearer ",
        ] {
            assert!(!bearer_matches(Some(&header(wrong)), secret), "{wrong}");
        }
    }
}
