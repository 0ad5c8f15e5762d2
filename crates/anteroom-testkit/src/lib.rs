//! Test support for Anteroom's tests and benchmark: real Redis servers on
//! loopback, each stopped when dropped, and the waits tests need.
//!
//! - [`LocalRedis`] (from `anteroom_redis::local`, which the demo also
//!   uses): one private redis-server; [`start_redis`] starts one or panics.
//! - [`cluster::LocalCluster`]: six nodes made into a Redis Cluster.
//! - [`sentinel::LocalSentinel`]: a primary, a replica and three sentinels.
//! - [`relay::Relay`]: a TCP relay to Redis that injects network faults
//!   (latency, slow segments, partitions, lost replies).
//! - [`redis_conn`], [`llen`], [`until_llen`], [`keys`]: inspecting queue
//!   state from a connection named [`HARNESS_CLIENT`].
//! - [`eventually`], [`wait_for_port`]: bounded waits on a condition.
//!
//! Everything here panics on failure: it is for tests, never for the product.

pub mod cluster;
pub mod relay;
pub mod sentinel;

use std::future::Future;
use std::time::{Duration, Instant};

pub use anteroom_redis::local::{LocalRedis, StartError, free_port};

/// A private redis-server for one test.
pub fn start_redis() -> LocalRedis {
    LocalRedis::start().expect("start redis-server (is it installed?)")
}

/// Client name of the harness's own connections, so tests can tell them
/// apart from the connections of the components under test.
pub const HARNESS_CLIENT: &str = "anteroom-test-harness";

/// A plain connection for inspecting queue state, named [`HARNESS_CLIENT`].
pub async fn redis_conn(redis: &LocalRedis) -> redis::aio::MultiplexedConnection {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(HARNESS_CLIENT)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    conn
}

/// `LLEN key`.
pub async fn llen(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> usize {
    redis::cmd("LLEN").arg(key).query_async(conn).await.unwrap()
}

/// Waits (at most 20 s) until the list `key` holds `n` items.
pub async fn until_llen(conn: &redis::aio::MultiplexedConnection, key: &str, n: usize) {
    eventually(
        &format!("{n} items in {key}"),
        Duration::from_secs(20),
        || {
            let mut conn = conn.clone();
            async move { llen(&mut conn, key).await == n }
        },
    )
    .await;
}

/// Keys matching `pattern` (KEYS is fine on a private server).
pub async fn keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .unwrap()
}

/// Polls `check` every 10 ms until it is true; panics after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (at most 20 s) until something accepts TCP connections on
/// 127.0.0.1:`port`.
pub async fn wait_for_port(port: u16) {
    eventually(
        "the port to accept connections",
        Duration::from_secs(20),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
}
