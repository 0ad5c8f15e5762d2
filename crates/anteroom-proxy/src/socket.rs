//! WebSockets on the proxy's side (docs/protocol.md, "WebSockets").
//!
//! A handshake is checked (`checks::check_upgrade`), takes one of the
//! `--max-websockets` places, and is queued as kind `'W'` like any request:
//! it waits through a pause or while no dispatcher runs, within the hold
//! budget. When its dispatcher answers 101 (it has opened the app's
//! socket), [`accept`] answers the client 101 and, once hyper hands over
//! the connection, runs the relay ([`anteroom_socket::Relay`]) between the
//! client's socket and the dispatcher until either side closes. The
//! proxy's shutdown closes its sockets with 1001 (going away); a
//! dispatcher that stops beating, with 1011.

use std::sync::Arc;
use std::time::Duration;

use anteroom_protocol::{ResponseEnvelope, StreamHead, strip_hop_by_hop};
use anteroom_socket::{Inbox, Relay, Role, codes};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::activity::Activity;
use crate::error::ProxyError;
use crate::handler::State;

/// How long hyper may take to hand over a connection answered 101.
const UPGRADE_WAIT: Duration = Duration::from_secs(10);

/// A WebSocket handshake waiting for its answer: the client's key, its
/// connection (handed over by hyper once answered 101), and its place
/// among the proxy's sockets.
pub(crate) struct Opening {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    _place: OwnedSemaphorePermit,
}

impl Opening {
    /// Takes a place among the proxy's sockets (503 when all are taken)
    /// and the connection's upgrade from `parts`.
    pub(crate) fn new(
        state: &State,
        key: HeaderValue,
        parts: &mut http::request::Parts,
    ) -> Result<Self, ProxyError> {
        let place = Arc::clone(&state.sockets)
            .try_acquire_owned()
            .map_err(|_| ProxyError::TooManyWebSockets(state.config.max_websockets))?;
        // hyper puts it in every HTTP/1.1 request of a connection served
        // with upgrades.
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(ProxyError::BadHandshake(
                "the connection cannot be upgraded",
            ))?;
        Ok(Self {
            key,
            on_upgrade,
            _place: place,
        })
    }
}

/// The 101 answer to a handshake whose socket the dispatcher opened
/// (`head`), and the relay, started on `connection`'s tasks, that runs once
/// hyper hands over the connection. The head's headers go to the client
/// (the app's chosen `Sec-WebSocket-Protocol`, cookies), less hop-by-hop
/// ones and those of the app's own handshake; `Sec-WebSocket-Accept` is
/// computed from the client's key (RFC 6455 section 4.2.2).
pub(crate) fn accept(
    state: &Arc<State>,
    opening: Opening,
    head: StreamHead,
    inbox: Inbox,
    connection: &Activity,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let envelope = ResponseEnvelope {
        id: head.id.clone(),
        status: 200,
        headers: head.headers,
        body: Bytes::new(),
    };
    let (mut parts, ()) = envelope
        .to_http()
        .map_err(ProxyError::BadReply)?
        .map(|_| ())
        .into_parts();
    strip_hop_by_hop(&mut parts.headers);
    for name in [
        header::CONTENT_LENGTH,
        header::SEC_WEBSOCKET_ACCEPT,
        header::SEC_WEBSOCKET_EXTENSIONS,
    ] {
        parts.headers.remove(name);
    }
    parts.status = StatusCode::SWITCHING_PROTOCOLS;
    parts
        .headers
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let accept = derive_accept_key(opening.key.as_bytes());
    parts.headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    let config = &state.config;
    let relay = Relay {
        id: head.id,
        to: head.credit_to,
        frames: state.demux.credits().0,
        window: head.window,
        max_message: config.websocket_max_message,
        ping_interval: Some(config.websocket_ping_interval),
        send_timeout: config.send_timeout,
    };
    let closing = connection.closing();
    let metrics = state.metrics.clone();
    connection.spawn(async move {
        let Opening {
            on_upgrade, _place, ..
        } = opening;
        let upgraded = match tokio::time::timeout(UPGRADE_WAIT, on_upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(err)) => return gone(&relay, &format!("no upgrade: {err}")),
            Err(_) => return gone(&relay, "no upgrade in time"),
        };
        let settings = anteroom_socket::config(relay.max_message);
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(settings))
                .await;
        metrics.websocket_opened();
        let stopping = async move {
            closing.cancelled().await;
            codes::GOING_AWAY
        };
        let ended = relay.run(ws, inbox, stopping).await;
        metrics.websocket_closed();
        tracing::debug!(code = ended.code, reason = %ended.reason, "websocket closed");
    });
    Ok(Response::from_parts(parts, Full::new(Bytes::new())))
}

/// The client's connection never became a socket: the dispatcher's side
/// closes (1001).
fn gone(relay: &Relay, why: &str) {
    tracing::debug!(
        reason = why,
        "websocket client gone before its socket opened"
    );
    relay.send_close(0, Some(codes::GOING_AWAY), "the client went away");
}
