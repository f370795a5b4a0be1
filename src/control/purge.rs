//! Getting rid of an image: its tags, its manifests and the blobs nothing else references.

use super::{Control, ControlError};

/// `POST /api/v1/purge`.
pub(super) async fn purge(
    _control: &Control,
    _references: &[String],
) -> Result<serde_json::Value, ControlError> {
    Err(ControlError::NotBuilt("POST /api/v1/purge"))
}
