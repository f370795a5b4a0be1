//! The OCI pull API: routes `/v2/` requests to the mirror and turns its answers and errors into
//! responses (headers, `Range`, `HEAD`, OCI error bodies). Every error a client sees is built in
//! [`error_response`] (in `errors`), the one place where internal errors become HTTP; the
//! success bodies and headers are built in `responses`, the query is decoded in `query`.

mod counted;
mod errors;
mod peer;
mod query;
mod range;
mod responses;
mod route;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

pub use errors::error_response;
pub use range::{resolve as resolve_range, RangeAnswer};
pub use responses::{too_many_requests, ResponseBody};
pub use route::Route;

use crate::access::{Access, Identity};
use crate::config::{ClusterConfig, Secret};
use crate::metrics::Metrics;
use crate::mirror::{BlobSource, Mirror, MirrorError, Target};
use crate::oci::{AcceptSet, Digest, ErrorCode, OciError, Reference};
use errors::decision_to_result;
use query::{query_param, query_without_ns};
use responses::{
    blob_response, json_response, listing_response, manifest_response, not_found, API_VERSION,
};

/// The client-facing API, cheap to clone into every connection.
#[derive(Clone)]
pub struct Api {
    mirror: Arc<Mirror>,
    metrics: Arc<Metrics>,
    /// Client authentication and pull rules; `None` lets everyone pull.
    access: Option<Arc<Access>>,
    /// `cluster.secret`: with it the peer route is served (see `peer`), without it it is a 404.
    cluster_secret: Option<Secret>,
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
            cluster_secret: None,
        }
    }

    /// Serves the peer route to replicas presenting `cluster.secret` (no-op for `None`).
    pub fn with_cluster(mut self, cluster: Option<&ClusterConfig>) -> Self {
        self.cluster_secret = cluster.map(|cluster| cluster.secret.clone());
        self
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

    /// Counts what a body actually sends under `gantry_bytes_served_total{source}`, and for
    /// `target`'s registry (with the answer as a hit or a miss).
    fn counted(
        &self,
        response: Response<ResponseBody>,
        source: &str,
        target: &Target,
    ) -> Response<ResponseBody> {
        let counter = self.metrics.bytes_served.with_label_values(&[source]);
        let registry = counted::per_registry(&self.metrics, target, source);
        response.map(|body| {
            counted::Counted::new(body, counter)
                .also(registry)
                .boxed_unsync()
        })
    }

    pub async fn handle<B>(&self, request: Request<B>) -> (Response<ResponseBody>, Outcome) {
        let route = Route::parse(request.uri().path());
        // Peers authenticate with the cluster secret, never with the client-facing htpasswd.
        if let Route::PeerBlob { digest } = &route {
            let (mut response, outcome) = self.peer_blob(&route, digest, &request).await;
            response
                .headers_mut()
                .insert("docker-distribution-api-version", API_VERSION);
            return (response, outcome);
        }
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
        if matches!(route, Route::NotFound | Route::PeerBlob { .. }) {
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
        let Some(name) = route.repository() else {
            return self.registry_route(route, identity, head);
        };
        // Every repository route is resolved and checked against the pull rules before its own
        // reference or digest is parsed: a client without pull rights gets DENIED, not a grammar
        // error that would tell it the repository is worth another try.
        let query = request.uri().query();
        let ns = query_param(query, "ns");
        let target = self.mirror.resolve(ns.as_deref(), name)?;
        self.check_pull(identity, &target)?;
        match route {
            Route::Manifest { reference, .. } => {
                let reference = Reference::parse(reference)?;
                let accept = AcceptSet::from_headers(request.headers());
                let manifest = self.mirror.manifest(&target, &reference, accept).await?;
                outcome.cache = match (manifest.stale, manifest.cached) {
                    (true, _) => "stale",
                    (false, true) => "hit",
                    (false, false) => "miss",
                };
                let source = if manifest.cached { "cache" } else { "upstream" };
                if !head {
                    self.mirror
                        .store()
                        .catalogue()
                        .record_pull(&manifest.digest);
                }
                Ok(self.counted(manifest_response(manifest, request, head), source, &target))
            }
            Route::Blob { digest, .. } => {
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
                Ok(self.counted(blob_response(source, &digest, range, head), origin, &target))
            }
            Route::TagsList { .. } => {
                self.listing(&target, name, "tags/list", query, ns.as_deref(), head)
                    .await
            }
            Route::Referrers { digest, .. } => {
                let digest = Digest::parse(digest)?;
                let suffix = format!("referrers/{digest}");
                self.listing(&target, name, &suffix, query, ns.as_deref(), head)
                    .await
            }
            // `repository()` is `None` for these: answered by `registry_route` above.
            Route::Base
            | Route::Upload
            | Route::Catalog
            | Route::PeerBlob { .. }
            | Route::NotFound => Ok(not_found()),
        }
    }

    /// The routes that name no repository: the version check, and what a mirror refuses.
    fn registry_route(
        &self,
        route: &Route,
        identity: &Identity,
        head: bool,
    ) -> Result<Response<ResponseBody>, MirrorError> {
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
            // Answered before routing; the repository routes never come here.
            Route::NotFound
            | Route::PeerBlob { .. }
            | Route::Manifest { .. }
            | Route::Blob { .. }
            | Route::TagsList { .. }
            | Route::Referrers { .. } => Ok(not_found()),
        }
    }

    /// A listing (`tags/list`, `referrers/<digest>`) passed through from the upstream, with the
    /// client's query minus `ns` and its `Link` rewritten to point back at the mirror.
    async fn listing(
        &self,
        target: &Target,
        client_name: &str,
        suffix: &str,
        query: Option<&str>,
        ns: Option<&str>,
        head: bool,
    ) -> Result<Response<ResponseBody>, MirrorError> {
        let query = query_without_ns(query);
        let listing = self
            .mirror
            .listing(target, suffix, query.as_deref())
            .await?;
        Ok(listing_response(listing, target, client_name, ns, head))
    }
}
