//! Driving a URL with wrk and reading its figures.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Figures {
    /// Requests completed in the run.
    pub(crate) requests: u64,
    pub(crate) requests_per_sec: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) errors: u64,
}

/// A short run to open connections and fill pools before measuring.
pub(crate) fn warm_up(url: &str) -> anyhow::Result<()> {
    run(url, 1, 8, Duration::from_secs(1)).map(drop)
}

pub(crate) fn run(
    url: &str,
    threads: usize,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let out = Command::new("wrk")
        .args([
            "--latency",
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
        ])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .arg(url)
        .output()
        .context("wrk (install: sudo apt-get install wrk)")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

fn parse(text: &str) -> anyhow::Result<Figures> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let requests_per_sec: f64 = field("Requests/sec:")
        .context("no Requests/sec in wrk's output")?
        .parse()?;
    let p50 = parse_latency(field("50%").context("no 50% latency")?)?;
    let p99 = parse_latency(field("99%").context("no 99% latency")?)?;
    // "123456 requests in 8.00s, 15.2MB read"
    let requests: u64 = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.split_once(" requests in ").map(|(n, _)| n.trim()))
        .context("no request count in wrk's output")?
        .parse()?;
    let non_2xx: u64 = field("Non-2xx or 3xx responses:").map_or(Ok(0), str::parse)?;
    let socket: u64 = field("Socket errors:").map_or(0, |s| {
        s.split(',')
            .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    });
    Ok(Figures {
        requests,
        requests_per_sec,
        p50,
        p99,
        errors: non_2xx + socket,
    })
}

fn parse_latency(s: &str) -> anyhow::Result<Duration> {
    let (number, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .context("latency without a unit")?;
    let value: f64 = number.trim().parse()?;
    let micros = match unit {
        "us" => value,
        "ms" => value * 1_000.0,
        "s" => value * 1_000_000.0,
        "m" => value * 60_000_000.0,
        other => bail!("unknown latency unit {other:?}"),
    };
    Ok(Duration::from_nanos((micros * 1_000.0) as u64))
}

pub(crate) fn print_table(connections: usize, results: &[(&str, Figures)]) {
    let nginx = results
        .iter()
        .find(|(name, _)| name.starts_with("nginx"))
        .map(|(_, f)| f.requests_per_sec);
    let direct = results
        .iter()
        .find(|(name, _)| name.starts_with("upstream"))
        .map(|(_, f)| f.p50);
    println!("\n{connections} connection(s):");
    println!(
        "  {:<30} {:>12} {:>10} {:>10} {:>7} {:>9} {:>14}",
        "setup", "requests/s", "p50", "p99", "errors", "x nginx", "p50 added"
    );
    for (name, f) in results {
        let ratio = nginx.map_or("-".to_owned(), |n| format!("{:.2}", f.requests_per_sec / n));
        let added = direct.map_or("-".to_owned(), |d| {
            format!("{:.3} ms", (f.p50.as_secs_f64() - d.as_secs_f64()) * 1000.0)
        });
        println!(
            "  {:<30} {:>12.0} {:>8.3}ms {:>8.3}ms {:>7} {:>9} {:>14}",
            name,
            f.requests_per_sec,
            f.p50.as_secs_f64() * 1000.0,
            f.p99.as_secs_f64() * 1000.0,
            f.errors,
            ratio,
            added
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "Running 1s test @ http://x/\n  2 threads and 8 connections\n  Latency Distribution\n     50%  635.91us\n     75%  712.00us\n     90%    1.00ms\n     99%    2.50ms\n  1234 requests in 1.00s, 10KB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 5\nRequests/sec:   1234.56\nTransfer/sec:     10.00KB\n";
        let f = parse(out).unwrap();
        assert_eq!(f.requests, 1234);
        assert_eq!(f.requests_per_sec, 1234.56);
        assert_eq!(f.p50, Duration::from_nanos(635_910));
        assert_eq!(f.p99, Duration::from_micros(2_500));
        assert_eq!(f.errors, 8);
    }
}
