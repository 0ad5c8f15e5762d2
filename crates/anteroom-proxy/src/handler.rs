//! One request: read the body, enqueue the envelope, wait for the reply.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use anteroom_protocol::{Failure, now_ms};
use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::activity::Activity;
use crate::arrival::{Arrival, Prepared, arrive, enqueue};
use crate::config::ProxyConfig;
use crate::enqueue::Enqueuer;
use crate::error::{ProxyError, error_response};
use crate::linger::Answer;
use crate::replies::Delivered;
use crate::replies::Demux;
use crate::translate::{X_REQUEST_ID, build_response, stream_response, usable_request_id};

/// What the requests of one route share: its queue, budget and metrics,
/// and the proxy-wide configuration and reply table.
pub(crate) struct State {
    pub(crate) config: Arc<ProxyConfig>,
    pub(crate) queue: String,
    /// This route's hold budget.
    pub(crate) hold: Duration,
    pub(crate) reply_key: String,
    pub(crate) demux: Arc<Demux>,
    pub(crate) budget: Arc<crate::budget::Budget>,
    pub(crate) enqueuer: Enqueuer,
    /// The proxy's shared connection, for the chunks of streamed bodies.
    pub(crate) conn: anteroom_redis::SharedConnection,
    pub(crate) metrics: anteroom_metrics::ProxyQueueMetrics,
    /// Places for WebSockets, `--max-websockets` of them, shared by every
    /// route.
    pub(crate) sockets: Arc<tokio::sync::Semaphore>,
    /// Redis's memory against `--redis-high-watermark` (none on Cluster).
    pub(crate) memory: Option<Arc<anteroom_redis::MemoryWatch>>,
    /// The queue's maintenance mode: while on, new requests get 503.
    pub(crate) maintenance: anteroom_control::MaintenanceWatch,
}

/// Serves one request; never fails (errors become responses).
///
/// Everything that needs the request itself is done here, synchronously
/// (for a request with a body, in a boxed future that reads it), and the
/// returned [`Handling`] is a small state machine rather than an async
/// block: a waiting request then holds only what waiting needs. A proxy
/// holding 50,000 waiting requests pays for that state only
/// (docs/performance.md: memory per waiting request).
pub(crate) fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    client: SocketAddr,
    connection: Arc<Activity>,
) -> tracing::instrument::Instrumented<Handling> {
    let id = uuid::Uuid::now_v7();
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| usable_request_id(v))
        .cloned()
        .unwrap_or_else(|| {
            let text = id
                .hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .to_owned();
            HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("-"))
        });
    let span = tracing::info_span!(
        "request",
        request_id = %String::from_utf8_lossy(request_id.as_bytes()),
        queue = %state.queue,
        method = %req.method(),
        path = %anteroom_protocol::printable(req.uri().path()),
    );
    let version = req.version();
    let head = req.method() == http::Method::HEAD;
    let phase = match arrive(&state, req, client, id, &request_id) {
        Arrival::Ready(Ok(prepared)) => Phase::enqueueing(&state, prepared, &connection),
        Arrival::Ready(Err(refused)) => Phase::Failed(Some(refused)),
        Arrival::Reading(reading) => Phase::Reading(reading),
    };
    Handling {
        state,
        request_id,
        started: Instant::now(),
        version,
        head,
        connection,
        phase,
    }
    .instrument(span)
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One request from arrival to response; see [`handle`].
pub(crate) struct Handling {
    state: Arc<State>,
    request_id: HeaderValue,
    started: Instant,
    version: http::Version,
    /// A HEAD request: the proxy's own answers go without their body.
    head: bool,
    /// The client connection's activity, which counts queued requests
    /// answered and abandoned.
    connection: Arc<Activity>,
    phase: Phase,
}

/// Why a request is answered by the proxy itself, and the part of its body
/// not read when that was decided (kept until the answer is sent; see
/// [`Answer::early`]).
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) error: ProxyError,
    pub(crate) unread: Option<Incoming>,
}

impl Refused {
    pub(crate) fn early(error: ProxyError, unread: Incoming) -> Self {
        Self {
            error,
            unread: Some(unread),
        }
    }
}

impl From<ProxyError> for Refused {
    fn from(error: ProxyError) -> Self {
        Self {
            error,
            unread: None,
        }
    }
}

pub(crate) enum Phase {
    /// Reading the body, then preparing the envelope.
    Reading(BoxFuture<Result<Prepared, Refused>>),
    /// Pushing the encoded envelope.
    Enqueueing(BoxFuture<Result<(), ProxyError>>, Waiting),
    /// In the queue until the reply or the hold deadline.
    Waiting(Waiting, Pin<Box<tokio::time::Sleep>>),
    /// Failed before reaching the queue.
    Failed(Option<Refused>),
    /// Answered.
    Done,
}

/// What waiting for the reply takes.
pub(crate) struct Waiting {
    pub(crate) waiter: crate::replies::Waiter,
    /// The request's share of the waiting budget, held until it is answered.
    pub(crate) reservation: crate::budget::Reservation,
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) head_request: bool,
    pub(crate) enqueued_ms: u64,
    /// For a request whose body streams: when the body last moved, which
    /// puts the answer's due time after the deadline while it moves.
    pub(crate) progress: Option<crate::upload::Progress>,
    /// For a WebSocket handshake: the client's connection, taken over
    /// when the socket opens.
    pub(crate) socket: Option<Box<crate::socket::Opening>>,
}

impl Phase {
    /// Pushing `prepared`; the sender of its streamed body, if it has one,
    /// starts now (on `connection`'s tasks) and waits for a dispatcher.
    pub(crate) fn enqueueing(
        state: &Arc<State>,
        prepared: Prepared,
        connection: &Activity,
    ) -> Self {
        let Prepared {
            payload,
            may_repeat,
            waiting,
            upload,
        } = prepared;
        if let Some(pump) = upload {
            connection.spawn(pump.run());
        }
        let push = Box::pin(enqueue(Arc::clone(state), payload, may_repeat));
        Phase::Enqueueing(push, waiting)
    }
}

impl Future for Handling {
    type Output = Response<Answer>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = loop {
            match &mut this.phase {
                Phase::Reading(reading) => match ready!(reading.as_mut().poll(cx)) {
                    Ok(prepared) => {
                        this.phase = Phase::enqueueing(&this.state, prepared, &this.connection);
                    }
                    Err(refused) => break Err(refused),
                },
                Phase::Enqueueing(push, _) => match ready!(push.as_mut().poll(cx)) {
                    Ok(()) => {
                        let Phase::Enqueueing(_, waiting) =
                            std::mem::replace(&mut this.phase, Phase::Done)
                        else {
                            unreachable!("matched above")
                        };
                        let timer = Box::pin(tokio::time::sleep_until(waiting.deadline));
                        this.phase = Phase::Waiting(waiting, timer);
                    }
                    Err(err) => break Err(err.into()),
                },
                Phase::Waiting(waiting, timer) => {
                    if let Poll::Ready(reply) = waiting.waiter.poll_recv(cx) {
                        this.connection.queued_answered();
                        tracing::debug!(waited = ?Duration::from_millis(now_ms().saturating_sub(waiting.enqueued_ms)), "reply received");
                        break match reply {
                            None => Err(ProxyError::ReaderGone.into()),
                            Some(Delivered::Complete(reply)) => {
                                build_response(&reply, waiting.head_request)
                                    .map(Answer::complete)
                                    .map_err(Refused::from)
                            }
                            Some(Delivered::Refused(refused)) => Err(refused),
                            Some(Delivered::Socket(head, inbox)) => {
                                let accepted = match waiting.socket.take() {
                                    Some(opening) => crate::socket::accept(
                                        &this.state,
                                        *opening,
                                        head.clone(),
                                        inbox,
                                        &this.connection,
                                    ),
                                    None => Err(ProxyError::InterimStatus(head.status)),
                                };
                                if accepted.is_err() {
                                    // The dispatcher's side must not stay open.
                                    this.state.demux.cancel_socket(&head);
                                }
                                accepted.map(Answer::complete).map_err(Refused::from)
                            }
                            Some(Delivered::Stream(head, frames, buffered)) => {
                                let key = waiting.waiter.id();
                                stream_response(&this.state, head, frames, buffered, key)
                                    .map(Answer::streamed)
                                    .map_err(Refused::from)
                            }
                        };
                    }
                    ready!(timer.as_mut().poll(cx));
                    let idle = this.state.config.stream_idle_timeout;
                    if let Some(due) = waiting
                        .progress
                        .as_ref()
                        .and_then(|p| p.due_after(waiting.deadline, idle))
                    {
                        // A streamed body still moving: not due yet.
                        timer.as_mut().reset(due);
                        continue;
                    }
                    break Err(ProxyError::HoldExpired.into());
                }
                Phase::Failed(refused) => {
                    break Err(refused
                        .take()
                        .unwrap_or_else(|| ProxyError::ReaderGone.into()));
                }
                // Never polled again once it has answered (hyper drops it).
                Phase::Done => return Poll::Pending,
            }
        };
        // Gives back the budget reservation and the waiter at once.
        this.phase = Phase::Done;
        Poll::Ready(finish(
            &this.state,
            result,
            this.request_id.clone(),
            this.started,
            this.version,
            this.head,
            &this.connection,
        ))
    }
}

/// A request whose client went away (closed the connection, reset the
/// stream) after it was queued: its envelope still waits in Redis, so it
/// keeps its share of the waiting budget until it has been answered (its
/// reply comes back and is discarded) or its deadline passes. Otherwise a
/// client could fill Redis past `--max-waiting` and `--max-waiting-bytes`
/// by hanging up and coming back.
impl Drop for Handling {
    fn drop(&mut self) {
        let (Phase::Enqueueing(_, waiting) | Phase::Waiting(waiting, _)) =
            std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return;
        };
        let Waiting {
            mut waiter,
            reservation,
            deadline,
            ..
        } = waiting;
        tracing::debug!("client gone; its share of the budget is kept until it is answered");
        self.connection.queued_abandoned();
        let closing = self.connection.closing();
        self.connection.spawn(async move {
            let answered = std::future::poll_fn(|cx| waiter.poll_recv(cx));
            // Once the proxy closes its connections, no budget matters.
            tokio::select! {
                _ = tokio::time::timeout_at(deadline, answered) => {}
                () = closing.cancelled() => {}
            }
            drop(reservation);
        });
    }
}

/// The response for `result`, with the request id; logs the outcome.
pub(crate) fn finish(
    state: &State,
    result: Result<Response<Answer>, Refused>,
    request_id: HeaderValue,
    started: Instant,
    version: http::Version,
    head: bool,
    connection: &Activity,
) -> Response<Answer> {
    let mut resp = match result {
        Ok(resp) => resp,
        Err(Refused { error: err, unread }) => {
            let failure = err.failure();
            if failure == Failure::HoldExpired {
                state.metrics.expired();
            }
            match failure {
                // The operator's choice: expected, and counted.
                _ if matches!(err, ProxyError::Maintenance(_)) => {
                    tracing::debug!(error = %err, "request refused")
                }
                Failure::BadRequest
                | Failure::NotImplemented
                | Failure::HeaderFieldsTooLarge
                | Failure::ClientTimeout
                | Failure::BodyTooLarge
                | Failure::HoldExpired
                | Failure::Overloaded
                | Failure::UpgradeNotSupported
                | Failure::BadHandshake
                | Failure::WebSocketVersion
                | Failure::TooManyWebSockets => {
                    // The client's doing or the hold budget: per request,
                    // so DEBUG (the metrics count them).
                    tracing::debug!(error = %err, "request failed")
                }
                _ => {
                    tracing::warn!(
                        error = %err,
                        cause = std::error::Error::source(&err).map_or_else(String::new, ToString::to_string),
                        "request failed"
                    )
                }
            }
            let mut resp = error_response(&err);
            if head {
                // RFC 9110 section 9.3.2: the fields of the answer a GET
                // would get, no content (hyper strips it only on HTTP/1).
                *resp.body_mut() = http_body_util::Full::default();
            }
            match unread {
                Some(body) => Answer::early(resp, body, version, connection),
                None => Answer::complete(resp),
            }
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    let elapsed = started.elapsed();
    state.metrics.answered(resp.status().as_u16(), elapsed);
    tracing::debug!(
        status = resp.status().as_u16(),
        elapsed_ms = elapsed.as_millis() as u64,
        "answered"
    );
    resp
}
