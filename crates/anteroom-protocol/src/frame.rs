//! The envelope's wire layout, shared by every kind: the frame
//! `[version u8][kind u8][meta_len u32 BE][meta JSON][body]`, the JSON
//! metadata of each kind, and header values as Latin-1 strings (docs/protocol.md).

use bytes::{BufMut, Bytes};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::envelope::{DecodeError, HeaderList, HttpVersion, PREFIX_LEN, VERSION};

/// Header values travel as JSON strings whose code points are the bytes
/// (ISO-8859-1, as WSGI does), so any byte sequence round-trips exactly.
pub(crate) struct Latin1<'a>(&'a [u8]);

impl Serialize for Latin1<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_ascii() {
            // ASCII bytes are valid UTF-8; no conversion needed.
            let text = std::str::from_utf8(self.0).map_err(serde::ser::Error::custom)?;
            s.serialize_str(text)
        } else {
            let text: String = self.0.iter().map(|&b| char::from(b)).collect();
            s.serialize_str(&text)
        }
    }
}

pub(crate) fn latin1_to_bytes<E: serde::de::Error>(text: String) -> Result<Bytes, E> {
    if text.is_ascii() {
        return Ok(Bytes::from(text.into_bytes()));
    }
    text.chars()
        .map(|c| {
            u8::try_from(u32::from(c)).map_err(|_| {
                E::custom(format!(
                    "header value has code point U+{:04X}, above U+00FF",
                    u32::from(c)
                ))
            })
        })
        .collect::<Result<Vec<u8>, E>>()
        .map(Bytes::from)
}

pub(crate) struct HeadersRef<'a>(pub(crate) &'a [(String, Bytes)]);

impl Serialize for HeadersRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(n, v)| (n.as_str(), Latin1(v))))
    }
}

pub(crate) fn de_headers<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderList, D::Error> {
    let raw: Vec<(String, String)> = Vec::deserialize(d)?;
    raw.into_iter()
        .map(|(name, value)| Ok((name, latin1_to_bytes::<D::Error>(value)?)))
        .collect()
}

#[derive(Serialize)]
pub(crate) struct RequestMetaRef<'a> {
    pub(crate) id: &'a str,
    pub(crate) method: &'a str,
    pub(crate) uri: &'a str,
    pub(crate) version: HttpVersion,
    pub(crate) headers: HeadersRef<'a>,
    pub(crate) reply_to: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) client_addr: Option<&'a str>,
    pub(crate) enqueued_at_ms: u64,
    pub(crate) deadline_ms: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) dedupe: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) stream: bool,
    pub(crate) body_len: u64,
}

#[derive(Deserialize)]
pub(crate) struct RequestMeta {
    pub(crate) id: String,
    pub(crate) method: String,
    pub(crate) uri: String,
    pub(crate) version: HttpVersion,
    #[serde(deserialize_with = "de_headers")]
    pub(crate) headers: HeaderList,
    pub(crate) reply_to: String,
    #[serde(default)]
    pub(crate) client_addr: Option<String>,
    #[serde(deserialize_with = "de_json_integer")]
    pub(crate) enqueued_at_ms: u64,
    #[serde(deserialize_with = "de_json_integer")]
    pub(crate) deadline_ms: u64,
    #[serde(default)]
    pub(crate) dedupe: bool,
    #[serde(default)]
    pub(crate) stream: bool,
    #[serde(deserialize_with = "de_json_integer")]
    pub(crate) body_len: u64,
}

/// The largest integer a request's metadata may carry: 2^53 − 1, the
/// largest every JSON implementation reads exactly (RFC 7493 section 2.2,
/// I-JSON; JavaScript's `Number.MAX_SAFE_INTEGER`), so a dispatcher in any
/// language reads the same envelope the same way (docs/protocol.md).
pub(crate) const MAX_JSON_INTEGER: u64 = (1 << 53) - 1;

/// A non-negative integer of a request's metadata, at most
/// [`MAX_JSON_INTEGER`].
struct JsonInteger(u64);

impl<'de> Deserialize<'de> for JsonInteger {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = u64::deserialize(d)?;
        if value > MAX_JSON_INTEGER {
            return Err(serde::de::Error::custom(format!(
                "integer {value} is above 2^53 - 1"
            )));
        }
        Ok(Self(value))
    }
}

fn de_json_integer<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    JsonInteger::deserialize(d).map(|JsonInteger(value)| value)
}

/// Bit of a version 2 request's `flags`: [`RequestMeta::dedupe`].
pub(crate) const FLAG_DEDUPE: u64 = 1;
/// Bit of a version 2 request's `flags`: [`RequestMeta::stream`].
pub(crate) const FLAG_STREAM: u64 = 2;

impl RequestMetaRef<'_> {
    /// The version 2 layout: the same fields as a JSON array, in this
    /// order, `dedupe` and `stream` as the bits of one number
    /// (docs/protocol.md, "Request envelopes, version 2").
    #[allow(clippy::type_complexity)]
    pub(crate) fn as_array(
        &self,
    ) -> (
        &str,
        &str,
        &str,
        HttpVersion,
        &HeadersRef<'_>,
        &str,
        Option<&str>,
        u64,
        u64,
        u64,
        u64,
    ) {
        let flags =
            if self.dedupe { FLAG_DEDUPE } else { 0 } | if self.stream { FLAG_STREAM } else { 0 };
        (
            self.id,
            self.method,
            self.uri,
            self.version,
            &self.headers,
            self.reply_to,
            self.client_addr,
            self.enqueued_at_ms,
            self.deadline_ms,
            flags,
            self.body_len,
        )
    }
}

/// `headers` as both versions carry them, read by [`de_headers`].
#[derive(Deserialize)]
struct WireHeaders(#[serde(deserialize_with = "de_headers")] HeaderList);

/// A version 2 request's metadata: [`RequestMeta`]'s fields as a JSON
/// array. Elements after the eleventh are ignored, so a later release may
/// append fields as version 1 may add keys; unknown `flags` bits are
/// ignored too.
pub(crate) struct RequestMetaArray(pub(crate) RequestMeta);

impl<'de> Deserialize<'de> for RequestMetaArray {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;

        fn next<'de, T: Deserialize<'de>, A: serde::de::SeqAccess<'de>>(
            seq: &mut A,
            index: usize,
        ) -> Result<T, A::Error> {
            seq.next_element()?
                .ok_or_else(|| serde::de::Error::invalid_length(index, &"11 elements"))
        }

        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = RequestMeta;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a version 2 request metadata array")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RequestMeta, A::Error> {
                let id = next(&mut seq, 0)?;
                let method = next(&mut seq, 1)?;
                let uri = next(&mut seq, 2)?;
                let version = next(&mut seq, 3)?;
                let WireHeaders(headers) = next(&mut seq, 4)?;
                let reply_to = next(&mut seq, 5)?;
                let client_addr = next(&mut seq, 6)?;
                let JsonInteger(enqueued_at_ms) = next(&mut seq, 7)?;
                let JsonInteger(deadline_ms) = next(&mut seq, 8)?;
                let JsonInteger(flags) = next(&mut seq, 9)?;
                let JsonInteger(body_len) = next(&mut seq, 10)?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(RequestMeta {
                    id,
                    method,
                    uri,
                    version,
                    headers,
                    reply_to,
                    client_addr,
                    enqueued_at_ms,
                    deadline_ms,
                    dedupe: flags & FLAG_DEDUPE != 0,
                    stream: flags & FLAG_STREAM != 0,
                    body_len,
                })
            }
        }

        d.deserialize_seq(Fields).map(Self)
    }
}

#[derive(Serialize)]
pub(crate) struct ResponseMetaRef<'a> {
    pub(crate) id: &'a str,
    pub(crate) status: u16,
    pub(crate) headers: HeadersRef<'a>,
    pub(crate) body_len: u64,
}

#[derive(Deserialize)]
pub(crate) struct ResponseMeta {
    pub(crate) id: String,
    pub(crate) status: u16,
    #[serde(deserialize_with = "de_headers")]
    pub(crate) headers: HeaderList,
    pub(crate) body_len: u64,
}

/// Room for a header list's JSON: the names and values plus quotes,
/// brackets and commas (escapes are rare and only cost a reallocation).
pub(crate) fn headers_json_len(headers: &[(String, Bytes)]) -> usize {
    headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum()
}

/// Frames `meta` and `body`. `meta_hint` is the expected JSON length: with
/// a good hint the output is allocated once, at about its final size (a
/// proxy holding many requests keeps each encoding until it is pushed).
pub(crate) fn frame(kind: u8, meta: &impl Serialize, meta_hint: usize, body: &[u8]) -> Vec<u8> {
    frame_version(VERSION, kind, meta, meta_hint, body)
}

/// [`frame`] with the version byte `version` (a request envelope's
/// layout, [`crate::EnvelopeVersion`]).
pub(crate) fn frame_version(
    version: u8,
    kind: u8,
    meta: &impl Serialize,
    meta_hint: usize,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + meta_hint + body.len());
    out.push(version);
    out.push(kind);
    out.put_u32(0);
    // Serializing these plain structs into a Vec cannot fail: every map key
    // is a string and writing to a Vec performs no I/O.
    serde_json::to_writer(&mut out, meta).expect("envelope metadata serializes");
    let meta_len = u32::try_from(out.len() - PREFIX_LEN).unwrap_or(u32::MAX);
    out[2..PREFIX_LEN].copy_from_slice(&meta_len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The version and kind bytes of a frame, after checking its length.
pub(crate) fn prefix(buf: &Bytes) -> Result<(u8, u8), DecodeError> {
    if buf.len() < PREFIX_LEN {
        return Err(DecodeError::Truncated {
            needed: PREFIX_LEN,
            available: buf.len(),
        });
    }
    Ok((buf[0], buf[1]))
}

/// The kind byte of a frame, after checking its length and version (1:
/// every kind but a request's has only that one).
pub(crate) fn kind_of(buf: &Bytes) -> Result<u8, DecodeError> {
    match prefix(buf)? {
        (VERSION, kind) => Ok(kind),
        (version, _) => Err(DecodeError::UnsupportedVersion(version)),
    }
}

/// Splits a frame into (metadata bytes, body) after checking version and kind.
pub(crate) fn unframe(
    buf: &Bytes,
    kind: u8,
    kind_name: &'static str,
) -> Result<(Bytes, Bytes), DecodeError> {
    kind_of(buf)?;
    unframe_any_version(buf, kind, kind_name)
}

/// [`unframe`] for a frame whose version the caller has checked.
pub(crate) fn unframe_any_version(
    buf: &Bytes,
    kind: u8,
    kind_name: &'static str,
) -> Result<(Bytes, Bytes), DecodeError> {
    if prefix(buf)?.1 != kind {
        return Err(DecodeError::WrongKind {
            expected: kind_name,
            found: buf[1],
        });
    }
    let meta_len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
    let meta_end = PREFIX_LEN.saturating_add(meta_len);
    if buf.len() < meta_end {
        return Err(DecodeError::Truncated {
            needed: meta_end,
            available: buf.len(),
        });
    }
    Ok((buf.slice(PREFIX_LEN..meta_end), buf.slice(meta_end..)))
}

pub(crate) fn check_body(declared: u64, body: &Bytes) -> Result<(), DecodeError> {
    if declared != body.len() as u64 {
        return Err(DecodeError::BodyLength {
            declared,
            actual: body.len(),
        });
    }
    Ok(())
}
