//! The admin listener: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (store writable;
//! Redis reachable when configured, though a Redis outage only degrades, it does not unready; the
//! object tier's state is shown the same way: down, local disk and upstreams still serve; the
//! registries served `offline` are listed, and are no reason to be unready either), and
//! the control plane (`/` and `/api/v1/`, see [`crate::control`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::api::ResponseBody;
use crate::control::Control;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::store::object::ObjectTier;

#[derive(Clone)]
pub struct Admin {
    mirror: Arc<Mirror>,
    metrics: Arc<Metrics>,
    object_tier: Option<Arc<ObjectTier>>,
    control: Arc<Control>,
}

impl Admin {
    pub fn new(mirror: Arc<Mirror>, metrics: Arc<Metrics>, control: Arc<Control>) -> Self {
        Self {
            mirror,
            metrics,
            object_tier: None,
            control,
        }
    }

    /// Shows `tier`'s state in `/readyz`.
    pub fn with_object_tier(mut self, tier: Option<Arc<ObjectTier>>) -> Self {
        self.object_tier = tier;
        self
    }

    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if Control::owns(request.uri().path()) {
            return self
                .control
                .handle(request, peer)
                .await
                .map(|body| body.map_err(|never| match never {}).boxed_unsync());
        }
        match request.uri().path() {
            "/metrics" => text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                Bytes::from(self.metrics.render()),
            ),
            "/healthz" => text(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
            "/readyz" => self.ready().await,
            _ => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(b"not found\n"),
            ),
        }
    }

    async fn ready(&self) -> Response<ResponseBody> {
        let store_ok = self.mirror.store().is_writable().await;
        let redis = match self.mirror.tags().redis_reachable().await {
            None => "not configured",
            Some(true) => "ok",
            Some(false) => "unreachable (degraded: memory tag cache only)",
        };
        // Never a reason to be unready: a pull the tier cannot serve comes from the upstream.
        let object_tier = match self.object_tier.as_deref().map(ObjectTier::health) {
            None => "not configured".to_owned(),
            Some(health) if health.up => "up".to_owned(),
            Some(health) => format!(
                "down (degraded: local disk and upstreams only): {}",
                health.last_error.as_deref().unwrap_or("no answer yet")
            ),
        };
        // Never a reason to be unready either: an offline mirror serves what it holds, by design.
        let offline = self.mirror.offline_registries();
        let body = serde_json::json!({
            "ready": store_ok,
            "offline": offline,
            "store": if store_ok { "writable" } else { "not writable" },
            "redis": redis,
            "object_tier": object_tier,
        });
        let status = if store_ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        text(status, "application/json", Bytes::from(body.to_string()))
    }
}

fn text(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
