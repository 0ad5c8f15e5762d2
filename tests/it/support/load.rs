//! A steady load of concurrent keep-alive clients, each sending requests
//! back to back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use tokio::task::JoinHandle;

use super::web::{client, try_send};

/// One request's outcome.
#[derive(Debug)]
pub struct Sample {
    pub method: Method,
    pub sent: Bytes,
    /// `None`: no response (the connection failed; see `error`).
    pub status: Option<StatusCode>,
    pub error: Option<String>,
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
        Self::start_with(clients, move |w, n| {
            Request::post(&url)
                .body(Full::new(Bytes::from(body(w, n))))
                .unwrap()
        })
    }

    /// `clients` clients, each with its own keep-alive connection pool
    /// (hyper's, which opens a new connection when the server closed the
    /// old one), send `request(client, n)` until [`finish`](Self::finish).
    /// A failed connection is recorded, not retried.
    pub fn start_with(
        clients: usize,
        request: impl Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync + 'static,
    ) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let request = Arc::new(request);
        let workers = (0..clients)
            .map(|w| {
                let (c, running, request) = (client(), Arc::clone(&running), Arc::clone(&request));
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    let mut n = 0;
                    while running.load(Ordering::Relaxed) {
                        n += 1;
                        let req = request(w, n);
                        let method = req.method().clone();
                        let sent = http_body_util::BodyExt::collect(req.body().clone())
                            .await
                            .unwrap()
                            .to_bytes();
                        let started = Instant::now();
                        let (status, error, body) = match try_send(&c, req).await {
                            Ok(r) => (Some(r.status), None, r.body),
                            Err(err) => (None, Some(err), Bytes::new()),
                        };
                        samples.push(Sample {
                            method,
                            sent,
                            status,
                            error,
                            body,
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
    /// Requests without a response, or whose status `ok` refuses.
    pub fn failed(&self, ok: impl Fn(StatusCode) -> bool) -> usize {
        self.samples
            .iter()
            .filter(|s| !s.status.is_some_and(&ok))
            .count()
    }

    /// Requests without a response (connection errors).
    pub fn connection_errors(&self) -> usize {
        self.samples.iter().filter(|s| s.status.is_none()).count()
    }

    pub fn longest(&self) -> Duration {
        self.samples
            .iter()
            .map(|s| s.latency)
            .max()
            .unwrap_or_default()
    }

    /// Prints the figures a playbook test reports, and each failure.
    pub fn report(&self, name: &str, ok: impl Fn(StatusCode) -> bool) {
        println!(
            "{name}: {} requests, {} failed ({} connection errors), longest wait {:?}",
            self.samples.len(),
            self.failed(&ok),
            self.connection_errors(),
            self.longest()
        );
        for s in self.samples.iter().filter(|s| !s.status.is_some_and(&ok)) {
            println!(
                "  failed: {} {:?} {:?} {:?}",
                s.method,
                s.status,
                s.error,
                String::from_utf8_lossy(&s.body)
            );
        }
    }
}
