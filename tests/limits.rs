//! Resource limits a hostile client or upstream runs into: `timeouts.header_read` (slowloris),
//! the 64 KiB request header limit, `limits.max_downloads`, and the caps on every body gantry
//! collects (manifests `limits.max_manifest_size`, tag lists 4 MiB, token responses and error
//! bodies 64 KiB). Each is refused promptly and gantry keeps serving.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{Ending, Fake, Scripted};
use common::gauge::GaugedBlobs;
use common::{http_get, Gantry, Options, Reply};
use http::StatusCode;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// gantry's caps in src/mirror (tag lists, error bodies) and src/upstream (token responses).
const MAX_LISTING: usize = 4 << 20;
const MAX_ERROR_BODY: usize = 64 << 10;
const MAX_TOKEN_RESPONSE: usize = 64 << 10;
/// The smallest `limits.max_manifest_size` gantry accepts, configured below.
const MAX_MANIFEST: usize = 4 << 20;
/// Longer than any refused request may take: a body past its cap is refused without waiting
/// for the rest (which, here, never comes).
const PROMPT: Duration = Duration::from_secs(20);

async fn prompt_get(gantry: &Gantry, path: &str, headers: &[(&str, &str)]) -> Reply {
    tokio::time::timeout(PROMPT, http_get(&gantry.url(path), headers))
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer within {PROMPT:?}: the body was buffered"))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A slowloris client sends its request headers one line at a time and never ends them; with
/// `timeouts.header_read: 1s` gantry closes the connection about a second in, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_headers_slowly_is_cut_off_after_header_read() {
    let upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;
    let options = Options {
        timeouts: "  header_read: 1s",
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let mut slow = tokio::net::TcpStream::connect(gantry.host()).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nhost: gantry\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = slow.into_split();
    // One more header line every 100 ms for up to 30 s: the headers are never complete.
    let trickle = tokio::spawn(async move {
        for line in 0..300 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer
                .write_all(format!("x-slow-{line}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut received))
        .await
        .is_ok();
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(
        closed,
        "the slow client still had its connection after 10 s"
    );
    assert!(
        elapsed >= Duration::from_millis(900),
        "cut off by the timeout, not refused at once ({elapsed:?})"
    );
    let text = String::from_utf8_lossy(&received);
    assert!(
        received.is_empty() || !text.starts_with("HTTP/1.1 200"),
        "the unfinished request was not answered: {text}"
    );
    let after = http_get(&gantry.url("/v2/"), &[]).await.unwrap();
    assert_eq!(after.status, StatusCode::OK, "gantry keeps serving");
}

/// Request headers are limited to 64 KiB: a 48 KiB header is served, a 100 KiB one gets an error
/// or a closed connection, over HTTP/1.1 and h2c; gantry keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_over_64_kib_are_refused() {
    let upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;
    let gantry = Gantry::start(&upstream.url()).await;
    let url = gantry.url("/v2/");
    let fits = "a".repeat(48 << 10);
    let over = "a".repeat(100 << 10);

    let reply = http_get(&url, &[("x-big", &fits)]).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "a 48 KiB header fits");
    match http_get(&url, &[("x-big", &over)]).await {
        Ok(reply) => assert_eq!(
            reply.status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "HTTP/1.1: a 100 KiB header"
        ),
        Err(_closed) => {}
    }
    assert_eq!(
        http_get(&url, &[]).await.unwrap().status,
        StatusCode::OK,
        "gantry keeps serving"
    );

    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<Bytes>>();
    let h2_get = |value: &str| {
        let request = http::Request::get(&url)
            .header("x-big", value)
            .body(http_body_util::Empty::new())
            .unwrap();
        let response = h2.request(request);
        async move {
            tokio::time::timeout(Duration::from_secs(20), response)
                .await
                .expect("h2 answers")
                .map(|r| r.status())
        }
    };
    assert_eq!(
        h2_get(&fits).await.unwrap(),
        StatusCode::OK,
        "h2: 48 KiB fits"
    );
    match h2_get(&over).await {
        Ok(status) => assert_eq!(
            status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "h2: a 100 KiB header"
        ),
        Err(_refused) => {}
    }
    assert_eq!(h2_get("small").await.unwrap(), StatusCode::OK);
}

/// With `limits.max_downloads: 2`, six clients asking for six uncached blobs at once are all
/// served, but the upstream never has more than two blob downloads open at a time (and has two,
/// so the downloads did overlap and the limit is what held them back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_max_downloads_upstream_downloads_at_once() {
    let blobs: Vec<(String, Bytes)> = (0..6u8)
        .map(|seed| {
            let content: Bytes = (0..(256u32 << 10))
                .map(|i| (i as u8).wrapping_mul(seed + 3))
                .collect();
            let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
            (digest, content)
        })
        .collect();
    let upstream = GaugedBlobs::start(
        blobs.iter().cloned().collect::<HashMap<_, _>>(),
        4,
        Duration::from_millis(150),
    )
    .await;
    let options = Options {
        extra: "limits:\n  max_downloads: 2",
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let pulls = blobs.iter().map(|(digest, _)| {
        let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
        async move { http_get(&url, &[]).await }
    });
    let replies = futures_util::future::join_all(pulls).await;
    for ((digest, content), reply) in blobs.iter().zip(replies) {
        let reply = reply.unwrap_or_else(|e| panic!("{digest}: {e}"));
        assert_eq!(reply.status, StatusCode::OK, "{digest}");
        assert_eq!(&reply.body, content, "{digest}");
    }
    assert_eq!(upstream.requests(), 6, "one download per blob");
    assert_eq!(
        upstream.peak(),
        2,
        "at most max_downloads (2) upstream downloads at once, and the limit was reached"
    );
}

/// `limits.max_manifest_size`: a manifest of exactly the limit is served; one byte more is
/// refused at once (400 MANIFEST_INVALID naming the key), without waiting for the rest of a body
/// that never ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_over_max_manifest_size_is_refused_unread() {
    let upstream = Fake::start(|seen| {
        let size = if seen.uri.contains("/fits/") {
            MAX_MANIFEST
        } else {
            MAX_MANIFEST + 1
        };
        let reply = Scripted::new(StatusCode::OK)
            .header("content-type", MANIFEST_TYPE)
            .body(padded_json(r#"{"schemaVersion":2}"#, size));
        if seen.uri.contains("/fits/") {
            reply
        } else {
            reply.ending(Ending::Stall)
        }
    })
    .await;
    let options = Options {
        extra: "limits:\n  max_manifest_size: 4MiB",
        timeouts: "  idle: 10m",
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let accept = [("accept", MANIFEST_TYPE)];
    // The content's own fault, not an outage: not a retryable 503, and never a stale answer.
    let over = prompt_get(&gantry, "/v2/team/over/manifests/v1", &accept).await;
    assert_eq!(over.status, StatusCode::BAD_REQUEST);
    assert_eq!(over.error_code().as_deref(), Some("MANIFEST_INVALID"));
    assert!(
        String::from_utf8_lossy(&over.body).contains("limits.max_manifest_size"),
        "the message names the limit"
    );
    let fits = prompt_get(&gantry, "/v2/team/fits/manifests/v1", &accept).await;
    assert_eq!(fits.status, StatusCode::OK);
    assert_eq!(fits.body.len(), MAX_MANIFEST);
}

/// Tag lists are capped at 4 MiB: one of exactly 4 MiB passes through, a larger one is refused
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_list_over_4_mib_is_refused_unread() {
    let upstream = Fake::start(|seen| {
        let fits = seen.uri.contains("/fits/");
        let size = if fits { MAX_LISTING } else { MAX_LISTING + 1 };
        let reply = Scripted::new(StatusCode::OK)
            .header("content-type", "application/json")
            .body(padded_json(r#"{"name":"team/x","tags":["v1"]}"#, size));
        if fits {
            reply
        } else {
            reply.ending(Ending::Stall)
        }
    })
    .await;
    let options = Options {
        timeouts: "  idle: 10m",
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let over = prompt_get(&gantry, "/v2/team/over/tags/list", &[]).await;
    assert_eq!(over.status, StatusCode::SERVICE_UNAVAILABLE);
    let fits = prompt_get(&gantry, "/v2/team/fits/tags/list", &[]).await;
    assert_eq!(fits.status, StatusCode::OK);
    assert_eq!(fits.body.len(), MAX_LISTING);
}

/// A registry whose token realm (on itself) answers with a `size`-byte token response; the
/// registry accepts the token it names.
async fn token_registry(size: usize, ending: Ending) -> Fake {
    Fake::start(move |seen| {
        if seen.uri.starts_with("/token") {
            return Scripted::new(StatusCode::OK)
                .header("content-type", "application/json")
                .body(padded_json(r#"{"token":"good"}"#, size))
                .ending(ending.clone());
        }
        if seen.authorization().as_deref() != Some("Bearer good") {
            let host = seen.headers.get("host").unwrap().to_str().unwrap();
            return Scripted::new(StatusCode::UNAUTHORIZED).header(
                "www-authenticate",
                &format!(r#"Bearer realm="http://{host}/token",service="s""#),
            );
        }
        Scripted::new(StatusCode::OK)
            .header("content-type", MANIFEST_TYPE)
            .body(r#"{"schemaVersion":2}"#)
    })
    .await
}

/// Token responses are capped at 64 KiB: one of exactly 64 KiB is used, a larger one is refused
/// at once and the pull fails with UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_response_over_64_kib_is_refused_unread() {
    let options = Options {
        timeouts: "  idle: 10m",
        ..Options::default()
    };
    let accept = [("accept", MANIFEST_TYPE)];
    let path = "/v2/team/app/manifests/v1";

    let over = token_registry(MAX_TOKEN_RESPONSE + 1, Ending::Stall).await;
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &over.url(), options).await;
    let reply = prompt_get(&gantry, path, &accept).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code().as_deref(), Some("UNAVAILABLE"));
    assert!(
        over.seen().iter().any(|s| s.uri.starts_with("/token")),
        "the token was asked for"
    );

    let fits = token_registry(MAX_TOKEN_RESPONSE, Ending::Complete).await;
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &fits.url(), options).await;
    let reply = prompt_get(&gantry, path, &accept).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
}

/// Upstream error bodies are read (for their OCI code) up to 64 KiB: an error document of exactly
/// 64 KiB is passed on, a larger one is not read to its end and the client gets gantry's own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_body_over_64_kib_is_not_read() {
    let upstream = Fake::start(|seen| {
        let fits = seen.uri.contains("/fits/");
        let size = if fits {
            MAX_ERROR_BODY
        } else {
            MAX_ERROR_BODY + 1
        };
        let reply = Scripted::new(StatusCode::NOT_FOUND)
            .header("content-type", "application/json")
            .body(padded_json(
                r#"{"errors":[{"code":"NAME_UNKNOWN","message":"from upstream"}]}"#,
                size,
            ));
        if fits {
            reply
        } else {
            reply.ending(Ending::Stall)
        }
    })
    .await;
    let options = Options {
        timeouts: "  idle: 10m",
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let accept = [("accept", MANIFEST_TYPE)];
    let fits = prompt_get(&gantry, "/v2/team/fits/manifests/v1", &accept).await;
    assert_eq!(fits.status, StatusCode::NOT_FOUND);
    assert_eq!(
        fits.error_code().as_deref(),
        Some("NAME_UNKNOWN"),
        "the upstream's own error document"
    );
    let over = prompt_get(&gantry, "/v2/team/over/manifests/v1", &accept).await;
    assert_eq!(over.status, StatusCode::NOT_FOUND);
    assert_eq!(
        over.error_code().as_deref(),
        Some("MANIFEST_UNKNOWN"),
        "gantry's own error, the upstream's was too large"
    );
}

/// A JSON document of exactly `size` bytes: `json` with trailing spaces.
fn padded_json(json: &str, size: usize) -> Bytes {
    assert!(json.len() <= size);
    let mut bytes = json.as_bytes().to_vec();
    bytes.resize(size, b' ');
    Bytes::from(bytes)
}

/// No route reads a request body: a request announcing a 1 GB body that never comes is answered
/// at once, on the base route and on the (refused) upload route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_never_read() {
    let upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;
    let gantry = Gantry::start(&upstream.url()).await;
    for (request, status) in [
        ("GET /v2/", "200"),
        ("PUT /v2/team/app/blobs/uploads/1", "405"),
    ] {
        let mut stream = tokio::net::TcpStream::connect(gantry.host()).await.unwrap();
        stream
            .write_all(
                format!("{request} HTTP/1.1\r\nhost: gantry\r\ncontent-length: 1000000000\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut head = vec![0u8; 12];
        tokio::time::timeout(PROMPT, stream.read_exact(&mut head))
            .await
            .unwrap_or_else(|_| panic!("{request}: no answer while the body is missing"))
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&head),
            format!("HTTP/1.1 {status}"),
            "{request}"
        );
    }
}

/// With every `limits.max_downloads` slot held by a stalled download, a new download waits at
/// most `timeouts.download_queue`, and one past `limits.max_queued_downloads` not at all: each
/// gets a quick `503 UNAVAILABLE` with `Retry-After`, never an hour's hang. Once the slot frees,
/// downloads run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_past_the_slots_and_the_queue_are_shed_quickly() {
    use common::metrics::value;
    use common::raw_fake::{Gate, Raw, RawFake};
    let blobs: Vec<(Bytes, String)> = (0..4u8)
        .map(|i| {
            let content = Bytes::from(vec![i; 256 << 10]);
            let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
            (content, digest)
        })
        .collect();
    let gate = Gate::new();
    let (held, served) = (gate.clone(), blobs.clone());
    let upstream = RawFake::start(move |target| {
        let Some((content, _)) = served.iter().find(|(_, d)| target.ends_with(d.as_str())) else {
            return Raw::not_found();
        };
        Raw::head(
            200,
            &[
                ("content-type", "application/octet-stream"),
                ("content-length", &content.len().to_string()),
            ],
        )
        .bytes(content.slice(..1024))
        .gate(&held)
        .bytes(content.slice(1024..))
    })
    .await;
    let options = Options {
        extra: "limits:\n  max_downloads: 1\n  max_queued_downloads: 1",
        timeouts: "  download_queue: 2s",
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url(), options).await;
    let url = |i: usize| gantry.url(&format!("/v2/team/app/blobs/{}", blobs[i].1));

    // The slot: a download held at the gate.
    let holder = tokio::spawn(http_get_owned(url(0)));
    let started = common::wait_until(Duration::from_secs(10), || async {
        upstream.seen().iter().any(|r| r.contains(&blobs[0].1))
    })
    .await;
    assert!(started);
    // The queue: one download waiting.
    let queued_at = Instant::now();
    let queued = tokio::spawn(http_get_owned(url(1)));
    let waiting = common::wait_until(Duration::from_secs(10), || async {
        value(&gantry.metrics().await, "gantry_downloads_in_flight") == 2.0
    })
    .await;
    assert!(waiting);
    // Past the queue: shed at once.
    let at = Instant::now();
    let shed = http_get(&url(2), &[]).await.unwrap();
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.error_code().as_deref(), Some("UNAVAILABLE"));
    assert_eq!(shed.header("retry-after"), Some("2"));
    assert!(at.elapsed() < Duration::from_secs(1), "{:?}", at.elapsed());
    // The queued one: shed once its wait is over, not after timeouts.download.
    let queued = queued.await.unwrap();
    assert_eq!(queued.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(queued.header("retry-after").is_some());
    let waited = queued_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    // Nothing shed reached the upstream.
    let seen = upstream.seen();
    assert!(
        !seen
            .iter()
            .any(|r| r.contains(&blobs[1].1) || r.contains(&blobs[2].1)),
        "{seen:?}"
    );
    let metrics = gantry.metrics().await;
    assert_eq!(value(&metrics, "gantry_downloads_shed_total"), 2.0);
    assert_eq!(
        value(&metrics, r#"gantry_download_failures_total{reason="shed"}"#),
        2.0
    );
    // The slot frees: the held download completes and a new one runs.
    gate.open();
    let holder = holder.await.unwrap();
    assert_eq!(holder.status, StatusCode::OK);
    assert_eq!(holder.body, blobs[0].0);
    let after = http_get(&url(3), &[]).await.unwrap();
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(after.body, blobs[3].0);
}

async fn http_get_owned(url: String) -> Reply {
    http_get(&url, &[]).await.unwrap()
}
