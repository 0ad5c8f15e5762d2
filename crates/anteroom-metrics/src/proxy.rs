//! What a proxy counts: [`ProxyMetrics`] and its per-queue handle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::{Latencies, QueueLabel, RefusedLabels, StatusLabels, latencies, queue_label};

/// What a proxy counts. Cloning shares the series.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    /// Responses per queue, for the status page's throughput chart.
    totals: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
    requests: Family<StatusLabels, Counter>,
    duration: Latencies,
    waiting: Family<QueueLabel, Gauge>,
    shed: Family<QueueLabel, Counter>,
    expired: Family<QueueLabel, Counter>,
    streams_aborted: Family<QueueLabel, Counter>,
    websockets: Family<QueueLabel, Gauge>,
    refused: Family<RefusedLabels, Counter>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self {
            totals: Arc::default(),
            requests: Family::default(),
            duration: latencies(),
            waiting: Family::default(),
            shed: Family::default(),
            expired: Family::default(),
            streams_aborted: Family::default(),
            websockets: Family::default(),
            refused: Family::default(),
        }
    }
}

impl ProxyMetrics {
    /// New series, registered in `registry`:
    ///
    /// | name | type | meaning |
    /// |---|---|---|
    /// | `anteroom_proxy_requests_total{queue,status}` | counter | responses sent, by HTTP status |
    /// | `anteroom_proxy_request_duration_seconds{queue}` | histogram | arrival to response, waiting included |
    /// | `anteroom_proxy_waiting_requests{queue}` | gauge | requests in this proxy waiting for a reply, or still sending their body |
    /// | `anteroom_proxy_shed_total{queue}` | counter | requests refused with 503 because the waiting limits were reached |
    /// | `anteroom_proxy_expired_total{queue}` | counter | requests answered 504 because the hold budget ran out |
    /// | `anteroom_proxy_streams_aborted_total{queue}` | counter | streamed responses the proxy aborted (HTTP/1.1: closed short; HTTP/2: reset) because they were cut short, idled out or broke the protocol |
    /// | `anteroom_proxy_websockets_open{queue}` | gauge | WebSockets open between a client and a dispatcher |
    /// | `anteroom_proxy_refused_total{reason}` | counter | requests the HTTP parser refused before routing (400, 414, 431), by `reason`: `target`, `target_too_long`, `head_too_large`, `header`, `framing`, `method`, `version` |
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "anteroom_proxy_requests",
            "Responses the proxy sent, by queue and HTTP status",
            metrics.requests.clone(),
        );
        registry.register(
            "anteroom_proxy_request_duration_seconds",
            "Time from a request's arrival to its response, waiting included",
            metrics.duration.clone(),
        );
        registry.register(
            "anteroom_proxy_waiting_requests",
            "Requests in this proxy waiting for their reply, or still sending their body",
            metrics.waiting.clone(),
        );
        registry.register(
            "anteroom_proxy_shed",
            "Requests refused with 503 because the proxy's waiting limits were reached",
            metrics.shed.clone(),
        );
        registry.register(
            "anteroom_proxy_expired",
            "Requests answered 504 because their hold budget ran out",
            metrics.expired.clone(),
        );
        registry.register(
            "anteroom_proxy_streams_aborted",
            "Streamed responses aborted: cut short by the dispatcher, idle too long, or out of order",
            metrics.streams_aborted.clone(),
        );
        registry.register(
            "anteroom_proxy_websockets_open",
            "WebSockets open between a client and a dispatcher",
            metrics.websockets.clone(),
        );
        registry.register(
            "anteroom_proxy_refused",
            "Requests the HTTP parser refused before they could be routed, by reason",
            metrics.refused.clone(),
        );
        metrics
    }

    /// Counts a request the HTTP parser refused for `reason` (a label
    /// listed in [`register`](Self::register)).
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// The series of `queue`, created at zero so they are scraped (and
    /// `rate()` works) before the first event. Keep the handle: updating
    /// through it needs no label lookup.
    pub fn queue(&self, queue: &str) -> ProxyQueueMetrics {
        let label = queue_label(queue);
        let answered_total = Arc::clone(
            self.totals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(queue.to_owned())
                .or_default(),
        );
        ProxyQueueMetrics {
            answered_total,
            requests: StatusCounters::new(queue, &self.requests),
            duration: self.duration.get_or_create(&label).clone(),
            waiting: self.waiting.get_or_create(&label).clone(),
            shed: self.shed.get_or_create(&label).clone(),
            expired: self.expired.get_or_create(&label).clone(),
            streams_aborted: self.streams_aborted.get_or_create(&label).clone(),
            websockets: self.websockets.get_or_create(&label).clone(),
        }
    }
}

impl ProxyMetrics {
    /// Responses sent for `queue` so far (all statuses).
    pub fn answered_total(&self, queue: &str) -> u64 {
        self.totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(queue)
            .map_or(0, |total| total.load(Ordering::Relaxed))
    }
}

/// One queue's series of [`ProxyMetrics`].
#[derive(Clone, Debug)]
pub struct ProxyQueueMetrics {
    answered_total: Arc<AtomicU64>,
    requests: StatusCounters,
    duration: Histogram,
    waiting: Gauge,
    shed: Counter,
    expired: Counter,
    streams_aborted: Counter,
    websockets: Gauge,
}

impl ProxyQueueMetrics {
    /// Counts a response with `status` that took `elapsed`.
    pub fn answered(&self, status: u16, elapsed: Duration) {
        self.answered_total.fetch_add(1, Ordering::Relaxed);
        self.requests.inc(status);
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// One more request waits (`+1`) or one stopped waiting (`-1`).
    pub fn waiting(&self, delta: i64) {
        self.waiting.inc_by(delta);
    }

    /// A request was refused because the waiting limits were reached.
    pub fn shed(&self) {
        self.shed.inc();
    }

    /// A request's hold budget ran out.
    pub fn expired(&self) {
        self.expired.inc();
    }

    /// A streamed response was aborted.
    pub fn stream_aborted(&self) {
        self.streams_aborted.inc();
    }

    /// A WebSocket opened.
    pub fn websocket_opened(&self) {
        self.websockets.inc();
    }

    /// A WebSocket closed.
    pub fn websocket_closed(&self) {
        self.websockets.dec();
    }
}

/// A queue's counters by status, cached so counting needs no allocation.
#[derive(Clone, Debug)]
pub(crate) struct StatusCounters {
    queue: String,
    family: Family<StatusLabels, Counter>,
    cached: Arc<RwLock<HashMap<u16, Counter>>>,
}

impl StatusCounters {
    /// The counters of `queue`; the one for 200 is created at zero at once,
    /// so the series exists (and `rate()` works) before the first response.
    pub(crate) fn new(queue: &str, family: &Family<StatusLabels, Counter>) -> Self {
        let ok = family
            .get_or_create(&StatusLabels {
                queue: queue.to_owned(),
                status: 200,
            })
            .clone();
        Self {
            queue: queue.to_owned(),
            family: family.clone(),
            cached: Arc::new(RwLock::new(HashMap::from([(200, ok)]))),
        }
    }

    pub(crate) fn inc(&self, status: u16) {
        let read = self.cached.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(counter) = read.get(&status) {
            counter.inc();
            return;
        }
        drop(read);
        let counter = self
            .family
            .get_or_create(&StatusLabels {
                queue: self.queue.clone(),
                status,
            })
            .clone();
        counter.inc();
        self.cached
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(status, counter);
    }
}
