//! `gantry export`: images into one OCI image-layout tar, from the store (offline, here) or
//! through a running mirror ([`super::remote`]).
//!
//! Both sources take the same three steps. Each image named is resolved to its root manifest
//! ([`Root`]); the walk reads every manifest below it (an index's platforms, narrowed by
//! `--platform`) and lists the blobs they reference, which a store must hold with the sizes the
//! descriptors say, so that an incomplete store fails before a byte is written; then
//! [`BundleWriter`] writes the manifests from memory and streams each blob from its [`Source`],
//! verifying both, under a temporary name renamed into place at the end.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use indicatif::{MultiProgress, ProgressBar};

use super::layout::{
    blob_name, platform_matches, platform_name, BundleImage, BundleManifest, Descriptor, Document,
    Index, BUNDLE_VERSION, CONTAINERD_NAME, INDEX_MEDIA_TYPE, REF_NAME,
};
use super::names::{display_name, Names};
use super::writer::{image_error, BundleWriter, Chunks};
use super::BundleError;
use crate::oci::{Digest, Reference, Tag};
use crate::store::{FileChunks, Store};

/// What to export.
pub struct ExportRequest {
    /// Images as users write them.
    pub images: Vec<String>,
    /// Every tag the catalogue holds whose manifest is cached (the store only).
    pub all_cached: bool,
    /// Only these platforms of an index (`os/arch[/variant]`); all when empty.
    pub platforms: Vec<String>,
    pub output: PathBuf,
    /// Progress bars on stderr, one per image.
    pub progress: bool,
}

/// What [`export`] wrote.
#[derive(Debug)]
pub struct Exported {
    pub images: Vec<BundleImage>,
    /// Manifests and blobs.
    pub blobs: usize,
    pub bytes: u64,
}

/// Where an export reads manifests and blobs.
pub(crate) trait Source {
    type Blob: Chunks;

    /// A manifest of `root`'s image (an index's platform manifest) by digest.
    async fn manifest(&self, root: &Root, digest: &Digest) -> Result<Bytes, BundleError>;

    /// Checked while walking, before anything is written: whether the blob can be read.
    async fn check_blob(&self, root: &Root, digest: &Digest, size: u64) -> Result<(), BundleError>;

    /// The blob's bytes, read as they are written.
    async fn blob(&self, root: &Root, digest: &Digest) -> Result<Self::Blob, BundleError>;
}

/// One image to export: its names as the catalogue records them and its root manifest.
pub(crate) struct Root {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// How users write it (`docker.io/library/alpine:3.20`): the layout's names, and messages.
    pub shown: String,
}

impl Root {
    pub fn new(
        registry: String,
        repository: String,
        tag: Option<String>,
        digest: Digest,
        media_type: String,
        bytes: Bytes,
    ) -> Result<Self, BundleError> {
        let reference = match &tag {
            Some(tag) => Reference::Tag(
                Tag::parse(tag).map_err(|e| image_error(&repository, e.to_string()))?,
            ),
            None => Reference::Digest(digest.clone()),
        };
        let shown = display_name(&registry, &repository, &reference);
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
            media_type,
            bytes,
            shown,
        })
    }
}

/// Exports from the store; `names` resolves images as users write them.
pub async fn export(
    store: &Arc<Store>,
    names: &Names,
    request: &ExportRequest,
) -> Result<Exported, BundleError> {
    let roots = roots(store, names, request).await?;
    write(&StoreSource { store }, &roots, request).await
}

/// A manifest or a blob, in the order they are written, with the image (index into the roots)
/// it was first needed by.
enum Item {
    Manifest {
        image: usize,
        digest: Digest,
        bytes: Bytes,
    },
    Blob {
        image: usize,
        digest: Digest,
        size: u64,
    },
}

/// Walks every root through `source`, then writes the bundle.
pub(super) async fn write(
    source: &impl Source,
    roots: &[Root],
    request: &ExportRequest,
) -> Result<Exported, BundleError> {
    if roots.is_empty() {
        return Err(image_error("export", "nothing to export"));
    }
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    let mut images = Vec::new();
    let mut descriptors = Vec::new();
    let mut docker = Vec::new();
    for (position, root) in roots.iter().enumerate() {
        let mut walk = Walk {
            source,
            root,
            position,
            platforms: &request.platforms,
            items: &mut items,
            seen: &mut seen,
            size: 0,
            platforms_found: Vec::new(),
            all_platforms: true,
        };
        let docker_entry = walk
            .manifest(&root.digest, root.bytes.clone(), true)
            .await?;
        let (size, platforms_found, all_platforms) =
            (walk.size, walk.platforms_found, walk.all_platforms);
        let mut annotations = BTreeMap::new();
        annotations.insert(CONTAINERD_NAME.to_owned(), root.shown.clone());
        annotations.insert(REF_NAME.to_owned(), root.shown.clone());
        descriptors.push(Descriptor {
            media_type: root.media_type.clone(),
            digest: root.digest.to_string(),
            size: root.bytes.len() as u64,
            annotations,
            platform: None,
        });
        if let (Some((config, layers)), Some(_)) = (docker_entry, &root.tag) {
            docker.push(serde_json::json!({
                "Config": blob_name(&config),
                "RepoTags": [root.shown],
                "Layers": layers.iter().map(blob_name).collect::<Vec<_>>(),
            }));
        }
        images.push(BundleImage {
            registry: root.registry.clone(),
            repository: root.repository.clone(),
            tag: root.tag.clone(),
            digest: root.digest.to_string(),
            media_type: root.media_type.clone(),
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

    let progress = crate::warm::progress(request.progress);
    let mut bars = Bars::new(&progress, roots, &items);
    let mut writer = BundleWriter::create(&request.output)?;
    for item in &items {
        match item {
            Item::Manifest {
                image,
                digest,
                bytes,
            } => writer.manifest(&roots[*image].shown, digest, bytes)?,
            Item::Blob {
                image,
                digest,
                size,
            } => {
                let root = &roots[*image];
                let bar = bars.bar(*image);
                let body = source.blob(root, digest).await?;
                writer
                    .blob(&root.shown, digest, *size, body, |n| bar.inc(n))
                    .await?;
            }
        }
    }
    bars.finish();
    let written = writer.finish(&index, &bundle, &docker)?;
    Ok(Exported {
        images,
        blobs: written.entries,
        bytes: written.bytes,
    })
}

/// One progress bar per image, over the blob bytes written for it.
struct Bars<'a> {
    progress: &'a MultiProgress,
    totals: Vec<u64>,
    names: Vec<&'a str>,
    current: Option<(usize, ProgressBar)>,
}

impl<'a> Bars<'a> {
    fn new(progress: &'a MultiProgress, roots: &'a [Root], items: &[Item]) -> Self {
        let mut totals = vec![0; roots.len()];
        for item in items {
            if let Item::Blob { image, size, .. } = item {
                totals[*image] += size;
            }
        }
        Self {
            progress,
            totals,
            names: roots.iter().map(|root| root.shown.as_str()).collect(),
            current: None,
        }
    }

    /// The bar of `image`, finishing the previous image's (items come image by image).
    fn bar(&mut self, image: usize) -> ProgressBar {
        match &self.current {
            Some((shown, bar)) if *shown == image => bar.clone(),
            _ => {
                self.finish();
                let bar =
                    crate::warm::image_bar(self.progress, self.totals[image], self.names[image]);
                self.current = Some((image, bar.clone()));
                bar
            }
        }
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.current.take() {
            bar.finish();
        }
    }
}

async fn roots(
    store: &Arc<Store>,
    names: &Names,
    request: &ExportRequest,
) -> Result<Vec<Root>, BundleError> {
    let catalogue = store.catalogue();
    let mut found = Vec::new();
    if request.all_cached {
        for tag in catalogue.tags() {
            if catalogue.manifest(&tag.digest).is_some() {
                found.push((tag.registry, tag.repository, Some(tag.tag), tag.digest));
            }
        }
    }
    for text in &request.images {
        let (registry, repository, reference) = names
            .resolve(text)
            .map_err(|reason| image_error(text, reason))?;
        match reference {
            Reference::Digest(digest) => found.push((registry, repository, None, digest)),
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
                found.push((registry, repository, Some(record.tag), record.digest));
            }
        }
    }
    let mut roots = Vec::new();
    for (registry, repository, tag, digest) in found {
        let shown = format!("{registry}/{repository}");
        let stored = store
            .read_manifest(&digest)
            .await
            .ok_or_else(|| image_error(&shown, format!("manifest {digest} is not in the store")))?;
        roots.push(Root::new(
            registry,
            repository,
            tag,
            digest,
            stored.media_type,
            stored.bytes,
        )?);
    }
    Ok(roots)
}

/// The store as a [`Source`]: everything must be there already (the export is offline).
struct StoreSource<'a> {
    store: &'a Arc<Store>,
}

impl Source for StoreSource<'_> {
    type Blob = FileChunks;

    async fn manifest(&self, root: &Root, digest: &Digest) -> Result<Bytes, BundleError> {
        let stored = self.store.read_manifest(digest).await.ok_or_else(|| {
            image_error(
                &root.shown,
                format!("platform manifest {digest} is not in the store"),
            )
        })?;
        Ok(stored.bytes)
    }

    async fn check_blob(&self, root: &Root, digest: &Digest, size: u64) -> Result<(), BundleError> {
        let file = self.store.open_blob(digest).await.ok_or_else(|| {
            image_error(&root.shown, format!("blob {digest} is not in the store"))
        })?;
        if file.size != size {
            return Err(image_error(
                &root.shown,
                format!(
                    "blob {digest} is {} bytes in the store, its descriptor says {size}",
                    file.size
                ),
            ));
        }
        Ok(())
    }

    async fn blob(&self, root: &Root, digest: &Digest) -> Result<FileChunks, BundleError> {
        let blob = self.store.open_blob(digest).await.ok_or_else(|| {
            image_error(
                &root.shown,
                format!("blob {digest} left the store during the export"),
            )
        })?;
        let size = blob.size;
        Ok(FileChunks::new(blob.file, 0, size, Some(blob.lease)))
    }
}

/// A store file, read on the blocking pool and held from eviction while it is read.
impl Chunks for FileChunks {
    async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        while let Some(frame) = self.frame().await {
            if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }
}

/// A config and its layers, as docker's `manifest.json` lists an image.
type DockerEntry = (Digest, Vec<Digest>);

/// Collects one image's manifests and blobs, checking the source holds each.
struct Walk<'a, S> {
    source: &'a S,
    root: &'a Root,
    position: usize,
    platforms: &'a [String],
    items: &'a mut Vec<Item>,
    seen: &'a mut HashSet<Digest>,
    size: u64,
    platforms_found: Vec<String>,
    all_platforms: bool,
}

impl<S: Source> Walk<'_, S> {
    /// Adds a manifest and what it references; returns the config and layers docker's
    /// `manifest.json` lists for it: an image manifest's own, or for an index the platform
    /// `docker load` takes (see [`docker_platform`]).
    async fn manifest(
        &mut self,
        digest: &Digest,
        bytes: Bytes,
        top: bool,
    ) -> Result<Option<DockerEntry>, BundleError> {
        self.size += bytes.len() as u64;
        let document: Document = serde_json::from_slice(&bytes).map_err(|e| {
            image_error(
                &self.root.shown,
                format!("manifest {digest} cannot be read: {e}"),
            )
        })?;
        let mut docker = None;
        if document.is_index() {
            let mut held = Vec::new();
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
                let name = child.platform.as_ref().and_then(platform_name);
                if let Some(name) = &name {
                    self.platforms_found.push(name.clone());
                }
                let child_digest = self.digest(&child.digest)?;
                let child_bytes = self.source.manifest(self.root, &child_digest).await?;
                let entry = Box::pin(self.manifest(&child_digest, child_bytes, false)).await?;
                held.push((name, entry));
            }
            if top && held.is_empty() {
                return Err(image_error(
                    &self.root.shown,
                    format!(
                        "no platform of the index matches {}",
                        self.platforms.join(", ")
                    ),
                ));
            }
            docker = docker_platform(held);
        } else {
            let mut blobs = Vec::new();
            for descriptor in document.blob_descriptors() {
                let blob = self.digest(&descriptor.digest)?;
                self.source
                    .check_blob(self.root, &blob, descriptor.size)
                    .await?;
                self.size += descriptor.size;
                if self.seen.insert(blob.clone()) {
                    self.items.push(Item::Blob {
                        image: self.position,
                        digest: blob.clone(),
                        size: descriptor.size,
                    });
                }
                blobs.push(blob);
            }
            if document.config.is_some() && !blobs.is_empty() {
                let config = blobs.remove(0);
                docker = Some((config, blobs));
            }
        }
        if self.seen.insert(digest.clone()) {
            self.items.push(Item::Manifest {
                image: self.position,
                digest: digest.clone(),
                bytes,
            });
        }
        Ok(docker)
    }

    fn digest(&self, text: &str) -> Result<Digest, BundleError> {
        Digest::parse(text).map_err(|e| {
            image_error(
                &self.root.shown,
                format!("a manifest references {text:?}: {e}"),
            )
        })
    }
}

/// The platform of an index that docker's `manifest.json` names: `docker load` without the
/// containerd image store (Engine 20.10's, and later ones' by default) reads only that listing,
/// one config and its layers per tag, so it gets one platform: `linux/amd64` when the bundle
/// holds it, else the first one held (`--platform` chooses another).
fn docker_platform(held: Vec<(Option<String>, Option<DockerEntry>)>) -> Option<DockerEntry> {
    // Attestations (buildkit's `unknown/unknown` entries) are manifests too, but no image.
    let mut images: Vec<_> = held
        .into_iter()
        .filter(|(name, _)| name.as_deref() != Some("unknown/unknown"))
        .filter_map(|(name, entry)| Some((name, entry?)))
        .collect();
    let chosen = images
        .iter()
        .position(|(name, _)| name.as_deref() == Some("linux/amd64"))
        .unwrap_or(0);
    (!images.is_empty()).then(|| images.swap_remove(chosen).1)
}
