//! Reading a blob from the replica that owns its download: the client side of the peer route.
//!
//! The owner serves its store's file or its running download on
//! `GET {advertise_url}/_gantry/cluster/v1/blobs/<digest>` (the same body a client's blob GET
//! gets: it follows the growing file and ends only after the digest verified). A follower opens
//! it here, from an offset when it already holds a prefix, and writes and verifies the bytes
//! itself, as from any origin: a peer is trusted with no byte more than the upstream is.
//!
//! Plain http on the cluster network, one small pooled client, and short timeouts: a peer is on
//! the same network and either answers at once or is gone, and a follower that gives up on it
//! still has the upstream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::Stream;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::PEER_BLOBS_PATH;
use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::oci::Digest;

/// Dialing a peer on the cluster network.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// From the request to the response headers: the owner answers from its store or its flight's
/// state, never from an upstream, so this covers a busy replica, not a slow registry.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest pause between two chunks. The owner sends as its own download receives, so this
/// also bounds how long a stalled upstream of the owner keeps its followers waiting.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer address `{0}` is not a plain http URL")]
    Url(String),
    #[error("cannot reach the peer: {0}")]
    Connect(#[source] hyper_util::client::legacy::Error),
    #[error("the peer did not answer within {0:?}")]
    FirstByte(Duration),
    #[error("the peer refused this replica's cluster secret")]
    Unauthorized,
    #[error("the peer answered {0}")]
    Status(StatusCode),
    #[error("the peer answered a range that was not asked for: {0}")]
    Range(String),
    #[error("the peer's body broke off: {0}")]
    Body(#[source] hyper::Error),
    #[error("the peer sent nothing for {0:?}")]
    Idle(Duration),
    #[error("the peer's body ended before the offset asked for")]
    Short,
}

/// A peer's answer for a blob it holds or is downloading.
pub struct PeerRead {
    /// The whole blob's size, when the peer knows it.
    pub size: Option<u64>,
    /// The bytes from the offset asked for to the end, ending only once the peer verified them.
    pub chunks: Pin<Box<dyn Stream<Item = Result<Bytes, PeerError>> + Send>>,
}

/// The client for other replicas' peer routes.
pub struct Peers {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// `Bearer <cluster.secret>`, marked sensitive.
    authorization: HeaderValue,
    first_byte: Duration,
    idle: Duration,
    metrics: Arc<Metrics>,
}

impl Peers {
    pub fn new(cluster: &ClusterConfig, metrics: Arc<Metrics>) -> Self {
        Self::with_secret(cluster.secret.expose(), metrics)
    }

    /// A client that proves itself with `secret`, with the module's timeouts.
    pub fn with_secret(secret: &str, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            .build(connector);
        // The configuration admits only secrets that make a header value; anything else gets a
        // header no peer accepts (401: the follower goes upstream), not a panic.
        let mut authorization = HeaderValue::from_str(&format!("Bearer {secret}"))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
        authorization.set_sensitive(true);
        Self {
            client,
            authorization,
            first_byte: FIRST_BYTE_TIMEOUT,
            idle: IDLE_TIMEOUT,
            metrics,
        }
    }

    /// Opens `digest` on the replica at `owner_url` from byte `offset`. `Ok(None)`: the peer
    /// holds no such blob and is not downloading it (its download ended, or it is another
    /// process at that address now).
    pub async fn open(
        &self,
        owner_url: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Option<PeerRead>, PeerError> {
        let base = owner_url.trim_end_matches('/');
        let uri: Uri = format!("{base}{PEER_BLOBS_PATH}{digest}")
            .parse()
            .map_err(|_| PeerError::Url(owner_url.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(PeerError::Url(owner_url.to_owned()));
        }
        let mut request = Request::get(uri).header(AUTHORIZATION, self.authorization.clone());
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let request = request
            .body(Empty::new())
            .map_err(|_| PeerError::Url(owner_url.to_owned()))?;
        let response = tokio::time::timeout(self.first_byte, self.client.request(request))
            .await
            .map_err(|_| PeerError::FirstByte(self.first_byte))?
            .map_err(PeerError::Connect)?;
        let (size, skip) = match response.status() {
            StatusCode::NOT_FOUND => return Ok(None),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(PeerError::Unauthorized)
            }
            StatusCode::OK => (length(response.headers()), offset),
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                (Some(checked_range(response.headers(), offset)?), 0)
            }
            status => return Err(PeerError::Status(status)),
        };
        if size.is_some_and(|size| skip > size) {
            return Err(PeerError::Short);
        }
        self.metrics.cluster_peer_streams_followed.inc();
        let reading = Reading {
            body: response.into_body(),
            skip,
            idle: self.idle,
        };
        let chunks = futures_util::stream::try_unfold(reading, |mut reading| async move {
            Ok(reading.next().await?.map(|chunk| (chunk, reading)))
        });
        Ok(Some(PeerRead {
            size,
            chunks: Box::pin(chunks),
        }))
    }
}

fn length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The whole blob's size from a 206's `Content-Range: bytes <offset>-<size - 1>/<size>`, which
/// must start at `offset` and run to the end, as asked.
fn checked_range(headers: &HeaderMap, offset: u64) -> Result<u64, PeerError> {
    let text = headers
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let bad = || PeerError::Range(text.to_owned());
    let (span, size) = text
        .strip_prefix("bytes ")
        .and_then(|rest| rest.split_once('/'))
        .ok_or_else(bad)?;
    let (start, last) = span.split_once('-').ok_or_else(bad)?;
    let parse = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    let (start, last, size) = (parse(start)?, parse(last)?, parse(size)?);
    if start != offset || last.checked_add(1) != Some(size) {
        return Err(bad());
    }
    Ok(size)
}

/// A peer's body: each chunk within the idle timeout, the first `skip` bytes dropped (a 200
/// answering a request from an offset).
struct Reading {
    body: Incoming,
    skip: u64,
    idle: Duration,
}

impl Reading {
    async fn next(&mut self) -> Result<Option<Bytes>, PeerError> {
        loop {
            let frame = match tokio::time::timeout(self.idle, self.body.frame()).await {
                Err(_) => return Err(PeerError::Idle(self.idle)),
                Ok(None) if self.skip > 0 => return Err(PeerError::Short),
                Ok(None) => return Ok(None),
                Ok(Some(frame)) => frame.map_err(PeerError::Body)?,
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if self.skip > 0 {
                let skipped = self.skip.min(data.len() as u64);
                data.advance(skipped as usize);
                self.skip -= skipped;
            }
            if !data.is_empty() {
                return Ok(Some(data));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_RANGE, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn a_partial_answer_must_be_the_tail_asked_for() {
        assert_eq!(checked_range(&range("bytes 5-9/10"), 5).unwrap(), 10);
        for wrong in [
            "bytes 4-9/10",
            "bytes 5-8/10",
            "bytes 5-9/*",
            "bytes */10",
            "5-9/10",
        ] {
            assert!(checked_range(&range(wrong), 5).is_err(), "{wrong}");
        }
        assert!(checked_range(&HeaderMap::new(), 5).is_err());
    }
}
