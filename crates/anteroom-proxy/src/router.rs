//! Which queue a request goes to: the routes in order (host, then path
//! prefix; the first match wins), then the default queue if there is one.

use std::sync::Arc;

use http::Request;

use crate::handler::State;

/// One route's match and where it leads.
struct Route {
    host: Option<String>,
    path_prefix: Option<String>,
    target: Arc<State>,
}

/// The routes of one proxy.
pub(crate) struct Router {
    routes: Vec<Route>,
    default: Option<Arc<State>>,
}

impl Router {
    pub(crate) fn new(default: Option<Arc<State>>) -> Self {
        Self {
            routes: Vec::new(),
            default,
        }
    }

    pub(crate) fn add(
        &mut self,
        host: Option<String>,
        path_prefix: Option<String>,
        target: Arc<State>,
    ) {
        self.routes.push(Route {
            host: host.map(|h| h.to_ascii_lowercase()),
            path_prefix,
            target,
        });
    }

    /// Every queue state, routes first, each once per route.
    pub(crate) fn states(&self) -> impl Iterator<Item = &Arc<State>> {
        self.routes
            .iter()
            .map(|r| &r.target)
            .chain(self.default.as_ref())
    }

    /// The state serving `req`, or `None` (answer 404).
    pub(crate) fn pick<B>(&self, req: &Request<B>) -> Option<&Arc<State>> {
        let host = request_host(req);
        let path = req.uri().path();
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
    }
}

/// The request's host without port: the `Host` header, or the authority
/// of an HTTP/2 (or absolute-form) request.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = req
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))?;
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
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
    use super::strip_port;

    #[test]
    fn ports_are_ignored() {
        assert_eq!(strip_port("api.example.com:8080"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("127.0.0.1"), "127.0.0.1");
    }
}
