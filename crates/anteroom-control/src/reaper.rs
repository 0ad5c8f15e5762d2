//! The reaper: what happens to requests a crashed dispatcher was holding.
//!
//! A dispatcher that dies without a clean stop leaves its processing list
//! behind, and its heartbeat expires. A reaper claims such a list in one
//! atomic step (a Lua script that re-checks the heartbeat is gone and moves
//! every item into the reaper's own processing list), so exactly one reaper
//! wins each list, and a reaper that dies mid-way leaves the items in a list
//! that is reaped in turn. Each claimed request is then:
//! - past its deadline: dropped (the client already has its 504);
//! - safe to repeat (GET, HEAD, OPTIONS, or an `Idempotency-Key`): put back
//!   at the front of the queue ([`requeue`]), at most [`MAX_REPEATS`] times;
//! - otherwise: answered with 502 ([`Failure::Interrupted`]), because it may
//!   or may not have run.

use std::time::Duration;

use anteroom_protocol::{DeadLetter, Failure, Keys, RequestEnvelope, now_ms};
use anteroom_redis::SharedConnection;
use bytes::Bytes;

use crate::{ControlError, Queue};

/// Moves a dead dispatcher's processing list into the claimer's list and
/// returns the moved items; nil when its heartbeat exists, or when another
/// reaper already claimed it (its registry entry is gone).
const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return false end
local items = {}
while true do
  local item = redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT')
  if not item then break end
  table.insert(items, item)
end
redis.call('ZREM', KEYS[4], ARGV[1])
return items";

/// What one reaping pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Dead dispatchers whose lists were claimed.
    pub dispatchers: usize,
    /// Safe requests put back at the front of the queue.
    pub requeued: usize,
    /// Unsafe requests answered with 502.
    pub answered: usize,
    /// Requests past their deadline, dropped.
    pub expired: usize,
    /// Items that did not decode, moved to the dead-letter list.
    pub dead_lettered: usize,
}

impl Queue {
    /// One reaping pass. `claimer` must be a dispatcher id whose heartbeat
    /// stays alive during the pass (the caller's own): claimed items pass
    /// through its processing list. Replies get `reply_ttl` like any other.
    pub async fn reap(
        &self,
        claimer: &str,
        reply_ttl: Duration,
    ) -> Result<ReapReport, ControlError> {
        let mut conn = self.conn();
        let keys = &self.keys;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.dispatchers())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        let claim_list = keys.processing(claimer);
        let mut report = ReapReport::default();
        for id in ids.iter().filter(|id| id.as_str() != claimer) {
            let claimed: Option<Vec<Bytes>> = redis::cmd("EVAL")
                .arg(CLAIM)
                .arg(4)
                .arg(keys.dispatcher(id))
                .arg(keys.processing(id))
                .arg(&claim_list)
                .arg(keys.dispatchers())
                .arg(id)
                .query_async(&mut conn)
                .await?;
            let Some(items) = claimed else { continue };
            report.dispatchers += 1;
            tracing::warn!(
                queue = %keys.queue(),
                dead_dispatcher = %id,
                requests = items.len(),
                "reaping the requests of a dispatcher whose heartbeat expired"
            );
            let reaping = Reaping {
                keys,
                claim_list: &claim_list,
                claimer,
                dead: id,
                reply_ttl,
            };
            for raw in items {
                reaping.settle(&mut conn, raw, &mut report).await?;
            }
        }
        Ok(report)
    }
}

/// One dead dispatcher's list, being settled by `claimer`.
struct Reaping<'a> {
    keys: &'a Keys,
    /// The claimer's processing list, where the claimed items are now.
    claim_list: &'a str,
    claimer: &'a str,
    /// The dead dispatcher's id (its `dedupe` claims hold it).
    dead: &'a str,
    reply_ttl: Duration,
}

impl Reaping<'_> {
    /// Drops, requeues, answers or dead-letters one claimed item.
    async fn settle(
        &self,
        conn: &mut SharedConnection,
        raw: Bytes,
        report: &mut ReapReport,
    ) -> Result<(), ControlError> {
        let Self {
            keys,
            claim_list,
            claimer,
            dead,
            reply_ttl,
        } = *self;
        let envelope = match RequestEnvelope::decode(raw.clone()) {
            Ok(envelope) => envelope,
            Err(err) => {
                let reason =
                    format!("found in a dead dispatcher's list and does not decode: {err}");
                dead_letter(conn, keys, claim_list, &raw, &reason, claimer).await?;
                report.dead_lettered += 1;
                return Ok(());
            }
        };
        if !keys.is_replies(&envelope.reply_to) {
            // Not written by a proxy of this queue: no reply is pushed to
            // the key it names (see the dispatcher's own check).
            let reason = format!(
                "found in a dead dispatcher's list; reply_to {:?} is not a reply list of queue {}",
                envelope.reply_to.escape_debug().to_string(),
                keys.queue()
            );
            dead_letter(conn, keys, claim_list, &raw, &reason, claimer).await?;
            report.dead_lettered += 1;
            return Ok(());
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        pipe.atomic();
        if envelope.is_safe_to_repeat() && !envelope.is_expired(now) {
            let attempt = Attempt::MayHaveRun {
                claimed_by: dead,
                ttl: Duration::from_millis(envelope.deadline_ms - now),
            };
            match requeue(conn, keys, claim_list, &raw, &envelope.id, attempt).await? {
                Requeued::Requeued => {
                    report.requeued += 1;
                    return Ok(());
                }
                Requeued::NotHeld => return Ok(()),
                // Answered below, as an unsafe request is.
                Requeued::TooManyRepeats => {}
            }
        }
        let reply = if envelope.is_expired(now) {
            report.expired += 1;
            None
        } else {
            report.answered += 1;
            Some(Failure::Interrupted.to_envelope(&envelope.id).encode())
        };
        let done = crate::Done {
            reply_to: &envelope.reply_to,
            reply: reply.as_deref(),
            raw: &raw,
        };
        crate::complete(&mut pipe, claim_list, reply_ttl, &[done]);
        pipe.query_async::<()>(conn).await?;
        Ok(())
    }
}

/// Most times a request that may already have run is put back in the queue
/// (so it is delivered at most `1 + MAX_REPEATS` times). Past it the client
/// gets 502 ([`Failure::Interrupted`]): a request that kills whatever runs
/// it must not be retried until its deadline. Requests that never started
/// are not counted.
pub const MAX_REPEATS: u32 = 2;

/// Puts a request back at the front of its queue; see [`requeue`].
const REQUEUE: &str = r"
if ARGV[3] ~= '-1' then
  local n = redis.call('INCR', KEYS[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
  if n > tonumber(ARGV[3]) then return 2 end
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 1 end
redis.call('RPUSH', KEYS[2], ARGV[1])
if ARGV[2] ~= '' and redis.call('GET', KEYS[3]) == ARGV[2] then
  redis.call('DEL', KEYS[3])
end
return 0";

/// What [`requeue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeued {
    /// Back at the front of the queue.
    Requeued,
    /// Not in the list any more (an earlier attempt whose answer was lost
    /// moved it, or a reaper took the list): nothing done.
    NotHeld,
    /// It may have run and was repeated [`MAX_REPEATS`] times already:
    /// nothing done; answer it instead.
    TooManyRepeats,
}

/// Why a request goes back to the queue.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    /// Its handler never started it (the upstream never received it): put
    /// back whatever its method, not counted.
    NotStarted,
    /// It may have run (a dispatcher or an upstream died while running it);
    /// only requests safe to repeat are put back, counted against
    /// [`MAX_REPEATS`] for `ttl` (until its deadline). `claimed_by` is the
    /// dispatcher whose `dedupe` claim to release, so the repeat can run.
    MayHaveRun {
        /// The id the claim holds when this dispatcher claimed it.
        claimed_by: &'a str,
        /// How long to remember the count.
        ttl: Duration,
    },
}

/// Puts a request back at the front of its queue, taking it out of `list`
/// (the processing list that held it), in one Lua script: `LREM` from
/// `list`, and only if that removed it, `RPUSH` onto the requests list (the
/// right end is where dispatchers pull from: next in line) and, for
/// [`Attempt::MayHaveRun`], `DEL` of the `dedupe` claim if `claimed_by`
/// holds it. Guarded by the `LREM`, so running it again after an answer was
/// lost cannot queue a second copy. [`Attempt::MayHaveRun`] first counts
/// the repeat (`INCR anteroom:{q}:repeats:<id>`).
///
/// The one owner of a requeue: the reaper uses it for safe requests of dead
/// dispatchers, a dispatcher for requests its upstream never received or
/// failed on. Errors: the script failed (it may or may not have run; run it
/// again, the guard makes that safe).
pub async fn requeue(
    conn: &mut SharedConnection,
    keys: &Keys,
    list: &str,
    raw: &Bytes,
    request_id: &str,
    attempt: Attempt<'_>,
) -> Result<Requeued, ControlError> {
    let (owner, max, ttl_ms) = match attempt {
        Attempt::NotStarted => ("", -1_i64, 0_u64),
        Attempt::MayHaveRun { claimed_by, ttl } => (
            claimed_by,
            i64::from(MAX_REPEATS),
            (ttl.as_millis() as u64).max(1),
        ),
    };
    let code: i64 = redis::cmd("EVAL")
        .arg(REQUEUE)
        .arg(4)
        .arg(list)
        .arg(keys.requests())
        .arg(keys.claimed(request_id))
        .arg(keys.repeats(request_id))
        .arg(raw.as_ref())
        .arg(owner)
        .arg(max)
        .arg(ttl_ms)
        .query_async(conn)
        .await?;
    Ok(match code {
        0 => Requeued::Requeued,
        2 => Requeued::TooManyRepeats,
        _ => Requeued::NotHeld,
    })
}

/// Moves `raw` from `list` to the queue's dead-letter list, with the reason,
/// in one MULTI.
pub async fn dead_letter(
    conn: &mut SharedConnection,
    keys: &Keys,
    list: &str,
    raw: &Bytes,
    reason: &str,
    by: &str,
) -> Result<(), ControlError> {
    let letter = DeadLetter {
        reason: reason.to_owned(),
        at_ms: now_ms(),
        by: by.to_owned(),
        original: raw.clone(),
    };
    redis::pipe()
        .atomic()
        .cmd("LPUSH")
        .arg(keys.dead())
        .arg(letter.encode())
        .ignore()
        .cmd("LREM")
        .arg(list)
        .arg(1)
        .arg(raw.as_ref())
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}
