//! `--scenario chaos`: a soak with everything failing at once, and the
//! books checked at the end.
//!
//! Two proxies and three dispatchers, in front of a real app that keeps a
//! ledger of every execution (`tests/apps/ledger_app.py`), on Redis under
//! Sentinel (a primary, a replica, three sentinels). Proxy `a` and
//! dispatchers `d1` and `d3` reach Redis through a relay
//! ([`anteroom_testkit::relay`]: a TCP load balancer in front of
//! Sentinel, asking it for the primary at each connection; one for the
//! proxy, one for the two dispatchers), where the network faults are
//! injected; proxy `b` and dispatcher `d2` find the primary through the
//! sentinels themselves. Proxy `a` and dispatcher `d1` live through the
//! whole run, so the faults and the memory check meet in them. Steady
//! mixed load runs through both proxies: GETs, streamed GETs, POSTs with
//! and without `Idempotency-Key`, and uploads larger than the proxy's
//! `--body-buffer` (their bodies stream through Redis). Meanwhile a
//! scheduler (seeded, so a run can be repeated) goes through every fault
//! in a random order, again and again:
//! - SIGKILL a dispatcher (`d2` or `d3`), started again a second later;
//! - upgrade proxy `b` (the `examples/deploy/upgrade_proxy.sh` playbook);
//! - restart the app (SIGTERM, as a deploy stops it, then start again);
//! - SIGKILL the Redis primary; the sentinels promote the replica, and a
//!   new replica is started for the next time;
//! - a 10 s partition between one relay's processes (proxy `a`, or `d1`
//!   and `d3`) and Redis;
//! - 200 ms more latency each way for 5 s;
//! - 5 % of segments late by a retransmission timeout for 5 s;
//! - lost replies: to proxy `a`'s next enqueue or next reply of any kind,
//!   and to `d1`'s or `d3`'s next pull, completion or stream push, reaper
//!   claim, or any reply;
//! - a pause (`anteroom pause --wait`, held 1 s, then `anteroom resume`)
//!   with the reply to the next pause acknowledgement lost.
//!
//! At the end it checks and prints: every request answered (no transport
//! error, no client timeout), none with 504 (a 504 waited out the whole
//! hold budget, longer than any outage made here), at least 95 % with 2xx;
//! every 2xx answer's execution in the app's ledger; every POST answered
//! 2xx carried out exactly once, and no POST carried out twice; no request
//! answered 503 ever run; no execution that started after its client's
//! 504; safe requests (GET) never answered 5xx; every 2xx body the
//! request's own; every kind of fault injected, and replies lost on both
//! relays; the count of each status; the RSS of the long-lived processes
//! (`a`, `d1`, the three sentinels) after warm-up and at the end (at most
//! 10 % growth, checked in runs of 5 minutes or more: over the test's one
//! minute it is the allocators settling, printed). A streamed response
//! cut short after its head is counted apart when a dispatcher or the
//! Redis primary was killed while it ran (its dispatcher died mid-stream,
//! or a chunk went with the primary), or the dispatchers were cut off
//! from Redis longer than their heartbeat TTL (reaped as dead, their
//! streams run again and so aborted): a reverse proxy can only cut such a
//! response short, as nginx does when its upstream dies mid-body. One cut
//! short with no such kill during it is a finding.
//! `anteroom-bench --scenario chaos --duration 10m`
//! runs it; the test `chaos::a_minute_of_chaos_loses_nothing` runs 60 s.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anteroom_testkit::relay::Relay;
use anteroom_testkit::sentinel::{LocalSentinel, primary_port_at};
use anteroom_testkit::{LocalRedis, free_port};
use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The queue every part serves.
const QUEUE: &str = "chaos";
/// The proxies' hold budget.
const HOLD: Duration = Duration::from_secs(30);
/// How long a client waits for an answer before counting the request as
/// unanswered: the hold budget and then some.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(45);
/// Concurrent clients.
const CLIENTS: usize = 8;
/// Each client's pause between requests.
const PACE: Duration = Duration::from_millis(10);
/// Bytes of an upload: over the proxy's default `--body-buffer` (256 KiB),
/// so the body streams to the dispatcher through Redis.
const UPLOAD: usize = 512 * 1024;
/// Bytes of a streamed response (the app's 8 chunks of 8 KiB).
const STREAMED: usize = 65_536;
/// How much later than its client's 504 an execution may start and still
/// count as started before it: the dispatcher checked the deadline, then
/// forwarded to the app (a loopback hop).
const START_SLACK_MS: u64 = 250;
/// How the faults name the relayed dispatchers.
const DISPATCHERS_RELAYED: &str = "dispatchers d1 and d3";
/// Most RSS growth allowed for a long-lived process, in percent.
const RSS_GROWTH: f64 = 10.0;
/// Runs at least this long check the RSS growth (shorter ones print it).
const RSS_CHECKED_FROM: Duration = Duration::from_secs(300);

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// The `anteroom` binary.
    pub anteroom: PathBuf,
    /// How long the load and the faults go on (at least one whole round
    /// of faults: a short run may go on a little longer).
    pub duration: Duration,
    /// Seed of the fault order and the gaps between faults.
    pub seed: u64,
    /// The repository's root (for the app and the playbook).
    pub root: PathBuf,
}

/// The kinds of request the load sends, in its mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Get,
    Stream,
    Post,
    KeyedPost,
    Upload,
}

const MIX: [Kind; 10] = [
    Kind::Get,
    Kind::Post,
    Kind::KeyedPost,
    Kind::Get,
    Kind::Stream,
    Kind::Get,
    Kind::Post,
    Kind::KeyedPost,
    Kind::Get,
    Kind::Upload,
];

impl Kind {
    fn safe(self) -> bool {
        matches!(self, Kind::Get | Kind::Stream)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Get => "GET",
            Kind::Stream => "streamed GET",
            Kind::Post => "POST",
            Kind::KeyedPost => "POST with Idempotency-Key",
            Kind::Upload => "upload (POST with Idempotency-Key, 512 KiB, streamed)",
        }
    }
}

/// One client request and what became of it.
#[derive(Debug, Clone)]
struct Outcome {
    id: String,
    kind: Kind,
    /// The status, or why there was none.
    status: Result<u16, String>,
    /// The body was the request's own (for a 2xx).
    body_ok: bool,
    /// A streamed response whose head came and whose body was cut short
    /// (its dispatcher killed mid-stream): why.
    cut: Option<String>,
    answered_ms: u64,
    /// When it was answered, from the start of the soak.
    at: Duration,
    took: Duration,
}

/// The faults the scheduler injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    KillDispatcher,
    UpgradeProxy,
    RestartApp,
    KillRedisPrimary,
    Partition,
    Latency,
    Loss,
    LostReplies,
    Pause,
}

const FAULTS: [Fault; 9] = [
    Fault::KillDispatcher,
    Fault::UpgradeProxy,
    Fault::RestartApp,
    Fault::KillRedisPrimary,
    Fault::Partition,
    Fault::Latency,
    Fault::Loss,
    Fault::LostReplies,
    Fault::Pause,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillDispatcher => "SIGKILL a dispatcher, start it again",
            Fault::UpgradeProxy => "upgrade a proxy (handoff)",
            Fault::RestartApp => "restart the app",
            Fault::KillRedisPrimary => "SIGKILL the Redis primary (Sentinel failover)",
            Fault::Partition => "10 s partition from Redis",
            Fault::Latency => "200 ms latency each way, 5 s",
            Fault::Loss => "5 % of segments late (loss), 5 s",
            Fault::LostReplies => "lost replies (enqueue, pull, completion, claim, any)",
            Fault::Pause => "pause 1 s, a pause acknowledgement's reply lost",
        }
    }
}

/// What a soak found.
#[derive(Debug, Default)]
pub struct ChaosReport {
    duration: Duration,
    seed: u64,
    faults: Vec<(Duration, Fault, String)>,
    outcomes: Vec<Outcome>,
    /// Executions per request id (from the app's ledger).
    runs: HashMap<String, Vec<u64>>,
    /// POST effects per request id.
    effects: HashMap<String, usize>,
    rss: Vec<(String, u64, u64)>,
    /// Replies the relays lost: proxy `a`'s, and `d1`'s and `d3`'s.
    lost: (usize, usize),
    violations: Vec<String>,
    logs: PathBuf,
}

impl ChaosReport {
    /// True when every check held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// What failed, one line each.
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// The report as printed: faults, totals, checks, RSS.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nChaos soak: {} of load and faults (seed {}), 2 proxies, 3 dispatchers, \
             Redis under Sentinel, the ledger app",
            humantime::format_duration(self.duration),
            self.seed
        );
        let mut by_fault: HashMap<Fault, usize> = HashMap::new();
        for (_, fault, _) in &self.faults {
            *by_fault.entry(*fault).or_default() += 1;
        }
        let _ = writeln!(out, "faults injected: {}", self.faults.len());
        for fault in FAULTS {
            let _ = writeln!(
                out,
                "  {:>4}  {}",
                by_fault.get(&fault).copied().unwrap_or(0),
                fault.name()
            );
        }
        let _ = writeln!(
            out,
            "replies lost on the network: {} to proxy a, {} to dispatchers d1 and d3",
            self.lost.0, self.lost.1
        );
        let _ = writeln!(out, "requests: {}", self.outcomes.len());
        let mut kinds: Vec<(Kind, usize)> = count_by(&self.outcomes, |o| o.kind);
        kinds.sort();
        for (kind, n) in kinds {
            let _ = writeln!(out, "  {n:>7}  {}", kind.name());
        }
        let _ = writeln!(out, "answers:");
        let mut statuses: Vec<(String, usize)> = count_by(&self.outcomes, |o| match &o.status {
            Ok(status) => status.to_string(),
            Err(_) => "no answer".to_owned(),
        });
        statuses.sort();
        for (status, n) in statuses {
            let _ = writeln!(out, "  {n:>7}  {status}");
        }
        let cut = self.outcomes.iter().filter(|o| o.cut.is_some()).count();
        let _ = writeln!(
            out,
            "streamed responses cut mid-body (a dispatcher or the primary killed, or the \
             dispatchers cut off, meanwhile): {cut}"
        );
        for o in self
            .outcomes
            .iter()
            .filter(|o| !matches!(o.status, Ok(200..=299)) || o.cut.is_some())
            .take(20)
        {
            let status = match &o.status {
                Ok(status) => status.to_string(),
                Err(_) => "no answer".to_owned(),
            };
            let _ = writeln!(
                out,
                "  {} {}: {status}{} at {:.1?}, after {:.1?}",
                o.kind.name(),
                o.id,
                if o.cut.is_some() {
                    " (cut mid-body)"
                } else {
                    ""
                },
                o.at,
                o.took
            );
        }
        if let Some(o) = self.outcomes.iter().max_by_key(|o| o.took) {
            let status = match &o.status {
                Ok(status) => status.to_string(),
                Err(_) => "no answer".to_owned(),
            };
            let _ = writeln!(
                out,
                "longest answer: {:.1?} ({} {}, {status}, answered at {:.1?})",
                o.took,
                o.kind.name(),
                o.id,
                o.at
            );
        }
        let over = self.outcomes.iter().filter(|o| o.took > HOLD).count();
        let _ = writeln!(
            out,
            "answers later than the hold budget ({}): {over}",
            humantime::format_duration(HOLD)
        );
        let posts_2xx = self
            .outcomes
            .iter()
            .filter(|o| !o.kind.safe() && matches!(o.status, Ok(200..=299)))
            .count();
        let twice = self.effects.values().filter(|n| **n > 1).count();
        let _ = writeln!(
            out,
            "POSTs answered 2xx: {posts_2xx}; carried out twice: {twice}; executions \
             recorded: {}",
            self.runs.values().map(Vec::len).sum::<usize>()
        );
        for (name, start, end) in &self.rss {
            let _ = writeln!(
                out,
                "RSS of {name}: {:.1} MiB after warm-up, {:.1} MiB at the end ({:+.1} %)",
                mib(*start),
                mib(*end),
                growth(*start, *end)
            );
        }
        if self.violations.is_empty() {
            let _ = writeln!(
                out,
                "checks: every request answered, none with 504, 95 % or more 2xx; every 2xx \
                 answer in the ledger; every 2xx POST carried out exactly once, none twice; \
                 no 503'd request run; no execution after its client's 504; no safe request \
                 answered 5xx; every body its request's own; every stream cut short during a \
                 kill or a partition of the dispatchers; every fault injected, replies lost on both relays; RSS within \
                 {RSS_GROWTH} % (runs of 5 minutes or more): all held"
            );
        } else {
            let _ = writeln!(
                out,
                "FAILED ({} findings; process logs in {}):",
                self.violations.len(),
                self.logs.display()
            );
            for v in self.violations.iter().take(40) {
                let _ = writeln!(out, "  - {v}");
            }
        }
        out
    }
}

fn count_by<K: std::hash::Hash + Eq>(
    outcomes: &[Outcome],
    key: impl Fn(&Outcome) -> K,
) -> Vec<(K, usize)> {
    let mut counts: HashMap<K, usize> = HashMap::new();
    for o in outcomes {
        *counts.entry(key(o)).or_default() += 1;
    }
    counts.into_iter().collect()
}

#[allow(clippy::cast_precision_loss)]
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[allow(clippy::cast_precision_loss)]
fn growth(start: u64, end: u64) -> f64 {
    if start == 0 {
        return 0.0;
    }
    (end as f64 - start as f64) * 100.0 / start as f64
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A process this soak started; SIGKILLed when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(program: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", log_filter())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `grace` for it to exit (SIGKILL after).
    async fn stop(&mut self, grace: Duration) {
        signal(self.pid(), "TERM");
        let started = Instant::now();
        while started.elapsed() < grace {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `RUST_LOG` of every process the soak starts: `ANTEROOM_CHAOS_LOG`
/// (e.g. `info,anteroom_dispatcher=debug` to follow a finding), else
/// `warn`.
fn log_filter() -> String {
    std::env::var("ANTEROOM_CHAOS_LOG").unwrap_or_else(|_| "warn".to_owned())
}

/// Sends SIGNAL to `pid` with kill(1) (no `unsafe` here).
fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.contains(") Z "))
}

/// Resident set size of `pid`, in KiB (0 when it cannot be read).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn until_port(port: u16, within: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if started.elapsed() > within {
            bail!("nothing listens on port {port} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Everything the soak runs, and what the scheduler changes.
struct Rig {
    config: ChaosConfig,
    logs: PathBuf,
    ledger: PathBuf,
    sentinel: LocalSentinel,
    /// Replicas started after failovers.
    replicas: Vec<LocalRedis>,
    proxy_relay: Relay,
    dispatcher_relay: Relay,
    app_port: u16,
    app: Proc,
    proxy_a: Proc,
    /// Proxy `b`: the process this soak started, then the pid of the one
    /// each upgrade started.
    proxy_b: Option<Proc>,
    proxy_b_pid: u32,
    proxy_b_port: u16,
    proxy_a_port: u16,
    dispatchers: [Proc; 3],
    /// How many times lost replies were injected so far.
    lost_replies_injected: usize,
}

impl Rig {
    async fn start(config: ChaosConfig) -> anyhow::Result<Self> {
        let logs = std::env::temp_dir().join(format!(
            "anteroom-chaos-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&logs)?;
        let ledger = logs.join("ledger.log");
        let sentinel = tokio::task::spawn_blocking(LocalSentinel::start).await?;
        let ask = sentinel.sentinel_ports()[0];
        let to_primary: anteroom_testkit::relay::Target = Arc::new(move || primary_port_at(ask));
        let proxy_relay = Relay::start_to(Arc::clone(&to_primary)).await;
        let dispatcher_relay = Relay::start_to(to_primary).await;
        let app_port = free_port()?;
        let app = start_app(&config.root, app_port, &ledger, &logs)?;
        until_port(app_port, Duration::from_secs(20)).await?;
        let (proxy_a_port, proxy_b_port) = (free_port()?, free_port()?);
        let sentinel_url = sentinel.url();
        let proxy_a = Proc::spawn(
            &config.anteroom,
            &proxy_args(&proxy_relay.url(), proxy_a_port),
            &logs.join("proxy-a.log"),
        )?;
        let proxy_b = Proc::spawn(
            &config.anteroom,
            &proxy_args(&sentinel_url, proxy_b_port),
            &logs.join("proxy-b.log"),
        )?;
        let upstream = format!("http://127.0.0.1:{app_port}");
        let dispatchers = [
            Proc::spawn(
                &config.anteroom,
                &dispatcher_args(&dispatcher_relay.url(), &upstream, "d1"),
                &logs.join("d1.log"),
            )?,
            Proc::spawn(
                &config.anteroom,
                &dispatcher_args(&sentinel_url, &upstream, "d2"),
                &logs.join("d2.log"),
            )?,
            Proc::spawn(
                &config.anteroom,
                &dispatcher_args(&dispatcher_relay.url(), &upstream, "d3"),
                &logs.join("d3.log"),
            )?,
        ];
        until_port(proxy_a_port, Duration::from_secs(20)).await?;
        until_port(proxy_b_port, Duration::from_secs(20)).await?;
        let proxy_b_pid = proxy_b.pid();
        Ok(Self {
            config,
            logs,
            ledger,
            sentinel,
            replicas: Vec::new(),
            proxy_relay,
            dispatcher_relay,
            app_port,
            app,
            proxy_a,
            proxy_b: Some(proxy_b),
            proxy_b_pid,
            proxy_b_port,
            proxy_a_port,
            dispatchers,
            lost_replies_injected: 0,
        })
    }

    fn upstream(&self) -> String {
        format!("http://127.0.0.1:{}", self.app_port)
    }

    /// Where dispatcher `d{index + 1}` reaches Redis: `d1` and `d3` through
    /// the relay, `d2` through the sentinels.
    fn dispatcher_redis(&self, index: usize) -> String {
        if index != 1 {
            self.dispatcher_relay.url()
        } else {
            self.sentinel.url()
        }
    }

    /// Injects `fault`; returns what it did.
    async fn inject(&mut self, fault: Fault, rng: &mut StdRng) -> anyhow::Result<String> {
        let relay = |rng: &mut StdRng| rng.random_bool(0.5);
        match fault {
            Fault::KillDispatcher => {
                let index = rng.random_range(1..3);
                let name = format!("d{}", index + 1);
                let pid = self.dispatchers[index].pid();
                self.dispatchers[index].kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.dispatchers[index] = Proc::spawn(
                    &self.config.anteroom,
                    &dispatcher_args(&self.dispatcher_redis(index), &self.upstream(), &name),
                    &self.logs.join(format!("{name}.log")),
                )?;
                Ok(format!(
                    "{name} (pid {pid}) killed, started again 1 s later"
                ))
            }
            Fault::UpgradeProxy => self.upgrade_proxy_b().await,
            Fault::RestartApp => {
                let started = Instant::now();
                self.app.stop(Duration::from_secs(15)).await;
                self.app = start_app(&self.config.root, self.app_port, &self.ledger, &self.logs)?;
                until_port(self.app_port, Duration::from_secs(20)).await?;
                Ok(format!("the app down for {:.0?}", started.elapsed()))
            }
            Fault::KillRedisPrimary => self.kill_redis_primary().await,
            Fault::Partition => {
                let (relay, name) = self.relay(relay(rng));
                relay.set_partitioned(true);
                tokio::time::sleep(Duration::from_secs(10)).await;
                relay.set_partitioned(false);
                Ok(format!("{name} cut off from Redis for 10 s, healed"))
            }
            Fault::Latency => {
                let (relay, name) = self.relay(relay(rng));
                relay.set_latency(Duration::from_millis(200));
                tokio::time::sleep(Duration::from_secs(5)).await;
                relay.set_latency(Duration::ZERO);
                Ok(format!("{name}: 200 ms each way for 5 s"))
            }
            Fault::Loss => {
                let (relay, name) = self.relay(relay(rng));
                relay.set_slow_every(20);
                tokio::time::sleep(Duration::from_secs(5)).await;
                relay.set_slow_every(0);
                Ok(format!("{name}: every 20th segment 200 ms late for 5 s"))
            }
            Fault::LostReplies => {
                // A command whose effect outlives its lost reply
                // (docs/protocol.md, "Lost replies"), for each relay:
                // proxy a's next enqueue or any next reply (a take of its
                // reply list, a heartbeat, a clock reading); d1's or d3's
                // next pull, completion or stream push, reaper claim (only
                // after a first injection: a claim waits for a dispatcher
                // to die, so the run's only injection could miss it), or
                // any next reply.
                let proxy = if rng.random_bool(0.5) {
                    self.proxy_relay.lose_reply_to(b"LPUSH");
                    "enqueue"
                } else {
                    self.proxy_relay.lose_next_reply();
                    "reply of any kind"
                };
                let kinds = if self.lost_replies_injected == 0 {
                    3
                } else {
                    4
                };
                self.lost_replies_injected += 1;
                let dispatcher = match rng.random_range(0..kinds) {
                    0 => {
                        self.dispatcher_relay.lose_reply_to(b"LMOVE");
                        "pull"
                    }
                    1 => {
                        self.dispatcher_relay.lose_reply_to(b"RPUSH");
                        "completion or stream push"
                    }
                    2 => {
                        self.dispatcher_relay.lose_next_reply();
                        "reply of any kind"
                    }
                    _ => {
                        // The reaping script's first line (the claim).
                        self.dispatcher_relay
                            .lose_reply_to(b"if redis.call('EXISTS'");
                        "reaper claim"
                    }
                };
                let before = (self.proxy_relay.lost(), self.dispatcher_relay.lost());
                let armed = Instant::now();
                while armed.elapsed() < Duration::from_secs(3)
                    && (self.proxy_relay.lost() == before.0
                        || self.dispatcher_relay.lost() == before.1)
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let fired = |lost: usize, before: usize| {
                    if lost > before {
                        "lost"
                    } else {
                        "armed, not yet lost"
                    }
                };
                Ok(format!(
                    "the reply to proxy a's next {proxy} {}, to d1's or d3's next {dispatcher} {}",
                    fired(self.proxy_relay.lost(), before.0),
                    fired(self.dispatcher_relay.lost(), before.1)
                ))
            }
            Fault::Pause => self.pause().await,
        }
    }

    fn relay(&self, proxy: bool) -> (&Relay, &'static str) {
        if proxy {
            (&self.proxy_relay, "proxy a")
        } else {
            (&self.dispatcher_relay, DISPATCHERS_RELAYED)
        }
    }

    /// Pauses the queue as an operator does (`anteroom pause --wait`: every
    /// live dispatcher acknowledges and finishes what it holds), with the
    /// reply to the next acknowledgement through the dispatchers' relay
    /// lost; holds it 1 s; resumes. A pause not acknowledged within 20 s
    /// is an error: the soak stops.
    async fn pause(&mut self) -> anyhow::Result<String> {
        let started = Instant::now();
        let before = self.dispatcher_relay.lost();
        self.dispatcher_relay.lose_reply_to(b"\"paused\":true");
        let redis = self.sentinel.url();
        let anteroom = |args: &[&str]| {
            let mut command = tokio::process::Command::new(&self.config.anteroom);
            command
                .args(args)
                .args(["--redis", &redis, "--queue", QUEUE])
                .env("RUST_LOG", log_filter())
                .stdin(Stdio::null())
                .kill_on_drop(true);
            command
        };
        // --ttl: the queue resumes by itself should this soak stop here.
        let paused = tokio::time::timeout(
            Duration::from_secs(25),
            anteroom(&[
                "pause",
                "--wait",
                "--quiet",
                "--timeout",
                "20s",
                "--ttl",
                "60s",
            ])
            .output(),
        )
        .await
        .context("anteroom pause --wait did not return within 25 s")??;
        let acknowledged = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let resumed = anteroom(&["resume"]).output().await?;
        if !paused.status.success() || !resumed.status.success() {
            bail!(
                "pause or resume failed: {}{}",
                String::from_utf8_lossy(&paused.stderr),
                String::from_utf8_lossy(&resumed.stderr)
            );
        }
        Ok(format!(
            "paused, acknowledged by every dispatcher after {acknowledged:.1?} (an \
             acknowledgement's reply {}), resumed 1 s later",
            if self.dispatcher_relay.lost() > before {
                "lost"
            } else {
                "armed, not lost"
            }
        ))
    }

    /// The upgrade playbook, as an operator runs it: a new proxy `b` on
    /// the same address, then the old one stopped.
    async fn upgrade_proxy_b(&mut self) -> anyhow::Result<String> {
        let started = Instant::now();
        let old = self.proxy_b_pid;
        let script = self.config.root.join("examples/deploy/upgrade_proxy.sh");
        let mut command = tokio::process::Command::new(script);
        command
            .arg(old.to_string())
            .arg("--")
            .arg(&self.config.anteroom)
            .args(proxy_args(&self.sentinel.url(), self.proxy_b_port))
            .env("ANTEROOM", &self.config.anteroom)
            .env("ANTEROOM_REDIS", self.sentinel.url())
            .env("ANTEROOM_QUEUE", QUEUE)
            .env("LOG", self.logs.join("proxy-b.log"))
            .env("RUST_LOG", log_filter())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .context("the upgrade playbook did not finish within 120 s")??;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "the upgrade playbook failed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let new: u32 = stdout
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .context("the playbook printed no pid")?;
        if let Some(mut first) = self.proxy_b.take() {
            // Exited by now (the playbook waited for it); reaped here.
            first.stop(Duration::from_secs(5)).await;
        }
        self.proxy_b_pid = new;
        Ok(format!(
            "proxy b upgraded (pid {old} -> {new}) in {:.1?}",
            started.elapsed()
        ))
    }

    /// SIGKILLs the primary the sentinels name, waits for them to promote
    /// another, and starts a new replica of it (so the next failover has
    /// one to promote).
    async fn kill_redis_primary(&mut self) -> anyhow::Result<String> {
        let ask = self.sentinel.sentinel_ports()[0];
        let old = tokio::task::spawn_blocking(move || primary_port_at(ask))
            .await?
            .context("the sentinels name no primary")?;
        let killed = Instant::now();
        let server = [&mut self.sentinel.primary, &mut self.sentinel.replica]
            .into_iter()
            .chain(self.replicas.iter_mut())
            .find(|s| s.port() == old)
            .context("the primary is none of the soak's servers")?;
        server.kill();
        let new = loop {
            if let Some(port) = tokio::task::spawn_blocking(move || primary_port_at(ask))
                .await?
                .filter(|p| *p != old)
            {
                break port;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("no failover within 60 s of killing the primary");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let failover = killed.elapsed();
        // Ready for the next failover: synced, and known to the sentinels.
        // A replica not ready within 30 s is replaced once; the error then
        // says what it and the sentinels reported.
        let mut attempt = 0;
        let port = loop {
            attempt += 1;
            let replica = tokio::task::spawn_blocking(move || {
                LocalRedis::start_with_args(&["--replicaof", "127.0.0.1", &new.to_string()])
            })
            .await??;
            let port = replica.port();
            self.replicas.push(replica);
            let ready = Instant::now();
            let looked = loop {
                let looked = tokio::task::spawn_blocking(move || {
                    (
                        anteroom_testkit::sentinel::ask(port, "INFO replication"),
                        anteroom_testkit::sentinel::ask(ask, "SENTINEL replicas mymaster"),
                    )
                })
                .await?;
                if looked.0.contains("master_link_status:up")
                    && looked.1.contains(&port.to_string())
                {
                    break None;
                }
                if ready.elapsed() > Duration::from_secs(30) {
                    break Some(looked);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            match looked {
                None => break port,
                Some((info, known)) if attempt >= 2 => bail!(
                    "the new replica (port {port}) not ready within 30 s, twice; it reports \
                     {info:?}; the sentinels list as replicas of :{new}: {known:?}"
                ),
                Some(_) => {
                    println!("the new replica :{port} not ready within 30 s; starting another");
                    if let Some(mut stuck) = self.replicas.pop() {
                        stuck.kill();
                    }
                }
            }
        };
        Ok(format!(
            "primary :{old} killed; :{new} promoted after {failover:.1?}; new replica :{port}"
        ))
    }

    async fn stop(&mut self) {
        for d in &mut self.dispatchers {
            d.stop(Duration::from_secs(10)).await;
        }
        self.proxy_a.stop(Duration::from_secs(10)).await;
        if let Some(mut b) = self.proxy_b.take() {
            b.stop(Duration::from_secs(10)).await;
        } else {
            signal(self.proxy_b_pid, "TERM");
            let started = Instant::now();
            while alive(self.proxy_b_pid) && started.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if alive(self.proxy_b_pid) {
                signal(self.proxy_b_pid, "KILL");
            }
        }
        self.app.stop(Duration::from_secs(10)).await;
    }
}

impl Drop for Rig {
    /// Proxy `b` after an upgrade is no child of this process (the
    /// playbook started it): killed here on every way out, an error's too.
    /// The other processes are [`Proc`]s, killed when dropped.
    fn drop(&mut self) {
        if self.proxy_b.is_none() && alive(self.proxy_b_pid) {
            signal(self.proxy_b_pid, "KILL");
        }
    }
}

fn start_app(root: &Path, port: u16, ledger: &Path, logs: &Path) -> anyhow::Result<Proc> {
    let app = root.join("tests/apps/ledger_app.py");
    Proc::spawn(
        Path::new("python3"),
        &[
            app.display().to_string(),
            port.to_string(),
            ledger.display().to_string(),
        ],
        &logs.join("app.log"),
    )
}

/// A proxy as docs/operations.md says to run one under Sentinel:
/// `--durable` (a push is on a replica before it counts) and
/// `--enqueue-timeout` (a push cut off by a failover is tried again, with
/// `dedupe`).
fn proxy_args(redis: &str, port: u16) -> Vec<String> {
    [
        "proxy",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--redis",
        redis,
        "--queue",
        QUEUE,
        "--hold",
        &format!("{}s", HOLD.as_secs()),
        "--enqueue-timeout",
        "10s",
        "--durable",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn dispatcher_args(redis: &str, upstream: &str, label: &str) -> Vec<String> {
    [
        "dispatch",
        "--redis",
        redis,
        "--queue",
        QUEUE,
        "--upstream",
        upstream,
        "--label",
        label,
        "--concurrency",
        "16",
        // As docs/operations.md says to run under Sentinel: the move into
        // the processing list and a dedupe claim are on a replica before
        // the request runs, so a failover cannot run it twice.
        "--durable",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Sends request `n` through the proxy on `port`: what became of it.
async fn one_request(client: &HttpClient, port: u16, n: u64, since: Instant) -> Outcome {
    let kind = MIX[usize::try_from(n).unwrap_or(0) % MIX.len()];
    let id = format!("c{n}");
    let uri = |path: &str| format!("http://127.0.0.1:{port}{path}?id={id}");
    let builder = Request::builder().header("x-chaos-id", &id);
    let request = match kind {
        Kind::Get => builder.uri(uri("/item")).body(Full::default()),
        Kind::Stream => builder.uri(uri("/stream")).body(Full::default()),
        Kind::Post => builder
            .method(Method::POST)
            .uri(uri("/order"))
            .body(Full::new(Bytes::from(id.clone()))),
        Kind::KeyedPost => builder
            .method(Method::POST)
            .uri(uri("/order"))
            .header("idempotency-key", &id)
            .body(Full::new(Bytes::from(id.clone()))),
        Kind::Upload => builder
            .method(Method::POST)
            .uri(uri("/order"))
            .header("idempotency-key", &id)
            .body(Full::new(Bytes::from(vec![b'u'; UPLOAD]))),
    }
    .expect("a valid request");
    let started = Instant::now();
    let mut cut = None;
    let answer = tokio::time::timeout(CLIENT_TIMEOUT, async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if kind == Kind::Stream => {
                cut = Some(format!("{e:?}"));
                Bytes::new()
            }
            Err(e) => return Err(format!("body: {e:?}")),
        };
        Ok::<_, String>((parts, body))
    })
    .await;
    let (status, body_ok) = match answer {
        Err(_) => (Err(format!("no answer within {CLIENT_TIMEOUT:?}")), false),
        Ok(Err(e)) => (Err(e), false),
        Ok(Ok((parts, _))) if cut.is_some() => (Ok(parts.status.as_u16()), false),
        Ok(Ok((parts, body))) => {
            let ok = match kind {
                Kind::Get => body == format!("item {id}").as_bytes(),
                Kind::Stream => body.len() == STREAMED && body.starts_with(id.as_bytes()),
                Kind::Post | Kind::KeyedPost => body == format!("order {id}").as_bytes(),
                Kind::Upload => {
                    body == format!("order {id}").as_bytes()
                        && parts
                            .headers
                            .get("x-body-length")
                            .is_some_and(|v| v.as_bytes() == UPLOAD.to_string().as_bytes())
                }
            };
            (Ok(parts.status.as_u16()), ok)
        }
    };
    Outcome {
        id,
        kind,
        status,
        body_ok,
        cut,
        answered_ms: wall_ms(),
        at: since.elapsed(),
        took: started.elapsed(),
    }
}

/// Runs the soak (on a runtime of its own) and checks the books.
///
/// Errors: when the rig cannot be set up or a fault cannot be injected
/// (a missing program, a failover that never happens); what the checks
/// find is in the report.
pub fn run(config: &ChaosConfig) -> anyhow::Result<ChaosReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(soak(config.clone()))
}

async fn soak(config: ChaosConfig) -> anyhow::Result<ChaosReport> {
    let (duration, seed) = (config.duration, config.seed);
    let mut rig = Rig::start(config).await?;
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(20))
        .build_http();
    // Ready: each proxy answers through the dispatchers.
    for port in [rig.proxy_a_port, rig.proxy_b_port] {
        let started = Instant::now();
        while !matches!(
            one_request(&client, port, 0, Instant::now()).await.status,
            Ok(200)
        ) {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("proxy on port {port} not serving within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let stop_load = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(1));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let ports = [rig.proxy_a_port, rig.proxy_b_port];
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, stop, next, outcomes) = (
                client.clone(),
                Arc::clone(&stop_load),
                Arc::clone(&next),
                Arc::clone(&outcomes),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    let n = next.fetch_add(1, Ordering::AcqRel);
                    let port = ports[usize::from((n / 3) % 2 == 1)];
                    let outcome = one_request(&client, port, n, started).await;
                    outcomes
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(outcome);
                    tokio::time::sleep(PACE).await;
                }
            })
        })
        .collect();

    // Short runs need their time for the faults (the test's minute
    // injects each kind about once).
    let warm_up = (duration / 12).min(Duration::from_secs(10));
    tokio::time::sleep(warm_up).await;
    let mut long_lived = vec![
        ("proxy a".to_owned(), rig.proxy_a.pid()),
        ("dispatcher d1".to_owned(), rig.dispatchers[0].pid()),
    ];
    for (i, pid) in rig.sentinel.sentinel_pids().into_iter().enumerate() {
        long_lived.push((format!("sentinel {}", i + 1), pid));
    }
    let rss_start: Vec<u64> = long_lived.iter().map(|(_, pid)| rss_kib(*pid)).collect();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = Vec::new();
    // The first round always runs whole, so a short run (the test's
    // minute) injects every kind of fault even when its faults take longer
    // than usual (a failover, a pause waiting for a killed dispatcher's
    // heartbeat to expire): the load then goes on until the round ends.
    'rounds: for round in 0.. {
        let mut order = FAULTS;
        order.shuffle(&mut rng);
        for fault in order {
            let gap = Duration::from_millis(rng.random_range(500..2000));
            if round > 0 && started.elapsed() + gap >= duration {
                break 'rounds;
            }
            tokio::time::sleep(gap).await;
            let at = started.elapsed();
            let what = rig
                .inject(fault, &mut rng)
                .await
                .with_context(|| format!("injecting '{}'", fault.name()))?;
            println!("[{:>6.1?}] {}: {what}", at, fault.name());
            faults.push((at, fault, what));
            if round > 0 && started.elapsed() >= duration {
                break 'rounds;
            }
        }
    }
    tokio::time::sleep(duration.saturating_sub(started.elapsed())).await;
    stop_load.store(true, Ordering::Release);
    for c in clients {
        c.await?;
    }
    let mut rss = Vec::new();
    for ((name, pid), start) in long_lived.iter().zip(rss_start) {
        rss.push((name.clone(), start, rss_kib(*pid)));
    }
    let lost = (rig.proxy_relay.lost(), rig.dispatcher_relay.lost());
    // Anything still running late would show now (an execution after its
    // client's 504 is what the books look for).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, pid) in long_lived {
        if !alive(pid) {
            bail!("{name} (pid {pid}) died during the soak");
        }
    }
    let logs = rig.logs.clone();
    let ledger = std::fs::read_to_string(&rig.ledger).context("reading the ledger")?;
    rig.stop().await;

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(PoisonError::into_inner));
    let mut report = ChaosReport {
        duration,
        seed,
        faults,
        outcomes,
        rss,
        lost,
        logs,
        ..ChaosReport::default()
    };
    read_ledger(&ledger, &mut report);
    check(&mut report);
    Ok(report)
}

/// Reads the app's ledger: `run ID METHOD START_MS` and `effect KEY`.
fn read_ledger(ledger: &str, report: &mut ChaosReport) {
    for line in ledger.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["run", id, _method, start] => {
                if let Ok(start) = start.parse() {
                    report.runs.entry((*id).to_owned()).or_default().push(start);
                }
            }
            ["effect", key] => *report.effects.entry((*key).to_owned()).or_default() += 1,
            _ => report
                .violations
                .push(format!("a ledger line that does not parse: {line:?}")),
        }
    }
}

/// The checks of the module docs, into `report.violations`.
fn check(report: &mut ChaosReport) {
    let mut found = Vec::new();
    let when = |o: &Outcome| format!("at {:.1?}", o.at);
    for o in &report.outcomes {
        let runs = report.runs.get(&o.id).map_or(&[][..], Vec::as_slice);
        let effects = report.effects.get(&o.id).copied().unwrap_or(0);
        match &o.status {
            Err(e) => found.push(format!(
                "{} {} unanswered {}: {e}",
                o.kind.name(),
                o.id,
                when(o)
            )),
            Ok(status) => {
                let status = *status;
                if (200..300).contains(&status) && !o.body_ok && o.cut.is_none() {
                    found.push(format!(
                        "{} {} answered {status} with a body not its own",
                        o.kind.name(),
                        o.id
                    ));
                }
                if o.kind.safe() && status >= 500 && status != 504 {
                    found.push(format!(
                        "safe request {} {} answered {status} {}",
                        o.kind.name(),
                        o.id,
                        when(o)
                    ));
                }
                if !o.kind.safe() && (200..300).contains(&status) && effects != 1 {
                    found.push(format!(
                        "{} {} answered {status} {}, carried out {effects} times",
                        o.kind.name(),
                        o.id,
                        when(o)
                    ));
                }
                if status == 504 {
                    for start in runs.iter().filter(|s| **s > o.answered_ms + START_SLACK_MS) {
                        found.push(format!(
                            "{} {} started {} ms after its client's 504",
                            o.kind.name(),
                            o.id,
                            start - o.answered_ms
                        ));
                    }
                }
            }
        }
    }
    for o in &report.outcomes {
        let runs = report.runs.get(&o.id).map_or(0, Vec::len);
        match o.status {
            // Refused: it must never run.
            Ok(503) if runs > 0 => found.push(format!(
                "{} {} answered 503 {}, yet ran {runs} times",
                o.kind.name(),
                o.id,
                when(o)
            )),
            // Waited out its whole hold budget: longer than any outage the
            // scheduler makes (the longest, a partition, is 10 s).
            Ok(504) => found.push(format!(
                "{} {} answered 504 {}: no answer within the hold budget",
                o.kind.name(),
                o.id,
                when(o)
            )),
            // An answer from the app leaves a line in its ledger: the
            // books are read.
            Ok(200..=299) if runs == 0 => found.push(format!(
                "{} {} answered {:?} {} with no execution in the ledger",
                o.kind.name(),
                o.id,
                o.status,
                when(o)
            )),
            _ => {}
        }
    }
    for (key, n) in &report.effects {
        if *n > 1 {
            found.push(format!("POST {key} carried out {n} times"));
        }
    }
    let answered = report
        .outcomes
        .iter()
        .filter(|o| matches!(o.status, Ok(200..=299)))
        .count();
    if report.outcomes.len() < 100 || answered * 100 < report.outcomes.len() * 95 {
        found.push(format!(
            "only {answered} of {} requests answered 2xx (at least 95 % and 100 expected)",
            report.outcomes.len()
        ));
    }
    // A stream cut short must have had a kill during it: its dispatcher's,
    // the primary's (a chunk lost with it), or its dispatcher's death as
    // the reapers see it (cut off from Redis longer than its heartbeat
    // TTL: its requests are run again elsewhere, and a stream run again
    // is aborted, never spliced). Anything else cutting streams is a bug
    // a reverse proxy must not have.
    for o in report.outcomes.iter().filter(|o| o.cut.is_some()) {
        let began = o.at.saturating_sub(o.took + Duration::from_secs(1));
        let killed = report.faults.iter().any(|(at, fault, what)| {
            let kills = match fault {
                Fault::KillDispatcher | Fault::KillRedisPrimary => true,
                Fault::Partition => what.starts_with(DISPATCHERS_RELAYED),
                _ => false,
            };
            kills && (began..=o.at).contains(at)
        });
        if !killed {
            found.push(format!(
                "{} {} cut mid-body {} with no dispatcher or primary killed while it ran: {}",
                o.kind.name(),
                o.id,
                when(o),
                o.cut.as_deref().unwrap_or_default()
            ));
        }
    }
    for fault in FAULTS {
        if !report.faults.iter().any(|(_, f, _)| *f == fault) {
            found.push(format!("never injected: {}", fault.name()));
        }
    }
    if report.lost.0 == 0 || report.lost.1 == 0 {
        found.push(format!(
            "a relay lost no reply (proxy a: {}, d1 and d3: {}): the lost-reply faults never \
             happened",
            report.lost.0, report.lost.1
        ));
    }
    // Over a short run the figures are the allocators settling (a
    // partition's backlog, the first failover), not a leak: checked from
    // RSS_CHECKED_FROM on, printed always.
    for (name, start, end) in report
        .rss
        .iter()
        .filter(|_| report.duration >= RSS_CHECKED_FROM)
    {
        if growth(*start, *end) > RSS_GROWTH {
            found.push(format!(
                "{name}: RSS grew {:.1} % ({start} KiB -> {end} KiB)",
                growth(*start, *end)
            ));
        }
    }
    report.violations.extend(found);
}
