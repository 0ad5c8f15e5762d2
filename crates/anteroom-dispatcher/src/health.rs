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
//! - When the upstream fails again right after each reopening (a request
//!   that breaks the connection every time, a front that accepts
//!   connections for a dead app), the gate stays closed longer each time
//!   (100 ms doubling to 5 s) until a request gets a response again.
//!
//! Each change is logged once, and mirrored in the heartbeat (`unhealthy`)
//! and the metrics; requests never log it one by one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anteroom_metrics::DispatcherQueueMetrics;
use anteroom_protocol::{Unhealthy, now_ms};
use anteroom_redis::sleep_or_stop;
use http::{Request, Uri};
use http_body_util::Empty;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{FailureReason, reason_of};
use crate::transport::{Pool, PoolSettings, Transport};

/// How a dispatcher finds out that its upstream can take requests again
/// (see [`DispatcherBuilder::health_check`](crate::DispatcherBuilder::health_check)).
///
/// [`Upstream::health_check`](crate::Upstream::health_check) makes one for
/// an upstream; [`http`](Self::http) and [`tcp`](Self::tcp) make one for
/// anything else. The defaults are a 1 s interval and a 2 s timeout.
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
        /// The URI as logs show it (`unix:/PATH/up` for a socket).
        shown: String,
        client: Box<Pool<Empty<bytes::Bytes>>>,
    },
    /// A TCP connection to `host:port` must open.
    Connect { host: String, port: u16 },
    /// A connection to the Unix socket at the path must open.
    ConnectUnix(std::path::PathBuf),
}

impl HealthCheck {
    /// Healthy when `GET uri` (an absolute `http://` URI) answers 2xx,
    /// checked every interval, also while healthy. `Host` is the URI's
    /// authority; each check opens a fresh connection.
    pub fn http(uri: Uri) -> Self {
        let authority = uri
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
        Self::get(uri, &Transport::Tcp(authority))
    }

    /// Healthy when `GET uri` answers 2xx over `transport`, each check on
    /// a fresh connection: a check must see a restarted server, not a
    /// pooled connection to the old one.
    pub(crate) fn get(uri: Uri, transport: &Transport) -> Self {
        let settings = PoolSettings {
            idle_timeout: Duration::from_secs(1),
            max_idle: 0,
            max_headers: crate::upstream::DEFAULT_MAX_HEADERS,
        };
        let shown = match transport {
            Transport::Unix(path) => format!(
                "unix:{}{}",
                path.display(),
                uri.path_and_query().map_or("/", |p| p.as_str())
            ),
            _ => uri.to_string(),
        };
        Self::with_probe(Probe::Get {
            uri,
            shown,
            client: Box::new(Pool::new(transport, &settings)),
        })
    }

    /// Healthy when a connection to the Unix socket at `path` opens;
    /// checked like [`tcp`](Self::tcp).
    pub fn unix(path: impl Into<std::path::PathBuf>) -> Self {
        Self::with_probe(Probe::ConnectUnix(path.into()))
    }

    /// Healthy when a TCP connection to `host:port` opens; checked at start
    /// and after a failed delivery, not while healthy.
    pub fn tcp(host: impl Into<String>, port: u16) -> Self {
        Self::with_probe(Probe::Connect {
            host: host.into(),
            port,
        })
    }

    fn with_probe(probe: Probe) -> Self {
        Self {
            probe,
            interval: crate::defaults::HEALTH_INTERVAL,
            timeout: crate::defaults::HEALTH_TIMEOUT,
        }
    }

    /// How often to check (default 1 s): every interval for
    /// [`http`](Self::http), also while healthy; while unhealthy, first
    /// after 50 ms, doubling up to the interval. At least 10 ms.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(MIN_TIME);
        self
    }

    /// How long one check may take before it counts as failed (default
    /// 2 s). At least 10 ms.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(MIN_TIME);
        self
    }

    /// What is checked, for log lines: the URI, or `host:port`.
    fn target(&self) -> String {
        match &self.probe {
            Probe::Get { shown, .. } => shown.clone(),
            Probe::Connect { host, port } => format!("{host}:{port}"),
            Probe::ConnectUnix(path) => format!("unix:{}", path.display()),
        }
    }

    /// Whether checks run while healthy too (an HTTP check does; a plain
    /// connect is tried only after a failure).
    fn is_periodic(&self) -> bool {
        matches!(self.probe, Probe::Get { .. })
    }

    /// One check: `Ok` when healthy, else the reason.
    async fn check(&self) -> Result<(), FailureReason> {
        let attempt = async {
            match &self.probe {
                Probe::Get { uri, client, .. } => {
                    let request = Request::get(uri.clone())
                        .header(http::header::USER_AGENT, "anteroom-health-check")
                        .body(Empty::new())
                        .map_err(|e| FailureReason::Other(e.to_string()))?;
                    let response = client.request(request).await.map_err(|e| reason_of(&e))?;
                    if response.status().is_success() {
                        Ok(())
                    } else {
                        Err(FailureReason::Status(response.status().as_u16()))
                    }
                }
                Probe::Connect { host, port } => {
                    tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map(drop)
                        .map_err(|e| reason_of(&e))
                }
                Probe::ConnectUnix(path) => tokio::net::UnixStream::connect(path)
                    .await
                    .map(drop)
                    .map_err(|e| reason_of(&e)),
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Err(FailureReason::Timeout))
    }

    /// The wait before the `n`th check (from 0) since the upstream became
    /// unhealthy: 50 ms doubling, capped at the interval.
    fn recheck_delay(&self, n: u32) -> Duration {
        FIRST_RECHECK
            .saturating_mul(1 << n.min(16))
            .min(self.interval)
    }
}

/// The reason a gate gives before its first check.
const NOT_CHECKED: &str = "not checked yet";

/// Shortest interval and timeout of a [`HealthCheck`].
const MIN_TIME: Duration = Duration::from_millis(10);
/// First re-check after a failure.
const FIRST_RECHECK: Duration = Duration::from_millis(50);
/// Longest a gate stays closed after a check passed, when the upstream
/// keeps failing right after each reopening (see [`Gate::hold_back`]).
const MAX_HOLD_BACK: Duration = Duration::from_secs(5);

/// What the gate knows. Receivers look at `unhealthy`; the rest is the
/// gate's bookkeeping, changed under the same lock.
#[derive(Debug, Clone)]
pub(crate) struct GateState {
    /// `None` while open (healthy).
    pub(crate) unhealthy: Option<Unhealthy>,
    /// When the latest failure was reported; older checks cannot reopen.
    failed_at: Instant,
    /// When it last closed.
    closed_at: Instant,
    /// Closings since a request last got a response from the upstream.
    strikes: u32,
}

/// Whether the pull loop may take requests: open while the upstream is
/// healthy. Shared by the pull loop, the request tasks (which report
/// failures and successes), the checker and the heartbeat.
pub(crate) struct Gate {
    state: watch::Sender<GateState>,
    /// Mirrors `strikes != 0`, so a success costs one atomic load.
    struck: AtomicBool,
    metrics: DispatcherQueueMetrics,
    /// What is checked, for log lines.
    target: String,
}

impl Gate {
    /// Open (no health check: nothing to wait for), or closed until the
    /// first check passes.
    pub(crate) fn new(check: Option<&HealthCheck>, metrics: DispatcherQueueMetrics) -> Self {
        let unhealthy = check.map(|_| Unhealthy {
            since_ms: now_ms(),
            reason: NOT_CHECKED.to_owned(),
        });
        metrics.upstream_health(unhealthy.is_none(), now_ms());
        let now = Instant::now();
        Self {
            state: watch::Sender::new(GateState {
                unhealthy,
                failed_at: now,
                closed_at: now,
                strikes: 0,
            }),
            struck: AtomicBool::new(false),
            metrics,
            target: check.map_or_else(|| "the service".to_owned(), HealthCheck::target),
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.state.borrow().unhealthy.is_none()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<GateState> {
        self.state.subscribe()
    }

    /// The upstream failed (a request or a check): close, or keep closed
    /// with the new reason. Logs only when something changed.
    pub(crate) fn failed(&self, reason: &FailureReason) {
        self.metrics.upstream_failure(&reason.label());
        let text = reason.to_string();
        self.state.send_if_modified(|state| {
            let now = Instant::now();
            state.failed_at = now;
            match &mut state.unhealthy {
                None => {
                    state.strikes += 1;
                    self.struck.store(true, Ordering::Relaxed);
                    state.closed_at = now;
                    tracing::warn!(upstream = %self.target, reason = %text, "upstream unhealthy; taking no requests until it recovers");
                    let since_ms = now_ms();
                    self.metrics.upstream_health(false, since_ms);
                    state.unhealthy = Some(Unhealthy {
                        since_ms,
                        reason: text,
                    });
                    true
                }
                Some(unhealthy) if unhealthy.reason != text => {
                    if unhealthy.reason == NOT_CHECKED {
                        tracing::warn!(upstream = %self.target, reason = %text, "upstream not reachable at start; taking no requests until it is");
                    } else {
                        tracing::info!(upstream = %self.target, reason = %text, "upstream still unhealthy");
                    }
                    unhealthy.reason = text;
                    true
                }
                Some(_) => false,
            }
        });
    }

    /// A request got a response from the upstream: it works, so the next
    /// failure is a first one again.
    pub(crate) fn delivered(&self) {
        if self.struck.load(Ordering::Relaxed) {
            self.struck.store(false, Ordering::Relaxed);
            self.state.send_if_modified(|state| {
                state.strikes = 0;
                false
            });
        }
    }

    /// A check that began at `checked_at` passed: open, unless a failure
    /// was reported since it began.
    fn recovered(&self, checked_at: Instant) {
        self.state.send_if_modified(|state| {
            if state.failed_at >= checked_at {
                return false;
            }
            match state.unhealthy.take() {
                Some(unhealthy) if unhealthy.reason == NOT_CHECKED => {
                    tracing::info!(upstream = %self.target, "upstream healthy at start; taking requests");
                    self.metrics.upstream_health(true, now_ms());
                    true
                }
                Some(unhealthy) => {
                    let down_ms = now_ms().saturating_sub(unhealthy.since_ms);
                    tracing::info!(upstream = %self.target, down_ms, "upstream healthy; taking requests");
                    self.metrics.upstream_health(true, now_ms());
                    true
                }
                None => false,
            }
        });
    }

    /// How long after closing the gate may reopen, however soon a check
    /// passes: nothing the first time; when the upstream fails again right
    /// after each reopening (a request that breaks the connection, a front
    /// that accepts connections for a dead app), 100 ms doubling per
    /// closing, up to 5 s, until a request gets a response again.
    fn hold_back(state: &GateState) -> Duration {
        match state.strikes {
            0 | 1 => Duration::ZERO,
            n => (FIRST_RECHECK * 2)
                .saturating_mul(1 << (n - 2).min(16))
                .min(MAX_HOLD_BACK),
        }
    }
}

/// Without a [`HealthCheck`], how long a failed delivery holds pulling back.
const RETRY_WITHOUT_CHECK: Duration = Duration::from_secs(1);

/// Runs `check` for as long as the dispatcher runs (until `stop`), opening
/// and closing `gate`. Without a check, the gate reopens
/// [`RETRY_WITHOUT_CHECK`] after each failure (longer when failures repeat:
/// [`Gate::hold_back`]).
pub(crate) async fn run(gate: Arc<Gate>, check: Option<HealthCheck>, stop: CancellationToken) {
    let mut changes = gate.subscribe();
    let mut rechecks = 0;
    loop {
        let (healthy, reopen_at) = {
            let state = changes.borrow_and_update();
            (
                state.unhealthy.is_none(),
                state.closed_at + Gate::hold_back(&state),
            )
        };
        if healthy {
            rechecks = 0;
            // A health path is checked every interval; a plain connect only
            // once a request has failed. Either way a failure wakes us.
            let periodic = check.as_ref().is_some_and(HealthCheck::is_periodic);
            let interval = check.as_ref().map_or(RETRY_WITHOUT_CHECK, |c| c.interval);
            tokio::select! {
                () = tokio::time::sleep(interval), if periodic => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = stop.cancelled() => return,
            }
        } else {
            let wait = reopen_at.saturating_duration_since(Instant::now());
            let wait = match &check {
                None => wait.max(RETRY_WITHOUT_CHECK),
                Some(_) => wait,
            };
            if sleep_or_stop(&stop, wait).await {
                return;
            }
        }
        let Some(check) = &check else {
            gate.recovered(Instant::now());
            continue;
        };
        let started = Instant::now();
        let result = tokio::select! {
            result = check.check() => result,
            () = stop.cancelled() => return,
        };
        match result {
            Ok(()) => gate.recovered(started),
            Err(reason) => {
                gate.failed(&reason);
                let delay = check.recheck_delay(rechecks);
                rechecks += 1;
                if sleep_or_stop(&stop, delay).await {
                    return;
                }
            }
        }
    }
}
