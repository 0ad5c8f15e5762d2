//! The demultiplexer: one reader pops this proxy's reply list and wakes the
//! request waiting for each reply's id.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anteroom_control::queue;
use anteroom_protocol::ResponseEnvelope;
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use anteroom_redis::{Backoff, sleep_or_stop};

/// How long one BLMPOP blocks before the reader loops (and checks for stop).
const BLOCK: Duration = Duration::from_secs(1);
/// Replies taken per round trip.
const BATCH: usize = 256;

/// Keyed by the id's 128 bits rather than its text: a waiting request then
/// costs the map no allocation of its own.
type Waiters = HashMap<u128, oneshot::Sender<ResponseEnvelope>>;

/// Requests waiting for replies, by envelope id.
#[derive(Debug, Default)]
pub(crate) struct Demux {
    waiters: Mutex<Waiters>,
}

/// A registered wait. Dropping it (the client went away, or the hold budget
/// passed) removes the entry, so a late reply is discarded.
pub(crate) struct Waiter {
    demux: Arc<Demux>,
    id: u128,
    rx: oneshot::Receiver<ResponseEnvelope>,
}

impl Waiter {
    /// The reply; `None` if the reader stopped.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<ResponseEnvelope>> {
        Pin::new(&mut self.rx).poll(cx).map(Result::ok)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.demux.lock().remove(&self.id);
    }
}

impl Demux {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers interest in the reply to `id`; call before enqueueing.
    pub(crate) fn register(self: &Arc<Self>, id: uuid::Uuid) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let id = id.as_u128();
        self.lock().insert(id, tx);
        Waiter {
            demux: Arc::clone(self),
            id,
            rx,
        }
    }

    fn deliver(&self, raw: Bytes) {
        let reply = match ResponseEnvelope::decode(raw) {
            Ok(reply) => reply,
            Err(err) => {
                tracing::warn!(error = %err, "discarding a reply that does not decode");
                return;
            }
        };
        // Ids this proxy gave out are UUIDs; anything else waits for nothing here.
        let waiter = uuid::Uuid::try_parse(&reply.id)
            .ok()
            .and_then(|id| self.lock().remove(&id.as_u128()));
        match waiter {
            Some(tx) => {
                // The receiver may have just given up; then the reply is late.
                if tx.send(reply).is_err() {
                    tracing::debug!("reply arrived as its request gave up");
                }
            }
            None => tracing::debug!(id = %reply.id, "late reply for a request no longer waiting"),
        }
    }
}

/// Reads one reply list until `stop` is cancelled, reconnecting with
/// backoff. A proxy runs one per queue it serves: on Redis Cluster the
/// queues' reply lists live on different nodes.
pub(crate) async fn run(
    demux: Arc<Demux>,
    target: anteroom_redis::Target,
    key: String,
    connect_timeout: Duration,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new();
    'connect: while !stop.is_cancelled() {
        let mut conn =
            match anteroom_redis::blocking_for(&target, &key, connect_timeout, BLOCK).await {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(error = %err, "reply reader cannot connect to redis; retrying");
                    if sleep_or_stop(&stop, backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            };
        backoff.reset();
        loop {
            let pop = queue::pop_replies(&mut conn, &key, BLOCK, BATCH);
            let result = tokio::select! {
                r = pop => r,
                () = stop.cancelled() => return,
            };
            match result {
                Ok(replies) => {
                    for raw in replies {
                        demux.deliver(raw);
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "reply reader lost redis; reconnecting");
                    if sleep_or_stop(&stop, backoff.next_delay()).await {
                        return;
                    }
                    continue 'connect;
                }
            }
        }
    }
}
