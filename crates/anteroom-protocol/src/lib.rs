//! The wire contract between Anteroom proxies and dispatchers.
//!
//! A proxy turns each HTTP request into a [`RequestEnvelope`], encodes it with
//! [`RequestEnvelope::encode`] and pushes it onto the queue's requests list
//! (see [`Keys`]). A dispatcher moves it into its own processing list, decodes
//! it, runs it, and pushes an encoded [`ResponseEnvelope`] onto the list named
//! by `reply_to`. The proxy reads its reply list and hands each response to the
//! waiting request by id.
//!
//! Both envelopes share one framing: a version byte, a kind byte, a
//! length-prefixed JSON metadata block and the raw body bytes. Decoding never
//! panics; bad input gives a [`DecodeError`]. [`Failure`] is the one table that
//! maps broker failures to HTTP statuses. `docs/protocol.md` specifies all of
//! this for implementers in other languages. [`clock`] is the queue's clock
//! (the Redis server's), which every deadline is read against.
//!
//! This crate has no async runtime dependency.

pub mod clock;
mod convert;
mod envelope;
mod failure;
mod frame;
mod heartbeat;
mod keys;
mod printable;
mod socket;
mod stream;

pub use clock::now_ms;
pub use convert::{
    ConvertError, MAX_HEADER_FIELDS, headers_from_map, strip_hop_by_hop,
    strip_hop_by_hop_from_response,
};
pub use envelope::{
    DeadLetter, DecodeError, EnvelopeVersion, HeaderList, HttpVersion, KIND_DEAD_LETTER,
    KIND_REQUEST, KIND_REQUEST_BODY_FOLLOWS, KIND_REQUEST_WEBSOCKET, KIND_RESPONSE,
    RequestEnvelope, ResponseEnvelope, VERSION,
};
pub use failure::Failure;
pub use heartbeat::{
    CanarySplit, DispatcherHeartbeat, MaintenanceRecord, PauseRecord, ProxyHeartbeat, Unhealthy,
};
pub use keys::{Keys, NameError, QUEUES_KEY, validate_id};
pub use printable::{Printable, printable};
pub use socket::{KIND_SOCKET_MESSAGE, MAX_SOCKET_MESSAGE, Opcode, SocketMessage};
pub use stream::{
    Credit, Inbound, KIND_CREDIT, KIND_STREAM_CHUNK, KIND_STREAM_END, KIND_STREAM_HEAD, KIND_TAKEN,
    MAX_CHUNK, MAX_WINDOW, Reply, StreamChunk, StreamEnd, StreamHead, Taken,
};

/// Longest hold budget, and so the furthest a deadline may lie ahead: a
/// proxy refuses a longer `--hold`, and a dispatcher sets aside an envelope
/// whose deadline lies further ahead of its clock (such an envelope was not
/// written by a proxy, and would hold a concurrency slot that long).
pub const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
