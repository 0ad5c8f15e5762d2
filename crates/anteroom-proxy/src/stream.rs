//! Streamed replies on the proxy's side (docs/protocol.md, "Streamed
//! replies"): the body of a response whose head came as a stream head,
//! fed by the reply reader, and the credits that pace its dispatcher.
//!
//! [`StreamBody`] hands each chunk to hyper as hyper asks for more (so a
//! client that reads slowly is read from slowly) and credits the dispatcher
//! for what it handed on, every quarter window; the dispatcher never has
//! more than a window unread, so at most a window of a stream waits in
//! Redis and in the proxy. A chunk out of order, an aborted end, a restart,
//! or no chunk for the idle timeout aborts the client's response (HTTP/1.1:
//! the connection closes short of its end; HTTP/2: the stream is reset),
//! never a clean end. A client that goes away cancels the stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anteroom_control::queue;
use anteroom_protocol::Credit;
use anteroom_redis::{Backoff, SharedConnection, sleep_or_stop};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::replies::{Demux, StreamFrame};

/// Why a streamed response was aborted; hyper ends the client's response
/// short when its body returns this.
#[derive(Debug, thiserror::Error)]
#[error("stream aborted: {0}")]
pub(crate) struct StreamAborted(pub(crate) String);

/// How long a credit list lives without a new credit.
const CREDIT_TTL: Duration = Duration::from_secs(60);

/// The proxy's credits on their way to dispatchers' credit lists, pushed
/// by [`write_credits`] in batches.
#[derive(Debug, Clone)]
pub(crate) struct CreditSender {
    tx: mpsc::UnboundedSender<(String, Vec<u8>)>,
}

impl CreditSender {
    /// A sender and the receiving end for [`write_credits`].
    pub(crate) fn new() -> (Self, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    fn send(&self, credit_to: &str, credit: &Credit) {
        // Stopped: the dispatcher's idle timeout ends the stream instead.
        let _ = self.tx.send((credit_to.to_owned(), credit.encode()));
    }

    /// The client of stream `id` is gone, after `consumed` bytes.
    pub(crate) fn cancel(&self, credit_to: &str, id: &str, consumed: u64) {
        let credit = Credit {
            id: id.to_owned(),
            consumed,
            cancel: true,
        };
        self.send(credit_to, &credit);
    }
}

/// How long credits that cannot be pushed are retried before they are
/// dropped (the streams they pace then idle out).
const CREDIT_RETRY: Duration = Duration::from_secs(10);

/// Pushes credits until `stop`: whatever arrived while the previous push
/// was on the wire goes in the next, one pipeline per credit list (a list
/// is one hash slot; Redis Cluster refuses a pipeline across slots).
/// Credits are running totals, so one that failed is simply sent again,
/// with backoff, for up to [`CREDIT_RETRY`]. On stop, what is queued is
/// sent once more (the cancels of the connections just closed).
pub(crate) async fn write_credits(
    mut conn: SharedConnection,
    mut rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    stop: CancellationToken,
) {
    let mut pending: Vec<(String, Vec<u8>)> = Vec::new();
    let mut backoff = Backoff::new();
    let mut failing_since: Option<std::time::Instant> = None;
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
                    push_each_list(&mut conn, &mut pending).await;
                    return;
                }
            };
            pending.push(first);
        }
        while pending.len() < 256 {
            match rx.try_recv() {
                Ok(next) => pending.push(next),
                Err(_) => break,
            }
        }
        push_each_list(&mut conn, &mut pending).await;
        if pending.is_empty() {
            backoff.reset();
            failing_since = None;
            continue;
        }
        let since = *failing_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() > CREDIT_RETRY {
            tracing::warn!(
                credits = pending.len(),
                "credits could not be sent for {CREDIT_RETRY:?}; dropped (their streams idle out)"
            );
            pending.clear();
            failing_since = None;
            continue;
        }
        if sleep_or_stop(&stop, backoff.next_delay()).await {
            push_each_list(&mut conn, &mut pending).await;
            return;
        }
    }
}

/// Pushes `pending`, one pipeline per credit list, in order within each;
/// leaves in `pending` what failed.
async fn push_each_list(conn: &mut SharedConnection, pending: &mut Vec<(String, Vec<u8>)>) {
    // Stable: a list's credits keep their order.
    pending.sort_by(|a, b| a.0.cmp(&b.0));
    let mut failed = Vec::new();
    for group in pending.chunk_by(|a, b| a.0 == b.0) {
        if let Err(err) = queue::push_replies(conn, group, CREDIT_TTL).await {
            tracing::warn!(error = %err, list = %group[0].0, "cannot send credits; retrying");
            failed.extend_from_slice(group);
        }
    }
    *pending = failed;
}

/// The body of a streamed response.
pub(crate) struct StreamBody {
    frames: mpsc::UnboundedReceiver<StreamFrame>,
    /// Bytes received and not yet handed on (see `replies::Stream`).
    buffered: Arc<AtomicU64>,
    demux: Arc<Demux>,
    /// The request's id, as the demultiplexer keys it and as text.
    key: u128,
    id: String,
    credit_to: String,
    credits: CreditSender,
    window: u64,
    next_seq: u64,
    consumed: u64,
    credited: u64,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    finished: bool,
    metrics: anteroom_metrics::ProxyQueueMetrics,
}

/// Where a [`StreamBody`] belongs and how it is paced.
pub(crate) struct StreamParts {
    pub(crate) buffered: Arc<AtomicU64>,
    pub(crate) demux: Arc<Demux>,
    pub(crate) key: u128,
    pub(crate) credit_to: String,
    pub(crate) credits: CreditSender,
    pub(crate) window: u64,
    pub(crate) idle: Duration,
    pub(crate) metrics: anteroom_metrics::ProxyQueueMetrics,
}

impl StreamBody {
    /// The body fed by `frames`; `credit_to` was checked to be a credit
    /// list of the request's queue.
    pub(crate) fn new(frames: mpsc::UnboundedReceiver<StreamFrame>, parts: StreamParts) -> Self {
        let StreamParts {
            buffered,
            demux,
            key,
            credit_to,
            credits,
            window,
            idle,
            metrics,
        } = parts;
        let idle = idle.max(Duration::from_secs(1));
        Self {
            frames,
            buffered,
            demux,
            key,
            id: uuid::Uuid::from_u128(key).hyphenated().to_string(),
            credit_to,
            credits,
            window: window.max(1),
            next_seq: 0,
            consumed: 0,
            credited: 0,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            finished: false,
            metrics,
        }
    }

    fn abort(&mut self, reason: String) -> Poll<Option<Result<Frame<Bytes>, StreamAborted>>> {
        tracing::warn!(%reason, consumed = self.consumed, "streamed response aborted");
        self.metrics.stream_aborted();
        self.finished = true;
        self.credits
            .cancel(&self.credit_to, &self.id, self.consumed);
        Poll::Ready(Some(Err(StreamAborted(reason))))
    }

    /// Credits the dispatcher once a quarter window was handed on since
    /// the last credit.
    fn credit(&mut self) {
        if self.consumed - self.credited >= self.window / 4 {
            self.credited = self.consumed;
            let credit = Credit {
                id: self.id.clone(),
                consumed: self.consumed,
                cancel: false,
            };
            self.credits.send(&self.credit_to, &credit);
        }
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = StreamAborted;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamAborted>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.frames.poll_recv(cx) {
            Poll::Ready(Some(StreamFrame::Chunk(chunk))) => {
                if chunk.seq != self.next_seq {
                    let reason = format!("chunk {} where {} was due", chunk.seq, self.next_seq);
                    return self.abort(reason);
                }
                self.next_seq += 1;
                let len = chunk.data.len() as u64;
                self.consumed += len;
                self.buffered.fetch_sub(len, Ordering::AcqRel);
                let deadline = tokio::time::Instant::now() + self.idle;
                self.timer.as_mut().reset(deadline);
                self.credit();
                Poll::Ready(Some(Ok(Frame::data(chunk.data))))
            }
            Poll::Ready(Some(StreamFrame::End(end))) => {
                if let Some(reason) = end.aborted {
                    return self.abort(format!("the dispatcher aborted it: {reason}"));
                }
                if end.chunks != self.next_seq {
                    let reason = format!(
                        "ended after {} chunks, {} arrived",
                        end.chunks, self.next_seq
                    );
                    return self.abort(reason);
                }
                self.finished = true;
                self.demux.remove_stream(self.key);
                Poll::Ready(None)
            }
            Poll::Ready(Some(StreamFrame::Restarted)) => {
                self.abort("the request was answered again from the start".into())
            }
            Poll::Ready(Some(StreamFrame::Overrun)) => {
                self.abort("the dispatcher sent more than its window".into())
            }
            Poll::Ready(None) => self.abort("the reply reader stopped".into()),
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let idle = self.idle;
                    self.abort(format!("no chunk for {idle:?}"))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        self.demux.remove_stream(self.key);
        if !self.finished {
            // The client went away (or the connection ended) mid-stream.
            tracing::debug!(
                consumed = self.consumed,
                "client gone mid-stream; cancelling it"
            );
            self.credits
                .cancel(&self.credit_to, &self.id, self.consumed);
        }
    }
}
