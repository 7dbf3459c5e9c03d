//! Overload protection as written: concurrency caps with short bounded queues, adaptive
//! per-upstream limits, and DAGOR-style priority admission.
//!
//! Like everything under the model these are plain serde types that reject unknown
//! fields; `validate` checks them and `overload` compiles them and holds the
//! pure controllers (admission level, adaptive limit) the proxy drives.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::govern::RuleMode;

/// The `overload` section: how the gateway keeps its upstreams at their best throughput
/// when offered more than they can take.
///
/// Three protections, each optional, applied in this order on the request path:
/// 1. **Priority admission** (`admission`): each request has a business priority (its
///    interface's) and a user priority (a hash of the user ID that rotates every
///    `rotate_every_s`). While the gateway sees overload, an admission level rises step by
///    step and requests below it are answered 503 at once, before their body is read.
/// 2. **Concurrency caps** (`max_in_flight` globally, per interface, per upstream): beyond a
///    cap a request waits up to `queue_timeout_ms` in a queue of at most `max_queue`, then is
///    answered 503.
/// 3. **Adaptive limits** (`upstreams.NAME.adaptive`): an upstream's cap follows its measured
///    latency, so its capacity need not be known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Overload {
    /// Switch overload protection on. Default: false (the section is then only validated),
    /// so adding it to a file changes nothing until it is switched on.
    #[serde(default)]
    pub enabled: bool,
    /// Requests in flight through the gateway at once, over every upstream. Default: none
    /// (no global cap). Range: 1..=1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Longest a request waits for a slot under a cap before it is answered 503, in
    /// milliseconds. Keep it short: a queue longer than the upstream's own latency only adds
    /// latency. Default: 20. Range: 0..=10000 (0: never wait).
    #[serde(default = "default_queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// Most requests waiting at one cap; the next one is answered 503 at once. Default: 1000.
    /// Range: 0..=100000.
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    /// `Retry-After` of an overload rejection, in seconds. Default: 1. Range: 1..=3600.
    #[serde(default = "default_retry_after_s")]
    pub retry_after_s: u32,
    /// Length of the control window, in milliseconds: every window the admission level and
    /// the adaptive limits are adjusted from what the window measured. Default: 100.
    /// Range: 10..=10000.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// Business priority of interfaces not listed in `interfaces`, and of requests that
    /// match no interface. Default: `normal`.
    #[serde(default)]
    pub default_priority: Priority,
    /// Per interface (by name): its business priority and its own cap.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub interfaces: BTreeMap<String, InterfaceOverload>,
    /// Per upstream (by name): a fixed or an adaptive cap.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upstreams: BTreeMap<String, UpstreamOverload>,
    /// Priority admission (DAGOR).
    #[serde(default)]
    pub admission: Admission,
}

/// A business priority. Under overload the lowest goes first: all of `low` is shed before
/// any of `normal`, and so on.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Shed first (sharing, browsing).
    Low,
    /// The default.
    #[default]
    Normal,
    /// Shed after normal traffic.
    High,
    /// Shed last (grabbing a red envelope, paying).
    Critical,
}

/// Overload settings of one interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InterfaceOverload {
    /// Its business priority. Default: the section's `default_priority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Its requests in flight at once. Default: none (no cap). Range: 1..=1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

/// Overload settings of one upstream: a fixed cap or an adaptive one (not both).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamOverload {
    /// A fixed cap on its requests in flight. Range: 1..=1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// A cap that follows the upstream's latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<Adaptive>,
}

/// An adaptive concurrency limit (a gradient controller, in the spirit of Netflix's
/// concurrency-limits and Envoy's adaptive concurrency filter).
///
/// Every window, from the mean latency of the calls that finished in it (request sent to
/// response head): `limit = limit × clamp(target / latency, 0.5, 1) + √limit`, bounded by
/// `min` and `max`. While latency stays under the target the limit grows by its square root
/// per window (only if it was actually used: at least half of it in flight); above the
/// target it shrinks in proportion. The square-root headroom keeps it a little above the
/// upstream's capacity, so the upstream is never starved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Adaptive {
    /// Lowest limit. Default: 4. Range: 1..=1000000.
    #[serde(default = "default_adaptive_min")]
    pub min: u32,
    /// Highest limit. Default: 1000. Range: `min`..=1000000.
    #[serde(default = "default_adaptive_max")]
    pub max: u32,
    /// The limit to start from. Default: 20, within `min..=max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<u32>,
    /// The latency to hold, in milliseconds. Default: none: 1.5 × the lowest window-mean
    /// latency seen (the upstream's latency without queueing). Range: 1..=600000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_latency_ms: Option<u64>,
}

/// Priority admission, after WeChat's DAGOR (SoCC 2018).
///
/// A request's priority is the pair (business priority of its interface, user priority),
/// compared business first. The user priority is a stable hash of the user ID (the client IP
/// when there is none) into `user_priority_levels` levels, re-drawn every `rotate_every_s`:
/// within that time a user is either served or refused consistently, and over time every
/// user takes a turn at the top.
///
/// Every window the gateway judges whether it was overloaded: the mean wait for a slot under
/// the caps above `queue_delay_threshold_ms`, or more than 1% of the requests refused by a
/// full queue or a queue timeout. If so, the admission level rises until the traffic above
/// it is `shed_percent` less than what the caps let through in the window (so the level
/// jumps straight to the capacity the caps measured); otherwise it falls until the traffic
/// above it is `admit_percent` more than it admitted. Requests below the level get 503
/// `{"error":"overloaded"}` with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Admission {
    /// Whether the admission level is used (with the section `enabled`). Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Mean queueing delay over a window above which the window counts as overloaded, in
    /// milliseconds. Default: 10. Range: 1..=10000.
    #[serde(default = "default_queue_delay_threshold_ms")]
    pub queue_delay_threshold_ms: u64,
    /// Levels of user priority. More levels shed in finer steps. Default: 128.
    /// Range: 1..=1024.
    #[serde(default = "default_user_priority_levels")]
    pub user_priority_levels: u32,
    /// How often user priorities are re-drawn, in seconds (aligned to the Unix epoch).
    /// Default: 3600. Range: 1..=604800.
    #[serde(default = "default_rotate_every_s")]
    pub rotate_every_s: u64,
    /// Traffic shed per overloaded window, in percent of what the window admitted.
    /// Default: 5. Range: 1..=50.
    #[serde(default = "default_shed_percent")]
    pub shed_percent: u32,
    /// Traffic re-admitted per calm window, in percent of what the window admitted.
    /// Default: 1. Range: 1..=50.
    #[serde(default = "default_admit_percent")]
    pub admit_percent: u32,
    /// A file of at least 16 secret bytes (`head -c 32 /dev/urandom > priority.key`),
    /// relative to the config file, that keys user priorities: without it the priority of
    /// an ID is a public hash anyone can compute offline (and pick IDs that are shed last);
    /// with it, only holders of the file can. Every gateway of a fleet must read the same
    /// file to shed the same users. Read with the config; a change re-draws priorities.
    /// Default: none (`tidegate check` warns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_key_file: Option<String>,
    /// Refuse every request below this business priority, whatever the load: an emergency
    /// switch (`"floor": "normal"` sheds all `low` traffic at once; put it in a plan's file
    /// edit). The level never goes below it. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<Priority>,
    /// `enforce` (the default) sheds requests below the level; `dry_run` moves the level
    /// the same way but sheds nobody: each request below it is counted
    /// (`tidegate_shadow_shed_total`) and served. With nobody shed, an overload that the
    /// shedding would have relieved goes on, so the dry-run level climbs higher than an
    /// enforced one would: read it as "who would go first", not "how many".
    #[serde(default, skip_serializing_if = "super::govern::is_default")]
    pub mode: RuleMode,
}

fn default_queue_timeout_ms() -> u64 {
    20
}
fn default_max_queue() -> u32 {
    1000
}
fn default_retry_after_s() -> u32 {
    1
}
fn default_window_ms() -> u64 {
    100
}
fn default_adaptive_min() -> u32 {
    4
}
fn default_adaptive_max() -> u32 {
    1000
}
fn default_true() -> bool {
    true
}
fn default_queue_delay_threshold_ms() -> u64 {
    10
}
fn default_user_priority_levels() -> u32 {
    128
}
fn default_rotate_every_s() -> u64 {
    3600
}
fn default_shed_percent() -> u32 {
    5
}
fn default_admit_percent() -> u32 {
    1
}

impl Default for Overload {
    fn default() -> Self {
        Self {
            enabled: false,
            max_in_flight: None,
            queue_timeout_ms: default_queue_timeout_ms(),
            max_queue: default_max_queue(),
            retry_after_s: default_retry_after_s(),
            window_ms: default_window_ms(),
            default_priority: Priority::default(),
            interfaces: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            admission: Admission::default(),
        }
    }
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            enabled: true,
            queue_delay_threshold_ms: default_queue_delay_threshold_ms(),
            user_priority_levels: default_user_priority_levels(),
            rotate_every_s: default_rotate_every_s(),
            priority_key_file: None,
            shed_percent: default_shed_percent(),
            admit_percent: default_admit_percent(),
            floor: None,
            mode: RuleMode::default(),
        }
    }
}
