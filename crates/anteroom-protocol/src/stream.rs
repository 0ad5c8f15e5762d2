//! Streamed replies (docs/protocol.md, "Streamed replies"): a response sent
//! as it is produced, in frames that share the request's reply list with
//! complete replies, and the credits that pace it.
//!
//! A dispatcher may stream only to a proxy that said it reads streams
//! (`RequestEnvelope::stream`). It pushes, in order, to `reply_to`:
//! - one [`StreamHead`] (kind `'S'`): status and headers, where to send
//!   credits, and the window;
//! - [`StreamChunk`]s (kind `'C'`), numbered from 0, each at most
//!   [`MAX_CHUNK`] bytes;
//! - one [`StreamEnd`] (kind `'E'`): how many chunks were sent, and
//!   whether the body ended or was aborted.
//!
//! The proxy pushes [`Credit`]s (kind `'A'`) to the head's `credit_to`
//! list: how many body bytes it has handed to its client, or that the
//! client is gone. A dispatcher never has more than `window` bytes sent and
//! not yet credited. [`Reply`] decodes whatever a reply list holds.
//!
//! A request body streams the other way (docs/protocol.md, "Streamed
//! request bodies"): the envelope (kind `'U'`) holds its first part; the
//! dispatcher that takes it pushes a [`Taken`] (kind `'T'`) to `reply_to`,
//! naming its credit list and window; the proxy pushes the rest there as
//! [`StreamChunk`]s and a [`StreamEnd`], and the dispatcher credits it with
//! [`Credit`]s on `reply_to` as the app reads. [`Inbound`] decodes whatever
//! a credit list holds.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::envelope::{DecodeError, HeaderList, ResponseEnvelope};
use crate::frame::{HeadersRef, check_body, de_headers, frame, headers_json_len, kind_of, unframe};
use crate::socket::{KIND_SOCKET_MESSAGE, SocketMessage};

/// Kind byte of a stream head (`'S'`).
pub const KIND_STREAM_HEAD: u8 = b'S';
/// Kind byte of a stream chunk (`'C'`).
pub const KIND_STREAM_CHUNK: u8 = b'C';
/// Kind byte of a stream end (`'E'`).
pub const KIND_STREAM_END: u8 = b'E';
/// Kind byte of a credit (`'A'`).
pub const KIND_CREDIT: u8 = b'A';
/// Kind byte of a [`Taken`] (`'T'`).
pub const KIND_TAKEN: u8 = b'T';
/// Largest body a [`StreamChunk`] carries: 256 KiB.
pub const MAX_CHUNK: usize = 256 * 1024;
/// Largest window a receiver honours: 16 MiB. A sender that asks for more
/// is held to this much outstanding (a dispatcher never asks for more).
pub const MAX_WINDOW: u64 = 16 * 1024 * 1024;

/// The start of a streamed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHead {
    /// The id of the request this answers.
    pub id: String,
    /// HTTP status code (100..=999).
    pub status: u16,
    /// Header fields in order, duplicates kept, values as raw bytes.
    pub headers: HeaderList,
    /// The list the proxy pushes [`Credit`]s to
    /// (`anteroom:{q}:credits:<dispatcher>`).
    pub credit_to: String,
    /// Most body bytes the dispatcher sends beyond those credited.
    pub window: u64,
    /// This run of the request, unique to it (Anteroom's dispatchers:
    /// `<dispatcher id>/<n>`), or empty when the dispatcher does not say.
    /// A proxy drops a head equal in `run` to its stream's own as a copy
    /// (a list reader delivering again what a lost reply carried); a head
    /// with another or no `run` is a second run of the request, and the
    /// stream is aborted (docs/protocol.md, "Lost replies").
    pub run: String,
}

/// A piece of a streamed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChunk {
    /// The id of the request this answers.
    pub id: String,
    /// Its place in the stream, from 0 with no gap.
    pub seq: u64,
    /// The bytes, exact.
    pub data: Bytes,
}

/// The end of a streamed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEnd {
    /// The id of the request this answers.
    pub id: String,
    /// How many chunks were sent before it.
    pub chunks: u64,
    /// `None`: the body ended. `Some(reason)`: it was cut short (the
    /// upstream or the handler failed, the stream idled out); the proxy
    /// aborts the client's response instead of ending it.
    pub aborted: Option<String>,
}

/// The receiver's word on a stream to its sender: a proxy's on a
/// streamed response (pushed to the head's `credit_to`), or a
/// dispatcher's on a streamed request body (pushed to `reply_to`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    /// The id of the request.
    pub id: String,
    /// Body bytes handed on so far, to the client or to the app (the
    /// total, not a delta).
    pub consumed: u64,
    /// The reader is gone (the client left, the app answered without
    /// reading the rest, the receiver gave up on the stream): stop.
    pub cancel: bool,
}

/// A dispatcher has taken a request whose body follows (kind `'U'`) and
/// wants the rest of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// The id of the request.
    pub id: String,
    /// The list the proxy pushes the body's chunks and end to
    /// (`anteroom:{q}:credits:<dispatcher>`).
    pub send_to: String,
    /// Most body bytes the proxy sends beyond those credited.
    pub window: u64,
}

/// What a dispatcher's credit list holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A proxy's credit on a streamed response.
    Credit(Credit),
    /// A piece of a streamed request body.
    Chunk(StreamChunk),
    /// Its end.
    End(StreamEnd),
    /// A message of a WebSocket, from the client.
    Message(SocketMessage),
}

impl Inbound {
    /// Decodes any credit-list frame by its kind byte; bodies are
    /// zero-copy slices of `buf`.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        match kind_of(&buf)? {
            KIND_STREAM_CHUNK => StreamChunk::decode(buf).map(Self::Chunk),
            KIND_STREAM_END => StreamEnd::decode(buf).map(Self::End),
            KIND_SOCKET_MESSAGE => SocketMessage::decode(buf).map(Self::Message),
            _ => Credit::decode(buf).map(Self::Credit),
        }
    }

    /// Encodes it into its wire form (the kind's own encoding).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Credit(c) => c.encode(),
            Self::Chunk(c) => c.encode(),
            Self::End(e) => e.encode(),
            Self::Message(m) => m.encode(),
        }
    }

    /// The id of the request it belongs to.
    pub fn id(&self) -> &str {
        match self {
            Self::Credit(c) => &c.id,
            Self::Chunk(c) => &c.id,
            Self::End(e) => &e.id,
            Self::Message(m) => &m.id,
        }
    }
}

/// What a reply list holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A whole response (kind `'R'`).
    Complete(ResponseEnvelope),
    /// The start of a streamed one.
    Head(StreamHead),
    /// A piece of a streamed body.
    Chunk(StreamChunk),
    /// Its end.
    End(StreamEnd),
    /// A dispatcher took a request whose body follows: send it.
    Taken(Taken),
    /// A dispatcher's credit on a streamed request body or on a
    /// WebSocket's messages from the client.
    Credit(Credit),
    /// A message of a WebSocket, from the app.
    Message(SocketMessage),
}

impl Reply {
    /// Decodes any reply frame by its kind byte; bodies are zero-copy
    /// slices of `buf`.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        match kind_of(&buf)? {
            KIND_STREAM_HEAD => StreamHead::decode(buf).map(Self::Head),
            KIND_STREAM_CHUNK => StreamChunk::decode(buf).map(Self::Chunk),
            KIND_STREAM_END => StreamEnd::decode(buf).map(Self::End),
            KIND_TAKEN => Taken::decode(buf).map(Self::Taken),
            KIND_CREDIT => Credit::decode(buf).map(Self::Credit),
            KIND_SOCKET_MESSAGE => SocketMessage::decode(buf).map(Self::Message),
            _ => ResponseEnvelope::decode(buf).map(Self::Complete),
        }
    }

    /// Encodes it into its wire form (the kind's own encoding).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Complete(r) => r.encode(),
            Self::Head(h) => h.encode(),
            Self::Chunk(c) => c.encode(),
            Self::End(e) => e.encode(),
            Self::Taken(t) => t.encode(),
            Self::Credit(c) => c.encode(),
            Self::Message(m) => m.encode(),
        }
    }

    /// The id of the request it answers.
    pub fn id(&self) -> &str {
        match self {
            Self::Complete(r) => &r.id,
            Self::Head(h) => &h.id,
            Self::Chunk(c) => &c.id,
            Self::End(e) => &e.id,
            Self::Taken(t) => &t.id,
            Self::Credit(c) => &c.id,
            Self::Message(m) => &m.id,
        }
    }
}

#[derive(Serialize)]
struct HeadMetaRef<'a> {
    id: &'a str,
    status: u16,
    headers: HeadersRef<'a>,
    credit_to: &'a str,
    window: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    run: &'a str,
}

#[derive(Deserialize)]
struct HeadMeta {
    id: String,
    status: u16,
    #[serde(deserialize_with = "de_headers")]
    headers: HeaderList,
    credit_to: String,
    window: u64,
    #[serde(default)]
    run: String,
}

impl StreamHead {
    /// Encodes it into its wire form.
    pub fn encode(&self) -> Vec<u8> {
        let meta = HeadMetaRef {
            id: &self.id,
            status: self.status,
            headers: HeadersRef(&self.headers),
            credit_to: &self.credit_to,
            window: self.window,
            run: &self.run,
        };
        let hint = 96
            + self.id.len()
            + self.credit_to.len()
            + self.run.len()
            + headers_json_len(&self.headers);
        frame(KIND_STREAM_HEAD, &meta, hint, &[])
    }

    /// Decodes a stream head.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        let (meta, body) = unframe(&buf, KIND_STREAM_HEAD, "stream head")?;
        check_body(0, &body)?;
        let meta: HeadMeta = serde_json::from_slice(&meta).map_err(DecodeError::Meta)?;
        Ok(Self {
            id: meta.id,
            status: meta.status,
            headers: meta.headers,
            credit_to: meta.credit_to,
            window: meta.window,
            run: meta.run,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct ChunkMeta<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    seq: u64,
    body_len: u64,
}

impl StreamChunk {
    /// Encodes it into its wire form.
    pub fn encode(&self) -> Vec<u8> {
        let meta = ChunkMeta {
            id: std::borrow::Cow::Borrowed(&self.id),
            seq: self.seq,
            body_len: self.data.len() as u64,
        };
        frame(KIND_STREAM_CHUNK, &meta, 64 + self.id.len(), &self.data)
    }

    /// Decodes a stream chunk; `data` is a zero-copy slice of `buf`.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        let (meta, body) = unframe(&buf, KIND_STREAM_CHUNK, "stream chunk")?;
        let meta: ChunkMeta<'_> = serde_json::from_slice(&meta).map_err(DecodeError::Meta)?;
        check_body(meta.body_len, &body)?;
        Ok(Self {
            id: meta.id.into_owned(),
            seq: meta.seq,
            data: body,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct EndMeta {
    id: String,
    chunks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aborted: Option<String>,
}

impl StreamEnd {
    /// Encodes it into its wire form.
    pub fn encode(&self) -> Vec<u8> {
        let meta = EndMeta {
            id: self.id.clone(),
            chunks: self.chunks,
            aborted: self.aborted.clone(),
        };
        frame(KIND_STREAM_END, &meta, 96 + self.id.len(), &[])
    }

    /// Decodes a stream end.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        let (meta, body) = unframe(&buf, KIND_STREAM_END, "stream end")?;
        check_body(0, &body)?;
        let meta: EndMeta = serde_json::from_slice(&meta).map_err(DecodeError::Meta)?;
        Ok(Self {
            id: meta.id,
            chunks: meta.chunks,
            aborted: meta.aborted,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct CreditMeta {
    id: String,
    consumed: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cancel: bool,
}

impl Credit {
    /// Encodes it into its wire form.
    pub fn encode(&self) -> Vec<u8> {
        let meta = CreditMeta {
            id: self.id.clone(),
            consumed: self.consumed,
            cancel: self.cancel,
        };
        frame(KIND_CREDIT, &meta, 64 + self.id.len(), &[])
    }

    /// Decodes a credit.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        let (meta, body) = unframe(&buf, KIND_CREDIT, "credit")?;
        check_body(0, &body)?;
        let meta: CreditMeta = serde_json::from_slice(&meta).map_err(DecodeError::Meta)?;
        Ok(Self {
            id: meta.id,
            consumed: meta.consumed,
            cancel: meta.cancel,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct TakenMeta {
    id: String,
    send_to: String,
    window: u64,
}

impl Taken {
    /// Encodes it into its wire form.
    pub fn encode(&self) -> Vec<u8> {
        let meta = TakenMeta {
            id: self.id.clone(),
            send_to: self.send_to.clone(),
            window: self.window,
        };
        frame(
            KIND_TAKEN,
            &meta,
            64 + self.id.len() + self.send_to.len(),
            &[],
        )
    }

    /// Decodes a taken frame.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        let (meta, body) = unframe(&buf, KIND_TAKEN, "taken")?;
        check_body(0, &body)?;
        let meta: TakenMeta = serde_json::from_slice(&meta).map_err(DecodeError::Meta)?;
        Ok(Self {
            id: meta.id,
            send_to: meta.send_to,
            window: meta.window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips_and_decodes_by_kind() {
        let head = StreamHead {
            id: "r1".into(),
            status: 200,
            headers: vec![
                (
                    "content-type".into(),
                    Bytes::from_static(b"text/event-stream"),
                ),
                ("x-bin".into(), Bytes::from_static(b"caf\xe9")),
            ],
            credit_to: "anteroom:{q}:credits:d1".into(),
            window: 1 << 20,
            run: "d1/2a".into(),
        };
        let chunk = StreamChunk {
            id: "r1".into(),
            seq: 7,
            data: Bytes::from_static(b"\x00data: x\n\n\xff"),
        };
        let end = StreamEnd {
            id: "r1".into(),
            chunks: 8,
            aborted: Some("upstream closed".into()),
        };
        let complete = ResponseEnvelope {
            id: "r2".into(),
            status: 204,
            headers: vec![],
            body: Bytes::new(),
        };
        let credit = Credit {
            id: "r1".into(),
            consumed: 12_345,
            cancel: true,
        };
        let taken = Taken {
            id: "r3".into(),
            send_to: "anteroom:{q}:credits:d1".into(),
            window: 1 << 20,
        };
        let frames = [
            Reply::Head(head.clone()),
            Reply::Chunk(chunk.clone()),
            Reply::End(end.clone()),
            Reply::Complete(complete.clone()),
            Reply::Taken(taken.clone()),
            Reply::Credit(credit.clone()),
        ];
        let encoded = [
            head.encode(),
            chunk.encode(),
            end.encode(),
            complete.encode(),
            taken.encode(),
            credit.encode(),
        ];
        for (reply, bytes) in frames.iter().zip(encoded) {
            assert_eq!(&Reply::decode(Bytes::from(bytes)).unwrap(), reply);
        }
        for inbound in [
            Inbound::Credit(credit.clone()),
            Inbound::Chunk(chunk.clone()),
            Inbound::End(end.clone()),
        ] {
            assert_eq!(
                Inbound::decode(Bytes::from(inbound.encode())).unwrap(),
                inbound
            );
        }
        assert!(
            Inbound::decode(Bytes::from(taken.encode())).is_err(),
            "a credit list holds no taken frames"
        );
        let clean = StreamEnd {
            aborted: None,
            ..end
        };
        assert_eq!(
            StreamEnd::decode(Bytes::from(clean.encode())).unwrap(),
            clean
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let chunk = StreamChunk {
            id: "r1".into(),
            seq: 0,
            data: Bytes::from_static(b"abc"),
        }
        .encode();
        for cut in 0..chunk.len() {
            assert!(Reply::decode(Bytes::copy_from_slice(&chunk[..cut])).is_err());
        }
        let mut head = StreamHead {
            id: "r".into(),
            status: 200,
            headers: vec![],
            credit_to: "c".into(),
            window: 1,
            run: String::new(),
        }
        .encode();
        head.push(b'x');
        assert!(
            Reply::decode(Bytes::from(head)).is_err(),
            "a head with a body"
        );
        assert!(Credit::decode(Bytes::from(chunk)).is_err(), "wrong kind");
    }
}
