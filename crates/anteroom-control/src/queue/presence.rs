//! Heartbeats and registries: how proxies and dispatchers say they are alive.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anteroom_protocol::{Keys, QUEUES_KEY, now_ms};
use anteroom_redis::SharedConnection;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::millis;

/// Which registry a component belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A proxy: `anteroom:{q}:proxy:<id>` in `anteroom:{q}:proxies`.
    Proxy,
    /// A dispatcher: `anteroom:{q}:dispatcher:<id>` in `anteroom:{q}:dispatchers`.
    Dispatcher,
}

/// One component's place in the registry.
#[derive(Debug, Clone)]
pub struct Presence {
    key: String,
    registry: String,
    /// A dispatcher's processing list: its registry entry stays while the
    /// list holds anything (see [`Presence::leave`]).
    held: Option<String>,
    queue: String,
    id: String,
    ttl: Duration,
    /// When the last heartbeat Redis took was sent (shared by clones).
    written: Arc<Mutex<Option<Instant>>>,
}

/// Removes a heartbeat and, only if the processing list is empty, the
/// registry entry: what is left in the list is found by the reaper through
/// the entry (docs/protocol.md, step 8). KEYS: the heartbeat, the
/// registry, the processing list; ARGV: the id. 1 when the entry went.
const LEAVE: &str = r"
redis.call('DEL', KEYS[1])
if redis.call('LLEN', KEYS[3]) > 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1";

impl Presence {
    /// The presence of component `id` with `role` on `keys`' queue.
    pub fn new(keys: &Keys, role: Role, id: &str, ttl: Duration) -> Self {
        let (key, registry, held) = match role {
            Role::Proxy => (keys.proxy(id), keys.proxies(), None),
            Role::Dispatcher => (
                keys.dispatcher(id),
                keys.dispatchers(),
                Some(keys.processing(id)),
            ),
        };
        Self {
            key,
            registry,
            held,
            queue: keys.queue().to_owned(),
            id: id.to_owned(),
            ttl,
            written: Arc::default(),
        }
    }

    /// Whether a heartbeat Redis took was sent less than `age` ago. The
    /// heartbeat lives at least its TTL from its sending, so a dispatcher
    /// takes requests only while this holds for half the TTL, and beats
    /// first otherwise (docs/protocol.md, step 6).
    pub fn written_within(&self, age: Duration) -> bool {
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|sent| sent.elapsed() < age)
    }

    fn mark_written(&self, sent: Instant) {
        *self.written.lock().unwrap_or_else(PoisonError::into_inner) = Some(sent);
    }

    /// Adds the queue to the global list of known queues (`SADD
    /// anteroom:queues`), as a proxy or dispatcher that serves it does
    /// before its first beat; logged, not returned, when it fails (`anteroom
    /// status` then finds the queue at the next start).
    pub async fn register_queue(&self, conn: &mut SharedConnection) {
        let added = redis::cmd("SADD")
            .arg(QUEUES_KEY)
            .arg(&self.queue)
            .query_async::<i64>(conn)
            .await;
        if let Err(err) = added {
            tracing::debug!(error = %err, queue = %self.queue, "cannot register the queue");
        }
    }

    /// Writes the heartbeat (with its TTL) and refreshes the registry entry;
    /// reads the server's clock on the way (`TIME`, for the queue's clock:
    /// docs/protocol.md, "Time"). While Redis refuses writes for want of
    /// memory (`OOM`), it only extends the heartbeat's TTL (`PEXPIRE`, which
    /// Redis still allows).
    pub async fn beat(
        &self,
        conn: &mut SharedConnection,
        heartbeat: &impl Serialize,
    ) -> redis::RedisResult<()> {
        let json = serde_json::to_string(heartbeat).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "heartbeat does not serialize",
                e.to_string(),
            ))
        })?;
        let sent = Instant::now();
        let written: redis::RedisResult<((u64, u64),)> = redis::pipe()
            .cmd("TIME")
            .cmd("SET")
            .arg(&self.key)
            .arg(json)
            .arg("PX")
            .arg(millis(self.ttl))
            .ignore()
            .cmd("ZADD")
            .arg(&self.registry)
            .arg(now_ms())
            .arg(&self.id)
            .ignore()
            .query_async(conn)
            .await;
        match written {
            Ok(((seconds, micros),)) => {
                anteroom_redis::observe_time(seconds, micros, sent);
                self.mark_written(sent);
                Ok(())
            }
            // A full Redis (`maxmemory`, `noeviction`) refuses the SET but
            // not PEXPIRE, which grows nothing: the heartbeat stays alive
            // with its last contents, so a full Redis does not make every
            // dispatcher look dead to the reapers.
            Err(err) if anteroom_redis::is_out_of_memory(&err) => {
                let kept: i64 = redis::cmd("PEXPIRE")
                    .arg(&self.key)
                    .arg(millis(self.ttl))
                    .query_async(conn)
                    .await?;
                if kept == 1 {
                    tracing::debug!(id = %self.id, "Redis is full: heartbeat kept alive with PEXPIRE");
                    self.mark_written(sent);
                    Ok(())
                } else {
                    Err(err)
                }
            }
            Err(err) => Err(err),
        }
    }

    /// Removes the heartbeat and the registry entry (on a clean stop). A
    /// dispatcher whose processing list still holds requests (its grace
    /// period ran out with requests running) keeps its registry entry, in
    /// one Lua script: with its heartbeat gone, a reaper claims the list
    /// (docs/protocol.md, step 8) instead of leaving it orphaned.
    pub async fn leave(&self, conn: &mut SharedConnection) -> redis::RedisResult<()> {
        if let Some(held) = &self.held {
            let left: i64 = redis::cmd("EVAL")
                .arg(LEAVE)
                .arg(3)
                .arg(&self.key)
                .arg(&self.registry)
                .arg(held)
                .arg(&self.id)
                .query_async(conn)
                .await?;
            if left == 0 {
                tracing::warn!(
                    id = %self.id,
                    "stopped with requests still in the processing list; the reaper takes them"
                );
            }
            return Ok(());
        }
        redis::pipe()
            .cmd("DEL")
            .arg(&self.key)
            .ignore()
            .cmd("ZREM")
            .arg(&self.registry)
            .arg(&self.id)
            .ignore()
            .query_async(conn)
            .await
    }
}

/// Keeps `presence` alive until `stop`: writes `beat()` every `every` (and at once when `wake` is
/// notified, so a change such as an acknowledged pause shows without
/// delay), and on stop removes the heartbeat and the registry entry. The
/// one heartbeat loop of the proxy, the dispatcher and `anteroom reap`. A
/// failed write is logged and tried again at the next beat: the heartbeat's
/// TTL, a multiple of `every`, absorbs a missed one.
pub async fn keep_present<H: Serialize>(
    presence: &Presence,
    mut conn: SharedConnection,
    every: Duration,
    wake: &Notify,
    stop: &CancellationToken,
    mut beat: impl FnMut() -> H,
) {
    loop {
        if let Err(err) = presence.beat(&mut conn, &beat()).await {
            tracing::debug!(error = %err, id = %presence.id, "heartbeat failed");
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = wake.notified() => {}
            () = stop.cancelled() => break,
        }
    }
    if let Err(err) = presence.leave(&mut conn).await {
        tracing::debug!(error = %err, id = %presence.id, "cannot remove the heartbeat");
    }
}

/// Which of the heartbeat keys `keys` (`anteroom:{q}:proxy:<id>` or
/// `anteroom:{q}:dispatcher:<id>`) exist now: one `EXISTS` each (the keys
/// may be of different queues, so of different Cluster slots), in order.
/// A key whose TTL ran out is a component that stopped beating: it died,
/// or lost Redis for longer than its TTL.
pub async fn present(
    conn: &mut SharedConnection,
    keys: &[String],
) -> redis::RedisResult<Vec<bool>> {
    let mut found = Vec::with_capacity(keys.len());
    for key in keys {
        let exists: bool = redis::cmd("EXISTS").arg(key).query_async(conn).await?;
        found.push(exists);
    }
    Ok(found)
}
