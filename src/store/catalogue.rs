//! The catalogue: what the cache holds in the operator's terms. The store knows digests only;
//! the catalogue records `(registry, repository, tag)` → manifest digest → referenced digests
//! (blobs, or the child manifests of an index), so cached images can be listed, purged and pinned.
//!
//! It is operator information, never content: nothing is served from it, and losing a line
//! costs a listing entry, not a pull. Hence its shape:
//!
//! - The in-memory maps are authoritative. Each change updates them and then queues one JSON line
//!   for a single writer thread through a bounded channel; the request path never touches the
//!   disk and never waits. A full queue drops the line and counts it ([`Catalogue::dropped_lines`]);
//!   the writer then rewrites the whole journal from memory once it has caught up, so a drop
//!   heals instead of diverging. The writer is a thread, not a runtime task: its `write`s block,
//!   and the catalogue can be opened (and dropped) outside a runtime, by `gantry gc` or a test.
//! - On disk it is an append-only journal, `journal.jsonl` in the catalogue's directory, one
//!   change per line, replayed at open. A torn last line (a crash mid-write) is cut off; a journal
//!   much longer than its live entries is compacted at open: rewritten to `journal.tmp`, fsynced
//!   and renamed over the journal.
//!
//! Lines (unknown `op`s are skipped, so a later gantry can add some):
//!
//! ```text
//! {"op":"tag","registry":"docker.io","repository":"library/alpine","tag":"3.20","digest":"sha256:…","media_type":"…","recorded":1767225600}
//! {"op":"manifest","digest":"sha256:…","media_type":"…","size":1234,"references":[{"digest":"sha256:…","size":567}]}
//! {"op":"forget_tag","registry":"docker.io","repository":"library/alpine","tag":"3.20"}
//! {"op":"forget_manifest","digest":"sha256:…"}
//! {"op":"pulls","digest":"sha256:…","count":12,"last":1767225600}
//! ```
//!
//! Pull statistics (how often each manifest was served, and when last) are counted in memory on
//! every manifest served, never written on the request path: the writer appends a `pulls` line
//! for each manifest pulled since its last one every [`PULL_FLUSH`], and at close. A crash loses
//! at most that many seconds of counts. A purge (`forget_manifest`) resets them.
//!
//! Every line sets or removes one key, so replaying lines over a state that already holds some of
//! them ends in the same state: that is what lets the writer snapshot memory while lines queued
//! before the snapshot are still to be appended after it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{io_error, StoreError};
use crate::oci::Digest;

/// The catalogue's directory under `storage.path`.
pub const CATALOGUE_DIR: &str = "catalogue";
const JOURNAL: &str = "journal.jsonl";
const COMPACTING: &str = "journal.tmp";
/// Lines waiting for the writer. A line is ~300 bytes, so this is ~1 MiB at most; a burst larger
/// than this (a warm of thousands of images) drops lines and the writer rewrites from memory.
const QUEUE: usize = 4096;
/// The journal is compacted at open when it holds more than this many lines per live entry…
const COMPACT_FACTOR: usize = 2;
/// …plus this many, so a small catalogue is not rewritten at every start.
const COMPACT_SLACK: usize = 1024;
/// Pull counts reach the journal at most this often (and at close).
pub const PULL_FLUSH: Duration = Duration::from_secs(5);

/// One tag as the catalogue knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagRecord {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    pub digest: Digest,
    pub media_type: String,
    /// When the tag was first seen pointing at `digest` (refreshes to the same digest keep it).
    pub recorded: SystemTime,
}

/// One cached manifest and the digests it references, with their sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub references: Vec<(Digest, u64)>,
}

/// How often a manifest was served, and when last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullRecord {
    pub count: u64,
    pub last: SystemTime,
}

type TagKey = (String, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PullValue {
    count: u64,
    last_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct TagValue {
    digest: Digest,
    media_type: String,
    recorded_secs: u64,
}

#[derive(Clone, Default)]
struct State {
    tags: BTreeMap<TagKey, TagValue>,
    manifests: HashMap<Digest, ManifestRecord>,
    pulls: HashMap<Digest, PullValue>,
    /// Manifests pulled since the writer last wrote their counts (memory only).
    pulls_unwritten: HashSet<Digest>,
}

impl State {
    fn live(&self) -> usize {
        self.tags.len() + self.manifests.len() + self.pulls.len()
    }

    /// The `pulls` lines of the counts not yet written, marking them written.
    fn take_unwritten_pulls(&mut self) -> Vec<Line> {
        let digests: Vec<Digest> = self.pulls_unwritten.drain().collect();
        digests
            .into_iter()
            .filter_map(|digest| {
                let value = self.pulls.get(&digest)?;
                Some(pulls_line(&digest, value))
            })
            .collect()
    }

    /// Applies one line; `false` when it was malformed or of an unknown kind.
    fn apply(&mut self, line: Line) -> bool {
        match line {
            Line::Tag {
                registry,
                repository,
                tag,
                digest,
                media_type,
                recorded,
            } => {
                let Ok(digest) = Digest::parse(&digest) else {
                    return false;
                };
                let key = (registry, repository, tag);
                match self.tags.get_mut(&key) {
                    Some(old) if old.digest == digest => old.media_type = media_type,
                    _ => {
                        self.tags.insert(
                            key,
                            TagValue {
                                digest,
                                media_type,
                                recorded_secs: recorded,
                            },
                        );
                    }
                }
            }
            Line::Manifest {
                digest,
                media_type,
                size,
                references,
            } => {
                let Ok(digest) = Digest::parse(&digest) else {
                    return false;
                };
                let Ok(references) = references
                    .into_iter()
                    .map(|r| Digest::parse(&r.digest).map(|d| (d, r.size)))
                    .collect::<Result<Vec<_>, _>>()
                else {
                    return false;
                };
                self.manifests.insert(
                    digest.clone(),
                    ManifestRecord {
                        digest,
                        media_type,
                        size,
                        references,
                    },
                );
            }
            Line::ForgetTag {
                registry,
                repository,
                tag,
            } => {
                self.tags.remove(&(registry, repository, tag));
            }
            Line::ForgetManifest { digest } => {
                let Ok(digest) = Digest::parse(&digest) else {
                    return false;
                };
                self.manifests.remove(&digest);
                self.pulls.remove(&digest);
                self.pulls_unwritten.remove(&digest);
            }
            Line::Pulls {
                digest,
                count,
                last,
            } => {
                let Ok(digest) = Digest::parse(&digest) else {
                    return false;
                };
                self.pulls.insert(
                    digest,
                    PullValue {
                        count,
                        last_secs: last,
                    },
                );
            }
            Line::Unknown => return false,
        }
        true
    }

    /// The lines that rebuild this state.
    fn lines(&self) -> Vec<Line> {
        let tags = self
            .tags
            .iter()
            .map(|((registry, repository, tag), value)| {
                tag_line(
                    registry,
                    repository,
                    tag,
                    &value.digest,
                    &value.media_type,
                    value.recorded_secs,
                )
            });
        let manifests = self.manifests.values().map(manifest_line);
        let pulls = self
            .pulls
            .iter()
            .map(|(digest, value)| pulls_line(digest, value));
        tags.chain(manifests).chain(pulls).collect()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Tag {
        registry: String,
        repository: String,
        tag: String,
        digest: String,
        media_type: String,
        /// Seconds since the Unix epoch.
        recorded: u64,
    },
    Manifest {
        digest: String,
        media_type: String,
        size: u64,
        references: Vec<Reference>,
    },
    ForgetTag {
        registry: String,
        repository: String,
        tag: String,
    },
    ForgetManifest {
        digest: String,
    },
    /// Sets a manifest's pull count and last pull (seconds since the Unix epoch).
    Pulls {
        digest: String,
        count: u64,
        last: u64,
    },
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reference {
    digest: String,
    size: u64,
}

fn tag_line(
    registry: &str,
    repository: &str,
    tag: &str,
    digest: &Digest,
    media_type: &str,
    recorded: u64,
) -> Line {
    Line::Tag {
        registry: registry.to_owned(),
        repository: repository.to_owned(),
        tag: tag.to_owned(),
        digest: digest.to_string(),
        media_type: media_type.to_owned(),
        recorded,
    }
}

fn pulls_line(digest: &Digest, value: &PullValue) -> Line {
    Line::Pulls {
        digest: digest.to_string(),
        count: value.count,
        last: value.last_secs,
    }
}

fn manifest_line(manifest: &ManifestRecord) -> Line {
    Line::Manifest {
        digest: manifest.digest.to_string(),
        media_type: manifest.media_type.clone(),
        size: manifest.size,
        references: manifest
            .references
            .iter()
            .map(|(digest, size)| Reference {
                digest: digest.to_string(),
                size: *size,
            })
            .collect(),
    }
}

fn encode(line: &Line) -> Vec<u8> {
    // Serializing a struct of strings and integers cannot fail.
    let mut bytes = serde_json::to_vec(line).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// What the catalogue and its writer share.
struct Shared {
    state: Mutex<State>,
    /// A line was dropped (or a write failed): the journal no longer matches memory.
    diverged: AtomicBool,
    dropped: AtomicU64,
    dir: PathBuf,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The persisted catalogue of tags and manifests; see the module doc.
pub struct Catalogue {
    shared: Arc<Shared>,
    /// `None` only while dropping: closing the channel tells the writer to finish.
    lines: Option<SyncSender<Vec<u8>>>,
    writer: Option<JoinHandle<()>>,
}

impl Catalogue {
    /// Opens (creating if needed) the catalogue in `dir` (the store's [`CATALOGUE_DIR`]):
    /// replays its journal, cuts a torn last line, compacts it when it has grown much longer
    /// than what it describes, and starts the writer. Blocks on the disk: call it at start-up.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, QUEUE, None, PULL_FLUSH)
    }

    /// [`Catalogue::open`] with a queue of `capacity` lines, pull counts written every
    /// `pull_flush` and, for tests, a writer that waits for `hold` before its first write.
    fn open_with(
        dir: &Path,
        capacity: usize,
        hold: Option<Receiver<()>>,
        pull_flush: Duration,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let journal = dir.join(JOURNAL);
        let (state, lines, good_len) = replay(&journal)?;
        let live = state.live();
        if lines > COMPACT_FACTOR * live + COMPACT_SLACK {
            tracing::info!(lines, live, "compacting the catalogue journal");
            rewrite(dir, &state).map_err(io_error(&journal))?;
        } else {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&journal)
                .map_err(io_error(&journal))?;
            let len = file.metadata().map_err(io_error(&journal))?.len();
            if len > good_len {
                tracing::warn!(
                    path = %journal.display(),
                    cut = len - good_len,
                    "the catalogue journal ends in a torn line (a crash mid-write): cutting it off"
                );
                file.set_len(good_len).map_err(io_error(&journal))?;
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            diverged: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            dir: dir.to_owned(),
        });
        let (sender, receiver) = std::sync::mpsc::sync_channel(capacity);
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("gantry-catalogue".into())
                .spawn(move || write_lines(&shared, &receiver, hold, pull_flush))
                .map_err(io_error(dir))?
        };
        Ok(Self {
            shared,
            lines: Some(sender),
            writer: Some(writer),
        })
    }

    /// Applies `line` in memory and queues it for the journal, in that order and under the lock,
    /// so the journal's order is memory's order. Never waits.
    fn change(&self, line: Line, state: &mut State) {
        let bytes = encode(&line);
        if !state.apply(line) {
            return;
        }
        let Some(lines) = &self.lines else { return };
        match lines.try_send(bytes) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                self.shared.diverged.store(true, Ordering::Release);
            }
        }
    }

    /// Records that `registry`/`repository`:`tag` resolves to `digest`. Recording the digest a
    /// tag already has changes nothing (and writes nothing): `recorded` stays when it was first
    /// seen.
    pub fn record_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        digest: &Digest,
        media_type: &str,
    ) {
        let mut state = self.shared.lock();
        let key = (registry.to_owned(), repository.to_owned(), tag.to_owned());
        if let Some(old) = state.tags.get(&key) {
            if old.digest == *digest && old.media_type == media_type {
                return;
            }
        }
        let line = tag_line(
            registry,
            repository,
            tag,
            digest,
            media_type,
            unix_secs(SystemTime::now()),
        );
        self.change(line, &mut state);
    }

    /// Forgets a tag (a purge); its manifest stays until [`Catalogue::forget_manifest`].
    pub fn forget_tag(&self, registry: &str, repository: &str, tag: &str) {
        let mut state = self.shared.lock();
        let key = (registry.to_owned(), repository.to_owned(), tag.to_owned());
        if !state.tags.contains_key(&key) {
            return;
        }
        let (registry, repository, tag) = key;
        let line = Line::ForgetTag {
            registry,
            repository,
            tag,
        };
        self.change(line, &mut state);
    }

    /// Records a cached manifest and what it references: layers and config for an image
    /// manifest, child manifests for an index. A manifest is immutable under its digest, so
    /// recording one already known writes nothing.
    pub fn record_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        size: u64,
        references: &[(Digest, u64)],
    ) {
        let mut state = self.shared.lock();
        if state.manifests.contains_key(digest) {
            return;
        }
        let line = manifest_line(&ManifestRecord {
            digest: digest.clone(),
            media_type: media_type.to_owned(),
            size,
            references: references.to_vec(),
        });
        self.change(line, &mut state);
    }

    /// Forgets a manifest (it left the store). Tags pointing at it stay: they still say what the
    /// upstream answered, and [`Catalogue::manifest`] tells whether it is cached.
    pub fn forget_manifest(&self, digest: &Digest) {
        let mut state = self.shared.lock();
        if !state.manifests.contains_key(digest) {
            return;
        }
        let line = Line::ForgetManifest {
            digest: digest.to_string(),
        };
        self.change(line, &mut state);
    }

    /// Counts one pull of a cached manifest (one served): memory only, written by the writer
    /// within [`PULL_FLUSH`]. A digest the catalogue has no manifest for is not counted, so the
    /// counts stay bounded by what is cached.
    pub fn record_pull(&self, digest: &Digest) {
        let mut state = self.shared.lock();
        if !state.manifests.contains_key(digest) {
            return;
        }
        let now = unix_secs(SystemTime::now());
        let value = state.pulls.entry(digest.clone()).or_insert(PullValue {
            count: 0,
            last_secs: now,
        });
        value.count += 1;
        value.last_secs = value.last_secs.max(now);
        state.pulls_unwritten.insert(digest.clone());
    }

    /// How often a manifest was served and when last; `None` if it never was (since cached).
    pub fn pulls(&self, digest: &Digest) -> Option<PullRecord> {
        let state = self.shared.lock();
        state.pulls.get(digest).map(|value| PullRecord {
            count: value.count,
            last: UNIX_EPOCH + Duration::from_secs(value.last_secs),
        })
    }

    /// Every digest referenced by a cached manifest outside `excluded` (what a purge of
    /// `excluded` must keep).
    pub fn references_outside(&self, excluded: &HashSet<Digest>) -> HashSet<Digest> {
        let state = self.shared.lock();
        state
            .manifests
            .values()
            .filter(|manifest| !excluded.contains(&manifest.digest))
            .flat_map(|manifest| manifest.references.iter().map(|(digest, _)| digest.clone()))
            .collect()
    }

    /// The tags that point at `digest`.
    pub fn tags_pointing_at(&self, digest: &Digest) -> Vec<TagRecord> {
        let state = self.shared.lock();
        state
            .tags
            .iter()
            .filter(|(_, value)| value.digest == *digest)
            .map(tag_record)
            .collect()
    }

    /// Every tag, ordered by registry, repository and tag.
    pub fn tags(&self) -> Vec<TagRecord> {
        let state = self.shared.lock();
        state.tags.iter().map(tag_record).collect()
    }

    /// The tags of one repository, ordered by tag.
    pub fn tags_for(&self, registry: &str, repository: &str) -> Vec<TagRecord> {
        let state = self.shared.lock();
        let start = (registry.to_owned(), repository.to_owned(), String::new());
        state
            .tags
            .range(start..)
            .take_while(|((r, repo, _), _)| r == registry && repo == repository)
            .map(tag_record)
            .collect()
    }

    pub fn manifest(&self, digest: &Digest) -> Option<ManifestRecord> {
        self.shared.lock().manifests.get(digest).cloned()
    }

    /// Journal lines dropped because the writer's queue was full (memory kept them; the writer
    /// rewrites the journal from memory once it catches up).
    pub fn dropped_lines(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Catalogue {
    /// Closes the queue and waits for the writer to write what is queued (at most [`QUEUE`]
    /// short lines), so a clean shutdown loses nothing.
    fn drop(&mut self) {
        drop(self.lines.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn tag_record(((registry, repository, tag), value): (&TagKey, &TagValue)) -> TagRecord {
    TagRecord {
        registry: registry.clone(),
        repository: repository.clone(),
        tag: tag.clone(),
        digest: value.digest.clone(),
        media_type: value.media_type.clone(),
        recorded: UNIX_EPOCH + Duration::from_secs(value.recorded_secs),
    }
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the journal: the state it describes, how many lines it holds, and the length of its
/// complete lines (what follows the last newline is a torn write).
fn replay(journal: &Path) -> Result<(State, usize, u64), StoreError> {
    let bytes = match std::fs::read(journal) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(StoreError::Io {
                path: journal.to_owned(),
                source,
            })
        }
    };
    let good_len = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |last| last + 1);
    let mut state = State::default();
    let (mut lines, mut skipped) = (0, 0);
    for raw in bytes[..good_len].split(|&b| b == b'\n') {
        if raw.is_empty() {
            continue;
        }
        lines += 1;
        let applied = serde_json::from_slice::<Line>(raw)
            .map(|line| state.apply(line))
            .unwrap_or(false);
        if !applied {
            skipped += 1;
        }
    }
    if skipped > 0 {
        tracing::warn!(path = %journal.display(), skipped, "catalogue journal lines skipped (malformed or unknown)");
    }
    Ok((state, lines, good_len as u64))
}

/// Replaces the journal with the lines that rebuild `state`: temp file, fsync, rename.
fn rewrite(dir: &Path, state: &State) -> io::Result<()> {
    let staged = dir.join(COMPACTING);
    let mut file = BufWriter::new(File::create(&staged)?);
    for line in state.lines() {
        file.write_all(&encode(&line))?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&staged, dir.join(JOURNAL))
}

/// The writer thread: appends queued lines, flushing whenever the queue runs dry, writes the
/// pull counts every `pull_flush`, and rewrites the journal from memory when lines were dropped.
/// Ends when the catalogue closes the queue, writing the last pull counts first.
fn write_lines(
    shared: &Shared,
    lines: &Receiver<Vec<u8>>,
    hold: Option<Receiver<()>>,
    pull_flush: Duration,
) {
    if let Some(hold) = hold {
        let _ = hold.recv();
    }
    let journal = shared.dir.join(JOURNAL);
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal)
            .map(BufWriter::new)
    };
    let mut file = open();
    let mut failing = false;
    let mut pulls_written = Instant::now();
    let mut closed = false;
    while !closed {
        let wait = pull_flush.saturating_sub(pulls_written.elapsed());
        let mut batch = Vec::new();
        match lines.recv_timeout(wait) {
            Ok(line) => batch.push(line),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => closed = true,
        }
        if closed || pulls_written.elapsed() >= pull_flush {
            // Lines are queued under the state lock, after memory changed: draining the queue
            // under it too puts every line that changed memory before these counts ahead of them.
            let mut state = shared.lock();
            while let Ok(line) = lines.try_recv() {
                batch.push(line);
            }
            batch.extend(state.take_unwritten_pulls().iter().map(encode));
            drop(state);
            pulls_written = Instant::now();
        } else {
            // Empty or closed: either way this batch is done.
            while let Ok(line) = lines.try_recv() {
                batch.push(line);
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut written = Ok(());
        for line in &batch {
            written = match &mut file {
                Ok(file) => file.write_all(line),
                Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
            };
            if written.is_err() {
                break;
            }
        }
        if written.is_ok() {
            if let Ok(file) = &mut file {
                written = file.flush();
            }
        }
        if let Err(error) = written {
            if !failing {
                tracing::warn!(path = %journal.display(), %error, "cannot write the catalogue journal; it will be rewritten from memory");
            }
            failing = true;
            shared.diverged.store(true, Ordering::Release);
        }
        if shared.diverged.swap(false, Ordering::AcqRel) {
            let snapshot = shared.lock().clone();
            match rewrite(&shared.dir, &snapshot) {
                Ok(()) => {
                    failing = false;
                    file = open();
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(path = %journal.display(), %error, "cannot rewrite the catalogue journal");
                    }
                    failing = true;
                    shared.diverged.store(true, Ordering::Release);
                }
            }
        }
    }
    // A line dropped after the last batch: memory has it, so write memory out once more.
    if shared.diverged.load(Ordering::Acquire) {
        let snapshot = shared.lock().clone();
        if let Err(error) = rewrite(&shared.dir, &snapshot) {
            tracing::warn!(path = %journal.display(), %error, "cannot rewrite the catalogue journal");
        }
    }
}

#[cfg(test)]
mod tests;
