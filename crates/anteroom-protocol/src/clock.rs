//! The queue's clock: the one time every proxy and dispatcher reads
//! deadlines against (docs/protocol.md, "Time").
//!
//! Deadlines on the wire are Unix milliseconds by the Redis server's clock
//! (`TIME`), not by the clock of the host that happens to run a proxy or a
//! dispatcher: a container or VM whose clock runs a minute off would
//! otherwise drop every request as expired, or run requests whose clients
//! already had their 504. Each process keeps an estimate of the server's
//! time: the local monotonic clock plus an offset, corrected by
//! [`observe`] from each `TIME` reading (the Redis crate samples it on
//! connect and with every heartbeat). Between readings the estimate
//! advances with the monotonic clock, so a step of the host's wall clock
//! does not move it. Before the first reading it is the host's wall clock.
//!
//! Of the readings, the one taken over the shortest round trip is the most
//! precise (its error is at most half the round trip), as in NTP's clock
//! filter: a new reading replaces the current estimate unless its round
//! trip is longer than the current one's plus 1 ms per second since that
//! was taken (which lets a reading over a busy connection through once the
//! old one has aged, and bounds how far drift accumulates). A reading that
//! disagrees with the estimate by more than both errors and that drift
//! allowance together is taken whatever its round trip: the server's clock
//! itself moved (a failover to a server whose clock differs, a step), or
//! this host was suspended (the monotonic clock stops meanwhile).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The process's origin: an instant and the wall-clock time then.
fn origin() -> &'static (Instant, u64) {
    static ORIGIN: OnceLock<(Instant, u64)> = OnceLock::new();
    ORIGIN.get_or_init(|| (Instant::now(), wall_ms()))
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The server's time at the origin, in microseconds since the Unix epoch
/// (until the first reading, the wall clock at the origin).
static SERVER_AT_ORIGIN_US: AtomicU64 = AtomicU64::new(0);

/// The reading the estimate comes from: its round trip, when it came, and
/// what it made of the server's time at the origin (microseconds).
struct Best {
    round_trip: Duration,
    at: Instant,
    at_origin_us: i128,
}

/// `t` less `origin` in microseconds, negative when `t` came first.
fn since_origin_us(t: Instant, origin: Instant) -> i128 {
    match t.checked_duration_since(origin) {
        Some(after) => i128::try_from(after.as_micros()).unwrap_or(i128::MAX),
        None => -i128::try_from(origin.duration_since(t).as_micros()).unwrap_or(i128::MAX),
    }
}

static BEST: Mutex<Option<Best>> = Mutex::new(None);

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch by the queue's clock (the Redis
/// server's, as last estimated; the host's before any reading): the time
/// unit of every deadline on the wire.
pub fn now_ms() -> u64 {
    let (at, wall) = origin();
    let base = match SERVER_AT_ORIGIN_US.load(Ordering::Acquire) {
        0 => wall.saturating_mul(1000),
        us => us,
    };
    base.saturating_add(micros(at.elapsed())) / 1000
}

/// Takes one reading of the server's clock: `server_us` (microseconds
/// since the Unix epoch, as `TIME` gives it) read by a command sent at
/// `sent` and answered at `received`. The server read its clock somewhere
/// in between; the estimate takes the middle.
pub fn observe(server_us: u64, sent: Instant, received: Instant) {
    let (origin, _) = origin();
    let round_trip = received.saturating_duration_since(sent);
    let half_us = i128::from(micros(round_trip) / 2);
    // Signed: a reading sent before the origin was fixed is still exact.
    let at_origin_us = i128::from(server_us) - (since_origin_us(sent, *origin) + half_us);
    let mut best = BEST.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(current) = &*best {
        let allowance =
            Duration::from_millis(received.saturating_duration_since(current.at).as_secs());
        let worse = round_trip > current.round_trip.saturating_add(allowance);
        let errors_us =
            half_us + i128::from(micros(current.round_trip) / 2) + i128::from(micros(allowance));
        let disagrees = (at_origin_us - current.at_origin_us).abs() > errors_us;
        if worse && !disagrees {
            return;
        }
    }
    let stored = u64::try_from(at_origin_us.max(1)).unwrap_or(u64::MAX);
    SERVER_AT_ORIGIN_US.store(stored, Ordering::Release);
    *best = Some(Best {
        round_trip,
        at: received,
        at_origin_us,
    });
}

/// How far the queue's clock is ahead of this host's wall clock now, in
/// milliseconds (negative when behind): what `anteroom status` and the
/// logs report as the host's skew.
pub fn skew_ms() -> i64 {
    let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
    now.saturating_sub(i64::try_from(wall_ms()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test, as the clock is the process's: tests in parallel would
    // share it.
    #[test]
    fn follows_the_server_and_prefers_short_round_trips() {
        let before = now_ms();
        let wall = wall_ms();
        assert!(
            before.abs_diff(wall) < 1_000,
            "unsynced it is the wall clock"
        );

        // The server runs an hour ahead; the reading took 2 ms.
        let sent = Instant::now();
        let received = sent + Duration::from_millis(2);
        let server = (wall + 3_600_000) * 1000;
        observe(server, sent, received);
        let skew = skew_ms();
        assert!(
            (3_599_000..=3_601_000).contains(&skew),
            "an hour ahead, got {skew} ms"
        );

        // A reading over a 300 ms round trip that agrees within its error
        // is not taken while the better one is fresh.
        let sent = Instant::now();
        observe(
            (wall_ms() + 3_600_000 + 100) * 1000,
            sent,
            sent + Duration::from_millis(300),
        );
        let skew = skew_ms();
        assert!(
            (3_599_500..=3_600_050).contains(&skew),
            "a worse reading replaced a better one: {skew}"
        );
        // One that disagrees beyond both errors is taken: the server's
        // clock moved (here: back to the host's).
        let sent = Instant::now();
        observe(wall_ms() * 1000, sent, sent + Duration::from_millis(300));
        assert!(skew_ms().abs() < 1_000, "a moved clock was not followed");

        // One as good is taken: the server is now 30 s behind.
        let sent = Instant::now();
        let server = (wall_ms() - 30_000) * 1000;
        observe(server, sent, sent + Duration::from_millis(1));
        let skew = skew_ms();
        assert!(
            (-31_000..=-29_000).contains(&skew),
            "30 s behind, got {skew}"
        );

        // The estimate advances with the monotonic clock.
        let a = now_ms();
        std::thread::sleep(Duration::from_millis(20));
        let b = now_ms();
        assert!((20..200).contains(&(b - a)), "advanced {} ms", b - a);
    }
}
