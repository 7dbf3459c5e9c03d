//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` a request
//! arrives with is continued, or a new trace started when it is absent or invalid; the
//! gateway's own span gets a fresh span ID, which the upstream sees as its parent.
//! `tracestate` is passed on unchanged when it is well formed and within the spec's
//! bounds, and dropped otherwise.
//!
//! Everything here is fixed-size and on the stack: a request's [`TraceContext`] is `Copy`,
//! and IDs are formatted into byte arrays, never a `String`. Sampled spans are exported
//! over OTLP by [`export`], off the request path.

pub mod export;
pub mod otlp;

use http::{HeaderMap, HeaderName, HeaderValue};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Most list members in `tracestate` (W3C Trace Context §3.3.1).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;
/// Longest `tracestate`, in bytes, all fields together (the spec's 512 characters).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// Length of a version-00 `traceparent`: `vv-<32 hex>-<16 hex>-ff`.
const TRACEPARENT_LEN: usize = 55;
/// Length of `traceparent: <value>\r\n`.
pub const TRACEPARENT_LINE_LEN: usize = 13 + TRACEPARENT_LEN + 2;
const SAMPLED: u8 = 0x01;

/// The trace a request belongs to and the gateway's span in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The gateway's span: the parent the upstream is told.
    pub span_id: [u8; 8],
    /// The caller's span, when the request continued a trace.
    pub parent_id: Option<[u8; 8]>,
    /// Whether this request's span is recorded (and, with an exporter, exported).
    pub sampled: bool,
}

/// What an incoming, valid `traceparent` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// How the gateway decides whether a request's span is sampled, from `server.tracing`.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    /// Draws below this (out of `u64::MAX`) are sampled: `sample_ratio` scaled.
    threshold: u64,
    /// Always sample (`sample_ratio` 1: the threshold cannot express it).
    always: bool,
    /// Whose `sampled` flag is followed.
    pub parent: ParentSampled,
}

/// Whose `sampled` flag a continued trace follows (`server.tracing.parent_sampled`).
pub use rules::model::ParentSampled;

// === impl TraceContext ===

impl TraceContext {
    /// The context of a request with these headers: continue a valid `traceparent`, else
    /// start a new trace (and drop any `tracestate`, which belongs to the trace it came
    /// with). `trusted` says the peer is one of `server.trusted_proxies`; `draw` is a
    /// uniformly random number for the sampling decision, `ids` three more for the new
    /// IDs (trace ID high and low halves, span ID).
    /// The headers are left without a `traceparent`: the upstream's is written from the
    /// context as the request goes out ([`Self::put`], or [`Self::header_line`] straight
    /// into an HTTP/1 head), so the common request never grows its header map for it.
    pub fn continue_or_start(
        headers: &mut HeaderMap,
        sampler: &Sampler,
        trusted: bool,
        draw: u64,
        ids: [u64; 3],
    ) -> Self {
        let found = find(headers);
        let (parent, present) = match found.traceparent {
            Found::One(v) => (parse_traceparent(v.as_bytes()), true),
            Found::Many => (None, true),
            Found::None => (None, false),
        };
        if found.tracestate && (parent.is_none() || !tracestate_valid(headers)) {
            headers.remove(&TRACESTATE);
        }
        if present {
            headers.remove(&TRACEPARENT);
        }
        let span_id = nonzero_span(ids[2]);
        match parent {
            Some(p) => Self {
                trace_id: p.trace_id,
                span_id,
                parent_id: Some(p.span_id),
                sampled: sampler.decide(Some(p.sampled), trusted, draw),
            },
            None => Self {
                trace_id: nonzero_trace(u128::from(ids[0]) << 64 | u128::from(ids[1])),
                span_id,
                parent_id: None,
                sampled: sampler.decide(None, trusted, draw),
            },
        }
    }

    /// Put the `traceparent` the upstream gets in `headers`.
    pub fn put(&self, headers: &mut HeaderMap) {
        let mut buf = [0u8; TRACEPARENT_LEN];
        let v = HeaderValue::from_bytes(self.format(&mut buf)).expect("hex is a valid value");
        headers.insert(&TRACEPARENT, v);
    }

    /// `traceparent: <value>\r\n`: the upstream's field as a line of an HTTP/1 head.
    pub fn header_line<'b>(&self, buf: &'b mut [u8; TRACEPARENT_LINE_LEN]) -> &'b [u8] {
        const NAME: &[u8] = b"traceparent: ";
        let (name, rest) = buf.split_at_mut(NAME.len());
        name.copy_from_slice(NAME);
        let (value, end) = rest.split_at_mut(TRACEPARENT_LEN);
        self.format(value.try_into().expect("sized above"));
        end.copy_from_slice(b"\r\n");
        buf
    }

    /// `00-<trace id>-<span id>-<flags>`: the `traceparent` the upstream gets.
    pub fn format<'b>(&self, buf: &'b mut [u8; TRACEPARENT_LEN]) -> &'b [u8] {
        buf[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut buf[3..35]);
        buf[35] = b'-';
        hex_into(&self.span_id, &mut buf[36..52]);
        buf[52] = b'-';
        hex_into(&[u8::from(self.sampled)], &mut buf[53..55]);
        buf
    }

    /// The trace ID as 32 lowercase hex digits.
    pub fn trace_hex<'b>(&self, buf: &'b mut [u8; 32]) -> &'b str {
        hex_into(&self.trace_id, buf);
        std::str::from_utf8(buf).expect("hex is ASCII")
    }

    /// The span ID as 16 lowercase hex digits.
    pub fn span_hex<'b>(&self, buf: &'b mut [u8; 16]) -> &'b str {
        hex_into(&self.span_id, buf);
        std::str::from_utf8(buf).expect("hex is ASCII")
    }
}

// === impl Sampler ===

impl Sampler {
    /// `ratio` in 0..=1 of new traces sampled, and whose flag a continued trace follows.
    pub fn new(ratio: f64, parent: ParentSampled) -> Self {
        let ratio = ratio.clamp(0.0, 1.0);
        Self {
            threshold: (ratio * u64::MAX as f64) as u64,
            always: ratio >= 1.0,
            parent,
        }
    }

    /// Sample or not. A parent's flag is followed only from whom `parent` allows: an
    /// untrusted client that could set it would choose how much the gateway exports.
    /// The ratio is drawn by the gateway, not read from the trace ID, which a client
    /// chooses too.
    pub fn decide(&self, parent: Option<bool>, trusted: bool, draw: u64) -> bool {
        let follow = match self.parent {
            ParentSampled::Any => true,
            ParentSampled::TrustedProxies => trusted,
            ParentSampled::Never => false,
        };
        match parent {
            Some(flag) if follow => flag,
            _ => self.always || draw < self.threshold,
        }
    }
}

/// The request's `traceparent`, if it has exactly one and it is valid.
pub fn incoming(headers: &HeaderMap) -> Option<Parent> {
    match find(headers).traceparent {
        Found::One(v) => parse_traceparent(v.as_bytes()),
        Found::None | Found::Many => None,
    }
}

/// How many fields of a name a request has.
enum Found<'a> {
    None,
    One(&'a HeaderValue),
    Many,
}

/// The trace headers a request carries.
struct TraceHeaders<'a> {
    traceparent: Found<'a>,
    tracestate: bool,
}

/// The trace headers, in one pass over the fields. Most requests carry neither, and a
/// request head holds a few fields (at most `server.limits.max_headers`): comparing each
/// name's length first costs less than hashing both names for lookups that mostly miss.
fn find(headers: &HeaderMap) -> TraceHeaders<'_> {
    let mut t = TraceHeaders {
        traceparent: Found::None,
        tracestate: false,
    };
    for (name, value) in headers {
        let n = name.as_str();
        if n.len() == TRACEPARENT.as_str().len() && n == TRACEPARENT.as_str() {
            t.traceparent = match t.traceparent {
                Found::None => Found::One(value),
                Found::One(_) | Found::Many => Found::Many,
            };
        } else if n.len() == TRACESTATE.as_str().len() && n == TRACESTATE.as_str() {
            t.tracestate = true;
        }
    }
    t
}

/// A `traceparent` value per W3C Trace Context §3.2: `version-traceid-parentid-flags`,
/// lowercase hex only, neither ID all zeros, version `ff` invalid. A version after 00 may
/// carry more fields after a `-`; its first four are read as version 00's.
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    if version == 0xff
        || (version == 0 && v.len() != TRACEPARENT_LEN)
        || (v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-')
        || v[2] != b'-'
        || v[35] != b'-'
        || v[52] != b'-'
    {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    unhex_into(&v[3..35], &mut trace_id)?;
    unhex_into(&v[36..52], &mut span_id)?;
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & SAMPLED != 0,
    })
}

/// Whether every `tracestate` field is a well-formed list (W3C Trace Context §3.3) and all
/// of them together hold at most [`MAX_TRACESTATE_MEMBERS`] members in at most
/// [`MAX_TRACESTATE_BYTES`] bytes. True when there is none.
pub fn tracestate_valid(headers: &HeaderMap) -> bool {
    let (mut members, mut bytes) = (0usize, 0usize);
    for v in headers.get_all(&TRACESTATE) {
        bytes += v.len();
        if bytes > MAX_TRACESTATE_BYTES {
            return false;
        }
        for m in v.as_bytes().split(|&b| b == b',') {
            let m = m.trim_ascii();
            // Empty list members are allowed and not counted.
            if m.is_empty() {
                continue;
            }
            members += 1;
            if members > MAX_TRACESTATE_MEMBERS || !member_valid(m) {
                return false;
            }
        }
    }
    true
}

/// `key=value`: key `[a-z0-9][a-z0-9_\-*/]{0,255}`, or `tenant@system` with each side of the
/// same alphabet (tenant up to 241, system up to 14); value 1..=256 printable ASCII
/// except `,` and `=`, not ending in a space.
fn member_valid(m: &[u8]) -> bool {
    let Some(eq) = m.iter().position(|&b| b == b'=') else {
        return false;
    };
    let (key, value) = (&m[..eq], &m[eq + 1..]);
    let key_ok = match key.iter().position(|&b| b == b'@') {
        None => key_part_valid(key, 256),
        Some(at) => key_part_valid(&key[..at], 241) && key_part_valid(&key[at + 1..], 14),
    };
    key_ok
        && (1..=256).contains(&value.len())
        && value.last() != Some(&b' ')
        && value
            .iter()
            .all(|&b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
}

fn key_part_valid(k: &[u8], max: usize) -> bool {
    matches!(k.first(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && k.len() <= max
        && k.iter()
            .all(|&b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/'))
}

/// Lowercase hex only: the spec makes uppercase invalid.
fn unhex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(unhex(two[0])? << 4 | unhex(two[1])?)
}

fn unhex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = hex_byte(pair)?;
    }
    Some(())
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    let mut words = bytes.chunks_exact(4);
    let mut digits = out.chunks_exact_mut(8);
    for (w, d) in (&mut words).zip(&mut digits) {
        let w = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
        d.copy_from_slice(&hex_word(w).to_be_bytes());
    }
    for (&b, pair) in words
        .remainder()
        .iter()
        .zip(digits.into_remainder().chunks_exact_mut(2))
    {
        pair.copy_from_slice(&hex_word(u32::from(b)).to_be_bytes()[6..]);
    }
}

/// The 8 lowercase hex digits of `x`, most significant first in the big-endian bytes:
/// each nibble spread into a byte of its own, then turned into `0`-`9` or `a`-`f` for all
/// eight at once (IDs are formatted on every request).
fn hex_word(x: u32) -> u64 {
    let x = u64::from(x);
    let mut v = (x & 0xffff_0000) << 16 | (x & 0xffff);
    v = (v & 0x0000_ff00_0000_ff00) << 8 | (v & 0x0000_00ff_0000_00ff);
    v = (v & 0x00f0_00f0_00f0_00f0) << 4 | (v & 0x000f_000f_000f_000f);
    // 1 in each byte whose nibble is 10 or more: those get `a` - `0` - 10 more.
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    v + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10)
}

/// A random ID is all zeros once in 2^128 draws; the spec forbids it, so it becomes 1.
fn nonzero_trace(r: u128) -> [u8; 16] {
    r.max(1).to_be_bytes()
}

fn nonzero_span(r: u64) -> [u8; 8] {
    r.max(1).to_be_bytes()
}

#[cfg(test)]
mod tests;
