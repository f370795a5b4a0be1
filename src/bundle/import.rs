//! `gantry import`: bundles into a store, all or nothing per check.
//!
//! Pass 1 reads every bundle whole and touches nothing: each entry's name and type, each blob's
//! sha256 (streamed; manifests and other small JSON are kept, under [`JSON_LIMIT`] each), the
//! layout files, every manifest an image names and every blob those reference, and no tag named
//! twice with two digests (within a bundle or across the bundles of one run). Any failure names
//! the entry and the store is left byte for byte as it was (the store is not even opened).
//! Pass 2 takes the store's lock, opens it and copies the content in through its own writers
//! (which hash again: a bundle changed between the passes is still refused per blob), blobs
//! first, then manifests, then links and catalogue records, tags last, so a tag never names
//! content the store does not hold. With `storage.s3` configured, every blob and manifest of the
//! bundles is then copied from the store into the object tier too (what it holds already is
//! skipped), so the other replicas sharing the bucket fetch them from there, not the upstream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::layout::{
    blob_name, BundleImage, BundleManifest, Document, EntryName, Index, OciLayout, BUNDLE_JSON,
    BUNDLE_VERSION, INDEX_JSON, JSON_LIMIT, OCI_LAYOUT, REF_NAME,
};
use super::names::Names;
use super::BundleError;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::oci::manifest::encode_stored;
use crate::oci::{Digest, DigestHasher, Tag};
use crate::store::object::{ObjectTier, ObjectTierError, Uploaded};
use crate::store::{lock, Store, StoreOptions};

/// Small blobs kept from pass 1 for every bundle of a run, at most (manifests and configs).
const KEPT_LIMIT: u64 = 512 << 20;
/// How much of a blob is read per write into the store.
const CHUNK: usize = 1 << 20;
/// Links recorded per image at most, as the mirror does when serving one.
const MAX_LINKS: usize = 1_000;

/// What [`import`] recorded.
#[derive(Debug, Default)]
pub struct Imported {
    pub images: Vec<BundleImage>,
    /// Blobs and manifests written (content the store already held is not counted).
    pub written: usize,
    pub bytes: u64,
    /// Registries the bundles name that this config does not serve.
    pub unserved: Vec<String>,
    /// Blobs and manifests uploaded to the object tier (`storage.s3`), and their bytes; content
    /// the tier already held is not counted.
    pub uploaded: usize,
    pub uploaded_bytes: u64,
}

/// One bundle as pass 1 found it.
struct Checked {
    path: PathBuf,
    images: Vec<BundleImage>,
    /// Every manifest the images need, with its media type and bytes.
    manifests: BTreeMap<Digest, (String, Bytes)>,
    /// Every other blob the images need, with its size.
    blobs: BTreeMap<Digest, u64>,
    /// Per image, every digest it consists of (for links).
    contents: Vec<Vec<Digest>>,
}

pub async fn import(config: &Config, bundles: &[PathBuf]) -> Result<Imported, BundleError> {
    let root = &config.storage.path;
    // Refused early when a server holds the store, before any time goes into reading.
    lock::ensure_unlocked(root)?;
    let mut checked = Vec::new();
    let mut tags: HashMap<(String, String, String), (String, PathBuf)> = HashMap::new();
    let mut kept = 0;
    for path in bundles {
        let bundle = check(path, &mut kept)?;
        for image in &bundle.images {
            let Some(tag) = &image.tag else { continue };
            let key = (
                image.registry.clone(),
                image.repository.clone(),
                tag.clone(),
            );
            if let Some((digest, other)) = tags.get(&key) {
                if *digest != image.digest {
                    // The first bundle may be this one: a tag named twice within it.
                    return Err(BundleError::entry(
                        path,
                        BUNDLE_JSON,
                        format!(
                            "{}/{}:{tag} is named twice: {} here and {digest} in {}",
                            image.registry,
                            image.repository,
                            image.digest,
                            other.display()
                        ),
                    ));
                }
            }
            tags.insert(key, (image.digest.clone(), path.clone()));
        }
        checked.push(bundle);
    }

    let _lock = lock::lock(root)?;
    let store = Store::open(
        root,
        StoreOptions::from_config(&config.storage),
        Arc::new(Metrics::new()),
    )?;
    let names = Names::new(config);
    let mut imported = Imported::default();
    for bundle in &checked {
        copy(&store, bundle, &mut imported).await?;
        for (image, contents) in bundle.images.iter().zip(&bundle.contents) {
            let repository = format!("{}/{}", image.registry, image.repository);
            store.link(contents.clone(), &repository).await;
        }
        for (digest, (media_type, bytes)) in &bundle.manifests {
            let references = crate::oci::manifest::ManifestDoc::parse(bytes)
                .map(|doc| doc.references(MAX_LINKS))
                .unwrap_or_default();
            store
                .catalogue()
                .record_manifest(digest, media_type, bytes.len() as u64, &references);
        }
        for image in &bundle.images {
            if let (Some(tag), Ok(digest)) = (&image.tag, Digest::parse(&image.digest)) {
                store.catalogue().record_tag(
                    &image.registry,
                    &image.repository,
                    tag,
                    &digest,
                    &image.media_type,
                );
            }
            if !names.serves(&image.registry) && !imported.unserved.contains(&image.registry) {
                imported.unserved.push(image.registry.clone());
            }
            imported.images.push(image.clone());
        }
    }
    if let Some(s3) = &config.storage.s3 {
        let tier = ObjectTier::connect(s3, Arc::new(Metrics::new()))
            .await
            .map_err(tier_error)?;
        for bundle in &checked {
            upload(&tier, &store, bundle, &mut imported).await?;
        }
    }
    Ok(imported)
}

fn count(imported: &mut Imported, uploaded: Uploaded) {
    if let Uploaded::Stored { bytes } = uploaded {
        imported.uploaded += 1;
        imported.uploaded_bytes += bytes;
    }
}

fn tier_error(error: ObjectTierError) -> BundleError {
    BundleError::ObjectTier(Box::new(error))
}

/// Pass 3, with an object tier: the bundle's blobs (from the store, where pass 2 verified them)
/// and manifests into the tier. The local import is complete before it starts, so a failure here
/// loses nothing: running the import again uploads what is missing.
async fn upload(
    tier: &ObjectTier,
    store: &Arc<Store>,
    bundle: &Checked,
    imported: &mut Imported,
) -> Result<(), BundleError> {
    for digest in bundle.blobs.keys() {
        let Some(file) = store.open_blob(digest).await else {
            // Evicted already (a store smaller than the bundle): nothing left to upload from.
            continue;
        };
        let uploaded = tier.upload_blob(digest, &file).await;
        count(imported, uploaded.map_err(tier_error)?);
    }
    for (digest, (media_type, bytes)) in &bundle.manifests {
        let stored = Bytes::from(encode_stored(media_type, bytes));
        let written = tier.write_manifest(digest, stored).await;
        count(imported, written.map_err(tier_error)?);
    }
    Ok(())
}

/// Pass 2 for one bundle: its blobs (read from the tar again) and manifests into the store.
async fn copy(
    store: &Arc<Store>,
    bundle: &Checked,
    imported: &mut Imported,
) -> Result<(), BundleError> {
    let path = &bundle.path;
    let file = File::open(path).map_err(BundleError::io(path))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(CHUNK, file));
    let entries = archive.entries().map_err(BundleError::io(path))?;
    for entry in entries {
        let mut entry = entry.map_err(BundleError::io(path))?;
        let Ok(EntryName::Blob(digest)) = EntryName::parse(&entry.path_bytes()) else {
            continue;
        };
        let Some(size) = bundle.blobs.get(&digest) else {
            continue;
        };
        if store.contains_blob(&digest) {
            continue;
        }
        let name = blob_name(&digest);
        let mut writer = store.begin_blob(&digest, Some(*size))?;
        let mut buffer = vec![0u8; CHUNK];
        loop {
            let read = entry
                .read(&mut buffer)
                .map_err(|e| BundleError::entry(path, &name, e.to_string()))?;
            if read == 0 {
                break;
            }
            writer
                .write(Bytes::copy_from_slice(&buffer[..read]))
                .await?;
        }
        writer.commit().await.map_err(|e| {
            BundleError::entry(path, &name, format!("changed since it was checked: {e}"))
        })?;
        imported.written += 1;
        imported.bytes += size;
    }
    for (digest, (media_type, bytes)) in &bundle.manifests {
        if store.read_manifest(digest).await.is_some() {
            continue;
        }
        store
            .write_manifest(digest, media_type, bytes.clone())
            .await?;
        imported.written += 1;
        imported.bytes += bytes.len() as u64;
    }
    Ok(())
}

/// What pass 1 read from the tar itself.
#[derive(Default)]
struct Read1 {
    layout: Option<Vec<u8>>,
    index: Option<Vec<u8>>,
    bundle: Option<Vec<u8>>,
    /// Every blob's size.
    sizes: HashMap<Digest, u64>,
    /// Small blobs' bytes (manifests among them).
    small: HashMap<Digest, Bytes>,
}

/// Pass 1 for one bundle.
fn check(path: &Path, kept: &mut u64) -> Result<Checked, BundleError> {
    let mut read = read_all(path, kept)?;
    let refuse = |entry: &str, reason: String| BundleError::entry(path, entry, reason);
    let layout = read.layout.take().ok_or_else(|| {
        refuse(
            OCI_LAYOUT,
            "missing: this is not an OCI image layout".to_owned(),
        )
    })?;
    serde_json::from_slice::<OciLayout>(&layout).map_err(|e| refuse(OCI_LAYOUT, e.to_string()))?;
    let index = read
        .index
        .take()
        .ok_or_else(|| refuse(INDEX_JSON, "missing".to_owned()))?;
    let index: Index =
        serde_json::from_slice(&index).map_err(|e| refuse(INDEX_JSON, e.to_string()))?;
    let bundle = read.bundle.take().ok_or_else(|| {
        refuse(
            BUNDLE_JSON,
            "missing: gantry imports bundles written by `gantry export`".to_owned(),
        )
    })?;
    let bundle: BundleManifest =
        serde_json::from_slice(&bundle).map_err(|e| refuse(BUNDLE_JSON, e.to_string()))?;
    if bundle.version != BUNDLE_VERSION {
        return Err(refuse(
            BUNDLE_JSON,
            format!(
                "version {} is not one this gantry reads ({BUNDLE_VERSION})",
                bundle.version
            ),
        ));
    }

    // index.json: each name once, each entry present.
    let mut ref_names: HashMap<&str, &str> = HashMap::new();
    let mut listed = HashSet::new();
    for descriptor in &index.manifests {
        let digest = Digest::parse(&descriptor.digest)
            .map_err(|e| refuse(INDEX_JSON, format!("{:?}: {e}", descriptor.digest)))?;
        if let Some(name) = descriptor.annotations.get(REF_NAME) {
            if let Some(other) = ref_names.insert(name, &descriptor.digest) {
                if other != descriptor.digest {
                    return Err(refuse(
                        INDEX_JSON,
                        format!("{name} names both {other} and {}", descriptor.digest),
                    ));
                }
            }
        }
        if !read.sizes.contains_key(&digest) {
            return Err(refuse(
                &blob_name(&digest),
                format!("missing (listed in {INDEX_JSON})"),
            ));
        }
        listed.insert(digest);
    }

    let mut checked = Checked {
        path: path.to_owned(),
        images: Vec::new(),
        manifests: BTreeMap::new(),
        blobs: BTreeMap::new(),
        contents: Vec::new(),
    };
    for image in &bundle.images {
        let name = format!("{}/{}", image.registry, image.repository);
        if let Some(tag) = &image.tag {
            Tag::parse(tag).map_err(|e| refuse(BUNDLE_JSON, format!("{name}: {e}")))?;
        }
        crate::oci::RepoName::parse(&image.repository)
            .map_err(|e| refuse(BUNDLE_JSON, format!("{name}: {e}")))?;
        let digest = Digest::parse(&image.digest)
            .map_err(|e| refuse(BUNDLE_JSON, format!("{name}: {e}")))?;
        if !listed.contains(&digest) {
            return Err(refuse(
                INDEX_JSON,
                format!("does not list {digest} ({name})"),
            ));
        }
        let mut contents = Vec::new();
        let mut walk = Walk {
            path,
            read: &read,
            checked: &mut checked,
            contents: &mut contents,
            all_platforms: image.all_platforms,
        };
        walk.manifest(&digest, Some(&image.media_type), &name)?;
        contents.truncate(MAX_LINKS);
        checked.contents.push(contents);
        checked.images.push(image.clone());
    }
    Ok(checked)
}

/// Checks that a manifest and everything it references is in the bundle.
struct Walk<'a> {
    path: &'a Path,
    read: &'a Read1,
    checked: &'a mut Checked,
    contents: &'a mut Vec<Digest>,
    all_platforms: bool,
}

impl Walk<'_> {
    fn manifest(
        &mut self,
        digest: &Digest,
        media_type: Option<&str>,
        image: &str,
    ) -> Result<(), BundleError> {
        let entry = blob_name(digest);
        let bytes = self.read.small.get(digest).ok_or_else(|| {
            let reason = if self.read.sizes.contains_key(digest) {
                format!("too large for a manifest of {image}")
            } else {
                format!("missing (a manifest of {image})")
            };
            BundleError::entry(self.path, &entry, reason)
        })?;
        let document: Document = serde_json::from_slice(bytes)
            .map_err(|e| BundleError::entry(self.path, &entry, format!("not a manifest: {e}")))?;
        let media_type = document
            .media_type
            .clone()
            .or_else(|| media_type.filter(|m| !m.is_empty()).map(str::to_owned))
            .ok_or_else(|| {
                BundleError::entry(self.path, &entry, "a manifest without a media type")
            })?;
        self.contents.push(digest.clone());
        if document.is_index() {
            for child in &document.manifests {
                let child_digest = self.digest(&child.digest, &entry)?;
                if !self.read.sizes.contains_key(&child_digest) && !self.all_platforms {
                    continue;
                }
                self.manifest(&child_digest, Some(&child.media_type), image)?;
            }
        } else {
            for descriptor in document.blob_descriptors() {
                let blob = self.digest(&descriptor.digest, &entry)?;
                let name = blob_name(&blob);
                let Some(size) = self.read.sizes.get(&blob) else {
                    return Err(BundleError::entry(
                        self.path,
                        name,
                        format!("missing (referenced by {entry} of {image})"),
                    ));
                };
                if *size != descriptor.size {
                    return Err(BundleError::entry(
                        self.path,
                        name,
                        format!("{size} bytes, {entry} says {}", descriptor.size),
                    ));
                }
                self.contents.push(blob.clone());
                self.checked.blobs.insert(blob, *size);
            }
        }
        self.checked
            .manifests
            .insert(digest.clone(), (media_type, bytes.clone()));
        Ok(())
    }

    fn digest(&self, text: &str, entry: &str) -> Result<Digest, BundleError> {
        Digest::parse(text)
            .map_err(|e| BundleError::entry(self.path, entry, format!("references {text:?}: {e}")))
    }
}

/// Reads every entry of the tar: names and types checked, blobs hashed, small files kept.
fn read_all(path: &Path, kept: &mut u64) -> Result<Read1, BundleError> {
    let file = File::open(path).map_err(BundleError::io(path))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(CHUNK, file));
    let not_tar = |e: std::io::Error| {
        BundleError::entry(path, "(the archive)", format!("not a readable tar: {e}"))
    };
    let entries = archive.entries().map_err(not_tar)?;
    let mut read = Read1::default();
    let mut last: Option<String> = None;
    let mut any = false;
    for entry in entries {
        let mut entry = entry.map_err(|e| match &last {
            None => BundleError::entry(path, "(the archive)", format!("not a tar archive: {e}")),
            Some(last) => BundleError::entry(
                path,
                format!("(the entry after {last})"),
                format!("not a readable tar header (truncated or damaged): {e}"),
            ),
        })?;
        any = true;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        last = Some(shown.clone());
        let name =
            EntryName::parse(&raw).map_err(|reason| BundleError::entry(path, &shown, reason))?;
        let kind = entry.header().entry_type();
        let expected = if name == EntryName::Directory {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        };
        if kind != expected
            && !(kind == tar::EntryType::Continuous && expected == tar::EntryType::Regular)
        {
            return Err(BundleError::entry(
                path,
                &shown,
                format!("a {kind:?} entry: only regular files are imported"),
            ));
        }
        let size = entry.size();
        let small = size <= JSON_LIMIT;
        let mut hasher = DigestHasher::new(crate::oci::Algorithm::Sha256);
        let mut bytes = Vec::new();
        let mut buffer = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = entry.read(&mut buffer).map_err(|e| {
                BundleError::entry(
                    path,
                    &shown,
                    format!("cannot be read whole (truncated?): {e}"),
                )
            })?;
            if n == 0 {
                break;
            }
            total += n as u64;
            hasher.update(&buffer[..n]);
            if small {
                bytes.extend_from_slice(&buffer[..n]);
            }
        }
        if total != size {
            return Err(BundleError::entry(
                path,
                &shown,
                format!("{total} bytes where its header says {size} (truncated)"),
            ));
        }
        let once = |slot: &mut Option<Vec<u8>>, bytes: Vec<u8>| {
            if slot.replace(bytes).is_some() {
                return Err(BundleError::entry(path, &shown, "appears twice"));
            }
            Ok(())
        };
        match name {
            EntryName::Directory | EntryName::DockerManifest => {}
            EntryName::Layout | EntryName::Index | EntryName::Bundle if !small => {
                return Err(BundleError::entry(
                    path,
                    &shown,
                    format!("larger than {JSON_LIMIT} bytes"),
                ));
            }
            EntryName::Layout => once(&mut read.layout, bytes)?,
            EntryName::Index => once(&mut read.index, bytes)?,
            EntryName::Bundle => once(&mut read.bundle, bytes)?,
            EntryName::Blob(digest) => {
                let actual = hasher.finish();
                if actual != digest {
                    return Err(BundleError::entry(
                        path,
                        &shown,
                        format!("its content hashes to {actual}, not to its name"),
                    ));
                }
                if small && bytes.first() == Some(&b'{') {
                    *kept += size;
                    if *kept > KEPT_LIMIT {
                        return Err(BundleError::entry(path, &shown, format!("more than {KEPT_LIMIT} bytes of manifests and configs in one import")));
                    }
                    read.small.insert(digest.clone(), Bytes::from(bytes));
                }
                read.sizes.insert(digest, size);
            }
        }
    }
    if !any {
        return Err(BundleError::entry(
            path,
            "(the archive)",
            "no entries: not a tar, or an empty one",
        ));
    }
    Ok(read)
}
