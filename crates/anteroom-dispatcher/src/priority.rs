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
//! weights`, rounded up) while it has requests: a backlog of `critical`
//! slows `bulk` down but never starves it.
//!
//! Members pull with a blocking wait of at most [`GROUP_BLOCK`], so an
//! idle queue holds a permit no longer than that while another queue's
//! request arrives (with one permit, the next request of a higher queue
//! waits at most that long).

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
        })
    }

    /// The next rank, for the queue whose requests list is
    /// `requests_key`, with its weight (`None`: strict priority for it).
    pub(crate) fn join(&self, requests_key: String, weight: Option<u32>) -> usize {
        let mut joined = self.joined.lock().unwrap_or_else(PoisonError::into_inner);
        joined.push((requests_key, weight));
        joined.len() - 1
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
    /// hold: its weighted share of the concurrency, rounded up; 0 without
    /// weights.
    fn guaranteed(&self, rank: usize) -> usize {
        let joined = self.joined.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((_, Some(weight))) = joined.get(rank).cloned() else {
            return 0;
        };
        let total: u64 = joined.iter().map(|(_, w)| u64::from(w.unwrap_or(0))).sum();
        if total == 0 {
            return 0;
        }
        (self.concurrency as u64 * u64::from(weight)).div_ceil(total) as usize
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
                m.requests_key == key && (m.pause.borrow().is_some() || !m.gate.is_open())
            });
            if idle {
                continue;
            }
            let waiting: redis::RedisResult<u64> = redis::cmd("LLEN")
                .arg(&key)
                .query_async(&mut shared.conn.clone())
                .await;
            if waiting.is_ok_and(|n| n > 0) {
                let left = self.guaranteed(rank).saturating_sub(shared.in_flight());
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
