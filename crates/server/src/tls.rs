//! TLS termination with rustls: PEM certificate and key files, ALPN for
//! HTTP/2 and HTTP/1.1, and reloading of both files (on SIGHUP in the
//! binary) without touching established connections.
//!
//! The certificate is served through a resolver holding the current
//! [`CertifiedKey`]; a reload swaps it, so handshakes after the reload
//! present the new certificate while open connections carry on.

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Largest PEM file read (a chain of a few certificates is a few KiB).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read certificate file {}: {source}", path.display())]
    ReadCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no PEM certificate (BEGIN CERTIFICATE) in {}", path.display())]
    NoCert { path: PathBuf },
    #[error("cannot read private key file {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no usable PEM private key (PKCS#8, PKCS#1 or SEC1) in {}: {message}", path.display())]
    BadKey { path: PathBuf, message: String },
    #[error("certificate {} does not match key {}: {source}", cert.display(), key.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS setup failed: {0}")]
    Setup(rustls::Error),
}

impl TlsError {
    /// Whether the key file (rather than the certificate) is at fault.
    pub fn is_key_error(&self) -> bool {
        matches!(self, TlsError::ReadKey { .. } | TlsError::BadKey { .. })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_PEM_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_PEM_BYTES} bytes"
        )));
    }
    Ok(buf)
}

/// Reads a PEM certificate chain and its private key and checks that they
/// belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    load_with(&provider(), cert, key)
}

fn load_with(provider: &CryptoProvider, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read_pem(cert).map_err(|source| TlsError::ReadCert {
        path: cert.to_owned(),
        source,
    })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: cert.to_owned(),
        });
    }
    let key_pem = read_pem(key).map_err(|source| TlsError::ReadKey {
        path: key.to_owned(),
        source,
    })?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|source| match source {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        },
        other => TlsError::BadKey {
            path: key.to_owned(),
            message: other.to_string(),
        },
    })
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// The TLS side of the server's listeners: the rustls configuration and
/// the paths it reloads from. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TlsContext {
    inner: Arc<Inner>,
}

struct Inner {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Arc<CurrentCert>,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// Loads the certificate and key; ALPN offers `h2` then `http/1.1`.
    pub fn new(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        handshake_timeout: Duration,
    ) -> Result<TlsContext, TlsError> {
        let (cert_path, key_path) = (cert_path.into(), key_path.into());
        let provider = provider();
        let key = load_with(&provider, &cert_path, &key_path)?;
        let current = Arc::new(CurrentCert(RwLock::new(Arc::new(key))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsContext {
            inner: Arc::new(Inner {
                cert_path,
                key_path,
                provider,
                current,
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                handshake_timeout,
            }),
        })
    }

    /// Re-reads the certificate and key from the same paths. On success new
    /// handshakes use them; on failure the previous pair stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let i = &self.inner;
        let key = load_with(&i.provider, &i.cert_path, &i.key_path)?;
        *i.current.0.write() = Arc::new(key);
        Ok(())
    }

    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.inner.acceptor
    }

    /// A handshake not finished within this is dropped.
    pub fn handshake_timeout(&self) -> Duration {
        self.inner.handshake_timeout
    }

    pub fn cert_path(&self) -> &Path {
        &self.inner.cert_path
    }
}
