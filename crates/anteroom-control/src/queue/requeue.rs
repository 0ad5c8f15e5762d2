//! Putting a taken request back at the front of its queue, or setting it
//! aside in the dead-letter list.

use std::time::Duration;

use anteroom_protocol::{DeadLetter, Keys, now_ms};
use bytes::Bytes;
use redis::aio::ConnectionLike;

use crate::ControlError;

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
local release = false
if ARGV[2] ~= '' then
  local holder = redis.call('GET', KEYS[3])
  release = holder and (holder == ARGV[2] or string.sub(holder, 1, #ARGV[2] + 1) == ARGV[2] .. '/'
      or (ARGV[5] ~= '' and redis.call('EXISTS', ARGV[5] .. string.match(holder, '^[^/]*')) == 0))
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 1 end
redis.call('RPUSH', KEYS[2], ARGV[1])
if release then redis.call('DEL', KEYS[3]) end
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
    /// back whatever its method, not counted. `claimed_by` names the
    /// `dedupe` claim to release (if it is held so), so the next delivery
    /// can run: without that, whoever pulls it next finds it claimed and
    /// drops it, and its client waits for a 504.
    NotStarted {
        /// The claim's owner to release: this delivery's `<id>/<n>`, or a
        /// dispatcher id (which releases `<id>` or `<id>/<n>`); "" for
        /// none. A reaper's requeue is [`Attempt::Reaped`].
        claimed_by: &'a str,
    },
    /// It may have run (a dispatcher or an upstream died while running it);
    /// only requests safe to repeat are put back, counted against
    /// [`MAX_REPEATS`] for `ttl` (until its deadline). `claimed_by` names
    /// the `dedupe` claim to release, so the repeat can run.
    MayHaveRun {
        /// The claim's owner to release, as for
        /// [`Attempt::NotStarted`].
        claimed_by: &'a str,
        /// How long to remember the count.
        ttl: Duration,
    },
    /// Found in a processing list with no task holding it: a dead
    /// dispatcher's, being reaped, or an orphan of a lost reply (which may
    /// be a dead dispatcher's requests too, claimed by a reaper whose
    /// reply was lost, or reaped from a reaper that died mid-way). Counted
    /// as [`Attempt::MayHaveRun`]. Its `dedupe` claim is released when
    /// `dead` holds it (`<id>` or `<id>/<n>`), and also when the
    /// dispatcher holding it has no heartbeat (`anteroom:{q}:dispatcher:<id>`
    /// gone: dead, stopped, or cut off from Redis longer than its TTL);
    /// kept while the holder's heartbeat lives (it may be running a copy).
    /// docs/protocol.md, step 8, says what that costs.
    Reaped {
        /// The dispatcher whose list it was found in (the caller's own id
        /// for an orphan).
        dead: &'a str,
        /// How long to remember the count.
        ttl: Duration,
    },
}

/// Puts a request back at the front of its queue, taking it out of `list`
/// (the processing list that held it), in one Lua script: `LREM` from
/// `list`, and only if that removed it, `RPUSH` onto the requests list (the
/// right end is where dispatchers pull from: next in line) and `DEL` of the
/// `dedupe` claim if the attempt's owner holds it (the claim holds the
/// delivery, `<dispatcher id>/<n>`, or, written by older dispatchers, the
/// id alone) or, for [`Attempt::Reaped`], a dispatcher whose heartbeat key
/// is gone (read in the script, before anything is written, so that a
/// refused read leaves nothing half done; the key shares the queue's hash
/// tag, so its slot is the declared keys'). Guarded by the `LREM`, so running it
/// again after an answer was lost cannot queue a second copy.
/// [`Attempt::MayHaveRun`] and [`Attempt::Reaped`] first count the repeat
/// (`INCR anteroom:{q}:repeats:<id>`).
///
/// The one owner of a requeue: the reaper uses it for safe requests of dead
/// dispatchers, a dispatcher for requests its upstream never received or
/// failed on. Errors: the script failed (it may or may not have run; run it
/// again, the guard makes that safe).
pub async fn requeue(
    conn: &mut (impl ConnectionLike + Send),
    keys: &Keys,
    list: &str,
    raw: &Bytes,
    request_id: &str,
    attempt: Attempt<'_>,
) -> Result<Requeued, ControlError> {
    let counted = |ttl: Duration| (i64::from(MAX_REPEATS), (ttl.as_millis() as u64).max(1));
    let (owner, (max, ttl_ms), heartbeats) = match attempt {
        Attempt::NotStarted { claimed_by } => (claimed_by, (-1_i64, 0_u64), String::new()),
        Attempt::MayHaveRun { claimed_by, ttl } => (claimed_by, counted(ttl), String::new()),
        Attempt::Reaped { dead, ttl } => (dead, counted(ttl), keys.dispatcher("")),
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
        .arg(heartbeats)
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
    conn: &mut (impl ConnectionLike + Send),
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
