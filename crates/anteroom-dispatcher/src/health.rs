//! Upstream health: whether this dispatcher takes requests from its queue.
//!
//! A dispatcher in front of an upstream server must not take requests that
//! server cannot run: a request taken from the queue while the app restarts
//! would fail, whereas one left in the queue just waits (within its hold
//! budget, as during a pause). So the pull loop takes requests only while
//! the [`Gate`] is open.
//!
//! - The gate closes when a request fails to reach the upstream (any
//!   transport failure counts) or a health check fails.
//! - A [`HealthCheck`] decides when it opens again: `GET` of a health path
//!   that must answer 2xx (checked every interval, healthy or not), or a
//!   plain TCP connect (checked only while unhealthy).
//! - While unhealthy, checks repeat after 50 ms, doubling up to the
//!   interval, so service resumes soon after the upstream is back.
//! - A check that began before the latest failure cannot reopen the gate:
//!   its answer may predate the failure.
//!
//! Each change is logged once, and mirrored in the heartbeat (`unhealthy`)
//! and the metrics; requests never log it one by one.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anteroom_metrics::DispatcherQueueMetrics;
use anteroom_protocol::{Unhealthy, now_ms};
use anteroom_redis::{Backoff, sleep_or_stop};
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::transport_reason;

/// How a dispatcher finds out that its upstream can take requests again
/// (see [`DispatcherBuilder::health_check`](crate::DispatcherBuilder::health_check)).
///
/// Made by [`Upstream::health_check`](crate::Upstream::health_check); the
/// defaults are a 1 s interval and a 2 s timeout.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    probe: Probe,
    interval: Duration,
    timeout: Duration,
}

#[derive(Debug, Clone)]
enum Probe {
    /// `GET uri` must answer 2xx.
    Get {
        uri: Uri,
        client: Box<Client<HttpConnector, Empty<bytes::Bytes>>>,
    },
    /// A TCP connection to `host:port` must open.
    Connect { host: String, port: u16 },
}

impl HealthCheck {
    /// Checks with `GET uri`, healthy on any 2xx status. `Host` is the
    /// URI's authority.
    pub(crate) fn get(uri: Uri) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A fresh connection each time: a check must see a restarted
        // server, not a pooled connection to the old one.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Self::with_probe(Probe::Get {
            uri,
            client: Box::new(client),
        })
    }

    /// Checks that a TCP connection to `host:port` opens.
    pub(crate) fn connect(host: String, port: u16) -> Self {
        Self::with_probe(Probe::Connect { host, port })
    }

    fn with_probe(probe: Probe) -> Self {
        Self {
            probe,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        }
    }

    /// How often to check (default 1 s): every interval for a health path,
    /// also while healthy; while unhealthy, first after 50 ms, doubling up
    /// to the interval.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How long one check may take before it counts as failed (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether checks run while healthy too (a health path does; a plain
    /// connect is tried only after a failure).
    fn is_periodic(&self) -> bool {
        matches!(self.probe, Probe::Get { .. })
    }

    /// One check: `Ok` when healthy, else the reason.
    async fn check(&self) -> Result<(), String> {
        let attempt = async {
            match &self.probe {
                Probe::Get { uri, client } => {
                    let request = Request::get(uri.clone())
                        .header(http::header::USER_AGENT, "anteroom-health-check")
                        .body(Empty::new())
                        .map_err(|e| e.to_string())?;
                    let response = client
                        .request(request)
                        .await
                        .map_err(|e| transport_reason(&e))?;
                    if response.status().is_success() {
                        Ok(())
                    } else {
                        Err(format!("status {}", response.status().as_u16()))
                    }
                }
                Probe::Connect { host, port } => {
                    tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map(drop)
                        .map_err(|e| transport_reason(&e))
                }
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or_else(|_| Err("timeout".to_owned()))
    }
}

/// Whether the pull loop may take requests: open while the upstream is
/// healthy. Shared by the pull loop, the request tasks (which report
/// failures), the checker and the heartbeat.
pub(crate) struct Gate {
    state: watch::Sender<Option<Unhealthy>>,
    /// When the latest failure was reported; older checks cannot reopen.
    failed_at: Mutex<Instant>,
    metrics: DispatcherQueueMetrics,
}

impl Gate {
    /// Open (no health check: nothing to wait for), or closed until the
    /// first check passes.
    pub(crate) fn new(checked: bool, metrics: DispatcherQueueMetrics) -> Self {
        let initial = checked.then(|| Unhealthy {
            since_ms: now_ms(),
            reason: "not checked yet".to_owned(),
        });
        metrics.upstream_health(initial.is_none(), now_ms());
        Self {
            state: watch::Sender::new(initial),
            failed_at: Mutex::new(Instant::now()),
            metrics,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.state.borrow().is_none()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Unhealthy>> {
        self.state.subscribe()
    }

    /// The upstream failed (a request or a check): close, or keep closed
    /// with the new reason. Logs only when something changed.
    pub(crate) fn failed(&self, reason: &str) {
        *self
            .failed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.metrics.upstream_failure(reason);
        self.state.send_if_modified(|state| match state {
            None => {
                tracing::warn!(
                    reason,
                    "upstream unhealthy; taking no requests until it recovers"
                );
                let since_ms = now_ms();
                self.metrics.upstream_health(false, since_ms);
                *state = Some(Unhealthy {
                    since_ms,
                    reason: reason.to_owned(),
                });
                true
            }
            Some(unhealthy) if unhealthy.reason != reason => {
                tracing::info!(reason, "upstream still unhealthy");
                unhealthy.reason = reason.to_owned();
                true
            }
            Some(_) => false,
        });
    }

    /// A check that began at `checked_at` passed: open, unless a failure
    /// was reported since it began.
    fn recovered(&self, checked_at: Instant) {
        if *self
            .failed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            > checked_at
        {
            return;
        }
        self.state.send_if_modified(|state| match state.take() {
            Some(unhealthy) => {
                let down_ms = now_ms().saturating_sub(unhealthy.since_ms);
                tracing::info!(down_ms, "upstream healthy; taking requests");
                self.metrics.upstream_health(true, now_ms());
                true
            }
            None => false,
        });
    }
}

/// Without a [`HealthCheck`], how long a failed delivery holds pulling back.
const RETRY_WITHOUT_CHECK: Duration = Duration::from_secs(1);

/// Runs `check` for as long as the dispatcher runs (until `stop`), opening
/// and closing `gate`. Without a check, the gate reopens
/// [`RETRY_WITHOUT_CHECK`] after each failure.
pub(crate) async fn run(
    gate: std::sync::Arc<Gate>,
    check: Option<HealthCheck>,
    stop: CancellationToken,
) {
    let mut changes = gate.subscribe();
    let Some(check) = check else {
        loop {
            if changes.borrow_and_update().is_some() {
                if sleep_or_stop(&stop, RETRY_WITHOUT_CHECK).await {
                    return;
                }
                gate.recovered(Instant::now());
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = stop.cancelled() => return,
            }
        }
    };
    let mut backoff = Backoff::new();
    loop {
        let healthy = changes.borrow_and_update().is_none();
        if healthy {
            backoff.reset();
            // A health path is checked every interval; a plain connect only
            // once a request has failed. Either way a failure wakes us.
            let periodic = check.is_periodic();
            tokio::select! {
                () = tokio::time::sleep(check.interval), if periodic => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = stop.cancelled() => return,
            }
        }
        let started = Instant::now();
        let result = tokio::select! {
            result = check.check() => result,
            () = stop.cancelled() => return,
        };
        match result {
            Ok(()) => gate.recovered(started),
            Err(reason) => {
                gate.failed(&reason);
                let delay = backoff.next_delay().min(check.interval);
                if sleep_or_stop(&stop, delay).await {
                    return;
                }
            }
        }
    }
}
