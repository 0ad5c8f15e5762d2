//! What a queue looks like right now, and whether it is quiet.

use std::time::{Duration, Instant};

use anteroom_protocol::{
    DispatcherHeartbeat, MaintenanceRecord, PauseRecord, ProxyHeartbeat, QUEUES_KEY,
    RequestEnvelope, now_ms,
};
use anteroom_redis::SharedConnection;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{ControlError, Queue};

/// The JSON document of `anteroom status --json` and the admin `GET /status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// One entry per queue, by name.
    pub queues: Vec<QueueStatus>,
    /// The Redis server's memory (`INFO memory`), when it could be read
    /// (not on Redis Cluster, whose nodes each have their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
}

/// The Redis server's memory, and whether its policy can lose Anteroom's
/// keys (docs/operations.md, "Redis settings").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// The bytes Redis counts against its limit: `used_memory` less
    /// `mem_not_counted_for_evict`.
    pub used_bytes: u64,
    /// `maxmemory`, bytes; 0 for no limit.
    pub maxmemory_bytes: u64,
    /// `maxmemory-policy`.
    pub policy: String,
    /// True when Redis may evict keys (a `maxmemory` and a policy other
    /// than `noeviction`): waiting requests, replies, heartbeats and
    /// claims can then vanish.
    pub evicts: bool,
}

impl From<anteroom_redis::MemoryInfo> for MemoryStatus {
    fn from(info: anteroom_redis::MemoryInfo) -> Self {
        Self {
            evicts: info.evicts(),
            used_bytes: info.used,
            maxmemory_bytes: info.max,
            policy: info.policy,
        }
    }
}

/// Everything `anteroom status` reports about one queue. Serialized as the
/// JSON documented in docs/operations.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// The queue name.
    pub queue: String,
    /// When this was read, Unix milliseconds.
    pub checked_at_ms: u64,
    /// The pause, when the queue is paused.
    pub pause: Option<PauseStatus>,
    /// Maintenance mode, when it is on: proxies answer new requests 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceRecord>,
    /// Requests waiting to be taken, `expired` ones included.
    pub waiting: u64,
    /// Of those, the ones past their deadline: their clients already got
    /// 504, and no dispatcher will run them (counted from the oldest end,
    /// at most [`EXPIRED_SCAN`]; see `expired_capped`).
    #[serde(default)]
    pub expired: u64,
    /// True when the count stopped at [`EXPIRED_SCAN`]: at least that many.
    #[serde(default)]
    pub expired_capped: bool,
    /// How long the oldest waiting request has waited, in milliseconds.
    pub oldest_wait_ms: Option<u64>,
    /// Envelopes in the dead-letter list.
    pub dead_letters: u64,
    /// Live dispatchers, by id.
    pub dispatchers: Vec<DispatcherStatus>,
    /// Dispatchers whose heartbeat has expired while they still hold requests.
    pub orphaned: Vec<OrphanStatus>,
    /// Live proxies, by id.
    pub proxies: Vec<ProxyStatus>,
}

/// A pause in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseStatus {
    /// The pause record.
    #[serde(flatten)]
    pub record: PauseRecord,
    /// Milliseconds until the pause lapses; `None` for a pause without expiry.
    pub expires_in_ms: Option<u64>,
}

/// One live dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatcherStatus {
    /// What its heartbeat says.
    #[serde(flatten)]
    pub heartbeat: DispatcherHeartbeat,
    /// Requests in its processing list, read from Redis.
    pub held: u64,
    /// Its last heartbeat, Unix milliseconds.
    pub last_seen_ms: u64,
}

/// A dispatcher that stopped heartbeating with requests still in its list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrphanStatus {
    /// Its id.
    pub id: String,
    /// Requests left in its processing list.
    pub held: u64,
    /// Its last heartbeat, Unix milliseconds.
    pub last_seen_ms: u64,
}

/// One live proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// What its heartbeat says.
    #[serde(flatten)]
    pub heartbeat: ProxyHeartbeat,
    /// Its last heartbeat, Unix milliseconds.
    pub last_seen_ms: u64,
}

/// Whether a paused queue has gone quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quiescence {
    /// True when paused and no live dispatcher is pulling or holding work.
    pub quiescent: bool,
    /// The status it was judged on.
    pub status: QueueStatus,
}

impl Quiescence {
    /// Live dispatchers that have not yet acknowledged the pause or still
    /// hold requests. Open WebSockets do not count: a pause holds new
    /// handshakes only, and their sockets may stay open for hours (their
    /// handshakes stay in the processing list, `held`, while they do).
    pub fn busy(&self) -> Vec<&DispatcherStatus> {
        let pause_id = self.status.pause.as_ref().map(|p| &p.record.id);
        self.status
            .dispatchers
            .iter()
            .filter(|d| {
                d.held > d.heartbeat.websockets || d.heartbeat.pause_id.as_ref() != pause_id
            })
            .collect()
    }
}

/// Queue names that proxies and dispatchers have registered.
pub async fn known_queues(conn: &mut SharedConnection) -> Result<Vec<String>, ControlError> {
    let mut queues: Vec<String> = redis::cmd("SMEMBERS")
        .arg(QUEUES_KEY)
        .query_async(conn)
        .await?;
    queues.sort();
    Ok(queues)
}

/// Most waiting requests [`Queue::status`] looks at to count the expired.
pub const EXPIRED_SCAN: u64 = 10_000;

/// Counts the expired requests at the oldest end of a requests list, in
/// chunks of 100 from the right (where the oldest wait), reading only each
/// envelope's metadata (`[version][kind][u32 BE meta_len][meta JSON]`,
/// docs/protocol.md: `deadline_ms` by name in version 1, the ninth element
/// of version 2's array); stops at the first live or unreadable one, or
/// after ARGV[2]. Returns `{expired, capped}`.
const COUNT_EXPIRED: &str = r"
local now = tonumber(ARGV[1])
local most = tonumber(ARGV[2])
local expired, scanned = 0, 0
while scanned < most do
  local items = redis.call('LRANGE', KEYS[1], -(scanned + 100), -(scanned + 1))
  if #items == 0 then return {expired, 0} end
  for i = #items, 1, -1 do
    local item = items[i]
    local ok, deadline = pcall(function()
      local len = struct.unpack('>I4', item, 3)
      local meta = cjson.decode(string.sub(item, 7, 6 + len))
      if string.byte(item, 1) == 2 then return meta[9] end
      return meta['deadline_ms']
    end)
    if not ok or type(deadline) ~= 'number' or deadline > now then
      return {expired, 0}
    end
    expired = expired + 1
    scanned = scanned + 1
  end
  if #items < 100 then return {expired, 0} end
end
return {expired, 1}";

/// The first round trip of [`Queue::status`]: pause (value, PTTL),
/// maintenance, waiting count, oldest envelope, dead letters, dispatcher
/// and proxy registries.
type Overview = (
    Option<String>,
    i64,
    Option<Vec<u8>>,
    u64,
    Option<Bytes>,
    u64,
    Vec<(String, u64)>,
    Vec<(String, u64)>,
);

fn parse_heartbeat<T: for<'de> Deserialize<'de>>(raw: Option<String>) -> Option<T> {
    raw.and_then(|raw| serde_json::from_str(&raw).ok())
}

impl Queue {
    /// Reads the queue's whole state. Registry entries of components that
    /// are gone and hold nothing are pruned on the way.
    pub async fn status(&self) -> Result<QueueStatus, ControlError> {
        let keys = &self.keys;
        let mut conn = self.conn();
        let (
            pause_raw,
            pttl,
            maintenance,
            waiting,
            oldest,
            dead_letters,
            dispatcher_ids,
            proxy_ids,
        ): Overview = redis::pipe()
            .cmd("GET")
            .arg(keys.paused())
            .cmd("PTTL")
            .arg(keys.paused())
            .cmd("GET")
            .arg(keys.maintenance())
            .cmd("LLEN")
            .arg(keys.requests())
            .cmd("LINDEX")
            .arg(keys.requests())
            .arg(-1)
            .cmd("LLEN")
            .arg(keys.dead())
            .cmd("ZRANGE")
            .arg(keys.dispatchers())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(keys.proxies())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        let now = now_ms();

        let mut pipe = redis::pipe();
        for (id, _) in &dispatcher_ids {
            pipe.cmd("GET").arg(keys.dispatcher(id));
            pipe.cmd("LLEN").arg(keys.processing(id));
        }
        for (id, _) in &proxy_ids {
            pipe.cmd("GET").arg(keys.proxy(id));
        }
        let values: Vec<redis::Value> = if dispatcher_ids.is_empty() && proxy_ids.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await?
        };
        let mut values = values.into_iter();

        let mut dispatchers = Vec::new();
        let mut orphaned = Vec::new();
        let mut gone = Vec::new();
        for (id, last_seen_ms) in dispatcher_ids {
            let raw: Option<String> = values
                .next()
                .and_then(|v| redis::from_redis_value(v).ok())
                .flatten();
            let held: u64 = values
                .next()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or(0);
            match parse_heartbeat::<DispatcherHeartbeat>(raw) {
                Some(heartbeat) => dispatchers.push(DispatcherStatus {
                    heartbeat,
                    held,
                    last_seen_ms,
                }),
                None if held > 0 => orphaned.push(OrphanStatus {
                    id,
                    held,
                    last_seen_ms,
                }),
                None => gone.push(id),
            }
        }
        let mut proxies = Vec::new();
        let mut gone_proxies = Vec::new();
        for (id, last_seen_ms) in proxy_ids {
            let raw: Option<String> = values
                .next()
                .and_then(|v| redis::from_redis_value(v).ok())
                .flatten();
            match parse_heartbeat::<ProxyHeartbeat>(raw) {
                Some(heartbeat) => proxies.push(ProxyStatus {
                    heartbeat,
                    last_seen_ms,
                }),
                None => gone_proxies.push(id),
            }
        }
        self.prune(&mut conn, &gone, &gone_proxies).await;

        let oldest_wait_ms = oldest
            .and_then(|raw| RequestEnvelope::decode(raw).ok())
            .map(|env| now.saturating_sub(env.enqueued_at_ms));
        let (expired, capped): (u64, u64) = if waiting == 0 {
            (0, 0)
        } else {
            redis::cmd("EVAL")
                .arg(COUNT_EXPIRED)
                .arg(1)
                .arg(keys.requests())
                .arg(now)
                .arg(EXPIRED_SCAN)
                .query_async(&mut conn)
                .await?
        };
        Ok(QueueStatus {
            queue: keys.queue().to_owned(),
            checked_at_ms: now,
            pause: pause_raw.map(|raw| PauseStatus {
                record: crate::pause::parse_record(&raw),
                expires_in_ms: u64::try_from(pttl).ok(),
            }),
            maintenance: maintenance
                .map(|raw| MaintenanceRecord::parse(&String::from_utf8_lossy(&raw))),
            waiting,
            expired,
            expired_capped: capped == 1,
            oldest_wait_ms,
            dead_letters,
            dispatchers,
            orphaned,
            proxies,
        })
    }

    /// Drops registry entries of components that left without a trace.
    async fn prune(&self, conn: &mut SharedConnection, dispatchers: &[String], proxies: &[String]) {
        if dispatchers.is_empty() && proxies.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for id in dispatchers {
            pipe.cmd("ZREM")
                .arg(self.keys.dispatchers())
                .arg(id)
                .ignore();
        }
        for id in proxies {
            pipe.cmd("ZREM").arg(self.keys.proxies()).arg(id).ignore();
        }
        if let Err(err) = pipe.query_async::<()>(conn).await {
            tracing::debug!(error = %err, "pruning the registry failed");
        }
    }

    /// Judges whether the queue is paused and quiet now.
    pub async fn quiescence(&self) -> Result<Quiescence, ControlError> {
        let status = self.status().await?;
        let mut q = Quiescence {
            quiescent: false,
            status,
        };
        q.quiescent = q.status.pause.is_some() && q.busy().is_empty();
        Ok(q)
    }

    /// Waits until [`quiescence`](Self::quiescence) says quiet, checking
    /// every 50 ms and calling `progress` after each check. Fails with
    /// [`ControlError::NotQuiescent`] after `timeout`.
    pub async fn wait_quiescent(
        &self,
        timeout: Duration,
        mut progress: impl FnMut(&Quiescence),
    ) -> Result<Quiescence, ControlError> {
        let start = Instant::now();
        loop {
            let q = self.quiescence().await?;
            progress(&q);
            if q.quiescent {
                return Ok(q);
            }
            if start.elapsed() >= timeout {
                return Err(ControlError::NotQuiescent {
                    queue: self.name().to_owned(),
                    timeout,
                    busy: q.busy().len(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
