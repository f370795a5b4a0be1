//! Who may change the cache: mutating calls carry `Authorization: Bearer <admin.token>`; with no
//! token configured, only a loopback peer may (so an admin listener bound to a network address
//! without a token is read-only). Reads are open: the admin listener already serves `/metrics`.

use std::net::SocketAddr;

use http::header::AUTHORIZATION;
use http::HeaderMap;

use super::ControlError;
use crate::cluster::bearer_matches;
use crate::config::Secret;

/// Who made a mutating call, for the audit line.
#[derive(Clone, Debug)]
pub struct Caller {
    pub peer: SocketAddr,
    /// How the caller was admitted: `token` or `loopback`.
    pub admitted_by: &'static str,
}

pub(super) fn authorize(
    token: Option<&Secret>,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Caller, ControlError> {
    match token {
        Some(token) => {
            if bearer_matches(headers.get(AUTHORIZATION), token.expose()) {
                Ok(Caller {
                    peer,
                    admitted_by: "token",
                })
            } else {
                Err(ControlError::Unauthorized(
                    "this call needs `Authorization: Bearer <admin.token>` (gantry … --token)",
                ))
            }
        }
        None if peer.ip().is_loopback() => Ok(Caller {
            peer,
            admitted_by: "loopback",
        }),
        None => Err(ControlError::Unauthorized(
            "no admin.token is configured, so changes are accepted from loopback only",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn token_or_loopback() {
        let token = Secret::new("0123456789abcdef".to_owned());
        let remote: SocketAddr = "10.0.0.7:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert!(authorize(Some(&token), &headers("Bearer 0123456789abcdef"), remote).is_ok());
        assert!(authorize(Some(&token), &headers("Bearer 0123456789abcdeX"), remote).is_err());
        assert!(authorize(Some(&token), &HeaderMap::new(), local).is_err());
        assert!(authorize(None, &HeaderMap::new(), local).is_ok());
        assert!(authorize(None, &HeaderMap::new(), remote).is_err());
    }
}
