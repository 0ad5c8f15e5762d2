//! The accept loop, Redis setup, heartbeat and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anteroom_control::presence::{Presence, Role};
use anteroom_protocol::{Failure, Keys, ProxyHeartbeat, validate_id};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Budget;
use crate::config::ProxyConfig;
use crate::enqueue::Enqueuer;
use crate::error::ServeError;
use crate::error::{failure_response, refused_reason};
use crate::handler::{self, State};
use crate::linger::{Activity, Answer, Lingering};
use crate::replies::{self, Demux};
use crate::router::Router;

/// How often the proxy refreshes its heartbeat key, and the key's lifetime.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const HEARTBEAT_TTL: Duration = Duration::from_secs(10);

/// Runs the proxy on `listener` until `shutdown` completes, then drains.
///
/// Connects to Redis first and fails if it cannot. When `shutdown` fires:
/// 1. the listener is closed at once, after serving the connections the
///    kernel had already completed on it (which closing would reset);
/// 2. every HTTP/1 response from then on says `Connection: close`, and idle
///    keep-alive connections stay open up to `config.drain` so that each
///    client's next request is answered rather than cut off;
/// 3. then idle connections close, HTTP/2 ones get GOAWAY, and requests
///    still waiting get the rest of `config.grace` to be answered (their
///    replies still come to this proxy's reply list) before it returns.
pub async fn serve(
    listener: TcpListener,
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let proxy_id = match &config.proxy_id {
        Some(id) => {
            validate_id(id)?;
            id.clone()
        }
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    config.validate()?;
    // Every queue name is checked before anything connects.
    let default_keys = Keys::new(&config.queue)?;
    let route_keys = config
        .routes
        .iter()
        .map(|route| Keys::new(&route.queue))
        .collect::<Result<Vec<_>, _>>()?;
    let (target, conn) = anteroom_redis::connect(&config.redis_url, config.redis_timeout).await?;

    let demux = Arc::new(Demux::default());
    let stop_background = CancellationToken::new();
    let durability = config
        .durable
        .map(|wait| anteroom_redis::Durability::spawn(conn.clone(), wait, stop_background.clone()));
    let config = Arc::new(config);
    let state_for = |keys: &Keys, hold: Duration, max_waiting: usize, max_bytes: usize| {
        let metrics = config.metrics.queue(keys.queue());
        Arc::new(State {
            config: Arc::clone(&config),
            queue: keys.queue().to_owned(),
            hold,
            reply_key: keys.replies(&proxy_id),
            enqueuer: Enqueuer::spawn(conn.clone(), keys.requests(), durability.clone()),
            demux: Arc::clone(&demux),
            budget: Arc::new(Budget::new(max_waiting, max_bytes, metrics.clone())),
            metrics,
        })
    };
    let default = config.default_queue.then(|| {
        state_for(
            &default_keys,
            config.hold,
            config.max_waiting,
            config.max_waiting_bytes,
        )
    });
    let mut router = Router::new(default);
    for (route, keys) in config.routes.iter().zip(&route_keys) {
        let state = state_for(
            keys,
            route.hold.unwrap_or(config.hold),
            route.max_waiting.unwrap_or(config.max_waiting),
            route.max_waiting_bytes.unwrap_or(config.max_waiting_bytes),
        );
        router.add(route.host.clone(), route.path_prefix.clone(), state);
    }
    let router = Arc::new(router);
    // One reply list and one heartbeat per queue served.
    let mut queues: Vec<&Keys> = Vec::new();
    let served = config.default_queue.then_some(&default_keys);
    for keys in served.into_iter().chain(&route_keys) {
        if !queues.iter().any(|k| k.queue() == keys.queue()) {
            queues.push(keys);
        }
    }
    if queues.is_empty() {
        return Err(ServeError::NoQueue);
    }
    tracing::info!(
        listen = %listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string()),
        queues = ?queues.iter().map(|k| k.queue()).collect::<Vec<_>>(),
        routes = config.routes.len(),
        default_queue = config.default_queue,
        proxy_id = %proxy_id,
        hold = ?config.hold,
        "proxy ready"
    );

    let readers: Vec<_> = queues
        .iter()
        .map(|keys| {
            tokio::spawn(replies::run(
                Arc::clone(&demux),
                target.clone(),
                keys.replies(&proxy_id),
                config.redis_timeout,
                stop_background.clone(),
            ))
        })
        .collect();
    let heartbeats: Vec<_> = queues
        .iter()
        .map(|keys| {
            tokio::spawn(heartbeat(
                conn.clone(),
                Arc::clone(&router),
                keys.queue().to_owned(),
                Presence::new(keys, Role::Proxy, &proxy_id, HEARTBEAT_TTL),
                proxy_id.clone(),
                stop_background.clone(),
            ))
        })
        .collect();
    let waiting = {
        let router = Arc::clone(&router);
        move || router.states().map(|s| s.budget.waiting()).sum::<usize>()
    };

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_headers(config.max_headers)
        .max_buf_size(config.max_head_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_head_bytes).unwrap_or(u32::MAX))
        // Dead peers are found by PING (RFC 9113 §6.7); idle live ones by
        // the watchdog.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let closing = CancellationToken::new();
    let tracker = TaskTracker::new();
    let draining = Arc::new(AtomicBool::new(false));
    let accept = |stream: TcpStream, peer: SocketAddr| {
        let Ok(slot) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::debug!(%peer, max = config.max_connections, "connection limit reached; closing");
            return;
        };
        let _ = stream.set_nodelay(true);
        let router = Arc::clone(&router);
        let draining = Arc::clone(&draining);
        let activity = Activity::new();
        let service = service_fn({
            let activity = Arc::clone(&activity);
            move |req: http::Request<hyper::body::Incoming>| {
                let request = activity.request();
                let version = req.version();
                let http1 = version < http::Version::HTTP_2;
                // Built here, not inside the async block, so the request is not
                // kept in the future while it waits (see `handler::handle`).
                let answer = match router.pick(&req) {
                    Some(state) => Ok(handler::handle(
                        Arc::clone(state),
                        req,
                        peer,
                        Arc::clone(&activity),
                    )),
                    None => {
                        tracing::debug!(
                            host = ?req.headers().get(http::header::HOST),
                            path = %anteroom_protocol::printable(req.uri().path()),
                            "no route; 404"
                        );
                        Err(Answer::early(
                            failure_response(Failure::NoRoute),
                            req.into_body(),
                            version,
                        ))
                    }
                };
                let draining = Arc::clone(&draining);
                async move {
                    let mut response = match answer {
                        Ok(handling) => handling.await,
                        Err(resp) => resp,
                    };
                    response.body_mut().sent_for(request);
                    // Shutting down: the client's next request goes to a new
                    // connection (RFC 9112 section 9.6), not to a socket that
                    // closes under it.
                    if http1 && draining.load(Ordering::Acquire) {
                        response.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, Infallible>(response)
                }
            }
        });
        let builder = builder.clone();
        let config = Arc::clone(&config);
        let limits = Watchdog {
            idle: config.header_read_timeout,
            send: config.send_timeout,
        };
        let closing = closing.clone();
        tracker.spawn(async move {
            // hyper times nothing until it knows the protocol; a socket
            // still silent when the proxy shuts down is closed at once.
            let arrived = std::time::Instant::now();
            let started = tokio::select! {
                started = anteroom_metrics::request_started(&stream, limits.idle) => started,
                () = closing.cancelled() => false,
            };
            if !started {
                tracing::debug!(%peer, "nothing received within the header timeout; closing");
                return;
            }
            // The head gets what is left of the header timeout (at least a
            // second), not all of it again.
            let mut builder = builder;
            builder
                .http1()
                .header_read_timeout(limits.idle.saturating_sub(arrived.elapsed()).max(Duration::from_secs(1)));
            let io = TokioIo::new(Lingering::new(stream, slot, Arc::clone(&activity)));
            let conn = builder.serve_connection(io, service);
            if let Err(err) = limits.run(conn, &activity, &closing, peer).await {
                match refused_reason(&*err) {
                    Some(reason) => {
                        // Answered by hyper, never seen by the handler:
                        // logged here so a 400 is never silent.
                        tracing::info!(%peer, reason, error = %err, "request refused by the HTTP parser");
                        config.metrics.refused(reason);
                    }
                    None => {
                        tracing::debug!(error = %err, %peer, "connection ended with an error")
                    }
                }
            }
        });
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => accept(stream, peer),
            Err(err) => {
                // e.g. EMFILE: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    // Stop accepting at once. Connections the kernel already completed
    // would be reset when the socket closes (another proxy sharing the
    // address with SO_REUSEPORT cannot take them over), so serve them too.
    let grace_ends = tokio::time::Instant::now() + config.grace;
    let mut taken_over = 0usize;
    match listener.into_std() {
        Ok(listener) => loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let stream = stream
                        .set_nonblocking(true)
                        .and_then(|()| TcpStream::from_std(stream));
                    match stream {
                        Ok(stream) => {
                            taken_over += 1;
                            accept(stream, peer);
                        }
                        Err(err) => {
                            tracing::debug!(error = %err, "cannot serve a pending connection")
                        }
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    tracing::debug!(error = %err, "accepting pending connections stopped");
                    break;
                }
            }
        },
        Err(err) => tracing::debug!(error = %err, "cannot take pending connections"),
    }
    draining.store(true, Ordering::Release);
    tracker.close();
    let drain = config.drain.min(config.grace);
    tracing::info!(
        waiting = waiting(),
        pending_connections_served = taken_over,
        ?drain,
        grace = ?config.grace,
        "shutting down: no longer accepting; answering what is held, closing connections"
    );
    // Let keep-alive clients send their next request (answered with
    // `Connection: close`) before idle connections are closed.
    tokio::select! {
        () = tracker.wait() => {}
        () = tokio::time::sleep(drain) => {}
    }
    closing.cancel();
    tokio::select! {
        () = tracker.wait() => tracing::info!("all connections closed"),
        () = tokio::time::sleep_until(grace_ends) => {
            tracing::warn!(waiting = waiting(), "grace period over; closing with requests still waiting");
        }
    }
    stop_background.cancel();
    for reader in readers {
        let _ = reader.await;
    }
    for heartbeat in heartbeats {
        let _ = heartbeat.await;
    }
    Ok(())
}

/// Keeps the proxy's heartbeat and registry entry for `queue` fresh;
/// removes both on stop.
async fn heartbeat(
    mut conn: anteroom_redis::SharedConnection,
    router: Arc<Router>,
    queue: String,
    presence: Presence,
    proxy_id: String,
    stop: CancellationToken,
) {
    let host = anteroom_redis::hostname();
    let started_at_ms = anteroom_protocol::now_ms();
    if let Err(err) = presence.register_queue(&mut conn).await {
        tracing::debug!(error = %err, "cannot register the queue");
    }
    loop {
        let beat = ProxyHeartbeat {
            id: proxy_id.clone(),
            host: host.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            waiting: router
                .states()
                .filter(|s| s.queue == queue)
                .map(|s| s.budget.waiting())
                .sum(),
            hold_ms: router
                .states()
                .filter(|s| s.queue == queue)
                .map(|s| s.hold.as_millis() as u64)
                .max(),
            started_at_ms,
        };
        if let Err(err) = presence.beat(&mut conn, &beat).await {
            tracing::debug!(error = %err, "proxy heartbeat failed");
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            () = stop.cancelled() => break,
        }
    }
    if let Err(err) = presence.leave(&mut conn).await {
        tracing::debug!(error = %err, "cannot remove the heartbeat");
    }
}

/// The limits a connection's watchdog enforces (see [`Watchdog::run`]).
#[derive(Debug, Clone, Copy)]
struct Watchdog {
    /// No request in hand, and none arrived or ended, this long: closed
    /// gracefully (`--header-timeout`; HTTP/2 has no idle timer of its own,
    /// HTTP/1's header timer does the same between requests). PINGs and
    /// other frames do not count.
    idle: Duration,
    /// An answer being sent and no bytes moving this long: the client is
    /// not reading (an HTTP/2 window kept at 0, a socket never read), and
    /// the connection is dropped with what it holds (`--send-timeout`).
    send: Duration,
}

impl Watchdog {
    /// Runs `conn` to its end under these limits, closing it gracefully
    /// when `closing` fires (the proxy is shutting down).
    async fn run<C, E>(
        self,
        conn: C,
        activity: &Activity,
        closing: &CancellationToken,
        peer: SocketAddr,
    ) -> Result<(), E>
    where
        C: Future<Output = Result<(), E>> + GracefulClose,
    {
        let mut conn = std::pin::pin!(conn);
        let mut winding_down = false;
        loop {
            let wake = match activity.unread_for() {
                Some(unread) => self.send.saturating_sub(unread),
                None if activity.in_flight() == 0 => self.idle.saturating_sub(activity.idle_for()),
                // Requests in hand: the hold budget bounds them. A blocked
                // write does not wake this loop, so look every second.
                None => Duration::from_secs(1),
            };
            tokio::select! {
                // The connection first: a graceful close asked for while
                // hyper is still reading the preface would cancel it.
                biased;
                result = conn.as_mut() => return result,
                () = closing.cancelled(), if !winding_down => {
                    winding_down = true;
                    conn.as_mut().close_gracefully();
                }
                () = activity.changed() => {
                    if activity.abandons_too_many() && !winding_down {
                        tracing::info!(%peer, "client gave up on more requests than it let be answered; closing its connection");
                        winding_down = true;
                        conn.as_mut().close_gracefully();
                    }
                }
                () = tokio::time::sleep(wake) => {
                    if let Some(unread) = activity.unread_for().filter(|u| *u >= self.send) {
                        tracing::info!(%peer, ?unread, "client not reading its answer within the send timeout; connection dropped");
                        return Ok(());
                    }
                    let idle = activity.idle_for();
                    if activity.in_flight() == 0 && idle >= self.idle {
                        if winding_down {
                            return Ok(());
                        }
                        tracing::debug!(%peer, ?idle, "idle connection closed");
                        winding_down = true;
                        conn.as_mut().close_gracefully();
                    }
                }
            }
        }
    }
}

/// A connection that can be asked to finish what it has in hand and close
/// (hyper's `graceful_shutdown`).
trait GracefulClose {
    fn close_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E, B> GracefulClose for auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn close_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
