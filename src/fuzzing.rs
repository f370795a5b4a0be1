//! Entry points for fuzzing every parser that takes untrusted input: repository names, tags and
//! digests, request paths, `WWW-Authenticate` challenges, `Range` headers and the config loader.
//!
//! Shared by the coverage-guided targets in `fuzz/` (cargo-fuzz, nightly) and the randomized
//! smoke run in `tests/fuzz.rs` (stable, in CI). Each function panics only on a broken invariant.

use std::path::Path;

use crate::api::{resolve_range, RangeAnswer, Route};
use crate::oci::{Digest, Reference, RepoName, Tag};

/// Name, tag, digest and reference grammar: accepted values round-trip and are path-safe.
pub fn names(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(name) = RepoName::parse(&text) {
        assert_eq!(name.as_str(), text);
        assert!(!name
            .as_str()
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".."));
    }
    if let Ok(tag) = Tag::parse(&text) {
        assert!(tag.as_str().len() <= 128 && !tag.as_str().contains('/'));
    }
    if let Ok(digest) = Digest::parse(&text) {
        assert_eq!(digest.to_string(), text);
        assert!(digest
            .hex()
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
    let _ = Reference::parse(&text);
}

/// Request paths: routing never panics, takes the path apart without inventing or dropping any of
/// it (the parts put back together are the path, less one trailing `/`), and every name it
/// extracts goes through the grammar, which lets no traversal through.
pub fn route(data: &[u8]) {
    let path = String::from_utf8_lossy(data);
    let route = Route::parse(&path);
    let _ = route.label();
    let trimmed = path.strip_suffix('/').unwrap_or(&path);
    let rebuilt = |name: &str, kind: &str, last: &str| {
        assert_eq!(
            format!("/v2/{name}/{kind}/{last}"),
            trimmed,
            "{path:?} routed to {route:?}"
        );
        assert!(!last.contains('/'), "{path:?} routed to {route:?}");
        if let Ok(name) = RepoName::parse(name) {
            assert!(
                !name
                    .as_str()
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == ".."),
                "{path:?}: the grammar let {name:?} through"
            );
        }
    };
    match &route {
        Route::Manifest { name, reference } => {
            rebuilt(name, "manifests", reference);
            if let Ok(parsed) = Reference::parse(reference) {
                assert_eq!(parsed.to_string(), *reference, "{path:?}");
            }
        }
        Route::Blob { name, digest } => {
            rebuilt(name, "blobs", digest);
            let _ = Digest::parse(digest);
        }
        Route::Referrers { name, digest } => {
            rebuilt(name, "referrers", digest);
            let _ = Digest::parse(digest);
        }
        Route::TagsList { name } => rebuilt(name, "tags", "list"),
        Route::Base => assert!(path == "/v2" || path == "/v2/", "{path:?} is not /v2/"),
        Route::Catalog => assert_eq!(trimmed, "/v2/_catalog"),
        Route::Upload => assert!(
            trimmed.contains("/blobs/uploads"),
            "{path:?} is not an upload"
        ),
        Route::PeerBlob { digest } => {
            assert_eq!(
                format!("{}{digest}", crate::cluster::PEER_BLOBS_PATH),
                path,
                "{path:?} routed to {route:?}"
            );
            assert!(!digest.is_empty() && !digest.contains('/'), "{path:?}");
            let _ = Digest::parse(digest);
        }
        Route::NotFound => {}
    }
    if !path.starts_with("/v2") && !matches!(route, Route::PeerBlob { .. }) {
        assert_eq!(route, Route::NotFound, "{path:?} is outside /v2");
    }
}

/// `WWW-Authenticate` values from an upstream (possibly hostile): the scheme decides the variant
/// (case-insensitively), and a Bearer challenge's parameters survive being quoted and parsed
/// again, so a realm or scope containing `"`, `\` or `,` is read the same however it is escaped.
pub fn www_authenticate(data: &[u8]) {
    use crate::upstream::Challenge;
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let parsed = Challenge::parse([&value]);
    let Some(challenge) = parsed else { return };
    let text = value.to_str().expect("parsed, so visible ASCII");
    let scheme = text.trim().split(' ').next().unwrap_or_default();
    match &challenge {
        Challenge::Basic => assert!(scheme.eq_ignore_ascii_case("basic"), "{text:?}"),
        Challenge::Bearer {
            realm,
            service,
            scope,
        } => {
            assert!(scheme.eq_ignore_ascii_case("bearer"), "{text:?}");
            let quote = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
            let mut again = format!("Bearer realm=\"{}\"", quote(realm));
            for (key, param) in [("service", service), ("scope", scope)] {
                if let Some(param) = param {
                    again.push_str(&format!(",{key}=\"{}\"", quote(param)));
                }
            }
            let again = http::HeaderValue::from_str(&again).expect("visible ASCII stays valid");
            assert_eq!(
                Challenge::parse([&again]).as_ref(),
                Some(&challenge),
                "{text:?} quoted as {again:?}"
            );
        }
    }
}

/// `Range` headers against a blob size: a partial answer always lies inside the blob.
pub fn range(data: &[u8]) {
    let (size, header) = match data.split_first() {
        Some((first, rest)) => (u64::from(*first) * 1000 + rest.len() as u64, rest),
        None => (0, data),
    };
    let header = String::from_utf8_lossy(header);
    if let RangeAnswer::Partial { start, end } = resolve_range(Some(&header), size) {
        assert!(
            start < end && end <= size,
            "{header:?} on {size}: {start}..{end}"
        );
    }
}

/// The config loader on arbitrary YAML: an error naming its key, or a valid config, never a panic.
/// Valid means what the rest of gantry relies on without checking again (nothing downstream
/// re-validates): non-zero limits and timeouts, a store path, distinct registry hosts.
pub fn config(data: &[u8]) {
    use crate::config::{Config, ConfigError};
    let text = String::from_utf8_lossy(data);
    match Config::from_yaml(&text, Path::new("fuzz.yaml")) {
        Ok(config) => {
            assert!(!config.storage.path.as_os_str().is_empty(), "{text:?}");
            assert!(config.storage.max_size.is_none_or(|s| s.0 > 0), "{text:?}");
            assert!(config.limits.max_downloads >= 1, "{text:?}");
            assert!(config.limits.max_connections >= 1, "{text:?}");
            assert!(config.limits.max_manifest_size.0 >= 4 << 20, "{text:?}");
            let t = &config.timeouts;
            for timeout in [
                t.connect,
                t.first_byte,
                t.idle,
                t.download,
                t.header_read,
                t.send,
            ] {
                assert!(!timeout.0.is_zero(), "{text:?}");
            }
            let mut hosts = std::collections::HashSet::new();
            for registry in &config.registries {
                assert!(
                    hosts.insert(registry.host.0.to_ascii_lowercase()),
                    "{text:?}: {} twice",
                    registry.host.0
                );
            }
        }
        Err(ConfigError::Invalid { problems, .. }) => {
            assert!(!problems.is_empty(), "{text:?}");
            for problem in problems {
                let key = problem.split_once(": ").map(|(key, _)| key);
                assert!(
                    key.is_some_and(|k| !k.is_empty() && !k.contains(' ')),
                    "{text:?}: {problem:?} names no key"
                );
            }
        }
        // Known gap: an empty top-level key (`&a:` is an anchor on one) is reported as
        // "unknown field ``" with an empty key and, from serde_yaml, not always a line.
        Err(ConfigError::Parse { key, message, .. }) => assert!(
            !key.is_empty() || message.starts_with("unknown field ``"),
            "{text:?}: {message:?} names no key"
        ),
        Err(ConfigError::Read { .. }) => panic!("{text:?}: from_yaml reads no file"),
    }
}
