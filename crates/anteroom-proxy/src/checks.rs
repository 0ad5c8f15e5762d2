//! Requests refused before they are queued, by the rule each breaks:
//! `Host` (RFC 9112 §3.2, RFC 9113 §8.3.1), transfer codings (RFC 9112
//! §6.1), dot segments in the path (RFC 3986 §5.2.4), upgrades (RFC 9110
//! §7.8, RFC 6455 §4.2.1).

use http::header::{self, HeaderMap, HeaderValue};

use crate::error::ProxyError;

/// Whether `path` has a `.` or `..` segment, plain or percent-encoded
/// (`%2e`), between `/` or `%2F`. Clients resolve them before sending (RFC
/// 3986 §5.2.4) and apps read them differently (some resolve them, some
/// serve them literally), so the path a route matched and the path the app
/// reads could differ: such targets get 400.
pub(crate) fn has_dot_segments(path: &str) -> bool {
    if !path.contains('.') && !path.contains("%2") {
        return false;
    }
    let lower = path
        .to_ascii_lowercase()
        .replace("%2e", ".")
        .replace("%2f", "/");
    lower
        .split('/')
        .any(|segment| segment == "." || segment == "..")
}

/// Whether `host` names the same host and port as `authority`, after RFC
/// 3986 §6.2 normalisation: case, a trailing dot, the scheme's default port.
pub(crate) fn same_origin_host(
    authority: &http::uri::Authority,
    host: &HeaderValue,
    uri: &http::Uri,
) -> bool {
    let Some(host) = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
    else {
        return false;
    };
    let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    let name = |a: &http::uri::Authority| a.host().trim_end_matches('.').to_ascii_lowercase();
    name(authority) == name(&host)
        && authority.port_u16().unwrap_or(default_port) == host.port_u16().unwrap_or(default_port)
}

/// RFC 9112 §3.2: a server answers 400 to an HTTP/1.1 request without a
/// `Host` field, and to any request with more than one `Host` line or a
/// `Host` that is not `host[:port]` (an empty value is allowed, for targets
/// without an authority). HTTP/1.0 may omit it; HTTP/2 carries
/// `:authority` instead and may omit it too, but a `Host` beside an
/// `:authority` that names another host is malformed (RFC 9113 §8.3.1).
pub(crate) fn check_host(
    headers: &HeaderMap,
    version: http::Version,
    uri: &http::Uri,
) -> Result<(), &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err("more than one Host field (RFC 9112 section 3.2)"),
        (Some(host), None)
            if version >= http::Version::HTTP_2
                && uri
                    .authority()
                    .is_some_and(|a| !same_origin_host(a, host, uri)) =>
        {
            Err("Host differs from :authority (RFC 9113 section 8.3.1)")
        }
        (None, _) if version == http::Version::HTTP_11 => {
            Err("HTTP/1.1 request without a Host field (RFC 9112 section 3.2)")
        }
        (Some(host), None) => {
            let valid = host.is_empty()
                || host
                    .to_str()
                    .ok()
                    .and_then(|h| h.parse::<http::uri::Authority>().ok())
                    .is_some_and(|a| {
                        // host [ ":" port ], port = *DIGIT (RFC 3986 §3.2.3)
                        let port = a.as_str().strip_prefix(a.host());
                        !a.as_str().contains('@')
                            && port.is_some_and(|p| {
                                p.is_empty()
                                    || p.strip_prefix(':')
                                        .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
                            })
                    });
            if valid {
                Ok(())
            } else {
                Err("invalid Host field (RFC 9112 section 3.2)")
            }
        }
        (None, _) => Ok(()),
    }
}

/// RFC 9112 §6.1: `chunked` is the only transfer coding the proxy
/// implements, so any other gets 501, and `chunked` applied twice gets
/// 400. hyper has already refused (400) a `Transfer-Encoding` whose last
/// coding is not `chunked`, and one in an HTTP/1.0 request, and dropped a
/// `Content-Length` sent beside it (§6.3; such a connection is closed after
/// the response). HTTP/2 has no `Transfer-Encoding` (RFC 9113 §8.2.2).
pub(crate) fn check_transfer_coding(headers: &HeaderMap) -> Result<(), ProxyError> {
    let codings: Vec<String> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| String::from_utf8_lossy(c).trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    let Some((_last, before)) = codings.split_last() else {
        return Ok(());
    };
    match before.iter().find(|c| c.as_str() != "chunked") {
        Some(other) => Err(ProxyError::UnsupportedCoding(other.clone())),
        None if !before.is_empty() => Err(ProxyError::ChunkedTwice),
        None => Ok(()),
    }
}

/// RFC 9110 §7.8 and RFC 6455 §4.2.1: what an `Upgrade` in the request
/// asks for. `Ok(None)`: nothing (no `Upgrade`, or an HTTP/1.0 request,
/// whose `Upgrade` a server must ignore; HTTP/2 has none). `Ok(Some(key))`:
/// a valid WebSocket opening handshake, with its `Sec-WebSocket-Key`.
/// Anything else is refused rather than passed on as a plain request: an
/// upgrade to another protocol (`h2c`, `TLS/1.0`: 501), a WebSocket
/// handshake that is not a GET, lacks `Connection: upgrade` or a key of 16
/// bytes in base64, or carries a body (400), or names a version other than
/// 13 (426).
pub(crate) fn check_upgrade(
    method: &http::Method,
    version: http::Version,
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, ProxyError> {
    use base64::Engine as _;
    if version != http::Version::HTTP_11 || !headers.contains_key(header::UPGRADE) {
        return Ok(None);
    }
    let tokens = |name| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
    };
    let protocols = tokens(header::UPGRADE);
    // A protocol is `name[/version]` (RFC 9110 §7.8); WebSocket's has no
    // version.
    if !protocols.iter().any(|p| p == "websocket") {
        return Err(ProxyError::UpgradeNotSupported(protocols.join(", ")));
    }
    if method != http::Method::GET {
        return Err(ProxyError::BadHandshake("the method is not GET"));
    }
    if !tokens(header::CONNECTION).iter().any(|t| t == "upgrade") {
        return Err(ProxyError::BadHandshake("Connection does not list upgrade"));
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(ProxyError::BadHandshake("the handshake has a body"));
    }
    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes() == b"13" => {}
        (None, _) => return Err(ProxyError::BadHandshake("no Sec-WebSocket-Version")),
        (Some(v), _) => {
            let text = String::from_utf8_lossy(v.as_bytes()).into_owned();
            return Err(ProxyError::WebSocketVersion(text));
        }
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(key), None)
            if base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .is_ok_and(|k| k.len() == 16) =>
        {
            Ok(Some(key.clone()))
        }
        _ => Err(ProxyError::BadHandshake(
            "Sec-WebSocket-Key is not one value of 16 bytes in base64",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn upgrades_rfc_6455_and_9110_allow_and_those_they_do_not() {
        use http::{Method, Version};
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ws = [
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", key),
        ];
        let check = |method: Method, version, fields: &[(&str, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in fields {
                headers.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            check_upgrade(&method, version, &headers).map_err(|e| e.failure().status())
        };
        let with = |name: &str, value: &str| {
            let mut fields: Vec<(&str, &str)> =
                ws.iter().filter(|(n, _)| *n != name).copied().collect();
            let (name, value) = (name.to_owned(), value.to_owned());
            move |method: Method| {
                let mut all: Vec<(&str, &str)> = std::mem::take(&mut fields);
                if !value.is_empty() {
                    all.push((name.as_str(), value.as_str()));
                }
                check(method, Version::HTTP_11, &all)
            }
        };
        assert_eq!(
            check(Method::GET, Version::HTTP_11, &ws),
            Ok(Some(HeaderValue::from_static(key)))
        );
        assert_eq!(
            with("upgrade", "WebSocket")(Method::GET),
            Ok(Some(HeaderValue::from_static(key)))
        );
        assert_eq!(
            with("upgrade", "h2c, websocket")(Method::GET),
            Ok(Some(HeaderValue::from_static(key)))
        );
        // No Upgrade, or HTTP/1.0 (whose Upgrade a server must ignore).
        assert_eq!(check(Method::GET, Version::HTTP_11, &[]), Ok(None));
        assert_eq!(check(Method::GET, Version::HTTP_10, &ws), Ok(None));
        // Other protocols: 501, never a plain request.
        assert_eq!(with("upgrade", "h2c")(Method::GET), Err(501));
        assert_eq!(with("upgrade", "TLS/1.0")(Method::GET), Err(501));
        assert_eq!(with("upgrade", "websocket/2")(Method::GET), Err(501));
        // Handshakes RFC 6455 section 4.2.1 refuses.
        assert_eq!(check(Method::POST, Version::HTTP_11, &ws), Err(400));
        assert_eq!(with("connection", "keep-alive")(Method::GET), Err(400));
        assert_eq!(with("sec-websocket-key", "")(Method::GET), Err(400));
        assert_eq!(with("sec-websocket-key", "c2hvcnQ=")(Method::GET), Err(400));
        assert_eq!(
            with("sec-websocket-key", "not base64 at all!!!!!==")(Method::GET),
            Err(400)
        );
        assert_eq!(with("sec-websocket-version", "")(Method::GET), Err(400));
        assert_eq!(with("sec-websocket-version", "8")(Method::GET), Err(426));
        let mut twice = ws.to_vec();
        twice.push(("sec-websocket-key", key));
        assert_eq!(check(Method::GET, Version::HTTP_11, &twice), Err(400));
        let mut body = ws.to_vec();
        body.push(("content-length", "5"));
        assert_eq!(check(Method::GET, Version::HTTP_11, &body), Err(400));
        let mut chunked = ws.to_vec();
        chunked.push(("transfer-encoding", "chunked"));
        assert_eq!(check(Method::GET, Version::HTTP_11, &chunked), Err(400));
    }

    #[test]
    fn host_rules_of_rfc_9112() {
        let req = |version, hosts: &[&str]| {
            let mut b = Request::get("/x").version(version);
            for h in hosts {
                b = b.header("host", *h);
            }
            b.body(()).unwrap()
        };
        use http::Version;
        let check = |r: Request<()>| check_host(r.headers(), r.version(), r.uri());
        assert!(check(req(Version::HTTP_11, &["example.org"])).is_ok());
        assert!(check(req(Version::HTTP_11, &["example.org:8080"])).is_ok());
        assert!(check(req(Version::HTTP_11, &["[::1]:80"])).is_ok());
        assert!(check(req(Version::HTTP_11, &[""])).is_ok());
        assert!(check(req(Version::HTTP_10, &[])).is_ok());
        assert!(check(req(Version::HTTP_2, &[])).is_ok());
        let h2 = |authority: &str, host: &str| {
            let r = Request::get(format!("http://{authority}/x"))
                .version(Version::HTTP_2)
                .header("host", host)
                .body(())
                .unwrap();
            check_host(r.headers(), r.version(), r.uri())
        };
        assert!(h2("example.org", "example.org").is_ok());
        assert!(h2("example.org:8080", "Example.ORG:8080").is_ok());
        assert!(h2("example.org", "other.example").is_err());
        assert!(h2("example.org", "example.org:81").is_err());
        assert!(h2("example.org:80", "example.org").is_ok());
        assert!(h2("example.org", "EXAMPLE.org.:80").is_ok());
        assert!(h2("example.org", "a b").is_err());
        for (version, hosts) in [
            (Version::HTTP_11, &[][..]),
            (Version::HTTP_11, &["a.example", "b.example"][..]),
            (Version::HTTP_10, &["a.example", "a.example"][..]),
            (Version::HTTP_11, &["a b"][..]),
            (Version::HTTP_11, &["user@a.example"][..]),
            (Version::HTTP_11, &["a.example/path"][..]),
            (Version::HTTP_11, &["a.example:port"][..]),
        ] {
            assert!(check(req(version, hosts)).is_err(), "{version:?} {hosts:?}");
        }
    }

    #[test]
    fn dot_segments_are_found_however_spelled() {
        for path in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/.",
            "/a/%2e%2E/b",
            "/a%2f..%2fb",
            "/%2e/x",
        ] {
            assert!(has_dot_segments(path), "{path}");
        }
        for path in [
            "/a/b",
            "/.well-known/x",
            "/a/..b/c",
            "/file.tar.gz",
            "/a%2fb",
            "/...",
        ] {
            assert!(!has_dot_segments(path), "{path}");
        }
    }

    #[test]
    fn only_chunked_is_implemented() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, v.parse().unwrap());
            }
            check_transfer_coding(&h)
        };
        assert!(with(&[]).is_ok());
        assert!(with(&["chunked"]).is_ok());
        assert!(with(&["Chunked"]).is_ok());
        assert!(matches!(
            with(&["gzip, chunked"]),
            Err(ProxyError::UnsupportedCoding(c)) if c == "gzip"
        ));
        assert!(matches!(
            with(&["deflate", "chunked"]),
            Err(ProxyError::UnsupportedCoding(c)) if c == "deflate"
        ));
        assert!(matches!(
            with(&["chunked", "chunked"]),
            Err(ProxyError::ChunkedTwice)
        ));
        assert!(matches!(
            with(&["chunked, gzip, chunked"]),
            Err(ProxyError::UnsupportedCoding(c)) if c == "gzip"
        ));
    }
}
