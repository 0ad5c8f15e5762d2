//! Streamed request bodies on the proxy's side (docs/protocol.md,
//! "Streamed request bodies"): the rest of a body over `--body-buffer`,
//! sent to the dispatcher that took its request.
//!
//! [`Pump`] reads nothing of the client's body until a dispatcher has
//! taken the request (its taken frame arrives on the reply list), so
//! while the request waits in the queue, during a pause or with no
//! dispatcher running, TCP (or HTTP/2 flow control) holds the upload in
//! the client. Then it reads the body and pushes it to the list the
//! dispatcher named, in chunks, never more than the dispatcher's window
//! beyond what it has credited: at most a window of the body is in Redis,
//! and a piece in the proxy. The pump stops sending when the request's
//! entry in the demultiplexer goes (it was answered, or nobody waits for
//! it any more) or the dispatcher cancels, and then reads and discards the
//! rest within the lingering bounds (`linger.rs`), so the client reads its
//! answer rather than a reset. A client that stalls past the idle timeout,
//! or sends more than `--max-body`, is answered by the proxy (408, 413);
//! in every case but a clean end, the dispatcher's copy is aborted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anteroom_control::queue;
use anteroom_protocol::{MAX_CHUNK, MAX_WINDOW, StreamChunk, StreamEnd};
use anteroom_redis::Backoff;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::error::ProxyError;
use crate::handler::{Refused, State};
use crate::replies::UploadEvent;
use crate::stream::CREDIT_TTL;

/// The part of a request body that streams, and where the dispatcher's
/// word on it arrives.
pub(crate) struct Pump {
    pub(crate) state: Arc<State>,
    /// The request's id, as the demultiplexer keys it.
    pub(crate) key: u128,
    /// The body, after the part in the envelope.
    pub(crate) body: Incoming,
    /// Body bytes in the envelope already.
    pub(crate) inline: u64,
    /// The body's `Content-Length`, if the client declared one.
    pub(crate) declared: Option<u64>,
    pub(crate) events: mpsc::UnboundedReceiver<UploadEvent>,
    /// When the body last moved (see [`Progress`]).
    pub(crate) progress: Progress,
}

/// When a streamed body last moved: taken, a piece pushed, a credit
/// received, its end, the dispatcher's last credit after it (milliseconds
/// on the process's monotonic clock; 0: not yet taken). The request's
/// answer is due by the later of its deadline and one stream idle timeout
/// plus [`DUE_MARGIN`] after this: the dispatcher counts its own idle
/// timeout from when the app last read, which the proxy learns a credit
/// later, so the dispatcher's answer (its own 504 included) comes first.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress(Arc<AtomicU64>);

/// What the proxy waits beyond the dispatcher's reckoning of when an
/// answer is due.
const DUE_MARGIN: Duration = Duration::from_secs(5);

/// Milliseconds since the first call, on the monotonic clock (at least 1,
/// so that 0 can mean "never").
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Progress {
    fn moved(&self) {
        self.0.store(monotonic_ms(), Ordering::Release);
    }

    /// When the answer is due, if the body's progress puts it after
    /// `deadline` and it is not due yet.
    pub(crate) fn due_after(
        &self,
        deadline: tokio::time::Instant,
        idle: Duration,
    ) -> Option<tokio::time::Instant> {
        let last = self.0.load(Ordering::Acquire);
        if last == 0 {
            return None;
        }
        let ago = Duration::from_millis(monotonic_ms().saturating_sub(last));
        let now = tokio::time::Instant::now();
        let due = now + (idle + DUE_MARGIN).saturating_sub(ago);
        (due > deadline && due > now).then_some(due)
    }
}

/// How long a request may wait to be gathered into one chunk with what
/// follows it: a client that trickles bytes makes a chunk every few
/// milliseconds at most, not one per byte.
const GATHER: Duration = Duration::from_millis(5);

/// How a gathered chunk left the body.
enum Gathered {
    More,
    Ended,
    Failed(hyper::Error),
}

/// `first` and whatever else of `body` arrives within [`GATHER`], up to
/// `piece` bytes, and whether the body ended or failed meanwhile (hyper
/// reports a body's error once: it must not be lost here).
async fn gather(body: &mut Incoming, first: Bytes, piece: usize) -> (BytesMut, Gathered) {
    let mut batch = BytesMut::from(&first[..]);
    let until = tokio::time::Instant::now() + GATHER;
    while batch.len() < piece {
        match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => break,
            Ok(None) => return (batch, Gathered::Ended),
            Ok(Some(Err(err))) => return (batch, Gathered::Failed(err)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    batch.extend_from_slice(&data);
                }
            }
        }
    }
    (batch, Gathered::More)
}

/// Where a body goes and how far it got.
struct Sending {
    state: Arc<State>,
    declared: Option<u64>,
    progress: Progress,
    id: String,
    send_to: String,
    window: u64,
    /// The next chunk's number.
    seq: u64,
    /// Body bytes pushed.
    sent: u64,
    /// Body bytes the dispatcher handed on (a running total).
    consumed: u64,
    cancelled: bool,
}

/// How sending a body ended early.
enum Cut {
    /// Stop sending; nothing more to say (the dispatcher cancelled).
    Quiet,
    /// Tell the dispatcher the body was cut short, for this reason.
    Abort(String),
    /// And answer the client with this, if nothing answered it yet.
    Refuse(String, ProxyError),
}

impl Pump {
    /// Sends the body once a dispatcher takes the request; see the module
    /// documentation.
    pub(crate) async fn run(self) {
        let Pump {
            state,
            key,
            body,
            inline,
            declared,
            mut events,
            progress,
        } = self;
        let taken = loop {
            match events.recv().await {
                // Answered (504 at the hold budget), or nobody waits for
                // it: the rest is discarded, as after any early answer.
                None => return crate::linger::discard(&mut { body }).await,
                Some(UploadEvent::Taken(taken)) => break taken,
                Some(UploadEvent::Credit(credit)) if credit.cancel => return,
                Some(UploadEvent::Credit(_)) => {}
            }
        };
        let mut out = Sending {
            id: uuid::Uuid::from_u128(key).hyphenated().to_string(),
            send_to: taken.send_to,
            window: taken.window.clamp(1, MAX_WINDOW),
            state: Arc::clone(&state),
            declared,
            progress,
            seq: 0,
            sent: 0,
            consumed: 0,
            cancelled: false,
        };
        out.progress.moved();
        let mut body = body;
        let cut = match out.body(&mut body, inline, &mut events).await {
            Ok(()) => {
                out.end(None).await;
                // The answer stays due while the app reads what is left.
                return out.credited(&mut events).await;
            }
            Err(cut) => cut,
        };
        match cut {
            Cut::Refuse(reason, error) => {
                tracing::debug!(%reason, sent = out.sent, "request body refused");
                // The early answer reads (or lingers over) the rest; if
                // the request was answered meanwhile, the rest is
                // discarded here.
                let unanswered = state.demux.refuse(key, Refused::early(error, body));
                out.end(Some(reason)).await;
                if let Some(mut rest) = unanswered.and_then(|refused| refused.unread) {
                    crate::linger::discard(&mut rest).await;
                }
                return;
            }
            Cut::Quiet => {}
            Cut::Abort(reason) => {
                tracing::debug!(%reason, sent = out.sent, "request body cut short");
                out.end(Some(reason)).await;
            }
        }
        // The request is answered, or will be, while the client may still
        // be sending: the rest is read and discarded (within the lingering
        // bounds) rather than dropped, so that the client reads its answer
        // instead of a reset (HTTP/1) or a cancelled stream (HTTP/2).
        crate::linger::discard(&mut body).await;
    }
}

impl Sending {
    fn idle(&self) -> Duration {
        self.state
            .config
            .stream_idle_timeout
            .max(Duration::from_secs(1))
    }

    fn apply(&mut self, event: UploadEvent) {
        if let UploadEvent::Credit(credit) = event {
            // Never more than was sent: a credit is a dispatcher's word,
            // read from Redis.
            self.consumed = self.consumed.max(credit.consumed.min(self.sent));
            self.cancelled |= credit.cancel;
            self.progress.moved();
        }
    }

    /// Reads the body and sends it, within the window, until it ends.
    async fn body(
        &mut self,
        body: &mut Incoming,
        inline: u64,
        events: &mut mpsc::UnboundedReceiver<UploadEvent>,
    ) -> Result<(), Cut> {
        let idle = self.idle();
        let max_body = self.state.config.max_body;
        let limit = (max_body as u64).saturating_sub(inline);
        // A quarter window at most, so that waiting for room before each
        // piece keeps what is outstanding within the window.
        let piece = (self.window as usize / 4).clamp(1, MAX_CHUNK);
        // The client's idle time runs from its last piece (or from when
        // the pump waits on it), whatever the dispatcher says meanwhile.
        let mut client_due = tokio::time::Instant::now() + idle;
        loop {
            let frame = tokio::select! {
                frame = tokio::time::timeout_at(client_due, body.frame()) => frame,
                event = events.recv() => {
                    self.event(event)?;
                    continue;
                }
            };
            let first = match frame {
                Err(_) => {
                    let reason = format!("the client sent nothing for {idle:?}");
                    return Err(Cut::Refuse(reason, ProxyError::BodyTimeout(idle)));
                }
                Ok(None) => return self.check_length(inline),
                Ok(Some(Err(err))) => {
                    return Err(Cut::Abort(format!("the client's body failed: {err}")));
                }
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers: the protocol carries none.
                    Err(_) => continue,
                },
            };
            let (batch, next) = gather(body, first, piece).await;
            if self.sent + batch.len() as u64 > limit {
                let reason = format!("the body is over --max-body ({max_body} bytes)");
                let error = ProxyError::BodyTooLarge { limit: max_body };
                return Err(Cut::Refuse(reason, error));
            }
            let mut batch = batch.freeze();
            while !batch.is_empty() {
                let part = batch.split_to(batch.len().min(piece));
                self.room(part.len() as u64, events).await?;
                self.push_chunk(part).await?;
            }
            // Waiting for room was the dispatcher's time, not the client's.
            client_due = tokio::time::Instant::now() + idle;
            match next {
                Gathered::More => {}
                Gathered::Ended => return self.check_length(inline),
                Gathered::Failed(err) => {
                    return Err(Cut::Abort(format!("the client's body failed: {err}")));
                }
            }
        }
    }

    /// A body that ended: complete only if it is as long as its
    /// `Content-Length` said (an HTTP/2 stream reset with `NO_ERROR` ends a
    /// body early without an error).
    fn check_length(&self, inline: u64) -> Result<(), Cut> {
        let got = inline + self.sent;
        match self.declared {
            Some(declared) if declared != got => Err(Cut::Abort(format!(
                "the body ended after {got} of the {declared} bytes declared"
            ))),
            _ => Ok(()),
        }
    }

    /// Takes in one event from the dispatcher: `Err` when sending should
    /// stop.
    fn event(&mut self, event: Option<UploadEvent>) -> Result<(), Cut> {
        match event {
            // Answered, or given up on (the hold budget ran out): the
            // dispatcher's copy of the body must not look complete.
            None => Err(Cut::Abort("the request was answered or given up".into())),
            Some(event) => {
                self.apply(event);
                if self.cancelled {
                    return Err(Cut::Quiet);
                }
                Ok(())
            }
        }
    }

    /// After a clean end: follows the dispatcher's credits until the app
    /// has read all that was sent (each wait bounded by the idle timeout),
    /// so the answer's due time moves with the app's reading.
    async fn credited(&mut self, events: &mut mpsc::UnboundedReceiver<UploadEvent>) {
        let idle = self.idle();
        while self.consumed < self.sent && !self.cancelled {
            match tokio::time::timeout(idle, events.recv()).await {
                Ok(Some(event)) => self.apply(event),
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Waits until `len` more bytes fit in the window.
    async fn room(
        &mut self,
        len: u64,
        events: &mut mpsc::UnboundedReceiver<UploadEvent>,
    ) -> Result<(), Cut> {
        let idle = self.idle();
        while self.sent + len > self.consumed.saturating_add(self.window) {
            match tokio::time::timeout(idle, events.recv()).await {
                Ok(event) => self.event(event)?,
                Err(_) => {
                    return Err(Cut::Abort(format!(
                        "the dispatcher read nothing for {idle:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    async fn push_chunk(&mut self, data: Bytes) -> Result<(), Cut> {
        let len = data.len() as u64;
        let chunk = StreamChunk {
            id: self.id.clone(),
            seq: self.seq,
            data,
        };
        if let Err(err) = self.push(&chunk.encode()).await {
            return Err(Cut::Abort(format!("cannot push a chunk: {err}")));
        }
        self.seq += 1;
        self.sent += len;
        self.progress.moved();
        Ok(())
    }

    /// Pushes `frame` to the dispatcher's list, retrying with backoff for
    /// up to the idle timeout (a chunk pushed twice is told apart by its
    /// number; the dispatcher skips the copy).
    async fn push(&self, frame: &[u8]) -> redis::RedisResult<()> {
        let give_up = tokio::time::Instant::now() + self.idle();
        let mut backoff = Backoff::new();
        loop {
            let mut conn = self.state.conn.clone();
            let err = match queue::push_reply(&mut conn, &self.send_to, frame, CREDIT_TTL).await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            let delay = backoff.next_delay();
            if tokio::time::Instant::now() + delay >= give_up {
                return Err(err);
            }
            tracing::debug!(error = %err, "cannot push a request body chunk; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Pushes the end: clean, or aborted for `reason`.
    async fn end(&self, aborted: Option<String>) {
        self.progress.moved();
        let end = StreamEnd {
            id: self.id.clone(),
            chunks: self.seq,
            aborted,
        };
        if let Err(err) = self.push(&end.encode()).await {
            tracing::warn!(error = %err, "cannot push a request body's end; the dispatcher's copy idles out");
        }
    }
}
