//! A queue in Redis: the wire operations that move its requests
//! ([`queue`]), and its state beyond the requests themselves: whether it
//! is paused, who is serving it, and whether it is quiet.
//!
//! - [`queue`] owns every command that moves a request (enqueue, pull,
//!   complete, requeue, dead-letter, reap, `WAIT`) and the heartbeats
//!   ([`queue::Presence`]); the proxy, the dispatcher and the CLI call it.
//! - [`Queue::pause`] / [`Queue::resume`] set or clear `anteroom:{q}:paused`
//!   and announce the change on the `anteroom:{q}:control` channel. A pause
//!   may carry a TTL: a lease that a holder such as `anteroom window` keeps
//!   renewing, so a holder that dies cannot leave the queue paused forever.
//! - [`watch_pause`] is the dispatcher's side: a task that follows the pause
//!   flag through pub/sub, re-reading the key on every message and polling it
//!   as a fallback, so a missed message cannot leave a dispatcher running.
//! - [`Queue::maintenance_on`] / [`Queue::maintenance_off`] set or clear
//!   `anteroom:{q}:maintenance`; [`watch_maintenance`] is the proxy's side,
//!   followed the way dispatchers follow the pause flag.
//! - [`Queue::dead_letters`], [`Queue::replay_dead`] and
//!   [`Queue::remove_dead`] read and act on the dead-letter list
//!   (`anteroom dead`).
//! - [`Queue::reap`] settles the requests of dispatchers that died holding
//!   them: safe ones back to the front of the queue, others answered 502.
//! - [`Queue::status`] reads everything at once; [`Queue::wait_quiescent`]
//!   waits until every live dispatcher has acknowledged a pause and holds
//!   nothing.

mod dead;
mod error;
mod maintenance;
mod pause;
pub mod queue;
mod status;

pub use dead::{ANSWERED_REASON, Client, DEAD_READ_LIMIT, LetterView, replayable};
pub use error::ControlError;
pub use maintenance::{MaintenanceWatch, watch_maintenance};
pub use pause::{HeldPause, PauseWatch, watch_pause};
pub use queue::ReapReport;
pub use status::{
    DispatcherStatus, EXPIRED_SCAN, MemoryStatus, OrphanStatus, PauseStatus, ProxyStatus,
    QueueStatus, Quiescence, StatusReport, known_queues,
};

use std::time::Duration;

use anteroom_protocol::Keys;
use anteroom_redis::SharedConnection;

/// One queue's control operations over a shared Redis connection.
#[derive(Clone)]
pub struct Queue {
    keys: Keys,
    conn: SharedConnection,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("queue", &self.keys.queue())
            .finish()
    }
}

impl Queue {
    /// Connects to Redis at `redis_url` for operations on `queue`.
    pub async fn connect(
        redis_url: &str,
        queue: &str,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let keys = Keys::new(queue)?;
        let (_, conn) = anteroom_redis::connect(redis_url, timeout).await?;
        Ok(Self { keys, conn })
    }

    /// Operations on `keys`' queue over an existing connection.
    pub fn with_connection(keys: Keys, conn: SharedConnection) -> Self {
        Self { keys, conn }
    }

    /// The queue's key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The queue name.
    pub fn name(&self) -> &str {
        self.keys.queue()
    }

    /// The shared connection these operations use, for commands of your own.
    pub fn connection(&self) -> SharedConnection {
        self.conn.clone()
    }

    pub(crate) fn conn(&self) -> SharedConnection {
        self.conn.clone()
    }
}
