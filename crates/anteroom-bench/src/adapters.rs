//! The dispatchers for other languages beside their ecosystems' usual
//! servers (`--scenario adapters`): the same app in one process, served
//! directly by gunicorn (WSGI, gthread), uvicorn (ASGI), Puma (Rack) and
//! Node's http server, and through `anteroom proxy` and the adapter
//! (`anteroom-wsgi`, `anteroom-asgi`, `anteroom-rack`, `anteroom-node`).
//! Threaded servers get the same thread count on both sides (8); the
//! event-loop servers, which take every connection at once, face an adapter
//! allowed 64 requests at once. Both setups of an app are driven in alternating rounds
//! and the medians printed, with the adapter path's share of the usual
//! server's requests/s (the target is 0.8x).
//!
//! Needs what `bash scripts/test.sh` installs: the project's `.venv`
//! (Flask, FastAPI, gunicorn, uvicorn and clients/python), Ruby with
//! Sinatra and redis-rb, and `clients/node/node_modules` (Express); Puma
//! comes from the distribution's packages (`tools::ensure_adapters`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anteroom_testkit::{LocalRedis, free_port};
use anyhow::{Context, bail};

use crate::setups::{cpu_micros, spawn, spawn_proxy, wait_ready};
use crate::wrk;

/// Threads of the threaded servers and their adapters.
pub(crate) const THREADS: usize = 8;
/// Requests at once of the event-loop adapters (ASGI, Node), whose usual
/// servers take every connection at once.
const AT_ONCE: usize = 64;
/// Alternating rounds per setup; the medians are reported.
const ROUNDS: usize = 3;

/// The adapters, as `--adapter` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Adapter {
    /// anteroom-wsgi (Flask) beside gunicorn.
    Wsgi,
    /// anteroom-asgi (FastAPI) beside uvicorn.
    Asgi,
    /// anteroom-rack (Sinatra) beside Puma.
    Rack,
    /// anteroom-node (Express) beside Node's http server.
    Node,
}

/// One app, served both ways.
struct App {
    /// Which adapter this is.
    which: Adapter,
    /// The app and its interface, e.g. "Flask (WSGI)".
    name: &'static str,
    /// The usual server, e.g. "gunicorn gthread".
    usual: &'static str,
    /// The adapter, e.g. "anteroom-wsgi".
    adapter: &'static str,
    /// How many requests each side runs at once, e.g. "8 threads each".
    places: &'static str,
    /// The usual server listening on the given port.
    direct: fn(&Paths, u16) -> Command,
    /// The adapter (ANTEROOM_REDIS and ANTEROOM_QUEUE are set on it).
    through: fn(&Paths) -> Command,
}

/// Where the apps and the clients' programs are.
struct Paths {
    root: PathBuf,
    venv: PathBuf,
}

impl Paths {
    fn new() -> anyhow::Result<Self> {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).canonicalize()?;
        let venv = std::env::var_os("ANTEROOM_TEST_VENV")
            .map_or_else(|| root.join(".venv"), PathBuf::from);
        let ready = [
            venv.join("bin/anteroom-wsgi"),
            venv.join("bin/gunicorn"),
            venv.join("bin/uvicorn"),
            root.join("clients/node/node_modules/express"),
        ];
        if let Some(missing) = ready.iter().find(|p| !p.exists()) {
            bail!(
                "{} is missing: the adapters scenario runs what `bash scripts/test.sh` installs; run it first",
                missing.display()
            );
        }
        Ok(Self { root, venv })
    }

    fn apps(&self) -> PathBuf {
        self.root.join("tests/apps")
    }

    fn python(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.venv.join("bin").join(program));
        cmd.current_dir(self.apps());
        cmd
    }

    fn ruby(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(self.apps().join("rack"))
            .env("RACK_ENV", "production")
            .env("APP_ENV", "production");
        cmd
    }

    fn node(&self) -> Command {
        let mut cmd = Command::new("node");
        cmd.current_dir(self.root.join("clients/node"))
            .env("NODE_ENV", "production");
        cmd
    }
}

fn apps() -> [App; 4] {
    [
        App {
            which: Adapter::Wsgi,
            name: "Flask (WSGI)",
            usual: "gunicorn gthread",
            adapter: "anteroom-wsgi",
            places: "8 threads each",
            direct: |p, port| {
                let mut cmd = p.python("gunicorn");
                cmd.args(["--worker-class", "gthread", "--workers", "1"])
                    .args(["--threads", &THREADS.to_string(), "--bind"])
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("wsgi_flask:app");
                cmd
            },
            through: |p| {
                let mut cmd = p.python("anteroom-wsgi");
                cmd.args(["--threads", &THREADS.to_string(), "wsgi_flask:app"]);
                cmd
            },
        },
        App {
            which: Adapter::Asgi,
            name: "FastAPI (ASGI)",
            usual: "uvicorn",
            adapter: "anteroom-asgi",
            places: "1 loop; 64 at once",
            direct: |p, port| {
                let mut cmd = p.python("uvicorn");
                cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--no-access-log", "--log-level", "warning"])
                    .args(["--limit-concurrency", "1000", "asgi_fastapi:app"]);
                cmd
            },
            through: |p| {
                let mut cmd = p.python("anteroom-asgi");
                cmd.args(["--threads", &AT_ONCE.to_string(), "asgi_fastapi:app"]);
                cmd
            },
        },
        App {
            which: Adapter::Rack,
            name: "Sinatra (Rack)",
            usual: "Puma",
            adapter: "anteroom-rack",
            places: "8 threads each",
            direct: |p, port| {
                let mut cmd = p.ruby("puma");
                cmd.args([
                    "--threads",
                    &format!("{THREADS}:{THREADS}"),
                    "--workers",
                    "0",
                ])
                .args(["--bind", &format!("tcp://127.0.0.1:{port}"), "--quiet"])
                .args(["--environment", "production", "sinatra.ru"]);
                cmd
            },
            through: |p| {
                let mut cmd = p.ruby("ruby");
                cmd.arg(p.root.join("clients/ruby/exe/anteroom-rack"))
                    .args(["--threads", &THREADS.to_string(), "sinatra.ru"]);
                cmd
            },
        },
        App {
            which: Adapter::Node,
            name: "Express (Node)",
            usual: "node http",
            adapter: "anteroom-node",
            places: "1 loop; 64 at once",
            direct: |p, port| {
                let mut cmd = p.node();
                cmd.args([
                    "-e",
                    "require('http').createServer(require(process.argv[1])).listen(+process.argv[2], '127.0.0.1')",
                ])
                .arg(p.root.join("clients/node/examples/express_app.js"))
                .arg(port.to_string());
                cmd
            },
            through: |p| {
                let mut cmd = p.node();
                cmd.args([
                    "bin/anteroom-node.js",
                    "--concurrency",
                    &AT_ONCE.to_string(),
                ])
                .arg("examples/express_app.js");
                cmd
            },
        },
    ]
}

/// The medians of one setup.
pub(crate) struct Setup {
    pub(crate) requests_per_sec: f64,
    pub(crate) p50: Duration,
    pub(crate) errors: u64,
    /// CPU microseconds per request of each of its processes (with their
    /// children), by name: the usual server; or the adapter, the proxy and
    /// Redis.
    pub(crate) cpu: Vec<(&'static str, f64)>,
}

/// One round of one setup: wrk's figures and the CPU microseconds per
/// request of each watched process.
struct Round {
    wrk: wrk::Figures,
    cpu: Vec<(&'static str, f64)>,
}

/// Drives `url` for `duration` at `connections`, reading the CPU time of
/// each of `watched` (name, pid) before and after.
fn round(
    url: &str,
    connections: usize,
    duration: Duration,
    watched: &[(&'static str, u32)],
) -> anyhow::Result<Round> {
    let before: Vec<u64> = watched.iter().map(|&(_, pid)| cpu_micros(pid)).collect();
    let wrk = wrk::run(url, 2.min(connections), connections, duration)
        .with_context(|| format!("driving {url}"))?;
    let requests = (wrk.requests_per_sec * duration.as_secs_f64()).max(1.0);
    let cpu = watched
        .iter()
        .zip(before)
        .map(|(&(name, pid), before)| {
            (
                name,
                cpu_micros(pid).saturating_sub(before) as f64 / requests,
            )
        })
        .collect();
    Ok(Round { wrk, cpu })
}

/// One app's two setups.
pub(crate) struct Figures {
    pub(crate) name: &'static str,
    pub(crate) usual: &'static str,
    pub(crate) adapter: &'static str,
    pub(crate) places: &'static str,
    pub(crate) direct: Setup,
    pub(crate) through: Setup,
}

/// Runs every app of `only` (every app when empty) both ways, `ROUNDS`
/// alternating rounds of `duration` each, at `connections`.
pub(crate) fn run(
    anteroom: &Path,
    redis: &LocalRedis,
    only: &[Adapter],
    duration: Duration,
    connections: usize,
) -> anyhow::Result<Vec<Figures>> {
    let paths = Paths::new()?;
    let mut all = Vec::new();
    for app in apps() {
        if !only.is_empty() && !only.contains(&app.which) {
            continue;
        }
        let port = free_port()?;
        let direct = spawn(&mut (app.direct)(&paths, port))
            .with_context(|| format!("starting {}", app.usual))?;
        wait_ready(port, "/hello?name=bench")
            .with_context(|| format!("{} under {}", app.name, app.usual))?;
        let queue = format!("bench-{}", app.adapter);
        let proxy_port = free_port()?;
        let proxy = spawn_proxy(anteroom, redis, &queue, proxy_port)?;
        let adapter = spawn(
            (app.through)(&paths)
                .env("ANTEROOM_REDIS", redis.url())
                .env("ANTEROOM_QUEUE", &queue)
                .env("ANTEROOM_LOG", "warning"),
        )
        .with_context(|| format!("starting {}", app.adapter))?;
        wait_ready(proxy_port, "/hello?name=bench")
            .with_context(|| format!("{} through {}", app.name, app.adapter))?;
        let urls = [
            format!("http://127.0.0.1:{port}/hello?name=bench"),
            format!("http://127.0.0.1:{proxy_port}/hello?name=bench"),
        ];
        for url in &urls {
            wrk::warm_up(url)?;
        }
        let watched = [
            vec![(app.usual, direct.pid())],
            vec![
                (app.adapter, adapter.pid()),
                ("proxy", proxy.pid()),
                ("Redis", redis.pid()),
            ],
        ];
        let mut rounds = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for ((url, watched), figures) in urls.iter().zip(&watched).zip(&mut rounds) {
                figures.push(round(url, connections, duration, watched)?);
            }
        }
        let [direct, through] = rounds.map(|figures| median(&figures));
        all.push(Figures {
            name: app.name,
            usual: app.usual,
            adapter: app.adapter,
            places: app.places,
            direct,
            through,
        });
    }
    Ok(all)
}

fn median(rounds: &[Round]) -> Setup {
    let mid = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let cpu = rounds[0]
        .cpu
        .iter()
        .enumerate()
        .map(|(at, &(name, _))| (name, mid(rounds.iter().map(|r| r.cpu[at].1).collect())))
        .collect();
    Setup {
        requests_per_sec: mid(rounds.iter().map(|r| r.wrk.requests_per_sec).collect()),
        p50: Duration::from_secs_f64(mid(rounds
            .iter()
            .map(|r| r.wrk.p50.as_secs_f64())
            .collect())),
        errors: rounds.iter().map(|r| r.wrk.errors).sum(),
        cpu,
    }
}

pub(crate) fn print(figures: &[Figures], duration: Duration, connections: usize) {
    println!(
        "\nAdapters beside their usual servers: one process each, {connections} connections, \
         median of {ROUNDS} alternating rounds of {} per setup",
        humantime::format_duration(duration)
    );
    println!(
        "  {:<16} {:<19} {:<17} {:>11} {:>9} {:<14} {:>11} {:>9} {:>7} {:>8}",
        "app",
        "at once",
        "usual server",
        "requests/s",
        "p50",
        "adapter",
        "requests/s",
        "p50",
        "errors",
        "x usual"
    );
    for f in figures {
        println!(
            "  {:<16} {:<19} {:<17} {:>11.0} {:>7.2}ms {:<14} {:>11.0} {:>7.2}ms {:>7} {:>8.2}",
            f.name,
            f.places,
            f.usual,
            f.direct.requests_per_sec,
            f.direct.p50.as_secs_f64() * 1000.0,
            f.adapter,
            f.through.requests_per_sec,
            f.through.p50.as_secs_f64() * 1000.0,
            f.direct.errors + f.through.errors,
            f.through.requests_per_sec / f.direct.requests_per_sec
        );
    }
    println!(
        "\nCPU microseconds per request, each process with its children (medians; /proc/<pid>/stat):"
    );
    let list = |cpu: &[(&str, f64)]| {
        cpu.iter()
            .map(|(name, micros)| format!("{name} {micros:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for f in figures {
        let through: f64 = f.through.cpu.iter().map(|(_, micros)| micros).sum();
        println!(
            "  {:<16} usual: {:<28} adapter path: {} (together {through:.0})",
            f.name,
            list(&f.direct.cpu),
            list(&f.through.cpu),
        );
    }
}
