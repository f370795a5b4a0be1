//! The operator's control plane: what is cached, is it working, and how to purge, pin and
//! refresh it. It sits beside `api` over `mirror` and `store` (`api` serves clients' pulls on the
//! client port; this serves operators on the admin listener), so a purge is a call into the same
//! store and tag cache that pulls use, never a second copy of their rules.
//!
//! Every route is one function in one file; this module only routes, reads bounded bodies,
//! authorizes, audits and turns results into JSON (errors become HTTP in `error.rs` alone).
//!
//! | route | file |
//! |---|---|
//! | `GET /api/v1/images`, `GET /api/v1/images/inspect` | `inventory.rs` |
//! | `GET /api/v1/stats` | `stats.rs` |
//! | `POST /api/v1/purge` | `purge.rs` |
//! | `POST /api/v1/pin`, `POST /api/v1/unpin` | `pins.rs` |
//! | `POST /api/v1/refresh` | `refresh.rs` |
//! | `GET /` (the status page) | `page.rs` |

mod audit;
mod auth;
mod error;
mod image;
mod inventory;
mod page;
mod pins;
mod purge;
mod refresh;
mod stats;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;

pub use auth::Caller;
pub use error::ControlError;

use crate::config::Secret;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::redis::Redis;
use crate::store::object::ObjectTier;

/// The API's version prefix; a breaking change gets `/api/v2/` beside it.
pub const API_PREFIX: &str = "/api/v1/";
/// Request bodies are lists of references: this is thousands of them.
const MAX_BODY: usize = 256 << 10;

/// The control plane's state: the parts it reads and changes, and who may change them.
pub struct Control {
    mirror: Arc<Mirror>,
    metrics: Arc<Metrics>,
    object_tier: Option<Arc<ObjectTier>>,
    redis: Option<Redis>,
    token: Option<Secret>,
}

/// The body of every mutating call: image references as users write them (`nginx:1.27`,
/// `ghcr.io/org/app@sha256:…`, a repository glob, a digest).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct References {
    pub references: Vec<String>,
}

impl Control {
    pub fn new(mirror: Arc<Mirror>, metrics: Arc<Metrics>, token: Option<Secret>) -> Self {
        Self {
            mirror,
            metrics,
            object_tier: None,
            redis: None,
            token,
        }
    }

    /// Purges reach the object tier too, and stats show its state.
    pub fn with_object_tier(mut self, tier: Option<Arc<ObjectTier>>) -> Self {
        self.object_tier = tier;
        self
    }

    /// With Redis, mutations are announced to the other replicas.
    pub fn with_redis(mut self, redis: Option<Redis>) -> Self {
        self.redis = redis;
        self
    }

    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    /// Whether `path` is one of the control plane's (the admin listener routes the rest).
    pub fn owns(path: &str) -> bool {
        path == "/" || path.starts_with(API_PREFIX)
    }

    /// Answers one control-plane request from `peer`.
    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query();
        let result = match (&parts.method, path.as_str()) {
            (&Method::GET, "/") => return page::page(self).await,
            (&Method::GET, _) => match path.strip_prefix(API_PREFIX) {
                Some("images") => inventory::list(self, query).await,
                Some("images/inspect") => inventory::inspect(self, query).await,
                Some("stats") => stats::stats(self).await,
                _ => Err(ControlError::NoRoute(path.clone())),
            },
            (&Method::POST, _) => {
                let caller = match auth::authorize(self.token.as_ref(), &parts.headers, peer) {
                    Ok(caller) => caller,
                    Err(error) => {
                        audit::refused(peer, &path, &error);
                        return error.response();
                    }
                };
                let references = match read_references(body).await {
                    Ok(references) => references,
                    Err(error) => return error.response(),
                };
                let action = path.strip_prefix(API_PREFIX).unwrap_or(&path);
                let result = match action {
                    "purge" => purge::purge(self, &references.references).await,
                    "pin" => pins::pin(self, &references.references).await,
                    "unpin" => pins::unpin(self, &references.references).await,
                    "refresh" => refresh::refresh(self, &references.references).await,
                    _ => Err(ControlError::NoRoute(path.clone())),
                };
                audit::record(&caller, action, &references.references, &result);
                result
            }
            _ => Err(ControlError::MethodNotAllowed(parts.method.to_string())),
        };
        match result {
            Ok(value) => json(StatusCode::OK, &value),
            Err(error) => error.response(),
        }
    }
}

async fn read_references<B>(body: B) -> Result<References, ControlError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|error| ControlError::BadRequest(format!("reading the body: {error}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|error| {
        ControlError::BadRequest(format!(
            "the body must be {{\"references\": [\"IMAGE\", …]}}: {error}"
        ))
    })
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", Bytes::from(body))
}

pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
