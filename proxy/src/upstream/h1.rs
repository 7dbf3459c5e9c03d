//! A small HTTP/1.1 client for the hot path: a bodiless request from an HTTP/1.x downstream
//! connection, sent on that connection's own upstream connection.
//!
//! hyper's client runs every upstream connection as a task of its own, fed through a
//! dispatch channel, and answers through a oneshot: per request a cross-task hand-off each
//! way, a task poll, and a second copy of hyper's generic HTTP/1 machinery. Here the
//! downstream connection's task drives the upstream socket itself, as Pingora does: the head
//! is written straight from the request's parts in one `write(2)`, the answer's head parsed
//! with `httparse` in place (header values are slices of the read buffer, not copies), and a
//! body already in the buffer (most small answers) handed on whole, the connection back in
//! the cache before the downstream response is even written.
//!
//! Requests with a body keep using hyper's client (it sends the body and reads an early
//! answer concurrently, which a request/response client must not get wrong).
//!
//! Response framing follows RFC 9112 §6.3: no body for `HEAD`, 204 and 304; `Transfer-Encoding`
//! ending in `chunked` is decoded (trailers are read and dropped) and wins over any
//! `Content-Length` (the connection is then not reused); another transfer coding, or no
//! length at all, is read until the upstream closes; differing or malformed `Content-Length`
//! values are refused. Interim 1xx answers are skipped; 101 is refused (the gateway strips
//! `Upgrade`, so an upstream has no business switching protocols). A connection is reused only
//! after a complete HTTP/1.1 keep-alive exchange with nothing left over.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::headers::{Outgoing, push_field};

mod raw;

use raw::Kind;
pub use raw::RawFields;

/// Most header fields accepted in an upstream's response (hyper's default).
const MAX_HEADERS: usize = 100;

/// Response heads with at most this many fields keep their spans on the stack.
const SMALL_HEAD: usize = 16;
/// Largest response head accepted (status line and header fields); offsets in it fit a u16.
const MAX_HEAD_BYTES: usize = u16::MAX as usize;
/// Longest chunk-size line (with extensions) or trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// Bytes the read buffer keeps free before each read.
const READ_RESERVE: usize = 8 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the socket failed.
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The upstream closed before a whole response (head, or body with a known length).
    #[error("upstream closed the connection before the response was complete")]
    Closed,
    /// The response was not valid HTTP/1.x, or broke a limit.
    #[error("invalid upstream response: {0}")]
    Invalid(&'static str),
    /// No whole response head by the exchange's deadline.
    #[error("upstream did not answer in time")]
    Timeout,
}

/// One upstream HTTP/1.1 connection, owned by one downstream connection.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// The request head being sent: kept, one allocation for the connection's life.
    wbuf: Vec<u8>,
    /// The exchange's deadline: one timer while the connection is busy, armed no later than
    /// the current exchange's deadline (a timer per exchange cost an insertion into tokio's
    /// timer wheel and a removal from it). Dropped when the connection parks.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A response head and how its body is framed.
#[derive(Debug)]
pub struct Head {
    /// Status, version (always HTTP/1.1 here) and header fields (none when `raw` has them).
    pub parts: http::response::Parts,
    /// The fields as they came, when kept so (see [`RawFields`]).
    raw: Option<RawFields>,
    framing: Framing,
    /// Whether the connection may carry another request once this body is read.
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

/// Where a connection goes back to once its response body is read whole.
type Home = Box<dyn FnOnce(Conn) + Send>;

/// A response body read from an upstream [`Conn`].
#[derive(Debug)]
pub struct ResponseBody {
    state: State,
    hint: SizeHint,
    /// The head's fields, when kept as they came (the response's map is then empty).
    raw: Option<RawFields>,
}

impl ResponseBody {
    /// The head's fields as they came, if they were kept so (once).
    pub fn take_raw(&mut self) -> Option<RawFields> {
        self.raw.take()
    }
}

#[derive(Debug)]
enum State {
    /// Read whole with the head (or empty).
    Full(Option<Bytes>),
    Streaming(Box<Streaming>),
    Done,
}

struct Streaming {
    conn: Conn,
    decoder: Decoder,
    keep_alive: bool,
    home: Home,
    /// A failure held back for one poll (see [`ResponseBody::poll_frame`]).
    failed: Option<Error>,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("conn", &self.conn)
            .field("decoder", &self.decoder)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}

// === impl Conn ===

impl Conn {
    /// Wrap a connected socket.
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            rbuf: BytesMut::with_capacity(READ_RESERVE),
            wbuf: Vec::new(),
            timer: None,
        }
    }

    /// The address it is connected to (a system call: for the rare paths).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.io.peer_addr().ok()
    }

    /// Whether an idle connection can take a request: the upstream has neither closed it nor
    /// sent anything unasked. Costs no system call unless the event loop saw it readable.
    pub fn is_idle_usable(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        match self.io.try_read_buf(&mut self.rbuf) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            Ok(_) => false, // EOF, or bytes nobody asked for
        }
    }

    /// The bare socket, out of the event loop, to wait in an endpoint's stock: buffers,
    /// timer and the runtime's registration are given back (a stocked connection is then a
    /// descriptor, not a few small allocations pinning the allocator's pages a burst left
    /// behind). `None` when bytes nobody asked for have come (the connection is unusable) or
    /// the socket cannot leave the event loop; it is closed then.
    pub fn into_idle(self) -> Option<std::net::TcpStream> {
        match self.rbuf.is_empty() {
            true => self.io.into_std().ok(),
            false => None,
        }
    }

    /// Whether a stocked socket ([`Conn::into_idle`]) is still idle: not closed by the
    /// upstream nor written to unasked while it waited. A registration made new by
    /// [`Conn::from_idle`] has seen none of that, so the socket is asked (a peek that does
    /// not wait): stale bytes taken for the next request's answer would hand one client
    /// another's response.
    pub fn still_idle(s: &std::net::TcpStream) -> bool {
        matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// A stocked socket that is [`Conn::still_idle`] back in the event loop, for an
    /// exchange; `None` (and closed) when it cannot be registered.
    pub fn from_idle(s: std::net::TcpStream) -> Option<Self> {
        TcpStream::from_std(s).ok().map(Self::new)
    }

    /// Send a request head (the request has no body; `encode` writes it into the buffer it
    /// is given) and read the response head, by `deadline`.
    /// `Err((e, received))`: `received` is false when nothing of the response arrived, so a reused
    /// connection that turned out closed may be retried on a fresh one.
    pub async fn exchange(
        &mut self,
        method: &Method,
        deadline: tokio::time::Instant,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Head, (Error, bool)> {
        self.wbuf.clear();
        encode(&mut self.wbuf);
        let timer = match &mut self.timer {
            // Armed no later than this deadline (an earlier exchange's): left as it is, since
            // a reset costs a clock conversion per exchange. Waking early, it is moved to this
            // deadline below.
            Some(t) if t.deadline() <= deadline => t,
            Some(t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        let Conn { io, rbuf, wbuf, .. } = self;
        let io = exchange_io(io, rbuf, wbuf, method);
        tokio::pin!(io);
        loop {
            tokio::select! {
                biased;
                r = &mut io => return r,
                () = timer.as_mut() => {
                    if tokio::time::Instant::now() < deadline {
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    // Whatever arrived, the connection is out of step now: never retried.
                    return Err((Error::Timeout, true));
                }
            }
        }
    }

    /// The body of the response whose head [`Conn::exchange`] returned. The connection goes
    /// to `home` as soon as the body has been read whole (at once, before this returns, when
    /// it is already buffered), when the exchange allows reuse.
    pub fn into_body<F>(mut self, head: &mut Head, home: F) -> ResponseBody
    where
        F: FnOnce(Conn) + Send + 'static,
    {
        let hint = match head.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        };
        let whole = match head.framing {
            Framing::Empty => Some(None),
            Framing::Length(n) if self.rbuf.len() as u64 >= n => {
                Some(Some(self.rbuf.split_to(n as usize).freeze()))
            }
            _ => None,
        };
        if let Some(body) = whole {
            // Bytes beyond the response: the upstream is out of step; do not reuse.
            if head.keep_alive && self.rbuf.is_empty() {
                home(self);
            }
            return ResponseBody {
                state: State::Full(body.filter(|b| !b.is_empty())),
                hint,
                raw: head.raw.take(),
            };
        }
        let decoder = match head.framing {
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(Chunk::Size),
            _ => Decoder::Close,
        };
        ResponseBody {
            state: State::Streaming(Box::new(Streaming {
                conn: self,
                decoder,
                keep_alive: head.keep_alive,
                home: Box::new(home),
                failed: None,
            })),
            hint,
            raw: head.raw.take(),
        }
    }

    /// Read what the socket has into the spare capacity of the buffer, through tokio's
    /// `poll_read` (which also clears the socket's readiness after a short read, so the next
    /// idle check costs no system call).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.rbuf.reserve(READ_RESERVE);
        std::pin::pin!(self.io.read_buf(&mut self.rbuf)).poll(cx)
    }
}

// === the request head ===

/// Encode a request head: `method path HTTP/1.1`, the header fields as they are (names are
/// lowercase, values were validated when parsed or built), what the gateway adds as the
/// request goes out (`extra`), `content-length: 0` for a bodiless method that
/// conventionally carries a body, and the blank line.
pub fn encode_head(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    extra: &Outgoing,
    out: &mut Vec<u8>,
) {
    let mut size = method.as_str().len() + path.len() + extra.len() + 16;
    for (n, v) in headers {
        size += n.as_str().len() + v.len() + 4;
    }
    out.reserve(size + 24);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (n, v) in headers {
        push_field(out, n, v);
    }
    extra.write(out);
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a request may be sent again after a connection failed under it (RFC 9110 §9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

// === the response head ===

enum Parsed {
    Final(Head),
    Interim,
}

/// [`Conn::exchange`] without its deadline.
async fn exchange_io(
    io: &mut TcpStream,
    rbuf: &mut BytesMut,
    head: &[u8],
    method: &Method,
) -> Result<Head, (Error, bool)> {
    if let Err(e) = io.write_all(head).await {
        return Err((e.into(), false));
    }
    let mut received = false;
    loop {
        match parse_head(rbuf, method) {
            Ok(Some(Parsed::Final(h))) => return Ok(h),
            Ok(Some(Parsed::Interim)) => continue,
            Ok(None) => {}
            Err(e) => return Err((e, true)),
        }
        if rbuf.len() >= MAX_HEAD_BYTES {
            return Err((Error::Invalid("response head too large"), true));
        }
        rbuf.reserve(READ_RESERVE);
        match io.read_buf(rbuf).await {
            Ok(0) => return Err((Error::Closed, received)),
            Ok(_) => received = true,
            Err(e) => return Err((e.into(), received)),
        }
    }
}

/// Parse one response head from the front of `buf`, consuming it. `Ok(None)`: incomplete.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Not zeroed: the parser writes the fields it finds (on the stack, no allocation), and
    // only those are read.
    let mut fields = [std::mem::MaybeUninit::uninit(); MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        &buf[..buf.len().min(MAX_HEAD_BYTES)],
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Invalid("too many header fields"));
        }
        Err(_) => return Err(Error::Invalid("malformed response head")),
    };
    let code = res.code.unwrap_or(0);
    let minor = res.version.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("bad status code"))?;
    // Where each field sits in the buffer, so the values can be slices of it.
    let base = buf.as_ptr() as usize;
    let at = |p: &[u8]| (p.as_ptr() as usize - base) as u16;
    // The spans of a usual head on the stack, zeroed (128 bytes, where all 100 would be 800
    // written to cold memory per response); a longer head's in a `Vec`.
    let n = res.headers.len();
    let (mut small, mut large) = ([(0, 0, 0, 0); SMALL_HEAD], Vec::new());
    let spans: &mut [Span] = match n <= SMALL_HEAD {
        true => &mut small[..n],
        false => {
            large.resize(n, (0, 0, 0, 0));
            &mut large
        }
    };
    for (span, f) in spans.iter_mut().zip(res.headers.iter()) {
        *span = (
            at(f.name.as_bytes()),
            f.name.len() as u16,
            at(f.value),
            f.value.len() as u16,
        );
    }
    // Names in lower case, as a header map has them: kept as they came, they are written
    // as they are.
    for &(ns, nl, _, _) in &*spans {
        buf[usize::from(ns)..][..usize::from(nl)].make_ascii_lowercase();
    }
    let head = buf.split_to(len).freeze();
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Invalid("unrequested protocol switch"));
        }
        return Ok(Some(Parsed::Interim));
    }

    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_coded = false;
    let mut close = minor == 0; // HTTP/1.0: no persistent connections assumed
    // Kept as they came unless the gateway would change more than it notes (see `raw`).
    let mut raw = (n <= raw::RAW_MAX).then(|| RawFields::new(head.clone()));
    for &span in &*spans {
        let (ns, nl, vs, vl) = span;
        let name = &head[usize::from(ns)..][..usize::from(nl)];
        let value = &head[usize::from(vs)..][..usize::from(vl)];
        let kind = match Field::of(name) {
            Field::ContentLength => {
                let v = parse_length(value)?;
                if length.is_some_and(|l| l != v) {
                    return Err(Error::Invalid("conflicting content-length"));
                }
                length = Some(v);
                Kind::Length(v)
            }
            Field::TransferEncoding => {
                transfer_coded = true;
                // Only the last coding counts: chunked must be the final one.
                chunked = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                Kind::HopByHop
            }
            Field::Connection => {
                for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    let is_close = t.eq_ignore_ascii_case(b"close");
                    close |= is_close;
                    // Another name it lists would be stripped as well: a map's work.
                    if !(is_close || t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive")) {
                        raw = None;
                    }
                }
                Kind::HopByHop
            }
            Field::HopByHop => Kind::HopByHop,
            Field::RequestId => Kind::RequestId,
            Field::Date => Kind::Date,
            // A gRPC answer's status is counted from its header map.
            Field::ContentType if super::grpc::is_grpc_type(value) => {
                raw = None;
                Kind::Pass
            }
            Field::ContentType | Field::Other => Kind::Pass,
        };
        if let Some(r) = &mut raw {
            r.push(span, kind);
        }
    }
    let mut headers = match raw {
        Some(_) => None,
        None => {
            // Room for the few the gateway adds (the request ID) without growing.
            let mut headers = crate::header_maps::take(n + 2);
            for &span in &*spans {
                let (name, value) = header_field(&head, span)?;
                headers.append(name, value);
            }
            Some(headers)
        }
    };

    let no_body = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else if transfer_coded {
        if length.is_some() {
            // RFC 9112 §6.3: Transfer-Encoding wins; the length is a smuggling hazard.
            match (&mut headers, &mut raw) {
                (Some(h), _) => drop(h.remove(header::CONTENT_LENGTH)),
                (None, Some(r)) => r.drop_lengths(),
                (None, None) => {}
            }
            close = true;
        }
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if framing == Framing::Close {
        close = true;
    }
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = Version::HTTP_11;
    if let Some(h) = headers {
        parts.headers = h;
    }
    Ok(Some(Parsed::Final(Head {
        parts,
        raw,
        framing,
        keep_alive: !close,
    })))
}

/// [`parse_head`] for other modules' tests: the final head of `raw` (status, map, and the
/// fields when kept as they came), or `None` when it is incomplete or refused.
#[cfg(test)]
pub(crate) fn final_head(
    raw: &[u8],
    method: &Method,
) -> Option<(http::response::Parts, Option<RawFields>)> {
    let mut buf = BytesMut::from(raw);
    loop {
        match parse_head(&mut buf, method).ok()?? {
            Parsed::Final(h) => return Some((h.parts, h.raw)),
            Parsed::Interim => continue,
        }
    }
}

/// What the response parser looks for in a field name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentLength,
    TransferEncoding,
    Connection,
    /// Another hop-by-hop field (see `headers::strip_hop_by_hop`).
    HopByHop,
    ContentType,
    Date,
    RequestId,
    Other,
}

impl Field {
    /// The field a name (in lower case) is.
    fn of(name: &[u8]) -> Self {
        match name {
            b"content-length" => Self::ContentLength,
            b"transfer-encoding" => Self::TransferEncoding,
            b"connection" => Self::Connection,
            b"keep-alive" | b"proxy-connection" | b"te" | b"trailer" | b"upgrade" => Self::HopByHop,
            b"content-type" => Self::ContentType,
            b"date" => Self::Date,
            b"x-request-id" => Self::RequestId,
            _ => Self::Other,
        }
    }
}

/// Where a field sits in a head: name start, name length, value start, value length.
type Span = (u16, u16, u16, u16);

/// The field at `span` of `head` as a header map holds it (the value a slice of `head`).
fn header_field(head: &Bytes, (ns, nl, vs, vl): Span) -> Result<(HeaderName, HeaderValue), Error> {
    let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
    let name = crate::names::header_name(&head[ns..ns + nl])
        .map_err(|_| Error::Invalid("bad header name"))?;
    let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
        .map_err(|_| Error::Invalid("bad header value"))?;
    Ok((name, value))
}

/// A `Content-Length` value: digits only (a list of equal values is refused too).
fn parse_length(v: &[u8]) -> Result<u64, Error> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(Error::Invalid("bad content-length"));
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

// === body decoding ===

#[derive(Debug)]
enum Decoder {
    Length(u64),
    Chunked(Chunk),
    Close,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes of trailers so far.
    Trailers(usize),
    Done,
}

enum Step {
    Data(Bytes),
    NeedMore,
    Done,
}

impl Decoder {
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Error> {
        match self {
            Decoder::Length(0) => Ok(Step::Done),
            Decoder::Length(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                Ok(Step::Data(buf.split_to(n).freeze()))
            }
            Decoder::Close => {
                if buf.is_empty() {
                    Ok(Step::NeedMore)
                } else {
                    Ok(Step::Data(buf.split().freeze()))
                }
            }
            Decoder::Chunked(state) => loop {
                match *state {
                    Chunk::Done => return Ok(Step::Done),
                    Chunk::Size => {
                        let Some(line) = take_line(buf, MAX_CHUNK_LINE, "chunk size line")? else {
                            return Ok(Step::NeedMore);
                        };
                        let size = parse_chunk_size(&line)?;
                        *state = if size == 0 {
                            Chunk::Trailers(0)
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Step::NeedMore);
                        }
                        let n = left.min(buf.len() as u64) as usize;
                        *state = if n as u64 == left {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left - n as u64)
                        };
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Step::NeedMore);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(Error::Invalid("chunk data not followed by CRLF"));
                        }
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers(seen) => {
                        let Some(line) = take_line(buf, MAX_CHUNK_LINE, "trailer line")? else {
                            return Ok(Step::NeedMore);
                        };
                        let seen = seen + line.len() + 2;
                        if seen > MAX_TRAILER_BYTES {
                            return Err(Error::Invalid("trailers too large"));
                        }
                        *state = if line.is_empty() {
                            Chunk::Done
                        } else {
                            Chunk::Trailers(seen)
                        };
                    }
                }
            },
        }
    }
}

/// One CRLF-terminated line from the front of `buf` (without its CRLF), or `None` when it is
/// not all there yet.
fn take_line(buf: &mut BytesMut, max: usize, what: &'static str) -> Result<Option<Bytes>, Error> {
    let Some(nl) = buf.iter().take(max + 2).position(|&b| b == b'\n') else {
        return if buf.len() > max + 1 {
            Err(Error::Invalid(what))
        } else {
            Ok(None)
        };
    };
    if nl == 0 || buf[nl - 1] != b'\r' {
        return Err(Error::Invalid("line not ended by CRLF"));
    }
    let line = buf.split_to(nl + 1).freeze();
    Ok(Some(line.slice(..nl - 1)))
}

/// `chunk-size [ BWS ; chunk-ext ]`: hex digits, at most 16 of them.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(Error::Invalid("bad chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(Error::Invalid("bad chunk size"));
    }
    let s = std::str::from_utf8(&line[..digits]).map_err(|_| Error::Invalid("bad chunk size"))?;
    u64::from_str_radix(s, 16).map_err(|_| Error::Invalid("bad chunk size"))
}

// === impl ResponseBody ===

impl Streaming {
    /// Report `e` on the next poll, not this one. What the upstream sent before failing is
    /// passed on first: hyper's server writes a response head together with the first body
    /// data it can get, and a body that fails before that write is flushed makes it drop
    /// both (the client would see no answer at all instead of a cut one). Yielding once lets
    /// the write happen.
    fn fail(
        &mut self,
        e: Error,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.failed = Some(e);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        let s = match &mut this.state {
            State::Full(b) => {
                let b = b.take();
                this.state = State::Done;
                return Poll::Ready(b.map(|b| Ok(Frame::data(b))));
            }
            State::Done => return Poll::Ready(None),
            State::Streaming(s) => s,
        };
        if let Some(e) = s.failed.take() {
            this.state = State::Done;
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match s.decoder.step(&mut s.conn.rbuf) {
                Ok(Step::Data(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                Ok(Step::Done) => {
                    let State::Streaming(s) = std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("matched above")
                    };
                    if s.keep_alive && s.conn.rbuf.is_empty() {
                        (s.home)(s.conn);
                    }
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => return s.fail(e, cx),
            }
            match ready!(s.conn.poll_fill(cx)) {
                Ok(0) if matches!(s.decoder, Decoder::Close) => {
                    this.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return s.fail(Error::Closed, cx),
                Ok(_) => {}
                Err(e) => return s.fail(e.into(), cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Full(b) => b.is_none(),
            State::Done => true,
            State::Streaming(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests;
