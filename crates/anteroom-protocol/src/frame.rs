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
    pub(crate) enqueued_at_ms: u64,
    pub(crate) deadline_ms: u64,
    #[serde(default)]
    pub(crate) dedupe: bool,
    #[serde(default)]
    pub(crate) stream: bool,
    pub(crate) body_len: u64,
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
    let mut out = Vec::with_capacity(PREFIX_LEN + meta_hint + body.len());
    out.push(VERSION);
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

/// The kind byte of a frame, after checking its length and version.
pub(crate) fn kind_of(buf: &Bytes) -> Result<u8, DecodeError> {
    if buf.len() < PREFIX_LEN {
        return Err(DecodeError::Truncated {
            needed: PREFIX_LEN,
            available: buf.len(),
        });
    }
    if buf[0] != VERSION {
        return Err(DecodeError::UnsupportedVersion(buf[0]));
    }
    Ok(buf[1])
}

/// Splits a frame into (metadata bytes, body) after checking version and kind.
pub(crate) fn unframe(
    buf: &Bytes,
    kind: u8,
    kind_name: &'static str,
) -> Result<(Bytes, Bytes), DecodeError> {
    if kind_of(buf)? != kind {
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
