//! One exchange with an upstream under a repository: building the request, sending it, and
//! turning a failure into a [`MirrorError`] that says which side failed. Every path that asks an
//! upstream (manifests, listings, repository checks, blob `HEAD`s) goes through here, so a refused
//! address is always a 403 and an upstream's OCI error body always reaches the client. It is
//! also where an `offline` upstream is refused (nothing at all is sent, see
//! [`offline`](super::offline)) and where a 429 to a manifest request holds the next ones back
//! until its `Retry-After` (see [`budget`](super::budget)).

use std::sync::Arc;

use http::header::RETRY_AFTER;
use http::{HeaderValue, Method, Response, StatusCode};

use super::{offline, MirrorError, Target};
use crate::oci::{AcceptSet, ErrorCode, OciError};
use crate::upstream::{Upstream, UpstreamBody, UpstreamError, UpstreamRequest};

/// Upstream error bodies are read for their OCI code; anything larger is not an error document.
const MAX_ERROR_BODY: usize = 64 << 10;

/// `/v2/<repo>/<kind>/<reference>` under the target's repository (its credentials, its token
/// scope), with the client's Accept set when it has one.
pub(super) fn repository_request(
    method: Method,
    target: &Target,
    kind: &str,
    reference: &str,
    accept: Option<AcceptSet>,
) -> UpstreamRequest {
    let mut request = UpstreamRequest::new(
        method,
        target.repo.as_str(),
        format!("/v2/{}/{kind}/{reference}", target.repo),
    );
    if let Some(accept) = accept.filter(|a| !a.is_empty()) {
        request.accept = HeaderValue::from_str(&accept.header_value()).ok();
    }
    request
}

/// Sends `request` and returns the response if `ok` accepts its status; otherwise the failure to
/// reach the upstream, or its error answer, as a [`MirrorError`]. Every answer's rate-limit
/// headers are kept first (a 429 announces its limit too).
pub(super) async fn send_ok(
    upstream: &Upstream,
    request: &UpstreamRequest,
    ok: impl Fn(StatusCode) -> bool,
) -> Result<Response<UpstreamBody>, MirrorError> {
    if upstream.is_offline() {
        return Err(offline::refusal(upstream, request));
    }
    let manifest = offline::Kind::of(request) == offline::Kind::Manifest;
    if manifest {
        if let Some(seconds) = upstream.refuse_held_off() {
            // Answered as the upstream itself would answer now: its 429, with the time left.
            return Err(MirrorError::UpstreamStatus {
                registry: upstream.name().to_owned(),
                status: StatusCode::TOO_MANY_REQUESTS,
                retry_after: Some(HeaderValue::from(seconds)),
                body: None,
            });
        }
    }
    let response = upstream
        .send(request)
        .await
        .map_err(|e| upstream_failure(upstream, e))?;
    upstream.observe_rate_limit(response.headers());
    if manifest && response.status() == StatusCode::TOO_MANY_REQUESTS {
        upstream.hold_off(response.headers().get(RETRY_AFTER));
    }
    if !ok(response.status()) {
        return Err(status_error(upstream, response).await);
    }
    Ok(response)
}

/// The size an upstream announced, if it sent a readable `Content-Length`.
pub(super) fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

pub(crate) fn upstream_failure(upstream: &Upstream, error: UpstreamError) -> MirrorError {
    // A host the client named that resolves to a forbidden address is the request's fault: a
    // clear 403, never a retryable 503 or a stale answer.
    if let UpstreamError::Refused { source, .. } = &error {
        return MirrorError::Request(OciError::new(ErrorCode::Denied, source.to_string()));
    }
    MirrorError::Unavailable {
        registry: upstream.name().to_owned(),
        source: Arc::new(error),
    }
}

/// Turns an upstream error response into a [`MirrorError`], keeping its OCI body if readable.
pub(super) async fn status_error(
    upstream: &Upstream,
    response: Response<UpstreamBody>,
) -> MirrorError {
    let status = response.status();
    let retry_after = response.headers().get(RETRY_AFTER).cloned();
    let body = response
        .into_body()
        .collect_limited(MAX_ERROR_BODY)
        .await
        .ok();
    let body = body.filter(|b| {
        serde_json::from_slice::<serde_json::Value>(b).is_ok_and(|v| v.get("errors").is_some())
    });
    MirrorError::UpstreamStatus {
        registry: upstream.name().to_owned(),
        status,
        retry_after,
        body,
    }
}
