//! Redis's memory, as `INFO memory` reports it, and the watch that stops a
//! proxy from filling it.
//!
//! With `maxmemory` and the `noeviction` policy, a full Redis refuses
//! every command that may grow memory (`OOM`): pushes of new requests, but
//! also a dispatcher's pull (`LMOVE`) and its completion (`RPUSH` of the
//! reply), so requests already queued could neither run nor be answered
//! until memory frees. A proxy therefore stops queueing (503) at a high
//! watermark below `maxmemory`, leaving the rest to the dispatchers: what
//! is queued drains, and its memory with it. Any other policy evicts
//! Anteroom's own keys (docs/operations.md, "Redis settings").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anteroom_runtime::Components;

use crate::SharedConnection;

/// What `INFO memory` says about the server's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Bytes Redis counts against `maxmemory`: `used_memory` less
    /// `mem_not_counted_for_evict` (replica output buffers and the AOF
    /// buffer, which Redis leaves out of its own check).
    pub used: u64,
    /// `maxmemory`: the limit in bytes; 0 for none.
    pub max: u64,
    /// `maxmemory_policy`, e.g. `noeviction`, `allkeys-lru`.
    pub policy: String,
}

impl MemoryInfo {
    /// Reads the fields from the text of `INFO memory`; `None` when
    /// `used_memory` or `maxmemory` is missing.
    pub fn parse(info: &str) -> Option<Self> {
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let not_counted: u64 = field("mem_not_counted_for_evict")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let used: u64 = field("used_memory")?.parse().ok()?;
        Some(Self {
            used: used.saturating_sub(not_counted),
            max: field("maxmemory")?.parse().ok()?,
            policy: field("maxmemory_policy").unwrap_or("unknown").to_owned(),
        })
    }

    /// True when Redis may evict keys to make room: a `maxmemory` with any
    /// policy but `noeviction`. Evicting loses Anteroom's keys (requests,
    /// replies, heartbeats, claims).
    pub fn evicts(&self) -> bool {
        self.max > 0 && self.policy != "noeviction"
    }

    /// Used memory as a percentage of `maxmemory`; `None` without a limit.
    pub fn percent_used(&self) -> Option<f64> {
        #[allow(clippy::cast_precision_loss)] // a percentage
        let percent = (self.max > 0).then(|| self.used as f64 * 100.0 / self.max as f64);
        percent
    }
}

/// Sends `INFO memory` on `conn`. Errors are Redis's; a reply without the
/// fields is a type error.
pub async fn memory_info(
    conn: &mut impl redis::aio::ConnectionLike,
) -> redis::RedisResult<MemoryInfo> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    MemoryInfo::parse(&info).ok_or_else(|| {
        redis::RedisError::from((
            redis::ErrorKind::Client,
            "INFO memory lacks used_memory or maxmemory",
        ))
    })
}

/// Follows Redis's memory and says when a proxy should stop queueing: at
/// or above `watermark` percent of `maxmemory`. Without a `maxmemory`, or
/// while `INFO` cannot be read, it never says so (Redis's own `OOM` still
/// gets a 503).
#[derive(Debug)]
pub struct MemoryWatch {
    watermark: u8,
    /// True while the last reading was at or over the watermark, or Redis
    /// refused a write for want of memory since.
    over: AtomicBool,
}

impl MemoryWatch {
    /// How often `INFO memory` is read.
    pub const EVERY: Duration = Duration::from_millis(250);

    /// Starts reading the memory of the server `conn` talks to every
    /// [`EVERY`](Self::EVERY), in a component of `components` ("redis
    /// memory") until they stop. `watermark` is a percentage, 1 to 100.
    pub fn spawn(conn: SharedConnection, watermark: u8, components: &Components) -> Arc<Self> {
        let watch = Arc::new(Self {
            watermark,
            over: AtomicBool::new(false),
        });
        let this = Arc::clone(&watch);
        let stop = components.stopping();
        components.spawn("redis memory", async move {
            let mut conn = conn;
            let (mut warned, mut warned_unreadable) = (false, false);
            loop {
                match memory_info(&mut conn).await {
                    Ok(info) => {
                        if info.evicts() && !warned {
                            tracing::warn!(
                                policy = %info.policy,
                                "Redis evicts keys when full: waiting requests, replies and heartbeats can be lost; set maxmemory-policy noeviction"
                            );
                            warned = true;
                        }
                        this.observe(&info);
                    }
                    Err(err) => {
                        if warned_unreadable {
                            tracing::debug!(error = %err, "cannot read Redis's memory");
                        } else {
                            tracing::warn!(
                                error = %err,
                                "cannot read Redis's memory (INFO memory; an ACL user needs +info|memory): no high watermark, only Redis's own OOM gets 503"
                            );
                            warned_unreadable = true;
                        }
                        this.over.store(false, Ordering::Release);
                    }
                }
                if crate::sleep_or_stop(&stop, Self::EVERY).await {
                    return;
                }
            }
        });
        watch
    }

    fn observe(&self, info: &MemoryInfo) {
        let over = info
            .percent_used()
            .is_some_and(|p| p >= f64::from(self.watermark));
        if over != self.over.swap(over, Ordering::AcqRel) {
            if over {
                tracing::warn!(
                    used = info.used,
                    maxmemory = info.max,
                    watermark = self.watermark,
                    "Redis's memory is at the high watermark: new requests get 503 until it drains"
                );
            } else {
                tracing::info!(
                    used = info.used,
                    maxmemory = info.max,
                    "Redis's memory is below the high watermark again"
                );
            }
        }
    }

    /// Redis refused a write for want of memory (`OOM`): over, until the
    /// next reading says otherwise.
    pub fn refused(&self) {
        self.over.store(true, Ordering::Release);
    }

    /// True when the last reading was at or over the watermark, or Redis
    /// refused a write since.
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Memory\r\nused_memory:1049576\r\nused_memory_human:1.00M\r\nmaxmemory:2097152\r\nmaxmemory_human:2.00M\r\nmaxmemory_policy:allkeys-lru\r\nmem_not_counted_for_evict:1000\r\n";

    #[test]
    fn reads_info_memory() {
        let info = MemoryInfo::parse(INFO).unwrap();
        assert_eq!(info.used, 1_048_576);
        assert_eq!(info.max, 2_097_152);
        assert_eq!(info.policy, "allkeys-lru");
        assert!(info.evicts());
        assert_eq!(info.percent_used(), Some(50.0));
        let unlimited = MemoryInfo {
            max: 0,
            ..info.clone()
        };
        assert!(!unlimited.evicts(), "no maxmemory, nothing is evicted");
        assert_eq!(unlimited.percent_used(), None);
        assert!(MemoryInfo::parse("# Memory\r\nused_memory_human:1M\r\n").is_none());
    }

    #[test]
    fn over_the_watermark_and_back() {
        let watch = MemoryWatch {
            watermark: 90,
            over: AtomicBool::new(false),
        };
        let at = |used| MemoryInfo {
            used,
            max: 1000,
            policy: "noeviction".into(),
        };
        watch.observe(&at(899));
        assert!(!watch.over());
        watch.observe(&at(900));
        assert!(watch.over());
        watch.observe(&at(10));
        assert!(!watch.over());
        watch.refused();
        assert!(watch.over(), "an OOM counts until the next reading");
        watch.observe(&at(10));
        assert!(!watch.over());
    }
}
