//! TLS termination with rustls: a certificate chain and private key from
//! PEM files, offered with ALPN `h2` and `http/1.1` (RFC 7301), and
//! reloaded from the same files on demand (the binary does it on SIGHUP).
//!
//! A reload swaps the certificate new handshakes get; connections already
//! open keep theirs, so none is dropped. A reload that fails (a file
//! missing or half-written, a key that does not match its certificate)
//! keeps the pair in use and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Marks a request that arrived over a TLS connection this proxy
/// terminated (a request extension): its `X-Forwarded-Proto` is `https`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientTls;

/// Why a certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("TLS certificate {cert} and key {key}: {problem}")]
pub struct TlsError {
    cert: String,
    key: String,
    problem: String,
}

/// The proxy's certificate and key: the files they come from and the pair
/// in use. Share it (an `Arc`) between [`ProxyConfig::tls`](crate::ProxyConfig::tls)
/// and whatever calls [`reload`](Self::reload).
#[derive(Debug)]
pub struct TlsCerts {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl TlsCerts {
    /// Loads the certificate chain (PEM, the server's certificate first)
    /// and its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    ///
    /// Errors: a file that cannot be read, holds no certificate or no key,
    /// or a key that does not match the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair = read_pair(cert, key, &provider)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            current: RwLock::new(Arc::new(pair)),
        }))
    }

    /// Reads both files again; new handshakes get the new pair, open
    /// connections keep theirs. On error the pair in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = read_pair(&self.cert, &self.key, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(pair);
        Ok(())
    }

    /// The server configuration: TLS 1.2 and 1.3, no client certificates,
    /// ALPN `h2` then `http/1.1`, the certificate resolved per handshake.
    pub(crate) fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| self.error(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(Arc::clone(self))));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    fn error(&self, problem: String) -> TlsError {
        TlsError {
            cert: self.cert.display().to_string(),
            key: self.key.display().to_string(),
            problem,
        }
    }
}

fn read_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let error = |problem: String| TlsError {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        problem,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| error(format!("cannot read the certificate: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("the certificate file: {e}")))?;
    if chain.is_empty() {
        return Err(error(
            "the certificate file holds no certificate".to_owned(),
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| error(format!("cannot read a private key: {e}")))?;
    CertifiedKey::from_der(chain, private, provider)
        .map_err(|e| error(format!("the key does not fit the certificate: {e}")))
}

/// Hands each handshake the pair in use.
#[derive(Debug)]
struct Resolver(Arc<TlsCerts>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .0
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        ))
    }
}
