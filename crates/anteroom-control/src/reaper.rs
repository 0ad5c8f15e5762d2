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
//!   at the front of the queue;
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
            for raw in items {
                settle(
                    &mut conn,
                    keys,
                    &claim_list,
                    claimer,
                    raw,
                    reply_ttl,
                    &mut report,
                )
                .await?;
            }
        }
        Ok(report)
    }
}

async fn settle(
    conn: &mut SharedConnection,
    keys: &Keys,
    claim_list: &str,
    claimer: &str,
    raw: Bytes,
    reply_ttl: Duration,
    report: &mut ReapReport,
) -> Result<(), ControlError> {
    let envelope = match RequestEnvelope::decode(raw.clone()) {
        Ok(envelope) => envelope,
        Err(err) => {
            let reason = format!("found in a dead dispatcher's list and does not decode: {err}");
            dead_letter(conn, keys, claim_list, &raw, &reason, claimer).await?;
            report.dead_lettered += 1;
            return Ok(());
        }
    };
    let mut pipe = redis::pipe();
    pipe.atomic();
    if envelope.is_expired(now_ms()) {
        report.expired += 1;
    } else if envelope.is_safe_to_repeat() {
        requeue_into(&mut pipe, keys, claim_list, &raw, &envelope.id);
        pipe.query_async::<()>(conn).await?;
        report.requeued += 1;
        return Ok(());
    } else {
        let reply = Failure::Interrupted.to_envelope(&envelope.id);
        pipe.cmd("RPUSH")
            .arg(&envelope.reply_to)
            .arg(reply.encode())
            .ignore()
            .cmd("PEXPIRE")
            .arg(&envelope.reply_to)
            .arg(reply_ttl.as_millis() as u64)
            .ignore();
        report.answered += 1;
    }
    pipe.cmd("LREM")
        .arg(claim_list)
        .arg(1)
        .arg(raw.as_ref())
        .ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

/// The MULTI that puts a request back at the front of its queue, taking it
/// out of `list` (the processing list that held it): RPUSH onto the
/// requests list (the right end is where dispatchers pull from, so it is
/// next in line), DEL of its `dedupe` claim (or the repeat would be skipped
/// as already claimed), LREM from `list`.
///
/// The one owner of a requeue: the reaper uses it for safe requests of dead
/// dispatchers, a dispatcher for requests its upstream never received.
/// Run it with `query_async::<()>`; if it fails, nothing moved.
pub fn requeue(keys: &Keys, list: &str, raw: &Bytes, request_id: &str) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    requeue_into(&mut pipe, keys, list, raw, request_id);
    pipe
}

/// The commands of [`requeue`], added to an atomic `pipe`.
fn requeue_into(
    pipe: &mut redis::Pipeline,
    keys: &Keys,
    list: &str,
    raw: &Bytes,
    request_id: &str,
) {
    pipe.cmd("RPUSH")
        .arg(keys.requests())
        .arg(raw.as_ref())
        .ignore()
        .cmd("DEL")
        .arg(keys.claimed(request_id))
        .ignore()
        .cmd("LREM")
        .arg(list)
        .arg(1)
        .arg(raw.as_ref())
        .ignore();
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
