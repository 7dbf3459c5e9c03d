//! TLS for listeners: rustls with PEM files, ALPN h2 + http/1.1, TLS 1.2 minimum.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why a certificate/key pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable or not PEM.
    #[error("certificate {path}: {reason}")]
    Cert {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The key file is missing, unreadable or not PEM.
    #[error("private key {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the pair (a key that does not match the certificate, say).
    #[error("certificate and key do not make a usable pair: {0}")]
    Config(#[from] rustls::Error),
}

/// Load a certificate chain and key and build the server config.
pub fn server_config(cert_path: &str, key_path: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert_path.to_owned(),
            reason: "no certificate found in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Key {
        path: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    // TLS 1.2 and 1.3 only: the ring provider's defaults, which exclude everything older.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A listener's certificate and key, reloadable: new handshakes use the latest good pair;
/// a bad or half-written replacement keeps the previous one.
#[derive(Debug)]
pub struct CertStore {
    /// Certificate chain file.
    pub cert_path: String,
    /// Private key file.
    pub key_path: String,
    current: arc_swap::ArcSwap<ServerConfig>,
    /// Size and modification time of both files when last loaded (or last refused), so an
    /// unchanged pair is not parsed again on every reload trigger.
    seen: std::sync::Mutex<Fingerprint>,
}

type Fingerprint = [Option<(u64, std::time::SystemTime)>; 2];

impl CertStore {
    /// Load the pair; fails like [`server_config`].
    pub fn open(cert_path: &str, key_path: &str) -> Result<Self, TlsError> {
        let seen = fingerprint(cert_path, key_path);
        Ok(Self {
            current: arc_swap::ArcSwap::new(server_config(cert_path, key_path)?),
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            seen: std::sync::Mutex::new(seen),
        })
    }

    /// An acceptor for one new connection, with the current pair.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Load the files again if they changed. `Ok(true)`: a new pair is in use; `Ok(false)`:
    /// nothing changed; `Err`: the files are refused and the previous pair stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let now = fingerprint(&self.cert_path, &self.key_path);
        let mut seen = self.seen.lock().expect("not poisoned");
        if *seen == now {
            return Ok(false);
        }
        *seen = now;
        let cfg = server_config(&self.cert_path, &self.key_path)?;
        self.current.store(cfg);
        Ok(true)
    }

    /// The directories holding the files (to watch).
    pub fn dirs(&self) -> Vec<std::path::PathBuf> {
        let mut v: Vec<std::path::PathBuf> = [&self.cert_path, &self.key_path]
            .iter()
            .map(|p| {
                std::path::Path::new(p.as_str())
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."))
                    .to_path_buf()
            })
            .collect();
        v.dedup();
        v
    }
}

fn fingerprint(cert: &str, key: &str) -> Fingerprint {
    let stat = |p: &str| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.len(), m.modified().ok()?))
    };
    [stat(cert), stat(key)]
}
