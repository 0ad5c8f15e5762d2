//! `anteroom dead list|show|replay|purge`: the dead-letter list for
//! operators (docs/operations.md, "Dead letters"). The operations are
//! `anteroom_control`'s; this module picks the letters and prints.

use std::process::ExitCode;

use anteroom_control::{Client, LetterView, Queue};
use anteroom_protocol::{now_ms, printable};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::cli::{
    DeadCommand, DeadListArgs, DeadPurgeArgs, DeadReplayArgs, DeadShowArgs, QueueArgs,
};
use crate::ops::connect;
use crate::status_view::duration_ms;

impl DeadCommand {
    /// The queue the subcommand acts on.
    pub(crate) fn target(&self) -> &QueueArgs {
        match self {
            DeadCommand::List(a) => &a.target,
            DeadCommand::Show(a) => &a.target,
            DeadCommand::Replay(a) => &a.target,
            DeadCommand::Purge(a) => &a.target,
        }
    }
}

pub(crate) async fn run(command: DeadCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeadCommand::List(args) => list(args).await,
        DeadCommand::Show(args) => show(args).await,
        DeadCommand::Replay(args) => replay(args).await,
        DeadCommand::Purge(args) => purge(args).await,
    }
}

/// The letters, and a note on stderr when the list holds more than one
/// call reads.
/// The newest letters, newest first, or with `oldest` the oldest, oldest
/// first; a note on stderr when the list holds more than one call reads.
/// Unless `json`, first a line naming the queue and Redis, as every
/// control command's answer starts.
async fn letters(
    queue: &Queue,
    target: &QueueArgs,
    oldest: bool,
    json: bool,
) -> anyhow::Result<Vec<LetterView>> {
    let (views, total) = queue.dead_letters(oldest).await?;
    if !json {
        outln!(
            "queue {:?} on {}: {total} dead letter{}",
            queue.name(),
            crate::ops::redact(&target.redis.url),
            if total == 1 { "" } else { "s" }
        );
    }
    if (views.len() as u64) < total {
        eprintln!(
            "note: queue {:?} has {total} dead letters; this reads the {} {}{}",
            queue.name(),
            if oldest { "oldest" } else { "newest" },
            views.len(),
            if oldest {
                "; run it again for the rest"
            } else {
                ""
            }
        );
    }
    Ok(views)
}

/// A letter's summary, as `list --json` prints it.
fn summary(view: &LetterView, now: u64) -> Value {
    let letter = view.letter.as_ref();
    let request = view.request.as_ref();
    json!({
        "id": view.id(),
        "position": view.position,
        "reason": letter.map(|l| l.reason.as_str()),
        "by": letter.map(|l| l.by.as_str()),
        "at_ms": letter.map(|l| l.at_ms),
        "method": request.map(|r| r.method.as_str()),
        "target": request.map(|r| r.uri.as_str()),
        "enqueued_at_ms": request.map(|r| r.enqueued_at_ms),
        "deadline_ms": request.map(|r| r.deadline_ms),
        "client": view.client(now).as_str(),
    })
}

async fn list(args: DeadListArgs) -> anyhow::Result<ExitCode> {
    let queue = connect(&args.target).await?;
    let views = letters(&queue, &args.target, false, args.json).await?;
    let now = now_ms();
    let shown = views.iter().take(args.limit);
    if args.json {
        let all: Vec<Value> = shown.map(|v| summary(v, now)).collect();
        outln!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if views.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<36}  {:>8}  {:<10}  {:<40}  reason",
        "id",
        "age",
        "client",
        "request"
    );
    for view in shown {
        let age = view.letter.as_ref().map_or_else(
            || "?".to_owned(),
            |l| duration_ms(now.saturating_sub(l.at_ms)),
        );
        let request = view.request.as_ref().map_or_else(
            || "(does not decode)".to_owned(),
            |r| format!("{} {}", printable(&r.method), printable(&r.uri)),
        );
        let reason = view
            .letter
            .as_ref()
            .map_or("(not a dead letter)", |l| l.reason.as_str());
        outln!(
            "{:<36}  {:>8}  {:<10}  {:<40}  {}",
            printable(&view.id()),
            age,
            view.client(now).as_str(),
            request,
            printable(reason)
        );
    }
    if views.len() > args.limit {
        outln!("({} more; --limit shows more)", views.len() - args.limit);
    }
    Ok(ExitCode::SUCCESS)
}

fn find<'a>(views: &'a [LetterView], id: &str, queue: &Queue) -> anyhow::Result<&'a LetterView> {
    views.iter().find(|v| v.id() == id).ok_or_else(|| {
        anyhow::anyhow!(
            "no dead letter {id:?} in queue {:?} (anteroom dead list shows the ids)",
            queue.name()
        )
    })
}

async fn show(args: DeadShowArgs) -> anyhow::Result<ExitCode> {
    let queue = connect(&args.target).await?;
    let views = letters(&queue, &args.target, false, args.json).await?;
    let view = find(&views, &args.id, &queue)?;
    let now = now_ms();
    let body = view
        .request
        .as_ref()
        .map(|r| r.body.clone())
        .or_else(|| view.letter.as_ref().map(|l| l.original.clone()))
        .unwrap_or_else(|| view.raw.clone());
    if args.json {
        let mut value = summary(view, now);
        if let Some(request) = &view.request {
            let headers: Vec<Value> = request
                .headers
                .iter()
                .map(|(name, value)| json!([name, String::from_utf8_lossy(value)]))
                .collect();
            value["headers"] = Value::Array(headers);
            value["reply_to"] = json!(request.reply_to);
        }
        match std::str::from_utf8(&body) {
            Ok(text) => value["body"] = json!(text),
            Err(_) => {
                value["body_base64"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(&body));
            }
        }
        outln!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("id        {}", printable(&view.id()));
    if let Some(letter) = &view.letter {
        outln!(
            "set aside {} ago by {}: {}",
            duration_ms(now.saturating_sub(letter.at_ms)),
            printable(&letter.by),
            printable(&letter.reason)
        );
    }
    outln!("client    {}", view.client(now).as_str());
    match &view.request {
        Some(request) => {
            outln!(
                "request   {} {}",
                printable(&request.method),
                printable(&request.uri)
            );
            for (name, value) in request.headers.iter() {
                outln!(
                    "  {}: {}",
                    printable(name),
                    printable(&String::from_utf8_lossy(value))
                );
            }
            outln!("body      {} bytes", request.body.len());
        }
        None => outln!("original  {} bytes that do not decode", body.len()),
    }
    const SHOWN: usize = 4096;
    if !body.is_empty() {
        let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN)]);
        outln!("{}", printable(&text));
        if body.len() > SHOWN {
            outln!("({} bytes more; --json has them all)", body.len() - SHOWN);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(args: DeadReplayArgs) -> anyhow::Result<ExitCode> {
    if args.hold.is_zero() || args.hold > anteroom_protocol::MAX_HOLD {
        anyhow::bail!(
            "--hold must be above zero and at most 24h (dispatchers set aside deadlines further ahead)"
        );
    }
    let queue = connect(&args.target).await?;
    let views = letters(&queue, &args.target, true, args.json).await?;
    let chosen: Vec<&LetterView> = match &args.id {
        Some(id) => vec![find(&views, id, &queue)?],
        None => views.iter().collect(),
    };
    let now = now_ms();
    let deadline = now.saturating_add(u64::try_from(args.hold.as_millis()).unwrap_or(u64::MAX));
    let (mut replayed, mut skipped) = (0, 0);
    let mut results = Vec::new();
    // Each goes to the taking end of the queue (RPUSH), so the newest is
    // pushed first and the oldest, pushed last, runs first: the order
    // they first arrived in.
    for view in chosen.into_iter().rev() {
        let client = view.client(now);
        let outcome = if let Err(err) = anteroom_control::replayable(&queue, view) {
            Err(err.to_string())
        } else if client != Client::Waiting && !args.without_client {
            Err(format!(
                "its client is gone ({}): replaying runs it and no one gets the answer; \
                 pass --without-client to run it anyway",
                client.as_str()
            ))
        } else if queue.replay_dead(view, deadline).await? {
            Ok("replayed")
        } else {
            Err("no longer in the list (replayed or purged meanwhile)".to_owned())
        };
        match &outcome {
            Ok(_) => replayed += 1,
            Err(_) => skipped += 1,
        }
        if args.json {
            results.push(match &outcome {
                Ok(done) => json!({"id": view.id(), "outcome": done, "client": client.as_str()}),
                Err(why) => {
                    json!({"id": view.id(), "outcome": "skipped", "client": client.as_str(), "why": why})
                }
            });
        } else {
            match &outcome {
                Ok(_) => outln!(
                    "replayed {}: back at the front of queue {:?}, deadline in {}",
                    printable(&view.id()),
                    queue.name(),
                    duration_ms(deadline.saturating_sub(now))
                ),
                Err(why) => outln!("skipped  {}: {}", printable(&view.id()), why),
            }
        }
    }
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"replayed": replayed, "skipped": skipped, "letters": results})
            )?
        );
    } else {
        outln!("{replayed} replayed, {skipped} skipped");
    }
    // One letter asked for and not replayed: the command did not do it.
    Ok(if args.id.is_some() && replayed == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn purge(args: DeadPurgeArgs) -> anyhow::Result<ExitCode> {
    let queue = connect(&args.target).await?;
    let views = letters(&queue, &args.target, true, args.json).await?;
    let now = now_ms();
    let cutoff = args
        .older_than
        .map(|d| now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    let (mut purged, mut kept) = (0u64, 0u64);
    for view in &views {
        let at = view.letter.as_ref().map_or(0, |l| l.at_ms);
        if cutoff.is_some_and(|cutoff| at > cutoff) {
            kept += 1;
            continue;
        }
        if queue.remove_dead(view).await? {
            purged += 1;
        }
    }
    if args.json {
        outln!("{}", json!({"purged": purged, "kept": kept}));
    } else {
        outln!(
            "purged {purged} dead letters from queue {:?}; {kept} kept",
            queue.name()
        );
    }
    Ok(ExitCode::SUCCESS)
}
