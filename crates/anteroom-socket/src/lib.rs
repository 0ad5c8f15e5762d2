//! WebSockets through the queue (docs/protocol.md, "WebSockets"): the one
//! relay both ends run.
//!
//! The proxy terminates the client's WebSocket, the dispatcher opens one
//! to its app, and between them each socket's messages travel as
//! [`SocketMessage`] frames on Redis lists: the proxy pushes to the
//! dispatcher's credit list, the dispatcher to the proxy's reply list, on
//! the connections both already have (a socket costs no connection of its
//! own). [`Relay::run`] is one end: it reads its local socket and pushes
//! what it reads as frames, and hands what arrives from the other end
//! ([`Event`]s, routed to it by the [`Sockets`] table) to its local socket.
//!
//! Flow control is the streamed bodies' (docs/protocol.md, "Streamed
//! replies"): each direction numbers its frames from 0, a sender never has
//! more than the window of message bytes pushed and not yet credited, and
//! a receiver credits ([`Credit`]) what it handed on, every quarter window
//! (the pieces of a message not yet whole are credited as they arrive: a
//! message larger than the window must get through, and a receiver holds
//! at most one message being assembled, bounded by the message limit).
//! A socket therefore holds at most a window in Redis; each process holds
//! besides at most the message it is pushing, the one it is assembling
//! and the one it is writing (each at most the message limit). A slow
//! reader slows its own socket only.
//!
//! Each end keeps its own side alive (pings are not relayed) and watches
//! that the other end is alive through its heartbeat key
//! ([`watch_peers`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anteroom_control::queue::{self, FrameSender};
use anteroom_protocol::{Credit, MAX_CHUNK, MAX_WINDOW, Opcode, SocketMessage};
use anteroom_redis::SharedConnection;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

pub use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Close codes this crate sends (RFC 6455 section 7.4.1).
pub mod codes {
    /// 1000: normal closure.
    pub const NORMAL: u16 = 1000;
    /// 1001: an end goes away (a proxy stopping, a client gone).
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: a protocol error (garbage frames).
    pub const PROTOCOL: u16 = 1002;
    /// 1007: a text message that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// 1009: a message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// 1011: the other end failed (its process died, or broke the
    /// protocol).
    pub const INTERNAL_ERROR: u16 = 1011;
    /// 1012: service restart (a dispatcher stopping at the end of its
    /// grace period): reconnect.
    pub const SERVICE_RESTART: u16 = 1012;
}

/// What arrives for a socket from the other end.
#[derive(Debug)]
pub enum Event {
    /// A message, or a piece of one, or its close (boxed: a socket's
    /// channel allocates room for 32 events at once, and most sockets
    /// are idle).
    Message(Box<SocketMessage>),
    /// Credit for what this end pushed.
    Credit(Credit),
    /// The other end is gone (its heartbeat expired, it answered the
    /// handshake again, it broke the window): close with 1011.
    PeerGone(String),
}

/// One socket's entry: where its events go and who the other end is.
#[derive(Debug)]
struct Slot {
    events: mpsc::UnboundedSender<Event>,
    /// Message bytes received and not yet handed on.
    held: Arc<AtomicU64>,
    /// Most that may be held: the window plus a piece.
    limit: u64,
    /// The next message number due; lower ones are copies (pushed again
    /// after a lost answer), dropped here without being counted.
    next: u64,
    /// The other end's heartbeat key.
    peer: String,
}

/// The sockets of one process, by request id: [`Sockets::deliver`] routes
/// what the list readers pop to each socket's [`Relay`].
#[derive(Debug, Default)]
pub struct Sockets {
    slots: Mutex<HashMap<String, Slot>>,
    open: AtomicU64,
}

/// The receiving end of a socket's entry in [`Sockets`]; removes the
/// entry when dropped.
#[derive(Debug)]
pub struct Inbox {
    sockets: Arc<Sockets>,
    id: String,
    events: mpsc::UnboundedReceiver<Event>,
    held: Arc<AtomicU64>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut slots = self.sockets.lock();
        // Only its own entry: a later registration of the id stays.
        let own = slots
            .get(&self.id)
            .is_some_and(|slot| Arc::ptr_eq(&slot.held, &self.held));
        if own {
            slots.remove(&self.id);
            self.sockets.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Sockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers socket `id`, whose other end beats on `peer` and may have
    /// `window` bytes outstanding (at most [`MAX_WINDOW`]). A second
    /// registration of an id replaces the first.
    pub fn open(self: &Arc<Self>, id: &str, peer: String, window: u64) -> Inbox {
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(AtomicU64::new(0));
        let slot = Slot {
            events: tx,
            held: Arc::clone(&held),
            limit: window.min(MAX_WINDOW) + MAX_CHUNK as u64,
            next: 0,
            peer,
        };
        if self.lock().insert(id.to_owned(), slot).is_none() {
            self.open.fetch_add(1, Ordering::Relaxed);
        }
        Inbox {
            sockets: Arc::clone(self),
            id: id.to_owned(),
            events: rx,
            held,
        }
    }

    /// How many sockets are open.
    pub fn len(&self) -> usize {
        self.open.load(Ordering::Relaxed) as usize
    }

    /// Whether no socket is open (cheap: no lock).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `id` is an open socket.
    pub fn contains(&self, id: &str) -> bool {
        !self.is_empty() && self.lock().contains_key(id)
    }

    /// The heartbeat key of the other end of socket `id`, if it is open.
    pub fn peer_of(&self, id: &str) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        self.lock().get(id).map(|slot| slot.peer.clone())
    }

    /// Hands `event` to socket `id`; gives it back when `id` is no socket
    /// here. A message beyond the socket's window becomes
    /// [`Event::PeerGone`]: the other end broke the protocol.
    pub fn deliver(&self, id: &str, event: Event) -> Result<(), Event> {
        if self.is_empty() {
            return Err(event);
        }
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(id) else {
            return Err(event);
        };
        let event = match event {
            Event::Message(m) if m.seq < slot.next => {
                tracing::debug!(
                    seq = m.seq,
                    "a socket message pushed twice; the copy is dropped"
                );
                return Ok(());
            }
            // A close carries no message bytes: not counted.
            Event::Message(m) if m.opcode == Opcode::Close => {
                slot.next = m.seq.saturating_add(1);
                Event::Message(m)
            }
            Event::Message(m) => {
                slot.next = m.seq.saturating_add(1);
                let len = m.data.len() as u64;
                let held = slot.held.fetch_add(len, Ordering::AcqRel) + len;
                if held > slot.limit {
                    Event::PeerGone(format!(
                        "the other end sent {held} bytes beyond its credit (limit {})",
                        slot.limit
                    ))
                } else {
                    Event::Message(m)
                }
            }
            other => other,
        };
        let _ = slot.events.send(event);
        Ok(())
    }

    /// The heartbeat keys of the other ends of the open sockets, each once.
    pub fn peers(&self) -> Vec<String> {
        let mut peers: Vec<String> = self.lock().values().map(|s| s.peer.clone()).collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// Tells every socket whose other end beats on `peer` that it is gone.
    pub fn peer_gone(&self, peer: &str) {
        for slot in self.lock().values().filter(|s| s.peer == peer) {
            let _ = slot
                .events
                .send(Event::PeerGone(format!("its heartbeat {peer} expired")));
        }
    }
}

/// Every `every` while `stop` is not cancelled, checks the heartbeat keys
/// of the other ends of `sockets` ([`queue::present`]) and tells the
/// sockets of those that expired ([`Sockets::peer_gone`]). A Redis error
/// skips a round: an end is never declared gone for want of an answer.
pub async fn watch_peers(
    mut conn: SharedConnection,
    sockets: Arc<Sockets>,
    every: Duration,
    stop: CancellationToken,
) {
    while !anteroom_redis::sleep_or_stop(&stop, every).await {
        let peers = sockets.peers();
        if peers.is_empty() {
            continue;
        }
        match queue::present(&mut conn, &peers).await {
            Ok(found) => {
                for (peer, alive) in peers.iter().zip(found) {
                    if !alive {
                        tracing::warn!(%peer, "the other end of open WebSockets stopped beating; closing them (1011)");
                        sockets.peer_gone(peer);
                    }
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "cannot check the WebSockets' other ends; next round")
            }
        }
    }
}

/// One end of a socket's relay.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The handshake request's id.
    pub id: String,
    /// Where this end's messages and credits go: the dispatcher's credit
    /// list (at the proxy), the proxy's reply list (at the dispatcher).
    pub to: String,
    /// Pushes them ([`queue::write_frames`]).
    pub frames: FrameSender,
    /// Most message bytes either way pushed and not yet credited.
    pub window: u64,
    /// Largest message the local socket may send or be sent.
    pub max_message: usize,
    /// Ping the local socket after this much silence, and close it after
    /// twice as much (`None`: never).
    pub ping_interval: Option<Duration>,
    /// Longest a message may take to be written to the local socket (a
    /// reader that takes longer is gone: the socket closes), and longest
    /// this end waits with its window full for the other end's credit
    /// (then the other end is taken for gone: 1011).
    pub send_timeout: Duration,
}

/// How a relay ended. The other end has been told (a close frame pushed
/// after this end's last message) unless it closed first or cancelled.
#[derive(Debug)]
pub struct Ended {
    /// The close code the local socket was sent or sent (1005 when none,
    /// 1006 when it went without a close).
    pub code: u16,
    /// Why, for the log.
    pub reason: String,
}

/// The WebSocket settings for a relay end: `max_message` for messages and
/// frames alike.
/// The read buffer is small (1 KiB rather than the library's 128 KiB) and
/// writes go out at once: an idle socket then costs kilobytes, not
/// hundreds of them (docs/performance.md, WebSockets).
pub fn config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message.max(1)))
        .max_frame_size(Some(max_message.max(1)))
        .read_buffer_size(1024)
        .write_buffer_size(0)
}

/// How long the closing handshake may take once a close was sent.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A message from the local socket that is still being pushed, piece by
/// piece as the window allows.
struct Pending {
    opcode: Opcode,
    data: Bytes,
}

/// Relay state: both directions' counters.
struct State<'a> {
    relay: &'a Relay,
    /// The relay's window, at least 1 and at most [`MAX_WINDOW`].
    window: u64,
    /// Next frame number this end pushes, and bytes pushed / credited.
    out_seq: u64,
    pushed: u64,
    credited: u64,
    /// Next frame number due from the other end, bytes handed on, and the
    /// total last credited back.
    in_seq: u64,
    consumed: u64,
    credited_back: u64,
    /// A message from the other end not yet whole.
    partial: Option<(Opcode, BytesMut)>,
    pending: Option<Pending>,
}

/// Why the loop stopped, and what is owed.
enum Stop {
    /// Close the local socket with `code` (`None`: a close without one),
    /// and tell the other end the same unless it already knows.
    Close {
        code: Option<u16>,
        reason: String,
        tell_peer: bool,
    },
    /// The local socket closed first (its close frame is answered by the
    /// library); tell the other end.
    LocalClosed(Option<CloseFrame>),
    /// The local socket is gone without a close: tell the other end 1001.
    LocalGone(String),
}

impl Stop {
    fn close(code: u16, reason: impl Into<String>) -> Self {
        Stop::Close {
            code: Some(code),
            reason: reason.into(),
            tell_peer: true,
        }
    }
}

/// Whether `code` may be sent in a close frame (RFC 6455 section 7.4):
/// the defined codes other than 1004 to 1006 and 1015, and the ranges
/// for libraries and applications (3000 to 4999).
fn sendable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

impl Relay {
    /// Pushes the close of this socket to the other end, as its frame
    /// `seq` (the number after this end's last message; 0 for a socket
    /// that never carried one): `code` when it may be sent (RFC 6455
    /// section 7.4; otherwise no code), `reason` cut to 123 bytes (section
    /// 5.5). The last frame an end sends.
    pub fn send_close(&self, seq: u64, code: Option<u16>, reason: &str) {
        let close = SocketMessage {
            id: self.id.clone(),
            seq,
            opcode: Opcode::Close,
            fin: true,
            code: code.filter(|c| sendable(*c)),
            data: Bytes::copy_from_slice(truncate(reason, 123).as_bytes()),
        };
        self.frames.send(&self.to, close.encode());
    }

    /// Relays between `ws` and the other end until either closes, the
    /// other end is gone, or `stop` resolves to a close code (the proxy's
    /// shutdown: 1001; the dispatcher's grace period over: 1012). Never
    /// fails: every ending closes the local socket, and tells the other
    /// end (a close frame pushed after this end's last message, before the
    /// local closing handshake) unless it closed first or cancelled.
    pub async fn run<S>(
        &self,
        ws: WebSocketStream<S>,
        mut inbox: Inbox,
        stop: impl std::future::Future<Output = u16>,
    ) -> Ended
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut sink, mut stream) = ws.split();
        let mut state = State {
            relay: self,
            window: self.window.clamp(1, MAX_WINDOW),
            out_seq: 0,
            pushed: 0,
            credited: 0,
            in_seq: 0,
            consumed: 0,
            credited_back: 0,
            partial: None,
            pending: None,
        };
        let mut stop = std::pin::pin!(stop);
        // Zero pings never, as `None` does (the timer then never fires).
        let pinging = self.ping_interval.filter(|every| !every.is_zero());
        let ping_every = pinging.unwrap_or(Duration::from_secs(86_400));
        let ping = tokio::time::sleep(ping_every);
        let mut ping = std::pin::pin!(ping);
        let mut pinged = false;
        // Running while the window is full: the other end must credit
        // within the send timeout.
        let stall = tokio::time::sleep(self.send_timeout);
        let mut stall = std::pin::pin!(stall);
        let mut stalled = false;
        // What was credited when the stall began: credit that comes on
        // (used up at once by a message still being pushed) is progress.
        let mut stall_mark = 0;
        let ended = loop {
            state.push_pending();
            let reading = state.pending.is_none() && state.room();
            if state.room() {
                stalled = false;
            } else if !stalled || state.credited != stall_mark {
                stalled = true;
                stall_mark = state.credited;
                stall
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.send_timeout);
            }
            tokio::select! {
                biased;
                code = &mut stop => break Stop::close(code, "the relay is stopping"),
                () = &mut stall, if stalled => break Stop::close(
                    codes::INTERNAL_ERROR,
                    format!("no credit from the other end for {:?}", self.send_timeout),
                ),
                event = inbox.events.recv() => {
                    let Some(event) = event else {
                        break Stop::close(codes::INTERNAL_ERROR, "the socket table dropped it");
                    };
                    let (local, len) = match state.on_event(event, &inbox.held) {
                        Ok(Some(whole)) => whole,
                        Ok(None) => continue,
                        Err(stop) => break stop,
                    };
                    // Written within the send timeout, or until a stop.
                    let written = tokio::select! {
                        biased;
                        code = &mut stop => break Stop::close(code, "the relay is stopping"),
                        written = tokio::time::timeout(self.send_timeout, sink.send(local)) => written,
                    };
                    match written {
                        Ok(Ok(())) => state.consumed(len, &inbox.held),
                        Ok(Err(err)) => break Stop::LocalGone(err.to_string()),
                        Err(_) => break Stop::LocalGone(format!(
                            "a message not taken within {:?}",
                            self.send_timeout
                        )),
                    }
                }
                read = stream.next(), if reading => {
                    ping.as_mut().reset(tokio::time::Instant::now() + ping_every);
                    pinged = false;
                    match read {
                        Some(Ok(Message::Text(text))) => state.queue(Opcode::Text, Bytes::from(text)),
                        Some(Ok(Message::Binary(data))) => state.queue(Opcode::Binary, data),
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Ok(Message::Close(frame))) => break Stop::LocalClosed(frame),
                        Some(Err(WsError::Capacity(err))) => break Stop::close(codes::TOO_BIG, err.to_string()),
                        Some(Err(WsError::Utf8(err))) => {
                            break Stop::close(codes::INVALID_DATA, format!("text that is not UTF-8: {err}"));
                        }
                        // A connection that ended without a close is gone,
                        // not broken by its peer's frames.
                        Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                            break Stop::LocalGone("the connection ended without a close".into());
                        }
                        Some(Err(WsError::Protocol(err))) => break Stop::close(codes::PROTOCOL, err.to_string()),
                        Some(Err(err)) => break Stop::LocalGone(err.to_string()),
                        None => break Stop::LocalGone("the connection closed".into()),
                    }
                }
                () = &mut ping, if pinging.is_some() => {
                    ping.as_mut().reset(tokio::time::Instant::now() + ping_every);
                    if !reading {
                        // Not reading is this end's doing (the other end
                        // has not credited it): the socket's answers wait
                        // unread, which is no silence.
                        continue;
                    }
                    if pinged {
                        break Stop::LocalGone(format!("silent for twice {ping_every:?}, ping unanswered"));
                    }
                    pinged = true;
                    let sent = tokio::time::timeout(self.send_timeout, sink.send(Message::Ping(Bytes::new()))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break Stop::LocalGone("a ping could not be sent".into());
                    }
                }
            }
        };
        let tell = |code: Option<u16>, reason: &str| self.send_close(state.out_seq, code, reason);
        match ended {
            Stop::Close {
                code,
                reason,
                tell_peer,
            } => {
                if tell_peer {
                    tell(code, &reason);
                }
                // A code the other end sent that may not be sent on (1005,
                // 1006, out of range) is no code here, or 1011 when it
                // was no defined code at all.
                let code = code.map(|c| {
                    if sendable(c) {
                        c
                    } else {
                        codes::INTERNAL_ERROR
                    }
                });
                let frame = code.map(|code| CloseFrame {
                    code: CloseCode::from(code),
                    reason: Utf8Bytes::from(truncate(&reason, 123).to_owned()),
                });
                // Sent, then the answer awaited (bounded): the closing
                // handshake of RFC 6455 section 7.1.2.
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    if sink.send(Message::Close(frame)).await.is_ok() {
                        while let Some(Ok(_)) = stream.next().await {}
                    }
                })
                .await;
                Ended {
                    code: code.unwrap_or(1005),
                    reason,
                }
            }
            Stop::LocalClosed(frame) => {
                let (code, reason) = frame.map_or((None, String::new()), |f| {
                    (Some(u16::from(f.code)), f.reason.as_str().to_owned())
                });
                tell(code, &reason);
                // The library queued the answering close; flush it.
                let _ = tokio::time::timeout(CLOSE_WAIT, sink.close()).await;
                Ended {
                    code: code.unwrap_or(1005),
                    reason: format!("closed by its side: {reason}"),
                }
            }
            Stop::LocalGone(reason) => {
                tell(Some(codes::GOING_AWAY), "the other side went away");
                Ended { code: 1006, reason }
            }
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary (a close
/// reason is at most 123 bytes, RFC 6455 section 5.5).
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl State<'_> {
    /// Whether this end may push more.
    fn room(&self) -> bool {
        self.pushed - self.credited < self.window
    }

    fn queue(&mut self, opcode: Opcode, data: Bytes) {
        self.pending = Some(Pending { opcode, data });
        self.push_pending();
    }

    /// Pushes pieces of the pending message while the window allows.
    fn push_pending(&mut self) {
        while self.room() {
            let Some(pending) = self.pending.as_mut() else {
                return;
            };
            let n = pending.data.len().min(MAX_CHUNK);
            let piece = pending.data.split_to(n);
            let fin = pending.data.is_empty();
            let message = SocketMessage {
                id: self.relay.id.clone(),
                seq: self.out_seq,
                opcode: pending.opcode,
                fin,
                code: None,
                data: piece,
            };
            self.out_seq += 1;
            self.pushed += n as u64;
            self.relay.frames.send(&self.relay.to, message.encode());
            if fin {
                self.pending = None;
            }
        }
    }

    /// Credits the other end for `len` more bytes handed on, every quarter
    /// window.
    fn consumed(&mut self, len: u64, held: &AtomicU64) {
        held.fetch_sub(len, Ordering::AcqRel);
        self.consumed += len;
        if self.consumed - self.credited_back >= (self.window / 4).max(1) {
            self.credited_back = self.consumed;
            let credit = Credit {
                id: self.relay.id.clone(),
                consumed: self.consumed,
                cancel: false,
            };
            self.relay.frames.send(&self.relay.to, credit.encode());
        }
    }

    /// Takes in one event; a whole message comes back with its length,
    /// for the caller to write to the local socket (and then credit).
    fn on_event(&mut self, event: Event, held: &AtomicU64) -> Result<Option<(Message, u64)>, Stop> {
        let message = match event {
            Event::Credit(credit) if credit.cancel => {
                return Err(Stop::Close {
                    code: Some(codes::INTERNAL_ERROR),
                    reason: "the other end cancelled the socket".into(),
                    tell_peer: false,
                });
            }
            Event::Credit(credit) => {
                self.credited = self.credited.max(credit.consumed.min(self.pushed));
                return Ok(None);
            }
            // Told too: it may be alive (it broke the window, or its
            // handshake ran again); a dead one's list just expires.
            Event::PeerGone(reason) => return Err(Stop::close(codes::INTERNAL_ERROR, reason)),
            Event::Message(message) => *message,
        };
        let len = message.data.len() as u64;
        // Copies (lower numbers) were dropped by the table.
        if message.seq != self.in_seq {
            return Err(Stop::Close {
                code: Some(codes::INTERNAL_ERROR),
                reason: format!(
                    "frame {} arrived where {} was due",
                    message.seq, self.in_seq
                ),
                tell_peer: true,
            });
        }
        self.in_seq += 1;
        if message.opcode == Opcode::Close {
            return Err(Stop::Close {
                code: message.code,
                reason: String::from_utf8_lossy(&message.data).into_owned(),
                tell_peer: false,
            });
        }
        let (opcode, mut buf) = match self.partial.take() {
            Some((opcode, buf)) if opcode == message.opcode => (opcode, buf),
            Some(_) => {
                return Err(Stop::Close {
                    code: Some(codes::INTERNAL_ERROR),
                    reason: "a message's pieces changed type".into(),
                    tell_peer: true,
                });
            }
            None => (message.opcode, BytesMut::new()),
        };
        if buf.len() + message.data.len() > self.relay.max_message.max(1) {
            return Err(Stop::Close {
                code: Some(codes::TOO_BIG),
                reason: format!("a message over {} bytes", self.relay.max_message),
                tell_peer: true,
            });
        }
        if !message.fin {
            buf.extend_from_slice(&message.data);
            self.partial = Some((opcode, buf));
            self.consumed(len, held);
            return Ok(None);
        }
        let data = if buf.is_empty() {
            message.data
        } else {
            buf.extend_from_slice(&message.data);
            buf.freeze()
        };
        let local = match opcode {
            Opcode::Text => match Utf8Bytes::try_from(data) {
                Ok(text) => Message::Text(text),
                Err(_) => {
                    return Err(Stop::Close {
                        code: Some(codes::INVALID_DATA),
                        reason: "text that is not UTF-8".into(),
                        tell_peer: true,
                    });
                }
            },
            _ => Message::Binary(data),
        };
        Ok(Some((local, len)))
    }
}
