//! The one HTTP accept loop, and the side endpoints built on it.
//!
//! [`accept_until`] accepts connections under a cap until told to stop,
//! then serves the connections the kernel had already completed (closing
//! the socket would reset them). The proxy's listener and [`serve_side`]
//! (the admin and metrics endpoints) both run on it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A connection [`accept_until`] took, with its slot under the cap
/// (released when dropped).
#[derive(Debug)]
pub struct Accepted {
    /// The connection.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// Its place under the connection cap; hold it as long as the connection.
    pub slot: OwnedSemaphorePermit,
}

/// Accepts connections on `listener` until `shutdown` completes, passing
/// each to `on_accept` while fewer than the `slots` semaphore's permits are
/// in use (a connection over the cap is closed at once). A failed accept
/// (`EMFILE`, say) is logged and retried 50 ms later instead of spinning.
///
/// When `shutdown` completes the listener is closed; with `take_pending`,
/// the connections the kernel had already completed on it are taken first
/// and passed on too (another process sharing the address with
/// `SO_REUSEPORT` cannot take them over; closing would reset them).
/// Returns how many were taken that way. `name` goes in log lines.
pub async fn accept_until(
    listener: TcpListener,
    name: &'static str,
    slots: &Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
    take_pending: bool,
    mut on_accept: impl FnMut(Accepted),
) -> usize {
    let mut offer = |stream: TcpStream, peer: SocketAddr| {
        let Ok(slot) = Arc::clone(slots).try_acquire_owned() else {
            tracing::debug!(%peer, endpoint = name, "connection limit reached; closing");
            return;
        };
        on_accept(Accepted { stream, peer, slot });
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => offer(stream, peer),
            Err(err) => {
                tracing::warn!(error = %err, endpoint = name, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if !take_pending {
        return 0;
    }
    let mut taken = 0;
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(err) => {
            tracing::debug!(error = %err, endpoint = name, "cannot take pending connections");
            return 0;
        }
    };
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(stream));
                match stream {
                    Ok(stream) => {
                        taken += 1;
                        offer(stream, peer);
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, endpoint = name, "cannot serve a pending connection");
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return taken,
            Err(err) => {
                tracing::debug!(error = %err, endpoint = name, "accepting pending connections stopped");
                return taken;
            }
        }
    }
}

/// What a side endpoint serves each connection with: a hyper service
/// answering whole responses, never failing.
pub trait SideService:
    hyper::service::Service<
        Request<hyper::body::Incoming>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<S> SideService for S where
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// Most connections a side endpoint (metrics, admin) has open at once;
/// more are closed as they are accepted.
pub const SIDE_MAX_CONNECTIONS: usize = 64;
/// Longest a side endpoint's connection may take to send a request head.
pub const SIDE_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a side endpoint's connection lives; a scraper or the status
/// page simply reconnects.
pub const SIDE_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a side endpoint's connections get to finish the request in
/// hand once it stops (or once a connection reaches its lifetime).
pub const SIDE_DRAIN: Duration = Duration::from_secs(5);

/// A side endpoint (the dispatcher's metrics, the proxy's admin endpoint):
/// HTTP/1.1 and h2c on `listener` until `shutdown`, each connection served
/// by a clone of `service`. Bounded so that idle or hostile clients cannot
/// take the process's file descriptors from its main listener: at most
/// [`SIDE_MAX_CONNECTIONS`] at once, each closed if its head takes over
/// [`SIDE_HEADER_TIMEOUT`] (or it sends nothing at all that long) and after
/// [`SIDE_CONNECTION_LIFETIME`] in any case. On `shutdown` it stops
/// accepting, lets each connection finish the request in hand (at most
/// [`SIDE_DRAIN`]) and returns. `name` goes in log lines.
pub async fn serve_side<S>(
    listener: TcpListener,
    name: &'static str,
    service: S,
    shutdown: impl Future<Output = ()>,
) where
    S: SideService + Clone,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(SIDE_HEADER_TIMEOUT);
    let slots = Arc::new(Semaphore::new(SIDE_MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    accept_until(listener, name, &slots, shutdown, false, |accepted| {
        let builder = builder.clone();
        let service = service.clone();
        let closing = closing.clone();
        connections.spawn(serve_side_connection(
            accepted, builder, service, closing, name,
        ));
    })
    .await;
    closing.cancel();
    connections.close();
    if tokio::time::timeout(SIDE_DRAIN, connections.wait())
        .await
        .is_err()
    {
        tracing::debug!(
            endpoint = name,
            open = connections.len(),
            "closing connections still open after the drain"
        );
    }
}

/// One side-endpoint connection, to its end, its lifetime, or `closing`.
async fn serve_side_connection<S>(
    accepted: Accepted,
    builder: auto::Builder<TokioExecutor>,
    service: S,
    closing: CancellationToken,
    name: &'static str,
) where
    S: SideService,
{
    let Accepted { stream, peer, slot } = accepted;
    let started = tokio::select! {
        started = request_started(&stream, SIDE_HEADER_TIMEOUT) => started,
        () = closing.cancelled() => false,
    };
    if !started {
        tracing::debug!(endpoint = name, %peer, "nothing received in time; closing");
        return;
    }
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = tokio::time::sleep(SIDE_CONNECTION_LIFETIME) => {
            tracing::debug!(endpoint = name, %peer, "closing a connection at its lifetime");
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(SIDE_DRAIN, conn).await.unwrap_or(Ok(()))
        }
        () = closing.cancelled() => {
            // Stopping: the request in hand is answered, then it closes.
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(SIDE_DRAIN, conn).await.unwrap_or(Ok(()))
        }
    };
    if let Err(err) = ended {
        tracing::debug!(error = %err, endpoint = name, "connection ended with an error");
    }
    drop(slot);
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, at most `within`, until `stream` has sent enough to tell which
/// protocol it speaks: a byte that cannot begin the HTTP/2 preface, or the
/// whole preface. False when it sends less than that in time, or closes.
///
/// hyper starts its header timer only once it knows a connection is
/// HTTP/1, and has none for the preface: without this wait a socket that
/// connects and sends nothing, or half the preface, would hold its
/// connection slot forever. Nothing is consumed (`peek`).
pub async fn request_started(stream: &tokio::net::TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 24];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        if !H2_PREFACE.starts_with(&buf[..n]) || n == H2_PREFACE.len() {
            return true;
        }
        // A prefix of the preface: wait for more (peek returns at once
        // while those bytes are unread, so wait for readiness again).
        let more = tokio::time::timeout_at(deadline, async {
            loop {
                // No readiness signal tells "more bytes" from "the same
                // unread bytes": look again every 100 ms.
                tokio::time::sleep(Duration::from_millis(100)).await;
                match stream.peek(&mut buf).await {
                    Ok(m) if m > n || m == 0 => return,
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })
        .await;
        if more.is_err() {
            return false;
        }
    }
}
