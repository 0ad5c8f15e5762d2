//! A monitor of ordinary traffic, run beside a hostile input: the input
//! must not make ordinary requests fail or stall.

use std::time::{Duration, Instant};

use http::StatusCode;

use super::web::{self, client};

/// Ordinary GETs through the proxy, one every 100 ms, until stopped.
pub struct Monitor {
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<(StatusCode, Duration)>>,
}

impl Monitor {
    pub fn start(url: String) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&sent);
        let task = tokio::spawn(async move {
            let c = client();
            let mut seen = Vec::new();
            while !*stopped.borrow() {
                let started = Instant::now();
                let status = match tokio::time::timeout(
                    Duration::from_secs(10),
                    web::try_send(
                        &c,
                        http::Request::get(&url).body(Default::default()).unwrap(),
                    ),
                )
                .await
                {
                    Ok(Ok(reply)) => reply.status,
                    _ => StatusCode::GATEWAY_TIMEOUT,
                };
                seen.push((status, started.elapsed()));
                counter.fetch_add(1, std::sync::atomic::Ordering::Release);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.changed() => {}
                }
            }
            seen
        });
        Self { sent, stop, task }
    }

    /// Stops, and checks every request was answered 200 within `limit`.
    pub async fn check(self, limit: Duration) {
        // At least five samples, however quick the test was.
        let sent = std::sync::Arc::clone(&self.sent);
        super::eventually("five monitored requests", Duration::from_secs(20), || {
            let sent = std::sync::Arc::clone(&sent);
            async move { sent.load(std::sync::atomic::Ordering::Acquire) >= 5 }
        })
        .await;
        let _ = self.stop.send(true);
        let seen = self.task.await.unwrap();
        assert!(
            seen.len() >= 5,
            "the monitor sent only {} requests",
            seen.len()
        );
        let worst = seen.iter().map(|(_, took)| *took).max().unwrap();
        let failed: Vec<_> = seen.iter().filter(|(s, _)| *s != StatusCode::OK).collect();
        assert!(failed.is_empty(), "ordinary requests failed: {failed:?}");
        assert!(
            worst < limit,
            "an ordinary request took {worst:?} (of {})",
            seen.len()
        );
        let mut took: Vec<Duration> = seen.iter().map(|(_, t)| *t).collect();
        took.sort();
        // Figures for the closing notes: `cargo test -- --nocapture`.
        println!(
            "monitor: {} ordinary requests, all 200; median {:?}, worst {worst:?}",
            seen.len(),
            took[took.len() / 2]
        );
    }
}
