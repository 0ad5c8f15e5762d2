//! Configuration and the public entry points.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anteroom_metrics::DispatcherMetrics;

use anteroom_protocol::{Keys, validate_id};
use anteroom_redis::Target;
use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::watch;
use tower::Service;

use crate::error::{BoxError, DispatcherError, Kind};
use crate::priority::PriorityGroup;
use crate::{Body, HealthCheck, worker};

/// Builds a [`Dispatcher`].
#[derive(Debug, Clone)]
pub struct DispatcherBuilder {
    redis: Option<Target>,
    redis_url: Option<String>,
    queue: Option<String>,
    /// The group to join at [`build`](DispatcherBuilder::build), and the weight.
    priority: Option<(Arc<PriorityGroup>, Option<u32>)>,
    pub(crate) settings: Settings,
}

/// Tunables, all with defaults.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) concurrency: usize,
    pub(crate) grace: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) pause_poll: Duration,
    pub(crate) reap_interval: Option<Duration>,
    pub(crate) durable: Option<Duration>,
    pub(crate) heartbeat_ttl: Duration,
    pub(crate) reply_ttl: Duration,
    pub(crate) max_response_body: usize,
    pub(crate) redis_timeout: Duration,
    pub(crate) id: Option<String>,
    pub(crate) label: String,
    pub(crate) metrics: DispatcherMetrics,
    pub(crate) health_check: Option<HealthCheck>,
    pub(crate) stream_window: usize,
    pub(crate) stream_idle_timeout: Duration,
    /// The group this dispatcher serves in, and its rank there.
    pub(crate) priority: Option<(Arc<PriorityGroup>, usize)>,
    pub(crate) websocket_max_message: usize,
}

/// The defaults of [`DispatcherBuilder`], [`Upstream`](crate::Upstream)
/// and [`HealthCheck`], named once: the CLI shows and uses these.
pub mod defaults {
    use std::time::Duration;

    /// [`concurrency`](super::DispatcherBuilder::concurrency): 16.
    pub const CONCURRENCY: usize = 16;
    /// [`grace`](super::DispatcherBuilder::grace): 30 s.
    pub const GRACE: Duration = Duration::from_secs(30);
    /// [`poll_interval`](super::DispatcherBuilder::poll_interval): 1 s.
    pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// [`pause_poll`](super::DispatcherBuilder::pause_poll): 1 s.
    pub const PAUSE_POLL: Duration = Duration::from_secs(1);
    /// [`reap_interval`](super::DispatcherBuilder::reap_interval): 5 s.
    pub const REAP_INTERVAL: Duration = Duration::from_secs(5);
    /// [`heartbeat_ttl`](super::DispatcherBuilder::heartbeat_ttl): 10 s.
    pub const HEARTBEAT_TTL: Duration = Duration::from_secs(10);
    /// [`reply_ttl`](super::DispatcherBuilder::reply_ttl): 60 s.
    pub const REPLY_TTL: Duration = Duration::from_secs(60);
    /// [`max_response_body`](super::DispatcherBuilder::max_response_body): 64 MiB.
    pub const MAX_RESPONSE_BODY: usize = 64 * 1024 * 1024;
    /// [`redis_timeout`](super::DispatcherBuilder::redis_timeout): 2 s.
    pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
    /// The `WAIT` timeout when [`durable`](super::DispatcherBuilder::durable)
    /// is asked for without one: 250 ms.
    pub const DURABLE_WAIT: Duration = Duration::from_millis(250);
    /// [`stream_window`](super::DispatcherBuilder::stream_window): 1 MiB.
    pub const STREAM_WINDOW: usize = 1024 * 1024;
    /// [`stream_idle_timeout`](super::DispatcherBuilder::stream_idle_timeout): 60 s.
    pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// [`websocket_max_message`](super::DispatcherBuilder::websocket_max_message):
    /// 16 MiB.
    pub const WEBSOCKET_MAX_MESSAGE: usize = anteroom_protocol::MAX_SOCKET_MESSAGE;
    /// [`HealthCheck::interval`](crate::HealthCheck::interval): 1 s.
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
    /// [`HealthCheck::timeout`](crate::HealthCheck::timeout): 2 s.
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    /// [`Upstream::idle_timeout`](crate::Upstream::idle_timeout): 1 s, below
    /// the keep-alive timeouts of common app servers (gunicorn 2 s, Node 5 s).
    pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
    /// [`Upstream::max_headers`](crate::Upstream::max_headers): see
    /// [`DEFAULT_MAX_HEADERS`](crate::DEFAULT_MAX_HEADERS).
    pub const UPSTREAM_MAX_HEADERS: usize = crate::DEFAULT_MAX_HEADERS;
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: defaults::CONCURRENCY,
            grace: defaults::GRACE,
            poll_interval: defaults::POLL_INTERVAL,
            pause_poll: defaults::PAUSE_POLL,
            reap_interval: Some(defaults::REAP_INTERVAL),
            durable: None,
            heartbeat_ttl: defaults::HEARTBEAT_TTL,
            reply_ttl: defaults::REPLY_TTL,
            max_response_body: defaults::MAX_RESPONSE_BODY,
            redis_timeout: defaults::REDIS_TIMEOUT,
            id: None,
            label: String::new(),
            metrics: DispatcherMetrics::default(),
            health_check: None,
            stream_window: defaults::STREAM_WINDOW,
            websocket_max_message: defaults::WEBSOCKET_MAX_MESSAGE,
            stream_idle_timeout: defaults::STREAM_IDLE_TIMEOUT,
            priority: None,
        }
    }
}

impl DispatcherBuilder {
    /// The Redis server, as a URL (`redis://HOST:PORT/DB`, `rediss://`, `unix://`).
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// The Redis server, as a [`Target`] you already parsed.
    pub fn redis_target(mut self, target: Target) -> Self {
        self.redis = Some(target);
        self
    }

    /// The queue to serve (1 to 64 characters of `[A-Za-z0-9._-]`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// How many requests run at once (default 16). The dispatcher never
    /// holds more than this many requests in its processing list.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = n;
        self
    }

    /// How long shutdown waits for in-flight requests (default 30 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.settings.grace = grace;
        self
    }

    /// How long one blocking pull waits before checking for shutdown
    /// (default 1 s). Bounds how quickly an idle dispatcher stops.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval;
        self
    }

    /// How often the pause flag is re-read in case a pause announcement was
    /// missed (default 1 s). Announcements themselves act within milliseconds.
    pub fn pause_poll(mut self, interval: Duration) -> Self {
        self.settings.pause_poll = interval;
        self
    }

    /// How often this dispatcher looks for dispatchers that died holding
    /// requests and settles those requests (default 5 s; `None` disables).
    pub fn reap_interval(mut self, interval: Option<Duration>) -> Self {
        self.settings.reap_interval = interval;
        self
    }

    /// `Some(t)`: `WAIT 1 t` for a replica after taking a request (before
    /// running it) and after completing it, so neither step is undone by the
    /// loss of the primary (default `None`).
    pub fn durable(mut self, wait: Option<Duration>) -> Self {
        self.settings.durable = wait;
        self
    }

    /// Where the dispatcher counts requests (see
    /// [`DispatcherMetrics::register`]); by default into series no registry
    /// holds. Serve the registry with [`anteroom_metrics::serve`] or from
    /// the application's own endpoint with [`anteroom_metrics::encode`].
    pub fn metrics(mut self, metrics: DispatcherMetrics) -> Self {
        self.settings.metrics = metrics;
        self
    }

    /// Lifetime of the heartbeat key (default 10 s); refreshed every third of it.
    pub fn heartbeat_ttl(mut self, ttl: Duration) -> Self {
        self.settings.heartbeat_ttl = ttl;
        self
    }

    /// How long an unread reply list lives after the last reply (default 60 s),
    /// so replies to a proxy that died do not pile up.
    pub fn reply_ttl(mut self, ttl: Duration) -> Self {
        self.settings.reply_ttl = ttl;
        self
    }

    /// Largest response body passed back (default 64 MiB); larger is a 502.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.settings.max_response_body = bytes;
        self
    }

    /// Connect and response timeout for Redis commands (default 2 s).
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.settings.redis_timeout = timeout;
        self
    }

    /// This dispatcher's id (names its processing list); random by default.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.settings.id = Some(id.into());
        self
    }

    /// How to tell that the upstream can take requests (see
    /// [`Upstream::health_check`](crate::Upstream::health_check)). With
    /// one, the dispatcher takes no request until the check passes, and
    /// after a failed delivery takes none until it passes again; requests
    /// wait in the queue meanwhile. Without one (the default), a failed
    /// delivery holds pulling back for 1 s.
    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.settings.health_check = Some(check);
        self
    }

    /// A free-form version label shown in the heartbeat (e.g. a git sha).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.settings.label = label.into();
        self
    }

    /// Most bytes of a streamed response sent to a proxy and not yet
    /// handed to its client, and of a streamed request body a proxy sends
    /// ahead of what the app has read (default 1 MiB): the most a stream
    /// holds in Redis and in a process. At least 64 KiB, at most 16 MiB
    /// ([`anteroom_protocol::MAX_WINDOW`], the most a proxy honours).
    pub fn stream_window(mut self, bytes: usize) -> Self {
        let most = usize::try_from(anteroom_protocol::MAX_WINDOW).unwrap_or(usize::MAX);
        self.settings.stream_window = bytes.clamp(64 * 1024, most);
        self
    }

    /// How long a streamed response may go without the app's body
    /// producing a byte, or without the client reading one once the window
    /// is full, before it is aborted; and how long a streamed request body
    /// may go without a piece before it fails at the app (default 60 s; at
    /// least 1 s).
    pub fn stream_idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.stream_idle_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Largest WebSocket message relayed either way (default 16 MiB): over
    /// it the socket closes with 1009 (RFC 6455 section 7.4.1). The
    /// window ([`stream_window`](Self::stream_window)) also paces sockets,
    /// each direction.
    pub fn websocket_max_message(mut self, bytes: usize) -> Self {
        self.settings.websocket_max_message = bytes.max(1);
        self
    }

    /// Serves the queue as the next member of `group`, below those that
    /// joined before (see [`PriorityGroup`]): the group's permits replace
    /// [`concurrency`](Self::concurrency), and this queue is pulled only
    /// while no queue ranked above has a request waiting, beyond its
    /// guaranteed share with a `weight` (its part of the group's
    /// concurrency, `weight / sum of the members' weights`; `None`: none).
    pub fn priority(mut self, group: &Arc<PriorityGroup>, weight: Option<u32>) -> Self {
        self.priority = Some((Arc::clone(group), weight));
        self
    }

    /// Checks the configuration and builds the dispatcher. Does not connect.
    pub fn build(self) -> Result<Dispatcher, DispatcherError> {
        let client = match (self.redis, self.redis_url) {
            (Some(client), _) => client,
            (None, Some(url)) => Target::parse(&url).map_err(anteroom_redis::ConnectError::from)?,
            (None, None) => return Err(Kind::MissingRedis.into()),
        };
        let queue = self.queue.ok_or(Kind::MissingQueue)?;
        let keys = Keys::new(&queue)?;
        if self.settings.concurrency == 0 {
            return Err(Kind::ZeroConcurrency.into());
        }
        if self.settings.heartbeat_ttl < Duration::from_millis(300) {
            return Err(Kind::HeartbeatTtl.into());
        }
        let mut settings = self.settings;
        if let Some((group, weight)) = self.priority {
            let rank = group.join(keys.requests(), weight);
            settings.priority = Some((group, rank));
        }
        let id = match &settings.id {
            Some(id) => {
                validate_id(id)?;
                id.clone()
            }
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        Ok(Dispatcher {
            client,
            keys,
            id,
            settings,
            ready: watch::Sender::new(false),
        })
    }
}

/// A configured dispatcher, ready to serve a handler. A clone is a
/// dispatcher of its own, with its own [`ready`](Self::ready) signal (and
/// the same id: give each served clone its own with
/// [`DispatcherBuilder::id`], or build each).
#[derive(Debug)]
pub struct Dispatcher {
    pub(crate) client: Target,
    pub(crate) keys: Keys,
    pub(crate) id: String,
    pub(crate) settings: Settings,
    /// True while serving (see [`Dispatcher::ready`]); dropped, which
    /// ends every wait, when `serve` returns.
    pub(crate) ready: watch::Sender<bool>,
}

impl Clone for Dispatcher {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            keys: self.keys.clone(),
            id: self.id.clone(),
            settings: self.settings.clone(),
            ready: watch::Sender::new(false),
        }
    }
}

/// Tells when a dispatcher is serving; from [`Dispatcher::ready`].
#[derive(Debug, Clone)]
pub struct Ready(watch::Receiver<bool>);

impl Ready {
    /// Waits until the dispatcher has connected to Redis, read the pause
    /// flag and started its components and pull loop (its heartbeat's first
    /// beat follows at once): true. False when `serve` returned (failed to
    /// start, or stopped) instead. Completes at once if it is already
    /// serving.
    pub async fn wait(&mut self) -> bool {
        self.0.wait_for(|ready| *ready).await.is_ok()
    }

    /// Whether it is serving now.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }
}

impl Dispatcher {
    /// A signal that says when this dispatcher is serving. Take it before
    /// calling [`serve`](Self::serve), which consumes the dispatcher.
    pub fn ready(&self) -> Ready {
        Ready(self.ready.subscribe())
    }

    /// Starts building a dispatcher.
    pub fn builder() -> DispatcherBuilder {
        DispatcherBuilder {
            redis: None,
            redis_url: None,
            queue: None,
            priority: None,
            settings: Settings::default(),
        }
    }

    /// This dispatcher's id, as it appears in its processing list and heartbeat keys.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Serves `service` until `shutdown` completes, then drains.
    ///
    /// A service error, a panic, or a response body over the limit answers
    /// the client with 502; the dispatcher carries on. An error that is (or
    /// has as a `source()`) an [`UpstreamError`](crate::UpstreamError) of a
    /// failed connection is handled as the upstream's failure instead: a
    /// request the upstream never received goes back to the front of the
    /// queue, as does one that may have reached it but is safe to repeat
    /// (GET, HEAD, OPTIONS or an `Idempotency-Key`); any other gets 502
    /// "may or may not have been carried out". Either way pulling stops
    /// until the upstream is healthy again (see
    /// [`health_check`](DispatcherBuilder::health_check)).
    ///
    /// Returns an error when Redis cannot be reached at startup
    /// ([`DispatcherError::is_redis`]), or when a background component
    /// failed while serving ([`DispatcherError::is_component`]).
    pub async fn serve<S, B>(
        self,
        service: S,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DispatcherError>
    where
        S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        worker::run(self, service, shutdown).await
    }

    /// Serves an async function, as [`serve`](Self::serve) does a service.
    pub async fn serve_fn<F, Fut, B, E>(
        self,
        handler: F,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DispatcherError>
    where
        F: Fn(Request<Body>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
        E: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.serve(tower::service_fn(handler), shutdown).await
    }
}
