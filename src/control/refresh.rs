//! Revalidating a tag now, whatever its TTL: the upstream's answer replaces the cached one
//! (`Mirror::refresh_tag_now`), and the answer names the digest before and after.

use serde_json::{json, Value};

use super::purge::{for_each, resolved, TagKey, RESOLVED};
use super::{Control, ControlError};
use crate::mirror::Target;
use crate::oci::{Reference, Tag};

/// `POST /api/v1/refresh`.
pub(super) async fn refresh(
    control: &Control,
    references: &[String],
) -> Result<Value, ControlError> {
    for_each(references, |text| refresh_one(control, text)).await
}

/// Another replica refreshed these tags and wrote the answers to Redis: drop them from this
/// replica's memory, so its next request for each reads Redis.
pub(super) fn forget_locally(control: &Control, tags: &[TagKey]) {
    for (registry, repository, tag) in tags {
        control
            .mirror()
            .forget_tag_locally(registry, repository, tag);
    }
}

/// The tag `text` names; a digest is refused (its content cannot change).
fn tag_of(control: &Control, text: &str) -> Result<(Target, Tag), ControlError> {
    let (target, reference) = control.resolve_image(text)?;
    match reference {
        Reference::Tag(tag) => Ok((target, tag)),
        Reference::Digest(_) => Err(ControlError::BadRequest(format!(
            "`{text}` names a digest: its content cannot change, only a tag can be refreshed"
        ))),
    }
}

async fn refresh_one(control: &Control, text: &str) -> Result<Value, ControlError> {
    let (target, tag) = tag_of(control, text)?;
    let registry = target.registry.upstream.name().to_owned();
    let catalogue = control.mirror().store().catalogue();
    let before = catalogue
        .tags_for(&registry, target.repo.as_str())
        .into_iter()
        .find(|record| record.tag == tag.as_str())
        .map(|record| record.digest.to_string());
    let after = control
        .mirror()
        .refresh_tag_now(&target, tag.as_str())
        .await
        .map_err(|error| ControlError::Upstream(format!("`{text}`: {error}")))?;
    let changed = before.as_deref() != Some(after.to_string().as_str());
    if changed {
        // The refresh answered for clients accepting every manifest type; clients with another
        // Accept set have their own cached answers, still naming the old digest: drop them all,
        // so each asks the upstream on its next pull.
        control
            .mirror()
            .forget_tag(&registry, target.repo.as_str(), tag.as_str())
            .await;
    }
    Ok(json!({
        "tag": format!("{registry}/{}:{}", target.repo, tag),
        "before": before,
        "after": after.to_string(),
        "changed": changed,
        RESOLVED: resolved(&[(registry.clone(), target.repo.to_string(), tag.to_string())], &[]),
    }))
}
