//! Several queues served by one process in priority order
//! (`anteroom dispatch --queue critical,default,bulk`).
//!
//! Each queue keeps a dispatcher of its own (its processing list,
//! heartbeat, pause and reaper, as the protocol defines them per queue),
//! and the dispatchers of a [`PriorityGroup`] share one pool of permits:
//! the process runs at most its concurrency in all. Before each pull a
//! dispatcher holding a permit checks the queues ranked above its own:
//! when one of them has a request waiting (`LLEN`; paused queues and
//! queues whose upstream is unhealthy do not count, since nothing would
//! take from them), it gives the permit back and waits, so a free permit
//! always goes to the first non-empty queue. With weights, each queue is
//! also guaranteed its share of the concurrency (`weight / sum of
//! weights`, rounded down, at least 1; none with weight 0) while it has
//! requests: a backlog of `critical` slows `bulk` down but never starves
//! it. Its open WebSockets, which give their permits back once open, do
//! not count against that share ([`Shared::in_use`]).
//!
//! A member whose queue is empty blocks on it (at most [`GROUP_BLOCK`])
//! only when that holds no one back: it had a free permit to spare, or no
//! other member waits for one. Otherwise it gives the permit back and
//! looks again when a request of the group finishes (or after
//! [`RECHECK`]). A member whose pulls fail (Redis away, refused) holds no
//! one back either, and no permit through its backoff.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use crate::worker::Shared;

/// Longest blocking pull of a group member.
pub(crate) const GROUP_BLOCK: Duration = Duration::from_millis(100);

/// How long a dispatcher that gave way waits before looking again (it is
/// woken sooner when a request of the group finishes).
const RECHECK: Duration = Duration::from_millis(20);

/// Dispatchers of several queues sharing one concurrency, in priority
/// order (see the module docs). Make one with [`PriorityGroup::new`] and
/// give it to each queue's builder in order, highest priority first
/// ([`DispatcherBuilder::priority`](crate::DispatcherBuilder::priority)).
#[derive(Debug)]
pub struct PriorityGroup {
    permits: Arc<Semaphore>,
    concurrency: usize,
    /// The members by rank: each queue's requests list and weight, known
    /// from the start (before its dispatcher serves).
    joined: Mutex<Vec<(String, Option<u32>)>>,
    /// The members serving now, by rank.
    serving: Mutex<Vec<(usize, Weak<Shared>)>>,
    /// Woken when a request of the group finishes.
    freed: Notify,
    /// Members waiting for a permit now.
    wanting: Arc<AtomicUsize>,
}

/// Counts one member waiting for a permit while it lives.
pub(crate) struct Wanting(Arc<AtomicUsize>);

impl Drop for Wanting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PriorityGroup {
    /// A group running at most `concurrency` requests in all (at least 1).
    pub fn new(concurrency: usize) -> Arc<Self> {
        let concurrency = concurrency.max(1);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            joined: Mutex::default(),
            serving: Mutex::default(),
            freed: Notify::new(),
            wanting: Arc::default(),
        })
    }

    /// The next rank, for the queue whose requests list is
    /// `requests_key`, with its weight (`None`: strict priority for it).
    pub(crate) fn join(&self, requests_key: String, weight: Option<u32>) -> usize {
        let mut joined = self.joined.lock().unwrap_or_else(PoisonError::into_inner);
        joined.push((requests_key, weight));
        joined.len() - 1
    }

    /// A member starts waiting for a permit (until the guard drops).
    pub(crate) fn want(&self) -> Wanting {
        self.wanting.fetch_add(1, Ordering::AcqRel);
        Wanting(Arc::clone(&self.wanting))
    }

    /// Members waiting for a permit now.
    pub(crate) fn wanting(&self) -> usize {
        self.wanting.load(Ordering::Acquire)
    }

    /// The shared permits.
    pub(crate) fn permits(&self) -> Arc<Semaphore> {
        Arc::clone(&self.permits)
    }

    /// `shared` serves at `rank` from now on (until it is dropped).
    pub(crate) fn serve(&self, rank: usize, shared: &Arc<Shared>) {
        self.serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((rank, Arc::downgrade(shared)));
    }

    /// A request of the group finished: dispatchers that gave way look again.
    pub(crate) fn finished(&self) {
        self.freed.notify_waiters();
    }

    /// The requests `rank` may run at once whatever the queues above it
    /// hold: its weighted share of the concurrency, rounded down but at
    /// least 1; 0 without a weight or with weight 0.
    fn guaranteed(&self, rank: usize) -> usize {
        let joined = self.joined.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((_, Some(weight))) = joined.get(rank).cloned() else {
            return 0;
        };
        if weight == 0 {
            return 0;
        }
        let total: u64 = joined.iter().map(|(_, w)| u64::from(w.unwrap_or(0))).sum();
        if total == 0 {
            return 0;
        }
        // Rounded down, at least one: the shares never sum past the
        // concurrency by more than the queues with tiny weights.
        ((self.concurrency as u64 * u64::from(weight)) / total).max(1) as usize
    }

    /// How many requests `shared` (at `rank`) may take now: all it has
    /// permits for (`usize::MAX`) when no queue ranked above has a request
    /// waiting that its dispatcher would take; else what is left of its
    /// guaranteed share, `None` when nothing is (it gives its permit back).
    /// Redis errors count as nothing waiting (the pull that follows
    /// reports them).
    pub(crate) async fn allowance(&self, rank: usize, shared: &Shared) -> Option<usize> {
        if rank == 0 {
            return Some(usize::MAX);
        }
        let above: Vec<String> = self
            .joined
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .take(rank)
            .map(|(key, _)| key.clone())
            .collect();
        let serving: Vec<Arc<Shared>> = self
            .serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(r, _)| *r < rank)
            .filter_map(|(_, member)| member.upgrade())
            .collect();
        for key in above {
            // A queue whose dispatcher serves and is paused or unhealthy
            // takes nothing: it holds no one back. One not serving yet
            // (starting) does.
            let idle = serving.iter().any(|m| {
                m.requests_key == key
                    && (m.pause.borrow().is_some()
                        || !m.gate.is_open()
                        || m.pull_failing.load(Ordering::Acquire))
            });
            if idle {
                continue;
            }
            let waiting: redis::RedisResult<u64> = redis::cmd("LLEN")
                .arg(&key)
                .query_async(&mut shared.conn.clone())
                .await;
            if waiting.is_ok_and(|n| n > 0) {
                // Its open WebSockets took no place: they do not use up
                // its share.
                let left = self.guaranteed(rank).saturating_sub(shared.in_use());
                return (left > 0).then_some(left);
            }
        }
        Some(usize::MAX)
    }

    /// Waits until a request of the group finishes, or [`RECHECK`].
    pub(crate) async fn wait_turn(&self) {
        let _ = tokio::time::timeout(RECHECK, self.freed.notified()).await;
    }
}
