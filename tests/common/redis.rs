//! A real `redis-server` on its own port in a temp dir, with no persistence, that tests can kill
//! and bring back on the same port, with a small RESP reader for what the tests look at (keys,
//! command counts).

use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::{free_port, wait_until};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    pub async fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port.
    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let port = self.port;
        let up = wait_until(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "redis-server did not come up on port {port}");
    }

    /// SIGKILL: Redis disappears mid-run.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Keys matching `pattern`.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        match self.command(&["KEYS", pattern]).await {
            Resp::Array(items) => items
                .into_iter()
                .filter_map(|item| match item {
                    Resp::Bulk(Some(key)) => Some(String::from_utf8_lossy(&key).into_owned()),
                    _ => None,
                })
                .collect(),
            other => panic!("KEYS answered {other:?}"),
        }
    }

    /// How many times `command` (lower case, e.g. `get`) has run since the server started, from
    /// `INFO commandstats`: an event a test can wait on (every tag lookup that misses gantry's
    /// memory is one Redis GET).
    pub async fn calls(&self, command: &str) -> u64 {
        let Resp::Bulk(Some(info)) = self.command(&["INFO", "commandstats"]).await else {
            panic!("INFO did not answer a bulk string");
        };
        let prefix = format!("cmdstat_{command}:calls=");
        String::from_utf8_lossy(&info)
            .lines()
            .find_map(|line| line.strip_prefix(&prefix)?.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// One command over a fresh connection, its reply parsed (no client library needed).
    pub async fn command(&self, args: &[&str]) -> Resp {
        use tokio::io::AsyncWriteExt;
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), read_reply(&mut stream))
            .await
            .expect("redis answers within 10 s")
    }
}

/// A RESP2 reply.
#[derive(Debug)]
pub enum Resp {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
}

fn read_reply<'a>(
    stream: &'a mut tokio::io::BufReader<tokio::net::TcpStream>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Resp> + Send + 'a>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    Box::pin(async move {
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        match kind {
            "+" => Resp::Simple(rest.to_owned()),
            "-" => Resp::Error(rest.to_owned()),
            ":" => Resp::Integer(rest.parse().unwrap()),
            "$" => {
                let Ok(length) = usize::try_from(rest.parse::<i64>().unwrap()) else {
                    return Resp::Bulk(None);
                };
                let mut bytes = vec![0; length + 2];
                stream.read_exact(&mut bytes).await.unwrap();
                bytes.truncate(length);
                Resp::Bulk(Some(bytes))
            }
            "*" => {
                let count = rest.parse::<i64>().unwrap().max(0);
                let mut items = Vec::new();
                for _ in 0..count {
                    items.push(read_reply(stream).await);
                }
                Resp::Array(items)
            }
            _ => panic!("not a RESP reply: {line:?}"),
        }
    })
}

impl RedisServer {
    /// Starts on a given (free) port, e.g. one a client was told about before Redis was up.
    pub async fn start_on(port: u16) -> Self {
        let mut server = Self {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        server.restart().await;
        server
    }

    /// SIGSTOP: Redis hangs. The kernel still accepts connections, nothing answers them.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("redis-server is running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }
}
