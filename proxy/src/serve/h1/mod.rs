//! The gateway's own HTTP/1.x server: the fast path for ordinary downstream requests.
//!
//! Every downstream connection starts here. Its task reads into one buffer, parses each
//! request head with `httparse` (the parser hyper uses, with hyper's settings) straight into
//! [`http::request::Parts`], runs [`Gateway::handle`] on it, and writes the response head
//! with a small body in one `write`. Only heads that are ordinary by every rule below are
//! served here; at the first request that is not, the connection is handed to hyper for the
//! rest of its life, the bytes read so far replayed first ([`Rewind`]), so hyper parses that
//! request from scratch and stays the reference for everything unusual:
//!
//! - the HTTP/2 preface (h2c prior knowledge, TLS with ALPN h2), and any head `httparse`
//!   rejects (hyper then answers 400/414/431 exactly as it always has);
//! - a head still incomplete at hyper's `max_buf_size`, one with more fields than
//!   `max_headers` (or than [`MAX_FIELDS`]), a target over hyper's URI limit, a method, name,
//!   value or target the `http` types refuse;
//! - `Transfer-Encoding` (any), more than one `Content-Length` line, a `Content-Length` that
//!   is not plain digits, or one whose body is larger than [`Limits::max_inline_body`] or not
//!   already in the buffer with its head;
//! - `Upgrade`, `CONNECT` and `Expect` (upgrades and `100-continue` are hyper's).
//!
//! What it keeps as hyper does: HTTP/1.1 keep-alive by default, HTTP/1.0 only with
//! `Connection: keep-alive`, `Connection: close` from either side closes after the response;
//! pipelined requests answered in order; no body for `HEAD`, 1xx, 204 and 304; a body of
//! exact size framed by `Content-Length`, otherwise chunked (HTTP/1.1) or close-delimited
//! (HTTP/1.0); a `date` header. Deadlines: the first head within the first-request deadline,
//! every head within `header_read_timeout` of the wait for it starting (keep-alive waits
//! included), the idle timeout between requests; on shutdown the request in flight is
//! finished and the connection closed.

#[doc(hidden)]
pub mod fuzz;
mod write;

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, Request, Uri, Version, header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::conn::{Activity, ConnInfo};
use crate::pipeline::Gateway;
use crate::shutdown::Stop;
use crate::upstream::{ConnCache, ReqBody};

/// hyper's limit on a request target (`MAX_URI_LEN` in its `proto/h1/role.rs`): longer ones
/// hyper answers 414.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;

/// Header fields parsed on the stack; a head with more goes to hyper.
pub const MAX_FIELDS: usize = 128;

/// Read size: what hyper's read strategy starts with.
const READ_CHUNK: usize = 8192;

/// A connection idle this long between requests is parked ([`Outcome::Parked`]): its
/// buffers are given back, its upstream connections go to their endpoints' shared stock,
/// and the task serving it, sized for a request's whole path, ends; a small one waits for
/// its next bytes. Thousands of idle keep-alive clients then cost their sockets, not 8 KB
/// buffers, upstream connections and a request-sized task each. Short enough that most
/// idle time is parked; long enough that a busy connection never pays for it.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// The head limits of a connection: hyper's settings for it (see `super::builder`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// hyper's `max_buf_size`: a head still incomplete at this many bytes goes to hyper
    /// (which answers 431).
    pub max_buf: usize,
    /// hyper's `max_headers`.
    pub max_headers: usize,
    /// Absolute deadline of each head from the start of the wait for it.
    pub header_read_timeout: Duration,
    /// Largest body read whole with its head (and only when it came with it).
    pub max_inline_body: usize,
}

impl Limits {
    /// The fast path's limits for a connection with these settings.
    pub fn new(l: &rules::model::ConnLimits) -> Self {
        Self {
            max_buf: (l.max_header_bytes as usize).max(8192),
            max_headers: l.max_headers as usize,
            header_read_timeout: Duration::from_millis(l.header_read_timeout_ms),
            max_inline_body: (l.max_body_bytes.min(16 * 1024)) as usize,
        }
    }
}

/// What the start of the buffer holds, as [`parse`] returns it: the head by value, for the
/// tests and the fuzz target (a connection parses in place, [`parse_into`]).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// An incomplete head: read more.
    Partial,
    /// Not for the fast path: the connection goes to hyper (the buffer is as it was).
    Handoff,
    /// A head the fast path serves; the head and its body have been taken off the buffer.
    Request(Head),
}

/// What the start of the buffer holds, the head itself written into the caller's
/// [`http::request::Parts`] ([`parse_into`]).
#[derive(Debug)]
pub enum Taken {
    /// An incomplete head: read more.
    Partial,
    /// Not for the fast path: the connection goes to hyper (the buffer is as it was).
    Handoff,
    /// A head the fast path serves, now in the caller's parts; it and its body have been
    /// taken off the buffer.
    Request {
        /// The body (`Content-Length` bytes, read whole), if any.
        body: Option<Bytes>,
        /// Whether the connection stays open after the response, by the request's rules.
        keep_alive: bool,
    },
}

/// A request head the fast path serves, and its body.
#[derive(Debug)]
pub struct Head {
    /// Method, target, version and fields, as hyper would have made them.
    pub parts: http::request::Parts,
    /// The body (`Content-Length` bytes, read whole), if any.
    pub body: Option<Bytes>,
    /// Whether the connection stays open after the response, by the request's rules.
    pub keep_alive: bool,
}

/// A connection's reusable parse state: the fields of the head being parsed (names made,
/// values as offsets into the buffer), kept between requests so parsing allocates nothing
/// once it has grown.
#[derive(Debug, Default)]
pub struct Parser {
    fields: Vec<(HeaderName, usize, usize)>,
}

/// Parse the request head at the start of `buf` (see the module docs for what is taken).
/// A request taken is removed from `buf` (head and body); otherwise `buf` is unchanged.
pub fn parse(buf: &mut BytesMut, limits: &Limits, p: &mut Parser) -> Parsed {
    let mut parts = Request::new(()).into_parts().0;
    match parse_into(buf, limits, p, &mut parts) {
        Taken::Partial => Parsed::Partial,
        Taken::Handoff => Parsed::Handoff,
        Taken::Request { body, keep_alive } => Parsed::Request(Head {
            parts,
            body,
            keep_alive,
        }),
    }
}

/// [`parse`], the head written into `parts` (method, target, version and fields replaced,
/// extensions cleared), which a connection keeps from one request to the next: the head
/// is built where the request path reads it, not built and then moved there. On a handoff
/// `parts` holds nothing of use.
pub fn parse_into(
    buf: &mut BytesMut,
    limits: &Limits,
    p: &mut Parser,
    parts: &mut http::request::Parts,
) -> Taken {
    p.fields.clear();
    let cap = limits.max_headers.min(MAX_FIELDS);
    let mut content_length: Option<u64> = None;
    let mut keep_alive;
    let mut saw_close = false;
    let (head_len, method, target, version) = {
        let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut []);
        let bytes: &[u8] = buf;
        let head_len = match req.parse_with_uninit_headers(bytes, &mut raw[..cap]) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if bytes.len() < limits.max_buf => {
                return Taken::Partial;
            }
            // Too large, too many fields, or malformed: hyper answers it.
            _ => return Taken::Handoff,
        };
        let (Some(m), Some(path), Some(v)) = (req.method, req.path, req.version) else {
            return Taken::Handoff;
        };
        if head_len > limits.max_buf || path.len() > MAX_URI_LEN {
            return Taken::Handoff;
        }
        let Ok(method) = Method::from_bytes(m.as_bytes()) else {
            return Taken::Handoff;
        };
        if method == Method::CONNECT {
            return Taken::Handoff;
        }
        let version = if v == 1 {
            keep_alive = true;
            Version::HTTP_11
        } else {
            keep_alive = false;
            Version::HTTP_10
        };
        let base = bytes.as_ptr() as usize;
        for h in req.headers.iter() {
            let Ok(name) = crate::names::header_name(h.name.as_bytes()) else {
                return Taken::Handoff;
            };
            // Values are checked as they become `HeaderValue`s, below.
            match name {
                header::TRANSFER_ENCODING | header::UPGRADE | header::EXPECT => {
                    return Taken::Handoff;
                }
                header::CONTENT_LENGTH => {
                    // One plain number, or hyper decides.
                    match (content_length, digits(h.value)) {
                        (None, Some(n)) => content_length = Some(n),
                        _ => return Taken::Handoff,
                    }
                }
                header::CONNECTION => {
                    // hyper's rule: once any line asks to close, a later keep-alive does not
                    // undo it; HTTP/1.0 stays open only when asked to.
                    if saw_close || connection_has(h.value, b"close") {
                        saw_close = true;
                        keep_alive = false;
                    } else if !keep_alive {
                        keep_alive = connection_has(h.value, b"keep-alive");
                    }
                }
                _ => {}
            }
            let start = h.value.as_ptr() as usize - base;
            p.fields.push((name, start, start + h.value.len()));
        }
        let start = path.as_ptr() as usize - base;
        (head_len, method, (start, start + path.len()), version)
    };
    let body_len = content_length.unwrap_or(0);
    if body_len > limits.max_inline_body as u64 || buf.len() - head_len < body_len as usize {
        return Taken::Handoff;
    }
    let head = buf.split_to(head_len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(target.0..target.1)) else {
        return give_back(head, buf);
    };
    // Room for what the gateway adds (request ID, forwarding headers): no regrowth later.
    // The last request's map, when the request path left it here, else a spare one.
    let headers = &mut parts.headers;
    if headers.capacity() == 0 {
        *headers = crate::header_maps::take(p.fields.len() + 8);
    } else {
        headers.clear();
        headers.reserve(p.fields.len() + 8);
    }
    for (name, a, b) in p.fields.drain(..) {
        // The http crate's rule is hyper's: visible ASCII, obs-text, space and tab.
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice(a..b)) else {
            // The rest of the fields go with the drain.
            return give_back(head, buf);
        };
        headers.append(name, value);
    }
    let body = match body_len {
        0 => {
            // `Content-Length: 0`: an empty body, as hyper reports it.
            None
        }
        n => Some(buf.split_to(n as usize).freeze()),
    };
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.extensions.clear();
    Taken::Request { body, keep_alive }
}

/// Put a head taken from `buf` back in front of it: hyper answers it.
fn give_back(head: Bytes, buf: &mut BytesMut) -> Taken {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(buf);
    *buf = whole;
    Taken::Handoff
}

/// Whether `buf` starts the HTTP/2 connection preface (as far as it goes).
fn h2_preface(buf: &[u8]) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let n = buf.len().min(PREFACE.len());
    buf[..n] == PREFACE[..n]
}

/// hyper's `Content-Length` value rule: plain ASCII digits, no sign or space, fitting a u64.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// Whether a `Connection` value names `token`, by hyper's rule (comma-separated, trimmed,
/// case-insensitive; a value that is not visible ASCII names nothing).
pub(crate) fn connection_has(v: &[u8], token: &[u8]) -> bool {
    if !v.iter().all(|&b| (0x20..0x7f).contains(&b) || b == b'\t') {
        return false;
    }
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

// === the connection ===

/// How a connection left the fast path.
pub enum Outcome<I> {
    /// Closed (by either side, a deadline, or shutdown).
    Closed,
    /// Handed to hyper, with the bytes read and not yet served replayed first.
    Handoff(Rewind<I>),
    /// Idle for [`PARK_AFTER`] with nothing read: its buffers given back, to wait for its
    /// next bytes without a task (`serve::park`; the caller gives its upstream connections
    /// back: `ConnCache::release`).
    Parked(I, Wait),
}

/// The wait for a request head, as it stands when a connection is parked.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    /// The head's absolute deadline.
    deadline: Instant,
    /// The idle timeout's end.
    idle_at: Instant,
    /// Whether the head is the connection's first.
    first: bool,
}

/// A parked connection's wait, ended by bytes to read: [`serve`] goes on from it.
pub struct Resume {
    buf: BytesMut,
    wait: Wait,
}

impl Wait {
    /// When a parked connection stops waiting: the head's deadline or the idle timeout's
    /// end, whichever comes first.
    pub fn until(&self) -> Instant {
        self.deadline.min(self.idle_at)
    }

    /// Whether the head awaited is the connection's first (it has made no request).
    pub fn first(&self) -> bool {
        self.first
    }

    /// The wait, to serve the connection on from once it has bytes to read.
    pub fn resume(self) -> Resume {
        Resume {
            buf: BytesMut::with_capacity(READ_CHUNK),
            wait: self,
        }
    }
}

/// What a connection's fast path works with.
pub struct Conn<'a> {
    /// The request path.
    pub gateway: &'a Arc<Gateway>,
    /// The connection's facts.
    pub info: &'a ConnInfo,
    /// Its own upstream connections.
    pub cache: &'a Arc<ConnCache>,
    /// Its activity record (the `Tracked` IO records reads and writes there).
    pub activity: &'a Activity,
    /// Head limits.
    pub limits: Limits,
    /// The idle timeout between requests.
    pub idle_timeout: Duration,
    /// The first request's head deadline (from accept).
    pub first_deadline: Instant,
    /// Fires on shutdown.
    pub stop: &'a Stop,
}

/// Serve `io` on the fast path until it closes, is handed to hyper or is parked; from the
/// start, or (`resume`) from the bytes that ended a parked wait.
pub async fn serve<I>(mut io: I, c: Conn<'_>, resume: Option<Resume>) -> Outcome<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let (mut buf, mut resumed) = match resume {
        Some(r) => (r.buf, Some(r.wait)),
        None => (BytesMut::with_capacity(READ_CHUNK), None),
    };
    let mut parser = Parser::default();
    // Woken on shutdown while it waits for a head; registered once, not on every wait.
    let stop = c.stop.watch().await;
    // Each request's head, written in place by the parser and lent to the request path.
    let mut parts = Request::new(()).into_parts().0;
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut first = resumed.is_none_or(|w| w.first);
    // One timer for the connection, armed no later than the wait's deadline: moved earlier
    // when a wait needs it, but not later (a reset per request costs a clock conversion);
    // waking early, it is moved to the deadline then.
    let first_at = resumed.map_or(c.first_deadline, |w| w.deadline);
    let timer = tokio::time::sleep_until(first_at);
    tokio::pin!(timer);
    let mut armed = first_at;
    loop {
        // The wait for a head: the absolute head deadline; and, while nothing of it has
        // come, the idle timeout. A resumed wait is already parked.
        let (deadline, idle_at, park_at) = match resumed.take() {
            Some(w) => (w.deadline, w.idle_at, None),
            None => {
                let start = Instant::now();
                let mut deadline = start + c.limits.header_read_timeout;
                if first {
                    deadline = deadline.min(c.first_deadline);
                }
                (deadline, start + c.idle_timeout, Some(start + PARK_AFTER))
            }
        };
        let (body, keep_alive) = loop {
            if !buf.is_empty() {
                match parse_into(&mut buf, &c.limits, &mut parser, &mut parts) {
                    Taken::Request { body, keep_alive } => break (body, keep_alive),
                    // The HTTP/2 preface after HTTP/1 requests: hyper's HTTP/1 server closes
                    // on it; its auto-detection would wait for the rest with no deadline.
                    Taken::Handoff if !first && h2_preface(&buf) => return Outcome::Closed,
                    Taken::Handoff => return Outcome::Handoff(Rewind::new(io, buf.freeze())),
                    Taken::Partial => {}
                }
            } else if stop.is_stopping() {
                return close(io).await;
            }
            let until = if buf.is_empty() {
                park_at.map_or(deadline, |p| p.min(deadline)).min(idle_at)
            } else {
                deadline
            };
            if armed > until {
                timer.as_mut().reset(until);
                armed = until;
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 2 {
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                r = io.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    Ok(_) => {}
                },
                _ = timer.as_mut() => {
                    if Instant::now() < until {
                        timer.as_mut().reset(until);
                        armed = until;
                        continue;
                    }
                    if buf.is_empty() && park_at.is_some_and(|p| until == p) {
                        return Outcome::Parked(io, Wait { deadline, idle_at, first });
                    }
                    tracing::debug!(client = %c.info.remote, "no complete request head before the deadline; closing");
                    return Outcome::Closed;
                }
                _ = stop.stopped(), if buf.is_empty() => {
                    return close(io).await;
                }
            }
        };
        first = false;
        let version = parts.version;
        let head_only = parts.method == Method::HEAD;
        c.activity.started.store(true, Ordering::Relaxed);
        c.activity.inflight.fetch_add(1, Ordering::Relaxed);
        // Inline (a box would cost an allocation and a copy per request): the request's
        // rarer paths are boxed where they start, so this state stays small. The head stays
        // here, lent to the request path.
        let (mut resp, id) = (c.gateway)
            .handle_parts(&mut parts, ReqBody::Full(body), c.info, Some(c.cache))
            .await;
        // The head's target and values are slices of the read buffer: let go of them before
        // the write, so the buffer's memory is free to take the next request. (The map is
        // most often empty by now: the upstream's encoder gave it back to the spares.)
        parts.uri = Uri::default();
        if !parts.headers.is_empty() {
            parts.headers.clear();
        }
        parts.extensions.clear();
        c.activity.inflight.fetch_sub(1, Ordering::Relaxed);
        // On shutdown the answer in flight is the connection's last.
        let keep = keep_alive && !stop.is_stopping();
        let framing = write::Request {
            version,
            head_only,
            id: &id,
        };
        // Written from where it lies (no move into the writer's future), then dropped at once:
        // its body may hold an upstream connection, to go back before anything else.
        let written = write::response(&mut io, &mut out, &mut resp, framing, keep).await;
        drop(resp);
        match written {
            Ok(true) if !stop.is_stopping() => {}
            Ok(_) => return close(io).await,
            Err(e) => {
                tracing::debug!(client = %c.info.remote, error = %e, "writing the response failed");
                return Outcome::Closed;
            }
        }
    }
}

/// Close the connection after its last response (the write side shut, as hyper does).
async fn close<I: AsyncWrite + Unpin>(mut io: I) -> Outcome<I> {
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
    Outcome::Closed
}

/// An IO whose reads first yield `pre` (bytes already read from it), then its own.
pub struct Rewind<I> {
    pre: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    /// `io` with `pre` to be read first.
    pub fn new(io: I, pre: Bytes) -> Self {
        Self { pre, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests;
