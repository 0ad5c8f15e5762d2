//! The hold-capacity scenario: with no dispatcher running, hold many
//! concurrent requests in one proxy, then start a dispatcher and drain.
//!
//! Clients are h2c connections carrying 250 streams each (one loopback
//! address has too few ports for 50,000 HTTP/1.1 connections). Reported:
//! Redis connections of the proxy (sampled throughout), the proxy's RSS idle
//! and at peak, the memory per waiting request, Redis's `used_memory` per
//! held request, the fill time and rate (sending every request until all
//! wait in Redis), the drain time and rate, and errors. The fill and drain
//! limits, and the proxy's `--hold` beyond them, grow with the count.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anteroom_testkit::{LocalRedis, free_port};
use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::setups::{Proc, own_cpu_micros, rss_kib, spawn, spawn_dispatcher};

/// Streams per h2c connection (the proxy allows 256).
const STREAMS_PER_CONNECTION: usize = 250;
const QUEUE: &str = "bench-hold";

/// What the scenario measured.
#[derive(Debug)]
pub(crate) struct HoldFigures {
    pub(crate) held: usize,
    pub(crate) redis_connections_max: usize,
    pub(crate) rss_idle_kib: u64,
    pub(crate) rss_peak_kib: u64,
    /// RSS once every request waits (after the burst of arrivals).
    pub(crate) rss_settled_kib: u64,
    /// The bytes Redis counts against its limit
    /// ([`anteroom_redis::MemoryInfo::used`]) before the first request and
    /// once every request waits.
    pub(crate) redis_used_idle: u64,
    pub(crate) redis_used_held: u64,
    /// How long sending every request until all waited in Redis took.
    pub(crate) fill: Duration,
    pub(crate) drain: Duration,
    /// CPU microseconds per drained request, per process (user and
    /// system, `/proc/<pid>/stat`): the proxy, the dispatcher, Redis, and
    /// the benchmark's own process, whose one runtime thread serves the
    /// upstream and the client streams.
    pub(crate) drain_cpu: Vec<(&'static str, f64)>,
    pub(crate) errors: usize,
}

/// Redis clients other than the bench's own (named `anteroom-bench`).
async fn proxy_clients(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<usize> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await?;
    Ok(list
        .lines()
        .filter(|l| !l.contains("name=anteroom-bench"))
        .count())
}

pub(crate) async fn run(
    anteroom: &Path,
    redis: &LocalRedis,
    upstream: SocketAddr,
    total: usize,
) -> anyhow::Result<HoldFigures> {
    if total == 0 {
        bail!("--hold-requests must be at least 1");
    }
    // The fill may take as long as at least 5,000 requests a second take
    // (however slow the machine), the drain as long again (at least
    // 300 s); the proxy holds each request beyond both, so no request
    // expires while the scenario still waits for it.
    let fill_limit = Duration::from_secs(120).max(Duration::from_secs((total / 5000) as u64));
    let drain_limit = fill_limit.max(Duration::from_secs(300));
    let hold = fill_limit + drain_limit + Duration::from_secs(60);
    let port = free_port()?;
    let proxy: Proc = spawn(
        Command::new(anteroom)
            .args([
                "proxy",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--redis",
                &redis.url(),
            ])
            .args([
                "--queue",
                QUEUE,
                "--hold",
                &format!("{}s", hold.as_secs()),
                "--max-waiting",
                &(total + 1000).to_string(),
            ])
            // The budget counts bodies only; these GETs have none.
            .args(["--max-waiting-bytes", "2GiB"])
            .env("RUST_LOG", crate::setups::anteroom_log()),
    )?;
    // Patient: with a million requests arriving, Redis and this process
    // share two cores with the proxy.
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("connecting to redis")?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("anteroom-bench")
        .query_async::<()>(&mut conn)
        .await?;
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the proxy did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = proxy.pid();
    let rss_idle_kib = rss_kib(pid)?;
    let mut redis_connections_max = proxy_clients(&mut conn).await?;
    let redis_used_idle = anteroom_redis::memory_info(&mut conn).await?.used;

    // Open the connections and send every request; none can be answered yet.
    let sending = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..total.div_ceil(STREAMS_PER_CONNECTION) {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(connection);
        for _ in 0..STREAMS_PER_CONNECTION {
            if tasks.len() == total {
                break;
            }
            let mut sender = sender.clone();
            let (done, errors) = (Arc::clone(&done), Arc::clone(&errors));
            let uri = format!("http://127.0.0.1:{port}/hello");
            tasks.push(tokio::spawn(async move {
                let req = http::Request::get(uri)
                    .body(Full::new(Bytes::new()))
                    .unwrap_or_default();
                let ok = match sender.send_request(req).await {
                    Ok(resp) => resp.status() == 200 && resp.into_body().collect().await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }));
        }
    }
    // Wait until every request waits in Redis, sampling as we go.
    let queued_by = Instant::now();
    let mut rss_peak_kib = rss_idle_kib;
    let mut last_report = Instant::now();
    loop {
        let waiting: usize = redis::cmd("LLEN")
            .arg(anteroom_protocol::Keys::new(QUEUE)?.requests())
            .query_async(&mut conn)
            .await?;
        redis_connections_max = redis_connections_max.max(proxy_clients(&mut conn).await?);
        rss_peak_kib = rss_peak_kib.max(rss_kib(pid)?);
        if waiting >= total {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("  ... {waiting} of {total} waiting in redis");
            last_report = Instant::now();
        }
        if queued_by.elapsed() > fill_limit || done.load(Ordering::Relaxed) > 0 {
            bail!("only {waiting} of {total} requests got queued");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fill = sending.elapsed();
    // Settled: sample once more while all of them wait.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let redis_used_held = anteroom_redis::memory_info(&mut conn).await?.used;
    let rss_settled_kib = rss_kib(pid)?;
    rss_peak_kib = rss_peak_kib.max(rss_settled_kib);
    redis_connections_max = redis_connections_max.max(proxy_clients(&mut conn).await?);

    let drain_start = Instant::now();
    let dispatcher = spawn_dispatcher(anteroom, redis, QUEUE, upstream)?;
    let processes = [
        ("proxy", pid),
        ("dispatcher", dispatcher.pid()),
        ("redis", redis.pid()),
        ("benchmark (client and upstream)", std::process::id()),
    ];
    let cpu_before = processes.map(|(_, pid)| own_cpu_micros(pid));
    while done.load(Ordering::Relaxed) < total {
        if drain_start.elapsed() > drain_limit {
            bail!(
                "drain did not finish: {} of {total}",
                done.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = drain_start.elapsed();
    let drain_cpu = processes
        .iter()
        .zip(cpu_before)
        .map(|(&(name, pid), before)| {
            let used = own_cpu_micros(pid).saturating_sub(before);
            (name, used as f64 / total as f64)
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    drop(proxy);
    Ok(HoldFigures {
        held: total,
        redis_connections_max,
        rss_idle_kib,
        rss_peak_kib,
        rss_settled_kib,
        redis_used_idle,
        redis_used_held,
        fill,
        drain,
        drain_cpu,
        errors: errors.load(Ordering::Relaxed),
    })
}

pub(crate) fn print(f: &HoldFigures) {
    let per_request = (f.rss_peak_kib.saturating_sub(f.rss_idle_kib) * 1024) as f64 / f.held as f64;
    println!(
        "\nHold capacity: {} requests waiting in one proxy, then drained by one dispatcher (RUST_LOG={})",
        f.held,
        crate::setups::anteroom_log()
    );
    println!(
        "  redis connections of the proxy (max seen while holding)  {}",
        f.redis_connections_max
    );
    println!(
        "  proxy RSS idle / peak                       {} KiB / {} KiB",
        f.rss_idle_kib, f.rss_peak_kib
    );
    let settled = (f.rss_settled_kib.saturating_sub(f.rss_idle_kib) * 1024) as f64 / f.held as f64;
    println!("  memory per waiting request (peak)           {per_request:.0} bytes");
    println!(
        "  memory per waiting request (all queued)     {settled:.0} bytes ({} KiB RSS)",
        f.rss_settled_kib
    );
    println!(
        "  redis used_memory idle / held               {} KiB / {} KiB: {:.0} bytes per held request",
        f.redis_used_idle / 1024,
        f.redis_used_held / 1024,
        f.redis_used_held.saturating_sub(f.redis_used_idle) as f64 / f.held as f64
    );
    println!(
        "  fill (sent until all waited in redis)       {:.2} s, {:.0} requests/s",
        f.fill.as_secs_f64(),
        f.held as f64 / f.fill.as_secs_f64()
    );
    println!(
        "  drain                                       {:.2} s, {:.0} requests/s",
        f.drain.as_secs_f64(),
        f.held as f64 / f.drain.as_secs_f64()
    );
    let cpu: Vec<String> = f
        .drain_cpu
        .iter()
        .map(|(name, micros)| {
            // The share of one core the process kept busy while draining.
            let cores = micros * f.held as f64 / 1e6 / f.drain.as_secs_f64();
            format!("{name} {micros:.1} ({cores:.2} cores)")
        })
        .collect();
    println!(
        "  drain CPU per request (µs)                  {}",
        cpu.join(", ")
    );
    println!("  errors                                      {}", f.errors);
}
