//! The pull loop: takes requests from the queue into this dispatcher's
//! processing list as permits allow, and the nudger that cuts a blocked
//! pull short when a pause, a stop or a failing upstream arrives.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anteroom_control::queue;
use anteroom_redis::{Backoff, Target, sleep_or_stop};
use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handle;
use crate::reconcile;
use crate::worker::{HttpService, ResponseBody, Shared};

/// Most requests taken in one round trip.
const MAX_BATCH: usize = 64;
/// Fewest requests asked for in one round trip (when permits allow).
const MIN_PULL_HINT: usize = 4;
/// How long after a failed reconciliation (crate::reconcile) the next try
/// comes.
const RECONCILE_RETRY: Duration = Duration::from_secs(1);

/// Cuts a blocked pull short when a pause or a stop arrives or the upstream
/// turns unhealthy, and keeps doing so every 50 ms until the pull loop has
/// acknowledged the pause, stopped pulling, or exited (a pull sent just
/// after one nudge would otherwise block a whole poll interval).
pub(crate) async fn nudge_pulls(
    shared: Arc<Shared>,
    stop: CancellationToken,
    done: CancellationToken,
) {
    let mut pause = shared.pause.clone();
    let mut health = shared.gate.subscribe();
    'state: loop {
        let paused = pause.borrow_and_update().as_ref().map(|p| p.id.clone());
        let unhealthy = health.borrow_and_update().unhealthy.is_some();
        let stopping = stop.is_cancelled();
        let pulling = || shared.pull_client_id.load(Ordering::Acquire) != 0;
        let blocked = || shared.pull_outstanding.load(Ordering::Acquire);
        while (stopping && pulling())
            || (unhealthy && blocked())
            || (paused.is_some() && shared.acknowledged() != paused)
        {
            shared.unblock_pull().await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                changed = pause.changed() => match changed {
                    Ok(()) => continue 'state,
                    Err(_) => return,
                },
                changed = health.changed() => match changed {
                    Ok(()) => continue 'state,
                    Err(_) => return,
                },
                () = stop.cancelled(), if !stopping => continue 'state,
                () = done.cancelled() => return,
            }
        }
        tokio::select! {
            changed = pause.changed() => if changed.is_err() { return },
            changed = health.changed() => if changed.is_err() { return },
            () = stop.cancelled(), if !stopping => {}
            () = done.cancelled() => return,
        }
    }
}

/// Takes a permit, then one request, until stopped; while the queue is
/// paused or the upstream unhealthy, takes nothing. A pull already sent to
/// Redis is always awaited (a pause, a stop or a failing upstream cuts it
/// short with CLIENT UNBLOCK), so a request moved into the processing list
/// is never abandoned.
pub(crate) async fn pull_loop<S, B>(
    shared: &Arc<Shared>,
    client: &Target,
    service: S,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) where
    S: HttpService<B> + Clone,
    B: ResponseBody,
{
    let mut blocking: Option<MultiplexedConnection> = None;
    // When to look for orphans again after a pull failed, and not before
    // when to retry a reconciliation that failed.
    let (mut recheck_at, mut reconcile_after) = (None, None);
    let mut backoff = Backoff::new();
    let mut pull_hint = MIN_PULL_HINT;
    // The last blocking pull saw no other request waiting: the next pull
    // blocks at once, without a batch that would find nothing.
    let mut queue_was_empty = false;
    let mut pause = shared.pause.clone();
    let mut health = shared.gate.subscribe();
    loop {
        if stop.is_cancelled() {
            break;
        }
        // Good for the pull right after the blocking one only: any other
        // turn of the loop (a pause, the gate, a failure) forgets it.
        let skip_batch = std::mem::take(&mut queue_was_empty) && shared.settings.priority.is_none();
        // No pull is outstanding here: what the processing list holds
        // beyond the requests in hand is an orphan (a lost reply). A pull
        // the failed connection had sent may still land in Redis after
        // this (a half-open connection, a stalled server): looked at again
        // once it surely has, or expired. A reconciliation that fails is
        // tried again later; pulling goes on meanwhile.
        if recheck_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            recheck_at = None;
            shared.orphans_possible.store(true, Ordering::Release);
        }
        if reconcile_after.is_none_or(|at| tokio::time::Instant::now() >= at)
            && shared.orphans_possible.swap(false, Ordering::AcqRel)
        {
            reconcile_after = None;
            match reconcile::reconcile(shared).await {
                Ok(()) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "settling orphans failed; trying again shortly");
                    shared.orphans_possible.store(true, Ordering::Release);
                    reconcile_after = Some(tokio::time::Instant::now() + RECONCILE_RETRY);
                }
            }
        }
        let paused = pause.borrow_and_update().as_ref().map(|p| p.id.clone());
        if let Some(pause_id) = paused {
            // Nothing is being pulled now: say so, then wait for a change.
            tracing::info!(in_flight = shared.in_flight(), "queue paused; not pulling");
            shared.acknowledge(Some(pause_id));
            tokio::select! {
                changed = pause.changed() => if changed.is_err() {
                    tracing::error!("lost the pause watcher; stopping");
                    break;
                },
                () = stop.cancelled() => break,
            }
            continue;
        }
        if shared.acknowledged().is_some() {
            tracing::info!("queue resumed; pulling again");
            shared.acknowledge(None);
        }
        if health.borrow_and_update().unhealthy.is_some() {
            // The gate logs the change; requests wait in the queue.
            tokio::select! {
                changed = health.changed() => if changed.is_err() { break },
                changed = pause.changed() => if changed.is_err() {
                    tracing::error!("lost the pause watcher; stopping");
                    break;
                },
                () = stop.cancelled() => break,
            }
            continue;
        }
        // In a group, counted while waiting: an idle member then does not
        // hold a shared permit in a blocking pull.
        let wanting = shared.settings.priority.as_ref().map(|(g, _)| g.want());
        let permit = tokio::select! {
            permit = Arc::clone(&shared.permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
            changed = pause.changed() => {
                if changed.is_err() {
                    tracing::error!("lost the pause watcher; stopping");
                    break;
                }
                continue;
            }
            changed = health.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        };
        drop(wanting);
        if blocking.is_none() {
            match connect_pull(shared, client).await {
                Ok(conn) => blocking = Some(conn),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot connect to redis; retrying");
                    // Not held through the wait: in a group it is another
                    // queue's as much as this one's.
                    drop(permit);
                    shared.pull_failing.store(true, Ordering::Release);
                    if sleep_or_stop(stop, backoff.next_delay()).await {
                        break;
                    }
                    continue;
                }
            }
        }
        let Some(conn) = blocking.as_mut() else {
            continue;
        };
        // A pause, stop or failure that arrived while we waited for the permit.
        if stop.is_cancelled() || pause.borrow().is_some() || !shared.gate.is_open() {
            continue;
        }
        // Take only while the heartbeat is known to live (its last beat
        // sent under half the TTL ago): cut off from Redis longer than the
        // TTL, this dispatcher was reaped while alive (its registry entry
        // removed), and a request pulled before its next beat would have
        // no reaper should it die (docs/protocol.md, step 6).
        if !shared
            .presence
            .written_within(shared.settings.heartbeat_ttl / 2)
        {
            if let Err(err) = crate::heartbeat::beat_once(shared).await {
                tracing::warn!(error = %err, "cannot write the heartbeat before pulling; retrying");
                drop(permit);
                if sleep_or_stop(stop, backoff.next_delay()).await {
                    break;
                }
                continue;
            }
        }
        // Served in a priority group: the permit goes to a queue ranked
        // above, if one has a request waiting (crate::priority).
        let allowance = match &shared.settings.priority {
            None => usize::MAX,
            Some((group, rank)) => match group.allowance(*rank, shared).await {
                Some(allowance) => allowance,
                None => {
                    drop(permit);
                    tokio::select! {
                        () = group.wait_turn() => {}
                        () = stop.cancelled() => break,
                    }
                    continue;
                }
            },
        };
        // A deep queue: take as many requests as there are free permits in
        // one round trip (at most twice what the last batch found, or what
        // the last blocking pull's LLEN counted, so that a shallow queue does
        // not cost many empty LMOVEs). An empty one: block for the next.
        let mut permit = permit;
        // After a blocking pull that left the queue empty, a batch would
        // find nothing (one request at a time: a round trip and 6 commands
        // saved per request). Not in a priority group, where an empty batch
        // decides whether to block at all.
        let batch = if skip_batch {
            Ok(Vec::new())
        } else {
            let spare = shared
                .permits
                .available_permits()
                .min(pull_hint - 1)
                .min(allowance - 1);
            if spare > 0 {
                if let Ok(more) = Arc::clone(&shared.permits).try_acquire_many_owned(spare as u32) {
                    permit.merge(more);
                }
            }
            let batch = queue::pull_batch(
                conn,
                &shared.requests_key,
                &shared.processing_key,
                permit.num_permits(),
            )
            .await;
            if let Ok(items) = &batch {
                pull_hint = (items.len() * 2).clamp(MIN_PULL_HINT, MAX_BATCH);
            }
            batch
        };
        let pulled = match batch {
            Ok(items) if !items.is_empty() => Ok(items),
            // In a group, an empty queue blocks only when no one else may
            // want the permit (crate::priority).
            Ok(_) if must_not_block(shared, allowance) => {
                drop(permit);
                shared.pull_failing.store(false, Ordering::Release);
                if let Some((group, _)) = &shared.settings.priority {
                    tokio::select! {
                        () = group.wait_turn() => {}
                        () = stop.cancelled() => break,
                    }
                }
                continue;
            }
            Ok(_) => {
                // Keep one permit for the blocking pull; give the rest back.
                if let Some(one) = permit.split(1) {
                    drop(std::mem::replace(&mut permit, one));
                }
                shared.pull_outstanding.store(true, Ordering::Release);
                // In a group, briefly: the permit may be wanted elsewhere.
                let block = match &shared.settings.priority {
                    Some(_) => shared
                        .settings
                        .poll_interval
                        .min(crate::priority::GROUP_BLOCK),
                    None => shared.settings.poll_interval,
                };
                let pulled =
                    queue::pull_blocking(conn, &shared.requests_key, &shared.processing_key, block)
                        .await
                        .map(|blocked| {
                            // The batch is skipped next turn only after a
                            // request came: a wait that timed out or was
                            // cut short (a pause, a stop) says nothing of
                            // it. What waits behind sizes the next batch.
                            queue_was_empty = blocked.item.is_some() && blocked.waiting == Some(0);
                            if let Some(waiting) = blocked.waiting {
                                let waiting = usize::try_from(waiting).unwrap_or(MAX_BATCH);
                                pull_hint = waiting.clamp(MIN_PULL_HINT, MAX_BATCH);
                            }
                            blocked.item.into_iter().collect()
                        });
                shared.pull_outstanding.store(false, Ordering::Release);
                pulled
            }
            Err(err) => Err(err),
        };
        match pulled {
            Ok(items) => {
                shared.pull_failing.store(false, Ordering::Release);
                if !items.is_empty() {
                    backoff.reset();
                }
                for raw in items {
                    let Some(one) = permit.split(1) else {
                        // Never more items than permits; were it so, the
                        // rest would be orphans.
                        shared.orphans_possible.store(true, Ordering::Release);
                        break;
                    };
                    let held = shared.hold(&raw);
                    let task = handle::handle(Arc::clone(shared), service.clone(), raw, one);
                    let group = shared
                        .settings
                        .priority
                        .as_ref()
                        .map(|(g, _)| Arc::clone(g));
                    tracker.spawn(async move {
                        task.await;
                        drop(held);
                        if let Some(group) = group {
                            group.finished();
                        }
                    });
                }
            }
            Err(err) if anteroom_redis::is_out_of_memory(&err) => {
                drop(permit);
                // Redis is over its maxmemory and refused the BLMOVE: the
                // connection is fine. A batch is taken past it
                // (`queue::pull_batch`); when this turn skipped the batch,
                // requests may have come since, so the batch goes at once.
                if skip_batch {
                    continue;
                }
                tracing::debug!(error = %err, "Redis is full; pulling again shortly");
                if sleep_or_stop(stop, backoff.next_delay()).await {
                    break;
                }
            }
            Err(err) => {
                drop(permit);
                shared.pull_failing.store(true, Ordering::Release);
                tracing::warn!(error = %err, redis = %client, "pull from redis failed; reconnecting");
                // Its reply may be what was lost: Redis may have moved
                // requests into the processing list that this process
                // never saw. Settled once connected again.
                shared.orphans_possible.store(true, Ordering::Release);
                recheck_at = Some(
                    tokio::time::Instant::now()
                        + shared.settings.poll_interval
                        + shared.settings.redis_timeout
                        + Duration::from_secs(1),
                );
                blocking = None;
                shared.pull_client_id.store(0, Ordering::Release);
                if sleep_or_stop(stop, backoff.next_delay()).await {
                    break;
                }
            }
        }
    }
    shared.pull_client_id.store(0, Ordering::Release);
}

/// Whether a member of a priority group that found its queue empty must
/// give its permit back rather than block on it: when its place came
/// from its guaranteed share only (`allowance` limited), or when it took
/// the group's last free permit and another member waits for one.
fn must_not_block(shared: &Shared, allowance: usize) -> bool {
    match &shared.settings.priority {
        None => false,
        Some((group, _)) => {
            allowance != usize::MAX
                || (shared.permits.available_permits() == 0 && group.wanting() > 0)
        }
    }
}

/// Opens the pull connection and records its client id for CLIENT UNBLOCK.
async fn connect_pull(
    shared: &Shared,
    client: &Target,
) -> redis::RedisResult<MultiplexedConnection> {
    let mut conn = anteroom_redis::blocking_for(
        client,
        &shared.requests_key,
        shared.settings.redis_timeout,
        shared.settings.poll_interval,
    )
    .await?;
    let id = queue::pull_client_id(&mut conn).await?;
    shared.pull_client_id.store(id, Ordering::Release);
    Ok(conn)
}
