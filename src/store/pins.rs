//! Pins: digests an operator asked to keep, whatever `storage.max_size` says.
//!
//! An image is pinned as the set of its digests (its manifests, an index's children, its config
//! and layers); the control plane resolves the image, the store only keeps the set. Eviction
//! skips a pinned entry, and the object tier's sweep skips a blob pinned here.
//!
//! The set is small (tens of images, hundreds of digests) and changes only when an operator acts,
//! so it lives in memory and is written whole on each change to `pins` under `storage.path`, one
//! digest per line, through a temp file, an fsync and a rename (then an fsync of the directory):
//! a crash leaves the old set or the new one, never a torn file. Lines that are not digests are
//! skipped with a warning, so a hand-edited file does not stop the store from opening.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};

use crate::oci::Digest;

/// The pin file under `storage.path`.
pub const PINS_FILE: &str = "pins";
/// Where a new pin file is written before it is renamed over [`PINS_FILE`].
const STAGED: &str = "pins.tmp";

pub struct Pins {
    root: PathBuf,
    pinned: RwLock<BTreeSet<Digest>>,
    /// Serializes writers so the file is renamed in the order memory changed.
    writing: Mutex<()>,
}

impl Pins {
    /// Loads the pin file of the store at `root` (none yet: nothing is pinned).
    pub fn open(root: &Path) -> io::Result<Self> {
        let path = root.join(PINS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(error),
        };
        let mut pinned = BTreeSet::new();
        let mut skipped = 0;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match Digest::parse(line) {
                Ok(digest) => {
                    pinned.insert(digest);
                }
                Err(_) => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(path = %path.display(), skipped, "pin file lines that are not digests were skipped");
        }
        Ok(Self {
            root: root.to_owned(),
            pinned: RwLock::new(pinned),
            writing: Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeSet<Digest>> {
        self.pinned.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_writing(&self) -> MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        let pinned = self.read();
        !pinned.is_empty() && pinned.contains(digest)
    }

    /// Every pinned digest, in order.
    pub fn all(&self) -> Vec<Digest> {
        self.read().iter().cloned().collect()
    }

    /// Pins `digests` and writes the set; returns how many were not pinned before. Blocks on
    /// the disk (an operator's request, never a pull).
    pub fn pin(&self, digests: &[Digest]) -> io::Result<usize> {
        self.change(|pinned| {
            digests
                .iter()
                .filter(|d| pinned.insert((*d).clone()))
                .count()
        })
    }

    /// Unpins `digests` and writes the set; returns how many were pinned.
    pub fn unpin(&self, digests: &[Digest]) -> io::Result<usize> {
        self.change(|pinned| digests.iter().filter(|d| pinned.remove(*d)).count())
    }

    /// Applies `edit` in memory, then writes the whole set if it changed anything. A failed
    /// write leaves memory changed (the pin holds until a restart) and is returned.
    fn change(&self, edit: impl FnOnce(&mut BTreeSet<Digest>) -> usize) -> io::Result<usize> {
        let _writing = self.lock_writing();
        let (changed, snapshot) = {
            let mut pinned = self.pinned.write().unwrap_or_else(|e| e.into_inner());
            let changed = edit(&mut pinned);
            (changed, pinned.clone())
        };
        if changed > 0 {
            self.write(&snapshot)?;
        }
        Ok(changed)
    }

    fn write(&self, pinned: &BTreeSet<Digest>) -> io::Result<()> {
        let staged = self.root.join(STAGED);
        let mut file = File::create(&staged)?;
        let text: String = pinned.iter().map(|d| format!("{d}\n")).collect();
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&staged, self.root.join(PINS_FILE))?;
        File::open(&self.root)?.sync_all()
    }
}
