//! Envelope framing: `[version u8][kind u8][meta_len u32 BE][meta JSON][body]`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::frame::{
    HeadersRef, RequestMeta, RequestMetaArray, RequestMetaRef, ResponseMeta, ResponseMetaRef,
    check_body, frame, frame_version, headers_json_len, prefix, unframe, unframe_any_version,
};

/// The frame version of every kind but a request's: responses, dead
/// letters, stream frames, credits and socket messages are written and
/// read in version 1 only. Requests have two layouts,
/// [`EnvelopeVersion`].
pub const VERSION: u8 = 1;

/// The layout of a request envelope, its frame's version byte
/// (docs/protocol.md, "Request envelopes, version 2"). Dispatchers read
/// both; a proxy writes version 2 unless told to write version 1 for
/// dispatchers of releases before it (docs/operations.md, "Envelope
/// version 2: dispatchers first").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EnvelopeVersion {
    /// Version 1: the metadata is a JSON object, its fields by name.
    V1,
    /// Version 2: the same fields as a JSON array, in a fixed order, with
    /// `dedupe` and `stream` as bits of one `flags` number: a small GET's
    /// envelope is about a quarter shorter (444 bytes to 330), and so is
    /// what it costs Redis while it waits.
    #[default]
    V2,
}

impl EnvelopeVersion {
    /// The frame's version byte: 1 or 2.
    pub fn byte(self) -> u8 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }

    /// The layout a version byte names: `None` for any byte but 1 and 2.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::V1),
            2 => Some(Self::V2),
            _ => None,
        }
    }
}

/// Kind byte of a request envelope (`'Q'`).
pub const KIND_REQUEST: u8 = b'Q';
/// Kind byte of a response envelope (`'R'`).
pub const KIND_RESPONSE: u8 = b'R';
/// Kind byte of a dead letter (`'D'`).
pub const KIND_DEAD_LETTER: u8 = b'D';
/// Kind byte of a request whose body follows in chunks (`'U'`): a decoder
/// that only knows `'Q'` rejects it rather than run it with part of its
/// body.
pub const KIND_REQUEST_BODY_FOLLOWS: u8 = b'U';
/// Kind byte of a WebSocket opening handshake (`'W'`): a GET that asks to
/// upgrade to a WebSocket (RFC 6455 section 4.1), whose answer is either a
/// whole response (refused) or a socket (docs/protocol.md, "WebSockets").
pub const KIND_REQUEST_WEBSOCKET: u8 = b'W';

pub(crate) const PREFIX_LEN: usize = 6;

/// Header fields in order, duplicates kept: (lower-case name, raw value bytes).
pub type HeaderList = Vec<(String, Bytes)>;

/// Why bytes could not be decoded into an envelope.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends before the framing says it should.
    #[error("envelope is truncated: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the framing requires.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The version byte names a format this crate does not know.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// A request was expected and a response found, or the other way round.
    #[error("expected a {expected} envelope, found kind byte {found:#04x}")]
    WrongKind {
        /// The kind wanted.
        expected: &'static str,
        /// The kind byte found.
        found: u8,
    },
    /// The JSON metadata is malformed or misses a field.
    #[error("invalid envelope metadata")]
    Meta(#[source] serde_json::Error),
    /// The body is not as long as the metadata declares.
    #[error("body length mismatch: metadata declares {declared} bytes, {actual} follow")]
    BodyLength {
        /// `body_len` from the metadata.
        declared: u64,
        /// Bytes after the metadata.
        actual: usize,
    },
}

/// The HTTP version a request arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HttpVersion {
    /// HTTP/0.9
    #[serde(rename = "HTTP/0.9")]
    Http09,
    /// HTTP/1.0
    #[serde(rename = "HTTP/1.0")]
    Http10,
    /// HTTP/1.1
    #[serde(rename = "HTTP/1.1")]
    Http11,
    /// HTTP/2
    #[serde(rename = "HTTP/2")]
    Http2,
    /// HTTP/3
    #[serde(rename = "HTTP/3")]
    Http3,
}

/// One HTTP request waiting in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestEnvelope {
    /// Unique id chosen by the producer; the reply carries the same id.
    pub id: String,
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Request target in origin form (`/path?query`).
    pub uri: String,
    /// HTTP version the client used.
    pub version: HttpVersion,
    /// Header fields in order, duplicates kept, values as raw bytes.
    pub headers: HeaderList,
    /// Body bytes, exact.
    pub body: Bytes,
    /// Redis key (a list) the response must be pushed to. Opaque to dispatchers.
    pub reply_to: String,
    /// Address of the client that sent the request, if known.
    pub client_addr: Option<String>,
    /// When the request was enqueued, in Unix milliseconds.
    pub enqueued_at_ms: u64,
    /// After this instant (Unix milliseconds) the request must not be executed.
    pub deadline_ms: u64,
    /// The producer may have pushed this envelope more than once (it retries
    /// ambiguous enqueues): a dispatcher must claim the id before running it
    /// and skip it when the claim exists (see docs/protocol.md).
    pub dedupe: bool,
    /// The producer reads streamed replies ([`crate::Reply`]): a dispatcher
    /// may answer with a stream head, chunks and an end instead of one
    /// complete response. Absent (false) in envelopes of older proxies.
    pub stream: bool,
    /// The body is not all here: `body` is its first part, and the rest
    /// comes in chunks once the dispatcher asks for it ([`crate::Taken`];
    /// docs/protocol.md, "Streamed request bodies"). Encoded as kind
    /// [`KIND_REQUEST_BODY_FOLLOWS`].
    pub body_follows: bool,
    /// The request is a WebSocket opening handshake (RFC 6455 section
    /// 4.1): the dispatcher opens a WebSocket to its app and relays
    /// messages ([`crate::SocketMessage`]). Encoded as kind
    /// [`KIND_REQUEST_WEBSOCKET`], so a dispatcher that does not know it
    /// sets it aside instead of running a plain GET.
    pub websocket: bool,
}

/// One HTTP response on its way back to a proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseEnvelope {
    /// The id of the request this answers.
    pub id: String,
    /// HTTP status code (100..=999).
    pub status: u16,
    /// Header fields in order, duplicates kept, values as raw bytes.
    pub headers: HeaderList,
    /// Body bytes, exact.
    pub body: Bytes,
}

/// Something that could not be processed, kept with the reason, in the
/// queue's dead-letter list. The body is the original bytes, exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Why it was set aside.
    pub reason: String,
    /// When, Unix milliseconds.
    pub at_ms: u64,
    /// The dispatcher (or reaper) that set it aside.
    pub by: String,
    /// The bytes as they were found.
    pub original: Bytes,
}

#[derive(Serialize)]
struct DeadMetaRef<'a> {
    reason: &'a str,
    at_ms: u64,
    by: &'a str,
    body_len: u64,
}

#[derive(Deserialize)]
struct DeadMeta {
    reason: String,
    at_ms: u64,
    #[serde(default)]
    by: String,
    body_len: u64,
}

impl DeadLetter {
    /// Encodes the dead letter into its wire form.
    pub fn encode(&self) -> Vec<u8> {
        let meta = DeadMetaRef {
            reason: &self.reason,
            at_ms: self.at_ms,
            by: &self.by,
            body_len: self.original.len() as u64,
        };
        frame(
            KIND_DEAD_LETTER,
            &meta,
            96 + self.reason.len() + self.by.len(),
            &self.original,
        )
    }

    /// Decodes a dead letter; `original` is a zero-copy slice of `buf`.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        let (meta, body) = unframe(&buf, KIND_DEAD_LETTER, "dead letter")?;
        let meta: DeadMeta = serde_json::from_slice(&meta).map_err(DecodeError::Meta)?;
        check_body(meta.body_len, &body)?;
        Ok(Self {
            reason: meta.reason,
            at_ms: meta.at_ms,
            by: meta.by,
            original: body,
        })
    }
}

impl RequestEnvelope {
    /// Encodes the envelope into its wire form, version 2
    /// ([`EnvelopeVersion::default`]).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(EnvelopeVersion::default())
    }

    /// Encodes the envelope into its wire form in the layout `version`.
    pub fn encode_as(&self, version: EnvelopeVersion) -> Vec<u8> {
        let meta = RequestMetaRef {
            id: &self.id,
            method: &self.method,
            uri: &self.uri,
            version: self.version,
            headers: HeadersRef(&self.headers),
            reply_to: &self.reply_to,
            client_addr: self.client_addr.as_deref(),
            enqueued_at_ms: self.enqueued_at_ms,
            deadline_ms: self.deadline_ms,
            dedupe: self.dedupe,
            stream: self.stream,
            body_len: self.body.len() as u64,
        };
        // The keys, numbers and punctuation take about 170 bytes.
        let hint = 170
            + self.id.len()
            + self.method.len()
            + self.uri.len()
            + self.reply_to.len()
            + self.client_addr.as_ref().map_or(0, String::len)
            + headers_json_len(&self.headers);
        let kind = if self.websocket {
            KIND_REQUEST_WEBSOCKET
        } else if self.body_follows {
            KIND_REQUEST_BODY_FOLLOWS
        } else {
            KIND_REQUEST
        };
        let byte = version.byte();
        match version {
            EnvelopeVersion::V1 => frame_version(byte, kind, &meta, hint, &self.body),
            // The field names and the booleans, about 110 bytes, are what
            // the array leaves out.
            EnvelopeVersion::V2 => {
                frame_version(byte, kind, &meta.as_array(), hint - 100, &self.body)
            }
        }
    }

    /// Decodes a request envelope (kind `'Q'`, `'U'` when its body
    /// follows, `'W'` for a WebSocket handshake) of either version
    /// ([`EnvelopeVersion`]). The body is a zero-copy slice of `buf`.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        let (version, kind) = prefix(&buf)?;
        // The version first, as for every other kind: version 2 exists
        // for requests only, so under it another kind is an unknown version.
        let version = match (EnvelopeVersion::from_byte(version), kind) {
            (Some(EnvelopeVersion::V1), _) => EnvelopeVersion::V1,
            (
                Some(EnvelopeVersion::V2),
                KIND_REQUEST | KIND_REQUEST_BODY_FOLLOWS | KIND_REQUEST_WEBSOCKET,
            ) => EnvelopeVersion::V2,
            _ => return Err(DecodeError::UnsupportedVersion(version)),
        };
        let kind = match kind {
            k @ (KIND_REQUEST_BODY_FOLLOWS | KIND_REQUEST_WEBSOCKET) => k,
            _ => KIND_REQUEST,
        };
        let (meta, body) = unframe_any_version(&buf, kind, "request")?;
        let meta: RequestMeta = match version {
            EnvelopeVersion::V1 => {
                // An object, as every dispatcher reads it: the derived
                // deserializer would take an array too, in field order.
                if meta.iter().find(|b| !b" \t\r\n".contains(b)) != Some(&b'{') {
                    return Err(DecodeError::Meta(serde::de::Error::custom(
                        "version 1 request metadata is not a JSON object",
                    )));
                }
                serde_json::from_slice(&meta).map_err(DecodeError::Meta)?
            }
            EnvelopeVersion::V2 => {
                serde_json::from_slice::<RequestMetaArray>(&meta)
                    .map_err(DecodeError::Meta)?
                    .0
            }
        };
        check_body(meta.body_len, &body)?;
        Ok(Self {
            id: meta.id,
            method: meta.method,
            uri: meta.uri,
            version: meta.version,
            headers: meta.headers,
            body,
            reply_to: meta.reply_to,
            client_addr: meta.client_addr,
            enqueued_at_ms: meta.enqueued_at_ms,
            deadline_ms: meta.deadline_ms,
            dedupe: meta.dedupe,
            stream: meta.stream,
            body_follows: kind == KIND_REQUEST_BODY_FOLLOWS,
            websocket: kind == KIND_REQUEST_WEBSOCKET,
        })
    }

    /// True when running the request twice does no harm: a safe method
    /// (GET, HEAD, OPTIONS) or an `Idempotency-Key` header, and a body
    /// that is all in the envelope (one that follows in chunks has gone
    /// once taken: it cannot be sent again), and not a WebSocket handshake
    /// (its socket may have carried messages). The reaper re-queues such
    /// requests; others are answered instead.
    pub fn is_safe_to_repeat(&self) -> bool {
        !self.body_follows
            && !self.websocket
            && (matches!(self.method.as_str(), "GET" | "HEAD" | "OPTIONS")
                || self
                    .headers
                    .iter()
                    .any(|(name, _)| name.eq_ignore_ascii_case("idempotency-key")))
    }

    /// True when the deadline has passed at `now_ms` (Unix milliseconds).
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.deadline_ms
    }
}

impl ResponseEnvelope {
    /// Encodes the envelope into its wire form.
    pub fn encode(&self) -> Vec<u8> {
        let meta = ResponseMetaRef {
            id: &self.id,
            status: self.status,
            headers: HeadersRef(&self.headers),
            body_len: self.body.len() as u64,
        };
        let hint = 64 + self.id.len() + headers_json_len(&self.headers);
        frame(KIND_RESPONSE, &meta, hint, &self.body)
    }

    /// Decodes a response envelope. The body is a zero-copy slice of `buf`.
    pub fn decode(buf: Bytes) -> Result<Self, DecodeError> {
        let (meta, body) = unframe(&buf, KIND_RESPONSE, "response")?;
        let meta: ResponseMeta = serde_json::from_slice(&meta).map_err(DecodeError::Meta)?;
        check_body(meta.body_len, &body)?;
        Ok(Self {
            id: meta.id,
            status: meta.status,
            headers: meta.headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> RequestEnvelope {
        RequestEnvelope {
            id: "0193e3c2-7f4e-7a52-9d1c-6b0f2f1c9a11".into(),
            method: "POST".into(),
            uri: "/orders?x=1".into(),
            version: HttpVersion::Http11,
            headers: vec![
                ("host".into(), Bytes::from_static(b"example.com")),
                ("x-dup".into(), Bytes::from_static(b"one")),
                ("x-dup".into(), Bytes::from_static(b"two")),
                ("x-bin".into(), Bytes::from_static(b"caf\xe9\xff")),
            ],
            body: Bytes::from_static(b"\x00\x01binary\xff"),
            reply_to: "anteroom:{default}:replies:p1".into(),
            client_addr: Some("127.0.0.1:5000".into()),
            enqueued_at_ms: 1_700_000_000_000,
            deadline_ms: 1_700_000_030_000,
            dedupe: false,
            stream: false,
            body_follows: false,
            websocket: false,
        }
    }

    #[test]
    fn request_round_trip_keeps_bytes() {
        let env = sample();
        for version in [EnvelopeVersion::V1, EnvelopeVersion::V2] {
            let wire = env.encode_as(version);
            assert_eq!(wire[0], version.byte());
            let back = RequestEnvelope::decode(Bytes::from(wire)).unwrap();
            assert_eq!(back, env, "{version:?}");
        }
        for (dedupe, stream) in [(true, false), (false, true), (true, true)] {
            let env = RequestEnvelope {
                dedupe,
                stream,
                ..sample()
            };
            let back = RequestEnvelope::decode(Bytes::from(env.encode())).unwrap();
            assert_eq!(back, env);
        }
    }

    /// Version 2 leaves the field names out: the documented small GET
    /// (about 430 bytes in version 1) is about 110 bytes shorter.
    #[test]
    fn version_2_is_shorter_by_the_field_names() {
        let env = RequestEnvelope {
            method: "GET".into(),
            body: Bytes::new(),
            stream: true,
            ..sample()
        };
        let (v1, v2) = (
            env.encode_as(EnvelopeVersion::V1).len(),
            env.encode_as(EnvelopeVersion::V2).len(),
        );
        assert!(v1 - v2 >= 100, "version 1 {v1} bytes, version 2 {v2}");
    }

    /// Elements after the eleventh and unknown flag bits are ignored (a
    /// later release may append fields); fewer elements, a wrong type, or
    /// an object under version 2 are errors.
    #[test]
    fn version_2_ignores_what_it_does_not_know_and_rejects_what_is_missing() {
        let frame_of = |meta: &[u8], body: &[u8]| {
            let mut wire = vec![2, KIND_REQUEST];
            wire.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            wire.extend_from_slice(meta);
            wire.extend_from_slice(body);
            Bytes::from(wire)
        };
        let later = br#"["i","GET","/","HTTP/1.1",[],"r",null,1,2,7,0,"a later field",{"x":1}]"#;
        let env = RequestEnvelope::decode(frame_of(later, b"")).unwrap();
        assert!(env.dedupe && env.stream);
        assert_eq!(env.client_addr, None);
        for bad in [
            &br#"["i","GET","/","HTTP/1.1",[],"r",null,1,2,0]"#[..],
            br#"["i","GET","/","HTTP/1.1",[],"r",null,1,2,-1,0]"#,
            br#"["i","GET","/","HTTP/1.1",[],"r",null,1,"2",0,0]"#,
            br#"["i","GET","/","HTTP/1.1",[["x"]],"r",null,1,2,0,0]"#,
            br#"{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r","enqueued_at_ms":1,"deadline_ms":2,"body_len":0}"#,
        ] {
            assert!(
                matches!(
                    RequestEnvelope::decode(frame_of(bad, b"")),
                    Err(DecodeError::Meta(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let short_body = br#"["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,3]"#;
        assert!(matches!(
            RequestEnvelope::decode(frame_of(short_body, b"hi")),
            Err(DecodeError::BodyLength { declared: 3, .. })
        ));
    }

    /// A request's integers are at most 2^53 - 1 in both versions
    /// (RFC 7493 section 2.2), as a dispatcher whose JSON numbers are
    /// doubles reads them: 2^53 - 1 decodes, 2^53 and beyond do not, in
    /// every integer field; a fraction, a boolean or a negative number in
    /// `flags` neither.
    #[test]
    fn a_requests_integers_are_at_most_2_to_the_53_minus_1() {
        let frame_of = |version: u8, meta: &str| {
            let mut wire = vec![version, KIND_REQUEST];
            wire.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            wire.extend_from_slice(meta.as_bytes());
            Bytes::from(wire)
        };
        let v2 = |e: &str, d: &str, f: &str, b: &str| {
            frame_of(
                2,
                &format!(r#"["i","GET","/","HTTP/1.1",[],"r",null,{e},{d},{f},{b}]"#),
            )
        };
        let v1 = |e: &str, d: &str, b: &str| {
            frame_of(
                1,
                &format!(
                    r#"{{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r","enqueued_at_ms":{e},"deadline_ms":{d},"body_len":{b}}}"#
                ),
            )
        };
        let max = "9007199254740991";
        let env = RequestEnvelope::decode(v2(max, max, max, "0")).unwrap();
        assert_eq!(
            (env.enqueued_at_ms, env.deadline_ms),
            ((1 << 53) - 1, (1 << 53) - 1)
        );
        assert!(env.dedupe && env.stream);
        RequestEnvelope::decode(v1(max, max, "0")).unwrap();
        let mut bad = Vec::new();
        for over in ["9007199254740992", "18446744073709551615"] {
            bad.push(v2(over, "2", "0", "0"));
            bad.push(v2("1", over, "0", "0"));
            bad.push(v2("1", "2", over, "0"));
            bad.push(v2("1", "2", "0", over));
            bad.push(v1(over, "2", "0"));
            bad.push(v1("1", over, "0"));
            bad.push(v1("1", "2", over));
        }
        for flags in ["1.5", "1.0", "true", "-1", "\"1\"", "null"] {
            bad.push(v2("1", "2", flags, "0"));
        }
        // Version 1 is an object: not an array, though serde's derived
        // deserializer would take one in field order.
        bad.push(frame_of(
            1,
            r#"["i","GET","/","HTTP/1.1",[],"r",null,1,2,false,false,0]"#,
        ));
        for wire in bad {
            assert!(
                matches!(
                    RequestEnvelope::decode(wire.clone()),
                    Err(DecodeError::Meta(_))
                ),
                "{}",
                String::from_utf8_lossy(&wire)
            );
        }
    }

    /// Only requests have a version 2: any other kind under it is an
    /// unsupported version, not a misread.
    #[test]
    fn other_kinds_are_version_1_only() {
        let mut wire = ResponseEnvelope::from_request_sample().encode();
        wire[0] = 2;
        assert!(matches!(
            ResponseEnvelope::decode(Bytes::from(wire.clone())),
            Err(DecodeError::UnsupportedVersion(2))
        ));
        // Read as a request, the version is what is wrong, not the kind.
        assert!(matches!(
            RequestEnvelope::decode(Bytes::from(wire)),
            Err(DecodeError::UnsupportedVersion(2))
        ));
        assert_eq!(EnvelopeVersion::from_byte(3), None);
        for version in [EnvelopeVersion::V1, EnvelopeVersion::V2] {
            assert_eq!(EnvelopeVersion::from_byte(version.byte()), Some(version));
        }
    }

    /// A request whose body follows has a kind of its own, so a dispatcher
    /// that knows only `'Q'` rejects it instead of running it with part of
    /// its body; and it is never repeated, whatever its method.
    #[test]
    fn a_request_whose_body_follows_is_its_own_kind_and_never_repeated() {
        let env = RequestEnvelope {
            method: "GET".into(),
            body_follows: true,
            websocket: false,
            ..sample()
        };
        let wire = env.encode();
        assert_eq!(wire[1], KIND_REQUEST_BODY_FOLLOWS);
        assert_eq!(RequestEnvelope::decode(Bytes::from(wire)).unwrap(), env);
        assert!(!env.is_safe_to_repeat());
        assert!(
            RequestEnvelope {
                body_follows: false,
                websocket: false,
                ..env
            }
            .is_safe_to_repeat()
        );
    }

    /// So is a WebSocket handshake: a dispatcher that does not know `'W'`
    /// sets it aside instead of answering a plain GET; never repeated.
    #[test]
    fn a_websocket_handshake_is_its_own_kind_and_never_repeated() {
        let env = RequestEnvelope {
            method: "GET".into(),
            websocket: true,
            ..sample()
        };
        let wire = env.encode();
        assert_eq!(wire[1], KIND_REQUEST_WEBSOCKET);
        let decoded = RequestEnvelope::decode(Bytes::from(wire)).unwrap();
        assert!(decoded.websocket && !decoded.body_follows);
        assert_eq!(decoded, env);
        assert!(!env.is_safe_to_repeat());
    }

    /// The size hint is close: one allocation, little slack. (A proxy keeps
    /// each encoding until it is pushed, thousands of them in a burst.)
    #[test]
    fn encoding_allocates_about_its_size_once() {
        let mut env = sample();
        let mut reply = ResponseEnvelope::from_request_sample();
        for n in 0..12 {
            for wire in [env.encode(), reply.encode()] {
                assert!(
                    wire.capacity() <= wire.len() + 32,
                    "{n} extra headers: {} bytes in a buffer of {}",
                    wire.len(),
                    wire.capacity()
                );
            }
            let value = Bytes::from("v".repeat(n * 7));
            env.headers.push((format!("x-extra-{n}"), value.clone()));
            reply.headers.push((format!("x-extra-{n}"), value));
        }
    }

    impl ResponseEnvelope {
        fn from_request_sample() -> Self {
            Self {
                id: "0193e3c2-7f4e-7a52-9d1c-6b0f2f1c9a11".into(),
                status: 200,
                headers: vec![
                    ("content-type".into(), Bytes::from_static(b"text/plain")),
                    (
                        "date".into(),
                        Bytes::from_static(b"Sun, 22 Nov 2026 06:00:00 GMT"),
                    ),
                ],
                body: Bytes::from_static(b"hello"),
            }
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let env = RequestEnvelope {
            dedupe: true,
            ..sample()
        };
        for version in [EnvelopeVersion::V1, EnvelopeVersion::V2] {
            let wire = env.encode_as(version);
            assert_eq!(wire[0], version.byte());
            assert_eq!(wire[1], b'Q');
            let meta_len = u32::from_be_bytes([wire[2], wire[3], wire[4], wire[5]]) as usize;
            let meta: serde_json::Value = serde_json::from_slice(&wire[6..6 + meta_len]).unwrap();
            assert_eq!(&wire[6 + meta_len..], &env.body[..]);
            let field = |name: &str, index: usize| match version {
                EnvelopeVersion::V1 => meta[name].clone(),
                EnvelopeVersion::V2 => meta[index].clone(),
            };
            assert_eq!(field("id", 0), env.id.as_str());
            assert_eq!(field("method", 1), "POST");
            assert_eq!(field("uri", 2), "/orders?x=1");
            assert_eq!(field("version", 3), "HTTP/1.1");
            assert_eq!(field("headers", 4)[3][1], "caf\u{e9}\u{ff}");
            assert_eq!(field("reply_to", 5), env.reply_to.as_str());
            assert_eq!(field("client_addr", 6), "127.0.0.1:5000");
            assert_eq!(field("enqueued_at_ms", 7), env.enqueued_at_ms);
            assert_eq!(field("deadline_ms", 8), env.deadline_ms);
            assert_eq!(field("body_len", 10), env.body.len());
            match version {
                EnvelopeVersion::V1 => assert_eq!(meta["dedupe"], true),
                EnvelopeVersion::V2 => {
                    assert_eq!(meta[9], 1, "flags: dedupe");
                    assert_eq!(meta.as_array().map(Vec::len), Some(11));
                }
            }
        }
    }

    /// The example in docs/protocol.md, byte for byte.
    #[test]
    fn documented_example_decodes() {
        let meta = br#"{"id":"01a20140-78af-77c4-9604-bc4b35fb5daf","method":"POST","uri":"/echo","version":"HTTP/1.1","headers":[["host","localhost"],["content-length","2"]],"reply_to":"anteroom:{default}:replies:p1","enqueued_at_ms":1700000000000,"deadline_ms":1700000030000,"body_len":2}"#;
        let mut wire = vec![0x01, 0x51, 0x00, 0x00, 0x01, 0x0b];
        assert_eq!(meta.len(), 0x010b);
        wire.extend_from_slice(meta);
        wire.extend_from_slice(b"hi");
        let env = RequestEnvelope::decode(Bytes::from(wire)).unwrap();
        assert_eq!(env.method, "POST");
        assert_eq!(
            env.headers[1],
            ("content-length".into(), Bytes::from_static(b"2"))
        );
        assert_eq!(env.client_addr, None);
        assert_eq!(&env.body[..], b"hi");
    }

    /// The version 2 example in docs/protocol.md, byte for byte: the same
    /// request as version 1's.
    #[test]
    fn documented_version_2_example_decodes() {
        let meta = br#"["01a20140-78af-77c4-9604-bc4b35fb5daf","POST","/echo","HTTP/1.1",[["host","localhost"],["content-length","2"]],"anteroom:{default}:replies:p1",null,1700000000000,1700000030000,0,2]"#;
        let mut wire = vec![0x02, 0x51, 0x00, 0x00, 0x00, 0xb5];
        assert_eq!(meta.len(), 0xb5);
        wire.extend_from_slice(meta);
        wire.extend_from_slice(b"hi");
        let env = RequestEnvelope::decode(Bytes::from(wire.clone())).unwrap();
        assert_eq!(env.id, "01a20140-78af-77c4-9604-bc4b35fb5daf");
        assert_eq!(env.method, "POST");
        assert_eq!(env.uri, "/echo");
        assert_eq!(env.version, HttpVersion::Http11);
        assert_eq!(
            env.headers[1],
            ("content-length".into(), Bytes::from_static(b"2"))
        );
        assert_eq!(env.reply_to, "anteroom:{default}:replies:p1");
        assert_eq!(env.client_addr, None);
        assert_eq!(
            (env.enqueued_at_ms, env.deadline_ms),
            (1_700_000_000_000, 1_700_000_030_000)
        );
        assert!(!env.dedupe && !env.stream);
        assert_eq!(&env.body[..], b"hi");
        // And this crate writes exactly these bytes for it.
        assert_eq!(env.encode(), wire);
    }

    #[test]
    fn safe_to_repeat_means_safe_method_or_idempotency_key() {
        let mut env = sample();
        assert!(!env.is_safe_to_repeat(), "POST without a key");
        env.headers
            .push(("idempotency-key".into(), Bytes::from_static(b"k1")));
        assert!(env.is_safe_to_repeat());
        for (method, safe) in [
            ("GET", true),
            ("HEAD", true),
            ("OPTIONS", true),
            ("PUT", false),
            ("DELETE", false),
        ] {
            let mut env = sample();
            env.method = method.into();
            assert_eq!(env.is_safe_to_repeat(), safe, "{method}");
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let wire = sample().encode();
        for n in 0..wire.len() {
            let err = RequestEnvelope::decode(Bytes::copy_from_slice(&wire[..n]));
            assert!(err.is_err(), "prefix of {n} bytes decoded");
        }
    }

    #[test]
    fn unknown_version_and_wrong_kind_are_typed() {
        let mut wire = sample().encode();
        wire[0] = 9;
        assert!(matches!(
            RequestEnvelope::decode(Bytes::from(wire.clone())),
            Err(DecodeError::UnsupportedVersion(9))
        ));
        wire[0] = VERSION;
        assert!(matches!(
            ResponseEnvelope::decode(Bytes::from(wire)),
            Err(DecodeError::WrongKind { found: b'Q', .. })
        ));
    }

    #[test]
    fn dead_letters_keep_the_original_bytes() {
        let dead = DeadLetter {
            reason: "unsupported envelope version 9".into(),
            at_ms: 7,
            by: "d1".into(),
            original: Bytes::from_static(b"\x09garbage\xff"),
        };
        assert_eq!(
            DeadLetter::decode(Bytes::from(dead.encode())).unwrap(),
            dead
        );
    }

    #[test]
    fn code_points_above_latin1_are_rejected() {
        let meta = br#"{"id":"a","status":200,"headers":[["x","\u0100"]],"body_len":0}"#;
        let mut wire = vec![VERSION, KIND_RESPONSE];
        wire.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        wire.extend_from_slice(meta);
        assert!(matches!(
            ResponseEnvelope::decode(Bytes::from(wire)),
            Err(DecodeError::Meta(_))
        ));
    }

    fn arb_headers() -> impl Strategy<Value = HeaderList> {
        prop::collection::vec(
            (
                "[a-z][a-z0-9-]{0,20}",
                prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from),
            ),
            0..12,
        )
    }

    fn arb_version() -> impl Strategy<Value = HttpVersion> {
        prop_oneof![
            Just(HttpVersion::Http09),
            Just(HttpVersion::Http10),
            Just(HttpVersion::Http11),
            Just(HttpVersion::Http2),
            Just(HttpVersion::Http3),
        ]
    }

    prop_compose! {
        fn arb_request()(
            id in "\\PC{0,40}",
            method in "[A-Z]{1,10}",
            uri in "\\PC{0,80}",
            version in arb_version(),
            headers in arb_headers(),
            body in prop::collection::vec(any::<u8>(), 0..2048),
            reply_to in "\\PC{0,60}",
            client_addr in prop::option::of("\\PC{0,30}"),
            // The range a request's integers have (docs/protocol.md).
            enqueued_at_ms in 0..=crate::frame::MAX_JSON_INTEGER,
            deadline_ms in 0..=crate::frame::MAX_JSON_INTEGER,
            dedupe in any::<bool>(),
            stream in any::<bool>(),
            // Plain, body follows, or WebSocket: one kind byte each.
            kind in 0u8..3,
        ) -> RequestEnvelope {
            let (body_follows, websocket) = (kind == 1, kind == 2);
            RequestEnvelope { id, method, uri, version, headers, body: Bytes::from(body), reply_to, client_addr, enqueued_at_ms, deadline_ms, dedupe, stream, body_follows, websocket }
        }
    }

    proptest! {
        #[test]
        fn request_decode_inverts_encode(env in arb_request(), v1 in any::<bool>()) {
            let version = if v1 { EnvelopeVersion::V1 } else { EnvelopeVersion::V2 };
            let back = RequestEnvelope::decode(Bytes::from(env.encode_as(version))).unwrap();
            prop_assert_eq!(back, env);
        }

        #[test]
        fn response_decode_inverts_encode(
            id in "\\PC{0,40}",
            status in 100u16..1000,
            headers in arb_headers(),
            body in prop::collection::vec(any::<u8>(), 0..2048),
        ) {
            let env = ResponseEnvelope { id, status, headers, body: Bytes::from(body) };
            let back = ResponseEnvelope::decode(Bytes::from(env.encode())).unwrap();
            prop_assert_eq!(back, env);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = RequestEnvelope::decode(Bytes::from(bytes.clone()));
            let _ = ResponseEnvelope::decode(Bytes::from(bytes));
        }

        #[test]
        fn corrupted_envelopes_never_panic(env in arb_request(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut wire = env.encode();
            let i = pos.index(wire.len());
            wire[i] = byte;
            let _ = RequestEnvelope::decode(Bytes::from(wire));
        }
    }
}
