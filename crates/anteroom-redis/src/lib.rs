//! Redis connection handling shared by every Anteroom component.
//!
//! Two kinds of connection, and the rule that separates them:
//!
//! - [`shared`]: one pipelined connection per component for ordinary
//!   commands ([`SharedConnection`]). Concurrent callers share it (redis-rs
//!   multiplexes), it has a response timeout, and it reconnects by itself
//!   after an error.
//! - [`blocking`]: a dedicated connection for one blocking command at a time
//!   (`BLMOVE`, `BLMPOP`). A blocking command stalls everything behind it on
//!   its connection, so it never shares; and its response timeout must outlast
//!   the block time, or redis-rs's default 500 ms would cut every idle wait
//!   short.
//!
//! Every connection is made to a [`Target`]: one server by URL, or the
//! primary that Redis Sentinel names (`redis+sentinel://`), asked again on
//! every reconnect so that a failover is followed.
//!
//! `rediss://` URLs use TLS (rustls with the ring provider), verifying the
//! server against the system's roots, or those in `SSL_CERT_FILE` /
//! `SSL_CERT_DIR`; `rediss://...#insecure` skips verification.
//!
//! [`local::LocalRedis`] starts a private redis-server (the demo's, and
//! the tests' through `anteroom-testkit`).
//!
//! [`MemoryWatch`] follows Redis's memory, so a proxy stops queueing before
//! Redis refuses writes.
//!
//! [`Backoff`] paces reconnect attempts; [`sleep_or_stop`] waits in a way a
//! shutdown can interrupt.

mod durable;
pub mod local;
mod memory;
mod shared;
mod target;

pub use durable::Durability;
pub use memory::{MemoryInfo, MemoryWatch, memory_info};
pub use shared::{SharedConnection, is_out_of_memory, needs_reconnect};
pub use target::{Target, TargetError, key_slot};

use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

// rustls is a dependency only to choose its crypto provider (ring) for the
// TLS connections redis-rs makes.
use rustls as _;

/// Why a component could not reach Redis at startup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL cannot be used.
    #[error(transparent)]
    Url(#[from] TargetError),
    /// The server did not answer.
    #[error("cannot connect to redis")]
    Connect(#[source] redis::RedisError),
}

/// Parses `url` and opens the shared connection to it.
pub async fn connect(
    url: &str,
    timeout: Duration,
) -> Result<(Target, SharedConnection), ConnectError> {
    let target = Target::parse(url)?;
    let conn = shared(&target, timeout)
        .await
        .map_err(ConnectError::Connect)?;
    Ok((target, conn))
}

/// Opens the shared, self-healing connection to `target`; `timeout` bounds
/// connecting and each command. A first command checks that the server
/// takes commands from this client: a server with `requirepass` accepts
/// the connection of a client without a password, then answers every
/// command `NOAUTH`, which would otherwise surface later, once per
/// command. That command is a [`read_clock`] (`TIME`), so the queue's
/// clock is set before the component reads or writes a deadline; an ACL
/// user needs `+time`.
pub async fn shared(target: &Target, timeout: Duration) -> redis::RedisResult<SharedConnection> {
    let mut conn = SharedConnection::connect(target, timeout).await?;
    read_clock(&mut conn).await?;
    let skew = anteroom_protocol::clock::skew_ms();
    if skew.abs() >= 1_000 {
        tracing::warn!(
            skew_ms = skew,
            "this host's clock differs from Redis's; deadlines follow Redis's clock"
        );
    }
    Ok(conn)
}

/// Reads the server's clock with `TIME` and corrects the queue's clock
/// with it ([`anteroom_protocol::clock`]; docs/protocol.md, "Time"). Errors
/// are Redis's (a reply that is not two integers is a type error).
pub async fn read_clock(conn: &mut impl redis::aio::ConnectionLike) -> redis::RedisResult<()> {
    let sent = std::time::Instant::now();
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    observe_time(seconds, micros, sent);
    Ok(())
}

/// Hands one `TIME` reply (`seconds`, `micros`), to a command sent at
/// `sent` and answered now, to the queue's clock; for callers that send
/// `TIME` in a pipeline of their own.
pub fn observe_time(seconds: u64, micros: u64, sent: std::time::Instant) {
    let server_us = seconds.saturating_mul(1_000_000).saturating_add(micros);
    anteroom_protocol::clock::observe(server_us, sent, std::time::Instant::now());
}

/// Opens a connection for blocking commands that block at most `block`,
/// to the server `target` names now (for a cluster: its first seed node;
/// use [`blocking_for`] for commands on a key).
pub async fn blocking(
    target: &Target,
    connect_timeout: Duration,
    block: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    blocking_on(target, None, connect_timeout, block).await
}

/// Like [`blocking`], to the server that holds `key` (for a cluster, the
/// primary owning its hash slot now; after a failover or a slot move the
/// next blocking command fails and the caller connects again).
pub async fn blocking_for(
    target: &Target,
    key: &str,
    connect_timeout: Duration,
    block: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    blocking_on(target, Some(key), connect_timeout, block).await
}

async fn blocking_on(
    target: &Target,
    key: Option<&str>,
    connect_timeout: Duration,
    block: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(block + connect_timeout + Duration::from_secs(1)));
    let attempt = async {
        let client = match key {
            Some(key) => {
                target
                    .client_for_key(key.as_bytes(), connect_timeout)
                    .await?
            }
            None => target.client().await?,
        };
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    };
    tokio::time::timeout(connect_timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "connecting to redis timed out",
            )))
        })
}

/// Exponential backoff between reconnect attempts: 50 ms doubling to 1 s
/// (capped low so service resumes within about a second of Redis returning).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(1);

    /// A backoff at its first, shortest delay.
    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The delay to wait now; the next one is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Sleeps for `duration`; returns true when `stop` was cancelled first.
pub async fn sleep_or_stop(stop: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = stop.cancelled() => true,
    }
}

/// This machine's host name, for heartbeats.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::new();
        let delays: Vec<_> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(50));
    }
}

/// `url` with its credentials (user and password) replaced by `***`, for
/// logs and messages: `redis://:secret@host:6379` becomes
/// `redis://***@host:6379`. A URL without them is returned as is.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            // The authority ends at the first `/`, `?` or `#`.
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}{}", &rest[end..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn credentials_are_hidden() {
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(
            redact_url("http://user:pw@app:3000/x?a=b@c"),
            "http://***@app:3000/x?a=b@c"
        );
        assert_eq!(redact_url("http://app:3000/x@y"), "http://app:3000/x@y");
        assert_eq!(redact_url("redis://10.0.0.5"), "redis://10.0.0.5");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
