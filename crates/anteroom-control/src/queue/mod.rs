//! The wire operations of a queue: every Redis command that moves a request
//! through its lists, and the heartbeats that say who holds what. The proxy,
//! the dispatcher, the reaper and the CLI call these; none of them builds
//! these commands itself, so a change to the wire (docs/protocol.md) is made
//! here.
//!
//! | operation | commands | caller |
//! |---|---|---|
//! | [`enqueue`] | `LPUSH requests e1 e2 …` (+ `WAIT` when durable) | proxy |
//! | [`pull_batch`] | `MULTI` of `LMOVE requests processing RIGHT LEFT` | dispatcher |
//! | [`pull_blocking`] | `BLMOVE requests processing RIGHT LEFT timeout` + `LLEN requests` | dispatcher |
//! | [`pull_client_id`], [`unblock`] | `CLIENT ID`, `CLIENT UNBLOCK id TIMEOUT` | dispatcher |
//! | [`claim`], [`claim_again`] | `SET claimed:<id> owner NX PX ttl`; Lua: `GET`, `SET … PX` unless held by another | dispatcher (`dedupe`) |
//! | [`complete`] / [`complete_now`] | `MULTI`: `RPUSH reply_to …`, `PEXPIRE`, `LREM processing 1` | dispatcher, reaper |
//! | [`remove`] | `LREM processing 1 envelope` | dispatcher |
//! | [`requeue`] | Lua: `LREM`, `RPUSH requests`, `DEL claimed` (`INCR repeats`) | dispatcher, reaper |
//! | [`dead_letter`] | `MULTI`: `LPUSH dead letter`, `LREM` | dispatcher, reaper |
//! | [`Queue::reap`], [`Queue::reap_once`] | Lua: claim a dead dispatcher's list | dispatcher, `anteroom reap` |
//! | [`pop_replies`] | `BLMPOP block 1 list LEFT COUNT n` | tests, other readers |
//! | [`follow_list`] | `INCR epoch` per connection; Lua (fenced by the epoch): `DEL popped`, landing and `LRANGE`+`LTRIM list` into `popped`; when empty `BLMOVE list landing LEFT RIGHT block` + `PEXPIRE landing` | proxy (replies), dispatcher (credits) |
//! | [`push_reply`], [`push_replies`] | `RPUSH list frame` + `PEXPIRE` | dispatcher (stream frames, taken), proxy (credits, request body chunks) |
//! | [`write_frames`] | [`push_replies`] in the background, batched per list | proxy and dispatcher (credits, cancels) |
//! | [`replicate`] | `WAIT 1 ms` | proxy (in [`enqueue`]), dispatcher |
//! | [`Presence`] ([`keep_present`]) | `SET hb PX ttl` + `ZADD registry`; `DEL` + `ZREM` on leave | proxy, dispatcher, `anteroom reap` |
//!
//! Every function takes the connection to use: the component's shared,
//! pipelined one, or (for the blocking commands) a dedicated one
//! (`anteroom_redis::blocking_for`). Errors are redis-rs's; none of these
//! retries by itself, since whether a retry is safe is the caller's call.
//!
//! [`Queue::reap`]: crate::Queue::reap
//! [`Queue::reap_once`]: crate::Queue::reap_once

mod complete;
mod frames;
mod presence;
mod reap;
mod requeue;

pub use complete::{Done, complete, complete_if_held, complete_now, complete_when_full};
pub use frames::{FrameReceiver, FrameSender, write_frames};
pub use presence::{Presence, Role, keep_present, present};
pub use reap::ReapReport;
pub use requeue::{Attempt, MAX_REPEATS, Requeued, dead_letter, requeue};

use std::time::Duration;

use anteroom_redis::{Backoff, Durability, Target, sleep_or_stop};
use bytes::Bytes;
use redis::RedisResult;
use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

/// `LPUSH requests p1 p2 …`: appends `payloads` to the queue in one
/// command, oldest first (the first payload is taken first). With a
/// `durability` that sees a replica, `WAIT 1 <wait>` follows in the same
/// round trip (see [`replicate`]).
///
/// Errors: the command failed; Redis may or may not have received it.
pub async fn enqueue<C, P>(
    conn: &mut C,
    requests: &str,
    payloads: &[P],
    durability: Option<&Durability>,
) -> RedisResult<()>
where
    C: ConnectionLike + Send,
    P: AsRef<[u8]>,
{
    let mut lpush = redis::cmd("LPUSH");
    lpush.arg(requests);
    for payload in payloads {
        lpush.arg(payload.as_ref());
    }
    let Some((durability, wait)) = durability.and_then(|d| Some((d, d.wait()?))) else {
        return lpush.query_async::<i64>(conn).await.map(drop);
    };
    let (_, replicas): (i64, i64) = redis::pipe()
        .add_command(lpush)
        .add_command(wait_cmd(wait))
        .query_async(conn)
        .await?;
    observed(durability, wait, replicas, payloads.len());
    Ok(())
}

/// Moves up to `count` requests from `requests` into `processing`, oldest
/// first, in one `MULTI` of `LMOVE … RIGHT LEFT`: the same atomic move
/// `BLMOVE` makes, for many items in one round trip (a `MULTI` of plain
/// `LMOVE`s costs Redis less than a Lua loop; docs/performance.md). Returns
/// what was moved (empty when the queue was).
pub async fn pull_batch<C: ConnectionLike + Send>(
    conn: &mut C,
    requests: &str,
    processing: &str,
    count: usize,
) -> RedisResult<Vec<Bytes>> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for _ in 0..count {
        pipe.cmd("LMOVE")
            .arg(requests)
            .arg(processing)
            .arg("RIGHT")
            .arg("LEFT");
    }
    match pipe.query_async::<Vec<Option<Bytes>>>(conn).await {
        Ok(items) => Ok(items.into_iter().flatten().collect()),
        // A full Redis (`maxmemory`, `noeviction`) refuses LMOVE, which
        // only moves bytes: the same move in a script allowed to run then.
        Err(err) if anteroom_redis::is_out_of_memory(&err) => {
            redis::cmd("EVAL")
                .arg(PULL_WHEN_FULL)
                .arg(2)
                .arg(requests)
                .arg(processing)
                .arg(count)
                .query_async(conn)
                .await
        }
        Err(err) => Err(err),
    }
}

/// [`pull_batch`] for a Redis over its `maxmemory`: moving a request
/// from one list to another grows nothing, and without it the requests
/// queued could never drain, nor their memory free. `allow-oom` is the
/// script flag for this (Redis 7, "Script flags"). KEYS: requests,
/// processing; ARGV: how many at most. Returns the moved items.
const PULL_WHEN_FULL: &str = r"#!lua flags=allow-oom
local moved = {}
for _ = 1, tonumber(ARGV[1]) do
  local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not item then break end
  moved[#moved + 1] = item
end
return moved";

/// `BLMOVE requests processing RIGHT LEFT <block>`: waits up to `block`
/// for one request and moves it. Send it on a dedicated connection whose
/// response timeout outlasts `block` (`anteroom_redis::blocking_for`);
/// [`unblock`] cuts it short. An `LLEN requests` goes in the same round
/// trip, run as soon as the `BLMOVE` returns: how many requests wait
/// behind the one moved, so that the caller knows, without another round
/// trip, whether its next pull should be a [`pull_batch`] or another
/// blocking wait.
///
/// # Errors
/// The `BLMOVE`'s error (the connection's, or the server's: `OOM` over
/// `maxmemory`, `MOVED`). An error of the `LLEN` alone (a user without
/// `+llen`, an `ASK` while the slot migrates) is not one: the request the
/// `BLMOVE` moved is returned, with `waiting` unknown.
pub async fn pull_blocking<C: ConnectionLike + Send>(
    conn: &mut C,
    requests: &str,
    processing: &str,
    block: Duration,
) -> RedisResult<Blocked> {
    // Each reply on its own: a failed LLEN must not hide the request the
    // BLMOVE moved (it would become an orphan of a pull thought failed).
    let (item, waiting): (RedisResult<Option<Bytes>>, RedisResult<u64>) = redis::pipe()
        .ignore_errors()
        .cmd("BLMOVE")
        .arg(requests)
        .arg(processing)
        .arg("RIGHT")
        .arg("LEFT")
        .arg(block.as_secs_f64())
        .cmd("LLEN")
        .arg(requests)
        .query_async(conn)
        .await?;
    Ok(Blocked {
        item: item?,
        waiting: waiting.ok(),
    })
}

/// What one [`pull_blocking`] brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The request moved into the processing list; `None` when the block
    /// elapsed (or was cut short) first.
    pub item: Option<Bytes>,
    /// `LLEN` of the queue right after: requests still waiting; `None`
    /// when the `LLEN` failed.
    pub waiting: Option<u64>,
}

/// `CLIENT ID` of the connection a pull is sent on, for [`unblock`].
pub async fn pull_client_id<C: ConnectionLike + Send>(conn: &mut C) -> RedisResult<u64> {
    redis::cmd("CLIENT").arg("ID").query_async(conn).await
}

/// `CLIENT UNBLOCK <client_id> TIMEOUT`: a [`pull_blocking`] blocked on
/// that connection returns at once, as if it had timed out (nothing is
/// moved). Sent on another connection.
pub async fn unblock<C: ConnectionLike + Send>(conn: &mut C, client_id: u64) -> RedisResult<()> {
    redis::cmd("CLIENT")
        .arg("UNBLOCK")
        .arg(client_id)
        .arg("TIMEOUT")
        .query_async::<i64>(conn)
        .await
        .map(drop)
}

/// `SET anteroom:{q}:claimed:<request_id> <owner> NX PX <ttl>`: claims a
/// `dedupe` request before it runs. True when this call claimed it, false
/// when an earlier delivery already did. `owner` names this delivery,
/// `<dispatcher id>/<n>` (docs/protocol.md, step 3): when the answer is
/// lost, [`claim_again`] tells a claim this delivery made from another's.
pub async fn claim<C: ConnectionLike + Send>(
    conn: &mut C,
    claimed_key: &str,
    owner: &str,
    ttl: Duration,
) -> RedisResult<bool> {
    let ttl_ms = millis(ttl).max(1);
    let set: RedisResult<Option<String>> = redis::cmd("SET")
        .arg(claimed_key)
        .arg(owner)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms)
        .query_async(conn)
        .await;
    match set {
        Ok(set) => Ok(set.is_some()),
        // Redis over its maxmemory refuses the SET, and requests are still
        // taken past it (`pull_batch`): a claim is a few bytes per request
        // in hand, so it goes in a script Redis runs then, rather than the
        // request running unclaimed.
        Err(err) if anteroom_redis::is_out_of_memory(&err) => {
            claim_again(conn, claimed_key, owner, ttl).await
        }
        Err(err) => Err(err),
    }
}

/// [`claim`] as a script that may run any number of times: true when the
/// claim key is free (claimed now) or already holds `owner` (this
/// delivery's own claim, made by an earlier try whose answer was lost);
/// false when another delivery holds it. Runs past Redis's `maxmemory`
/// too (`allow-oom`: a claim is a few bytes per request in hand). Safe to
/// send again after any error.
pub async fn claim_again<C: ConnectionLike + Send>(
    conn: &mut C,
    claimed_key: &str,
    owner: &str,
    ttl: Duration,
) -> RedisResult<bool> {
    let claimed: i64 = redis::cmd("EVAL")
        .arg(CLAIM_WHEN_FULL)
        .arg(1)
        .arg(claimed_key)
        .arg(owner)
        .arg(millis(ttl).max(1))
        .query_async(conn)
        .await?;
    Ok(claimed == 1)
}

/// [`claim_again`]. KEYS: the claim key; ARGV: the owner (this delivery),
/// the TTL in ms. 1 when claimed here, now or by an earlier try.
const CLAIM_WHEN_FULL: &str = r"#!lua flags=allow-oom
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1";

/// `RPUSH list frame` and `PEXPIRE list ttl` in one round trip: a frame of
/// a streamed reply on its way to a proxy's reply list (the end goes with
/// the request's removal, through [`complete`]), or a credit on its way to
/// a dispatcher's credit list. The TTL keeps a list whose reader died from
/// staying.
pub async fn push_reply<C: ConnectionLike + Send>(
    conn: &mut C,
    list: &str,
    frame: &[u8],
    ttl: Duration,
) -> RedisResult<()> {
    push_replies(conn, &[(list.to_owned(), frame.to_vec())], ttl).await
}

/// [`push_reply`] for many `(list, frame)` pairs in one round trip (a
/// pipeline, in order): credits from a proxy to its dispatchers.
pub async fn push_replies<C: ConnectionLike + Send>(
    conn: &mut C,
    frames: &[(String, Vec<u8>)],
    ttl: Duration,
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    for (list, frame) in frames {
        pipe.cmd("RPUSH").arg(list).arg(frame).ignore();
        pipe.cmd("PEXPIRE").arg(list).arg(millis(ttl)).ignore();
    }
    pipe.query_async(conn).await
}

/// `LREM processing 1 <raw>`: takes one request out of a processing list
/// without replying (expired, already claimed, or a reply Redis refused).
pub async fn remove<C: ConnectionLike + Send>(
    conn: &mut C,
    processing: &str,
    raw: &[u8],
) -> RedisResult<()> {
    redis::cmd("LREM")
        .arg(processing)
        .arg(1)
        .arg(raw)
        .query_async::<i64>(conn)
        .await
        .map(drop)
}

/// `BLMPOP <block> 1 <replies> LEFT COUNT <count>`: up to `count` items
/// from a list, oldest first, waiting up to `block` for the first: a
/// proxy's reply list, or a dispatcher's credit list. Send it on a
/// dedicated connection (`anteroom_redis::blocking_for`).
pub async fn pop_replies<C: ConnectionLike + Send>(
    conn: &mut C,
    replies: &str,
    block: Duration,
    count: usize,
) -> RedisResult<Vec<Bytes>> {
    let popped: Option<(String, Vec<Bytes>)> = redis::cmd("BLMPOP")
        .arg(block.as_secs_f64())
        .arg(1)
        .arg(replies)
        .arg("LEFT")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok(popped.map(|(_, replies)| replies).unwrap_or_default())
}

/// How long one `BLMOVE` of [`follow_list`] blocks before it loops (and
/// looks for the stop).
const FOLLOW_BLOCK: Duration = Duration::from_secs(1);
/// Items [`follow_list`] takes per round trip.
const FOLLOW_BATCH: usize = 256;
/// How long a reader's popped list outlives its last take: what a reader
/// that died (or lost Redis for longer) had taken and not acknowledged. As
/// long as a reply list lives after its last push (the dispatchers' default
/// reply TTL).
const POPPED_TTL: Duration = Duration::from_secs(60);
/// How long a reader waits before it looks again when Redis, over its
/// `maxmemory`, refuses the `BLMOVE` (a blocking wait it counts as a write).
const FULL_POLL: Duration = Duration::from_millis(20);

/// Takes up to `ARGV[1]` items from the head of `KEYS[1]` into `KEYS[2]`
/// (the reader's popped list), after emptying `KEYS[2]` (what the previous
/// take moved there has been delivered), together with whatever a
/// `BLMOVE` left in `KEYS[4]` (the landing list). Returns `{landed,
/// taken}`, or nil without touching anything when `ARGV[3]` is not the
/// reader's current epoch (`KEYS[3]`): a take an abandoned connection sent
/// before a partition, landing after the heal, must not empty the popped
/// list of the reader that took over. `KEYS[2]`, `KEYS[3]` expire after
/// `ARGV[2]` ms. It runs past Redis's `maxmemory` (`allow-oom`): what it
/// takes is answers to requests already queued, and emptying the popped
/// list first frees at least as much as the copies cost.
const TAKE: &str = r"#!lua flags=allow-oom
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return false end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[2])
local landed = redis.call('LRANGE', KEYS[4], 0, -1)
local taken = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #taken > 0 then redis.call('LTRIM', KEYS[1], #taken, -1) end
if #landed > 0 then
  redis.call('DEL', KEYS[4])
  redis.call('RPUSH', KEYS[2], unpack(landed))
end
if #taken > 0 then redis.call('RPUSH', KEYS[2], unpack(taken)) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {landed, taken}";

/// The keys a reader of `list` keeps beside it (names no reply or credit
/// list can have: ids never contain `:`): `<list>:popped` (what it took
/// and has not yet delivered), `<list>:landing` (where its blocking wait
/// moves the first item), `<list>:epoch` (its connection's number, which
/// fences off takes an abandoned connection sent).
pub fn popped_list(list: &str) -> [String; 3] {
    [
        format!("{list}:popped"),
        format!("{list}:landing"),
        format!("{list}:epoch"),
    ]
}

/// Follows `list` until `stop`, handing each item to `deliver`, oldest
/// first, on a dedicated connection to `target`
/// (`anteroom_redis::blocking_for`, connect timeout `connect_timeout`),
/// reconnecting with backoff whenever it is lost. The one reader loop of a
/// proxy's reply list and of a dispatcher's credit list; `what` names it in
/// log lines.
///
/// Nothing taken is lost with a reply the network lost (docs/protocol.md,
/// "Lost replies"): items move into the reader's popped list
/// ([`popped_list`]) rather than vanishing, a batch at a time (the `TAKE`
/// script) or, when the list is empty, by a `BLMOVE` into the landing list
/// that waits for the first (the next take moves it on); each take
/// empties the popped list first, which acknowledges the previous one. On
/// each connection the reader takes a new epoch (`INCR`), so a take an
/// old connection sent does nothing if it lands late, then delivers again
/// whatever the popped and landing lists hold: items a lost reply
/// carried, or copies of items already delivered, which the receivers
/// drop (a reply for an id no request waits for, a stream chunk or socket
/// message whose number was seen, a credit total already counted).
pub async fn follow_list(
    target: &Target,
    list: &str,
    connect_timeout: Duration,
    stop: &CancellationToken,
    what: &str,
    mut deliver: impl FnMut(Bytes),
) {
    let keys = popped_list(list);
    let mut backoff = Backoff::new();
    'connect: while !stop.is_cancelled() {
        let blocking =
            anteroom_redis::blocking_for(target, list, connect_timeout, FOLLOW_BLOCK).await;
        let mut conn = match blocking {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, "{what} cannot connect to redis; retrying");
                if sleep_or_stop(stop, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        // A new epoch, then what an earlier connection took and maybe
        // never delivered.
        let recovered: RedisResult<(u64, Vec<Bytes>, Vec<Bytes>)> = redis::pipe()
            .cmd("INCR")
            .arg(&keys[2])
            .cmd("PEXPIRE")
            .arg(&keys[2])
            .arg(millis(POPPED_TTL))
            .ignore()
            .cmd("LRANGE")
            .arg(&keys[0])
            .arg(0)
            .arg(-1)
            .cmd("LRANGE")
            .arg(&keys[1])
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await;
        let (epoch, mut items, landed) = match recovered {
            Ok(recovered) => recovered,
            Err(err) => {
                tracing::warn!(error = %err, redis = %target, "{what} lost redis; reconnecting");
                if sleep_or_stop(stop, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        items.extend(landed);
        if !items.is_empty() {
            tracing::debug!(
                items = items.len(),
                "{what}: delivering again what an earlier connection took"
            );
        }
        backoff.reset();
        let mut waited_for: Option<Bytes> = None;
        loop {
            items.drain(..).for_each(&mut deliver);
            let taken = tokio::select! {
                taken = take_from(&mut conn, list, &keys, epoch, &mut waited_for) => taken,
                () = stop.cancelled() => return,
            };
            match taken {
                Ok(Some(taken)) => items = taken,
                Ok(None) => {
                    tracing::warn!(
                        "{what}: another connection of this reader took over; reconnecting"
                    );
                    continue 'connect;
                }
                Err(err) => {
                    tracing::warn!(error = %err, redis = %target, "{what} lost redis; reconnecting");
                    if sleep_or_stop(stop, backoff.next_delay()).await {
                        return;
                    }
                    continue 'connect;
                }
            }
        }
    }
}

/// One take of [`follow_list`] for connection `epoch`: a batch (with what
/// the landing list holds, less the item `waited_for`, which the last
/// blocking wait brought and was delivered then) if there is any, else
/// what one `BLMOVE` brings within [`FOLLOW_BLOCK`] (nothing on its
/// timeout), which becomes `waited_for`. `None`: fenced off (a newer epoch).
async fn take_from<C: ConnectionLike + Send>(
    conn: &mut C,
    list: &str,
    keys: &[String; 3],
    epoch: u64,
    waited_for: &mut Option<Bytes>,
) -> RedisResult<Option<Vec<Bytes>>> {
    // EVAL, as every script here: Redis keeps the compiled script by its
    // digest, and the users need no SCRIPT LOAD.
    let took: Option<(Vec<Bytes>, Vec<Bytes>)> = redis::cmd("EVAL")
        .arg(TAKE)
        .arg(4)
        .arg(list)
        .arg(&keys[0])
        .arg(&keys[2])
        .arg(&keys[1])
        .arg(FOLLOW_BATCH)
        .arg(millis(POPPED_TTL))
        .arg(epoch)
        .query_async(conn)
        .await?;
    let Some((mut landed, taken)) = took else {
        return Ok(None);
    };
    if let Some(delivered) = waited_for.take() {
        if let Some(at) = landed.iter().position(|item| *item == delivered) {
            landed.remove(at);
        }
    }
    landed.extend(taken);
    if !landed.is_empty() {
        return Ok(Some(landed));
    }
    // The expiry goes in the same round trip, run as soon as the BLMOVE
    // returns: a reader that dies before its next take leaves nothing
    // behind for good.
    let waited: RedisResult<(Option<Bytes>,)> = redis::pipe()
        .cmd("BLMOVE")
        .arg(list)
        .arg(&keys[1])
        .arg("LEFT")
        .arg("RIGHT")
        .arg(FOLLOW_BLOCK.as_secs_f64())
        .cmd("PEXPIRE")
        .arg(&keys[1])
        .arg(millis(POPPED_TTL))
        .ignore()
        .query_async(conn)
        .await;
    let (first,) = match waited {
        Ok(first) => first,
        // Over maxmemory Redis refuses BLMOVE: the reader polls with the
        // script (which it allows) on the same connection instead.
        Err(err) if anteroom_redis::is_out_of_memory(&err) => {
            tokio::time::sleep(FULL_POLL).await;
            (None,)
        }
        Err(err) => return Err(err),
    };
    waited_for.clone_from(&first);
    Ok(Some(first.into_iter().collect()))
}

/// `WAIT 1 <wait>` when `durability` sees a replica (otherwise nothing):
/// lets a replica catch up with what `conn` wrote, so a failover does not
/// lose it. A replica that did not acknowledge in time is logged and
/// reported to `durability`. Returns how many replicas acknowledged
/// (`None`: not waited for).
pub async fn replicate<C: ConnectionLike + Send>(
    conn: &mut C,
    durability: &Durability,
) -> RedisResult<Option<i64>> {
    let Some(wait) = durability.wait() else {
        return Ok(None);
    };
    let replicas: i64 = wait_cmd(wait).query_async(conn).await?;
    observed(durability, wait, replicas, 1);
    Ok(Some(replicas))
}

fn wait_cmd(wait: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("WAIT");
    cmd.arg(1).arg(millis(wait));
    cmd
}

/// Tells `durability` what a `WAIT` returned, and warns when no replica
/// acknowledged `writes` writes within `wait`.
fn observed(durability: &Durability, wait: Duration, replicas: i64, writes: usize) {
    durability.observed(replicas);
    if replicas < 1 {
        tracing::warn!(
            ?wait,
            writes,
            "no replica acknowledged in time; these writes may not survive a failover"
        );
    }
}

/// `duration` in whole milliseconds, saturating.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
