//! The server layer as a real process and over h2c: graceful shutdown lets in-flight requests
//! finish; HTTP/2 with prior knowledge is served on the same port as HTTP/1.1.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{Fake, Scripted};
use common::process::GantryProcess;
use common::{http_get, Gantry, Options};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use sha2::Digest as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let content: Vec<u8> = (0..(1 << 20)).map(|i| (i % 253) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
    let chunks: Vec<Bytes> = content
        .chunks(64 << 10)
        .map(Bytes::copy_from_slice)
        .collect();
    let upstream = Fake::start(move |_| {
        let mut reply = Scripted::new(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .header("content-length", &(1 << 20).to_string())
            .pace(Duration::from_millis(100));
        for chunk in &chunks {
            reply = reply.body(chunk.clone());
        }
        reply
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut gantry = GantryProcess::configure(dir.path(), &upstream.url(), Options::default());
    gantry.start().await;

    // A download that takes ~1.6 s is in flight when SIGTERM arrives: gantry has answered with
    // its headers, and the upstream is still sending the body.
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let response = common::client()
        .request(http::Request::get(url.as_str()).body(Empty::new()).unwrap())
        .await
        .expect("response headers");
    assert_eq!(response.status(), StatusCode::OK);
    let signalled = Instant::now();
    gantry.signal("TERM");

    let body = response
        .into_body()
        .collect()
        .await
        .expect("the in-flight request completes")
        .to_bytes();
    assert_eq!(&body[..], &content[..]);
    assert_eq!(
        upstream.seen().len(),
        1,
        "the download started before the signal"
    );
    let status = gantry.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "within the shutdown deadline"
    );
    // New connections are refused once it has stopped.
    assert!(http_get(&gantry.url("/v2/"), &[]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_is_served() {
    let upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;
    let gantry = Gantry::start(&upstream.url()).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let response = client
        .request(
            http::Request::get(gantry.url("/v2/"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        &response.into_body().collect().await.unwrap().to_bytes()[..],
        b"{}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_request_and_no_secrets() {
    const PASSWORD: &str = "pa55-never-logged";
    const TOKEN: &str = "tok-never-logged";
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let upstream = Fake::start(move |seen| {
        if seen.uri.starts_with("/token") {
            return Scripted::json(StatusCode::OK, serde_json::json!({"token": TOKEN}));
        }
        if seen.authorization().as_deref() != Some(&format!("Bearer {TOKEN}")) {
            let realm = format!(
                "http://{}/token",
                seen.headers.get("host").unwrap().to_str().unwrap()
            );
            return Scripted::new(StatusCode::UNAUTHORIZED).header(
                "www-authenticate",
                &format!(r#"Bearer realm="{realm}",service="fake""#),
            );
        }
        Scripted::new(StatusCode::OK)
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(&manifest[..])
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mirroring = format!("  username: mirror\n  password: {PASSWORD}\n  public: true");
    let options = Options {
        mirroring: &mirroring,
        extra: "log:\n  level: debug\n  format: json\n",
        ..Options::default()
    };
    let mut gantry = GantryProcess::configure(dir.path(), &upstream.url(), options);
    gantry.start().await;
    let reply = http_get(&gantry.url("/v2/team/app/manifests/v1"), &[])
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let missing = http_get(&gantry.url("/v2/Bad/manifests/v1"), &[])
        .await
        .unwrap();
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    gantry.signal("TERM");
    gantry.wait(Duration::from_secs(10)).await;

    let log = gantry.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let requests: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["message"] == "request").collect();
    assert_eq!(
        requests.len(),
        3,
        "one line per request (/v2/ ping, manifest, bad name): {log}"
    );
    let manifest_line = requests
        .iter()
        .find(|l| l["route"] == "manifest" && l["status"] == 200)
        .unwrap();
    assert_eq!(manifest_line["path"], "/v2/team/app/manifests/v1");
    assert_eq!(manifest_line["cache"], "miss");
    assert!(manifest_line["ms"].as_f64().is_some());
    let ms = manifest_line["ms"].to_string();
    assert!(
        ms.split_once('.')
            .is_none_or(|(_, decimals)| decimals.len() <= 3),
        "ms is written to the microsecond: {ms}"
    );
    assert_eq!(
        manifest_line["bytes"],
        manifest.len() as u64,
        "bytes actually sent"
    );
    assert_eq!(manifest_line["complete"], true);
    let bad_line = requests.iter().find(|l| l["status"] == 400).unwrap();
    assert!(bad_line["error"].as_str().unwrap().contains("NAME_INVALID"));
    // Debug level was on (the token fetch is logged at debug), and gantry did use the secrets:
    // Basic credentials to the realm, the token to the registry.
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "DEBUG" && l["message"] == "fetched an upstream token"),
        "{log}"
    );
    let basic = format!("Basic {}", base64_of(&format!("mirror:{PASSWORD}")));
    let seen = upstream.seen();
    assert!(
        seen.iter()
            .any(|s| s.uri.starts_with("/token") && s.authorization() == Some(basic.clone())),
        "{seen:?}"
    );
    assert!(seen
        .iter()
        .any(|s| s.authorization() == Some(format!("Bearer {TOKEN}"))));
    for (secret, what) in [
        (PASSWORD.to_owned(), "the upstream password"),
        (
            base64_of(&format!("mirror:{PASSWORD}")),
            "the Basic credentials",
        ),
        (TOKEN.to_owned(), "the upstream token"),
    ] {
        assert!(!log.contains(&secret), "{what} must never be logged: {log}");
    }
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// `timeouts.send`: a client that requests a large blob and reads nothing loses its connection,
/// and with it the connection permit, so others are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_after_the_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Larger than what loopback socket buffers absorb, so the writes really block.
    let content = Bytes::from(
        (0..(48u32 << 20))
            .map(|i| (i % 241) as u8)
            .collect::<Vec<u8>>(),
    );
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
    let served = content.clone();
    let upstream = Fake::start(move |_| {
        Scripted::new(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .header("content-length", &served.len().to_string())
            .body(served.clone())
    })
    .await;
    let options = Options {
        timeouts: "  send: 1s",
        extra: "limits:\n  max_connections: 1",
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let path = format!("/v2/team/app/blobs/{digest}");
    assert_eq!(
        http_get(&gantry.url(&path), &[]).await.unwrap().body,
        content
    );

    let address = gantry.host();
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: {address}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The only connection permit is held by the stalled client until the send timeout.
    let started = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(20), http_get(&gantry.url("/v2/"), &[]))
        .await
        .expect("served once the stalled connection is closed")
        .unwrap();
    assert_eq!(next.status, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "served only after the send timeout ({:?})",
        started.elapsed()
    );
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut received))
        .await
        .expect("the stalled connection was closed");
    assert!(
        received.len() < content.len(),
        "the stalled response was cut short ({} bytes)",
        received.len()
    );

    // A slow client that keeps reading is never cut off, however long the whole transfer takes:
    // the limit is on a pause, and each pause here (0.4 s) is shorter than it.
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut response = Vec::new();
    let mut buffer = vec![0u8; 4 << 20];
    loop {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let read = slow.read(&mut buffer).await.expect("never reset");
        if read == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..read]);
        assert!(started.elapsed() < Duration::from_secs(60), "bounded");
    }
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers")
        + 4;
    assert_eq!(&response[head_end..], &content[..], "the whole blob");
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "slow enough to have stalled past the limit in total ({:?})",
        started.elapsed()
    );
}

/// A download whose client left is still the mirror's: SIGTERM waits for it (commit included,
/// within `timeouts.shutdown`) instead of exiting with it half done, so a rolling restart does
/// not lose a blob the upstream was already sending. Deterministic: the upstream's body is held
/// until gantry is shutting down, when no request is in flight any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_download_no_client_is_waiting_for() {
    if !common::require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = common::Fixture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gantry = GantryProcess::configure(dir.path(), &fixture.proxy.url(), Options::default());
    gantry.start().await;
    let (layer, size) = fixture.multi.layers.last().unwrap().clone();
    let url = gantry.url(&format!("/v2/test/multi/blobs/{layer}"));
    let gate = fixture.proxy.hold(&format!("/blobs/{layer}"), 64 << 10);
    let client = tokio::spawn({
        let url = url.clone();
        async move { http_get(&url, &[]).await }
    });
    assert!(
        common::wait_until(Duration::from_secs(10), || async { gate.held() >= 1 }).await,
        "the upstream body is held"
    );
    client.abort();
    let _ = client.await;
    gantry.signal("TERM");
    assert!(
        common::wait_until(Duration::from_secs(10), || async {
            gantry.log().contains("shutting down")
        })
        .await,
        "gantry is shutting down"
    );
    gate.open();
    assert!(gantry.wait(Duration::from_secs(20)).await.success());

    fixture.proxy.set_down(true);
    gantry.start().await;
    let reply = http_get(&url, &[]).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", gantry.log());
    assert_eq!(reply.body.len() as u64, size);
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&reply.body))),
        layer
    );
}
