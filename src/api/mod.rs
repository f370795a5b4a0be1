//! The OCI pull API: routes `/v2/` requests to the mirror and turns its answers and errors into
//! responses (headers, `Range`, `HEAD`, OCI error bodies). Every error a client sees is built in
//! [`error_response`], the one place where internal errors become HTTP.

mod counted;
mod range;
mod route;

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, LINK, RETRY_AFTER, WARNING,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub use range::{resolve as resolve_range, RangeAnswer};
pub use route::Route;

use crate::access::{Access, Decision, Identity};
use crate::metrics::Metrics;
use crate::mirror::{BlobSource, Manifest, Mirror, MirrorError, Target};
use crate::oci::{AcceptSet, Digest, ErrorCode, OciError, Reference};

pub type ResponseBody = UnsyncBoxBody<Bytes, io::Error>;

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
/// Blobs never change: clients and intermediate caches may keep them for a year.
const IMMUTABLE: HeaderValue = HeaderValue::from_static("max-age=31536000");

/// The client-facing API, cheap to clone into every connection.
#[derive(Clone)]
pub struct Api {
    mirror: Arc<Mirror>,
    metrics: Arc<Metrics>,
    /// Client authentication and pull rules; `None` lets everyone pull.
    access: Option<Arc<Access>>,
}

/// What a request was and how it was answered, for the request log line and metrics.
pub struct Outcome {
    pub route: &'static str,
    /// `hit`, `miss`, `stale`, or `-` when no cache was involved.
    pub cache: &'static str,
    /// The error the client got, if any (its internals stay in the log).
    pub error: Option<String>,
}

impl Api {
    pub fn new(mirror: Arc<Mirror>, metrics: Arc<Metrics>, access: Option<Arc<Access>>) -> Self {
        Self {
            mirror,
            metrics,
            access,
        }
    }

    /// Applies the pull rules to a resolved repository.
    fn check_pull(&self, identity: &Identity, target: &Target) -> Result<(), MirrorError> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let qualified = format!("{}/{}", target.registry.upstream.name(), target.repo);
        // The message names the repository as the client asked for it, not the upstream behind it.
        decision_to_result(access.may_pull(identity, &qualified), "this repository")
    }

    /// Counts what a body actually sends under `gantry_bytes_served_total{source}`.
    fn counted(&self, response: Response<ResponseBody>, source: &str) -> Response<ResponseBody> {
        let counter = self.metrics.bytes_served.with_label_values(&[source]);
        response.map(|body| counted::Counted::new(body, counter).boxed_unsync())
    }

    pub async fn handle<B>(&self, request: Request<B>) -> (Response<ResponseBody>, Outcome) {
        let route = Route::parse(request.uri().path());
        let mut outcome = Outcome {
            route: route.label(),
            cache: "-",
            error: None,
        };
        let identity = match &self.access {
            Some(access) => access.authenticate(request.headers()).await,
            None => Identity::Anonymous,
        };
        let mut response = match self
            .dispatch(&route, &request, &identity, &mut outcome)
            .await
        {
            Ok(response) => response,
            Err(error) => {
                outcome.error = Some(error.to_string());
                error_response(&error, &route)
            }
        };
        if let Some(ns) = query_param(request.uri().query(), "ns") {
            if let Ok(value) = HeaderValue::from_str(&ns) {
                response.headers_mut().insert("oci-namespace", value);
            }
        }
        if let (Some(access), StatusCode::UNAUTHORIZED) = (&self.access, response.status()) {
            response
                .headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, access.challenge());
        }
        response
            .headers_mut()
            .insert("docker-distribution-api-version", API_VERSION);
        (response, outcome)
    }

    async fn dispatch<B>(
        &self,
        route: &Route,
        request: &Request<B>,
        identity: &Identity,
        outcome: &mut Outcome,
    ) -> Result<Response<ResponseBody>, MirrorError> {
        let method = request.method();
        if matches!(route, Route::NotFound) {
            return Ok(not_found());
        }
        if method != Method::GET && method != Method::HEAD {
            return Err(OciError::new(
                ErrorCode::Unsupported,
                "gantry is a read-only mirror: only GET and HEAD are served",
            )
            .into());
        }
        let head = method == Method::HEAD;
        let query = request.uri().query();
        let ns = query_param(query, "ns");
        match route {
            Route::Base => {
                if let Some(access) = &self.access {
                    decision_to_result(access.may_enter(identity), "the registry API")?;
                }
                Ok(json_response(
                    StatusCode::OK,
                    Bytes::from_static(b"{}"),
                    head,
                ))
            }
            Route::Upload => Err(OciError::new(
                ErrorCode::Unsupported,
                "pushing is not supported by a mirror",
            )
            .into()),
            Route::Catalog => Err(OciError::new(
                ErrorCode::Unsupported,
                "the catalog is not served by a mirror",
            )
            .into()),
            Route::Manifest { name, reference } => {
                let target = self.mirror.resolve(ns.as_deref(), name)?;
                self.check_pull(identity, &target)?;
                let reference = Reference::parse(reference)?;
                let accept = AcceptSet::from_headers(request.headers());
                let manifest = self.mirror.manifest(&target, &reference, accept).await?;
                outcome.cache = match (manifest.stale, manifest.cached) {
                    (true, _) => "stale",
                    (false, true) => "hit",
                    (false, false) => "miss",
                };
                let source = if manifest.cached { "cache" } else { "upstream" };
                Ok(self.counted(manifest_response(manifest, request, head), source))
            }
            Route::Blob { name, digest } => {
                let target = self.mirror.resolve(ns.as_deref(), name)?;
                self.check_pull(identity, &target)?;
                let digest = Digest::parse(digest)?;
                let source = self.mirror.blob(&target, &digest, head).await?;
                let origin = match source {
                    BlobSource::Cached(_) => "cache",
                    BlobSource::Downloading { .. } | BlobSource::Upstream { .. } => "upstream",
                };
                outcome.cache = if origin == "cache" { "hit" } else { "miss" };
                let range = request
                    .headers()
                    .get(http::header::RANGE)
                    .and_then(|v| v.to_str().ok());
                Ok(self.counted(blob_response(source, &digest, range, head), origin))
            }
            Route::TagsList { name } => {
                let target = self.mirror.resolve(ns.as_deref(), name)?;
                self.check_pull(identity, &target)?;
                let listing = self
                    .mirror
                    .listing(&target, "tags/list", query_without_ns(query).as_deref())
                    .await?;
                Ok(listing_response(
                    listing,
                    &target,
                    name,
                    ns.as_deref(),
                    head,
                ))
            }
            Route::Referrers { name, digest } => {
                let target = self.mirror.resolve(ns.as_deref(), name)?;
                self.check_pull(identity, &target)?;
                let digest = Digest::parse(digest)?;
                let listing = self
                    .mirror
                    .listing(
                        &target,
                        &format!("referrers/{digest}"),
                        query_without_ns(query).as_deref(),
                    )
                    .await?;
                Ok(listing_response(
                    listing,
                    &target,
                    name,
                    ns.as_deref(),
                    head,
                ))
            }
            Route::NotFound => Ok(not_found()),
        }
    }
}

fn decision_to_result(decision: Decision, what: &str) -> Result<(), MirrorError> {
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

fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn not_found() -> Response<ResponseBody> {
    let mut response = Response::new(full(Bytes::from_static(b"404 page not found\n")));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

fn json_response(status: StatusCode, body: Bytes, head: bool) -> Response<ResponseBody> {
    let length = body.len();
    let mut response = Response::new(if head { empty() } else { full(body) });
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, JSON);
    response.headers_mut().insert(CONTENT_LENGTH, length.into());
    response
}

fn etag(digest: &Digest) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{digest}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

fn digest_header(digest: &Digest) -> HeaderValue {
    HeaderValue::from_str(&digest.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn manifest_response<B>(
    manifest: Manifest,
    request: &Request<B>,
    head: bool,
) -> Response<ResponseBody> {
    let tag = etag(&manifest.digest);
    let not_modified = request
        .headers()
        .get_all(IF_NONE_MATCH)
        .iter()
        .any(|v| v.as_bytes() == tag.as_bytes() || v.as_bytes() == b"*");
    let length = manifest.bytes.len();
    let mut response = if not_modified {
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(if head { empty() } else { full(manifest.bytes) });
        response.headers_mut().insert(CONTENT_LENGTH, length.into());
        response
    };
    let headers = response.headers_mut();
    if let Ok(media_type) = HeaderValue::from_str(&manifest.media_type) {
        headers.insert(CONTENT_TYPE, media_type);
    }
    headers.insert("docker-content-digest", digest_header(&manifest.digest));
    headers.insert(ETAG, tag);
    if manifest.stale {
        headers.insert(
            WARNING,
            HeaderValue::from_static(crate::mirror::STALE_WARNING),
        );
    }
    response
}

fn blob_response(
    source: BlobSource,
    digest: &Digest,
    range: Option<&str>,
    head: bool,
) -> Response<ResponseBody> {
    let size = source.size();
    let answer = match size {
        Some(size) => range::resolve(range, size),
        None => RangeAnswer::Full,
    };
    let mut response = Response::new(empty());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, OCTET_STREAM);
    headers.insert("docker-content-digest", digest_header(digest));
    headers.insert(ETAG, etag(digest));
    headers.insert(CACHE_CONTROL, IMMUTABLE);
    if size.is_some() {
        headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    let range = match (answer, size) {
        (RangeAnswer::Unsatisfiable, Some(size)) => {
            return error_with_headers(
                OciError::new(
                    ErrorCode::RangeInvalid,
                    "the requested range is not satisfiable",
                ),
                &[(CONTENT_RANGE, format!("bytes */{size}"))],
            );
        }
        (RangeAnswer::Partial { start, end }, Some(size)) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(value) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
                response.headers_mut().insert(CONTENT_RANGE, value);
            }
            Some(start..end)
        }
        _ => None,
    };
    let length = range.as_ref().map(|range| range.end - range.start).or(size);
    if let Some(length) = length {
        response.headers_mut().insert(CONTENT_LENGTH, length.into());
    }
    if head {
        return response;
    }
    *response.body_mut() = source.body(range).boxed_unsync();
    response
}

fn listing_response(
    listing: crate::mirror::Passthrough,
    target: &Target,
    client_name: &str,
    ns: Option<&str>,
    head: bool,
) -> Response<ResponseBody> {
    let length = listing.body.len();
    let mut response = Response::new(if head { empty() } else { full(listing.body) });
    *response.status_mut() = listing.status;
    *response.headers_mut() = listing.headers;
    response.headers_mut().insert(CONTENT_LENGTH, length.into());
    if let Some(link) = response.headers().get(LINK).and_then(|v| v.to_str().ok()) {
        match rewrite_link(link, target.repo.as_str(), client_name, ns)
            .and_then(|l| HeaderValue::from_str(&l).ok())
        {
            Some(rewritten) => {
                response.headers_mut().insert(LINK, rewritten);
            }
            None => {
                response.headers_mut().remove(LINK);
            }
        }
    }
    response
}

/// Points an upstream `Link: </v2/<repo>/…?n=…&last=…>; rel="next"` at gantry's own path for the
/// same repository (and keeps the client's `ns`), keeping only the query.
fn rewrite_link(
    link: &str,
    upstream_repo: &str,
    client_name: &str,
    ns: Option<&str>,
) -> Option<String> {
    let start = link.find('<')?;
    let end = link[start..].find('>')? + start;
    let target = &link[start + 1..end];
    let path_start = target.find("/v2/")?;
    let (path, query) = match target[path_start..].split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (&target[path_start..], None),
    };
    let suffix = path.strip_prefix(&format!("/v2/{upstream_repo}/"))?;
    let mut rewritten = format!("/v2/{client_name}/{suffix}");
    let mut params: Vec<String> = query
        .map(|q| {
            q.split('&')
                .filter(|p| !p.starts_with("ns="))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Some(ns) = ns {
        params.push(format!("ns={ns}"));
    }
    if !params.is_empty() {
        rewritten.push('?');
        rewritten.push_str(&params.join("&"));
    }
    Some(format!("<{rewritten}>{}", &link[end + 1..]))
}

/// A query parameter, percent-decoded (containerd sends `ns=host%3A5000`). `None` when absent,
/// empty, or not valid UTF-8 once decoded.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| percent_decode(v))
        .filter(|v| !v.is_empty())
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn query_without_ns(query: Option<&str>) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("ns="))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

fn error_with_headers(
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

/// The answer to a client over its own request budget (`limits.requests_per_second_per_client`),
/// with `Retry-After` in whole seconds; the server refuses such requests before routing them.
pub fn too_many_requests(retry_after: u64) -> Response<ResponseBody> {
    let error = OciError::new(
        ErrorCode::TooManyRequests,
        "this client is over its request rate",
    );
    let mut response = error_with_headers(error, &[(RETRY_AFTER, retry_after.to_string())]);
    response
        .headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_points_back_at_the_mirror() {
        let link = r#"</v2/library/alpine/tags/list?last=b&n=2>; rel="next""#;
        assert_eq!(
            rewrite_link(link, "library/alpine", "alpine", None).unwrap(),
            r#"</v2/alpine/tags/list?last=b&n=2>; rel="next""#
        );
        assert_eq!(
            rewrite_link(
                link,
                "library/alpine",
                "docker.io/alpine",
                Some("docker.io")
            )
            .unwrap(),
            r#"</v2/docker.io/alpine/tags/list?last=b&n=2&ns=docker.io>; rel="next""#
        );
        let absolute = r#"<https://up.example/v2/x/y/tags/list?n=1&last=a>; rel="next""#;
        assert_eq!(
            rewrite_link(absolute, "x/y", "ghcr.io/x/y", None).unwrap(),
            r#"</v2/ghcr.io/x/y/tags/list?n=1&last=a>; rel="next""#
        );
        assert!(rewrite_link("garbage", "x", "x", None).is_none());
    }

    #[test]
    fn query_helpers() {
        assert_eq!(
            query_param(Some("n=1&ns=ghcr.io"), "ns").as_deref(),
            Some("ghcr.io")
        );
        assert_eq!(query_param(Some("ns="), "ns"), None);
        assert_eq!(
            query_param(Some("ns=other.example%3A5000"), "ns").as_deref(),
            Some("other.example:5000")
        );
        assert_eq!(query_param(Some("ns=%zz"), "ns"), None);
        assert_eq!(
            query_without_ns(Some("ns=x&n=2&last=a")).as_deref(),
            Some("n=2&last=a")
        );
        assert_eq!(query_without_ns(Some("ns=x")), None);
    }
}
