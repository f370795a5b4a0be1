//! `offline`: a registry whose upstream is never contacted, for isolated networks that receive
//! their images with `gantry import` (docs/offline.md).
//!
//! Two things make it hold. The refusal sits at the one way out, [`send_ok`](super::send), which
//! every upstream exchange (manifests, tag lists, repository checks, blob `HEAD`s and bodies,
//! and with them every token request) goes through, so no code path can forget it. And tags are
//! answered from what is cached with no TTL: a revalidation could only fail, and a stale warning
//! on every pull would say nothing an operator does not know. What is not cached is a 404 that
//! names the cause and the cure, never a 503: retrying cannot help, importing can.

use std::fmt;

use super::{Manifest, Mirror, MirrorError, Target};
use crate::oci::{AcceptSet, Digest};
use crate::tags::Tags;
use crate::upstream::{Upstream, UpstreamRequest};

/// What an offline registry was asked for, which decides the 404's OCI code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
    TagList,
    /// Anything else (referrers, catalogue listings).
    Other,
}

impl Kind {
    /// The kind of a `/v2/<repository>/<kind>/<reference>` request gantry built: read after its
    /// own repository, so a repository named `x/manifests/y` cannot be mistaken for one.
    pub(super) fn of(request: &UpstreamRequest) -> Self {
        let rest = request
            .path
            .strip_prefix("/v2/")
            .and_then(|p| p.strip_prefix(repository(request)))
            .unwrap_or_default();
        match rest.split('/').nth(1) {
            Some("manifests") => Self::Manifest,
            Some("blobs") => Self::Blob,
            Some("tags") => Self::TagList,
            _ => Self::Other,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Manifest => "manifest",
            Self::Blob => "blob",
            Self::TagList => "tag list",
            Self::Other => "content",
        })
    }
}

/// The repository a request was built for, from its token scope `repository:<name>:pull`.
fn repository(request: &UpstreamRequest) -> &str {
    request
        .scope
        .strip_prefix("repository:")
        .and_then(|s| s.strip_suffix(":pull"))
        .unwrap_or_default()
}

/// The refusal of a request to an offline upstream: nothing was sent.
pub(super) fn refusal(upstream: &Upstream, request: &UpstreamRequest) -> MirrorError {
    let kind = Kind::of(request);
    let repository = repository(request);
    let reference = request
        .path
        .rsplit('/')
        .next()
        .filter(|_| kind != Kind::TagList)
        .map_or_else(
            || repository.to_owned(),
            |r| format!("{repository}{}{r}", separator(r)),
        );
    MirrorError::Offline {
        registry: upstream.name().to_owned(),
        kind,
        reference,
    }
}

/// `repo@sha256:…` for a digest, `repo:tag` for a tag.
fn separator(reference: &str) -> char {
    if Digest::parse(reference).is_ok() {
        '@'
    } else {
        ':'
    }
}

impl Mirror {
    /// A tag of an offline registry: the tag cache's answer whatever its age (`cached`, for this
    /// Accept set), else the tag's latest answer for any Accept set, else the store's catalogue
    /// (a bundle `gantry import` brought in, or what was pulled before a restart), each only if
    /// the client accepts its media type and the manifest is in the store.
    pub(super) async fn offline_tag(
        &self,
        target: &Target,
        tag: &str,
        accept: AcceptSet,
        cached: Option<Manifest>,
    ) -> Result<Manifest, MirrorError> {
        if let Some(manifest) = cached {
            self.metrics.cache_lookup("tag", "hit");
            return Ok(manifest);
        }
        let registry = target.registry.upstream.name();
        let repository = target.repo.as_str();
        let latest = self
            .tags
            .get(&Tags::any_key(registry, repository, tag))
            .await
            .and_then(|entry| Some((Digest::parse(&entry.digest).ok()?, entry.media_type)));
        let recorded = || {
            self.store
                .catalogue()
                .tags_for(registry, repository)
                .into_iter()
                .find(|record| record.tag == tag)
                .map(|record| (record.digest, record.media_type))
        };
        if let Some((digest, media_type)) = latest.or_else(recorded) {
            if accept.accepts(&media_type) {
                if let Some(stored) = self.store.read_manifest(&digest).await {
                    self.metrics.cache_lookup("tag", "hit");
                    return Ok(Manifest {
                        digest,
                        media_type: stored.media_type,
                        bytes: stored.bytes,
                        stale: false,
                        cached: true,
                    });
                }
            }
        }
        self.metrics.cache_lookup("tag", "miss");
        Err(MirrorError::Offline {
            registry: registry.to_owned(),
            kind: Kind::Manifest,
            reference: format!("{repository}:{tag}"),
        })
    }

    /// The names of the registries served offline, for `/readyz` and the status page.
    pub fn offline_registries(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .registries
            .all()
            .filter(|registry| registry.upstream.is_offline())
            .map(|registry| registry.upstream.name().to_owned())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;

    #[test]
    fn the_kind_is_read_after_the_repository() {
        let kind = |repo: &str, path: &str| {
            Kind::of(&UpstreamRequest::new(Method::GET, repo, path.to_owned()))
        };
        assert_eq!(kind("a/b", "/v2/a/b/manifests/v1"), Kind::Manifest);
        assert_eq!(
            kind("x/manifests/y", "/v2/x/manifests/y/blobs/sha256:00"),
            Kind::Blob
        );
        assert_eq!(kind("x/blobs/y", "/v2/x/blobs/y/tags/list"), Kind::TagList);
        assert_eq!(kind("a", "/v2/a/referrers/sha256:00"), Kind::Other);
    }
}
