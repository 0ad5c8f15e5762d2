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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The upstream URL is not an absolute `http://` URL.
    #[error("invalid upstream url {0:?}: expected http://HOST:PORT[/PREFIX]")]
    Url(String),
    /// The request target could not be joined to the upstream URL.
    #[error("cannot build the upstream uri")]
    Uri(#[source] http::Error),
    /// Connecting to or talking with the upstream failed.
    #[error("upstream request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
}
