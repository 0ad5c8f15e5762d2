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

use anteroom_protocol::{DispatcherHeartbeat, Failure, Keys, RequestEnvelope, now_ms};
use anteroom_redis::SharedConnection;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{
    Attempt, Done, Presence, Requeued, Role, complete_if_held, complete_now, dead_letter, requeue,
};
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
                found: "found in a dead dispatcher's list",
                guarded: false,
            };
            for raw in items {
                reaping.settle(&mut conn, raw, &mut report).await?;
            }
        }
        Ok(report)
    }

    /// Every item of `owner`'s processing list (`LRANGE 0 -1`).
    pub async fn processing_list(&self, owner: &str) -> Result<Vec<Bytes>, ControlError> {
        Ok(redis::cmd("LRANGE")
            .arg(self.keys.processing(owner))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await?)
    }

    /// Settles `items`, found in `owner`'s own processing list with no task
    /// of it holding them (a pull whose reply was lost), as a reaper
    /// settles a dead dispatcher's: past the deadline, dropped; safe to
    /// repeat, requeued at the front; otherwise answered 502 (whether it
    /// ran cannot be told); not a producer's, dead-lettered. The caller
    /// makes sure no task of `owner` is handling them.
    ///
    /// Each is settled on its own: what was done, and the last error (the
    /// items it concerns stay in the list, for another call). A 502 is
    /// pushed only if the item was still in the list (another actor may
    /// have settled it meanwhile), and, as its removal, even past Redis's
    /// `maxmemory`.
    pub async fn settle_orphans(
        &self,
        owner: &str,
        items: Vec<Bytes>,
        reply_ttl: Duration,
    ) -> (ReapReport, Option<ControlError>) {
        let mut conn = self.conn();
        let claim_list = self.keys.processing(owner);
        let reaping = Reaping {
            keys: &self.keys,
            claim_list: &claim_list,
            claimer: owner,
            dead: owner,
            reply_ttl,
            found: "found in the processing list with no task holding it",
            guarded: true,
        };
        let (mut report, mut error) = (ReapReport::default(), None);
        for raw in items {
            if let Err(err) = reaping.settle(&mut conn, raw, &mut report).await {
                error = Some(err);
            }
        }
        (report, error)
    }

    /// Removes one copy of `raw` from `owner`'s processing list (`LREM 1`),
    /// with no reply: a second delivery of a request in hand.
    pub async fn remove_orphan(&self, owner: &str, raw: &[u8]) -> Result<(), ControlError> {
        super::remove(&mut self.conn(), &self.keys.processing(owner), raw).await?;
        Ok(())
    }

    /// One reaping pass by an operator (`anteroom reap`) rather than a
    /// dispatcher: the claimed requests pass through a processing list of
    /// a reaper of its own, registered as a dispatcher labelled `reaper`
    /// and kept alive for the length of the pass, so that if this process
    /// dies mid-way they are reaped in turn. Replies get `reply_ttl`.
    pub async fn reap_once(&self, reply_ttl: Duration) -> Result<ReapReport, ControlError> {
        let id = format!("reaper-{}", uuid::Uuid::new_v4().simple());
        let ttl = Duration::from_secs(30);
        let presence = Presence::new(&self.keys, Role::Dispatcher, &id, ttl);
        let beat = DispatcherHeartbeat {
            id: id.clone(),
            host: anteroom_redis::hostname(),
            pid: std::process::id(),
            label: "reaper".to_owned(),
            concurrency: 0,
            in_flight: 0,
            websockets: 0,
            paused: false,
            pause_id: None,
            started_at_ms: now_ms(),
            unhealthy: None,
        };
        presence.beat(&mut self.conn(), &beat).await?;
        let stop = CancellationToken::new();
        let wake = tokio::sync::Notify::new();
        let keep = super::keep_present(&presence, self.conn(), ttl / 3, &wake, &stop, || {
            beat.clone()
        });
        let pass = async {
            let report = self.reap(&id, reply_ttl).await;
            stop.cancel();
            report
        };
        let ((), report) = tokio::join!(keep, pass);
        report
    }
}

/// One dead dispatcher's list, being settled by `claimer`.
struct Reaping<'a> {
    keys: &'a Keys,
    /// The claimer's processing list, where the claimed items are now.
    claim_list: &'a str,
    claimer: &'a str,
    /// The dead dispatcher's id (its `dedupe` claims hold it, or
    /// `<id>/<n>`).
    dead: &'a str,
    reply_ttl: Duration,
    /// Where the items were found, for dead letters' reasons.
    found: &'a str,
    /// Answer an item only if it is still in `claim_list` (orphans, which
    /// another actor may have settled meanwhile; a reaper's claimed items
    /// are its alone).
    guarded: bool,
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
            found,
            guarded,
        } = *self;
        let envelope = match RequestEnvelope::decode(raw.clone()) {
            Ok(envelope) => envelope,
            Err(err) => {
                let reason = format!("{found}; does not decode: {err}");
                dead_letter(conn, keys, claim_list, &raw, &reason, claimer).await?;
                report.dead_lettered += 1;
                return Ok(());
            }
        };
        if !keys.is_replies(&envelope.reply_to) {
            // Not written by a proxy of this queue: no reply is pushed to
            // the key it names (see the dispatcher's own check).
            let reason = format!(
                "{found}; reply_to {:?} is not a reply list of queue {}",
                envelope.reply_to.escape_debug().to_string(),
                keys.queue()
            );
            dead_letter(conn, keys, claim_list, &raw, &reason, claimer).await?;
            report.dead_lettered += 1;
            return Ok(());
        }
        let now = now_ms();
        if envelope.is_safe_to_repeat() && !envelope.is_expired(now) {
            let attempt = Attempt::Reaped {
                dead,
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
        let done = Done {
            reply_to: &envelope.reply_to,
            reply: reply.as_deref(),
            raw: &raw,
            from_tail: false,
        };
        if guarded {
            complete_if_held(conn, claim_list, reply_ttl, &done).await?;
        } else {
            complete_now(conn, claim_list, reply_ttl, &[done]).await?;
        }
        Ok(())
    }
}
