//! Orphans: requests in this dispatcher's processing list that it does not
//! have in hand.
//!
//! Redis applies a command even when its reply never arrives: a pull
//! (`BLMOVE`, or the `MULTI` of `LMOVE`s) whose reply a network failure
//! lost has moved its requests into the processing list, and no task of
//! this dispatcher runs them. With the heartbeat alive, no reaper touches
//! them either: their clients would wait out their hold budget. After such
//! a failure, once connected again and with no pull outstanding, the
//! dispatcher reads its processing list, and settles what is neither in
//! hand nor being reaped as a reaper settles a dead dispatcher's requests
//! (docs/protocol.md, "What a dispatcher does", step 8, and "Lost
//! replies"): past its deadline, removed; safe to repeat, put back at the
//! front of the queue (it runs at once, from the next pull); otherwise
//! answered 502, since this process cannot tell a request whose pull was
//! lost (never run) from one whose handling ended leaving it in the list
//! (it may have run). So nothing that must not run twice does.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use anteroom_control::{ControlError, Queue};
use bytes::Bytes;

use crate::worker::Shared;

/// Settles the orphans of `shared`'s processing list (see the module
/// docs). Only the pull loop calls it, with no pull outstanding (a request
/// a pull is moving is in no task's hands yet). An orphan with the very
/// bytes of a request in hand is a second delivery of it (a producer's
/// repeated push): it is only removed, as a dispatcher removes a delivery
/// whose claim another holds. Errors: Redis's, for the list or for some
/// orphan (the others are settled): call again later.
pub(crate) async fn reconcile(shared: &Arc<Shared>) -> Result<(), ControlError> {
    let _settling = shared.settling.lock().await;
    // The requests in hand before the list is read: one whose handling
    // ends meanwhile is either gone from the list or still counted here.
    let mut in_hand: HashMap<Bytes, usize> = HashMap::new();
    for held in shared
        .held
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        *in_hand.entry(held.raw.clone()).or_default() += 1;
    }
    let queue = Queue::with_connection(shared.keys.clone(), shared.conn.clone());
    let listed = queue.processing_list(&shared.id).await?;
    let (mut copies, mut orphans) = (Vec::new(), Vec::new());
    for raw in listed {
        match in_hand.get_mut(&raw) {
            Some(n) if *n > 0 => *n -= 1,
            Some(_) => copies.push(raw),
            None => orphans.push(raw),
        }
    }
    if copies.is_empty() && orphans.is_empty() {
        return Ok(());
    }
    let mut failed = None;
    for raw in &copies {
        if let Err(err) = queue.remove_orphan(&shared.id, raw).await {
            failed = Some(err);
        }
    }
    let found = orphans.len();
    let (report, error) = queue
        .settle_orphans(&shared.id, orphans, shared.settings.reply_ttl)
        .await;
    tracing::warn!(
        orphans = found,
        copies_of_requests_in_hand = copies.len(),
        requeued = report.requeued,
        answered_502 = report.answered,
        expired = report.expired,
        dead_lettered = report.dead_lettered,
        "settled requests in the processing list that no task held (a lost reply)"
    );
    match error.or(failed) {
        Some(err) => Err(err),
        None => Ok(()),
    }
}
