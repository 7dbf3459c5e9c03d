//! A guarded canary ramp: one split target's weight stepped up by the gateway itself while
//! its figures hold up against a baseline target's.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A guarded ramp of one target of a route's `split`.
///
/// The gateway sets the target's weight to each of `steps` in turn, taking it from (or
/// giving it back to) the `baseline` target, which must sit next to it in the split, so a
/// step only grows the target's bucket range: users already in stay in. Every `window_ms`
/// the target's figures are judged against the baseline's over that window; a step
/// advances once it has held for `hold_ms` and the latest window passed. A window that
/// breaches the guard rolls the target back to 0 at once (or holds it where it is, with
/// `on_breach: "hold"`). The written weights of the two targets are their weights without
/// the ramp (`"0%"` for a new version, typically); every step must fit within their sum.
///
/// Any edit of the ramp (other than `stop`) or of its split starts it again from the first
/// step; a reload that leaves both unchanged keeps its step. The step is recorded under
/// `server.data_dir` and resumed after a restart. Ramps do not advance during an active
/// `freeze` window (a breach still rolls back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ramp {
    /// The split target ramped (an upstream named in `split`).
    pub target: String,
    /// The split target it is compared with and takes its weight from; must be next to
    /// `target` in the split. Default: the target's only neighbour (required when it has
    /// two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// What is being released (a version, a build number): shown with the ramp's state.
    /// Changing it starts the ramp again, as any other edit does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// The target's weights, in order, as percentages with up to four decimals
    /// (`["0.01%", "0.1%", "1%", "5%", "20%", "50%", "100%"]`). Strictly increasing; 1 to 32.
    pub steps: Vec<String>,
    /// How long each step holds before the next, in milliseconds. Default: 600000 (ten
    /// minutes). Range: 1000..=86400000.
    #[serde(default = "default_hold_ms")]
    pub hold_ms: u64,
    /// What a step is judged on.
    #[serde(default)]
    pub guard: Guard,
    /// What a window that breaches the guard does: `"rollback"` (the default: the target's
    /// weight goes to 0 and stays there until the ramp is edited) or `"hold"` (it stays at
    /// its step and the ramp stops advancing).
    #[serde(default)]
    pub on_breach: OnBreach,
    /// The operator's brake: `"hold"` stops the ramp advancing (it is still judged, and a
    /// breach still acts), `"rollback"` sets the target's weight to 0 for good. Editing
    /// `stop` does not start the ramp again, and is allowed during a `freeze`. Default:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
}

/// A ramp's guard: the target against the baseline over each window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    /// Length of a judging window, in milliseconds. Default: 60000. Range: 1000..=3600000.
    /// A window with too few requests is extended until it has them.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// Requests each of the two targets must have answered in a window before it is judged.
    /// Default: 100. Range: 1..=10000000.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Breach when the target's error ratio (5xx from it, and the gateway's errors calling
    /// it) exceeds the baseline's by more than this, as a percentage (`"1%"`). Default:
    /// `"1%"`.
    #[serde(default = "default_error_ratio_diff")]
    pub max_error_ratio_diff: String,
    /// Breach when the target's p99 time to the response head exceeds the baseline's times
    /// this (and by more than `p99_margin_ms`). Default: 2.0. Range: 1.0..=100.0.
    #[serde(default = "default_p99_ratio")]
    pub max_p99_ratio: f64,
    /// A p99 within this many milliseconds of the baseline's never breaches, whatever the
    /// ratio (a 1 ms service against a 0.4 ms one). Default: 5. Range: 0..=60000.
    #[serde(default = "default_p99_margin_ms")]
    pub p99_margin_ms: u64,
}

/// What a breach does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnBreach {
    /// The target's weight goes to 0.
    #[default]
    Rollback,
    /// The target stays at its step; the ramp stops advancing.
    Hold,
}

/// The operator's brake on a ramp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// Stay at the current step.
    Hold,
    /// Weight 0, for good.
    Rollback,
}

impl Default for Guard {
    fn default() -> Self {
        Self {
            window_ms: default_window_ms(),
            min_requests: default_min_requests(),
            max_error_ratio_diff: default_error_ratio_diff(),
            max_p99_ratio: default_p99_ratio(),
            p99_margin_ms: default_p99_margin_ms(),
        }
    }
}

fn default_hold_ms() -> u64 {
    600_000
}
fn default_window_ms() -> u64 {
    60_000
}
fn default_min_requests() -> u64 {
    100
}
fn default_error_ratio_diff() -> String {
    "1%".to_owned()
}
fn default_p99_ratio() -> f64 {
    2.0
}
fn default_p99_margin_ms() -> u64 {
    5
}
