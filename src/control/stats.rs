//! Is it working: hit ratios, bytes saved, downloads in flight, store usage, upstream headroom.

use super::{Control, ControlError};

/// `GET /api/v1/stats`.
pub(super) async fn stats(_control: &Control) -> Result<serde_json::Value, ControlError> {
    Err(ControlError::NotBuilt("GET /api/v1/stats"))
}
