//! The advisory lock `gantry serve` holds on `<storage.path>/serve.lock` for its lifetime, so an
//! offline command that rewrites the store (`gantry import`, `gantry gc`) can tell that a server
//! owns it and refuse, rather than race its index, links and catalogue (each held in memory by
//! the server and written only through it).
//!
//! `flock(2)` rather than a pid file: the kernel drops the lock when the process dies however it
//! dies (SIGKILL included), so a crash never leaves a stale lock that an operator must remove.
//! `std::fs::File::try_lock` does the same but needs Rust 1.89, above this crate's MSRV.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file's name under `storage.path`.
pub const SERVE_LOCK: &str = "serve.lock";

/// The exclusive lock on a store; released when dropped (the file is closed) or the process ends.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("gantry is serving {}; stop it first", .0.display())]
    Held(PathBuf),
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Takes the exclusive lock on the store at `root` without waiting, creating `root` and the
/// lock file if needed.
pub fn lock(root: &Path) -> Result<StoreLock, LockError> {
    let path = root.join(SERVE_LOCK);
    let io_error = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(root).map_err(io_error)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error)?;
    try_flock(&file).map_err(|error| classify(error, root, &path))?;
    Ok(StoreLock { _file: file })
}

/// Fails with [`LockError::Held`] when a process holds the lock on `root`, creating nothing (a
/// store without the lock file has never been served by a gantry that takes it).
pub fn ensure_unlocked(root: &Path) -> Result<(), LockError> {
    let path = root.join(SERVE_LOCK);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(LockError::Io { path, source }),
    };
    // Taking it and closing the file at once releases it again.
    try_flock(&file).map_err(|error| classify(error, root, &path))
}

fn classify(error: io::Error, root: &Path, path: &Path) -> LockError {
    if error.kind() == io::ErrorKind::WouldBlock {
        LockError::Held(root.to_owned())
    } else {
        LockError::Io {
            path: path.to_owned(),
            source: error,
        }
    }
}

fn try_flock(file: &File) -> io::Result<()> {
    // SAFETY: flock takes a file descriptor and flags, touches no memory of ours, and the
    // descriptor is valid for the call because `file` is borrowed for its duration.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        super::ensure_unlocked(dir.path()).unwrap();
        assert!(!dir.path().join(super::SERVE_LOCK).exists());
        let held = super::lock(dir.path()).unwrap();
        assert!(matches!(
            super::lock(dir.path()),
            Err(super::LockError::Held(_))
        ));
        assert!(matches!(
            super::ensure_unlocked(dir.path()),
            Err(super::LockError::Held(_))
        ));
        drop(held);
        super::lock(dir.path()).unwrap();
    }
}
