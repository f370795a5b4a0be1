//! Debian's `chromium`, headless, for what only a browser shows: a page as it renders.
//!
//! Each run gets its own process group, profile and config/cache directories under the caller's
//! temp dir, is bounded by [`LIMIT`], and its whole group is killed when the run ends (chromium
//! forks a zygote and renderers that a kill of the parent alone would leave running).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::which;

/// The longest one chromium run may take.
pub const LIMIT: Duration = Duration::from_secs(60);

/// The chromium binary, if installed.
pub fn chromium() -> Option<PathBuf> {
    which("chromium")
}

/// Kills a run's process group when dropped: on success, on timeout, on a panic.
struct Group(Option<u32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs headless chromium with `args` and `url`, its state under `dir`; returns stdout.
/// Panics with its stderr when it fails or outlives [`LIMIT`].
pub async fn run(dir: &Path, args: &[&str], url: &str) -> String {
    let home = dir.join("chromium");
    std::fs::create_dir_all(&home).unwrap();
    let mut command = Command::new(chromium().expect("chromium is installed"));
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!(
            "--user-data-dir={}",
            home.join("profile").display()
        ))
        .args(args)
        .arg(url)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().expect("chromium starts");
    let _group = Group(child.id());
    let output = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("chromium {args:?} {url} ran over {LIMIT:?}"))
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium {args:?} {url}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The DOM of `url` after it loaded, serialized.
pub async fn dump_dom(dir: &Path, url: &str) -> String {
    run(dir, &["--dump-dom"], url).await
}

/// A PNG screenshot of `url` at `width`×`height` into `path`.
pub async fn screenshot(dir: &Path, url: &str, path: &Path, width: u32, height: u32) {
    run(
        dir,
        &[
            &format!("--screenshot={}", path.display()),
            &format!("--window-size={width},{height}"),
        ],
        url,
    )
    .await;
}

/// True when `bytes` start with the PNG signature.
pub fn is_png(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}
