//! The demultiplexer: one reader per queue pops this proxy's reply list and
//! hands each frame to the request waiting for its id: a whole reply, or
//! the head of a stream and then its chunks and end; and, for a request
//! whose body streams, the dispatcher's taken frame and credits to the
//! task sending that body (`upload.rs`) (docs/protocol.md).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anteroom_control::queue;
use anteroom_protocol::{
    Credit, Failure, Keys, MAX_CHUNK, MAX_WINDOW, Reply, ResponseEnvelope, StreamChunk, StreamEnd,
    StreamHead, Taken,
};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::handler::Refused;
use crate::stream::CreditSender;

/// What a request is waiting for: its first reply frame, or (once its
/// head came) the rest of its stream; and where the dispatcher's word on
/// its streamed body goes, if it has one. The body's sender stops when
/// the entry goes (the request was answered, or nobody waits for it).
#[derive(Debug)]
enum Entry {
    Waiting(ReplySender, Option<UploadEvents>),
    /// A WebSocket handshake's: a head of status 101 opens its socket
    /// (whose frames then go to [`Demux::sockets`]).
    Handshake(ReplySender),
    /// Boxed: a map of a million waiting requests pays for its entries'
    /// size in each of its slots, and few of them stream.
    Streaming(Box<Stream>),
}

/// Where a waiting request's answer goes. The answer is boxed, so the
/// channel each waiting request holds is small (docs/performance.md,
/// "A million held requests").
type ReplySender = oneshot::Sender<Box<Delivered>>;

type UploadEvents = mpsc::UnboundedSender<UploadEvent>;

/// What the dispatcher says of a request body it is sent.
#[derive(Debug)]
pub(crate) enum UploadEvent {
    /// It took the request: send the body (checked to name a credit list
    /// of the queue).
    Taken(Taken),
    /// It handed this much of the body to the app, or wants no more.
    Credit(Credit),
}

impl Entry {
    fn upload(&self) -> Option<&UploadEvents> {
        match self {
            Entry::Waiting(_, upload) => upload.as_ref(),
            Entry::Handshake(_) => None,
            Entry::Streaming(stream) => stream.upload.as_ref(),
        }
    }
}

/// A stream under way: where its frames go, and how much of it the proxy
/// holds.
#[derive(Debug)]
struct Stream {
    frames: mpsc::UnboundedSender<StreamFrame>,
    /// Body bytes received and not yet handed to the client (shared with
    /// its [`crate::stream::StreamBody`], which takes off what it hands on).
    buffered: Arc<AtomicU64>,
    /// Most it may hold: its window, at most [`MAX_WINDOW`], plus a chunk.
    limit: u64,
    credit_to: String,
    /// The request's streamed body, still being sent.
    upload: Option<UploadEvents>,
    /// The number after the highest chunk received: one below it is a
    /// copy.
    next_seq: u64,
    /// Its head's `run` (empty when the dispatcher gave none): a head with
    /// the same is a copy.
    run: String,
}

/// Keyed by the id's 128 bits rather than its text: a waiting request then
/// costs the map no allocation of its own.
type Waiters = HashMap<u128, Entry>;

/// A request's answer, as its waiter receives it.
#[derive(Debug)]
pub(crate) enum Delivered {
    /// A whole response.
    Complete(ResponseEnvelope),
    /// The head of a streamed one, where the rest of it arrives, and the
    /// count of its bytes buffered.
    Stream(
        StreamHead,
        mpsc::UnboundedReceiver<StreamFrame>,
        Arc<AtomicU64>,
    ),
    /// The proxy answers it itself: its streamed body broke a limit.
    Refused(Refused),
    /// A WebSocket handshake's answer: the socket is open at the
    /// dispatcher (the head's status is 101), and its frames arrive here.
    Socket(StreamHead, anteroom_socket::Inbox),
}

/// What a streamed response receives after its head.
#[derive(Debug)]
pub(crate) enum StreamFrame {
    Chunk(StreamChunk),
    End(StreamEnd),
    /// Another head or a whole reply came for it: the request ran again
    /// (its dispatcher died and a reaper settled it). The stream cannot go
    /// on where it was.
    Restarted,
    /// The dispatcher sent more than its window ahead of the client.
    Overrun,
}

/// Requests waiting for replies, by envelope id.
#[derive(Debug)]
pub(crate) struct Demux {
    waiters: Mutex<Waiters>,
    /// Where cancels go, for streams nobody reads any more.
    credits: CreditSender,
    /// The open WebSockets, whose frames go to their relays.
    pub(crate) sockets: Arc<anteroom_socket::Sockets>,
}

/// A registered wait. Dropping it (the client went away, or the hold budget
/// passed) removes the entry, so a late reply is discarded; once its
/// stream has begun, the entry is the stream's ([`StreamBody`]).
pub(crate) struct Waiter {
    demux: Arc<Demux>,
    id: u128,
    rx: oneshot::Receiver<Box<Delivered>>,
    /// The reply was taken (a stream's head included: its body owns the
    /// stream from then on).
    taken: bool,
}

impl Waiter {
    /// The reply; `None` if the reader stopped.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivered>> {
        let polled = Pin::new(&mut self.rx)
            .poll(cx)
            .map(|answer| answer.ok().map(|boxed| *boxed));
        if polled.is_ready() {
            self.taken = true;
        }
        polled
    }

    /// The id it waits on, for the stream that may follow.
    pub(crate) fn id(&self) -> u128 {
        self.id
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // Closed first, so a socket the reader opens from now on cannot
        // be sent here (it cancels it itself); one already sent is taken.
        self.rx.close();
        if let Ok(Delivered::Socket(head, inbox)) = self.rx.try_recv().map(|boxed| *boxed) {
            // Opened as its client went (or its hold budget ran out): the
            // dispatcher's side must not stay open.
            drop(inbox);
            self.demux.cancel_socket(&head);
        }
        let mut waiters = self.demux.lock();
        match waiters.get(&self.id) {
            Some(Entry::Waiting(..) | Entry::Handshake(_)) => {
                waiters.remove(&self.id);
            }
            // A head came, and nobody took it (the client went, the hold
            // budget ran out): the stream is nobody's; stop it.
            Some(Entry::Streaming(_)) if !self.taken => {
                if let Some(Entry::Streaming(stream)) = waiters.remove(&self.id) {
                    drop(waiters);
                    self.demux.cancel_to(&stream.credit_to, self.id);
                }
            }
            _ => {}
        }
    }
}

impl Demux {
    /// An empty table; cancels for orphaned streams go through `credits`.
    pub(crate) fn new(credits: CreditSender) -> Self {
        Self {
            waiters: Mutex::new(HashMap::new()),
            credits,
            sockets: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers interest in the reply to `id`; call before enqueueing.
    pub(crate) fn register(self: &Arc<Self>, id: uuid::Uuid) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let id = id.as_u128();
        self.lock().insert(id, Entry::Waiting(tx, None));
        Waiter {
            demux: Arc::clone(self),
            id,
            rx,
            taken: false,
        }
    }

    /// Registers interest in the answer to WebSocket handshake `id`; call
    /// before enqueueing.
    pub(crate) fn register_handshake(self: &Arc<Self>, id: uuid::Uuid) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let id = id.as_u128();
        self.lock().insert(id, Entry::Handshake(tx));
        Waiter {
            demux: Arc::clone(self),
            id,
            rx,
            taken: false,
        }
    }

    /// Where the dispatcher's word on the streamed body of `id` (just
    /// registered) will go.
    pub(crate) fn register_upload(&self, id: u128) -> mpsc::UnboundedReceiver<UploadEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(Entry::Waiting(_, upload)) = self.lock().get_mut(&id) {
            *upload = Some(tx);
        }
        rx
    }

    /// Answers `id` with `refused` if nothing answered it yet (its
    /// streamed body broke a limit); gives it back otherwise.
    pub(crate) fn refuse(&self, id: u128, refused: Refused) -> Option<Refused> {
        let mut waiters = self.lock();
        if let Some(Entry::Waiting(..)) = waiters.get(&id) {
            if let Some(Entry::Waiting(tx, _)) = waiters.remove(&id) {
                // Given back when the waiter has just gone.
                return tx
                    .send(Box::new(Delivered::Refused(refused)))
                    .err()
                    .and_then(|d| match *d {
                        Delivered::Refused(refused) => Some(refused),
                        _ => None,
                    });
            }
        }
        Some(refused)
    }

    /// Tells the dispatcher of socket `head` (opened, never relayed) that
    /// nobody will use it.
    pub(crate) fn cancel_socket(&self, head: &StreamHead) {
        self.credits.cancel(&head.credit_to, &head.id, 0);
    }

    /// Where credits go.
    pub(crate) fn credits(&self) -> CreditSender {
        self.credits.clone()
    }

    /// Forgets a stream (it ended, or its client went away).
    pub(crate) fn remove_stream(&self, id: u128) {
        let mut waiters = self.lock();
        if matches!(waiters.get(&id), Some(Entry::Streaming(_))) {
            waiters.remove(&id);
        }
    }

    /// Hands one frame of `keys`' reply list to whoever waits for it.
    fn deliver(&self, raw: Bytes, keys: &Keys) {
        let reply = match Reply::decode(raw) {
            Ok(reply) => reply,
            Err(err) => {
                tracing::warn!(error = %err, "discarding a reply that does not decode");
                return;
            }
        };
        // Ids this proxy gave out are UUIDs; anything else waits for nothing here.
        let Some(id) = uuid::Uuid::try_parse(reply.id())
            .ok()
            .map(|id| id.as_u128())
        else {
            tracing::debug!(id = %anteroom_protocol::printable(reply.id()), "reply for an id this proxy never gave out");
            return;
        };
        let reply = match self.deliver_to_socket(reply, keys) {
            Ok(()) => return,
            Err(reply) => reply,
        };
        let mut waiters = self.lock();
        if let Reply::Taken(_) | Reply::Credit(_) = &reply {
            return self.deliver_upload(waiters, id, reply, keys);
        }
        let entry = match waiters.remove(&id) {
            Some(Entry::Handshake(tx)) => match reply {
                Reply::Head(head) if head.status == 101 => {
                    drop(waiters);
                    return self.open_socket(tx, head, keys, id);
                }
                // Refused by the app: an ordinary answer.
                reply @ (Reply::Complete(_) | Reply::Head(_)) => {
                    let entry = Some(Entry::Waiting(tx, None));
                    return self.deliver_entry(waiters, id, entry, reply, keys);
                }
                stray => {
                    waiters.insert(id, Entry::Handshake(tx));
                    drop(waiters);
                    tracing::debug!(
                        kind = kind_name(&stray),
                        "stray frame for a handshake not answered yet; discarded"
                    );
                    return;
                }
            },
            entry => entry,
        };
        self.deliver_entry(waiters, id, entry, reply, keys);
    }

    /// Routes a frame of an open WebSocket to its relay; gives back any
    /// other. A whole reply or a head for an open socket means its
    /// handshake ran again (its dispatcher died and a reaper settled it):
    /// the socket cannot go on.
    fn deliver_to_socket(&self, reply: Reply, keys: &Keys) -> Result<(), Reply> {
        use anteroom_socket::Event;
        if self.sockets.is_empty() {
            return Err(reply);
        }
        let id = reply.id().to_owned();
        let event = match reply {
            Reply::Message(message) => Event::Message(Box::new(message)),
            Reply::Credit(credit) => Event::Credit(credit),
            other => {
                let Some(peer) = self.sockets.peer_of(&id) else {
                    return Err(other);
                };
                if let Reply::Head(head) = &other {
                    // The same head pushed twice (a retry after a lost
                    // answer) changes nothing.
                    let same = head.status == 101
                        && keys.dispatcher_of_credits(&head.credit_to).as_ref() == Some(&peer);
                    if same {
                        tracing::debug!("a socket's head pushed twice; the copy is dropped");
                        return Ok(());
                    }
                }
                Event::PeerGone(format!(
                    "its handshake was answered again ({})",
                    kind_name(&other)
                ))
            }
        };
        match self.sockets.deliver(&id, event) {
            Ok(()) => Ok(()),
            Err(Event::Message(message)) => Err(Reply::Message(*message)),
            Err(Event::Credit(credit)) => Err(Reply::Credit(credit)),
            // It closed meanwhile: nothing left to tell it.
            Err(Event::PeerGone(_)) => Ok(()),
        }
    }

    /// A handshake answered 101: its socket opens (when the head names a
    /// credit list of the queue; otherwise 502), and its waiter gets the
    /// inbox.
    fn open_socket(&self, tx: ReplySender, head: StreamHead, keys: &Keys, id: u128) {
        let Some(peer) = keys.dispatcher_of_credits(&head.credit_to) else {
            tracing::warn!(
                credit_to = %anteroom_protocol::printable(&head.credit_to),
                queue = %keys.queue(),
                "a socket head whose credit list is not one of the queue's; answered 502"
            );
            let _ = tx.send(Box::new(Delivered::Complete(
                Failure::HandlerFailed.to_envelope(&head.id),
            )));
            return;
        };
        let inbox = self.sockets.open(&head.id, peer, head.window);
        let credit_to = head.credit_to.clone();
        if tx.send(Box::new(Delivered::Socket(head, inbox))).is_err() {
            // The inbox went with it (its entry is removed).
            tracing::debug!("socket opened as its handshake gave up; cancelling it");
            self.cancel_to(&credit_to, id);
        }
    }

    /// Hands `reply` to the entry of `id` (removed from `waiters`).
    fn deliver_entry(
        &self,
        mut waiters: std::sync::MutexGuard<'_, Waiters>,
        id: u128,
        entry: Option<Entry>,
        reply: Reply,
        keys: &Keys,
    ) {
        match (entry, reply) {
            (Some(Entry::Waiting(tx, _)), Reply::Complete(reply)) => {
                // The receiver may have just given up; then the reply is late.
                if tx.send(Box::new(Delivered::Complete(reply))).is_err() {
                    tracing::debug!("reply arrived as its request gave up");
                }
            }
            (Some(Entry::Waiting(tx, _)), Reply::Head(head)) if head.status == 101 => {
                // 101 answers a WebSocket handshake only.
                tracing::warn!(
                    "a stream head of status 101 for a request that is no handshake; answered 502"
                );
                drop(waiters);
                self.cancel(keys, &head.credit_to, id);
                let _ = tx.send(Box::new(Delivered::Complete(
                    Failure::HandlerFailed.to_envelope(&head.id),
                )));
            }
            (Some(Entry::Waiting(tx, _)), Reply::Head(head))
                if !keys.is_credits(&head.credit_to) =>
            {
                // Credits would go to a key that is not one of this
                // queue's: the stream is not followed, the client gets 502.
                tracing::warn!(
                    credit_to = %anteroom_protocol::printable(&head.credit_to),
                    queue = %keys.queue(),
                    "a stream head whose credit list is not one of the queue's; answered 502"
                );
                let _ = tx.send(Box::new(Delivered::Complete(
                    Failure::HandlerFailed.to_envelope(&head.id),
                )));
            }
            (Some(Entry::Waiting(tx, upload)), Reply::Head(head)) => {
                let (frames, rx) = mpsc::unbounded_channel();
                let credit_to = head.credit_to.clone();
                let buffered = Arc::new(AtomicU64::new(0));
                let stream = Box::new(Stream {
                    frames,
                    buffered: Arc::clone(&buffered),
                    limit: head.window.min(MAX_WINDOW) + MAX_CHUNK as u64,
                    credit_to: credit_to.clone(),
                    upload,
                    next_seq: 0,
                    run: head.run.clone(),
                });
                if tx
                    .send(Box::new(Delivered::Stream(head, rx, buffered)))
                    .is_ok()
                {
                    waiters.insert(id, Entry::Streaming(stream));
                } else {
                    drop(waiters);
                    tracing::debug!("stream began as its request gave up; cancelling it");
                    self.cancel_to(&credit_to, id);
                }
            }
            (Some(Entry::Streaming(mut stream)), Reply::Chunk(chunk))
                if chunk.seq < stream.next_seq =>
            {
                // A copy (pushed again after a lost answer, or delivered
                // again after a lost take): dropped before it counts
                // against the window.
                stream.next_seq = stream.next_seq.max(chunk.seq + 1);
                waiters.insert(id, Entry::Streaming(stream));
                drop(waiters);
                tracing::debug!(
                    seq = chunk.seq,
                    "a stream chunk delivered twice; the copy is dropped"
                );
            }
            (Some(Entry::Streaming(mut stream)), Reply::Chunk(chunk)) => {
                stream.next_seq = chunk.seq.saturating_add(1);
                let len = chunk.data.len() as u64;
                let held = stream.buffered.fetch_add(len, Ordering::AcqRel) + len;
                if held > stream.limit {
                    let _ = stream.frames.send(StreamFrame::Overrun);
                    drop(waiters);
                    tracing::warn!(
                        held,
                        limit = stream.limit,
                        "a dispatcher sent more than its window; stream aborted"
                    );
                    self.cancel_to(&stream.credit_to, id);
                } else if stream.frames.send(StreamFrame::Chunk(chunk)).is_ok() {
                    waiters.insert(id, Entry::Streaming(stream));
                } else {
                    drop(waiters);
                    self.cancel_to(&stream.credit_to, id);
                }
            }
            (Some(Entry::Streaming(stream)), Reply::Head(head))
                if !stream.run.is_empty() && head.run == stream.run =>
            {
                // The head again, as a reader delivers again what its last
                // take carried after a reconnect: not a second run.
                waiters.insert(id, Entry::Streaming(stream));
                tracing::debug!("a stream head delivered twice; the copy is dropped");
            }
            (Some(Entry::Streaming(stream)), Reply::End(end)) => {
                let _ = stream.frames.send(StreamFrame::End(end));
            }
            (Some(Entry::Streaming(stream)), other) => {
                let _ = stream.frames.send(StreamFrame::Restarted);
                drop(waiters);
                tracing::warn!(
                    "a streamed request answered again from the start (run again); its stream is aborted"
                );
                if let Reply::Head(head) = other {
                    self.cancel(keys, &head.credit_to, id);
                }
            }
            (entry, reply) => {
                if let Some(entry) = entry {
                    waiters.insert(id, entry);
                }
                drop(waiters);
                tracing::debug!(id = %reply.id(), "late or stray reply frame discarded");
                if let Reply::Head(head) = reply {
                    self.cancel(keys, &head.credit_to, id);
                }
            }
        }
    }

    /// Hands a taken frame or a credit to the sender of the request's
    /// body; a taken frame naming a list that is not one of the queue's
    /// credit lists answers the request 502 instead (as a stream head's).
    fn deliver_upload(
        &self,
        mut waiters: std::sync::MutexGuard<'_, Waiters>,
        id: u128,
        reply: Reply,
        keys: &Keys,
    ) {
        let event = match reply {
            Reply::Taken(taken) if !keys.is_credits(&taken.send_to) => {
                tracing::warn!(
                    send_to = %anteroom_protocol::printable(&taken.send_to),
                    queue = %keys.queue(),
                    "a taken frame whose list is not one of the queue's; answered 502"
                );
                if let Some(Entry::Waiting(tx, _)) = waiters.remove(&id) {
                    let _ = tx.send(Box::new(Delivered::Complete(
                        Failure::HandlerFailed.to_envelope(&taken.id),
                    )));
                }
                return;
            }
            Reply::Taken(taken) => UploadEvent::Taken(taken),
            Reply::Credit(credit) => UploadEvent::Credit(credit),
            _ => return,
        };
        let Some(upload) = waiters.get(&id).and_then(Entry::upload) else {
            drop(waiters);
            tracing::debug!("taken frame or credit for no body being sent; discarded");
            if let UploadEvent::Taken(taken) = event {
                // Its request was answered or given up (the hold budget
                // ran out): the dispatcher's app must not wait for the body
                // until its idle timeout.
                let end = StreamEnd {
                    id: taken.id,
                    chunks: 0,
                    aborted: Some("the request was answered or given up".into()),
                };
                self.credits.0.send(&taken.send_to, end.encode());
            }
            return;
        };
        let _ = upload.send(event);
    }

    /// Tells the dispatcher streaming to `credit_to` that nobody reads
    /// the stream of `id` (only to a credit list of this queue).
    fn cancel(&self, keys: &Keys, credit_to: &str, id: u128) {
        if keys.is_credits(credit_to) {
            self.cancel_to(credit_to, id);
        }
    }

    /// [`cancel`](Self::cancel) to a list already checked (a stream's:
    /// only heads with a credit list of the queue become streams).
    fn cancel_to(&self, credit_to: &str, id: u128) {
        let id = uuid::Uuid::from_u128(id).hyphenated().to_string();
        self.credits.cancel(credit_to, &id, 0);
    }
}

/// The frame kind's name, for logs.
fn kind_name(reply: &Reply) -> &'static str {
    match reply {
        Reply::Complete(_) => "a whole reply",
        Reply::Head(_) => "a stream head",
        Reply::Chunk(_) => "a chunk",
        Reply::End(_) => "an end",
        Reply::Taken(_) => "a taken frame",
        Reply::Credit(_) => "a credit",
        Reply::Message(_) => "a socket message",
    }
}

/// Reads one reply list until `stop` is cancelled, reconnecting with
/// backoff. A proxy runs one per queue it serves: on Redis Cluster the
/// queues' reply lists live on different nodes.
pub(crate) async fn run(
    demux: Arc<Demux>,
    target: anteroom_redis::Target,
    keys: Keys,
    key: String,
    connect_timeout: Duration,
    stop: CancellationToken,
) {
    let deliver = |raw| demux.deliver(raw, &keys);
    queue::follow_list(
        &target,
        &key,
        connect_timeout,
        &stop,
        "reply reader",
        deliver,
    )
    .await;
}

#[cfg(test)]
mod tests {
    /// Every slot of the reply table pays for an entry's size, a million
    /// of them for a million waiting requests (docs/performance.md, "A
    /// million held requests"): a stream's state stays boxed.
    #[test]
    fn a_reply_table_entry_stays_three_words() {
        assert!(
            std::mem::size_of::<super::Entry>() <= 24,
            "{} bytes",
            std::mem::size_of::<super::Entry>()
        );
    }
}
