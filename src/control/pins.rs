//! Keeping an image forever: pinned content is never evicted.

use super::{Control, ControlError};

/// `POST /api/v1/pin`.
pub(super) async fn pin(
    _control: &Control,
    _references: &[String],
) -> Result<serde_json::Value, ControlError> {
    Err(ControlError::NotBuilt("POST /api/v1/pin"))
}

/// `POST /api/v1/unpin`.
pub(super) async fn unpin(
    _control: &Control,
    _references: &[String],
) -> Result<serde_json::Value, ControlError> {
    Err(ControlError::NotBuilt("POST /api/v1/unpin"))
}
