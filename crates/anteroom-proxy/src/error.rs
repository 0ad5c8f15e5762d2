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
    /// The admin endpoint could not reach the queue's state.
    #[error("admin endpoint cannot reach the queue")]
    Control(#[source] anteroom_control::ControlError),
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
    #[error("the reply is not a valid HTTP response")]
    BadReply(#[source] anteroom_protocol::ConvertError),
    #[error("{0} (RFC 9112 section 3.2)")]
    BadHost(&'static str),
}

impl ProxyError {
    pub(crate) fn failure(&self) -> Failure {
        match self {
            ProxyError::BodyTooLarge { .. } => Failure::BodyTooLarge,
            ProxyError::BodyRead(_) | ProxyError::BadHost(_) => Failure::BadRequest,
            ProxyError::BodyTimeout(_) => Failure::ClientTimeout,
            ProxyError::Enqueue(_) | ProxyError::ReaderGone => Failure::Unavailable,
            ProxyError::HoldExpired => Failure::HoldExpired,
            ProxyError::Overloaded { .. } => Failure::Overloaded,
            ProxyError::BadReply(_) => Failure::HandlerFailed,
        }
    }
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
    resp
}
