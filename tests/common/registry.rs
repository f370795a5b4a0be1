//! The real upstream: Debian's `docker-registry` (CNCF distribution 2.8) on an ephemeral port in a
//! temp dir, optionally behind htpasswd Basic auth, and a counting pass-through in front of it
//! that records every request gantry makes and can play dead.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

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

/// A pass-through to the upstream that records requests and can refuse them (an outage).
pub struct CountingProxy {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let down = Arc::new(AtomicBool::new(false));
        let client = super::client();
        let (task_seen, task_down) = (Arc::clone(&seen), Arc::clone(&down));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if task_down.load(Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let (seen, down, client) = (
                    Arc::clone(&task_seen),
                    Arc::clone(&task_down),
                    client.clone(),
                );
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (seen, down, client) =
                            (Arc::clone(&seen), Arc::clone(&down), client.clone());
                        async move {
                            if down.load(Ordering::SeqCst) {
                                return Err("upstream is down".to_owned());
                            }
                            seen.lock().unwrap().push(Seen {
                                method: request.method().clone(),
                                path: request.uri().to_string(),
                                authorization: request
                                    .headers()
                                    .contains_key(http::header::AUTHORIZATION),
                            });
                            let (parts, _) = request.into_parts();
                            let mut forwarded =
                                Request::builder().method(parts.method).uri(format!(
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
                            client
                                .request(forwarded)
                                .await
                                .map(|response: Response<Incoming>| response)
                                .map_err(|e| e.to_string())
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
            seen,
            down,
            task,
        }
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

    /// Refuse every connection and request from now on (or serve again).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
