//! Which queue a request goes to: the routes in order (host, then path
//! prefix; the first match wins), then the default queue if there is one.

use std::borrow::Cow;
use std::sync::Arc;

use http::Request;
use http::header::HeaderValue;

use crate::canary::Split;
use crate::handler::State;

/// One route's match and where it leads.
struct Route {
    host: Option<String>,
    path_prefix: Option<String>,
    target: Target,
}

/// A queue, and the share of its requests sent to a canary queue.
pub(crate) struct Target {
    pub(crate) state: Arc<State>,
    pub(crate) canary: Option<Split>,
}

/// Where one request goes: its queue's state, and a cookie that pins
/// its client to the side of a canary split it drew.
pub(crate) struct Picked<'a> {
    pub(crate) state: &'a Arc<State>,
    pub(crate) set_cookie: Option<HeaderValue>,
}

/// The routes of one proxy.
pub(crate) struct Router {
    routes: Vec<Route>,
    default: Option<Target>,
}

impl Router {
    pub(crate) fn new(default: Option<Target>) -> Self {
        Self {
            routes: Vec::new(),
            default,
        }
    }

    pub(crate) fn add(
        &mut self,
        host: Option<String>,
        path_prefix: Option<String>,
        target: Target,
    ) {
        self.routes.push(Route {
            host: host.map(|h| h.to_ascii_lowercase()),
            path_prefix,
            target,
        });
    }

    /// Every target, routes first, then the default queue's.
    fn targets(&self) -> impl Iterator<Item = &Target> {
        self.routes
            .iter()
            .map(|r| &r.target)
            .chain(self.default.as_ref())
    }

    /// Every queue state, canary queues' included, each once per route.
    pub(crate) fn states(&self) -> impl Iterator<Item = &Arc<State>> {
        self.targets()
            .flat_map(|t| std::iter::once(&t.state).chain(t.canary.as_ref().map(|c| &c.target)))
    }

    /// Every canary split, with the queue it splits from.
    pub(crate) fn splits(&self) -> impl Iterator<Item = (&str, &Split)> {
        self.targets()
            .filter_map(|t| Some((t.state.queue.as_str(), t.canary.as_ref()?)))
    }

    /// The state serving `req`, or `None` (answer 404). Path prefixes are
    /// matched against the normalised path ([`normalize_path`]), so
    /// `/public/../admin/` is routed as `/admin/`, as the app will read
    /// it; the request goes on with its target as sent.
    pub(crate) fn pick<B>(&self, req: &Request<B>) -> Option<Picked<'_>> {
        let host = request_host(req);
        let path = normalize_path(req.uri().path());
        self.routes
            .iter()
            .find(|route| {
                route
                    .host
                    .as_deref()
                    .is_none_or(|h| host.is_some_and(|rh| rh.eq_ignore_ascii_case(h)))
                    && route
                        .path_prefix
                        .as_deref()
                        .is_none_or(|p| path.starts_with(p))
            })
            .map(|route| &route.target)
            .or(self.default.as_ref())
            .map(|target| match &target.canary {
                None => Picked {
                    state: &target.state,
                    set_cookie: None,
                },
                Some(split) => {
                    let choice = split.choose(req);
                    Picked {
                        state: if choice.canary {
                            &split.target
                        } else {
                            &target.state
                        },
                        set_cookie: choice.set_cookie,
                    }
                }
            })
    }
}

/// The request's host without port: the target's authority (an HTTP/2
/// `:authority`, or an absolute-form target, which replaces `Host`: RFC
/// 9112 §3.2.2), else the `Host` header; the same host the app is given.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
    })?;
    Some(strip_port(raw))
}

/// `path` as routes see it, which is how apps read it: percent-encoded
/// unreserved characters and `%2F` decoded (WSGI and Rack decode an
/// encoded slash too), other hex digits upper-cased (RFC 3986 §6.2.2),
/// `.` and `..` segments removed (§5.2.4; the proxy refuses targets that
/// have them, see `handler::has_dot_segments`), runs of `/` merged (as
/// nginx's `merge_slashes`). Borrowed when there is nothing to do.
pub(crate) fn normalize_path(path: &str) -> Cow<'_, str> {
    if !path.contains(['%', '.']) && !path.contains("//") {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (hi * 16 + lo) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'/') {
                    decoded.push(c);
                } else {
                    decoded.push(b'%');
                    decoded.extend(bytes[i + 1..i + 3].iter().map(u8::to_ascii_uppercase));
                }
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    // Only ASCII was decoded and non-ASCII bytes were copied whole.
    let decoded = String::from_utf8(decoded).unwrap_or_else(|_| path.to_owned());
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/') {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// `host` (a `Host` value or an authority) without its port; an IPv6
/// literal loses its brackets too.
pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::{normalize_path, strip_port};

    #[test]
    fn paths_are_normalised_for_routing() {
        for (raw, normal) in [
            ("/api/x", "/api/x"),
            ("/public/../admin/x", "/admin/x"),
            ("/public/./../admin/", "/admin/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/../../admin", "/admin"),
            ("//admin///x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/%2e%2E/admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/a%2fb", "/a/b"),
            ("/status%2F418", "/status/418"),
            ("/a%3fb", "/a%3Fb"),
            ("/caf\u{e9}/../x", "/x"),
            ("/x%", "/x%"),
            ("/x%4", "/x%4"),
            ("/x%zz", "/x%zz"),
            ("/.hidden/file.txt", "/.hidden/file.txt"),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw}");
        }
    }

    #[test]
    fn ports_are_ignored() {
        assert_eq!(strip_port("api.example.com:8080"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("127.0.0.1"), "127.0.0.1");
    }
}
