//! A running dispatcher: the state its parts share, and [`run`], which
//! starts them as one set of components and stops them in order. The parts
//! are modules of their own: `pull` (taking requests), `handle` (one
//! request's life), `complete` (writing replies), `heartbeat` (presence and
//! the embedded reaper), `health` (the upstream gate).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anteroom_control::PauseWatch;
use anteroom_control::queue;
use anteroom_protocol::Keys;
use anteroom_redis::SharedConnection;
use anteroom_runtime::Components;
use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

use crate::Body;
use crate::body::UploadTable;
use crate::builder::{Dispatcher, Settings};
use crate::complete::{Completion, completer};
use crate::error::{BoxError, DispatcherError, Kind};
use crate::health::{self, Gate};
use crate::heartbeat::{heartbeat, reap};
use crate::pull::{nudge_pulls, pull_loop};
use crate::stream::{CreditTable, read_credits};

/// How long the streams still running when the grace period ends get to
/// send their end.
const STREAMS_END: Duration = Duration::from_secs(2);

/// How often the proxies at the other end of open WebSockets are checked
/// for a heartbeat (a socket whose proxy died closes within the proxy's
/// heartbeat TTL and this).
const PEER_CHECK: Duration = Duration::from_secs(2);

/// How long the background components (heartbeat, completer, reaper,
/// pause watcher) get to stop once the requests have finished.
const COMPONENTS_GRACE: Duration = Duration::from_secs(5);

/// The bounds [`Dispatcher::serve`] documents, named once for the internals.
pub(crate) trait HttpService<B>:
    Service<Request<Body>, Response = Response<B>, Error: Into<BoxError>, Future: Send + 'static>
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S
where
    S: Service<Request<Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
}

/// A response body the dispatcher can collect.
pub(crate) trait ResponseBody:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static
{
}

impl<B> ResponseBody for B
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
}

/// State every request task shares.
pub(crate) struct Shared {
    pub(crate) keys: Keys,
    pub(crate) id: String,
    pub(crate) requests_key: String,
    pub(crate) processing_key: String,
    pub(crate) conn: SharedConnection,
    pub(crate) settings: Settings,
    pub(crate) permits: Arc<Semaphore>,
    /// The queue's pause flag, as followed by [`anteroom_control::watch_pause`].
    pub(crate) pause: PauseWatch,
    /// The pause the pull loop has stopped for (no pull outstanding).
    pub(crate) acknowledged: Mutex<Option<String>>,
    /// Redis client id of the connection a pull may be blocked on (0: none).
    pub(crate) pull_client_id: AtomicU64,
    /// True while a pull is sent and not yet answered.
    pub(crate) pull_outstanding: AtomicBool,
    /// Wakes the heartbeat to report a change at once.
    pub(crate) beat_now: Notify,
    /// Requests being handled now.
    pub(crate) running: AtomicUsize,
    /// With `durable`: whether and how long to WAIT for a replica.
    pub(crate) durability: Option<Arc<anteroom_redis::Durability>>,
    /// Finished requests on their way to the completer.
    pub(crate) completions: mpsc::Sender<Completion>,
    pub(crate) metrics: anteroom_metrics::DispatcherQueueMetrics,
    /// Open while the upstream is healthy; the pull loop waits while closed.
    pub(crate) gate: Arc<Gate>,
    /// Streams waiting for the proxies' credits.
    pub(crate) credits: CreditTable,
    /// This dispatcher's credit list (`anteroom:{q}:credits:<id>`).
    pub(crate) credits_key: String,
    /// Cancelled when the grace period ends: streams still running end.
    pub(crate) streams_stop: CancellationToken,
    /// Streamed request bodies being received.
    pub(crate) uploads: Arc<UploadTable>,
    /// Credits for streamed request bodies, and WebSocket messages and
    /// credits, on their way to reply lists.
    pub(crate) upload_credits: queue::FrameSender,
    /// The open WebSockets, whose frames the credit reader routes.
    pub(crate) sockets: Arc<anteroom_socket::Sockets>,
    /// The envelopes in hand (taken, their handling not over): anything
    /// else in the processing list is an orphan ([`crate::reconcile`]). A
    /// list of at most the concurrency (and the open WebSockets), each
    /// entry sharing its buffer with its [`Held`] guard, so adding and
    /// removing hash nothing, and numbered in the order the pulls moved
    /// them into the processing list ([`Shared::nearer_tail`]).
    pub(crate) held: Mutex<Vec<InHand>>,
    /// The number the next envelope taken gets in [`Shared::held`].
    pub(crate) pulled: AtomicU64,
    /// Held by a reaping pass and by a reconciliation, so that neither
    /// sees the other's items half-settled.
    pub(crate) settling: tokio::sync::Mutex<()>,
    /// Set when the processing list may hold orphans (a pull failed: its
    /// reply may be what was lost); the pull loop settles them before its
    /// next pull ([`crate::reconcile`]).
    pub(crate) orphans_possible: AtomicBool,
    /// Set while pulls fail (connecting or pulling; cleared by one that
    /// works): in a priority group, such a queue holds no one back.
    pub(crate) pull_failing: AtomicBool,
    /// Its heartbeat and registry entry, written by the heartbeat task
    /// and, when the last beat is old, by the pull loop before a pull.
    pub(crate) presence: anteroom_control::queue::Presence,
    /// When this dispatcher started (Unix ms), as its heartbeat says.
    pub(crate) started_at_ms: u64,
    /// The `<n>` of the next [`Shared::delivery`] (hex): from a random
    /// start, so a dispatcher restarted with a fixed id never takes an
    /// earlier run's claim for its own.
    pub(crate) deliveries: AtomicU64,
}

/// One envelope in hand ([`Shared::held`]).
pub(crate) struct InHand {
    /// Its place in the order the pulls moved envelopes into the
    /// processing list.
    number: u64,
    /// Its bytes: the buffer its [`Held`] guard shares.
    pub(crate) raw: Bytes,
    /// Still in the processing list: false once its completion removed it
    /// (its task may run a little longer, and it stays in hand until then).
    listed: bool,
    /// Its place of the concurrency given back: an open WebSocket's
    /// ([`Shared::gave_place_back`]).
    placeless: bool,
}

/// One envelope counted in [`Shared::held`] while it lives.
pub(crate) struct Held {
    shared: Arc<Shared>,
    raw: Bytes,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.release(&self.raw);
    }
}

/// Whether `a` and `b` are one buffer (one envelope taken), not merely
/// equal bytes (a producer's second copy). Sound while both live (no
/// other allocation can have that address); every empty `Bytes` shares
/// one, but an empty envelope never decodes and is never in hand long.
fn same_buffer(a: &Bytes, b: &Bytes) -> bool {
    buffer_of(a) == buffer_of(b)
}

/// The buffer `raw` points into, to find it among the envelopes in hand.
fn buffer_of(raw: &Bytes) -> (usize, usize) {
    (raw.as_ptr() as usize, raw.len())
}

/// For each of `batch` (these very buffers), in order: whether fewer of
/// the `held` envelopes still listed were taken before it than after it,
/// leaving out those earlier in `batch`; false for one not held. Sorts
/// what it needs once: O((held + batch) log held + batch²).
fn tail_is_nearer(held: &[InHand], batch: &[&Bytes]) -> Vec<bool> {
    let mut listed: Vec<((usize, usize), u64)> = held
        .iter()
        .filter(|h| h.listed)
        .map(|h| (buffer_of(&h.raw), h.number))
        .collect();
    listed.sort_unstable();
    let numbers: Vec<Option<u64>> = batch
        .iter()
        .map(|raw| {
            listed
                .binary_search_by_key(&buffer_of(raw), |(buffer, _)| *buffer)
                .ok()
                .map(|at| listed[at].1)
        })
        .collect();
    let mut order: Vec<u64> = listed.iter().map(|(_, number)| *number).collect();
    order.sort_unstable();
    numbers
        .iter()
        .enumerate()
        .map(|(k, mine)| {
            let Some(mine) = *mine else { return false };
            let gone = numbers[..k].iter().flatten();
            let older = order.partition_point(|&n| n < mine);
            let newer = order.len() - order.partition_point(|&n| n <= mine);
            let older = older.saturating_sub(gone.clone().filter(|&&n| n < mine).count());
            let newer = newer.saturating_sub(gone.filter(|&&n| n > mine).count());
            older < newer
        })
        .collect()
}

/// Counts one request as running for as long as it lives.
pub(crate) struct Running(Arc<Shared>);

impl Running {
    pub(crate) fn start(shared: &Arc<Shared>) -> Self {
        shared.running.fetch_add(1, Ordering::AcqRel);
        shared.metrics.in_flight(1);
        Self(Arc::clone(shared))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.in_flight(-1);
    }
}

impl Shared {
    /// A token unique to one run of one request, `<dispatcher id>/<n>`: a
    /// `dedupe` claim's owner (docs/protocol.md, step 3) and a stream
    /// head's `run` (a copy of the head is then told from a second run).
    pub(crate) fn delivery(&self) -> String {
        format!(
            "{}/{:x}",
            self.id,
            self.deliveries.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The requests in hand that use a place of the concurrency: all but
    /// the open WebSockets, which give their place back once open (they
    /// stay in hand, and in the processing list, while they last). What a
    /// priority group counts against a queue's guaranteed share
    /// ([`crate::priority`]).
    pub(crate) fn in_use(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|h| !h.placeless)
            .count()
    }

    /// Marks `raw` (this very buffer) as holding no place of the
    /// concurrency any more: its WebSocket is open and gave its permit
    /// back. It stays in hand (and in the processing list) until its task
    /// ends. In a priority group, members that gave way look again.
    pub(crate) fn gave_place_back(&self, raw: &Bytes) {
        self.mark(raw, |entry| entry.placeless = true);
        if let Some((group, _)) = &self.settings.priority {
            group.finished();
        }
    }

    /// Counts `raw` as in hand until the returned guard is dropped. Called
    /// in the order the pull moved the envelopes into the processing list.
    pub(crate) fn hold(self: &Arc<Self>, raw: &Bytes) -> Held {
        let number = self.pulled.fetch_add(1, Ordering::Relaxed);
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(InHand {
                number,
                raw: raw.clone(),
                listed: true,
                placeless: false,
            });
        Held {
            shared: Arc::clone(self),
            raw: raw.clone(),
        }
    }

    /// Takes `raw` (this very buffer, not merely equal bytes) out of
    /// [`Shared::held`], if it is there: its [`Held`] guard went.
    fn release(&self, raw: &Bytes) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = held.iter().position(|h| same_buffer(&h.raw, raw)) {
            held.swap_remove(at);
        }
    }

    /// Marks `raw` (this very buffer) as out of the processing list: its
    /// completion removed it. It stays in hand (counted by a priority
    /// group, and by a reconciliation) until its task ends;
    /// [`Shared::nearer_tail`] counts only what the list still holds.
    pub(crate) fn unlisted(&self, raw: &Bytes) {
        self.mark(raw, |entry| entry.listed = false);
    }

    /// Applies `change` to the entry of `raw` (this very buffer) in
    /// [`Shared::held`], if it is there.
    fn mark(&self, raw: &Bytes, change: impl FnOnce(&mut InHand)) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = held.iter_mut().find(|h| same_buffer(&h.raw, raw)) {
            change(entry);
        }
    }

    /// For each envelope of `batch` (in hand, these very buffers), whether
    /// it is nearer the processing list's tail than its head, counting the
    /// envelopes in hand on each side: pulls push at the head, so those
    /// taken before it lie toward the tail. A completion then looks for it
    /// from there
    /// (`LREM -1`, [`queue::Done::from_tail`]). Never while a WebSocket is
    /// open (there may be thousands in hand; the head, where new requests
    /// are, is then the better bet without counting them), nor for an
    /// envelope not in hand. What is in the list and not in hand (orphans,
    /// leftovers of a removal given up) is not counted: on the tail side of
    /// everything pulled after it, a tail search may pass it.
    ///
    /// `batch` is the completions of one `MULTI`, in its order: each one's
    /// count leaves out those of the batch before it (removed by then).
    pub(crate) fn nearer_tail(&self, batch: &[&Bytes]) -> Vec<bool> {
        if !self.sockets.is_empty() {
            return vec![false; batch.len()];
        }
        tail_is_nearer(
            &self.held.lock().unwrap_or_else(PoisonError::into_inner),
            batch,
        )
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    pub(crate) fn acknowledge(&self, pause_id: Option<String>) {
        let mut ack = self
            .acknowledged
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *ack != pause_id {
            *ack = pause_id;
            drop(ack);
            self.beat_now.notify_one();
        }
    }

    pub(crate) fn acknowledged(&self) -> Option<String> {
        self.acknowledged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Returns a blocked pull at once (as if it had timed out).
    pub(crate) async fn unblock_pull(&self) {
        let id = self.pull_client_id.load(Ordering::Acquire);
        if id == 0 {
            return;
        }
        if let Err(err) = queue::unblock(&mut self.conn.clone(), id).await {
            tracing::debug!(error = %err, "cannot unblock the pull");
        }
    }

    /// With `durable` and a replica connected: `WAIT`s for it to have what
    /// this dispatcher wrote (see [`queue::replicate`]).
    pub(crate) async fn replicate(&self) {
        let Some(durability) = &self.durability else {
            return;
        };
        if let Err(err) = queue::replicate(&mut self.conn.clone(), durability).await {
            tracing::warn!(error = %err, "WAIT failed");
        }
    }
}

/// Runs `dispatcher` with `service` until `shutdown` completes (or a
/// component fails or panics), then drains: stops pulling, lets the
/// requests in hand finish within the grace period, and stops the
/// components, the heartbeat removing itself.
pub(crate) async fn run<S, B>(
    dispatcher: Dispatcher,
    service: S,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DispatcherError>
where
    S: HttpService<B> + Clone,
    B: ResponseBody,
{
    let Dispatcher {
        client,
        keys,
        id,
        settings,
        ready,
    } = dispatcher;
    let conn = anteroom_redis::shared(&client, settings.redis_timeout)
        .await
        .map_err(|e| DispatcherError::from(anteroom_redis::ConnectError::Connect(e)))?;
    let components = Components::new();
    let pause = anteroom_control::watch_pause(
        client.clone(),
        conn.clone(),
        keys.clone(),
        settings.pause_poll,
        settings.redis_timeout,
        &components,
    )
    .await
    .map_err(|e| DispatcherError::from(Kind::Control(e)))?;
    // Every running request holds a permit and sends at most one
    // completion, so this channel never makes a request wait.
    let (completions, completions_rx) = mpsc::channel(settings.concurrency.max(1));
    let metrics = settings.metrics.queue(keys.queue());
    let gate = Arc::new(Gate::new(settings.health_check.as_ref(), metrics.clone()));
    let health_check = settings.health_check.clone();
    let durability = settings
        .durable
        .map(|wait| anteroom_redis::Durability::spawn(conn.clone(), wait, &components));
    let credits_key = keys.credits(&id);
    let (upload_credits, upload_credits_rx) = queue::FrameSender::new();
    components.spawn(
        "upload credit writer",
        queue::write_frames(
            conn.clone(),
            upload_credits_rx,
            settings.reply_ttl,
            components.stopping(),
        ),
    );
    let presence = anteroom_control::queue::Presence::new(
        &keys,
        anteroom_control::queue::Role::Dispatcher,
        &id,
        settings.heartbeat_ttl,
    );
    let shared = Arc::new(Shared {
        presence,
        started_at_ms: anteroom_protocol::now_ms(),
        gate: Arc::clone(&gate),
        metrics,
        completions,
        requests_key: keys.requests(),
        processing_key: keys.processing(&id),
        permits: match &settings.priority {
            Some((group, _)) => group.permits(),
            None => Arc::new(Semaphore::new(settings.concurrency)),
        },
        keys,
        id,
        conn,
        settings,
        pause,
        acknowledged: Mutex::new(None),
        pull_client_id: AtomicU64::new(0),
        pull_outstanding: AtomicBool::new(false),
        beat_now: Notify::new(),
        running: AtomicUsize::new(0),
        durability,
        credits: CreditTable::default(),
        credits_key,
        streams_stop: CancellationToken::new(),
        uploads: Arc::default(),
        upload_credits,
        sockets: Arc::default(),
        held: Mutex::default(),
        pulled: AtomicU64::new(0),
        settling: tokio::sync::Mutex::new(()),
        orphans_possible: AtomicBool::new(false),
        pull_failing: AtomicBool::new(false),
        deliveries: AtomicU64::new(uuid::Uuid::new_v4().as_u64_pair().0 >> 16),
    });
    if let Some((group, rank)) = &shared.settings.priority {
        group.serve(*rank, &shared);
    }
    tracing::info!(
        queue = %shared.keys.queue(),
        priority = shared.settings.priority.as_ref().map(|(_, rank)| rank + 1),
        dispatcher_id = %shared.id,
        concurrency = shared.settings.concurrency,
        paused = shared.pause.borrow().is_some(),
        health_checked = health_check.is_some(),
        "dispatcher ready"
    );

    let stopping = components.stopping();
    components.spawn(
        "heartbeat",
        heartbeat(Arc::clone(&shared), stopping.clone()),
    );
    components.spawn("reaper", reap(Arc::clone(&shared), stopping.clone()));
    components.spawn(
        "credit reader",
        read_credits(Arc::clone(&shared), client.clone(), stopping.clone()),
    );
    components.spawn(
        "websocket peer watch",
        anteroom_socket::watch_peers(
            shared.conn.clone(),
            Arc::clone(&shared.sockets),
            PEER_CHECK,
            stopping.clone(),
        ),
    );
    components.spawn(
        "health check",
        health::run(gate, health_check, stopping.clone()),
    );
    components.spawn(
        "completer",
        completer(Arc::clone(&shared), completions_rx, stopping.clone()),
    );
    // Pulling stops on the shutdown signal or when a component fails; a
    // pull already sent is still awaited (see `pull_loop`).
    let stop_pulling = CancellationToken::new();
    components.spawn(
        "pull nudger",
        nudge_pulls(Arc::clone(&shared), stop_pulling.clone(), stopping),
    );
    let requests = TaskTracker::new();
    ready.send_replace(true);
    let stop_on_signal = async {
        tokio::select! {
            () = shutdown => {}
            failure = components.failed() => tracing::error!(%failure, "stopping"),
        }
        stop_pulling.cancel();
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = pull_loop(&shared, &client, service, &requests, &stop_pulling) => {}
        () = stop_on_signal => {}
    }

    requests.close();
    let grace = shared.settings.grace;
    tracing::info!(
        in_flight = shared.in_flight(),
        ?grace,
        "stopping: finishing in-flight requests"
    );
    tokio::select! {
        () = requests.wait() => tracing::info!("in-flight requests finished"),
        () = tokio::time::sleep(grace) => {
            // Streams end now (event streams cleanly, so their clients
            // reconnect to a dispatcher still running; others aborted),
            // which takes a round trip each.
            shared.streams_stop.cancel();
            if tokio::time::timeout(STREAMS_END, requests.wait()).await.is_err() {
                tracing::warn!(
                    in_flight = shared.in_flight(),
                    "grace period over; stopping with requests unfinished (they stay in the processing list)"
                );
            }
        }
    }
    ready.send_replace(false);
    components
        .shutdown(COMPONENTS_GRACE)
        .await
        .map_err(|e| Kind::Component(e).into())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{InHand, tail_is_nearer};

    #[test]
    fn the_nearer_end_is_counted_in_envelopes_taken_before_and_after() {
        let taken: Vec<Bytes> = (0..5).map(|i| Bytes::from(vec![b'e'; i + 1])).collect();
        // Held out of pull order (a `swap_remove` reorders), numbered by pull.
        let held: Vec<InHand> = [3, 0, 4, 1, 2]
            .into_iter()
            .map(|i| InHand {
                number: i as u64 + 10,
                raw: taken[i].clone(),
                listed: true,
                placeless: false,
            })
            .collect();
        // 0 and 1 have fewer taken before them than after; 2 is in the
        // middle (the head, as before); 3 and 4 are nearer the head.
        let one = |raw: &Bytes| tail_is_nearer(&held, &[raw])[0];
        let nearer: Vec<bool> = taken.iter().map(one).collect();
        assert_eq!(nearer, [true, true, false, false, false]);
        // In one batch, those before are removed by then: after 0, 1 and
        // 3, the 2 has none older left and one newer (4).
        let batch = [&taken[3], &taken[0], &taken[1], &taken[2]];
        assert_eq!(tail_is_nearer(&held, &batch), [false, true, true, true]);
        // Equal bytes in another buffer (a producer's second copy) are
        // not the envelope in hand.
        let copy = Bytes::from(taken[0].to_vec());
        assert!(!one(&copy));
        // One completed (out of the list, still in hand) is not counted:
        // with 0 and 1 gone, 2 has none older and two newer.
        let mut held = held;
        for h in &mut held {
            h.listed = !(h.number == 10 || h.number == 11);
        }
        assert!(tail_is_nearer(&held, &[&taken[2]])[0]);
        assert!(!tail_is_nearer(&held, &[&taken[0]])[0], "not listed");
    }
}
