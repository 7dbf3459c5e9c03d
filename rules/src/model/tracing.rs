//! `server.tracing`: W3C Trace Context propagation and the gateway's own spans.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `server.tracing`: each request's trace context (W3C `traceparent`, `tracestate`)
/// continued or started, passed to the upstream with the gateway's span as the parent, and
/// its trace ID written to the access log. Bootstrap: a change needs a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// Continue or start a trace for every request and send the upstream a `traceparent`.
    /// Off: the client's `traceparent` and `tracestate` pass through untouched and the
    /// access log has no trace fields. Default: true.
    #[serde(default = "default_true")]
    pub propagate: bool,
    /// Fraction of traces the gateway starts (or continues without following the
    /// caller's flag) that are sampled: their `traceparent` says so to the upstream.
    /// Drawn by the gateway, not read from the trace ID (a client chooses that).
    /// Default: 0.1. Range: 0..=1.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Whose `sampled` flag a continued trace follows (both ways: sampled or not):
    /// `trusted_proxies` (peers in `server.trusted_proxies`; other clients get
    /// `sample_ratio`), `any`, or `never` (always `sample_ratio`). A client that could set
    /// the flag would choose how much is sampled. Default: `trusted_proxies`.
    #[serde(default)]
    pub parent_sampled: ParentSampled,
}

/// Whose `sampled` flag a continued trace follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParentSampled {
    /// Requests from a peer in `server.trusted_proxies`.
    #[default]
    TrustedProxies,
    /// Every request.
    Any,
    /// None: the gateway's own draw decides.
    Never,
}

fn default_true() -> bool {
    true
}
fn default_sample_ratio() -> f64 {
    0.1
}

impl Default for Tracing {
    fn default() -> Self {
        Self {
            propagate: true,
            sample_ratio: default_sample_ratio(),
            parent_sampled: ParentSampled::default(),
        }
    }
}
