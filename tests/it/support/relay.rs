//! A TCP relay between a process and Redis that loses one reply: the
//! first chunk from Redis that contains a chosen marker is dropped and the
//! connection closed, as a network failure does to a reply in flight.
//! Redis has applied the command by then; the process never learns what
//! it did.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The relay; it stops accepting when dropped.
pub struct Relay {
    port: u16,
    marker: Arc<Mutex<Option<Vec<u8>>>>,
    dropped: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Relays 127.0.0.1:`PORT` (a free port) to Redis at 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let marker: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let dropped = Arc::new(AtomicUsize::new(0));
        let accept = {
            let (marker, dropped) = (Arc::clone(&marker), Arc::clone(&dropped));
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        continue;
                    };
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
                    });
                    let (marker, dropped) = (Arc::clone(&marker), Arc::clone(&dropped));
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from_server.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let chunk = &buf[..n];
                            let lose = {
                                let mut marker =
                                    marker.lock().unwrap_or_else(PoisonError::into_inner);
                                let hit = marker.as_ref().is_some_and(|m| {
                                    chunk.windows(m.len()).any(|w| w == m.as_slice())
                                });
                                if hit {
                                    *marker = None;
                                }
                                hit
                            };
                            if lose {
                                dropped.fetch_add(1, Ordering::AcqRel);
                                // Both halves toward the client dropped: it
                                // sees its connection closed.
                                return;
                            }
                            if to_client.write_all(chunk).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            })
        };
        Self {
            port,
            marker,
            dropped,
            accept,
        }
    }

    /// `redis://127.0.0.1:PORT` of the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Loses the next reply that contains `marker` (once).
    pub fn lose_reply_containing(&self, marker: &[u8]) {
        *self.marker.lock().unwrap_or_else(PoisonError::into_inner) = Some(marker.to_vec());
    }

    /// How many replies it has lost.
    pub fn lost(&self) -> usize {
        self.dropped.load(Ordering::Acquire)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
