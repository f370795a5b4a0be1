//! The vocabulary of the OCI distribution protocol: repository names, tags, digests, manifest media
//! types and error codes.
//!
//! Everything here is pure (no I/O), so every other module can speak these types, and the grammar
//! checks that keep request input away from the filesystem live in one place.

mod digest;
mod error;
pub mod host;
mod image;
pub mod manifest;
mod media;
mod name;
mod query;

pub use digest::{Algorithm, Digest, DigestHasher};
pub use error::{ErrorCode, OciError};
pub use image::ImageRef;
pub use media::{AcceptSet, MediaType, MANIFEST_TYPES};
pub use name::{Reference, RepoName, Tag};
pub use query::query_param;
