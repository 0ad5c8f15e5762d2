//! A TCP relay between a process and Redis that injects network faults,
//! as a network between them would:
//! - it loses one reply: the first chunk from Redis that contains a chosen
//!   marker ([`Relay::lose_reply_containing`]), or the first chunk from
//!   Redis after a command that contains one ([`Relay::lose_reply_to`]),
//!   or the next reply on any connection ([`Relay::lose_next_reply`]), is
//!   dropped and the connection closed (Redis has applied the command; the
//!   process never learns what it did);
//! - it loses one command: the first chunk toward Redis that contains a
//!   marker ([`Relay::lose_command_containing`]) is dropped and the
//!   connection closed (Redis never sees it; the process cannot tell this
//!   from a lost reply);
//! - added latency, each way, on every chunk (order kept);
//! - slow segments: every Nth chunk each way waits 200 ms more, as TCP
//!   waits a retransmission timeout for a lost segment (a relay cannot
//!   lose bytes of a TCP stream without breaking it, so loss is modelled
//!   by its delay);
//! - a partition: nothing passes either way until healed, then what was
//!   sent meanwhile arrives (as TCP delivers it once the network heals),
//!   also on connections the process has given up on;
//! - a reset: every open connection is closed at once, and what it held
//!   back is never delivered (as a firewall or NAT that lost its state
//!   resets the connections across it).
//!
//! Its target is a fixed port, or whatever a function names at each new
//! connection ([`Relay::start_to`]), e.g. the primary a Sentinel names
//! now, as a TCP load balancer in front of Sentinel would.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// Which reply to lose next.
#[derive(Debug, Clone)]
enum Lose {
    /// The first reply containing these bytes.
    Containing(Vec<u8>),
    /// The first reply after a command containing these bytes.
    To(Vec<u8>),
    /// The first command containing these bytes, never delivered.
    Command(Vec<u8>),
    /// The next reply, on whichever connection it comes.
    Next,
}

#[derive(Default)]
struct Faults {
    lose: Mutex<Option<Lose>>,
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
    /// Bumped by [`Relay::reset`]: connections opened before end.
    resets: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

/// Where each new connection goes: a port on 127.0.0.1, `None` while
/// there is none (the connection is closed at once).
pub type Target = Arc<dyn Fn() -> Option<u16> + Send + Sync>;

impl Relay {
    /// Relays 127.0.0.1:`PORT` (a free port) to Redis at 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Self {
        Self::start_to(Arc::new(move || Some(target))).await
    }

    /// Relays 127.0.0.1:`PORT` (a free port) to the port `target` names
    /// when each connection comes (it may block briefly: it is asked on a
    /// blocking thread).
    pub async fn start_to(target: Target) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let (partition, partitioned) = watch::channel(false);
        let (resets, reset) = watch::channel(0u64);
        let accept = {
            let faults = Arc::clone(&faults);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (faults, partitioned, target) = (
                        Arc::clone(&faults),
                        partitioned.clone(),
                        Arc::clone(&target),
                    );
                    let mut reset = reset.clone();
                    reset.mark_unchanged();
                    let connection = async move {
                        let Ok(Some(port)) = tokio::task::spawn_blocking(move || target()).await
                        else {
                            return;
                        };
                        let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                            return;
                        };
                        let (from_client, to_client) = client.into_split();
                        let (from_server, to_server) = server.into_split();
                        let asked = Arc::new(AtomicBool::new(false));
                        let up = Pump {
                            faults: Arc::clone(&faults),
                            partitioned: partitioned.clone(),
                            replies: false,
                            asked: Arc::clone(&asked),
                        };
                        let mut up = AbortOnDrop(tokio::spawn(up.run(from_client, to_server)));
                        let down = Pump {
                            faults,
                            partitioned,
                            replies: true,
                            asked,
                        };
                        down.run(from_server, to_client).await;
                        // What the process still sends goes on to Redis
                        // (after a lost reply, until it sees the close).
                        let _ = (&mut up.0).await;
                    };
                    // A reset ends the connection; the relay's end does
                    // not (its connections live on, as they always did).
                    let reset = async move {
                        if reset.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::spawn(async move {
                        tokio::select! {
                            () = connection => {}
                            () = reset => {}
                        }
                    });
                }
            })
        };
        Self {
            port,
            faults,
            partition,
            resets,
            accept,
        }
    }

    /// `redis://127.0.0.1:PORT` of the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Loses the next reply that contains `marker` (once).
    pub fn lose_reply_containing(&self, marker: &[u8]) {
        self.lose(Lose::Containing(marker.to_vec()));
    }

    /// Loses the reply to the next command that contains `marker` (once):
    /// the first chunk from Redis on that connection after the command
    /// passed (on a connection with several commands in flight, possibly
    /// an earlier one's; the connection closes either way).
    pub fn lose_reply_to(&self, marker: &[u8]) {
        self.lose(Lose::To(marker.to_vec()));
    }

    /// Loses the next command that contains `marker` (once): the chunk
    /// toward Redis holding it is dropped, and its connection closed.
    pub fn lose_command_containing(&self, marker: &[u8]) {
        self.lose(Lose::Command(marker.to_vec()));
    }

    /// Loses the next reply, whichever connection it comes on (once).
    pub fn lose_next_reply(&self) {
        self.lose(Lose::Next);
    }

    fn lose(&self, what: Lose) {
        *self
            .faults
            .lose
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(what);
    }

    /// How many replies (and commands) it has lost.
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

    /// Closes every open connection at once; what they held back (during
    /// a partition) is never delivered. New connections are relayed as
    /// before.
    pub fn reset(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One direction of one connection.
struct Pump {
    faults: Arc<Faults>,
    partitioned: watch::Receiver<bool>,
    /// The direction from Redis, where a reply may be lost.
    replies: bool,
    /// Set by the other direction when a command whose reply is to be
    /// lost has passed.
    asked: Arc<AtomicBool>,
}

impl Pump {
    /// Relays `from` to `to` with the faults in force: a reader that
    /// stamps each chunk with its delivery time, and a writer that waits
    /// for it (and for a partition to heal).
    async fn run(self, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
        let Self {
            faults,
            mut partitioned,
            replies,
            asked,
        } = self;
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let mut writer = AbortOnDrop(tokio::spawn(async move {
            while let Some((at, chunk)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                if partitioned.wait_for(|cut| !cut).await.is_err() {
                    return;
                }
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        }));
        let mut buf = vec![0u8; 64 * 1024];
        let (mut count, mut last) = (0u64, Instant::now());
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = buf[..n].to_vec();
            if faults.lost_here(&chunk, replies, &asked) {
                // The writer goes (toward the process: it sees its
                // connection closed; toward Redis: the connection closes,
                // and with it the one back).
                writer.0.abort();
                return;
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
        let _ = (&mut writer.0).await;
    }
}

/// A task aborted when its handle is dropped: a connection's pumps end
/// with it (a reset drops them, and what they held goes too).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Faults {
    /// Whether `chunk`, going toward the process when `replies`, is the
    /// reply to lose, or going toward Redis, the command to lose; a
    /// command going toward Redis may mark its connection's next reply
    /// (`asked`).
    fn lost_here(&self, chunk: &[u8], replies: bool, asked: &AtomicBool) -> bool {
        let contains = |m: &[u8]| chunk.windows(m.len().max(1)).any(|w| w == m);
        let mut lose = self.lose.lock().unwrap_or_else(PoisonError::into_inner);
        if !replies {
            match &*lose {
                Some(Lose::To(m)) if contains(m) => {
                    *lose = None;
                    asked.store(true, Ordering::Release);
                }
                Some(Lose::Command(m)) if contains(m) => {
                    *lose = None;
                    self.lost.fetch_add(1, Ordering::AcqRel);
                    return true;
                }
                _ => {}
            }
            return false;
        }
        let asked_for = asked.swap(false, Ordering::AcqRel);
        let matched = match &*lose {
            Some(Lose::Containing(m)) => contains(m),
            Some(Lose::Next) => true,
            Some(Lose::To(_) | Lose::Command(_)) | None => false,
        };
        if matched {
            *lose = None;
        }
        let hit = asked_for || matched;
        if hit {
            self.lost.fetch_add(1, Ordering::AcqRel);
        }
        hit
    }
}
