//! `pause`, `resume`, `maintenance`, `status` and `window`: operating a
//! queue.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anteroom_control::{
    ControlError, MemoryStatus, Queue, QueueStatus, Quiescence, StatusReport, known_queues,
};
use anyhow::Context;

use crate::cli::{MaintenanceArgs, PauseArgs, QueueArgs, StatusArgs, Switch, WindowArgs};
use crate::status_view;

/// How long `pause --wait` waits by default.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connect and command timeout for operator commands.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn connect(target: &QueueArgs) -> anyhow::Result<Queue> {
    Queue::connect(&target.redis.url, &target.queue, REDIS_TIMEOUT)
        .await
        .with_context(|| {
            format!(
                "cannot use redis at {} (set by --redis or ANTEROOM_REDIS)",
                redact(&target.redis.url)
            )
        })
}

pub(crate) use anteroom_redis::redact_url as redact;

/// Says which Redis and queue a command acts on and who serves the queue
/// (on stdout: it is part of the command's answer); returns the status.
async fn serving(queue: &Queue, url: &str) -> anyhow::Result<QueueStatus> {
    let status = queue.status().await?;
    outln!(
        "queue {:?} on {}: {} and {} serve it",
        queue.name(),
        redact(url),
        counted(status.proxies.len(), "proxy", "proxies"),
        counted(status.dispatchers.len(), "dispatcher", "dispatchers")
    );
    Ok(status)
}

/// `n` and the noun, singular or plural: `1 proxy`, `0 proxies`.
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A pause that nothing would notice (no proxy queues requests there, or
/// no dispatcher takes them) is almost always a wrong `--queue` or
/// `--redis`. Refuses, unless `force`, naming the queues this Redis has.
async fn refuse_unserved(
    queue: &Queue,
    status: &QueueStatus,
    url: &str,
    force: bool,
) -> anyhow::Result<()> {
    let missing = match (status.proxies.is_empty(), status.dispatchers.is_empty()) {
        (false, false) => return Ok(()),
        (true, true) => "no proxy and no dispatcher serve",
        (true, false) => "no proxy serves",
        (false, true) => "no dispatcher serves",
    };
    let problem = format!("{missing} queue {:?} on {}", queue.name(), redact(url));
    if force {
        eprintln!("warning: {problem}; pausing anyway (--force)");
        return Ok(());
    }
    let known = known_queues(&mut queue.connection())
        .await
        .unwrap_or_default();
    let known = if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    };
    anyhow::bail!(
        "{problem}, so pausing it would hold nothing back. Check --queue and --redis \
         (ANTEROOM_QUEUE, ANTEROOM_REDIS); queues known on this redis: {known}. \
         Pass --force to pause it anyway"
    )
}

fn who(what: &str) -> String {
    format!("{what}@{}", anteroom_redis::hostname())
}

pub(crate) async fn pause(args: PauseArgs) -> anyhow::Result<ExitCode> {
    let queue = connect(&args.target).await?;
    let url = &args.target.redis.url;
    let status = serving(&queue, url).await?;
    if args.timeout.is_some() && !args.wait {
        eprintln!("warning: --timeout (or ANTEROOM_TIMEOUT) applies only with --wait; ignored");
    }
    if args.wait {
        refuse_unserved(&queue, &status, url, args.force).await?;
    } else if status.proxies.is_empty() || status.dispatchers.is_empty() {
        eprintln!(
            "warning: {} and {} serve queue {:?} on {}: check --queue and --redis",
            counted(status.proxies.len(), "proxy", "proxies"),
            counted(status.dispatchers.len(), "dispatcher", "dispatchers"),
            queue.name(),
            redact(url)
        );
    }
    match queue.pause_state().await? {
        // A lease (a window's, or another `pause --ttl`): joining it would
        // end with it, so an indefinite pause would be silently lifted.
        Some((record, Some(left_ms))) if args.ttl.is_none() => anyhow::bail!(
            "queue {:?} is already paused by {} with a lease that lapses in {} \
             (a window resumes it when it ends), and this pause would be lifted with it; \
             pause again once it has ended, or give --ttl",
            queue.name(),
            anteroom_protocol::printable(&record.by),
            status_view::duration_ms(left_ms)
        ),
        Some((record, _)) => outln!(
            "queue {:?} was already paused by {} {} ago; it stays paused",
            queue.name(),
            anteroom_protocol::printable(&record.by),
            status_view::duration_ms(anteroom_protocol::now_ms().saturating_sub(record.since_ms))
        ),
        None => {}
    }
    queue.pause(&who("cli"), args.ttl, false).await?;
    outln!("paused queue {:?}", queue.name());
    if args.wait {
        match queue
            .wait_quiescent(
                args.timeout.unwrap_or(PAUSE_TIMEOUT),
                progress_printer(args.quiet),
            )
            .await
        {
            Ok(q) => outln!(
                "queue {:?} is quiet: {} dispatcher(s) paused, none holding requests",
                queue.name(),
                q.status.dispatchers.len()
            ),
            Err(err @ ControlError::NotQuiescent { .. }) => {
                if let Ok(q) = queue.quiescence().await {
                    eprint!("{}", status_view::busy_lines(&q));
                }
                return Err(anyhow::Error::new(err).context(format!(
                    "the queue stays paused; run `anteroom resume --queue {}` with the same \
                     --redis to release it",
                    queue.name()
                )));
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn resume(args: QueueArgs) -> anyhow::Result<ExitCode> {
    let queue = connect(&args).await?;
    serving(&queue, &args.redis.url).await?;
    let state = queue.pause_state().await?;
    if queue.resume().await? {
        let since = state.map(|(p, _)| p.since_ms).unwrap_or(0);
        let paused_for = anteroom_protocol::now_ms().saturating_sub(since);
        outln!(
            "resumed queue {:?} (paused for {})",
            queue.name(),
            status_view::duration_ms(paused_for)
        );
    } else {
        outln!("queue {:?} was not paused", queue.name());
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn maintenance(args: MaintenanceArgs) -> anyhow::Result<ExitCode> {
    let queue = connect(&args.target).await?;
    let status = serving(&queue, &args.target.redis.url).await?;
    match args.state {
        Switch::On => {
            if status.proxies.is_empty() {
                eprintln!(
                    "warning: no proxy serves queue {:?}: check --queue and --redis",
                    queue.name()
                );
            }
            let record = anteroom_protocol::MaintenanceRecord {
                since_ms: anteroom_protocol::now_ms(),
                by: who("cli"),
                message: args.message,
                retry_after_secs: args.retry_after,
            };
            queue.maintenance_on(&record).await?;
            let mut canaries: Vec<&str> = status
                .proxies
                .iter()
                .flat_map(|p| &p.heartbeat.canaries)
                .map(|c| c.queue.as_str())
                .collect();
            canaries.sort_unstable();
            canaries.dedup();
            for canary in canaries {
                eprintln!(
                    "note: proxies send part of queue {:?}'s requests to its canary {canary:?}, \
                     which is not in maintenance: anteroom maintenance on --queue {canary}",
                    queue.name()
                );
            }
            outln!(
                "maintenance on for queue {:?}: new requests get 503 with Retry-After {} s; \
                 the {} waiting keep waiting",
                queue.name(),
                args.retry_after,
                status.waiting
            );
        }
        Switch::Off => match (queue.maintenance_off().await?, status.maintenance) {
            (true, m) => {
                let since = m.map_or(0, |m| m.since_ms);
                let on_for = anteroom_protocol::now_ms().saturating_sub(since);
                outln!(
                    "maintenance off for queue {:?} (on for {}); requests are queued again",
                    queue.name(),
                    status_view::duration_ms(on_for)
                );
            }
            (false, _) => outln!("queue {:?} was not in maintenance", queue.name()),
        },
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let target = anteroom_redis::Target::parse(&args.redis.url)?;
    let mut conn = anteroom_redis::shared(&target, REDIS_TIMEOUT)
        .await
        .with_context(|| {
            format!(
                "cannot use redis at {} (set by --redis or ANTEROOM_REDIS)",
                redact(&args.redis.url)
            )
        })?;
    let names = match args.queue.clone() {
        Some(name) => vec![name],
        None => known_queues(&mut conn).await?,
    };
    let memory = if target.is_cluster() {
        None
    } else {
        anteroom_redis::memory_info(&mut conn)
            .await
            .ok()
            .map(MemoryStatus::from)
    };
    let mut report = StatusReport {
        queues: Vec::new(),
        memory,
    };
    for name in names {
        let keys = anteroom_protocol::Keys::new(&name)?;
        let queue = Queue::with_connection(keys, conn.clone());
        report.queues.push(queue.status().await?);
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else if args.lines {
        out!("{}", status_view::lines(&report));
    } else if report.queues.is_empty() {
        outln!(
            "redis {}: no queues yet: start a proxy or dispatcher, or pass --queue \
             (is --redis or ANTEROOM_REDIS the one they use?)",
            redact(&args.redis.url)
        );
    } else {
        outln!("redis {}", redact(&args.redis.url));
        out!("{}", status_view::memory(report.memory.as_ref()));
        out!("{}", status_view::render(&report));
        if let Some(name) = &args.queue {
            let known = known_queues(&mut conn).await?;
            if !known.contains(name) {
                outln!(
                    "(no proxy or dispatcher has registered queue {name:?} on this redis; known queues: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn reap(args: QueueArgs) -> anyhow::Result<ExitCode> {
    let queue = connect(&args).await?;
    serving(&queue, &args.redis.url).await?;
    let result = queue.reap_once(Duration::from_secs(60)).await;
    let report = result?;
    outln!(
        "queue {:?}: {} dead dispatcher(s) reaped; {} request(s) re-queued, {} answered 502, {} past their deadline dropped, {} dead-lettered",
        queue.name(),
        report.dispatchers,
        report.requeued,
        report.answered,
        report.expired,
        report.dead_lettered
    );
    Ok(ExitCode::SUCCESS)
}

/// On a terminal (and without `--quiet`), shows what a wait is waiting
/// for: each busy dispatcher with its in-flight and held requests, printed
/// again whenever that changes. Silent when stderr is not a terminal.
fn progress_printer(quiet: bool) -> impl FnMut(&Quiescence) {
    let show = !quiet && std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut last = String::new();
    move |q: &Quiescence| {
        if !show || q.quiescent {
            return;
        }
        let lines = status_view::busy_lines(q);
        if lines != last {
            eprint!(
                "[{:>5.1}s] waiting for {} dispatcher(s):\n{lines}",
                started.elapsed().as_secs_f64(),
                q.busy().len()
            );
            last = lines;
        }
    }
}

pub(crate) async fn window(args: WindowArgs) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed before anything else: from here on SIGINT and SIGTERM no
    // longer kill this process, so the queue is always resumed.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;

    let queue = connect(&args.target).await?;
    let status = serving(&queue, &args.target.redis.url).await?;
    refuse_unserved(&queue, &status, &args.target.redis.url, args.force)
        .await
        .context("the window was not opened and the command was not run")?;
    let opened = std::time::Instant::now();
    let held = queue
        .pause(&who("window"), Some(args.lease), true)
        .await
        .context("cannot open the window")?;
    let renewer = anteroom_runtime::Components::new();
    renewer.spawn(
        "pause lease renewer",
        renew_lease(queue.clone(), held.clone(), args.lease, renewer.stopping()),
    );

    let quiet = tokio::select! {
        q = queue.wait_quiescent(args.timeout, progress_printer(args.quiet)) => q.map_err(anyhow::Error::from),
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted while waiting for the queue to become quiet")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated while waiting for the queue to become quiet")),
    };
    let outcome = match quiet {
        Err(err) => Err(err.context("the command was not run")),
        Ok(_) => run_command(&args.command, &mut interrupt, &mut terminate).await,
    };
    let _ = renewer.shutdown(Duration::from_secs(5)).await;
    release(&queue, &held, args.lease).await;
    eprintln!(
        "the window lasted {}",
        status_view::duration_ms(opened.elapsed().as_millis() as u64)
    );
    outcome
}

async fn renew_lease(
    queue: Queue,
    held: anteroom_control::HeldPause,
    lease: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let every = (lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        match queue.renew(&held, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(
                    "the pause was lifted by someone else: traffic is flowing during the window"
                );
                return;
            }
            Err(err) => tracing::warn!(error = %err, "cannot renew the pause lease; retrying"),
        }
    }
}

/// Runs the command with inherited stdio; forwards SIGTERM, and waits for it
/// on SIGINT (a terminal's Ctrl-C reaches the whole process group).
async fn run_command(
    command: &[String],
    interrupt: &mut tokio::signal::unix::Signal,
    terminate: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<ExitCode> {
    let (program, rest) = command.split_first().context("no command given")?;
    eprintln!("queue is quiet; running: {}", command.join(" "));
    let mut child = match tokio::process::Command::new(program).args(rest).spawn() {
        Ok(child) => child,
        Err(err) => {
            // The shell's statuses: 127 not found, 126 found but not runnable.
            eprintln!("error: cannot run {program:?}: {err}");
            let code = if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return Ok(ExitCode::from(code));
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = interrupt.recv() => tracing::info!("interrupt: waiting for the command to exit"),
            _ = terminate.recv() => {
                if let Some(pid) = child.id() {
                    let _ = tokio::process::Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status()
                        .await;
                }
            }
        }
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    match status.signal() {
        Some(signal) => eprintln!("command killed by signal {signal} (status {code})"),
        None if code != 0 => eprintln!("command exited with status {code}"),
        None => {}
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Resumes, retrying for a while: a window must not leave the queue paused.
async fn release(queue: &Queue, held: &anteroom_control::HeldPause, lease: Duration) {
    let mut backoff = anteroom_redis::Backoff::new();
    for attempt in 1..=8 {
        match queue.resume_held(held).await {
            Ok(true) => {
                eprintln!("resumed queue {:?}", queue.name());
                return;
            }
            Ok(false) => {
                eprintln!("queue {:?} was already resumed", queue.name());
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, attempt, "cannot resume the queue; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    eprintln!(
        "error: could not resume queue {:?}; its pause lapses by itself within {}",
        queue.name(),
        status_view::duration_ms(lease.as_millis() as u64)
    );
}
