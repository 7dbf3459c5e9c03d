//! Writing a response on the fast path: the head, framed as hyper frames it, then the body
//! streamed with backpressure. The head and as much of the body as is ready at once go out
//! in one `write` (a small answer: one syscall).

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Buf;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Response, StatusCode, Version, header};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{connection_has, digits};
use crate::pipeline::{RespBody, X_REQUEST_ID, take_raw};
use crate::upstream::h1::RawFields;

/// Buffered body bytes flushed at this size.
const FLUSH_AT: usize = 64 * 1024;

/// What of the request the response's head depends on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request<'a> {
    pub(super) version: Version,
    pub(super) head_only: bool,
    /// Sent as `X-Request-Id` (any the response has is dropped).
    pub(super) id: &'a HeaderValue,
}

/// How the body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body bytes are written.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (HTTP/1.0, size unknown).
    Close,
}

/// Write `resp` to `io`, using `out` as the write buffer. Returns whether the connection
/// stays open (`keep_alive` and nothing in the answer closing it).
pub(super) async fn response<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    resp: &mut Response<RespBody>,
    req: Request<'_>,
    keep_alive: bool,
) -> std::io::Result<bool> {
    out.clear();
    let raw = take_raw(resp.body_mut());
    let reason = (resp.extensions())
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| r.as_bytes());
    let (framing, keep) = head(
        out,
        resp.status(),
        reason,
        raw.as_ref(),
        resp.headers(),
        resp.body().size_hint().exact(),
        req,
        keep_alive,
    );
    crate::header_maps::give(std::mem::take(resp.headers_mut()));
    let body = resp.body_mut();
    if framing == Framing::None {
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(keep);
    }
    let mut written = 0u64;
    loop {
        // What is ready now goes with what is buffered; only a wait flushes first.
        let frame = match body.frame().now_or_never() {
            Some(f) => f,
            None => {
                if !out.is_empty() {
                    io.write_all(out).await?;
                    io.flush().await?;
                    out.clear();
                }
                body.frame().await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                // The status is sent: cut the response (as hyper does).
                return Err(std::io::Error::other(e));
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue, // trailers: hyper sends them only when declared
            },
        };
        if data.is_empty() {
            continue;
        }
        written += data.len() as u64;
        match framing {
            Framing::Length(n) if written > n => {
                return Err(std::io::Error::other("body longer than its length"));
            }
            Framing::Chunked => {
                chunk_size(out, data.len());
                out.extend_from_slice(data.chunk());
                out.extend_from_slice(b"\r\n");
            }
            _ => out.extend_from_slice(data.chunk()),
        }
        if out.len() >= FLUSH_AT {
            io.write_all(out).await?;
            out.clear();
        }
    }
    match framing {
        Framing::Length(n) if written != n => {
            return Err(std::io::Error::other("body shorter than its length"));
        }
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        _ => {}
    }
    io.write_all(out).await?;
    io.flush().await?;
    Ok(keep && framing != Framing::Close)
}

/// Write the response head into `out`: status line, fields (the upstream's kept as they
/// came, then the map's), framing, `date`, `connection` as needed. Returns the body's framing
/// and whether the connection stays open.
#[allow(clippy::too_many_arguments)]
pub(super) fn head(
    out: &mut Vec<u8>,
    status: StatusCode,
    reason: Option<&[u8]>,
    raw: Option<&RawFields>,
    headers: &HeaderMap,
    exact: Option<u64>,
    req: Request<'_>,
    keep_alive: bool,
) -> (Framing, bool) {
    // One pass over the fields for what the framing depends on (a map look-up each would
    // hash the name every time).
    let mut keep = keep_alive;
    let (mut says_close, mut says_keep_alive) = (false, false);
    let mut declared_field = None;
    for (name, value) in headers.iter() {
        if name == header::CONNECTION {
            says_close |= connection_has(value.as_bytes(), b"close");
            says_keep_alive |= connection_has(value.as_bytes(), b"keep-alive");
        } else if name == header::CONTENT_LENGTH && declared_field.is_none() {
            declared_field = Some(value);
        }
    }
    if says_close {
        keep = false;
    }
    let code = status.as_u16();
    let no_length = status.is_informational() || code == 204 || code == 304;
    let can_body = !(req.head_only || no_length);
    // A length where none may be is not passed on (a 304's describes the resource).
    let drop_length = no_length && code != 304;
    let declared = match raw.and_then(RawFields::declared) {
        Some(n) => Some(n),
        None => declared_field.and_then(|v| digits(v.as_bytes())),
    }
    .filter(|_| !drop_length);
    let mut add_length = None;
    let mut chunked = false;
    let mut framing = match (declared, exact) {
        (Some(n), _) => Framing::Length(n),
        (None, Some(n)) => {
            // hyper: `content-length: 0` only where a zero is not implied otherwise.
            if !no_length && (n > 0 || !req.head_only) {
                add_length = Some(n);
            }
            Framing::Length(n)
        }
        (None, None) if req.version == Version::HTTP_11 && can_body => {
            chunked = true;
            Framing::Chunked
        }
        (None, None) if can_body => Framing::Close,
        (None, None) => Framing::None,
    };
    if !can_body {
        framing = Framing::None;
    }
    if framing == Framing::Close {
        keep = false;
    }
    // Status line.
    out.extend_from_slice(match req.version {
        Version::HTTP_10 => b"HTTP/1.0 ",
        _ => b"HTTP/1.1 ",
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match reason {
        Some(r) => out.extend_from_slice(r),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    // Connection: what the version needs said.
    let add_connection: Option<&[u8]> = match req.version {
        Version::HTTP_10 if keep && !says_keep_alive => Some(b"keep-alive"),
        Version::HTTP_10 => None,
        _ if !keep && !says_close => Some(b"close"),
        _ => None,
    };
    let mut has_date = false;
    if let Some(raw) = raw {
        raw.write(out, drop_length);
        has_date = raw.has_date();
    }
    for (name, value) in headers.iter() {
        if name == header::DATE {
            has_date = true;
        } else if *name == X_REQUEST_ID
            || name == header::TRANSFER_ENCODING
            || (drop_length && name == header::CONTENT_LENGTH)
        {
            // The request ID is the gateway's, below; so is the framing, which replaces any
            // coding the response arrived with.
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(req.id.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(c) = add_connection {
        out.extend_from_slice(b"connection: ");
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = add_length {
        out.extend_from_slice(b"content-length: ");
        decimal(out, n);
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep)
}

/// `n` in decimal.
fn decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A chunk's size line.
fn chunk_size(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The current `date` value (IMF-fixdate), formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let s = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
            if s.len() == 29 {
                d.1.copy_from_slice(s.as_bytes());
                d.0 = secs;
            }
        }
        out.extend_from_slice(&d.1);
    });
}
