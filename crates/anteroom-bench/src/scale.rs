//! The scaling scenario: does a second Redis add capacity here?
//!
//! Two queues, each served by its own `anteroom demo` (proxy, dispatcher
//! and in-process handler), driven at once by two wrk processes with half
//! the connections each. First both queues share one redis-server, then
//! each has its own. The ratio of the totals says whether spreading queues
//! over Redis instances (or cluster shards) adds capacity on this machine.

use std::path::Path;
use std::time::Duration;

use anteroom_testkit::LocalRedis;
use anyhow::Context;

use crate::setups::InProcess;
use crate::wrk;

/// Totals of one arrangement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Total {
    pub(crate) requests_per_sec: f64,
    pub(crate) errors: u64,
}

/// One Redis against two.
#[derive(Debug)]
pub(crate) struct ScaleFigures {
    pub(crate) one_redis: Total,
    pub(crate) two_redis: Total,
    pub(crate) cores: usize,
    pub(crate) connections: usize,
    pub(crate) duration: Duration,
}

pub(crate) fn run(
    anteroom: &Path,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<ScaleFigures> {
    let first = LocalRedis::start().context("starting redis-server")?;
    let one_redis = drive(anteroom, [&first, &first], duration, connections)?;
    let second = LocalRedis::start().context("starting a second redis-server")?;
    let two_redis = drive(anteroom, [&first, &second], duration, connections)?;
    Ok(ScaleFigures {
        one_redis,
        two_redis,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        connections,
        duration,
    })
}

/// Queue `scale-a` on `redis[0]` and `scale-b` on `redis[1]`, driven at once.
fn drive(
    anteroom: &Path,
    redis: [&LocalRedis; 2],
    duration: Duration,
    connections: usize,
) -> anyhow::Result<Total> {
    let a = InProcess::start_on(anteroom, redis[0], "scale-a")?;
    let b = InProcess::start_on(anteroom, redis[1], "scale-b")?;
    let urls = [a.url("/hello"), b.url("/hello")];
    for url in &urls {
        wrk::warm_up(url)?;
    }
    let per_side = (connections / 2).max(1);
    let results = std::thread::scope(|scope| {
        let runs: Vec<_> = urls
            .iter()
            .map(|url| scope.spawn(move || wrk::run(url, 1, per_side, duration)))
            .collect();
        runs.into_iter()
            .map(|run| {
                run.join()
                    .unwrap_or_else(|_| anyhow::bail!("a wrk thread panicked"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    Ok(Total {
        requests_per_sec: results.iter().map(|f| f.requests_per_sec).sum(),
        errors: results.iter().map(|f| f.errors).sum(),
    })
}

pub(crate) fn print(f: &ScaleFigures) {
    println!(
        "\nScaling: two queues, two `anteroom demo` processes, {} connections in all, {} each, {} core(s)",
        f.connections,
        humantime::format_duration(f.duration),
        f.cores
    );
    println!("  arrangement                      requests/s  errors");
    for (name, total) in [
        ("both queues on one redis", f.one_redis),
        ("each queue on its own redis", f.two_redis),
    ] {
        println!(
            "  {name:<32} {:>10.0}  {:>6}",
            total.requests_per_sec, total.errors
        );
    }
    println!(
        "  two redis / one redis            {:>10.2}x",
        f.two_redis.requests_per_sec / f.one_redis.requests_per_sec.max(1.0)
    );
}
