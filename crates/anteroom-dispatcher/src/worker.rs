//! The pull loop, one request's life, completion, and the heartbeat.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anteroom_protocol::{Failure, Keys, RequestEnvelope, ResponseEnvelope, now_ms};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::Body;
use crate::builder::{Dispatcher, Settings};
use crate::error::{BoxError, DispatcherError};
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

/// State every request task shares.
struct Shared {
    keys: Keys,
    id: String,
    requests_key: String,
    processing_key: String,
    conn: ConnectionManager,
    settings: Settings,
    permits: Arc<Semaphore>,
}

impl Shared {
    fn in_flight(&self) -> usize {
        self.settings.concurrency - self.permits.available_permits()
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
        .map_err(DispatcherError::RedisConnect)?;
    let shared = Arc::new(Shared {
        requests_key: keys.requests(),
        processing_key: keys.processing(&id),
        permits: Arc::new(Semaphore::new(settings.concurrency)),
        keys,
        id,
        conn,
        settings,
    });
    tracing::info!(
        queue = %shared.keys.queue(),
        dispatcher_id = %shared.id,
        concurrency = shared.settings.concurrency,
        "dispatcher ready"
    );

    let stop = CancellationToken::new();
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_on_signal.cancel();
    });
    let stop_heartbeat = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat(Arc::clone(&shared), stop_heartbeat.clone()));

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
    stop_heartbeat.cancel();
    let _ = heartbeat.await;
    Ok(())
}

/// Takes a permit, then one request, until stopped. A pull already sent to
/// Redis is always awaited (it returns within the poll interval), so a
/// request moved into the processing list is never abandoned by a stop.
async fn pull_loop<S, B>(
    shared: &Arc<Shared>,
    client: &redis::Client,
    service: S,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) where
    S: HttpService<B> + Clone,
    B: ResponseBody,
{
    let mut blocking: Option<MultiplexedConnection> = None;
    let mut backoff = Backoff::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&shared.permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = stop.cancelled() => return,
        };
        if stop.is_cancelled() {
            return;
        }
        let conn = match &mut blocking {
            Some(conn) => conn,
            None => {
                match anteroom_redis::blocking(
                    client,
                    shared.settings.redis_timeout,
                    shared.settings.poll_interval,
                )
                .await
                {
                    Ok(conn) => blocking.insert(conn),
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot connect to redis; retrying");
                        if sleep_or_stop(stop, backoff.next_delay()).await {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let pulled = redis::cmd("BLMOVE")
            .arg(&shared.requests_key)
            .arg(&shared.processing_key)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(shared.settings.poll_interval.as_secs_f64())
            .query_async::<Option<Bytes>>(conn)
            .await;
        match pulled {
            Ok(Some(raw)) => {
                backoff.reset();
                let task = handle(Arc::clone(shared), service.clone(), raw, permit);
                tracker.spawn(task);
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(error = %err, "pull from redis failed; reconnecting");
                blocking = None;
                if sleep_or_stop(stop, backoff.next_delay()).await {
                    return;
                }
            }
        }
    }
}

/// One request, from raw envelope to completion. Holds its permit throughout.
async fn handle<S, B>(shared: Arc<Shared>, service: S, raw: Bytes, _permit: OwnedSemaphorePermit)
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let envelope = match RequestEnvelope::decode(raw.clone()) {
        Ok(envelope) => envelope,
        Err(err) => {
            tracing::error!(error = %err, queue = %shared.keys.queue(), "undecodable envelope; moving it to the dead-letter list");
            dead_letter(&shared, &raw).await;
            return;
        }
    };
    let request_id = envelope
        .headers
        .iter()
        .find(|(name, _)| name == "x-request-id")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| envelope.id.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        queue = %shared.keys.queue(),
        method = %envelope.method,
    );
    async move {
        let now = now_ms();
        if envelope.is_expired(now) {
            tracing::info!(
                late_ms = now - envelope.deadline_ms,
                "deadline passed while queued; not executed"
            );
            discard(&shared, &raw).await;
            return;
        }
        let waited_ms = now.saturating_sub(envelope.enqueued_at_ms);
        let budget = Duration::from_millis(envelope.deadline_ms - now);
        let reply = execute(&shared, service, &envelope, budget).await;
        tracing::info!(status = reply.status, waited_ms, "handled");
        complete(&shared, &envelope.reply_to, reply.encode(), &raw).await;
    }
    .instrument(span)
    .await;
}

/// Runs the handler within `budget`; every failure becomes a reply.
async fn execute<S, B>(
    shared: &Shared,
    service: S,
    envelope: &RequestEnvelope,
    budget: Duration,
) -> ResponseEnvelope
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let request = match envelope.to_http() {
        Ok(request) => request.map(Full::new),
        Err(err) => {
            tracing::warn!(error = %err, "envelope is not a valid HTTP request");
            return Failure::BadRequest.to_envelope(&envelope.id);
        }
    };
    let limit = shared.settings.max_response_body;
    // The handler runs in its own task so that a panic becomes a 502.
    let task = tokio::spawn(async move {
        let response = service.oneshot(request).await.map_err(Into::into)?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, limit).collect().await?.to_bytes();
        Ok::<_, BoxError>((parts, body))
    });
    let abort = task.abort_handle();
    match tokio::time::timeout(budget, task).await {
        Ok(Ok(Ok((parts, body)))) => {
            ResponseEnvelope::from_http(&envelope.id, parts.status, &parts.headers, body)
        }
        Ok(Ok(Err(err))) => {
            tracing::warn!(error = %err, "handler failed");
            Failure::HandlerFailed.to_envelope(&envelope.id)
        }
        Ok(Err(join_err)) => {
            tracing::error!(error = %join_err, "handler panicked");
            Failure::HandlerFailed.to_envelope(&envelope.id)
        }
        Err(_) => {
            abort.abort();
            tracing::warn!("handler still running at the deadline; abandoned");
            Failure::HoldExpired.to_envelope(&envelope.id)
        }
    }
}

/// Pushes the reply and removes the request from the processing list in one
/// MULTI (both keys share the queue's hash slot). Retried a few times.
async fn complete(shared: &Shared, reply_to: &str, reply: Vec<u8>, raw: &Bytes) {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("RPUSH")
        .arg(reply_to)
        .arg(reply)
        .ignore()
        .cmd("PEXPIRE")
        .arg(reply_to)
        .arg(shared.settings.reply_ttl.as_millis() as u64)
        .ignore()
        .cmd("LREM")
        .arg(&shared.processing_key)
        .arg(1)
        .arg(raw.as_ref())
        .ignore();
    run_with_retries(shared, &pipe, "complete").await;
}

/// Removes an expired request from the processing list without replying.
async fn discard(shared: &Shared, raw: &Bytes) {
    let mut pipe = redis::pipe();
    pipe.cmd("LREM")
        .arg(&shared.processing_key)
        .arg(1)
        .arg(raw.as_ref())
        .ignore();
    run_with_retries(shared, &pipe, "discard").await;
}

/// Moves an undecodable envelope to the dead-letter list.
async fn dead_letter(shared: &Shared, raw: &Bytes) {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("LPUSH")
        .arg(shared.keys.dead())
        .arg(raw.as_ref())
        .ignore()
        .cmd("LREM")
        .arg(&shared.processing_key)
        .arg(1)
        .arg(raw.as_ref())
        .ignore();
    run_with_retries(shared, &pipe, "dead-letter").await;
}

async fn run_with_retries(shared: &Shared, pipe: &redis::Pipeline, what: &str) {
    let mut conn = shared.conn.clone();
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=4 {
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => return,
            Err(err) if attempt < 4 => {
                tracing::warn!(error = %err, attempt, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(err) => {
                tracing::error!(error = %err, "{what} failed; the request stays in the processing list");
            }
        }
    }
}

/// Keeps `anteroom:{q}:dispatcher:<id>` alive; deletes it on stop.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let key = shared.keys.dispatcher(&shared.id);
    let ttl = shared.settings.heartbeat_ttl;
    let every = (ttl / 3).max(Duration::from_millis(100));
    let started_at_ms = now_ms();
    let host = anteroom_redis::hostname();
    let mut conn = shared.conn.clone();
    loop {
        let info = serde_json::json!({
            "id": shared.id,
            "host": host,
            "pid": std::process::id(),
            "label": shared.settings.label,
            "concurrency": shared.settings.concurrency,
            "in_flight": shared.in_flight(),
            "started_at_ms": started_at_ms,
        });
        let result = redis::cmd("SET")
            .arg(&key)
            .arg(info.to_string())
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async::<()>(&mut conn)
            .await;
        if let Err(err) = result {
            tracing::debug!(error = %err, "dispatcher heartbeat failed");
        }
        if sleep_or_stop(&stop, every).await {
            break;
        }
    }
    let _ = redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await;
}
