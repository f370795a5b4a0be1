//! One log line per mutation, under the `gantry::audit` target so it can be routed on its own
//! (`log.level: gantry::audit=info`): who (peer, how admitted), what (action, references), result.

use std::net::SocketAddr;

use super::{Caller, ControlError};

pub(super) fn record(
    caller: &Caller,
    action: &str,
    references: &[String],
    result: &Result<serde_json::Value, ControlError>,
) {
    let references = references.join(" ");
    match result {
        Ok(_) => tracing::info!(
            target: "gantry::audit",
            peer = %caller.peer,
            admitted_by = caller.admitted_by,
            action,
            references,
            result = "ok",
            "control-plane change"
        ),
        Err(error) => tracing::warn!(
            target: "gantry::audit",
            peer = %caller.peer,
            admitted_by = caller.admitted_by,
            action,
            references,
            result = "failed",
            %error,
            "control-plane change"
        ),
    }
}

/// A mutating call refused before it did anything.
pub(super) fn refused(peer: SocketAddr, path: &str, error: &ControlError) {
    tracing::warn!(target: "gantry::audit", %peer, path, result = "refused", %error, "control-plane change");
}
