//! Group commit of enqueues: envelopes that arrive while one LPUSH is on the
//! wire go together in the next, as one LPUSH with many values
//! (`anteroom_control::queue::enqueue`).
//!
//! Under load this turns one Redis command per request into one per batch;
//! with a single request in flight it costs one extra task hop. The order of
//! arrival is kept (LPUSH `a b c` leaves `a` oldest, taken first). Whether a
//! failed push may be repeated stays the request's decision
//! (`handler::enqueue`), so the batcher reports each outcome to every
//! request in the batch and never retries by itself.

use std::sync::Arc;

use bytes::Bytes;
use redis::RedisError;
use tokio::sync::{mpsc, oneshot};

use anteroom_control::queue;
use anteroom_redis::{Durability, SharedConnection};
use anteroom_runtime::Components;
use tokio_util::sync::CancellationToken;

/// Most envelopes in one LPUSH.
const MAX_BATCH: usize = 256;
/// A batch stops growing once it holds this many bytes (it always takes one).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Why a push did not happen, and whether Redis may have received it.
#[derive(Debug)]
pub(crate) struct PushError {
    pub(crate) error: RedisError,
    /// True when the push surely did not land (no connection could be
    /// made, or the server answered it with an error): always safe to try
    /// again, and never waited for.
    pub(crate) never_sent: bool,
    /// True when the enqueuer has stopped (the proxy is stopping): trying
    /// again cannot help, and nothing was sent.
    pub(crate) stopped: bool,
}

struct Pending {
    payload: Bytes,
    done: oneshot::Sender<Result<(), PushError>>,
}

/// The handle requests push through; the batcher stops when it is dropped.
#[derive(Debug)]
pub(crate) struct Enqueuer {
    /// Unbounded as a channel, bounded by the proxy's waiting budget: a
    /// request reserves its share before it pushes, so no more than
    /// `max_waiting` envelopes are ever in here. (A bounded channel's send
    /// is a future of its own, kept by every request while it waits.)
    tx: mpsc::UnboundedSender<Pending>,
}

impl Enqueuer {
    /// Starts the batcher for `requests_key` on `conn`, as a component of
    /// `components` ("enqueuer") that runs until they stop.
    pub(crate) fn spawn(
        conn: SharedConnection,
        requests_key: String,
        durability: Option<Arc<Durability>>,
        components: &Components,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = components.stopping();
        components.spawn("enqueuer", run(conn, requests_key, durability, rx, stop));
        Self { tx }
    }

    /// LPUSHes `payload` (in the next batch), then `WAIT`s for a replica
    /// when durable.
    pub(crate) async fn push(&self, payload: Bytes) -> Result<(), PushError> {
        let (done, outcome) = oneshot::channel();
        let stopped = || PushError {
            error: RedisError::from((redis::ErrorKind::Io, "the proxy's enqueuer stopped")),
            never_sent: true,
            stopped: true,
        };
        self.tx
            .send(Pending { payload, done })
            .map_err(|_| stopped())?;
        outcome.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn run(
    mut conn: SharedConnection,
    key: String,
    durability: Option<Arc<Durability>>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    stop: CancellationToken,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    loop {
        // Requests still arriving when the proxy stops get "the enqueuer
        // stopped" (their `done` is dropped), never a silent wait.
        let first = tokio::select! {
            first = rx.recv() => match first {
                Some(first) => first,
                None => return,
            },
            () = stop.cancelled() => return,
        };
        let mut bytes = first.payload.len();
        batch.push(first);
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.payload.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let outcome = push_batch(&mut conn, &key, durability.as_deref(), &batch).await;
        for pending in batch.drain(..) {
            let result = match &outcome {
                Ok(()) => Ok(()),
                Err(err) => Err(PushError {
                    error: err.error.clone(),
                    never_sent: err.never_sent,
                    stopped: false,
                }),
            };
            // The request may have given up meanwhile; nothing to tell it.
            let _ = pending.done.send(result);
        }
    }
}

async fn push_batch(
    conn: &mut SharedConnection,
    key: &str,
    durability: Option<&Durability>,
    batch: &[Pending],
) -> Result<(), PushError> {
    conn.ensure_connected().await.map_err(|error| PushError {
        error,
        never_sent: true,
        stopped: false,
    })?;
    let payloads: Vec<&[u8]> = batch.iter().map(|p| p.payload.as_ref()).collect();
    let Err(error) = queue::enqueue(conn, key, &payloads, durability).await else {
        return Ok(());
    };
    let mut never_sent = never_applied(&error, durability.is_some());
    if !never_sent && error.is_io_error() && !error.is_timeout() {
        // The connection broke under the push. If the server now refuses
        // a new one at once, it went away (killed, restarted): what it
        // had not answered died with it (unless it kept an AOF and comes
        // back with the push: docs/reliability.md). If it takes the new
        // connection, it is alive and may have applied the push.
        never_sent = conn
            .ensure_connected()
            .await
            .is_err_and(|err| err.is_connection_refusal());
    }
    Err(PushError {
        never_sent,
        error,
        stopped: false,
    })
}

/// Whether a failed push surely did not land: the server answered the
/// `LPUSH` with an error (`READONLY`, `LOADING`, `NOPERM`, `WRONGTYPE`,
/// `MOVED`, `CLUSTERDOWN`: an `LPUSH` is applied whole or not at all), or
/// no connection could be made. Not so when a `WAIT` followed it in the
/// same pipeline (the error may be the `WAIT`'s, the push applied), nor
/// after a lost reply or a timeout.
fn never_applied(error: &RedisError, waited: bool) -> bool {
    error.is_connection_refusal() || (error.code().is_some() && !waited)
}
