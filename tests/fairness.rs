//! Fair shares of the machine: a per-client request budget that holds back one noisy client
//! while the others pull, and the open-file limit gantry raises for itself at start-up.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use common::metrics::value;
use common::{
    config_yaml, free_port, http_get, require_tools, wait_until, Fixture, Gantry, Options, Reply,
    ACCEPT_ALL,
};

type SourceClient = Client<HttpConnector, Empty<Bytes>>;

/// A client whose connections come from `source` (any 127.0.0.0/8 address is loopback on Linux),
/// so gantry sees it as its own client.
fn client_from(source: [u8; 4]) -> SourceClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(IpAddr::from(source)));
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn get(client: &SourceClient, url: &str, accept: Option<&str>) -> Reply {
    let mut request = Request::get(url);
    if let Some(accept) = accept {
        request = request.header(http::header::ACCEPT, accept);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        client.request(request.body(Empty::new()).unwrap()),
    )
    .await
    .expect("an answer within 60 s")
    .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

const BURST: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_client_is_held_back_while_another_pulls() {
    if !require_tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let fixture = Fixture::start().await;
    let limits = format!(
        "limits:\n  requests_per_second_per_client: 1\n  requests_burst_per_client: {BURST}\n"
    );
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &fixture.proxy.url(),
        Options {
            extra: &limits,
            ..Options::default()
        },
    )
    .await;
    let noisy = client_from([127, 0, 0, 2]);
    let quiet = client_from([127, 0, 0, 3]);
    let base = gantry.url("/v2/");
    let (refusing, refused) = tokio::sync::oneshot::channel();

    // The noisy client sends a bounded burst four times its budget; the quiet one pulls a whole
    // image (7 requests, within its own budget) once the noisy one is being refused.
    let noisy_burst = async {
        let started = Instant::now();
        let mut replies = Vec::new();
        let mut refusing = Some(refusing);
        for _ in 0..4 * BURST {
            let reply = get(&noisy, &base, None).await;
            if reply.status == StatusCode::TOO_MANY_REQUESTS {
                if let Some(refusing) = refusing.take() {
                    let _ = refusing.send(());
                }
            }
            replies.push(reply);
        }
        (replies, started.elapsed())
    };
    let quiet_pull = async {
        refused.await.expect("the noisy client was refused");
        let mut statuses = vec![get(&quiet, &base, None).await.status];
        let manifest = get(
            &quiet,
            &gantry.url(&format!(
                "/v2/test/multi/manifests/{}",
                fixture.multi.manifest_digest
            )),
            Some(ACCEPT_ALL),
        )
        .await;
        statuses.push(manifest.status);
        let mut blobs = Vec::new();
        for digest in fixture.multi.blobs() {
            let blob = get(
                &quiet,
                &gantry.url(&format!("/v2/test/multi/blobs/{digest}")),
                None,
            )
            .await;
            statuses.push(blob.status);
            blobs.push((digest, blob.body));
        }
        (statuses, blobs)
    };
    let ((replies, elapsed), (quiet_statuses, quiet_blobs)) = tokio::join!(noisy_burst, quiet_pull);

    assert_eq!(quiet_statuses, vec![StatusCode::OK; 7], "the quiet client");
    for (digest, body) in quiet_blobs {
        use sha2::Digest as _;
        let got = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
        assert_eq!(got, digest, "the quiet client's blob");
    }
    // A full bucket serves the burst; after it, at most one more per second passed.
    let served = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert!(
        replies[..BURST].iter().all(|r| r.status == StatusCode::OK),
        "the burst is served"
    );
    assert!(
        served <= BURST + elapsed.as_secs() as usize,
        "{served} of {} served in {elapsed:?}",
        replies.len()
    );
    let refusals: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(refusals.len(), replies.len() - served, "only 200s and 429s");
    let mut retry_after = 0;
    for refusal in &refusals {
        assert_eq!(refusal.error_code().as_deref(), Some("TOOMANYREQUESTS"));
        // At 1 request per second the next token is at most a second away.
        retry_after = refusal
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert_eq!(retry_after, 1);
    }
    // The admin listener has no budget, even for a client the API is refusing.
    assert_eq!(
        get(&noisy, &gantry.admin_url("/metrics"), None)
            .await
            .status,
        StatusCode::OK
    );
    let scrape = gantry.metrics().await;
    assert_eq!(
        value(&scrape, "gantry_client_rate_limited_total"),
        refusals.len() as f64
    );
    assert_eq!(
        value(
            &scrape,
            "gantry_http_requests_total{method=\"GET\",route=\"base\",status=\"429\"}"
        ),
        refusals.len() as f64
    );

    // Waiting what Retry-After said is enough: the token it announced is there.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(get(&noisy, &base, None).await.status, StatusCode::OK);
    gantry.stop().await;
}

/// The soft and hard `Max open files` of a process, from /proc/PID/limits.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file line in:\n{limits}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// The current hard open-file limit of this (test) process.
fn hard_limit() -> u64 {
    open_file_limits(std::process::id()).1
}

/// gantry as a process started with the given open-file limits, serving; its log file.
struct Limited {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Limited {
    async fn start(dir: &Path, soft: u64, hard: u64, extra: &str) -> Self {
        let port = free_port();
        let config = dir.join("gantry.yaml");
        let yaml = config_yaml(
            dir,
            "http://127.0.0.1:9",
            Options {
                extra,
                ..Options::default()
            },
        )
        .replace("admin_listen: 127.0.0.1:0", "admin_listen: null")
        .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
        std::fs::write(&config, yaml).unwrap();
        let log = dir.join("gantry.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gantry"));
        command
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true);
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: between fork and exec the closure only calls setrlimit, which is
        // async-signal-safe, on a value copied into it.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command.spawn().expect("the gantry binary runs");
        let started = Self { child, log };
        let url = format!("http://127.0.0.1:{port}/v2/");
        let up = wait_until(Duration::from_secs(20), || {
            let url = url.clone();
            async move { http_get(&url, &[]).await.is_ok() }
        })
        .await;
        assert!(up, "gantry did not start:\n{}", started.log());
        // Start-up lines, the limit's among them, come before this one.
        let logged = wait_until(Duration::from_secs(10), || async {
            started.log().contains("gantry is serving")
        })
        .await;
        assert!(logged, "no start-up line:\n{}", started.log());
        started
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_raises_its_soft_open_file_limit_to_the_hard_one() {
    let hard = hard_limit();
    // 64 connections need 2 × 64 + 2 × 64 downloads + 64 idle upstream + 64 = 384 descriptors.
    if hard <= 384 {
        eprintln!("SKIPPED: the hard open-file limit is {hard}, too low to show a raise");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gantry = Limited::start(dir.path(), 256, hard, "limits:\n  max_connections: 64\n").await;
    assert_eq!(open_file_limits(gantry.pid()), (hard, hard));
    let log = gantry.log();
    assert!(!log.contains("open-file limit"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_warns_when_its_connections_cannot_fit_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    // The default 4096 connections need 2 × 4096 + 2 × 64 + 64 + 64 = 8448 descriptors.
    let gantry = Limited::start(dir.path(), 512, 512, "").await;
    assert_eq!(open_file_limits(gantry.pid()), (512, 512));
    let log = gantry.log();
    assert!(
        log.contains("the open-file limit is 512 but the configuration can use 8448"),
        "{log}"
    );
}
