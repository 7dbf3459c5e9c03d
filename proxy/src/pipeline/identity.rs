//! The identity phase, after the head and before the decision: with `identity.jwt`, the
//! request's token is verified and the identity headers are made to say what was verified.
//!
//! Every copy of a header the gateway writes from a claim (`user_header`, `app_header`) that
//! the client sent is dropped first, whatever the outcome: a verified request carries the
//! token's IDs, an anonymous one (`required: false` and no valid token) carries none, so it
//! is bucketed and limited by its client address. With `required: true` a request without
//! a valid token is refused with 401 and nothing is decided, spent or forwarded.

use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;

use crate::jwt::{TokenError, Verifier};
use crate::runtime::Runtime;

/// What the identity phase made of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No `identity.jwt`: the IDs are what the extractors read, unverified.
    Unchecked,
    /// A valid token; its IDs are in the identity headers.
    Verified,
    /// No valid token, and none required: no verified IDs.
    Anonymous(TokenError),
}

// === impl Verdict ===

impl Verdict {
    /// The access log's `identity` field.
    pub fn log_field(self) -> &'static str {
        match self {
            Self::Unchecked => "unverified",
            Self::Verified => "verified",
            Self::Anonymous(e) => e.code(),
        }
    }
}

/// The phase: nothing without `identity.jwt`, else [`verify`] now, counted in
/// `tidegate_identity_total`.
pub fn phase(rt: &Runtime, headers: &mut HeaderMap) -> Result<Verdict, TokenError> {
    let Some(v) = &rt.identity else {
        return Ok(Verdict::Unchecked);
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let out = verify(headers, v, now);
    rt.metrics.identity.count(match out {
        Ok(Verdict::Anonymous(e)) => Ok(Some(e)),
        Ok(_) => Ok(None),
        Err(e) => Err(e),
    });
    out
}

/// Verify the request's token at `now` (Unix seconds) and set the identity headers from
/// it. `Err` is a refusal (the token is required). Out of line: a token's decoding keeps
/// about a kilobyte of locals, which the request path's frame should not reserve for
/// gateways that verify none (a signature check costs far more than the call).
#[inline(never)]
pub fn verify(headers: &mut HeaderMap, v: &Verifier, now: u64) -> Result<Verdict, TokenError> {
    let result = v.token(headers).and_then(|t| v.verify(t, now));
    let s = v.settings();
    for claim in [&s.user, &s.app].into_iter().flatten() {
        headers.remove(&claim.header);
    }
    match result {
        Ok(ids) => {
            let pairs = [(&s.user, &ids.user), (&s.app, &ids.app)];
            for (claim, id) in pairs {
                if let (Some(c), Some(id)) = (claim, id) {
                    headers.insert(c.header.clone(), id.clone());
                }
            }
            Ok(Verdict::Verified)
        }
        Err(e) if s.required => Err(e),
        Err(e) => Ok(Verdict::Anonymous(e)),
    }
}
