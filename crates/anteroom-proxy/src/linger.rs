//! Answering before the request is all read: early answers keep the
//! unread body until they are sent ([`Answer`]), and a connection the
//! proxy closes is drained, not reset ([`Lingering`]).
//!
//! The proxy may answer before the client has sent all of its request: a
//! 413 for a declared `Content-Length` over `--max-body`, a 400 for a bad
//! `Host`, a 404 for no route, a 503 when the waiting budget is spent, or
//! hyper's own 400, 414 and 431 for a request head it refuses. It then
//! closes the connection (RFC 9112 §9.6). Closing a TCP socket whose
//! receive buffer still holds unread bytes makes the kernel send a reset,
//! and a client that writes its whole body before reading (Python's
//! `http.client`, Node's `fetch`, browsers) sees "connection reset" or
//! "broken pipe" instead of the answer.
//!
//! So, as nginx does (`lingering_close`, `lingering_time 30s`,
//! `lingering_timeout 5s`), when a connection closes after an early answer,
//! or with client bytes still unread, its socket is shut down for writing
//! (the client reads the answer, then end of stream) and what the client
//! still sends is read and discarded for at most [`LINGER_TIME`], giving up
//! after [`LINGER_TIMEOUT`] without a byte or after [`LINGER_BYTES`].
//! Every other close is immediate: it costs one non-blocking read.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use crate::activity::{Activity, InFlight};
use crate::stream::{StreamAborted, StreamBody};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Longest time spent discarding what a client still sends (nginx's
/// `lingering_time`).
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(30);
/// Longest wait for the client's next bytes while discarding (nginx's
/// `lingering_timeout`).
pub(crate) const LINGER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes discarded after the answer: a little more than a 16 MiB
/// upload refused with 413: such a client still reads its answer.
pub(crate) const LINGER_BYTES: u64 = 128 * 1024 * 1024;

/// A client connection that lingers when dropped, if it must (see the
/// module docs). Reads and writes go straight to the socket; a write that
/// finds it full is noted in the connection's [`Activity`].
#[derive(Debug)]
pub(crate) struct Lingering {
    stream: Option<TcpStream>,
    /// Held until the lingering ends, so a lingering socket still counts
    /// against `--max-connections`.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    activity: Arc<Activity>,
}

impl Lingering {
    /// `stream`, lingering when dropped if an early answer was sent on it
    /// or client bytes are unread.
    pub(crate) fn new(
        stream: TcpStream,
        slot: tokio::sync::OwnedSemaphorePermit,
        activity: Arc<Activity>,
    ) -> Self {
        Self {
            stream: Some(stream),
            slot: Some(slot),
            activity,
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("present until dropped"))
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = self.stream().poll_write(cx, buf);
        self.activity.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.stream().poll_write_vectored(cx, bufs);
        self.activity.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(stream), slot) = (self.stream.take(), self.slot.take()) else {
            return;
        };
        // Nothing unread, and no early answer that the client may still be
        // sending a body after (the client closed first, or a keep-alive
        // connection closed idle): close at once.
        let mut probe = [0u8; 1];
        let unread = match stream.try_read(&mut probe) {
            Ok(n) => n > 0,
            Err(err) => err.kind() == io::ErrorKind::WouldBlock && self.activity.lingers(),
        };
        if !unread {
            return;
        }
        // Ends early when the proxy closes its connections (after
        // `--drain`): by then the answer has long been sent.
        let closing = self.activity.closing();
        self.activity.spawn(async move {
            tokio::select! {
                () = linger(stream) => {}
                () = closing.cancelled() => {}
            }
            drop(slot);
        });
    }
}

/// Shuts the socket down for writing, then reads and discards within the
/// bounds above; the socket closes when this returns.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut buf = vec![0u8; 16 * 1024];
    let mut discarded = 0u64;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while discarded < LINGER_BYTES {
            match tokio::time::timeout(LINGER_TIMEOUT, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => discarded += n as u64,
                _ => break,
            }
        }
    })
    .await;
    tracing::trace!(discarded, "lingering close done");
}

/// What an answer sends: whole bytes, or a stream as it arrives.
enum Content {
    Whole(Full<Bytes>),
    /// Boxed: an answer is mostly whole, and stays small.
    Stream(Box<StreamBody>),
}

/// A response body: the answer's bytes, and the request body the proxy
/// did not read, kept until the answer has been sent.
///
/// Over HTTP/1 the unread body is dropped with the answer; the connection
/// then closes, lingering. Over HTTP/2 a request body dropped before the
/// response is complete resets the stream with CANCEL, and the client never
/// sees the answer; dropped after it, the stream is reset with NO_ERROR
/// (RFC 9113 §8.1), which curl and Python's h2 still report as an error
/// while they are uploading. So over HTTP/2 the rest of the body is read
/// and discarded, within the lingering bounds above, and dropped only once
/// the answer has been sent.
pub(crate) struct Answer {
    bytes: Content,
    /// HTTP/1: the connection closes after this answer, lingering.
    lingers: bool,
    /// The request, counted as in flight and sending until the answer has
    /// been sent ([`Answer::sent_for`]).
    request: Option<InFlight>,
    /// HTTP/2: a task drains the unread body; dropping this tells it the
    /// answer has been sent.
    _draining: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Answer {
    /// `resp` as an answer to a request whose body was read, or had none.
    /// A streamed answer (its body fed by the reply reader).
    pub(crate) fn streamed(resp: Response<StreamBody>) -> Response<Answer> {
        resp.map(|stream| Answer {
            bytes: Content::Stream(Box::new(stream)),
            lingers: false,
            request: None,
            _draining: None,
        })
    }

    pub(crate) fn complete(resp: Response<Full<Bytes>>) -> Response<Answer> {
        resp.map(|bytes| Answer {
            bytes: Content::Whole(bytes),
            lingers: false,
            request: None,
            _draining: None,
        })
    }

    /// `resp` as an early answer, sent while `unread` may still be
    /// arriving. Over HTTP/1 it says `Connection: close` (RFC 9112 §9.6):
    /// what follows on the connection is the rest of a body nobody reads,
    /// and the connection lingers when it closes.
    pub(crate) fn early(
        mut resp: Response<Full<Bytes>>,
        unread: Incoming,
        version: http::Version,
        connection: &Activity,
    ) -> Response<Answer> {
        let (mut lingers, mut draining) = (false, None);
        if !unread.is_end_stream() {
            if version < http::Version::HTTP_2 {
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                lingers = true;
            } else {
                draining = Some(drain(unread, connection));
            }
        }
        resp.map(|bytes| Answer {
            bytes: Content::Whole(bytes),
            lingers,
            request: None,
            _draining: draining,
        })
    }

    /// Ties this answer to `request` of a connection: it counts as being
    /// sent until hyper drops it, and an early answer makes the connection
    /// linger when it closes.
    pub(crate) fn sent_for(&mut self, mut request: InFlight) {
        request.answer_started(self.lingers);
        self.request = Some(request);
    }
}

/// Reads and discards the rest of `body`, within the lingering bounds
/// ([`LINGER_TIME`] in all, [`LINGER_TIMEOUT`] without a byte,
/// [`LINGER_BYTES`]), until it ends or fails.
pub(crate) async fn discard(body: &mut Incoming) {
    let mut discarded = 0u64;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while discarded < LINGER_BYTES {
            match tokio::time::timeout(LINGER_TIMEOUT, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    discarded += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                _ => break,
            }
        }
    })
    .await;
    tracing::trace!(discarded, "unread request body discarded");
}

/// Reads and discards `body` within the lingering bounds, then drops it
/// once the returned sender has been dropped (the answer sent).
fn drain(mut body: Incoming, connection: &Activity) -> tokio::sync::oneshot::Sender<()> {
    let (answering, answered) = tokio::sync::oneshot::channel::<()>();
    let closing = connection.closing();
    connection.spawn(async move {
        // As a lingering close, it ends when the proxy closes its connections.
        tokio::select! {
            () = discard(&mut body) => {}
            () = closing.cancelled() => {}
        }
        // Err once the answer is dropped: sent, or its connection gone.
        tokio::select! {
            _ = answered => {}
            () = closing.cancelled() => {}
        }
        drop(body);
    });
    answering
}

impl Body for Answer {
    type Data = Bytes;
    type Error = StreamAborted;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.bytes {
            Content::Whole(bytes) => Pin::new(bytes)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Content::Stream(stream) => Pin::new(stream.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.bytes {
            Content::Whole(bytes) => bytes.is_end_stream(),
            Content::Stream(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.bytes {
            Content::Whole(bytes) => bytes.size_hint(),
            Content::Stream(stream) => stream.size_hint(),
        }
    }
}
