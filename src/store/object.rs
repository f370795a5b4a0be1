//! The object tier: a second blob tier on S3-compatible object storage (`storage.s3`), below the
//! local disk and shared by every replica.
//!
//! Keys are content addressed, under the configured prefix:
//!
//! ```text
//! {prefix}blobs/sha256/ab/abcdef…       the blob's bytes
//! {prefix}manifests/sha256/ab/abcdef…   the manifest as the disk store keeps it: "<media type>\n" + bytes
//! ```
//!
//! It is a cache in mountpoint-s3's sense of a shared cache: **an error is a miss, never a failed
//! read**. Every call fails fast (a 1 s connect timeout, one retry within 2 s, 5 s for an answer,
//! 15 s of silence inside a body), and after an error a short circuit breaker skips the tier for
//! [`BREAKER`] (calls return [`ObjectTierError::Down`] at once, one call per period goes through
//! as a probe, and a background task probes it too), so a down tier adds no latency per request.
//! Its state changes are logged once per transition, not per request, and shown in `/readyz`.
//!
//! Writes never overwrite: a key that exists is left as it is (a HEAD first; two replicas racing
//! between HEAD and PUT write the same bytes, since the key names the content). Blobs are uploaded
//! from their verified local file in [`PART_SIZE`] multipart parts, at most [`PARTS_IN_FLIGHT`]
//! at once, so an upload holds a few parts in memory, never the blob.
//!
//! # Lifecycle
//!
//! `storage.s3.max_size` is a size budget for `blobs/` that gantry enforces: a sweep task owned by
//! the tier (it ends when the tier is dropped) lists `blobs/` every [`SWEEP_INTERVAL`] and, while
//! the total is over the budget, deletes the **oldest-uploaded** objects first. S3 keeps no access
//! time, so "oldest uploaded" is the only order it can give; a blob still in use is uploaded
//! again by the next replica that downloads it. Manifests are small and are not counted. Every
//! replica sweeps the same order, so concurrent sweeps agree on what goes. Without `max_size`
//! gantry deletes nothing and the bucket's own lifecycle rules (e.g. expiry by age) apply.
//!
//! A sweep spares the blobs pinned on the replica running it ([`ObjectTier::spare_pins`]; pins
//! are per replica, in each one's `storage.path`): they stay in the total, so a budget smaller
//! than the pinned blobs is simply not met. Another replica that has not pinned them may still
//! sweep them; with Redis the control plane pins on every replica, so none does.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, PutPayload,
    RetryConfig, WriteMultipart,
};
use tokio::task::JoinHandle;

use super::{read_exact_at, BlobFile};
use crate::config::ObjectTierConfig;
use crate::metrics::Metrics;
use crate::oci::manifest::split_stored;
use crate::oci::Digest;

/// Connection set-up to the endpoint: a down tier must cost a request little more than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// An answer to a small request (HEAD, DELETE, a probe, a manifest, a GET's headers).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Silence inside a body being read, or one part being uploaded.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// A whole listing of `blobs/` for the sweep (pages of 1000 keys).
const LIST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the tier is skipped after an error before a call is let through to probe it.
pub const BREAKER: Duration = Duration::from_secs(3);
/// How often the background task probes a tier that is down.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How often the background task enforces `storage.s3.max_size`.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(300);
/// Multipart part size; blobs up to it go in one PUT. S3 wants parts of at least 5 MiB.
pub const PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once.
pub const PARTS_IN_FLIGHT: usize = 2;
/// A manifest larger than this in the tier is not one gantry wrote.
const MAX_MANIFEST: u64 = 16 << 20;

/// An object's bytes from the offset asked for.
pub type ObjectChunks = Pin<Box<dyn Stream<Item = Result<Bytes, ObjectTierError>> + Send>>;

/// A blob found in the object tier.
pub struct ObjectRead {
    /// The whole object's size, whatever the offset.
    pub size: u64,
    /// The bytes from the offset to the end.
    pub chunks: ObjectChunks,
}

/// What [`ObjectTier::upload_blob`] or [`ObjectTier::write_manifest`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uploaded {
    /// The blob (or manifest) is now in the tier.
    Stored { bytes: u64 },
    /// The key existed already and was left as it was.
    Present,
}

/// What one sweep of `blobs/` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Objects deleted and their bytes.
    pub objects: u64,
    pub bytes: u64,
    /// Bytes left under `blobs/`.
    pub remaining: u64,
}

/// The tier's state, for `/readyz` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierHealth {
    pub up: bool,
    /// The last error seen, kept after the tier is back.
    pub last_error: Option<String>,
}

/// One kind of request to the tier: the `operation` label of `gantry_object_tier_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Probe,
    Read,
    Head,
    Upload,
    Delete,
    List,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Probe => "probe",
            Self::Read => "read",
            Self::Head => "head",
            Self::Upload => "upload",
            Self::Delete => "delete",
            Self::List => "list",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectTierError {
    #[error("storage.s3: cannot build the S3 client: {0}")]
    Client(#[source] object_store::Error),
    #[error("storage.s3.bucket: the bucket `{bucket}` does not exist at {endpoint}")]
    NoBucket {
        bucket: String,
        endpoint: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "storage.s3.access_key_id, storage.s3.secret_access_key: {endpoint} refused these credentials \
         for the bucket `{bucket}` (wrong key or secret, or no read/write grant on it): {source}"
    )]
    Credentials {
        bucket: String,
        endpoint: String,
        #[source]
        source: object_store::Error,
    },
    #[error("the object tier is down: skipped for a few seconds after an error")]
    Down,
    #[error("object tier {operation}: {source}")]
    Store {
        operation: Operation,
        #[source]
        source: object_store::Error,
    },
    #[error("object tier {operation}: no answer in {limit:?}")]
    TimedOut {
        operation: Operation,
        limit: Duration,
    },
    #[error("object tier: {key} holds {size} bytes, asked from offset {offset}")]
    PastEnd { key: String, offset: u64, size: u64 },
    #[error("object tier: {key} does not hold the content of {digest}")]
    Corrupt { key: String, digest: Digest },
    #[error("object tier upload: cannot read the local blob: {0}")]
    Local(#[source] std::io::Error),
    #[error("object tier upload: a blocking read failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ObjectTierError {
    /// The object is not there: an ordinary miss, and an answer from a working tier.
    fn is_missing(&self) -> bool {
        matches!(
            self,
            Self::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }

    /// Whether the tier itself failed (unreachable, slow, refusing, erroring) rather than
    /// answering about one object.
    fn is_outage(&self) -> bool {
        match self {
            Self::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }
                    | object_store::Error::NotModified { .. }
            ),
            Self::TimedOut { .. } => true,
            _ => false,
        }
    }
}

/// Up or down, with the breaker's deadline. Transitions are logged here, once each.
struct Health {
    state: Mutex<HealthState>,
    up_gauge: prometheus::IntGauge,
}

struct HealthState {
    up: bool,
    /// While down: no call goes through before this.
    skip_until: Option<Instant>,
    last_error: Option<String>,
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets a call through, or refuses it at once while the breaker is open. Once it has run
    /// out, one call goes through (and reopens it for the others) as a probe.
    fn admit(&self) -> Result<(), ObjectTierError> {
        let mut state = self.lock();
        if state.up {
            return Ok(());
        }
        let now = Instant::now();
        match state.skip_until {
            Some(until) if now < until => Err(ObjectTierError::Down),
            _ => {
                state.skip_until = Some(now + BREAKER);
                Ok(())
            }
        }
    }

    fn succeeded(&self) {
        let mut state = self.lock();
        if !state.up {
            state.up = true;
            state.skip_until = None;
            self.up_gauge.set(1);
            tracing::info!("the object tier answers again");
        }
    }

    fn failed(&self, error: &ObjectTierError) {
        let mut state = self.lock();
        state.last_error = Some(error.to_string());
        state.skip_until = Some(Instant::now() + BREAKER);
        if state.up {
            state.up = false;
            self.up_gauge.set(0);
            tracing::warn!(
                %error,
                "the object tier is down: it is skipped (a miss) and probed until it answers; \
                 local disk and upstreams still serve"
            );
        }
    }

    fn report(&self) -> TierHealth {
        let state = self.lock();
        TierHealth {
            up: state.up,
            last_error: state.last_error.clone(),
        }
    }
}

/// What the tier and its background task share.
struct Shared {
    store: Arc<dyn ObjectStore>,
    /// `""`, or the configured prefix with one trailing `/`.
    prefix: String,
    budget: Option<u64>,
    health: Health,
    metrics: Arc<Metrics>,
    /// This replica's pins: blobs the sweep never deletes (set once, after the disk store opens).
    pins: std::sync::OnceLock<Arc<super::Pins>>,
}

/// The object tier: an S3-compatible bucket behind `object_store`, with a breaker and a budget.
pub struct ObjectTier {
    shared: Arc<Shared>,
    /// Probes a down tier and sweeps to the budget; aborted on drop.
    background: JoinHandle<()>,
}

impl Drop for ObjectTier {
    fn drop(&mut self) {
        self.background.abort();
    }
}

impl ObjectTier {
    /// Builds the client and probes the bucket once. An unreachable endpoint is not an error:
    /// gantry serves without the tier, which is marked down, logged, and probed again in the
    /// background. A bucket that does not exist, or credentials the server refuses, are errors
    /// naming their `storage.s3` key: waiting will not fix them.
    pub async fn connect(
        config: &ObjectTierConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ObjectTierError> {
        let store = build(config)?;
        let endpoint = match &config.endpoint {
            Some(endpoint) => endpoint.origin(),
            None => format!("AWS S3 ({})", config.region.0),
        };
        let tier = Self::over(
            store,
            config.key_prefix(),
            config.max_size.map(|size| size.0),
            metrics,
        );
        let bucket = config.bucket.0.clone();
        match tier.shared.probe().await {
            Ok(()) => {
                tracing::info!(%endpoint, %bucket, "the object tier answers");
                Ok(tier)
            }
            Err(ObjectTierError::Store { source, .. }) if is_no_bucket(&source) => {
                Err(ObjectTierError::NoBucket {
                    bucket,
                    endpoint,
                    source,
                })
            }
            Err(ObjectTierError::Store { source, .. }) if is_refused(&source) => {
                Err(ObjectTierError::Credentials {
                    bucket,
                    endpoint,
                    source,
                })
            }
            // A listing refused is untyped (`Generic`) in object_store; a HEAD's refusal is
            // typed, and tells a missing bucket (404) from refused credentials (401/403).
            Err(ObjectTierError::Store { .. }) => {
                let probe = Key::from(format!("{}.gantry-probe", tier.shared.prefix));
                match tier.shared.store.head(&probe).await {
                    Err(source) if is_no_bucket(&source) => Err(ObjectTierError::NoBucket {
                        bucket,
                        endpoint,
                        source,
                    }),
                    Err(source) if is_refused(&source) => Err(ObjectTierError::Credentials {
                        bucket,
                        endpoint,
                        source,
                    }),
                    // Marked down (and logged) by the probe.
                    _ => Ok(tier),
                }
            }
            // Marked down (and logged) by the probe.
            Err(_) => Ok(tier),
        }
    }

    /// A tier over any `ObjectStore` (an in-memory one in tests), not probed.
    pub fn over(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        budget: Option<u64>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let prefix = prefix.trim_matches('/');
        metrics.object_tier_up.set(1);
        let shared = Arc::new(Shared {
            store,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            budget,
            health: Health {
                state: Mutex::new(HealthState {
                    up: true,
                    skip_until: None,
                    last_error: None,
                }),
                up_gauge: metrics.object_tier_up.clone(),
            },
            metrics,
            pins: std::sync::OnceLock::new(),
        });
        let background = tokio::spawn(tend(Arc::clone(&shared)));
        Self { shared, background }
    }

    /// The blob's bytes from `offset` and its whole size; `Ok(None)` when the tier does not have
    /// it. Content is not verified here: the reader hashes it as it writes it to disk.
    pub async fn read_blob(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Result<Option<ObjectRead>, ObjectTierError> {
        let result = self.shared.read(self.blob_key(digest), offset).await;
        self.shared.count_lookup("blob", &result);
        result
    }

    /// Whether the tier holds the blob (one `HEAD`), for operators' inspection; never for serving.
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, ObjectTierError> {
        Ok(self.shared.head(&self.blob_key(digest)).await?.is_some())
    }

    /// Deletes a blob (one that did not match its digest); a missing key is not an error.
    pub async fn remove_blob(&self, digest: &Digest) -> Result<(), ObjectTierError> {
        let key = self.blob_key(digest);
        match self
            .shared
            .call(Operation::Delete, self.shared.store.delete(&key))
            .await
        {
            Err(error) if !error.is_missing() => Err(error),
            _ => Ok(()),
        }
    }

    /// Deletes a manifest (a purge); a missing key is not an error.
    pub async fn remove_manifest(&self, digest: &Digest) -> Result<(), ObjectTierError> {
        let key = self.manifest_key(digest);
        match self
            .shared
            .call(Operation::Delete, self.shared.store.delete(&key))
            .await
        {
            Err(error) if !error.is_missing() => Err(error),
            _ => Ok(()),
        }
    }

    /// Makes the sweep spare the blobs `pins` holds (the disk store's, [`super::Store::pins`]).
    /// Set once; a second call is ignored.
    pub fn spare_pins(&self, pins: Arc<super::Pins>) {
        let _ = self.shared.pins.set(pins);
    }

    /// Uploads a verified blob from its local file unless its key exists (never overwrites).
    /// Blobs up to [`PART_SIZE`] go in one PUT; larger ones in multipart parts read from the file
    /// as they go, never the whole blob in memory.
    pub async fn upload_blob(
        &self,
        digest: &Digest,
        file: &BlobFile,
    ) -> Result<Uploaded, ObjectTierError> {
        let key = self.blob_key(digest);
        if self.shared.head(&key).await?.is_some() {
            return Ok(Uploaded::Present);
        }
        if file.size <= PART_SIZE as u64 {
            self.shared.put_small(&key, file).await?;
        } else {
            self.shared.put_multipart(&key, file).await?;
        }
        self.shared
            .metrics
            .object_tier_uploaded_bytes
            .inc_by(file.size);
        Ok(Uploaded::Stored { bytes: file.size })
    }

    /// A manifest as the disk store keeps it (`"<media type>\n"` + bytes), checked against its
    /// digest: one that does not match is deleted and reported as [`ObjectTierError::Corrupt`].
    pub async fn read_manifest(&self, digest: &Digest) -> Result<Option<Bytes>, ObjectTierError> {
        let result = self
            .shared
            .read_manifest(self.manifest_key(digest), digest)
            .await;
        self.shared.count_lookup("manifest", &result);
        result
    }

    /// Stores a manifest in the disk store's form (see [`crate::oci::manifest::encode_stored`]),
    /// unless its key exists. Bytes that do not hash to `digest` are refused.
    pub async fn write_manifest(
        &self,
        digest: &Digest,
        stored: Bytes,
    ) -> Result<Uploaded, ObjectTierError> {
        let key = self.manifest_key(digest);
        if !holds_manifest(&stored, digest) {
            return Err(ObjectTierError::Corrupt {
                key: key.to_string(),
                digest: digest.clone(),
            });
        }
        if self.shared.head(&key).await?.is_some() {
            return Ok(Uploaded::Present);
        }
        let size = stored.len() as u64;
        self.shared
            .call(
                Operation::Upload,
                self.shared.store.put(&key, PutPayload::from(stored)),
            )
            .await?;
        self.shared.metrics.object_tier_uploaded_bytes.inc_by(size);
        Ok(Uploaded::Stored { bytes: size })
    }

    /// Enforces `storage.s3.max_size` now (the background task does so every [`SWEEP_INTERVAL`]).
    pub async fn sweep(&self) -> Result<Swept, ObjectTierError> {
        self.shared.sweep().await
    }

    pub fn health(&self) -> TierHealth {
        self.shared.health.report()
    }

    /// Where a blob lives in the bucket: `{prefix}blobs/<algorithm>/<2 hex>/<hex>`.
    pub fn blob_key(&self, digest: &Digest) -> Key {
        self.shared.key("blobs", digest)
    }

    /// Where a manifest lives in the bucket: `{prefix}manifests/<algorithm>/<2 hex>/<hex>`.
    pub fn manifest_key(&self, digest: &Digest) -> Key {
        self.shared.key("manifests", digest)
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }
}

impl Shared {
    fn key(&self, kind: &str, digest: &Digest) -> Key {
        let hex = digest.hex();
        Key::from(format!(
            "{}{kind}/{}/{}/{hex}",
            self.prefix,
            digest.algorithm().as_str(),
            &hex[..2]
        ))
    }

    /// Runs `future` under `limit`, counting a failure and telling the breaker.
    async fn timed<T>(
        &self,
        operation: Operation,
        limit: Duration,
        future: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, ObjectTierError> {
        let result = match tokio::time::timeout(limit, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(ObjectTierError::Store { operation, source }),
            Err(_) => Err(ObjectTierError::TimedOut { operation, limit }),
        };
        match &result {
            Ok(_) => self.health.succeeded(),
            Err(error) => self.observe_failure(operation, error),
        }
        result
    }

    fn observe_failure(&self, operation: Operation, error: &ObjectTierError) {
        if error.is_missing() {
            self.health.succeeded();
            return;
        }
        self.metrics
            .object_tier_errors
            .with_label_values(&[operation.as_str()])
            .inc();
        if error.is_outage() {
            self.health.failed(error);
        }
    }

    /// A small request, skipped at once while the breaker is open.
    async fn call<T>(
        &self,
        operation: Operation,
        future: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, ObjectTierError> {
        self.health.admit()?;
        self.timed(operation, ANSWER_TIMEOUT, future).await
    }

    fn count_lookup<T>(&self, kind: &str, result: &Result<Option<T>, ObjectTierError>) {
        let outcome = match result {
            Ok(Some(_)) => "hit",
            Ok(None) => "miss",
            Err(_) => "error",
        };
        self.metrics
            .object_tier_lookups
            .with_label_values(&[kind, outcome])
            .inc();
    }

    /// Lists the top of the prefix: answers only if the bucket exists and the credentials hold.
    /// Unlike other calls, a missing bucket (404 on a listing) is a failure here.
    async fn probe(&self) -> Result<(), ObjectTierError> {
        let root = (!self.prefix.is_empty()).then(|| Key::from(self.prefix.as_str()));
        let listed = tokio::time::timeout(
            ANSWER_TIMEOUT,
            self.store.list_with_delimiter(root.as_ref()),
        )
        .await;
        let error = match listed {
            Ok(Ok(_)) => {
                self.health.succeeded();
                return Ok(());
            }
            Ok(Err(source)) => ObjectTierError::Store {
                operation: Operation::Probe,
                source,
            },
            Err(_) => ObjectTierError::TimedOut {
                operation: Operation::Probe,
                limit: ANSWER_TIMEOUT,
            },
        };
        self.metrics
            .object_tier_errors
            .with_label_values(&[Operation::Probe.as_str()])
            .inc();
        self.health.failed(&error);
        Err(error)
    }

    async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>, ObjectTierError> {
        match self.call(Operation::Head, self.store.head(key)).await {
            Ok(meta) => Ok(Some(meta)),
            Err(error) if error.is_missing() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn read(
        self: &Arc<Self>,
        key: Key,
        offset: u64,
    ) -> Result<Option<ObjectRead>, ObjectTierError> {
        // A range starting at the end is an error to S3 (416), which must not read as an outage:
        // a non-zero offset learns the size first.
        let range = if offset == 0 {
            None
        } else {
            let Some(meta) = self.head(&key).await? else {
                return Ok(None);
            };
            if offset == meta.size {
                return Ok(Some(ObjectRead {
                    size: meta.size,
                    chunks: Box::pin(futures_util::stream::empty()),
                }));
            }
            if offset > meta.size {
                return Err(ObjectTierError::PastEnd {
                    key: key.to_string(),
                    offset,
                    size: meta.size,
                });
            }
            Some(GetRange::Bounded(offset..meta.size))
        };
        let options = GetOptions {
            range,
            ..GetOptions::default()
        };
        let got = match self
            .call(Operation::Read, self.store.get_opts(&key, options))
            .await
        {
            Ok(got) => got,
            Err(error) if error.is_missing() => return Ok(None),
            Err(error) => return Err(error),
        };
        Ok(Some(ObjectRead {
            size: got.meta.size,
            chunks: self.follow(got.into_stream()),
        }))
    }

    /// The body of a GET, each chunk within [`IDLE_TIMEOUT`], counted, its failure told to the
    /// breaker; it ends after its first error.
    fn follow(
        self: &Arc<Self>,
        body: BoxStream<'static, object_store::Result<Bytes>>,
    ) -> ObjectChunks {
        let shared = Arc::clone(self);
        Box::pin(futures_util::stream::unfold(Some(body), move |body| {
            let shared = Arc::clone(&shared);
            async move {
                let mut body = body?;
                let error = match tokio::time::timeout(IDLE_TIMEOUT, body.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        shared
                            .metrics
                            .object_tier_read_bytes
                            .inc_by(chunk.len() as u64);
                        return Some((Ok(chunk), Some(body)));
                    }
                    Ok(None) => return None,
                    Ok(Some(Err(source))) => ObjectTierError::Store {
                        operation: Operation::Read,
                        source,
                    },
                    Err(_) => ObjectTierError::TimedOut {
                        operation: Operation::Read,
                        limit: IDLE_TIMEOUT,
                    },
                };
                shared.observe_failure(Operation::Read, &error);
                Some((Err(error), None))
            }
        }))
    }

    async fn put_small(&self, key: &Key, file: &BlobFile) -> Result<(), ObjectTierError> {
        self.health.admit()?;
        let bytes = read_part(file, 0, file.size).await?;
        self.timed(
            Operation::Upload,
            IDLE_TIMEOUT,
            self.store.put(key, PutPayload::from(bytes)),
        )
        .await
        .map(drop)
    }

    async fn put_multipart(&self, key: &Key, file: &BlobFile) -> Result<(), ObjectTierError> {
        let upload = self
            .call(Operation::Upload, self.store.put_multipart(key))
            .await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut offset = 0;
        while offset < file.size {
            let len = (file.size - offset).min(PART_SIZE as u64);
            let part = match read_part(file, offset, len).await {
                Ok(part) => part,
                Err(error) => return self.abort(writer, error).await,
            };
            // Parts go out as they are put; waiting here bounds the parts held in memory.
            let room = self
                .timed(
                    Operation::Upload,
                    IDLE_TIMEOUT,
                    writer.wait_for_capacity(PARTS_IN_FLIGHT),
                )
                .await;
            if let Err(error) = room {
                return self.abort(writer, error).await;
            }
            writer.put(part);
            offset += len;
        }
        // Finishing waits for the parts still in flight, then completes the upload.
        let limit = IDLE_TIMEOUT * (PARTS_IN_FLIGHT as u32 + 1);
        self.timed(Operation::Upload, limit, writer.finish())
            .await
            .map(drop)
    }

    /// Gives up a multipart upload, so the bucket keeps no orphaned parts, and returns `error`.
    async fn abort(
        &self,
        writer: WriteMultipart,
        error: ObjectTierError,
    ) -> Result<(), ObjectTierError> {
        if let Ok(Err(abort_error)) = tokio::time::timeout(ANSWER_TIMEOUT, writer.abort()).await {
            tracing::debug!(error = %abort_error, "cannot abort a multipart upload");
        }
        Err(error)
    }

    async fn read_manifest(
        &self,
        key: Key,
        digest: &Digest,
    ) -> Result<Option<Bytes>, ObjectTierError> {
        let got = match self.call(Operation::Read, self.store.get(&key)).await {
            Ok(got) => got,
            Err(error) if error.is_missing() => return Ok(None),
            Err(error) => return Err(error),
        };
        let corrupt = || ObjectTierError::Corrupt {
            key: key.to_string(),
            digest: digest.clone(),
        };
        let stored = if got.meta.size > MAX_MANIFEST {
            None
        } else {
            Some(
                self.timed(Operation::Read, ANSWER_TIMEOUT, got.bytes())
                    .await?,
            )
        };
        match stored {
            Some(stored) if holds_manifest(&stored, digest) => {
                self.metrics
                    .object_tier_read_bytes
                    .inc_by(stored.len() as u64);
                Ok(Some(stored))
            }
            _ => {
                tracing::warn!(%key, "removing an object tier manifest that does not match its digest");
                if let Err(error) = self.call(Operation::Delete, self.store.delete(&key)).await {
                    tracing::debug!(%error, "cannot remove the mismatched manifest");
                }
                Err(corrupt())
            }
        }
    }

    /// Whether a `blobs/<algorithm>/<xx>/<hex>` key names a blob pinned on this replica.
    fn is_pinned(&self, location: &Key) -> bool {
        let Some(pins) = self.pins.get() else {
            return false;
        };
        let mut parts = location.as_ref().rsplit('/');
        let (Some(hex), Some(_), Some(algorithm)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        Digest::parse(&format!("{algorithm}:{hex}")).is_ok_and(|digest| pins.contains(&digest))
    }

    async fn sweep(&self) -> Result<Swept, ObjectTierError> {
        let Some(budget) = self.budget else {
            return Ok(Swept::default());
        };
        self.health.admit()?;
        let blobs = Key::from(format!("{}blobs", self.prefix));
        let mut objects: Vec<ObjectMeta> = self
            .timed(
                Operation::List,
                LIST_TIMEOUT,
                self.store.list(Some(&blobs)).try_collect(),
            )
            .await?;
        let mut total: u64 = objects.iter().map(|meta| meta.size).sum();
        objects.sort_by(|a, b| (a.last_modified, &a.location).cmp(&(b.last_modified, &b.location)));
        let mut swept = Swept::default();
        for meta in objects {
            if total <= budget {
                break;
            }
            if self.is_pinned(&meta.location) {
                continue;
            }
            match self
                .timed(
                    Operation::Delete,
                    ANSWER_TIMEOUT,
                    self.store.delete(&meta.location),
                )
                .await
            {
                Ok(()) => {}
                Err(error) if error.is_missing() => {}
                Err(error) => return Err(error),
            }
            total -= meta.size;
            swept.objects += 1;
            swept.bytes += meta.size;
            self.metrics.object_tier_evictions.inc();
        }
        swept.remaining = total;
        Ok(swept)
    }
}

/// Probes a down tier every [`PROBE_INTERVAL`] and sweeps to the budget every
/// [`SWEEP_INTERVAL`], until the tier is dropped (which aborts it).
async fn tend(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sweep = Instant::now() + PROBE_INTERVAL;
    loop {
        ticks.tick().await;
        if !shared.health.report().up {
            let _ = shared.probe().await;
        }
        if shared.budget.is_some() && Instant::now() >= next_sweep {
            next_sweep = Instant::now() + SWEEP_INTERVAL;
            match shared.sweep().await {
                Ok(swept) if swept.objects > 0 => tracing::info!(
                    objects = swept.objects,
                    bytes = swept.bytes,
                    remaining = swept.remaining,
                    "object tier swept to storage.s3.max_size (oldest uploaded first)"
                ),
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "object tier sweep skipped"),
            }
        }
    }
}

/// Reads `[offset, offset + len)` of a committed blob on the blocking pool.
async fn read_part(file: &BlobFile, offset: u64, len: u64) -> Result<Bytes, ObjectTierError> {
    let handle = Arc::clone(&file.file);
    let len = usize::try_from(len).map_err(|_| {
        ObjectTierError::Local(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "part larger than memory",
        ))
    })?;
    tokio::task::spawn_blocking(move || read_exact_at(&handle, offset, len))
        .await?
        .map_err(ObjectTierError::Local)
}

/// Whether `stored` is a manifest in the disk store's form whose bytes hash to `digest`.
fn holds_manifest(stored: &[u8], digest: &Digest) -> bool {
    split_stored(stored)
        .is_some_and(|(_, start)| Digest::of(digest.algorithm(), &stored[start..]) == *digest)
}

fn is_no_bucket(error: &object_store::Error) -> bool {
    matches!(error, object_store::Error::NotFound { .. })
}

fn is_refused(error: &object_store::Error) -> bool {
    matches!(
        error,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    )
}

/// An S3 client that fails fast: one retry within 2 s, a 1 s connect timeout, and no overall
/// request timeout (a large GET may stream for minutes), since every call here bounds its own
/// wait: [`ANSWER_TIMEOUT`] for an answer, [`IDLE_TIMEOUT`] for silence inside a body.
fn build(config: &ObjectTierConfig) -> Result<Arc<dyn ObjectStore>, ObjectTierError> {
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
        },
        max_retries: 1,
        retry_timeout: Duration::from_secs(2),
    };
    let options = ClientOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout_disabled()
        .with_allow_http(config.allow_http);
    let mut builder = match (&config.access_key_id, &config.secret_access_key) {
        (Some(id), Some(secret)) => AmazonS3Builder::new()
            .with_access_key_id(&id.0)
            .with_secret_access_key(secret.expose()),
        // The AWS default chain: environment, web identity, instance metadata.
        _ => AmazonS3Builder::from_env(),
    };
    builder = builder
        .with_bucket_name(&config.bucket.0)
        .with_region(&config.region.0)
        .with_allow_http(config.allow_http)
        .with_retry(retry)
        .with_client_options(options);
    if let Some(endpoint) = &config.endpoint {
        builder = builder
            .with_endpoint(endpoint.origin())
            .with_virtual_hosted_style_request(false);
    }
    let store = builder.build().map_err(ObjectTierError::Client)?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;
    use crate::oci::manifest::encode_stored;
    use crate::store::{Store, StoreOptions};

    struct Bench {
        _dir: tempfile::TempDir,
        disk: Arc<Store>,
        bucket: Arc<InMemory>,
        tier: ObjectTier,
        metrics: Arc<Metrics>,
    }

    fn bench(prefix: &str, budget: Option<u64>) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let disk = Store::open(dir.path(), StoreOptions::default(), Arc::clone(&metrics)).unwrap();
        let bucket = Arc::new(InMemory::new());
        let tier = ObjectTier::over(bucket.clone(), prefix, budget, Arc::clone(&metrics));
        Bench {
            _dir: dir,
            disk,
            bucket,
            tier,
            metrics,
        }
    }

    /// sha256 straight from the sha2 crate, not through the code under test.
    fn sha256(content: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest::parse(&format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(content))
        ))
        .unwrap()
    }

    /// A deterministic, non-repeating-looking body of `len` bytes.
    fn content(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    async fn commit(disk: &Arc<Store>, content: &[u8]) -> (Digest, BlobFile) {
        let digest = sha256(content);
        let mut writer = disk
            .begin_blob(&digest, Some(content.len() as u64))
            .unwrap();
        writer.write(Bytes::copy_from_slice(content)).await.unwrap();
        writer.commit().await.unwrap();
        let file = disk.open_blob(&digest).await.unwrap();
        (digest, file)
    }

    async fn object(bucket: &InMemory, key: &str) -> Option<Bytes> {
        match bucket.get(&Key::from(key)).await {
            Ok(got) => Some(got.bytes().await.unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(error) => panic!("{error}"),
        }
    }

    async fn collect(read: ObjectRead) -> Vec<u8> {
        read.chunks
            .try_fold(Vec::new(), |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn keys_are_content_addressed_under_the_prefix() {
        let digest = sha256(b"abc");
        let hex = digest.hex();
        let plain = bench("", None);
        assert_eq!(
            plain.tier.blob_key(&digest).to_string(),
            format!("blobs/sha256/ba/{hex}")
        );
        let prefixed = bench("/fleet/a/", None);
        assert_eq!(
            prefixed.tier.manifest_key(&digest).to_string(),
            format!("fleet/a/manifests/sha256/ba/{hex}")
        );
    }

    #[tokio::test]
    async fn an_uploaded_blob_reads_back_whole_and_from_an_offset() {
        let bench = bench("p", None);
        let bytes = content(300_000, 1);
        let (digest, file) = commit(&bench.disk, &bytes).await;
        assert_eq!(
            bench.tier.upload_blob(&digest, &file).await.unwrap(),
            Uploaded::Stored { bytes: 300_000 }
        );
        let key = format!("p/blobs/sha256/{}/{}", &digest.hex()[..2], digest.hex());
        assert_eq!(object(&bench.bucket, &key).await.unwrap(), bytes);

        let whole = bench.tier.read_blob(&digest, 0).await.unwrap().unwrap();
        assert_eq!(whole.size, 300_000);
        assert_eq!(collect(whole).await, bytes);
        let tail = bench
            .tier
            .read_blob(&digest, 299_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tail.size, 300_000, "the whole object's size");
        assert_eq!(collect(tail).await, &bytes[299_000..]);
        let end = bench
            .tier
            .read_blob(&digest, 300_000)
            .await
            .unwrap()
            .unwrap();
        assert!(collect(end).await.is_empty());
        assert!(matches!(
            bench.tier.read_blob(&digest, 300_001).await,
            Err(ObjectTierError::PastEnd { .. })
        ));
        assert!(bench
            .tier
            .read_blob(&sha256(b"absent"), 0)
            .await
            .unwrap()
            .is_none());
        let text = String::from_utf8(bench.metrics.render()).unwrap();
        assert!(
            text.contains(r#"gantry_object_tier_lookups_total{kind="blob",outcome="hit"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gantry_object_tier_lookups_total{kind="blob",outcome="miss"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("gantry_object_tier_read_bytes_total 301000"),
            "{text}"
        );

        bench.tier.remove_blob(&digest).await.unwrap();
        assert!(object(&bench.bucket, &key).await.is_none());
        bench.tier.remove_blob(&digest).await.unwrap();
    }

    #[tokio::test]
    async fn a_large_blob_goes_in_parts_and_arrives_whole() {
        let bench = bench("", None);
        let bytes = content(2 * PART_SIZE + 12_345, 2);
        let (digest, file) = commit(&bench.disk, &bytes).await;
        bench.tier.upload_blob(&digest, &file).await.unwrap();
        let key = bench.tier.blob_key(&digest).to_string();
        assert_eq!(object(&bench.bucket, &key).await.unwrap(), bytes);
    }

    #[tokio::test]
    async fn an_existing_key_is_never_overwritten() {
        let bench = bench("", None);
        let bytes = content(1000, 3);
        let (digest, file) = commit(&bench.disk, &bytes).await;
        let key = bench.tier.blob_key(&digest);
        bench
            .bucket
            .put(&key, PutPayload::from_static(b"planted"))
            .await
            .unwrap();
        assert_eq!(
            bench.tier.upload_blob(&digest, &file).await.unwrap(),
            Uploaded::Present
        );
        assert_eq!(
            object(&bench.bucket, key.as_ref()).await.unwrap(),
            &b"planted"[..]
        );
    }

    #[tokio::test]
    async fn manifests_keep_their_media_type_and_a_wrong_one_is_removed() {
        let bench = bench("", None);
        let body = br#"{"schemaVersion":2}"#;
        let digest = sha256(body);
        let stored = Bytes::from(encode_stored(
            "application/vnd.oci.image.manifest.v1+json",
            body,
        ));
        assert!(bench.tier.read_manifest(&digest).await.unwrap().is_none());
        assert!(matches!(
            bench
                .tier
                .write_manifest(&sha256(b"other"), stored.clone())
                .await,
            Err(ObjectTierError::Corrupt { .. })
        ));
        bench
            .tier
            .write_manifest(&digest, stored.clone())
            .await
            .unwrap();
        assert_eq!(
            bench.tier.read_manifest(&digest).await.unwrap(),
            Some(stored)
        );

        let key = bench.tier.manifest_key(&digest);
        let wrong = encode_stored("text/plain", b"not it");
        bench.bucket.put(&key, wrong.into()).await.unwrap();
        assert!(matches!(
            bench.tier.read_manifest(&digest).await,
            Err(ObjectTierError::Corrupt { .. })
        ));
        assert!(object(&bench.bucket, key.as_ref()).await.is_none());
    }

    #[tokio::test]
    async fn the_sweep_deletes_the_oldest_uploaded_until_within_the_budget() {
        let bench = bench("", Some(2500));
        let mut digests = Vec::new();
        for seed in 0..4 {
            let (digest, file) = commit(&bench.disk, &content(1000, seed)).await;
            bench.tier.upload_blob(&digest, &file).await.unwrap();
            digests.push(digest);
            // Distinct upload times: the order is what is under test.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let manifest = br#"{}"#;
        let stored = Bytes::from(encode_stored("application/json", manifest));
        bench
            .tier
            .write_manifest(&sha256(manifest), stored)
            .await
            .unwrap();
        let swept = bench.tier.sweep().await.unwrap();
        assert_eq!(
            swept,
            Swept {
                objects: 2,
                bytes: 2000,
                remaining: 2000
            }
        );
        let mut kept = Vec::new();
        for digest in &digests {
            kept.push(
                object(&bench.bucket, bench.tier.blob_key(digest).as_ref())
                    .await
                    .is_some(),
            );
        }
        assert_eq!(kept, [false, false, true, true], "oldest first");
        assert!(
            bench
                .tier
                .read_manifest(&sha256(manifest))
                .await
                .unwrap()
                .is_some(),
            "manifests are not swept"
        );
        assert_eq!(bench.tier.sweep().await.unwrap().objects, 0);
    }

    /// A real S3 client against a port nothing listens on: connect succeeds with the tier down,
    /// and calls are skipped at once while the breaker is open.
    #[tokio::test]
    async fn the_sweep_spares_blobs_pinned_on_this_replica() {
        let bench = bench("gantry", Some(1500));
        let mut digests = Vec::new();
        for seed in 0..3 {
            let (digest, file) = commit(&bench.disk, &content(1000, seed)).await;
            bench.tier.upload_blob(&digest, &file).await.unwrap();
            digests.push(digest);
            // Distinct upload times: the oldest is the pinned one, the sweep's first pick.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bench.disk.pin(&digests[..1]).unwrap();
        bench.tier.spare_pins(Arc::clone(bench.disk.pins()));
        let swept = bench.tier.sweep().await.unwrap();
        assert_eq!(
            swept,
            Swept {
                objects: 2,
                bytes: 2000,
                remaining: 1000
            }
        );
        assert!(
            object(&bench.bucket, bench.tier.blob_key(&digests[0]).as_ref())
                .await
                .is_some(),
            "the pinned blob stays"
        );

        // Pinned blobs over the budget are kept: the budget is simply not met.
        let (late, file) = commit(&bench.disk, &content(1000, 9)).await;
        bench.tier.upload_blob(&late, &file).await.unwrap();
        bench.disk.pin(std::slice::from_ref(&late)).unwrap();
        let swept = bench.tier.sweep().await.unwrap();
        assert_eq!(swept.objects, 0);
        assert_eq!(swept.remaining, 2000);
    }

    #[tokio::test]
    async fn a_purge_removes_the_manifest_and_its_blobs_from_the_tier() {
        let bench = bench("gantry", None);
        let (layer, file) = commit(&bench.disk, &content(3000, 1)).await;
        bench.tier.upload_blob(&layer, &file).await.unwrap();
        drop(file);
        let (config, file) = commit(&bench.disk, &content(100, 2)).await;
        bench.tier.upload_blob(&config, &file).await.unwrap();
        drop(file);
        let manifest = format!(r#"{{"layers":["{layer}"],"config":"{config}"}}"#);
        let digest = sha256(manifest.as_bytes());
        bench
            .disk
            .write_manifest(&digest, "application/json", Bytes::from(manifest.clone()))
            .await
            .unwrap();
        bench.disk.catalogue().record_manifest(
            &digest,
            "application/json",
            manifest.len() as u64,
            &[(layer.clone(), 3000), (config.clone(), 100)],
        );
        let stored = Bytes::from(encode_stored("application/json", manifest.as_bytes()));
        bench.tier.write_manifest(&digest, stored).await.unwrap();

        let purged = bench
            .disk
            .purge(std::slice::from_ref(&digest), Some(&bench.tier))
            .await;
        assert!(purged.tier_errors.is_empty(), "{:?}", purged.tier_errors);
        assert_eq!(purged.blobs.len(), 2);
        for key in [
            bench.tier.blob_key(&layer),
            bench.tier.blob_key(&config),
            bench.tier.manifest_key(&digest),
        ] {
            assert!(object(&bench.bucket, key.as_ref()).await.is_none(), "{key}");
        }
        assert!(bench.tier.read_manifest(&digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_starts_down_and_is_skipped_fast() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let config: crate::config::Config = crate::config::Config::from_yaml(
            &format!(
                "storage:\n  s3:\n    endpoint: http://127.0.0.1:{port}\n    bucket: gantry\n    access_key_id: k\n    secret_access_key: s\n    allow_http: true\n"
            ),
            std::path::Path::new("test.yaml"),
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let s3 = config.storage.s3.as_ref().unwrap();
        let tier = ObjectTier::connect(s3, Arc::clone(&metrics)).await.unwrap();
        let health = tier.health();
        assert!(!health.up);
        assert!(health.last_error.is_some());
        assert_eq!(metrics.object_tier_up.get(), 0);
        let started = Instant::now();
        assert!(matches!(
            tier.read_blob(&sha256(b"x"), 0).await,
            Err(ObjectTierError::Down)
        ));
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
