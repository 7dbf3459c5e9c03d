//! Upstream endpoint health as written: active health checks and passive outlier ejection.
//!
//! Like everything under the model these are plain serde types that reject unknown fields;
//! `validate` checks their ranges and `upstream` compiles them into the [`UpstreamSpec`]
//! the proxy builds its endpoint health from.
//!
//! [`UpstreamSpec`]: crate::upstream::UpstreamSpec

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Active health checks of an upstream's endpoints: a `GET` of `path` on a fresh connection
/// to each endpoint every `interval_ms`, off the request path. An endpoint that fails
/// `unhealthy_threshold` checks in a row leaves the rotation until it passes
/// `healthy_threshold` in a row. Absent (the default): no active checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path (and query) requested, starting with `/`. Required.
    pub path: String,
    /// Time between two checks of an endpoint, in milliseconds. Default: 5000.
    /// Range: 10..=3600000.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Time for one check (connect, request, response head), in milliseconds; longer counts
    /// as a failure. Default: 1000. Range: 1..=60000, and at most `interval_ms`.
    #[serde(default = "default_check_timeout_ms")]
    pub timeout_ms: u64,
    /// Checks passed in a row that bring an unhealthy endpoint back. Default: 2.
    /// Range: 1..=100.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Checks failed in a row that take an endpoint out. Default: 3. Range: 1..=100.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Statuses that pass, as `[lowest, highest]`, both inclusive. Default: `[200, 399]`.
    /// Range: 100..=599, lowest ≤ highest.
    #[serde(default = "default_expected_status")]
    pub expected_status: [u16; 2],
    /// `Host` header of the check. Default: the endpoint as configured (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Passive outlier ejection: an endpoint whose exchanges fail `consecutive_failures` times
/// in a row (connect failures, resets, timeouts: never an answer the upstream gave, however
/// bad its status) is taken out of the rotation for `base_ejection_ms`, doubled for each
/// ejection that follows within `max_ejection_ms` of the previous one ending, up to
/// `max_ejection_ms`. On by default with these conservative settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// Switch ejection on. Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Failed exchanges in a row that eject an endpoint. Default: 5. Range: 1..=1000.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// Length of a first ejection, in milliseconds. Default: 30000. Range: 1..=3600000.
    #[serde(default = "default_base_ejection_ms")]
    pub base_ejection_ms: u64,
    /// Longest ejection, in milliseconds; also the quiet time after which the backoff starts
    /// again from `base_ejection_ms`. Default: 300000. Range: 1..=86400000, at least
    /// `base_ejection_ms`.
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_ms: u64,
    /// Most of the upstream's endpoints ejected at once, in percent (rounded down, but one
    /// endpoint may always be ejected when there are two or more). An upstream is never
    /// left with no endpoint: when every endpoint is out, requests go to the least bad one.
    /// Default: 10. Range: 0..=100 (0: never eject).
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

// === impl Outlier ===

impl Default for Outlier {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: default_consecutive_failures(),
            base_ejection_ms: default_base_ejection_ms(),
            max_ejection_ms: default_max_ejection_ms(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_interval_ms() -> u64 {
    5_000
}
fn default_check_timeout_ms() -> u64 {
    1_000
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_expected_status() -> [u16; 2] {
    [200, 399]
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection_ms() -> u64 {
    30_000
}
fn default_max_ejection_ms() -> u64 {
    300_000
}
fn default_max_ejected_percent() -> u32 {
    10
}

/// Default of `upstreams.NAME.resolve_ttl_ms`.
pub(crate) fn default_resolve_ttl_ms() -> u64 {
    30_000
}
