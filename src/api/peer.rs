//! The peer route, `GET|HEAD /_gantry/cluster/v1/blobs/<digest>`: another replica of the
//! cluster reading a blob this one holds or is downloading (see `crate::cluster`).
//!
//! It answers to `cluster.secret` (as `Authorization: Bearer`), not to the client-facing
//! htpasswd: a peer is a replica, not a user. Without the secret nothing is looked up. With it,
//! the answer is what a client's blob GET would get from this replica's store or running
//! download (the same body and `Range` handling), but never a new download or an upstream
//! request: the peer is asking because this replica owns the download. Without a `cluster:`
//! section the path is a 404 like any unknown one.

use http::{Method, Request, Response};

use super::responses::{blob_response, not_found, ResponseBody};
use super::{error_response, Api, Outcome, Route};
use crate::cluster::bearer_matches;
use crate::mirror::{BlobSource, MirrorError};
use crate::oci::{Digest, ErrorCode, OciError};

impl Api {
    pub(super) async fn peer_blob<B>(
        &self,
        route: &Route,
        digest: &str,
        request: &Request<B>,
    ) -> (Response<ResponseBody>, Outcome) {
        let mut outcome = Outcome {
            route: route.label(),
            cache: "-",
            error: None,
        };
        let Some(secret) = &self.cluster_secret else {
            outcome.route = Route::NotFound.label();
            return (not_found(), outcome);
        };
        match self
            .peer_answer(secret.expose(), digest, request, &mut outcome)
            .await
        {
            Ok(response) => (response, outcome),
            Err(error) => {
                outcome.error = Some(error.to_string());
                (error_response(&error, route), outcome)
            }
        }
    }

    async fn peer_answer<B>(
        &self,
        secret: &str,
        digest: &str,
        request: &Request<B>,
        outcome: &mut Outcome,
    ) -> Result<Response<ResponseBody>, MirrorError> {
        let authorization = request.headers().get(http::header::AUTHORIZATION);
        if !bearer_matches(authorization, secret) {
            return Err(OciError::new(
                ErrorCode::Unauthorized,
                "the peer route needs the cluster secret",
            )
            .into());
        }
        let method = request.method();
        if method != Method::GET && method != Method::HEAD {
            return Err(
                OciError::new(ErrorCode::Unsupported, "only GET and HEAD are served").into(),
            );
        }
        let head = method == Method::HEAD;
        let digest = Digest::parse(digest)?;
        let Some(source) = self.mirror.local_blob(&digest).await else {
            return Err(OciError::new(
                ErrorCode::BlobUnknown,
                "this replica neither holds nor is downloading the blob",
            )
            .into());
        };
        outcome.cache = match source {
            BlobSource::Cached(_) => "hit",
            BlobSource::Downloading(_) | BlobSource::Upstream { .. } => "miss",
        };
        let range = request
            .headers()
            .get(http::header::RANGE)
            .and_then(|v| v.to_str().ok());
        let response = blob_response(source, &digest, range, head);
        if !head && response.status().is_success() {
            self.metrics.cluster_peer_streams_served.inc();
        }
        Ok(response)
    }
}
