//! The shared level of the tag cache in Redis, over the process's [`crate::redis::Redis`] (which
//! owns connecting, timeouts and reconnects).

use crate::oci::manifest::{encode_stored, split_stored};
use crate::redis::Redis;

use super::{TagEntry, TagError, TagStore, RETENTION};

pub struct RedisTags {
    redis: Redis,
}

impl RedisTags {
    /// Checks the URL; does not connect.
    pub fn new(url: &str) -> Result<Self, TagError> {
        Ok(Self::over(Redis::open(url)?))
    }

    /// The tag cache over a Redis handle shared with other users.
    pub fn over(redis: Redis) -> Self {
        Self { redis }
    }

    async fn run<T: ::redis::FromRedisValue>(&self, command: ::redis::Cmd) -> Result<T, TagError> {
        Ok(self.redis.run(&command).await?)
    }

    /// A manifest shared by another replica: `(media type, bytes)`, unverified (the caller checks
    /// the digest before using it).
    pub async fn manifest(&self, key: &str) -> Result<Option<(String, Vec<u8>)>, TagError> {
        let mut command = ::redis::cmd("GET");
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
        let mut command = ::redis::cmd("SET");
        command
            .arg(key)
            .arg(value)
            .arg("EX")
            .arg(RETENTION.as_secs());
        self.run::<()>(command).await
    }

    /// Adds `member` to the set at `key` (kept for [`RETENTION`]).
    pub async fn add_to_set(&self, key: &str, member: &str) -> Result<(), TagError> {
        let mut command = ::redis::cmd("SADD");
        command.arg(key).arg(member);
        self.run::<()>(command).await?;
        let mut command = ::redis::cmd("EXPIRE");
        command.arg(key).arg(RETENTION.as_secs());
        self.run::<()>(command).await
    }

    pub async fn set_contains(&self, key: &str, member: &str) -> Result<bool, TagError> {
        let mut command = ::redis::cmd("SISMEMBER");
        command.arg(key).arg(member);
        self.run(command).await
    }

    /// Deletes `keys` (one command; absent keys are no error).
    pub async fn remove(&self, keys: &[String]) -> Result<(), TagError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut command = ::redis::cmd("DEL");
        command.arg(keys);
        self.run::<()>(command).await
    }

    pub async fn ping(&self) -> bool {
        self.redis.ping().await
    }
}

impl TagStore for RedisTags {
    async fn get(&self, key: &str) -> Result<Option<TagEntry>, TagError> {
        let mut command = ::redis::cmd("GET");
        command.arg(key);
        let raw: Option<Vec<u8>> = self.run(command).await?;
        raw.map(|raw| serde_json::from_slice(&raw).map_err(TagError::from))
            .transpose()
    }

    async fn put(&self, key: &str, entry: &TagEntry) -> Result<(), TagError> {
        let mut command = ::redis::cmd("SET");
        command
            .arg(key)
            .arg(serde_json::to_vec(entry)?)
            .arg("EX")
            .arg(RETENTION.as_secs());
        self.run::<()>(command).await
    }
}
