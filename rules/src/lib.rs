//! Tidegate's rules engine: the config model, its validation, and the decisions made from
//! it. Pure by design: no sockets, no files, no clocks it is not handed. That keeps every
//! decision unit-testable, fuzzable and benchmarkable, and lets `tidegate check` and
//! `tidegate explain` run exactly the code the gateway runs.
//!
//! # Layout
//!
//! Modules are listed bottom up: each uses only modules above it in this list, never one
//! below, so there is no import circle.
//!
//! - [`error`]: located errors (`file:line:col path: message`).
//! - [`ids`]: [`InterfaceId`] and [`UpstreamId`], the indices compiled rules refer by.
//! - [`hist`]: log-scale latency histograms and their quantiles.
//! - [`model`]: the config file's serde types (what operators write), with defaults and units.
//! - [`bucket`]: the stable user-bucket hash and weight parsing.
//! - [`source`]: bytes → [`model::Config`]: size, encoding, syntax, types, duplicate keys,
//!   and positions for errors.
//! - `plan` (internal): emergency plans: the rules in force once the active plans are applied.
//! - [`classify`]: interface, app and user of a request: the interfaces' router and the
//!   identity extractors.
//! - [`upstream`]: upstreams as the proxy needs them to connect.
//! - [`matcher`]: rule conditions and the (app, interface) index shared by all rule kinds.
//! - [`route`]: route rules and routing: direct, weighted splits, whitelists, override header.
//! - [`limit`]: rate limits: which quota, the hashed key (counting is the proxy's).
//! - [`degrade`]: fallback rules and circuit breaker definitions, with canned answers.
//! - [`govern`]: limits, fallbacks and breakers in force, compiled as one unit, and their
//!   lookups: which limits apply, which fallback answers, which breaker guards.
//! - [`overload`]: overload protection: request priorities, the DAGOR admission level and the
//!   adaptive concurrency limit, as pure controllers.
//! - [`ramp`]: guarded canary ramps: compiled ramps, the weights they give a split, and the
//!   pure controller that steps, judges and rolls them back.
//! - [`trigger`]: plans that switch themselves on: compiled triggers over the gateway's own
//!   figures, and the pure controller that runs them once per window.
//! - [`validate`]: ranges, formats, references and ambiguity, reporting every problem at
//!   once; builds the compiled parts above from the values it parsed, so compiling a valid
//!   config cannot fail.
//! - [`snapshot`]: the compiled rules the request path reads, composed of the parts above;
//!   its methods delegate to them.
//! - [`explain`]: a routing decision with every rule considered and why.
//! - [`include`]: a main file plus an included rules directory, merged into one config.
//! - [`diff`]: what changes between two configs, rule by rule and field by field.
//! - [`freeze`]: the change freeze: which changed paths a reload may apply in its window.
//!
//! The entry point is [`load`]: parse → validate → compile, returning either a [`Loaded`]
//! config or every error, located.

pub mod bucket;
pub mod classify;
pub mod degrade;
pub mod diff;
pub mod error;
pub mod explain;
pub mod freeze;
#[doc(hidden)]
pub mod fuzz_logic;
pub mod govern;
pub mod hist;
pub mod identity;
pub mod ids;
pub mod include;
pub mod limit;
pub mod matcher;
pub mod model;
pub mod overload;
pub(crate) mod plan;
pub mod ramp;
pub mod route;
pub mod snapshot;
pub mod source;
pub mod trigger;
pub mod trusted;
pub mod upstream;
pub mod validate;

pub use classify::{CacheSpec, Classified, RequestParts};
pub use error::{ConfigError, ConfigErrors, JsonPath};
pub use ids::{InterfaceId, UpstreamId};
pub use matcher::{MatchInput, Pair};
pub use model::{Config, DEFAULT_EMBEDDED_DATA_DIR};
pub use route::{RouteDecision, RouteInput, Via};
pub use snapshot::Snapshot;

/// A config that parsed, validated and compiled.
#[derive(Debug)]
pub struct Loaded {
    /// The config as written (bootstrap settings are read from here).
    pub config: Config,
    /// The compiled rules.
    pub snapshot: Snapshot,
}

/// Parse, validate and compile a config file's bytes. `file` names the file in errors.
/// Never panics, whatever the bytes.
pub fn load(file: &str, bytes: &[u8]) -> Result<Loaded, ConfigErrors> {
    let config = source::parse(file, bytes)?;
    match Snapshot::compile(&config) {
        Ok(snapshot) => Ok(Loaded { config, snapshot }),
        Err(issues) => {
            // parse() succeeded, so the bytes are UTF-8.
            let text = std::str::from_utf8(bytes).unwrap_or_default();
            Err(locate_all(file, text, issues))
        }
    }
}

/// Attach file positions to validation issues.
pub fn locate_all(file: &str, text: &str, issues: Vec<validate::Issue>) -> ConfigErrors {
    ConfigErrors(
        issues
            .into_iter()
            .map(|i| {
                let (line, column) = source::locate(text, &i.path);
                ConfigError {
                    file: file.to_owned(),
                    line,
                    column,
                    path: i.path,
                    message: i.message,
                }
            })
            .collect(),
    )
}
