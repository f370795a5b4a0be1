//! A blob upstream that counts the responses it has open at once: each body is sent in paced
//! chunks, and a response counts from its request's arrival until its body is finished or
//! dropped. `peak` is the most that were ever open together (for `limits.max_downloads`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    peak: AtomicUsize,
    requests: AtomicUsize,
}

/// Holds one open response; dropping it (body finished or abandoned) closes it.
struct Open(Arc<Counts>);

impl Open {
    fn new(counts: &Arc<Counts>) -> Self {
        counts.requests.fetch_add(1, Ordering::SeqCst);
        let now = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
        counts.peak.fetch_max(now, Ordering::SeqCst);
        Self(Arc::clone(counts))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct GaugedBlobs {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl GaugedBlobs {
    /// Serves `blobs` (digest → content) at any `/v2/<name>/blobs/<digest>`, each in `chunks`
    /// pieces with `pace` before each piece.
    pub async fn start(blobs: HashMap<String, Bytes>, chunks: usize, pace: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts: Arc<Counts> = Arc::default();
        let blobs = Arc::new(blobs);
        let task_counts = Arc::clone(&counts);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (counts, blobs) = (Arc::clone(&task_counts), Arc::clone(&blobs));
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let found = request
                            .uri()
                            .path()
                            .rsplit_once("/blobs/")
                            .and_then(|(_, digest)| blobs.get(digest).cloned());
                        let counts = Arc::clone(&counts);
                        async move {
                            Ok::<_, std::convert::Infallible>(respond(found, &counts, chunks, pace))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, counts, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The most responses that were open at the same time.
    pub fn peak(&self) -> usize {
        self.counts.peak.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }
}

impl Drop for GaugedBlobs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

fn respond(
    found: Option<Bytes>,
    counts: &Arc<Counts>,
    chunks: usize,
    pace: Duration,
) -> Response<Body> {
    let Some(content) = found else {
        let mut response = Response::new(
            Full::new(Bytes::new())
                .map_err(|e| match e {})
                .boxed_unsync(),
        );
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    };
    let open = Open::new(counts);
    let piece = content.len().div_ceil(chunks.max(1));
    let pieces: Vec<Bytes> = (0..content.len())
        .step_by(piece.max(1))
        .map(|start| content.slice(start..(start + piece).min(content.len())))
        .collect();
    let length = content.len();
    let stream = futures_util::stream::unfold(
        (pieces.into_iter(), Some(open)),
        move |(mut pieces, open)| async move {
            let piece = pieces.next()?;
            tokio::time::sleep(pace).await;
            Some((Ok(Frame::data(piece)), (pieces, open)))
        },
    );
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    response
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, length.into());
    response
}
