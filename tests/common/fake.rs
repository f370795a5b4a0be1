//! A scripted upstream for what a real registry will not do on demand: token realms with
//! expiry and scopes, redirects to another host, truncated or corrupt bodies, stalls, 429 and 500.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
}

impl Seen {
    pub fn authorization(&self) -> Option<String> {
        self.headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    pub fn query_param(&self, key: &str) -> Option<String> {
        let query = self.uri.split_once('?')?.1;
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| {
                v.replace("%3A", ":")
                    .replace("%2F", "/")
                    .replace("%2C", ",")
            })
    }
}

/// How a scripted body ends.
#[derive(Clone, Debug)]
pub enum Ending {
    Complete,
    /// The connection breaks after the chunks (a truncated body).
    Abort,
    /// The body stops sending and never finishes.
    Stall,
}

/// A scripted response.
pub struct Scripted {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub chunks: Vec<Bytes>,
    pub ending: Ending,
    /// A pause before each chunk (a slow upstream).
    pub pace: Duration,
}

impl Scripted {
    pub fn new(status: StatusCode) -> Self {
        Self {
            status,
            headers: Vec::new(),
            chunks: Vec::new(),
            ending: Ending::Complete,
            pace: Duration::ZERO,
        }
    }

    pub fn pace(mut self, pause: Duration) -> Self {
        self.pace = pause;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, bytes: impl Into<Bytes>) -> Self {
        self.chunks.push(bytes.into());
        self
    }

    pub fn ending(mut self, ending: Ending) -> Self {
        self.ending = ending;
        self
    }

    pub fn json(status: StatusCode, value: serde_json::Value) -> Self {
        Self::new(status)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&value).unwrap())
    }
}

type Handler = dyn Fn(&Seen) -> Scripted + Send + Sync;

pub struct Fake {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    pub async fn start(handler: impl Fn(&Seen) -> Scripted + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let task_seen = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, handler) = (Arc::clone(&task_seen), Arc::clone(&handler));
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let request = Seen {
                            method: request.method().clone(),
                            uri: request.uri().to_string(),
                            headers: request.headers().clone(),
                        };
                        seen.lock().unwrap().push(request.clone());
                        let scripted = handler(&request);
                        async move { Ok::<_, std::convert::Infallible>(respond(scripted)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn respond(scripted: Scripted) -> Response<UnsyncBoxBody<Bytes, std::io::Error>> {
    let ending = scripted.ending.clone();
    let chunks = scripted.chunks;
    let pace = scripted.pace;
    let stream =
        futures_util::stream::unfold((chunks.into_iter(), false), move |(mut chunks, ended)| {
            let ending = ending.clone();
            async move {
                if ended {
                    return None;
                }
                if let Some(chunk) = chunks.next() {
                    tokio::time::sleep(pace).await;
                    return Some((Ok(Frame::data(chunk)), (chunks, false)));
                }
                match ending {
                    Ending::Complete => None,
                    Ending::Abort => {
                        Some((Err(std::io::Error::other("scripted abort")), (chunks, true)))
                    }
                    Ending::Stall => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        None
                    }
                }
            }
        });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    *response.status_mut() = scripted.status;
    for (name, value) in scripted.headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(&value).unwrap(),
        );
    }
    response
}
