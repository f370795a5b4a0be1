//! Bundles: cached images carried between mirrors as OCI image-layout tar files, for networks
//! that cannot reach an upstream ([docs/bundles.md](../../docs/bundles.md)).
//!
//! `gantry export` ([`export`]) reads images from a store offline, or through a running mirror
//! ([`remote`], `--mirror`), and [`writer`] writes a standard layout
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) that skopeo, podman and docker load, plus
//! `gantry-bundle.json`, which says which registry and repository each image came from: a
//! layout's own names cannot carry that. `gantry import` ([`import`]) checks a whole bundle before
//! touching the store (names, digests, references, tags), then copies it in through the store's
//! verifying writer and records links and catalogue entries, so the imported images are served
//! exactly like pulled ones. Both refuse to open a store a gantry serves (see
//! [`crate::store::lock`]); `export --mirror` reads through the serving gantry instead.

pub mod export;
pub mod import;
pub mod layout;
mod names;
mod remote;
mod writer;

use std::path::PathBuf;

pub use export::{export, ExportRequest, Exported};
pub use import::{import, Imported};
pub use names::Names;
pub use remote::export_through;

use crate::store::lock::LockError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// An image the user named, or its content, is not in the store: nothing was written.
    #[error("{image}: {reason}")]
    Image { image: String, reason: String },
    /// A bundle entry (or the bundle as a whole, `entry` then says which part) is refused.
    #[error("{}: {entry}: {reason}", bundle.display())]
    Entry {
        bundle: PathBuf,
        entry: String,
        reason: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The store holds the import; copying it into the object tier failed (running the import
    /// again uploads what is missing).
    #[error("imported into the store, but not into the object tier (run the import again to retry): {0}")]
    ObjectTier(#[source] Box<crate::store::object::ObjectTierError>),
}

impl BundleError {
    fn entry(
        bundle: &std::path::Path,
        entry: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Entry {
            bundle: bundle.to_owned(),
            entry: entry.into(),
            reason: reason.into(),
        }
    }

    fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}
