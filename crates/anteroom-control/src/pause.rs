//! Pausing and resuming a queue, and following its pause flag.

use std::time::Duration;

use anteroom_protocol::{Keys, PauseRecord, now_ms};
use anteroom_redis::{SharedConnection, Target};
use anteroom_runtime::Components;
use futures_util::StreamExt;
use redis::aio::PubSub;
use tokio::sync::watch;

use crate::{ControlError, Queue};

/// Renews a pause only while it is still the one we set.
const RENEW_IF_OURS: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Clears a pause only while it is still the one we set.
const CLEAR_IF_OURS: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// A pause this process set, which it may renew or clear.
#[derive(Debug, Clone)]
pub struct HeldPause {
    /// The record stored in Redis.
    pub record: PauseRecord,
    raw: String,
}

pub(crate) fn parse_record(raw: &str) -> PauseRecord {
    // Anything in the key means paused, even a value some script wrote by hand.
    serde_json::from_str(raw).unwrap_or_else(|_| PauseRecord {
        id: raw.to_owned(),
        since_ms: 0,
        by: String::new(),
    })
}

impl Queue {
    /// Pauses the queue and announces it. With `ttl`, the pause is a lease
    /// that lapses unless [`renew`](Self::renew)ed. Pausing a paused queue
    /// keeps the existing pause (made permanent when `ttl` is `None`); with
    /// `exclusive`, it is an error instead.
    pub async fn pause(
        &self,
        by: &str,
        ttl: Option<Duration>,
        exclusive: bool,
    ) -> Result<HeldPause, ControlError> {
        let record = PauseRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            since_ms: now_ms(),
            by: by.to_owned(),
        };
        let raw = serde_json::to_string(&record).unwrap_or_default();
        let mut conn = self.conn();
        let mut set = redis::cmd("SET");
        set.arg(self.keys.paused()).arg(&raw).arg("NX");
        if let Some(ttl) = ttl {
            set.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        let created: Option<String> = set.query_async(&mut conn).await?;
        let held = if created.is_some() {
            HeldPause { record, raw }
        } else {
            let existing: Option<String> = redis::cmd("GET")
                .arg(self.keys.paused())
                .query_async(&mut conn)
                .await?;
            let existing = existing.unwrap_or_default();
            let record = parse_record(&existing);
            if exclusive {
                return Err(ControlError::AlreadyPaused {
                    queue: self.name().to_owned(),
                    by: record.by,
                });
            }
            if ttl.is_none() {
                redis::cmd("PERSIST")
                    .arg(self.keys.paused())
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            HeldPause {
                record,
                raw: existing,
            }
        };
        self.announce("pause").await?;
        Ok(held)
    }

    /// Extends a lease set by [`pause`](Self::pause); false when the pause is
    /// gone or was replaced.
    pub async fn renew(&self, held: &HeldPause, ttl: Duration) -> Result<bool, ControlError> {
        let renewed: i64 = redis::cmd("EVAL")
            .arg(RENEW_IF_OURS)
            .arg(1)
            .arg(self.keys.paused())
            .arg(&held.raw)
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut self.conn())
            .await?;
        Ok(renewed == 1)
    }

    /// Resumes the queue, whoever paused it. True when it was paused.
    pub async fn resume(&self) -> Result<bool, ControlError> {
        let removed: i64 = redis::cmd("DEL")
            .arg(self.keys.paused())
            .query_async(&mut self.conn())
            .await?;
        self.announce("resume").await?;
        Ok(removed == 1)
    }

    /// Resumes the queue only if `held` is still its pause. True when it was.
    pub async fn resume_held(&self, held: &HeldPause) -> Result<bool, ControlError> {
        let removed: i64 = redis::cmd("EVAL")
            .arg(CLEAR_IF_OURS)
            .arg(1)
            .arg(self.keys.paused())
            .arg(&held.raw)
            .query_async(&mut self.conn())
            .await?;
        self.announce("resume").await?;
        Ok(removed == 1)
    }

    /// The current pause and its remaining lease (`None`: no expiry), if paused.
    pub async fn pause_state(&self) -> Result<Option<(PauseRecord, Option<u64>)>, ControlError> {
        let (raw, pttl): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(self.keys.paused())
            .cmd("PTTL")
            .arg(self.keys.paused())
            .query_async(&mut self.conn())
            .await?;
        Ok(raw.map(|raw| (parse_record(&raw), u64::try_from(pttl).ok())))
    }

    pub(crate) async fn announce(&self, what: &str) -> Result<(), ControlError> {
        redis::cmd("PUBLISH")
            .arg(self.keys.control())
            .arg(what)
            .query_async::<i64>(&mut self.conn())
            .await?;
        Ok(())
    }
}

/// The pause flag as a dispatcher sees it: `Some(record)` while paused.
pub type PauseWatch = watch::Receiver<Option<PauseRecord>>;

/// Reads the pause flag now, then follows it in a component of
/// `components` ("pause watcher") until they stop: every message on the
/// control channel triggers a re-read, and the key is also re-read every
/// `poll`, so a lost message or a lapsed lease is noticed within `poll`.
pub async fn watch_pause(
    target: Target,
    conn: SharedConnection,
    keys: Keys,
    poll: Duration,
    connect_timeout: Duration,
    components: &Components,
) -> Result<PauseWatch, ControlError> {
    let flag = Flag {
        key: keys.paused(),
        parse: parse_record,
        name: "pause watcher",
    };
    follow(target, conn, keys, flag, poll, connect_timeout, components).await
}

/// How long after a failed subscription to the control channel the next
/// try comes.
const RESUBSCRIBE: Duration = Duration::from_secs(5);

/// A key whose presence is a state of the queue, announced on its control
/// channel: the pause flag, maintenance mode.
pub(crate) struct Flag<T> {
    pub(crate) key: String,
    pub(crate) parse: fn(&str) -> T,
    /// The component's name.
    pub(crate) name: &'static str,
}

/// Reads `flag` now, then follows it in a component of `components` until
/// they stop: every message on `keys`' control channel triggers a re-read,
/// and the key is also re-read every `poll`, so a lost message or a lapsed
/// lease is noticed within `poll`.
pub(crate) async fn follow<T>(
    target: Target,
    conn: SharedConnection,
    keys: Keys,
    flag: Flag<T>,
    poll: Duration,
    connect_timeout: Duration,
    components: &Components,
) -> Result<watch::Receiver<Option<T>>, ControlError>
where
    T: PartialEq + Send + Sync + 'static,
{
    let mut reader = Reader { conn, flag };
    let initial = reader.read().await?;
    let (tx, rx) = watch::channel(initial);
    let stop = components.stopping();
    components.spawn(reader.flag.name, async move {
        let mut subscription: Option<PubSub> = None;
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A refused subscription (no `+subscribe`, Redis away) is tried
        // again after a while, not on every poll: the key is read each
        // poll meanwhile.
        let mut subscribe_after = tokio::time::Instant::now();
        loop {
            if subscription.is_none() && tokio::time::Instant::now() >= subscribe_after {
                subscription = subscribe(&target, &keys, connect_timeout).await;
                if subscription.is_none() {
                    subscribe_after = tokio::time::Instant::now() + RESUBSCRIBE;
                }
            }
            let message = async {
                match subscription.as_mut() {
                    Some(sub) => sub.on_message().next().await.is_some(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                got = message => {
                    if !got {
                        tracing::debug!("control subscription lost; polling until it is back");
                        subscription = None;
                    }
                }
                _ = ticker.tick() => {}
                () = stop.cancelled() => return,
            }
            match reader.read().await {
                Ok(state) => {
                    tx.send_if_modified(|current| {
                        let changed = *current != state;
                        *current = state;
                        changed
                    });
                }
                Err(err) => {
                    tracing::debug!(error = %err, key = %reader.flag.key, "cannot read the flag")
                }
            }
        }
    });
    Ok(rx)
}

struct Reader<T> {
    conn: SharedConnection,
    flag: Flag<T>,
}

impl<T> Reader<T> {
    async fn read(&mut self) -> Result<Option<T>, ControlError> {
        // Bytes: anything in the key counts, UTF-8 or not.
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&self.flag.key)
            .query_async(&mut self.conn)
            .await?;
        Ok(raw.map(|raw| (self.flag.parse)(&String::from_utf8_lossy(&raw))))
    }
}

async fn subscribe(target: &Target, keys: &Keys, timeout: Duration) -> Option<PubSub> {
    let attempt = async {
        let mut pubsub = target.client().await?.get_async_pubsub().await?;
        pubsub.subscribe(keys.control()).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(pubsub)) => Some(pubsub),
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "cannot subscribe to the control channel; reading the flag every poll");
            None
        }
        Err(_) => {
            tracing::debug!(
                "subscribing to the control channel timed out; reading the flag every poll"
            );
            None
        }
    }
}
