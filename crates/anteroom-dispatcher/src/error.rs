//! Dispatcher errors.

use anteroom_protocol::NameError;

/// A type-erased error from a handler or body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a dispatcher could not be built, could not start, or stopped.
///
/// Opaque: ask it what kind it is with [`is_config`](Self::is_config),
/// [`is_redis`](Self::is_redis) and [`is_component`](Self::is_component);
/// its `Display` and `source()` say the rest.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DispatcherError(#[from] Kind);

impl DispatcherError {
    /// The builder's settings cannot be used (no Redis URL or queue, a bad
    /// queue name or id, a URL that does not parse, a zero concurrency, a
    /// heartbeat TTL under 300 ms). Fix the configuration; retrying will
    /// not help.
    pub fn is_config(&self) -> bool {
        matches!(
            self.0,
            Kind::MissingRedis
                | Kind::MissingQueue
                | Kind::ZeroConcurrency
                | Kind::HeartbeatTtl
                | Kind::Name(_)
                | Kind::Redis(anteroom_redis::ConnectError::Url(_))
        )
    }

    /// Redis could not be reached at startup, or the queue's pause flag
    /// could not be read. Starting again later may work.
    pub fn is_redis(&self) -> bool {
        matches!(
            self.0,
            Kind::Redis(anteroom_redis::ConnectError::Connect(_)) | Kind::Control(_)
        )
    }

    /// One of the dispatcher's background components (heartbeat,
    /// completer, reaper, pause watcher, health check) failed while
    /// serving, which stopped the dispatcher.
    pub fn is_component(&self) -> bool {
        matches!(self.0, Kind::Component(_))
    }
}

impl From<NameError> for DispatcherError {
    fn from(err: NameError) -> Self {
        Self(Kind::Name(err))
    }
}

impl From<anteroom_redis::ConnectError> for DispatcherError {
    fn from(err: anteroom_redis::ConnectError) -> Self {
        Self(Kind::Redis(err))
    }
}

/// What a [`DispatcherError`] is, for this crate only.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Kind {
    /// No Redis URL or client was given to the builder.
    #[error("no redis url given")]
    MissingRedis,
    /// No queue name was given to the builder.
    #[error("no queue given")]
    MissingQueue,
    /// Concurrency must be at least 1.
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
    /// The heartbeat TTL is below 300 ms: refreshed every third of it (at
    /// least every 100 ms), the heartbeat would keep lapsing.
    #[error("the heartbeat ttl must be at least 300ms")]
    HeartbeatTtl,
    /// The queue name or dispatcher id cannot be used in Redis keys.
    #[error(transparent)]
    Name(NameError),
    /// Redis cannot be reached (or its URL is invalid).
    #[error(transparent)]
    Redis(anteroom_redis::ConnectError),
    /// The pause flag could not be read at startup.
    #[error("cannot read the queue's pause flag")]
    Control(#[source] anteroom_control::ControlError),
    /// A background component failed.
    #[error(transparent)]
    Component(anteroom_runtime::ComponentFailed),
}

/// Why the upstream client could not be built or a forwarded request failed.
///
/// Opaque: [`is_config`](Self::is_config) for a URL or health path that
/// cannot be used; a dispatcher reads a failed request's error with
/// [`is_not_delivered`](Self::is_not_delivered) and
/// [`is_transport`](Self::is_transport) (also when a service wraps it, as the
/// error or its `source()`): a request the upstream never received is put
/// back at the front of the queue, and either kind of transport failure
/// stops this dispatcher taking requests until the upstream is healthy again.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct UpstreamError(#[from] pub(crate) UpstreamKind);

/// What an [`UpstreamError`] is, for this crate only.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamKind {
    /// The upstream URL is not an absolute `http://` or `https://` URL nor
    /// `unix:/PATH` (credentials in it shown as `***`).
    #[error(
        "invalid upstream url {0:?}: expected http://HOST:PORT[/PREFIX], https://HOST:PORT[/PREFIX] or unix:/PATH"
    )]
    Url(String),
    /// A `unix:` upstream whose path cannot be a socket's: the URL and why.
    #[error("invalid upstream url {0:?}: {1}")]
    UnixPath(String, &'static str),
    /// The upstream URL carries credentials (`user:password@`), which the
    /// dispatcher would not send; refused rather than kept in memory and
    /// logs. The URL is given with them shown as `***`.
    #[error(
        "upstream url {0:?} carries credentials, which the dispatcher does not send; give the app's credentials another way"
    )]
    Credentials(String),
    /// A health check path that is not an absolute path (`/up`).
    #[error("invalid health check path {0:?}: expected an absolute path such as /up")]
    HealthPath(String),
    /// The request target could not be joined to the upstream URL.
    #[error("cannot build the upstream uri")]
    Uri(#[source] http::Error),
    /// The TLS settings of an `https://` upstream cannot be used (a CA
    /// file that cannot be read or holds no certificate, no system roots),
    /// or a CA file given for an upstream that is not `https://`.
    #[error("upstream TLS: {0}")]
    Tls(String),
    /// Connecting to or talking with the upstream failed.
    #[error("upstream request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
}

impl UpstreamError {
    /// True when the upstream URL, its TLS settings or the health check
    /// path cannot be used (not an `http://`, `https://` or `unix:` URL,
    /// credentials in it, a CA file that cannot be used, a relative path).
    pub fn is_config(&self) -> bool {
        matches!(
            self.0,
            UpstreamKind::Url(_)
                | UpstreamKind::UnixPath(..)
                | UpstreamKind::Credentials(_)
                | UpstreamKind::HealthPath(_)
                | UpstreamKind::Tls(_)
        )
    }

    /// True when the upstream certainly never received the request:
    /// connecting failed (refused, timed out, unreachable), or the
    /// connection closed before any byte of the request was written.
    ///
    /// The last case is hyper's "canceled" error, which hyper gives only for
    /// a request it hands back unsent (`hyper::Error::is_canceled`); the
    /// pooled client itself sends such a request again on a fresh
    /// connection when the closed one came from the pool, and reports it
    /// only when a fresh connection failed too. Everything else after
    /// connecting may have reached the upstream.
    pub fn is_not_delivered(&self) -> bool {
        matches!(classify_upstream(self), Some(Transport::NotDelivered(_)))
    }

    /// True for a failure of the connection to the upstream, delivered or
    /// not: connect errors, I/O errors, a connection closed before the
    /// response. Not for a response hyper could not parse, or a request that
    /// could not be built: those are the app's or the caller's faults, and
    /// get 502 without holding the dispatcher back.
    pub fn is_transport(&self) -> bool {
        classify_upstream(self).is_some()
    }

    /// Why it failed, for people and for metrics; [`FailureReason::Other`]
    /// for what is not a transport failure.
    pub fn reason(&self) -> FailureReason {
        match &self.0 {
            UpstreamKind::Request(err) => reason_of(err),
            other => FailureReason::Other(other.to_string()),
        }
    }
}

/// Why an upstream failed a delivery or a health check, in a few words
/// (`Display`: `connection refused`, `status 503`...). [`label`](Self::label)
/// is its class as a metric label, from a fixed set.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureReason {
    /// The upstream refused the connection (nothing listens).
    Refused,
    /// Connecting, or the health check, took too long.
    Timeout,
    /// The connection was reset or aborted.
    Reset,
    /// The connection closed before the response (after the request).
    Closed,
    /// The connection closed before the request was written.
    ClosedBeforeSent,
    /// No route to the upstream's host or network.
    Unreachable,
    /// The health path answered this status (not 2xx).
    Status(u16),
    /// Anything else, as its error says it.
    Other(String),
}

impl FailureReason {
    /// The metric label of this reason: `refused`, `timeout`, `reset`,
    /// `closed`, `unreachable`, `status_NNN` or `other`.
    pub fn label(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Refused => "refused".into(),
            Self::Timeout => "timeout".into(),
            Self::Reset => "reset".into(),
            Self::Closed | Self::ClosedBeforeSent => "closed".into(),
            Self::Unreachable => "unreachable".into(),
            Self::Status(code) => format!("status_{code}").into(),
            Self::Other(_) => "other".into(),
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused => f.write_str("connection refused"),
            Self::Timeout => f.write_str("timeout"),
            Self::Reset => f.write_str("connection reset"),
            Self::Closed => f.write_str("connection closed before the response"),
            Self::ClosedBeforeSent => f.write_str("connection closed before the request was sent"),
            Self::Unreachable => f.write_str("unreachable"),
            Self::Status(code) => write!(f, "status {code}"),
            Self::Other(text) => f.write_str(text),
        }
    }
}

/// A transport failure of an upstream, by whether the request may have
/// reached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transport {
    /// The upstream never received the request.
    NotDelivered(FailureReason),
    /// The connection failed after the request was (or may have been)
    /// written.
    MayHaveRun(FailureReason),
}

/// `err` and its causes on one line, each cause once (some libraries repeat
/// their source in their own message).
pub(crate) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    for cause in sources(err) {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// `err` and its chain of sources.
fn sources<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

/// Whether a handler's error is an upstream's transport failure, and of
/// which kind: an [`UpstreamError`] anywhere in the chain decides; without
/// one, a hyper transport error in the chain (a response body that broke
/// off) came after delivery. `None`: an ordinary handler failure.
pub(crate) fn classify(err: &(dyn std::error::Error + 'static)) -> Option<Transport> {
    if let Some(upstream) = sources(err).find_map(|e| e.downcast_ref::<UpstreamError>()) {
        return classify_upstream(upstream);
    }
    sources(err)
        .filter_map(|e| e.downcast_ref::<hyper::Error>())
        .any(is_transport_hyper)
        .then(|| Transport::MayHaveRun(reason_of(err)))
}

fn classify_upstream(err: &UpstreamError) -> Option<Transport> {
    let UpstreamKind::Request(err) = &err.0 else {
        return None;
    };
    if err.is_connect() {
        return Some(Transport::NotDelivered(reason_of(err)));
    }
    let hyper = sources(err).find_map(|e| e.downcast_ref::<hyper::Error>())?;
    if hyper.is_canceled() {
        Some(Transport::NotDelivered(FailureReason::ClosedBeforeSent))
    } else if is_transport_hyper(hyper) {
        Some(Transport::MayHaveRun(reason_of(err)))
    } else {
        None
    }
}

/// A hyper error of the connection (I/O, closed, timed out), not of the
/// message (parse errors, a misused API).
fn is_transport_hyper(err: &hyper::Error) -> bool {
    err.is_incomplete_message()
        || err.is_closed()
        || err.is_canceled()
        || err.is_timeout()
        || sources(err).any(|e| e.is::<std::io::Error>())
}

/// The reason of a transport failure, from the innermost I/O error or
/// hyper's own kinds.
pub(crate) fn reason_of(err: &(dyn std::error::Error + 'static)) -> FailureReason {
    use std::io::ErrorKind;
    for e in sources(err) {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                ErrorKind::ConnectionRefused => FailureReason::Refused,
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe => FailureReason::Reset,
                ErrorKind::TimedOut => FailureReason::Timeout,
                ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                    FailureReason::Unreachable
                }
                ErrorKind::UnexpectedEof => FailureReason::Closed,
                _ => FailureReason::Other(io.to_string()),
            };
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() || hyper.is_closed() {
                return FailureReason::Closed;
            }
            if hyper.is_canceled() {
                return FailureReason::ClosedBeforeSent;
            }
            if hyper.is_timeout() {
                return FailureReason::Timeout;
            }
        }
    }
    let innermost = sources(err).last().unwrap_or(err);
    FailureReason::Other(innermost.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_name_their_reason() {
        use std::io::{Error, ErrorKind};
        for (kind, reason, label) in [
            (
                ErrorKind::ConnectionRefused,
                "connection refused",
                "refused",
            ),
            (ErrorKind::ConnectionReset, "connection reset", "reset"),
            (ErrorKind::BrokenPipe, "connection reset", "reset"),
            (ErrorKind::TimedOut, "timeout", "timeout"),
            (ErrorKind::HostUnreachable, "unreachable", "unreachable"),
        ] {
            let err = Error::from(kind);
            let got = reason_of(&err);
            assert_eq!(got.to_string(), reason, "{kind:?}");
            assert_eq!(got.label(), label, "{kind:?}");
        }
        assert_eq!(FailureReason::Status(503).to_string(), "status 503");
        assert_eq!(FailureReason::Status(503).label(), "status_503");
    }

    #[test]
    fn only_transport_errors_hold_the_dispatcher_back() {
        // An ordinary handler error is not the upstream's.
        let plain: BoxError = "the handler gave up".into();
        assert_eq!(classify(&*plain), None);
        // Nor is a request that could not be built.
        let bad = UpstreamError::from(UpstreamKind::Url("x".into()));
        assert!(!bad.is_transport() && !bad.is_not_delivered());
        let boxed: BoxError = Box::new(bad);
        assert_eq!(classify(&*boxed), None);
    }
}
