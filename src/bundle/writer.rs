//! The one writer of bundles, whatever the content comes from (the store, or a running mirror
//! for `gantry export --mirror`): an OCI image layout written as a tar under a temporary name
//! beside the output, renamed into place only once it is complete.
//!
//! Every manifest is hashed before it is appended, and every blob as it streams into its entry:
//! the header carries the descriptor's size, so a body longer or shorter than that, or one whose
//! digest differs, fails the export (naming the image and the digest) and the `Drop` of the
//! unfinished writer removes the temporary file. No blob is ever held in memory; a blob arrives
//! as chunks ([`Chunks`]) and each one is written as it comes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::layout::{
    blob_name, BundleManifest, Index, OciLayout, BUNDLE_JSON, DOCKER_MANIFEST_JSON, INDEX_JSON,
    OCI_LAYOUT,
};
use super::BundleError;
use crate::oci::{Algorithm, Digest, DigestHasher};

/// A blob's bytes as they arrive: `None` at the end, `Err` with why the read failed.
pub(crate) trait Chunks {
    async fn chunk(&mut self) -> Result<Option<Bytes>, String>;
}

/// What a finished bundle holds.
pub struct Written {
    /// Manifests and blobs.
    pub entries: usize,
    pub bytes: u64,
}

pub struct BundleWriter {
    tar: tar::Builder<BufWriter<File>>,
    partial: PathBuf,
    output: PathBuf,
    done: bool,
    entries: usize,
    bytes: u64,
}

impl BundleWriter {
    /// Starts a bundle destined for `output`, with its `oci-layout` file.
    pub fn create(output: &Path) -> Result<Self, BundleError> {
        let file_name = output
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bundle".to_owned());
        let partial = output.with_file_name(format!(".{file_name}.partial-{}", std::process::id()));
        let file = File::create(&partial).map_err(BundleError::io(&partial))?;
        let mut writer = Self {
            tar: tar::Builder::new(BufWriter::with_capacity(1 << 20, file)),
            partial,
            output: output.to_owned(),
            done: false,
            entries: 0,
            bytes: 0,
        };
        let layout = json(&OciLayout {
            image_layout_version: "1.0.0".to_owned(),
        });
        writer.file(OCI_LAYOUT, &layout)?;
        Ok(writer)
    }

    /// Appends a manifest or index of `image`, refusing bytes that are not `digest`.
    pub fn manifest(
        &mut self,
        image: &str,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<(), BundleError> {
        sha256_only(image, digest)?;
        let actual = Digest::of(digest.algorithm(), bytes);
        if actual != *digest {
            return Err(image_error(
                image,
                format!("manifest {digest}: its bytes hash to {actual}"),
            ));
        }
        self.file(&blob_name(digest), bytes)?;
        self.entries += 1;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Streams a blob of `image` into its entry: exactly `size` bytes that hash to `digest`,
    /// calling `progress` with each chunk's length.
    pub async fn blob(
        &mut self,
        image: &str,
        digest: &Digest,
        size: u64,
        mut body: impl Chunks,
        mut progress: impl FnMut(u64),
    ) -> Result<(), BundleError> {
        sha256_only(image, digest)?;
        let mut header = header(size);
        header
            .set_path(blob_name(digest))
            .map_err(BundleError::io(&self.partial))?;
        header.set_cksum();
        let out = self.tar.get_mut();
        out.write_all(header.as_bytes())
            .map_err(BundleError::io(&self.partial))?;
        let mut hasher = DigestHasher::new(digest.algorithm());
        let mut written = 0u64;
        while let Some(chunk) = body
            .chunk()
            .await
            .map_err(|reason| image_error(image, format!("blob {digest}: {reason}")))?
        {
            written += chunk.len() as u64;
            if written > size {
                return Err(image_error(
                    image,
                    format!("blob {digest} is longer than the {size} bytes its descriptor says"),
                ));
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .map_err(BundleError::io(&self.partial))?;
            progress(chunk.len() as u64);
        }
        if written < size {
            return Err(image_error(
                image,
                format!(
                    "blob {digest} ended after {written} of the {size} bytes its descriptor says"
                ),
            ));
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Err(image_error(
                image,
                format!("blob {digest}: its bytes hash to {actual}"),
            ));
        }
        let padding = (512 - size % 512) % 512;
        out.write_all(&[0; 512][..padding as usize])
            .map_err(BundleError::io(&self.partial))?;
        self.entries += 1;
        self.bytes += size;
        Ok(())
    }

    /// Writes `index.json`, `gantry-bundle.json` and (when there are entries) docker's
    /// `manifest.json`, syncs, and renames the bundle into place.
    pub fn finish(
        mut self,
        index: &Index,
        bundle: &BundleManifest,
        docker: &[serde_json::Value],
    ) -> Result<Written, BundleError> {
        self.file(INDEX_JSON, &json(index))?;
        self.file(BUNDLE_JSON, &json(bundle))?;
        if !docker.is_empty() {
            let listing = serde_json::to_vec(docker).unwrap_or_default();
            self.file(DOCKER_MANIFEST_JSON, &listing)?;
        }
        self.tar.finish().map_err(BundleError::io(&self.partial))?;
        let writer = self.tar.get_mut();
        writer.flush().map_err(BundleError::io(&self.partial))?;
        writer
            .get_ref()
            .sync_all()
            .map_err(BundleError::io(&self.partial))?;
        std::fs::rename(&self.partial, &self.output).map_err(BundleError::io(&self.output))?;
        self.done = true;
        Ok(Written {
            entries: self.entries,
            bytes: self.bytes,
        })
    }

    /// A small entry held in memory (the layout's files and manifests).
    fn file(&mut self, name: &str, bytes: &[u8]) -> Result<(), BundleError> {
        let mut header = header(bytes.len() as u64);
        self.tar
            .append_data(&mut header, name, bytes)
            .map_err(BundleError::io(&self.partial))
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// A layout keeps blobs under `blobs/<algorithm>/`, and bundles (import too) only `sha256`.
fn sha256_only(image: &str, digest: &Digest) -> Result<(), BundleError> {
    if digest.algorithm() == Algorithm::Sha256 {
        Ok(())
    } else {
        Err(image_error(
            image,
            format!("{digest}: bundles hold sha256 content only"),
        ))
    }
}

pub(super) fn image_error(image: &str, reason: impl Into<String>) -> BundleError {
    BundleError::Image {
        image: image.to_owned(),
        reason: reason.into(),
    }
}

/// The layout's small files as JSON. These types hold only strings, numbers and string-keyed
/// maps, which always serialize.
fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

fn header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header
}
