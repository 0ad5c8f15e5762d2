//! Dispatcher errors.

use anteroom_protocol::NameError;

/// A type-erased error from a handler or body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a dispatcher could not be built or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatcherError {
    /// No Redis URL or client was given to the builder.
    #[error("no redis url given")]
    MissingRedis,
    /// No queue name was given to the builder.
    #[error("no queue given")]
    MissingQueue,
    /// Concurrency must be at least 1.
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
    /// The queue name or dispatcher id cannot be used in Redis keys.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Redis cannot be reached (or its URL is invalid).
    #[error(transparent)]
    Redis(#[from] anteroom_redis::ConnectError),
    /// The pause flag could not be read at startup.
    #[error("cannot read the queue's pause flag")]
    Control(#[source] anteroom_control::ControlError),
}

/// Why the upstream client could not be built or a forwarded request failed.
///
/// A dispatcher reads a failed request's error with
/// [`is_not_delivered`](Self::is_not_delivered) and
/// [`is_transport`](Self::is_transport) (also when a service wraps it, as the
/// error or its `source()`): a request the upstream never received is put
/// back at the front of the queue, and either kind of transport failure
/// stops this dispatcher taking requests until the upstream is healthy again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The upstream URL is not an absolute `http://` URL.
    #[error("invalid upstream url {0:?}: expected http://HOST:PORT[/PREFIX]")]
    Url(String),
    /// A health check path that is not an absolute path (`/up`).
    #[error("invalid health check path {0:?}: expected an absolute path such as /up")]
    HealthPath(String),
    /// The request target could not be joined to the upstream URL.
    #[error("cannot build the upstream uri")]
    Uri(#[source] http::Error),
    /// Connecting to or talking with the upstream failed.
    #[error("upstream request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
}

impl UpstreamError {
    /// True when the upstream certainly never received the request:
    /// connecting failed (refused, timed out, unreachable), or
    /// the connection closed before any byte of the request was written.
    ///
    /// The last case is hyper's "canceled" error, which hyper gives only for
    /// a request it hands back unsent (`hyper::Error::is_canceled`; the
    /// pooled client retries such a request once on a fresh connection
    /// before giving up). Everything else after connecting may have reached
    /// the upstream.
    pub fn is_not_delivered(&self) -> bool {
        match self {
            Self::Request(err) => {
                err.is_connect()
                    || sources(err).any(|e| {
                        e.downcast_ref::<hyper::Error>()
                            .is_some_and(hyper::Error::is_canceled)
                    })
            }
            Self::Url(_) | Self::HealthPath(_) | Self::Uri(_) => false,
        }
    }

    /// True for a failure of the connection to the upstream (delivered or
    /// not), as opposed to a request that could not be built.
    pub fn is_transport(&self) -> bool {
        matches!(self, Self::Request(_))
    }

    /// A short reason for people: `connection refused`, `timeout`,
    /// `connection reset`, `connection closed before the response`...
    pub fn reason(&self) -> String {
        match self {
            Self::Request(err) => transport_reason(err),
            other => other.to_string(),
        }
    }
}

/// `err` and its chain of sources.
pub(crate) fn sources<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

/// The reason of a transport failure, from the innermost I/O error or
/// hyper's own kinds.
pub(crate) fn transport_reason(err: &(dyn std::error::Error + 'static)) -> String {
    use std::io::ErrorKind;
    for e in sources(err) {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                ErrorKind::ConnectionReset => "connection reset".to_owned(),
                ErrorKind::ConnectionAborted => "connection aborted".to_owned(),
                ErrorKind::TimedOut => "timeout".to_owned(),
                ErrorKind::BrokenPipe => "connection closed (broken pipe)".to_owned(),
                ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                    "unreachable".to_owned()
                }
                _ => io.to_string(),
            };
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() {
                return "connection closed before the response".to_owned();
            }
            if hyper.is_canceled() {
                return "connection closed before the request was sent".to_owned();
            }
            if hyper.is_timeout() {
                return "timeout".to_owned();
            }
            if hyper.is_parse() {
                return "invalid response".to_owned();
            }
        }
    }
    let mut text = err.to_string();
    if let Some(inner) = sources(err).last() {
        text = inner.to_string();
    }
    text
}
