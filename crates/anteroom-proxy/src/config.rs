//! Proxy configuration.

use std::time::Duration;

use anteroom_metrics::ProxyMetrics;

/// Everything [`serve`](crate::serve) needs to know.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// Redis URL (`redis://`, `rediss://`, `unix://`).
    pub redis_url: String,
    /// Queue the requests go to.
    pub queue: String,
    /// How long a request may wait for its response before it gets 504.
    pub hold: Duration,
    /// Largest request body accepted; larger ones get 413.
    pub max_body: usize,
    /// How long shutdown waits for in-flight requests.
    pub grace: Duration,
    /// Connect and response timeout for Redis commands (blocking reads excepted).
    pub redis_timeout: Duration,
    /// How long a client may take to send the request head.
    pub header_read_timeout: Duration,
    /// How long a client may take to send the request body (over it: 408).
    pub body_read_timeout: Duration,
    /// Most header fields in one request (over it: 431).
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
    /// This proxy's id (names its reply list); a random one when `None`.
    pub proxy_id: Option<String>,
    /// Where the proxy counts requests. The default counts into series no
    /// registry holds; use [`ProxyMetrics::register`] to scrape them (the
    /// admin endpoint serves `/metrics` given the registry).
    pub metrics: ProxyMetrics,
}

impl ProxyConfig {
    /// A configuration with the documented defaults: hold 30 s, body limit
    /// 8 MiB, grace 30 s, Redis timeout 2 s, head and body read timeouts
    /// 30 s each, 100 headers and 64 KiB of head per request, 10,000
    /// connections, at most 20,000 requests and 512 MiB of bodies waiting.
    pub fn new(redis_url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            queue: queue.into(),
            hold: Duration::from_secs(30),
            max_body: 8 * 1024 * 1024,
            grace: Duration::from_secs(30),
            redis_timeout: Duration::from_secs(2),
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            max_headers: 100,
            max_head_bytes: 64 * 1024,
            max_connections: 10_000,
            max_waiting: 20_000,
            max_waiting_bytes: 512 * 1024 * 1024,
            enqueue_timeout: Duration::ZERO,
            durable: None,
            proxy_id: None,
            metrics: ProxyMetrics::default(),
        }
    }
}
