//! Proxy configuration.

use std::time::Duration;

use anteroom_metrics::ProxyMetrics;

/// The defaults of [`ProxyConfig`] (what [`ProxyConfig::new`] sets), named
/// once: the CLI shows and uses these, the configuration file falls back to
/// them.
pub mod defaults {
    use std::time::Duration;

    /// [`hold`](super::ProxyConfig::hold): 30 s.
    pub const HOLD: Duration = Duration::from_secs(30);
    /// [`max_body`](super::ProxyConfig::max_body): 1 GiB (a body over
    /// [`BODY_BUFFER`] streams, so memory does not grow with it).
    pub const MAX_BODY: usize = 1024 * 1024 * 1024;
    /// [`body_buffer`](super::ProxyConfig::body_buffer): 256 KiB.
    pub const BODY_BUFFER: usize = 256 * 1024;
    /// [`grace`](super::ProxyConfig::grace): 30 s.
    pub const GRACE: Duration = Duration::from_secs(30);
    /// [`drain`](super::ProxyConfig::drain): 2 s.
    pub const DRAIN: Duration = Duration::from_secs(2);
    /// [`redis_timeout`](super::ProxyConfig::redis_timeout): 2 s.
    pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
    /// [`header_read_timeout`](super::ProxyConfig::header_read_timeout): 30 s.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// [`body_read_timeout`](super::ProxyConfig::body_read_timeout): 30 s.
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// [`send_timeout`](super::ProxyConfig::send_timeout): 60 s, nginx's.
    pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
    /// [`max_headers`](super::ProxyConfig::max_headers): see
    /// [`DEFAULT_MAX_HEADERS`](super::DEFAULT_MAX_HEADERS).
    pub const MAX_HEADERS: usize = super::DEFAULT_MAX_HEADERS;
    /// [`max_head_bytes`](super::ProxyConfig::max_head_bytes): 64 KiB.
    pub const MAX_HEAD_BYTES: usize = 64 * 1024;
    /// [`max_connections`](super::ProxyConfig::max_connections): 10,000.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// [`max_waiting`](super::ProxyConfig::max_waiting): 20,000.
    pub const MAX_WAITING: usize = 20_000;
    /// [`max_waiting_bytes`](super::ProxyConfig::max_waiting_bytes): 512 MiB.
    pub const MAX_WAITING_BYTES: usize = 512 * 1024 * 1024;
    /// [`enqueue_timeout`](super::ProxyConfig::enqueue_timeout): zero
    /// (503 at once while Redis is unreachable).
    pub const ENQUEUE_TIMEOUT: Duration = Duration::ZERO;
    /// [`redis_high_watermark`](super::ProxyConfig::redis_high_watermark):
    /// 90 % of `maxmemory`.
    pub const REDIS_HIGH_WATERMARK: u8 = 90;
    /// The `WAIT` timeout when [`durable`](super::ProxyConfig::durable) is
    /// asked for without one: 250 ms.
    pub const DURABLE_WAIT: Duration = Duration::from_millis(250);
    /// [`stream_idle_timeout`](super::ProxyConfig::stream_idle_timeout): 60 s.
    pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// [`max_websockets`](super::ProxyConfig::max_websockets): 10,000.
    pub const MAX_WEBSOCKETS: usize = 10_000;
    /// [`websocket_max_message`](super::ProxyConfig::websocket_max_message):
    /// 16 MiB.
    pub const WEBSOCKET_MAX_MESSAGE: usize = anteroom_protocol::MAX_SOCKET_MESSAGE;
    /// [`websocket_ping_interval`](super::ProxyConfig::websocket_ping_interval):
    /// 30 s.
    pub const WEBSOCKET_PING_INTERVAL: Duration = Duration::from_secs(30);
}

/// Default of [`ProxyConfig::max_headers`]: 500, well above hyper's 100.
/// nginx has no count limit, only sizes (`large_client_header_buffers 4
/// 8k`: 8 KiB a line, 32 KiB in all), so a browser with many cookies or a
/// chain of load balancers adding fields passes nginx with more than 100;
/// the head's size stays bounded by [`ProxyConfig::max_head_bytes`]. The
/// cost: above 100, hyper parses each head into a heap buffer of this many
/// entries (two allocations of about 16 KiB) instead of one on the stack.
pub const DEFAULT_MAX_HEADERS: usize = 500;

/// Everything [`serve`](crate::serve) needs to know.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// Redis URL (`redis://`, `rediss://`, `unix://`).
    pub redis_url: String,
    /// Queue the requests go to when no route matches (see `routes` and
    /// `default_queue`).
    pub queue: String,
    /// Routes to other queues, tried in order before the default queue;
    /// the first whose host and path prefix match wins.
    pub routes: Vec<RouteConfig>,
    /// Whether requests that match no route go to `queue` (the default);
    /// false answers them 404.
    pub default_queue: bool,
    /// A share of the default queue's requests sent to another queue.
    pub canary: Option<CanaryConfig>,
    /// How long a request may wait for its response before it gets 504.
    pub hold: Duration,
    /// Largest request body accepted; larger ones get 413.
    pub max_body: usize,
    /// Largest request body queued whole in its envelope. A larger one
    /// (declared, or found larger while reading) is queued with its first
    /// part, and the rest streams to the dispatcher that takes it, paced by
    /// its credits; until then the proxy reads no more of it (TCP holds
    /// it). docs/behaviour.md, "Request bodies".
    pub body_buffer: usize,
    /// How long shutdown waits for in-flight requests.
    pub grace: Duration,
    /// After shutdown begins, how long idle keep-alive connections stay
    /// open (within `grace`), so that a client's next request on one is
    /// answered, with `Connection: close`, instead of meeting a socket
    /// closed under it. HTTP/2 connections get GOAWAY after it.
    pub drain: Duration,
    /// Connect and response timeout for Redis commands (blocking reads excepted).
    pub redis_timeout: Duration,
    /// How long a client may take to send the request head.
    pub header_read_timeout: Duration,
    /// How long a client may take to send the request body (over it: 408).
    pub body_read_timeout: Duration,
    /// How long an answer being sent may make no progress (the client
    /// reads nothing) before its connection is dropped, as nginx's
    /// `send_timeout` (60 s).
    pub send_timeout: Duration,
    /// Most header fields in one request (over it: 431); default
    /// [`DEFAULT_MAX_HEADERS`].
    pub max_headers: usize,
    /// Most bytes in one request head, request line and headers (over it:
    /// 431). At least 8 KiB.
    pub max_head_bytes: usize,
    /// Most client connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Most requests that may wait in this proxy at once; more get 503.
    pub max_waiting: usize,
    /// Most request body bytes that may wait in this proxy at once; more get 503.
    pub max_waiting_bytes: usize,
    /// When Redis cannot be reached, how long to keep trying to enqueue
    /// before answering 503 (default zero: answer at once). Capped by `hold`.
    pub enqueue_timeout: Duration,
    /// `Some(t)`: after each enqueue, `WAIT 1 t` for a replica, so an
    /// accepted request survives the loss of the primary.
    pub durable: Option<Duration>,
    /// Percentage of Redis's `maxmemory`, 1 to 100, at which the proxy
    /// stops queueing new requests (503 with `Retry-After`) so that what
    /// is queued can still be taken and answered (a full Redis refuses the
    /// dispatchers' writes too); default
    /// [`REDIS_HIGH_WATERMARK`](defaults::REDIS_HIGH_WATERMARK). Read
    /// with `INFO memory` every 250 ms; not on Redis Cluster.
    pub redis_high_watermark: u8,
    /// How long a streamed response may go without a chunk before the
    /// proxy aborts it (the hold budget covers the time until its head);
    /// at least 1 s.
    pub stream_idle_timeout: Duration,
    /// Most WebSockets open (or waiting for their handshake's answer) at
    /// once; over it, a handshake is answered 503.
    pub max_websockets: usize,
    /// Largest WebSocket message, either way (RFC 6455 section 7.4.1:
    /// over it the socket closes with 1009).
    pub websocket_max_message: usize,
    /// A client socket silent this long is sent a ping; one silent twice
    /// as long is closed (1001). Keeps sockets open through idle timeouts
    /// of load balancers and NAT, and finds dead clients.
    pub websocket_ping_interval: Duration,
    /// This proxy's id (names its reply list); a random one when `None`.
    pub proxy_id: Option<String>,
    /// The layout of the request envelopes written (docs/protocol.md):
    /// version 2 by default; version 1 for dispatchers of releases that
    /// read only that.
    pub envelope_version: anteroom_protocol::EnvelopeVersion,
    /// The HTML page clients that accept HTML get while their queue is in
    /// maintenance mode (others get JSON); a built-in page showing the
    /// maintenance message when `None`.
    pub maintenance_page: Option<bytes::Bytes>,
    /// Terminate TLS with this certificate and key (every connection on the
    /// listener is TLS; `X-Forwarded-Proto` says `https`); plain HTTP/1.1
    /// and h2c when `None`.
    pub tls: Option<std::sync::Arc<crate::TlsCerts>>,
    /// Where the proxy counts requests. The default counts into series no
    /// registry holds; use [`ProxyMetrics::register`] to scrape them (the
    /// admin endpoint serves `/metrics` given the registry).
    pub metrics: ProxyMetrics,
}

impl ProxyConfig {
    /// Checks what [`serve`](crate::serve) would refuse, without
    /// connecting: every hold budget, the proxy's and each route's (zero is
    /// [`ServeError::ZeroHold`]: every request would get 504 at once; over
    /// [`anteroom_protocol::MAX_HOLD`] is [`ServeError::HoldTooLong`]), and
    /// each route ([`RouteConfig::check`]).
    pub fn validate(&self) -> Result<(), crate::ServeError> {
        for (i, route) in self.routes.iter().enumerate() {
            route
                .check()
                .map_err(|problem| crate::ServeError::BadRoute {
                    number: i + 1,
                    problem,
                })?;
        }
        if let Some(canary) = &self.canary {
            canary.check().map_err(crate::ServeError::BadCanary)?;
            if canary.queue == self.queue {
                return Err(crate::ServeError::BadCanary(format!(
                    "canary queue: {:?} is the default queue itself",
                    canary.queue
                )));
            }
        }
        if !(1..=100).contains(&self.redis_high_watermark) {
            return Err(crate::ServeError::BadWatermark(self.redis_high_watermark));
        }
        let holds = std::iter::once(self.hold).chain(self.routes.iter().filter_map(|r| r.hold));
        for hold in holds {
            if hold.is_zero() {
                return Err(crate::ServeError::ZeroHold);
            }
            if hold > anteroom_protocol::MAX_HOLD {
                return Err(crate::ServeError::HoldTooLong);
            }
        }
        Ok(())
    }

    /// A configuration with the [`defaults`]: hold 30 s, body limit 8 MiB,
    /// grace 30 s, drain 2 s, Redis timeout 2 s, head and body read
    /// timeouts 30 s each, send timeout 60 s, 500 headers and 64 KiB of
    /// head per request, 10,000 connections, at most 20,000 requests and
    /// 512 MiB of bodies waiting, 10,000 WebSockets with messages of at
    /// most 16 MiB, pinged after 30 s of silence.
    pub fn new(redis_url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            queue: queue.into(),
            routes: Vec::new(),
            default_queue: true,
            canary: None,
            hold: defaults::HOLD,
            max_body: defaults::MAX_BODY,
            body_buffer: defaults::BODY_BUFFER,
            grace: defaults::GRACE,
            drain: defaults::DRAIN,
            redis_timeout: defaults::REDIS_TIMEOUT,
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            send_timeout: defaults::SEND_TIMEOUT,
            body_read_timeout: defaults::BODY_READ_TIMEOUT,
            max_headers: defaults::MAX_HEADERS,
            max_head_bytes: defaults::MAX_HEAD_BYTES,
            max_connections: defaults::MAX_CONNECTIONS,
            max_waiting: defaults::MAX_WAITING,
            max_waiting_bytes: defaults::MAX_WAITING_BYTES,
            enqueue_timeout: defaults::ENQUEUE_TIMEOUT,
            redis_high_watermark: defaults::REDIS_HIGH_WATERMARK,
            stream_idle_timeout: defaults::STREAM_IDLE_TIMEOUT,
            max_websockets: defaults::MAX_WEBSOCKETS,
            websocket_max_message: defaults::WEBSOCKET_MAX_MESSAGE,
            websocket_ping_interval: defaults::WEBSOCKET_PING_INTERVAL,
            durable: None,
            proxy_id: None,
            envelope_version: anteroom_protocol::EnvelopeVersion::default(),
            maintenance_page: None,
            tls: None,
            metrics: ProxyMetrics::default(),
        }
    }
}

/// One route: requests whose host and path match go to `queue`, with the
/// route's own hold budget and waiting caps (the proxy's when `None`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RouteConfig {
    /// The `Host` (or HTTP/2 authority) to match, without port, compared
    /// case-insensitively; any host when `None`.
    pub host: Option<String>,
    /// A prefix the path must start with (`/api/`); any path when `None`.
    pub path_prefix: Option<String>,
    /// The queue matching requests go to.
    pub queue: String,
    /// This route's hold budget.
    pub hold: Option<Duration>,
    /// Most requests of this route waiting at once (over it: 503).
    pub max_waiting: Option<usize>,
    /// Most body bytes of this route waiting at once (over it: 503).
    pub max_waiting_bytes: Option<usize>,
    /// A share of this route's requests sent to another queue.
    pub canary: Option<CanaryConfig>,
}

/// A canary split: some of a route's requests go to `queue` instead
/// (dispatchers of a new version serve it while the rest serve the
/// route's queue). A request goes to the canary when its `header` says
/// `1`, or its `cookie` says `1`; it stays when either says `0`;
/// otherwise it is drawn at random with `weight` percent, and with a
/// `cookie` the answer sets it (`Set-Cookie: NAME=1` or `=0`), so the
/// client stays on its side (docs/operations.md, "Canary routing").
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CanaryConfig {
    /// The canary's queue.
    pub queue: String,
    /// Percent of the requests drawn for the canary, 0 to 100.
    pub weight: f64,
    /// The cookie that pins a client to one side.
    pub cookie: Option<String>,
    /// A request header field that picks the side (`1` canary, `0` main).
    pub header: Option<String>,
}

impl CanaryConfig {
    /// `weight` percent of the requests to `queue`, no cookie, no header.
    pub fn new(queue: impl Into<String>, weight: f64) -> Self {
        Self {
            queue: queue.into(),
            weight,
            cookie: None,
            header: None,
        }
    }

    /// What is wrong with this split, if anything: a queue name Redis keys
    /// cannot carry, a weight outside 0 to 100, a cookie name that is no
    /// RFC 6265 token, a header name that is no field name.
    pub fn check(&self) -> Result<(), String> {
        anteroom_protocol::Keys::new(&self.queue).map_err(|e| format!("canary queue: {e}"))?;
        if !(0.0..=100.0).contains(&self.weight) {
            return Err(format!(
                "canary weight: {} is not 0 to 100 (percent)",
                self.weight
            ));
        }
        if let Some(cookie) = &self.cookie {
            let token = !cookie.is_empty()
                && cookie
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
            if !token {
                return Err(format!(
                    "canary cookie: {cookie:?} is no cookie name (RFC 6265 section 4.1.1)"
                ));
            }
        }
        if let Some(header) = &self.header
            && http::HeaderName::from_bytes(header.as_bytes()).is_err()
        {
            return Err(format!("canary header: {header:?} is no header field name"));
        }
        Ok(())
    }
}

impl RouteConfig {
    /// What is wrong with this route, if anything: a queue name Redis keys
    /// cannot carry, or a `path_prefix` that does not start with `/` (no
    /// request path could match it).
    pub fn check(&self) -> Result<(), String> {
        anteroom_protocol::Keys::new(&self.queue).map_err(|e| format!("queue: {e}"))?;
        if self
            .path_prefix
            .as_deref()
            .is_some_and(|p| !p.starts_with('/'))
        {
            return Err("path_prefix: must start with /".to_owned());
        }
        if let Some(canary) = &self.canary {
            canary.check()?;
            if canary.queue == self.queue {
                return Err(format!(
                    "canary queue: {:?} is the route's own queue",
                    canary.queue
                ));
            }
        }
        Ok(())
    }

    /// A route to `queue` matching every request; narrow it with `host`
    /// and `path_prefix`.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            host: None,
            path_prefix: None,
            queue: queue.into(),
            hold: None,
            max_waiting: None,
            max_waiting_bytes: None,
            canary: None,
        }
    }

    /// Matches only requests for `host` (port ignored, case-insensitive).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into().to_ascii_lowercase());
        self
    }

    /// Matches only paths that start with `prefix`.
    pub fn path_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.path_prefix = Some(prefix.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_embedders_bad_route_is_an_error() {
        let mut config = ProxyConfig::new("redis://127.0.0.1:1", "web");
        assert!(config.validate().is_ok());
        let mut route = RouteConfig::new("api");
        route.path_prefix = Some("api/".into());
        config.routes.push(route);
        let err = config.validate().unwrap_err().to_string();
        assert_eq!(err, "route #1 path_prefix: must start with /");
        config.routes[0].path_prefix = Some("/api/".into());
        config.routes[0].hold = Some(Duration::from_secs(25 * 3600));
        assert!(matches!(
            config.validate(),
            Err(crate::ServeError::HoldTooLong)
        ));
        config.routes[0].hold = None;
        config.routes.push(RouteConfig::new("bad queue"));
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("route #2 queue:")
        );
    }
}
