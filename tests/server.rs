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

    // A download that takes ~1.6 s is in flight when SIGTERM arrives.
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let in_flight = tokio::spawn(async move { http_get(&url, &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    gantry.signal("TERM");

    let reply = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], &content[..]);
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
