//! WebSockets on the dispatcher's side (docs/protocol.md, "WebSockets").
//!
//! A handshake (kind `'W'`) is run like any request, within its deadline,
//! but always over a real HTTP/1.1 connection with upgrades: the service
//! is served by hyper on one end of an in-memory pipe and asked by hyper's
//! client on the other, so an in-process axum `WebSocketUpgrade` handler
//! works as is, and [`crate::Upstream`] joins its upstream's upgraded
//! connection to the pipe. An answer other than 101 is the handshake's
//! answer. On 101 (with the right `Sec-WebSocket-Accept`), the dispatcher
//! pushes a stream head of status 101, gives back the request's
//! concurrency slot (an open socket is not a running request: it neither
//! holds a slot nor delays a pause), and relays messages
//! ([`anteroom_socket::Relay`]) until either side closes. The socket's
//! last frame, its close, goes after its last message on the same writer;
//! then the request is removed from the processing list. When the grace
//! period of a stop ends, open sockets close with 1012 (service restart);
//! a proxy that stops beating closes them with 1011.

use std::sync::{Arc, Mutex, PoisonError};

use anteroom_control::queue::{self, Done};
use anteroom_protocol::{
    Failure, RequestEnvelope, ResponseEnvelope, StreamHead, headers_from_map, now_ms,
    strip_hop_by_hop,
};
use anteroom_socket::{Relay, Role, codes};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tower::ServiceExt;

use crate::Body;
use crate::error::BoxError;
use crate::handle::with_retries;
use crate::worker::{HttpService, ResponseBody, Shared};

/// Bytes the in-memory pipe between the dispatcher and the app buffers
/// each way.
const PIPE: usize = 64 * 1024;

/// How the service failed a handshake, as any request's failure is
/// classified (hyper's server only closes the pipe, so it is kept aside).
struct Failed {
    /// A transport failure of the upstream, and whether it never received
    /// the handshake.
    transport: Option<(crate::error::FailureReason, bool)>,
    /// The error and its causes, on one line.
    described: String,
}

/// How a handshake went.
pub(crate) enum Opened {
    /// The app opened the socket: its 101 head, and the socket.
    Socket(
        http::response::Parts,
        Box<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>>,
    ),
    /// The app answered otherwise (or failed): the handshake's answer.
    Answer(ResponseEnvelope),
    /// The upstream never received it (it is restarting, say): back to
    /// the front of the queue, as any request (the health gate closes).
    Requeue,
}

/// Runs handshake `envelope` against `service`: [`Opened::Socket`] when it
/// answers 101 with the right `Sec-WebSocket-Accept` (RFC 6455 section
/// 4.2.2), its answer otherwise (a failure, or a 101 that does not accept
/// the key, is 502).
pub(crate) async fn open<S, B>(shared: &Shared, service: S, envelope: &RequestEnvelope) -> Opened
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let failed = |why: &dyn std::fmt::Display| {
        tracing::warn!(reason = %why, "websocket handshake failed: 502");
        Opened::Answer(Failure::HandlerFailed.to_envelope(&envelope.id))
    };
    let request = match envelope.to_http() {
        Ok(request) => request,
        Err(err) => return failed(&err),
    };
    let (mut parts, _) = request.into_parts();
    let key = generate_key();
    let headers = &mut parts.headers;
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(&key).expect("base64 is a valid header value"),
    );
    parts.version = http::Version::HTTP_11;
    let request = Request::from_parts(parts, Empty::<Bytes>::new());

    let (near, far) = tokio::io::duplex(PIPE);
    // The service, served for this one connection; its error, if it
    // fails, is kept (hyper only closes the connection) to be classified
    // as any request's is.
    let slot = Arc::new(Mutex::new(Some(service)));
    let failure: Arc<Mutex<Option<Failed>>> = Arc::default();
    let failed_with = Arc::clone(&failure);
    let serve = hyper::service::service_fn(move |req: Request<Incoming>| {
        let service = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        let failed_with = Arc::clone(&failed_with);
        async move {
            let service = service.ok_or("one request per connection")?;
            let req = req.map(|_| Body::new(Bytes::new()));
            let result = service.oneshot(req).await.map_err(Into::<BoxError>::into);
            if let Err(err) = &result {
                use crate::error::Transport;
                let transport = match crate::error::classify(&**err) {
                    Some(Transport::NotDelivered(reason)) => Some((reason, true)),
                    Some(Transport::MayHaveRun(reason)) => Some((reason, false)),
                    None => None,
                };
                let described = crate::error::describe(&**err);
                *failed_with.lock().unwrap_or_else(PoisonError::into_inner) = Some(Failed {
                    transport,
                    described,
                });
            }
            result
        }
    });
    tokio::spawn(
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(far), serve)
            .with_upgrades(),
    );
    let asked = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near)).await?;
        tokio::spawn(conn.with_upgrades());
        sender.send_request(request).await
    };
    let left = std::time::Duration::from_millis(envelope.deadline_ms.saturating_sub(now_ms()));
    let mut response = match tokio::time::timeout(left, asked).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            let kept = failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let Some(Failed {
                transport,
                described,
            }) = kept
            else {
                return failed(&err);
            };
            // As for any request: the gate closes on a transport failure,
            // and one the upstream never received goes back to the queue.
            if let Some((reason, _)) = &transport {
                shared.gate.failed(reason);
            }
            return match transport {
                Some((_, true)) => Opened::Requeue,
                _ => failed(&described),
            };
        }
        Err(_) => return failed(&"no answer before the deadline"),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = response.into_parts();
        let limit = shared.settings.max_response_body;
        let left = std::time::Duration::from_millis(envelope.deadline_ms.saturating_sub(now_ms()));
        return match tokio::time::timeout(left, Limited::new(body, limit).collect()).await {
            Ok(Ok(body)) => Opened::Answer(ResponseEnvelope::from_http(
                &envelope.id,
                parts.status,
                &parts.headers,
                body.to_bytes(),
            )),
            Ok(Err(err)) => failed(&err),
            Err(_) => failed(&"the answer's body did not end before the deadline"),
        };
    }
    // RFC 6455 section 4.2.2: the server's 101 names websocket and
    // accepts this key.
    let headers = response.headers();
    let accepted = headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|v| v.as_bytes() == derive_accept_key(key.as_bytes()).as_bytes())
        && headers
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !accepted {
        return failed(&"a 101 without Upgrade: websocket and the Sec-WebSocket-Accept of its key");
    }
    let upgraded = match hyper::upgrade::on(&mut response).await {
        Ok(upgraded) => upgraded,
        Err(err) => return failed(&err),
    };
    let (parts, _) = response.into_parts();
    let settings = anteroom_socket::config(shared.settings.websocket_max_message);
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, Some(settings))
        .await;
    Opened::Socket(parts, Box::new(ws))
}

/// Relays an open socket (see [`open`]) for `envelope`, held as `raw` in
/// the processing list: pushes the 101 head, calls `opened` (which gives
/// back the request's slot), relays until either side closes (the relay
/// queues the close after the last message), then removes the request
/// from the processing list.
pub(crate) async fn relay(
    shared: &Shared,
    envelope: &RequestEnvelope,
    raw: &Bytes,
    parts: http::response::Parts,
    ws: Box<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>>,
    opened: impl FnOnce(),
) {
    let Some(proxy) = shared.keys.proxy_of_replies(&envelope.reply_to) else {
        // check_envelope let only this queue's reply lists through.
        return;
    };
    let window = shared.settings.stream_window as u64;
    let inbox = shared.sockets.open(&envelope.id, proxy, window);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    for name in [header::SEC_WEBSOCKET_ACCEPT, header::CONTENT_LENGTH] {
        headers.remove(name);
    }
    let head = StreamHead {
        id: envelope.id.clone(),
        status: 101,
        headers: headers_from_map(&headers),
        credit_to: shared.credits_key.clone(),
        window,
        run: shared.delivery(),
    }
    .encode();
    let ttl = shared.settings.reply_ttl;
    let pushed = with_retries("websocket head", envelope.deadline_ms, || {
        let mut conn = shared.conn.clone();
        let (reply_to, head) = (&envelope.reply_to, &head);
        async move { queue::push_reply(&mut conn, reply_to, head, ttl).await }
    })
    .await;
    let relay = Relay {
        id: envelope.id.clone(),
        to: envelope.reply_to.clone(),
        frames: shared.upload_credits.clone(),
        window,
        max_message: shared.settings.websocket_max_message,
        ping_interval: None,
        send_timeout: shared.settings.stream_idle_timeout,
    };
    opened();
    if pushed.is_none() {
        // Its client has its 504, unless a push landed whose answer was
        // lost: that socket closes (1011). The request stays for a
        // reaper.
        relay.send_close(0, Some(codes::INTERNAL_ERROR), "the dispatcher lost redis");
        return;
    }
    shared.metrics.websocket_opened();
    // The heartbeat says how many sockets are open at once: a pause's
    // quiescence does not wait for them.
    shared.beat_now.notify_one();
    let stopping = shared.streams_stop.clone();
    let stop = async move {
        stopping.cancelled().await;
        codes::SERVICE_RESTART
    };
    let ended = relay.run(*ws, inbox, stop).await;
    shared.metrics.websocket_closed();
    tracing::debug!(code = ended.code, reason = %ended.reason, "websocket closed");
    // The close went after the socket's last message, on the same
    // writer; what is left is the handshake's removal.
    let done = Done {
        reply_to: &envelope.reply_to,
        reply: None,
        raw,
        from_tail: false,
    };
    let processing = &shared.processing_key;
    let idle_ms =
        u64::try_from(shared.settings.stream_idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let ended = with_retries("websocket close", now_ms().saturating_add(idle_ms), || {
        let mut conn = shared.conn.clone();
        async move { queue::complete_now(&mut conn, processing, ttl, &[done]).await }
    })
    .await;
    if ended.is_some() {
        shared.replicate().await;
    }
    shared.beat_now.notify_one();
}
