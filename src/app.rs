//! The composition root: everything gantry is made of, built once from a validated [`Config`]
//! and handed to [`crate::server`] to serve. Building is kept apart from serving so the parts
//! can be built without binding a port (by the control plane's commands, by tests), and so the
//! parts (the object tier, the cluster's leases and peers, the catalogue) have one place to be wired.
//!
//! What fails here is the environment (an unwritable store, a bad certificate, an unreadable
//! htpasswd file); bad configuration was refused when the config was loaded.

use std::sync::Arc;

use crate::access::{Access, AccessError};
use crate::api::Api;
use crate::cluster::{Leases, Peers};
use crate::config::Config;
use crate::control::Control;
use crate::metrics::Metrics;
use crate::mirror::{uploader, Cluster, CommitHook, Mirror, UPLOAD_QUEUE};
use crate::redis::Redis;
use crate::store::object::{ObjectTier, ObjectTierError};
use crate::store::{Store, StoreError, StoreOptions};
use crate::tags::{RedisTags, TagError, Tags};
use crate::tls::{TlsError, TlsState};
use crate::upstream::{CredentialError, Pool, Timeouts};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("storage.path: cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The object tier (`storage.s3`): its message names the key to fix.
    #[error(transparent)]
    ObjectTier(#[from] ObjectTierError),
    #[error("cache.redis: {0}")]
    Redis(#[from] TagError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The built parts of one gantry. The tag cache lives in the mirror ([`Mirror::tags`]).
pub struct App {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub store: Arc<Store>,
    /// The object tier below the disk (`storage.s3`), if configured; the mirror's uploader holds
    /// it too.
    pub object_tier: Option<Arc<ObjectTier>>,
    pub mirror: Arc<Mirror>,
    /// The shared Redis (`cache.redis`), if configured.
    pub redis: Option<Redis>,
    pub api: Api,
    /// The operator's control plane, served on the admin listener.
    pub control: Arc<Control>,
    /// Users and their repository grants (`auth:`), reloaded on SIGHUP.
    pub access: Option<Arc<Access>>,
    /// The client listener's certificate (`tls:`), reloaded on SIGHUP.
    pub tls: Option<Arc<TlsState>>,
}

impl App {
    /// Opens the store (on a blocking thread: it scans the disk), connects the tag cache to
    /// Redis when configured, and builds the upstream pool, the mirror, access control, the API
    /// and the TLS configuration.
    pub async fn build(config: &Config) -> Result<Self, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let store = {
            let path = config.storage.path.clone();
            let options = StoreOptions::from_config(&config.storage);
            let metrics = Arc::clone(&metrics);
            tokio::task::spawn_blocking(move || Store::open(&path, options, metrics)).await??
        };
        // Refused here (a missing bucket, refused credentials) rather than on the first pull; an
        // unreachable endpoint is not refused: the tier starts down and is probed.
        let object_tier = match &config.storage.s3 {
            Some(s3) => Some(Arc::new(
                ObjectTier::connect(s3, Arc::clone(&metrics)).await?,
            )),
            None => None,
        };
        // One Redis handle (one multiplexed connection) for everything that shares state
        // across replicas: the tag cache now, coordination and control-plane events next.
        let redis = match &config.cache.redis {
            Some(url) => Some(Redis::open(url.expose()).map_err(TagError::from)?),
            None => None,
        };
        let tags = Tags::new(redis.clone().map(RedisTags::over), Arc::clone(&metrics));
        let pool = Pool::new(
            Timeouts {
                connect: config.timeouts.connect.0,
                first_byte: config.timeouts.first_byte.0,
                idle: config.timeouts.idle.0,
            },
            Arc::clone(&metrics),
        );
        let mut mirror = Mirror::new(config, Arc::clone(&store), tags, pool, Arc::clone(&metrics))?;
        if let (Some(tier), Some(s3)) = (&object_tier, &config.storage.s3) {
            // Pins keep content in the bucket too (on this replica's sweeps).
            tier.spare_pins(Arc::clone(store.pins()));
            let consumer = uploader(Arc::clone(tier), Arc::clone(&store), s3.max_uploads);
            mirror = mirror
                .with_commit_hook(CommitHook::spawn(UPLOAD_QUEUE, consumer))
                .with_object_tier(Arc::clone(tier));
        }
        // Validation admits `cluster` only with `cache.redis`.
        if let (Some(cluster), Some(redis)) = (&config.cluster, &redis) {
            mirror = mirror.with_cluster(Cluster {
                leases: Leases::new(redis.clone(), cluster, Arc::clone(&metrics)),
                peers: Arc::new(Peers::new(
                    cluster,
                    config.timeouts.idle.0,
                    Arc::clone(&metrics),
                )),
            });
        }
        let mirror = Arc::new(mirror);
        let access = match &config.auth {
            Some(auth) => Some(Arc::new(Access::load(auth)?)),
            None => None,
        };
        let api = Api::new(Arc::clone(&mirror), Arc::clone(&metrics), access.clone())
            .with_cluster(config.cluster.as_ref());
        let control = Arc::new(
            Control::new(
                Arc::clone(&mirror),
                Arc::clone(&metrics),
                config.admin.token.clone(),
            )
            .with_object_tier(object_tier.clone())
            .with_redis(redis.clone()),
        );
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(TlsState::load(files)?)),
            None => None,
        };
        Ok(Self {
            config: config.clone(),
            metrics,
            store,
            object_tier,
            mirror,
            redis,
            api,
            control,
            access,
            tls,
        })
    }
}
