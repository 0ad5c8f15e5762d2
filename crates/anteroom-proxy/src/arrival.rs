//! A request's arrival: the checks that refuse it, its body read within
//! the limits, its envelope prepared and pushed (retrying within the
//! enqueue timeout when that is safe).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anteroom_protocol::now_ms;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::budget::Reservation;
use crate::enqueue::PushError;
use crate::error::ProxyError;

use crate::checks::{check_host, check_transfer_coding, has_dot_segments};
use crate::handler::{BoxFuture, Refused, State, Waiting};
use crate::translate::{Route, envelope_for};
use crate::upload::{Progress, Pump};

/// A request turned into what the proxy keeps of it: at once when it has
/// no body, after reading the body otherwise.
pub(crate) enum Arrival {
    Ready(Result<Prepared, Refused>),
    Reading(BoxFuture<Result<Prepared, Refused>>),
}

pub(crate) fn arrive(
    state: &Arc<State>,
    req: Request<Incoming>,
    client: SocketAddr,
    id: uuid::Uuid,
    request_id: &HeaderValue,
) -> Arrival {
    let (mut parts, body) = req.into_parts();
    let version = parts.version;
    let refuse = |error, body| refuse(error, body, version, state.config.body_read_timeout);
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
    // Maintenance: answered at once, before the body is read or anything
    // is queued.
    let page = state.maintenance.borrow().as_ref().map(|record| {
        let custom = state.config.maintenance_page.as_ref();
        crate::maintenance::MaintenancePage::new(record, &parts.headers, custom)
    });
    if let Some(page) = page {
        return refuse(ProxyError::Maintenance(Box::new(page)), body);
    }
    let socket = match crate::checks::check_upgrade(&parts.method, parts.version, &parts.headers) {
        Ok(None) => None,
        Ok(Some(key)) => match crate::socket::Opening::new(state, key, &mut parts) {
            Ok(opening) => Some(Box::new(opening)),
            Err(err) => return refuse(err, body),
        },
        Err(err) => return refuse(err, body),
    };
    if has_dot_segments(parts.uri.path()) {
        return refuse(ProxyError::DotSegments, body);
    }
    let limit = state.config.max_body;
    let buffer = state.config.body_buffer.min(limit);
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return refuse(ProxyError::BodyTooLarge { limit }, body);
    }
    // The waiting budget is reserved on arrival, for the part of the body
    // queued (the declared length, at most `buffer`), and charged as bytes
    // arrive when there is none (chunked): over it, 503 before the body is
    // read, not after (for an HTTP/2 body that streams, the stream window
    // it may then send is charged after its first part). What streams is
    // bounded by the dispatcher's window instead.
    let queued = declared.map_or(0, |n| n.min(buffer as u64));
    if state.memory.as_ref().is_some_and(|m| m.over()) {
        state.metrics.shed();
        return refuse(ProxyError::RedisFull, body);
    }
    let reservation = match state.budget.reserve(queued as usize) {
        Ok(reservation) => reservation,
        Err((waiting, bytes)) => return refuse(ProxyError::Overloaded { waiting, bytes }, body),
    };
    if body.is_end_stream() {
        // No body (most GETs): nothing to read or time.
        let part = Part {
            body: Bytes::new(),
            rest: None,
            reservation,
            declared,
            socket,
        };
        return Arrival::Ready(Ok(prepare(state, parts, part, client, id, request_id)));
    }
    // The body is read up to the buffer before the request is queued, even
    // one declared larger: a client must send its first part within the
    // body timeout before its request takes a dispatcher (one that sends
    // only a head could otherwise hold a dispatcher's slot for the idle
    // timeout).
    let (state, request_id) = (Arc::clone(state), request_id.clone());
    Arrival::Reading(Box::pin(async move {
        let mut reservation = reservation;
        let timeout = state.config.body_read_timeout;
        let read = read_body(body, limit, buffer, timeout, &mut reservation).await?;
        let (body, rest) = match read {
            Read::Whole(body) => (body, None),
            Read::Started(first, rest) => {
                // While it waits, HTTP/2 flow control lets the client send
                // a stream window more, which the proxy holds.
                if parts.version >= http::Version::HTTP_2 {
                    let window = crate::connection::H2_STREAM_WINDOW as usize;
                    if let Err((waiting, bytes)) = reservation.grow(window) {
                        let error = ProxyError::Overloaded { waiting, bytes };
                        return Err(Refused::early(error, rest));
                    }
                }
                (first, Some(rest))
            }
        };
        let part = Part {
            body,
            rest,
            reservation,
            declared,
            socket: None,
        };
        Ok(prepare(&state, parts, part, client, id, &request_id))
    }))
}

/// Most body bytes read and discarded to answer a refused HTTP/1 request
/// on a connection that then stays open (as nginx discards a body before
/// an error page). A larger or chunked body is left unread and the
/// connection closed after the answer, lingering (`linger.rs`).
pub(crate) const DISCARD_MAX: u64 = 64 * 1024;

/// Refuses a request with `error`. Over HTTP/1 a body of known length up
/// to [`DISCARD_MAX`] is read and discarded first (within `timeout`, as a
/// body is read), so a client with a small `POST` keeps its connection;
/// otherwise the answer is early (see [`Answer::early`]).
pub(crate) fn refuse(
    error: ProxyError,
    body: Incoming,
    version: http::Version,
    timeout: Duration,
) -> Arrival {
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

/// A request ready for the queue: its encoded envelope, and what waiting
/// for the reply takes.
pub(crate) struct Prepared {
    pub(crate) payload: Bytes,
    /// Whether pushing it twice is harmless: the envelope is `dedupe`, or
    /// the request is safe to repeat.
    pub(crate) may_repeat: bool,
    pub(crate) waiting: Waiting,
    /// The sender of the rest of its body, when the body streams (boxed:
    /// most requests have none).
    pub(crate) upload: Option<Box<Pump>>,
}

/// What of a request's body goes in its envelope.
pub(crate) struct Part {
    /// The body, or its first part.
    pub(crate) body: Bytes,
    /// The rest of it, not read yet, when it streams.
    pub(crate) rest: Option<Incoming>,
    /// The request's share of the waiting budget.
    pub(crate) reservation: Reservation,
    /// The body's `Content-Length`, if the client declared one.
    pub(crate) declared: Option<u64>,
    /// For a WebSocket handshake (which has no body): its connection,
    /// to be taken over when the socket opens.
    pub(crate) socket: Option<Box<crate::socket::Opening>>,
}

/// Builds and encodes the envelope and registers the waiter (and the
/// sender of a streamed body); the request keeps its reservation until it
/// is answered. Synchronous: nothing here waits.
pub(crate) fn prepare(
    state: &Arc<State>,
    parts: http::request::Parts,
    part: Part,
    client: SocketAddr,
    id: uuid::Uuid,
    request_id: &HeaderValue,
) -> Prepared {
    let Part {
        body,
        rest,
        reservation,
        declared,
        socket,
    } = part;
    let inline = body.len() as u64;
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
            stream: true,
            body_follows: rest.is_some(),
            websocket: socket.is_some(),
        },
    );
    // Registered before enqueueing: a fast dispatcher may answer at once.
    let waiter = match socket {
        Some(_) => state.demux.register_handshake(id),
        None => state.demux.register(id),
    };
    let progress = rest.as_ref().map(|_| Progress::default());
    let upload = rest.zip(progress.clone()).map(|(body, progress)| {
        Box::new(Pump {
            state: Arc::clone(state),
            key: waiter.id(),
            body,
            inline,
            declared,
            events: state.demux.register_upload(waiter.id()),
            progress,
        })
    });
    Prepared {
        payload: Bytes::from(envelope.encode_as(state.config.envelope_version)),
        may_repeat: envelope.dedupe || envelope.is_safe_to_repeat(),
        upload,
        waiting: Waiting {
            waiter,
            reservation,
            deadline: tokio::time::Instant::now() + hold,
            head_request,
            enqueued_ms: now,
            progress,
            socket,
        },
    }
}

/// What [`read_body`] read.
pub(crate) enum Read {
    /// The whole body.
    Whole(Bytes),
    /// Its first part, over the buffer, and the rest, not read yet.
    Started(Bytes, Incoming),
}

/// The body, read within `timeout` (in all) and at most `limit` bytes,
/// each byte charged to `reservation` beyond what it already holds; past
/// `buffer` bytes, what was read and the rest (it streams). Trailers are
/// dropped: the envelope carries none. Refused with what is left of the
/// body when the time, the limit or the budget runs out.
pub(crate) async fn read_body(
    mut body: Incoming,
    limit: usize,
    buffer: usize,
    timeout: Duration,
    reservation: &mut Reservation,
) -> Result<Read, Refused> {
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
        if received > buffer && !body.is_end_stream() {
            return Ok(Read::Started(join(chunks), body));
        }
    }
    Ok(Read::Whole(join(chunks)))
}

fn join(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    }
}

/// Pushes the envelope through the enqueuer (one LPUSH per batch, then
/// `WAIT` for a replica when durable). While Redis is away, retries for up
/// to the enqueue timeout: always when no connection could be made (nothing
/// was sent), and after an ambiguous failure (the push may have happened)
/// only when `may_repeat`, so an unsafe request is never queued twice.
///
/// A push that may have happened is never answered as failed: Redis may
/// have applied it while its reply was lost (a cut connection, a command
/// timeout during a partition whose LPUSH lands after the heal), and a
/// dispatcher would then run a request whose client had been told it
/// failed. Such a request waits for its reply like any queued one (`Ok`):
/// answered if it landed, `504` at its deadline if not, and a dispatcher
/// never starts a request past its deadline (docs/protocol.md, "Lost
/// replies"). A push cut off by the server going away (it refuses the
/// reconnection at once) counts as not sent (`enqueue::push_batch`).
pub(crate) async fn enqueue(
    state: Arc<State>,
    payload: Bytes,
    may_repeat: bool,
) -> Result<(), ProxyError> {
    let give_up = tokio::time::Instant::now() + state.config.enqueue_timeout.min(state.hold);
    let mut backoff = anteroom_redis::Backoff::new();
    let mut maybe_queued = false;
    loop {
        let PushError {
            error,
            never_sent,
            stopped,
        } = match state.enqueuer.push(payload.clone()).await {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        let delay = backoff.next_delay();
        if anteroom_redis::is_out_of_memory(&error) {
            // Redis is full: a definite answer (it refused the whole LPUSH,
            // nothing landed), not an outage to wait out. Full until the
            // next reading of its memory says otherwise.
            if let Some(memory) = &state.memory {
                memory.refused();
            }
            if maybe_queued {
                // An earlier attempt may have landed.
                return Ok(());
            }
            return Err(ProxyError::RedisFull);
        }
        maybe_queued |= !never_sent;
        // A repeated push of a `dedupe` envelope runs at most once.
        let give_up_now = stopped
            || !(never_sent || may_repeat)
            || tokio::time::Instant::now() + delay >= give_up;
        if give_up_now && maybe_queued {
            tracing::warn!(%error, "enqueue outcome unknown (the push may have landed); waiting for a reply until the deadline");
            return Ok(());
        }
        if give_up_now {
            return Err(ProxyError::Enqueue(error));
        }
        tracing::debug!(%error, "enqueue failed; retrying");
        // Boxed: only a retrying request pays for a timer.
        Box::pin(tokio::time::sleep(delay)).await;
    }
}
