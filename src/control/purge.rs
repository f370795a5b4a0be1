//! Getting rid of an image: its tags, its manifests and the blobs nothing else references.
//!
//! A reference is a tag (`nginx:1.27`: that tag, memory and Redis, its catalogue entry, its
//! manifest(s) and their unshared blobs), a repository glob (`docker.io/library/ngin*`, no tag:
//! every cached tag of every matching repository), or a digest (`sha256:…` or
//! `nginx@sha256:…`: that manifest and its unshared blobs). A manifest another tag (not being
//! purged) still points at stays: only the tag goes. The store does the content side
//! ([`crate::store::Store::purge`]); this file turns references into tags and digests.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::{Control, ControlError};
use crate::access::glob;
use crate::oci::{host, Digest, ImageRef, Reference};
use crate::store::TagRecord;

/// What one reference names, in the catalogue's terms.
pub(super) struct Matched {
    /// Cached tags it names (empty for a digest).
    pub tags: Vec<TagRecord>,
    /// Manifests it names directly: a digest, or what its tags point at.
    pub manifests: Vec<Digest>,
}

/// Whether `text` is a repository glob rather than an image reference.
fn is_glob(text: &str) -> bool {
    text.contains(['*', '?']) && !text.contains('@')
}

/// The registry name (as the catalogue records it) and repository glob of `registry/repo*`.
fn glob_parts(control: &Control, text: &str) -> Result<(String, String), ControlError> {
    let (host_part, pattern) = match text.split_once('/') {
        Some((first, rest)) if host::looks_like_host(first) => {
            (Some(first).filter(|h| !host::is_docker_hub(h)), rest)
        }
        _ => (None, text),
    };
    // A Docker Hub glob without a namespace means the official images, as `nginx` does.
    let pattern = if host_part.is_none() && !pattern.contains('/') {
        format!("library/{pattern}")
    } else {
        pattern.to_owned()
    };
    let target = control
        .mirror()
        .resolve(host_part, "library/gantry-glob")
        .map_err(|error| ControlError::BadRequest(format!("`{text}`: {error}")))?;
    Ok((target.registry.upstream.name().to_owned(), pattern))
}

/// Resolves one reference against the catalogue; a reference that names nothing cached is
/// [`ControlError::NotFound`] naming it.
pub(super) fn matches(control: &Control, text: &str) -> Result<Matched, ControlError> {
    let catalogue = control.mirror().store().catalogue();
    let not_found = || ControlError::NotFound(format!("`{text}` matches nothing cached"));
    if let Ok(digest) = Digest::parse(text) {
        return match catalogue.manifest(&digest) {
            Some(_) => Ok(Matched {
                tags: Vec::new(),
                manifests: vec![digest],
            }),
            None => Err(not_found()),
        };
    }
    if is_glob(text) {
        let (registry, pattern) = glob_parts(control, text)?;
        let tags: Vec<TagRecord> = catalogue
            .tags()
            .into_iter()
            .filter(|tag| tag.registry == registry && glob(&pattern, &tag.repository))
            .collect();
        if tags.is_empty() {
            return Err(not_found());
        }
        let manifests = tags.iter().map(|tag| tag.digest.clone()).collect();
        return Ok(Matched { tags, manifests });
    }
    ImageRef::parse(text).map_err(ControlError::BadRequest)?;
    let (target, reference) = control.resolve_image(text)?;
    let registry = target.registry.upstream.name();
    match reference {
        Reference::Digest(digest) => match catalogue.manifest(&digest) {
            Some(_) => Ok(Matched {
                tags: Vec::new(),
                manifests: vec![digest],
            }),
            None => Err(not_found()),
        },
        Reference::Tag(tag) => {
            let tags: Vec<TagRecord> = catalogue
                .tags_for(registry, target.repo.as_str())
                .into_iter()
                .filter(|record| record.tag == tag.as_str())
                .collect();
            if tags.is_empty() {
                return Err(not_found());
            }
            let manifests = tags.iter().map(|tag| tag.digest.clone()).collect();
            Ok(Matched { tags, manifests })
        }
    }
}

pub(super) fn tag_name(tag: &TagRecord) -> String {
    format!("{}/{}:{}", tag.registry, tag.repository, tag.tag)
}

/// Runs `each` on every reference; answers every result, and fails (naming the references that
/// failed) if any did, after the others were applied.
pub(super) async fn for_each<'a, F, Fut>(
    references: &'a [String],
    mut each: F,
) -> Result<Value, ControlError>
where
    F: FnMut(&'a str) -> Fut,
    Fut: std::future::Future<Output = Result<Value, ControlError>>,
{
    if references.is_empty() {
        return Err(ControlError::BadRequest("no references given".to_owned()));
    }
    let mut results = Vec::with_capacity(references.len());
    let mut failed = Vec::new();
    for text in references {
        match each(text).await {
            Ok(mut value) => {
                value["reference"] = json!(text);
                results.push(value);
            }
            Err(error) => {
                let response = error.response();
                results.push(json!({
                    "reference": text,
                    "error": {"status": response.status().as_u16(), "message": error.to_string()},
                }));
                failed.push(error);
            }
        }
    }
    match failed.len() {
        0 => Ok(json!({ "results": results })),
        _ => Err(ControlError::Partly {
            first: Box::new(failed.remove(0)),
            results: json!({ "results": results }),
        }),
    }
}

/// `POST /api/v1/purge`.
pub(super) async fn purge(control: &Control, references: &[String]) -> Result<Value, ControlError> {
    for_each(references, |text| purge_one(control, text)).await
}

async fn purge_one(control: &Control, text: &str) -> Result<Value, ControlError> {
    let matched = matches(control, text)?;
    let tags: Vec<TagKey> = matched.tags.iter().map(tag_key).collect();
    let purged = purge_resolved(control, &tags, matched.manifests.clone(), TagScope::Shared).await;
    Ok(json!({
        "tags": matched.tags.iter().map(tag_name).collect::<Vec<_>>(),
        "manifests": purged.manifests.iter().map(Digest::to_string).collect::<Vec<_>>(),
        "blobs": purged.blobs.iter().map(Digest::to_string).collect::<Vec<_>>(),
        "bytes": purged.bytes,
        "shared": purged.shared.len(),
        "object_tier_errors": purged.tier_errors,
        RESOLVED: resolved(&tags, &matched.manifests),
    }))
}

/// A tag as (registry, repository, tag), the way the catalogue and the tag cache key it.
pub(super) type TagKey = (String, String, String);

pub(super) fn tag_key(tag: &TagRecord) -> TagKey {
    (
        tag.registry.clone(),
        tag.repository.clone(),
        tag.tag.clone(),
    )
}

/// The key of a change's answer that carries what its reference resolved to here, for the
/// announcement to the other replicas (which may not know the tag: a tag learned through Redis
/// is not in their catalogue); removed from the answer before it is sent.
pub(super) const RESOLVED: &str = "resolved";

pub(super) fn resolved(tags: &[TagKey], manifests: &[Digest]) -> Value {
    json!({
        "tags": tags,
        "manifests": manifests.iter().map(Digest::to_string).collect::<Vec<_>>(),
    })
}

/// Which tag caches a purge clears: all of them (Redis too) on the replica asked, this one's
/// memory only on a replica applying another's purge (Redis was cleared there).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum TagScope {
    Shared,
    Local,
}

/// Purges resolved tags and manifests: the tags leave the catalogue and the tag cache, the
/// manifests (those no other tag still points at, when tags were named) and their unshared
/// blobs leave every tier.
pub(super) async fn purge_resolved(
    control: &Control,
    tags: &[TagKey],
    manifests: Vec<Digest>,
    scope: TagScope,
) -> crate::store::Purged {
    let mirror = control.mirror();
    let catalogue = mirror.store().catalogue();
    for (registry, repository, tag) in tags {
        catalogue.forget_tag(registry, repository, tag);
        match scope {
            TagScope::Shared => mirror.forget_tag(registry, repository, tag).await,
            TagScope::Local => mirror.forget_tag_locally(registry, repository, tag),
        }
    }
    // A manifest another tag still points at stays; only the purged tags let go of it.
    let roots: BTreeSet<Digest> = manifests
        .into_iter()
        .filter(|digest| tags.is_empty() || catalogue.tags_pointing_at(digest).is_empty())
        .collect();
    let roots: Vec<Digest> = roots.into_iter().collect();
    mirror
        .store()
        .purge(&roots, control.object_tier.as_deref())
        .await
}
