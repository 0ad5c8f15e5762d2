//! The WebSocket scenario: the round-trip time of an echo on one socket
//! (32-byte text messages, one at a time) to the upstream directly,
//! through nginx's WebSocket proxying and through Anteroom (proxy and
//! dispatcher forwarding to the same upstream), and what each idle open
//! socket costs each process in resident memory. Nothing asserts speed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anteroom_testkit::LocalRedis;
use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::setups::{Forwarding, Nginx};
use crate::stream::{percentile, rss_tree_kib};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Processes whose memory is watched: a name and a pid.
type Watched = Vec<(&'static str, u32)>;

/// One setup's figures.
pub(crate) struct WsFigures {
    setup: &'static str,
    round_trips: usize,
    p50_us: u64,
    p99_us: u64,
    /// Each watched process's resident memory per idle open socket, bytes.
    per_socket: Vec<(&'static str, i64)>,
    sockets: usize,
    errors: usize,
}

/// The echo upstream: `/hello` (for readiness checks) and `/echo`, a
/// WebSocket that sends every message back.
async fn start_echo() -> anyhow::Result<SocketAddr> {
    async fn echo(upgrade: WebSocketUpgrade) -> axum::response::Response {
        upgrade.on_upgrade(|mut socket: WebSocket| async move {
            while let Some(Ok(message)) = socket.recv().await {
                let reply = match message {
                    AxumMessage::Text(_) | AxumMessage::Binary(_) => message,
                    AxumMessage::Close(_) => return,
                    _ => continue,
                };
                if socket.send(reply).await.is_err() {
                    return;
                }
            }
        })
    }
    let app = axum::Router::new()
        .route("/hello", axum::routing::get(|| async { "hello" }))
        .route("/echo", axum::routing::get(echo));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn open(url: &str) -> anyhow::Result<Socket> {
    let (ws, _) = tokio::time::timeout(Duration::from_secs(30), connect_async(url)).await??;
    Ok(ws)
}

async fn echo_once(ws: &mut Socket, text: &str) -> anyhow::Result<()> {
    ws.send(Message::text(text)).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
            Some(Ok(Message::Text(back))) if back.as_str() == text => return Ok(()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => anyhow::bail!("not the echo: {other:?}"),
        }
    }
}

/// `n` round trips on one socket after a warm-up, in microseconds, sorted.
async fn round_trips(url: &str, n: usize) -> anyhow::Result<Vec<u64>> {
    let mut ws = open(url).await?;
    let text = "x".repeat(32);
    for _ in 0..n / 10 {
        echo_once(&mut ws, &text).await?;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        echo_once(&mut ws, &text).await?;
        times.push(started.elapsed().as_micros() as u64);
    }
    let _ = ws.close(None).await;
    times.sort_unstable();
    Ok(times)
}

/// Opens `n` sockets (each echoes once) and reports each watched
/// process's resident memory growth per socket, in bytes; and how many
/// could not be opened.
async fn idle_cost(
    url: &str,
    n: usize,
    watched: &[(&'static str, u32)],
) -> (Vec<(&'static str, i64)>, usize) {
    let before: Vec<u64> = watched.iter().map(|(_, pid)| rss_tree_kib(*pid)).collect();
    let mut sockets = Vec::with_capacity(n);
    let mut errors = 0;
    let mut opening = futures_util::stream::iter(0..n)
        .map(|_| async {
            let mut ws = open(url).await?;
            echo_once(&mut ws, "idle").await?;
            anyhow::Ok(ws)
        })
        .buffer_unordered(64);
    while let Some(opened) = opening.next().await {
        match opened {
            Ok(ws) => sockets.push(ws),
            Err(_) => errors += 1,
        }
    }
    // Let allocators settle before reading.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let open = sockets.len().max(1) as i64;
    let per_socket = watched
        .iter()
        .zip(before)
        .map(|((name, pid), before)| {
            let grown = rss_tree_kib(*pid) as i64 - before as i64;
            (*name, grown * 1024 / open)
        })
        .collect();
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    (per_socket, errors)
}

/// Runs the scenario: `round_trips` echoes on one socket and `sockets`
/// idle sockets, per setup.
pub(crate) async fn run(
    anteroom: &Path,
    redis: &LocalRedis,
    round_trip_count: usize,
    sockets: usize,
) -> anyhow::Result<Vec<WsFigures>> {
    let upstream = start_echo().await?;
    let nginx = Nginx::start_websocket(upstream)?;
    let forwarding = Forwarding::start_with(anteroom, redis, upstream, "bench-ws", 64)?;
    let (proxy_pid, dispatcher_pid) = forwarding.pids();
    let ws_url = |http: String| http.replacen("http://", "ws://", 1);
    let setups: [(&'static str, String, Watched); 3] = [
        (
            "upstream (direct)",
            format!("ws://{upstream}/echo"),
            Vec::new(),
        ),
        (
            "nginx -> upstream",
            ws_url(nginx.url("/echo")),
            vec![("nginx", nginx.pid())],
        ),
        (
            "anteroom -> upstream",
            ws_url(forwarding.url("/echo")),
            vec![
                ("proxy", proxy_pid),
                ("dispatcher", dispatcher_pid),
                ("redis", redis.pid()),
            ],
        ),
    ];
    let mut figures = Vec::new();
    for (setup, url, watched) in setups {
        let times = round_trips(&url, round_trip_count).await?;
        let (per_socket, errors) = if watched.is_empty() {
            (Vec::new(), 0)
        } else {
            idle_cost(&url, sockets, &watched).await
        };
        figures.push(WsFigures {
            setup,
            round_trips: times.len(),
            p50_us: percentile(&times, 0.5),
            p99_us: percentile(&times, 0.99),
            per_socket,
            sockets,
            errors,
        });
    }
    Ok(figures)
}

pub(crate) fn print(figures: &[WsFigures]) {
    println!("\nWebSockets: echo round trips on one socket, and memory per idle open socket");
    println!(
        "  {:<22} {:>8} {:>9} {:>9} {:>12}  {:<46} {:>6}",
        "setup", "echoes", "p50", "p99", "added p50", "RSS per idle socket (bytes)", "errors"
    );
    let direct = figures.first().map_or(0, |f| f.p50_us);
    for f in figures {
        let per_socket = f
            .per_socket
            .iter()
            .map(|(name, bytes)| format!("{name} {bytes}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "  {:<22} {:>8} {:>6} us {:>6} us {:>9} us  {:<46} {:>6}",
            f.setup,
            f.round_trips,
            f.p50_us,
            f.p99_us,
            f.p50_us as i64 - direct as i64,
            per_socket,
            f.errors
        );
    }
    if let Some(f) = figures.get(1) {
        println!(
            "  (32-byte text messages one at a time; idle cost: resident memory growth with {} sockets open, each having echoed once)",
            f.sockets
        );
    }
}
