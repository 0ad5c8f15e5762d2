//! Between HTTP and the envelope: what the proxy adds to a request
//! (forwarding headers, `X-Request-Id`, its target in origin form, HTTP/2
//! cookies joined) and removes (hop-by-hop and untrusted forwarding
//! headers), and the response built from a reply.

use std::net::SocketAddr;
use std::time::Duration;

use anteroom_protocol::{RequestEnvelope, ResponseEnvelope, StreamHead, strip_hop_by_hop};
use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::Full;

use crate::error::ProxyError;
use crate::handler::State;
use crate::replies::StreamFrame;
use crate::stream::{StreamBody, StreamParts};
use std::sync::Arc;

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Forwarding headers the proxy does not set, removed from requests: a
/// client could otherwise claim another host, port, path prefix, scheme or
/// address to an app that trusts its proxy. Beside RFC 7239's `Forwarded`
/// and the `X-Forwarded-*` family, the fields frameworks read for the same
/// facts: Rack's `X-Forwarded-Ssl` and `X-Forwarded-Scheme`, Microsoft's
/// `Front-End-Https`, and the client-address fields of Rails (`Client-IP`)
/// and of CDNs and Node libraries (`True-Client-IP`, `X-Client-IP`,
/// `X-Cluster-Client-IP`). (`X-Forwarded-For` is appended to and
/// `X-Forwarded-Proto` replaced; see docs/behaviour.md.)
pub(crate) const UNTRUSTED_FORWARDING: [&str; 13] = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "front-end-https",
    "x-real-ip",
    "client-ip",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
];

/// Longest client-supplied `X-Request-Id` kept; longer or non-visible ones are replaced.
pub(crate) const MAX_REQUEST_ID_LEN: usize = 200;

pub(crate) fn usable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| c.is_ascii_graphic())
}

/// Where a request goes and on whose behalf: everything besides the
/// request itself that its envelope records.
pub(crate) struct Route<'a> {
    pub(crate) client: SocketAddr,
    pub(crate) id: &'a str,
    pub(crate) request_id: &'a HeaderValue,
    pub(crate) reply_to: &'a str,
    pub(crate) now_ms: u64,
    pub(crate) hold: Duration,
    /// Whether enqueues may be repeated (see `RequestEnvelope::dedupe`).
    pub(crate) dedupe: bool,
    /// Whether the reply may be streamed (see `RequestEnvelope::stream`).
    pub(crate) stream: bool,
    /// Whether `body` is only the first part (see
    /// `RequestEnvelope::body_follows`).
    pub(crate) body_follows: bool,
    /// Whether it is a WebSocket handshake (see
    /// `RequestEnvelope::websocket`).
    pub(crate) websocket: bool,
}

/// The envelope for a request: hop-by-hop headers removed, forwarding
/// headers set, deadline `hold` from now. Pure, so it can be fuzzed.
pub(crate) fn envelope_for(
    parts: http::request::Parts,
    body: Bytes,
    route: Route<'_>,
) -> RequestEnvelope {
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    if route.websocket {
        // The proxy ends the client's socket and the dispatcher opens its
        // own to the app: the key, version and extensions are each
        // socket's own (no extension is negotiated); the offered
        // subprotocols go on.
        for name in [
            header::SEC_WEBSOCKET_KEY,
            header::SEC_WEBSOCKET_VERSION,
            header::SEC_WEBSOCKET_EXTENSIONS,
        ] {
            headers.remove(name);
        }
    }
    for name in UNTRUSTED_FORWARDING {
        headers.remove(name);
    }
    if parts.version >= http::Version::HTTP_2 {
        join_cookies(&mut headers);
    }
    if parts.version < http::Version::HTTP_2 {
        // RFC 9112 §3.2.2: with an absolute-form target, the target's
        // authority is the host; a Host field that disagrees is ignored.
        if let Some(value) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, value);
        }
    }
    let https = parts.extensions.get::<crate::tls::ClientTls>().is_some();
    prepare_forwarded_headers(
        &mut headers,
        &parts.uri,
        route.client,
        route.request_id,
        https,
    );
    RequestEnvelope {
        id: route.id.to_owned(),
        method: parts.method.as_str().to_owned(),
        uri: origin_form(&parts.uri),
        version: parts.version.into(),
        headers: anteroom_protocol::headers_from_map(&headers),
        body,
        reply_to: route.reply_to.to_owned(),
        client_addr: Some(route.client.to_string()),
        enqueued_at_ms: route.now_ms,
        deadline_ms: route
            .now_ms
            .saturating_add(u64::try_from(route.hold.as_millis()).unwrap_or(u64::MAX)),
        dedupe: route.dedupe,
        stream: route.stream,
        body_follows: route.body_follows,
        websocket: route.websocket,
    }
}

/// The request target in origin form: the path (`/` when empty, as in the
/// absolute-form `http://host?x`) and the query.
pub(crate) fn origin_form(uri: &http::Uri) -> String {
    let path = match uri.path() {
        "" => "/",
        path => path,
    };
    match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    }
}

/// HTTP/2 may split `cookie` into one field per pair (RFC 9113 §8.2.3);
/// forwarded as HTTP/1.1 they must be one field again, joined with `"; "`,
/// or an app that joins repeated fields with `","` (RFC 9110 §5.3) reads
/// `a=1,b=2` as one cookie.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Sets `X-Request-Id`, appends the client to `X-Forwarded-For`, sets
/// `X-Forwarded-Proto` to this hop's scheme (`https` when the proxy
/// terminated TLS for the connection, whatever the request claims), and
/// fills in `Host` from the authority of HTTP/2 requests.
pub(crate) fn prepare_forwarded_headers(
    headers: &mut HeaderMap,
    uri: &http::Uri,
    client: SocketAddr,
    request_id: &HeaderValue,
    https: bool,
) {
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    // Every prior line, in order (a load balancer may add its own line
    // rather than append to the client's: RFC 9110 §5.3 makes them one
    // list), then this hop's client.
    let ip = client.ip().to_string();
    let mut hops: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    hops.push(&ip);
    let forwarded_for = hops.join(", ");
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    let proto = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if !headers.contains_key(header::HOST) {
        if let Some(value) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, value);
        }
    }
}

pub(crate) fn build_response(
    reply: &ResponseEnvelope,
    head_request: bool,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    if reply.status < 200 {
        return Err(ProxyError::InterimStatus(reply.status));
    }
    let resp = reply.to_http().map_err(ProxyError::BadReply)?;
    let (mut parts, body) = resp.into_parts();
    anteroom_protocol::strip_hop_by_hop_from_response(&mut parts.headers, reply.status);
    if !head_request {
        // hyper sets Content-Length from the body; a stale value would break framing.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// The response that streams `head`'s body as its frames arrive: the
/// head's status and headers, hop-by-hop ones removed and the app's
/// `Content-Length` kept (hyper then ends the response short of it if the
/// stream aborts). Errors: a head that is not a valid response. (Its
/// `credit_to` was checked by the reply reader.)
pub(crate) fn stream_response(
    state: &State,
    head: StreamHead,
    frames: tokio::sync::mpsc::UnboundedReceiver<StreamFrame>,
    buffered: Arc<std::sync::atomic::AtomicU64>,
    key: u128,
) -> Result<Response<StreamBody>, ProxyError> {
    let parts = StreamParts {
        buffered,
        demux: Arc::clone(&state.demux),
        key,
        credit_to: head.credit_to.clone(),
        credits: state.demux.credits(),
        window: head.window,
        idle: state.config.stream_idle_timeout,
        metrics: state.metrics.clone(),
    };
    if head.status < 200 {
        return Err(ProxyError::InterimStatus(head.status));
    }
    let body = StreamBody::new(frames, parts);
    let envelope = ResponseEnvelope {
        id: head.id,
        status: head.status,
        headers: head.headers,
        body: Bytes::new(),
    };
    let (mut parts, _) = envelope
        .to_http()
        .map_err(ProxyError::BadReply)?
        .into_parts();
    anteroom_protocol::strip_hop_by_hop_from_response(&mut parts.headers, parts.status.as_u16());
    Ok(Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        let uri: http::Uri = "/".parse().unwrap();
        let rid = HeaderValue::from_static("abc");
        prepare_forwarded_headers(&mut h, &uri, "192.0.2.7:4000".parse().unwrap(), &rid, false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], "abc");
    }

    #[test]
    fn every_prior_forwarded_for_line_is_kept_in_order() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "198.51.100.1".parse().unwrap());
        h.append(
            "x-forwarded-for",
            "203.0.113.2, 203.0.113.3".parse().unwrap(),
        );
        h.append("x-forwarded-for", " ".parse().unwrap());
        let uri: http::Uri = "/".parse().unwrap();
        let rid = HeaderValue::from_static("abc");
        prepare_forwarded_headers(&mut h, &uri, "192.0.2.7:4000".parse().unwrap(), &rid, false);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(
            h["x-forwarded-for"],
            "198.51.100.1, 203.0.113.2, 203.0.113.3, 192.0.2.7"
        );
    }

    #[test]
    fn h2_cookie_fields_become_one() {
        let mut h = HeaderMap::new();
        join_cookies(&mut h);
        assert!(h.get("cookie").is_none());
        h.append("cookie", "a=1".parse().unwrap());
        join_cookies(&mut h);
        assert_eq!(h["cookie"], "a=1");
        h.append("cookie", "b=2".parse().unwrap());
        h.append("cookie", "c=3; d=4".parse().unwrap());
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2; c=3; d=4");
    }

    #[test]
    fn host_comes_from_the_h2_authority() {
        let mut h = HeaderMap::new();
        let uri: http::Uri = "http://example.org:8080/x".parse().unwrap();
        let rid = HeaderValue::from_static("abc");
        prepare_forwarded_headers(&mut h, &uri, "[::1]:4000".parse().unwrap(), &rid, false);
        assert_eq!(h["host"], "example.org:8080");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    /// Found by the `proxy_request` fuzz target: absolute-form with an
    /// empty path used to give the envelope the target `?b=1`.
    #[test]
    fn targets_are_always_origin_form() {
        for (target, expected) in [
            ("st://a?b=1", "/?b=1"),
            ("http://example.com", "/"),
            ("http://example.com/x/y?z", "/x/y?z"),
            ("/plain?q=1", "/plain?q=1"),
            ("*", "*"),
        ] {
            let uri: http::Uri = target.parse().unwrap();
            let origin = origin_form(&uri);
            assert_eq!(origin, expected, "{target}");
            assert!(
                origin.parse::<http::Uri>().is_ok(),
                "{origin} does not parse"
            );
        }
    }

    #[test]
    fn request_ids_must_be_visible_ascii() {
        assert!(usable_request_id(&HeaderValue::from_static("req-1")));
        assert!(!usable_request_id(&HeaderValue::from_static("")));
        assert!(!usable_request_id(&HeaderValue::from_static("a b")));
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(!usable_request_id(&HeaderValue::from_str(&long).unwrap()));
    }
}
