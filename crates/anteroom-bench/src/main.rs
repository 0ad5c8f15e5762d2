//! `anteroom-bench`: Anteroom beside nginx in one run.
//!
//! Starts its own redis-server, a small upstream HTTP server, nginx as a
//! keep-alive reverse proxy to that upstream, and Anteroom in two modes
//! (proxy + dispatcher with an in-process handler; proxy + dispatcher
//! forwarding to the same upstream). Drives each with wrk for the same
//! duration and connection count and prints requests/s, p50, p99, errors,
//! the ratio to nginx, and what one request costs each process (CPU
//! microseconds) and Redis (commands), `cost.rs`, and, at one connection,
//! the Redis round trips under a queued request's latency, `floor.rs`. A
//! benchmark, not a test: nothing asserts speed.
//!
//! Run with: `cargo run --release -p anteroom-bench -- --duration 10s --connections 64`
//! (`--scenario stream`: a 1 GiB download, a 1 GiB upload and 1,000 event streams beside
//! nginx, `stream.rs`; `--scenario websocket`: echo round trips and memory per idle socket
//! beside nginx's WebSocket proxying, `websocket.rs`; `--scenario adapters`: the Python,
//! Ruby and Node dispatchers beside gunicorn, uvicorn, Puma and Node's http server,
//! `adapters.rs`; `--scenario chaos --duration 10m`: a soak with two proxies, three
//! dispatchers, Sentinel and a ledger app while processes are killed and the network fails,
//! the books checked at the end, `chaos.rs` in the library)
//! (drives redis-server, nginx and wrk; installs whichever is missing from
//! the distribution's packages unless `--install false`).

mod adapters;
mod cost;
mod floor;
mod hold;
mod scale;
mod setups;
mod stream;
mod tools;
mod websocket;
mod wrk;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Compares Anteroom with nginx as a reverse proxy, side by side.
#[derive(Debug, Parser)]
#[command(name = "anteroom-bench", version, about)]
struct Args {
    /// How long each setup is driven.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 64)]
    connections: usize,

    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,

    /// Also measure at one connection (latency added over the upstream).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    single: bool,

    /// Which scenarios to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,

    /// Bytes of the stream scenario's download.
    #[arg(long, default_value_t = 1 << 30)]
    stream_bytes: u64,

    /// Concurrent event streams in the stream scenario.
    #[arg(long, default_value_t = 1000)]
    streams: usize,

    /// Echo round trips per setup in the WebSocket scenario.
    #[arg(long, default_value_t = 5000)]
    websocket_echoes: usize,

    /// Idle sockets held open per setup in the WebSocket scenario (enough
    /// that the allocators' fixed growth does not dominate the figure).
    #[arg(long, default_value_t = 4000)]
    websockets: usize,

    /// Which adapters the adapters scenario runs (repeat or comma-separate;
    /// default: all four).
    #[arg(long, value_enum, value_delimiter = ',')]
    adapter: Vec<adapters::Adapter>,

    /// Requests to hold in the hold-capacity scenario.
    #[arg(long, default_value_t = 50_000)]
    hold_requests: usize,

    /// Seed of the chaos scenario's fault order (default: from the clock;
    /// every run prints its seed).
    #[arg(long)]
    seed: Option<u64>,

    /// Install missing redis-server, nginx and wrk with apt-get (through
    /// sudo when not root). With false, a missing program is an error.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    install: bool,

    /// `RUST_LOG` of the Rust Anteroom processes the scenarios start (the
    /// chaos soak's come from `ANTEROOM_CHAOS_LOG`; the adapters
    /// scenario's Python, Ruby and Node dispatchers log at their own
    /// level). The default, `error`, writes no line per request, like the
    /// nginx beside them (`access_log off`); Anteroom's own default,
    /// `info`, records a tracing span per request, which costs CPU
    /// (docs/performance.md, "The log level"). The compare and hold
    /// scenarios print it.
    #[arg(long, default_value = "error")]
    anteroom_log: String,
}

/// The benchmark's scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Requests/s and latency beside nginx.
    Compare,
    /// Many requests held with no dispatcher, then drained.
    Hold,
    /// Two queues on one Redis against two queues on two Redis instances.
    Scale,
    /// A large download and server-sent events to many clients, beside nginx.
    Stream,
    /// WebSocket echo round trips and memory per idle socket, beside nginx.
    Websocket,
    /// The Python, Ruby and Node dispatchers beside gunicorn, uvicorn, Puma
    /// and Node's http server (needs what scripts/test.sh installs).
    Adapters,
    /// A soak: mixed load through two proxies and three dispatchers while
    /// processes are killed and restarted, the Redis primary fails over
    /// and the network fails; checks that nothing was lost or run twice
    /// (exit status 1 if anything was). Not part of `all`.
    Chaos,
    /// Every scenario but the chaos soak.
    All,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.scenario == Scenario::Chaos {
        return chaos(&args);
    }
    tools::ensure(args.install)?;
    setups::set_anteroom_log(&args.anteroom_log);
    let anteroom = setups::build_anteroom().context("building the anteroom binary")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let upstream = runtime.block_on(setups::start_upstream())?;
    let redis = anteroom_testkit::LocalRedis::start().context("starting redis-server")?;
    if matches!(args.scenario, Scenario::Hold | Scenario::All) {
        let figures =
            runtime.block_on(hold::run(&anteroom, &redis, upstream, args.hold_requests))?;
        hold::print(&figures);
    }
    if matches!(args.scenario, Scenario::Stream | Scenario::All) {
        let figures = runtime.block_on(stream::run(
            &anteroom,
            &redis,
            args.stream_bytes,
            args.streams,
        ))?;
        stream::print(&figures);
    }
    if matches!(args.scenario, Scenario::Websocket | Scenario::All) {
        let figures = runtime.block_on(websocket::run(
            &anteroom,
            &redis,
            args.websocket_echoes,
            args.websockets,
        ))?;
        websocket::print(&figures);
    }
    if matches!(args.scenario, Scenario::Adapters | Scenario::All) {
        tools::ensure_adapters(args.install)?;
        let figures = adapters::run(
            &anteroom,
            &redis,
            &args.adapter,
            args.duration,
            args.connections,
        )?;
        adapters::print(&figures, args.duration, args.connections);
    }
    if matches!(args.scenario, Scenario::Scale | Scenario::All) {
        let figures = scale::run(&anteroom, args.duration, args.connections)?;
        scale::print(&figures);
    }
    if !matches!(args.scenario, Scenario::Compare | Scenario::All) {
        return Ok(());
    }
    let nginx = setups::Nginx::start(upstream).context("starting nginx")?;
    let inprocess = setups::InProcess::start(&anteroom, &redis)?;
    let forwarding = setups::Forwarding::start(&anteroom, &redis, upstream)?;

    // Each setup's processes, for the cost table: the upstream runs in
    // this process (on one runtime thread; wrk is a process of its own).
    use cost::Children::{Excluded, Included};
    let bench = std::process::id();
    let (proxy, dispatcher) = forwarding.pids();
    let redis_url = redis.url();
    let targets: [(&str, String, cost::Processes, bool); 4] = [
        (
            "upstream (direct)",
            format!("http://{upstream}/hello"),
            vec![("upstream", bench, Excluded)],
            false,
        ),
        (
            "nginx -> upstream",
            nginx.url("/hello"),
            vec![
                ("nginx", nginx.pid(), Included),
                ("upstream", bench, Excluded),
            ],
            false,
        ),
        (
            "anteroom, in-process handler",
            inprocess.url("/hello"),
            vec![
                ("anteroom", inprocess.pid(), Included),
                ("redis", redis.pid(), Included),
            ],
            true,
        ),
        (
            "anteroom -> upstream",
            forwarding.url("/hello"),
            vec![
                ("proxy", proxy, Included),
                ("dispatcher", dispatcher, Included),
                ("upstream", bench, Excluded),
                ("redis", redis.pid(), Included),
            ],
            true,
        ),
    ];
    for (_, url, _, _) in &targets {
        wrk::warm_up(url)?;
    }
    let mut runs = vec![(args.connections, Vec::new(), Vec::new())];
    if args.single {
        runs.push((1, Vec::new(), Vec::new()));
    }
    for (connections, results, costs) in &mut runs {
        for (name, url, processes, uses_redis) in &targets {
            let threads = args.threads.min(*connections);
            let redis_url = uses_redis.then_some(redis_url.as_str());
            let (figures, cost) = cost::measure(processes, redis_url, || {
                wrk::run(url, threads, *connections, args.duration)
            })
            .with_context(|| format!("driving {name}"))?;
            results.push((*name, figures));
            costs.push((*name, cost));
        }
    }
    // The Redis part of the one-connection latency, timed alone.
    // Its failure costs its lines, not the tables measured before it.
    let floor = args
        .single
        .then(|| floor::measure(&redis_url, FLOOR_ROUND_TRIPS))
        .and_then(|measured| {
            measured
                .inspect_err(|err| eprintln!("measuring the Redis floor failed: {err:#}"))
                .ok()
        });
    println!(
        "\nAnteroom beside nginx: {} per setup, wrk, one machine, everything on loopback; Anteroom at RUST_LOG={}, nginx with access_log off",
        humantime::format_duration(args.duration),
        setups::anteroom_log()
    );
    for (connections, results, costs) in &runs {
        wrk::print_table(*connections, results);
        cost::print_table(*connections, costs);
    }
    if let Some(floor) = &floor {
        floor::print(floor);
    }
    drop((inprocess, forwarding, nginx, redis));
    Ok(())
}

/// Round trips of each kind the Redis floor times (a few seconds).
const FLOOR_ROUND_TRIPS: usize = 20_000;

/// The chaos soak with a release build; exits 1 when a check failed.
fn chaos(args: &Args) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let config = anteroom_bench::chaos::ChaosConfig {
        anteroom: setups::build_anteroom().context("building the anteroom binary")?,
        duration: args.duration,
        seed,
        root: std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")),
    };
    println!(
        "chaos soak for {} (seed {seed})",
        humantime::format_duration(args.duration)
    );
    let report = anteroom_bench::chaos::run(&config)?;
    println!("{}", report.render());
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}
