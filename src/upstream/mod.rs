//! How to talk to an upstream registry: one pooled hyper client (rustls for https), connect /
//! first-byte / idle timeouts, token and Basic authentication, and redirects followed without
//! leaking `Authorization` to another host.
//!
//! This module knows *how* to fetch; whether to fetch at all is the mirror's decision.

mod address;
mod auth;
mod credentials;
mod ratelimit;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT, AUTHORIZATION, LOCATION, USER_AGENT, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use address::Connector;
pub use address::{classify, AddressClass, AddressPolicy, AddressRefused};
pub use auth::{Challenge, Credentials};
use auth::{TokenCache, TokenResponse};
pub use credentials::{CredentialError, CredentialSource};
pub use ratelimit::{Observed as ObservedRateLimit, RateLimit};

use crate::config::BaseUrl;
use crate::metrics::Metrics;
use crate::single_flight::SingleFlight;

const MAX_REDIRECTS: usize = 5;
/// Token responses are small JSON documents; anything bigger is not a token.
const MAX_TOKEN_RESPONSE: usize = 64 << 10;
const USER_AGENT_VALUE: &str = concat!("gantry/", env!("CARGO_PKG_VERSION"));

type HttpClient = Client<HttpsConnector<Connector>, Empty<Bytes>>;

/// Cloneable (sources behind `Arc`), so callers that shared one token fetch each get its error.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach {registry}: {source}")]
    Connect {
        registry: String,
        #[source]
        source: Arc<hyper_util::client::legacy::Error>,
    },
    #[error("{registry} sent no response within {after:?}")]
    Timeout { registry: String, after: Duration },
    #[error("{registry}: the body stalled for {after:?}")]
    Stalled { registry: String, after: Duration },
    #[error("{registry}: the body broke off: {source}")]
    Body {
        registry: String,
        #[source]
        source: Arc<hyper::Error>,
    },
    #[error("{registry}: the body is larger than {limit} bytes")]
    TooLarge { registry: String, limit: usize },
    #[error("{registry}: token realm {realm} failed: {reason}")]
    Token {
        registry: String,
        realm: String,
        reason: String,
    },
    #[error("{registry}: {reason}")]
    Redirect { registry: String, reason: String },
    /// The address policy refused to connect (a registry a client named resolved to a
    /// non-public address): the client's request is at fault, not the upstream.
    #[error("{registry}: {source}")]
    Refused {
        registry: String,
        #[source]
        source: AddressRefused,
    },
}

/// A request to an upstream: always body-less, so it can be re-sent after a challenge or redirect.
#[derive(Clone, Debug)]
pub struct UpstreamRequest {
    pub method: Method,
    /// Path and query, e.g. `/v2/library/alpine/manifests/latest`.
    pub path: String,
    /// The token scope, e.g. `repository:library/alpine:pull`.
    pub scope: String,
    pub accept: Option<HeaderValue>,
    /// `Range: bytes=N-`: a blob download resumed at byte N (kept across redirects).
    pub range_from: Option<u64>,
}

impl UpstreamRequest {
    pub fn new(method: Method, repository: &str, path: String) -> Self {
        Self {
            method,
            path,
            scope: format!("repository:{repository}:pull"),
            accept: None,
            range_from: None,
        }
    }
}

/// Timeouts that apply to every upstream exchange.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
}

/// The shared connection pool; one per process, cloned cheaply into every [`Upstream`].
#[derive(Clone)]
pub struct Pool {
    client: HttpClient,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
}

impl Pool {
    /// The pool of configured registries: every address they resolve to is trusted.
    pub fn new(timeouts: Timeouts, metrics: Arc<Metrics>) -> Self {
        Self::build(timeouts, metrics, None)
    }

    /// A pool over the same settings whose connections go only where `policy` allows (for
    /// registries named by clients; see [`address`]).
    pub fn checked(&self, policy: AddressPolicy) -> Self {
        Self::build(self.timeouts, Arc::clone(&self.metrics), Some(policy))
    }

    fn build(timeouts: Timeouts, metrics: Arc<Metrics>, policy: Option<AddressPolicy>) -> Self {
        let mut connector = Connector::new(policy);
        let http = connector.inner_mut();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeouts.connect));
        http.set_nodelay(true);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_root_certificates(root_certificates())
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .build(https);
        Self {
            client,
            timeouts,
            metrics,
        }
    }
}

/// Mozilla's roots (webpki-roots) plus the system's, so both public registries and on-prem ones
/// signed by a corporate CA in the system store are trusted.
fn root_certificates() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipped a system certificate store");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "loaded system root certificates");
    roots
}

/// One upstream registry: its base URL, credentials and token cache over the shared pool.
pub struct Upstream {
    name: String,
    base: BaseUrl,
    credentials: CredentialSource,
    /// Token realms on other hosts trusted with the credentials (URL prefixes).
    token_realms: Vec<String>,
    pool: Pool,
    tokens: TokenCache,
    /// The last Bearer challenge seen, so a token for a new scope is fetched before the first
    /// request instead of after a 401 round trip.
    challenge: Mutex<Option<Challenge>>,
    /// One token fetch per scope at a time: concurrent cold pulls of a repository share its token
    /// instead of each asking, and pulls of other repositories do not wait for it.
    token_fetches: SingleFlight<TokenKey, Result<HeaderValue, UpstreamError>>,
    /// The latest rate limit it announced (see [`ratelimit`]).
    rate_limit: ratelimit::Latest,
    /// Until when no manifest request is sent, after a 429 (see [`ratelimit`]).
    hold_off: ratelimit::HoldOff,
    /// `offline`: nothing is ever sent (the check is in `mirror::send`, the one way out).
    offline: bool,
}

/// What a token is fetched for: the realm and service asked, the scope asked (the one the
/// registry named) and the scope it is cached under.
type TokenKey = (String, Option<String>, String, String);

impl Upstream {
    pub fn new(
        name: String,
        base: BaseUrl,
        credentials: CredentialSource,
        token_realms: Vec<String>,
        pool: Pool,
    ) -> Self {
        Self {
            name,
            base,
            credentials,
            token_realms,
            pool,
            tokens: TokenCache::default(),
            challenge: Mutex::new(None),
            token_fetches: SingleFlight::new(),
            rate_limit: ratelimit::Latest::default(),
            hold_off: ratelimit::HoldOff::default(),
            offline: false,
        }
    }

    /// This upstream under `offline` (when `offline` is true): it is never contacted.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Whether this upstream must never be contacted (`offline`).
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The registry's name in logs, metrics and cache keys.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `request`, answering an authentication challenge and following redirects. When
    /// fresh credentials are rejected too and they come from a helper, the helper is asked again
    /// once (expired ECR tokens).
    pub async fn send(
        &self,
        request: &UpstreamRequest,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut authorization = self
            .cached_or_prefetched_authorization(&request.scope)
            .await?;
        let mut response = self
            .send_following_redirects(request, authorization.clone())
            .await?;
        for attempt in 0..2 {
            if response.status() != StatusCode::UNAUTHORIZED {
                break;
            }
            let Some(challenge) = Challenge::parse(response.headers().get_all(WWW_AUTHENTICATE))
            else {
                break;
            };
            // A rejected token is forgotten; the challenge says how to get a new one, and for
            // which scope (a registry may want more than the repository's pull scope).
            if authorization.is_some() {
                self.tokens.remove(&request.scope);
            }
            if attempt == 1 && !self.credentials.invalidate().await {
                break;
            }
            authorization = match self.authorize(&challenge, &request.scope).await {
                Ok(Some(authorization)) => Some(authorization),
                Ok(None) => break,
                Err(error) if attempt == 0 && self.credentials.invalidate().await => {
                    tracing::debug!(%error, "token request failed; asking the credential helper again");
                    self.authorize(&challenge, &request.scope).await?
                }
                Err(error) => return Err(error),
            };
            if authorization.is_none() {
                break;
            }
            response = self
                .send_following_redirects(request, authorization.clone())
                .await?;
        }
        Ok(response)
    }

    async fn cached_or_prefetched_authorization(
        &self,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        if let Some(token) = self.tokens.get(scope) {
            return Ok(Some(token));
        }
        let known = self
            .challenge
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match known {
            Some(challenge) => self.authorize(&challenge, scope).await,
            None => Ok(None),
        }
    }

    /// Turns a challenge into an `Authorization` value for `scope`, or `None` when there is
    /// nothing to answer it with (Basic without credentials).
    async fn authorize(
        &self,
        challenge: &Challenge,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        match challenge {
            Challenge::Basic => Ok(self.credentials.get().await.map(|c| c.basic_header())),
            Challenge::Bearer {
                realm,
                service,
                scope: wanted,
            } => {
                *self.challenge.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Challenge::Bearer {
                        realm: realm.clone(),
                        service: service.clone(),
                        scope: None,
                    });
                if let Some(token) = self.tokens.get(scope) {
                    return Ok(Some(token));
                }
                // The token is cached under our scope, but asked for with the one the registry named.
                let asked = wanted.as_deref().unwrap_or(scope);
                let key = (
                    realm.clone(),
                    service.clone(),
                    asked.to_owned(),
                    scope.to_owned(),
                );
                let fetch = || async {
                    let (value, lifetime) =
                        self.fetch_token(realm, service.as_deref(), asked).await?;
                    // Cached before the flight ends, so a caller arriving after it finds the token.
                    self.tokens.insert(scope, value.clone(), lifetime);
                    Ok(value)
                };
                self.token_fetches.run(key, fetch).await.value.map(Some)
            }
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(HeaderValue, Duration), UpstreamError> {
        let token_error = |reason: String| UpstreamError::Token {
            registry: self.name.clone(),
            realm: realm.to_owned(),
            reason,
        };
        let mut url = realm.to_owned();
        let mut separator = if realm.contains('?') { '&' } else { '?' };
        for (key, value) in [("service", service), ("scope", Some(scope))] {
            if let Some(value) = value {
                url.push(separator);
                url.push_str(key);
                url.push('=');
                url.push_str(&encode_query_value(value));
                separator = '&';
            }
        }
        let uri: Uri = url
            .parse()
            .map_err(|_| token_error("the realm is not a URL".into()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(token_error("the realm is not an http(s) URL".into()));
        }
        let mut builder = Request::get(uri.clone()).header(USER_AGENT, USER_AGENT_VALUE);
        if self.credentials.is_some() {
            if self.realm_is_trusted(&uri) {
                if let Some(credentials) = self.credentials.get().await {
                    builder = builder.header(AUTHORIZATION, credentials.basic_header());
                }
            } else {
                tracing::warn!(registry = %self.name, %realm, "the token realm is not trusted with this registry's credentials (see token_realms); asking anonymously");
            }
        }
        let request = builder
            .body(Empty::new())
            .map_err(|e| token_error(e.to_string()))?;
        let response = self.exchange(request, "token").await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect_limited(MAX_TOKEN_RESPONSE)
            .await?;
        if !status.is_success() {
            return Err(token_error(format!("answered {status}")));
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| token_error(format!("unreadable token response: {e}")))?;
        tracing::debug!(registry = %self.name, %scope, "fetched an upstream token");
        parsed
            .into_authorization()
            .ok_or_else(|| token_error("the response has no token".into()))
    }

    /// Whether a token realm may receive this registry's credentials: the registry's own host, a
    /// host under the same parent domain over https (auth.docker.io for registry-1.docker.io), or a
    /// realm listed in `token_realms`. A hostile upstream cannot harvest them with a crafted realm.
    fn realm_is_trusted(&self, realm: &Uri) -> bool {
        let Some(host) = realm.host() else {
            return false;
        };
        if host == self.base.host() {
            return true;
        }
        let https = realm.scheme_str() == Some("https");
        let listed = self
            .token_realms
            .iter()
            .any(|listed| realm_is_listed(listed, realm));
        listed || (https && same_parent_domain(host, self.base.host()))
    }

    async fn send_following_redirects(
        &self,
        request: &UpstreamRequest,
        authorization: Option<HeaderValue>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut uri: Uri = format!("{}{}", self.base.origin(), request.path)
            .parse()
            .map_err(|_| self.redirect_error("the request path is not a valid URL"))?;
        for _ in 0..=MAX_REDIRECTS {
            let same_origin =
                uri.scheme() == self.base.0.scheme() && uri.authority() == self.base.0.authority();
            let mut builder = Request::builder()
                .method(request.method.clone())
                .uri(uri.clone())
                .header(USER_AGENT, USER_AGENT_VALUE);
            if let Some(accept) = &request.accept {
                builder = builder.header(ACCEPT, accept);
            }
            if let Some(offset) = request.range_from {
                builder = builder.header(http::header::RANGE, format!("bytes={offset}-"));
            }
            // Signed CDN URLs reject a second auth mechanism, and another host must never see our token.
            if let (Some(authorization), true) = (&authorization, same_origin) {
                builder = builder.header(AUTHORIZATION, authorization);
            }
            let outgoing = builder
                .body(Empty::new())
                .map_err(|_| self.redirect_error("cannot build the request"))?;
            let route = if same_origin { "registry" } else { "redirect" };
            let response = self.exchange(outgoing, route).await?;
            if !response.status().is_redirection() || response.status() == StatusCode::NOT_MODIFIED
            {
                return Ok(response);
            }
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| self.redirect_error("a redirect without Location"))?;
            uri = resolve_location(&uri, location)
                .ok_or_else(|| self.redirect_error("a redirect to an invalid URL"))?;
            // Signed redirect URLs are credentials of a kind: log the host only.
            tracing::debug!(registry = %self.name, host = uri.host().unwrap_or("-"), "following a redirect");
        }
        Err(self.redirect_error("too many redirects"))
    }

    /// One HTTP exchange with the first-byte timeout, counted in the metrics.
    async fn exchange(
        &self,
        request: Request<Empty<Bytes>>,
        route: &str,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let method = request.method().clone();
        let timer = std::time::Instant::now();
        let result = tokio::time::timeout(
            self.pool.timeouts.first_byte,
            self.pool.client.request(request),
        )
        .await;
        let outcome = match result {
            Err(_) => Err(UpstreamError::Timeout {
                registry: self.name.clone(),
                after: self.pool.timeouts.first_byte,
            }),
            Ok(Err(source)) => match address::refusal(&source) {
                Some(refused) => {
                    self.pool
                        .metrics
                        .outbound_refused
                        .with_label_values(&[refused.class.as_str()])
                        .inc();
                    tracing::warn!(registry = %self.name, error = %refused, "refused to connect");
                    Err(UpstreamError::Refused {
                        registry: self.name.clone(),
                        source: refused.clone(),
                    })
                }
                None => Err(UpstreamError::Connect {
                    registry: self.name.clone(),
                    source: Arc::new(source),
                }),
            },
            Ok(Ok(response)) => Ok(response),
        };
        let status = match &outcome {
            Ok(response) => response.status().as_str().to_owned(),
            Err(_) => "error".to_owned(),
        };
        self.pool.metrics.upstream_request(
            &self.name,
            method.as_str(),
            route,
            &status,
            timer.elapsed(),
        );
        let response = outcome?;
        Ok(response.map(|inner| UpstreamBody {
            inner,
            registry: self.name.clone(),
            idle: self.pool.timeouts.idle,
        }))
    }

    fn redirect_error(&self, reason: &str) -> UpstreamError {
        UpstreamError::Redirect {
            registry: self.name.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// An upstream response body, read chunk by chunk with an idle timeout.
pub struct UpstreamBody {
    inner: Incoming,
    registry: String,
    idle: Duration,
}

impl UpstreamBody {
    /// The next data chunk, `None` at the end; trailers are skipped.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            let frame = tokio::time::timeout(self.idle, self.inner.frame())
                .await
                .map_err(|_| UpstreamError::Stalled {
                    registry: self.registry.clone(),
                    after: self.idle,
                })?;
            match frame {
                None => return Ok(None),
                Some(Err(source)) => {
                    return Err(UpstreamError::Body {
                        registry: self.registry.clone(),
                        source: Arc::new(source),
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The whole body, for small documents only (manifests, tag lists, tokens).
    pub async fn collect_limited(mut self, limit: usize) -> Result<Bytes, UpstreamError> {
        let mut collected = BytesMut::new();
        while let Some(chunk) = self.chunk().await? {
            if collected.len() + chunk.len() > limit {
                return Err(UpstreamError::TooLarge {
                    registry: self.registry,
                    limit,
                });
            }
            collected.extend_from_slice(&chunk);
        }
        Ok(collected.freeze())
    }
}

/// Resolves a `Location` value against the URL that answered with it.
fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().ok();
    }
    if location.starts_with("//") {
        return format!("{}:{location}", base.scheme_str()?).parse().ok();
    }
    if location.starts_with('/') {
        return Uri::builder()
            .scheme(base.scheme()?.clone())
            .authority(base.authority()?.clone())
            .path_and_query(location)
            .build()
            .ok();
    }
    None
}

/// A `token_realms` entry names an origin exactly and, optionally, a path prefix: a plain text
/// prefix would let `https://auth.example` also trust `https://auth.example.evil/`.
fn realm_is_listed(listed: &str, realm: &Uri) -> bool {
    let Ok(listed) = listed.parse::<Uri>() else {
        return false;
    };
    let same_origin = listed.scheme() == realm.scheme()
        && listed
            .authority()
            .zip(realm.authority())
            .is_some_and(|(a, b)| a.as_str().eq_ignore_ascii_case(b.as_str()));
    let prefix = listed.path().trim_end_matches('/');
    let path = realm.path();
    same_origin
        && (prefix.is_empty()
            || path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/')))
}

/// `auth.docker.io` and `registry-1.docker.io` share `docker.io`; IP addresses share nothing.
fn same_parent_domain(a: &str, b: &str) -> bool {
    let parent = |host: &str| -> Option<String> {
        if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
            return None;
        }
        let labels: Vec<&str> = host.split('.').collect();
        (labels.len() >= 2).then(|| labels[labels.len() - 2..].join("."))
    };
    matches!((parent(a), parent(b)), (Some(x), Some(y)) if x == y)
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay as they are).
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_absolute_and_relative_locations() {
        let base: Uri = "https://registry.example/v2/a/blobs/sha256:x"
            .parse()
            .unwrap();
        assert_eq!(
            resolve_location(&base, "https://cdn.example/x?sig=1")
                .unwrap()
                .to_string(),
            "https://cdn.example/x?sig=1"
        );
        assert_eq!(
            resolve_location(&base, "/other/path?q=1")
                .unwrap()
                .to_string(),
            "https://registry.example/other/path?q=1"
        );
        assert_eq!(
            resolve_location(&base, "//cdn.example/y")
                .unwrap()
                .to_string(),
            "https://cdn.example/y"
        );
        assert!(resolve_location(&base, "relative").is_none());
    }

    #[test]
    fn listed_realms_match_by_origin_then_path() {
        let realm = |text: &str| text.parse::<Uri>().unwrap();
        assert!(realm_is_listed(
            "https://auth.example",
            &realm("https://auth.example/token")
        ));
        assert!(realm_is_listed(
            "https://auth.example/",
            &realm("https://AUTH.example/token?x=1")
        ));
        assert!(realm_is_listed(
            "https://auth.example/v2",
            &realm("https://auth.example/v2/token")
        ));
        assert!(realm_is_listed(
            "https://auth.example/v2/token",
            &realm("https://auth.example/v2/token")
        ));
        for other in [
            "https://auth.example.evil/token",
            "https://auth.example:8443/token",
            "http://auth.example/token",
            "https://auth.example/v2token",
            "https://evil.example/https://auth.example",
        ] {
            assert!(
                !realm_is_listed("https://auth.example/v2", &realm(other)),
                "{other}"
            );
        }
        assert!(!realm_is_listed(
            "https://auth.example",
            &realm("https://auth.example.evil/")
        ));
    }

    #[test]
    fn parent_domains() {
        assert!(same_parent_domain("auth.docker.io", "registry-1.docker.io"));
        assert!(same_parent_domain("gitlab.com", "registry.gitlab.com"));
        assert!(!same_parent_domain("evil.example", "registry.gitlab.com"));
        assert!(!same_parent_domain("127.0.0.2", "127.0.0.1"));
        assert!(!same_parent_domain("localhost", "localhost"));
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            encode_query_value("repository:library/alpine:pull,push"),
            "repository%3Alibrary%2Falpine%3Apull%2Cpush"
        );
    }
}
