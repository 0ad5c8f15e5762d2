//! Completing requests: the one place replies are written to Redis.

use std::time::Duration;

use redis::RedisResult;
use redis::aio::ConnectionLike;

use super::millis;

/// A request held in a processing list, being completed.
#[derive(Debug, Clone, Copy)]
pub struct Done<'a> {
    /// The reply list named by the envelope (`anteroom:{q}:replies:<id>`).
    pub reply_to: &'a str,
    /// The encoded reply; `None` when the client gets none (its deadline
    /// has passed).
    pub reply: Option<&'a [u8]>,
    /// The envelope's bytes, as held in the processing list.
    pub raw: &'a [u8],
    /// Look for it from the processing list's tail (`LREM -1`) rather than
    /// its head (`LREM 1`): either removes one copy; the nearer end is
    /// cheaper for Redis. A pull pushes at the head, so the requests taken
    /// before this one lie toward the tail: the dispatcher sets it when
    /// fewer of those are in hand than of the ones taken after. Used by
    /// [`complete`] and [`complete_now`] only; the scripts
    /// ([`complete_when_full`], [`complete_if_held`]) search from the head.
    pub from_tail: bool,
}

/// Adds to `pipe` (the caller makes it a MULTI) what completes `items`
/// held in `processing`: their replies pushed to their reply lists, in
/// order and one RPUSH per list, each list's lifetime then set to
/// `reply_ttl` (so the replies of a proxy that died do not stay), and each
/// request removed from `processing` (`LREM 1`, or `LREM -1` when
/// [`Done::from_tail`]). The dispatcher's
/// completer and the reaper both complete through this.
pub fn complete(
    pipe: &mut redis::Pipeline,
    processing: &str,
    reply_ttl: Duration,
    items: &[Done<'_>],
) {
    let ttl_ms = millis(reply_ttl);
    let mut lists: Vec<&str> = items
        .iter()
        .filter(|d| d.reply.is_some())
        .map(|d| d.reply_to)
        .collect();
    lists.sort_unstable();
    lists.dedup();
    for list in lists {
        let push = pipe.cmd("RPUSH").arg(list);
        for reply in items
            .iter()
            .filter(|d| d.reply_to == list)
            .filter_map(|d| d.reply)
        {
            push.arg(reply);
        }
        push.ignore();
        pipe.cmd("PEXPIRE").arg(list).arg(ttl_ms).ignore();
    }
    for done in items {
        pipe.cmd("LREM")
            .arg(processing)
            .arg(if done.from_tail { -1 } else { 1 })
            .arg(done.raw)
            .ignore();
    }
}

/// Completes one request held in `processing` while Redis is over its
/// `maxmemory` (it refuses the `RPUSH` of [`complete`] with `OOM`): the
/// same commands, atomic, in a script allowed to run then (`allow-oom`,
/// Redis 7 "Script flags"). The request's removal frees at least what its
/// reply takes unless the reply is larger than the request; a dispatcher
/// holds at most its concurrency of them, so the overshoot is bounded.
/// Errors as [`complete_now`] (a `WRONGTYPE` reply list is in the text).
pub async fn complete_when_full<C: ConnectionLike + Send>(
    conn: &mut C,
    processing: &str,
    reply_ttl: Duration,
    done: &Done<'_>,
) -> RedisResult<()> {
    complete_in_script(conn, COMPLETE_WHEN_FULL, processing, reply_ttl, done).await
}

/// Completes `done` only if its request is still in `processing`: removes
/// it (`LREM 1`) and, if that removed it, pushes the reply, in one script
/// Redis runs even past its `maxmemory` (`allow-oom`). For a request that
/// another actor may have settled meanwhile (an orphan, found with no task
/// holding it). Errors are Redis's.
pub async fn complete_if_held<C: ConnectionLike + Send>(
    conn: &mut C,
    processing: &str,
    reply_ttl: Duration,
    done: &Done<'_>,
) -> RedisResult<()> {
    complete_in_script(conn, COMPLETE_IF_HELD, processing, reply_ttl, done).await
}

/// Runs a completion `script` (KEYS: processing, the reply list; ARGV: the
/// reply TTL in ms, the request's bytes, the reply when there is one).
async fn complete_in_script<C: ConnectionLike + Send>(
    conn: &mut C,
    script: &str,
    processing: &str,
    reply_ttl: Duration,
    done: &Done<'_>,
) -> RedisResult<()> {
    let mut eval = redis::cmd("EVAL");
    eval.arg(script)
        .arg(2)
        .arg(processing)
        .arg(done.reply_to)
        .arg(millis(reply_ttl))
        .arg(done.raw);
    if let Some(reply) = done.reply {
        eval.arg(reply);
    }
    eval.query_async::<i64>(conn).await.map(drop)
}

/// KEYS: processing, the reply list; ARGV: the reply TTL in ms, the
/// request's bytes, and the reply (absent: none is pushed). 1 when the
/// request was there.
const COMPLETE_IF_HELD: &str = r"#!lua flags=allow-oom
if redis.call('LREM', KEYS[1], 1, ARGV[2]) == 0 then return 0 end
if ARGV[3] then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1";

/// KEYS: processing, the reply list; ARGV: the reply TTL in ms, the
/// request's bytes, and the reply (absent: none is pushed).
const COMPLETE_WHEN_FULL: &str = r"#!lua flags=allow-oom
if ARGV[3] then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
redis.call('LREM', KEYS[1], 1, ARGV[2])
return 1";

/// Completes `items` held in `processing` in one `MULTI` of its own (see
/// [`complete`]). Errors: the `MULTI` failed; redis-rs reports a command
/// Redis refused inside it (`WRONGTYPE`, `NOPERM`) in the error's text.
pub async fn complete_now<C: ConnectionLike + Send>(
    conn: &mut C,
    processing: &str,
    reply_ttl: Duration,
    items: &[Done<'_>],
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    complete(&mut pipe, processing, reply_ttl, items);
    pipe.query_async(conn).await
}
