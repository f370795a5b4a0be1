//! nginx as the plain round-robin load balancer users put in front of replicas (a Kubernetes
//! Service does the same): no hashing, so any replica may get any request.

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::{free_port, wait_until};

pub struct RoundRobin {
    pub port: u16,
    child: Child,
    _dir: TempDir,
}

impl RoundRobin {
    /// Starts nginx on a free port, proxying to `backends` (ports on 127.0.0.1) in turn, with
    /// streaming both ways (no buffering), as registry mirrors need.
    pub async fn start(backends: &[u16]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = config(dir.path(), port, backends);
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(super::which("nginx").expect("nginx is installed"))
            .arg("-p")
            .arg(dir.path())
            // Before reading the config nginx opens its compiled-in error log, unless told.
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&path)
            .kill_on_drop(true)
            .spawn()
            .expect("nginx runs");
        let url = format!("http://127.0.0.1:{port}/nginx-alive");
        let up = wait_until(Duration::from_secs(10), || {
            let url = url.clone();
            async move { super::http_get(&url, &[]).await.is_ok() }
        })
        .await;
        assert!(up, "nginx did not start on port {port}");
        Self {
            port,
            child,
            _dir: dir,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn config(dir: &Path, port: u16, backends: &[u16]) -> String {
    let servers: String = backends
        .iter()
        .map(|backend| format!("    server 127.0.0.1:{backend};\n"))
        .collect();
    let dir = dir.display();
    // As root, workers would run as `nobody` and could not use the temp dir.
    let user = if is_root() { "user root root;\n" } else { "" };
    format!(
        "{user}daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
events {{ worker_connections 256; }}\n\
http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
  fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
  upstream replicas {{\n{servers}  }}\n\
  server {{\n    listen 127.0.0.1:{port};\n    location = /nginx-alive {{ return 200; }}\n\
    location / {{\n      proxy_pass http://replicas;\n      proxy_http_version 1.1;\n\
      proxy_set_header Connection \"\";\n      proxy_set_header Host $http_host;\n\
      proxy_buffering off;\n      proxy_request_buffering off;\n      proxy_read_timeout 60s;\n\
      proxy_next_upstream off;\n    }}\n  }}\n}}\n"
    )
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}
