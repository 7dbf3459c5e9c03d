//! Governance state: the limiters, cluster-scope limits and circuit breakers behind the
//! decision's limit and breaker phases (see `pipeline::decide`).
//!
//! [`Governors`] is the per-runtime state (limiters, breakers, label names). A reload builds
//! a new one from the previous: limiters and breakers whose rule is unchanged are carried
//! over, state and all.
//!
//! - [`limit`]: keyed GCRA limiters, one per limit rule and quota.
//! - [`cluster`]: cluster-scope limits: GCRA in Redis, token leases spent locally.
//! - [`breaker`]: circuit breaker state (closed, open, half-open) over a sliding window.

pub mod breaker;
pub mod cluster;
pub mod limit;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use prometheus_client::metrics::counter::Counter;
use rules::model::{LimitMode, OnStoreError};
use rules::{RouteDecision, RouteInput, Snapshot};

use self::breaker::{Admission, Breaker, Breakers, CallResult, Permit, State, Transition};
use self::cluster::ClusterStore;
use self::limit::{Limiters, Outcome, Rejection, RemoteCheck, RuleLimiter};
use crate::clock::Stamp;
use crate::metrics::{
    BreakerLabels, LimitLabels, Metrics, Name, RuleLabels, ShadowBreakerLabels, TransitionLabels,
};
use crate::respond::{self, GatewayError};
use crate::stats::Class;

/// Runtime state of limits and breakers for one snapshot.
#[derive(Debug)]
pub struct Governors {
    /// Keyed limiters, indexed like the snapshot's limits.
    pub limiters: Limiters,
    /// Breakers, indexed like the snapshot's breakers.
    pub breakers: Breakers,
    /// Fallback rule names as metric labels, indexed like the snapshot's fallbacks.
    fallback_names: Vec<Name>,
    /// The Redis of `server.redis`, for cluster-scope limits (bootstrap config: the same
    /// store is carried over every reload).
    pub cluster: Option<Arc<ClusterStore>>,
}

/// Cluster-scope limit checks that need Redis, set aside by the synchronous decision and
/// made before the request is forwarded.
#[derive(Debug)]
pub struct ClusterPending {
    store: Option<Arc<ClusterStore>>,
    checks: Vec<RemoteCheck>,
}

/// The breaker phase's verdict on a routed request.
#[derive(Debug)]
pub enum BreakerVerdict<'r> {
    /// The request was not routed, so no breaker was asked.
    Unchecked,
    /// The chosen upstream has no breaker.
    None,
    /// Closed, or half-open with a probe slot free: call the upstream and report through the
    /// permit (taken by the decision's action; `None` when peeking).
    Pass {
        /// The breaker.
        breaker: &'r Arc<Breaker>,
        /// Leave to call, with the duty to report.
        permit: Option<Permit<'r>>,
        /// A dry-run breaker that would have refused the request (shadow verdict).
        would_reject: bool,
    },
    /// Open: its answer or its alternate upstream instead.
    Open {
        /// The breaker.
        breaker: &'r Arc<Breaker>,
    },
}

// === impl Governors ===

impl Governors {
    /// State for `snap`, carrying over what `previous` had for unchanged rules (and its
    /// cluster store).
    pub fn build(snap: &Snapshot, previous: Option<&Self>) -> Self {
        let cluster = previous.and_then(|p| p.cluster.clone());
        Self::build_cluster(snap, previous, cluster)
    }

    /// [`Governors::build`] with the cluster store of `server.redis`.
    pub fn build_cluster(
        snap: &Snapshot,
        previous: Option<&Self>,
        cluster: Option<Arc<ClusterStore>>,
    ) -> Self {
        let lease = cluster.as_ref().map_or(limit::DEFAULT_LEASE, |c| c.lease);
        Self {
            cluster,
            limiters: Limiters::build_leased(
                snap,
                crate::clock::limiter_clock(),
                previous.map(|p| &p.limiters),
                lease,
            ),
            breakers: Breakers::build(snap, previous.map(|p| &p.breakers)),
            fallback_names: snap
                .governance
                .fallbacks
                .iter()
                .map(|f| Name(f.name.as_ref().into()))
                .collect(),
        }
    }

    /// The limit phase: every limit that applies, in rule order, until an enforced one
    /// refuses. `observe` hears each verdict. Returns the refusal, and the cluster-scope
    /// checks that need Redis (to be [`ClusterPending::resolve`]d before forwarding; none when
    /// the request is refused). Serving, the limits are counted at `at` (the request's start:
    /// its limits need no reading of their own); without `at`, nothing is spent and
    /// cluster-scope rules are passed over (they are decided in Redis).
    pub fn check_limits(
        &self,
        snap: &Snapshot,
        input: &RouteInput<'_>,
        at: Option<Stamp>,
        observe: impl FnMut(&RuleLimiter, Outcome, Duration),
    ) -> (Option<Rejection>, Option<ClusterPending>) {
        let Some(at) = at else {
            return (
                limit::peeking(|| self.limiters.check_local(snap, input, None, observe)),
                None,
            );
        };
        let now = Some(at.limiter_instant());
        // Without a cluster-scope rule there is nothing to set aside (and no list to drop).
        if !self.limiters.any_cluster {
            return (self.limiters.check_local(snap, input, now, observe), None);
        }
        let mut remote = Vec::new();
        let rejection = self
            .limiters
            .check_remote(snap, input, now, observe, &mut remote);
        let pending = (rejection.is_none() && !remote.is_empty()).then(|| ClusterPending {
            store: self.cluster.clone(),
            checks: remote,
        });
        (rejection, pending)
    }

    /// Count a fallback's answer.
    pub fn count_fallback(&self, metrics: &Metrics, rule_id: u32) {
        metrics
            .fallbacks
            .get_or_create(&RuleLabels {
                rule: self.fallback_names[rule_id as usize].clone(),
            })
            .inc();
    }

    /// The breaker phase: the say of the chosen upstream's breaker. With `metrics` (serving),
    /// a permit is taken and transitions and rejections are counted; without, the breaker's
    /// state is only read.
    ///
    /// Inlined where the decision calls it: a closed breaker's permit, the common case when
    /// serving, is a look-up and a load; the rest is out of line ([`Governors::breaker_at`]).
    #[inline]
    pub fn breaker(
        &self,
        snap: &Snapshot,
        route: &RouteDecision<'_>,
        metrics: Option<&Metrics>,
    ) -> BreakerVerdict<'_> {
        let Some(bi) = snap.breaker_for(route.upstream, Some(route.rule_id)) else {
            return BreakerVerdict::None;
        };
        let b = &self.breakers.by_id[bi as usize];
        if metrics.is_some()
            && let Some(permit) = b.admit_closed()
        {
            return BreakerVerdict::Pass {
                breaker: b,
                permit: Some(permit),
                would_reject: false,
            };
        }
        Self::breaker_at(b, metrics)
    }

    /// [`Governors::breaker`] of breaker `b` when it is not closed, or when not serving.
    #[inline(never)]
    fn breaker_at<'g>(b: &'g Arc<Breaker>, metrics: Option<&Metrics>) -> BreakerVerdict<'g> {
        let Some(metrics) = metrics else {
            let breaker = b;
            return match (b.would_admit(breaker::now()), b.def.dry_run) {
                (true, _) => BreakerVerdict::Pass {
                    breaker,
                    permit: None,
                    would_reject: false,
                },
                (false, true) => BreakerVerdict::Pass {
                    breaker,
                    permit: None,
                    would_reject: true,
                },
                (false, false) => BreakerVerdict::Open { breaker },
            };
        };
        let (admission, transition) = b.admit_at(breaker::now);
        if let Some(t) = transition {
            on_transition(metrics, b, t);
        }
        match admission {
            Admission::Pass(p) => BreakerVerdict::Pass {
                breaker: b,
                permit: Some(p),
                would_reject: false,
            },
            Admission::Shadow(p) => {
                count_shadow_breaker(metrics, b, "would_reject");
                tracing::debug!(
                    target: "tidegate::shadow",
                    kind = "breaker",
                    breaker = &*b.name.0,
                    upstream = &*b.upstream.0,
                    state = b.state().label(),
                    "breaker would refuse (dry run)"
                );
                BreakerVerdict::Pass {
                    breaker: b,
                    permit: Some(p),
                    would_reject: true,
                }
            }
            Admission::Reject => {
                metrics
                    .breaker_rejections
                    .get_or_create(&breaker_labels(b))
                    .inc();
                BreakerVerdict::Open { breaker: b }
            }
        }
    }

    /// Count the requests a dry-run fallback would have answered.
    pub fn count_shadow_fallback(&self, metrics: &Metrics, rule_id: u32) {
        metrics
            .shadow_fallback
            .get_or_create(&RuleLabels {
                rule: self.fallback_names[rule_id as usize].clone(),
            })
            .inc();
    }

    /// Set every enforced breaker's state gauge (at start-up and after a reload, so a breaker
    /// that never changed state is still exported). A dry-run breaker's state is not the
    /// upstream's: it is seen through `tidegate_shadow_breaker_total` and `explain`.
    pub fn export_states(&self, metrics: &Metrics) {
        for b in self.breakers.by_id.iter().filter(|b| !b.def.dry_run) {
            metrics
                .breaker_state
                .get_or_create(&breaker_labels(b))
                .set(b.state() as i64);
        }
    }
}

/// Report a forwarded call to its breaker, as done at `now`: 5xx and upstream failures are
/// failures; errors that are the client's (a body too large) say nothing and are not
/// reported.
pub fn finish_call(
    metrics: &Metrics,
    permit: Option<Permit<'_>>,
    outcome: Result<http::StatusCode, GatewayError>,
    latency: Duration,
    now: crate::clock::Stamp,
) {
    let Some(mut p) = permit else { return };
    let result = match outcome {
        Ok(s) if s.is_server_error() => CallResult::Failure,
        Ok(_) => CallResult::Success,
        Err(
            GatewayError::UpstreamTimeout
            | GatewayError::UpstreamUnavailable
            | GatewayError::UpstreamReset
            | GatewayError::UpstreamTls,
        ) => CallResult::Failure,
        Err(_) => return, // dropping the permit gives a probe slot back
    };
    if let Some(t) = p.report(now.nanos(), result, latency) {
        on_transition(metrics, p.breaker(), t);
    }
}

// === impl ClusterPending ===

impl ClusterPending {
    /// Make the set-aside cluster checks, in rule order: `None` to go on, or the answer
    /// (429, or 503 for a `fail_closed` rule whose store failed). Waits at most the store
    /// timeout per check; background refills are started and not waited for.
    pub async fn resolve(self, metrics: &Metrics) -> Option<(Response<Full<Bytes>>, Class)> {
        for c in self.checks {
            let Some(cl) = &c.rule.cluster else { continue };
            if c.refill_only {
                if let Some(store) = self.store.clone() {
                    let rule = Arc::clone(&c.rule);
                    tokio::spawn(async move {
                        if let Some(cl) = &rule.cluster {
                            cl.refill(&store, c.quota, c.key).await;
                        }
                    });
                }
                continue;
            }
            let answer = match &self.store {
                Some(store) => cl.acquire(store, c.quota, c.key).await,
                // A reload added a cluster rule to a gateway started without server.redis.
                None => Err(cluster::StoreUnavailable),
            };
            let lim = &*c.rule;
            match answer {
                Ok(Ok(())) => count_limit(metrics, lim, Outcome::Allowed),
                Ok(Err(wait)) if lim.mode == LimitMode::DryRun => {
                    count_limit(metrics, lim, Outcome::DryRunLimited);
                    tracing::info!(
                        target: "tidegate::limit",
                        rule = &*lim.name.0,
                        mode = "dry_run",
                        scope = "cluster",
                        retry_after_ms = wait.as_millis() as u64,
                        "limit would reject (dry run)"
                    );
                }
                Ok(Err(wait)) => {
                    count_limit(metrics, lim, Outcome::Limited);
                    let rej = Rejection {
                        rule: Arc::clone(&c.rule),
                        quota: c.quota,
                        retry_after: wait,
                    };
                    return Some((rej.response(), Class::Limited));
                }
                Err(_) => {
                    metrics
                        .limit_store_errors
                        .get_or_create(&RuleLabels {
                            rule: lim.name.clone(),
                        })
                        .inc();
                    let closed = cl.on_store_error == OnStoreError::FailClosed
                        && lim.mode == LimitMode::Enforce;
                    if closed {
                        let resp = respond::limit_store_unavailable(&lim.name.0);
                        return Some((resp, Class::Shed));
                    }
                    count_limit(metrics, lim, Outcome::Allowed);
                }
            }
        }
        None
    }
}

pub(crate) fn count_limit(metrics: &Metrics, lim: &RuleLimiter, outcome: Outcome) {
    let counters = match lim.counters.get() {
        Some(c) => c,
        None => limit_counters(metrics, lim),
    };
    counters[outcome as usize].inc();
}

/// A limiter's counters, at its first decision: the sampler is told after they are set.
#[cold]
fn limit_counters<'l>(
    metrics: &Metrics,
    lim: &'l RuleLimiter,
) -> &'l [Counter; Outcome::ALL.len()] {
    let counters = lim.counters.get_or_init(|| {
        Outcome::ALL.map(|o| {
            metrics
                .limit_decisions
                .get_or_create(&LimitLabels {
                    rule: lim.name.clone(),
                    outcome: o.label(),
                })
                .clone()
        })
    });
    (metrics.series_activated).fetch_add(1, std::sync::atomic::Ordering::Release);
    counters
}

fn breaker_labels(b: &Breaker) -> BreakerLabels {
    BreakerLabels {
        breaker: b.name.clone(),
        upstream: b.upstream.clone(),
    }
}

fn count_shadow_breaker(metrics: &Metrics, b: &Breaker, event: &'static str) {
    metrics
        .shadow_breaker
        .get_or_create(&ShadowBreakerLabels {
            breaker: b.name.clone(),
            upstream: b.upstream.clone(),
            event,
        })
        .inc();
}

fn on_transition(metrics: &Metrics, b: &Breaker, t: Transition) {
    if b.def.dry_run {
        // Its states are the ones an enforced breaker would go through: counted and logged
        // as shadow, kept out of the families that say what the upstream gets.
        if t.to == State::Open {
            count_shadow_breaker(metrics, b, "would_open");
        }
        tracing::info!(
            target: "tidegate::shadow",
            kind = "breaker",
            breaker = &*b.name.0,
            upstream = &*b.upstream.0,
            from = t.from.label(),
            to = t.to.label(),
            "circuit breaker state change (dry run)"
        );
        return;
    }
    metrics
        .breaker_state
        .get_or_create(&breaker_labels(b))
        .set(t.to as i64);
    metrics
        .breaker_transitions
        .get_or_create(&TransitionLabels {
            breaker: b.name.clone(),
            upstream: b.upstream.clone(),
            to: t.to.label(),
        })
        .inc();
    tracing::warn!(
        target: "tidegate::breaker",
        breaker = &*b.name.0,
        upstream = &*b.upstream.0,
        from = t.from.label(),
        to = t.to.label(),
        "circuit breaker state change"
    );
}

/// Count a limit's verdict, and log a dry run's refusal.
pub(crate) fn observe_limit(
    metrics: &Metrics,
    lim: &RuleLimiter,
    outcome: Outcome,
    wait: Duration,
    input: &RouteInput<'_>,
) {
    count_limit(metrics, lim, outcome);
    if outcome == Outcome::Paced {
        metrics
            .limit_pace_delay
            .get_or_create(&RuleLabels {
                rule: lim.name.clone(),
            })
            .observe(wait.as_secs_f64());
    }
    if outcome == Outcome::DryRunLimited {
        // The point of a dry run is to see who would be limited: log it (logs, unlike
        // metric labels, may carry user IDs).
        tracing::info!(
            target: "tidegate::limit",
            rule = &*lim.name.0,
            mode = "dry_run",
            app = input.m.app.unwrap_or("none"),
            user = input.m.user.unwrap_or("none"),
            retry_after_ms = wait.as_millis() as u64,
            "limit would reject (dry run)"
        );
    }
}
