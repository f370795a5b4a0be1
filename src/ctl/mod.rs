//! The operator's commands (`gantry ls`, `inspect`, `rm`, `pin`, `unpin`, `refresh`, `stats`): a
//! client of the control plane's admin API (see [`crate::control`]), as `warm` is a client of the
//! mirror. Each command is one function returning the process's exit code: 0 when every part of
//! it worked, 1 otherwise, with the API's own message on stderr.

mod inventory;
mod mutate;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub use inventory::{inspect, ls, stats, ListFilter};
pub use mutate::{pin, refresh, rm, unpin};

pub use crate::human::{human_age, human_size};

/// The flags every operator command takes.
#[derive(Clone, Debug, clap::Args)]
pub struct AdminArgs {
    /// The admin listener of the gantry to talk to.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    pub admin: String,
    /// `admin.token` of that gantry (needed for changes unless it runs on this machine).
    #[arg(long, env = "GANTRY_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("--admin `{0}`: {1}")]
    BadUrl(String, String),
    #[error("cannot reach the admin API at {0}: {1}")]
    Unreachable(String, String),
    #[error("{message} (HTTP {status})")]
    Api { status: StatusCode, message: String },
    #[error("the admin API answered something that is not JSON: {0}")]
    NotJson(String),
}

/// How long one API call may take: a refresh goes to the upstream and back.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Answers larger than this are not the admin API's.
const MAX_ANSWER: usize = 64 << 20;

/// A connection to one gantry's admin API.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(args: &AdminArgs) -> Result<Self, CtlError> {
        let base = args.admin.trim_end_matches('/').to_owned();
        let uri: http::Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| CtlError::BadUrl(base.clone(), e.to_string()))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(CtlError::BadUrl(
                base,
                "must be http://HOST:PORT (the admin listener speaks plain http)".to_owned(),
            ));
        }
        Ok(Self {
            base,
            token: args.token.clone(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    pub async fn get(&self, path_and_query: &str) -> Result<serde_json::Value, CtlError> {
        self.call(Method::GET, path_and_query, None).await
    }

    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, CtlError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Posts `body` and returns the answer whatever its status, with the status: for calls whose
    /// error answers still say what was applied (a purge of several references, one unknown).
    pub async fn post_answer(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(StatusCode, serde_json::Value), CtlError> {
        self.call_answer(Method::POST, path, Some(body)).await
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, CtlError> {
        let (status, value) = self.call_answer(method, path_and_query, body).await?;
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .unwrap_or("no message")
                .to_owned();
            return Err(CtlError::Api { status, message });
        }
        Ok(value)
    }

    async fn call_answer(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), CtlError> {
        let url = format!("{}{path_and_query}", self.base);
        let mut request = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(value) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(value.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(body))
            .map_err(|e| CtlError::BadUrl(url.clone(), e.to_string()))?;
        let unreachable = |e: String| CtlError::Unreachable(self.base.clone(), e);
        let response = tokio::time::timeout(CALL_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| unreachable(format!("no answer within {CALL_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| {
            CtlError::NotJson(String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned())
        })?;
        Ok((status, value))
    }
}

/// Runs one command's future on a small runtime of its own.
fn run<F: std::future::Future<Output = ExitCode>>(command: F) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(command),
        Err(error) => {
            eprintln!("gantry: cannot start a runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `value` as the API sent it (for `--json`).
fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Columns aligned the way `docker images` and `kubectl get` print them: upper-case headers, two
/// spaces between columns, every column as wide as its widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let headers: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut table = Table::new(&["IMAGE", "SIZE"]);
        table.row(vec![
            "docker.io/library/alpine:3.20".into(),
            "3.62MB".into(),
        ]);
        table.row(vec!["x:1".into(), "1B".into()]);
        assert_eq!(
            table.render(),
            "IMAGE                          SIZE\n\
             docker.io/library/alpine:3.20  3.62MB\n\
             x:1                            1B\n"
        );
    }
}
