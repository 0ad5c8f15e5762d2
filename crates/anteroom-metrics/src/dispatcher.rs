//! What a dispatcher counts: [`DispatcherMetrics`] and its per-queue handle.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::proxy::StatusCounters;
use crate::{Latencies, QueueLabel, ReasonLabels, StatusLabels, latencies, queue_label};

/// What a dispatcher counts. Cloning shares the series.
#[derive(Clone, Debug)]
pub struct DispatcherMetrics {
    requests: Family<StatusLabels, Counter>,
    queue_wait: Latencies,
    handler: Latencies,
    in_flight: Family<QueueLabel, Gauge>,
    expired: Family<QueueLabel, Counter>,
    dead_lettered: Family<QueueLabel, Counter>,
    requeued: Family<QueueLabel, Counter>,
    streams_aborted: Family<QueueLabel, Counter>,
    websockets: Family<QueueLabel, Gauge>,
    request_bodies_cut: Family<QueueLabel, Counter>,
    upstream_healthy: Family<QueueLabel, Gauge>,
    upstream_changed: Family<QueueLabel, Gauge<f64, AtomicU64>>,
    upstream_failures: Family<ReasonLabels, Counter>,
}

impl Default for DispatcherMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            queue_wait: latencies(),
            handler: latencies(),
            in_flight: Family::default(),
            expired: Family::default(),
            dead_lettered: Family::default(),
            requeued: Family::default(),
            streams_aborted: Family::default(),
            websockets: Family::default(),
            request_bodies_cut: Family::default(),
            upstream_healthy: Family::default(),
            upstream_changed: Family::default(),
            upstream_failures: Family::default(),
        }
    }
}

impl DispatcherMetrics {
    /// New series, registered in `registry`:
    ///
    /// | name | type | meaning |
    /// |---|---|---|
    /// | `anteroom_dispatcher_requests_total{queue,status}` | counter | replies pushed, by HTTP status |
    /// | `anteroom_dispatcher_queue_wait_seconds{queue}` | histogram | enqueue to being taken by this dispatcher |
    /// | `anteroom_dispatcher_handler_duration_seconds{queue}` | histogram | time in the handler (or upstream) |
    /// | `anteroom_dispatcher_in_flight_requests{queue}` | gauge | requests being handled now |
    /// | `anteroom_dispatcher_expired_total{queue}` | counter | requests taken after their deadline, not run |
    /// | `anteroom_dispatcher_dead_lettered_total{queue}` | counter | envelopes that did not decode, set aside |
    /// | `anteroom_dispatcher_requeued_total{queue}` | counter | requests put back at the front of the queue (the upstream never got them, or failed on a request safe to repeat) |
    /// | `anteroom_dispatcher_streams_aborted_total{queue}` | counter | streamed responses cut short (the body failed or idled out, the dispatcher stopped) |
    /// | `anteroom_dispatcher_websockets_open{queue}` | gauge | WebSockets open to the app |
    /// | `anteroom_dispatcher_request_bodies_cut_total{queue}` | counter | streamed request bodies the app read cut short (the client left, stalled or sent too much; the proxy gave up; pieces lost or out of order) |
    /// | `anteroom_dispatcher_upstream_healthy{queue}` | gauge | 1 while taking requests, 0 while held back by an unhealthy upstream |
    /// | `anteroom_dispatcher_upstream_health_changed_timestamp_seconds{queue}` | gauge | when the upstream last became healthy or unhealthy (Unix seconds) |
    /// | `anteroom_dispatcher_upstream_failures_total{queue,reason}` | counter | failed deliveries and checks: `refused`, `timeout`, `reset`, `closed`, `unreachable`, `status_NNN`, `other` |
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "anteroom_dispatcher_requests",
            "Replies the dispatcher pushed, by queue and HTTP status",
            metrics.requests.clone(),
        );
        registry.register(
            "anteroom_dispatcher_queue_wait_seconds",
            "Time from a request's enqueue to this dispatcher taking it",
            metrics.queue_wait.clone(),
        );
        registry.register(
            "anteroom_dispatcher_handler_duration_seconds",
            "Time a request spent in the handler or upstream",
            metrics.handler.clone(),
        );
        registry.register(
            "anteroom_dispatcher_in_flight_requests",
            "Requests this dispatcher is handling now",
            metrics.in_flight.clone(),
        );
        registry.register(
            "anteroom_dispatcher_expired",
            "Requests taken after their deadline had passed, and not run",
            metrics.expired.clone(),
        );
        registry.register(
            "anteroom_dispatcher_dead_lettered",
            "Envelopes that did not decode, moved to the dead-letter list",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "anteroom_dispatcher_requeued",
            "Requests put back at the front of the queue instead of answered",
            metrics.requeued.clone(),
        );
        registry.register(
            "anteroom_dispatcher_streams_aborted",
            "Streamed responses cut short: the body failed or idled out, or the dispatcher stopped",
            metrics.streams_aborted.clone(),
        );
        registry.register(
            "anteroom_dispatcher_websockets_open",
            "WebSockets open to the app",
            metrics.websockets.clone(),
        );
        registry.register(
            "anteroom_dispatcher_request_bodies_cut",
            "Streamed request bodies the app read cut short: the client left, stalled or sent too much, or pieces were lost",
            metrics.request_bodies_cut.clone(),
        );
        registry.register(
            "anteroom_dispatcher_upstream_healthy",
            "1 while the dispatcher takes requests, 0 while its upstream is unhealthy",
            metrics.upstream_healthy.clone(),
        );
        registry.register(
            "anteroom_dispatcher_upstream_health_changed_timestamp_seconds",
            "When the upstream last became healthy or unhealthy, Unix seconds",
            metrics.upstream_changed.clone(),
        );
        registry.register(
            "anteroom_dispatcher_upstream_failures",
            "Failed deliveries to and health checks of the upstream, by reason",
            metrics.upstream_failures.clone(),
        );
        metrics
    }

    /// The series of `queue`, created at zero so they are scraped (and
    /// `rate()` works) before the first event. Keep the handle: updating
    /// through it needs no label lookup.
    pub fn queue(&self, queue: &str) -> DispatcherQueueMetrics {
        let label = queue_label(queue);
        DispatcherQueueMetrics {
            requests: StatusCounters::new(queue, &self.requests),
            queue_wait: self.queue_wait.get_or_create(&label).clone(),
            handler: self.handler.get_or_create(&label).clone(),
            in_flight: self.in_flight.get_or_create(&label).clone(),
            expired: self.expired.get_or_create(&label).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&label).clone(),
            requeued: self.requeued.get_or_create(&label).clone(),
            streams_aborted: self.streams_aborted.get_or_create(&label).clone(),
            websockets: self.websockets.get_or_create(&label).clone(),
            request_bodies_cut: self.request_bodies_cut.get_or_create(&label).clone(),
            upstream_healthy: self.upstream_healthy.get_or_create(&label).clone(),
            upstream_changed: self.upstream_changed.get_or_create(&label).clone(),
            upstream_failures: self.upstream_failures.clone(),
            queue: queue.to_owned(),
        }
    }
}

/// One queue's series of [`DispatcherMetrics`].
#[derive(Clone, Debug)]
pub struct DispatcherQueueMetrics {
    requests: StatusCounters,
    queue_wait: Histogram,
    handler: Histogram,
    in_flight: Gauge,
    expired: Counter,
    dead_lettered: Counter,
    requeued: Counter,
    streams_aborted: Counter,
    websockets: Gauge,
    request_bodies_cut: Counter,
    upstream_healthy: Gauge,
    upstream_changed: Gauge<f64, AtomicU64>,
    upstream_failures: Family<ReasonLabels, Counter>,
    queue: String,
}

impl DispatcherQueueMetrics {
    /// A request was taken after waiting `waited` in the queue.
    pub fn taken(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// A handler finished with `status` after `elapsed`.
    pub fn handled(&self, status: u16, elapsed: Duration) {
        self.requests.inc(status);
        self.handler.observe(elapsed.as_secs_f64());
    }

    /// One more request is handled (`+1`) or one finished (`-1`).
    pub fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    /// A request was taken after its deadline and not run.
    pub fn expired(&self) {
        self.expired.inc();
    }

    /// An envelope was moved to the dead-letter list.
    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    /// A request was put back at the front of the queue.
    pub fn requeued(&self) {
        self.requeued.inc();
    }

    /// A streamed response was cut short.
    pub fn stream_aborted(&self) {
        self.streams_aborted.inc();
    }

    /// A WebSocket opened to the app.
    pub fn websocket_opened(&self) {
        self.websockets.inc();
    }

    /// A WebSocket to the app closed.
    pub fn websocket_closed(&self) {
        self.websockets.dec();
    }

    /// A streamed request body reached the app cut short.
    pub fn request_body_cut(&self) {
        self.request_bodies_cut.inc();
    }

    /// The upstream became healthy (`true`) or unhealthy at `at_ms` (Unix
    /// milliseconds).
    pub fn upstream_health(&self, healthy: bool, at_ms: u64) {
        self.upstream_healthy.set(i64::from(healthy));
        self.upstream_changed.set(at_ms as f64 / 1000.0);
    }

    /// A delivery to or a check of the upstream failed, for the reason
    /// `label` (a bounded set: `refused`, `timeout`, `reset`, `closed`,
    /// `unreachable`, `status_NNN`, `other`).
    pub fn upstream_failure(&self, label: &str) {
        self.upstream_failures
            .get_or_create(&ReasonLabels {
                queue: self.queue.clone(),
                reason: label.to_owned(),
            })
            .inc();
    }
}
