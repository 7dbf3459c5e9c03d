//! An interface's response cache as written: a short-lived store of its answers, with the
//! concurrent misses of one key coalesced into one upstream call (hot-key protection).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `interfaces[].cache`: answers of an idempotent interface kept for a short while, and
/// concurrent identical requests answered by one upstream call.
///
/// Only `GET` and `HEAD` requests are served from it, and only `200` answers of declared
/// length at most `max_body_bytes`, without `Cache-Control: no-store` or `private`,
/// without `Set-Cookie`, and without a `Vary` on a header the key does not cover, are kept.
/// A kept answer is served for at most `ttl_ms` after the request that fetched it was sent,
/// so it is stale by at most `ttl_ms`. Limits, fallbacks and overload admission apply to
/// every request first, whether it is then answered from the cache or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// How long an answer is served, in milliseconds from the moment the request that
    /// fetched it was sent: the staleness bound. Range: 1..=60000.
    pub ttl_ms: u64,
    /// Answers kept at once; beyond, the least useful are evicted (S3-FIFO). Default: 10000.
    /// Range: 1..=1000000.
    #[serde(default = "default_max_entries")]
    pub max_entries: u32,
    /// Largest body kept, in bytes; a bigger (or undeclared-length) answer is passed
    /// through and not kept. The cache holds at most `max_entries × max_body_bytes` of
    /// bodies, which may not exceed 1 GiB. Default: 65536. Range: 1..=16777216.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u32,
    /// Whether the key holds the caller's identity: its app and user IDs and the values of
    /// its `Authorization` and `Cookie` headers (the default, `true`: one user's answer is
    /// never served to another). With `false` the cache is shared by every caller, and a
    /// request carrying `Authorization` or a cookie bypasses it: only for answers that are
    /// the same for everyone (an envelope's public state); see docs/rules.md.
    #[serde(default = "default_true")]
    pub vary_on_identity: bool,
    /// Requests waiting at once for one key's upstream call; one more makes its own call.
    /// Default: 10000. Range: 1..=100000.
    #[serde(default = "default_max_waiters")]
    pub max_waiters: u32,
    /// Longest wait for another request's upstream call, in milliseconds, after which a
    /// waiter makes its own. Default: 5000. Range: 1..=60000.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
}

fn default_max_entries() -> u32 {
    10_000
}

fn default_max_body_bytes() -> u32 {
    65_536
}

fn default_true() -> bool {
    true
}

fn default_max_waiters() -> u32 {
    10_000
}

fn default_max_wait_ms() -> u64 {
    5_000
}
