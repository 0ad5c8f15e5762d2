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
//! and a piece in the proxy. The pump stops when the request's entry in
//! the demultiplexer goes (it was answered, or nobody waits for it any
//! more) or the dispatcher cancels; a client that stalls past the idle
//! timeout, or sends more than `--max-body`, is answered by the proxy
//! (408, 413) and the dispatcher's copy of the body is aborted.

use std::sync::Arc;
use std::time::Duration;

use anteroom_control::queue;
use anteroom_protocol::{MAX_CHUNK, StreamChunk, StreamEnd};
use anteroom_redis::Backoff;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::error::ProxyError;
use crate::handler::{Refused, State};
use crate::replies::{MAX_WINDOW, UploadEvent};
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
    pub(crate) events: mpsc::UnboundedReceiver<UploadEvent>,
}

/// Where a body goes and how far it got.
struct Sending {
    state: Arc<State>,
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

/// How the client's side of a body ended early.
enum Cut {
    /// Stop sending; nothing more to say (the dispatcher cancelled, or the
    /// request was answered).
    Quiet,
    /// Tell the dispatcher the body was cut short, for this reason.
    Abort(String),
    /// And answer the client with this, if nothing answered it yet.
    Refuse(String, Refused),
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
            mut events,
        } = self;
        let taken = loop {
            match events.recv().await {
                // Answered, or nobody waits for it: nothing was read.
                None => return,
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
            seq: 0,
            sent: 0,
            consumed: 0,
            cancelled: false,
        };
        let cut = match out.body(body, inline, &mut events).await {
            Ok(()) => return out.end(None).await,
            Err(cut) => cut,
        };
        match cut {
            Cut::Quiet => {}
            Cut::Abort(reason) => {
                tracing::debug!(%reason, sent = out.sent, "request body cut short");
                out.end(Some(reason)).await;
            }
            Cut::Refuse(reason, refused) => {
                tracing::debug!(%reason, sent = out.sent, "request body refused");
                state.demux.refuse(key, refused);
                out.end(Some(reason)).await;
            }
        }
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
            self.consumed = self.consumed.max(credit.consumed);
            self.cancelled |= credit.cancel;
        }
    }

    /// Reads the body and sends it, within the window, until it ends.
    async fn body(
        &mut self,
        mut body: Incoming,
        inline: u64,
        events: &mut mpsc::UnboundedReceiver<UploadEvent>,
    ) -> Result<(), Cut> {
        let idle = self.idle();
        let max_body = self.state.config.max_body;
        let limit = (max_body as u64).saturating_sub(inline);
        // A quarter window at most, so that waiting for room before each
        // piece keeps what is outstanding within the window.
        let piece = (self.window as usize / 4).clamp(1, MAX_CHUNK);
        loop {
            let frame = tokio::select! {
                frame = tokio::time::timeout(idle, body.frame()) => frame,
                event = events.recv() => {
                    self.event(event)?;
                    continue;
                }
            };
            let data = match frame {
                Err(_) => {
                    let reason = format!("the client sent nothing for {idle:?}");
                    let refused = Refused::early(ProxyError::BodyTimeout(idle), body);
                    return Err(Cut::Refuse(reason, refused));
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(err))) => {
                    return Err(Cut::Abort(format!("the client's body failed: {err}")));
                }
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers: the protocol carries none.
                    Err(_) => continue,
                },
            };
            // Whatever else the client has sent goes in the same chunk.
            let mut batch = BytesMut::from(&data[..]);
            let mut ended = false;
            while batch.len() < piece {
                match body.frame().now_or_never() {
                    Some(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            batch.extend_from_slice(&data);
                        }
                    }
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    // An error shows again on the next read.
                    Some(Some(Err(_))) | None => break,
                }
            }
            if self.sent + batch.len() as u64 > limit {
                let reason = format!("the body is over --max-body ({max_body} bytes)");
                let refused = Refused::early(ProxyError::BodyTooLarge { limit: max_body }, body);
                return Err(Cut::Refuse(reason, refused));
            }
            let mut batch = batch.freeze();
            while !batch.is_empty() {
                let part = batch.split_to(batch.len().min(piece));
                self.room(part.len() as u64, events).await?;
                self.push_chunk(part).await?;
            }
            if ended {
                return Ok(());
            }
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

    /// Waits until `len` more bytes fit in the window.
    async fn room(
        &mut self,
        len: u64,
        events: &mut mpsc::UnboundedReceiver<UploadEvent>,
    ) -> Result<(), Cut> {
        let idle = self.idle();
        while self.sent + len > self.consumed + self.window {
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
