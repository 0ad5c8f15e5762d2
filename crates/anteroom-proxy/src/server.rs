//! `serve`: Redis setup, the background components, the accept loop and
//! graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anteroom_control::queue::{Presence, Role, keep_present};
use anteroom_protocol::{Keys, ProxyHeartbeat, validate_id};
use anteroom_redis::SharedConnection;
use anteroom_runtime::Components;
use anteroom_runtime::http::accept_until;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::budget::Budget;
use crate::canary::Split;
use crate::config::ProxyConfig;
use crate::connection::Connections;
use crate::enqueue::Enqueuer;
use crate::error::ServeError;
use crate::handler::State;
use crate::replies::{self, Demux};
use crate::router::{Router, Target};
use crate::stream::{CREDIT_TTL, CreditSender};
use anteroom_control::queue;

/// How often the proxy refreshes its heartbeat key, and the key's lifetime.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const HEARTBEAT_TTL: Duration = Duration::from_secs(10);

/// How often the dispatchers at the other end of open WebSockets are
/// checked for a heartbeat: a socket whose dispatcher died closes (1011)
/// within the dispatcher's heartbeat TTL and this.
const PEER_CHECK: Duration = Duration::from_secs(1);
/// How often each queue's maintenance flag is re-read besides the
/// announcements on its control channel (a missed one costs at most this).
const MAINTENANCE_POLL: Duration = Duration::from_secs(1);
/// How long the background components (reply readers, heartbeats,
/// enqueuers) get to stop once the connections are drained.
const COMPONENTS_GRACE: Duration = Duration::from_secs(5);

/// Runs the proxy on `listener` until `shutdown` completes (or one of its
/// components fails), then drains.
///
/// Checks the configuration and connects to Redis first, and fails if it
/// cannot. When `shutdown` fires:
/// 1. the listener is closed at once, after serving the connections the
///    kernel had already completed on it (which closing would reset);
/// 2. every HTTP/1 response from then on says `Connection: close`, and idle
///    keep-alive connections stay open up to `config.drain` so that each
///    client's next request is answered rather than cut off;
/// 3. then idle connections close, HTTP/2 ones get GOAWAY, and requests
///    still waiting get the rest of `config.grace` to be answered (their
///    replies still come to this proxy's reply list);
/// 4. then the reply readers, heartbeats and enqueuers stop.
///
/// Errors: a bad configuration or queue name, Redis unreachable at start,
/// or a component that failed while serving ([`ServeError::Component`]).
pub async fn serve(
    listener: TcpListener,
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let proxy_id = proxy_id(&config)?;
    config.validate()?;
    let mut queues = Queues::of(&config)?;
    let (target, conn) = anteroom_redis::connect(&config.redis_url, config.redis_timeout).await?;
    let components = Components::new();
    let config = Arc::new(config);
    let (credits, credits_rx) = queue::FrameSender::new();
    components.spawn(
        "credit writer",
        queue::write_frames(conn.clone(), credits_rx, CREDIT_TTL, components.stopping()),
    );
    let demux = Arc::new(Demux::new(CreditSender(credits)));
    components.spawn(
        "websocket peer watch",
        anteroom_socket::watch_peers(
            conn.clone(),
            Arc::clone(&demux.sockets),
            PEER_CHECK,
            components.stopping(),
        ),
    );
    for keys in &queues.served {
        let watch = anteroom_control::watch_maintenance(
            target.clone(),
            conn.clone(),
            keys.clone(),
            MAINTENANCE_POLL,
            config.redis_timeout,
            &components,
        )
        .await
        .map_err(ServeError::Control)?;
        queues.maintenance.insert(keys.queue().to_owned(), watch);
    }
    let router = Arc::new(queues.router(
        &config,
        &proxy_id,
        &conn,
        target.is_cluster(),
        &demux,
        &components,
    ));
    tracing::info!(
        listen = %listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string()),
        queues = ?queues.served.iter().map(Keys::queue).collect::<Vec<_>>(),
        routes = config.routes.len(),
        default_queue = config.default_queue,
        proxy_id = %proxy_id,
        hold = ?config.hold,
        tls = config.tls.is_some(),
        "proxy ready"
    );
    for keys in &queues.served {
        let reader = replies::run(
            Arc::clone(&demux),
            target.clone(),
            keys.clone(),
            keys.replies(&proxy_id),
            config.redis_timeout,
            components.stopping(),
        );
        components.spawn("reply reader", reader);
        let beat = heartbeat(
            conn.clone(),
            Arc::clone(&router),
            keys,
            &proxy_id,
            &components,
        );
        components.spawn("heartbeat", beat);
    }

    let tls = match &config.tls {
        Some(certs) => Some(tokio_rustls::TlsAcceptor::from(certs.server_config()?)),
        None => None,
    };
    let connections = Connections::new(Arc::clone(&config), Arc::clone(&router), tls);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let stop = async {
        tokio::select! {
            () = shutdown => {}
            failure = components.failed() => tracing::error!(%failure, "stopping"),
        }
    };
    let taken_over = accept_until(listener, "proxy", &slots, stop, true, |accepted| {
        connections.serve(accepted);
    })
    .await;

    let grace_ends = tokio::time::Instant::now() + config.grace;
    let waiting = || router.states().map(|s| s.budget.waiting()).sum::<usize>();
    let drain = config.drain.min(config.grace);
    tracing::info!(
        waiting = waiting(),
        pending_connections_served = taken_over,
        ?drain,
        grace = ?config.grace,
        "shutting down: no longer accepting; answering what is held, closing connections"
    );
    connections.drain(drain, grace_ends, waiting).await;
    components
        .shutdown(COMPONENTS_GRACE)
        .await
        .map_err(ServeError::Component)
}

/// The configured proxy id (checked), or a fresh one.
fn proxy_id(config: &ProxyConfig) -> Result<String, ServeError> {
    match &config.proxy_id {
        Some(id) => {
            validate_id(id)?;
            Ok(id.clone())
        }
        None => Ok(uuid::Uuid::new_v4().simple().to_string()),
    }
}

/// The keys of the default queue and of each route's, checked before
/// anything connects, and the distinct queues served.
struct Queues {
    default: Keys,
    /// The default queue's canary queue.
    default_canary: Option<Keys>,
    /// Each route's queue and canary queue.
    routes: Vec<(Keys, Option<Keys>)>,
    /// One reply list and one heartbeat each.
    served: Vec<Keys>,
    /// Each served queue's maintenance mode, followed once connected.
    maintenance: std::collections::HashMap<String, anteroom_control::MaintenanceWatch>,
}

impl Queues {
    fn of(config: &ProxyConfig) -> Result<Self, ServeError> {
        let default = Keys::new(&config.queue)?;
        let canary = |c: &Option<crate::config::CanaryConfig>| {
            c.as_ref().map(|c| Keys::new(&c.queue)).transpose()
        };
        let default_canary = canary(&config.canary)?;
        let routes = config
            .routes
            .iter()
            .map(|route| Ok((Keys::new(&route.queue)?, canary(&route.canary)?)))
            .collect::<Result<Vec<_>, anteroom_protocol::NameError>>()?;
        let mut served: Vec<Keys> = Vec::new();
        let default_served = config.default_queue.then_some(&default).into_iter().chain(
            config
                .default_queue
                .then_some(&default_canary)
                .into_iter()
                .flatten(),
        );
        let routed = routes
            .iter()
            .flat_map(|(keys, canary)| std::iter::once(keys).chain(canary));
        for keys in default_served.chain(routed) {
            if !served.iter().any(|k| k.queue() == keys.queue()) {
                served.push(keys.clone());
            }
        }
        if served.is_empty() {
            return Err(ServeError::NoQueue);
        }
        Ok(Self {
            default,
            default_canary,
            routes,
            served,
            maintenance: std::collections::HashMap::new(),
        })
    }

    /// The router: one handler state (hold budget, waiting budget,
    /// enqueuer) per route, and one for the default queue when served.
    fn router(
        &self,
        config: &Arc<ProxyConfig>,
        proxy_id: &str,
        conn: &SharedConnection,
        cluster: bool,
        demux: &Arc<Demux>,
        components: &Components,
    ) -> Router {
        let durability = config
            .durable
            .map(|wait| anteroom_redis::Durability::spawn(conn.clone(), wait, components));
        // Not on Cluster: each queue's node has its own memory, and `INFO`
        // there goes to any node (a full node still answers OOM: 503).
        let memory = (!cluster).then(|| {
            anteroom_redis::MemoryWatch::spawn(
                conn.clone(),
                config.redis_high_watermark,
                components,
            )
        });
        // One cap on WebSockets for the whole proxy, whatever their route.
        let sockets = Arc::new(tokio::sync::Semaphore::new(config.max_websockets));
        let state_for = |keys: &Keys, hold: Duration, max_waiting: usize, max_bytes: usize| {
            let metrics = config.metrics.queue(keys.queue());
            let enqueuer = Enqueuer::spawn(
                conn.clone(),
                keys.requests(),
                durability.clone(),
                components,
            );
            let maintenance = self
                .maintenance
                .get(keys.queue())
                .cloned()
                .unwrap_or_else(|| tokio::sync::watch::channel(None).1);
            Arc::new(State {
                maintenance,
                memory: memory.clone(),
                sockets: Arc::clone(&sockets),
                config: Arc::clone(config),
                queue: keys.queue().to_owned(),
                hold,
                reply_key: keys.replies(proxy_id),
                enqueuer,
                conn: conn.clone(),
                demux: Arc::clone(demux),
                budget: Arc::new(Budget::new(max_waiting, max_bytes, metrics.clone())),
                metrics,
            })
        };
        // A queue and its canary, with the same hold budget and caps.
        let target_for = |keys: &Keys,
                          canary: Option<(&Keys, &crate::config::CanaryConfig)>,
                          hold: Duration,
                          max_waiting: usize,
                          max_bytes: usize| Target {
            state: state_for(keys, hold, max_waiting, max_bytes),
            canary: canary.map(|(keys, split)| {
                Split::new(split, state_for(keys, hold, max_waiting, max_bytes))
            }),
        };
        let default = config.default_queue.then(|| {
            target_for(
                &self.default,
                self.default_canary.as_ref().zip(config.canary.as_ref()),
                config.hold,
                config.max_waiting,
                config.max_waiting_bytes,
            )
        });
        let mut router = Router::new(default);
        for (route, (keys, canary)) in config.routes.iter().zip(&self.routes) {
            let target = target_for(
                keys,
                canary.as_ref().zip(route.canary.as_ref()),
                route.hold.unwrap_or(config.hold),
                route.max_waiting.unwrap_or(config.max_waiting),
                route.max_waiting_bytes.unwrap_or(config.max_waiting_bytes),
            );
            router.add(route.host.clone(), route.path_prefix.clone(), target);
        }
        router
    }
}

/// The proxy's heartbeat for `keys`' queue (see [`keep_present`]): how
/// many requests wait and the longest hold budget, every
/// [`HEARTBEAT_EVERY`]; removed on stop.
fn heartbeat(
    conn: SharedConnection,
    router: Arc<Router>,
    keys: &Keys,
    proxy_id: &str,
    components: &Components,
) -> impl Future<Output = ()> + Send + 'static {
    let presence = Presence::new(keys, Role::Proxy, proxy_id, HEARTBEAT_TTL);
    let queue = keys.queue().to_owned();
    let proxy_id = proxy_id.to_owned();
    let stop = components.stopping();
    async move {
        let host = anteroom_redis::hostname();
        let started_at_ms = anteroom_protocol::now_ms();
        let beat = || ProxyHeartbeat {
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
            canaries: router
                .splits()
                .filter(|(from, _)| *from == queue)
                .map(|(_, split)| split.report())
                .collect(),
        };
        presence.register_queue(&mut conn.clone()).await;
        // Nothing makes a proxy beat early: its heartbeat is for status.
        let never = tokio::sync::Notify::new();
        keep_present(&presence, conn, HEARTBEAT_EVERY, &never, &stop, beat).await;
    }
}
