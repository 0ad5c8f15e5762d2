//! Forwarding to an existing HTTP server over a pooled keep-alive client
//! (over TCP, TLS or a Unix socket: `transport.rs`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::path::Path;

use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower::Service;

use crate::Body;
use crate::error::{UpstreamError, UpstreamKind};
use crate::health::HealthCheck;
use crate::transport::{Pool, PoolSettings, Transport};

/// Default of [`Upstream::idle_timeout`].
const DEFAULT_IDLE_TIMEOUT: Duration = crate::defaults::UPSTREAM_IDLE_TIMEOUT;

/// Default of [`Upstream::max_headers`]: well above hyper's 100, since nginx
/// limits an upstream's response head only by its size (`proxy_buffer_size`,
/// 4 or 8 KiB) and apps with many `Set-Cookie` or CSP fields exceed 100.
pub const DEFAULT_MAX_HEADERS: usize = 500;

/// A `tower::Service` that sends each request to an upstream HTTP/1.1
/// server over a pooled keep-alive client: over TCP (`http://`), TLS
/// (`https://`) or a Unix domain socket (`unix:/PATH`).
///
/// The request keeps its method, path, query, headers (including `Host`)
/// and body; only the scheme and authority change. A failure gives an
/// [`UpstreamError`]: the dispatcher puts a request the upstream never
/// received back at the front of the queue, and stops taking requests until
/// the [`health_check`](Self::health_check) passes again.
#[derive(Clone, Debug)]
pub struct Upstream {
    pool: Pool<Body>,
    transport: Transport,
    idle_timeout: Duration,
    max_headers: usize,
    prefix: String,
}

impl Upstream {
    /// An upstream at `url`: `http://HOST[:PORT][/PREFIX]` (the prefix is
    /// prepended to every request path), `https://HOST[:PORT][/PREFIX]`
    /// (verified against the system's CA certificates; see
    /// [`with_ca_file`](Self::with_ca_file)), or `unix:/PATH` for a server on a Unix
    /// domain socket.
    ///
    /// Errors ([`UpstreamError::is_config`]): another form, credentials in
    /// the URL, no usable system CA certificates for `https://`.
    pub fn new(url: &str) -> Result<Self, UpstreamError> {
        Self::with_ca_file(url, None)
    }

    /// As [`new`](Self::new), an `https://` upstream's certificate checked
    /// against the CA certificates in the PEM file at `ca_file` instead of
    /// the system's (which are then not loaded at all: a host without a
    /// system store can reach a private CA's upstream).
    ///
    /// Errors ([`UpstreamError::is_config`]): as [`new`](Self::new), a CA
    /// file that cannot be read or holds no certificate, or a CA file for
    /// an upstream that is not `https://`.
    pub fn with_ca_file(url: &str, ca_file: Option<&Path>) -> Result<Self, UpstreamError> {
        let (transport, prefix) = Transport::parse(url, ca_file)?;
        if ca_file.is_some() && !matches!(transport, Transport::Tls(..)) {
            return Err(UpstreamKind::Tls(format!(
                "a CA file is for https:// upstreams, not {transport:?}"
            ))
            .into());
        }
        Ok(Self {
            pool: pool_for(&transport, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_HEADERS),
            transport,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_headers: DEFAULT_MAX_HEADERS,
            prefix,
        })
    }

    fn rebuild(&mut self) {
        self.pool = pool_for(&self.transport, self.idle_timeout, self.max_headers);
    }

    /// How long an idle keep-alive connection to the upstream is kept for
    /// the next request (default 1 s). Keep it below the upstream's own
    /// idle timeout (gunicorn 2 s, Node and uvicorn 5 s, puma 20 s): a
    /// request written just as the upstream closes an idle connection may
    /// have been read, so only a request safe to repeat could be retried.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self.rebuild();
        self
    }

    /// Most header fields in a response head from the upstream (default
    /// [`DEFAULT_MAX_HEADERS`]); more is a 502. The whole head is also
    /// bounded by hyper's read buffer (about 400 KB).
    pub fn max_headers(mut self, max: usize) -> Self {
        self.max_headers = max.max(1);
        self.rebuild();
        self
    }

    /// How a dispatcher finds this upstream healthy again after a failure
    /// (pass it to
    /// [`DispatcherBuilder::health_check`](crate::DispatcherBuilder::health_check)):
    ///
    /// - `Some(path)`: `GET path` on the upstream server (the path as given,
    ///   not joined to the URL's prefix) must answer 2xx, over the
    ///   upstream's own transport. It is checked every interval, and the
    ///   dispatcher takes no request before the first check passes.
    /// - `None`: a connection to the upstream (TCP, or its Unix socket)
    ///   must open; tried at start and after a request failed, not while
    ///   healthy.
    ///
    /// Errors: [`UpstreamError::is_config`] when `path` is not an absolute
    /// path (`/up`, `/healthz?full=1`).
    pub fn health_check(&self, path: Option<&str>) -> Result<HealthCheck, UpstreamError> {
        match path {
            Some(path) => {
                let bad = || UpstreamError::from(UpstreamKind::HealthPath(path.to_owned()));
                if !path.starts_with('/') {
                    return Err(bad());
                }
                let _: PathAndQuery = path.parse().map_err(|_| bad())?;
                let uri = self.transport.uri(path).map_err(|_| bad())?;
                Ok(HealthCheck::get(uri, &self.transport))
            }
            None => Ok(match &self.transport {
                Transport::Unix(path) => HealthCheck::unix(path.clone()),
                Transport::Tcp(a) => HealthCheck::tcp(a.host(), a.port_u16().unwrap_or(80)),
                Transport::Tls(a, _) => HealthCheck::tcp(a.host(), a.port_u16().unwrap_or(443)),
            }),
        }
    }

    fn target(&self, original: &Uri) -> Result<Uri, UpstreamError> {
        let path = original.path_and_query().map_or("/", PathAndQuery::as_str);
        if self.prefix.is_empty() {
            self.transport.uri(path)
        } else {
            self.transport.uri(&format!("{}{}", self.prefix, path))
        }
    }
}

/// The keep-alive pool for `transport`, keeping idle connections
/// `idle_timeout` and taking at most `max_headers` response fields.
fn pool_for(transport: &Transport, idle_timeout: Duration, max_headers: usize) -> Pool<Body> {
    let settings = PoolSettings {
        idle_timeout,
        max_idle: usize::MAX,
        max_headers,
    };
    Pool::new(transport, &settings)
}

impl Service<Request<Body>> for Upstream {
    type Response = Response<Incoming>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let target = self.target(req.uri());
        let client = self.pool.clone();
        let unix = matches!(self.transport, Transport::Unix(_));
        Box::pin(async move {
            *req.uri_mut() = target?;
            if unix && !req.headers().contains_key(http::header::HOST) {
                // Else hyper would send the socket's encoded path.
                req.headers_mut().insert(
                    http::header::HOST,
                    http::HeaderValue::from_static("localhost"),
                );
            }
            // The pool speaks HTTP/1.1 whatever version the client used.
            *req.version_mut() = Version::HTTP_11;
            // A request that may switch protocols (a WebSocket handshake
            // served to this service by a hyper server with upgrades):
            // when the upstream answers 101, both upgraded connections are
            // joined, byte for byte, as any reverse proxy does.
            let downstream = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
            let mut resp = client
                .request(req)
                .await
                .map_err(|e| UpstreamError::from(UpstreamKind::Request(e)))?;
            if let Some(downstream) =
                downstream.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS)
            {
                let upstream = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    let joined = async {
                        let (down, up) = tokio::try_join!(downstream, upstream)?;
                        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                        tokio::io::copy_bidirectional(&mut down, &mut up).await?;
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                    };
                    if let Err(err) = joined.await {
                        tracing::debug!(error = %err, "upgraded upstream connection ended");
                    }
                });
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_prefix_and_keeps_query() {
        let up = Upstream::new("http://127.0.0.1:3000/app/").unwrap();
        let t = up.target(&"/orders?id=7".parse().unwrap()).unwrap();
        assert_eq!(t.to_string(), "http://127.0.0.1:3000/app/orders?id=7");
        let up = Upstream::new("http://backend:80").unwrap();
        let t = up.target(&"/".parse().unwrap()).unwrap();
        assert_eq!(t.to_string(), "http://backend:80/");
    }

    #[test]
    fn health_paths_must_be_absolute() {
        let up = Upstream::new("http://127.0.0.1:3000/app").unwrap();
        assert!(up.health_check(Some("/up")).is_ok());
        assert!(up.health_check(Some("/healthz?full=1")).is_ok());
        assert!(up.health_check(None).is_ok());
        for bad in ["up", "", "http://x/up", "/a b"] {
            assert!(
                up.health_check(Some(bad)).is_err_and(|e| e.is_config()),
                "{bad:?} accepted"
            );
        }
    }

    /// Sends a GET through an `Upstream` to `addr`; the error it fails with.
    async fn fail(addr: std::net::SocketAddr) -> UpstreamError {
        let mut up = Upstream::new(&format!("http://{addr}")).unwrap();
        let request = Request::get("/x").body(Body::default()).unwrap();
        up.call(request).await.expect_err("the request should fail")
    }

    /// A server that takes one connection, reads the request, then does
    /// `then` with the socket.
    async fn one_shot_server<F, Fut>(then: F) -> std::net::SocketAddr
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = socket.read(&mut buf).await.unwrap();
            assert!(
                buf[..n].starts_with(b"GET /x HTTP/1.1"),
                "the request arrived"
            );
            then(socket).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_refused_connection_was_not_delivered() {
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let err = fail(addr).await;
        assert!(err.is_not_delivered() && err.is_transport(), "{err:?}");
        assert_eq!(err.reason(), crate::FailureReason::Refused);
    }

    #[tokio::test]
    async fn a_connection_closed_after_the_request_may_have_run() {
        let addr = one_shot_server(|socket| async move { drop(socket) }).await;
        let err = fail(addr).await;
        assert!(err.is_transport() && !err.is_not_delivered(), "{err:?}");
        assert_eq!(err.reason(), crate::FailureReason::Closed);
    }

    #[tokio::test]
    async fn an_unparsable_response_is_the_apps_fault_not_the_connections() {
        use tokio::io::AsyncWriteExt;
        let addr = one_shot_server(|mut socket| async move {
            let _ = socket.write_all(b"this is not HTTP\r\n\r\n").await;
        })
        .await;
        let err = fail(addr).await;
        assert!(!err.is_transport() && !err.is_not_delivered(), "{err:?}");
    }

    #[test]
    fn rejects_non_http_urls() {
        for bad in ["backend:80", "/path", "ftp://x", "unix:"] {
            assert!(Upstream::new(bad).is_err(), "{bad} accepted");
        }
    }
}
