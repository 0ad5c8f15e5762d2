//! The human-readable form of `anteroom status`.

use std::fmt::Write;

use anteroom_control::{MemoryStatus, QueueStatus, Quiescence, StatusReport};
use anteroom_protocol::printable;

/// `1234` -> `1.2s`, `75000` -> `1m15s`.
pub(crate) fn duration_ms(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// `1536` -> `1.5 KiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Redis's memory, and a warning when its policy evicts keys (none when it
/// could not be read).
pub(crate) fn memory(memory: Option<&MemoryStatus>) -> String {
    let Some(m) = memory else {
        return String::new();
    };
    let mut out = String::new();
    let limit = match m.maxmemory_bytes {
        0 => "no maxmemory".to_owned(),
        max => format!(
            "of maxmemory {} ({}%)",
            bytes(max),
            m.used_bytes.saturating_mul(100) / max
        ),
    };
    let _ = writeln!(
        out,
        "  memory        {} used {limit}, policy {}",
        bytes(m.used_bytes),
        printable(&m.policy)
    );
    if m.evicts {
        let _ = writeln!(
            out,
            "  WARNING: maxmemory-policy {} evicts keys when Redis is full: waiting requests, replies, \
             heartbeats and claims can vanish (requests lost or run twice). Set noeviction \
             (docs/operations.md, \"Redis settings\").",
            printable(&m.policy)
        );
    }
    out
}

/// One line per canary split from `q`, over every live proxy that has it:
/// its weight, what pins a client, and the split measured so far.
fn canary_lines(out: &mut String, q: &QueueStatus) {
    let mut splits: Vec<anteroom_protocol::CanarySplit> = Vec::new();
    for split in q.proxies.iter().flat_map(|p| &p.heartbeat.canaries) {
        match splits.iter_mut().find(|s| s.queue == split.queue) {
            Some(seen) => {
                seen.to_canary += split.to_canary;
                seen.to_main += split.to_main;
            }
            None => splits.push(split.clone()),
        }
    }
    for s in splits {
        let pins: Vec<String> = s
            .cookie
            .iter()
            .map(|c| format!("cookie {}", printable(c)))
            .chain(s.header.iter().map(|h| format!("header {}", printable(h))))
            .collect();
        let pins = if pins.is_empty() {
            String::new()
        } else {
            format!(", pinned by {}", pins.join(" or "))
        };
        let total = s.to_canary + s.to_main;
        let measured = if total == 0 {
            "none routed yet".to_owned()
        } else {
            format!(
                "{} of {total} routed there ({:.1}%)",
                s.to_canary,
                s.to_canary as f64 * 100.0 / total as f64
            )
        };
        let _ = writeln!(
            out,
            "  canary        {}% to {}{pins}: {measured}",
            f64::from(s.weight_ppm) / 10_000.0,
            s.queue
        );
    }
}

/// The whole report as aligned text.
pub(crate) fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    for q in &report.queues {
        let state = match &q.pause {
            None => "running".to_owned(),
            Some(p) => {
                let ago = duration_ms(q.checked_at_ms.saturating_sub(p.record.since_ms));
                let lease = p
                    .expires_in_ms
                    .map(|ms| format!(", lapses in {}", duration_ms(ms)))
                    .unwrap_or_default();
                format!("PAUSED {ago} ago by {}{lease}", printable(&p.record.by))
            }
        };
        let _ = writeln!(out, "queue {}: {state}", q.queue);
        if let Some(m) = &q.maintenance {
            let ago = duration_ms(q.checked_at_ms.saturating_sub(m.since_ms));
            let _ = writeln!(
                out,
                "  MAINTENANCE   on {ago} ago by {}: new requests get 503 (Retry-After {} s)",
                printable(&m.by),
                m.retry_after_secs
            );
        }
        let oldest = q
            .oldest_wait_ms
            .map(|ms| format!(", oldest {}", duration_ms(ms)))
            .unwrap_or_default();
        let expired = match (q.expired, q.expired_capped) {
            (0, _) => String::new(),
            (n, capped) => format!(
                " ({}{n} past their hold budget: their clients got 504; they will not run)",
                if capped { "at least " } else { "" }
            ),
        };
        let _ = writeln!(out, "  waiting       {}{expired}{oldest}", q.waiting);
        if let Some(hold) = q.proxies.iter().filter_map(|p| p.heartbeat.hold_ms).max() {
            let _ = writeln!(out, "  hold budget   {}", duration_ms(hold));
        }
        canary_lines(&mut out, q);
        let _ = writeln!(out, "  dead letters  {}", q.dead_letters);
        let _ = writeln!(out, "  dispatchers   {} live", q.dispatchers.len());
        if !q.dispatchers.is_empty() {
            let _ = writeln!(
                out,
                "    {:<12}  {:<16}  {:>7}  {:<10}  {:>9}  {:>4}  state",
                "id", "host", "pid", "label", "in-flight", "held"
            );
            for d in &q.dispatchers {
                let hb = &d.heartbeat;
                let _ = writeln!(
                    out,
                    "    {:<12}  {:<16}  {:>7}  {:<10}  {:>9}  {:>4}  {}",
                    short(&hb.id),
                    printable(&hb.host),
                    hb.pid,
                    printable(&hb.label),
                    format!("{}/{}", hb.in_flight, hb.concurrency),
                    d.held,
                    match hb.websockets {
                        0 => dispatcher_state(hb, q.checked_at_ms),
                        n => format!(
                            "{}, {n} websocket(s) open (held, not running)",
                            dispatcher_state(hb, q.checked_at_ms)
                        ),
                    }
                );
            }
        }
        for o in &q.orphaned {
            let _ = writeln!(
                out,
                "    {:<12}  heartbeat lost {} ago, {} request(s) left in its processing list: {}",
                short(&o.id),
                duration_ms(q.checked_at_ms.saturating_sub(o.last_seen_ms)),
                o.held,
                if q.dispatchers.is_empty() {
                    "no live dispatcher will reap them; run `anteroom reap`"
                } else {
                    "the live dispatchers reap them within their --reap-every, or run `anteroom reap`"
                }
            );
        }
        let _ = writeln!(out, "  proxies       {} live", q.proxies.len());
        for p in &q.proxies {
            let hb = &p.heartbeat;
            let _ = writeln!(
                out,
                "    {:<12}  {:<16}  {:>7}  {} waiting",
                short(&hb.id),
                printable(&hb.host),
                hb.pid,
                hb.waiting
            );
        }
    }
    out
}

/// `status --lines`: one tab-separated line per live component, for
/// scripts (docs/operations.md); control characters in free text (tabs
/// and line breaks included) are escaped as `\u{..}`.
pub(crate) fn lines(report: &StatusReport) -> String {
    // Free text through `printable`: tabs and line breaks are escaped too,
    // so each line stays one record.
    let mut out = String::new();
    for q in &report.queues {
        for d in &q.dispatchers {
            let hb = &d.heartbeat;
            let state = state_word(hb);
            let _ = writeln!(
                out,
                "dispatcher\t{}\t{}\t{}\t{}\t{}\t{state}",
                q.queue,
                hb.id,
                printable(&hb.host),
                hb.pid,
                printable(&hb.label)
            );
        }
        for p in &q.proxies {
            let hb = &p.heartbeat;
            let _ = writeln!(
                out,
                "proxy\t{}\t{}\t{}\t{}",
                q.queue,
                hb.id,
                printable(&hb.host),
                hb.pid
            );
        }
    }
    out
}

/// `pulling`, `paused`, or why it takes nothing:
/// `upstream unhealthy for 3.2s (connection refused)`.
fn dispatcher_state(hb: &anteroom_protocol::DispatcherHeartbeat, now_ms: u64) -> String {
    match (&hb.unhealthy, state_word(hb)) {
        (Some(u), "unhealthy") => format!(
            "upstream unhealthy for {} ({})",
            duration_ms(now_ms.saturating_sub(u.since_ms)),
            u.reason
        ),
        (_, word) => word.to_owned(),
    }
}

/// A dispatcher's state in one word: `paused` (it acknowledged the queue's
/// pause), `unhealthy` (its upstream is), or `pulling`.
fn state_word(hb: &anteroom_protocol::DispatcherHeartbeat) -> &'static str {
    match (&hb.unhealthy, hb.paused) {
        (_, true) => "paused",
        (Some(_), false) => "unhealthy",
        (None, false) => "pulling",
    }
}

/// One line per dispatcher that keeps a pause from being quiet.
pub(crate) fn busy_lines(q: &Quiescence) -> String {
    let mut out = String::new();
    for d in q.busy() {
        let why = if d.held > d.heartbeat.websockets {
            format!("{} in flight, {} held", d.heartbeat.in_flight, d.held)
        } else {
            "has not stopped pulling yet".to_owned()
        };
        let _ = writeln!(
            out,
            "  dispatcher {} on {}: {why}",
            short(&d.heartbeat.id),
            printable(&d.heartbeat.host)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::duration_ms;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_ms(250), "250ms");
        assert_eq!(duration_ms(1234), "1.2s");
        assert_eq!(duration_ms(75_000), "1m15s");
    }
}
