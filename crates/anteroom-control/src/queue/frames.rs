//! Frames pushed in the background: credits and cancels, which the code
//! that produces them cannot wait for (a response body's `poll_frame`, a
//! `Drop`), and WebSocket messages, which a relay sends in order without
//! waiting for each (`anteroom-socket`). [`FrameSender`] queues them;
//! [`write_frames`] pushes them in batches, in order, one pipeline per
//! list.

use std::time::{Duration, Instant};

use anteroom_redis::{Backoff, SharedConnection, sleep_or_stop};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::push_replies;

/// Frames on their way to lists, pushed by [`write_frames`]. Cheap to
/// clone; sending never waits.
#[derive(Debug, Clone)]
pub struct FrameSender {
    tx: mpsc::UnboundedSender<(String, Vec<u8>)>,
}

/// The receiving end of a [`FrameSender`], for [`write_frames`].
pub type FrameReceiver = mpsc::UnboundedReceiver<(String, Vec<u8>)>;

impl FrameSender {
    /// A sender and the receiving end for [`write_frames`].
    pub fn new() -> (Self, FrameReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Queues `frame` for `list`. Once the writer has stopped it is
    /// dropped: the stream it paces then idles out at its reader.
    pub fn send(&self, list: &str, frame: Vec<u8>) {
        let _ = self.tx.send((list.to_owned(), frame));
    }
}

/// How long frames that cannot be pushed are retried before they are
/// dropped (the streams they pace then idle out).
const RETRY_FOR: Duration = Duration::from_secs(10);

/// Most frames pushed in one batch.
const BATCH: usize = 256;

/// Pushes what `rx` receives until `stop`: whatever arrived while the
/// previous push was on the wire goes in the next, one pipeline per list
/// (a list is one hash slot; Redis Cluster refuses a pipeline across
/// slots), each list's TTL set to `ttl` (see [`push_replies`]). A batch
/// that failed is sent again, with backoff, for up to [`RETRY_FOR`]:
/// credits are running totals, and socket messages are numbered, so a
/// copy is recognised and dropped by its receiver. Past that the frames
/// are dropped: the streams they pace idle out, and a socket that misses
/// a message sees the gap and closes (1011); one that misses its close
/// closes when its own side next finds the other gone. On stop, what is
/// queued is sent once more (the cancels of the connections just closed).
pub async fn write_frames(
    mut conn: SharedConnection,
    mut rx: FrameReceiver,
    ttl: Duration,
    stop: CancellationToken,
) {
    let mut pending: Vec<(String, Vec<u8>)> = Vec::new();
    let mut backoff = Backoff::new();
    let mut failing_since: Option<Instant> = None;
    loop {
        if pending.is_empty() {
            let first = tokio::select! {
                first = rx.recv() => match first {
                    Some(first) => first,
                    None => return,
                },
                () = stop.cancelled() => {
                    while let Ok(next) = rx.try_recv() {
                        pending.push(next);
                    }
                    push_each_list(&mut conn, &mut pending, ttl).await;
                    return;
                }
            };
            pending.push(first);
        }
        while pending.len() < BATCH {
            match rx.try_recv() {
                Ok(next) => pending.push(next),
                Err(_) => break,
            }
        }
        push_each_list(&mut conn, &mut pending, ttl).await;
        if pending.is_empty() {
            backoff.reset();
            failing_since = None;
            continue;
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > RETRY_FOR {
            tracing::warn!(
                frames = pending.len(),
                "credits could not be sent for {RETRY_FOR:?}; dropped (their streams idle out)"
            );
            pending.clear();
            failing_since = None;
            continue;
        }
        if sleep_or_stop(&stop, backoff.next_delay()).await {
            push_each_list(&mut conn, &mut pending, ttl).await;
            return;
        }
    }
}

/// Pushes `pending`, one pipeline per list, in order within each; leaves
/// in `pending` what failed.
async fn push_each_list(
    conn: &mut SharedConnection,
    pending: &mut Vec<(String, Vec<u8>)>,
    ttl: Duration,
) {
    // Stable: a list's frames keep their order.
    pending.sort_by(|a, b| a.0.cmp(&b.0));
    let mut failed = Vec::new();
    for group in pending.chunk_by(|a, b| a.0 == b.0) {
        if let Err(err) = push_replies(conn, group, ttl).await {
            tracing::warn!(error = %err, list = %group[0].0, "cannot send credits; retrying");
            failed.extend_from_slice(group);
        }
    }
    *pending = failed;
}
