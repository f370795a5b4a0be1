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

/// Request paths: routing never panics, and every name it extracts goes through the grammar.
pub fn route(data: &[u8]) {
    let path = String::from_utf8_lossy(data);
    match Route::parse(&path) {
        Route::Manifest { name, reference } => {
            let _ = (RepoName::parse(&name), Reference::parse(&reference));
        }
        Route::Blob { name, digest } | Route::Referrers { name, digest } => {
            let _ = (RepoName::parse(&name), Digest::parse(&digest));
        }
        Route::TagsList { name } => {
            let _ = RepoName::parse(&name);
        }
        Route::Base | Route::Upload | Route::Catalog | Route::NotFound => {}
    }
}

/// `WWW-Authenticate` values from an upstream (possibly hostile).
pub fn www_authenticate(data: &[u8]) {
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        let _ = crate::upstream::Challenge::parse([&value]);
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

/// The config loader on arbitrary YAML: an error or a valid config, never a panic.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::config::Config::from_yaml(&text, Path::new("fuzz.yaml"));
}
