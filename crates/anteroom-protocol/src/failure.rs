//! The one table of broker failures and the HTTP status each becomes.

use bytes::Bytes;

use crate::ResponseEnvelope;

/// A failure of the broker rather than of the application, as the client sees it.
///
/// Proxies and dispatchers both answer failures through this table, so a
/// status means the same thing whichever side produced it. Messages are
/// deliberately generic: details go to logs, not to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The request is malformed (400).
    BadRequest,
    /// The request body is larger than the configured limit (413).
    BodyTooLarge,
    /// The hold budget passed before a dispatcher answered (504).
    HoldExpired,
    /// Redis cannot be reached, or the component is shutting down (503).
    Unavailable,
    /// The handler or upstream failed, or returned something unusable (502).
    HandlerFailed,
    /// Too many requests are waiting in this proxy; retry shortly (503 with
    /// `Retry-After`).
    Overloaded,
    /// What was running a request stopped before answering: the dispatcher
    /// crashed, or the upstream's connection failed after the request was
    /// written. It may or may not have run, and it is not repeated: it is
    /// not safe to repeat, or was repeated as often as allowed already (502).
    Interrupted,
    /// The client did not send its request body in time (408).
    ClientTimeout,
    /// No route of the proxy matches the request's host and path, and the
    /// proxy has no default queue (404).
    NoRoute,
    /// The request needs something the proxy does not implement: a
    /// transfer coding other than `chunked` (RFC 9112 §6.1), or the
    /// `CONNECT` method, which is for forward proxies (501).
    NotImplemented,
    /// More request header fields than the proxy's `--max-headers`, over
    /// HTTP/2 (hyper answers HTTP/1 itself) (431).
    HeaderFieldsTooLarge,
    /// An `Upgrade` to a protocol other than `websocket`, e.g. `h2c`
    /// (RFC 9110 section 7.8): the proxy does not switch to it, and does
    /// not pass the request on as a plain one either (501).
    UpgradeNotSupported,
    /// A WebSocket handshake that RFC 6455 section 4.2.1 does not allow:
    /// not a GET, no `Connection: upgrade`, no valid `Sec-WebSocket-Key`
    /// (400).
    BadHandshake,
    /// A WebSocket handshake of a version other than 13 (426, with
    /// `Sec-WebSocket-Version: 13`, RFC 6455 section 4.4).
    WebSocketVersion,
    /// As many WebSockets open as the proxy's `--max-websockets` (503,
    /// with `Retry-After`).
    TooManyWebSockets,
}

impl Failure {
    /// The HTTP status code for this failure.
    pub fn status(self) -> u16 {
        match self {
            Failure::BadRequest => 400,
            Failure::BodyTooLarge => 413,
            Failure::HoldExpired => 504,
            Failure::Unavailable | Failure::Overloaded => 503,
            Failure::HandlerFailed | Failure::Interrupted => 502,
            Failure::ClientTimeout => 408,
            Failure::NoRoute => 404,
            Failure::NotImplemented => 501,
            Failure::HeaderFieldsTooLarge => 431,
            Failure::UpgradeNotSupported => 501,
            Failure::BadHandshake => 400,
            Failure::WebSocketVersion => 426,
            Failure::TooManyWebSockets => 503,
        }
    }

    /// The plain-text body sent to the client.
    pub fn message(self) -> &'static str {
        match self {
            Failure::BadRequest => "bad request\n",
            Failure::BodyTooLarge => "request body too large\n",
            Failure::HoldExpired => "no response within the hold budget\n",
            Failure::Unavailable => "service temporarily unavailable\n",
            Failure::HandlerFailed => "the backend failed to handle the request\n",
            Failure::Overloaded => "too many requests waiting; retry shortly\n",
            Failure::Interrupted => {
                "the backend stopped while handling this request; it may or may not have been carried out\n"
            }
            Failure::ClientTimeout => "request body not received in time\n",
            Failure::NoRoute => "no queue serves this host and path on this proxy\n",
            Failure::NotImplemented => "not implemented by this proxy\n",
            Failure::HeaderFieldsTooLarge => "too many request header fields\n",
            Failure::UpgradeNotSupported => {
                "this proxy upgrades connections only to websocket (RFC 6455); HTTP/2 without TLS works with prior knowledge (h2c), not through Upgrade\n"
            }
            Failure::BadHandshake => {
                "not a valid WebSocket handshake: a GET with Connection: upgrade, Upgrade: websocket and a Sec-WebSocket-Key of 16 bytes in base64 (RFC 6455 section 4.2.1)\n"
            }
            Failure::WebSocketVersion => "WebSocket version 13 only (RFC 6455 section 4.4)\n",
            Failure::TooManyWebSockets => "too many WebSockets open; retry shortly\n",
        }
    }

    /// Seconds for a `Retry-After` header, for failures worth retrying soon.
    pub fn retry_after_secs(self) -> Option<u32> {
        match self {
            Failure::Overloaded | Failure::TooManyWebSockets => Some(1),
            _ => None,
        }
    }

    /// A response envelope carrying this failure for request `id`.
    pub fn to_envelope(self, id: &str) -> ResponseEnvelope {
        ResponseEnvelope {
            id: id.to_owned(),
            status: self.status(),
            headers: vec![(
                "content-type".to_owned(),
                Bytes::from_static(b"text/plain; charset=utf-8"),
            )],
            body: Bytes::from_static(self.message().as_bytes()),
        }
    }
}
