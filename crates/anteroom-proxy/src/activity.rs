//! What one client connection is doing, for its watchdog
//! (`connection.rs`) and its lingering close (`linger.rs`): requests in
//! hand, when the last one arrived or ended, answers the client is not
//! reading, and queued requests it gave up on.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What one client connection is doing, for its watchdog (`connection.rs`):
/// when bytes last moved, how many requests it has in hand, how many
/// answers are being sent, and whether it must linger when it closes.
#[derive(Debug)]
pub(crate) struct Activity {
    started: std::time::Instant,
    /// Milliseconds after `started` when a request last arrived or ended:
    /// what idleness is measured from (bytes are not: HTTP/2 PINGs keep
    /// an idle connection's bytes moving).
    event_ms: AtomicU64,
    /// Milliseconds after `started` when a write first found the socket
    /// full, plus one; 0 while writes go through.
    blocked_ms: AtomicU64,
    /// Milliseconds after `started` when an answer was last handed to
    /// hyper or taken by it.
    answered_ms: AtomicU64,
    /// Requests from arrival until their answer has been sent.
    in_flight: AtomicUsize,
    /// Answers being sent (hyper holds their body).
    sending: AtomicUsize,
    /// Queued requests answered with their reply, and queued requests whose
    /// client gave up before it (a reset stream, mostly).
    queued_answered: AtomicUsize,
    queued_abandoned: AtomicUsize,
    /// Set once the connection has sent an early answer ([`Answer::lingers`]).
    linger: AtomicBool,
    /// Woken when an answer starts or ends being sent.
    changed: tokio::sync::Notify,
    /// The proxy's connection tasks: what outlives a request or the
    /// connection (a lingering close, a discarded body, an abandoned
    /// request's budget) is tracked with them, so shutdown waits for it.
    tasks: TaskTracker,
    /// Cancelled when the proxy closes its connections.
    closing: CancellationToken,
}

impl Activity {
    /// Whether an early answer was sent: the close lingers.
    pub(crate) fn lingers(&self) -> bool {
        self.linger.load(Ordering::Acquire)
    }

    /// A fresh connection's activity; its tasks join `tasks`, and
    /// `closing` says when the proxy closes every connection.
    pub(crate) fn new(tasks: TaskTracker, closing: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            started: std::time::Instant::now(),
            event_ms: AtomicU64::new(0),
            blocked_ms: AtomicU64::new(0),
            answered_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            queued_answered: AtomicUsize::new(0),
            queued_abandoned: AtomicUsize::new(0),
            linger: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            tasks,
            closing,
        })
    }

    /// Runs `task` tracked with the proxy's connection tasks (when a
    /// runtime is there: a drop at exit spawns nothing).
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tasks.spawn(task);
        }
    }

    /// Cancelled when the proxy closes its connections.
    pub(crate) fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Completes when a request has ended, or an answer started being
    /// sent, since the last call.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn event(&self) {
        self.event_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.blocked_ms.store(0, Ordering::Relaxed);
                // Bytes moved: an answer being sent (a long stream) is
                // making progress, whatever its age.
                self.answered_ms.store(self.now_ms(), Ordering::Relaxed);
            }
            Poll::Pending => {
                let now = self.now_ms() + 1;
                let _ =
                    self.blocked_ms
                        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn answer_moved(&self) {
        self.answered_ms.store(self.now_ms(), Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// How long the client has not read: since a write first found the
    /// socket full, or, with answers waiting to be sent, since hyper last
    /// took one (an HTTP/2 window kept at 0 blocks no write). `None` while
    /// neither holds.
    pub(crate) fn unread_for(&self) -> Option<std::time::Duration> {
        let now = self.now_ms();
        let blocked = self.blocked_ms.load(Ordering::Relaxed);
        let since = if blocked > 0 {
            Some(blocked - 1)
        } else if self.sending() > 0 {
            Some(self.answered_ms.load(Ordering::Relaxed))
        } else {
            None
        };
        since.map(|t| std::time::Duration::from_millis(now.saturating_sub(t)))
    }

    /// How long since a request last arrived or ended (since the
    /// connection opened, if none has).
    pub(crate) fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.event_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Counts a queued request answered with its reply.
    pub(crate) fn queued_answered(&self) {
        self.queued_answered.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a queued request whose client went away before its reply.
    pub(crate) fn queued_abandoned(&self) {
        self.queued_abandoned.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// Requests in hand (arrived, and not yet answered to the end).
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Answers being sent now.
    pub(crate) fn sending(&self) -> usize {
        self.sending.load(Ordering::Acquire)
    }

    /// Whether the client has given up on more than [`MAX_ABANDONED`]
    /// queued requests, and on more than it let be answered (both counting
    /// queued requests only, so requests the proxy refuses itself cannot
    /// offset the count):
    /// opening and resetting HTTP/2 streams faster than answers come, each
    /// reset request still costing a place in the queue (the slow form of
    /// the rapid-reset attack, which hyper's own guard does not see).
    pub(crate) fn abandons_too_many(&self) -> bool {
        let abandoned = self.queued_abandoned.load(Ordering::Acquire);
        abandoned > MAX_ABANDONED && abandoned > self.queued_answered.load(Ordering::Acquire)
    }

    /// Counts a request until the returned guard is dropped.
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.event();
        InFlight {
            activity: Arc::clone(self),
            sending: false,
        }
    }
}

/// One request of a connection, counted in [`Activity`] until dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    activity: Arc<Activity>,
    sending: bool,
}

impl InFlight {
    /// Its answer is being sent (until this is dropped, with the answer);
    /// an `early` answer makes the connection linger when it closes.
    pub(crate) fn answer_started(&mut self, early: bool) {
        if early {
            self.activity.linger.store(true, Ordering::Release);
        }
        self.activity.sending.fetch_add(1, Ordering::AcqRel);
        self.activity.answer_moved();
        self.sending = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.sending {
            self.activity.sending.fetch_sub(1, Ordering::AcqRel);
        }
        self.activity.event();
        self.activity.answer_moved();
    }
}

/// Requests a connection's client may give up on before the proxy closes
/// it, when it has given up on more than it let be answered (see
/// [`Activity::abandons_too_many`]).
pub(crate) const MAX_ABANDONED: usize = 100;
