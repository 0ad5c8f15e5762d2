//! The request body handlers receive ([`Body`]), and on the dispatcher's
//! side a body that streams (docs/protocol.md, "Streamed request
//! bodies"): [`UploadTable`] routes each chunk the proxy pushes to the
//! request it belongs to, and [`Upload`] hands the chunks to the app as it
//! reads, crediting the proxy as it goes, so at most a window of the body
//! is in Redis and in this process.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anteroom_control::queue::FrameSender;
use anteroom_protocol::{Credit, MAX_CHUNK, StreamChunk, StreamEnd};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

/// The request body a handler receives: the whole body, when it came in
/// the envelope, or a stream of it as the client sends it (a body over the
/// proxy's `--body-buffer`). It yields data frames only; [`BodyError`]
/// when a streamed body is cut short (the client went away or stalled, the
/// proxy gave up), so a handler never mistakes part of a body for all of
/// it.
#[derive(Debug, Default)]
pub struct Body(Inner);

#[derive(Debug, Default)]
enum Inner {
    #[default]
    Empty,
    Whole(Bytes),
    /// Boxed: most bodies are whole, and a body moves into the request.
    Streamed(Box<Upload>),
}

/// A streamed request body was cut short; the reason says why.
#[derive(Debug, thiserror::Error)]
#[error("the request body was cut short: {0}")]
pub struct BodyError(String);

impl Body {
    /// A body of these bytes.
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Self(Inner::Empty)
        } else {
            Self(Inner::Whole(bytes))
        }
    }

    pub(crate) fn streamed(upload: Upload) -> Self {
        Self(Inner::Streamed(Box::new(upload)))
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Self::new(bytes)
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl From<String> for Body {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

impl From<&'static str> for Body {
    fn from(text: &'static str) -> Self {
        Self::new(text)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.0 {
            Inner::Empty => Poll::Ready(None),
            Inner::Whole(_) => {
                let Inner::Whole(bytes) = std::mem::take(&mut self.0) else {
                    unreachable!("matched above")
                };
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Inner::Streamed(upload) => upload.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Empty => true,
            Inner::Whole(_) => false,
            Inner::Streamed(upload) => upload.finished,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Whole(bytes) => SizeHint::with_exact(bytes.len() as u64),
            Inner::Streamed(upload) => upload.size_hint(),
        }
    }
}

/// What the credit reader hands a streamed body.
#[derive(Debug)]
enum Piece {
    Chunk(StreamChunk),
    End(StreamEnd),
    /// The proxy sent more than the window ahead of the app.
    Overrun,
}

/// A streamed body's entry in the [`UploadTable`].
#[derive(Debug)]
struct Slot {
    pieces: mpsc::UnboundedSender<Piece>,
    /// Bytes received and not yet handed to the app.
    buffered: Arc<AtomicU64>,
    /// Most it may hold: its window plus a chunk.
    limit: u64,
    /// The next chunk number routed: one below it is a copy (the proxy
    /// pushed it again after a lost answer), dropped before it is counted.
    next_seq: u64,
}

/// The streamed request bodies being received, by request id.
#[derive(Debug, Default)]
pub(crate) struct UploadTable {
    slots: Mutex<HashMap<String, Slot>>,
}

impl UploadTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A body for request `id`, whose first part is `first`: it credits
    /// the proxy on `reply_to` through `credits`, and gives up after `idle`
    /// without a piece.
    pub(crate) fn open(self: &Arc<Self>, id: &str, first: Bytes, pacing: Pacing) -> Upload {
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicU64::new(0));
        let slot = Slot {
            pieces: tx,
            buffered: Arc::clone(&buffered),
            limit: pacing.window + MAX_CHUNK as u64,
            next_seq: 0,
        };
        self.lock().insert(id.to_owned(), slot);
        let idle = pacing.idle.max(Duration::from_secs(1));
        Upload {
            table: Arc::clone(self),
            id: id.to_owned(),
            first: (!first.is_empty()).then_some(first),
            pieces: rx,
            buffered,
            next_seq: 0,
            consumed: 0,
            credited: 0,
            remaining: pacing.length,
            timer: Box::pin(tokio::time::sleep(idle)),
            idle,
            finished: false,
            pacing,
        }
    }

    /// Hands a chunk to its body; chunks of bodies no longer read are
    /// dropped.
    pub(crate) fn chunk(&self, chunk: StreamChunk) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&chunk.id) else {
            tracing::debug!("a request body chunk for no body being read; discarded");
            return;
        };
        if chunk.seq < slot.next_seq {
            tracing::debug!(
                seq = chunk.seq,
                "a request body chunk pushed twice; the copy is dropped"
            );
            return;
        }
        slot.next_seq = chunk.seq.saturating_add(1);
        let len = chunk.data.len() as u64;
        let held = slot.buffered.fetch_add(len, Ordering::AcqRel) + len;
        let piece = if held > slot.limit {
            tracing::warn!(
                held,
                limit = slot.limit,
                "a proxy sent more than the window of a request body"
            );
            Piece::Overrun
        } else {
            Piece::Chunk(chunk)
        };
        let _ = slot.pieces.send(piece);
    }

    /// Hands the end of a body to it.
    pub(crate) fn end(&self, end: StreamEnd) {
        if let Some(slot) = self.lock().get(&end.id) {
            let _ = slot.pieces.send(Piece::End(end));
        }
    }
}

/// How a streamed body is paced and where its credits go.
#[derive(Debug, Clone)]
pub(crate) struct Pacing {
    /// The request's reply list, where credits go.
    pub(crate) reply_to: String,
    pub(crate) credits: FrameSender,
    /// Most bytes the proxy sends beyond those credited.
    pub(crate) window: u64,
    /// How long the body may go without a piece.
    pub(crate) idle: Duration,
    /// The body's length, when the client declared it.
    pub(crate) length: Option<u64>,
    /// When a piece last reached the app, Unix milliseconds.
    pub(crate) last_piece_ms: Arc<AtomicU64>,
    /// Where a body cut short is counted.
    pub(crate) metrics: anteroom_metrics::DispatcherQueueMetrics,
}

/// A request body streamed from the proxy (see the module documentation).
#[derive(Debug)]
pub(crate) struct Upload {
    table: Arc<UploadTable>,
    id: String,
    first: Option<Bytes>,
    pieces: mpsc::UnboundedReceiver<Piece>,
    buffered: Arc<AtomicU64>,
    next_seq: u64,
    /// Bytes of the chunks handed to the app.
    consumed: u64,
    credited: u64,
    /// Bytes still to come, when the length is known.
    remaining: Option<u64>,
    timer: Pin<Box<tokio::time::Sleep>>,
    idle: Duration,
    finished: bool,
    pacing: Pacing,
}

impl Upload {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if let Some(first) = self.first.take() {
            self.took(first.len() as u64);
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            let piece = match self.pieces.poll_recv(cx) {
                Poll::Ready(Some(piece)) => piece,
                Poll::Ready(None) => return self.cut("the dispatcher is stopping".into()),
                Poll::Pending => {
                    if self.timer.as_mut().poll(cx).is_ready() {
                        let idle = self.idle;
                        return self.cut(format!("the proxy sent nothing for {idle:?}"));
                    }
                    return Poll::Pending;
                }
            };
            match piece {
                // A chunk the proxy pushed again after a lost answer.
                Piece::Chunk(chunk) if chunk.seq < self.next_seq => {
                    self.buffered
                        .fetch_sub(chunk.data.len() as u64, Ordering::AcqRel);
                }
                Piece::Chunk(chunk) if chunk.seq > self.next_seq => {
                    let reason = format!("chunk {} where {} was due", chunk.seq, self.next_seq);
                    return self.cut(reason);
                }
                Piece::Chunk(chunk) => {
                    self.next_seq += 1;
                    let len = chunk.data.len() as u64;
                    self.buffered.fetch_sub(len, Ordering::AcqRel);
                    self.consumed += len;
                    self.took(len);
                    self.pacing
                        .last_piece_ms
                        .store(anteroom_protocol::now_ms(), Ordering::Release);
                    let deadline = tokio::time::Instant::now() + self.idle;
                    self.timer.as_mut().reset(deadline);
                    self.credit();
                    return Poll::Ready(Some(Ok(Frame::data(chunk.data))));
                }
                Piece::End(end) => {
                    if let Some(reason) = end.aborted {
                        return self.cut(format!("the proxy aborted it: {reason}"));
                    }
                    if end.chunks != self.next_seq {
                        let reason = format!(
                            "ended after {} chunks, {} arrived",
                            end.chunks, self.next_seq
                        );
                        return self.cut(reason);
                    }
                    if self.consumed > self.credited {
                        // The last of it: the proxy stops waiting for room.
                        self.credited = self.consumed;
                        self.send_credit(false);
                    }
                    self.pacing
                        .last_piece_ms
                        .store(anteroom_protocol::now_ms(), Ordering::Release);
                    self.finish(false);
                    return Poll::Ready(None);
                }
                Piece::Overrun => return self.cut("the proxy sent more than its window".into()),
            }
        }
    }

    fn took(&mut self, len: u64) {
        if let Some(remaining) = &mut self.remaining {
            *remaining = remaining.saturating_sub(len);
        }
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::default();
        if let Some(remaining) = self.remaining {
            hint.set_exact(remaining);
        }
        hint
    }

    /// Credits the proxy once a quarter window (at most a chunk) was
    /// handed on since the last credit: the proxy's idea of the body's
    /// progress, and so of when the answer is due, stays within a chunk.
    fn credit(&mut self) {
        let every = (self.pacing.window / 4).min(MAX_CHUNK as u64);
        if self.consumed - self.credited >= every {
            self.credited = self.consumed;
            self.send_credit(false);
        }
    }

    fn send_credit(&self, cancel: bool) {
        let credit = Credit {
            id: self.id.clone(),
            consumed: self.consumed,
            cancel,
        };
        self.pacing
            .credits
            .send(&self.pacing.reply_to, credit.encode());
    }

    fn cut(&mut self, reason: String) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        tracing::warn!(%reason, consumed = self.consumed, "request body cut short");
        self.pacing.metrics.request_body_cut();
        self.finish(true);
        Poll::Ready(Some(Err(BodyError(reason))))
    }

    /// Reads no more: leaves the table (later pieces are dropped) and,
    /// with `cancel`, tells the proxy to send nothing more.
    fn finish(&mut self, cancel: bool) {
        self.finished = true;
        if cancel {
            self.send_credit(true);
        }
        self.table.lock().remove(&self.id);
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.finished {
            // The app answered (or failed) without reading all of it.
            tracing::debug!(
                consumed = self.consumed,
                "request body not read to its end; cancelling it"
            );
            self.finish(true);
        }
    }
}
