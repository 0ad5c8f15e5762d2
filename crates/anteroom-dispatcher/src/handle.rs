//! One request's life: decode, check, run the handler within the
//! deadline, and hand the reply to the completer (or requeue, dead-letter
//! or drop it).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anteroom_control::queue::{self, Attempt, Requeued};
use anteroom_protocol::{Failure, Keys, RequestEnvelope, ResponseEnvelope, Taken, now_ms};
use anteroom_redis::Backoff;
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Limited};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tower::ServiceExt;
use tracing::Instrument;

use crate::Body;
use crate::body::{Pacing, Upload};
use crate::complete::Completion;
use crate::error::{BoxError, Transport, classify, describe};
use crate::stream::{self, ready_now};
use crate::worker::{HttpService, ResponseBody, Running, Shared};

/// One request, from raw envelope to completion. Holds its permit throughout.
pub(crate) async fn handle<S, B>(
    shared: Arc<Shared>,
    service: S,
    raw: Bytes,
    permit: OwnedSemaphorePermit,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    let running = Running::start(&shared);
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
            // Not claimed yet: there is no claim of this delivery's to
            // release (one this dispatcher holds is another copy's).
            requeue(
                &shared,
                &raw,
                &envelope,
                Attempt::NotStarted { claimed_by: "" },
            )
            .await;
            return;
        }
        // This delivery's claim ("" without one): a requeue releases it,
        // and only it.
        let owner = if envelope.dedupe {
            let Some(owner) = claim(&shared, &envelope, now).await else {
                tracing::info!("not claimed (another delivery has it); not executed");
                discard(&shared, &raw).await;
                return;
            };
            owner
        } else {
            String::new()
        };
        // The move into our processing list (and the claim) must survive
        // a failover before the request runs, or a new primary would hand
        // it out again.
        shared.replicate().await;
        let waited_ms = now.saturating_sub(envelope.enqueued_at_ms);
        let mut due = Due {
            deadline_ms: envelope.deadline_ms,
            last_piece: None,
        };
        let upload = if envelope.body_follows {
            let Some((upload, last_piece)) = take_body(&shared, &envelope).await else {
                // Past its deadline: the client has its 504.
                discard(&shared, &raw).await;
                return;
            };
            let idle_ms =
                u64::try_from(shared.settings.stream_idle_timeout.as_millis()).unwrap_or(u64::MAX);
            due.last_piece = Some((last_piece, idle_ms));
            Some(upload)
        } else {
            None
        };
        let started = std::time::Instant::now();
        let reply = if envelope.websocket {
            match crate::socket::open(&shared, service, &envelope).await {
                crate::socket::Opened::Answer(reply) => reply,
                crate::socket::Opened::Requeue => {
                    tracing::debug!(
                        "the upstream never received the handshake; back to the front of the queue"
                    );
                    requeue(
                        &shared,
                        &raw,
                        &envelope,
                        Attempt::NotStarted { claimed_by: &owner },
                    )
                    .await;
                    return;
                }
                crate::socket::Opened::Socket(parts, ws) => {
                    shared.metrics.handled(101, started.elapsed());
                    tracing::debug!(waited_ms, "websocket open");
                    // An open socket is no running request: its slot goes,
                    // and no longer counts against a priority group's share.
                    let opened = {
                        let (shared, raw) = (Arc::clone(&shared), raw.clone());
                        move || {
                            drop((permit, running));
                            shared.gave_place_back(&raw);
                        }
                    };
                    crate::socket::relay(&shared, &envelope, &raw, parts, ws, opened).await;
                    return;
                }
            }
        } else {
            match execute(&shared, service, &envelope, upload, &due).await {
                Outcome::Reply(reply) => reply,
                Outcome::Stream(parts, body, frames) => {
                    shared
                        .metrics
                        .handled(parts.status.as_u16(), started.elapsed());
                    tracing::debug!(status = parts.status.as_u16(), waited_ms, "streaming");
                    stream::send(&shared, &envelope, &raw, parts, body, frames).await;
                    return;
                }
                Outcome::Invalid(err) => {
                    // Kept for inspection; the client still gets its answer.
                    let reason = format!("{}: {err}", anteroom_control::ANSWERED_REASON);
                    set_aside(&shared, &raw, &reason).await;
                    Failure::HandlerFailed.to_envelope(&envelope.id)
                }
                Outcome::Requeue(_) if envelope.body_follows => {
                    // Its body has gone to this attempt: it cannot run again.
                    tracing::warn!("the upstream failed on a request whose body streamed: 502");
                    Failure::Interrupted.to_envelope(&envelope.id)
                }
                Outcome::Requeue(started) => {
                    let attempt = if started {
                        Attempt::MayHaveRun {
                            claimed_by: &owner,
                            ttl: Duration::from_millis(
                                envelope.deadline_ms.saturating_sub(now_ms()),
                            ),
                        }
                    } else {
                        Attempt::NotStarted { claimed_by: &owner }
                    };
                    match requeue(&shared, &raw, &envelope, attempt).await {
                        Requeued::TooManyRepeats => {
                            tracing::warn!(
                                repeats = queue::MAX_REPEATS,
                                "repeated too often after failures that may have run it: 502"
                            );
                            Failure::Interrupted.to_envelope(&envelope.id)
                        }
                        Requeued::Requeued | Requeued::NotHeld => return,
                    }
                }
            }
        };
        complete(
            &shared,
            &envelope,
            raw,
            reply,
            due.at_ms(),
            started,
            waited_ms,
        )
        .await;
    }
    .instrument(span)
    .await;
}

/// Hands `reply` to the completer (pushed, and `raw` removed from the
/// processing list, in one `MULTI`), retried until `deadline_ms`.
async fn complete(
    shared: &Shared,
    envelope: &RequestEnvelope,
    raw: Bytes,
    reply: ResponseEnvelope,
    deadline_ms: u64,
    started: std::time::Instant,
    waited_ms: u64,
) {
    shared.metrics.handled(reply.status, started.elapsed());
    tracing::debug!(status = reply.status, waited_ms, "handled");
    let (done, completed) = oneshot::channel();
    let completion = Completion {
        reply_to: envelope.reply_to.clone(),
        reply: reply.encode(),
        raw,
        deadline_ms,
        done,
    };
    if shared.completions.send(completion).await.is_err() || completed.await.is_err() {
        tracing::error!(
            "reply not delivered: redis unreachable until the deadline, or stopping \
             (the request stays in the processing list)"
        );
    }
}

/// Moves `raw` from the processing list to the dead-letter list, saying
/// why (see [`queue::dead_letter`]).
async fn set_aside(shared: &Shared, raw: &Bytes, reason: &str) {
    tracing::error!(queue = %shared.keys.queue(), %reason, "moving an envelope to the dead-letter list");
    shared.metrics.dead_lettered();
    let mut conn = shared.conn.clone();
    if let Err(err) = queue::dead_letter(
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

/// Largest response sent as one reply when the proxy reads streams and the
/// body is all there at once; larger or slower ones stream.
const WHOLE_REPLY: usize = 64 * 1024;

/// What the handler produced: a whole body, or the start of one to stream.
enum Produced<B> {
    Whole(http::response::Parts, Bytes),
    Stream(http::response::Parts, Pin<Box<B>>, Vec<Bytes>),
}

/// What became of a request the handler was given.
enum Outcome<B> {
    /// Answer the client with this.
    Reply(ResponseEnvelope),
    /// Stream this body after the frames already read (the proxy reads
    /// streams, and the body was not all there at once).
    Stream(http::response::Parts, Pin<Box<B>>, Vec<Bytes>),
    /// The envelope is not a valid HTTP request (never written by a
    /// proxy): set aside, and the client answered 502.
    Invalid(anteroom_protocol::ConvertError),
    /// Put it back at the front of the queue: the upstream never received
    /// it (`false`), or failed on a request that is safe to repeat after it
    /// may have started it (`true`).
    Requeue(bool),
}

/// When a request's response head is due: its deadline, or, for a body
/// that streams, one stream idle timeout after the last piece of the body
/// reached the app, if that is later (a long upload is not cut short by
/// the hold budget while it moves).
struct Due {
    deadline_ms: u64,
    /// When the last piece reached the app (Unix ms), and the idle timeout
    /// in ms.
    last_piece: Option<(Arc<AtomicU64>, u64)>,
}

impl Due {
    fn at_ms(&self) -> u64 {
        self.last_piece
            .as_ref()
            .map_or(self.deadline_ms, |(last, idle_ms)| {
                self.deadline_ms
                    .max(last.load(Ordering::Acquire).saturating_add(*idle_ms))
            })
    }

    /// `work`'s output, or `Err` if it is not done when due.
    async fn within<F: std::future::Future>(&self, work: F) -> Result<F::Output, ()> {
        let mut work = std::pin::pin!(work);
        loop {
            let (at, now) = (self.at_ms(), now_ms());
            if now >= at {
                return Err(());
            }
            tokio::select! {
                out = &mut work => return Ok(out),
                () = tokio::time::sleep(Duration::from_millis(at - now)) => {}
            }
        }
    }
}

/// Asks the proxy for the rest of the body of `envelope` (a [`Taken`] on
/// its reply list, within its deadline) and opens the body that receives
/// it; with it, when its last piece arrived. `None` when the frame could
/// not be pushed by the deadline.
async fn take_body(
    shared: &Shared,
    envelope: &RequestEnvelope,
) -> Option<(Upload, Arc<AtomicU64>)> {
    let window = shared.settings.stream_window as u64;
    let last_piece = Arc::new(AtomicU64::new(now_ms()));
    let length = envelope
        .headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| std::str::from_utf8(value).ok()?.trim().parse().ok());
    let pacing = Pacing {
        reply_to: envelope.reply_to.clone(),
        credits: shared.upload_credits.clone(),
        window,
        idle: shared.settings.stream_idle_timeout,
        length,
        last_piece_ms: Arc::clone(&last_piece),
        metrics: shared.metrics.clone(),
    };
    let upload = shared
        .uploads
        .open(&envelope.id, envelope.body.clone(), pacing);
    let taken = Taken {
        id: envelope.id.clone(),
        send_to: shared.credits_key.clone(),
        window,
    }
    .encode();
    let ttl = shared.settings.reply_ttl;
    with_retries("taken", envelope.deadline_ms, || {
        let mut conn = shared.conn.clone();
        let (reply_to, taken) = (&envelope.reply_to, &taken);
        async move { queue::push_reply(&mut conn, reply_to, taken, ttl).await }
    })
    .await?;
    Some((upload, last_piece))
}

/// Runs the handler until `due`; every failure becomes a reply, except an
/// upstream's transport failure (see [`classify`]), which also closes the
/// gate. The request's body is `upload` when it streams.
async fn execute<S, B>(
    shared: &Shared,
    service: S,
    envelope: &RequestEnvelope,
    upload: Option<Upload>,
    due: &Due,
) -> Outcome<B>
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let request = match (envelope.to_http(), upload) {
        (Ok(request), Some(upload)) => request.map(|_| Body::streamed(upload)),
        (Ok(request), None) => request.map(Body::from),
        (Err(err), _) => return Outcome::Invalid(err),
    };
    let limit = shared.settings.max_response_body;
    let streams = envelope.stream;
    // A panicking handler becomes a 502 (caught here rather than by running
    // the handler in a task of its own: a spawn per request costs more).
    let run = std::panic::AssertUnwindSafe(async move {
        let response = service.oneshot(request).await.map_err(Into::into)?;
        let (parts, body) = response.into_parts();
        let known_small = body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= WHOLE_REPLY as u64);
        if streams && !known_small {
            // What is there at once, if it is all and small, is one reply
            // (today's path); anything else streams from its first byte.
            let mut body = Box::pin(body);
            let (frames, ended) = ready_now(&mut body, WHOLE_REPLY)?;
            if !ended {
                return Ok(Produced::Stream(parts, body, frames));
            }
            return Ok(Produced::Whole(parts, Bytes::from(frames.concat())));
        }
        let body = Limited::new(body, limit).collect().await?.to_bytes();
        Ok::<_, BoxError>(Produced::Whole(parts, body))
    })
    .catch_unwind();
    // At the deadline the handler's future is dropped, which cancels it. A
    // streamed response's deadline is its head: the body has the idle
    // timeout instead.
    let reply = match due.within(run).await {
        Ok(Ok(Ok(Produced::Whole(parts, body)))) => {
            shared.gate.delivered();
            ResponseEnvelope::from_http(&envelope.id, parts.status, &parts.headers, body)
        }
        Ok(Ok(Ok(Produced::Stream(parts, body, frames)))) => {
            shared.gate.delivered();
            return Outcome::Stream(parts, body, frames);
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
/// [`queue::requeue`]), retrying until its deadline (the script is
/// guarded, so a retry after a lost answer is safe). Given up, the request
/// stays in the processing list.
async fn requeue(
    shared: &Shared,
    raw: &Bytes,
    envelope: &RequestEnvelope,
    attempt: Attempt<'_>,
) -> Requeued {
    let result = with_retries("requeue", envelope.deadline_ms, || {
        let mut conn = shared.conn.clone();
        async move {
            queue::requeue(
                &mut conn,
                &shared.keys,
                &shared.processing_key,
                raw,
                &envelope.id,
                attempt,
            )
            .await
        }
    })
    .await;
    let requeued = result.unwrap_or(Requeued::NotHeld);
    if requeued == Requeued::Requeued {
        shared.metrics.requeued();
    }
    requeued
}

/// Claims a `dedupe` request before running it: the claim's owner (this
/// delivery, `<dispatcher id>/<n>`), or `None` when another delivery of
/// the same envelope has it or the claim could not be made. The claim
/// lives until the deadline plus the reply TTL. A claim whose answer is
/// lost may have been made: it is asked again with
/// [`queue::claim_again`], which knows this delivery's own claim, until the
/// deadline (docs/protocol.md, step 3; a lost answer used to count as
/// claimed, so a second delivery could run too). Past the deadline, or
/// when Redis refuses it for good (`NOPERM`, `WRONGTYPE`), it is not run.
async fn claim(shared: &Shared, envelope: &RequestEnvelope, now: u64) -> Option<String> {
    let ttl =
        Duration::from_millis(envelope.deadline_ms.saturating_sub(now)) + shared.settings.reply_ttl;
    let key = shared.keys.claimed(&envelope.id);
    let owner = shared.delivery();
    let refused = |err: &redis::RedisError| {
        tracing::error!(error = %err, "Redis refuses the claim; not running the request");
    };
    let claimed = match queue::claim(&mut shared.conn.clone(), &key, &owner, ttl).await {
        Ok(claimed) => claimed,
        Err(err) if crate::complete::refused_for_good(&err) => {
            refused(&err);
            false
        }
        Err(err) => {
            tracing::warn!(error = %err, "claiming the request failed; asking again");
            with_retries("claim", envelope.deadline_ms, || {
                let mut conn = shared.conn.clone();
                let (key, owner) = (&key, &owner);
                async move {
                    match queue::claim_again(&mut conn, key, owner, ttl).await {
                        Err(err) if crate::complete::refused_for_good(&err) => {
                            refused(&err);
                            Ok(false)
                        }
                        other => other,
                    }
                }
            })
            .await
            .unwrap_or(false)
        }
    };
    claimed.then_some(owner)
}

/// Removes an expired request from the processing list without replying.
async fn discard(shared: &Shared, raw: &Bytes) {
    // Dropping an expired request is housekeeping: a minute of retries is plenty.
    let _ = with_retries("discard", now_ms() + 60_000, || {
        let mut conn = shared.conn.clone();
        async move { queue::remove(&mut conn, &shared.processing_key, raw).await }
    })
    .await;
}

/// Runs `attempt` until it succeeds, retrying with backoff (a Redis
/// restart takes a moment) until `until_ms` (Unix milliseconds) passes:
/// past a request's deadline its reply is worth nothing. `None` when it
/// gave up; whatever is left over stays in the processing list, where a
/// reaper finds it if this dispatcher dies.
pub(crate) async fn with_retries<T, E, F, Fut>(
    what: &str,
    until_ms: u64,
    mut attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let err = match attempt().await {
            Ok(value) => {
                if tries > 1 {
                    tracing::info!(attempt = tries, "{what} succeeded after retrying");
                }
                return Some(value);
            }
            Err(err) => err,
        };
        let delay = backoff.next_delay();
        if now_ms().saturating_add(delay.as_millis() as u64) >= until_ms {
            tracing::error!(error = %err, attempt = tries, "{what} failed; giving up at the deadline (the request stays in the processing list)");
            return None;
        }
        tracing::warn!(error = %err, attempt = tries, "{what} failed; retrying");
        tokio::time::sleep(delay).await;
    }
}
