//! Streamed replies (docs/protocol.md, "Streamed replies"): a response
//! whose body is not all there at once goes to the proxy as a head, chunks
//! as the body produces them, and an end, paced by the proxy's credits.
//!
//! - [`CreditTable`] and [`read_credits`]: one reader per dispatcher pops
//!   its credit list (`anteroom:{q}:credits:<id>`, `follow_list` on a connection of
//!   its own) and wakes the stream each credit names.
//! - [`send`]: one stream, from head to end. It never has more than the
//!   window sent and not yet credited, so a slow client holds the app's
//!   body back instead of filling Redis or memory. A cancel (the client is
//!   gone) or [`STOPPING`] ends it; an app body that fails or stays silent
//!   past the idle timeout aborts it, and the proxy then aborts the
//!   client's response rather than ending it cleanly.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use anteroom_control::queue::{self, Done};
use anteroom_protocol::{
    Credit, Inbound, MAX_CHUNK, RequestEnvelope, StreamChunk, StreamEnd, StreamHead,
    headers_from_map, now_ms,
};
use anteroom_redis::Target;
use anteroom_socket::Event;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::describe;
use crate::handle::with_retries;
use crate::worker::{ResponseBody, Shared};

/// Why a stream that ends without its body's end ended, in its end frame.
const STOPPING: &str = "dispatcher stopping";

/// What the proxy has said of one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CreditState {
    /// Body bytes handed to the client so far.
    pub(crate) consumed: u64,
    /// The client is gone.
    pub(crate) cancel: bool,
}

/// The streams waiting for credits, by request id.
#[derive(Debug, Default)]
pub(crate) struct CreditTable {
    streams: Mutex<HashMap<String, watch::Sender<CreditState>>>,
}

/// One stream's credits; removed from the table when dropped.
pub(crate) struct Credits<'a> {
    table: &'a CreditTable,
    id: String,
    rx: watch::Receiver<CreditState>,
}

impl Drop for Credits<'_> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

impl CreditTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<CreditState>>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, id: &str) -> Credits<'_> {
        let (tx, rx) = watch::channel(CreditState::default());
        self.lock().insert(id.to_owned(), tx);
        Credits {
            table: self,
            id: id.to_owned(),
            rx,
        }
    }

    /// Hands a credit to its stream; credits for streams that ended are
    /// dropped. Totals only grow: a late, smaller one changes nothing.
    fn deliver(&self, credit: Credit) {
        if let Some(tx) = self.lock().get(&credit.id) {
            tx.send_if_modified(|state| {
                let before = *state;
                state.consumed = state.consumed.max(credit.consumed);
                state.cancel |= credit.cancel;
                *state != before
            });
        }
    }
}

/// Pops this dispatcher's credit list until `stop` (see
/// [`queue::follow_list`]) and hands each credit to its stream, and each
/// piece of a streamed request body to its body.
pub(crate) async fn read_credits(shared: Arc<Shared>, target: Target, stop: CancellationToken) {
    let deliver = |raw| match Inbound::decode(raw) {
        Ok(Inbound::Credit(credit)) => {
            let id = credit.id.clone();
            if let Err(Event::Credit(credit)) = shared.sockets.deliver(&id, Event::Credit(credit)) {
                shared.credits.deliver(credit);
            }
        }
        Ok(Inbound::Message(message)) => {
            let id = message.id.clone();
            if shared
                .sockets
                .deliver(&id, Event::Message(Box::new(message)))
                .is_err()
            {
                tracing::debug!("a message for no open socket; discarded");
            }
        }
        Ok(Inbound::Chunk(chunk)) => shared.uploads.chunk(chunk),
        Ok(Inbound::End(end)) => shared.uploads.end(end),
        Err(err) => {
            tracing::warn!(error = %err, "discarding a credit-list frame that does not decode")
        }
    };
    let (key, timeout) = (&shared.credits_key, shared.settings.redis_timeout);
    queue::follow_list(&target, key, timeout, &stop, "credit reader", deliver).await;
}

/// How a stream ended.
enum Ending {
    /// The body ended: a clean end.
    Done,
    /// Cut short: the proxy aborts its client's response.
    Aborted(String),
    /// The client is gone: nothing more to send.
    Cancelled,
}

/// Streams `body` (after `first`, read already) as the reply to `envelope`
/// held as `raw` in this dispatcher's processing list: the head, the chunks
/// as the body yields them within the window, then the end, pushed with the
/// request's removal from the processing list in one MULTI (as a complete
/// reply is). Never fails: what goes wrong ends the stream, aborted.
pub(crate) async fn send<B: ResponseBody>(
    shared: &Shared,
    envelope: &RequestEnvelope,
    raw: &Bytes,
    mut parts: http::response::Parts,
    body: Pin<Box<B>>,
    first: Vec<Bytes>,
) {
    let credits = shared.credits.register(&envelope.id);
    anteroom_protocol::strip_hop_by_hop_from_response(&mut parts.headers, parts.status.as_u16());
    let window = shared.settings.stream_window as u64;
    let head = StreamHead {
        id: envelope.id.clone(),
        status: parts.status.as_u16(),
        headers: headers_from_map(&parts.headers),
        credit_to: shared.credits_key.clone(),
        window,
        run: shared.delivery(),
    };
    let sse = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut out = Outgoing {
        shared,
        reply_to: &envelope.reply_to,
        id: &envelope.id,
        seq: 0,
        sent: 0,
        window,
        // A quarter window at most, so that waiting for room before each
        // piece keeps what is outstanding within the window.
        piece: (window as usize / 4).clamp(1, MAX_CHUNK),
        credits,
    };
    // The head within the request's deadline, retried as a complete reply
    // would be; given up, the client gets its 504 at the deadline.
    let head = head.encode();
    let pushed = with_retries("stream head", envelope.deadline_ms, || out.push(&head)).await;
    let ending = if pushed.is_some() {
        let ending = std::panic::AssertUnwindSafe(out.body(body, first))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Ending::Aborted("the response body panicked".into()));
        match ending {
            // At the end of the grace period an event stream ends
            // cleanly, so EventSource clients reconnect (with
            // Last-Event-ID) to a dispatcher still running; any other
            // body cut short must look cut short.
            Ending::Aborted(reason) if reason == STOPPING && sse => Ending::Done,
            ending => ending,
        }
    } else {
        shared.metrics.stream_aborted();
        Ending::Cancelled
    };
    let end = match &ending {
        Ending::Done => Some(None),
        Ending::Aborted(reason) => {
            tracing::warn!(%reason, sent = out.sent, "stream aborted");
            shared.metrics.stream_aborted();
            Some(Some(reason.clone()))
        }
        Ending::Cancelled => {
            tracing::debug!(sent = out.sent, "stream stopped: client gone");
            None
        }
    };
    let frame = end.map(|aborted| {
        StreamEnd {
            id: envelope.id.clone(),
            chunks: out.seq,
            aborted,
        }
        .encode()
    });
    let done = Done {
        reply_to: &envelope.reply_to,
        reply: frame.as_deref(),
        raw,
        from_tail: false,
    };
    let ttl = shared.settings.reply_ttl;
    let processing = &shared.processing_key;
    // The end (and the request's removal) is retried like a completion;
    // past the idle timeout the proxy has aborted the stream anyway.
    let idle_ms =
        u64::try_from(shared.settings.stream_idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let until = now_ms().saturating_add(idle_ms);
    let ended = with_retries("stream end", until, || {
        let mut conn = shared.conn.clone();
        async move { queue::complete_now(&mut conn, processing, ttl, &[done]).await }
    })
    .await;
    if ended.is_some() {
        shared.replicate().await;
    }
}

/// The frames of one stream, pushed in order.
struct Outgoing<'a> {
    shared: &'a Shared,
    reply_to: &'a str,
    id: &'a str,
    /// The next chunk's number.
    seq: u64,
    /// Body bytes pushed.
    sent: u64,
    window: u64,
    /// Largest chunk pushed.
    piece: usize,
    credits: Credits<'a>,
}

impl Outgoing<'_> {
    async fn push(&self, frame: &[u8]) -> redis::RedisResult<()> {
        let ttl = self.shared.settings.reply_ttl;
        queue::push_reply(&mut self.shared.conn.clone(), self.reply_to, frame, ttl).await
    }

    /// Waits until `len` more bytes fit in the window: never more than the
    /// window sent and not credited.
    async fn room(&mut self, len: u64) -> Result<(), Ending> {
        let idle = self.shared.settings.stream_idle_timeout;
        let stopping = self.shared.streams_stop.clone();
        loop {
            let state = *self.credits.rx.borrow_and_update();
            if state.cancel {
                return Err(Ending::Cancelled);
            }
            if self.sent + len <= state.consumed.min(self.sent).saturating_add(self.window) {
                return Ok(());
            }
            tokio::select! {
                changed = self.credits.rx.changed() => if changed.is_err() {
                    return Err(Ending::Cancelled);
                },
                () = tokio::time::sleep(idle) => {
                    return Err(Ending::Aborted(format!("the client read nothing for {idle:?}")));
                }
                () = stopping.cancelled() => return Err(Ending::Aborted(STOPPING.into())),
            }
        }
    }

    async fn chunk(&mut self, mut data: Bytes) -> Result<(), Ending> {
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(self.piece));
            let len = piece.len() as u64;
            self.room(len).await?;
            let chunk = StreamChunk {
                id: self.id.to_owned(),
                seq: self.seq,
                data: piece,
            };
            // Retried like the end, until the proxy would have given up
            // on the stream: a push whose answer was lost lands twice, and
            // the proxy drops the copy by its number.
            let frame = chunk.encode();
            let idle_ms = u64::try_from(self.shared.settings.stream_idle_timeout.as_millis())
                .unwrap_or(u64::MAX);
            let until = now_ms().saturating_add(idle_ms);
            if with_retries("stream chunk", until, || self.push(&frame))
                .await
                .is_none()
            {
                return Err(Ending::Aborted(format!(
                    "cannot push a chunk within {:?}",
                    self.shared.settings.stream_idle_timeout
                )));
            }
            self.seq += 1;
            self.sent += len;
        }
        Ok(())
    }

    /// Sends the body within the window until it ends, fails, idles out,
    /// the client goes, or the dispatcher stops.
    async fn body<B: ResponseBody>(&mut self, mut body: Pin<Box<B>>, first: Vec<Bytes>) -> Ending {
        let idle = self.shared.settings.stream_idle_timeout;
        let stopping = self.shared.streams_stop.clone();
        for data in first {
            if let Err(ending) = self.chunk(data).await {
                return ending;
            }
        }
        loop {
            if self.credits.rx.borrow().cancel {
                return Ending::Cancelled;
            }
            let next = tokio::select! {
                frame = body.frame() => step(frame),
                changed = self.credits.rx.changed() => {
                    if changed.is_err() {
                        return Ending::Cancelled;
                    }
                    continue;
                }
                () = tokio::time::sleep(idle) => {
                    return Ending::Aborted(format!("the body sent nothing for {idle:?}"));
                }
                () = stopping.cancelled() => return Ending::Aborted(STOPPING.into()),
            };
            let data = match next {
                Step::End => return Ending::Done,
                Step::Failed(reason) => return Ending::Aborted(reason),
                Step::Skip => continue,
                Step::Data(data) => data,
            };
            // Whatever else the body has ready goes in the same push.
            let mut batch = BytesMut::from(&data[..]);
            let mut after = None;
            while batch.len() < self.piece {
                let Some(frame) = body.frame().now_or_never() else {
                    break;
                };
                match step(frame) {
                    Step::Data(data) => batch.extend_from_slice(&data),
                    Step::Skip => {}
                    Step::End => {
                        after = Some(Ending::Done);
                        break;
                    }
                    Step::Failed(reason) => {
                        after = Some(Ending::Aborted(reason));
                        break;
                    }
                }
            }
            if let Err(ending) = self.chunk(batch.freeze()).await {
                return ending;
            }
            if let Some(ending) = after {
                return ending;
            }
        }
    }
}

/// One frame of a body, as the stream uses it (nothing of the body's own
/// error type is kept: it need not be `Send`).
enum Step {
    Data(Bytes),
    /// Trailers: a reply carries none.
    Skip,
    End,
    Failed(String),
}

fn step<E: Into<crate::BoxError>>(frame: Option<Result<http_body::Frame<Bytes>, E>>) -> Step {
    match frame {
        None => Step::End,
        Some(Err(err)) => {
            let err: crate::BoxError = err.into();
            Step::Failed(format!("the body failed: {}", describe(&*err)))
        }
        Some(Ok(frame)) => frame.into_data().map_or(Step::Skip, Step::Data),
    }
}

/// Reads what `body` has ready now, without waiting, up to `upto` bytes:
/// `Ok((frames, true))` when that was the whole body. A body whose first
/// bytes are not there yet, or that holds more, is streamed.
pub(crate) fn ready_now<B: ResponseBody>(
    body: &mut Pin<Box<B>>,
    upto: usize,
) -> Result<(Vec<Bytes>, bool), crate::BoxError> {
    let mut frames = Vec::new();
    let mut size = 0;
    while size <= upto {
        let Some(frame) = body.frame().now_or_never() else {
            break;
        };
        match step(frame) {
            Step::Data(data) => {
                size += data.len();
                frames.push(data);
            }
            Step::Skip => {}
            Step::End => return Ok((frames, true)),
            Step::Failed(reason) => return Err(reason.into()),
        }
    }
    Ok((frames, false))
}
