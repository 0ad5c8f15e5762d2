//! Control errors.

use std::time::Duration;

use anteroom_protocol::NameError;

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The queue name cannot be used in Redis keys.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Redis cannot be reached (or its URL is invalid).
    #[error(transparent)]
    Connect(#[from] anteroom_redis::ConnectError),
    /// A command failed.
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    /// The queue was already paused by someone else.
    #[error("queue {queue:?} is already paused (by {by:?}); resume it first")]
    AlreadyPaused {
        /// The queue.
        queue: String,
        /// Who holds the pause.
        by: String,
    },
    /// Dispatchers still held requests when the timeout passed.
    #[error(
        "queue {queue:?} did not become quiet within {timeout:?}: {busy} dispatcher(s) still busy"
    )]
    NotQuiescent {
        /// The queue.
        queue: String,
        /// How long was waited.
        timeout: Duration,
        /// Dispatchers still busy at the end.
        busy: usize,
    },
    /// A dead letter that holds no request a dispatcher of the queue
    /// would run.
    #[error("dead letter {id} cannot be replayed: {why}")]
    NotReplayable {
        /// The letter's id (`anteroom dead list`).
        id: String,
        /// Why not.
        why: String,
    },
}
