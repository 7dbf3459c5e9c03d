//! Prometheus metrics: one registry per gateway, a fixed set of families, closed label sets.
//!
//! Labels are names from the loaded snapshot (interfaces, upstreams) and `&'static str`
//! outcome classes, never request data such as user IDs, so the number of series is bounded
//! by the config, not by traffic.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::jwt::TokenError;

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

/// Labels of `tidegate_identity_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IdentityLabels {
    /// `verified`, `anonymous` (no valid token, none required) or `refused` (401).
    pub outcome: &'static str,
    /// `ok`, or the token error's code (`token_expired`, ...).
    pub reason: &'static str,
}

/// `tidegate_identity_total`'s series, resolved once: the request path adds to a counter
/// without hashing a label set.
#[derive(Debug)]
pub struct IdentityCounters {
    /// Valid tokens.
    pub verified: Counter,
    /// No valid token, not required; indexed like [`TokenError::ALL`].
    pub anonymous: Vec<Counter>,
    /// Refused; indexed like [`TokenError::ALL`].
    pub refused: Vec<Counter>,
}

impl IdentityCounters {
    fn new(family: &Family<IdentityLabels, Counter>) -> Self {
        let series = |outcome: &'static str| {
            TokenError::ALL
                .iter()
                .map(|e| {
                    family
                        .get_or_create(&IdentityLabels {
                            outcome,
                            reason: e.code(),
                        })
                        .clone()
                })
                .collect()
        };
        // One statement each: the family's read guard must be gone before the next
        // `get_or_create` takes its write lock.
        let verified = family
            .get_or_create(&IdentityLabels {
                outcome: "verified",
                reason: "ok",
            })
            .clone();
        let anonymous = series("anonymous");
        let refused = series("refused");
        Self {
            verified,
            anonymous,
            refused,
        }
    }

    /// Count one request's outcome.
    pub fn count(&self, outcome: Result<Option<TokenError>, TokenError>) {
        let at = |e: TokenError| TokenError::ALL.iter().position(|x| *x == e).unwrap_or(0);
        match outcome {
            Ok(None) => self.verified.inc(),
            Ok(Some(e)) => self.anonymous[at(e)].inc(),
            Err(e) => self.refused[at(e)].inc(),
        };
    }
}

/// Labels of `tidegate_config_reloads_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `applied`, `unchanged`, `failed` or `stuck` (reading or building gave no answer
    /// within the bound, or an abandoned read is still blocked).
    pub outcome: &'static str,
}

/// Labels of `tidegate_limit_decisions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    /// Limit rule name.
    pub rule: Name,
    /// `allowed`, `limited`, `dry_run_limited`, `paced` or `dry_run_paced`.
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

/// Labels of `tidegate_plan_active`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PlanLabels {
    /// Plan name.
    pub plan: Name,
    /// `manual` (listed in `active_plans`) or `auto` (switched on by its trigger).
    pub cause: &'static str,
}

/// Labels of `tidegate_plan_transitions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PlanTransitionLabels {
    /// Plan name.
    pub plan: Name,
    /// `manual` or `auto`.
    pub cause: &'static str,
    /// `on` or `off`.
    pub to: &'static str,
}

/// Labels of `tidegate_ramp_weight_ppm`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RampLabels {
    /// The route rule whose split is ramped.
    pub route: Name,
    /// The target ramped.
    pub target: Name,
}

/// Labels of `tidegate_ramp_step` and of the ramp counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RampRouteLabels {
    /// The route rule whose split is ramped.
    pub route: Name,
}

/// Labels of `tidegate_ramp_transitions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RampTransitionLabels {
    /// The route rule whose split is ramped.
    pub route: Name,
    /// `started`, `restarted`, `resumed`, `advanced`, `completed`, `held` or `rolled_back`.
    pub to: &'static str,
}

/// Labels of `tidegate_ramp_verdicts_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RampVerdictLabels {
    /// The route rule whose split is ramped.
    pub route: Name,
    /// `pass`, `breach` or `waiting`.
    pub outcome: &'static str,
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

/// Labels of `tidegate_overload_admission_level`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LevelLabels {
    /// `business` (0 low .. 3 critical) or `user` (0 .. levels - 1).
    pub part: &'static str,
}

/// Labels of the per-cap overload gauges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GateLabels {
    /// `global`, `interface` or `upstream`.
    pub scope: &'static str,
    /// Interface or upstream name (`global` for the global cap).
    pub name: Name,
}

/// Labels of `tidegate_overload_rejected_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OverloadRejectLabels {
    /// `admission`, `queue_full` or `queue_timeout`.
    pub reason: &'static str,
    /// Interface name, or `none`.
    pub interface: Name,
}

/// Labels of `tidegate_shadow_breaker_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ShadowBreakerLabels {
    /// Breaker name.
    pub breaker: Name,
    /// The upstream it guards.
    pub upstream: Name,
    /// `would_open` (it would have opened) or `would_reject` (it would have kept a request
    /// from the upstream).
    pub event: &'static str,
}

/// Labels of `tidegate_shadow_shed_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InterfaceLabels {
    /// Interface name, or `none`.
    pub interface: Name,
}

/// Labels of `tidegate_shadow_split_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ShadowSplitLabels {
    /// Route rule name.
    pub route: Name,
    /// The upstream the request went to.
    pub from: Name,
    /// The upstream the shadow split would have sent it to.
    pub to: Name,
}

/// Labels of the per-mirror families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MirrorLabels {
    /// The route rule whose requests are copied.
    pub route: Name,
    /// The mirror upstream.
    pub upstream: Name,
}

/// Labels of `tidegate_mirror_requests_total` and `tidegate_mirror_responses_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MirrorOutcomeLabels {
    /// The route rule whose requests are copied.
    pub route: Name,
    /// The mirror upstream.
    pub upstream: Name,
    /// Requests: `sent`, `skipped_body`, `body_incomplete`, `dropped` or `skipped_down`;
    /// responses: the
    /// status class (`2xx`, ...) or an error code (`upstream_timeout`, ...).
    pub outcome: &'static str,
}

/// Labels of `tidegate_cache_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CacheLabels {
    /// The cached interface.
    pub interface: Name,
    /// `hit`, `miss`, `coalesced`, `bypass` or `stored`.
    pub outcome: &'static str,
}

/// Labels of `tidegate_upgrades_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpgradeLabels {
    /// The route rule that allowed the upgrade.
    pub route: Name,
    /// `switched`, `declined`, `failed`, `refused_capacity` or `refused`.
    pub outcome: &'static str,
}

/// Labels of `tidegate_upgraded_closed_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TunnelCloseLabels {
    /// `closed`, `error`, `idle_timeout` or `shutdown`.
    pub reason: &'static str,
}

/// Labels of `tidegate_endpoint_healthy`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Upstream name.
    pub upstream: Name,
    /// The endpoint as configured (`host:port`), never a resolved or request-given address.
    pub endpoint: Name,
}

/// Labels of `tidegate_trace_spans_dropped_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SpanDropLabels {
    /// `queue_full` (the export queue was at `max_queue`) or `export_failed` (the collector
    /// refused, failed or timed out: the batch is not retried).
    pub reason: &'static str,
}

/// Labels of `tidegate_endpoint_ejections_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EjectionLabels {
    /// Upstream name.
    pub upstream: Name,
    /// The endpoint as configured.
    pub endpoint: Name,
    /// `consecutive_failures` (passive outlier ejection) or `health_check` (failed active
    /// checks).
    pub reason: &'static str,
}

/// Labels of `tidegate_grpc_status_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GrpcStatusLabels {
    /// Upstream name.
    pub upstream: Name,
    /// The gRPC status code's name (`OK`, `NOT_FOUND`, ...), or `unknown` for a
    /// `grpc-status` outside the 17 codes.
    pub code: &'static str,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Bumped whenever a per-rule series (a limit's counters, a split target's count) is
    /// used for the first time: the dashboard's sampler visits only series that were, and
    /// lists them again when this moves. Not exported.
    pub series_activated: Arc<AtomicU64>,
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
    /// Requests by what the identity phase (`identity.jwt`) made of them.
    pub identity: IdentityCounters,
    /// Time from the triggering file event (or signal) to the reload's end.
    pub config_reload_seconds: Histogram,
    /// Generation of the live config (1 at start, +1 per applied reload).
    pub config_generation: Gauge,
    /// 1 while a config read abandoned after the bound is still blocked (no new read
    /// starts until it returns), else 0.
    pub config_read_stuck: Gauge,
    /// Limit decisions by rule and outcome (a request checked by three limits counts three).
    pub limit_decisions: Family<LimitLabels, Counter>,
    /// How long requests paced by a limit (`max_delay_ms`) were held for their turn, by
    /// rule: one observation per paced request, its reserved wait.
    pub limit_pace_delay: Family<RuleLabels, Histogram>,
    /// Cluster-scope limit checks the limit store (Redis) failed or timed out, by rule;
    /// each was answered by the rule's `on_store_error`.
    pub limit_store_errors: Family<RuleLabels, Counter>,
    /// Requests answered by a fallback rule, by rule.
    pub fallbacks: Family<RuleLabels, Counter>,
    /// Breaker state by breaker: 0 closed, 1 open, 2 half-open.
    pub breaker_state: Family<BreakerLabels, Gauge>,
    /// 1 while a plan is in force for that cause (`manual` or `auto`), else 0.
    pub plan_active: Family<PlanLabels, Gauge>,
    /// Plans switched on or off, by cause.
    pub plan_transitions: Family<PlanTransitionLabels, Counter>,
    /// A ramped target's weight in force, in parts per million.
    pub ramp_weight: Family<RampLabels, Gauge>,
    /// A ramp's current step (1 for the first).
    pub ramp_step: Family<RampRouteLabels, Gauge>,
    /// Ramps' changes, by route and what they did.
    pub ramp_transitions: Family<RampTransitionLabels, Counter>,
    /// Judging windows of ramps, by route and outcome.
    pub ramp_verdicts: Family<RampVerdictLabels, Counter>,
    /// Breaker state changes by breaker and new state.
    pub breaker_transitions: Family<TransitionLabels, Counter>,
    /// Requests an open (or probing) breaker kept from its upstream.
    pub breaker_rejections: Family<BreakerLabels, Counter>,
    /// The admission level: its business part and its user part.
    pub overload_admission_level: Family<LevelLabels, Gauge>,
    /// Current limit of each overload cap.
    pub overload_limit: Family<GateLabels, Gauge>,
    /// Slots in use under each overload cap.
    pub overload_in_flight: Family<GateLabels, Gauge>,
    /// Requests waiting at each overload cap.
    pub overload_queue_depth: Family<GateLabels, Gauge>,
    /// Requests refused by overload protection, by reason and interface.
    pub overload_rejected: Family<OverloadRejectLabels, Counter>,
    /// Mean wait for overload slots over the last window.
    pub overload_queue_delay_seconds: Gauge<f64, AtomicU64>,
    /// 1 if the last window was overloaded.
    pub overload_overloaded: Gauge,
    /// Requests a dry-run fallback would have answered, by rule.
    pub shadow_fallback: Family<RuleLabels, Counter>,
    /// What dry-run breakers would have done: opened, or kept a request from the upstream.
    pub shadow_breaker: Family<ShadowBreakerLabels, Counter>,
    /// Requests dry-run admission would have shed, by interface.
    pub shadow_shed: Family<InterfaceLabels, Counter>,
    /// Requests a route's shadow split would have sent to another upstream.
    pub shadow_split: Family<ShadowSplitLabels, Counter>,
    /// Mirror copies by route, mirror upstream and what became of them before sending.
    pub mirror_requests: Family<MirrorOutcomeLabels, Counter>,
    /// Mirror copies' answers by status class, or their failures by error code.
    pub mirror_responses: Family<MirrorOutcomeLabels, Counter>,
    /// Time from sending a mirror copy to its response head.
    pub mirror_latency: Family<MirrorLabels, Histogram>,
    /// Mirror copies in flight now.
    pub mirror_in_flight: Family<MirrorLabels, Gauge>,
    /// Requests to cached interfaces by what the cache did: `hit`, `miss`, `coalesced`,
    /// `bypass`; and answers `stored`.
    pub cache: Family<CacheLabels, Counter>,
    /// Upgrade requests a route allowed, by route and what became of them.
    pub upgrades: Family<UpgradeLabels, Counter>,
    /// Upgraded connections (tunnels) open now.
    pub upgraded_connections: Gauge,
    /// Tunnels closed, by why.
    pub upgraded_closed: Family<TunnelCloseLabels, Counter>,
    /// 1 while an endpoint is in rotation, 0 while ejected or failing its health checks.
    pub endpoint_healthy: Family<EndpointLabels, Gauge>,
    /// Endpoints taken out of rotation, by reason.
    pub endpoint_ejections: Family<EjectionLabels, Counter>,
    /// Sampled spans the OTLP collector accepted.
    pub trace_spans_exported: Counter,
    /// Sampled spans dropped, by why.
    pub trace_spans_dropped: Family<SpanDropLabels, Counter>,
    /// gRPC statuses (`grpc-status`) upstreams answered with, by upstream and code.
    pub grpc_status: Family<GrpcStatusLabels, Counter>,
}

/// Handles into `tidegate_requests_total` for one runtime, one per (interface, upstream,
/// status class) it has answered: looked up in the family on first use, then reused, so the
/// request path pays one atomic add instead of hashing a label set under the family's lock.
#[derive(Debug)]
pub struct RequestSeries {
    /// Upstream slots per interface: the runtime's upstreams, then `none`.
    upstreams: usize,
    /// Per interface (then one for `none`): `upstreams × 5` cells, allocated on first use.
    cells: Box<[OnceLock<SeriesRow>]>,
}

/// One interface's request counters: by upstream (then `none`), then status class.
type SeriesRow = Box<[OnceLock<Counter>]>;

// === impl RequestSeries ===

impl RequestSeries {
    /// Room for `interfaces` interfaces and `upstreams` upstreams (each plus `none`).
    pub fn new(interfaces: usize, upstreams: usize) -> Self {
        Self {
            upstreams: upstreams + 1,
            cells: (0..=interfaces).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The counter of interface `iface` (`None`: no interface), upstream `upstream` (`None`:
    /// answered locally) and `status`'s class; `labels` names them on first use.
    pub fn counter(
        &self,
        metrics: &Metrics,
        iface: Option<usize>,
        upstream: Option<usize>,
        status: http::StatusCode,
        labels: impl FnOnce() -> (Name, Name),
    ) -> &Counter {
        let row = iface
            .unwrap_or(self.cells.len() - 1)
            .min(self.cells.len() - 1);
        let col = upstream
            .unwrap_or(self.upstreams - 1)
            .min(self.upstreams - 1);
        let class = (usize::from(status.as_u16() / 100)).clamp(1, 5) - 1;
        let cells = self.cells[row]
            .get_or_init(|| (0..self.upstreams * 5).map(|_| OnceLock::new()).collect());
        cells[col * 5 + class].get_or_init(|| {
            let (interface, upstream) = labels();
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    interface,
                    upstream,
                    status: status_class(status),
                })
                .clone()
        })
    }
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
        let identity = Family::<IdentityLabels, Counter>::default();
        registry.register(
            "identity",
            "Requests by identity outcome (identity.jwt): verified, anonymous or refused, by reason",
            identity.clone(),
        );
        let identity = IdentityCounters::new(&identity);
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
        let config_read_stuck = Gauge::default();
        registry.register(
            "config_read_stuck",
            "1 while a config read that gave no answer within the bound is still blocked, else 0",
            config_read_stuck.clone(),
        );
        let limit_decisions = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_decisions",
            "Rate limit decisions, by rule and outcome (allowed, limited, dry_run_limited, paced, dry_run_paced)",
            limit_decisions.clone(),
        );
        let limit_pace_delay = Family::<RuleLabels, Histogram>::new_with_constructor(|| {
            // 1 ms to about 65 s: the range of `max_delay_ms`.
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register(
            "limit_pace_delay_seconds",
            "Wait of requests paced by a limit's max_delay_ms, by rule",
            limit_pace_delay.clone(),
        );
        let limit_store_errors = Family::<RuleLabels, Counter>::default();
        registry.register(
            "limit_store_errors",
            "Cluster-scope limit checks whose store (Redis) failed or timed out, by rule",
            limit_store_errors.clone(),
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
        let plan_active = Family::<PlanLabels, Gauge>::default();
        registry.register(
            "plan_active",
            "1 while an emergency plan is in force, by plan and cause (manual or auto)",
            plan_active.clone(),
        );
        let plan_transitions = Family::<PlanTransitionLabels, Counter>::default();
        registry.register(
            "plan_transitions",
            "Emergency plans switched on or off, by plan, cause (manual or auto) and new state",
            plan_transitions.clone(),
        );
        let ramp_weight = Family::<RampLabels, Gauge>::default();
        registry.register(
            "ramp_weight_ppm",
            "A ramped split target's weight in force, in parts per million, by route and target",
            ramp_weight.clone(),
        );
        let ramp_step = Family::<RampRouteLabels, Gauge>::default();
        registry.register(
            "ramp_step",
            "A ramp's current step (1 for the first), by route",
            ramp_step.clone(),
        );
        let ramp_transitions = Family::<RampTransitionLabels, Counter>::default();
        registry.register(
            "ramp_transitions",
            "Ramps started, advanced, completed, held or rolled back, by route",
            ramp_transitions.clone(),
        );
        let ramp_verdicts = Family::<RampVerdictLabels, Counter>::default();
        registry.register(
            "ramp_verdicts",
            "Ramp judging windows, by route and outcome (pass, breach, waiting)",
            ramp_verdicts.clone(),
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
        let overload_admission_level = Family::<LevelLabels, Gauge>::default();
        registry.register(
            "overload_admission_level",
            "Admission level: business part (0 low .. 3 critical) and user part; lower ranks are refused",
            overload_admission_level.clone(),
        );
        let overload_limit = Family::<GateLabels, Gauge>::default();
        registry.register(
            "overload_limit",
            "Current limit of each overload cap (adaptive ones move)",
            overload_limit.clone(),
        );
        let overload_in_flight = Family::<GateLabels, Gauge>::default();
        registry.register(
            "overload_in_flight",
            "Slots in use under each overload cap",
            overload_in_flight.clone(),
        );
        let overload_queue_depth = Family::<GateLabels, Gauge>::default();
        registry.register(
            "overload_queue_depth",
            "Requests waiting for a slot at each overload cap",
            overload_queue_depth.clone(),
        );
        let overload_rejected = Family::<OverloadRejectLabels, Counter>::default();
        registry.register(
            "overload_rejected",
            "Requests refused by overload protection, by reason (admission, queue_full, queue_timeout) and interface",
            overload_rejected.clone(),
        );
        let overload_queue_delay_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "overload_queue_delay_seconds",
            "Mean wait for overload slots over the last control window",
            overload_queue_delay_seconds.clone(),
        );
        let overload_overloaded = Gauge::default();
        registry.register(
            "overload_overloaded",
            "1 if the last control window counted as overloaded",
            overload_overloaded.clone(),
        );
        let shadow_fallback = Family::<RuleLabels, Counter>::default();
        registry.register(
            "shadow_fallback",
            "Requests a dry-run fallback rule would have answered locally, by rule",
            shadow_fallback.clone(),
        );
        let shadow_breaker = Family::<ShadowBreakerLabels, Counter>::default();
        registry.register(
            "shadow_breaker",
            "Dry-run circuit breakers: times one would have opened (would_open) and requests it would have refused (would_reject)",
            shadow_breaker.clone(),
        );
        let shadow_shed = Family::<InterfaceLabels, Counter>::default();
        registry.register(
            "shadow_shed",
            "Requests dry-run overload admission would have shed, by interface",
            shadow_shed.clone(),
        );
        let shadow_split = Family::<ShadowSplitLabels, Counter>::default();
        registry.register(
            "shadow_split",
            "Requests a route's shadow split would have sent to another upstream, by route, actual upstream and shadow upstream",
            shadow_split.clone(),
        );
        let mirror_requests = Family::<MirrorOutcomeLabels, Counter>::default();
        registry.register(
            "mirror_requests",
            "Mirror copies by route and mirror upstream: sent, skipped_body, body_incomplete, dropped or skipped_down",
            mirror_requests.clone(),
        );
        let mirror_responses = Family::<MirrorOutcomeLabels, Counter>::default();
        registry.register(
            "mirror_responses",
            "Answers to mirror copies by status class, or their failures by error code (discarded)",
            mirror_responses.clone(),
        );
        let mirror_latency = Family::<MirrorLabels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~13 s, as the upstream latency
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "mirror_latency_seconds",
            "Time from sending a mirror copy to its response head",
            mirror_latency.clone(),
        );
        let mirror_in_flight = Family::<MirrorLabels, Gauge>::default();
        registry.register(
            "mirror_in_flight",
            "Mirror copies in flight now",
            mirror_in_flight.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache",
            "Requests to cached interfaces: hit (a kept answer), coalesced (another request's upstream answer), miss (went upstream), bypass (not cacheable); and stored (answers kept)",
            cache.clone(),
        );
        let upgrades = Family::<UpgradeLabels, Counter>::default();
        registry.register(
            "upgrades",
            "Upgrade requests a route allowed, by route: switched (101, tunnel open), declined (another answer, passed through), failed (no answer, or a 101 for another protocol), refused_capacity (503, max_upgraded_connections) or refused (answered by the gateway after the decision: an overload cap, a cluster-scope limit)",
            upgrades.clone(),
        );
        let upgraded_connections = Gauge::default();
        registry.register(
            "upgraded_connections",
            "Upgraded connections (tunnels) open now",
            upgraded_connections.clone(),
        );
        let upgraded_closed = Family::<TunnelCloseLabels, Counter>::default();
        registry.register(
            "upgraded_closed",
            "Tunnels closed: closed (a side ended), error, idle_timeout or shutdown",
            upgraded_closed.clone(),
        );
        let endpoint_healthy = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "endpoint_healthy",
            "1 while an upstream endpoint is in rotation, 0 while ejected or failing its health checks",
            endpoint_healthy.clone(),
        );
        let endpoint_ejections = Family::<EjectionLabels, Counter>::default();
        registry.register(
            "endpoint_ejections",
            "Upstream endpoints taken out of rotation, by reason",
            endpoint_ejections.clone(),
        );
        let trace_spans_exported = Counter::default();
        registry.register(
            "trace_spans_exported",
            "Sampled request spans the OTLP collector accepted",
            trace_spans_exported.clone(),
        );
        let trace_spans_dropped = Family::<SpanDropLabels, Counter>::default();
        registry.register(
            "trace_spans_dropped",
            "Sampled request spans not exported: queue_full (the export queue was at max_queue) or export_failed (the collector refused, failed or timed out)",
            trace_spans_dropped.clone(),
        );
        let grpc_status = Family::<GrpcStatusLabels, Counter>::default();
        registry.register(
            "grpc_status",
            "gRPC statuses answered by upstreams (grpc-status in the trailers, or the head of a trailers-only answer)",
            grpc_status.clone(),
        );
        Self {
            registry,
            series_activated: Arc::default(),
            trace_spans_exported,
            trace_spans_dropped,
            grpc_status,
            cache,
            upgrades,
            upgraded_connections,
            upgraded_closed,
            endpoint_healthy,
            endpoint_ejections,
            shadow_fallback,
            shadow_breaker,
            shadow_shed,
            shadow_split,
            mirror_requests,
            mirror_responses,
            mirror_latency,
            mirror_in_flight,
            overload_admission_level,
            overload_limit,
            overload_in_flight,
            overload_queue_depth,
            overload_rejected,
            overload_queue_delay_seconds,
            overload_overloaded,
            limit_decisions,
            limit_pace_delay,
            limit_store_errors,
            fallbacks,
            breaker_state,
            plan_active,
            plan_transitions,
            ramp_weight,
            ramp_step,
            ramp_transitions,
            ramp_verdicts,
            breaker_transitions,
            breaker_rejections,
            config_reloads,
            identity,
            config_reload_seconds,
            config_generation,
            config_read_stuck,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A cell hands out the family's series for its labels, once: the same counter for the
    /// same (interface, upstream, class), another for another class, and `none` cells for
    /// requests without an interface or upstream.
    #[test]
    fn request_series_cells_are_the_family_series() {
        let m = Metrics::new();
        let series = RequestSeries::new(2, 1);
        let names = || (Name::from("grab"), Name::from("v1"));
        let ok = http::StatusCode::OK;
        series.counter(&m, Some(0), Some(0), ok, names).inc();
        series
            .counter(&m, Some(0), Some(0), http::StatusCode::CREATED, || {
                panic!("a cached cell does not look its labels up again")
            })
            .inc();
        series
            .counter(&m, Some(0), Some(0), http::StatusCode::BAD_GATEWAY, names)
            .inc();
        series
            .counter(&m, None, None, http::StatusCode::TOO_MANY_REQUESTS, || {
                (Name::from("none"), Name::from("none"))
            })
            .inc();
        let get = |i: &str, u: &str, s: &'static str| {
            m.requests
                .get_or_create(&RequestLabels {
                    interface: i.into(),
                    upstream: u.into(),
                    status: s,
                })
                .get()
        };
        assert_eq!(get("grab", "v1", "2xx"), 2);
        assert_eq!(get("grab", "v1", "5xx"), 1);
        assert_eq!(get("none", "none", "4xx"), 1);
        assert_eq!(get("grab", "v1", "4xx"), 0);
    }
}
