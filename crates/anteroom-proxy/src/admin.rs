//! The admin endpoint, on an address of its own: `GET /` (the live status
//! page, `status_page.rs`), `GET /healthz`, `GET /status`, `GET /metrics`
//! (Prometheus), `POST /pause`, `POST /resume`, `POST /maintenance/on`
//! (optional JSON body `{"message": TEXT, "retry_after": SECONDS}`),
//! `POST /maintenance/off` (each with an optional `?queue=`), in the spirit
//! of Intermission's enable/disable/status; and `POST /drain` / `POST
//! /undrain`, which make this proxy's `/healthz` answer 503 / 200 so a
//! load balancer takes the node out or back (pause and maintenance leave
//! `/healthz` at 200).
//! Everything but `/healthz` requires `Authorization: Bearer <token>` when a
//! token is configured (Prometheus sends one with `authorization:` in its
//! scrape config).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anteroom_control::{Queue, StatusReport};
use anteroom_metrics::{ProxyMetrics, Registry};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::error::ServeError;
use crate::status_page::{self, Board};

/// What [`serve_admin`] needs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AdminConfig {
    /// Redis URL.
    pub redis_url: String,
    /// The queue this proxy serves.
    pub queue: String,
    /// Bearer token required for `/status`, `/pause` and `/resume`; none when `None`.
    pub token: Option<String>,
    /// Connect and command timeout for Redis.
    pub redis_timeout: Duration,
    /// The registry `GET /metrics` serves (the proxy's
    /// [`ProxyMetrics`](anteroom_metrics::ProxyMetrics) registered in it);
    /// `/metrics` answers 404 when `None`.
    pub registry: Option<Arc<Registry>>,
    /// Queues besides `queue` that the page shows and `?queue=` accepts
    /// (the proxy's routed queues).
    pub more_queues: Vec<String>,
    /// The proxy's metrics, for the page's throughput charts.
    pub metrics: Option<ProxyMetrics>,
    /// Serve without a token on an address beyond loopback (refused
    /// otherwise; see [`AdminConfig::check`]).
    pub without_token_beyond_loopback: bool,
}

impl AdminConfig {
    /// An admin configuration without a token and with a 2 s Redis timeout.
    pub fn new(redis_url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            queue: queue.into(),
            token: None,
            redis_timeout: Duration::from_secs(2),
            registry: None,
            more_queues: Vec::new(),
            metrics: None,
            without_token_beyond_loopback: false,
        }
    }

    /// Whether this configuration may serve on `addr`: an empty token is
    /// an error ([`ServeError::EmptyAdminToken`]), and so is no token on an
    /// address beyond loopback unless
    /// [`without_token_beyond_loopback`](Self::without_token_beyond_loopback)
    /// ([`ServeError::OpenAdmin`]).
    pub fn check(&self, addr: std::net::SocketAddr) -> Result<(), ServeError> {
        match &self.token {
            Some(token) if token.is_empty() => Err(ServeError::EmptyAdminToken),
            None if !addr.ip().is_loopback() && !self.without_token_beyond_loopback => {
                Err(ServeError::OpenAdmin(addr))
            }
            _ => Ok(()),
        }
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` completes,
/// then drains it (see `anteroom_runtime::http::serve_side`). Errors: a
/// bad [`AdminConfig`], or the queue's Redis unreachable at start.
pub async fn serve_admin(
    listener: TcpListener,
    config: AdminConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if let Ok(addr) = listener.local_addr() {
        config.check(addr)?;
    }
    let queue = Queue::connect(&config.redis_url, &config.queue, config.redis_timeout)
        .await
        .map_err(ServeError::Control)?;
    let mut queues = vec![queue];
    for name in &config.more_queues {
        if queues.iter().any(|q| q.name() == name) {
            continue;
        }
        let keys = anteroom_protocol::Keys::new(name)?;
        queues.push(Queue::with_connection(keys, queues[0].connection()));
    }
    let board = Board::new(queues);
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampling = Arc::clone(&board).sample(config.metrics.clone(), stop_sampling.clone());
    let admin = std::sync::Arc::new(Admin {
        board,
        metrics: config.metrics,
        registry: config.registry,
        token: config.token,
        host: anteroom_redis::hostname(),
        draining: std::sync::atomic::AtomicBool::new(false),
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "admin endpoint ready");
    }
    let service = service_fn(move |req| {
        let admin = std::sync::Arc::clone(&admin);
        async move { Ok::<_, Infallible>(admin.handle(req).await) }
    });
    // The status sampler runs beside the endpoint and stops with it.
    let serving = async {
        anteroom_runtime::http::serve_side(listener, "admin", service, shutdown).await;
        stop_sampling.cancel();
    };
    tokio::join!(sampling, serving);
    Ok(())
}

struct Admin {
    board: Arc<Board>,
    metrics: Option<ProxyMetrics>,
    registry: Option<Arc<Registry>>,
    token: Option<String>,
    host: String,
    /// Set by `POST /drain`: `/healthz` answers 503 so a load balancer
    /// takes this node out; cleared by `POST /undrain`.
    draining: std::sync::atomic::AtomicBool,
}

impl Admin {
    /// Answers `req`, with headers that keep every answer out of frames and
    /// content sniffing.
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let mut resp = match self.refuse(&req) {
            Some(refusal) => text(StatusCode::FORBIDDEN, refusal),
            None => self.answer(req).await,
        };
        for (name, value) in [
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ] {
            resp.headers_mut()
                .insert(name, header::HeaderValue::from_static(value));
        }
        resp
    }

    /// Why `req` is refused before anything else, if it is. Only without a
    /// token: with one, every request but `/healthz` needs a bearer token,
    /// which a browser never sends on another site's behalf.
    /// - a `Host` (HTTP/2: `:authority`) that is not an IP address or
    ///   `localhost`: a page on another site that made its name resolve to
    ///   this address (DNS rebinding) would be served. `/healthz` and
    ///   `/metrics` answer any host, for orchestrators and scrapers that
    ///   use a service name;
    /// - a `POST` a browser sent from another site (`Sec-Fetch-Site`, or an
    ///   `Origin` that is not this host) or as a form (a content type a
    ///   cross-site form can send without asking): cross-site request
    ///   forgery. curl and scripts send none of these.
    fn refuse(&self, req: &Request<Incoming>) -> Option<&'static str> {
        if self.token.is_some() {
            return None;
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        let open_path = matches!(req.uri().path(), "/healthz" | "/metrics");
        if !open_path && !host.is_empty() && !local_host(host) {
            return Some(
                "Host not allowed: without a token the admin endpoint answers only to an IP address or localhost\n",
            );
        }
        if req.method() != Method::POST {
            return None;
        }
        let headers = req.headers();
        let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
        if site.is_some_and(|s| s != "same-origin" && s != "none") {
            return Some("cross-site request refused\n");
        }
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if origin.is_some_and(|o| o.split_once("://").map(|(_, a)| a) != Some(host)) {
            return Some("cross-site request refused\n");
        }
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        if content_type.is_some_and(|t| {
            matches!(
                t.as_str(),
                "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
            )
        }) {
            return Some("form posts refused: POST with no body, or a JSON one\n");
        }
        None
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let allowed = match path.as_str() {
            "/" | "/ui" | "/healthz" | "/status" | "/metrics" => Method::GET,
            "/pause" | "/resume" | "/maintenance/on" | "/maintenance/off" | "/drain"
            | "/undrain" => Method::POST,
            _ => return text(StatusCode::NOT_FOUND, "not found\n"),
        };
        if method != allowed && !(allowed == Method::GET && method == Method::HEAD) {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            resp.headers_mut().insert(
                header::ALLOW,
                header::HeaderValue::from_str(allowed.as_str())
                    .unwrap_or(header::HeaderValue::from_static("GET")),
            );
            return resp;
        }
        if path == "/healthz" {
            // Paused or in maintenance, the proxy itself is healthy: a
            // balancer keeps it. Drained, it asks to be taken out.
            if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
                return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
            }
            return text(StatusCode::OK, "ok\n");
        }
        if path == "/" {
            // The page itself; its data comes with it only when no token
            // is needed (a browser sends none on navigation).
            let content = self.token.is_none().then(|| self.board.render(true));
            return html(status_page::page(content.as_deref()));
        }
        if !self.authorized(&req) {
            let mut resp = text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"anteroom\""),
            );
            return resp;
        }
        if path == "/ui" {
            return html(self.board.render(true));
        }
        let named = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("queue=")));
        let queue = match named {
            Some(name) => match self.board.queue(name) {
                Some(queue) => queue,
                None => {
                    return text(
                        StatusCode::NOT_FOUND,
                        "this proxy does not serve that queue\n",
                    );
                }
            },
            None => self.board.first(),
        };
        if path == "/metrics" {
            return match &self.registry {
                Some(registry) => anteroom_metrics::response(registry),
                None => text(StatusCode::NOT_FOUND, "no metrics registry configured\n"),
            };
        }
        if path == "/drain" || path == "/undrain" {
            let drain = path == "/drain";
            self.draining
                .store(drain, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(%path, "admin action: /healthz now answers {}", if drain { 503 } else { 200 });
            return text(
                StatusCode::OK,
                if drain {
                    "draining: /healthz answers 503\n"
                } else {
                    "/healthz answers 200 again\n"
                },
            );
        }
        let switch = match path.as_str() {
            "/maintenance/on" => match maintenance_record(req, &self.host).await {
                Ok(record) => Some(Some(record)),
                Err(problem) => return text(StatusCode::BAD_REQUEST, problem),
            },
            "/maintenance/off" => Some(None),
            _ => None,
        };
        let action = match (path.as_str(), switch) {
            (_, Some(Some(record))) => queue.maintenance_on(&record).await,
            (_, Some(None)) => queue.maintenance_off().await.map(|_| ()),
            ("/pause", _) => {
                let by = format!("admin@{}", self.host);
                queue.pause(&by, None, false).await.map(|_| ())
            }
            ("/resume", _) => queue.resume().await.map(|_| ()),
            _ => Ok(()),
        };
        if let Err(err) = action {
            tracing::warn!(error = %err, %path, "admin action failed");
            return text(StatusCode::SERVICE_UNAVAILABLE, "redis unavailable\n");
        }
        if path != "/status" {
            tracing::info!(%path, queue = %queue.name(), "admin action");
            // So the page shows the change at its next refresh.
            self.board.sample_once(self.metrics.as_ref()).await;
        }
        match queue.status().await {
            Ok(status) => {
                let report = StatusReport {
                    queues: vec![status],
                    memory: None,
                };
                let body = serde_json::to_vec_pretty(&report).unwrap_or_default();
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                resp
            }
            Err(err) => {
                tracing::warn!(error = %err, "admin status failed");
                text(StatusCode::SERVICE_UNAVAILABLE, "redis unavailable\n")
            }
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(presented.as_bytes(), token.as_bytes())
    }
}

/// Whether `host` (a `Host` value) is an IP address or `localhost`, with
/// or without a port: names an attacker cannot make resolve here.
/// The maintenance record for `POST /maintenance/on`: its optional JSON
/// body, `{"message": TEXT, "retry_after": SECONDS}` (at most 16 KiB).
async fn maintenance_record(
    req: Request<Incoming>,
    host: &str,
) -> Result<anteroom_protocol::MaintenanceRecord, &'static str> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        message: Option<String>,
        retry_after: Option<u32>,
    }
    use http_body_util::BodyExt;
    let bytes = http_body_util::Limited::new(req.into_body(), 16 * 1024)
        .collect()
        .await
        .map_err(|_| "cannot read the body (at most 16 KiB)\n")?
        .to_bytes();
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        Body {
            message: None,
            retry_after: None,
        }
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|_| "the body must be a JSON object with at most message (text) and retry_after (seconds): {\"message\": TEXT, \"retry_after\": SECONDS}\n")?
    };
    if body
        .retry_after
        .is_some_and(|s| s > crate::maintenance::MAX_RETRY_AFTER)
    {
        return Err("retry_after must be at most 86400 (a day)\n");
    }
    if body
        .message
        .as_ref()
        .is_some_and(|m| m.len() > crate::maintenance::MAX_MESSAGE)
    {
        return Err("message must be at most 4096 bytes\n");
    }
    Ok(anteroom_protocol::MaintenanceRecord {
        since_ms: anteroom_protocol::now_ms(),
        by: format!("admin@{host}"),
        message: body.message,
        retry_after_secs: body.retry_after.unwrap_or(30),
    })
}

fn local_host(host: &str) -> bool {
    let name = crate::router::strip_port(host);
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Compares without stopping at the first difference, so response time does
/// not reveal how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

fn html(body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, local_host};

    #[test]
    fn local_hosts() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9180",
            "localhost:9180",
            "LOCALHOST",
            "[::1]:9180",
            "10.0.0.5",
        ] {
            assert!(local_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9180",
            "127.0.0.1.evil.example",
            "[evil]:1",
            "localhost.evil.example",
        ] {
            assert!(!local_host(bad), "{bad}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret", b""));
    }
}
