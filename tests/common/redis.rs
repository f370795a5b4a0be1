//! A real `redis-server` on its own port in a temp dir, with no persistence, that tests can kill
//! and bring back on the same port.

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

    /// Keys matching `pattern`, read with a raw RESP exchange (no client library needed).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let command = format!("*2\r\n$4\r\nKEYS\r\n${}\r\n{pattern}\r\n", pattern.len());
        stream.write_all(command.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        let mut buffer = [0u8; 65536];
        loop {
            let n =
                tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buffer)).await;
            match n {
                Ok(Ok(n)) if n > 0 => reply.extend_from_slice(&buffer[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&reply)
            .lines()
            .filter(|line| !line.starts_with('*') && !line.starts_with('$'))
            .map(str::to_owned)
            .collect()
    }
}
