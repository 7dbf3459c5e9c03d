//! One access log line, as `tidegate replay` reads it: the fields of the gateway's JSON access
//! log (`server.access_log.format: json`) that a decision needs, borrowed from the line
//! wherever JSON escaping allows (no allocation for the usual line).
//!
//! The gateway's own lines are a flat object of strings without escapes and integers: [`scan`]
//! reads those in one pass, several times faster than `serde_json` (whose generic string
//! handling, UTF-8 checks per string and field visitor were about half of a replay's
//! instructions). Anything else (an escape, a nested value, whitespace, a fraction, a
//! duplicate field, invalid JSON) it declines, and `serde_json` decides, so the result is
//! `serde_json`'s either way (the property test `scan_agrees_with_serde_json` holds it to
//! that).

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

/// The access log's target: lines of other targets are the gateway's other logs.
pub const ACCESS_TARGET: &str = "tidegate::access";

/// The fields of an access log line that a replay reads. All optional: a line of an older
/// gateway, or of another target, lacks some and is reported, not fatal.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Line<'a> {
    /// `tidegate::access` for access log lines.
    #[serde(borrow)]
    pub target: Option<Cow<'a, str>>,
    /// When the request was decided, in microseconds since the Unix epoch.
    pub at_us: Option<u64>,
    /// The method.
    #[serde(borrow)]
    pub method: Option<Cow<'a, str>>,
    /// The path (no query), possibly cut (then ending in `…`).
    #[serde(borrow)]
    pub path: Option<Cow<'a, str>>,
    /// The client address the gateway decided for.
    #[serde(borrow)]
    pub client: Option<Cow<'a, str>>,
    /// The app (`none`: no app).
    #[serde(borrow)]
    pub app: Option<Cow<'a, str>>,
    /// The user (`none`: no user).
    #[serde(borrow)]
    pub user: Option<Cow<'a, str>>,
    /// What the decision came to (`forward`, `limited`, ...).
    #[serde(borrow)]
    pub decision: Option<Cow<'a, str>>,
    /// The route rule.
    #[serde(borrow)]
    pub route: Option<Cow<'a, str>>,
    /// The upstream that answered.
    #[serde(borrow)]
    pub upstream: Option<Cow<'a, str>>,
    /// The limit, fallback or breaker that answered.
    #[serde(borrow)]
    pub rule: Option<Cow<'a, str>>,
    /// The header values the recording config's rules read.
    #[serde(borrow)]
    pub inputs: Option<Cow<'a, str>>,
}

/// Why the inputs of a line cannot be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputsError {
    /// A header the replayed rules read was logged by name alone (its value was over the
    /// log's bound).
    Cut,
    /// Not `name=value&...` with valid percent-encoding and header syntax.
    Malformed,
}

// === impl Line ===

impl<'a> Line<'a> {
    /// Parse one line (without its newline).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, serde_json::Error> {
        match scan(bytes) {
            Some(line) => Ok(line),
            None => serde_json::from_slice(bytes),
        }
    }

    /// An identity field as the decision sees it: `none` is absent.
    pub fn id<'b>(v: &'b Option<Cow<'a, str>>) -> Option<&'b str> {
        v.as_deref().filter(|s| *s != "none" && !s.is_empty())
    }
}

/// Read a line the way the gateway writes it, or `None` to leave it to `serde_json` (see the
/// module docs): `{"key":value,...}` with no whitespace, keys and string values without
/// escapes or control characters, integer values without fraction or exponent, `true`,
/// `false` and `null` in fields a replay does not read, and no field a replay reads twice.
/// Whatever it returns, `serde_json::from_slice` returns too.
pub fn scan(bytes: &[u8]) -> Option<Line<'_>> {
    // Control characters are refused inside JSON strings and are whitespace (declined)
    // outside them; one pass over the line, then no string needs its own check.
    // (In chunks, without an early exit per byte, so that it vectorizes.)
    let control = |c: &[u8]| c.iter().fold(false, |any, &b| any | (b < 0x20));
    if bytes.chunks(64).any(control) {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let b = text.as_bytes();
    let mut line = Line::default();
    let mut i = 1;
    if b.first() != Some(&b'{') {
        return None;
    }
    if b.get(1) == Some(&b'}') {
        return (b.len() == 2).then_some(line);
    }
    // Fields read, by bit: a second one is an error to serde's derive.
    let mut read = 0u16;
    loop {
        let key = scan_str(text, &mut i)?;
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        let slot = match key {
            "target" => Some((0, &mut line.target)),
            "method" => Some((1, &mut line.method)),
            "path" => Some((2, &mut line.path)),
            "client" => Some((3, &mut line.client)),
            "app" => Some((4, &mut line.app)),
            "user" => Some((5, &mut line.user)),
            "decision" => Some((6, &mut line.decision)),
            "route" => Some((7, &mut line.route)),
            "upstream" => Some((8, &mut line.upstream)),
            "rule" => Some((9, &mut line.rule)),
            "inputs" => Some((10, &mut line.inputs)),
            _ => None,
        };
        let at_us = key == "at_us";
        let bit = match (&slot, at_us) {
            (Some((n, _)), _) => 1 << n,
            (None, true) => 1 << 11,
            (None, false) => 0,
        };
        if read & bit != 0 {
            return None;
        }
        read |= bit;
        match *b.get(i)? {
            b'"' if !at_us => {
                let v = scan_str(text, &mut i)?;
                if let Some((_, field)) = slot {
                    *field = Some(Cow::Borrowed(v));
                }
            }
            b'-' | b'0'..=b'9' if slot.is_none() => {
                let n = scan_int(b, &mut i)?;
                if at_us {
                    line.at_us = Some(n?);
                }
            }
            b't' | b'f' | b'n' if bit == 0 => {
                let rest = &b[i..];
                let lit = [&b"true"[..], b"false", b"null"]
                    .into_iter()
                    .find(|l| rest.starts_with(l))?;
                i += lit.len();
            }
            _ => return None,
        }
        match b.get(i)? {
            b',' => i += 1,
            b'}' => return (i + 1 == b.len()).then_some(line),
            _ => return None,
        }
    }
}

/// The string starting at `text[*i]` (a `"`), without escapes; `*i` moves past it.
#[inline(always)]
fn scan_str<'a>(text: &'a str, i: &mut usize) -> Option<&'a str> {
    let b = text.as_bytes();
    if b.get(*i) != Some(&b'"') {
        return None;
    }
    let start = *i + 1;
    let len = quote_or_backslash(&b[start..])?;
    let end = start + len;
    if b[end] != b'"' {
        return None;
    }
    *i = end + 1;
    // Both ends are ASCII quotes in valid UTF-8: char boundaries.
    Some(&text[start..end])
}

/// The first `"` or `\\` in `b`, eight bytes at a time: the access log's strings are short,
/// too short for a SIMD search's set-up to pay.
#[inline(always)]
fn quote_or_backslash(b: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte of `x` is zero: its high bit in the result (exact for the lowest such byte).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut chunks = b.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let x = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        let hit = zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\')));
        if hit != 0 {
            return Some(at + hit.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let rest = chunks
        .remainder()
        .iter()
        .position(|&c| c == b'"' || c == b'\\');
    rest.map(|p| at + p)
}

/// The integer starting at `b[*i]`: `Some(Some(n))` for one that fits a `u64`, `Some(None)`
/// for another valid JSON integer (negative, or too big), `None` for anything else (a
/// fraction or exponent included: declined, not misread); `*i` moves past it.
fn scan_int(b: &[u8], i: &mut usize) -> Option<Option<u64>> {
    let neg = b[*i] == b'-';
    let start = *i + usize::from(neg);
    let digits = b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
    let end = start + digits;
    if digits == 0 || (digits > 1 && b[start] == b'0') {
        return None;
    }
    if matches!(b.get(end), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    *i = end;
    let mut n: u64 = 0;
    for &d in &b[start..end] {
        let Some(m) = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
        else {
            return Some(None);
        };
        n = m;
    }
    Some((!neg).then_some(n))
}

/// Decode the `inputs` field into `out` (cleared first), keeping only the headers `wanted`
/// finds a name for (those the replayed rules read), and setting `seen[i]` for each
/// `wanted` header `i` found. `scratch` is reused for percent-decoding.
pub fn decode_inputs(
    inputs: &str,
    wanted: impl Fn(&str) -> Option<(usize, HeaderName)>,
    out: &mut HeaderMap,
    seen: &mut [bool],
    scratch: &mut Vec<u8>,
) -> Result<(), InputsError> {
    out.clear();
    if inputs.is_empty() {
        return Ok(());
    }
    for piece in inputs.split('&') {
        let (name, value) = match piece.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (piece, None),
        };
        let Some((i, header)) = wanted(name) else {
            continue;
        };
        seen[i] = true;
        let Some(value) = value else {
            return Err(InputsError::Cut);
        };
        percent_decode(value.as_bytes(), scratch)?;
        let v = HeaderValue::from_bytes(scratch).map_err(|_| InputsError::Malformed)?;
        out.append(header, v);
    }
    Ok(())
}

fn percent_decode(s: &[u8], out: &mut Vec<u8>) -> Result<(), InputsError> {
    out.clear();
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16).ok_or(InputsError::Malformed);
                let (hi, lo) = match (s.get(i + 1), s.get(i + 2)) {
                    (Some(&h), Some(&l)) => (hex(h)?, hex(l)?),
                    _ => return Err(InputsError::Malformed),
                };
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
