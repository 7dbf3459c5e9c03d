//! What the gateway knows of a downstream connection: the facts each of its requests is
//! decided and forwarded with, built once per connection by `serve`; and when its bytes
//! last moved ([`Activity`], recorded by [`Tracked`]), which `serve`'s idle timeout and a
//! tunnel's read.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use rules::trusted::TrustedProxies;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-connection facts: the peer's address (the client address unless the peer is a trusted
/// proxy, see [`ConnInfo::client_ip`]; `X-Forwarded-For`) and the scheme it came in on.
#[derive(Debug)]
pub struct ConnInfo {
    /// The peer's (socket) address.
    pub remote: SocketAddr,
    /// Whether it came in over TLS (a flag, not the scheme's header value: 40 bytes less
    /// for every connection, parked ones included).
    pub tls: bool,
    /// The forwarding headers built for the last request's `Host`: the next request on the
    /// connection with the same `Host` (nearly every one) reuses them. The values they are
    /// made of are not kept beside them: an idle connection holds only its address.
    pub forwarded_last: Mutex<Option<Arc<Hop>>>,
}

/// This hop as the forwarding headers describe it, for one `Host` on one connection, with
/// the field lines the gateway's HTTP/1 client writes, made once (built and read by
/// `upstream::headers`).
#[derive(Debug)]
pub struct Hop {
    pub(crate) for_: HeaderValue,
    pub(crate) proto: HeaderValue,
    pub(crate) host: Option<HeaderValue>,
    /// This hop's `Forwarded` element.
    pub(crate) forwarded: HeaderValue,
    /// Its fields as HTTP/1 field lines.
    pub(crate) lines: Bytes,
}

/// When a connection last moved bytes, how many requests it has in flight, and whether it
/// has made any.
pub struct Activity {
    /// When it last read or wrote, in milliseconds since the process's epoch
    /// ([`since_epoch_ms`]).
    last_ms: AtomicU64,
    /// Requests in flight on it (a connection with one is not idle, whatever its bytes say).
    pub inflight: AtomicUsize,
    /// A request head has been received.
    pub started: AtomicBool,
    /// Whether [`Tracked`] records reads and writes (see [`Activity::untracked`]).
    tracking: AtomicBool,
}

impl Activity {
    /// No bytes moved yet: idle from now.
    pub fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(since_epoch_ms()),
            inflight: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            tracking: AtomicBool::new(true),
        }
    }

    /// Like [`Activity::new`], but reads and writes are not recorded until
    /// [`Activity::track`]: for a connection on the own HTTP/1 server, whose loop keeps its
    /// own deadlines (a clock read per read and write would be spent for nothing).
    pub fn untracked() -> Self {
        let a = Self::new();
        a.tracking.store(false, Ordering::Relaxed);
        a
    }

    /// Record reads and writes from now on, counting now as the last activity.
    pub fn track(&self) {
        self.tracking.store(true, Ordering::Relaxed);
        self.touch();
    }

    fn tracking(&self) -> bool {
        self.tracking.load(Ordering::Relaxed)
    }

    /// Bytes moved now.
    pub fn touch(&self) {
        self.last_ms.store(since_epoch_ms(), Ordering::Relaxed);
    }

    /// How long since bytes last moved.
    pub fn idle_for(&self) -> Duration {
        let last = self.last_ms.load(Ordering::Relaxed);
        Duration::from_millis(since_epoch_ms().saturating_sub(last))
    }
}

/// Milliseconds since the process's first reading: one epoch for every connection's
/// activity record, not 16 bytes of its own in each (idle connections included).
fn since_epoch_ms() -> u64 {
    static EPOCH: OnceLock<tokio::time::Instant> = OnceLock::new();
    EPOCH
        .get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// An IO that records activity on every successful read or write.
pub struct Tracked<I> {
    /// The IO.
    pub io: I,
    /// Where its reads and writes are recorded.
    pub activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && self.activity.tracking()
        {
            self.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) && self.activity.tracking() {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) && self.activity.tracking() {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Clone for ConnInfo {
    fn clone(&self) -> Self {
        Self {
            remote: self.remote,
            tls: self.tls,
            forwarded_last: Mutex::new(None),
        }
    }
}

impl ConnInfo {
    /// The facts of a connection from `remote`, over TLS or not.
    pub fn new(remote: SocketAddr, tls: bool) -> Self {
        Self {
            remote,
            tls,
            forwarded_last: Mutex::new(None),
        }
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The scheme as `X-Forwarded-Proto` gives it.
    pub fn proto(&self) -> HeaderValue {
        HeaderValue::from_static(self.scheme())
    }

    /// The peer's IP as `X-Forwarded-For` gives it.
    pub fn remote_ip(&self) -> HeaderValue {
        HeaderValue::from_str(&self.remote.ip().to_string()).expect("an IP is a valid header value")
    }

    /// This hop's `Forwarded` element without a host (`for=<peer>;proto=<scheme>`, RFC
    /// 7239): the peer canonical (an IPv4-mapped IPv6 address as IPv4), IPv6 quoted.
    pub fn forwarded(&self) -> HeaderValue {
        let for_ = match self.remote.ip().to_canonical() {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("\"[{a}]\""),
        };
        let proto = self.scheme();
        HeaderValue::from_str(&format!("for={for_};proto={proto}"))
            .expect("an IP and a scheme are a valid header value")
    }

    /// Drop the forwarding headers kept for the next request (see `forwarded_last`), when
    /// the connection parks: an idle connection then holds only its facts, and the request
    /// that wakes it builds them again.
    pub fn forget_hop(&self) {
        let hop = self
            .forwarded_last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(hop);
    }

    /// The client address of a request on this connection with these headers: the peer,
    /// unless it is one of `trusted`, then the right-most untrusted `X-Forwarded-For` entry
    /// (see [`rules::trusted`]). Limit keys, overload buckets and the access log use it.
    pub fn client_ip(&self, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
        let peer = self.remote.ip();
        if trusted.is_empty() {
            // The common case: no proxy in front, one branch.
            return peer;
        }
        trusted.client_ip(peer, headers)
    }
}
