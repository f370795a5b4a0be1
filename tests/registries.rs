//! One gantry, many upstreams: two real `docker-registry` instances (one behind htpasswd Basic
//! auth) and a scripted Bearer registry, each holding its own `team/app:v1`. Routing by `ns=` and
//! by path prefix, and credentials from the config, a docker `config.json` and a credential helper.

mod common;

use base64::Engine as _;
use common::fake::{Fake, Scripted};
use common::process::GantryProcess;
use common::{
    file_digest, http_get, pull, require_tools, skopeo, Gantry, Layout, Options, ACCEPT_ALL,
};
use http::StatusCode;
use sha2::Digest as _;

const HTPASSWD: &str = "mirror:$2y$05$KFdqqeQs5HK5LJWLNl7q1.3Kj9mk3ny81Knmc6zPZRX3u1t0N8gce";
const USER: &str = "mirror";
const PASSWORD: &str = "s3cret-pass";

/// Pushes a fresh image as `team/app:v1` and returns its manifest digest.
async fn push_image(host: &str, seed: u64, creds: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(dir.path());
    let image = layout.image("amd64", &[100_000 + seed as usize], seed);
    layout.tag_image("v1", &image);
    layout.write_index();
    let source = format!("oci:{}:v1", dir.path().display());
    let destination = format!("docker://{host}/team/app:v1");
    let mut args = vec!["copy", "--dest-tls-verify=false"];
    if let Some(creds) = creds {
        args.extend(["--dest-creds", creds]);
    }
    args.extend([source.as_str(), destination.as_str()]);
    skopeo(&args).await;
    image.manifest_digest
}

fn bearer_manifest() -> Vec<u8> {
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.to_vec()
}

/// A Bearer registry whose token realm is `realm_base` (another origin); it accepts `Bearer good`.
async fn bearer_registry(realm_base: String) -> Fake {
    Fake::start(move |seen| {
        if seen.authorization().as_deref() != Some("Bearer good") {
            return Scripted::new(StatusCode::UNAUTHORIZED).header(
                "www-authenticate",
                &format!(r#"Bearer realm="{realm_base}/token",service="c""#),
            );
        }
        let body = bearer_manifest();
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
        Scripted::new(StatusCode::OK)
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .header("docker-content-digest", &digest)
            .body(body)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_registry_serves_its_own_content_with_its_own_credentials() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let open = common::Registry::start().await;
    let private = common::Registry::start_with_auth(Some(HTPASSWD)).await;
    let open_digest = push_image(&open.host(), 21, None).await;
    let private_digest = push_image(&private.host(), 22, Some(&format!("{USER}:{PASSWORD}"))).await;
    assert_ne!(open_digest, private_digest);

    let realm =
        Fake::start(|_| Scripted::json(StatusCode::OK, serde_json::json!({"token": "good"}))).await;
    let bearer = bearer_registry(realm.url()).await;
    let bearer_digest = format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(bearer_manifest()))
    );

    let dir = tempfile::tempdir().unwrap();
    let docker_config = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    std::fs::write(
        &docker_config,
        serde_json::to_vec(&serde_json::json!({"auths": {"b-config.example": {"auth": auth}}}))
            .unwrap(),
    )
    .unwrap();
    let helper = dir.path().join("docker-credential-test");
    let calls = dir.path().join("helper-calls");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\necho \"$server\" >> {calls}\nif [ \"$(wc -l < {calls})\" -eq 1 ]; then pw=expired; else pw={PASSWORD}; fi\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"%s\"}}' \"$server\" \"$pw\"\n",
            calls = calls.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&helper)
        .status()
        .unwrap();

    let private_url = format!("http://{}", private.host());
    let registries = format!(
        "registries:\n\
         - host: b.example\n  url: {private_url}\n  insecure: true\n  username: {USER}\n  password: {PASSWORD}\n  public: true\n\
         - host: b-config.example\n  url: {private_url}\n  insecure: true\n  docker_config: {config}\n  public: true\n\
         - host: b-helper.example\n  url: {private_url}\n  insecure: true\n  credential_helper: {helper}\n  public: true\n\
         - host: b-anonymous.example\n  url: {private_url}\n  insecure: true\n\
         - host: c.example\n  url: {bearer}\n  insecure: true\n",
        config = docker_config.display(),
        helper = helper.display(),
        bearer = bearer.url(),
    );
    let options = Options {
        extra: &registries,
        ..Options::default()
    };
    let gantry = Gantry::start_with(dir, &format!("http://{}", open.host()), options).await;
    let digest_of = |path: String| {
        let url = gantry.url(&path);
        async move {
            let reply = http_get(&url, &[("accept", ACCEPT_ALL)]).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{url}: {:?}", reply.body);
            reply.header("docker-content-digest").unwrap().to_owned()
        }
    };

    // The same repository name, four ways, never mixed up in the cache.
    assert_eq!(
        digest_of("/v2/team/app/manifests/v1".into()).await,
        open_digest
    );
    assert_eq!(
        digest_of("/v2/team/app/manifests/v1?ns=b.example".into()).await,
        private_digest
    );
    assert_eq!(
        digest_of("/v2/b.example/team/app/manifests/v1".into()).await,
        private_digest
    );
    assert_eq!(
        digest_of("/v2/team/app/manifests/v1?ns=c.example".into()).await,
        bearer_digest
    );
    assert_eq!(
        digest_of("/v2/c.example/team/app/manifests/v1".into()).await,
        bearer_digest
    );
    assert_eq!(
        digest_of("/v2/team/app/manifests/v1".into()).await,
        open_digest
    );

    // Credentials from a config.json and from a helper (asked again after its first answer is refused).
    assert_eq!(
        digest_of("/v2/b-config.example/team/app/manifests/v1".into()).await,
        private_digest
    );
    assert_eq!(
        digest_of("/v2/team/app/manifests/v1?ns=b-helper.example".into()).await,
        private_digest
    );
    let asked = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(
        asked.lines().collect::<Vec<_>>(),
        ["b-helper.example", "b-helper.example"],
        "{asked}"
    );

    // Without credentials the private registry denies, with an OCI DENIED body.
    let denied = http_get(
        &gantry.url("/v2/b-anonymous.example/team/app/manifests/v1"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.error_code().as_deref(), Some("DENIED"));

    // Whole pulls through the path prefix get each registry's bytes.
    for (name, digest) in [
        ("team/app", &open_digest),
        ("b.example/team/app", &private_digest),
    ] {
        let (out, result) = pull(&format!("{}/{name}:v1", gantry.host()), false).await;
        result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            &file_digest(&out.path().join("image/manifest.json")),
            digest,
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_only_to_trusted_token_realms() {
    // The realm is on another host name (`localhost` vs the registry's `127.0.0.1`).
    let realm =
        Fake::start(|_| Scripted::json(StatusCode::OK, serde_json::json!({"token": "good"}))).await;
    let realm_base = format!("http://localhost:{}", realm.addr.port());
    let bearer = bearer_registry(realm_base.clone()).await;
    let credentials = format!("  username: {USER}\n  password: {PASSWORD}\n  public: true");

    let untrusted = Options {
        mirroring: &credentials,
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &bearer.url(), untrusted).await;
    let reply = http_get(&gantry.url("/v2/team/app/manifests/v1"), &[])
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        realm.seen().iter().all(|s| s.authorization().is_none()),
        "a foreign realm got credentials"
    );

    realm.clear();
    let listed = format!("{credentials}\n  token_realms: [\"{realm_base}/\"]");
    let trusted = Options {
        mirroring: &listed,
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &bearer.url(), trusted).await;
    let reply = http_get(&gantry.url("/v2/team/app/manifests/v1"), &[])
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    assert_eq!(
        realm.seen()[0].authorization().as_deref(),
        Some(basic.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_registries_are_refused_unless_any_is_allowed() {
    let upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;
    let gantry = Gantry::start(&upstream.url()).await;
    let refused = http_get(&gantry.url("/v2/team/app/manifests/v1?ns=quay.io"), &[])
        .await
        .unwrap();
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert_eq!(refused.error_code().as_deref(), Some("NAME_UNKNOWN"));
    assert!(upstream.seen().is_empty());
}

/// `allow_any_registry`: a registry nobody configured, named by the client, is mirrored over
/// https, anonymously. The upstream is a real docker-registry serving TLS with a test CA that
/// gantry is told to trust through `SSL_CERT_FILE` (read by rustls-native-certs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_registry_a_client_names_is_mirrored_over_https() {
    if !require_tools(&["docker-registry", "skopeo", "openssl"]) {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (ca, certificate, key) = common::clients::test_certificate(certs.path());
    let registry = common::Registry::start_tls(&certificate, &key).await;
    let digest = push_image(&registry.host(), 31, None).await;
    let default_upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;

    let dir = tempfile::tempdir().unwrap();
    // The test registry is on loopback, which a registry named by a client may reach only when
    // the operator allows it (tests/ssrf.rs shows the refusal).
    let options = Options {
        extra: "allow_any_registry: true\nallow_any_registry_networks: [127.0.0.1/32]",
        ..Options::default()
    };
    let mut gantry = GantryProcess::configure(dir.path(), &default_upstream.url(), options);
    gantry.env("SSL_CERT_FILE", &ca.display().to_string());
    gantry.start().await;
    let host = registry.host();
    for path in [
        format!("/v2/{host}/team/app/manifests/v1"),
        format!("/v2/team/app/manifests/v1?ns={host}"),
    ] {
        let reply = http_get(&gantry.url(&path), &[("accept", ACCEPT_ALL)])
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", gantry.log());
        assert_eq!(reply.header("docker-content-digest"), Some(digest.as_str()));
    }
    // The blobs too (a docker reference cannot carry `host:port` as a path component, so no
    // skopeo pull here; containerd and docker use `ns=` and the plain path).
    let manifest = http_get(
        &gantry.url(&format!("/v2/team/app/manifests/{digest}?ns={host}")),
        &[("accept", ACCEPT_ALL)],
    )
    .await
    .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.body).unwrap();
    let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    for layer in manifest["layers"].as_array().unwrap() {
        blobs.push(layer["digest"].as_str().unwrap().to_owned());
    }
    for blob in blobs {
        let reply = http_get(
            &gantry.url(&format!("/v2/{host}/team/app/blobs/{blob}")),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        let actual = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&reply.body)));
        assert_eq!(actual, blob);
    }
    assert!(
        default_upstream.seen().is_empty(),
        "nothing went to the default source"
    );
}
