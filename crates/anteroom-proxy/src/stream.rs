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
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::replies::{Demux, StreamFrame};

/// Why a streamed response was aborted; hyper ends the client's response
/// short when its body returns this.
#[derive(Debug, thiserror::Error)]
#[error("stream aborted: {0}")]
pub(crate) struct StreamAborted(pub(crate) String);

/// How long a credit list lives without a new credit.
pub(crate) const CREDIT_TTL: Duration = Duration::from_secs(60);

/// The proxy's credits on their way to dispatchers' credit lists (pushed
/// by [`queue::write_frames`] with [`CREDIT_TTL`]).
#[derive(Debug, Clone)]
pub(crate) struct CreditSender(pub(crate) queue::FrameSender);

impl CreditSender {
    fn send(&self, credit_to: &str, credit: &Credit) {
        self.0.send(credit_to, credit.encode());
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
