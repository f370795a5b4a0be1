//! Redis, for everything in gantry that talks to it (the tag cache today; coordination and
//! control-plane events next), with one policy for timeouts and reconnects.
//!
//! Redis is an optimisation here, never a dependency: gantry starts with Redis down, a hung or
//! gone Redis costs a request at most one [`COMMAND_TIMEOUT`], and Redis is picked up again when
//! it comes back, without a restart. So:
//!
//! - The first connection is made on first use, not at start-up; commands issued meanwhile wait
//!   for it (within their timeout).
//! - Commands share one multiplexed [`ConnectionManager`]: nothing is held across a reconnect,
//!   and a slow command does not drop the connection of the others (the manager re-dials only
//!   after a connection error).
//! - When a command finds Redis unreachable (a connection error or no answer in time), Redis is
//!   *down*: commands fail at once instead of each waiting out a timeout, and one task probes
//!   with `PING` — at once, then with a doubling pause from [`FIRST_RETRY`] to [`MAX_RETRY`] —
//!   until Redis answers again.
//!
//! The manager's own retries are off: in redis 0.32 its backoff starts at one second whatever
//! the configured factor (backon's minimum delay) and commands would wait on it; the probe owns
//! the retry schedule instead.
//!
//! The redis crate is `::redis` in here, this module `crate::redis` elsewhere.

use std::sync::{Arc, Weak};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Cmd, FromRedisValue, RedisError};
use tokio::sync::watch;

/// The most one command may take, waiting for a first connection included.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// One attempt to dial Redis (TCP and handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The pause after the first failed probe while Redis is down; it doubles from there...
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
/// ...up to this, the longest Redis can be back before gantry notices.
pub const MAX_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis is not connected")]
    Disconnected,
}

impl Error {
    /// Whether this says Redis is unreachable (rather than that it refused one command).
    fn is_outage(&self) -> bool {
        match self {
            Error::Timeout(_) => true,
            Error::Disconnected => false,
            Error::Redis(error) => {
                error.is_io_error() || error.is_unrecoverable_error() || error.is_timeout()
            }
        }
    }
}

/// A handle on one Redis; clones share the connection and its state.
#[derive(Clone)]
pub struct Redis {
    shared: Arc<Shared>,
}

struct Shared {
    client: ::redis::Client,
    state: watch::Sender<State>,
}

#[derive(Clone)]
enum State {
    /// Not used yet.
    Idle,
    /// The first connection is being made.
    Connecting,
    Up(ConnectionManager),
    /// Unreachable at the last attempt; the manager, once there is one, is kept for the probe
    /// (it re-dials by itself).
    Down(Option<ConnectionManager>),
}

impl Redis {
    /// Checks the URL (`redis://` or `rediss://`); does not connect.
    pub fn open(url: &str) -> Result<Self, Error> {
        Ok(Self {
            shared: Arc::new(Shared {
                client: ::redis::Client::open(url)?,
                state: watch::Sender::new(State::Idle),
            }),
        })
    }

    /// Runs one command within [`COMMAND_TIMEOUT`]. A connection error or a timeout marks Redis
    /// down (see the module docs); an error reply from Redis does not.
    pub async fn run<T: FromRedisValue>(&self, command: &Cmd) -> Result<T, Error> {
        let outcome = tokio::time::timeout(COMMAND_TIMEOUT, async {
            let mut connection = self.connection().await?;
            Ok(command.query_async::<T>(&mut connection).await?)
        })
        .await
        .unwrap_or(Err(Error::Timeout(COMMAND_TIMEOUT)));
        if let Err(error) = &outcome {
            if error.is_outage() {
                self.went_down(error);
            }
        }
        outcome
    }

    /// Whether Redis answers a `PING` right now (`false` at once while it is down).
    pub async fn ping(&self) -> bool {
        self.run::<String>(&::redis::cmd("PING")).await.is_ok()
    }

    async fn connection(&self) -> Result<ConnectionManager, Error> {
        let mut state = self.shared.state.subscribe();
        let first = self.shared.state.send_if_modified(|state| {
            let idle = matches!(state, State::Idle);
            if idle {
                *state = State::Connecting;
            }
            idle
        });
        if first {
            tokio::spawn(connect(Arc::downgrade(&self.shared)));
        }
        let state = state
            .wait_for(|state| !matches!(state, State::Idle | State::Connecting))
            .await
            .map_err(|_| Error::Disconnected)?;
        match &*state {
            State::Up(manager) => Ok(manager.clone()),
            _ => Err(Error::Disconnected),
        }
    }

    /// Up → down, starting the probe; any other state already has its task.
    fn went_down(&self, error: &Error) {
        let down = self.shared.state.send_if_modified(|state| match state {
            State::Up(manager) => {
                *state = State::Down(Some(manager.clone()));
                true
            }
            _ => false,
        });
        if down {
            tracing::warn!(%error, "redis unreachable; probing until it answers");
            tokio::spawn(connect(Arc::downgrade(&self.shared)));
        }
    }
}

/// Connects (or re-checks the connection) until Redis answers a `PING`, then marks it up. Ends
/// early when every handle is gone.
async fn connect(shared: Weak<Shared>) {
    let mut pause = FIRST_RETRY;
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let known = match &*shared.state.borrow() {
            State::Down(manager) => manager.clone(),
            _ => None,
        };
        match attempt(&shared.client, known).await {
            Ok(manager) => {
                shared.state.send_replace(State::Up(manager));
                tracing::info!("connected to redis");
                return;
            }
            Err((manager, error)) => {
                tracing::debug!(%error, ?pause, "redis still unreachable");
                shared.state.send_replace(State::Down(manager));
            }
        }
        drop(shared);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY);
    }
}

/// One dial (unless there is a manager already) and one `PING`.
async fn attempt(
    client: &::redis::Client,
    known: Option<ConnectionManager>,
) -> Result<ConnectionManager, (Option<ConnectionManager>, Error)> {
    let mut manager = match known {
        Some(manager) => manager,
        None => {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(COMMAND_TIMEOUT)
                .set_number_of_retries(0);
            let dial = ConnectionManager::new_with_config(client.clone(), config);
            match tokio::time::timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT, dial).await {
                Ok(Ok(manager)) => manager,
                Ok(Err(error)) => return Err((None, error.into())),
                Err(_) => return Err((None, Error::Timeout(CONNECT_TIMEOUT))),
            }
        }
    };
    let ping = ::redis::cmd("PING");
    let answer = tokio::time::timeout(COMMAND_TIMEOUT, ping.query_async::<String>(&mut manager));
    let error = match answer.await {
        Ok(Ok(_)) => return Ok(manager),
        Ok(Err(error)) => Error::Redis(error),
        Err(_) => Error::Timeout(COMMAND_TIMEOUT),
    };
    // The manager re-dials after an I/O error and a silent connection may still recover; after
    // anything else (a refused handshake) only a new one helps.
    let keep = match &error {
        Error::Redis(error) => error.is_io_error(),
        _ => true,
    };
    Err((keep.then_some(manager), error))
}

/// One entry of a stream: its id and its fields, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEntry {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl StreamEntry {
    /// The value of `name`, the first one if it repeats.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Where a stream stands (`XINFO STREAM`); all `None`/0 for a stream that does not exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamBounds {
    /// The id the next entry will follow: reading after it sees only what comes next.
    pub last_generated: Option<String>,
    /// The highest id trimmed or deleted: a reader whose last id is below it may have missed
    /// entries.
    pub max_deleted: Option<String>,
    /// Entries trimmed or deleted since the stream began (`entries-added` − `length`).
    pub trimmed: u64,
}

/// Stream commands over the same handle, timeouts and outage policy as [`Redis::run`]. Reads
/// never block on the server (`XREAD` without `BLOCK`): a blocking read would outlast
/// [`COMMAND_TIMEOUT`] and mark Redis down.
impl Redis {
    /// `XADD key MAXLEN ~ max_len * field value …`; answers the new entry's id.
    pub async fn stream_add(
        &self,
        key: &str,
        max_len: usize,
        fields: &[(&str, &str)],
    ) -> Result<String, Error> {
        let mut command = ::redis::cmd("XADD");
        command
            .arg(key)
            .arg("MAXLEN")
            .arg("~")
            .arg(max_len)
            .arg("*");
        for (field, value) in fields {
            command.arg(*field).arg(*value);
        }
        self.run(&command).await
    }

    /// `XREAD COUNT count STREAMS key after`: up to `count` entries with ids above `after`.
    pub async fn stream_read(
        &self,
        key: &str,
        after: &str,
        count: usize,
    ) -> Result<Vec<StreamEntry>, Error> {
        let mut command = ::redis::cmd("XREAD");
        command
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(key)
            .arg(after);
        let reply: ::redis::Value = self.run(&command).await?;
        let mut entries = Vec::new();
        // [[key, [[id, [field, value, …]], …]]], or nil when nothing is newer.
        for stream in items(reply) {
            let mut parts = items(stream).into_iter();
            let (Some(_key), Some(found)) = (parts.next(), parts.next()) else {
                continue;
            };
            for entry in items(found) {
                let mut parts = items(entry).into_iter();
                let Some(id) = parts.next().and_then(text) else {
                    continue;
                };
                let flat: Vec<String> = parts
                    .next()
                    .map(items)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(text)
                    .collect();
                let fields = flat
                    .chunks_exact(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect();
                entries.push(StreamEntry { id, fields });
            }
        }
        Ok(entries)
    }

    /// `XINFO STREAM key`, or the default for a stream that does not exist yet.
    pub async fn stream_bounds(&self, key: &str) -> Result<StreamBounds, Error> {
        let exists: i64 = self.run(::redis::cmd("EXISTS").arg(key)).await?;
        if exists == 0 {
            return Ok(StreamBounds::default());
        }
        let reply: ::redis::Value = self
            .run(::redis::cmd("XINFO").arg("STREAM").arg(key))
            .await?;
        let pairs: Vec<(String, ::redis::Value)> = match reply {
            ::redis::Value::Map(pairs) => pairs
                .into_iter()
                .filter_map(|(name, value)| Some((text(name)?, value)))
                .collect(),
            other => {
                let flat = items(other);
                flat.chunks_exact(2)
                    .filter_map(|pair| Some((text(pair[0].clone())?, pair[1].clone())))
                    .collect()
            }
        };
        let find = |name: &str| {
            pairs
                .iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| value.clone())
        };
        let number = |name: &str| match find(name) {
            Some(::redis::Value::Int(n)) => u64::try_from(n).unwrap_or(0),
            _ => 0,
        };
        let max_deleted = find("max-deleted-entry-id")
            .and_then(text)
            .filter(|id| id != "0-0");
        Ok(StreamBounds {
            last_generated: find("last-generated-id").and_then(text),
            max_deleted,
            trimmed: number("entries-added").saturating_sub(number("length")),
        })
    }
}

/// The elements of an array reply (none for nil or anything else).
fn items(value: ::redis::Value) -> Vec<::redis::Value> {
    match value {
        ::redis::Value::Array(items) | ::redis::Value::Set(items) => items,
        _ => Vec::new(),
    }
}

/// A string reply as text.
fn text(value: ::redis::Value) -> Option<String> {
    match value {
        ::redis::Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        ::redis::Value::SimpleString(text) => Some(text),
        _ => None,
    }
}
