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

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

mod dispatcher;
mod proxy;

pub use dispatcher::{DispatcherMetrics, DispatcherQueueMetrics};
pub use proxy::{ProxyMetrics, ProxyQueueMetrics};

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of per-queue series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct QueueLabel {
    pub(crate) queue: String,
}

/// Labels of per-queue, per-status series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabels {
    pub(crate) queue: String,
    pub(crate) status: u16,
}

/// Labels of proxy-wide, per-reason series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusedLabels {
    pub(crate) reason: &'static str,
}

/// Labels of per-queue, per-reason series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub(crate) queue: String,
    pub(crate) reason: String,
}

/// The label of `queue`'s series.
pub(crate) fn queue_label(queue: &str) -> QueueLabel {
    QueueLabel {
        queue: queue.to_owned(),
    }
}

/// Latency buckets: 0.5 ms doubling to about 33 s (a hold budget's range).
pub(crate) fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

pub(crate) type Latencies = Family<QueueLabel, Histogram, fn() -> Histogram>;

pub(crate) fn latencies() -> Latencies {
    Family::new_with_constructor(latency_histogram)
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
    use std::time::Duration;

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
