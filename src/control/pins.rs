//! Keeping an image forever: pinned content is never evicted.
//!
//! An image reference (a tag, a repository glob or a digest, as for a purge) is resolved to its
//! digests through the catalogue: its manifest(s), an index's children, configs and layers. The
//! store keeps the set durably ([`crate::store::Pins`]); unpinning lets them be evicted again.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::purge::{for_each, matches, resolved, tag_name, RESOLVED};
use super::{Control, ControlError};
use crate::oci::Digest;
use crate::store::Catalogue;

/// Every digest an image's manifests reach: themselves, children, configs and layers.
fn closure(catalogue: &Catalogue, roots: &[Digest]) -> BTreeSet<Digest> {
    let mut found = BTreeSet::new();
    let mut pending: Vec<Digest> = roots.to_vec();
    while let Some(digest) = pending.pop() {
        if !found.insert(digest.clone()) {
            continue;
        }
        if let Some(record) = catalogue.manifest(&digest) {
            pending.extend(record.references.into_iter().map(|(d, _)| d));
        }
    }
    found
}

/// `POST /api/v1/pin`.
pub(super) async fn pin(control: &Control, references: &[String]) -> Result<Value, ControlError> {
    for_each(references, |text| change(control, text, true)).await
}

/// `POST /api/v1/unpin`.
pub(super) async fn unpin(control: &Control, references: &[String]) -> Result<Value, ControlError> {
    for_each(references, |text| change(control, text, false)).await
}

async fn change(control: &Control, text: &str, pin: bool) -> Result<Value, ControlError> {
    let matched = matches(control, text)?;
    let (digests, changed) = pin_resolved(control, &matched.manifests, pin).await?;
    Ok(json!({
        "tags": matched.tags.iter().map(tag_name).collect::<Vec<_>>(),
        "digests": digests.iter().map(Digest::to_string).collect::<Vec<_>>(),
        "changed": changed,
        "pinned_bytes": control.mirror().store().pinned_bytes(),
        RESOLVED: resolved(&[], &matched.manifests),
    }))
}

/// Pins (or unpins) manifests and everything they reach in this replica's catalogue; answers
/// those digests and how many changed.
pub(super) async fn pin_resolved(
    control: &Control,
    manifests: &[Digest],
    pin: bool,
) -> Result<(Vec<Digest>, usize), ControlError> {
    let store = std::sync::Arc::clone(control.mirror().store());
    let digests: Vec<Digest> = closure(store.catalogue(), manifests).into_iter().collect();
    let changed = {
        let digests = digests.clone();
        tokio::task::spawn_blocking(move || {
            if pin {
                store.pin(&digests)
            } else {
                store.unpin(&digests)
            }
        })
        .await
        .map_err(|error| ControlError::Upstream(format!("the pin task failed: {error}")))?
        .map_err(|error| ControlError::Upstream(format!("writing the pins: {error}")))?
    };
    Ok((digests, changed))
}
