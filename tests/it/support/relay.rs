//! A TCP relay between a process and Redis that injects network faults,
//! as a network between them would:
//! - it loses one reply: the first chunk from Redis that contains a chosen
//!   marker is dropped and the connection closed (Redis has applied the
//!   command; the process never learns what it did);
//! - added latency, each way, on every chunk (order kept);
//! - slow segments: every Nth chunk each way waits 200 ms more, as TCP
//!   waits a retransmission timeout for a lost segment (a relay cannot
//!   lose bytes of a TCP stream without breaking it, so loss is modelled
//!   by its delay);
//! - a partition: nothing passes either way until healed, then what was
//!   sent meanwhile arrives (as TCP delivers it once the network heals),
//!   also on connections the process has given up on.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long TCP waits to send a lost segment again (Linux's minimum RTO).
const RETRANSMISSION: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Faults {
    marker: Mutex<Option<Vec<u8>>>,
    lost: AtomicUsize,
    latency_ms: AtomicU64,
    /// Every Nth chunk is slow (0: none).
    slow_every: AtomicU64,
}

/// The relay; it stops accepting when dropped.
pub struct Relay {
    port: u16,
    faults: Arc<Faults>,
    partition: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Relays 127.0.0.1:`PORT` (a free port) to Redis at 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let (partition, partitioned) = watch::channel(false);
        let accept = {
            let faults = Arc::clone(&faults);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        continue;
                    };
                    let (from_client, to_client) = client.into_split();
                    let (from_server, to_server) = server.into_split();
                    let up = (Arc::clone(&faults), partitioned.clone());
                    tokio::spawn(pump(from_client, to_server, up.0, up.1, false));
                    let down = (Arc::clone(&faults), partitioned.clone());
                    tokio::spawn(pump(from_server, to_client, down.0, down.1, true));
                }
            })
        };
        Self {
            port,
            faults,
            partition,
            accept,
        }
    }

    /// `redis://127.0.0.1:PORT` of the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Loses the next reply that contains `marker` (once).
    pub fn lose_reply_containing(&self, marker: &[u8]) {
        *self
            .faults
            .marker
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(marker.to_vec());
    }

    /// How many replies it has lost.
    pub fn lost(&self) -> usize {
        self.faults.lost.load(Ordering::Acquire)
    }

    /// Adds `latency` each way (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.faults.latency_ms.store(ms, Ordering::Release);
    }

    /// Makes every `n`th chunk each way wait a retransmission timeout
    /// more (0: none); `n` = 20 is 5 % loss.
    pub fn set_slow_every(&self, n: u64) {
        self.faults.slow_every.store(n, Ordering::Release);
    }

    /// Cuts the network (`true`) or heals it (`false`).
    pub fn set_partitioned(&self, cut: bool) {
        self.partition.send_replace(cut);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Relays `from` to `to` with the faults in force: a reader that stamps
/// each chunk with its delivery time, and a writer that waits for it (and
/// for a partition to heal). `replies`: the direction from Redis, where a
/// reply may be lost.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    faults: Arc<Faults>,
    mut partitioned: watch::Receiver<bool>,
    replies: bool,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if partitioned.wait_for(|cut| !cut).await.is_err() {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    let (mut count, mut last) = (0u64, Instant::now());
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = buf[..n].to_vec();
        if replies {
            let mut marker = faults.marker.lock().unwrap_or_else(PoisonError::into_inner);
            let hit = marker
                .as_ref()
                .is_some_and(|m| chunk.windows(m.len()).any(|w| w == m.as_slice()));
            if hit {
                *marker = None;
                faults.lost.fetch_add(1, Ordering::AcqRel);
                // The writer toward the process goes: it sees its
                // connection closed.
                writer.abort();
                return;
            }
        }
        count += 1;
        let mut delay = Duration::from_millis(faults.latency_ms.load(Ordering::Acquire));
        let every = faults.slow_every.load(Ordering::Acquire);
        if every > 0 && count % every == 0 {
            delay += RETRANSMISSION;
        }
        // In order: never before the chunk ahead of it.
        last = last.max(Instant::now() + delay);
        if tx.send((last, chunk)).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
