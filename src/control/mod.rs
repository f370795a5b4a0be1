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
//! | (announcing those four to other replicas, applying theirs) | `events.rs` |
//! | `GET /` (the status page) | `page.rs` |
//! | `GET /api/v1/history` (the status page's chart) | `history.rs` |

mod audit;
mod auth;
mod error;
mod events;
mod history;
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
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use events::{Action, Events};

pub use auth::Caller;
pub use error::ControlError;

use crate::config::Secret;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::redis::Redis;
use crate::store::object::ObjectTier;
use history::History;

/// The API's version prefix; a breaking change gets `/api/v2/` beside it.
pub const API_PREFIX: &str = "/api/v1/";
/// Every route the control plane answers, as (method, path). docs/openapi.yaml documents exactly
/// these, and tests/control_inventory.rs checks both the file and the running router against it.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/api/v1/images"),
    ("GET", "/api/v1/images/inspect"),
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/history"),
    ("POST", "/api/v1/purge"),
    ("POST", "/api/v1/pin"),
    ("POST", "/api/v1/unpin"),
    ("POST", "/api/v1/refresh"),
];
/// Request bodies are lists of references: this is thousands of them.
const MAX_BODY: usize = 256 << 10;

/// The control plane's state: the parts it reads and changes, and who may change them.
pub struct Control {
    mirror: Arc<Mirror>,
    metrics: Arc<Metrics>,
    object_tier: Option<Arc<ObjectTier>>,
    redis: Option<Redis>,
    /// With Redis: announces this replica's changes (see `events.rs`).
    events: Option<Events>,
    token: Option<Secret>,
    /// The last hour of traffic for the status page; its sampler holds it weakly, so dropping
    /// the control plane ends the sampler.
    history: Arc<History>,
    /// For the stats' `uptime_seconds`.
    started: std::time::Instant,
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
            events: None,
            token,
            history: Arc::new(History::new(history::INTERVAL, history::POINTS)),
            started: std::time::Instant::now(),
        }
    }

    /// Purges reach the object tier too, and stats show its state.
    pub fn with_object_tier(mut self, tier: Option<Arc<ObjectTier>>) -> Self {
        self.object_tier = tier;
        self
    }

    /// With Redis, mutations are announced to the other replicas.
    pub fn with_redis(mut self, redis: Option<Redis>) -> Self {
        self.events = redis
            .clone()
            .map(|redis| Events::new(redis, self.metrics.control_events()));
        self.redis = redis;
        self
    }

    /// With Redis, starts the one task that applies the other replicas' changes here, catching
    /// up from the last one applied (kept under `storage`); it ends when `shutdown` turns.
    pub fn follow_events(
        self: &Arc<Self>,
        storage: &std::path::Path,
        shutdown: watch::Receiver<bool>,
    ) -> Option<JoinHandle<()>> {
        events::follow(Arc::clone(self), storage, shutdown)
    }

    /// Starts the one task that samples the counters into the status page's history; it ends
    /// when `shutdown` turns or this control plane is dropped.
    pub fn sample_history(&self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        self.history
            .spawn_sampler(Arc::clone(&self.metrics), shutdown)
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
                Some("history") => history::history(self).await,
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
                let result = match Action::parse(action) {
                    Some(action) => self.change(action, &references.references).await,
                    None => Err(ControlError::NoRoute(path.clone())),
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

impl Control {
    /// One change asked of this replica: applied here, then announced to the others (with
    /// Redis) for the references that applied. Redis being down does not undo or fail the
    /// change; the answer says `announced: false`.
    async fn change(&self, action: Action, references: &[String]) -> Result<Value, ControlError> {
        let mut result = self.apply_locally(action, references).await;
        let results = match &mut result {
            Ok(value) => value,
            Err(ControlError::Partly { results, .. }) => results,
            Err(_) => return result,
        };
        let mut applied = Vec::new();
        let mut tags: Vec<Value> = Vec::new();
        let mut manifests: Vec<Value> = Vec::new();
        for each in results["results"].as_array_mut().into_iter().flatten() {
            let Some(object) = each.as_object_mut() else {
                continue;
            };
            let found = object.remove(purge::RESOLVED);
            if object.contains_key("error") {
                continue;
            }
            if let Some(reference) = object.get("reference").and_then(Value::as_str) {
                applied.push(reference.to_owned());
            }
            if let Some(found) = found {
                tags.extend(found["tags"].as_array().cloned().unwrap_or_default());
                manifests.extend(found["manifests"].as_array().cloned().unwrap_or_default());
            }
        }
        let Some(events) = self.events.as_ref().filter(|_| !applied.is_empty()) else {
            return result;
        };
        let resolved = serde_json::json!({ "tags": tags, "manifests": manifests });
        let announced = events.announce(action, &applied, &resolved).await;
        if let Some(each) = results["results"].as_array_mut() {
            for each in each.iter_mut().filter(|each| each.get("error").is_none()) {
                each["announced"] = Value::Bool(announced);
            }
        }
        if let Ok(value) = &mut result {
            value["announced"] = Value::Bool(announced);
        }
        result
    }

    /// The change itself, on this replica only: what the API and other replicas' events share.
    async fn apply_locally(
        &self,
        action: Action,
        references: &[String],
    ) -> Result<Value, ControlError> {
        match action {
            Action::Purge => purge::purge(self, references).await,
            Action::Pin => pins::pin(self, references).await,
            Action::Unpin => pins::unpin(self, references).await,
            Action::Refresh => refresh::refresh(self, references).await,
        }
    }

    /// Another replica's change, applied here without announcing it again, to what it resolved
    /// to there (this replica's catalogue may not know a tag it learned through Redis). A
    /// refresh there already wrote the new answer to Redis: here the tag only leaves memory.
    async fn apply_remote(&self, action: Action, resolved: &events::Resolved) -> Value {
        match action {
            Action::Purge => {
                let purged = purge::purge_resolved(
                    self,
                    &resolved.tags,
                    resolved.manifests.clone(),
                    purge::TagScope::Local,
                )
                .await;
                serde_json::json!({
                    "manifests": purged.manifests.len(),
                    "blobs": purged.blobs.len(),
                    "bytes": purged.bytes,
                })
            }
            Action::Pin | Action::Unpin => {
                match pins::pin_resolved(self, &resolved.manifests, action == Action::Pin).await {
                    Ok((digests, changed)) => {
                        serde_json::json!({ "digests": digests.len(), "changed": changed })
                    }
                    Err(error) => serde_json::json!({ "error": error.to_string() }),
                }
            }
            Action::Refresh => {
                refresh::forget_locally(self, &resolved.tags);
                serde_json::json!({ "tags": resolved.tags.len() })
            }
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
