//! An upstream that writes its HTTP/1.1 responses by hand on a TCP socket, for what hyper as a
//! server refuses to send: a body that ends cleanly (a proper last chunk) with fewer or more
//! bytes than its `Content-Length`, and a body held back at a [`Gate`] until the test opens it,
//! so that requests provably overlap a download.
//!
//! Each connection serves one request and closes (`connection: close`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A point in a response body where the fake waits until the test calls [`Gate::open`].
#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    pub fn new() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }

    pub fn open(&self) {
        self.0.send_replace(true);
    }

    pub fn is_open(&self) -> bool {
        *self.0.borrow()
    }

    async fn wait(&self) {
        let mut open = self.0.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

enum Part {
    Bytes(Bytes),
    Gate(Gate),
}

/// A response as the bytes to write, in order.
pub struct Raw {
    parts: Vec<Part>,
}

impl Raw {
    /// The status line and headers (plus `connection: close`), nothing of the body yet.
    pub fn head(status: u16, headers: &[(&str, &str)]) -> Self {
        let mut head = format!("HTTP/1.1 {status} Whatever\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("connection: close\r\n\r\n");
        Self {
            parts: vec![Part::Bytes(head.into())],
        }
    }

    /// `200` with `content-length: N` (which the body need not match) and `transfer-encoding:
    /// chunked`, which decides where the body ends (RFC 9112 §6.3), so it can end cleanly at
    /// any length.
    pub fn chunked_claiming(content_length: usize) -> Self {
        Self::head(
            200,
            &[
                ("content-type", "application/octet-stream"),
                ("content-length", &content_length.to_string()),
                ("transfer-encoding", "chunked"),
            ],
        )
    }

    pub fn not_found() -> Self {
        Self::head(404, &[("content-length", "0")])
    }

    /// Bytes written as they are.
    pub fn bytes(mut self, bytes: impl Into<Bytes>) -> Self {
        self.parts.push(Part::Bytes(bytes.into()));
        self
    }

    /// One chunk of a chunked body.
    pub fn chunk(self, data: &[u8]) -> Self {
        let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
        framed.extend_from_slice(data);
        framed.extend_from_slice(b"\r\n");
        self.bytes(framed)
    }

    /// The last chunk: the body ends here, cleanly.
    pub fn last_chunk(self) -> Self {
        self.bytes(&b"0\r\n\r\n"[..])
    }

    /// Waits for `gate` before writing what follows.
    pub fn gate(mut self, gate: &Gate) -> Self {
        self.parts.push(Part::Gate(gate.clone()));
        self
    }
}

type Handler = dyn Fn(&str) -> Raw + Send + Sync;

pub struct RawFake {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawFake {
    /// `handler` gets each request's target (path and query) and returns what to write.
    pub async fn start(handler: impl Fn(&str) -> Raw + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let task_seen = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, handler) = (Arc::clone(&task_seen), Arc::clone(&handler));
                tokio::spawn(serve(stream, seen, handler));
            }
        });
        Self { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Request lines seen so far, e.g. `GET /v2/team/app/blobs/sha256:...`.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for RawFake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, seen: Arc<Mutex<Vec<String>>>, handler: Arc<Handler>) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
        if head.len() > 64 << 10 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split(' ');
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    seen.lock().unwrap().push(format!("{method} {target}"));
    for part in handler(target).parts {
        let written = match part {
            Part::Bytes(bytes) => stream.write_all(&bytes).await,
            Part::Gate(gate) => {
                gate.wait().await;
                Ok(())
            }
        };
        if written.is_err() {
            return;
        }
        let _ = stream.flush().await;
    }
    let _ = stream.shutdown().await;
}
