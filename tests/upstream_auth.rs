//! Upstream token auth against scripted upstreams: a registry that demands bearer tokens, a token
//! realm on another port that issues short-lived tokens, and a "CDN" host that blobs redirect to.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::fake::{Fake, Scripted, Seen};
use common::{http_get, Gantry, Options, ACCEPT_ALL};
use http::StatusCode;
use sha2::Digest as _;

/// Tokens live long enough that no reuse check can see one expire, however slow the machine...
const TOKEN_LIFETIME_SECS: u64 = 300;
/// ...except for `team/short`, whose tokens expire for the refresh check.
const SHORT_TOKEN_LIFETIME_SECS: u64 = 1;
const BLOB: &[u8] = b"layer bytes served by the CDN";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Tokens carry their own scope and expiry: `tok:<n>:<scope>:<expires-ms>`.
fn token_is_valid(seen: &Seen, scope: &str) -> bool {
    let Some(token) = seen
        .authorization()
        .and_then(|a| a.strip_prefix("Bearer tok:").map(str::to_owned))
    else {
        return false;
    };
    let Some((rest, expires)) = token.rsplit_once(':') else {
        return false;
    };
    let Some((_, token_scope)) = rest.split_once(':') else {
        return false;
    };
    token_scope == scope && expires.parse::<u64>().is_ok_and(|e| e > now_ms())
}

fn manifest(tag: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(tag.as_bytes()), "size": 1},
        "layers": [],
    }))
    .unwrap()
}

struct Upstreams {
    realm: Fake,
    registry: Fake,
    cdn: Fake,
}

async fn start_upstreams() -> Upstreams {
    let issued = Arc::new(AtomicU64::new(0));
    let realm = Fake::start(move |seen| {
        let n = issued.fetch_add(1, Ordering::SeqCst);
        let scope = seen.query_param("scope").unwrap_or_default();
        let lifetime = if scope.contains("team/short") {
            SHORT_TOKEN_LIFETIME_SECS
        } else {
            TOKEN_LIFETIME_SECS
        };
        let expires = now_ms() + lifetime * 1000;
        Scripted::json(
            StatusCode::OK,
            serde_json::json!({"token": format!("tok:{n}:{scope}:{expires}"), "expires_in": lifetime}),
        )
    })
    .await;
    let cdn = Fake::start(|seen| {
        if seen.authorization().is_some() {
            return Scripted::new(StatusCode::BAD_REQUEST).body("two auth mechanisms");
        }
        Scripted::new(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .header("content-length", &BLOB.len().to_string())
            .body(BLOB)
    })
    .await;
    let (realm_url, cdn_url) = (realm.url(), cdn.url());
    let registry = Fake::start(move |seen| {
        let path = seen.uri.split('?').next().unwrap_or_default().to_owned();
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Scripted::new(StatusCode::NOT_FOUND);
        };
        let (repo, what) = match rest
            .split_once("/manifests/")
            .or_else(|| rest.split_once("/blobs/"))
        {
            Some(split) => split,
            None => return Scripted::new(StatusCode::NOT_FOUND),
        };
        // team/strict insists on a wider scope than a plain pull.
        let scope = if repo == "team/strict" {
            format!("repository:{repo}:pull,extra")
        } else {
            format!("repository:{repo}:pull")
        };
        if !token_is_valid(seen, &scope) {
            return Scripted::json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"errors": [{"code": "UNAUTHORIZED"}]}),
            )
            .header(
                "www-authenticate",
                &format!(
                    r#"Bearer realm="{realm_url}/token",service="fake-registry",scope="{scope}""#
                ),
            );
        }
        if path.contains("/blobs/") {
            return Scripted::new(StatusCode::TEMPORARY_REDIRECT)
                .header("location", &format!("{cdn_url}/signed/{what}?sig=abc"));
        }
        let body = manifest(what);
        Scripted::new(StatusCode::OK)
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .header("docker-content-digest", &digest_of(&body))
            .body(body)
    })
    .await;
    Upstreams {
        realm,
        registry,
        cdn,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_fetched_once_reused_refreshed_and_scoped() {
    let up = start_upstreams().await;
    // Prefetch off: the manifests' layers would go to the CDN before the blob request below,
    // which counts the CDN's requests.
    let options = Options {
        mirroring: "  username: mirror-user\n  password: _env:GANTRY_TEST_NEVER_SET:mirror-pass\n  public: true\n  prefetch: false",
        ..Options::default()
    };
    let gantry =
        Gantry::start_with(tempfile::tempdir().unwrap(), &up.registry.url(), options).await;
    let get_manifest = |repo: &str, tag: &str| {
        let url = gantry.url(&format!("/v2/{repo}/manifests/{tag}"));
        async move { http_get(&url, &[("accept", ACCEPT_ALL)]).await.unwrap() }
    };

    // First request: 401, one token, retried.
    assert_eq!(get_manifest("team/app", "v1").await.status, StatusCode::OK);
    let tokens = up.realm.seen();
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        tokens[0].query_param("scope").as_deref(),
        Some("repository:team/app:pull")
    );
    assert_eq!(
        tokens[0].query_param("service").as_deref(),
        Some("fake-registry")
    );
    let basic = tokens[0]
        .authorization()
        .expect("credentials sent to the realm");
    assert_eq!(
        basic,
        format!("Basic {}", base64_of("mirror-user:mirror-pass"))
    );

    // Same scope: the token is reused.
    assert_eq!(get_manifest("team/app", "v2").await.status, StatusCode::OK);
    assert_eq!(get_manifest("team/app", "v3").await.status, StatusCode::OK);
    assert_eq!(up.realm.seen().len(), 1, "one token for one scope");

    // A blob redirects to the CDN: the registry sees the token, the CDN never does.
    let digest = digest_of(BLOB);
    let blob = http_get(&gantry.url(&format!("/v2/team/app/blobs/{digest}")), &[])
        .await
        .unwrap();
    assert_eq!(blob.status, StatusCode::OK);
    assert_eq!(&blob.body[..], BLOB);
    let cdn_seen = up.cdn.seen();
    assert_eq!(cdn_seen.len(), 1);
    assert!(
        cdn_seen[0].authorization().is_none(),
        "no Authorization to the redirect host"
    );
    assert!(up
        .registry
        .seen()
        .iter()
        .any(|s| s.uri.contains("/blobs/") && s.authorization().is_some()));

    // A 401 naming a different scope gets a token for that scope.
    assert_eq!(
        get_manifest("team/strict", "v1").await.status,
        StatusCode::OK
    );
    let scopes: Vec<String> = up
        .realm
        .seen()
        .iter()
        .filter_map(|s| s.query_param("scope"))
        .collect();
    assert!(
        scopes.contains(&"repository:team/strict:pull,extra".to_owned()),
        "{scopes:?}"
    );

    // Once the token has expired, a new one is fetched before the request. gantry keeps a
    // token for less than its lifetime, so past the expiry stamped in the token it must be gone.
    assert_eq!(
        get_manifest("team/short", "v1").await.status,
        StatusCode::OK
    );
    let expires = token_expiry(&up.registry.seen(), "team/short");
    let before = up.realm.seen().len();
    let expired =
        common::wait_until(Duration::from_secs(10), || async { now_ms() > expires }).await;
    assert!(expired);
    up.registry.clear();
    assert_eq!(
        get_manifest("team/short", "v2").await.status,
        StatusCode::OK
    );
    assert_eq!(
        up.realm.seen().len(),
        before + 1,
        "the expired token was refreshed"
    );
    let registry_seen = up.registry.seen();
    assert_eq!(
        registry_seen.len(),
        1,
        "no 401 round trip with a known realm: {registry_seen:?}"
    );
    assert_ne!(
        token_expiry(&registry_seen, "team/short"),
        expires,
        "a new token"
    );
}

/// The expiry (ms since the epoch) of the last token the registry saw for `repo`.
fn token_expiry(seen: &[Seen], repo: &str) -> u64 {
    seen.iter()
        .rev()
        .filter_map(|s| s.authorization())
        .filter(|a| a.contains(&format!("repository:{repo}:")))
        .find_map(|a| a.rsplit_once(':')?.1.parse().ok())
        .unwrap_or_else(|| panic!("no token for {repo} in {seen:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_tokens_carry_no_credentials() {
    let up = start_upstreams().await;
    let gantry = Gantry::start(&up.registry.url()).await;
    let reply = http_get(
        &gantry.url("/v2/team/app/manifests/v1"),
        &[("accept", ACCEPT_ALL)],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let tokens = up.realm.seen();
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].authorization().is_none());
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A registry whose repositories each want the token `tok:repository:<repo>:pull` from `realm`.
async fn registry_with_realm(realm: &str) -> Fake {
    let realm = realm.to_owned();
    Fake::start(move |seen| {
        let path = seen.uri.split('?').next().unwrap_or_default();
        let Some((repo, tag)) = path
            .strip_prefix("/v2/")
            .and_then(|rest| rest.split_once("/manifests/"))
        else {
            return Scripted::new(StatusCode::NOT_FOUND);
        };
        let scope = format!("repository:{repo}:pull");
        if seen.authorization() != Some(format!("Bearer tok:{scope}")) {
            return Scripted::json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"errors": [{"code": "UNAUTHORIZED"}]}),
            )
            .header(
                "www-authenticate",
                &format!(r#"Bearer realm="{realm}",service="fake-registry",scope="{scope}""#),
            );
        }
        let body = manifest(tag);
        Scripted::new(StatusCode::OK)
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .header("docker-content-digest", &digest_of(&body))
            .body(body)
    })
    .await
}

/// Token fetches are single-flighted per scope, not per registry: while the realm holds the
/// answer for one repository, another repository's token is fetched and its pull served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_token_fetch_does_not_hold_up_another_repository() {
    let realm = common::realm::HoldingRealm::start("team/held").await;
    let registry = registry_with_realm(&realm.url()).await;
    let gantry = Gantry::start(&registry.url()).await;
    let get_manifest = |repo: &str| {
        let url = gantry.url(&format!("/v2/{repo}/manifests/v1"));
        async move { http_get(&url, &[("accept", ACCEPT_ALL)]).await.unwrap() }
    };
    let held = tokio::spawn(get_manifest("team/held"));
    let holding = common::wait_until(Duration::from_secs(10), || async { realm.held() == 1 }).await;
    assert!(holding, "the realm holds team/held's token request");
    let other = tokio::time::timeout(Duration::from_secs(10), get_manifest("team/app"))
        .await
        .expect("team/app is served while team/held's token is held");
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(realm.held(), 1, "team/held's token is still held");
    realm.release();
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
    assert_eq!(realm.asked("repository:team/held:pull"), 1);
    assert_eq!(realm.asked("repository:team/app:pull"), 1);
}

/// Concurrent requests for one scope share one token request. On this single-threaded runtime
/// `join_all` polls every request once before any I/O completes, so all of them are waiting for
/// a token together.
#[tokio::test]
async fn concurrent_requests_for_one_scope_make_one_token_request() {
    use gantry::upstream::{CredentialSource, Pool, Timeouts, Upstream, UpstreamRequest};
    const REQUESTS: usize = 8;
    let realm = common::realm::HoldingRealm::start("nothing is held").await;
    let registry = registry_with_realm(&realm.url()).await;
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        first_byte: Duration::from_secs(10),
        idle: Duration::from_secs(10),
    };
    let upstream = Upstream::new(
        "fake".into(),
        gantry::config::BaseUrl::parse(&registry.url()).unwrap(),
        CredentialSource::None,
        Vec::new(),
        Pool::new(timeouts, Arc::new(gantry::metrics::Metrics::new())),
    );
    let request = |repo: &str| {
        UpstreamRequest::new(http::Method::GET, repo, format!("/v2/{repo}/manifests/v1"))
    };
    // Another repository first, so the realm is known and the requests ask for their token
    // before their first request to the registry.
    let warm = upstream.send(&request("team/warm")).await.unwrap();
    assert_eq!(warm.status(), StatusCode::OK);
    let one = request("team/one");
    let responses =
        futures_util::future::join_all((0..REQUESTS).map(|_| upstream.send(&one))).await;
    for response in responses {
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        realm.asked("repository:team/one:pull"),
        1,
        "{REQUESTS} concurrent requests, one token request"
    );
}
