//! One access log line, as `tidegate replay` reads it: the fields of the gateway's JSON access
//! log (`server.access_log.format: json`) that a decision needs, borrowed from the line
//! wherever JSON escaping allows (no allocation for the usual line).

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

/// The access log's target: lines of other targets are the gateway's other logs.
pub const ACCESS_TARGET: &str = "tidegate::access";

/// The fields of an access log line that a replay reads. All optional: a line of an older
/// gateway, or of another target, lacks some and is reported, not fatal.
#[derive(Debug, Default, Deserialize)]
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
        serde_json::from_slice(bytes)
    }

    /// An identity field as the decision sees it: `none` is absent.
    pub fn id<'b>(v: &'b Option<Cow<'a, str>>) -> Option<&'b str> {
        v.as_deref().filter(|s| *s != "none" && !s.is_empty())
    }
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
