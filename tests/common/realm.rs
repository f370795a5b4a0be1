//! A token realm on any loopback address (127.0.0.2 is another host than 127.0.0.1 to gantry),
//! that hands out the token `good` and records the `Authorization` of every request.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// (path, Authorization) of each request.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

pub struct Realm {
    pub addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Realm {
    pub async fn start(ip: IpAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let task_seen = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = Arc::clone(&task_seen);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let authorization = request
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        seen.lock()
                            .unwrap()
                            .push((request.uri().path().to_owned(), authorization));
                        async {
                            Ok::<_, std::convert::Infallible>(token_response(Bytes::from_static(
                                br#"{"token":"good"}"#,
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    /// `http://<ip>:<port>`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (path, Authorization) of each request so far.
    pub fn seen(&self) -> Vec<(String, Option<String>)> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for Realm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A token realm that answers any scope with the token `tok:<scope>` and counts the requests for
/// each scope, but holds the answers for scopes containing a fragment until
/// [`HoldingRealm::release`].
pub struct HoldingRealm {
    pub addr: SocketAddr,
    /// The decoded `scope` of each request.
    asked: Arc<Mutex<Vec<String>>>,
    held: Arc<std::sync::atomic::AtomicUsize>,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingRealm {
    pub async fn start(held_fragment: &str) -> Self {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open = tokio::sync::watch::Sender::new(false);
        let (task_asked, task_held, task_open) =
            (Arc::clone(&asked), Arc::clone(&held), open.clone());
        let fragment = held_fragment.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (asked, held, open, fragment) = (
                    Arc::clone(&task_asked),
                    Arc::clone(&task_held),
                    task_open.clone(),
                    fragment.clone(),
                );
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let scope = request
                            .uri()
                            .query()
                            .unwrap_or_default()
                            .split('&')
                            .find_map(|pair| pair.strip_prefix("scope="))
                            .unwrap_or_default()
                            .replace("%3A", ":")
                            .replace("%2F", "/")
                            .replace("%2C", ",");
                        asked.lock().unwrap().push(scope.clone());
                        let (held, mut open, fragment) =
                            (Arc::clone(&held), open.subscribe(), fragment.clone());
                        async move {
                            if scope.contains(&fragment) {
                                held.fetch_add(1, Ordering::SeqCst);
                                let _ = open.wait_for(|open| *open).await;
                                held.fetch_sub(1, Ordering::SeqCst);
                            }
                            let body = serde_json::json!({ "token": format!("tok:{scope}") });
                            Ok::<_, std::convert::Infallible>(token_response(Bytes::from(
                                body.to_string(),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            asked,
            held,
            open,
            task,
        }
    }

    /// `http://127.0.0.1:<port>/token`.
    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// How many token requests asked for `scope`.
    pub fn asked(&self, scope: &str) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|asked| *asked == scope)
            .count()
    }

    /// Answers waiting for [`HoldingRealm::release`] right now.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets every held answer (and every later one) go.
    pub fn release(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for HoldingRealm {
    fn drop(&mut self) {
        self.release();
        self.task.abort();
    }
}

/// A token realm's JSON answer.
fn token_response(body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
