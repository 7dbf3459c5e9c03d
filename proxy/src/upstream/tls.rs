//! TLS to upstreams: the rustls client config of an upstream (built once per load from the
//! files its `tls` names, or the system's trust store), the server name each endpoint is
//! verified against, and the stream the upstream clients speak over.
//!
//! Verification is never switched off: the config is built with rustls' webpki verifier
//! and nothing else, so an upstream whose certificate does not chain to the trusted
//! authorities, or does not name the expected server, fails the handshake (502
//! `upstream_unavailable`, counted as `upstream_tls`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rules::model::Protocol;
use rules::snapshot::TlsSpec;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// An upstream's TLS client, built at load time.
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// The rustls config every connection to the upstream uses.
    pub config: Arc<ClientConfig>,
    /// XXH3-64 of the trust anchors and client identity it was built from: a reload that
    /// changes a file (same config text) builds the upstream anew.
    pub fingerprint: u64,
}

/// The files of a `tls` section, as read beside the config.
#[derive(Debug, Default)]
pub struct TlsFiles {
    /// The CA bundle's bytes; `None`: the system's trust store.
    pub ca: Option<Vec<u8>>,
    /// The client certificate chain and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A connection to an upstream endpoint: cleartext or TLS.
#[derive(Debug)]
pub enum Stream {
    /// Cleartext TCP.
    Plain(TcpStream),
    /// TLS over TCP, handshake done.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

// === impl TlsClient ===

impl TlsClient {
    /// Build the client config of a `tls` section. Errors name the file or part at fault.
    pub fn build(protocol: Protocol, files: &TlsFiles) -> Result<Self, String> {
        let mut hash = xxhash_rust::xxh3::Xxh3::new();
        let mut roots = RootCertStore::empty();
        match &files.ca {
            Some(pem) => {
                let certs = CertificateDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("ca_file: {e}"))?;
                let (added, ignored) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err("ca_file: no usable CA certificate in the file".into());
                }
                if ignored > 0 {
                    return Err(format!(
                        "ca_file: {ignored} of {} certificates could not be parsed",
                        added + ignored
                    ));
                }
                hash.update(pem);
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in &found.certs {
                    hash.update(c.as_ref());
                }
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(format!(
                        "no ca_file, and no usable certificate in the system's trust store{}",
                        found
                            .errors
                            .first()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
        // TLS 1.2 and 1.3 only, as for listeners (serve/tls.rs).
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match &files.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("client_cert_file: {e}"))?;
                if chain.is_empty() {
                    return Err("client_cert_file: no certificate in the file".into());
                }
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| format!("client_key_file: {e}"))?;
                hash.update(b"\0identity\0");
                hash.update(cert);
                hash.update(key.secret_der());
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client_cert_file and client_key_file: {e}"))?
            }
        };
        // What the server may pick: only the configured protocol, so an `http2` upstream that
        // does not speak h2 fails the connection instead of being spoken HTTP/2 at blindly.
        config.alpn_protocols = vec![match protocol {
            Protocol::Http1 => b"http/1.1".to_vec(),
            Protocol::Http2 => b"h2".to_vec(),
        }];
        Ok(Self {
            config: Arc::new(config),
            fingerprint: hash.digest(),
        })
    }
}

/// The name an endpoint's certificate must carry: `server_name` when configured, else the
/// endpoint's host as written (an IP address is verified against the certificate's IP
/// addresses).
pub fn server_name(spec: &TlsSpec, endpoint: &str) -> Result<ServerName<'static>, String> {
    let host = match &spec.server_name {
        Some(n) => n.as_ref(),
        None => endpoint_host(endpoint),
    };
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("server name {host:?} of endpoint {endpoint:?}: {e}"))
}

/// The host of `host:port` (`[v6]:port` without its brackets).
fn endpoint_host(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

// === impl Stream ===

impl Stream {
    /// Whether ALPN settled on HTTP/2.
    pub fn is_h2(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default server name is the endpoint's host; an IP endpoint gives an IP name;
    /// `server_name` wins over both.
    #[test]
    fn server_names() {
        let spec = TlsSpec {
            ca_file: None,
            server_name: None,
            client_identity: None,
        };
        let dns = server_name(&spec, "api.internal:443").unwrap();
        assert!(matches!(dns, ServerName::DnsName(ref d) if d.as_ref() == "api.internal"));
        let ip = server_name(&spec, "[::1]:443").unwrap();
        assert!(matches!(ip, ServerName::IpAddress(_)));
        let named = TlsSpec {
            server_name: Some("svc.example".into()),
            ..spec
        };
        let n = server_name(&named, "10.0.0.1:443").unwrap();
        assert!(matches!(n, ServerName::DnsName(ref d) if d.as_ref() == "svc.example"));
    }

    /// A CA file without certificates, or a garbled one, is refused with its field named.
    #[test]
    fn bad_files_refused() {
        let empty = TlsFiles {
            ca: Some(b"not a certificate".to_vec()),
            identity: None,
        };
        let e = TlsClient::build(Protocol::Http1, &empty).unwrap_err();
        assert!(e.starts_with("ca_file:"), "{e}");
        let garbled = TlsFiles {
            ca: Some(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec()),
            identity: None,
        };
        let e = TlsClient::build(Protocol::Http1, &garbled).unwrap_err();
        assert!(e.starts_with("ca_file:"), "{e}");
    }
}
