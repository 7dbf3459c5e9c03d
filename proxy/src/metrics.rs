//! Prometheus metrics: one registry per gateway, a fixed set of families, closed label sets.
//!
//! Labels are names from the loaded snapshot (interfaces, upstreams) and `&'static str`
//! outcome classes, never request data such as user IDs, so the number of series is bounded
//! by the config, not by traffic.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A name from the snapshot, shared rather than copied per request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(pub Arc<str>);

/// Labels of `tidegate_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Interface name, or `none`.
    pub interface: Name,
    /// Upstream name, or `none` when answered locally.
    pub upstream: Name,
    /// `1xx` .. `5xx`.
    pub status: &'static str,
}

/// Labels of per-upstream families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Upstream name.
    pub upstream: Name,
}

/// Labels of `tidegate_upstream_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    /// Upstream name.
    pub upstream: Name,
    /// The stable error code (`upstream_timeout`, `upstream_unavailable`, ...).
    pub error: &'static str,
}

/// Labels of `tidegate_config_reloads_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `applied`, `unchanged` or `failed`.
    pub outcome: &'static str,
}

/// Labels of `tidegate_limit_decisions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    /// Limit rule name.
    pub rule: Name,
    /// `allowed`, `limited` or `dry_run_limited`.
    pub outcome: &'static str,
}

/// Labels of per-rule families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RuleLabels {
    /// Rule name.
    pub rule: Name,
}

/// Labels of per-breaker families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BreakerLabels {
    /// Breaker name.
    pub breaker: Name,
    /// The upstream it guards.
    pub upstream: Name,
}

/// Labels of `tidegate_breaker_transitions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TransitionLabels {
    /// Breaker name.
    pub breaker: Name,
    /// The upstream it guards.
    pub upstream: Name,
    /// The new state: `closed`, `open` or `half_open`.
    pub to: &'static str,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by interface, upstream and status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from sending a request upstream to its response head, by upstream.
    pub upstream_latency: Family<UpstreamLabels, Histogram>,
    /// Failed upstream exchanges by cause.
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    /// Downstream connections open now.
    pub connections: Gauge,
    /// Downstream connections accepted since start.
    pub connections_accepted: Counter,
    /// Config reload attempts by outcome.
    pub config_reloads: Family<OutcomeLabels, Counter>,
    /// Time from the triggering file event (or signal) to the reload's end.
    pub config_reload_seconds: Histogram,
    /// Generation of the live config (1 at start, +1 per applied reload).
    pub config_generation: Gauge,
    /// Limit decisions by rule and outcome (a request checked by three limits counts three).
    pub limit_decisions: Family<LimitLabels, Counter>,
    /// Requests answered by a fallback rule, by rule.
    pub fallbacks: Family<RuleLabels, Counter>,
    /// Breaker state by breaker: 0 closed, 1 open, 2 half-open.
    pub breaker_state: Family<BreakerLabels, Gauge>,
    /// Breaker state changes by breaker and new state.
    pub breaker_transitions: Family<TransitionLabels, Counter>,
    /// Requests an open (or probing) breaker kept from its upstream.
    pub breaker_rejections: Family<BreakerLabels, Counter>,
}

// === impl Name ===

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&self.0)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

// === impl Metrics ===

impl Metrics {
    /// A registry with every family registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tidegate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by interface, upstream and status class",
            requests.clone(),
        );
        let upstream_latency = Family::<UpstreamLabels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~13 s
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to receiving its response head",
            upstream_latency.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed upstream exchanges, by cause",
            upstream_errors.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Downstream connections open now",
            connections.clone(),
        );
        let connections_accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Downstream connections accepted",
            connections_accepted.clone(),
        );
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reload attempts, by outcome",
            config_reloads.clone(),
        );
        // 1 ms .. ~8 s
        let config_reload_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "config_reload_seconds",
            "Time from the triggering file event or signal to the end of the reload",
            config_reload_seconds.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "config_generation",
            "Generation of the live config (1 at start, +1 per applied reload)",
            config_generation.clone(),
        );
        let limit_decisions = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_decisions",
            "Rate limit decisions, by rule and outcome (allowed, limited, dry_run_limited)",
            limit_decisions.clone(),
        );
        let fallbacks = Family::<RuleLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Requests answered locally by a fallback rule, by rule",
            fallbacks.clone(),
        );
        let breaker_state = Family::<BreakerLabels, Gauge>::default();
        registry.register(
            "breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "breaker_transitions",
            "Circuit breaker state changes, by breaker and new state",
            breaker_transitions.clone(),
        );
        let breaker_rejections = Family::<BreakerLabels, Counter>::default();
        registry.register(
            "breaker_rejections",
            "Requests an open or half-open breaker kept from its upstream",
            breaker_rejections.clone(),
        );
        Self {
            registry,
            limit_decisions,
            fallbacks,
            breaker_state,
            breaker_transitions,
            breaker_rejections,
            config_reloads,
            config_reload_seconds,
            config_generation,
            requests,
            upstream_latency,
            upstream_errors,
            connections,
            connections_accepted,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `1xx`..`5xx` for a status code.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
