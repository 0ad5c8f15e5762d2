//! The completer: replies written to Redis in batches, each batch one
//! `MULTI` (see `anteroom_control::queue::complete`).

use std::sync::Arc;

use anteroom_control::queue::{self, Done};
use anteroom_protocol::now_ms;
use anteroom_redis::{Backoff, SharedConnection, sleep_or_stop};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::worker::Shared;

/// Most completions written in one round trip.
const MAX_COMPLETIONS: usize = 128;

/// A finished request: its reply, to be pushed, and its envelope, to be
/// removed from the processing list.
pub(crate) struct Completion {
    pub(crate) reply_to: String,
    pub(crate) reply: Vec<u8>,
    pub(crate) raw: Bytes,
    pub(crate) deadline_ms: u64,
    /// Sent once the completion is in Redis; dropped if it never got there.
    pub(crate) done: oneshot::Sender<()>,
}

/// Writes completions to Redis in batches: whatever finished while the
/// previous batch was on the wire goes in the next, so under load one round
/// trip completes many requests. Each batch is one MULTI that pushes every
/// reply (one RPUSH per reply list), refreshes the reply lists' TTL and
/// removes each request from the processing list: every completion stays
/// atomic. A failed batch is retried with backoff, each completion until its
/// request's deadline (past it the reply is worth nothing, and the request
/// stays in the processing list for a reaper). Runs until `stop`.
pub(crate) async fn completer(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Completion>,
    stop: CancellationToken,
) {
    let mut conn = shared.conn.clone();
    let mut batch: Vec<Completion> = Vec::with_capacity(MAX_COMPLETIONS);
    loop {
        let first = tokio::select! {
            next = rx.recv() => match next {
                Some(completion) => completion,
                None => return,
            },
            () = stop.cancelled() => return,
        };
        batch.push(first);
        let mut backoff = Backoff::new();
        let mut attempt = 0u32;
        while !batch.is_empty() {
            while batch.len() < MAX_COMPLETIONS {
                match rx.try_recv() {
                    Ok(completion) => batch.push(completion),
                    Err(_) => break,
                }
            }
            attempt += 1;
            let err = match complete_batch(&shared, &mut conn, &batch).await {
                Ok(()) => {
                    if attempt > 1 {
                        tracing::info!(attempt, "completion succeeded after retrying");
                    }
                    shared.replicate().await;
                    for completion in batch.drain(..) {
                        shared.unlisted(&completion.raw);
                        let _ = completion.done.send(());
                    }
                    break;
                }
                Err(err) if anteroom_redis::is_out_of_memory(&err) => {
                    // Redis is over its maxmemory: each completion in a
                    // script allowed to run then, so what is held is still
                    // answered (and its memory freed).
                    let before = batch.len();
                    batch = complete_each(&shared, &mut conn, batch, true).await;
                    if batch.len() < before {
                        tracing::warn!(
                            completed = before - batch.len(),
                            "Redis is full (OOM): completed past its maxmemory"
                        );
                        continue;
                    }
                    err
                }
                Err(err) if batch.len() > 1 && refused_for_good(&err) => {
                    // Redis refused a command (a reply list that is not a
                    // list, say): one completion's fault must not hold the
                    // others back, so each is tried alone. A WRONGTYPE
                    // comes from EXEC running the commands, and a MULTI
                    // has no rollback: the completions whose reply list
                    // is a list were written, and are not written twice.
                    if err.to_string().contains("WRONGTYPE") {
                        batch = settle_written(&shared, &mut conn, batch).await;
                    }
                    batch = complete_each(&shared, &mut conn, batch, false).await;
                    continue;
                }
                Err(err) if refused_for_good(&err) => {
                    for completion in batch.drain(..) {
                        give_up(&shared, &mut conn, completion, &err).await;
                    }
                    break;
                }
                Err(err) => err,
            };
            let delay = backoff.next_delay();
            let next_try = now_ms().saturating_add(delay.as_millis() as u64);
            let before = batch.len();
            // Dropping a completion's `done` tells its request it gave up.
            batch.retain(|c| c.deadline_ms > next_try);
            if batch.len() < before {
                tracing::error!(error = %err, attempt, given_up = before - batch.len(), "completion failed; giving up on requests past their deadline");
            }
            if batch.is_empty() {
                break;
            }
            tracing::warn!(error = %err, attempt, pending = batch.len(), "completion failed; retrying");
            if sleep_or_stop(&stop, delay).await {
                return;
            }
        }
    }
}

/// Whether Redis refused a command in a way retrying cannot mend: a key
/// of the wrong type (a reply list that holds a string), or an ACL that
/// forbids it. Everything else (a lost connection, a cluster moving or
/// failing over, `OOM`, `READONLY` during a failover) is retried until the
/// deadline. redis-rs reports errors inside a MULTI as text, so the codes
/// are looked for there.
pub(crate) fn refused_for_good(err: &redis::RedisError) -> bool {
    let text = err.to_string();
    text.contains("WRONGTYPE") || text.contains("NOPERM")
}

/// Completes each of `batch` on its own: in a MULTI of its own, or, when
/// Redis is over its maxmemory (`full`), with
/// [`queue::complete_when_full`]. Those Redis refuses for good are given up
/// (their requests stay in the processing list for a reaper); those that
/// fail otherwise are returned, to be retried.
async fn complete_each(
    shared: &Shared,
    conn: &mut SharedConnection,
    batch: Vec<Completion>,
    full: bool,
) -> Vec<Completion> {
    let mut retry = Vec::new();
    for completion in batch {
        let written = if full {
            let done = Done {
                reply_to: &completion.reply_to,
                reply: Some(&completion.reply),
                raw: &completion.raw,
                from_tail: false,
            };
            let (processing, ttl) = (&shared.processing_key, shared.settings.reply_ttl);
            queue::complete_when_full(conn, processing, ttl, &done).await
        } else {
            complete_batch(shared, conn, std::slice::from_ref(&completion)).await
        };
        match written {
            Ok(()) => {
                shared.replicate().await;
                shared.unlisted(&completion.raw);
                let _ = completion.done.send(());
            }
            Err(err) if refused_for_good(&err) => give_up(shared, conn, completion, &err).await,
            Err(_) => retry.push(completion),
        }
    }
    retry
}

/// After a batch's `EXEC` ran and one of its commands met a key of the
/// wrong type (Redis "Transactions": errors inside `EXEC` do not stop
/// the other commands): settles the completions whose reply list is a
/// list holding something (their reply was pushed; pushing it again would
/// answer twice) and returns the others. One whose list cannot be looked
/// at is returned.
async fn settle_written(
    shared: &Shared,
    conn: &mut SharedConnection,
    batch: Vec<Completion>,
) -> Vec<Completion> {
    let mut rest = Vec::new();
    let mut settled = Vec::new();
    for completion in batch {
        // LLEN, which the documented dispatcher ACL user may run: a
        // WRONGTYPE error for a key that is no list, 0 for none.
        let len: redis::RedisResult<u64> = redis::cmd("LLEN")
            .arg(&completion.reply_to)
            .query_async(conn)
            .await;
        match len {
            Ok(len) if len > 0 => settled.push(completion),
            _ => rest.push(completion),
        }
    }
    if !settled.is_empty() {
        shared.replicate().await;
        for completion in settled {
            shared.unlisted(&completion.raw);
            let _ = completion.done.send(());
        }
    }
    rest
}

/// Gives up a completion Redis refuses for good: its reply is lost (the
/// client gets 504 at its deadline), and the request, which ran, is taken
/// out of the processing list on its own so no reaper runs it again.
async fn give_up(
    shared: &Shared,
    conn: &mut SharedConnection,
    completion: Completion,
    err: &redis::RedisError,
) {
    tracing::error!(
        error = %err,
        reply_to = %anteroom_protocol::printable(&completion.reply_to),
        "completion refused by redis; its reply is given up"
    );
    let removed = queue::remove(conn, &shared.processing_key, &completion.raw).await;
    if let Err(err) = removed {
        tracing::error!(error = %err, "the request stays in the processing list");
    }
}

/// Completes `batch` in one MULTI (see [`queue::complete`]).
async fn complete_batch(
    shared: &Shared,
    conn: &mut SharedConnection,
    batch: &[Completion],
) -> redis::RedisResult<()> {
    let raws: Vec<&Bytes> = batch.iter().map(|c| &c.raw).collect();
    let done: Vec<Done<'_>> = batch
        .iter()
        .zip(shared.nearer_tail(&raws))
        .map(|(c, from_tail)| Done {
            reply_to: &c.reply_to,
            reply: Some(&c.reply),
            raw: &c.raw,
            from_tail,
        })
        .collect();
    queue::complete_now(
        conn,
        &shared.processing_key,
        shared.settings.reply_ttl,
        &done,
    )
    .await
}
