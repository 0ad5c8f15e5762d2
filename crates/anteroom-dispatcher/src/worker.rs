//! The pull loop, one request's life, completion, and the heartbeat.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use anteroom_control::presence::{Presence, Role};
use anteroom_control::{Attempt, PauseWatch, Requeued};
use anteroom_protocol::{
    DispatcherHeartbeat, Failure, Keys, RequestEnvelope, ResponseEnvelope, now_ms,
};
use anteroom_redis::{SharedConnection, Target};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::Body;
use crate::builder::{Dispatcher, Settings};
use crate::error::{BoxError, DispatcherError, Transport, classify, describe};
use crate::health::{self, Gate};
use anteroom_redis::{Backoff, sleep_or_stop};

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

/// Most requests taken in one round trip.
const MAX_BATCH: usize = 64;
/// Fewest requests asked for in one round trip (when permits allow).
const MIN_PULL_HINT: usize = 4;

/// Most completions written in one round trip.
const MAX_COMPLETIONS: usize = 128;

/// Moves up to `count` requests from the queue (`from`) into the processing
/// list (`to`), oldest first, in one MULTI: the same atomic move BLMOVE
/// makes, for many items in one round trip. A MULTI of plain LMOVEs costs
/// Redis less than a Lua loop doing the same (docs/performance.md).
fn move_batch(from: &str, to: &str, count: usize) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for _ in 0..count {
        pipe.cmd("LMOVE").arg(from).arg(to).arg("RIGHT").arg("LEFT");
    }
    pipe
}

/// State every request task shares.
struct Shared {
    keys: Keys,
    id: String,
    requests_key: String,
    processing_key: String,
    conn: SharedConnection,
    settings: Settings,
    permits: Arc<Semaphore>,
    /// The queue's pause flag, as followed by [`anteroom_control::watch_pause`].
    pause: PauseWatch,
    /// The pause the pull loop has stopped for (no pull outstanding).
    acknowledged: Mutex<Option<String>>,
    /// Redis client id of the connection a pull may be blocked on (0: none).
    pull_client_id: AtomicU64,
    /// True while a pull is sent and not yet answered.
    pull_outstanding: AtomicBool,
    /// Wakes the heartbeat to report a change at once.
    beat_now: Notify,
    /// Requests being handled now.
    running: AtomicUsize,
    /// With `durable`: whether and how long to WAIT for a replica.
    durability: Option<Arc<anteroom_redis::Durability>>,
    /// Finished requests on their way to [`completer`].
    completions: mpsc::Sender<Completion>,
    metrics: anteroom_metrics::DispatcherQueueMetrics,
    /// Open while the upstream is healthy; the pull loop waits while closed.
    gate: Arc<Gate>,
}

/// A finished request: its reply, to be pushed, and its envelope, to be
/// removed from the processing list.
struct Completion {
    reply_to: String,
    reply: Vec<u8>,
    raw: Bytes,
    deadline_ms: u64,
    /// Sent once the completion is in Redis; dropped if it never got there.
    done: oneshot::Sender<()>,
}

/// Counts one request as running for as long as it lives.
struct Running(Arc<Shared>);

impl Running {
    fn start(shared: &Arc<Shared>) -> Self {
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
    fn in_flight(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    fn acknowledge(&self, pause_id: Option<String>) {
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

    fn acknowledged(&self) -> Option<String> {
        self.acknowledged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Returns a blocked pull at once (as if it had timed out).
    async fn unblock_pull(&self) {
        let id = self.pull_client_id.load(Ordering::Acquire);
        if id == 0 {
            return;
        }
        let result = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(id)
            .arg("TIMEOUT")
            .query_async::<i64>(&mut self.conn.clone())
            .await;
        if let Err(err) = result {
            tracing::debug!(error = %err, "cannot unblock the pull");
        }
    }
}

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
    } = dispatcher;
    let conn = anteroom_redis::shared(&client, settings.redis_timeout)
        .await
        .map_err(|e| DispatcherError::Redis(anteroom_redis::ConnectError::Connect(e)))?;
    let stop_background = CancellationToken::new();
    let settings_durable = settings.durable;
    let conn_for_durability = conn.clone();
    let pause = anteroom_control::watch_pause(
        client.clone(),
        conn.clone(),
        keys.clone(),
        settings.pause_poll,
        settings.redis_timeout,
        stop_background.clone(),
    )
    .await
    .map_err(DispatcherError::Control)?;
    // Every running request holds a permit and sends at most one
    // completion, so this channel never makes a request wait.
    let (completions, completions_rx) = mpsc::channel(settings.concurrency.max(1));
    let metrics = settings.metrics.queue(keys.queue());
    let gate = Arc::new(Gate::new(settings.health_check.as_ref(), metrics.clone()));
    let health_check = settings.health_check.clone();
    let shared = Arc::new(Shared {
        gate: Arc::clone(&gate),
        metrics,
        completions,
        requests_key: keys.requests(),
        processing_key: keys.processing(&id),
        permits: Arc::new(Semaphore::new(settings.concurrency)),
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
        durability: settings_durable.map(|wait| {
            anteroom_redis::Durability::spawn(conn_for_durability, wait, stop_background.clone())
        }),
    });
    tracing::info!(
        queue = %shared.keys.queue(),
        dispatcher_id = %shared.id,
        concurrency = shared.settings.concurrency,
        paused = shared.pause.borrow().is_some(),
        health_checked = health_check.is_some(),
        "dispatcher ready"
    );

    let stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat(Arc::clone(&shared), stop_background.clone()));
    let reaper = tokio::spawn(reap(Arc::clone(&shared), stop_background.clone()));
    let checker = tokio::spawn(health::run(gate, health_check, stop_background.clone()));
    let completer = tokio::spawn(completer(
        Arc::clone(&shared),
        completions_rx,
        stop_background.clone(),
    ));
    let nudger = tokio::spawn(nudge_pulls(
        Arc::clone(&shared),
        stop.clone(),
        stop_background.clone(),
    ));
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_on_signal.cancel();
    });

    let tracker = TaskTracker::new();
    pull_loop(&shared, &client, service, &tracker, &stop).await;

    tracker.close();
    let grace = shared.settings.grace;
    tracing::info!(
        in_flight = shared.in_flight(),
        ?grace,
        "stopping: finishing in-flight requests"
    );
    tokio::select! {
        () = tracker.wait() => tracing::info!("in-flight requests finished"),
        () = tokio::time::sleep(grace) => tracing::warn!(
            in_flight = shared.in_flight(),
            "grace period over; stopping with requests unfinished (they stay in the processing list)"
        ),
    }
    stop_background.cancel();
    let _ = heartbeat.await;
    let _ = nudger.await;
    let _ = reaper.await;
    let _ = checker.await;
    let _ = completer.await;
    Ok(())
}

/// Cuts a blocked pull short when a pause or a stop arrives or the upstream
/// turns unhealthy, and keeps doing so every 50 ms until the pull loop has
/// acknowledged the pause, stopped pulling, or exited (a pull sent just
/// after one nudge would otherwise block a whole poll interval).
async fn nudge_pulls(shared: Arc<Shared>, stop: CancellationToken, done: CancellationToken) {
    let mut pause = shared.pause.clone();
    let mut health = shared.gate.subscribe();
    'state: loop {
        let paused = pause.borrow_and_update().as_ref().map(|p| p.id.clone());
        let unhealthy = health.borrow_and_update().unhealthy.is_some();
        let stopping = stop.is_cancelled();
        let pulling = || shared.pull_client_id.load(Ordering::Acquire) != 0;
        let blocked = || shared.pull_outstanding.load(Ordering::Acquire);
        while (stopping && pulling())
            || (unhealthy && blocked())
            || (paused.is_some() && shared.acknowledged() != paused)
        {
            shared.unblock_pull().await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                changed = pause.changed() => match changed {
                    Ok(()) => continue 'state,
                    Err(_) => return,
                },
                changed = health.changed() => match changed {
                    Ok(()) => continue 'state,
                    Err(_) => return,
                },
                () = stop.cancelled(), if !stopping => continue 'state,
                () = done.cancelled() => return,
            }
        }
        tokio::select! {
            changed = pause.changed() => if changed.is_err() { return },
            changed = health.changed() => if changed.is_err() { return },
            () = stop.cancelled(), if !stopping => {}
            () = done.cancelled() => return,
        }
    }
}

/// Takes a permit, then one request, until stopped; while the queue is
/// paused or the upstream unhealthy, takes nothing. A pull already sent to
/// Redis is always awaited (a pause, a stop or a failing upstream cuts it
/// short with CLIENT UNBLOCK), so a request moved into the processing list
/// is never abandoned.
async fn pull_loop<S, B>(
    shared: &Arc<Shared>,
    client: &Target,
    service: S,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) where
    S: HttpService<B> + Clone,
    B: ResponseBody,
{
    let mut blocking: Option<MultiplexedConnection> = None;
    let mut backoff = Backoff::new();
    let mut pull_hint = MIN_PULL_HINT;
    let mut pause = shared.pause.clone();
    let mut health = shared.gate.subscribe();
    loop {
        if stop.is_cancelled() {
            break;
        }
        let paused = pause.borrow_and_update().as_ref().map(|p| p.id.clone());
        if let Some(pause_id) = paused {
            // Nothing is being pulled now: say so, then wait for a change.
            tracing::info!(in_flight = shared.in_flight(), "queue paused; not pulling");
            shared.acknowledge(Some(pause_id));
            tokio::select! {
                changed = pause.changed() => if changed.is_err() {
                    tracing::error!("lost the pause watcher; stopping");
                    break;
                },
                () = stop.cancelled() => break,
            }
            continue;
        }
        if shared.acknowledged().is_some() {
            tracing::info!("queue resumed; pulling again");
            shared.acknowledge(None);
        }
        if health.borrow_and_update().unhealthy.is_some() {
            // The gate logs the change; requests wait in the queue.
            tokio::select! {
                changed = health.changed() => if changed.is_err() { break },
                changed = pause.changed() => if changed.is_err() {
                    tracing::error!("lost the pause watcher; stopping");
                    break;
                },
                () = stop.cancelled() => break,
            }
            continue;
        }
        let permit = tokio::select! {
            permit = Arc::clone(&shared.permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
            changed = pause.changed() => {
                if changed.is_err() {
                    tracing::error!("lost the pause watcher; stopping");
                    break;
                }
                continue;
            }
            changed = health.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        };
        if blocking.is_none() {
            match connect_pull(shared, client).await {
                Ok(conn) => blocking = Some(conn),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot connect to redis; retrying");
                    if sleep_or_stop(stop, backoff.next_delay()).await {
                        break;
                    }
                    continue;
                }
            }
        }
        let Some(conn) = blocking.as_mut() else {
            continue;
        };
        // A pause, stop or failure that arrived while we waited for the permit.
        if stop.is_cancelled() || pause.borrow().is_some() || !shared.gate.is_open() {
            continue;
        }
        // A deep queue: take as many requests as there are free permits in
        // one round trip (at most twice what the last pull found, so that a
        // shallow queue does not cost many empty LMOVEs). An empty one: block
        // for the next.
        let mut permit = permit;
        let spare = shared.permits.available_permits().min(pull_hint - 1);
        if spare > 0 {
            if let Ok(more) = Arc::clone(&shared.permits).try_acquire_many_owned(spare as u32) {
                permit.merge(more);
            }
        }
        let batch = move_batch(
            &shared.requests_key,
            &shared.processing_key,
            permit.num_permits(),
        )
        .query_async::<Vec<Option<Bytes>>>(conn)
        .await
        .map(|items| items.into_iter().flatten().collect::<Vec<_>>());
        if let Ok(items) = &batch {
            pull_hint = (items.len() * 2).clamp(MIN_PULL_HINT, MAX_BATCH);
        }
        let pulled = match batch {
            Ok(items) if !items.is_empty() => Ok(items),
            Ok(_) => {
                // Keep one permit for the blocking pull; give the rest back.
                if let Some(one) = permit.split(1) {
                    drop(std::mem::replace(&mut permit, one));
                }
                shared.pull_outstanding.store(true, Ordering::Release);
                let pulled = redis::cmd("BLMOVE")
                    .arg(&shared.requests_key)
                    .arg(&shared.processing_key)
                    .arg("RIGHT")
                    .arg("LEFT")
                    .arg(shared.settings.poll_interval.as_secs_f64())
                    .query_async::<Option<Bytes>>(conn)
                    .await
                    .map(|item| item.into_iter().collect());
                shared.pull_outstanding.store(false, Ordering::Release);
                pulled
            }
            Err(err) => Err(err),
        };
        match pulled {
            Ok(items) => {
                if !items.is_empty() {
                    backoff.reset();
                }
                for raw in items {
                    let Some(one) = permit.split(1) else { break };
                    let task = handle(Arc::clone(shared), service.clone(), raw, one);
                    tracker.spawn(task);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "pull from redis failed; reconnecting");
                blocking = None;
                shared.pull_client_id.store(0, Ordering::Release);
                if sleep_or_stop(stop, backoff.next_delay()).await {
                    break;
                }
            }
        }
    }
    shared.pull_client_id.store(0, Ordering::Release);
}

/// Opens the pull connection and records its client id for CLIENT UNBLOCK.
async fn connect_pull(
    shared: &Shared,
    client: &Target,
) -> redis::RedisResult<MultiplexedConnection> {
    let mut conn = anteroom_redis::blocking_for(
        client,
        &shared.requests_key,
        shared.settings.redis_timeout,
        shared.settings.poll_interval,
    )
    .await?;
    let id: u64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await?;
    shared.pull_client_id.store(id, Ordering::Release);
    Ok(conn)
}

/// One request, from raw envelope to completion. Holds its permit throughout.
async fn handle<S, B>(shared: Arc<Shared>, service: S, raw: Bytes, _permit: OwnedSemaphorePermit)
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let _running = Running::start(&shared);
    let envelope = match RequestEnvelope::decode(raw.clone()) {
        Ok(envelope) => envelope,
        Err(err) => {
            set_aside(&shared, &raw, &format!("does not decode: {err}")).await;
            return;
        }
    };
    if let Err(reason) = check_envelope(&shared.keys, &envelope, now_ms()) {
        set_aside(&shared, &raw, &reason).await;
        return;
    }
    let span = tracing::info_span!(
        "request",
        request_id = tracing::field::Empty,
        queue = %shared.keys.queue(),
        method = %anteroom_protocol::printable(&envelope.method),
    );
    if !span.is_disabled() {
        // Looked up only when the span is recorded: most requests of a
        // quiet log level never need it.
        let request_id = envelope
            .headers
            .iter()
            .find(|(name, _)| name == "x-request-id")
            .map_or(
                std::borrow::Cow::Borrowed(envelope.id.as_str()),
                |(_, v)| String::from_utf8_lossy(v),
            );
        span.record(
            "request_id",
            anteroom_protocol::printable(&request_id).to_string(),
        );
    }
    async move {
        let now = now_ms();
        shared.metrics.taken(Duration::from_millis(
            now.saturating_sub(envelope.enqueued_at_ms),
        ));
        if envelope.is_expired(now) {
            shared.metrics.expired();
            tracing::debug!(
                late_ms = now - envelope.deadline_ms,
                "deadline passed while queued; not executed"
            );
            discard(&shared, &raw).await;
            return;
        }
        if !shared.gate.is_open() {
            // Taken just as the upstream failed: it never saw this one.
            tracing::debug!("upstream unhealthy; back to the front of the queue unsent");
            requeue(&shared, &raw, &envelope, Attempt::NotStarted).await;
            return;
        }
        if envelope.dedupe && !claim(&shared, &envelope, now).await {
            tracing::info!("already claimed by an earlier delivery; not executed again");
            discard(&shared, &raw).await;
            return;
        }
        if let Some(wait) = shared.durability.as_ref().and_then(|d| d.wait()) {
            // The move into our processing list (and the claim) must survive
            // a failover before the request runs, or a new primary would
            // hand it out again.
            replicate(&shared, wait).await;
        }
        let waited_ms = now.saturating_sub(envelope.enqueued_at_ms);
        let budget = Duration::from_millis(envelope.deadline_ms - now);
        let started = std::time::Instant::now();
        let reply = match execute(&shared, service, &envelope, budget).await {
            Outcome::Reply(reply) => reply,
            Outcome::Invalid(err) => {
                // Kept for inspection; the client still gets its answer.
                set_aside(&shared, &raw, &format!("not a valid HTTP request: {err}")).await;
                Failure::HandlerFailed.to_envelope(&envelope.id)
            }
            Outcome::Requeue(started) => {
                let attempt = if started {
                    Attempt::MayHaveRun {
                        claimed_by: &shared.id,
                        ttl: Duration::from_millis(envelope.deadline_ms.saturating_sub(now_ms())),
                    }
                } else {
                    Attempt::NotStarted
                };
                match requeue(&shared, &raw, &envelope, attempt).await {
                    Requeued::TooManyRepeats => {
                        tracing::warn!(
                            repeats = anteroom_control::MAX_REPEATS,
                            "repeated too often after failures that may have run it: 502"
                        );
                        Failure::Interrupted.to_envelope(&envelope.id)
                    }
                    Requeued::Requeued | Requeued::NotHeld => return,
                }
            }
        };
        shared.metrics.handled(reply.status, started.elapsed());
        tracing::debug!(status = reply.status, waited_ms, "handled");
        let (done, completed) = oneshot::channel();
        let completion = Completion {
            reply_to: envelope.reply_to.clone(),
            reply: reply.encode(),
            raw,
            deadline_ms: envelope.deadline_ms,
            done,
        };
        if shared.completions.send(completion).await.is_err() || completed.await.is_err() {
            tracing::error!(
                "reply not delivered: redis unreachable until the deadline, or stopping \
                 (the request stays in the processing list)"
            );
        }
    }
    .instrument(span)
    .await;
}

/// Moves `raw` from the processing list to the dead-letter list, saying
/// why (see `anteroom_control::dead_letter`).
async fn set_aside(shared: &Shared, raw: &Bytes, reason: &str) {
    tracing::error!(queue = %shared.keys.queue(), %reason, "moving an envelope to the dead-letter list");
    shared.metrics.dead_lettered();
    let mut conn = shared.conn.clone();
    if let Err(err) = anteroom_control::dead_letter(
        &mut conn,
        &shared.keys,
        &shared.processing_key,
        raw,
        reason,
        &shared.id,
    )
    .await
    {
        tracing::error!(error = %err, "dead-lettering failed; the envelope stays in the processing list");
    }
}

/// Longest a deadline may lie ahead of the dispatcher's clock.
const MAX_DEADLINE_AHEAD: Duration = anteroom_protocol::MAX_HOLD;

/// Why an envelope that decodes was not written by a proxy of this queue,
/// if it was not: its `reply_to` is not one of this queue's reply lists
/// (the dispatcher would write to, and set a TTL on, any key it named), or
/// its deadline lies more than [`MAX_DEADLINE_AHEAD`] ahead.
fn check_envelope(keys: &Keys, envelope: &RequestEnvelope, now: u64) -> Result<(), String> {
    if !keys.is_replies(&envelope.reply_to) {
        return Err(format!(
            "reply_to {:?} is not a reply list of queue {}",
            envelope.reply_to.escape_debug().to_string(),
            keys.queue()
        ));
    }
    let ahead = envelope.deadline_ms.saturating_sub(now);
    if ahead > MAX_DEADLINE_AHEAD.as_millis() as u64 {
        return Err(format!(
            "deadline {} ms ahead, more than {} s",
            ahead,
            MAX_DEADLINE_AHEAD.as_secs()
        ));
    }
    Ok(())
}

/// What became of a request the handler was given.
enum Outcome {
    /// Answer the client with this.
    Reply(ResponseEnvelope),
    /// The envelope is not a valid HTTP request (never written by a
    /// proxy): set aside, and the client answered 502.
    Invalid(anteroom_protocol::ConvertError),
    /// Put it back at the front of the queue: the upstream never received
    /// it (`false`), or failed on a request that is safe to repeat after it
    /// may have started it (`true`).
    Requeue(bool),
}

/// Runs the handler within `budget`; every failure becomes a reply, except
/// an upstream's transport failure (see [`classify`]), which also closes
/// the gate.
async fn execute<S, B>(
    shared: &Shared,
    service: S,
    envelope: &RequestEnvelope,
    budget: Duration,
) -> Outcome
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let request = match envelope.to_http() {
        Ok(request) => request.map(Full::new),
        Err(err) => return Outcome::Invalid(err),
    };
    let limit = shared.settings.max_response_body;
    // A panicking handler becomes a 502 (caught here rather than by running
    // the handler in a task of its own: a spawn per request costs more).
    let run = std::panic::AssertUnwindSafe(async move {
        let response = service.oneshot(request).await.map_err(Into::into)?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, limit).collect().await?.to_bytes();
        Ok::<_, BoxError>((parts, body))
    })
    .catch_unwind();
    // At the deadline the handler's future is dropped, which cancels it.
    let reply = match tokio::time::timeout(budget, run).await {
        Ok(Ok(Ok((parts, body)))) => {
            shared.gate.delivered();
            ResponseEnvelope::from_http(&envelope.id, parts.status, &parts.headers, body)
        }
        Ok(Ok(Err(err))) => match classify(&*err) {
            Some(Transport::NotDelivered(reason)) => {
                shared.gate.failed(&reason);
                tracing::debug!(
                    %reason,
                    "the upstream never received the request; back to the front of the queue"
                );
                return Outcome::Requeue(false);
            }
            Some(Transport::MayHaveRun(reason)) => {
                shared.gate.failed(&reason);
                if envelope.is_safe_to_repeat() {
                    tracing::warn!(
                        %reason,
                        "upstream failed after receiving the request; safe to repeat, back to the front of the queue"
                    );
                    return Outcome::Requeue(true);
                }
                tracing::warn!(
                    %reason,
                    "upstream failed after receiving the request; not safe to repeat: 502"
                );
                Failure::Interrupted.to_envelope(&envelope.id)
            }
            None => {
                tracing::warn!(error = %describe(&*err), "handler failed");
                Failure::HandlerFailed.to_envelope(&envelope.id)
            }
        },
        Ok(Err(panic)) => {
            let message = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            tracing::error!(panic = message, "handler panicked");
            Failure::HandlerFailed.to_envelope(&envelope.id)
        }
        Err(_) => {
            tracing::warn!("handler still running at the deadline; abandoned");
            Failure::HoldExpired.to_envelope(&envelope.id)
        }
    };
    Outcome::Reply(reply)
}

/// Puts a taken request back at the front of the queue (see
/// [`anteroom_control::requeue`]), retrying with backoff until its deadline
/// (the script is guarded, so a retry after a lost answer is safe). Given
/// up, the request stays in the processing list.
async fn requeue(
    shared: &Shared,
    raw: &Bytes,
    envelope: &RequestEnvelope,
    attempt: Attempt<'_>,
) -> Requeued {
    let mut conn = shared.conn.clone();
    let mut backoff = Backoff::new();
    loop {
        let result = anteroom_control::requeue(
            &mut conn,
            &shared.keys,
            &shared.processing_key,
            raw,
            &envelope.id,
            attempt,
        )
        .await;
        let err = match result {
            Ok(requeued) => {
                if requeued == Requeued::Requeued {
                    shared.metrics.requeued();
                }
                return requeued;
            }
            Err(err) => err,
        };
        let delay = backoff.next_delay();
        if now_ms().saturating_add(delay.as_millis() as u64) >= envelope.deadline_ms {
            tracing::error!(error = %err, "requeue failed; giving up at the deadline (the request stays in the processing list)");
            return Requeued::NotHeld;
        }
        tracing::warn!(error = %err, "requeue failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

/// Writes completions to Redis in batches: whatever finished while the
/// previous batch was on the wire goes in the next, so under load one round
/// trip completes many requests. Each batch is one MULTI that pushes every
/// reply (one RPUSH per reply list), refreshes the reply lists' TTL and
/// removes each request from the processing list: every completion stays
/// atomic. A failed batch is retried with backoff, each completion until its
/// request's deadline (past it the reply is worth nothing, and the request
/// stays in the processing list for a reaper). Runs until `stop`.
async fn completer(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Completion>,
    stop: CancellationToken,
) {
    let mut conn = shared.conn.clone();
    let mut batch: Vec<Completion> = Vec::with_capacity(MAX_COMPLETIONS);
    loop {
        let first = tokio::select! {
            next = rx.recv() => match next {
                Some(completion) => completion,
                None => return,
            },
            () = stop.cancelled() => return,
        };
        batch.push(first);
        let mut backoff = Backoff::new();
        let mut attempt = 0u32;
        while !batch.is_empty() {
            while batch.len() < MAX_COMPLETIONS {
                match rx.try_recv() {
                    Ok(completion) => batch.push(completion),
                    Err(_) => break,
                }
            }
            attempt += 1;
            let err = match completion_pipe(&shared, &batch)
                .query_async::<()>(&mut conn)
                .await
            {
                Ok(()) => {
                    if attempt > 1 {
                        tracing::info!(attempt, "completion succeeded after retrying");
                    }
                    if let Some(wait) = shared.durability.as_ref().and_then(|d| d.wait()) {
                        replicate(&shared, wait).await;
                    }
                    for completion in batch.drain(..) {
                        let _ = completion.done.send(());
                    }
                    break;
                }
                Err(err) if batch.len() > 1 && refused_for_good(&err) => {
                    // Redis refused a command (a reply list that is not a
                    // list, say): one completion's fault must not hold the
                    // others back, so each is tried alone.
                    batch = complete_one_by_one(&shared, &mut conn, batch).await;
                    continue;
                }
                Err(err) if refused_for_good(&err) => {
                    for completion in batch.drain(..) {
                        give_up(&shared, &mut conn, completion, &err).await;
                    }
                    break;
                }
                Err(err) => err,
            };
            let delay = backoff.next_delay();
            let next_try = now_ms().saturating_add(delay.as_millis() as u64);
            let before = batch.len();
            // Dropping a completion's `done` tells its request it gave up.
            batch.retain(|c| c.deadline_ms > next_try);
            if batch.len() < before {
                tracing::error!(error = %err, attempt, given_up = before - batch.len(), "completion failed; giving up on requests past their deadline");
            }
            if batch.is_empty() {
                break;
            }
            tracing::warn!(error = %err, attempt, pending = batch.len(), "completion failed; retrying");
            if sleep_or_stop(&stop, delay).await {
                return;
            }
        }
    }
}

/// Whether Redis refused a command in a way retrying cannot mend: a key
/// of the wrong type (a reply list that holds a string), or an ACL that
/// forbids it. Everything else (a lost connection, a cluster moving or
/// failing over, `OOM`, `READONLY` during a failover) is retried until the
/// deadline. redis-rs reports errors inside a MULTI as text, so the codes
/// are looked for there.
fn refused_for_good(err: &redis::RedisError) -> bool {
    let text = err.to_string();
    text.contains("WRONGTYPE") || text.contains("NOPERM")
}

/// Completes each of `batch` in a MULTI of its own. Those Redis refuses
/// for good are given up (their requests stay in the processing list for
/// a reaper); those that fail otherwise are returned, to be retried.
async fn complete_one_by_one(
    shared: &Shared,
    conn: &mut SharedConnection,
    batch: Vec<Completion>,
) -> Vec<Completion> {
    let mut retry = Vec::new();
    for completion in batch {
        let one = std::slice::from_ref(&completion);
        match completion_pipe(shared, one).query_async::<()>(conn).await {
            Ok(()) => {
                if let Some(wait) = shared.durability.as_ref().and_then(|d| d.wait()) {
                    replicate(shared, wait).await;
                }
                let _ = completion.done.send(());
            }
            Err(err) if refused_for_good(&err) => give_up(shared, conn, completion, &err).await,
            Err(_) => retry.push(completion),
        }
    }
    retry
}

/// Gives up a completion Redis refuses for good: its reply is lost (the
/// client gets 504 at its deadline), and the request, which ran, is taken
/// out of the processing list on its own so no reaper runs it again.
async fn give_up(
    shared: &Shared,
    conn: &mut SharedConnection,
    completion: Completion,
    err: &redis::RedisError,
) {
    tracing::error!(
        error = %err,
        reply_to = %anteroom_protocol::printable(&completion.reply_to),
        "completion refused by redis; its reply is given up"
    );
    let removed = redis::cmd("LREM")
        .arg(&shared.processing_key)
        .arg(1)
        .arg(completion.raw.as_ref())
        .query_async::<()>(conn)
        .await;
    if let Err(err) = removed {
        tracing::error!(error = %err, "the request stays in the processing list");
    }
}

/// The MULTI that completes `batch` (see [`completer`]).
fn completion_pipe(shared: &Shared, batch: &[Completion]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    let done: Vec<anteroom_control::Done<'_>> = batch
        .iter()
        .map(|c| anteroom_control::Done {
            reply_to: &c.reply_to,
            reply: Some(&c.reply),
            raw: &c.raw,
        })
        .collect();
    anteroom_control::complete(
        &mut pipe,
        &shared.processing_key,
        shared.settings.reply_ttl,
        &done,
    );
    pipe
}

/// Claims a `dedupe` request before running it: false when another delivery
/// of the same envelope already did. The claim lives until the deadline plus
/// the reply TTL. A Redis error counts as claimed, so the request still runs.
async fn claim(shared: &Shared, envelope: &RequestEnvelope, now: u64) -> bool {
    let ttl =
        envelope.deadline_ms.saturating_sub(now) + shared.settings.reply_ttl.as_millis() as u64;
    let set: redis::RedisResult<Option<String>> = redis::cmd("SET")
        .arg(shared.keys.claimed(&envelope.id))
        .arg(&shared.id)
        .arg("NX")
        .arg("PX")
        .arg(ttl.max(1))
        .query_async(&mut shared.conn.clone())
        .await;
    match set {
        Ok(claimed) => claimed.is_some(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot claim the request; running it");
            true
        }
    }
}

/// `WAIT 1 wait`: lets a replica catch up with what this connection wrote.
async fn replicate(shared: &Shared, wait: Duration) {
    let result = redis::cmd("WAIT")
        .arg(1)
        .arg(wait.as_millis() as u64)
        .query_async::<i64>(&mut shared.conn.clone())
        .await;
    if let (Ok(n), Some(d)) = (&result, &shared.durability) {
        d.observed(*n);
    }
    match result {
        Ok(n) if n >= 1 => {}
        Ok(_) => tracing::warn!(?wait, "no replica acknowledged in time"),
        Err(err) => tracing::warn!(error = %err, "WAIT failed"),
    }
}

/// Removes an expired request from the processing list without replying.
async fn discard(shared: &Shared, raw: &Bytes) {
    let mut pipe = redis::pipe();
    pipe.cmd("LREM")
        .arg(&shared.processing_key)
        .arg(1)
        .arg(raw.as_ref())
        .ignore();
    // Dropping an expired request is housekeeping: a minute of retries is plenty.
    run_with_retries(shared, &pipe, "discard", now_ms() + 60_000).await;
}

/// Runs `pipe`, retrying with backoff (a Redis restart takes a moment) until
/// it succeeds or `until_ms` (Unix milliseconds) passes: past a request's
/// deadline its reply is worth nothing. Whatever is left over stays in the
/// processing list, where a reaper finds it if this dispatcher dies.
async fn run_with_retries(shared: &Shared, pipe: &redis::Pipeline, what: &str, until_ms: u64) {
    let mut conn = shared.conn.clone();
    let mut backoff = Backoff::new();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let err = match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => {
                if attempt > 1 {
                    tracing::info!(attempt, "{what} succeeded after retrying");
                }
                return;
            }
            Err(err) => err,
        };
        let delay = backoff.next_delay();
        if now_ms().saturating_add(delay.as_millis() as u64) >= until_ms {
            tracing::error!(error = %err, attempt, "{what} failed; giving up at the deadline (the request stays in the processing list)");
            return;
        }
        tracing::warn!(error = %err, attempt, "{what} failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

/// Every `reap_interval`, settles the requests of dispatchers that died
/// holding them (see [`anteroom_control::Queue::reap`]).
async fn reap(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(every) = shared.settings.reap_interval else {
        return;
    };
    let queue = anteroom_control::Queue::with_connection(shared.keys.clone(), shared.conn.clone());
    loop {
        if sleep_or_stop(&stop, every).await {
            return;
        }
        match queue.reap(&shared.id, shared.settings.reply_ttl).await {
            Ok(report) if report.dispatchers > 0 => tracing::warn!(
                dead_dispatchers = report.dispatchers,
                requeued = report.requeued,
                answered_502 = report.answered,
                expired = report.expired,
                dead_lettered = report.dead_lettered,
                "reaped"
            ),
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "reaping failed; will retry"),
        }
    }
}

/// Keeps the heartbeat and registry entry fresh, at once after a pause is
/// acknowledged or lifted or the upstream's health changes; removes both on
/// stop.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let ttl = shared.settings.heartbeat_ttl;
    let every = (ttl / 3).max(Duration::from_millis(100));
    let presence = Presence::new(&shared.keys, Role::Dispatcher, &shared.id, ttl);
    let started_at_ms = now_ms();
    let host = anteroom_redis::hostname();
    let mut conn = shared.conn.clone();
    let mut health = shared.gate.subscribe();
    if let Err(err) = presence.register_queue(&mut conn).await {
        tracing::debug!(error = %err, "cannot register the queue");
    }
    loop {
        let pause_id = shared.acknowledged();
        let unhealthy = health.borrow_and_update().unhealthy.clone();
        let beat = DispatcherHeartbeat {
            id: shared.id.clone(),
            host: host.clone(),
            pid: std::process::id(),
            label: shared.settings.label.clone(),
            concurrency: shared.settings.concurrency,
            in_flight: shared.in_flight(),
            paused: pause_id.is_some(),
            pause_id,
            started_at_ms,
            unhealthy,
        };
        if let Err(err) = presence.beat(&mut conn, &beat).await {
            tracing::debug!(error = %err, "dispatcher heartbeat failed");
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shared.beat_now.notified() => {}
            changed = health.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    if let Err(err) = presence.leave(&mut conn).await {
        tracing::debug!(error = %err, "cannot remove the heartbeat");
    }
}
