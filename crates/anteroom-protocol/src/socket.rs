//! WebSockets through the queue (docs/protocol.md, "WebSockets").
//!
//! A WebSocket opening handshake (RFC 6455 section 4.1) is queued as a
//! request of kind `'W'`. The dispatcher that takes it opens a WebSocket to
//! its app and answers with a [`crate::StreamHead`] of status 101, naming its
//! credit list and window; a refusal is an ordinary response. From then on
//! both sides send the socket's messages as [`SocketMessage`]s (kind
//! `'M'`): the proxy to the head's credit list, the dispatcher to the
//! request's reply list, each direction numbered from 0 and paced by
//! [`crate::Credit`]s the other way, exactly as streamed bodies are. Pings
//! and pongs are not relayed: each side keeps its own connection alive.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::envelope::DecodeError;
use crate::frame::{check_body, frame, unframe};

/// Kind byte of a [`SocketMessage`] (`'M'`).
pub const KIND_SOCKET_MESSAGE: u8 = b'M';

/// Largest WebSocket message relayed by default: 16 MiB. A larger one
/// closes the socket with 1009 (message too big, RFC 6455 section 7.4.1).
pub const MAX_SOCKET_MESSAGE: usize = 16 * 1024 * 1024;

/// What a [`SocketMessage`] carries (RFC 6455 section 5.2 opcodes; ping
/// and pong stay on their hop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Opcode {
    /// A text message: its data is UTF-8.
    Text,
    /// A binary message.
    Binary,
    /// The sender closes the socket: `code` (RFC 6455 section 7.4) and its
    /// data, the reason, UTF-8. The last frame a side sends.
    Close,
}

/// One WebSocket message, or one piece of a message larger than
/// [`crate::MAX_CHUNK`] (every piece but the last has `fin: false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketMessage {
    /// The handshake request's id.
    pub id: String,
    /// This direction's frame number: 0, 1, 2, ... with no gap.
    pub seq: u64,
    /// What it is.
    pub opcode: Opcode,
    /// The last piece of its message.
    pub fin: bool,
    /// For [`Opcode::Close`]: the close code (absent: none was given,
    /// RFC 6455 1005).
    pub code: Option<u16>,
    /// The payload: at most [`crate::MAX_CHUNK`] bytes.
    pub data: Bytes,
}

fn is_true(b: &bool) -> bool {
    *b
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize)]
struct MessageMeta<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    seq: u64,
    opcode: Opcode,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    fin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    body_len: u64,
}

impl SocketMessage {
    /// Encodes it into its wire form.
    pub fn encode(&self) -> Vec<u8> {
        let meta = MessageMeta {
            id: std::borrow::Cow::Borrowed(&self.id),
            seq: self.seq,
            opcode: self.opcode,
            fin: self.fin,
            code: self.code,
            body_len: self.data.len() as u64,
        };
        frame(KIND_SOCKET_MESSAGE, &meta, 96 + self.id.len(), &self.data)
    }

    /// Decodes a socket message; `data` is a zero-copy slice of `buf`.
    ///
    /// # Errors
    /// As every frame ([`DecodeError`]): short input, another kind,
    /// metadata that is not this JSON, a body of another length.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        let (meta, body) = unframe(&buf, KIND_SOCKET_MESSAGE, "socket message")?;
        let meta: MessageMeta<'_> = serde_json::from_slice(&meta).map_err(DecodeError::Meta)?;
        check_body(meta.body_len, &body)?;
        Ok(Self {
            id: meta.id.into_owned(),
            seq: meta.seq,
            opcode: meta.opcode,
            fin: meta.fin,
            code: meta.code,
            data: body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_the_defaults_stay_off_the_wire() {
        let text = SocketMessage {
            id: "r1".into(),
            seq: 0,
            opcode: Opcode::Text,
            fin: true,
            code: None,
            data: Bytes::from_static("héllo".as_bytes()),
        };
        let wire = text.encode();
        assert_eq!(wire[1], KIND_SOCKET_MESSAGE);
        let meta = String::from_utf8_lossy(&wire[6..wire.len() - text.data.len()]).into_owned();
        assert_eq!(meta, r#"{"id":"r1","seq":0,"opcode":"text","body_len":6}"#);
        assert_eq!(SocketMessage::decode(Bytes::from(wire)).unwrap(), text);
        let piece = SocketMessage {
            seq: 4,
            opcode: Opcode::Binary,
            fin: false,
            data: Bytes::from_static(b"\x00\xff"),
            ..text.clone()
        };
        assert_eq!(
            SocketMessage::decode(Bytes::from(piece.encode())).unwrap(),
            piece
        );
        let close = SocketMessage {
            seq: 5,
            opcode: Opcode::Close,
            code: Some(1012),
            data: Bytes::from_static(b"restart"),
            ..text
        };
        assert_eq!(
            SocketMessage::decode(Bytes::from(close.encode())).unwrap(),
            close
        );
    }

    #[test]
    fn an_unknown_opcode_or_another_kind_does_not_decode() {
        let mut wire = SocketMessage {
            id: "r1".into(),
            seq: 0,
            opcode: Opcode::Text,
            fin: true,
            code: None,
            data: Bytes::new(),
        }
        .encode();
        let text = String::from_utf8(wire[6..].to_vec()).unwrap();
        let ping = text.replace("\"text\"", "\"ping\"");
        let mut forged = wire[..6].to_vec();
        forged.extend_from_slice(ping.as_bytes());
        assert!(SocketMessage::decode(Bytes::from(forged)).is_err());
        wire[1] = b'C';
        assert!(SocketMessage::decode(Bytes::from(wire)).is_err());
    }
}
