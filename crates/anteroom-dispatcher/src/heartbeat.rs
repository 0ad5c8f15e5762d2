//! The dispatcher's heartbeat and its embedded reaper.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anteroom_control::queue::keep_present;
use anteroom_protocol::DispatcherHeartbeat;
use anteroom_redis::sleep_or_stop;
use tokio_util::sync::CancellationToken;

use crate::worker::Shared;

/// Keeps this dispatcher's heartbeat and registry entry fresh (see
/// [`keep_present`]): every third of the TTL, and at once after a pause is
/// acknowledged or lifted or the upstream's health changes; removes both
/// on stop.
pub(crate) async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    // Subscribed before the first beat reads the gate, so no change of
    // health can fall between that read and the subscription.
    let mut health = shared.gate.subscribe();
    let ttl = shared.settings.heartbeat_ttl;
    let every = (ttl / 3).max(Duration::from_millis(100));
    let presence = &shared.presence;
    let beat = || record(&shared);
    let beat_now = &shared.beat_now;
    let health_changes = async move {
        while health.changed().await.is_ok() {
            beat_now.notify_one();
        }
        std::future::pending::<()>().await;
    };
    presence.register_queue(&mut shared.conn.clone()).await;
    let keep = keep_present(
        presence,
        shared.conn.clone(),
        every,
        &shared.beat_now,
        &stop,
        beat,
    );
    tokio::select! {
        () = keep => {}
        () = health_changes => {}
    }
}

/// This dispatcher's heartbeat record as of now.
fn record(shared: &Shared) -> DispatcherHeartbeat {
    let pause_id = shared.acknowledged();
    DispatcherHeartbeat {
        id: shared.id.clone(),
        host: anteroom_redis::hostname(),
        pid: std::process::id(),
        label: shared.settings.label.clone(),
        concurrency: shared.settings.concurrency,
        in_flight: shared.in_flight(),
        websockets: shared.sockets.len() as u64,
        paused: pause_id.is_some(),
        pause_id,
        started_at_ms: shared.started_at_ms,
        unhealthy: shared.gate.subscribe().borrow().unhealthy.clone(),
    }
}

/// Writes the heartbeat and the registry entry once, now: the pull loop's
/// before a pull when the last beat Redis took was sent half the TTL ago
/// or more. A dispatcher cut off from Redis for longer than its heartbeat
/// TTL has been reaped while alive (its registry entry removed), and a
/// request it pulled before its next beat would be stranded were it to
/// die then, since no reaper looks at a list with no registry entry
/// (docs/protocol.md, step 6).
pub(crate) async fn beat_once(shared: &Shared) -> redis::RedisResult<()> {
    shared
        .presence
        .beat(&mut shared.conn.clone(), &record(shared))
        .await
}

/// Every `reap_interval`, settles the requests of dispatchers that died
/// holding them (see [`anteroom_control::Queue::reap`]), until `stop`.
pub(crate) async fn reap(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(every) = shared.settings.reap_interval else {
        return;
    };
    let queue = anteroom_control::Queue::with_connection(shared.keys.clone(), shared.conn.clone());
    loop {
        if sleep_or_stop(&stop, every).await {
            return;
        }
        let pass = {
            let _settling = shared.settling.lock().await;
            queue.reap(&shared.id, shared.settings.reply_ttl).await
        };
        match pass {
            Ok(report) if report.dispatchers > 0 => tracing::warn!(
                dead_dispatchers = report.dispatchers,
                requeued = report.requeued,
                answered_502 = report.answered,
                expired = report.expired,
                dead_lettered = report.dead_lettered,
                "reaped"
            ),
            Ok(_) => {}
            Err(err) => {
                // A claim whose reply was lost has moved a dead
                // dispatcher's requests into this one's processing list,
                // where no task holds them: settled as orphans (a lost
                // reply) by the pull loop.
                shared.orphans_possible.store(true, Ordering::Release);
                tracing::debug!(error = %err, "reaping failed; will retry");
            }
        }
    }
}
