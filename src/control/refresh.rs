//! Revalidating a tag now, whatever its TTL.

use super::{Control, ControlError};

/// `POST /api/v1/refresh`.
pub(super) async fn refresh(
    _control: &Control,
    _references: &[String],
) -> Result<serde_json::Value, ControlError> {
    Err(ControlError::NotBuilt("POST /api/v1/refresh"))
}
