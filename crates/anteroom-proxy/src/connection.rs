//! Client connections: each served by hyper under its watchdog, and all of
//! them drained together when the proxy stops.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anteroom_protocol::Failure;
use anteroom_runtime::http::{Accepted, request_started};
use futures_util::FutureExt as _;
use futures_util::future::Either;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::Activity;
use crate::config::ProxyConfig;
use crate::error::{failure_response, refused_reason};
use crate::handler;
use crate::linger::{Answer, Lingering};
use crate::router::Router;

/// Every client connection of one proxy: how each is served, and the
/// tracker, close signal and drain flag they share.
pub(crate) struct Connections {
    config: Arc<ProxyConfig>,
    router: Arc<Router>,
    builder: auto::Builder<TokioExecutor>,
    tracker: TaskTracker,
    /// Cancelled to close every connection gracefully.
    closing: CancellationToken,
    /// Set once the proxy stops accepting: HTTP/1 answers say `Connection: close`.
    draining: Arc<AtomicBool>,
    /// Terminates TLS on every connection, when configured.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Most HTTP/2 streams open at once on one connection.
const H2_MAX_STREAMS: u32 = 256;
/// How much of a request body an HTTP/2 client may send before the proxy
/// reads it (the RFC's default is 64 KiB, hyper's 1 MiB): enough for an
/// upload to move at a few MB/s per 50 ms of round trip. A streamed upload
/// waiting in the queue holds this much in the proxy, charged to the
/// waiting budget (`arrival.rs`).
pub(crate) const H2_STREAM_WINDOW: u32 = 256 * 1024;

impl Connections {
    /// hyper's HTTP/1.1 and HTTP/2 settings from `config`; TLS on every
    /// connection with `tls`.
    pub(crate) fn new(
        config: Arc<ProxyConfig>,
        router: Arc<Router>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
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
            .max_concurrent_streams(H2_MAX_STREAMS)
            // A request whose body streams is not read while it waits in
            // the queue: the connection's window covers every stream's
            // (RFC 9113 §5.2), so one held upload never stops the bodies
            // of the other streams on its connection.
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_STREAM_WINDOW * H2_MAX_STREAMS);
        Self {
            config,
            router,
            builder,
            tracker: TaskTracker::new(),
            closing: CancellationToken::new(),
            draining: Arc::new(AtomicBool::new(false)),
            tls,
        }
    }

    /// Serves one accepted connection in a task of its own (tracked, so
    /// [`drain`](Self::drain) waits for it).
    pub(crate) fn serve(&self, accepted: Accepted) {
        let Accepted { stream, peer, slot } = accepted;
        let _ = stream.set_nodelay(true);
        let activity = Activity::new(self.tracker.clone(), self.closing.clone());
        let service = self.service(peer, &activity, self.tls.is_some());
        let builder = self.builder.clone();
        let config = Arc::clone(&self.config);
        let limits = Watchdog {
            idle: config.header_read_timeout,
            send: config.send_timeout,
        };
        let closing = self.closing.clone();
        let tls = self.tls.clone();
        self.tracker.spawn(async move {
            // hyper times nothing until it knows the protocol; a socket
            // still silent when the proxy shuts down is closed at once.
            let arrived = std::time::Instant::now();
            let started = tokio::select! {
                started = request_started(&stream, limits.idle) => started,
                () = closing.cancelled() => false,
            };
            if !started {
                tracing::debug!(%peer, "nothing received within the header timeout; closing");
                return;
            }
            // The handshake and the head get what is left of the header
            // timeout (at least a second), not all of it again.
            let left = || {
                limits
                    .idle
                    .saturating_sub(arrived.elapsed())
                    .max(Duration::from_secs(1))
            };
            let mut builder = builder;
            let io = Lingering::new(stream, slot, Arc::clone(&activity));
            let served = match tls {
                None => {
                    builder.http1().header_read_timeout(left());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                    limits.run(conn, &activity, &closing, peer).await
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(left(), acceptor.accept(io));
                    let io = tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(io)) => io,
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, error = %err, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake not done within the header timeout");
                                return;
                            }
                        },
                        () = closing.cancelled() => return,
                    };
                    builder.http1().header_read_timeout(left());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                    limits.run(conn, &activity, &closing, peer).await
                }
            };
            if let Err(err) = served {
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
    }

    /// The hyper service of one connection from `peer`: routes each
    /// request to its queue's handler, or answers 404.
    fn service(
        &self,
        peer: SocketAddr,
        activity: &Arc<Activity>,
        tls: bool,
    ) -> impl hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<crate::linger::Answer>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        let router = Arc::clone(&self.router);
        let draining = Arc::clone(&self.draining);
        let activity = Arc::clone(activity);
        service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            if tls {
                req.extensions_mut().insert(crate::tls::ClientTls);
            }
            let request = activity.request();
            let version = req.version();
            let http1 = version < http::Version::HTTP_2;
            // Built here, not in the future returned, so the request is not
            // kept in it while it waits (see `handler::handle`).
            // Boxed (it is rare): the closure below is kept in every
            // waiting request's task, and 32 bytes less there puts the
            // task in a smaller allocation (docs/performance.md, "A
            // million held requests").
            let mut set_cookie = None;
            let answer = match router.pick(&req) {
                Some(picked) => {
                    set_cookie = picked.set_cookie.map(Box::new);
                    Either::Left(handler::handle(
                        Arc::clone(picked.state),
                        req,
                        peer,
                        Arc::clone(&activity),
                    ))
                }
                None => {
                    tracing::debug!(
                        host = ?req.headers().get(http::header::HOST),
                        path = %anteroom_protocol::printable(req.uri().path()),
                        "no route; 404"
                    );
                    let mut resp = failure_response(Failure::NoRoute);
                    if req.method() == http::Method::HEAD {
                        // No content for HEAD (RFC 9110 section 9.3.2),
                        // over HTTP/2 too.
                        *resp.body_mut() = http_body_util::Full::default();
                    }
                    Either::Right(std::future::ready(Answer::early(
                        resp,
                        req.into_body(),
                        version,
                        &activity,
                    )))
                }
            };
            let draining = Arc::clone(&draining);
            // A map, not an async block awaiting `answer`: the block would
            // keep room for `answer` twice (captured, and being awaited),
            // and every waiting request pays for its future's size.
            answer.map(move |mut response| {
                response.body_mut().sent_for(request);
                // Not on a server error: a client is not pinned to a side
                // that fails (it is drawn again next time).
                if let Some(cookie) = set_cookie.filter(|_| !response.status().is_server_error()) {
                    // Beside the app's own cookies (RFC 6265 section 3:
                    // one Set-Cookie field per cookie).
                    response
                        .headers_mut()
                        .append(http::header::SET_COOKIE, *cookie);
                }
                // Shutting down: the client's next request goes to a new
                // connection (RFC 9112 section 9.6), not to a socket that
                // closes under it.
                // A 101 keeps its `Connection: upgrade` (RFC 6455 section
                // 4.1): the socket closes on its own when the proxy stops.
                let switching = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                if http1 && draining.load(Ordering::Acquire) && !switching {
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(response)
            })
        })
    }

    /// Drains every connection once the proxy has stopped accepting:
    /// 1. every HTTP/1 response from now on says `Connection: close`, and
    ///    idle keep-alive connections stay open up to `drain`, so each
    ///    client's next request is answered rather than cut off;
    /// 2. then idle connections close, HTTP/2 ones get GOAWAY, and requests
    ///    still waiting get until `grace_ends` to be answered.
    ///
    /// `waiting` counts the requests still waiting, for log lines.
    pub(crate) async fn drain(
        &self,
        drain: Duration,
        grace_ends: tokio::time::Instant,
        waiting: impl Fn() -> usize,
    ) {
        self.draining.store(true, Ordering::Release);
        self.tracker.close();
        // Let keep-alive clients send their next request (answered with
        // `Connection: close`) before idle connections are closed.
        tokio::select! {
            () = self.tracker.wait() => {}
            () = tokio::time::sleep(drain) => {}
        }
        self.closing.cancel();
        tokio::select! {
            () = self.tracker.wait() => tracing::info!("all connections closed"),
            () = tokio::time::sleep_until(grace_ends) => {
                tracing::warn!(
                    waiting = waiting(),
                    open = self.tracker.len(),
                    "grace period over; closing the connections still open and the requests still waiting"
                );
            }
        }
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

impl<I, S, E, B> GracefulClose for auto::UpgradeableConnection<'_, I, S, E>
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
