//! Safe on a hostile network: TLS on the client listener (HTTP/2 by ALPN, reload on SIGHUP),
//! htpasswd client authentication with per-repository rules.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::process::GantryProcess;
use common::{
    file_digest, http_get, require_tools, skopeo_output, Fixture, Gantry, Options, ACCEPT_ALL,
};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A test CA and a server certificate it signed, in `dir/name/`: (ca.pem, cert.pem, key.pem).
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let own = dir.join(name);
    std::fs::create_dir_all(&own).unwrap();
    common::clients::test_certificate(&own)
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

/// A client that trusts only `ca`.
fn https_client(ca: &Path) -> HttpsClient {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_all_versions()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn https_get(
    client: &HttpsClient,
    url: &str,
    authorization: Option<&str>,
) -> Result<(StatusCode, http::Version, http::HeaderMap), String> {
    let mut builder = http::Request::get(url).header("accept", ACCEPT_ALL);
    if let Some(authorization) = authorization {
        builder = builder.header("authorization", authorization);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(builder.body(Empty::new()).unwrap()),
    )
    .await
    .map_err(|_| "timeout".to_owned())?
    .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = response.into_parts();
    body.collect().await.map_err(|e| e.to_string())?;
    Ok((parts.status, parts.version, parts.headers))
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn htpasswd(dir: &Path) -> PathBuf {
    let path = dir.join("htpasswd");
    let alice = bcrypt::hash("alice-pw", 5).unwrap();
    let bob = bcrypt::hash("bob-pw", 5).unwrap();
    std::fs::write(&path, format!("alice:{alice}\nbob:{bob}\n")).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_htpasswd_and_per_repository_rules() {
    if !require_tools(&["docker-registry", "skopeo", "openssl"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(certs.path(), "gantry");
    let users = htpasswd(certs.path());
    let extra = format!(
        "tls:\n  cert: {}\n  key: {}\nauth:\n  htpasswd: {}\n  anonymous_pull: true\n  rules:\n    - repositories: [\"*/test/multi\"]\n      users: [alice, anonymous]\n    - repositories: [\"*/test/index\"]\n      users: [alice]\n",
        cert.display(),
        key.display(),
        users.display()
    );
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    let gantry = Gantry::start_with(dir, &fixture.proxy.url(), options).await;
    let base = format!(
        "https://localhost:{}",
        gantry.running.as_ref().unwrap().addr.port()
    );
    let client = https_client(&ca);

    // The ping challenges anyone without credentials, so clients learn to send them.
    let (status, version, headers) = https_get(&client, &format!("{base}/v2/"), None)
        .await
        .unwrap();
    assert_eq!(
        (status, version),
        (StatusCode::UNAUTHORIZED, http::Version::HTTP_2),
        "h2 by ALPN"
    );
    assert_eq!(
        headers.get("www-authenticate").unwrap(),
        "Basic realm=\"gantry\""
    );
    let alice = basic("alice", "alice-pw");
    assert_eq!(
        https_get(&client, &format!("{base}/v2/"), Some(&alice))
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );
    let multi = format!("{base}/v2/test/multi/manifests/v1");
    let index = format!("{base}/v2/test/index/manifests/idx");
    assert_eq!(
        https_get(&client, &multi, None).await.unwrap().0,
        StatusCode::OK,
        "anonymous may pull test/multi"
    );
    let (status, _, headers) = https_get(&client, &index, None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        headers.get("www-authenticate").unwrap(),
        "Basic realm=\"gantry\""
    );
    let bob = basic("bob", "bob-pw");
    let (status, _, _) = https_get(&client, &index, Some(&bob)).await.unwrap();
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a known user without access is denied"
    );
    let wrong = basic("alice", "not-her-password");
    assert_eq!(
        https_get(&client, &index, Some(&wrong)).await.unwrap().0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        https_get(&client, &index, Some(&basic("alice", "alice-pw")))
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );
    // Plain HTTP on the TLS port gets nowhere.
    let plain = http_get(
        &format!(
            "http://127.0.0.1:{}/v2/",
            gantry.running.as_ref().unwrap().addr.port()
        ),
        &[],
    )
    .await;
    assert!(plain
        .map(|reply| !reply.status.is_success())
        .unwrap_or(true));

    // skopeo over TLS with the CA and alice's credentials pulls the restricted image; bob cannot.
    let cert_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&ca, cert_dir.path().join("ca.crt")).unwrap();
    let cert_arg = format!("--src-cert-dir={}", cert_dir.path().display());
    let reference = format!(
        "docker://localhost:{}/test/index:idx",
        gantry.running.as_ref().unwrap().addr.port()
    );
    let out = tempfile::tempdir().unwrap();
    let target = format!("dir:{}", out.path().join("image").display());
    let (ok, text) = skopeo_output(&[
        "copy",
        "--all",
        &cert_arg,
        "--src-creds=alice:alice-pw",
        &reference,
        &target,
    ])
    .await;
    assert!(ok, "{text}");
    assert_eq!(
        file_digest(&out.path().join("image/manifest.json")),
        fixture.index_digest
    );
    let denied_out = tempfile::tempdir().unwrap();
    let denied_target = format!("dir:{}", denied_out.path().join("image").display());
    let (ok, text) = skopeo_output(&[
        "copy",
        &cert_arg,
        "--src-creds=bob:bob-pw",
        &reference,
        &denied_target,
    ])
    .await;
    assert!(!ok, "bob must not pull test/index: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let upstream =
        common::fake::Fake::start(|_| common::fake::Scripted::new(StatusCode::NOT_FOUND)).await;
    let dir = tempfile::tempdir().unwrap();
    let (first_ca, first_cert, first_key) = certificate(dir.path(), "first");
    let (second_ca, second_cert, second_key) = certificate(dir.path(), "second");
    let (live_cert, live_key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&first_cert, &live_cert).unwrap();
    std::fs::copy(&first_key, &live_key).unwrap();
    let extra = format!(
        "tls:\n  cert: {}\n  key: {}\n",
        live_cert.display(),
        live_key.display()
    );
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    let mut gantry = GantryProcess::configure(dir.path(), &upstream.url(), options);
    gantry.spawn();
    let port = gantry.port;
    let url = format!("https://localhost:{port}/v2/");
    let trusts_first = https_client(&first_ca);
    let trusts_second = https_client(&second_ca);
    let up = common::wait_until(Duration::from_secs(20), || async {
        https_get(&trusts_first, &url, None).await.is_ok()
    })
    .await;
    assert!(up, "gantry serves the first certificate");
    assert!(https_get(&trusts_second, &url, None).await.is_err());

    std::fs::copy(&second_cert, &live_cert).unwrap();
    std::fs::copy(&second_key, &live_key).unwrap();
    gantry.signal("HUP");
    let reloaded = common::wait_until(Duration::from_secs(10), || async {
        https_get(&trusts_second, &url, None).await.is_ok()
    })
    .await;
    assert!(reloaded, "new connections get the second certificate");
    // The connection made before the reload (pooled by the first client) still works.
    assert_eq!(
        https_get(&trusts_first, &url, None).await.unwrap().0,
        StatusCode::OK
    );
}

/// SIGHUP re-reads the htpasswd file: added users get in, removed users and changed passwords
/// are refused at once (remembered checks are forgotten), and a broken file changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_htpasswd_file() {
    let upstream =
        common::fake::Fake::start(|_| common::fake::Scripted::new(StatusCode::NOT_FOUND)).await;
    let dir = tempfile::tempdir().unwrap();
    let users = htpasswd(dir.path());
    let extra = format!("auth:\n  htpasswd: {}\n", users.display());
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    let mut gantry = GantryProcess::configure(dir.path(), &upstream.url(), options);
    gantry.start().await;
    let url = gantry.url("/v2/");
    let status = |user: &'static str, password: &'static str| {
        let url = url.clone();
        async move {
            let credentials = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            );
            http_get(&url, &[("authorization", &credentials)])
                .await
                .unwrap()
                .status
        }
    };
    assert_eq!(status("alice", "alice-pw").await, StatusCode::OK);
    assert_eq!(status("bob", "bob-pw").await, StatusCode::OK);
    assert_eq!(status("carol", "carol-pw").await, StatusCode::UNAUTHORIZED);

    // Bob leaves, Alice changes her password, Carol arrives.
    let alice = bcrypt::hash("alice-new", 5).unwrap();
    let carol = bcrypt::hash("carol-pw", 5).unwrap();
    std::fs::write(&users, format!("alice:{alice}\ncarol:{carol}\n")).unwrap();
    gantry.signal("HUP");
    let reloaded = common::wait_until(Duration::from_secs(10), || async {
        status("carol", "carol-pw").await == StatusCode::OK
    })
    .await;
    assert!(reloaded, "the new user gets in after SIGHUP");
    assert_eq!(status("alice", "alice-new").await, StatusCode::OK);
    assert_eq!(
        status("alice", "alice-pw").await,
        StatusCode::UNAUTHORIZED,
        "the old password, though checked and remembered before, is refused"
    );
    assert_eq!(status("bob", "bob-pw").await, StatusCode::UNAUTHORIZED);

    // A file that does not load leaves the users in place. The reload has happened (and failed)
    // once gantry says so; only then do the checks below say anything.
    std::fs::write(&users, "alice:plaintext-is-refused\n").unwrap();
    gantry.signal("HUP");
    let refused = common::wait_until(Duration::from_secs(10), || async {
        gantry.log().contains("SIGHUP: keeping the current users")
    })
    .await;
    assert!(refused, "gantry logs the failed reload:\n{}", gantry.log());
    assert_eq!(status("carol", "carol-pw").await, StatusCode::OK);
    assert_eq!(status("alice", "alice-new").await, StatusCode::OK);
}

/// A Bearer registry whose challenge names `realm`; it accepts the token `good`.
async fn bearer_registry(realm: String) -> common::fake::Fake {
    common::fake::Fake::start(move |seen| {
        if seen.authorization().as_deref() != Some("Bearer good") {
            return common::fake::Scripted::new(StatusCode::UNAUTHORIZED).header(
                "www-authenticate",
                &format!(r#"Bearer realm="{realm}",service="s""#),
            );
        }
        common::fake::Scripted::new(StatusCode::OK)
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(r#"{"schemaVersion":2}"#)
    })
    .await
}

/// `token_realms` entries are URL prefixes: a realm under a listed prefix gets the credentials,
/// a realm on the listed host under another path, or on another host with the listed path, is
/// asked anonymously (and the pull still works with the anonymous token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_realms_not_under_a_listed_prefix_get_no_credentials() {
    let listed_host = common::realm::Realm::start([127, 0, 0, 1].into()).await;
    let other_host = common::realm::Realm::start([127, 0, 0, 2].into()).await;
    // The registry is 127.0.0.1; `localhost` is another host name to gantry.
    let listed = format!("http://localhost:{}/token", listed_host.addr.port());
    let credentials = format!(
        "  username: puller\n  password: pull-secret\n  public: true\n  token_realms: [\"{listed}\"]"
    );
    let options = Options {
        mirroring: &credentials,
        ..Options::default()
    };
    let cases = [
        (listed.clone(), true),
        (
            format!(
                "http://localhost:{}/elsewhere/token",
                listed_host.addr.port()
            ),
            false,
        ),
        (format!("{}/token", other_host.origin()), false),
    ];
    for (realm, trusted) in cases {
        let registry = bearer_registry(realm.clone()).await;
        let gantry =
            Gantry::start_with(tempfile::tempdir().unwrap(), &registry.url(), options).await;
        let reply = http_get(
            &gantry.url("/v2/team/app/manifests/v1"),
            &[("accept", "application/vnd.oci.image.manifest.v1+json")],
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{realm}: {:?}", reply.body);
        let path = http::Uri::try_from(realm.as_str())
            .unwrap()
            .path()
            .to_owned();
        let server = if realm.starts_with(&other_host.origin()) {
            &other_host
        } else {
            &listed_host
        };
        let asked: Vec<Option<String>> = server
            .seen()
            .into_iter()
            .filter(|(seen_path, _)| *seen_path == path)
            .map(|(_, authorization)| authorization)
            .collect();
        assert!(!asked.is_empty(), "{realm} was asked for a token");
        let expected = trusted.then(|| basic("puller", "pull-secret"));
        assert!(
            asked.iter().all(|authorization| *authorization == expected),
            "{realm}: trusted {trusted}, sent {asked:?}"
        );
        listed_host.clear();
        other_host.clear();
    }
}

/// gantry may hold upstream credentials when clients must authenticate (`auth:`): it starts,
/// authenticated clients pull with the upstream credentials, anonymous ones are refused before
/// anything goes upstream. Without `auth:` (or `public: true`) the same config refuses to start,
/// naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_credentials_need_client_auth_or_public() {
    let upstream_basic = basic("mirror", "upstream-secret");
    let expected = upstream_basic.clone();
    let upstream = common::fake::Fake::start(move |seen| {
        if seen.authorization().as_deref() != Some(expected.as_str()) {
            return common::fake::Scripted::new(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", r#"Basic realm="upstream""#);
        }
        common::fake::Scripted::new(StatusCode::OK)
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(r#"{"schemaVersion":2}"#)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let users = htpasswd(dir.path());
    let credentials = "  username: mirror\n  password: upstream-secret";
    let auth = format!("auth:\n  htpasswd: {}\n", users.display());
    let options = Options {
        mirroring: credentials,
        extra: &auth,
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let url = gantry.url("/v2/team/app/manifests/v1");
    let accept = ("accept", "application/vnd.oci.image.manifest.v1+json");
    let anonymous = http_get(&url, &[accept]).await.unwrap();
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert!(upstream.seen().is_empty(), "nothing went upstream for it");
    let alice = basic("alice", "alice-pw");
    let reply = http_get(&url, &[accept, ("authorization", &alice)])
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(
        upstream
            .seen()
            .iter()
            .any(|s| s.authorization().as_deref() == Some(upstream_basic.as_str())),
        "gantry used its upstream credentials"
    );

    // The same credentials, without `auth:`: for mirroring and for a registries[] entry.
    let registry = format!(
        "registries:\n  - host: private.example\n    url: {}\n    insecure: true\n    username: mirror\n    password: upstream-secret\n",
        upstream.url()
    );
    for (key, options) in [
        (
            "mirroring",
            Options {
                mirroring: credentials,
                ..Options::default()
            },
        ),
        (
            "registries[0]",
            Options {
                extra: &registry,
                ..Options::default()
            },
        ),
    ] {
        let config = dir.path().join(format!("{key}.yaml"));
        std::fs::write(
            &config,
            common::config_yaml(dir.path(), &upstream.url(), options),
        )
        .unwrap();
        let output = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
                .args(["serve", "--config"])
                .arg(&config)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("gantry refuses at once instead of serving")
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{key}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{key}: gantry holds credentials for this upstream"
            )) && stderr.contains("configure `auth:`"),
            "{key}: {stderr}"
        );
    }
}

/// A blob redirect's URL is signed (its query is a credential of sorts): even at `debug`, gantry
/// logs the redirect by host only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_redirect_urls_are_logged_by_host_only() {
    const SIGNATURE: &str = "sig-never-logged";
    let content = b"blob behind a signed redirect".to_vec();
    let digest = file_digest_of(&content);
    let served = content.clone();
    let cdn = common::fake::Fake::start(move |_| {
        common::fake::Scripted::new(StatusCode::OK)
            .header("content-length", &served.len().to_string())
            .body(served.clone())
    })
    .await;
    let location = format!(
        "http://localhost:{}/cdn/blob?X-Signature={SIGNATURE}",
        cdn.addr.port()
    );
    let registry = common::fake::Fake::start(move |_| {
        common::fake::Scripted::new(StatusCode::TEMPORARY_REDIRECT).header("location", &location)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        extra: "log:\n  level: debug",
        ..Options::default()
    };
    let mut gantry = GantryProcess::configure(dir.path(), &registry.url(), options);
    gantry.start().await;
    let reply = http_get(&gantry.url(&format!("/v2/team/app/blobs/{digest}")), &[])
        .await
        .unwrap();
    assert_eq!(&reply.body[..], &content[..]);
    assert!(
        cdn.seen()[0].uri.contains(SIGNATURE),
        "the CDN got the signed URL"
    );
    let logged = common::wait_until(Duration::from_secs(10), || async {
        gantry.log().contains("following a redirect")
    })
    .await;
    let log = gantry.log();
    assert!(logged, "the redirect is logged at debug:\n{log}");
    assert!(!log.contains(SIGNATURE), "the signed URL is logged:\n{log}");
}

fn file_digest_of(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// `gantry check-config` prints the effective configuration with every secret redacted: upstream
/// passwords (for `mirroring` and `registries[]`) and the Redis URL, which may carry a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_redacts_passwords_and_the_redis_url() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        mirroring: "  username: mirror\n  password: mirror-pw-secret\n  public: true",
        extra: "cache:\n  redis: redis://:redis-pw-secret@127.0.0.1:6379/0\nregistries:\n  - host: ghcr.io\n    url: https://ghcr.io\n    username: u\n    password: ghcr-pw-secret\n    public: true\n",
        ..Options::default()
    };
    let config = dir.path().join("gantry.yaml");
    std::fs::write(
        &config,
        common::config_yaml(dir.path(), "http://127.0.0.1:1", options),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("username: mirror"), "{printed}");
    assert_eq!(printed.matches("<redacted>").count(), 3, "{printed}");
    for secret in ["mirror-pw-secret", "redis-pw-secret", "ghcr-pw-secret"] {
        assert!(!printed.contains(secret), "{secret}: {printed}");
    }
}
