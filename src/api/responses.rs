//! Response builders for the pull API: bodies, content headers (digest, ETag, length, type),
//! conditional and ranged answers, and listings whose `Link` points back at the mirror. They
//! build successes only; every error response comes from [`super::errors`].

use std::io;

use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    LINK, RETRY_AFTER, WARNING,
};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use super::errors::error_with_headers;
use super::range::{self, RangeAnswer};
use crate::mirror::{BlobSource, Manifest, Passthrough, Target};
use crate::oci::{Digest, ErrorCode, OciError};

pub type ResponseBody = UnsyncBoxBody<Bytes, io::Error>;

pub(super) const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");
pub(super) const JSON: HeaderValue = HeaderValue::from_static("application/json");
/// Blobs never change: clients and intermediate caches may keep them for a year.
const IMMUTABLE: HeaderValue = HeaderValue::from_static("max-age=31536000");

pub(super) fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(super) fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub(super) fn not_found() -> Response<ResponseBody> {
    let mut response = Response::new(full(Bytes::from_static(b"404 page not found\n")));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

pub(super) fn json_response(status: StatusCode, body: Bytes, head: bool) -> Response<ResponseBody> {
    let length = body.len();
    let mut response = Response::new(if head { empty() } else { full(body) });
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, JSON);
    response.headers_mut().insert(CONTENT_LENGTH, length.into());
    response
}

pub(super) fn etag(digest: &Digest) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{digest}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

pub(super) fn digest_header(digest: &Digest) -> HeaderValue {
    HeaderValue::from_str(&digest.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

pub(super) fn manifest_response<B>(
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

pub(super) fn blob_response(
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

pub(super) fn listing_response(
    listing: Passthrough,
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
}
