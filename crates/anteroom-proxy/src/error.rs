//! Proxy errors, and the one place they become HTTP responses.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;

use anteroom_protocol::{Failure, NameError};

/// Why [`serve`](crate::serve) could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The queue name or proxy id cannot be used in Redis keys.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Redis cannot be reached (or its URL is invalid).
    #[error(transparent)]
    Redis(#[from] anteroom_redis::ConnectError),
    /// Routes only, no default queue, and no route: nothing to serve.
    #[error("no queue to serve: no routes and no default queue")]
    NoQueue,
    /// A hold budget of zero (the proxy's or a route's): every request
    /// would get 504 at once.
    #[error("the hold budget must be above zero")]
    ZeroHold,
    /// A hold budget over [`anteroom_protocol::MAX_HOLD`]: dispatchers
    /// would set aside every request as not written by a proxy.
    #[error("the hold budget must be at most 24h (dispatchers refuse deadlines further ahead)")]
    HoldTooLong,
    /// A Redis high watermark outside 1 to 100 (percent of `maxmemory`).
    #[error("the Redis high watermark must be 1 to 100 (percent of maxmemory), not {0}")]
    BadWatermark(u8),
    /// A route that could never serve (see `RouteConfig::check`).
    #[error("route #{number} {problem}")]
    BadRoute {
        /// Its place in `routes`, from 1.
        number: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// The default queue's canary split could never serve (see
    /// `CanaryConfig::check`).
    #[error("the default queue's {0}")]
    BadCanary(String),
    /// The admin endpoint or the proxy could not read the queue's state
    /// (its maintenance flag) in Redis.
    #[error("cannot read the queue's state in Redis")]
    Control(#[source] anteroom_control::ControlError),
    /// An admin token that is empty: it would silently mean no token.
    #[error("the admin token is empty (unset it to run without one)")]
    EmptyAdminToken,
    /// An admin endpoint beyond loopback without a token: anyone who can
    /// reach it could pause the queue.
    #[error(
        "the admin endpoint on {0} is not loopback and has no token: set --admin-token (ANTEROOM_ADMIN_TOKEN), or --admin-without-token to allow it"
    )]
    OpenAdmin(std::net::SocketAddr),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::TlsError),
    /// A background component (reply reader, heartbeat, enqueuer, replica
    /// counter) failed or panicked while serving, which stopped the proxy.
    #[error(transparent)]
    Component(anteroom_runtime::ComponentFailed),
}

/// Why one request failed inside the proxy. Logged in full; the client only
/// sees the [`Failure`] it maps to.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body")]
    BodyRead(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("request body not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("could not enqueue the request")]
    Enqueue(#[source] redis::RedisError),
    #[error("no reply within the hold budget")]
    HoldExpired,
    #[error("waiting limit reached: {waiting} requests, {bytes} bytes")]
    Overloaded { waiting: usize, bytes: usize },
    #[error("the reply reader stopped")]
    ReaderGone,
    #[error(
        "Redis is full: at the proxy's high watermark of its maxmemory, or refusing writes (OOM)"
    )]
    RedisFull,
    #[error("the reply is not a valid HTTP response")]
    BadReply(#[source] anteroom_protocol::ConvertError),
    #[error("{0}")]
    BadHost(&'static str),
    #[error("chunked applied more than once (RFC 9112 section 6.1)")]
    ChunkedTwice,
    #[error("transfer coding {0:?} not implemented (RFC 9112 section 6.1)")]
    UnsupportedCoding(String),
    #[error("CONNECT is for forward proxies (RFC 9110 section 9.3.6)")]
    Connect,
    #[error("{0} header fields, over the limit of {1}")]
    TooManyFields(usize, usize),
    #[error("request target with a dot segment (RFC 3986 section 5.2.4)")]
    DotSegments,
    #[error("Upgrade to {0:?}: only websocket is supported (RFC 9110 section 7.8)")]
    UpgradeNotSupported(String),
    #[error("invalid WebSocket handshake: {0} (RFC 6455 section 4.2.1)")]
    BadHandshake(&'static str),
    #[error("WebSocket version {0:?}; only 13 is supported (RFC 6455 section 4.4)")]
    WebSocketVersion(String),
    #[error("{0} WebSockets open, the limit")]
    TooManyWebSockets(usize),
    #[error("the app answered with status {0}, which is no final response (RFC 9110 section 15.2)")]
    InterimStatus(u16),
    #[error("the queue is in maintenance mode")]
    Maintenance(Box<crate::maintenance::MaintenancePage>),
}

impl ProxyError {
    pub(crate) fn failure(&self) -> Failure {
        match self {
            ProxyError::BodyTooLarge { .. } => Failure::BodyTooLarge,
            ProxyError::BodyRead(_)
            | ProxyError::BadHost(_)
            | ProxyError::ChunkedTwice
            | ProxyError::DotSegments => Failure::BadRequest,
            ProxyError::UnsupportedCoding(_) | ProxyError::Connect => Failure::NotImplemented,
            ProxyError::TooManyFields(..) => Failure::HeaderFieldsTooLarge,
            ProxyError::BodyTimeout(_) => Failure::ClientTimeout,
            ProxyError::Enqueue(_) | ProxyError::ReaderGone | ProxyError::Maintenance(_) => {
                Failure::Unavailable
            }
            ProxyError::HoldExpired => Failure::HoldExpired,
            ProxyError::Overloaded { .. } | ProxyError::RedisFull => Failure::Overloaded,
            ProxyError::BadReply(_) | ProxyError::InterimStatus(_) => Failure::HandlerFailed,
            ProxyError::UpgradeNotSupported(_) => Failure::UpgradeNotSupported,
            ProxyError::BadHandshake(_) => Failure::BadHandshake,
            ProxyError::WebSocketVersion(_) => Failure::WebSocketVersion,
            ProxyError::TooManyWebSockets(_) => Failure::TooManyWebSockets,
        }
    }
}

/// Why hyper refused a request before the proxy saw it, as the
/// `anteroom_proxy_refused_total` reason, or `None` when `err` is no such
/// refusal (a client that went away, an I/O error). hyper answers these
/// itself: 400 for a request line or header field it cannot parse
/// (RFC 9112 §3, §5) or faulty framing (§6.3), 414 for a target over
/// 64 KiB (when `--max-head` allows one that long), and 431 for a head
/// over `--max-head` or `--max-headers`. The header timeout is not a
/// refusal: hyper applies it to idle keep-alive connections too. hyper's
/// error kinds are private; its messages name them.
pub(crate) fn refused_reason(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let err = err.downcast_ref::<hyper::Error>()?;
    if !err.is_parse() {
        return None;
    }
    let text = err.to_string();
    Some(if text.contains("URI too long") {
        "target_too_long"
    } else if err.is_parse_too_large() {
        "head_too_large"
    } else if text.contains("URI") {
        "target"
    } else if text.contains("content-length") || text.contains("transfer-encoding") {
        "framing"
    } else if text.contains("method") {
        "method"
    } else if text.contains("version") {
        "version"
    } else {
        "header"
    })
}

/// The response a client gets for `err`: its [`Failure`]'s, or for
/// maintenance mode the page with the record's `Retry-After`.
pub(crate) fn error_response(err: &ProxyError) -> Response<Full<Bytes>> {
    let ProxyError::Maintenance(page) = err else {
        return failure_response(err.failure());
    };
    let mut resp = Response::new(Full::new(page.body.clone()));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, page.content_type());
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from(page.retry_after_secs),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    // The page depends on Accept (RFC 9110 section 12.5.5).
    resp.headers_mut()
        .insert(header::VARY, header::HeaderValue::from_static("accept"));
    resp
}

/// The response a client gets for a broker failure.
pub(crate) fn failure_response(failure: Failure) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(failure.message().as_bytes())));
    *resp.status_mut() =
        StatusCode::from_u16(failure.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(secs) = failure.retry_after_secs() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    if failure == Failure::WebSocketVersion {
        // RFC 6455 section 4.4: the versions the server understands.
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            header::HeaderValue::from_static("13"),
        );
    }
    resp
}
