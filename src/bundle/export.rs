//! `gantry export`: images from a store, offline, into one OCI image-layout tar.
//!
//! Everything an image needs is found before a byte is written (a missing manifest or blob names
//! the image and the digest), then the bundle is written under a temporary name beside the
//! output and renamed into place at the end, so a failed export leaves no bundle behind. Blobs
//! are streamed from their store files into the tar; only manifests are held in memory.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::layout::{
    blob_name, platform_matches, platform_name, BundleImage, BundleManifest, Descriptor, Document,
    Index, OciLayout, BUNDLE_JSON, BUNDLE_VERSION, CONTAINERD_NAME, DOCKER_MANIFEST_JSON,
    INDEX_JSON, INDEX_MEDIA_TYPE, OCI_LAYOUT, REF_NAME,
};
use super::names::{display_name, Names};
use super::BundleError;
use crate::oci::{Digest, Reference, Tag};
use crate::store::Store;

/// What to export.
pub struct ExportRequest {
    /// Images as users write them.
    pub images: Vec<String>,
    /// Every tag the catalogue holds whose manifest is cached.
    pub all_cached: bool,
    /// Only these platforms of an index (`os/arch[/variant]`); all when empty.
    pub platforms: Vec<String>,
    pub output: PathBuf,
}

/// What [`export`] wrote.
#[derive(Debug)]
pub struct Exported {
    pub images: Vec<BundleImage>,
    pub blobs: usize,
    pub bytes: u64,
}

/// One image to export: its catalogue names and its root manifest.
struct Root {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Digest,
}

/// A manifest and the blobs an image needs, in the order they are written.
enum Item {
    Manifest { digest: Digest, bytes: bytes::Bytes },
    Blob { digest: Digest, size: u64 },
}

pub async fn export(
    store: &Arc<Store>,
    names: &Names,
    request: &ExportRequest,
) -> Result<Exported, BundleError> {
    let roots = roots(store, names, request)?;
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    let mut images = Vec::new();
    let mut descriptors = Vec::new();
    let mut docker = Vec::new();
    for root in &roots {
        let shown = display_name(
            &root.registry,
            &root.repository,
            &match &root.tag {
                Some(tag) => Reference::Tag(
                    Tag::parse(tag).map_err(|e| image_error(&root.repository, e.to_string()))?,
                ),
                None => Reference::Digest(root.digest.clone()),
            },
        );
        let stored = store.read_manifest(&root.digest).await.ok_or_else(|| {
            image_error(
                &shown,
                format!("manifest {} is not in the store", root.digest),
            )
        })?;
        let mut walk = Walk {
            store,
            image: &shown,
            platforms: &request.platforms,
            items: &mut items,
            seen: &mut seen,
            size: 0,
            platforms_found: Vec::new(),
            all_platforms: true,
        };
        let docker_entry = walk
            .manifest(&root.digest, stored.bytes.clone(), true)
            .await?;
        let (size, platforms_found, all_platforms) =
            (walk.size, walk.platforms_found, walk.all_platforms);
        let mut annotations = BTreeMap::new();
        annotations.insert(CONTAINERD_NAME.to_owned(), shown.clone());
        annotations.insert(REF_NAME.to_owned(), shown.clone());
        descriptors.push(Descriptor {
            media_type: stored.media_type.clone(),
            digest: root.digest.to_string(),
            size: stored.bytes.len() as u64,
            annotations,
            platform: None,
        });
        if let (Some((config, layers)), Some(_)) = (docker_entry, &root.tag) {
            docker.push(serde_json::json!({
                "Config": blob_name(&config),
                "RepoTags": [shown],
                "Layers": layers.iter().map(blob_name).collect::<Vec<_>>(),
            }));
        }
        images.push(BundleImage {
            registry: root.registry.clone(),
            repository: root.repository.clone(),
            tag: root.tag.clone(),
            digest: root.digest.to_string(),
            media_type: stored.media_type,
            platforms: platforms_found,
            all_platforms,
            size,
        });
    }
    let index = Index {
        schema_version: 2,
        media_type: Some(INDEX_MEDIA_TYPE.to_owned()),
        manifests: descriptors,
    };
    let bundle = BundleManifest {
        version: BUNDLE_VERSION,
        images: images.clone(),
    };
    let (blobs, bytes) = write(store, &request.output, &items, &index, &bundle, &docker).await?;
    Ok(Exported {
        images,
        blobs,
        bytes,
    })
}

fn image_error(image: &str, reason: impl Into<String>) -> BundleError {
    BundleError::Image {
        image: image.to_owned(),
        reason: reason.into(),
    }
}

fn roots(store: &Store, names: &Names, request: &ExportRequest) -> Result<Vec<Root>, BundleError> {
    let catalogue = store.catalogue();
    let mut roots = Vec::new();
    if request.all_cached {
        for tag in catalogue.tags() {
            if catalogue.manifest(&tag.digest).is_some() {
                roots.push(Root {
                    registry: tag.registry,
                    repository: tag.repository,
                    tag: Some(tag.tag),
                    digest: tag.digest,
                });
            }
        }
    }
    for text in &request.images {
        let (registry, repository, reference) = names
            .resolve(text)
            .map_err(|reason| image_error(text, reason))?;
        let root = match reference {
            Reference::Digest(digest) => Root {
                registry,
                repository,
                tag: None,
                digest,
            },
            Reference::Tag(tag) => {
                let record = catalogue
                    .tags_for(&registry, &repository)
                    .into_iter()
                    .find(|record| record.tag == tag.as_str())
                    .ok_or_else(|| {
                        image_error(
                            text,
                            format!("no tag {tag} of {registry}/{repository} in the catalogue (pull it through the mirror first)"),
                        )
                    })?;
                Root {
                    registry,
                    repository,
                    tag: Some(record.tag),
                    digest: record.digest,
                }
            }
        };
        roots.push(root);
    }
    if roots.is_empty() {
        return Err(image_error("export", "nothing to export"));
    }
    Ok(roots)
}

/// Collects one image's manifests and blobs, checking the store holds each.
struct Walk<'a> {
    store: &'a Arc<Store>,
    image: &'a str,
    platforms: &'a [String],
    items: &'a mut Vec<Item>,
    seen: &'a mut HashSet<Digest>,
    size: u64,
    platforms_found: Vec<String>,
    all_platforms: bool,
}

impl Walk<'_> {
    /// Adds a manifest and what it references; for a single-platform image at the top, returns
    /// its config and layers (for docker's `manifest.json`).
    async fn manifest(
        &mut self,
        digest: &Digest,
        bytes: bytes::Bytes,
        top: bool,
    ) -> Result<Option<(Digest, Vec<Digest>)>, BundleError> {
        self.size += bytes.len() as u64;
        let document: Document = serde_json::from_slice(&bytes).map_err(|e| {
            image_error(self.image, format!("manifest {digest} cannot be read: {e}"))
        })?;
        let mut docker = None;
        if document.is_index() {
            for child in &document.manifests {
                let wanted = self.platforms.is_empty()
                    || child
                        .platform
                        .as_ref()
                        .is_some_and(|p| self.platforms.iter().any(|w| platform_matches(p, w)));
                if !wanted {
                    self.all_platforms = false;
                    continue;
                }
                if let Some(name) = child.platform.as_ref().and_then(platform_name) {
                    self.platforms_found.push(name);
                }
                let child_digest = self.digest(&child.digest)?;
                let stored = self
                    .store
                    .read_manifest(&child_digest)
                    .await
                    .ok_or_else(|| {
                        image_error(
                            self.image,
                            format!("platform manifest {child_digest} is not in the store"),
                        )
                    })?;
                Box::pin(self.manifest(&child_digest, stored.bytes, false)).await?;
            }
        } else {
            let mut blobs = Vec::new();
            for descriptor in document.blob_descriptors() {
                let blob = self.digest(&descriptor.digest)?;
                let file = self.store.open_blob(&blob).await.ok_or_else(|| {
                    image_error(
                        self.image,
                        format!("blob {blob} (of manifest {digest}) is not in the store"),
                    )
                })?;
                self.size += file.size;
                if self.seen.insert(blob.clone()) {
                    self.items.push(Item::Blob {
                        digest: blob.clone(),
                        size: file.size,
                    });
                }
                blobs.push(blob);
            }
            if top && document.config.is_some() {
                let config = blobs.remove(0);
                docker = Some((config, blobs));
            }
        }
        if self.seen.insert(digest.clone()) {
            self.items.push(Item::Manifest {
                digest: digest.clone(),
                bytes,
            });
        }
        Ok(docker)
    }

    fn digest(&self, text: &str) -> Result<Digest, BundleError> {
        Digest::parse(text)
            .map_err(|e| image_error(self.image, format!("a manifest references {text:?}: {e}")))
    }
}

/// Removes the temporary bundle unless it was renamed into place.
struct Partial {
    path: PathBuf,
    done: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn write(
    store: &Arc<Store>,
    output: &Path,
    items: &[Item],
    index: &Index,
    bundle: &BundleManifest,
    docker: &[serde_json::Value],
) -> Result<(usize, u64), BundleError> {
    let file_name = output
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".to_owned());
    let mut partial = Partial {
        path: output.with_file_name(format!(".{file_name}.partial-{}", std::process::id())),
        done: false,
    };
    let file = File::create(&partial.path).map_err(BundleError::io(&partial.path))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let io = BundleError::io;
    append_bytes(
        &mut tar,
        OCI_LAYOUT,
        &json(&OciLayout {
            image_layout_version: "1.0.0".to_owned(),
        }),
    )
    .map_err(io(&partial.path))?;
    let mut bytes = 0;
    for item in items {
        match item {
            Item::Manifest {
                digest,
                bytes: content,
            } => {
                append_bytes(&mut tar, &blob_name(digest), content).map_err(io(&partial.path))?;
                bytes += content.len() as u64;
            }
            Item::Blob { digest, size } => {
                let blob = store.open_blob(digest).await.ok_or_else(|| {
                    image_error(
                        &digest.to_string(),
                        "the blob left the store during the export",
                    )
                })?;
                let mut header = header(*size);
                tar.append_data(
                    &mut header,
                    blob_name(digest),
                    Exact {
                        file: &blob.file,
                        remaining: *size,
                    },
                )
                .map_err(io(&partial.path))?;
                bytes += size;
            }
        }
    }
    append_bytes(&mut tar, INDEX_JSON, &json(index)).map_err(io(&partial.path))?;
    append_bytes(&mut tar, BUNDLE_JSON, &json(bundle)).map_err(io(&partial.path))?;
    if !docker.is_empty() {
        let listing = serde_json::to_vec(docker).unwrap_or_default();
        append_bytes(&mut tar, DOCKER_MANIFEST_JSON, &listing).map_err(io(&partial.path))?;
    }
    let mut writer = tar.into_inner().map_err(io(&partial.path))?;
    writer.flush().map_err(io(&partial.path))?;
    let file = writer.into_inner().map_err(|e| BundleError::Io {
        path: partial.path.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io(&partial.path))?;
    std::fs::rename(&partial.path, output).map_err(io(output))?;
    partial.done = true;
    Ok((items.len(), bytes))
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

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let mut header = header(bytes.len() as u64);
    tar.append_data(&mut header, name, bytes)
}

/// A blob file read for exactly its size: a file shorter than the store says fails the export
/// instead of writing a tar entry shorter than its header.
struct Exact<'a> {
    file: &'a File,
    remaining: u64,
}

impl Read for Exact<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let limit = buffer
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let read = (&mut &*self.file).read(&mut buffer[..limit])?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a store file is shorter than its recorded size",
            ));
        }
        self.remaining -= read as u64;
        Ok(read)
    }
}
