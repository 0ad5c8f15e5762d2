//! A floor under the latency a queued request adds at one connection:
//! the Redis round trips every request makes in series, timed with
//! nothing else around them. A request crosses Redis twice: the proxy's
//! `LPUSH` wakes a dispatcher blocked in `BLMOVE` (the reliable take,
//! docs/protocol.md), and the dispatcher's completion (`MULTI`, `LREM`
//! from its processing list, `RPUSH` to the reply list, `PEXPIRE`,
//! `EXEC`) wakes the proxy's reader blocked on the reply list. Here two
//! threads of this process, each with its own connection, pass a 330-byte
//! item (a small GET's envelope, version 2) along that path, one at a
//! time, the reader a plain `BLPOP` (the proxy's reader moves the reply
//! into a landing list and acknowledges it after, more than this). The
//! time from the `LPUSH` to the reply's arrival is a lower bound, measured
//! alone on an otherwise idle machine, under what Anteroom's hop adds
//! before any HTTP is parsed or written. A single `PING` round trip is
//! printed beside it.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::stream::percentile;

/// The keys the floor uses on the benchmark's own Redis (deleted after).
const REQUESTS: &str = "bench-floor:requests";
const PROCESSING: &str = "bench-floor:processing";
const REPLIES: &str = "bench-floor:replies";
/// What the client pushes last to stop the worker thread.
const STOP: &[u8] = b"stop";
/// How long a blocking command waits (seconds) before the loop gives up:
/// every item is pushed before it is awaited, so it only elapses when the
/// other thread has failed.
const BLOCK_SECS: f64 = 5.0;

/// The floor's figures: medians over `round_trips` each.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Floor {
    pub(crate) round_trips: usize,
    /// One `PING`, sent and answered.
    pub(crate) ping_p50: Duration,
    /// `LPUSH` until the reply has been popped: the two hand-offs.
    pub(crate) handoffs_p50: Duration,
}

/// Measures the floor on the Redis at `url`, `round_trips` times each.
///
/// # Errors
/// Connecting to Redis or any command failing; a blocking pop that times
/// out (the worker thread failed).
pub(crate) fn measure(url: &str, round_trips: usize) -> anyhow::Result<Floor> {
    let client = redis::Client::open(url)?;
    let connect = || {
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .context("connecting to redis for the floor")?;
        conn.set_read_timeout(Some(Duration::from_secs_f64(BLOCK_SECS + 5.0)))?;
        anyhow::Ok(conn)
    };
    let mut conn = connect()?;
    redis::cmd("DEL")
        .arg(&[REQUESTS, PROCESSING, REPLIES])
        .exec(&mut conn)?;

    let mut pings = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let at = Instant::now();
        redis::cmd("PING").exec(&mut conn)?;
        pings.push(nanos(at));
    }

    let mut worker_conn = connect()?;
    let worker = std::thread::spawn(move || -> anyhow::Result<()> {
        loop {
            let item: Option<Vec<u8>> = redis::cmd("BLMOVE")
                .arg(REQUESTS)
                .arg(PROCESSING)
                .arg("RIGHT")
                .arg("LEFT")
                .arg(BLOCK_SECS)
                .query(&mut worker_conn)?;
            let item = item.context("the floor's worker waited for an item in vain")?;
            redis::pipe()
                .atomic()
                .cmd("LREM")
                .arg(PROCESSING)
                .arg(1)
                .arg(&item)
                .ignore()
                .cmd("RPUSH")
                .arg(REPLIES)
                .arg(&item)
                .ignore()
                .cmd("PEXPIRE")
                .arg(REPLIES)
                .arg(60_000)
                .ignore()
                .exec(&mut worker_conn)?;
            if item == STOP {
                return Ok(());
            }
        }
    });

    let mut item = vec![b'x'; 330];
    let mut handoffs = Vec::with_capacity(round_trips);
    let passed = (0..round_trips).try_for_each(|n| {
        item[..8].copy_from_slice(&(n as u64).to_be_bytes());
        let at = Instant::now();
        redis::cmd("LPUSH")
            .arg(REQUESTS)
            .arg(&item)
            .exec(&mut conn)?;
        let reply: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
            .arg(REPLIES)
            .arg(BLOCK_SECS)
            .query(&mut conn)?;
        handoffs.push(nanos(at));
        match reply {
            Some((_, got)) if got == item => Ok(()),
            Some(_) => anyhow::bail!("the floor's reply was not the item sent"),
            None => anyhow::bail!("no reply within {BLOCK_SECS} s"),
        }
    });
    // The worker stops on this item whether or not the loop above passed.
    let stopped = redis::cmd("LPUSH").arg(REQUESTS).arg(STOP).exec(&mut conn);
    let worked = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the floor's worker panicked"))?;
    passed?;
    stopped?;
    worked?;
    redis::cmd("DEL")
        .arg(&[REQUESTS, PROCESSING, REPLIES])
        .exec(&mut conn)?;
    let p50 = |samples: &mut Vec<u64>| {
        samples.sort_unstable();
        Duration::from_nanos(percentile(samples, 0.5))
    };
    Ok(Floor {
        round_trips,
        ping_p50: p50(&mut pings),
        handoffs_p50: p50(&mut handoffs),
    })
}

/// Nanoseconds since `at`, the unit the samples are kept in.
fn nanos(at: Instant) -> u64 {
    u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Prints the floor beside the p50s Anteroom added at one connection.
pub(crate) fn print(floor: &Floor) {
    println!(
        "\nRedis floor at one connection ({} round trips each, serial, p50; \
         a lower bound under a queued request's hop here)",
        floor.round_trips
    );
    println!(
        "  one PING round trip                                        {:.3} ms",
        floor.ping_p50.as_secs_f64() * 1000.0
    );
    println!(
        "  two hand-offs (LPUSH -> BLMOVE; MULTI LREM RPUSH PEXPIRE EXEC -> BLPOP) {:.3} ms",
        floor.handoffs_p50.as_secs_f64() * 1000.0
    );
}
