//! What each `gantry` subcommand does, kept out of `main.rs` so tests can drive it too.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::{Config, ListenAddr, LogFormat};
use crate::metrics::Metrics;
use crate::store::{Store, StoreOptions};

/// sysexits' EX_USAGE: bad configuration, nothing was started.
const EXIT_CONFIG: u8 = 64;

fn load(path: Option<&Path>) -> Result<Config, ExitCode> {
    let loaded = match path {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    loaded.map_err(|error| {
        eprintln!("gantry: {error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Bytes of log lines the writer thread gathers before it writes them out.
const LOG_BUFFER: usize = 64 << 10;

/// Sets up logging to stdout. Lines go through a background writer thread (the request line was
/// ~19% of CPU on warm tag requests when written synchronously), which buffers them and writes
/// whenever it has caught up, so a busy server makes one `write` per batch of lines rather than
/// one per line, and a quiet one still shows each line at once. The returned guard flushes it and
/// must live as long as the process logs. Under overload lines are dropped, never requests.
pub fn init_logging(config: &Config) -> tracing_appender::non_blocking::WorkerGuard {
    let filter: tracing_subscriber::filter::Targets =
        config.log.level.0.parse().unwrap_or_default();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking(std::io::BufWriter::with_capacity(
        LOG_BUFFER,
        std::io::stdout(),
    ));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match config.log.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(writer),
            )
            .try_init(),
        // Colors only on a terminal: escape codes cost time per line and clutter log files.
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(writer),
            )
            .try_init(),
    };
    if let Err(error) = result {
        eprintln!("gantry: logging was already set up: {error}");
    }
    guard
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("gantry: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        })
}

pub fn serve(config_path: Option<&Path>, listen: Option<SocketAddr>) -> ExitCode {
    let mut config = match load(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Some(listen) = listen {
        config.listen = ListenAddr(listen);
    }
    let _log_writer = init_logging(&config);
    // Held for the process's lifetime: `import` and `gc` refuse to rewrite a store being served.
    let _serving = match crate::store::lock::lock(&config.storage.path) {
        Ok(lock) => lock,
        Err(error) => {
            eprintln!("gantry: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(crate::server::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "gantry could not start");
            eprintln!("gantry: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub fn check_config(path: &Path) -> ExitCode {
    match load(Some(path)) {
        Ok(config) => {
            print!("{}", config.to_redacted_yaml());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `gc --verify` removed entries that did not match their digests: the store is consistent again
/// (they are fetched afresh on the next request), but the disk under it damaged data, which a
/// cron job or a CI check should hear about. Distinct from 1, "gc could not run".
pub const EXIT_CORRUPT_REMOVED: u8 = 2;

pub fn gc(config_path: Option<&Path>, verify: bool) -> ExitCode {
    let config = match load(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let _log_writer = init_logging(&config);
    // 1, not EXIT_STORE_SERVED: gc's 2 already means "corrupt entries were removed".
    let _lock = match crate::store::lock::lock(&config.storage.path) {
        Ok(lock) => lock,
        Err(error) => {
            eprintln!("gantry: gc failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = Store::open(
        &config.storage.path,
        StoreOptions::from_config(&config.storage),
        Arc::new(Metrics::new()),
    )
    .and_then(|store| {
        let report = if verify {
            Some(store.verify_all()?)
        } else {
            None
        };
        Ok((store.usage(), report))
    });
    let ((bytes, entries), report) = match result {
        Ok(done) => done,
        Err(error) => {
            eprintln!("gantry: gc failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    let path = config.storage.path.display();
    let Some(report) = report else {
        println!("{path}: {entries} entries, {bytes} bytes; tmp/ cleared");
        return ExitCode::SUCCESS;
    };
    let checked = report.entries + report.removed.len() as u64;
    println!(
        "{path}: verified {checked} entries: {} matched their digests, {} did not and were removed",
        report.entries,
        report.removed.len()
    );
    for (kind, digest) in &report.removed {
        println!("removed corrupt {} {digest}", kind.noun());
    }
    println!("{path}: {entries} entries, {bytes} bytes; tmp/ cleared, every entry verified");
    if report.removed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "gantry: gc removed {} corrupt entries (they are fetched again on the next request); \
             check the disk under {path}",
            report.removed.len()
        );
        ExitCode::from(EXIT_CORRUPT_REMOVED)
    }
}

pub fn warm(
    mirror: &str,
    platforms: Vec<String>,
    file: Option<&Path>,
    mut images: Vec<String>,
) -> ExitCode {
    let mirror = match crate::config::BaseUrl::parse(mirror) {
        Ok(mirror) => mirror,
        Err(error) => {
            eprintln!("gantry: --mirror: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(file) = file {
        match std::fs::read_to_string(file) {
            Ok(text) => images.extend(
                text.lines()
                    .map(|line| line.split('#').next().unwrap_or("").trim())
                    .filter(|line| !line.is_empty())
                    .map(str::to_owned),
            ),
            Err(error) => {
                eprintln!("gantry: --file {}: {error}", file.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    if images.is_empty() {
        eprintln!("gantry: warm: name at least one image (or --file)");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let show_progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let warmer = crate::warm::Warmer::new(mirror, platforms, show_progress);
    let summary = runtime.block_on(warmer.warm_all(&images));
    println!(
        "warmed {} of {} images: {} blobs, {} bytes",
        summary.images,
        images.len(),
        summary.blobs,
        summary.bytes
    );
    for failure in &summary.failures {
        eprintln!("gantry: warm failed: {failure}");
    }
    if summary.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `import` found a gantry serving the store: nothing was read or written.
pub const EXIT_STORE_SERVED: u8 = 2;

/// `gantry export`: from the store of `config_path` (offline), or through the running mirror at
/// `mirror`; the two are exclusive.
pub fn export(
    config_path: Option<&Path>,
    mirror: Option<&str>,
    output: &Path,
    platforms: Vec<String>,
    all_cached: bool,
    images: Vec<String>,
) -> ExitCode {
    let usage = |message: &str| {
        eprintln!("gantry: export: {message}");
        ExitCode::from(EXIT_CONFIG)
    };
    if mirror.is_some() && config_path.is_some() {
        return usage(
            "--mirror and --config exclude each other: --config reads a store (offline), \
             --mirror reads through a running mirror",
        );
    }
    if mirror.is_some() && all_cached {
        return usage("--all-cached needs --config (it lists the store's catalogue), not --mirror");
    }
    if images.is_empty() && !all_cached {
        return usage("name at least one image (or --all-cached)");
    }
    let request = crate::bundle::ExportRequest {
        images,
        all_cached,
        platforms,
        output: output.to_owned(),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let result = match mirror {
        Some(mirror) => {
            let mirror = match crate::config::BaseUrl::parse(mirror) {
                Ok(mirror) => mirror,
                Err(error) => return usage(&format!("--mirror: {error}")),
            };
            let runtime = match runtime() {
                Ok(runtime) => runtime,
                Err(code) => return code,
            };
            runtime.block_on(crate::bundle::export_through(mirror, &request))
        }
        None => match export_store(config_path, &request) {
            Ok(result) => result,
            Err(code) => return code,
        },
    };
    match result {
        Ok(exported) => {
            for image in &exported.images {
                println!(
                    "exported {}/{}{} {} ({} bytes)",
                    image.registry,
                    image.repository,
                    image
                        .tag
                        .as_ref()
                        .map(|t| format!(":{t}"))
                        .unwrap_or_default(),
                    image.digest,
                    image.size
                );
            }
            println!(
                "{}: {} images, {} blobs and manifests, {} bytes",
                output.display(),
                exported.images.len(),
                exported.blobs,
                exported.bytes
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("gantry: export failed, no bundle written: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The store-based export: the store opened under its lock.
fn export_store(
    config_path: Option<&Path>,
    request: &crate::bundle::ExportRequest,
) -> Result<Result<crate::bundle::Exported, crate::bundle::BundleError>, ExitCode> {
    let config = load(config_path)?;
    let runtime = runtime()?;
    // Reads only; a server may hold the store meanwhile, but its tmp/ would be emptied by
    // Store::open, so the export refuses as import does.
    let _lock = crate::store::lock::lock(&config.storage.path).map_err(|error| {
        eprintln!("gantry: export: {error} (or export through it with --mirror URL)");
        ExitCode::from(EXIT_STORE_SERVED)
    })?;
    let names = crate::bundle::Names::new(&config);
    Ok(runtime.block_on(async {
        let store = Store::open(
            &config.storage.path,
            StoreOptions::from_config(&config.storage),
            Arc::new(Metrics::new()),
        )?;
        crate::bundle::export(&store, &names, request).await
    }))
}

pub fn import(config_path: Option<&Path>, bundles: &[std::path::PathBuf]) -> ExitCode {
    let config = match load(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(crate::bundle::import(&config, bundles)) {
        Ok(imported) => {
            for image in &imported.images {
                println!(
                    "imported {}/{}{} {}",
                    image.registry,
                    image.repository,
                    image
                        .tag
                        .as_ref()
                        .map(|t| format!(":{t}"))
                        .unwrap_or_default(),
                    image.digest
                );
            }
            println!(
                "{}: {} images; {} blobs and manifests written, {} bytes",
                config.storage.path.display(),
                imported.images.len(),
                imported.written,
                imported.bytes
            );
            if config.storage.s3.is_some() {
                println!(
                    "object tier: {} blobs and manifests uploaded, {} bytes",
                    imported.uploaded, imported.uploaded_bytes
                );
            }
            for registry in &imported.unserved {
                eprintln!(
                    "gantry: warning: this config does not serve registry {registry}; its imported images \
                     are pulled only once it is configured"
                );
            }
            ExitCode::SUCCESS
        }
        Err(crate::bundle::BundleError::Lock(error @ crate::store::lock::LockError::Held(_))) => {
            eprintln!("gantry: import: {error}");
            ExitCode::from(EXIT_STORE_SERVED)
        }
        Err(error) => {
            eprintln!("gantry: import refused, the store is unchanged: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `gantry configure`: a bad flag exits 64 with nothing read; a file that cannot be parsed or
/// written exits 1, every file as it was (all are checked before any is written).
pub fn configure(
    client: crate::configure::Client,
    mirror: &str,
    registries: &[String],
    insecure: bool,
    ca: Option<&Path>,
    path: Option<&Path>,
    dry_run: bool,
) -> ExitCode {
    use crate::configure::{self, Error, Request};
    let failed = |error: Error| {
        eprintln!("gantry: configure: {error}");
        match error {
            Error::Usage(_) => ExitCode::from(EXIT_CONFIG),
            Error::Malformed { .. } | Error::Io { .. } => ExitCode::FAILURE,
        }
    };
    let planned = Request::new(client, mirror, registries, insecure, ca, path)
        .and_then(|request| configure::plan(&request));
    let plan = match planned {
        Ok(plan) => plan,
        Err(error) => return failed(error),
    };
    for warning in &plan.warnings {
        eprintln!("gantry: configure: warning: {warning}");
    }
    if dry_run {
        for change in &plan.changes {
            if change.is_unchanged() {
                println!("{}: unchanged", change.path.display());
            } else {
                print!("{}", change.diff());
            }
        }
        return ExitCode::SUCCESS;
    }
    match configure::apply(&plan) {
        Ok(done) => {
            for (path, outcome) in done {
                println!("{}: {outcome}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => failed(error),
    }
}
