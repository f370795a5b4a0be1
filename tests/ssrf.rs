//! `allow_any_registry` does not turn the mirror into a door to the network it runs in: a registry
//! a client names is reached only at public addresses (or ranges the operator allowed), and so are
//! its redirects and token realms. Every refusal is a 4xx with an OCI body, and recording
//! listeners on the forbidden addresses prove no connection was even opened.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use common::fake::{Fake, Scripted};
use common::metrics::value;
use common::process::GantryProcess;
use common::{config_yaml, http_get, request, require_tools, Gantry, Options};

/// A listener that only counts the connections made to it.
struct Recorder {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl Recorder {
    async fn start(ip: &str) -> Option<Self> {
        let listener = TcpListener::bind((ip, 0)).await.ok()?;
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Some(Self { addr, connections })
    }

    fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn any_registry(allowed: &str) -> String {
    format!("allow_any_registry: true\nallow_any_registry_networks: [{allowed}]")
}

/// Every spelling of a loopback host a client can write, by path prefix and by `ns=`, for
/// manifests and blobs, GET and HEAD: a 4xx each, and not one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_a_client_names_on_loopback_are_refused_without_a_connection() {
    let recorder = Recorder::start("127.0.0.1")
        .await
        .expect("loopback listener");
    let recorder6 = Recorder::start("::1").await;
    let default_upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;
    let extra = any_registry("");
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    let gantry = Gantry::start_with(
        tempfile::tempdir().unwrap(),
        &default_upstream.url(),
        options,
    )
    .await;
    let port = recorder.addr.port();
    let port6 = recorder6.as_ref().map_or(1, |r| r.addr.port());
    let hosts = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("127.1:{port}"),
        format!("2130706433:{port}"),
        format!("0177.0.0.1:{port}"),
        format!("0x7f.1:{port}"),
        format!("0x7f000001:{port}"),
        format!("[::1]:{port6}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("[::ffff:7f00:1]:{port}"),
        // Not listening, but the same rule: the metadata service and a private range.
        "169.254.169.254".to_owned(),
        "10.0.0.1:5000".to_owned(),
    ];
    let digest = format!("sha256:{}", "a".repeat(64));
    let mut refusals = 0;
    for host in &hosts {
        let encoded = host
            .replace(':', "%3A")
            .replace('[', "%5B")
            .replace(']', "%5D");
        let paths = [
            format!("/v2/{host}/team/app/manifests/v1"),
            format!("/v2/team/app/manifests/v1?ns={host}"),
            format!("/v2/team/app/manifests/v1?ns={encoded}"),
            format!("/v2/team/app/blobs/{digest}?ns={host}"),
            format!("/v2/{host}/team/app/tags/list"),
        ];
        for path in &paths {
            for method in [Method::GET, Method::HEAD] {
                let reply = request(method.clone(), &gantry.url(path), &[])
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                assert!(
                    reply.status.is_client_error(),
                    "{method} {path}: {} {:?}",
                    reply.status,
                    reply.body
                );
                if method == Method::GET {
                    let code = reply.error_code();
                    assert!(
                        matches!(
                            code.as_deref(),
                            Some("DENIED" | "NAME_UNKNOWN" | "NAME_INVALID")
                        ),
                        "{path}: {code:?}"
                    );
                    if code.as_deref() == Some("DENIED") {
                        refusals += 1;
                        let message = String::from_utf8_lossy(&reply.body);
                        assert!(
                            message.contains("allow_any_registry_networks")
                                || message.contains("dotted-quad"),
                            "the refusal says why: {message}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(
        recorder.count(),
        0,
        "a connection reached the loopback listener"
    );
    if let Some(recorder6) = &recorder6 {
        assert_eq!(
            recorder6.count(),
            0,
            "a connection reached the [::1] listener"
        );
    }
    // Host names, dotted and numeric forms are resolved and refused (DENIED); bracketed IPv6 is
    // not a registry host in docker's grammar and gets NAME_UNKNOWN / NAME_INVALID before that.
    assert!(refusals >= 7 * 4, "refusals: {refusals}");
    let metrics = gantry.metrics().await;
    assert!(
        value(
            &metrics,
            r#"gantry_outbound_refused_total{class="loopback"}"#
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        value(
            &metrics,
            r#"gantry_outbound_refused_total{class="link_local"}"#
        ) >= 1.0
    );
    assert!(
        value(
            &metrics,
            r#"gantry_outbound_refused_total{class="private"}"#
        ) >= 1.0
    );
    // Still serving.
    let ping = http_get(&gantry.url("/v2/"), &[]).await.unwrap();
    assert_eq!(ping.status, StatusCode::OK);
    assert!(
        default_upstream.seen().is_empty(),
        "nothing went to the default source"
    );
}

/// A name that resolves to loopback through /etc/hosts (in a private mount namespace of the
/// gantry process only) is refused like the address itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_resolves_to_loopback_is_refused() {
    if !require_tools(&["unshare", "mount"]) {
        return;
    }
    let recorder = Recorder::start("127.0.0.1").await.unwrap();
    let default_upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 registry.internal.test\n10.1.2.3 private.internal.test\n",
    )
    .unwrap();
    let extra = any_registry("");
    let mut gantry =
        NamespacedGantry::start(dir.path(), &default_upstream.url(), &extra, &hosts).await;
    let port = recorder.addr.port();
    for host in [
        format!("registry.internal.test:{port}"),
        "private.internal.test".to_owned(),
    ] {
        let reply = http_get(
            &gantry.url(&format!("/v2/team/app/manifests/v1?ns={host}")),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{host}: {}",
            gantry.log()
        );
        assert_eq!(reply.error_code().as_deref(), Some("DENIED"));
    }
    assert_eq!(recorder.count(), 0);
    gantry.stop().await;
}

/// The positive case through an allowed range, and what its upstream may not do: redirect, or
/// send its token realm, to an address outside that range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_token_realms_of_a_named_registry_are_checked_too() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let forbidden = Recorder::start("127.0.0.2")
        .await
        .expect("127.0.0.2 listener");
    let certs = tempfile::tempdir().unwrap();
    let (ca, certificate, key) = common::clients::test_certificate(certs.path());
    let target = forbidden.addr;
    let upstream = TlsUpstream::start(&certificate, &key, move |path| {
        if path.contains("/manifests/redirected") {
            redirect(&format!("https://{target}/v2/stolen"))
        } else if path.contains("/manifests/metadata") {
            redirect("http://169.254.169.254/latest/meta-data/")
        } else if path.contains("/manifests/token") {
            let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            response.headers_mut().insert(
                "www-authenticate",
                format!("Bearer realm=\"https://{target}/token\",service=\"s\"")
                    .parse()
                    .unwrap(),
            );
            response
        } else {
            let body = Bytes::from_static(b"{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a\",\"size\":2},\"layers\":[]}");
            let mut response = Response::new(Full::new(body));
            response.headers_mut().insert(
                "content-type",
                "application/vnd.oci.image.manifest.v1+json".parse().unwrap(),
            );
            response
        }
    })
    .await;
    let default_upstream = Fake::start(|_| Scripted::new(StatusCode::NOT_FOUND)).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = any_registry("127.0.0.1/32");
    let options = Options {
        extra: &extra,
        ..Options::default()
    };
    let mut gantry = GantryProcess::configure(dir.path(), &default_upstream.url(), options);
    gantry.env("SSL_CERT_FILE", &ca.display().to_string());
    gantry.start().await;
    let host = format!("localhost:{}", upstream.port());
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];

    let allowed = http_get(
        &gantry.url(&format!("/v2/team/app/manifests/v1?ns={host}")),
        &accept,
    )
    .await
    .unwrap();
    assert_eq!(allowed.status, StatusCode::OK, "{}", gantry.log());
    for tag in ["redirected", "metadata", "token"] {
        let reply = http_get(
            &gantry.url(&format!("/v2/team/app/manifests/{tag}?ns={host}")),
            &accept,
        )
        .await
        .unwrap();
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{tag}: {}",
            gantry.log()
        );
        assert_eq!(reply.error_code().as_deref(), Some("DENIED"), "{tag}");
    }
    assert_eq!(
        forbidden.count(),
        0,
        "a redirect or token realm reached 127.0.0.2"
    );
    assert!(upstream.requests() >= 4);
}

fn redirect(location: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    response
        .headers_mut()
        .insert("location", location.parse().unwrap());
    response
}

/// A small https upstream (the test CA's certificate for localhost / 127.0.0.1) answering each
/// request path through `answer`.
struct TlsUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl TlsUpstream {
    async fn start<F>(certificate: &Path, key: &Path, answer: F) -> Self
    where
        F: Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&requests);
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, answer, count) =
                    (acceptor.clone(), Arc::clone(&answer), Arc::clone(&count));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let service =
                        service_fn(move |request: http::Request<hyper::body::Incoming>| {
                            count.fetch_add(1, Ordering::SeqCst);
                            let response = answer(request.uri().path());
                            async move { Ok::<_, std::convert::Infallible>(response) }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, requests }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// gantry as a process in a private mount namespace whose /etc/hosts is the test's file.
struct NamespacedGantry {
    port: u16,
    log: std::path::PathBuf,
    child: tokio::process::Child,
}

impl NamespacedGantry {
    async fn start(dir: &Path, upstream_url: &str, extra: &str, hosts: &Path) -> Self {
        let port = common::free_port();
        let options = Options {
            extra,
            ..Options::default()
        };
        let yaml = config_yaml(dir, upstream_url, options)
            .replace("admin_listen: 127.0.0.1:0", "admin_listen: null")
            .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
        let config = dir.join("gantry.yaml");
        std::fs::write(&config, yaml).unwrap();
        let log = dir.join("gantry.log");
        let out = std::fs::File::create(&log).unwrap();
        let script = format!(
            "mount --bind {} /etc/hosts && exec {} serve --config {}",
            hosts.display(),
            env!("CARGO_BIN_EXE_gantry"),
            config.display()
        );
        let child = tokio::process::Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let gantry = Self { port, log, child };
        assert!(
            common::process::serving(&gantry.url("/v2/")).await,
            "gantry did not start in its namespace:\n{}",
            gantry.log()
        );
        gantry
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}
