//! Requests refused before they are queued, by the rule each breaks:
//! `Host` (RFC 9112 §3.2, RFC 9113 §8.3.1), transfer codings (RFC 9112
//! §6.1), dot segments in the path (RFC 3986 §5.2.4).

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

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

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
