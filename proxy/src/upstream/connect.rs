//! Connections to the endpoints of an upstream that speaks TLS or HTTP/2: TCP within the
//! connect timeout, then the TLS handshake (same deadline) with the endpoint's server name.
//!
//! [`Connector`] is both what the HTTP/2 connections of [`super::h2`] open with and the
//! connector of the pooled hyper client of a TLS HTTP/1.1 upstream. That client asks for a
//! connection by URI: its authority is the endpoint as configured, which the connector maps
//! to the endpoint's current address (re-resolution swaps it) and its server name, so
//! nothing is resolved or parsed per request.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::Resolved;
use super::tls::{Stream, TlsClient};

/// Opens connections to an upstream's endpoints. Cloned into the pooled client; the clones
/// share the endpoint table.
#[derive(Clone, Debug)]
pub struct Connector {
    targets: Arc<[Target]>,
    tls: Option<Arc<rustls::ClientConfig>>,
    connect_timeout: Duration,
}

/// One endpoint as the connector reaches it.
#[derive(Debug)]
pub(super) struct Target {
    /// The endpoint as configured: the authority of the pool's URIs.
    pub(super) name: Box<str>,
    /// Its address, shared with the endpoint (swapped by re-resolution).
    pub(super) resolved: Arc<ArcSwap<Resolved>>,
    /// The name its certificate must carry (TLS only).
    pub(super) server_name: Option<ServerName<'static>>,
}

/// The TLS handshake with an endpoint failed: untrusted or mismatched certificate, no
/// common version, or a refused client certificate. Carried inside an `io::Error` so the
/// clients' error chains can be told apart from a refused connection.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with the upstream failed: {0}")]
pub struct HandshakeError(pub io::Error);

/// An `http2` upstream over TLS whose server did not agree to `h2` in ALPN.
#[derive(Debug, thiserror::Error)]
#[error("the upstream did not agree to HTTP/2 (ALPN h2) in the TLS handshake")]
pub struct NoH2;

/// A connection as the pooled client sees it.
#[derive(Debug)]
pub struct Io(TokioIo<Stream>);

// === impl Connector ===

impl Connector {
    /// A connector for `targets` (indexed like the upstream's endpoints), with `tls` when
    /// the upstream has it.
    pub(super) fn new(
        targets: Vec<Target>,
        tls: Option<&TlsClient>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            targets: targets.into(),
            tls: tls.map(|t| t.config.clone()),
            connect_timeout,
        }
    }

    /// Open a connection to endpoint `i`: TCP, then TLS when configured, both within the
    /// connect timeout. `want_h2` refuses a TLS connection on which ALPN did not pick h2.
    pub(super) async fn open(&self, i: usize, want_h2: bool) -> io::Result<Stream> {
        let t = &self.targets[i];
        let addr = t.resolved.load().addr;
        let work = async {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let (Some(tls), Some(name)) = (&self.tls, &t.server_name) else {
                return Ok(Stream::Plain(tcp));
            };
            let s = TlsConnector::from(tls.clone())
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| io::Error::other(HandshakeError(e)))?;
            let s = Stream::Tls(Box::new(s));
            if want_h2 && !s.is_h2() {
                return Err(io::Error::other(HandshakeError(io::Error::other(NoH2))));
            }
            Ok(s)
        };
        tokio::time::timeout(self.connect_timeout, work)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Io;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().map_or("", |a| a.as_str());
            let i = this
                .targets
                .iter()
                .position(|t| *t.name == *authority)
                .ok_or_else(|| {
                    io::Error::other(format!("{authority:?} is not an endpoint of the upstream"))
                })?;
            this.open(i, false).await.map(|s| Io(TokioIo::new(s)))
        })
    }
}

/// Whether an error's chain holds a failed TLS handshake.
pub(super) fn is_handshake(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.is::<HandshakeError>() {
            return true;
        }
        // io::Error's `source` skips the error it wraps: look inside it too.
        if let Some(io) = s.downcast_ref::<io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<HandshakeError>())
        {
            return true;
        }
        src = s.source();
    }
    false
}

// === impl Io ===

impl Connection for Io {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
