//! Degradation, compiled: fallback rules (answer locally, for all matching users or a sticky
//! fraction of them) and circuit breaker definitions.
//!
//! Canned answers are built here, once per load: status, header names and values, and the
//! body as [`Bytes`], so serving one costs a refcount bump, not a serialization. The breaker
//! *state* (windows, open/half-open) is the proxy's; this module only says which breaker
//! guards a request and with what thresholds.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode, header};
use xxhash_rust::xxh3::xxh3_64;

use crate::bucket::{BUCKETS, Weight, parse_percent};
use crate::ids::{InterfaceId, UpstreamId};
use crate::matcher::CompiledMatch;
use crate::model::{Breaker, Fallback, LocalResponse};
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
    no_user_key: CompiledNoUserKey,
}

/// A fallback that applies to a request.
#[derive(Debug, Clone, Copy)]
pub struct FallbackDecision<'s> {
    /// Index in the snapshot's fallbacks.
    pub rule_id: u32,
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
    /// Compile a validated response; `default_body` is used when it has none.
    pub(crate) fn compile(r: &LocalResponse, default_body: serde_json::Value) -> Self {
        let mut headers: Vec<(HeaderName, HeaderValue)> = r
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).expect("validated"),
                    HeaderValue::from_str(v).expect("validated"),
                )
            })
            .collect();
        if !headers.iter().any(|(k, _)| k == header::CONTENT_TYPE) {
            headers.push((
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ));
        }
        let body = r.body.as_ref().unwrap_or(&default_body);
        Self {
            status: StatusCode::from_u16(r.status).expect("validated"),
            headers,
            body: Bytes::from(serde_json::to_vec(body).expect("JSON serializes")),
        }
    }
}

// === impl CompiledFallback ===

impl CompiledFallback {
    pub(crate) fn compile(f: &Fallback, iface_ids: &HashMap<&str, InterfaceId>) -> Self {
        let salt = f.bucket_salt();
        Self {
            name: f.name.as_str().into(),
            matcher: CompiledMatch::compile(&f.matcher, salt, iface_ids),
            fraction_ppm: fraction_ppm(f).expect("validated"),
            salt: salt.into(),
            response: CompiledResponse::compile(
                &f.response,
                serde_json::json!({ "error": "degraded", "rule": f.name }),
            ),
            no_user_key: CompiledNoUserKey::compile(&f.no_user_key),
        }
    }

    /// The request's bucket under this rule's salt, and what it was computed from.
    pub fn bucket_of(&self, r: &RouteInput<'_>) -> (u32, BucketKey) {
        bucket_of(&self.salt, &self.no_user_key, r)
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

// === impl CompiledBreaker ===

impl CompiledBreaker {
    pub(crate) fn compile(
        b: &Breaker,
        upstream_ids: &HashMap<&str, UpstreamId>,
        route_ids: &HashMap<&str, u32>,
    ) -> Self {
        let when_open = match (&b.alternate_upstream, &b.response) {
            (Some(alt), _) => WhenOpen::Alternate(upstream_ids[alt.as_str()]),
            (None, r) => WhenOpen::Respond(CompiledResponse::compile(
                r.as_ref().unwrap_or(&LocalResponse {
                    status: 503,
                    headers: Default::default(),
                    body: None,
                }),
                serde_json::json!({ "error": "circuit_open", "breaker": b.name }),
            )),
        };
        Self {
            name: b.name.as_str().into(),
            upstream: upstream_ids[b.upstream.as_str()],
            route: b.route.as_ref().map(|r| route_ids[r.as_str()]),
            window: Duration::from_millis(b.window_ms),
            min_calls: b.min_calls,
            error_ratio_ppm: ratio_ppm(&b.error_ratio).expect("validated"),
            slow_call: b.slow_call_ms.map(Duration::from_millis),
            slow_ratio_ppm: b
                .slow_ratio
                .as_deref()
                .map_or(BUCKETS, |s| ratio_ppm(s).expect("validated")),
            open_for: Duration::from_millis(b.open_ms),
            half_open_probes: b.half_open_probes,
            when_open,
            fingerprint: xxh3_64(&serde_json::to_vec(b).expect("a config value serializes")),
        }
    }
}
