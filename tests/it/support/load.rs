//! A steady load of concurrent clients, each sending POSTs back to back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::task::JoinHandle;

use super::web::{client, send};

/// One request's outcome.
#[derive(Debug)]
pub struct Sample {
    pub sent: Bytes,
    pub status: StatusCode,
    pub body: Bytes,
    pub started: Instant,
    pub latency: Duration,
}

pub struct Load {
    running: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    /// `clients` clients POST to `url` until [`finish`](Self::finish), each
    /// body made by `body(client, n)`.
    pub fn start(
        clients: usize,
        url: String,
        body: impl Fn(usize, u64) -> String + Send + Sync + 'static,
    ) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let body = Arc::new(body);
        let workers = (0..clients)
            .map(|w| {
                let (c, url, running, body) = (
                    client(),
                    url.clone(),
                    Arc::clone(&running),
                    Arc::clone(&body),
                );
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    let mut n = 0;
                    while running.load(Ordering::Relaxed) {
                        n += 1;
                        let sent = Bytes::from(body(w, n));
                        let req = Request::post(&url).body(Full::new(sent.clone())).unwrap();
                        let started = Instant::now();
                        let r = send(&c, req).await;
                        samples.push(Sample {
                            sent,
                            status: r.status,
                            body: r.body,
                            started,
                            latency: started.elapsed(),
                        });
                    }
                    samples
                })
            })
            .collect();
        Self { running, workers }
    }

    /// Stops the clients after their current request; returns every sample
    /// in the order the requests started.
    pub async fn finish(self) -> Summary {
        self.running.store(false, Ordering::Relaxed);
        let mut samples = Vec::new();
        for w in self.workers {
            samples.extend(w.await.unwrap());
        }
        samples.sort_by_key(|s| s.started);
        Summary { samples }
    }
}

pub struct Summary {
    pub samples: Vec<Sample>,
}

impl Summary {
    pub fn failed(&self, ok: impl Fn(StatusCode) -> bool) -> usize {
        self.samples.iter().filter(|s| !ok(s.status)).count()
    }

    pub fn longest(&self) -> Duration {
        self.samples
            .iter()
            .map(|s| s.latency)
            .max()
            .unwrap_or_default()
    }

    /// Prints the figures a playbook test reports.
    pub fn report(&self, name: &str, ok: impl Fn(StatusCode) -> bool) {
        println!(
            "{name}: {} requests, {} failed, longest wait {:?}",
            self.samples.len(),
            self.failed(ok),
            self.longest()
        );
    }
}
