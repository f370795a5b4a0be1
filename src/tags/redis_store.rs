//! The shared level of the tag cache in Redis.
//!
//! The connection is made lazily and re-made after failures (at most once per
//! [`RECONNECT_INTERVAL`]), so gantry starts and serves with Redis down and picks Redis up when it
//! comes back, without a restart. Every operation has a short timeout: a hung Redis must not hold
//! up a pull.

use crate::oci::manifest::{encode_stored, split_stored};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

use super::{TagEntry, TagError, TagStore, RETENTION};

const OPERATION_TIMEOUT: Duration = Duration::from_millis(500);
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

pub struct RedisTags {
    client: redis::Client,
    connection: Mutex<Connection>,
}

#[derive(Default)]
struct Connection {
    live: Option<MultiplexedConnection>,
    last_attempt: Option<Instant>,
}

impl RedisTags {
    /// Checks the URL; does not connect.
    pub fn new(url: &str) -> Result<Self, TagError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: Mutex::new(Connection::default()),
        })
    }

    async fn connection(&self) -> Result<MultiplexedConnection, TagError> {
        let mut state = self.connection.lock().await;
        if let Some(live) = &state.live {
            return Ok(live.clone());
        }
        if state
            .last_attempt
            .is_some_and(|at| at.elapsed() < RECONNECT_INTERVAL)
        {
            return Err(TagError::Disconnected);
        }
        state.last_attempt = Some(Instant::now());
        let connect = self.client.get_multiplexed_async_connection();
        let live = tokio::time::timeout(OPERATION_TIMEOUT, connect)
            .await
            .map_err(|_| TagError::Timeout(OPERATION_TIMEOUT))??;
        tracing::info!("connected to redis");
        state.live = Some(live.clone());
        Ok(live)
    }

    /// Runs one command; on failure the connection is dropped so the next call reconnects.
    async fn run<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> Result<T, TagError> {
        let mut connection = self.connection().await?;
        let result =
            tokio::time::timeout(OPERATION_TIMEOUT, command.query_async::<T>(&mut connection))
                .await;
        let outcome = match result {
            Err(_) => Err(TagError::Timeout(OPERATION_TIMEOUT)),
            Ok(result) => result.map_err(TagError::from),
        };
        if outcome.is_err() {
            self.connection.lock().await.live = None;
        }
        outcome
    }

    /// A manifest shared by another replica: `(media type, bytes)`, unverified (the caller checks
    /// the digest before using it).
    pub async fn manifest(&self, key: &str) -> Result<Option<(String, Vec<u8>)>, TagError> {
        let mut command = redis::cmd("GET");
        command.arg(key);
        let raw: Option<Vec<u8>> = self.run(command).await?;
        Ok(raw.and_then(|raw| {
            let (media_type, start) = split_stored(&raw)?;
            Some((media_type.to_owned(), raw[start..].to_vec()))
        }))
    }

    pub async fn put_manifest(
        &self,
        key: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), TagError> {
        let value = encode_stored(media_type, bytes);
        let mut command = redis::cmd("SET");
        command
            .arg(key)
            .arg(value)
            .arg("EX")
            .arg(RETENTION.as_secs());
        self.run::<()>(command).await
    }

    /// Adds `member` to the set at `key` (kept for [`RETENTION`]).
    pub async fn add_to_set(&self, key: &str, member: &str) -> Result<(), TagError> {
        let mut command = redis::cmd("SADD");
        command.arg(key).arg(member);
        self.run::<()>(command).await?;
        let mut command = redis::cmd("EXPIRE");
        command.arg(key).arg(RETENTION.as_secs());
        self.run::<()>(command).await
    }

    pub async fn set_contains(&self, key: &str, member: &str) -> Result<bool, TagError> {
        let mut command = redis::cmd("SISMEMBER");
        command.arg(key).arg(member);
        self.run(command).await
    }

    pub async fn ping(&self) -> bool {
        self.run::<String>(redis::cmd("PING")).await.is_ok()
    }
}

impl TagStore for RedisTags {
    async fn get(&self, key: &str) -> Result<Option<TagEntry>, TagError> {
        let mut command = redis::cmd("GET");
        command.arg(key);
        let raw: Option<Vec<u8>> = self.run(command).await?;
        raw.map(|raw| serde_json::from_slice(&raw).map_err(TagError::from))
            .transpose()
    }

    async fn put(&self, key: &str, entry: &TagEntry) -> Result<(), TagError> {
        let mut command = redis::cmd("SET");
        command
            .arg(key)
            .arg(serde_json::to_vec(entry)?)
            .arg("EX")
            .arg(RETENTION.as_secs());
        self.run::<()>(command).await
    }
}
