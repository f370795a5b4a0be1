//! Error mapping: the ONE place where internal errors ([`MirrorError`], access decisions) become
//! HTTP responses with OCI error bodies. Handlers return `Result<_, MirrorError>` and never build
//! an error response themselves; which side failed decides the code (a rate-limited upstream is
//! `TOOMANYREQUESTS`, never `DENIED`), and upstream details stay in the log, not in the body.

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use super::responses::{full, json_response, ResponseBody, JSON};
use super::Route;
use crate::access::Decision;
use crate::mirror::offline::Kind as OfflineKind;
use crate::mirror::MirrorError;
use crate::oci::{ErrorCode, OciError};

/// Turns an access decision into the error a client gets; `what` names what was refused.
pub(super) fn decision_to_result(decision: Decision, what: &str) -> Result<(), MirrorError> {
    match decision {
        Decision::Allow => Ok(()),
        Decision::Authenticate => {
            Err(OciError::new(ErrorCode::Unauthorized, "authentication required").into())
        }
        Decision::Deny => {
            Err(OciError::new(ErrorCode::Denied, format!("access to {what} is denied")).into())
        }
    }
}

/// An OCI error body with `extra` headers; an `UNSUPPORTED` answer also says which methods are.
pub(super) fn error_with_headers(
    error: OciError,
    extra: &[(http::HeaderName, String)],
) -> Response<ResponseBody> {
    let mut response = json_response(error.code.status(), Bytes::from(error.to_body()), false);
    for (name, value) in extra {
        if let Ok(value) = HeaderValue::from_str(value) {
            response.headers_mut().insert(name, value);
        }
    }
    if error.code == ErrorCode::Unsupported {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// The one place internal errors become client responses. Upstream details stay in the log;
/// the client gets the OCI code that makes its runtime behave sensibly (never DENIED for a rate
/// limit: docker would print "pull access denied").
pub fn error_response(error: &MirrorError, route: &Route) -> Response<ResponseBody> {
    let unknown = match route {
        Route::Blob { .. } => ErrorCode::BlobUnknown,
        Route::Manifest { .. } => ErrorCode::ManifestUnknown,
        _ => ErrorCode::NameUnknown,
    };
    let oci = match error {
        MirrorError::Request(oci) => oci.clone(),
        MirrorError::UpstreamStatus {
            registry,
            status,
            retry_after,
            body,
        } => match *status {
            StatusCode::TOO_MANY_REQUESTS => {
                let extra: Vec<_> = retry_after
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(|v| (RETRY_AFTER, v.to_owned()))
                    .collect();
                return error_with_headers(
                    OciError::new(ErrorCode::TooManyRequests, format!("{registry} is rate limiting this mirror")),
                    &extra,
                );
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OciError::new(
                ErrorCode::Denied,
                format!("{registry} denied access: the repository does not exist or the mirror's credentials cannot read it"),
            ),
            status if status.is_client_error() => {
                // The upstream's own OCI body is the most precise answer (e.g. NAME_UNKNOWN vs MANIFEST_UNKNOWN).
                if let Some(body) = body {
                    let mut response = Response::new(full(body.clone()));
                    *response.status_mut() = status;
                    response.headers_mut().insert(CONTENT_TYPE, JSON);
                    response.headers_mut().insert(CONTENT_LENGTH, body.len().into());
                    return response;
                }
                OciError::new(unknown, format!("{registry} answered {status}"))
            }
            status => OciError::new(ErrorCode::Unavailable, format!("{registry} answered {status} and the content is not cached")),
        },
        MirrorError::Unavailable { registry, .. } | MirrorError::DownloadTimeout { registry, .. } => OciError::new(
            ErrorCode::Unavailable,
            format!("{registry} is unavailable and the content is not cached"),
        ),
        MirrorError::BadContent { registry, .. } => OciError::new(
            ErrorCode::Unavailable,
            format!("{registry} sent content that failed verification; nothing was cached"),
        ),
        MirrorError::Origin { origin, .. } => OciError::new(
            ErrorCode::Unavailable,
            format!("{origin} broke off and no other origin could take over; retry"),
        ),
        MirrorError::Offline { registry, kind, reference } => OciError::new(
            match kind {
                OfflineKind::Blob => ErrorCode::BlobUnknown,
                OfflineKind::Manifest => ErrorCode::ManifestUnknown,
                OfflineKind::TagList | OfflineKind::Other => unknown,
            },
            format!("this mirror is offline for {registry}: the {kind} {reference} is not cached; bring it in with `gantry import`"),
        ),
        MirrorError::Store(_) => OciError::new(ErrorCode::Unavailable, "the mirror's storage failed"),
        MirrorError::Internal(_) => OciError::new(ErrorCode::Unavailable, "the mirror failed; retry"),
        MirrorError::Overloaded { retry_after_secs, .. } => {
            return error_with_headers(
                OciError::new(ErrorCode::Unavailable, "the mirror is at its limit of upstream downloads; retry shortly"),
                &[(RETRY_AFTER, retry_after_secs.to_string())],
            );
        }
    };
    error_with_headers(oci, &[])
}
