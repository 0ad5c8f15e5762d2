//! `--durable`: waiting for a replica, but only when there is one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anteroom_runtime::Components;

use crate::SharedConnection;

/// Decides whether a write should be followed by `WAIT 1 <wait>`.
///
/// `WAIT` blocks the connection it is sent on, and the shared connection
/// carries everyone's commands: with no replica connected (a freshly
/// promoted primary has none) every `WAIT` would stall the whole component
/// for its full timeout. So the number of connected replicas is read every
/// half second, `WAIT` is used only while there is at least one, and a
/// `WAIT` that times out counts as "none" until the next reading.
#[derive(Debug)]
pub struct Durability {
    wait: Duration,
    replicas: AtomicUsize,
}

impl Durability {
    /// Starts following the replica count of the server `conn` talks to,
    /// in a component of `components` ("replica count") until they stop.
    pub fn spawn(conn: SharedConnection, wait: Duration, components: &Components) -> Arc<Self> {
        let durability = Arc::new(Self {
            wait,
            // Assume one until told otherwise, so the first writes are waited for.
            replicas: AtomicUsize::new(1),
        });
        let this = Arc::clone(&durability);
        let stop = components.stopping();
        components.spawn("replica count", async move {
            let mut conn = conn;
            let mut warned = false;
            loop {
                match redis::cmd("INFO")
                    .arg("replication")
                    .query_async::<String>(&mut conn)
                    .await
                {
                    Ok(info) => {
                        let n = connected_replicas(&info);
                        if n == 0 && !warned {
                            tracing::warn!(
                                "durable mode, but the primary has no replica connected: writes are not waited for"
                            );
                        }
                        warned = n == 0;
                        this.replicas.store(n, Ordering::Release);
                    }
                    Err(err) => tracing::debug!(error = %err, "cannot read the replica count"),
                }
                if crate::sleep_or_stop(&stop, Duration::from_millis(500)).await {
                    return;
                }
            }
        });
        durability
    }

    /// The `WAIT` timeout to use now, or `None` when no replica is connected.
    pub fn wait(&self) -> Option<Duration> {
        (self.replicas.load(Ordering::Acquire) > 0).then_some(self.wait)
    }

    /// Reports what a `WAIT` returned: zero replicas means none is keeping
    /// up, so stop waiting until the next count says otherwise.
    pub fn observed(&self, acknowledged: i64) {
        if acknowledged < 1 {
            self.replicas.store(0, Ordering::Release);
        }
    }
}

/// `connected_slaves:N` from `INFO replication`.
fn connected_replicas(info: &str) -> usize {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("connected_slaves:"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::connected_replicas;

    #[test]
    fn reads_the_replica_count() {
        assert_eq!(
            connected_replicas("# Replication\r\nrole:master\r\nconnected_slaves:2\r\n"),
            2
        );
        assert_eq!(connected_replicas("role:slave\r\n"), 0);
    }
}
