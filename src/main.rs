//! The `gantry` command: parses flags and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gantry::cli;
use gantry::ctl::{self, AdminArgs, ListFilter};

#[derive(Parser)]
#[command(
    name = "gantry",
    version,
    about = "A pull-through caching mirror for container registries"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the mirror (embedded defaults without --config).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Overrides `listen` from the config, e.g. 127.0.0.1:5000.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Validate a config file and print the effective configuration with secrets redacted.
    CheckConfig { file: PathBuf },
    /// Pre-pull images into a running mirror's cache.
    Warm {
        /// The mirror's URL.
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        mirror: String,
        /// Only these platforms of a multi-platform image (os/arch[/variant]); all when absent.
        #[arg(long)]
        platform: Vec<String>,
        /// A file with one image reference per line (# comments allowed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Image references: alpine:3.20, ghcr.io/owner/app:v1, redis@sha256:…
        images: Vec<String>,
    },
    /// List cached images (registry, repository, tag, digest, size, pulls, pinned).
    Ls {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only registries matching this glob (`docker.io`, `*.example.com`).
        #[arg(long)]
        registry: Option<String>,
        /// Only repositories matching this glob (`library/*`).
        #[arg(long)]
        repository: Option<String>,
        /// At most this many images.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one cached image: its manifests, platforms and blobs, and where each is held.
    Inspect {
        #[command(flatten)]
        admin: AdminArgs,
        /// `nginx:1.27`, `ghcr.io/org/app@sha256:…`
        image: String,
    },
    /// Purge images: tags, manifests and the blobs no other cached image references.
    Rm {
        #[command(flatten)]
        admin: AdminArgs,
        /// Images (`nginx:1.27`), digests (`sha256:…`) or repository globs (`ghcr.io/org/*`).
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Pin images: their manifests and blobs are never evicted.
    Pin {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Unpin images.
    Unpin {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Revalidate tags against their upstream now, whatever their TTL.
    Refresh {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Hit ratios, bytes saved, downloads in flight, store usage, upstream rate-limit headroom.
    Stats {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Point a client at a gantry mirror: edit daemon.json, containerd's hosts.toml files or
    /// registries.conf in place (idempotent; every other setting kept).
    Configure {
        /// docker (daemon.json), containerd (certs.d/<registry>/hosts.toml) or podman
        /// (registries.conf, also read by CRI-O, buildah and skopeo).
        #[arg(value_enum)]
        client: ConfigureClient,
        /// gantry's URL as the client reaches it, e.g. http://mirror.internal:5000.
        #[arg(long)]
        mirror: String,
        /// A registry to pull through the mirror (repeatable; docker.io when absent).
        #[arg(long)]
        registry: Vec<String>,
        /// Plain HTTP or an unverified certificate: docker's insecure-registries, containerd's
        /// skip_verify, podman's insecure.
        #[arg(long)]
        insecure: bool,
        /// A CA bundle the client should trust for the mirror (containerd's `ca`).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Print a diff of what would change and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// The file (docker, podman) or hosts directory (containerd) instead of the default
        /// (/etc/docker/daemon.json, /etc/containerd/certs.d, /etc/containers/registries.conf).
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Offline store maintenance: clear tmp/, evict to storage.max_size, optionally re-verify.
    ///
    /// Exits 0 when done, 1 when gc could not run, and 2 when --verify removed corrupt entries.
    Gc {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Re-hash every blob and manifest, removing the ones that do not match.
        #[arg(long)]
        verify: bool,
    },
    /// Write images into an OCI image-layout tar: cached ones from the store (offline,
    /// --config), or any through a running mirror (--mirror), which pulls what it lacks.
    ///
    /// skopeo (`oci-archive:`), `podman load` and `docker load` read it; `gantry import` puts it
    /// into another mirror's store.
    Export {
        /// Read the store of this config (no gantry may be serving it).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Read through the running mirror at this URL instead of a store, e.g.
        /// http://127.0.0.1:5000 (an image without a registry host is Docker Hub's).
        #[arg(long)]
        mirror: Option<String>,
        /// The bundle to write (replaced only once it is complete).
        #[arg(long, short)]
        output: PathBuf,
        /// Only these platforms of a multi-platform image (os/arch[/variant]); all when absent.
        #[arg(long)]
        platform: Vec<String>,
        /// Every tag the store holds (with --config).
        #[arg(long)]
        all_cached: bool,
        /// Image references: alpine:3.20, ghcr.io/owner/app:v1, redis@sha256:…
        images: Vec<String>,
    },
    /// Verify bundles written by `gantry export`, then copy them into the store (offline).
    ///
    /// Exits 0 when imported, 1 when a bundle is refused (the store is unchanged), and 2 when a
    /// gantry is serving the store.
    Import {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(required = true)]
        bundles: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ConfigureClient {
    Docker,
    Containerd,
    Podman,
}

impl From<ConfigureClient> for gantry::configure::Client {
    fn from(client: ConfigureClient) -> Self {
        match client {
            ConfigureClient::Docker => Self::Docker,
            ConfigureClient::Containerd => Self::Containerd,
            ConfigureClient::Podman => Self::Podman,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Serve { config, listen } => cli::serve(config.as_deref(), listen),
        Command::CheckConfig { file } => cli::check_config(&file),
        Command::Gc { config, verify } => cli::gc(config.as_deref(), verify),
        Command::Export {
            config,
            mirror,
            output,
            platform,
            all_cached,
            images,
        } => cli::export(
            config.as_deref(),
            mirror.as_deref(),
            &output,
            platform,
            all_cached,
            images,
        ),
        Command::Import { config, bundles } => cli::import(config.as_deref(), &bundles),
        Command::Warm {
            mirror,
            platform,
            file,
            images,
        } => cli::warm(&mirror, platform, file.as_deref(), images),
        Command::Ls {
            admin,
            registry,
            repository,
            limit,
        } => ctl::ls(
            &admin,
            &ListFilter {
                registry,
                repository,
                limit,
            },
        ),
        Command::Inspect { admin, image } => ctl::inspect(&admin, &image),
        Command::Rm { admin, references } => ctl::rm(&admin, &references),
        Command::Pin { admin, images } => ctl::pin(&admin, &images),
        Command::Unpin { admin, images } => ctl::unpin(&admin, &images),
        Command::Refresh { admin, images } => ctl::refresh(&admin, &images),
        Command::Stats { admin } => ctl::stats(&admin),
        Command::Configure {
            client,
            mirror,
            registry,
            insecure,
            ca,
            dry_run,
            path,
        } => cli::configure(
            client.into(),
            &mirror,
            &registry,
            insecure,
            ca.as_deref(),
            path.as_deref(),
            dry_run,
        ),
    }
}
