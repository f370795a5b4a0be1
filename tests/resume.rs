//! Resumable upstream downloads (#15): a blob whose upstream body breaks off at 80% (the
//! connection closed, a clean end short of its size, a stall past `timeouts.idle`) goes on with
//! one `Range: bytes=N-` request from the byte reached, and the clients following the flight get
//! one whole, verified stream. Variants: an upstream that ignores `Range` (a `200`, whose first N
//! bytes are dropped and counted), and one that breaks every time (the download gives up after
//! `limits.download_resumes` attempts, nothing committed).
//!
//! The upstream is a fake written on the socket by hand (a real registry does not break off on
//! demand); it counts the body bytes it sends per request, so "bytes re-fetched" is measured on
//! the upstream's side.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::metrics::{sample, value};
use common::{blob_path, dir_is_empty, http_get, stream_into, wait_until, Gantry, Options};
use http::StatusCode;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: usize = 2 << 20;
/// Where the first answer breaks off: 80% of the blob.
const BREAK: usize = SIZE * 8 / 10;
/// Where the first answer waits until both clients follow the flight.
const HOLD: usize = SIZE * 4 / 10;

fn blob(seed: u8) -> (Bytes, String) {
    let content: Vec<u8> = (0..SIZE)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&content)));
    (Bytes::from(content), digest)
}

/// A point in the first answer's body where the fake waits until the test opens it.
#[derive(Clone)]
struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

impl Gate {
    fn new() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(false).0))
    }

    fn open(&self) {
        self.0.send_replace(true);
    }

    async fn wait_open(&self) {
        let _ = self.0.subscribe().wait_for(|open| *open).await;
    }
}

/// How one answer's body stops short of the end.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// `Content-Length` the whole, then the connection is closed: a transport error to hyper.
    Close,
    /// Chunked with a proper last chunk, `Content-Length` the whole: a clean end, short.
    CleanEnd,
    /// Nothing more is sent and the connection stays open.
    Stall,
}

/// One answer to a blob GET.
#[derive(Clone, Copy, Debug)]
struct Answer {
    /// A `Range: bytes=N-` is answered `206` from N; otherwise `200` with the whole blob.
    honour_range: bool,
    /// The body stops after this byte of the blob (absolute), this way.
    cut: Option<(usize, Cut)>,
    /// The body waits for the test's gate after this byte of the blob.
    hold: Option<usize>,
}

const WHOLE: Answer = Answer {
    honour_range: true,
    cut: None,
    hold: None,
};

/// A blob GET as the fake saw it: its `Range` header, and the body bytes it has sent so far.
struct Request {
    range: Option<String>,
    sent: Arc<AtomicU64>,
}

/// An upstream serving one blob, answering its n-th GET (from 0) with `plan(n)`.
struct Fault {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    gate: Gate,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fault {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fault {
    async fn start(
        content: Bytes,
        digest: String,
        plan: impl Fn(usize) -> Answer + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let gate = Gate::new();
        let plan = Arc::new(plan);
        let (seen, held) = (Arc::clone(&requests), gate.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (content, digest) = (content.clone(), digest.clone());
                let (seen, held, plan) = (Arc::clone(&seen), held.clone(), Arc::clone(&plan));
                tokio::spawn(async move {
                    serve(stream, &content, &digest, &seen, &held, &*plan).await;
                });
            }
        });
        Self {
            url,
            requests,
            gate,
            task,
        }
    }

    /// Each blob GET's `Range` header and body bytes sent.
    fn seen(&self) -> Vec<(Option<String>, u64)> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.range.clone(), r.sent.load(Ordering::SeqCst)))
            .collect()
    }
}

async fn serve(
    mut stream: TcpStream,
    content: &Bytes,
    digest: &str,
    seen: &Mutex<Vec<Request>>,
    gate: &Gate,
    plan: &(dyn Fn(usize) -> Answer + Send + Sync),
) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split(' ').nth(1).unwrap_or_default();
    if !target.ends_with(digest) {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        return;
    }
    let range = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("range")
            .then(|| value.trim().to_owned())
    });
    let sent = Arc::new(AtomicU64::new(0));
    let answer = {
        let mut seen = seen.lock().unwrap();
        seen.push(Request {
            range: range.clone(),
            sent: Arc::clone(&sent),
        });
        plan(seen.len() - 1)
    };
    let start = match (&range, answer.honour_range) {
        (Some(range), true) => range
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok())
            .expect("gantry asks bytes=N-"),
        _ => 0,
    };
    let size = content.len();
    let chunked = matches!(answer.cut, Some((_, Cut::CleanEnd)));
    let mut response = if start > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{size}\r\n",
            size - start,
            size - 1
        )
    } else {
        format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n")
    };
    if chunked {
        response.push_str("transfer-encoding: chunked\r\n");
    }
    response.push_str("content-type: application/octet-stream\r\nconnection: close\r\n\r\n");
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let end = answer.cut.map_or(size, |(at, _)| at.max(start));
    let mut at = start;
    while at < end {
        if answer.hold == Some(at) {
            gate.wait_open().await;
        }
        let stop = answer.hold.filter(|&h| h > at).unwrap_or(end).min(end);
        let next = (at + (64 << 10)).min(stop);
        let data = &content[at..next];
        let written = if chunked {
            let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
            framed.extend_from_slice(data);
            framed.extend_from_slice(b"\r\n");
            stream.write_all(&framed).await
        } else {
            stream.write_all(data).await
        };
        if written.is_err() {
            return;
        }
        sent.fetch_add(data.len() as u64, Ordering::SeqCst);
        at = next;
    }
    if matches!(answer.cut, Some((_, Cut::Stall))) {
        std::future::pending::<()>().await;
    }
    if chunked {
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// Two clients on one flight: the first starts the download, whose first answer is held at
/// [`HOLD`] until the second has joined and both have bytes; then the gate opens. Returns what
/// each client got.
async fn two_clients(
    gantry: &Gantry,
    upstream: &Fault,
    digest: &str,
) -> Vec<Result<(StatusCode, Bytes), String>> {
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let received: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::default()).collect();
    let first = tokio::spawn(stream_into(url.clone(), Arc::clone(&received[0])));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            received[0].load(Ordering::SeqCst) > 0
        })
        .await,
        "the first client receives bytes"
    );
    let second = tokio::spawn(stream_into(url, Arc::clone(&received[1])));
    let joined = wait_until(Duration::from_secs(10), || async {
        sample(&gantry.metrics().await, "gantry_download_joins_total") == Some(1.0)
            && received[1].load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(joined, "the second client follows the same flight");
    assert!(
        received
            .iter()
            .all(|r| r.load(Ordering::SeqCst) <= HOLD as u64),
        "nobody is past the hold before the gate opens"
    );
    upstream.gate.open();
    vec![first.await.unwrap(), second.await.unwrap()]
}

/// `gantry_download_resumes_total{origin,result}` for the fake upstream.
fn resumes(metrics: &str, upstream: &Fault, result: &str) -> Option<f64> {
    let origin = upstream.url.trim_start_matches("http://");
    sample(
        metrics,
        &format!("gantry_download_resumes_total{{origin=\"{origin}\",result=\"{result}\"}}"),
    )
}

/// The case the target of #15 names: the connection closes at 80%; the upstream honours `Range`.
/// One `Range: bytes=N-` with N the byte reached, at most 1.05x the remaining 20% sent again,
/// both clients get the verified blob, and it is committed.
async fn resumes_after(cut: Cut, options: Options<'_>) {
    let (content, digest) = blob(cut as u8);
    let upstream = Fault::start(content.clone(), digest.clone(), move |n| match n {
        0 => Answer {
            honour_range: true,
            cut: Some((BREAK, cut)),
            hold: Some(HOLD),
        },
        _ => WHOLE,
    })
    .await;
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url, options).await;
    for (i, got) in two_clients(&gantry, &upstream, &digest)
        .await
        .into_iter()
        .enumerate()
    {
        let (status, body) = got.unwrap_or_else(|e| panic!("{cut:?}: client {i} failed: {e}"));
        assert_eq!(status, StatusCode::OK, "{cut:?}: client {i}");
        assert!(
            body == content,
            "{cut:?}: client {i} got {} bytes, not the blob",
            body.len()
        );
    }
    let seen = upstream.seen();
    // #15's target first: what the upstream sent after the break, against the remaining 20%.
    let refetched = seen[1..].iter().map(|(_, sent)| sent).sum::<u64>() as f64;
    assert!(
        refetched <= 1.05 * (SIZE - BREAK) as f64,
        "{cut:?}: {refetched} bytes fetched after the break, remaining {}",
        SIZE - BREAK
    );
    assert_eq!(
        seen,
        vec![
            (None, BREAK as u64),
            (Some(format!("bytes={BREAK}-")), (SIZE - BREAK) as u64)
        ],
        "{cut:?}: one GET to the break, then one Range request from the byte reached"
    );
    gantry.settled().await;
    let store = gantry.dir.path().join("store");
    assert!(blob_path(&store, &digest).exists(), "{cut:?}: committed");
    assert!(dir_is_empty(&store.join("tmp")), "{cut:?}: tmp/ is clean");
    let metrics = gantry.metrics().await;
    assert_eq!(
        resumes(&metrics, &upstream, "resumed"),
        Some(1.0),
        "{cut:?}"
    );
    assert_eq!(
        value(&metrics, "gantry_download_refetched_bytes_total"),
        0.0,
        "{cut:?}: the 206 sent nothing twice"
    );
    // Served from the store now: no further upstream request.
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    assert_eq!(http_get(&url, &[]).await.unwrap().body, content);
    assert_eq!(upstream.seen().len(), 2);
    gantry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_at_80_percent_resumes_from_the_byte_reached() {
    resumes_after(Cut::Close, Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_ends_cleanly_short_resumes_from_the_byte_reached() {
    resumes_after(Cut::CleanEnd, Options::default()).await;
}

/// A body that stops sending: after `timeouts.idle` it is asked for again from the byte reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_resumes_after_the_idle_timeout() {
    let options = Options {
        timeouts: "  idle: 1s",
        ..Options::default()
    };
    resumes_after(Cut::Stall, options).await;
}

/// An upstream that answers the resumed request with the whole blob (`200`): its first N bytes
/// are dropped (and counted as re-fetched on gantry's side too), the rest goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_ignores_range_is_resumed_by_dropping_what_was_had() {
    let (content, digest) = blob(11);
    let upstream = Fault::start(content.clone(), digest.clone(), |n| Answer {
        honour_range: false,
        cut: (n == 0).then_some((BREAK, Cut::Close)),
        hold: (n == 0).then_some(HOLD),
    })
    .await;
    let gantry = Gantry::start(&upstream.url).await;
    for got in two_clients(&gantry, &upstream, &digest).await {
        let (status, body) = got.expect("both clients get the blob");
        assert_eq!(status, StatusCode::OK);
        assert!(body == content, "got {} bytes, not the blob", body.len());
    }
    assert_eq!(
        upstream.seen(),
        vec![
            (None, BREAK as u64),
            (Some(format!("bytes={BREAK}-")), SIZE as u64)
        ],
        "the resumed request asked from the byte reached and got it all"
    );
    gantry.settled().await;
    assert!(blob_path(&gantry.dir.path().join("store"), &digest).exists());
    let metrics = gantry.metrics().await;
    assert_eq!(
        value(&metrics, "gantry_download_refetched_bytes_total"),
        BREAK as f64,
        "the bytes before the offset, sent again"
    );
    assert_eq!(resumes(&metrics, &upstream, "resumed"), Some(1.0));
    gantry.stop().await;
}

/// An upstream that breaks off every time, each time at the same byte: after the initial GET and
/// `limits.download_resumes` (2) requests from that byte, the download fails as a broken body
/// does (`upstream_unavailable`), and nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_breaks_every_time_is_given_up_after_the_attempts() {
    let (content, digest) = blob(23);
    let upstream = Fault::start(content.clone(), digest.clone(), |_| Answer {
        honour_range: true,
        cut: Some((BREAK, Cut::Close)),
        hold: None,
    })
    .await;
    let options = Options {
        extra: "limits:\n  download_resumes: 2",
        ..Options::default()
    };
    let gantry = Gantry::start_with(tempfile::tempdir().unwrap(), &upstream.url, options).await;
    let url = gantry.url(&format!("/v2/team/app/blobs/{digest}"));
    let got = http_get(&url, &[]).await;
    assert!(
        got.is_err(),
        "the client's transfer fails: {:?}",
        got.map(|r| (r.status, r.body.len()))
    );
    let range = Some(format!("bytes={BREAK}-"));
    assert_eq!(
        upstream.seen(),
        vec![(None, BREAK as u64), (range.clone(), 0), (range, 0)],
        "one GET and two requests from the byte reached, no more"
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            sample(
                &gantry.metrics().await,
                "gantry_download_failures_total{reason=\"upstream_unavailable\"}",
            ) == Some(1.0)
        })
        .await,
        "counted as the broken body it is"
    );
    let metrics = gantry.metrics().await;
    assert_eq!(resumes(&metrics, &upstream, "resumed"), Some(2.0));
    assert_eq!(resumes(&metrics, &upstream, "gave_up"), Some(1.0));
    let store = gantry.dir.path().join("store");
    assert!(!blob_path(&store, &digest).exists(), "nothing committed");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            dir_is_empty(&store.join("tmp"))
        })
        .await,
        "tmp/ is clean"
    );
    gantry.stop().await;
}
