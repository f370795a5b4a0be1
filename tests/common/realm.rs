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
                            let mut response = Response::new(Full::new(Bytes::from_static(
                                br#"{"token":"good"}"#,
                            )));
                            response.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, std::convert::Infallible>(response)
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
