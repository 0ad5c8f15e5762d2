//! [`Components`]: start, signal, await and drain long-running tasks.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A component stopped with an error; its process stops too.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{component} failed: {message}")]
pub struct ComponentFailed {
    /// The name the component was spawned under.
    pub component: &'static str,
    /// Its error and causes, `outer: cause: cause`.
    pub message: String,
}

/// What a component's task returns: `()` for one that cannot fail, or a
/// `Result` whose error stops the process.
pub trait Exit {
    /// `Err` with the error chain as one line when the component failed.
    fn into_result(self) -> Result<(), String>;
}

impl Exit for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: std::error::Error> Exit for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|err| {
            let mut line = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                let text = cause.to_string();
                if !line.contains(&text) {
                    line.push_str(": ");
                    line.push_str(&text);
                }
                source = cause.source();
            }
            line
        })
    }
}

/// The long-running tasks of one process (or of one `serve` call), with one
/// lifecycle: started by [`spawn`](Self::spawn), told to stop through
/// [`stopping`](Self::stopping), awaited by [`shutdown`](Self::shutdown).
/// Cloning shares the same set.
#[derive(Debug, Clone, Default)]
pub struct Components {
    tracker: TaskTracker,
    stop: CancellationToken,
    failed: CancellationToken,
    failure: Arc<Mutex<Option<ComponentFailed>>>,
}

impl Components {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when the components are told to stop, by
    /// [`shutdown`](Self::shutdown) or [`stop`](Self::stop). Each component
    /// watches it and returns soon after.
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `task` as the component `name`, tracked until it returns. If it
    /// returns an error or panics, that is logged and kept, and
    /// [`failed`](Self::failed) completes: the owner then stops its process
    /// in its usual order (stop taking work, finish what is in hand, then
    /// [`shutdown`](Self::shutdown)), so the components the work in hand
    /// still needs are stopped last, not at once.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future + Send + 'static,
        F::Output: Exit,
    {
        let this = self.clone();
        self.tracker.spawn(async move {
            let outcome = std::panic::AssertUnwindSafe(task).catch_unwind().await;
            let failure = match outcome {
                Ok(exit) => exit.into_result().err(),
                Err(panic) => Some(format!("panicked: {}", panic_message(&*panic))),
            };
            if let Some(message) = failure {
                tracing::error!(component = name, error = %message, "component failed; stopping");
                this.fail(ComponentFailed {
                    component: name,
                    message,
                });
            }
        });
    }

    fn fail(&self, failure: ComponentFailed) {
        let mut first = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(failure);
        }
        drop(first);
        self.failed.cancel();
    }

    /// Completes when a component has failed, with the first failure.
    /// Never completes while none does: select it against the process's
    /// own work.
    pub async fn failed(&self) -> ComponentFailed {
        self.failed.cancelled().await;
        self.failure()
            .unwrap_or_else(|| unreachable_failure("failed() woke without a failure"))
    }

    /// The first failure so far, if any.
    pub fn failure(&self) -> Option<ComponentFailed> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Tells every component to stop, without waiting.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// How many components are running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Tells every component to stop and waits for them, at most `grace`
    /// (those still running then are left to end with the runtime, and
    /// logged). Errors: the first component that failed, at any time.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), ComponentFailed> {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                still_running = self.tracker.len(),
                ?grace,
                "components still running after the grace period"
            );
        }
        self.failure().map_or(Ok(()), Err)
    }
}

/// A panic's message, when it carries one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// `failed` is cancelled only after the failure is stored; should that
/// ever not hold, report it rather than panic.
fn unreachable_failure(what: &'static str) -> ComponentFailed {
    ComponentFailed {
        component: "components",
        message: what.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failure_stops_the_others_and_is_reported() {
        let components = Components::new();
        let stopping = components.stopping();
        components.spawn("steady", async move { stopping.cancelled().await });
        components.spawn("broken", async {
            Err::<(), _>(std::io::Error::other("disk on fire"))
        });
        let failure = components.failed().await;
        assert_eq!(failure.component, "broken");
        assert_eq!(failure.message, "disk on fire");
        // The owner stops the rest, in its own order.
        assert!(!components.stopping().is_cancelled());
        let shut = components.shutdown(Duration::from_secs(5)).await;
        assert_eq!(shut.unwrap_err().component, "broken");
        assert_eq!(components.running(), 0, "the steady one stopped too");
    }

    #[tokio::test]
    async fn a_panic_is_a_failure() {
        let components = Components::new();
        components.spawn("reader", async {
            let replies: Vec<u8> = Vec::new();
            let first = replies.first().copied();
            assert!(first.is_some(), "a reply");
        });
        let failure = components.failed().await;
        assert_eq!(failure.component, "reader");
        assert_eq!(failure.message, "panicked: a reply");
        assert!(components.shutdown(Duration::from_secs(1)).await.is_err());
    }

    #[tokio::test]
    async fn shutdown_waits_for_every_component_within_the_grace() {
        let components = Components::new();
        let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..3 {
            let stopping = components.stopping();
            let finished = Arc::clone(&finished);
            components.spawn("worker", async move {
                stopping.cancelled().await;
                tokio::task::yield_now().await;
                finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        components.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(finished.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert!(components.failure().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_component_that_ignores_the_stop_is_left_after_the_grace() {
        let components = Components::new();
        components.spawn("stubborn", std::future::pending::<()>());
        let started = tokio::time::Instant::now();
        components.shutdown(Duration::from_secs(2)).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(components.running(), 1);
    }
}
