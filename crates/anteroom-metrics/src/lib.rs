//! Anteroom's Prometheus metrics.
//!
//! One place names every metric, so the names stay consistent and the
//! documentation (docs/operations.md, "Metrics") has one source:
//!
//! - [`ProxyMetrics`]: what a proxy counts, served on its admin address at
//!   `/metrics`;
//! - [`DispatcherMetrics`]: what a dispatcher counts, served by [`serve`]
//!   (`anteroom dispatch --metrics ADDR`) or by an embedding application's
//!   own endpoint through [`encode`].
//!
//! Names follow the Prometheus conventions: an `anteroom_` prefix, the
//! component, base units (seconds), `_total` on counters. Every series
//! carries the `queue` label. Updating a metric is an atomic operation (a
//! label lookup for families), cheap enough for every request.
//!
//! The text is the OpenMetrics exposition format, which Prometheus scrapes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of per-queue series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// Labels of per-queue, per-status series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    queue: String,
    status: u16,
}

/// Labels of proxy-wide, per-reason series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

/// Labels of per-queue, per-reason series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    queue: String,
    reason: String,
}

/// Latency buckets: 0.5 ms doubling to about 33 s (a hold budget's range).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

type Latencies = Family<QueueLabel, Histogram, fn() -> Histogram>;

fn latencies() -> Latencies {
    Family::new_with_constructor(latency_histogram)
}

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
}

/// A queue's counters by status, cached so counting needs no allocation.
#[derive(Clone, Debug)]
struct StatusCounters {
    queue: String,
    family: Family<StatusLabels, Counter>,
    cached: Arc<RwLock<HashMap<u16, Counter>>>,
}

impl StatusCounters {
    /// The counters of `queue`; the one for 200 is created at zero at once,
    /// so the series exists (and `rate()` works) before the first response.
    fn new(queue: &str, family: &Family<StatusLabels, Counter>) -> Self {
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

    fn inc(&self, status: u16) {
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

fn queue_label(queue: &str) -> QueueLabel {
    QueueLabel {
        queue: queue.to_owned(),
    }
}

/// The registry's series in the OpenMetrics text format ([`CONTENT_TYPE`]).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail.
    if let Err(err) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(error = %err, "cannot encode the metrics");
    }
    text
}

/// The response to a scrape: [`encode`] with its content type.
pub fn response(registry: &Registry) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(encode(registry))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    resp
}

/// Serves `GET /metrics` (and `/healthz`) on `listener` until `shutdown`
/// completes: the endpoint of `anteroom dispatch --metrics ADDR`, bounded
/// as every side endpoint is (`anteroom_runtime::http::serve_side`).
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) {
    tracing::info!(listen = ?listener.local_addr().ok(), "metrics endpoint ready");
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let resp = route(&registry, req.method(), req.uri().path());
        async move { Ok::<_, Infallible>(resp) }
    });
    anteroom_runtime::http::serve_side(listener, "metrics", service, shutdown).await;
}

fn route(registry: &Registry, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *resp.status_mut() = status;
        resp
    };
    if method != Method::GET && method != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/metrics" => response(registry),
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        _ => plain(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let mut registry = Registry::default();
        let proxy = ProxyMetrics::register(&mut registry);
        let dispatcher = DispatcherMetrics::register(&mut registry);
        let proxy = proxy.queue("web");
        let dispatcher = dispatcher.queue("web");
        proxy.answered(200, Duration::from_millis(3));
        proxy.answered(200, Duration::from_millis(5));
        proxy.waiting(1);
        dispatcher.handled(404, Duration::from_millis(1));
        dispatcher.upstream_health(false, 1_700_000_000_500);
        dispatcher.upstream_failure("refused");
        dispatcher.upstream_failure("status_503");
        dispatcher.upstream_failure("status_503");
        dispatcher.requeued();
        let text = encode(&registry);
        for line in [
            "anteroom_proxy_requests_total{queue=\"web\",status=\"200\"} 2",
            "anteroom_proxy_request_duration_seconds_count{queue=\"web\"} 2",
            "anteroom_proxy_waiting_requests{queue=\"web\"} 1",
            "anteroom_dispatcher_requests_total{queue=\"web\",status=\"404\"} 1",
            "anteroom_proxy_shed_total{queue=\"web\"} 0",
            "anteroom_dispatcher_dead_lettered_total{queue=\"web\"} 0",
            "anteroom_dispatcher_in_flight_requests{queue=\"web\"} 0",
            "anteroom_dispatcher_requeued_total{queue=\"web\"} 1",
            "anteroom_dispatcher_requests_total{queue=\"web\",status=\"200\"} 0",
            "anteroom_dispatcher_upstream_healthy{queue=\"web\"} 0",
            "anteroom_dispatcher_upstream_health_changed_timestamp_seconds{queue=\"web\"} 1700000000.5",
            "anteroom_dispatcher_upstream_failures_total{queue=\"web\",reason=\"refused\"} 1",
            "anteroom_dispatcher_upstream_failures_total{queue=\"web\",reason=\"status_503\"} 2",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }
}
