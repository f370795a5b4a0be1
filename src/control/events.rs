//! Changes announced to the other replicas, and theirs applied here, through one Redis stream.
//!
//! With `cache.redis`, every successful purge, pin, unpin and refresh is appended to
//! [`STREAM`] (`XADD … MAXLEN ~ 10000`) with this process's random origin id. Every replica runs
//! one follower ([`follow`]) that polls the stream (`XREAD`, no `BLOCK`: the shared handle's
//! commands have 500 ms) and applies what other origins announced through the same local
//! functions the API uses, without announcing them again. A refresh elsewhere has already
//! written Redis's tag cache; here it only drops the tag from memory, so the next request reads
//! Redis.
//!
//! The last applied id is kept in `control/last-event` under `storage.path` (an atomic write, at
//! most every [`SAVE_EVERY`] and at shutdown), so a replica that was down applies what it missed
//! when it comes back. A replica with no saved id starts at the stream's end; one whose id was
//! trimmed away says how many events it may have lost and starts at the end too.
//!
//! Redis being down never stops a local change: its announcement fails, is logged and counted
//! (`gantry_control_announce_failures_total`), and the answer says `announced: false`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::purge::TagKey;
use super::Control;
use crate::metrics::ControlEventMetrics;
use crate::oci::Digest;
use crate::redis::{Redis, StreamEntry};

/// The stream every replica appends to and reads; `v1` names the entries' format.
pub const STREAM: &str = "gantry:control:v1:events";
/// About how many events the stream keeps (`MAXLEN ~`): a replica down for longer than this
/// many changes loses the oldest of them.
const MAX_LEN: usize = 10_000;
/// How often the follower asks for new events; also the most a change takes to reach it.
const POLL: Duration = Duration::from_millis(500);
/// Events read per `XREAD`; a full batch is followed by the next one at once.
const BATCH: usize = 100;
/// The most often the last applied id is written to disk.
const SAVE_EVERY: Duration = Duration::from_secs(3);
/// Where, under `storage.path`, the last applied id is kept.
const LAST_EVENT: &str = "control/last-event";

/// What a change did, as the stream names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Purge,
    Pin,
    Unpin,
    Refresh,
}

impl Action {
    /// The action behind a mutating route (`purge`, `pin`, …).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "purge" => Some(Self::Purge),
            "pin" => Some(Self::Pin),
            "unpin" => Some(Self::Unpin),
            "refresh" => Some(Self::Refresh),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Purge => "purge",
            Self::Pin => "pin",
            Self::Unpin => "unpin",
            Self::Refresh => "refresh",
        }
    }
}

/// The announcing side: the shared Redis and who this process is.
pub struct Events {
    redis: Redis,
    /// Random per process, so a restarted replica is a new origin (its old events were already
    /// applied or skipped by id).
    origin: String,
    metrics: ControlEventMetrics,
}

impl Events {
    pub fn new(redis: Redis, metrics: ControlEventMetrics) -> Self {
        Self {
            redis,
            origin: random_origin(),
            metrics,
        }
    }

    /// Appends one change to the stream; `false` (logged and counted) when Redis did not take it.
    /// `resolved` is what the references named here (`{"tags": [[registry, repository, tag]],
    /// "manifests": [digest]}`): the other replicas apply the change to that.
    pub async fn announce(&self, action: Action, references: &[String], resolved: &Value) -> bool {
        let references = serde_json::to_string(references).unwrap_or_else(|_| "[]".to_owned());
        let resolved = serde_json::to_string(resolved).unwrap_or_else(|_| "{}".to_owned());
        let fields = [
            ("origin", self.origin.as_str()),
            ("action", action.as_str()),
            ("references", references.as_str()),
            ("resolved", resolved.as_str()),
        ];
        match self.redis.stream_add(STREAM, MAX_LEN, &fields).await {
            Ok(_) => true,
            Err(error) => {
                self.metrics.announce_failures.inc();
                tracing::warn!(%error, action = action.as_str(), %references, "the change applies here, but the other replicas were not told");
                false
            }
        }
    }
}

/// What an announced change resolved to on the replica that made it.
#[derive(Debug, Default)]
pub struct Resolved {
    pub tags: Vec<TagKey>,
    pub manifests: Vec<Digest>,
}

#[derive(serde::Deserialize)]
struct ResolvedText {
    #[serde(default)]
    tags: Vec<TagKey>,
    #[serde(default)]
    manifests: Vec<String>,
}

impl Resolved {
    /// Parses the `resolved` field; `None` when it is not what [`Events::announce`] writes.
    fn parse(text: &str) -> Option<Self> {
        let parsed: ResolvedText = serde_json::from_str(text).ok()?;
        let manifests = parsed
            .manifests
            .iter()
            .map(|digest| Digest::parse(digest).ok())
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            tags: parsed.tags,
            manifests,
        })
    }
}

/// 128 random bits in hex, from the standard library's per-process random hash keys.
fn random_origin() -> String {
    let half = || {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish()
    };
    format!("{:016x}{:016x}", half(), half())
}

/// A stream id (`ms-seq`) as numbers, for ordering.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Starts the follower: it ends when `shutdown` turns (saving its position first).
pub fn follow(
    control: Arc<Control>,
    storage: &Path,
    shutdown: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    let events = control.events.as_ref()?;
    let follower = Follower {
        redis: events.redis.clone(),
        origin: events.origin.clone(),
        file: storage.join(LAST_EVENT),
        control: Arc::clone(&control),
    };
    Some(tokio::spawn(follower.run(shutdown)))
}

struct Follower {
    control: Arc<Control>,
    redis: Redis,
    origin: String,
    file: PathBuf,
}

impl Follower {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let saved = self.load().await;
        // Redis may be down at start-up: keep trying to find where to start.
        let mut last = loop {
            if let Some(start) = self.start_at(saved.as_deref()).await {
                break start;
            }
            if stopping(&mut shutdown, POLL).await {
                return;
            }
        };
        if saved.as_deref() != Some(last.as_str()) {
            self.save(&last).await;
        }
        let mut saved_at = Instant::now();
        let mut unsaved = false;
        loop {
            let full = match self.redis.stream_read(STREAM, &last, BATCH).await {
                Ok(entries) => {
                    let full = entries.len() >= BATCH;
                    for entry in entries {
                        self.apply(&entry).await;
                        last = entry.id;
                        unsaved = true;
                    }
                    full
                }
                Err(error) => {
                    tracing::debug!(%error, "reading the control events failed; retrying");
                    false
                }
            };
            if unsaved && saved_at.elapsed() >= SAVE_EVERY {
                self.save(&last).await;
                saved_at = Instant::now();
                unsaved = false;
            }
            let pause = if full { Duration::ZERO } else { POLL };
            if stopping(&mut shutdown, pause).await {
                break;
            }
        }
        if unsaved {
            self.save(&last).await;
        }
    }

    /// Where to read from: after the saved id, unless the stream was trimmed past it or there
    /// is none, then after the stream's end. `None` while Redis does not answer.
    async fn start_at(&self, saved: Option<&str>) -> Option<String> {
        let bounds = match self.redis.stream_bounds(STREAM).await {
            Ok(bounds) => bounds,
            Err(error) => {
                tracing::debug!(%error, "finding the control events' position failed; retrying");
                return None;
            }
        };
        let end = bounds.last_generated.unwrap_or_else(|| "0-0".to_owned());
        let Some(saved) = saved else {
            tracing::info!(start = %end, "following the control events from the stream's end");
            return Some(end);
        };
        let lost = match (
            parse_id(saved),
            bounds.max_deleted.as_deref().and_then(parse_id),
        ) {
            (Some(saved), Some(deleted)) => deleted > saved,
            _ => false,
        };
        if lost {
            tracing::warn!(
                last_applied = saved,
                may_be_lost = bounds.trimmed,
                "the control events were trimmed past the last one applied here: up to that many purges, pins and refreshes by other replicas are not applied (content they purged stays in this store)",
            );
            return Some(end);
        }
        tracing::info!(after = saved, "catching up on the control events");
        Some(saved.to_owned())
    }

    async fn apply(&self, entry: &StreamEntry) {
        if entry.field("origin") == Some(self.origin.as_str()) {
            return;
        }
        let Some(action) = entry.field("action").and_then(Action::parse) else {
            tracing::warn!(id = %entry.id, "skipping a control event with an unknown action");
            return;
        };
        let references = entry.field("references").unwrap_or("[]");
        let resolved = match entry.field("resolved").and_then(Resolved::parse) {
            Some(resolved) => resolved,
            None => {
                tracing::warn!(id = %entry.id, "skipping a control event whose `resolved` does not parse");
                return;
            }
        };
        let result = self.control.apply_remote(action, &resolved).await;
        if let Some(events) = &self.control.events {
            events
                .metrics
                .applied
                .with_label_values(&[action.as_str()])
                .inc();
        }
        tracing::info!(id = %entry.id, action = action.as_str(), references, result = %compact(&result), "applied a change from another replica");
    }

    async fn load(&self) -> Option<String> {
        let text = tokio::fs::read_to_string(&self.file).await.ok()?;
        let id = text.trim();
        match parse_id(id) {
            Some(_) => Some(id.to_owned()),
            None => {
                tracing::warn!(file = %self.file.display(), "ignoring an unreadable last control event id");
                None
            }
        }
    }

    /// Writes the id through a sibling file and a rename, so a crash never leaves a torn one.
    async fn save(&self, id: &str) {
        let staged = self.file.with_extension("tmp");
        let written = async {
            if let Some(dir) = self.file.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            tokio::fs::write(&staged, format!("{id}\n")).await?;
            tokio::fs::rename(&staged, &self.file).await
        };
        if let Err(error) = written.await {
            tracing::warn!(%error, file = %self.file.display(), "saving the last control event id failed");
        }
    }
}

/// Waits `pause`; whether shutdown came first (or its sender is gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>, pause: Duration) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        changed = shutdown.changed() => changed.is_err() || *shutdown.borrow(),
        () = tokio::time::sleep(pause) => false,
    }
}

fn compact(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
