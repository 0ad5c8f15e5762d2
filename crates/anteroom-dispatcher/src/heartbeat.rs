//! The dispatcher's heartbeat and its embedded reaper.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anteroom_control::queue::{Presence, Role, keep_present};
use anteroom_protocol::{DispatcherHeartbeat, now_ms};
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
    let presence = Presence::new(&shared.keys, Role::Dispatcher, &shared.id, ttl);
    let started_at_ms = now_ms();
    let host = anteroom_redis::hostname();
    let beat = || {
        let pause_id = shared.acknowledged();
        DispatcherHeartbeat {
            id: shared.id.clone(),
            host: host.clone(),
            pid: std::process::id(),
            label: shared.settings.label.clone(),
            concurrency: shared.settings.concurrency,
            in_flight: shared.in_flight(),
            websockets: shared.sockets.len() as u64,
            paused: pause_id.is_some(),
            pause_id,
            started_at_ms,
            unhealthy: shared.gate.subscribe().borrow().unhealthy.clone(),
        }
    };
    let beat_now = &shared.beat_now;
    let health_changes = async move {
        while health.changed().await.is_ok() {
            beat_now.notify_one();
        }
        std::future::pending::<()>().await;
    };
    presence.register_queue(&mut shared.conn.clone()).await;
    let keep = keep_present(
        &presence,
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
