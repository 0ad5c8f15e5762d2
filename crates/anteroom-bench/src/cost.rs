//! What one request costs each process of a setup: CPU microseconds
//! (user and system, from `/proc/<pid>/stat`, each process with its
//! direct children) and Redis commands (`INFO stats`,
//! `total_commands_processed`), over one wrk run, divided by the requests
//! it completed. The load generator's own CPU is not counted. The upstream
//! runs on a thread of the benchmark's own process, whose CPU is counted
//! without its children (every other process of the run).

use anyhow::Context;

use crate::setups::{cpu_micros, own_cpu_micros};
use crate::wrk::Figures;

/// One setup's processes: a name each (`proxy`, `redis`, ...), its pid,
/// and whether its children count (nginx's workers do; the benchmark's
/// own, which serves the upstream, has every other process as a child,
/// wrk included, so they do not).
pub(crate) type Processes = Vec<(&'static str, u32, Children)>;

/// Whether a process's direct children count with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Children {
    Included,
    Excluded,
}

fn cpu(pid: u32, children: Children) -> u64 {
    match children {
        Children::Included => cpu_micros(pid),
        Children::Excluded => own_cpu_micros(pid),
    }
}

/// The cost of one request.
#[derive(Debug, Clone)]
pub(crate) struct Cost {
    /// CPU microseconds per request, per process, in the order given.
    pub(crate) cpu: Vec<(&'static str, f64)>,
    /// Redis commands per request, when the setup uses Redis.
    pub(crate) redis_commands: Option<f64>,
}

/// Runs `run` (one wrk run) and measures what its requests cost
/// `processes` and the Redis at `redis_url`.
pub(crate) fn measure(
    processes: &Processes,
    redis_url: Option<&str>,
    run: impl FnOnce() -> anyhow::Result<Figures>,
) -> anyhow::Result<(Figures, Cost)> {
    let before: Vec<u64> = processes.iter().map(|&(_, pid, c)| cpu(pid, c)).collect();
    let commands_before = redis_url.map(commands_processed).transpose()?;
    let figures = run()?;
    let after: Vec<u64> = processes.iter().map(|&(_, pid, c)| cpu(pid, c)).collect();
    let commands_after = redis_url.map(commands_processed).transpose()?;
    let requests = figures.requests.max(1) as f64;
    let cpu = processes
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(&(name, _, _), (b, a))| (name, a.saturating_sub(*b) as f64 / requests))
        .collect();
    // The INFO that read the first count is one of the commands counted.
    let redis_commands = commands_before
        .zip(commands_after)
        .map(|(b, a)| a.saturating_sub(b + 1) as f64 / requests);
    Ok((
        figures,
        Cost {
            cpu,
            redis_commands,
        },
    ))
}

/// `total_commands_processed` of the Redis at `url`.
fn commands_processed(url: &str) -> anyhow::Result<u64> {
    let mut conn = redis::Client::open(url)?
        .get_connection()
        .context("connecting to redis for INFO")?;
    let info: String = redis::cmd("INFO").arg("stats").query(&mut conn)?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .context("no total_commands_processed in INFO stats")
}

/// The cost table: one line per setup, each process's CPU microseconds
/// per request, their sum, and Redis commands per request.
pub(crate) fn print_table(connections: usize, results: &[(&str, Cost)]) {
    println!(
        "\nCost per request at {connections} connection(s): CPU microseconds of each process \
         (with its children; the load generator excluded) and Redis commands"
    );
    for (name, cost) in results {
        let parts: Vec<String> = cost
            .cpu
            .iter()
            .map(|(process, micros)| format!("{process} {micros:.1}"))
            .collect();
        let total: f64 = cost.cpu.iter().map(|(_, m)| m).sum();
        let commands = cost
            .redis_commands
            .map_or("-".to_owned(), |c| format!("{c:.2}"));
        println!(
            "  {:<30} {:<58} total {:>6.1} µs  redis commands {:>5}",
            name,
            parts.join(", "),
            total,
            commands
        );
    }
}
