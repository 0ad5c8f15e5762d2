//! The shared, pipelined, self-healing connection.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};

use crate::Target;

/// After a failed connect, callers fail at once for this long instead of each
/// waiting out a connect timeout of its own.
const FAIL_FAST_FOR: Duration = Duration::from_millis(100);

/// One multiplexed connection shared by every task of a component.
///
/// Commands from concurrent callers are pipelined on it. When a command
/// fails because the connection broke (I/O error, dropped connection,
/// timeout) or because the server is no longer the primary (`READONLY`
/// after a failover), the connection is dropped and the next command makes
/// a new one, resolving the [`Target`] again (for Sentinel: asking which
/// server is the primary now). Commands are never retried here: whether a
/// retry is safe is the caller's decision.
#[derive(Clone)]
pub struct SharedConnection {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    timeout: Duration,
    state: Mutex<State>,
    connecting: tokio::sync::Mutex<()>,
}

enum State {
    Idle,
    Connected {
        generation: u64,
        conn: Conn,
    },
    Failed {
        at: Instant,
        error: String,
        generation: u64,
    },
}

impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConnection")
            .field("target", &self.inner.target)
            .finish()
    }
}

impl SharedConnection {
    /// Connects to `target`; `timeout` bounds connecting and every command.
    pub async fn connect(target: &Target, timeout: Duration) -> RedisResult<Self> {
        let shared = Self {
            inner: Arc::new(Inner {
                target: target.clone(),
                timeout,
                state: Mutex::new(State::Idle),
                connecting: tokio::sync::Mutex::new(()),
            }),
        };
        shared.ensure_connected().await?;
        Ok(shared)
    }

    /// Makes sure a connection is open, connecting if need be. An error here
    /// means no command could have been sent.
    pub async fn ensure_connected(&self) -> RedisResult<()> {
        self.current().await.map(|_| ())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The open connection, or a fresh one.
    async fn current(&self) -> RedisResult<(u64, Conn)> {
        if let Some(found) = self.usable()? {
            return Ok(found);
        }
        // One connect attempt at a time; later callers see its outcome.
        let _connecting = self.inner.connecting.lock().await;
        if let Some(found) = self.usable()? {
            return Ok(found);
        }
        let generation = match &*self.lock() {
            State::Connected { generation, .. } | State::Failed { generation, .. } => {
                generation + 1
            }
            State::Idle => 1,
        };
        let timeout = self.inner.timeout;
        let attempt = async {
            if let Some(cluster) = self.inner.target.cluster_client(timeout) {
                return cluster?.get_async_connection().await.map(Conn::Cluster);
            }
            let client = self.inner.target.client().await?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map(Conn::Single)
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from((
                ErrorKind::Io,
                "connecting to redis timed out",
            ))),
        };
        match result {
            Ok(conn) => {
                *self.lock() = State::Connected {
                    generation,
                    conn: conn.clone(),
                };
                Ok((generation, conn))
            }
            Err(err) => {
                *self.lock() = State::Failed {
                    at: Instant::now(),
                    error: err.to_string(),
                    generation,
                };
                Err(err)
            }
        }
    }

    /// The connection if open; an error if a connect failed a moment ago;
    /// `None` when a connect should be tried.
    fn usable(&self) -> RedisResult<Option<(u64, Conn)>> {
        match &*self.lock() {
            State::Connected { generation, conn } => Ok(Some((*generation, conn.clone()))),
            State::Failed { at, error, .. } if at.elapsed() < FAIL_FAST_FOR => Err(
                RedisError::from((ErrorKind::Io, "redis unreachable", error.clone())),
            ),
            _ => Ok(None),
        }
    }

    /// Drops connection `generation` after `err`, if `err` says it is broken.
    fn check(&self, generation: u64, err: &RedisError) {
        if !needs_reconnect(err) {
            return;
        }
        let mut state = self.lock();
        if matches!(&*state, State::Connected { generation: g, .. } if *g == generation) {
            tracing::debug!(error = %err, "redis connection dropped; the next command reconnects");
            *state = State::Idle;
        }
    }
}

/// One server's pipelined connection, or a cluster's.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn req_packed_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd).await,
            Conn::Cluster(conn) => conn.req_packed_command(cmd).await,
        }
    }

    async fn req_packed_commands(
        &mut self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count).await,
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count).await,
        }
    }
}

/// Whether Redis refused a command for want of memory (`OOM`: `maxmemory`
/// reached under the `noeviction` policy). The command did nothing, so it
/// is safe to send again once memory frees.
pub fn is_out_of_memory(err: &RedisError) -> bool {
    // Inside a MULTI, redis-rs reports it in the text of the abort.
    err.code() == Some("OOM") || {
        let text = err.to_string();
        text.contains("OOM") && text.contains("maxmemory")
    }
}

/// Errors after which the connection (or the server) cannot be trusted.
pub fn needs_reconnect(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        // Inside MULTI, READONLY surfaces as EXECABORT naming it.
        || err.to_string().contains("READONLY")
}

impl ConnectionLike for SharedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.current().await?;
            let result = conn.req_packed_command(cmd).await;
            if let Err(err) = &result {
                self.check(generation, err);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.current().await?;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(err) = &result {
                self.check(generation, err);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}
