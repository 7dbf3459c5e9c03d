//! Governance rules as written: rate limits, fallbacks, emergency plans and circuit breakers.
//!
//! These are the "who gets limited, and what is answered when a dependency should be spared"
//! half of the rules. Like everything under the model they are plain serde types that
//! reject unknown fields; `validate` checks them and `govern` compiles them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::matching::{Match, NoUserKey};

/// A rate limit rule: which requests it counts, what it counts them by, and how many it
/// admits.
///
/// Every limit whose `match` holds applies to a request (not only the most specific one):
/// a per-user, a per-app and a global limit can all guard `grab` at once. They are checked
/// in config order; the first that refuses rejects the request, and limits after it are not
/// consulted, so they spend no quota on a request that never reaches the upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Unique rule name (metrics, logs, the 429 body and the `RateLimit` headers).
    pub name: String,
    /// Which requests are counted. Absent or `{}`: every request.
    #[serde(default, rename = "match")]
    pub matcher: Match,
    /// What requests are counted by: a tuple of `"app"`, `"interface"`, `"user"`,
    /// `{"header": "x-device-id"}` and `{"path_param": "id"}`, each request of one tuple
    /// value sharing one quota. Default: `[]`, one quota shared by every matching request
    /// (a global limit). A `path_param` needs `match.interfaces`, every one of whose path
    /// templates has that parameter: it gives one quota per envelope (hot-key protection).
    #[serde(default)]
    pub key: Vec<KeyPart>,
    /// The sustained rate: `"N/unit"` or `"N/Kunit"` with unit `s`, `min`, `h` or `d`
    /// (`"5/s"`, `"300/min"`, `"100/10s"`). N in 1..=1000000000.
    pub rate: String,
    /// Requests a key may send at once after being idle (the GCRA bucket size). Default: N,
    /// one unit's worth of the rate. Range: 1..=1000000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `enforce` (the default) rejects with 429; `dry_run` lets the request pass and only
    /// counts and logs the would-be rejection, to try a limit on real traffic first.
    #[serde(default)]
    pub mode: LimitMode,
    /// Per-value quotas, like Sentinel's hot-parameter exceptions: `"user:alice": "50/s"`,
    /// `"app:internal": "1000/s"`, `"interface:open": "20/s"`. A request carrying such a
    /// value is counted against its own quota (burst: the exception's N) instead of
    /// `rate`, still per key. When several apply, `user` wins over `interface` over `app`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exceptions: BTreeMap<String, String>,
    /// What a request is keyed by when a part of `key` is absent (no user ID, say):
    /// `client_ip` (the default: its client IP stands in for the missing part), `shared`
    /// (all such requests share one quota) or `skip` (the limit does not apply to it).
    #[serde(default)]
    pub when_missing: WhenMissing,
    /// Where the quota is counted: `local` (the default: in this gateway's memory, so N
    /// gateways behind a balancer admit up to N times the rate) or `cluster` (in the Redis
    /// of `server.redis`, shared by every gateway; needs `server.redis`). Cluster counting
    /// leases tokens from Redis in small batches, see `docs/operations.md` for the accuracy
    /// this trades.
    #[serde(default, skip_serializing_if = "is_default")]
    pub scope: LimitScope,
    /// With `scope: cluster`, what a request gets when Redis fails or does not answer
    /// within `server.redis.timeout_ms`: `fail_open` (the default: admitted, and counted in
    /// `tidegate_limit_store_errors_total`) or `fail_closed` (503
    /// `limit_store_unavailable`). Fail open is the default because a limit protects the
    /// upstream, and an outage of the limiter's store should not become an outage of the
    /// service; choose fail closed where over-admission costs money.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_store_error: OnStoreError,
    /// Pace instead of refuse: a request over the rate waits, in milliseconds, for at most
    /// this long for its turn, and only one that would wait longer gets the 429 (nginx
    /// `limit_req` without `nodelay`). Waiting requests are released one rate interval
    /// apart, each holding its overload slots while it waits. Default: none (refuse at
    /// once). Range: 1..=60000. Not with `scope: cluster`; a `dry_run` limit never waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay_ms: Option<u64>,
    /// With `max_delay_ms`: requests of this limit waiting at once, over all its keys;
    /// one that finds the queue full gets the 429 at once. It bounds the memory waiting
    /// requests hold. Default: 1000. Range: 1..=100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<u32>,
}

/// Where a limit's quota is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    /// In this gateway's memory.
    #[default]
    Local,
    /// In Redis, shared by every gateway.
    Cluster,
}

/// What a cluster-scope limit does when its store is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Admit the request (and count the store error).
    #[default]
    FailOpen,
    /// Answer 503 `limit_store_unavailable`.
    FailClosed,
}

pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// One dimension of a limit's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyPart {
    /// The app ID.
    App,
    /// The interface.
    Interface,
    /// The user ID.
    User,
    /// A request header's value (case-insensitive name).
    Header(String),
    /// The value of a parameter of the interface's path template (`id` of
    /// `/envelopes/{id}`), percent-decoded, so `%61` and `a` are one key.
    PathParam(String),
}

/// Whether a limit rejects or only counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitMode {
    /// Reject with 429.
    #[default]
    Enforce,
    /// Let the request pass; count and log the would-be rejection.
    DryRun,
}

/// Whether a fallback, a breaker or overload admission acts, or only counts what it would
/// do (shadow mode): the rule is decided on real traffic, counted and logged, and the
/// request goes on as if the rule were absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleMode {
    /// Act: answer locally, open, shed.
    #[default]
    Enforce,
    /// Decide and count (`tidegate_shadow_*`), never act.
    DryRun,
}

/// What to key a request by when part of a limit's key is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenMissing {
    /// The client IP stands in for the missing part.
    #[default]
    ClientIp,
    /// Every request missing it shares one quota.
    Shared,
    /// The limit does not apply.
    Skip,
}

/// A fallback rule: answer matching requests locally instead of calling the upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    /// Unique rule name (metrics, logs).
    pub name: String,
    /// Which requests it applies to. Absent or `{}`: every request. When several fallbacks
    /// match, the most specific one decides (as for routes); equal ones are an error.
    #[serde(default, rename = "match")]
    pub matcher: Match,
    /// Share of matching users answered locally, as a percentage with up to four decimals
    /// (`"30%"`). Users are bucketed under the rule's salt, so a user always sees the same
    /// answer. Default: `"100%"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<String>,
    /// Salt of the user buckets. Default: the rule name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// What a request without a user ID is bucketed by (as for routes). Default: client IP.
    #[serde(default)]
    pub no_user_key: NoUserKey,
    /// The answer.
    pub response: LocalResponse,
    /// `enforce` (the default) answers locally; `dry_run` decides and counts the requests it
    /// would answer (`tidegate_shadow_fallback_total`) and lets them go on to their route,
    /// as if the rule were absent (an enforced fallback they also match still answers).
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: RuleMode,
}

/// A response the gateway makes itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalResponse {
    /// HTTP status. Default: 503. Range: 200..=599.
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    /// Extra response headers (name → value). `content-type` defaults to
    /// `application/json`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The JSON body. Default: `{"error": "degraded", "rule": "<rule name>"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

/// An emergency plan: named overrides of limits and fallbacks, switched on by listing it in
/// `active_plans`.
///
/// When a plan is active, each of its limits and fallbacks replaces the base rule of the same
/// name or, if there is none, is added; rules named in `disable` are switched off. Plans
/// apply in `active_plans` order; two active plans may not both set or disable one rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// What the plan is for (shown nowhere but the file; for the operator at 3 a.m.).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Limits that replace (same name) or join the base limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// Fallbacks that replace (same name) or join the base fallbacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<Fallback>,
    /// Names of base limits or fallbacks switched off while the plan is active.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disable: Vec<String>,
    /// When the gateway switches the plan on by itself: conditions over its own figures,
    /// held for a while. Default: none (the plan is on only while listed in `active_plans`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    /// Whether `trigger` may switch the plan on. Default: `true` when there is a trigger.
    /// `false` keeps the trigger written (and validated) but lets only `active_plans` switch
    /// the plan on, for a plan under review. `active_plans` always wins over the trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<bool>,
}

/// A plan's trigger: it switches the plan on once some condition of `when` has held in
/// every window (one second of the gateway's figures) for `for_ms`, and off once none has
/// held for `release_for_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// The conditions; any one holding is enough. 1 to 32 of them.
    pub when: Vec<Condition>,
    /// How long a condition must hold before the plan is switched on, in milliseconds.
    /// Default: 10000. Range: 0..=3600000 (0: at the end of the first window it holds).
    #[serde(default = "default_trigger_for_ms")]
    pub for_ms: u64,
    /// How long no condition may hold before the plan is switched off, in milliseconds.
    /// Default: 60000. Range: 0..=86400000. Longer than `for_ms`, so that a plan does not
    /// flap on a failure that comes and goes.
    #[serde(default = "default_release_for_ms")]
    pub release_for_ms: u64,
    /// Requests a window must hold (for a ratio: of the interface; for `p99_ms_above`: calls
    /// to the upstream) before a condition over it can hold, so that three failures at 3 a.m.
    /// do not switch a plan on. Default: 20. Range: 1..=1000000.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
}

/// One condition of a trigger: exactly one measure, over an interface, an upstream, or
/// (for the admission level) the gateway.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The interface whose figures are watched (with the `*_ratio_above` measures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The upstream whose figures are watched (with `p99_ms_above`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Holds when the interface's errors (5xx from the upstream, gateway errors) exceed this
    /// share of its requests that went to the upstream or failed (`"20%"`; degraded, limited
    /// and shed requests are not counted either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_ratio_above: Option<String>,
    /// Holds when the interface's requests refused by a rate limit exceed this share of all
    /// its requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limited_ratio_above: Option<String>,
    /// Holds when the interface's requests shed by overload protection exceed this share of
    /// all its requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shed_ratio_above: Option<String>,
    /// Holds when the upstream's 99th percentile time to the response head exceeds this, in
    /// milliseconds. Range: 1..=3600000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms_above: Option<u64>,
    /// Holds when the overload admission level (the rank a request needs to be admitted)
    /// exceeds this at the end of the window. Range: 0..=1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission_level_above: Option<u32>,
}

/// A circuit breaker on an upstream (or on one route's use of it).
///
/// Closed, it watches outcomes over a sliding window; once the window holds at least
/// `min_calls` calls and the error ratio (or slow-call ratio) reaches its threshold it opens.
/// Open, requests get `response` (or go to `alternate_upstream`) without touching the
/// upstream. After `open_ms` it half-opens: `half_open_probes` requests go through; if all
/// succeed it closes, if any fails it opens again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Breaker {
    /// Unique name (metrics, logs).
    pub name: String,
    /// The upstream it guards.
    pub upstream: String,
    /// Only guard requests routed there by this route rule. Default: every request to the
    /// upstream. A route-specific breaker takes precedence over an upstream-wide one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Length of the sliding window, in milliseconds. Default: 10000. Range: 100..=600000.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// Calls the window must hold before the breaker may open (so three failures at 3 a.m.
    /// do not trip it). Default: 20. Range: 1..=1000000.
    #[serde(default = "default_min_calls")]
    pub min_calls: u32,
    /// Share of failed calls (5xx, connect failures, resets, timeouts) that opens the
    /// breaker, as a percentage (`"50%"`). Default: `"50%"`.
    #[serde(default = "default_error_ratio")]
    pub error_ratio: String,
    /// A call slower than this (to the response head), in milliseconds, is slow. Default:
    /// none (slowness is not watched). Range: 1..=3600000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_call_ms: Option<u64>,
    /// Share of slow calls that opens the breaker. Default: `"100%"`; only with
    /// `slow_call_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_ratio: Option<String>,
    /// How long it stays open before letting probes through, in milliseconds. Default:
    /// 5000. Range: 1..=3600000.
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
    /// Probe requests let through while half-open; all must succeed to close. Default: 3.
    /// Range: 1..=1000.
    #[serde(default = "default_half_open_probes")]
    pub half_open_probes: u32,
    /// The answer while open. Default: 503 `{"error": "circuit_open", "breaker": "<name>"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<LocalResponse>,
    /// While open, send requests here instead of answering locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alternate_upstream: Option<String>,
    /// `enforce` (the default) opens; `dry_run` runs the same state machine on real
    /// outcomes but never refuses a request: each time it would open is counted
    /// (`tidegate_shadow_breaker_total{event="would_open"}`), and so is each request it
    /// would have kept from the upstream (`event="would_reject"`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: RuleMode,
}

// === impl Fallback ===

impl Fallback {
    /// The salt of its user buckets: `salt`, or its name.
    pub fn bucket_salt(&self) -> &str {
        self.salt.as_deref().unwrap_or(&self.name)
    }
}

fn default_fallback_status() -> u16 {
    503
}
fn default_window_ms() -> u64 {
    10_000
}
fn default_min_calls() -> u32 {
    20
}
fn default_error_ratio() -> String {
    "50%".to_owned()
}
fn default_open_ms() -> u64 {
    5_000
}
fn default_half_open_probes() -> u32 {
    3
}
fn default_trigger_for_ms() -> u64 {
    10_000
}
fn default_release_for_ms() -> u64 {
    60_000
}
fn default_min_requests() -> u32 {
    20
}
