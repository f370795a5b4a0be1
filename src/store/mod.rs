//! The content-addressed disk store for blobs and manifests.
//!
//! Layout under `storage.path` (version 1):
//!
//! ```text
//! layout                        "gantry store layout 1\n": which layout this is (see [`LAYOUT_FILE`])
//! blobs/sha256/ab/abcdef…       blob bytes, exactly as the upstream sent them
//! manifests/sha256/ab/abcdef…   "<media type>\n" followed by the manifest bytes
//! links/sha256/ab/abcdef…       the repositories known to reference it, one per line
//! catalogue/journal.jsonl       tags → manifests → references, for operators (see [`catalogue`])
//! pins                          digests kept whatever storage.max_size says (see [`pins`])
//! tmp/                          downloads in progress; emptied at start-up
//! ```
//!
//! Nothing enters `blobs/` or `manifests/` unless its bytes hash to its name: writers stream into
//! `tmp/`, hash as they go, fsync, and rename only on a match. An in-memory LRU index (rebuilt from
//! disk at start-up) keeps the store under `storage.max_size`; entries being read are held by a
//! [`Lease`] (counted in the index's `readers`) and never evicted while held, and pinned entries
//! ([`pins`]) are never evicted at all.
//!
//! An operator's purge ([`Store::purge`]) removes manifests and the blobs no other cached manifest
//! references. Unlinking is safe under readers (open files and mappings stay valid, see
//! `mapped`); a download of a purged digest still running is marked so its commit discards it.

mod body;
pub mod catalogue;
mod links;
pub mod lock;
mod mapped;
pub mod object;
pub mod pins;
mod writer;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use lru::LruCache;

pub use body::{read_exact_at, BlobBody, FileChunks, READ_CHUNK};
pub use catalogue::{Catalogue, ManifestRecord, PullRecord, TagRecord, CATALOGUE_DIR};
pub use pins::{Pins, PINS_FILE};
pub use writer::BlobWriter;

use crate::metrics::Metrics;
use crate::oci::manifest::{split_stored, stored_header};
use crate::oci::{Algorithm, Digest};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content for {digest} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("a blocking store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(
        "storage.path {}: its {LAYOUT_FILE} file names store layout {found:?}, and this gantry knows \
         only layout {LAYOUT_VERSION}: refusing to touch the store (was it written by a newer gantry?)",
        root.display()
    )]
    UnknownLayout { root: PathBuf, found: String },
}

/// The file at the top of the store that names its layout. A store without it was written before
/// the file existed, in layout 1, and is adopted; a store naming a layout this build does not
/// know is refused before anything in it is touched (emptying `tmp/`, evicting, or writing links
/// in the wrong shape would damage what a newer gantry wrote).
pub const LAYOUT_FILE: &str = "layout";
/// The layout this build reads and writes: the directory tree described at the top of this module.
pub const LAYOUT_VERSION: u32 = 1;
/// What [`LAYOUT_FILE`] holds before the version number.
const LAYOUT_PREFIX: &str = "gantry store layout ";

/// Refuses a store whose layout file names a layout other than [`LAYOUT_VERSION`]; `Ok(true)` when
/// the file is missing (a fresh store or one written before the file existed).
fn check_layout(root: &Path) -> Result<bool, StoreError> {
    let path = root.join(LAYOUT_FILE);
    let text = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    let text = String::from_utf8_lossy(&text);
    let found = text.trim_end_matches('\n');
    let version = found.strip_prefix(LAYOUT_PREFIX).unwrap_or(found);
    if version == LAYOUT_VERSION.to_string() {
        return Ok(false);
    }
    Err(StoreError::UnknownLayout {
        root: root.to_owned(),
        found: version.chars().take(64).collect(),
    })
}

/// Writes [`LAYOUT_FILE`] through `tmp/` and a rename, so a crash never leaves a torn one (which
/// the next start would refuse).
fn write_layout(root: &Path, tmp: &Path) -> Result<(), StoreError> {
    let staged = tmp.join(LAYOUT_FILE);
    let written = (|| {
        let mut file = File::create(&staged)?;
        io::Write::write_all(
            &mut file,
            format!("{LAYOUT_PREFIX}{LAYOUT_VERSION}\n").as_bytes(),
        )?;
        file.sync_all()?;
        std::fs::rename(&staged, root.join(LAYOUT_FILE))
    })();
    written.map_err(io_error(root))
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    /// What an operator calls it: `blob` or `manifest`.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Manifest => "manifest",
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Manifest => "manifests",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    kind: Kind,
    digest: Digest,
}

struct Index {
    /// Entry sizes, least recently used first out.
    lru: LruCache<Key, u64>,
    total_bytes: u64,
    /// Entries being read right now, with how many leases each: the eviction guard. (Not a "pin"
    /// in the operator's sense of keeping an image forever; that is a catalogue matter.)
    readers: HashMap<Key, usize>,
}

/// How a store is run (from the `storage:` config section).
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// Least recently used entries are evicted above this many bytes.
    pub max_size: Option<u64>,
    /// Serve blobs from memory mappings of their files (`storage.mmap`).
    pub map_files: bool,
}

impl StoreOptions {
    /// The options the `storage:` section sets (config is a leaf: the store reads it, never the
    /// other way round).
    pub fn from_config(storage: &crate::config::Storage) -> Self {
        Self {
            max_size: storage.max_size.map(|size| size.0),
            map_files: storage.mmap,
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_size: None,
            map_files: true,
        }
    }
}

pub struct Store {
    root: PathBuf,
    max_size: Option<u64>,
    /// See [`StoreOptions::map_files`].
    map_files: bool,
    index: Mutex<Index>,
    /// Manifests are small and asked for on every pull: their bytes are kept in memory too, so a
    /// warm manifest request touches no file. Entries leave with their file (eviction, `forget`).
    hot_manifests: moka::sync::Cache<Digest, StoredManifest>,
    /// Small blobs stay mapped between requests (see [`mapped::SharedMap`]); they leave with
    /// their file too. Mapped pages that were read count in RSS, hence a small budget.
    small_blob_maps: moka::sync::Cache<Digest, mapped::SharedMap>,
    /// Which repositories reference each entry (see [`links`]).
    links: links::Links,
    /// Tags → manifests → references, for operators; manifests leave it with their file.
    catalogue: Catalogue,
    /// Digests never evicted (see [`pins`]); shared with the object tier's sweep.
    pins: Arc<Pins>,
    /// The discard flag of every open [`BlobWriter`], by digest: a purge sets them (under the
    /// index lock, which a commit takes to check its flag), so a download of purged content
    /// finishes for its clients but is never committed.
    writers: Mutex<HashMap<Digest, Vec<Arc<AtomicBool>>>>,
    /// Pinned entries alone exceed `max_size`: logged once until they fit again.
    pins_over_budget: AtomicBool,
    metrics: Arc<Metrics>,
}

/// Memory for [`Store::hot_manifests`], in bytes.
const HOT_MANIFEST_BYTES: u64 = 64 << 20;
/// Mapped bytes for [`Store::small_blob_maps`]; blobs up to one map window qualify.
const SMALL_BLOB_MAP_BYTES: u64 = 8 << 20;

/// A committed blob opened for reading; it cannot be evicted while this lives.
pub struct BlobFile {
    pub file: Arc<File>,
    pub size: u64,
    pub lease: Lease,
}

/// A manifest as stored: its media type and its exact bytes.
#[derive(Clone, Debug)]
pub struct StoredManifest {
    pub media_type: String,
    pub bytes: Bytes,
}

/// Keeps an entry from eviction until dropped.
pub struct Lease {
    store: Arc<Store>,
    key: Key,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut index = self.store.lock_index();
        if let Some(count) = index.readers.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                index.readers.remove(&self.key);
            }
        }
    }
}

/// What [`Store::purge`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Purged {
    /// Manifests removed (the ones asked for, and index children nothing else references).
    pub manifests: Vec<Digest>,
    /// Blobs removed: referenced by a removed manifest and by no other cached manifest.
    pub blobs: Vec<Digest>,
    /// Bytes the disk store freed (entries only in the object tier count nothing here).
    pub bytes: u64,
    /// References kept because another cached manifest references them too.
    pub shared: Vec<Digest>,
    /// Object tier deletions that failed, as messages (the disk side was still purged).
    pub tier_errors: Vec<String>,
}

/// What `gantry gc --verify` found.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Entries whose content matched their digest, and their bytes.
    pub entries: u64,
    pub bytes: u64,
    /// Entries that did not match (or could not be read) and were removed.
    pub removed: Vec<(Kind, Digest)>,
}

impl Store {
    /// Opens (creating if needed) the store at `root`: refuses a layout it does not know, empties
    /// `tmp/`, indexes what is on disk by last use, and evicts down to `max_size`.
    pub fn open(
        root: &Path,
        options: StoreOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let max_size = options.max_size;
        let layout_missing = check_layout(root)?;
        for dir in ["blobs", "manifests"] {
            std::fs::create_dir_all(root.join(dir)).map_err(io_error(root))?;
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_error(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_error(&tmp))?;
        if layout_missing {
            write_layout(root, &tmp)?;
        }

        let mut found = Vec::new();
        for kind in [Kind::Blob, Kind::Manifest] {
            scan(&root.join(kind.dir()), kind, &mut found)?;
        }
        found.sort_by_key(|(_, _, used)| *used);
        let mut lru = LruCache::unbounded();
        let mut total_bytes = 0;
        for (key, size, _) in found {
            total_bytes += size;
            lru.put(key, size);
        }
        let held = |digest: &Digest| {
            [Kind::Blob, Kind::Manifest].into_iter().any(|kind| {
                lru.contains(&Key {
                    kind,
                    digest: digest.clone(),
                })
            })
        };
        let links_dir = root.join("links");
        let first_links = !links_dir.exists();
        let links = links::Links::open(&links_dir, held).map_err(io_error(&links_dir))?;
        if first_links && !lru.is_empty() {
            let cached: Vec<Digest> = lru.iter().map(|(key, _)| key.digest.clone()).collect();
            tracing::warn!(
                entries = cached.len(),
                "this store was written by a gantry without repository links: its entries are served under any \
                 repository until they leave the cache; new content is scoped to its repositories"
            );
            links.adopt_legacy(cached).map_err(io_error(&links_dir))?;
        }
        let catalogue = Catalogue::open(&root.join(CATALOGUE_DIR))?;
        let pins = Arc::new(Pins::open(root).map_err(io_error(&root.join(PINS_FILE)))?);
        let store = Arc::new(Self {
            root: root.to_owned(),
            max_size,
            map_files: options.map_files,
            index: Mutex::new(Index {
                lru,
                total_bytes,
                readers: HashMap::new(),
            }),
            hot_manifests: moka::sync::Cache::builder()
                .max_capacity(HOT_MANIFEST_BYTES)
                .weigher(|_, manifest: &StoredManifest| {
                    u32::try_from(manifest.bytes.len() + manifest.media_type.len())
                        .unwrap_or(u32::MAX)
                })
                .build(),
            small_blob_maps: moka::sync::Cache::builder()
                .max_capacity(SMALL_BLOB_MAP_BYTES)
                .weigher(|_, map: &mapped::SharedMap| u32::try_from(map.len()).unwrap_or(u32::MAX))
                .build(),
            links,
            catalogue,
            pins,
            writers: Mutex::new(HashMap::new()),
            pins_over_budget: AtomicBool::new(false),
            metrics,
        });
        store.evict_to_fit();
        store.publish_size();
        Ok(store)
    }

    fn lock_index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, kind: Kind, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join(kind.dir())
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// What is cached under which names (tags, manifests and their references).
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// An entry left the store: so do its repository links and, for a manifest, its record.
    fn left(&self, key: &Key) {
        self.links.remove(&key.digest);
        if key.kind == Kind::Manifest {
            self.catalogue.forget_manifest(&key.digest);
        }
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Marks an entry used and counts one more reader of it, if the index has it.
    fn lease(self: &Arc<Self>, key: &Key) -> Option<(Lease, u64)> {
        let mut index = self.lock_index();
        let size = *index.lru.get(key)?;
        *index.readers.entry(key.clone()).or_insert(0) += 1;
        Some((
            Lease {
                store: Arc::clone(self),
                key: key.clone(),
            },
            size,
        ))
    }

    /// Forgets an entry whose file vanished from under the index.
    fn forget(&self, key: &Key) {
        self.hot_manifests.invalidate(&key.digest);
        self.small_blob_maps.invalidate(&key.digest);
        self.left(key);
        let mut index = self.lock_index();
        if let Some(size) = index.lru.pop(key) {
            index.total_bytes -= size;
        }
        drop(index);
        self.publish_size();
    }

    /// Whether `repository` of `registry` is known to reference `digest`.
    pub fn is_linked(&self, digest: &Digest, registry: &str, repository: &str) -> bool {
        self.links.contains(digest, registry, repository)
    }

    /// Whether the references of manifest `digest` are linked under `repository` of `registry`
    /// (a linked manifest's own references may not be: an index links its platform manifests).
    pub fn references_linked(&self, digest: &Digest, registry: &str, repository: &str) -> bool {
        self.links.expanded(digest, registry, repository)
    }

    /// Records that `repository` (`<registry>/<repository>`) references each of `digests`,
    /// durably; returns once the links hold in memory and are written.
    pub async fn link(self: &Arc<Self>, digests: Vec<Digest>, repository: &str) {
        self.link_all(digests, repository, None).await;
    }

    /// [`Store::link`] for a manifest and its references (`digests`), then records that its
    /// references are linked ([`Store::references_linked`]).
    pub async fn link_manifest(
        self: &Arc<Self>,
        manifest: &Digest,
        digests: Vec<Digest>,
        repository: &str,
    ) {
        self.link_all(digests, repository, Some(manifest.clone()))
            .await;
    }

    async fn link_all(
        self: &Arc<Self>,
        digests: Vec<Digest>,
        repository: &str,
        expanded: Option<Digest>,
    ) {
        let store = Arc::clone(self);
        let repository = repository.to_owned();
        let written = tokio::task::spawn_blocking(move || {
            for digest in &digests {
                store.links.insert(digest, &repository);
            }
            if let Some(manifest) = expanded {
                store.links.mark_expanded(&manifest, &repository);
            }
        })
        .await;
        if let Err(error) = written {
            tracing::warn!(%error, "recording repository links failed");
        }
    }

    pub fn contains_blob(&self, digest: &Digest) -> bool {
        self.lock_index().lru.contains(&Key {
            kind: Kind::Blob,
            digest: digest.clone(),
        })
    }

    /// Opens a committed blob for reading, or `None` if the store does not have it.
    pub async fn open_blob(self: &Arc<Self>, digest: &Digest) -> Option<BlobFile> {
        let key = Key {
            kind: Kind::Blob,
            digest: digest.clone(),
        };
        let (lease, size) = self.lease(&key)?;
        let path = self.path(Kind::Blob, digest);
        match tokio::task::spawn_blocking(move || File::open(path)).await {
            Ok(Ok(file)) => Some(BlobFile {
                file: Arc::new(file),
                size,
                lease,
            }),
            _ => {
                drop(lease);
                self.forget(&key);
                None
            }
        }
    }

    /// The shared mapping of a small committed blob, made on first use; `None` when the blob is
    /// empty, larger than one map window, or cannot be mapped.
    fn small_blob_map(&self, blob: &BlobFile) -> Option<mapped::SharedMap> {
        if blob.size == 0 || blob.size > mapped::MAP_WINDOW as u64 {
            return None;
        }
        let digest = &blob.lease.key.digest;
        if let Some(map) = self.small_blob_maps.get(digest) {
            return Some(map);
        }
        let map = mapped::SharedMap::new(Arc::clone(&blob.file), blob.size).ok()?;
        self.small_blob_maps.insert(digest.clone(), map.clone());
        Some(map)
    }

    pub async fn read_manifest(self: &Arc<Self>, digest: &Digest) -> Option<StoredManifest> {
        let key = Key {
            kind: Kind::Manifest,
            digest: digest.clone(),
        };
        let (lease, _) = self.lease(&key)?;
        if let Some(hot) = self.hot_manifests.get(digest) {
            return Some(hot);
        }
        let raw = tokio::fs::read(self.path(Kind::Manifest, digest)).await;
        drop(lease);
        let parsed = raw.ok().and_then(|raw| {
            let (media_type, start) = split_stored(&raw)?;
            let media_type = media_type.to_owned();
            let bytes = Bytes::from(raw).slice(start..);
            Some(StoredManifest { media_type, bytes })
        });
        match &parsed {
            Some(manifest) => self.hot_manifests.insert(digest.clone(), manifest.clone()),
            None => self.forget(&key),
        }
        parsed
    }

    /// Stores a manifest after checking that `bytes` hash to `digest`.
    pub async fn write_manifest(
        self: &Arc<Self>,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), StoreError> {
        let actual = Digest::of(digest.algorithm(), &bytes);
        if actual != *digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let mut writer = BlobWriter::create(self, Kind::Manifest, digest.clone(), None)?;
        writer
            .write_unhashed(Bytes::from(stored_header(media_type)))
            .await?;
        writer.write(bytes).await?;
        writer.commit().await
    }

    /// Starts writing a blob; it becomes visible only when [`BlobWriter::commit`] verifies it.
    pub fn begin_blob(
        self: &Arc<Self>,
        digest: &Digest,
        expected_size: Option<u64>,
    ) -> Result<BlobWriter, StoreError> {
        BlobWriter::create(self, Kind::Blob, digest.clone(), expected_size)
    }

    /// Records a committed entry and evicts what no longer fits; `false` (nothing recorded) when
    /// a purge set `discard` meanwhile: the caller then removes the file it renamed into place.
    fn insert(&self, key: Key, size: u64, discard: &AtomicBool) -> bool {
        let mut index = self.lock_index();
        if discard.load(Ordering::Acquire) {
            return false;
        }
        if let Some(old) = index.lru.put(key, size) {
            index.total_bytes -= old;
        }
        index.total_bytes += size;
        drop(index);
        self.evict_to_fit();
        self.publish_size();
        true
    }

    /// Deletes least recently used entries nobody is reading and nobody pinned until the store
    /// fits `max_size`. Pinned entries that alone exceed it are kept, and that is logged once.
    fn evict_to_fit(&self) {
        let Some(max) = self.max_size else { return };
        let mut victims = Vec::new();
        let mut pinned_bytes = None;
        {
            let mut index = self.lock_index();
            let mut being_read = Vec::new();
            let mut pinned = Vec::new();
            while index.total_bytes > max {
                let Some((key, size)) = index.lru.pop_lru() else {
                    break;
                };
                if self.pins.contains(&key.digest) {
                    pinned.push((key, size));
                    continue;
                }
                if index.readers.contains_key(&key) {
                    being_read.push((key, size));
                    continue;
                }
                index.total_bytes -= size;
                self.hot_manifests.invalidate(&key.digest);
                self.small_blob_maps.invalidate(&key.digest);
                victims.push(key);
            }
            if index.total_bytes > max && index.lru.is_empty() && !pinned.is_empty() {
                pinned_bytes = Some(pinned.iter().map(|(_, size)| size).sum::<u64>());
            }
            // Pinned entries go back as most recently used, so later passes do not walk them.
            for (key, size) in pinned {
                index.lru.put(key, size);
            }
            // Entries being read go back as least recently used: first out once their readers finish.
            for (key, size) in being_read.into_iter().rev() {
                index.lru.put(key.clone(), size);
                index.lru.demote(&key);
            }
        }
        match pinned_bytes {
            Some(bytes) if bytes > max => {
                if !self.pins_over_budget.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        pinned_bytes = bytes,
                        max_size = max,
                        "pinned entries alone exceed storage.max_size: they are kept, and new content \
                         is evicted as soon as it is not being read (unpin images or raise max_size)"
                    );
                }
            }
            _ => self.pins_over_budget.store(false, Ordering::Relaxed),
        }
        for key in victims {
            self.left(&key);
            let path = self.path(key.kind, &key.digest);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    self.metrics.store_evictions.inc();
                    tracing::debug!(digest = %key.digest, "evicted");
                }
                Err(error) => tracing::warn!(path = %path.display(), %error, "cannot evict"),
            }
        }
    }

    /// The pinned digests (shared with the object tier's sweep, which spares them).
    pub fn pins(&self) -> &Arc<Pins> {
        &self.pins
    }

    /// Pins `digests` (an image's manifests, configs and layers) durably; returns how many were
    /// not pinned already. Blocks on the disk: call it off the runtime's threads.
    pub fn pin(&self, digests: &[Digest]) -> Result<usize, StoreError> {
        self.pins
            .pin(digests)
            .map_err(io_error(&self.root.join(PINS_FILE)))
    }

    /// Unpins `digests` durably and evicts what no longer fits; returns how many were pinned.
    pub fn unpin(&self, digests: &[Digest]) -> Result<usize, StoreError> {
        let unpinned = self
            .pins
            .unpin(digests)
            .map_err(io_error(&self.root.join(PINS_FILE)))?;
        if unpinned > 0 {
            self.evict_to_fit();
            self.publish_size();
        }
        Ok(unpinned)
    }

    /// Bytes of pinned entries the disk store holds (a pinned digest not cached counts nothing).
    pub fn pinned_bytes(&self) -> u64 {
        let pinned = self.pins.all();
        let index = self.lock_index();
        pinned
            .iter()
            .flat_map(|digest| {
                [Kind::Blob, Kind::Manifest].map(|kind| Key {
                    kind,
                    digest: digest.clone(),
                })
            })
            .filter_map(|key| index.lru.peek(&key).copied())
            .sum()
    }

    /// A writer's discard flag, registered so a purge of its digest can set it.
    fn register_writer(&self, digest: &Digest) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.clone())
            .or_default()
            .push(Arc::clone(&flag));
        flag
    }

    fn unregister_writer(&self, digest: &Digest, flag: &Arc<AtomicBool>) {
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flags) = writers.get_mut(digest) {
            flags.retain(|f| !Arc::ptr_eq(f, flag));
            if flags.is_empty() {
                writers.remove(digest);
            }
        }
    }

    /// Which manifests and blobs purging `roots` removes, and which references stay because a
    /// manifest outside the purge references them. An index's children go with it unless another
    /// cached manifest references them; `roots` go whoever references them (they were asked for).
    fn plan_purge(&self, roots: &[Digest]) -> (Vec<Digest>, Vec<Digest>, Vec<Digest>) {
        let is_manifest = |digest: &Digest| {
            self.catalogue.manifest(digest).is_some()
                || self.lock_index().lru.contains(&Key {
                    kind: Kind::Manifest,
                    digest: digest.clone(),
                })
        };
        let roots: HashSet<Digest> = roots.iter().cloned().collect();
        // Everything reachable from the roots, manifests first-class.
        let mut manifests: HashSet<Digest> = HashSet::new();
        let mut blobs: HashSet<Digest> = HashSet::new();
        let mut pending: Vec<Digest> = roots.iter().cloned().collect();
        while let Some(digest) = pending.pop() {
            if manifests.contains(&digest) || blobs.contains(&digest) {
                continue;
            }
            if roots.contains(&digest) || is_manifest(&digest) {
                if let Some(record) = self.catalogue.manifest(&digest) {
                    pending.extend(record.references.into_iter().map(|(d, _)| d));
                }
                manifests.insert(digest);
            } else {
                blobs.insert(digest);
            }
        }
        // Keep what manifests outside the purge reference, and what kept manifests reference.
        let mut kept;
        let mut shared = Vec::new();
        loop {
            let outside = self.catalogue.references_outside(&manifests);
            let rescued: Vec<Digest> = manifests
                .iter()
                .filter(|d| !roots.contains(*d) && outside.contains(*d))
                .cloned()
                .collect();
            kept = outside;
            if rescued.is_empty() {
                break;
            }
            for digest in rescued {
                manifests.remove(&digest);
                shared.push(digest);
            }
        }
        shared.extend(blobs.iter().filter(|d| kept.contains(*d)).cloned());
        blobs.retain(|d| !kept.contains(d));
        let mut manifests: Vec<Digest> = manifests.into_iter().collect();
        let mut blobs: Vec<Digest> = blobs.into_iter().collect();
        manifests.sort();
        blobs.sort();
        shared.sort();
        shared.dedup();
        (manifests, blobs, shared)
    }

    /// Removes the manifests `roots` and everything they reference that no other cached
    /// manifest references (index children, configs, layers), from the disk store and, given
    /// one, the object tier: files, index entries, links, catalogue records, pull counts and
    /// pins. Readers of a removed blob finish from their open files; a download of one still
    /// running completes for its clients and is then discarded instead of committed, so the
    /// next pull goes to the upstream again. Tags are the caller's (the catalogue's tags and the
    /// tag cache); a tag left pointing at a purged manifest is simply a miss.
    pub async fn purge(
        self: &Arc<Self>,
        roots: &[Digest],
        tier: Option<&object::ObjectTier>,
    ) -> Purged {
        let (manifests, blobs, shared) = self.plan_purge(roots);
        let store = Arc::clone(self);
        let keys: Vec<Key> = manifests
            .iter()
            .map(|digest| Key {
                kind: Kind::Manifest,
                digest: digest.clone(),
            })
            .chain(blobs.iter().map(|digest| Key {
                kind: Kind::Blob,
                digest: digest.clone(),
            }))
            .collect();
        let freed = tokio::task::spawn_blocking(move || store.remove_entries(&keys)).await;
        let bytes = freed.unwrap_or_else(|error| {
            tracing::warn!(%error, "a purge's removal task failed");
            0
        });
        let mut tier_errors = Vec::new();
        if let Some(tier) = tier {
            for digest in &manifests {
                if let Err(error) = tier.remove_manifest(digest).await {
                    tier_errors.push(format!("manifest {digest}: {error}"));
                }
            }
            for digest in &blobs {
                if let Err(error) = tier.remove_blob(digest).await {
                    tier_errors.push(format!("blob {digest}: {error}"));
                }
            }
        }
        Purged {
            manifests,
            blobs,
            bytes,
            shared,
            tier_errors,
        }
    }

    /// Removes entries from the index, the caches, links, the catalogue and the pins, then
    /// unlinks their files; marks running writers of their digests to discard. Returns the bytes
    /// freed on disk.
    fn remove_entries(&self, keys: &[Key]) -> u64 {
        let mut freed = 0;
        {
            let mut index = self.lock_index();
            let writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
            for key in keys {
                for flag in writers.get(&key.digest).into_iter().flatten() {
                    flag.store(true, Ordering::Release);
                }
                if let Some(size) = index.lru.pop(key) {
                    index.total_bytes -= size;
                    freed += size;
                }
            }
        }
        let digests: Vec<Digest> = keys.iter().map(|key| key.digest.clone()).collect();
        for key in keys {
            self.hot_manifests.invalidate(&key.digest);
            self.small_blob_maps.invalidate(&key.digest);
            self.left(key);
            if key.kind == Kind::Manifest {
                self.catalogue.forget_manifest(&key.digest);
            }
            let path = self.path(key.kind, &key.digest);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::debug!(digest = %key.digest, kind = key.kind.noun(), "purged"),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot remove a purged entry")
                }
            }
        }
        if let Err(error) = self.pins.unpin(&digests) {
            tracing::warn!(%error, "cannot write the pins after a purge; purged digests stay pinned until a restart");
        }
        self.publish_size();
        freed
    }

    fn publish_size(&self) {
        let index = self.lock_index();
        self.metrics
            .store_bytes
            .set(i64::try_from(index.total_bytes).unwrap_or(i64::MAX));
        self.metrics
            .store_entries
            .set(i64::try_from(index.lru.len()).unwrap_or(i64::MAX));
    }

    /// `storage.max_size`, if any.
    pub fn max_size(&self) -> Option<u64> {
        self.max_size
    }

    /// Bytes and entries currently indexed.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.lock_index();
        (index.total_bytes, index.lru.len())
    }

    /// Whether the store can take a new file right now (for `/readyz`).
    pub async fn is_writable(&self) -> bool {
        let probe = self.tmp_dir().join(".ready-probe");
        let written = tokio::fs::write(&probe, b"ok").await.is_ok();
        let _ = tokio::fs::remove_file(&probe).await;
        written
    }

    /// Re-hashes every entry and removes the ones that do not match their names (offline `gc --verify`).
    pub fn verify_all(&self) -> Result<GcReport, StoreError> {
        let keys: Vec<(Key, u64)> = {
            let index = self.lock_index();
            index.lru.iter().map(|(k, s)| (k.clone(), *s)).collect()
        };
        let mut report = GcReport::default();
        for (key, size) in keys {
            let path = self.path(key.kind, &key.digest);
            let content_ok = match key.kind {
                Kind::Blob => hash_file(&path, key.digest.algorithm(), 0).map(|d| d == key.digest),
                Kind::Manifest => manifest_body_offset(&path)
                    .and_then(|offset| hash_file(&path, key.digest.algorithm(), offset))
                    .map(|d| d == key.digest),
            };
            if content_ok.unwrap_or(false) {
                report.entries += 1;
                report.bytes += size;
            } else {
                tracing::warn!(path = %path.display(), "removing an entry that does not match its digest");
                let _ = std::fs::remove_file(&path);
                self.forget(&key);
                report.removed.push((key.kind, key.digest));
            }
        }
        Ok(report)
    }
}

fn hash_file(path: &Path, algorithm: Algorithm, skip: u64) -> io::Result<Digest> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(skip))?;
    let mut hasher = crate::oci::DigestHasher::new(algorithm);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buffer[..n]);
    }
}

/// Where the manifest bytes start: after the media type line.
fn manifest_body_offset(path: &Path) -> io::Result<u64> {
    use std::io::Read;
    let mut head = Vec::with_capacity(256);
    File::open(path)?.take(1024).read_to_end(&mut head)?;
    split_stored(&head)
        .map(|(_, start)| start as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no media type line"))
}

/// Collects `(key, size, last used)` for every well-named file under `dir/<algorithm>/<xx>/`.
fn scan(dir: &Path, kind: Kind, found: &mut Vec<(Key, u64, SystemTime)>) -> Result<(), StoreError> {
    for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
        let algorithm_dir = dir.join(algorithm.as_str());
        let Ok(prefixes) = std::fs::read_dir(&algorithm_dir) else {
            continue;
        };
        for prefix in prefixes.flatten() {
            let Ok(entries) = std::fs::read_dir(prefix.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(digest) = name
                    .to_str()
                    .and_then(|hex| Digest::parse(&format!("{}:{hex}", algorithm.as_str())).ok())
                else {
                    tracing::warn!(path = %entry.path().display(), "ignoring a file that is not named by a digest");
                    continue;
                };
                let metadata = entry.metadata().map_err(io_error(&entry.path()))?;
                let used = metadata
                    .accessed()
                    .into_iter()
                    .chain(metadata.modified())
                    .max()
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((Key { kind, digest }, metadata.len(), used));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
