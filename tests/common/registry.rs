//! The real upstream: Debian's `docker-registry` (CNCF distribution 2.8) on an ephemeral port in a
//! temp dir, optionally behind htpasswd Basic auth, and a counting pass-through in front of it
//! that records every request gantry makes, can play dead, and can hold responses half-sent.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use super::{free_port, http_get, wait_until};

/// A running `docker-registry`.
pub struct Registry {
    pub addr: SocketAddr,
    child: Child,
    pub dir: TempDir,
    tls: bool,
}

impl Registry {
    pub async fn start() -> Self {
        Self::start_with_auth(None).await
    }

    /// With `Some(htpasswd_line)`, the registry requires Basic auth (realm `basic-realm`).
    pub async fn start_with_auth(htpasswd: Option<&str>) -> Self {
        Self::start_configured(htpasswd, None).await
    }

    /// Serving HTTPS with `(certificate, key)`; `host()` is then `localhost:PORT`, the name the
    /// test certificate is for.
    pub async fn start_tls(certificate: &Path, key: &Path) -> Self {
        Self::start_configured(None, Some((certificate, key))).await
    }

    async fn start_configured(htpasswd: Option<&str>, tls: Option<(&Path, &Path)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let auth = match htpasswd {
            Some(line) => {
                std::fs::write(dir.path().join("htpasswd"), format!("{line}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                    dir.path().join("htpasswd").display()
                )
            }
            None => String::new(),
        };
        let tls_lines = match tls {
            Some((certificate, key)) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                certificate.display(),
                key.display()
            ),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls_lines}{auth}",
            root = dir.path().join("storage").display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("docker-registry starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let url = format!("http://{addr}/v2/");
        let up = wait_until(Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                match tls {
                    // Up once it accepts connections (the harness client speaks plain HTTP).
                    Some(_) => tokio::net::TcpStream::connect(addr).await.is_ok(),
                    None => http_get(&url, &[]).await.is_ok(),
                }
            }
        })
        .await;
        assert!(
            up,
            "docker-registry did not come up; its log:\n{}",
            Self::read_log(dir.path())
        );
        Self {
            addr,
            child,
            dir,
            tls: tls.is_some(),
        }
    }

    pub fn host(&self) -> String {
        if self.tls {
            format!("localhost:{}", self.addr.port())
        } else {
            self.addr.to_string()
        }
    }

    fn read_log(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// One request seen by the [`CountingProxy`].
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub authorization: bool,
}

/// Releases the responses a [`CountingProxy::hold`] rule keeps back.
pub struct Gate {
    open: watch::Sender<bool>,
    held: Arc<AtomicUsize>,
}

impl Gate {
    /// Lets every held response (and every later one under this rule) finish.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Responses waiting at the gate right now: each has sent its headers and the bytes the rule
    /// lets through, and no more.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

impl Drop for Gate {
    /// A test that panics before opening must not leave gantry's downloads hanging for an hour.
    fn drop(&mut self) {
        self.open();
    }
}

struct Hold {
    fragment: String,
    pass: usize,
    open: watch::Receiver<bool>,
    held: Arc<AtomicUsize>,
}

#[derive(Default)]
struct State {
    /// Requests forwarded to the upstream.
    seen: Vec<Seen>,
    /// Requests that arrived while the proxy played dead (answered by closing the connection).
    refused: Vec<Seen>,
    holds: Vec<Arc<Hold>>,
}

type ProxyBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A pass-through to the upstream that records requests, can refuse them (an outage) and can hold
/// responses half-sent (a slow upstream whose pace the test controls, so concurrent requests
/// provably overlap).
pub struct CountingProxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<Mutex<State>> = Arc::default();
        let down = Arc::new(AtomicBool::new(false));
        let client = super::client();
        let (task_state, task_down) = (Arc::clone(&state), Arc::clone(&down));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, down, client) = (
                    Arc::clone(&task_state),
                    Arc::clone(&task_down),
                    client.clone(),
                );
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (state, down, client) =
                            (Arc::clone(&state), Arc::clone(&down), client.clone());
                        async move { forward(target, &state, &down, &client, request).await }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            state,
            down,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests forwarded to the upstream.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Requests that arrived while the proxy was down, each answered by closing its connection.
    pub fn refused(&self) -> Vec<Seen> {
        self.state.lock().unwrap().refused.clone()
    }

    /// Forgets the requests seen and refused so far.
    pub fn clear(&self) {
        let mut state = self.state.lock().unwrap();
        state.seen.clear();
        state.refused.clear();
    }

    /// Requests whose path contains `fragment`, by method.
    pub fn count(&self, method: &Method, fragment: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.path.contains(fragment))
            .count()
    }

    /// Blob GETs per digest.
    pub fn blob_gets(&self) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        for seen in self.seen() {
            if seen.method == Method::GET {
                if let Some((_, digest)) = seen.path.split_once("/blobs/") {
                    *counts.entry(digest.to_owned()).or_insert(0) += 1;
                }
            }
        }
        counts
    }

    /// Refuse every request from now on (or serve again): the proxy reads each request, records
    /// it in [`Self::refused`] and closes the connection without an answer.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// From now on, responses to requests whose path contains `fragment` send their headers and
    /// their first `pass` body bytes, then wait until the returned gate opens (a HEAD's answer,
    /// all headers, waits whole).
    pub fn hold(&self, fragment: &str, pass: usize) -> Gate {
        let (open, receiver) = watch::channel(false);
        let held = Arc::new(AtomicUsize::new(0));
        self.state.lock().unwrap().holds.push(Arc::new(Hold {
            fragment: fragment.to_owned(),
            pass,
            open: receiver,
            held: Arc::clone(&held),
        }));
        Gate { open, held }
    }
}

async fn forward(
    target: SocketAddr,
    state: &Mutex<State>,
    down: &AtomicBool,
    client: &super::TestClient,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, String> {
    let seen = Seen {
        method: request.method().clone(),
        path: request.uri().to_string(),
        authorization: request.headers().contains_key(http::header::AUTHORIZATION),
    };
    let hold = {
        let mut state = state.lock().unwrap();
        if down.load(Ordering::SeqCst) {
            state.refused.push(seen);
            // An error from the service makes hyper close the connection unanswered.
            return Err("upstream is down".to_owned());
        }
        // The newest hold on a path wins, so a test can hold the same path again.
        let hold = state
            .holds
            .iter()
            .rev()
            .find(|hold| seen.path.contains(&hold.fragment))
            .cloned();
        state.seen.push(seen);
        hold
    };
    let (parts, _) = request.into_parts();
    let is_head = parts.method == Method::HEAD;
    let mut forwarded = Request::builder().method(parts.method).uri(format!(
        "http://{target}{}",
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    ));
    for (name, value) in &parts.headers {
        if name != http::header::HOST {
            forwarded = forwarded.header(name, value);
        }
    }
    let forwarded = forwarded.body(http_body_util::Empty::new()).unwrap();
    let response = client.request(forwarded).await.map_err(|e| e.to_string())?;
    // A HEAD answer is all headers: it is held whole.
    if let (Some(hold), true) = (&hold, is_head) {
        hold.held.fetch_add(1, Ordering::SeqCst);
        let mut open = hold.open.clone();
        let _ = open.wait_for(|open| *open).await;
        hold.held.fetch_sub(1, Ordering::SeqCst);
    }
    Ok(match hold {
        None => response.map(|body| body.map_err(Into::into).boxed_unsync()),
        Some(hold) => response.map(|body| held_body(body, hold)),
    })
}

/// Streams `body` through, stopping after `hold.pass` bytes until the gate opens.
fn held_body(mut body: Incoming, hold: Arc<Hold>) -> ProxyBody {
    let (frames, receiver) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
    tokio::spawn(async move {
        let mut passed = 0usize;
        let mut waited = false;
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => {
                    let _ = frames.send(Err(error)).await;
                    return;
                }
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if !waited {
                let allowed = hold.pass.saturating_sub(passed).min(data.len());
                if allowed > 0 {
                    let head = data.split_to(allowed);
                    passed += allowed;
                    if frames.send(Ok(Frame::data(head))).await.is_err() {
                        return;
                    }
                }
                if data.is_empty() {
                    continue;
                }
                hold.held.fetch_add(1, Ordering::SeqCst);
                let mut open = hold.open.clone();
                let _ = open.wait_for(|open| *open).await;
                hold.held.fetch_sub(1, Ordering::SeqCst);
                waited = true;
            }
            if frames.send(Ok(Frame::data(data))).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let frame = receiver.recv().await?;
        Some((frame, receiver))
    });
    StreamBody::new(stream).map_err(Into::into).boxed_unsync()
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
