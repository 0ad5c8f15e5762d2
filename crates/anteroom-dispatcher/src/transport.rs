//! How a dispatcher reaches its upstream: plain TCP (`http://HOST:PORT`),
//! TLS over TCP (`https://HOST:PORT`, rustls through hyper-rustls, the
//! system's roots or a CA file), or a Unix domain socket (`unix:/PATH`,
//! through hyperlocal), as puma, gunicorn and uvicorn are often run behind
//! nginx. Each is hyper-util's pooled client over its connector.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Uri};
use hyper_rustls::{ConfigBuilderExt, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioExecutor;
use hyperlocal::UnixConnector;

use crate::error::{UpstreamError, UpstreamKind};

/// Where and how the upstream listens.
#[derive(Clone)]
pub(crate) enum Transport {
    /// `http://`: TCP to the authority.
    Tcp(Authority),
    /// `https://`: TLS to the authority, verified against `config`'s roots.
    Tls(Authority, Arc<rustls::ClientConfig>),
    /// `unix:/PATH`: the socket at the path.
    Unix(PathBuf),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tcp(a) => write!(f, "http://{a}"),
            Transport::Tls(a, _) => write!(f, "https://{a}"),
            Transport::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// TLS settings for `https://` upstreams: the roots certificates are
/// verified against (RFC 5280 path validation, rustls's webpki), and the
/// name checked is the URL's host (RFC 6125).
pub(crate) fn tls_config(
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
    let bad = |why: String| UpstreamError::from(UpstreamKind::Tls(why));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?;
    let config = match ca_file {
        Some(path) => {
            use rustls_pki_types::CertificateDer;
            use rustls_pki_types::pem::PemObject;
            let shown = path.display();
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(format!("cannot read CA file {shown}: {e}")))?;
            for cert in certs {
                let cert = cert.map_err(|e| bad(format!("CA file {shown}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("CA file {shown}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad(format!("CA file {shown} holds no certificate")));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .with_native_roots()
            .map_err(|e| bad(format!("cannot load the system's CA certificates: {e}")))?
            .with_no_client_auth(),
    };
    // No ALPN is offered (hyper-rustls sets none for HTTP/1 only): the
    // server then speaks HTTP/1.1, which the pool does.
    Ok(Arc::new(config))
}

impl Transport {
    /// The transport `url` names, with its path prefix (`""` for none):
    /// `http://HOST[:PORT][/PREFIX]`, `https://HOST[:PORT][/PREFIX]`
    /// (`tls` made by [`tls_config`] on first need) or `unix:/PATH`.
    pub(crate) fn parse(
        url: &str,
        ca_file: Option<&Path>,
    ) -> Result<(Self, String), UpstreamError> {
        let invalid = || UpstreamError::from(UpstreamKind::Url(anteroom_redis::redact_url(url)));
        if let Some(path) = url.strip_prefix("unix:") {
            // `unix:/run/app.sock`, as nginx and gunicorn write it; also
            // `unix:///run/app.sock`.
            let path = path.strip_prefix("//").unwrap_or(path);
            // Absolute, and within `sun_path` (108 bytes with its NUL on
            // Linux): a longer one could never connect.
            let problem = if !path.starts_with('/') {
                Some("the socket's path must be absolute: unix:/run/app.sock")
            } else if path.len() > 107 {
                Some("the socket's path must be under 108 bytes (the kernel's sun_path)")
            } else if path.contains('\0') {
                Some("the socket's path holds a NUL byte")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(UpstreamKind::UnixPath(url.to_owned(), problem).into());
            }
            return Ok((Transport::Unix(PathBuf::from(path)), String::new()));
        }
        let uri: Uri = url.parse().map_err(|_| invalid())?;
        let authority = uri.authority().cloned().ok_or_else(invalid)?;
        if authority.as_str().contains('@') {
            return Err(UpstreamKind::Credentials(anteroom_redis::redact_url(url)).into());
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let transport = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => Transport::Tcp(authority),
            Some(s) if *s == Scheme::HTTPS => Transport::Tls(authority, tls_config(ca_file)?),
            _ => return Err(invalid()),
        };
        Ok((transport, prefix))
    }

    /// The absolute URI for `path_and_query` on this upstream, as its
    /// client expects it (for a Unix socket, hyperlocal's form).
    pub(crate) fn uri(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        let build = |scheme: Scheme, authority: &Authority| {
            Uri::builder()
                .scheme(scheme)
                .authority(authority.clone())
                .path_and_query(path_and_query)
                .build()
                .map_err(|e| UpstreamError::from(UpstreamKind::Uri(e)))
        };
        match self {
            Transport::Tcp(a) => build(Scheme::HTTP, a),
            Transport::Tls(a, _) => build(Scheme::HTTPS, a),
            Transport::Unix(path) => {
                // hyperlocal's form (its `Uri::new` panics on a target that
                // does not parse): the socket's path in hex as the host,
                // which its connector decodes.
                let hex: String = path
                    .as_os_str()
                    .as_encoded_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let bad =
                    |e: http::uri::InvalidUri| UpstreamError::from(UpstreamKind::Uri(e.into()));
                let authority: Authority = format!("{hex}:0").parse().map_err(bad)?;
                build(Scheme::from_str("unix").map_err(bad)?, &authority)
            }
        }
    }
}

/// The pooled client for one transport.
pub(crate) enum Pool<B> {
    Tcp(Client<HttpConnector, B>),
    Tls(Client<HttpsConnector<HttpConnector>, B>),
    Unix(Client<UnixConnector, B>),
}

// By hand: derived, they would ask the body type to be `Clone` too.
impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        match self {
            Pool::Tcp(c) => Pool::Tcp(c.clone()),
            Pool::Tls(c) => Pool::Tls(c.clone()),
            Pool::Unix(c) => Pool::Unix(c.clone()),
        }
    }
}

impl<B> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pool::Tcp(_) => "Pool::Tcp",
            Pool::Tls(_) => "Pool::Tls",
            Pool::Unix(_) => "Pool::Unix",
        })
    }
}

/// How a [`Pool`] keeps connections.
pub(crate) struct PoolSettings {
    /// How long an idle connection is kept.
    pub(crate) idle_timeout: Duration,
    /// Most idle connections kept (0: a fresh connection per request).
    pub(crate) max_idle: usize,
    /// Most header fields in a response head.
    pub(crate) max_headers: usize,
}

impl<B> Pool<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool for `transport`: 5 s to connect over TCP, no Nagle delay.
    pub(crate) fn new(transport: &Transport, settings: &PoolSettings) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(settings.max_idle)
            .http1_max_headers(settings.max_headers);
        let tcp = || {
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(Duration::from_secs(5)));
            connector.set_nodelay(true);
            connector
        };
        match transport {
            Transport::Tcp(_) => Pool::Tcp(builder.build(tcp())),
            Transport::Tls(_, config) => {
                let mut http = tcp();
                // hyper-rustls connects `https://` URIs only.
                http.enforce_http(false);
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((**config).clone())
                    .https_only()
                    .enable_http1()
                    .wrap_connector(http);
                Pool::Tls(builder.build(connector))
            }
            Transport::Unix(_) => Pool::Unix(builder.build(UnixConnector)),
        }
    }

    /// Sends `req` (its URI made by [`Transport::uri`]).
    pub(crate) fn request(&self, req: Request<B>) -> ResponseFuture {
        match self {
            Pool::Tcp(client) => client.request(req),
            Pool::Tls(client) => client.request(req),
            Pool::Unix(client) => client.request(req),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_transport() {
        let (t, prefix) = Transport::parse("unix:/run/app/puma.sock", None).unwrap();
        assert!(matches!(&t, Transport::Unix(p) if p == Path::new("/run/app/puma.sock")));
        assert_eq!(prefix, "");
        let (t, _) = Transport::parse("unix:///tmp/a.sock", None).unwrap();
        assert!(matches!(&t, Transport::Unix(p) if p == Path::new("/tmp/a.sock")));
        let (t, _) = Transport::parse("unix:/tmp/b.sock", None).unwrap();
        assert!(matches!(&t, Transport::Unix(p) if p == Path::new("/tmp/b.sock")));
        let (t, prefix) = Transport::parse("http://127.0.0.1:3000/app/", None).unwrap();
        assert!(matches!(t, Transport::Tcp(_)));
        assert_eq!(prefix, "/app");
        let long = format!("unix:/{}", "a".repeat(107));
        for bad in [
            "unix:",
            "ftp://x",
            "backend:80",
            "/path",
            "unix:/a\0b",
            "unix:app.sock",
            "unix://run/a.sock",
            &long,
        ] {
            assert!(Transport::parse(bad, None).is_err(), "{bad:?} accepted");
        }
        assert!(Transport::parse("https://u:p@x:1", None).is_err());
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let missing = Path::new("/nonexistent/ca.pem");
        let err = tls_config(Some(missing)).unwrap_err();
        assert!(err.is_config(), "{err}");
        let empty = std::env::temp_dir().join(format!("anteroom-empty-ca-{}", std::process::id()));
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let err = tls_config(Some(&empty)).unwrap_err();
        assert!(err.to_string().contains("holds no certificate"), "{err}");
        let _ = std::fs::remove_file(&empty);
    }

    #[test]
    fn unix_uris_carry_the_socket_and_the_target() {
        let (t, _) = Transport::parse("unix:/run/app.sock", None).unwrap();
        let uri = t.uri("/orders?id=7").unwrap();
        assert_eq!(uri.scheme_str(), Some("unix"));
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/orders?id=7");
        // hyperlocal's own form, which its connector decodes.
        let theirs: Uri = hyperlocal::Uri::new("/run/app.sock", "/orders?id=7").into();
        assert_eq!(uri, theirs);
        // A target too long for a URI is an error, not a panic.
        let long = format!("/{}", "x".repeat(70_000));
        assert!(t.uri(&long).is_err());
    }
}
