//! One request: read the body, enqueue the envelope, wait for the reply.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use anteroom_protocol::{Failure, RequestEnvelope, ResponseEnvelope, now_ms, strip_hop_by_hop};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::budget::Reservation;
use crate::config::ProxyConfig;
use crate::enqueue::{Enqueuer, PushError};
use crate::error::{ProxyError, failure_response};
use crate::linger::{Activity, Answer};
use crate::replies::Demux;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Forwarding headers the proxy does not set, removed from requests: a
/// client could otherwise claim another host, port, path prefix or address
/// to an app that trusts its proxy. (`X-Forwarded-For` is appended to and
/// `X-Forwarded-Proto` replaced; see docs/behaviour.md.)
const UNTRUSTED_FORWARDING: [&str; 5] = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
];

/// Longest client-supplied `X-Request-Id` kept; longer or non-visible ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 200;

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
    pub(crate) metrics: anteroom_metrics::ProxyQueueMetrics,
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
    let phase = match arrive(&state, req, client, id, &request_id) {
        Arrival::Ready(Ok(prepared)) => Phase::enqueueing(&state, prepared),
        Arrival::Ready(Err(refused)) => Phase::Failed(Some(refused)),
        Arrival::Reading(reading) => Phase::Reading(reading),
    };
    Handling {
        state,
        request_id,
        started: Instant::now(),
        version,
        connection,
        phase,
    }
    .instrument(span)
}

pub(crate) fn usable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| c.is_ascii_graphic())
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One request from arrival to response; see [`handle`].
pub(crate) struct Handling {
    state: Arc<State>,
    request_id: HeaderValue,
    started: Instant,
    version: http::Version,
    /// The client connection's activity, which counts queued requests
    /// answered and abandoned.
    connection: Arc<Activity>,
    phase: Phase,
}

/// Why a request is answered by the proxy itself, and the part of its body
/// not read when that was decided (kept until the answer is sent; see
/// [`Answer::early`]).
struct Refused {
    error: ProxyError,
    unread: Option<Incoming>,
}

impl Refused {
    fn early(error: ProxyError, unread: Incoming) -> Self {
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

enum Phase {
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
struct Waiting {
    waiter: crate::replies::Waiter,
    /// The request's share of the waiting budget, held until it is answered.
    reservation: crate::budget::Reservation,
    deadline: tokio::time::Instant,
    head_request: bool,
    enqueued_ms: u64,
}

impl Phase {
    fn enqueueing(state: &Arc<State>, prepared: Prepared) -> Self {
        let Prepared {
            payload,
            may_repeat,
            waiting,
        } = prepared;
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
                    Ok(prepared) => this.phase = Phase::enqueueing(&this.state, prepared),
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
                        break reply
                            .ok_or(ProxyError::ReaderGone)
                            .and_then(|reply| build_response(&reply, waiting.head_request))
                            .map_err(Refused::from);
                    }
                    ready!(timer.as_mut().poll(cx));
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
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let answered = std::future::poll_fn(|cx| waiter.poll_recv(cx));
                let _ = tokio::time::timeout_at(deadline, answered).await;
                drop(reservation);
            });
        }
    }
}

/// The response for `result`, with the request id; logs the outcome.
fn finish(
    state: &State,
    result: Result<Response<Full<Bytes>>, Refused>,
    request_id: HeaderValue,
    started: Instant,
    version: http::Version,
) -> Response<Answer> {
    let mut resp = match result {
        Ok(resp) => Answer::complete(resp),
        Err(Refused { error: err, unread }) => {
            let failure = err.failure();
            if failure == Failure::HoldExpired {
                state.metrics.expired();
            }
            match failure {
                Failure::BadRequest
                | Failure::NotImplemented
                | Failure::HeaderFieldsTooLarge
                | Failure::ClientTimeout
                | Failure::BodyTooLarge
                | Failure::HoldExpired
                | Failure::Overloaded => {
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
            let resp = failure_response(failure);
            match unread {
                Some(body) => Answer::early(resp, body, version),
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

/// A request turned into what the proxy keeps of it: at once when it has
/// no body, after reading the body otherwise.
enum Arrival {
    Ready(Result<Prepared, Refused>),
    Reading(BoxFuture<Result<Prepared, Refused>>),
}

fn arrive(
    state: &Arc<State>,
    req: Request<Incoming>,
    client: SocketAddr,
    id: uuid::Uuid,
    request_id: &HeaderValue,
) -> Arrival {
    let (parts, body) = req.into_parts();
    let refuse = |error, body| refuse(error, body, parts.version, state.config.body_read_timeout);
    // hyper enforces --max-headers on HTTP/1 heads; HTTP/2 only bounds
    // their size.
    if parts.headers.len() > state.config.max_headers {
        let fields = ProxyError::TooManyFields(parts.headers.len(), state.config.max_headers);
        return refuse(fields, body);
    }
    if let Err(problem) = check_host(&parts.headers, parts.version, &parts.uri) {
        return refuse(ProxyError::BadHost(problem), body);
    }
    if let Err(err) = check_transfer_coding(&parts.headers) {
        return refuse(err, body);
    }
    if parts.method == Method::CONNECT {
        return refuse(ProxyError::Connect, body);
    }
    if has_dot_segments(parts.uri.path()) {
        return refuse(ProxyError::DotSegments, body);
    }
    let limit = state.config.max_body;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return refuse(ProxyError::BodyTooLarge { limit }, body);
    }
    // The waiting budget is reserved on arrival, for the declared length
    // (at most `limit`), and charged as bytes arrive when there is none
    // (chunked): over it, 503 before the body is read, not after.
    let reservation = match state.budget.reserve(declared.unwrap_or(0) as usize) {
        Ok(reservation) => reservation,
        Err((waiting, bytes)) => return refuse(ProxyError::Overloaded { waiting, bytes }, body),
    };
    if body.is_end_stream() {
        // No body (most GETs): nothing to read or time.
        return Arrival::Ready(Ok(prepare(
            state,
            parts,
            Bytes::new(),
            reservation,
            client,
            id,
            request_id,
        )));
    }
    let (state, request_id) = (Arc::clone(state), request_id.clone());
    Arrival::Reading(Box::pin(async move {
        let mut reservation = reservation;
        let body = read_body(
            body,
            limit,
            state.config.body_read_timeout,
            &mut reservation,
        )
        .await?;
        Ok(prepare(
            &state,
            parts,
            body,
            reservation,
            client,
            id,
            &request_id,
        ))
    }))
}

/// Whether `path` has a `.` or `..` segment, plain or percent-encoded
/// (`%2e`), between `/` or `%2F`. Clients resolve them before sending (RFC
/// 3986 §5.2.4) and apps read them differently (some resolve them, some
/// serve them literally), so the path a route matched and the path the app
/// reads could differ: such targets get 400.
pub(crate) fn has_dot_segments(path: &str) -> bool {
    if !path.contains('.') && !path.contains("%2") {
        return false;
    }
    let lower = path
        .to_ascii_lowercase()
        .replace("%2e", ".")
        .replace("%2f", "/");
    lower
        .split('/')
        .any(|segment| segment == "." || segment == "..")
}

/// Whether `host` names the same host and port as `authority`, after RFC
/// 3986 §6.2 normalisation: case, a trailing dot, the scheme's default port.
fn same_origin_host(authority: &http::uri::Authority, host: &HeaderValue, uri: &http::Uri) -> bool {
    let Some(host) = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
    else {
        return false;
    };
    let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    let name = |a: &http::uri::Authority| a.host().trim_end_matches('.').to_ascii_lowercase();
    name(authority) == name(&host)
        && authority.port_u16().unwrap_or(default_port) == host.port_u16().unwrap_or(default_port)
}

/// Most body bytes read and discarded to answer a refused HTTP/1 request
/// on a connection that then stays open (as nginx discards a body before
/// an error page). A larger or chunked body is left unread and the
/// connection closed after the answer, lingering (`linger.rs`).
const DISCARD_MAX: u64 = 64 * 1024;

/// Refuses a request with `error`. Over HTTP/1 a body of known length up
/// to [`DISCARD_MAX`] is read and discarded first (within `timeout`, as a
/// body is read), so a client with a small `POST` keeps its connection;
/// otherwise the answer is early (see [`Answer::early`]).
fn refuse(error: ProxyError, body: Incoming, version: http::Version, timeout: Duration) -> Arrival {
    let small = body.size_hint().upper().is_some_and(|n| n <= DISCARD_MAX);
    if version >= http::Version::HTTP_2 || body.is_end_stream() || !small {
        return Arrival::Ready(Err(Refused::early(error, body)));
    }
    Arrival::Reading(Box::pin(async move {
        let mut body = body;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(_))) => {}
                // All read, or the connection is broken (hyper closes it).
                Ok(None | Some(Err(_))) => return Err(Refused::from(error)),
                Err(_) => return Err(Refused::early(error, body)),
            }
        }
    }))
}

/// RFC 9112 §3.2: a server answers 400 to an HTTP/1.1 request without a
/// `Host` field, and to any request with more than one `Host` line or a
/// `Host` that is not `host[:port]` (an empty value is allowed, for targets
/// without an authority). HTTP/1.0 may omit it; HTTP/2 carries
/// `:authority` instead and may omit it too, but a `Host` beside an
/// `:authority` that names another host is malformed (RFC 9113 §8.3.1).
fn check_host(
    headers: &HeaderMap,
    version: http::Version,
    uri: &http::Uri,
) -> Result<(), &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err("more than one Host field (RFC 9112 section 3.2)"),
        (Some(host), None)
            if version >= http::Version::HTTP_2
                && uri
                    .authority()
                    .is_some_and(|a| !same_origin_host(a, host, uri)) =>
        {
            Err("Host differs from :authority (RFC 9113 section 8.3.1)")
        }
        (None, _) if version == http::Version::HTTP_11 => {
            Err("HTTP/1.1 request without a Host field (RFC 9112 section 3.2)")
        }
        (Some(host), None) => {
            let valid = host.is_empty()
                || host
                    .to_str()
                    .ok()
                    .and_then(|h| h.parse::<http::uri::Authority>().ok())
                    .is_some_and(|a| {
                        // host [ ":" port ], port = *DIGIT (RFC 3986 §3.2.3)
                        let port = a.as_str().strip_prefix(a.host());
                        !a.as_str().contains('@')
                            && port.is_some_and(|p| {
                                p.is_empty()
                                    || p.strip_prefix(':')
                                        .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
                            })
                    });
            if valid {
                Ok(())
            } else {
                Err("invalid Host field (RFC 9112 section 3.2)")
            }
        }
        (None, _) => Ok(()),
    }
}

/// RFC 9112 §6.1: `chunked` is the only transfer coding the proxy
/// implements, so any other gets 501, and `chunked` applied twice gets
/// 400. hyper has already refused (400) a `Transfer-Encoding` whose last
/// coding is not `chunked`, and one in an HTTP/1.0 request, and dropped a
/// `Content-Length` sent beside it (§6.3; such a connection is closed after
/// the response). HTTP/2 has no `Transfer-Encoding` (RFC 9113 §8.2.2).
fn check_transfer_coding(headers: &HeaderMap) -> Result<(), ProxyError> {
    let codings: Vec<String> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| String::from_utf8_lossy(c).trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    let Some((_last, before)) = codings.split_last() else {
        return Ok(());
    };
    match before.iter().find(|c| c.as_str() != "chunked") {
        Some(other) => Err(ProxyError::UnsupportedCoding(other.clone())),
        None if !before.is_empty() => Err(ProxyError::ChunkedTwice),
        None => Ok(()),
    }
}

/// A request ready for the queue: its encoded envelope, and what waiting
/// for the reply takes.
struct Prepared {
    payload: Bytes,
    /// Whether pushing it twice is harmless: the envelope is `dedupe`, or
    /// the request is safe to repeat.
    may_repeat: bool,
    waiting: Waiting,
}

/// Builds and encodes the envelope and registers the waiter; the request
/// keeps `reservation` until it is answered. Synchronous: nothing here
/// waits.
fn prepare(
    state: &State,
    parts: http::request::Parts,
    body: Bytes,
    reservation: Reservation,
    client: SocketAddr,
    id: uuid::Uuid,
    request_id: &HeaderValue,
) -> Prepared {
    let mut id_buf = uuid::Uuid::encode_buffer();
    let id_text: &str = id.hyphenated().encode_lower(&mut id_buf);
    let head_request = parts.method == Method::HEAD;
    let hold = state.hold;
    let now = now_ms();
    let envelope = envelope_for(
        parts,
        body,
        Route {
            client,
            id: id_text,
            request_id,
            reply_to: &state.reply_key,
            now_ms: now,
            hold,
            dedupe: !state.config.enqueue_timeout.is_zero(),
        },
    );
    Prepared {
        payload: Bytes::from(envelope.encode()),
        may_repeat: envelope.dedupe || envelope.is_safe_to_repeat(),
        waiting: Waiting {
            // Registered before enqueueing: a fast dispatcher may answer at once.
            waiter: state.demux.register(id),
            reservation,
            deadline: tokio::time::Instant::now() + hold,
            head_request,
            enqueued_ms: now,
        },
    }
}

/// The body, read within `timeout` (in all) and at most `limit` bytes,
/// each byte charged to `reservation` beyond what it already holds.
/// Trailers are dropped: the envelope carries none. Refused with what is
/// left of the body when the time, the limit or the budget runs out.
async fn read_body(
    mut body: Incoming,
    limit: usize,
    timeout: Duration,
    reservation: &mut Reservation,
) -> Result<Bytes, Refused> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(Refused::early(ProxyError::BodyTimeout(timeout), body)),
            Ok(None) => break,
            Ok(Some(Err(err))) => return Err(ProxyError::BodyRead(Box::new(err)).into()),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len();
        if received > limit {
            return Err(Refused::early(ProxyError::BodyTooLarge { limit }, body));
        }
        if let Some(more) = received.checked_sub(reservation.bytes()).filter(|n| *n > 0) {
            if let Err((waiting, bytes)) = reservation.grow(more) {
                return Err(Refused::early(
                    ProxyError::Overloaded { waiting, bytes },
                    body,
                ));
            }
        }
        chunks.push(data);
    }
    Ok(match chunks.len() {
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Pushes the envelope through the enqueuer (one LPUSH per batch, then
/// `WAIT` for a replica when durable). While Redis is away, retries for up
/// to the enqueue timeout: always when no connection could be made (nothing
/// was sent), and after an ambiguous failure (the push may have happened)
/// only when `may_repeat`, so an unsafe request is never queued twice.
async fn enqueue(state: Arc<State>, payload: Bytes, may_repeat: bool) -> Result<(), ProxyError> {
    let give_up = tokio::time::Instant::now() + state.config.enqueue_timeout.min(state.hold);
    let mut backoff = anteroom_redis::Backoff::new();
    loop {
        let PushError { error, never_sent } = match state.enqueuer.push(payload.clone()).await {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        let delay = backoff.next_delay();
        // A repeated push of a `dedupe` envelope runs at most once.
        if !(never_sent || may_repeat) || tokio::time::Instant::now() + delay >= give_up {
            return Err(ProxyError::Enqueue(error));
        }
        tracing::debug!(%error, "enqueue failed; retrying");
        // Boxed: only a retrying request pays for a timer.
        Box::pin(tokio::time::sleep(delay)).await;
    }
}

/// Where a request goes and on whose behalf: everything besides the
/// request itself that its envelope records.
pub(crate) struct Route<'a> {
    pub(crate) client: SocketAddr,
    pub(crate) id: &'a str,
    pub(crate) request_id: &'a HeaderValue,
    pub(crate) reply_to: &'a str,
    pub(crate) now_ms: u64,
    pub(crate) hold: Duration,
    /// Whether enqueues may be repeated (see `RequestEnvelope::dedupe`).
    pub(crate) dedupe: bool,
}

/// The envelope for a request: hop-by-hop headers removed, forwarding
/// headers set, deadline `hold` from now. Pure, so it can be fuzzed.
pub(crate) fn envelope_for(
    parts: http::request::Parts,
    body: Bytes,
    route: Route<'_>,
) -> RequestEnvelope {
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    for name in UNTRUSTED_FORWARDING {
        headers.remove(name);
    }
    if parts.version >= http::Version::HTTP_2 {
        join_cookies(&mut headers);
    }
    if parts.version < http::Version::HTTP_2 {
        // RFC 9112 §3.2.2: with an absolute-form target, the target's
        // authority is the host; a Host field that disagrees is ignored.
        if let Some(value) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, value);
        }
    }
    prepare_forwarded_headers(&mut headers, &parts.uri, route.client, route.request_id);
    RequestEnvelope {
        id: route.id.to_owned(),
        method: parts.method.as_str().to_owned(),
        uri: origin_form(&parts.uri),
        version: parts.version.into(),
        headers: anteroom_protocol::headers_from_map(&headers),
        body,
        reply_to: route.reply_to.to_owned(),
        client_addr: Some(route.client.to_string()),
        enqueued_at_ms: route.now_ms,
        deadline_ms: route
            .now_ms
            .saturating_add(u64::try_from(route.hold.as_millis()).unwrap_or(u64::MAX)),
        dedupe: route.dedupe,
    }
}

/// The request target in origin form: the path (`/` when empty, as in the
/// absolute-form `http://host?x`) and the query.
fn origin_form(uri: &http::Uri) -> String {
    let path = match uri.path() {
        "" => "/",
        path => path,
    };
    match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    }
}

/// HTTP/2 may split `cookie` into one field per pair (RFC 9113 §8.2.3);
/// forwarded as HTTP/1.1 they must be one field again, joined with `"; "`,
/// or an app that joins repeated fields with `","` (RFC 9110 §5.3) reads
/// `a=1,b=2` as one cookie.
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Sets `X-Request-Id`, appends the client to `X-Forwarded-For`, sets
/// `X-Forwarded-Proto` to this hop's scheme, and fills in `Host` from the
/// authority of HTTP/2 requests.
fn prepare_forwarded_headers(
    headers: &mut HeaderMap,
    uri: &http::Uri,
    client: SocketAddr,
    request_id: &HeaderValue,
) {
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    // Every prior line, in order (a load balancer may add its own line
    // rather than append to the client's: RFC 9110 §5.3 makes them one
    // list), then this hop's client.
    let ip = client.ip().to_string();
    let mut hops: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    hops.push(&ip);
    let forwarded_for = hops.join(", ");
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if !headers.contains_key(header::HOST) {
        if let Some(value) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, value);
        }
    }
}

pub(crate) fn build_response(
    reply: &ResponseEnvelope,
    head_request: bool,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let resp = reply.to_http().map_err(ProxyError::BadReply)?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !head_request {
        // hyper sets Content-Length from the body; a stale value would break framing.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(parts, Full::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        let uri: http::Uri = "/".parse().unwrap();
        let rid = HeaderValue::from_static("abc");
        prepare_forwarded_headers(&mut h, &uri, "192.0.2.7:4000".parse().unwrap(), &rid);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], "abc");
    }

    #[test]
    fn every_prior_forwarded_for_line_is_kept_in_order() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "198.51.100.1".parse().unwrap());
        h.append(
            "x-forwarded-for",
            "203.0.113.2, 203.0.113.3".parse().unwrap(),
        );
        h.append("x-forwarded-for", " ".parse().unwrap());
        let uri: http::Uri = "/".parse().unwrap();
        let rid = HeaderValue::from_static("abc");
        prepare_forwarded_headers(&mut h, &uri, "192.0.2.7:4000".parse().unwrap(), &rid);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(
            h["x-forwarded-for"],
            "198.51.100.1, 203.0.113.2, 203.0.113.3, 192.0.2.7"
        );
    }

    #[test]
    fn host_rules_of_rfc_9112() {
        let req = |version, hosts: &[&str]| {
            let mut b = Request::get("/x").version(version);
            for h in hosts {
                b = b.header("host", *h);
            }
            b.body(()).unwrap()
        };
        use http::Version;
        let check = |r: Request<()>| check_host(r.headers(), r.version(), r.uri());
        assert!(check(req(Version::HTTP_11, &["example.org"])).is_ok());
        assert!(check(req(Version::HTTP_11, &["example.org:8080"])).is_ok());
        assert!(check(req(Version::HTTP_11, &["[::1]:80"])).is_ok());
        assert!(check(req(Version::HTTP_11, &[""])).is_ok());
        assert!(check(req(Version::HTTP_10, &[])).is_ok());
        assert!(check(req(Version::HTTP_2, &[])).is_ok());
        let h2 = |authority: &str, host: &str| {
            let r = Request::get(format!("http://{authority}/x"))
                .version(Version::HTTP_2)
                .header("host", host)
                .body(())
                .unwrap();
            check_host(r.headers(), r.version(), r.uri())
        };
        assert!(h2("example.org", "example.org").is_ok());
        assert!(h2("example.org:8080", "Example.ORG:8080").is_ok());
        assert!(h2("example.org", "other.example").is_err());
        assert!(h2("example.org", "example.org:81").is_err());
        assert!(h2("example.org:80", "example.org").is_ok());
        assert!(h2("example.org", "EXAMPLE.org.:80").is_ok());
        assert!(h2("example.org", "a b").is_err());
        for (version, hosts) in [
            (Version::HTTP_11, &[][..]),
            (Version::HTTP_11, &["a.example", "b.example"][..]),
            (Version::HTTP_10, &["a.example", "a.example"][..]),
            (Version::HTTP_11, &["a b"][..]),
            (Version::HTTP_11, &["user@a.example"][..]),
            (Version::HTTP_11, &["a.example/path"][..]),
            (Version::HTTP_11, &["a.example:port"][..]),
        ] {
            assert!(check(req(version, hosts)).is_err(), "{version:?} {hosts:?}");
        }
    }

    #[test]
    fn dot_segments_are_found_however_spelled() {
        for path in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/.",
            "/a/%2e%2E/b",
            "/a%2f..%2fb",
            "/%2e/x",
        ] {
            assert!(has_dot_segments(path), "{path}");
        }
        for path in [
            "/a/b",
            "/.well-known/x",
            "/a/..b/c",
            "/file.tar.gz",
            "/a%2fb",
            "/...",
        ] {
            assert!(!has_dot_segments(path), "{path}");
        }
    }

    #[test]
    fn only_chunked_is_implemented() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, v.parse().unwrap());
            }
            check_transfer_coding(&h)
        };
        assert!(with(&[]).is_ok());
        assert!(with(&["chunked"]).is_ok());
        assert!(with(&["Chunked"]).is_ok());
        assert!(matches!(
            with(&["gzip, chunked"]),
            Err(ProxyError::UnsupportedCoding(c)) if c == "gzip"
        ));
        assert!(matches!(
            with(&["deflate", "chunked"]),
            Err(ProxyError::UnsupportedCoding(c)) if c == "deflate"
        ));
        assert!(matches!(
            with(&["chunked", "chunked"]),
            Err(ProxyError::ChunkedTwice)
        ));
        assert!(matches!(
            with(&["chunked, gzip, chunked"]),
            Err(ProxyError::UnsupportedCoding(c)) if c == "gzip"
        ));
    }

    #[test]
    fn h2_cookie_fields_become_one() {
        let mut h = HeaderMap::new();
        join_cookies(&mut h);
        assert!(h.get("cookie").is_none());
        h.append("cookie", "a=1".parse().unwrap());
        join_cookies(&mut h);
        assert_eq!(h["cookie"], "a=1");
        h.append("cookie", "b=2".parse().unwrap());
        h.append("cookie", "c=3; d=4".parse().unwrap());
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2; c=3; d=4");
    }

    #[test]
    fn host_comes_from_the_h2_authority() {
        let mut h = HeaderMap::new();
        let uri: http::Uri = "http://example.org:8080/x".parse().unwrap();
        let rid = HeaderValue::from_static("abc");
        prepare_forwarded_headers(&mut h, &uri, "[::1]:4000".parse().unwrap(), &rid);
        assert_eq!(h["host"], "example.org:8080");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    /// Found by the `proxy_request` fuzz target: absolute-form with an
    /// empty path used to give the envelope the target `?b=1`.
    #[test]
    fn targets_are_always_origin_form() {
        for (target, expected) in [
            ("st://a?b=1", "/?b=1"),
            ("http://example.com", "/"),
            ("http://example.com/x/y?z", "/x/y?z"),
            ("/plain?q=1", "/plain?q=1"),
            ("*", "*"),
        ] {
            let uri: http::Uri = target.parse().unwrap();
            let origin = origin_form(&uri);
            assert_eq!(origin, expected, "{target}");
            assert!(
                origin.parse::<http::Uri>().is_ok(),
                "{origin} does not parse"
            );
        }
    }

    #[test]
    fn request_ids_must_be_visible_ascii() {
        assert!(usable_request_id(&HeaderValue::from_static("req-1")));
        assert!(!usable_request_id(&HeaderValue::from_static("")));
        assert!(!usable_request_id(&HeaderValue::from_static("a b")));
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(!usable_request_id(&HeaderValue::from_str(&long).unwrap()));
    }
}
