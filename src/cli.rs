//! Command-line interface: `anteroom <command> [flags]`.
//!
//! Every flag can also be set with the environment variable named in its
//! help; a flag on the command line wins over the environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::values::{duration_text, size_text};
pub(crate) use crate::values::{parse_duration, parse_size};

/// Anteroom: HTTP requests wait in Redis until a dispatcher calls them in.
///
/// Stop every dispatcher and traffic is suspended, not failed: clients see a
/// few seconds of delay during a deploy or a database failover instead of
/// errors.
#[derive(Debug, Parser)]
#[command(name = "anteroom", version, about, long_about)]
pub(crate) struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub(crate) command: Command,

    /// Log format on stderr. Filter with RUST_LOG (default: info).
    #[arg(
        long,
        global = true,
        env = "ANTEROOM_LOG_FORMAT",
        default_value = "text"
    )]
    pub(crate) log_format: LogFormat,

    /// Configuration file (TOML): flag > environment > file > default. See
    /// docs/configuration.md.
    #[arg(long, global = true, env = "ANTEROOM_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<std::path::PathBuf>,

    /// Check the configuration (flags, environment, file), print every
    /// setting with where it came from, warn about contradictions, and exit:
    /// 0 when valid, 2 otherwise. Nothing connects or starts.
    #[arg(long, global = true)]
    pub(crate) check_config: bool,

    /// Every setting and its source, filled in for --check-config.
    #[arg(skip)]
    pub(crate) settings: Vec<crate::config::Setting>,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the front proxy: queue each HTTP request in Redis and answer with its reply.
    Proxy(ProxyArgs),
    /// Run a dispatcher that forwards queued requests to an upstream HTTP server.
    Dispatch(DispatchArgs),
    /// Pause a queue: dispatchers stop taking requests, which wait in Redis.
    Pause(PauseArgs),
    /// Resume a paused queue: waiting requests are released oldest first.
    Resume(QueueArgs),
    /// Show each queue's pause state, waiting requests, dispatchers and proxies,
    /// and Redis's memory (with a warning when its policy evicts keys).
    Status(StatusArgs),
    /// Settle the requests of dispatchers that died holding them: safe ones
    /// back to the front of the queue, others answered 502. Every dispatcher
    /// also does this by itself every --reap-every.
    Reap(QueueArgs),
    /// Maintenance mode: proxies answer each new request of the queue at once
    /// with 503, Retry-After and a page (HTML or JSON), instead of holding
    /// it; requests already queued keep waiting.
    Maintenance(MaintenanceArgs),
    /// Dead letters: requests a dispatcher set aside without running them.
    /// List, show, replay (back to the front of the queue with a fresh
    /// deadline) or purge them.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Pause, wait until no request is in flight, run COMMAND, then resume
    /// (also when COMMAND fails or is interrupted); exits with COMMAND's status.
    Window(WindowArgs),
    /// Try Anteroom on this machine: a proxy, a dispatcher and a demo backend,
    /// with a private redis-server when --redis is not given.
    Demo(DemoArgs),
    /// Check that a dispatcher speaks the protocol: start COMMAND (which
    /// serves the reference app of docs/clients.md), drive it through each
    /// case, print one line per case; exit 1 on any failure.
    Conformance(ConformanceArgs),
}

/// Flags of `anteroom pause`.
#[derive(Debug, Args)]
pub(crate) struct PauseArgs {
    /// Where the queue lives.
    #[command(flatten)]
    pub(crate) target: QueueArgs,

    /// Return only when every live dispatcher has stopped and holds nothing.
    #[arg(long)]
    pub(crate) wait: bool,

    /// With --wait: give up (exit 1, queue stays paused) after this long
    /// [default: 30s].
    #[arg(long, env = "ANTEROOM_TIMEOUT", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,

    /// Let the pause lapse by itself after this long (default: until resumed).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) ttl: Option<Duration>,

    /// With --wait: do not show which dispatchers are still busy (shown only
    /// on a terminal anyway).
    #[arg(long, short, requires = "wait")]
    pub(crate) quiet: bool,

    /// With --wait: pause even when no proxy or no dispatcher serves the
    /// queue (otherwise refused: most often a wrong --queue or --redis).
    #[arg(long, requires = "wait")]
    pub(crate) force: bool,
}

/// Flags of `anteroom maintenance`.
#[derive(Debug, Args)]
pub(crate) struct MaintenanceArgs {
    /// `on` or `off`.
    #[arg(value_enum)]
    pub(crate) state: Switch,

    /// Where the queue lives.
    #[command(flatten)]
    pub(crate) target: QueueArgs,

    /// With on: the text the page shows, at most 4096 bytes (default: "This
    /// service is down for maintenance. Please try again shortly.").
    #[arg(long, value_parser = maintenance_message)]
    pub(crate) message: Option<String>,

    /// With on: the Retry-After each 503 carries, whole seconds (`600`) or
    /// a duration (`10m`), at most a day.
    #[arg(long, default_value = "30", value_parser = retry_after_secs)]
    pub(crate) retry_after: u32,
}

/// `anteroom dead` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum DeadCommand {
    /// One line per letter, newest first: id, when, method and target,
    /// whether its client still waits, and why it was set aside.
    List(DeadListArgs),
    /// One letter whole: reason, request line, header fields and body.
    Show(DeadShowArgs),
    /// Put letters' requests back at the front of the queue with a fresh
    /// deadline. Only those whose client still waits, unless
    /// --without-client.
    Replay(DeadReplayArgs),
    /// Remove letters: all, or those set aside longer ago than --older-than.
    Purge(DeadPurgeArgs),
}

/// Flags of `anteroom dead list`.
#[derive(Debug, Args)]
pub(crate) struct DeadListArgs {
    /// Where the queue lives.
    #[command(flatten)]
    pub(crate) target: QueueArgs,

    /// Print JSON (an array of letters) instead of lines.
    #[arg(long)]
    pub(crate) json: bool,

    /// Show at most this many, newest first.
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: usize,
}

/// Flags of `anteroom dead show`.
#[derive(Debug, Args)]
pub(crate) struct DeadShowArgs {
    /// The letter's id, as `dead list` prints it: the request's id, or
    /// `#N` for one that does not decode.
    pub(crate) id: String,

    /// Where the queue lives.
    #[command(flatten)]
    pub(crate) target: QueueArgs,

    /// Print JSON (the body as text when it is UTF-8, else base64).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Flags of `anteroom dead replay`.
#[derive(Debug, Args)]
pub(crate) struct DeadReplayArgs {
    /// The letter to replay (`dead list` shows ids).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(crate) id: Option<String>,

    /// Every letter that can be replayed.
    #[arg(long)]
    pub(crate) all: bool,

    /// Where the queue lives.
    #[command(flatten)]
    pub(crate) target: QueueArgs,

    /// The fresh deadline: this long from now.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) hold: Duration,

    /// Replay also requests whose client is gone (its deadline passed or
    /// its proxy stopped): they run, and no one gets the answer.
    #[arg(long)]
    pub(crate) without_client: bool,

    /// Print JSON (one object per letter: id, outcome, why).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Flags of `anteroom dead purge`.
#[derive(Debug, Args)]
pub(crate) struct DeadPurgeArgs {
    /// Where the queue lives.
    #[command(flatten)]
    pub(crate) target: QueueArgs,

    /// Only letters set aside longer ago than this (default: all).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) older_than: Option<Duration>,

    /// Print JSON (`{"purged": N, "kept": M}`).
    #[arg(long)]
    pub(crate) json: bool,
}

/// A `Retry-After`: whole seconds, or a duration rounded to seconds; at
/// most a day.
fn retry_after_secs(text: &str) -> Result<u32, String> {
    let secs = match text.parse::<u64>() {
        Ok(secs) => secs,
        Err(_) => parse_duration(text)?.as_secs(),
    };
    if secs > 86_400 {
        return Err(format!("{secs} s is over a day (86400)"));
    }
    Ok(secs as u32)
}

/// A maintenance message of at most 4096 bytes.
fn maintenance_message(text: &str) -> Result<String, String> {
    if text.len() > 4096 {
        return Err(format!("{} bytes; at most 4096", text.len()));
    }
    Ok(text.to_owned())
}

/// A mode turned on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Switch {
    /// Turn it on.
    On,
    /// Turn it off.
    Off,
}

/// Flags of `anteroom status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The Redis server.
    #[command(flatten)]
    pub(crate) redis: RedisArg,

    /// Only this queue (default: every queue a proxy or dispatcher has registered).
    #[arg(long, env = "ANTEROOM_QUEUE")]
    pub(crate) queue: Option<String>,

    /// Print JSON (schema in docs/operations.md) instead of a table.
    #[arg(long, conflicts_with = "lines")]
    pub(crate) json: bool,

    /// For scripts: one tab-separated line per live component,
    /// `dispatcher QUEUE ID HOST PID LABEL STATE` (STATE: pulling, paused
    /// or unhealthy) and `proxy QUEUE ID HOST PID`.
    #[arg(long)]
    pub(crate) lines: bool,
}

/// Flags of `anteroom window`.
#[derive(Debug, Args)]
pub(crate) struct WindowArgs {
    /// Where the queue lives.
    #[command(flatten)]
    pub(crate) target: QueueArgs,

    /// How long to wait for in-flight requests before giving up (the queue is
    /// resumed and COMMAND is not run).
    #[arg(long, env = "ANTEROOM_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,

    /// Do not show which dispatchers are still busy while waiting (shown
    /// only on a terminal anyway).
    #[arg(long, short)]
    pub(crate) quiet: bool,

    /// Open the window even when no proxy or no dispatcher serves the queue
    /// (otherwise refused: most often a wrong --queue or --redis).
    #[arg(long)]
    pub(crate) force: bool,

    /// The pause is a lease renewed while the window runs; if this process
    /// dies, the queue resumes by itself after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) lease: Duration,

    /// The command to run while the queue is quiet, after `--`.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub(crate) command: Vec<String>,
}

/// `--redis`, shared by every command that talks to Redis.
#[derive(Debug, Args)]
pub(crate) struct RedisArg {
    /// Redis URL: redis://[USER:PASSWORD@]HOST:PORT[/DB], rediss://... for TLS,
    /// redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB] for Sentinel, or
    /// redis+cluster://HOST:PORT[,HOST:PORT...] for Redis Cluster.
    #[arg(
        long = "redis",
        env = "ANTEROOM_REDIS",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub(crate) url: String,
}

/// The Redis server and queue, shared by every command that uses a queue.
#[derive(Debug, Args)]
pub(crate) struct QueueArgs {
    /// The Redis server.
    #[command(flatten)]
    pub(crate) redis: RedisArg,

    /// Queue name (1-64 characters of A-Z a-z 0-9 . _ -).
    #[arg(long, env = "ANTEROOM_QUEUE", default_value = "default")]
    pub(crate) queue: String,
}

/// Flags of `anteroom proxy`.
#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// Address to accept HTTP/1.1 and h2c connections on (HTTPS with
    /// --tls-cert), bound with SO_REUSEPORT so a new proxy can start on it
    /// before the old one stops.
    /// Not used when systemd passes a socket (LISTEN_FDS).
    #[arg(long, env = "ANTEROOM_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,

    /// Where the queue lives.
    #[command(flatten)]
    pub(crate) target: QueueArgs,

    /// Hold budget: how long a request may wait for its response before the
    /// client gets 504 (e.g. 30s, 500ms, 2m).
    #[arg(long, env = "ANTEROOM_HOLD", default_value = duration_text(anteroom_proxy::defaults::HOLD), value_parser = parse_duration)]
    pub(crate) hold: Duration,

    /// Largest request body accepted; larger bodies get 413 (e.g. 8MiB, 1GiB).
    /// Memory does not grow with it: bodies over --body-buffer stream.
    #[arg(long, env = "ANTEROOM_MAX_BODY", default_value = size_text(anteroom_proxy::defaults::MAX_BODY), value_parser = parse_size)]
    pub(crate) max_body: usize,

    /// Largest request body queued whole. A larger one is queued with its
    /// first part; the rest streams to the dispatcher that takes it, and
    /// until one does the proxy reads no more of it (TCP holds the upload).
    #[arg(long, env = "ANTEROOM_BODY_BUFFER", default_value = size_text(anteroom_proxy::defaults::BODY_BUFFER), value_parser = parse_size)]
    pub(crate) body_buffer: usize,

    /// On SIGINT or SIGTERM, how long to let waiting requests finish.
    #[arg(long, env = "ANTEROOM_GRACE", default_value = duration_text(anteroom_proxy::defaults::GRACE), value_parser = parse_duration)]
    pub(crate) grace: Duration,

    /// On SIGINT or SIGTERM (which stop accepting at once), how long idle
    /// keep-alive connections stay open so each client's next request is
    /// answered, with Connection: close, instead of meeting a closed socket.
    #[arg(long, env = "ANTEROOM_DRAIN", default_value = duration_text(anteroom_proxy::defaults::DRAIN), value_parser = parse_duration)]
    pub(crate) drain: Duration,

    /// Most requests waiting in this proxy at once; beyond it, 503 with Retry-After.
    #[arg(long, env = "ANTEROOM_MAX_WAITING", default_value_t = anteroom_proxy::defaults::MAX_WAITING)]
    pub(crate) max_waiting: usize,

    /// Most request body bytes waiting in this proxy at once; beyond it, 503.
    #[arg(long, env = "ANTEROOM_MAX_WAITING_BYTES", default_value = size_text(anteroom_proxy::defaults::MAX_WAITING_BYTES), value_parser = parse_size)]
    pub(crate) max_waiting_bytes: usize,

    /// Most client connections open at once; further ones are closed at once.
    #[arg(long, env = "ANTEROOM_MAX_CONNECTIONS", default_value_t = anteroom_proxy::defaults::MAX_CONNECTIONS)]
    pub(crate) max_connections: usize,

    /// Most header fields in one request; more get 431.
    #[arg(long, env = "ANTEROOM_MAX_HEADERS", default_value_t = anteroom_proxy::defaults::MAX_HEADERS)]
    pub(crate) max_headers: usize,

    /// Most bytes in one request head (request line and headers); more get 431.
    #[arg(long, env = "ANTEROOM_MAX_HEAD", default_value = size_text(anteroom_proxy::defaults::MAX_HEAD_BYTES), value_parser = parse_size)]
    pub(crate) max_head: usize,

    /// How long a client may take to send the request head; then the
    /// connection is closed (slow clients cannot hold connections open).
    #[arg(long, env = "ANTEROOM_HEADER_TIMEOUT", default_value = duration_text(anteroom_proxy::defaults::HEADER_READ_TIMEOUT), value_parser = parse_duration)]
    pub(crate) header_timeout: Duration,

    /// How long a client may take to send a body queued whole (up to
    /// --body-buffer); then 408. A streamed body has --stream-idle-timeout
    /// between its pieces instead.
    #[arg(long, env = "ANTEROOM_BODY_TIMEOUT", default_value = duration_text(anteroom_proxy::defaults::BODY_READ_TIMEOUT), value_parser = parse_duration)]
    pub(crate) body_timeout: Duration,

    /// How long a streamed response may go without a chunk from its
    /// dispatcher; then the client's response is aborted (cut short, never
    /// ended cleanly). The hold budget covers the time until its head. A
    /// streamed request body may go as long without a piece from its client.
    #[arg(long, env = "ANTEROOM_STREAM_IDLE_TIMEOUT", default_value = duration_text(anteroom_proxy::defaults::STREAM_IDLE_TIMEOUT), value_parser = parse_duration)]
    pub(crate) stream_idle_timeout: Duration,

    /// Most WebSockets open (or waiting for their handshake's answer) at
    /// once; past it a handshake gets 503 (0: every handshake gets 503).
    #[arg(long, env = "ANTEROOM_MAX_WEBSOCKETS", default_value_t = anteroom_proxy::defaults::MAX_WEBSOCKETS)]
    pub(crate) max_websockets: usize,

    /// Largest WebSocket message a client may send or be sent; a larger one
    /// closes the socket with 1009 (RFC 6455 section 7.4.1).
    #[arg(long, env = "ANTEROOM_WEBSOCKET_MAX_MESSAGE", default_value = size_text(anteroom_proxy::defaults::WEBSOCKET_MAX_MESSAGE), value_parser = parse_size)]
    pub(crate) websocket_max_message: usize,

    /// A client WebSocket silent this long is pinged; silent twice as long,
    /// its connection is dropped. Keeps sockets open through idle load
    /// balancers and NAT, and finds dead clients (0s: never ping).
    #[arg(long, env = "ANTEROOM_WEBSOCKET_PING", default_value = duration_text(anteroom_proxy::defaults::WEBSOCKET_PING_INTERVAL), value_parser = parse_duration)]
    pub(crate) websocket_ping: Duration,

    /// How long an answer may make no progress because the client reads
    /// nothing; then its connection is dropped and its memory freed.
    #[arg(long, env = "ANTEROOM_SEND_TIMEOUT", default_value = duration_text(anteroom_proxy::defaults::SEND_TIMEOUT), value_parser = parse_duration)]
    pub(crate) send_timeout: Duration,

    /// While Redis is unreachable, keep trying to enqueue for this long
    /// before answering 503 (0s: answer at once). Requests that are not safe
    /// to repeat are retried only when nothing was sent.
    #[arg(long, env = "ANTEROOM_ENQUEUE_TIMEOUT", default_value = duration_text(anteroom_proxy::defaults::ENQUEUE_TIMEOUT), value_parser = parse_duration)]
    pub(crate) enqueue_timeout: Duration,

    /// Percent of Redis's maxmemory at which new requests get 503 (with
    /// Retry-After) instead of being queued, so that what is queued can
    /// still be taken and answered: a full Redis refuses the dispatchers'
    /// writes too. 100: only when Redis itself refuses (OOM).
    #[arg(long, env = "ANTEROOM_REDIS_HIGH_WATERMARK", default_value_t = anteroom_proxy::defaults::REDIS_HIGH_WATERMARK, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub(crate) redis_high_watermark: u8,

    /// After each enqueue, wait (WAIT 1) for a replica to have it, so an
    /// accepted request survives the loss of the primary.
    #[arg(long, env = "ANTEROOM_DURABLE")]
    pub(crate) durable: bool,

    /// With --durable: how long to wait for the replica.
    #[arg(long, env = "ANTEROOM_DURABLE_WAIT", default_value = duration_text(anteroom_proxy::defaults::DURABLE_WAIT), value_parser = parse_duration)]
    pub(crate) durable_wait: Duration,

    /// The layout of the request envelopes this proxy writes
    /// (docs/protocol.md, "Request envelopes, version 2"): 2 lists the
    /// fields in a JSON array, about 110 bytes shorter in Redis; 1 names
    /// them, for dispatchers of releases that read only version 1 (set it
    /// while they are upgraded, then remove it).
    #[arg(long, env = "ANTEROOM_ENVELOPE_VERSION", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub(crate) envelope_version: u8,

    /// Address for the admin endpoint (GET /healthz, GET /status, GET
    /// /metrics for Prometheus, POST /pause, POST /resume, POST
    /// /maintenance/on and /maintenance/off, POST /drain and /undrain);
    /// off when not given.
    #[arg(long, env = "ANTEROOM_ADMIN")]
    pub(crate) admin: Option<SocketAddr>,

    /// Bearer token the admin endpoint requires (all but /healthz). Better
    /// in the environment than on the command line, where ps shows it.
    #[arg(long, env = "ANTEROOM_ADMIN_TOKEN", hide_env_values = true)]
    pub(crate) admin_token: Option<String>,

    /// Allow --admin on an address beyond loopback without --admin-token
    /// (refused otherwise: anyone who reaches it could pause the queue).
    #[arg(long, env = "ANTEROOM_ADMIN_WITHOUT_TOKEN")]
    pub(crate) admin_without_token: bool,

    /// Canary routing: send a share of the requests for --queue (those
    /// that match no route) to this queue instead, served by dispatchers
    /// of a new version. Routes take a `canary` table in the
    /// configuration file.
    #[arg(long, env = "ANTEROOM_CANARY_QUEUE")]
    pub(crate) canary_queue: Option<String>,

    /// With --canary-queue: percent of the requests drawn for the canary
    /// (0 to 100, decimals allowed) [default: 0].
    #[arg(long, env = "ANTEROOM_CANARY_WEIGHT")]
    pub(crate) canary_weight: Option<f64>,

    /// With --canary-queue: a cookie that pins each client to its side
    /// (`NAME=1` canary, `NAME=0` main); a client without it gets it set
    /// to the side it drew.
    #[arg(long, env = "ANTEROOM_CANARY_COOKIE")]
    pub(crate) canary_cookie: Option<String>,

    /// With --canary-queue: a request header field that picks the side
    /// (`1` canary, `0` main), for testers and health checks.
    #[arg(long, env = "ANTEROOM_CANARY_HEADER")]
    pub(crate) canary_header: Option<String>,

    /// Terminate TLS: the certificate chain (PEM, the server's certificate
    /// first). Every connection on --listen is then TLS, with ALPN h2 and
    /// http/1.1; SIGHUP reloads the certificate and key without dropping
    /// connections.
    #[arg(long, env = "ANTEROOM_TLS_CERT", value_name = "FILE")]
    pub(crate) tls_cert: Option<std::path::PathBuf>,

    /// With --tls-cert: its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "ANTEROOM_TLS_KEY", value_name = "FILE")]
    pub(crate) tls_key: Option<std::path::PathBuf>,

    /// HTML page for clients that accept HTML while their queue is in
    /// maintenance mode (`anteroom maintenance on`); others get JSON.
    /// Default: a built-in page showing the maintenance message.
    #[arg(long, env = "ANTEROOM_MAINTENANCE_PAGE", value_name = "FILE")]
    pub(crate) maintenance_page: Option<std::path::PathBuf>,

    /// Whether requests that match no route (`[[proxy.routes]]` in the
    /// configuration file) go to --queue; false answers them 404.
    #[arg(long, env = "ANTEROOM_DEFAULT_QUEUE", default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) default_queue: bool,
}

/// Flags of `anteroom dispatch`.
#[derive(Debug, Args)]
pub(crate) struct DispatchArgs {
    /// Where the queue lives.
    #[command(flatten)]
    pub(crate) target: QueueArgs,

    /// Upstream HTTP server to forward each request to:
    /// http://HOST:PORT[/PREFIX], https://HOST:PORT[/PREFIX] (certificate
    /// checked against the system's CAs, or --upstream-ca), or
    /// unix:/PATH for a server on a Unix domain socket (puma, gunicorn,
    /// uvicorn bound to a socket).
    #[arg(long, env = "ANTEROOM_UPSTREAM")]
    pub(crate) upstream: String,

    /// With several --queue names (comma-separated, highest priority
    /// first, e.g. critical,default,bulk): a weight per queue, e.g. 8,3,1.
    /// Each queue is then guaranteed its share of --concurrency while it
    /// has requests, so lower queues are slowed by a backlog above them
    /// but never starved. Without it, strict priority.
    #[arg(long, env = "ANTEROOM_QUEUE_WEIGHTS", value_name = "W,W,...")]
    pub(crate) queue_weights: Option<String>,

    /// For an https:// upstream: verify its certificate against the CA
    /// certificates in this PEM file instead of the system's.
    #[arg(long, env = "ANTEROOM_UPSTREAM_CA", value_name = "FILE")]
    pub(crate) upstream_ca: Option<std::path::PathBuf>,

    /// How many requests to run at once.
    #[arg(long, env = "ANTEROOM_CONCURRENCY", default_value_t = anteroom_dispatcher::defaults::CONCURRENCY)]
    pub(crate) concurrency: usize,

    /// On SIGINT or SIGTERM, how long to let in-flight requests finish.
    #[arg(long, env = "ANTEROOM_GRACE", default_value = duration_text(anteroom_dispatcher::defaults::GRACE), value_parser = parse_duration)]
    pub(crate) grace: Duration,

    /// Version label shown in this dispatcher's heartbeat (e.g. a release or git sha).
    #[arg(long, env = "ANTEROOM_LABEL", default_value = "")]
    pub(crate) label: String,

    /// Heartbeat lifetime: a dispatcher silent this long counts as dead and
    /// the requests it held are reaped.
    #[arg(long, env = "ANTEROOM_HEARTBEAT_TTL", default_value = duration_text(anteroom_dispatcher::defaults::HEARTBEAT_TTL), value_parser = parse_duration)]
    pub(crate) heartbeat_ttl: Duration,

    /// How often to look for dead dispatchers and reap their requests (0s: never).
    #[arg(long, env = "ANTEROOM_REAP_EVERY", default_value = duration_text(anteroom_dispatcher::defaults::REAP_INTERVAL), value_parser = parse_duration)]
    pub(crate) reap_every: Duration,

    /// Wait (WAIT 1) for a replica after taking and after completing each
    /// request, so a failover neither hands a request out twice nor loses a reply.
    #[arg(long, env = "ANTEROOM_DURABLE")]
    pub(crate) durable: bool,

    /// With --durable: how long to wait for the replica.
    #[arg(long, env = "ANTEROOM_DURABLE_WAIT", default_value = duration_text(anteroom_dispatcher::defaults::DURABLE_WAIT), value_parser = parse_duration)]
    pub(crate) durable_wait: Duration,

    /// Address to serve Prometheus metrics on (GET /metrics); off when not given.
    #[arg(long, env = "ANTEROOM_METRICS")]
    pub(crate) metrics: Option<SocketAddr>,

    /// Health check path on the upstream (e.g. /up): take no request until
    /// GET PATH answers 2xx, and none while it fails. Without it, a failed
    /// connection stops taking requests until a plain TCP connection to the
    /// upstream opens again. Either way requests the upstream never
    /// received go back to the front of the queue instead of failing.
    #[arg(long, env = "ANTEROOM_HEALTH_PATH", value_name = "PATH")]
    pub(crate) health_path: Option<String>,

    /// How often to check the upstream: every interval for --health-path;
    /// while unhealthy, first after 50ms, doubling up to the interval.
    #[arg(long, env = "ANTEROOM_HEALTH_INTERVAL", default_value = duration_text(anteroom_dispatcher::defaults::HEALTH_INTERVAL), value_parser = parse_duration)]
    pub(crate) health_interval: Duration,

    /// How long an idle keep-alive connection to the upstream is kept; keep
    /// it below the app's own keep-alive timeout (gunicorn 2s, Node 5s).
    #[arg(long, env = "ANTEROOM_UPSTREAM_IDLE_TIMEOUT", default_value = duration_text(anteroom_dispatcher::defaults::UPSTREAM_IDLE_TIMEOUT), value_parser = parse_duration)]
    pub(crate) upstream_idle_timeout: Duration,

    /// Most header fields in one response from the upstream; more is a 502.
    #[arg(long, env = "ANTEROOM_UPSTREAM_MAX_HEADERS", default_value_t = anteroom_dispatcher::defaults::UPSTREAM_MAX_HEADERS)]
    pub(crate) upstream_max_headers: usize,

    /// How long a streamed response may go without the app's body producing
    /// a byte, or without the client reading once the window is full; then
    /// it is aborted. A streamed request body that gets no piece from the
    /// proxy this long fails at the app.
    #[arg(long, env = "ANTEROOM_STREAM_IDLE_TIMEOUT", default_value = duration_text(anteroom_dispatcher::defaults::STREAM_IDLE_TIMEOUT), value_parser = parse_duration)]
    pub(crate) stream_idle_timeout: Duration,

    /// Largest WebSocket message relayed either way; a larger one closes
    /// the socket with 1009 (RFC 6455 section 7.4.1).
    #[arg(long, env = "ANTEROOM_WEBSOCKET_MAX_MESSAGE", default_value = size_text(anteroom_dispatcher::defaults::WEBSOCKET_MAX_MESSAGE), value_parser = parse_size)]
    pub(crate) websocket_max_message: usize,

    /// Most bytes of a streamed response sent and not yet handed to the
    /// client, and of a streamed request body sent by the proxy and not yet
    /// read by the app: what one stream may hold in Redis and in a process.
    #[arg(long, env = "ANTEROOM_STREAM_WINDOW", default_value = size_text(anteroom_dispatcher::defaults::STREAM_WINDOW), value_parser = parse_size)]
    pub(crate) stream_window: usize,

    /// How long one health check may take before it counts as failed.
    #[arg(long, env = "ANTEROOM_HEALTH_TIMEOUT", default_value = duration_text(anteroom_dispatcher::defaults::HEALTH_TIMEOUT), value_parser = parse_duration)]
    pub(crate) health_timeout: Duration,
}

/// Flags of `anteroom conformance`.
#[derive(Debug, Args)]
pub(crate) struct ConformanceArgs {
    /// Redis URL to use; when absent, a private redis-server is started
    /// from PATH. COMMAND gets it as ANTEROOM_REDIS.
    #[arg(long, hide_env_values = true)]
    pub(crate) redis: Option<String>,

    /// Queue the dispatcher serves (COMMAND gets it as ANTEROOM_QUEUE).
    #[arg(long, default_value = "conformance")]
    pub(crate) queue: String,

    /// How long COMMAND may take to start beating.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) start_timeout: Duration,

    /// Let the kit make the `--redis` server refuse writes that need memory (OOM) for about 4 s
    /// (`CONFIG SET maxmemory 1`, put back after) for the case "taken and
    /// answered while Redis is over its maxmemory". Always so with the kit's own
    /// Redis; without this flag a `--redis` server is left alone and the
    /// case is skipped: never give it a Redis that other programs use.
    #[arg(long)]
    pub(crate) refuse_writes: bool,

    /// libfaketime, preloaded into COMMAND for the case "deadlines by
    /// Redis's clock, host clock off" [default: the first found of
    /// Debian's, Ubuntu's and /usr/local's; without one the case is
    /// skipped].
    #[arg(long, env = "ANTEROOM_FAKETIME_LIB", value_name = "PATH")]
    pub(crate) faketime_lib: Option<std::path::PathBuf>,

    /// The dispatcher to check, after `--`.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub(crate) command: Vec<String>,
}

/// Flags of `anteroom demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Address the demo proxy listens on.
    #[arg(long, env = "ANTEROOM_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,

    /// Redis URL to use; when absent, a private redis-server is started from PATH.
    #[arg(long, env = "ANTEROOM_REDIS", hide_env_values = true)]
    pub(crate) redis: Option<String>,

    /// Queue name.
    #[arg(long, env = "ANTEROOM_QUEUE", default_value = "demo")]
    pub(crate) queue: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The flags' defaults are the libraries': `anteroom proxy` and
    /// `anteroom dispatch` with no flags build what `ProxyConfig::new` and
    /// the dispatcher's defaults say (the text round trip included).
    #[test]
    fn flag_defaults_are_the_libraries_defaults() {
        let cli = Cli::try_parse_from(["anteroom", "proxy"]).unwrap();
        let Command::Proxy(args) = cli.command else {
            panic!("not proxy")
        };
        let built = crate::commands::proxy_config(&args);
        let library = anteroom_proxy::ProxyConfig::new(&built.redis_url, &built.queue);
        assert_eq!(format!("{built:?}"), format!("{library:?}"));
        assert_eq!(args.durable_wait, anteroom_proxy::defaults::DURABLE_WAIT);

        let cli =
            Cli::try_parse_from(["anteroom", "dispatch", "--upstream", "http://a:1"]).unwrap();
        let Command::Dispatch(args) = cli.command else {
            panic!("not dispatch")
        };
        use anteroom_dispatcher::defaults as d;
        assert_eq!(args.concurrency, d::CONCURRENCY);
        assert_eq!(args.grace, d::GRACE);
        assert_eq!(args.heartbeat_ttl, d::HEARTBEAT_TTL);
        assert_eq!(args.reap_every, d::REAP_INTERVAL);
        assert_eq!(args.durable_wait, d::DURABLE_WAIT);
        assert_eq!(args.health_interval, d::HEALTH_INTERVAL);
        assert_eq!(args.health_timeout, d::HEALTH_TIMEOUT);
        assert_eq!(args.upstream_idle_timeout, d::UPSTREAM_IDLE_TIMEOUT);
        assert_eq!(args.upstream_max_headers, d::UPSTREAM_MAX_HEADERS);
        assert_eq!(args.stream_idle_timeout, d::STREAM_IDLE_TIMEOUT);
        assert_eq!(args.stream_window, d::STREAM_WINDOW);
        for size in [0, 1000, 64 * 1024, 8 * 1024 * 1024, 1024 * 1024 + 1] {
            assert_eq!(parse_size(&size_text(size)).unwrap(), size);
        }
        assert_eq!(duration_text(Duration::from_secs(60)), "60s");
        for d in [0, 250, 1_000, 60_000, 90_500] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&duration_text(d)).unwrap(), d);
        }
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("8MiB").unwrap(), 8 * 1024 * 1024);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("soon").is_err());
    }
}
