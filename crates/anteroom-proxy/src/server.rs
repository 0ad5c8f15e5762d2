//! The accept loop, Redis setup, heartbeat and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anteroom_control::presence::{Presence, Role};
use anteroom_protocol::{Keys, ProxyHeartbeat, validate_id};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::config::ProxyConfig;
use crate::enqueue::Enqueuer;
use crate::error::ServeError;
use crate::handler::{self, State};
use crate::replies::{self, Demux};

/// How often the proxy refreshes its heartbeat key, and the key's lifetime.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const HEARTBEAT_TTL: Duration = Duration::from_secs(10);

/// Runs the proxy on `listener` until `shutdown` completes, then drains.
///
/// Connects to Redis first and fails if it cannot. After `shutdown` fires,
/// no new connection is accepted; requests already in flight get up to
/// `config.grace` to be answered before the function returns.
pub async fn serve(
    listener: TcpListener,
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let keys = Keys::new(&config.queue)?;
    let proxy_id = match &config.proxy_id {
        Some(id) => {
            validate_id(id)?;
            id.clone()
        }
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    let (target, conn) = anteroom_redis::connect(&config.redis_url, config.redis_timeout).await?;

    let demux = Arc::new(Demux::default());
    let stop_background = CancellationToken::new();
    let durability = config
        .durable
        .map(|wait| anteroom_redis::Durability::spawn(conn.clone(), wait, stop_background.clone()));
    let metrics = config.metrics.queue(keys.queue());
    let state = Arc::new(State {
        queue: keys.queue().to_owned(),
        reply_key: keys.replies(&proxy_id),
        enqueuer: Enqueuer::spawn(conn.clone(), keys.requests(), durability),
        conn,
        demux: Arc::clone(&demux),
        budget: Arc::new(Budget::new(
            config.max_waiting,
            config.max_waiting_bytes,
            metrics.clone(),
        )),
        metrics,
        config,
    });
    let local = listener.local_addr().ok();
    tracing::info!(
        listen = ?local,
        queue = %state.queue,
        proxy_id = %proxy_id,
        hold = ?state.config.hold,
        "proxy ready"
    );

    let reader = tokio::spawn(replies::run(
        Arc::clone(&demux),
        target,
        state.reply_key.clone(),
        state.config.redis_timeout,
        stop_background.clone(),
    ));
    let heartbeat = tokio::spawn(heartbeat(
        Arc::clone(&state),
        Presence::new(&keys, Role::Proxy, &proxy_id, HEARTBEAT_TTL),
        proxy_id,
        stop_background.clone(),
    ));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_read_timeout)
        .max_headers(state.config.max_headers)
        .max_buf_size(state.config.max_head_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(state.config.max_head_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    let connections = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // e.g. EMFILE: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::debug!(%peer, max = state.config.max_connections, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let service = service_fn(move |req| {
            // Built here, not inside the async block, so the request is not
            // kept in the future while it waits (see `handler::handle`).
            let answer = handler::handle(Arc::clone(&state), req, peer);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }

    drop(listener);
    let grace = state.config.grace;
    tracing::info!(
        waiting = state.budget.waiting(),
        ?grace,
        "shutting down: draining connections"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(waiting = state.budget.waiting(), "grace period over; closing with requests still waiting");
        }
    }
    stop_background.cancel();
    let _ = reader.await;
    let _ = heartbeat.await;
    Ok(())
}

/// Keeps the proxy's heartbeat and registry entry fresh; removes both on stop.
async fn heartbeat(
    state: Arc<State>,
    presence: Presence,
    proxy_id: String,
    stop: CancellationToken,
) {
    let host = anteroom_redis::hostname();
    let started_at_ms = anteroom_protocol::now_ms();
    let mut conn = state.conn.clone();
    if let Err(err) = presence.register_queue(&mut conn).await {
        tracing::debug!(error = %err, "cannot register the queue");
    }
    loop {
        let beat = ProxyHeartbeat {
            id: proxy_id.clone(),
            host: host.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            waiting: state.budget.waiting(),
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
