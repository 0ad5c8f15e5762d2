//! Heartbeats: what each live proxy and dispatcher says about itself.
//!
//! Each is a JSON string at `anteroom:{q}:dispatcher:<id>` or
//! `anteroom:{q}:proxy:<id>` with a TTL, refreshed while the component runs;
//! the id is also in the queue's `dispatchers` or `proxies` sorted set with
//! the time of the last refresh as its score.

use serde::{Deserialize, Serialize};

/// A dispatcher's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatcherHeartbeat {
    /// The dispatcher id (names its processing list).
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Free-form version label (e.g. a release or git sha).
    #[serde(default)]
    pub label: String,
    /// Requests it runs at once at most.
    pub concurrency: usize,
    /// Requests it is running now.
    pub in_flight: usize,
    /// WebSockets it has open: their handshakes stay in its processing
    /// list while they are, though they are no running requests (absent:
    /// none, or a dispatcher from before WebSockets).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub websockets: u64,
    /// True once it has seen the queue's pause and stopped pulling.
    #[serde(default)]
    pub paused: bool,
    /// The `id` of the pause it has stopped for (see [`PauseRecord`]), so a
    /// stale acknowledgement of an earlier pause is not mistaken for this one.
    #[serde(default)]
    pub pause_id: Option<String>,
    /// When it started, Unix milliseconds.
    pub started_at_ms: u64,
    /// Set while it takes no requests because its upstream is unhealthy
    /// (unreachable, or failing its health check); absent while healthy.
    /// Dispatchers without an upstream never set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<Unhealthy>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why and since when a dispatcher takes no requests from its queue:
/// its upstream failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unhealthy {
    /// When the upstream was first found unhealthy, Unix milliseconds.
    pub since_ms: u64,
    /// The latest failure, short and for people: `connection refused`,
    /// `timeout`, `status 503`, `not checked yet`.
    pub reason: String,
}

/// A proxy's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyHeartbeat {
    /// The proxy id (names its reply list).
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Anteroom version.
    pub version: String,
    /// Requests waiting in this proxy for a reply.
    pub waiting: usize,
    /// This proxy's hold budget for the queue, milliseconds (the longest
    /// of its routes to it); absent from proxies before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<u64>,
    /// When it started, Unix milliseconds.
    pub started_at_ms: u64,
    /// This proxy's canary splits from this queue: a share of its requests
    /// (or those a cookie or header picks) sent to another queue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canaries: Vec<CanarySplit>,
}

/// One canary split as a proxy reports it in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanarySplit {
    /// The queue the canary share goes to.
    pub queue: String,
    /// The share of requests drawn for it, in parts per million.
    pub weight_ppm: u32,
    /// The cookie that pins a client to one side, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The header field that picks a side, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Requests this proxy sent to the canary queue since it started.
    pub to_canary: u64,
    /// Requests this proxy kept on the main queue since it started.
    pub to_main: u64,
}

/// The value of `anteroom:{q}:paused` while the queue is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRecord {
    /// Unique id of this pause.
    pub id: String,
    /// When the pause began, Unix milliseconds.
    pub since_ms: u64,
    /// Who paused: free text such as `cli@host` or `admin@proxy-host`.
    #[serde(default)]
    pub by: String,
}

/// The value of `anteroom:{q}:maintenance` while the queue is in
/// maintenance mode: proxies answer each new request with 503 Service
/// Unavailable and `Retry-After` (RFC 9110 section 15.6.4, section 10.2.3)
/// instead of queueing it; requests already queued keep waiting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceRecord {
    /// When maintenance began, Unix milliseconds.
    pub since_ms: u64,
    /// Who turned it on: free text such as `cli@host`.
    #[serde(default)]
    pub by: String,
    /// The text the page shows; proxies use their own when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `Retry-After` seconds each 503 carries.
    #[serde(default = "default_retry_after")]
    pub retry_after_secs: u32,
}

fn default_retry_after() -> u32 {
    30
}

impl MaintenanceRecord {
    /// The record in `raw` (the key's value); anything in the key means
    /// maintenance, even a value some script wrote by hand (then with the
    /// default message and a 30 s `Retry-After`).
    pub fn parse(raw: &str) -> Self {
        serde_json::from_str(raw).unwrap_or_else(|_| Self {
            since_ms: 0,
            by: String::new(),
            message: None,
            retry_after_secs: default_retry_after(),
        })
    }
}
