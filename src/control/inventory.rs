//! What is cached: the listing of images and the inspection of one.

use super::{Control, ControlError};

/// `GET /api/v1/images?registry=GLOB&repository=GLOB&limit=N&cursor=C`.
pub(super) async fn list(
    _control: &Control,
    _query: Option<&str>,
) -> Result<serde_json::Value, ControlError> {
    Err(ControlError::NotBuilt("GET /api/v1/images"))
}

/// `GET /api/v1/images/inspect?image=REF`.
pub(super) async fn inspect(
    _control: &Control,
    _query: Option<&str>,
) -> Result<serde_json::Value, ControlError> {
    Err(ControlError::NotBuilt("GET /api/v1/images/inspect"))
}
