//! Proxy configuration.

use std::time::Duration;

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
    /// Most requests that may wait in this proxy at once; more get 503.
    pub max_waiting: usize,
    /// Most request body bytes that may wait in this proxy at once; more get 503.
    pub max_waiting_bytes: usize,
    /// This proxy's id (names its reply list); a random one when `None`.
    pub proxy_id: Option<String>,
}

impl ProxyConfig {
    /// A configuration with the documented defaults: hold 30 s, body limit
    /// 8 MiB, grace 30 s, Redis timeout 2 s, header read timeout 30 s, at most
    /// 20,000 requests and 512 MiB of bodies waiting.
    pub fn new(redis_url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            queue: queue.into(),
            hold: Duration::from_secs(30),
            max_body: 8 * 1024 * 1024,
            grace: Duration::from_secs(30),
            redis_timeout: Duration::from_secs(2),
            header_read_timeout: Duration::from_secs(30),
            max_waiting: 20_000,
            max_waiting_bytes: 512 * 1024 * 1024,
            proxy_id: None,
        }
    }
}
