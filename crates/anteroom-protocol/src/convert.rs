//! Conversions between envelopes and `http` types, and hop-by-hop handling.

use bytes::Bytes;
use http::header::{CONNECTION, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};

use crate::{HeaderList, HttpVersion, RequestEnvelope, ResponseEnvelope};

/// An envelope whose fields are not valid HTTP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The method is not a valid HTTP token.
    #[error("invalid method {0:?}")]
    Method(String),
    /// The URI does not parse.
    #[error("invalid uri {0:?}")]
    Uri(String),
    /// A header name is not a valid HTTP token.
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    /// A header value holds bytes HTTP forbids (e.g. CR or LF).
    #[error("invalid value for header {0:?}")]
    HeaderValue(String),
    /// The status is outside 100..=999.
    #[error("invalid status {0}")]
    Status(u16),
    /// More header fields than [`MAX_HEADER_FIELDS`].
    #[error("{0} header fields, more than the {MAX_HEADER_FIELDS} an envelope may carry")]
    TooManyHeaders(usize),
}

/// Most header fields an envelope may carry into an `http` message: far
/// above what a proxy forwards (`--max-headers`, 500 by default) or an
/// upstream may answer with (`--upstream-max-headers`), and below the
/// 32,768 at which `http::HeaderMap` panics. An envelope over it was not
/// written by a proxy or dispatcher: conversion fails with
/// [`ConvertError::TooManyHeaders`].
pub const MAX_HEADER_FIELDS: usize = 10_000;

/// Headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Removes hop-by-hop headers, including every header the `Connection`
/// header names (RFC 9110 §7.6.1), and `Upgrade` (a queued request cannot
/// switch protocols). `Host` stays even when `Connection` names it: it is
/// never hop-by-hop, and a client naming it would have the request routed
/// by one host and reach the app with none.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| name != http::header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(http::header::UPGRADE);
}

/// [`strip_hop_by_hop`] for a response of `status`: a 426 (Upgrade
/// Required) keeps its `Upgrade`, which RFC 9110 section 15.5.22 requires
/// it to carry (it names what the client must switch to; nothing switches
/// here).
pub fn strip_hop_by_hop_from_response(headers: &mut HeaderMap, status: u16) {
    let upgrade: Vec<_> = if status == 426 {
        headers
            .get_all(http::header::UPGRADE)
            .iter()
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    strip_hop_by_hop(headers);
    for value in upgrade {
        headers.append(http::header::UPGRADE, value);
    }
}

/// Copies a header map into an ordered list (same-name fields stay in order).
pub fn headers_from_map(headers: &HeaderMap) -> HeaderList {
    headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

fn headers_to_map(list: &HeaderList) -> Result<HeaderMap, ConvertError> {
    if list.len() > MAX_HEADER_FIELDS {
        return Err(ConvertError::TooManyHeaders(list.len()));
    }
    let mut map = HeaderMap::with_capacity(list.len());
    for (name, value) in list {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConvertError::HeaderName(name.clone()))?;
        let value = HeaderValue::from_maybe_shared(value.clone())
            .map_err(|_| ConvertError::HeaderValue(name.to_string()))?;
        map.append(name, value);
    }
    Ok(map)
}

impl From<Version> for HttpVersion {
    fn from(v: Version) -> Self {
        match v {
            Version::HTTP_09 => HttpVersion::Http09,
            Version::HTTP_10 => HttpVersion::Http10,
            Version::HTTP_2 => HttpVersion::Http2,
            Version::HTTP_3 => HttpVersion::Http3,
            _ => HttpVersion::Http11,
        }
    }
}

impl From<HttpVersion> for Version {
    fn from(v: HttpVersion) -> Self {
        match v {
            HttpVersion::Http09 => Version::HTTP_09,
            HttpVersion::Http10 => Version::HTTP_10,
            HttpVersion::Http11 => Version::HTTP_11,
            HttpVersion::Http2 => Version::HTTP_2,
            HttpVersion::Http3 => Version::HTTP_3,
        }
    }
}

impl RequestEnvelope {
    /// Builds the `http::Request` this envelope describes.
    pub fn to_http(&self) -> Result<Request<Bytes>, ConvertError> {
        let method = Method::from_bytes(self.method.as_bytes())
            .map_err(|_| ConvertError::Method(self.method.clone()))?;
        let uri: Uri = self
            .uri
            .parse()
            .map_err(|_| ConvertError::Uri(self.uri.clone()))?;
        let mut req = Request::new(self.body.clone());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = self.version.into();
        *req.headers_mut() = headers_to_map(&self.headers)?;
        Ok(req)
    }
}

impl ResponseEnvelope {
    /// Builds an envelope from a response's parts; hop-by-hop headers are dropped.
    pub fn from_http(id: &str, status: StatusCode, headers: &HeaderMap, body: Bytes) -> Self {
        let mut headers = headers.clone();
        strip_hop_by_hop_from_response(&mut headers, status.as_u16());
        Self {
            id: id.to_owned(),
            status: status.as_u16(),
            headers: headers_from_map(&headers),
            body,
        }
    }

    /// Builds the `http::Response` this envelope describes.
    pub fn to_http(&self) -> Result<Response<Bytes>, ConvertError> {
        let status =
            StatusCode::from_u16(self.status).map_err(|_| ConvertError::Status(self.status))?;
        let mut resp = Response::new(self.body.clone());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers_to_map(&self.headers)?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_426_keeps_its_upgrade_and_nothing_else_does() {
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", "websocket".parse().unwrap());
        headers.insert("connection", "upgrade".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        let mut other = headers.clone();
        strip_hop_by_hop_from_response(&mut headers, 426);
        assert_eq!(headers["upgrade"], "websocket");
        assert!(headers.get("connection").is_none());
        strip_hop_by_hop_from_response(&mut other, 200);
        assert!(other.get("upgrade").is_none());
        assert_eq!(other["x-kept"], "1");
    }

    #[test]
    fn too_many_header_fields_are_an_error_not_a_panic() {
        // 40,000 fields: past the 32,768 at which HeaderMap panics.
        for n in [MAX_HEADER_FIELDS + 1, 40_000] {
            let headers: HeaderList = (0..n)
                .map(|i| (format!("x-h{i}"), Bytes::from_static(b"v")))
                .collect();
            let resp = ResponseEnvelope {
                id: "r".into(),
                status: 200,
                headers: headers.clone(),
                body: Bytes::new(),
            };
            assert!(matches!(resp.to_http(), Err(ConvertError::TooManyHeaders(m)) if m == n));
        }
        let headers: HeaderList = (0..MAX_HEADER_FIELDS)
            .map(|_| ("x-same".to_owned(), Bytes::from_static(b"v")))
            .collect();
        let resp = ResponseEnvelope {
            id: "r".into(),
            status: 200,
            headers,
            body: Bytes::new(),
        };
        assert_eq!(resp.to_http().unwrap().headers().len(), MAX_HEADER_FIELDS);
    }

    #[test]
    fn connection_cannot_strip_host() {
        let mut h = HeaderMap::new();
        h.insert("connection", "host, x-private".parse().unwrap());
        h.insert("host", "app.example".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h["host"], "app.example");
        assert!(!h.contains_key("x-private"));
    }

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn bad_fields_are_errors_not_panics() {
        let env = RequestEnvelope {
            id: "x".into(),
            method: "GET".into(),
            uri: "/".into(),
            version: HttpVersion::Http11,
            headers: vec![("x-evil".into(), Bytes::from_static(b"a\r\nb"))],
            body: Bytes::new(),
            reply_to: "r".into(),
            client_addr: None,
            enqueued_at_ms: 0,
            deadline_ms: 0,
            dedupe: false,
            stream: false,
            body_follows: false,
            websocket: false,
        };
        assert!(matches!(env.to_http(), Err(ConvertError::HeaderValue(_))));
        let mut bad_method = env.clone();
        bad_method.method = "G E T".into();
        bad_method.headers.clear();
        assert!(matches!(bad_method.to_http(), Err(ConvertError::Method(_))));
        let resp = ResponseEnvelope {
            id: "x".into(),
            status: 42,
            headers: vec![],
            body: Bytes::new(),
        };
        assert!(matches!(resp.to_http(), Err(ConvertError::Status(42))));
    }

    #[test]
    fn duplicate_and_binary_headers_survive_conversion() {
        let mut h = HeaderMap::new();
        h.append("x-dup", "1".parse().unwrap());
        h.append("x-dup", "2".parse().unwrap());
        h.append("x-bin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let list = headers_from_map(&h);
        let back = headers_to_map(&list).unwrap();
        assert_eq!(back, h);
    }
}
