//! Degradation, compiled: fallback rules (answer locally, for all matching users or a sticky
//! fraction of them) and circuit breaker definitions.
//!
//! Canned answers are built here, once per load: status, header names and values, and the
//! body as [`Bytes`], so serving one costs a refcount bump, not a serialization. The breaker
//! *state* (windows, open/half-open) is the proxy's; this module only says which breaker
//! guards a request and with what thresholds.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode, header};

use crate::bucket::{BUCKETS, Weight, parse_percent};
use crate::ids::UpstreamId;
use crate::matcher::CompiledMatch;
use crate::model::{Fallback, RuleMode};
use crate::route::{BucketKey, CompiledNoUserKey, RouteInput, bucket_of};

/// A response the gateway makes itself, ready to send.
#[derive(Debug, Clone)]
pub struct CompiledResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers, `content-type` included.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body (JSON).
    pub body: Bytes,
}

/// A fallback rule, compiled.
#[derive(Debug)]
pub struct CompiledFallback {
    /// Its name.
    pub name: Box<str>,
    /// Its conditions.
    pub matcher: CompiledMatch,
    /// Users answered locally, in parts per million (1,000,000: all).
    pub fraction_ppm: u32,
    /// Salt of its user buckets.
    pub salt: Box<str>,
    /// The answer.
    pub response: CompiledResponse,
    /// `enforce`, or `dry_run`: decided and counted, never answered.
    pub mode: RuleMode,
    pub(crate) no_user_key: CompiledNoUserKey,
}

/// A fallback that applies to a request.
#[derive(Debug, Clone, Copy)]
pub struct FallbackDecision<'s> {
    /// Index in the snapshot's fallbacks.
    pub rule_id: u32,
    /// The rule's name (precomputed: clone it for logs and metrics).
    pub rule_name: &'s Arc<str>,
    /// The rule.
    pub rule: &'s CompiledFallback,
    /// The request's bucket and what it was computed from; `None` when the rule applies to
    /// every user (no bucket needed).
    pub bucket: Option<(u32, BucketKey)>,
}

/// A circuit breaker definition, compiled.
#[derive(Debug, Clone)]
pub struct CompiledBreaker {
    /// Its name.
    pub name: Box<str>,
    /// The upstream it guards.
    pub upstream: UpstreamId,
    /// The route rule it is restricted to, if any.
    pub route: Option<u32>,
    /// Sliding window length.
    pub window: Duration,
    /// Calls in the window before it may open.
    pub min_calls: u32,
    /// Failure share that opens it, in ppm.
    pub error_ratio_ppm: u32,
    /// Calls at least this slow count as slow; `None`: slowness not watched.
    pub slow_call: Option<Duration>,
    /// Slow share that opens it, in ppm.
    pub slow_ratio_ppm: u32,
    /// Time open before half-opening.
    pub open_for: Duration,
    /// Probes let through while half-open.
    pub half_open_probes: u32,
    /// While open: the answer, or the upstream to use instead.
    pub when_open: WhenOpen,
    /// `mode: dry_run`: the state machine runs, but the breaker never refuses a request.
    pub dry_run: bool,
    /// A hash of the definition (with the upstream and route by name), so a reload can keep
    /// the state of an unchanged breaker.
    pub fingerprint: u64,
}

/// What an open breaker does with a request.
#[derive(Debug, Clone)]
pub enum WhenOpen {
    /// Answer locally.
    Respond(CompiledResponse),
    /// Send it to another upstream.
    Alternate(UpstreamId),
}

// === impl CompiledResponse ===

impl CompiledResponse {
    /// A response from its parsed parts; `content-type: application/json` is added unless
    /// `headers` has a content type.
    pub(crate) fn new(
        status: StatusCode,
        mut headers: Vec<(HeaderName, HeaderValue)>,
        body: &serde_json::Value,
    ) -> Self {
        if !headers.iter().any(|(k, _)| k == header::CONTENT_TYPE) {
            headers.push((
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ));
        }
        Self {
            status,
            headers,
            // A JSON value's Display is its compact serialization, and cannot fail.
            body: Bytes::from(body.to_string()),
        }
    }
}

// === impl CompiledFallback ===

impl CompiledFallback {
    /// The request's bucket under this rule's salt, and what it was computed from.
    pub fn bucket_of(&self, r: &RouteInput<'_>) -> (u32, BucketKey) {
        bucket_of(&self.salt, &self.no_user_key, r)
    }

    /// The request headers the rule reads: its conditions', its `no_user_key` header.
    pub(crate) fn header_names(&self) -> impl Iterator<Item = &HeaderName> {
        (self.matcher.header_names()).chain(self.no_user_key.header())
    }
}

/// A fallback's fraction in ppm (default: all).
pub(crate) fn fraction_ppm(f: &Fallback) -> Result<u32, String> {
    match f.fraction.as_deref() {
        None => Ok(BUCKETS),
        Some(s) => match parse_percent(s)? {
            Weight::Ppm(p) => Ok(p),
            Weight::Rest => Err(format!("{s:?}: a fraction is a percentage, not \"rest\"")),
        },
    }
}

/// A percentage in ppm (`"50%"`), refusing `"rest"`.
pub(crate) fn ratio_ppm(s: &str) -> Result<u32, String> {
    match parse_percent(s)? {
        Weight::Ppm(p) => Ok(p),
        Weight::Rest => Err(format!("{s:?}: a ratio is a percentage, not \"rest\"")),
    }
}
