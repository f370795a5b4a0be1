//! The `gantry` command: parses flags and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gantry::cli;

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Serve { config, listen } => cli::serve(config.as_deref(), listen),
        Command::CheckConfig { file } => cli::check_config(&file),
        Command::Gc { config, verify } => cli::gc(config.as_deref(), verify),
        Command::Warm {
            mirror,
            platform,
            file,
            images,
        } => cli::warm(&mirror, platform, file.as_deref(), images),
    }
}
