//! Listeners and connections: HTTP/1.1 and h2c on one port, a connection limit, a header-read
//! timeout, per-client request budgets, one log line per request, and graceful shutdown with a
//! deadline, for a built [`App`]. Also the admin listener (`/metrics`, `/healthz`, `/readyz`) and
//! the open-file limit. Plain and TLS connections share one [`serve_connection`].

mod admin;
mod client_limit;
mod request_log;
mod rlimit;
mod send_timeout;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::access::Access;
use crate::api::{Api, Outcome, ResponseBody, Route};
use crate::app::{App, BuildError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::tls::TlsState;
use client_limit::ClientLimiter;
use http_body_util::BodyExt;
use request_log::{LoggedBody, RequestLog};
use send_timeout::SendTimeout;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A started gantry: its bound addresses and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub mirror: Arc<Mirror>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// `timeouts.shutdown`: for the in-flight requests and then the downloads together.
    grace: Duration,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, then lets the mirror's downloads finish
    /// (a client has a blob's last byte before its commit), all within `timeouts.shutdown`.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.grace;
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let abandoned = self.mirror.drain(deadline).await;
        if abandoned > 0 {
            tracing::warn!(abandoned, grace = ?self.grace, "shutdown deadline reached; abandoning running downloads");
        }
    }
}

/// Builds gantry from `config` ([`App::build`]) and serves it. Bad configuration has been
/// rejected by now; what fails here is the environment (a busy port, an unwritable disk).
pub async fn start(config: Config) -> Result<Running, StartError> {
    rlimit::raise(&config);
    let app = App::build(&config).await?;
    serve(app).await
}

/// Binds the listeners of a built [`App`] and starts serving it.
pub async fn serve(app: App) -> Result<Running, StartError> {
    let App {
        config,
        metrics,
        mirror,
        object_tier,
        api,
        control,
        access,
        tls,
        ..
    } = app;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let listener = bind(config.listen.0).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen.0,
        source,
    })?;
    let admin_listener = match config.admin_listen {
        Some(admin) => Some(bind(admin.0).await?),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    let (shutdown, shutdown_rx) = watch::channel(false);
    let limits = ConnectionLimits {
        max_connections: config.limits.max_connections,
        header_read: config.timeouts.header_read.0,
        send: config.timeouts.send.0,
        grace: config.timeouts.shutdown.0,
    };
    let api_metrics = Arc::clone(&metrics);
    let limiter = config
        .limits
        .client_rate()
        .map(|rate| Arc::new(ClientLimiter::new(rate)));
    let handler = move |peer: SocketAddr, request: Request<Incoming>| {
        let api = api.clone();
        let metrics = Arc::clone(&api_metrics);
        let limiter = limiter.clone();
        // Boxed: hyper keeps room for one in-flight request future in every connection, idle or
        // not, and this one is ~8 KiB; boxed, an idle connection holds a pointer instead.
        Box::pin(async move {
            Ok::<_, Infallible>(logged(&api, &metrics, limiter.as_deref(), peer, request).await)
        })
    };
    let mut tasks = vec![tokio::spawn(accept_loop(
        listener,
        handler,
        limits,
        tls.clone(),
        shutdown_rx.clone(),
    ))];
    if tls.is_some() || access.is_some() {
        tasks.push(tokio::spawn(reload_on_sighup(
            tls,
            access,
            shutdown_rx.clone(),
        )));
    }
    // Other replicas' purges, pins and refreshes apply here whether or not this one has an admin listener.
    tasks.extend(control.follow_events(&config.storage.path, shutdown_rx.clone()));
    if let Some(admin_listener) = admin_listener {
        tasks.push(control.sample_history(shutdown_rx.clone()));
        let admin = admin::Admin::new(Arc::clone(&mirror), Arc::clone(&metrics), control)
            .with_object_tier(object_tier);
        let handler = move |peer: SocketAddr, request: Request<Incoming>| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.handle(request, peer).await) }
        };
        tasks.push(tokio::spawn(accept_loop(
            admin_listener,
            handler,
            limits,
            None,
            shutdown_rx,
        )));
    }
    tracing::info!(%addr, admin = ?admin_addr, upstream = %config.mirroring.source.origin(), "gantry is serving");
    Ok(Running {
        addr,
        admin_addr,
        mirror,
        metrics,
        shutdown,
        tasks,
        grace: limits.grace,
    })
}

/// Re-reads the TLS certificate and key, and the htpasswd file, on every SIGHUP until shutdown.
/// A file that fails to load leaves what is in use untouched.
async fn reload_on_sighup(
    tls: Option<Arc<TlsState>>,
    access: Option<Arc<Access>>,
    mut shutdown: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP: certificates and users will not be reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hangups.recv() => {
                if let Some(tls) = &tls {
                    match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                        Err(error) => tracing::error!(%error, "SIGHUP: keeping the current certificate"),
                    }
                }
                if let Some(access) = &access {
                    match access.reload() {
                        Ok(users) => tracing::info!(users, "SIGHUP: htpasswd reloaded"),
                        Err(error) => tracing::error!(%error, "SIGHUP: keeping the current users"),
                    }
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Runs gantry until `signal` completes, then shuts down gracefully.
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(config).await?;
    signal.await;
    tracing::info!("shutting down: finishing in-flight requests and downloads");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Handles one API request, unless its client is over its budget, and writes its log line and
/// metrics.
async fn logged(
    api: &Api,
    metrics: &Arc<Metrics>,
    limiter: Option<&ClientLimiter>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let refused = limiter.and_then(|limiter| limiter.check(peer.ip()).err());
    let (response, outcome) = match refused {
        Some(retry_after) => {
            metrics.client_rate_limited.inc();
            let outcome = Outcome {
                route: Route::parse(&path).label(),
                cache: "-",
                error: Some(format!(
                    "client over its request rate (retry after {retry_after} s)"
                )),
            };
            (crate::api::too_many_requests(retry_after), outcome)
        }
        None => api.handle(request).await,
    };
    let status = response.status();
    metrics
        .requests
        .with_label_values(&[outcome.route, method.as_str(), status.as_str()])
        .inc();
    let log = RequestLog {
        started,
        method,
        path,
        status,
        outcome,
        metrics: Arc::clone(metrics),
    };
    response.map(|body| LoggedBody::new(body, log).boxed_unsync())
}

#[derive(Clone, Copy)]
struct ConnectionLimits {
    max_connections: usize,
    header_read: Duration,
    send: Duration,
    grace: Duration,
}

/// The accept loop. Each connection task is watched by the graceful-shutdown tracker and holds a
/// permit of the connection limit; accept errors are logged and the loop goes on.
async fn accept_loop<H, F>(
    listener: TcpListener,
    handler: H,
    limits: ConnectionLimits,
    tls: Option<Arc<TlsState>>,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_buf_size(64 << 10);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 << 10);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    // Out of file descriptors and the like: give the system a moment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let stream = SendTimeout::new(stream, limits.send);
        let (builder, handler, watcher) =
            (Arc::clone(&builder), handler.clone(), graceful.watcher());
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        tokio::spawn(async move {
            match acceptor {
                None => serve_connection(&builder, stream, handler, peer, watcher).await,
                // The handshake runs in the connection's task, bounded like reading headers.
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_read, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(&builder, stream, handler, peer, watcher).await
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.grace) => {
            tracing::warn!(open, grace = ?limits.grace, "shutdown deadline reached; closing remaining connections");
        }
    }
}

/// Serves HTTP/1.1 or h2 on one accepted connection, plain or TLS, until it closes or the
/// graceful shutdown ends it.
async fn serve_connection<S, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    stream: S,
    handler: H,
    peer: SocketAddr,
    watcher: Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    let service = service_fn(move |request| handler(peer, request));
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}
