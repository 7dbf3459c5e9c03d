//! The governance step of the request path: limits, then fallbacks, then the breaker of the
//! chosen upstream. Runs synchronously inside the gateway's decision block, on the same
//! snapshot load as classification and routing.
//!
//! [`Governors`] is the per-runtime state behind it (limiters, breakers, label names). A
//! reload builds a new one from the previous: limiters and breakers whose rule is unchanged
//! are carried over, state and all.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use rules::degrade::WhenOpen;
use rules::model::{LimitMode, OnStoreError};
use rules::{RouteDecision, RouteInput, Snapshot, UpstreamId};

use crate::breaker::{Admission, Breaker, Breakers, CallResult, Permit, Transition};
use crate::cluster::ClusterStore;
use crate::forward::Upstream;
use crate::limit::{Limiters, Outcome, RemoteCheck, RuleLimiter};
use crate::metrics::{BreakerLabels, LimitLabels, Metrics, Name, RuleLabels, TransitionLabels};
use crate::respond::{self, GatewayError};

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

/// What the governance step decided before any upstream is called.
#[derive(Debug)]
pub enum Verdict {
    /// Answer locally, without the upstream (429, a fallback, an open breaker).
    Local(Response<Full<Bytes>>),
    /// Go on to route.
    Proceed,
}

/// Where a routed request goes, once its breaker has had its say.
#[derive(Debug)]
pub enum Target {
    /// Call this upstream; report to the breaker through the permit, if there is one.
    Forward(Arc<Upstream>, Option<Permit>),
    /// An open breaker answered.
    Local(Response<Full<Bytes>>),
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
        let lease = cluster
            .as_ref()
            .map_or(crate::limit::DEFAULT_LEASE, |c| c.lease);
        Self {
            cluster,
            limiters: Limiters::build_leased(
                snap,
                &governor::clock::DefaultClock::default(),
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

    /// Limits, then fallbacks: a local answer, or proceed to routing.
    ///
    /// For callers that cannot wait for Redis: a cluster-scope limit that would need it
    /// admits (see [`Limiters::check`]). The gateway uses
    /// [`Governors::before_route_cluster`].
    pub fn before_route(
        &self,
        snap: &Snapshot,
        input: &RouteInput<'_>,
        metrics: &Metrics,
    ) -> Verdict {
        self.before_route_cluster(snap, input, metrics, &mut None)
    }

    /// [`Governors::before_route`], setting aside in `pending` the cluster-scope limit
    /// checks that need Redis; the caller must [`ClusterPending::resolve`] them before
    /// forwarding. Nothing is set aside when the request is answered locally.
    pub fn before_route_cluster(
        &self,
        snap: &Snapshot,
        input: &RouteInput<'_>,
        metrics: &Metrics,
        pending: &mut Option<ClusterPending>,
    ) -> Verdict {
        let mut remote = Vec::new();
        let rejection = self.limiters.check_remote(
            snap,
            input,
            |lim, outcome, wait| observe_limit(metrics, lim, outcome, wait, input),
            &mut remote,
        );
        if let Some(rej) = rejection {
            return Verdict::Local(respond::rate_limited(&rej));
        }
        if !remote.is_empty() {
            *pending = Some(ClusterPending {
                store: self.cluster.clone(),
                checks: remote,
            });
        }
        if let Some(fb) = snap.fallback(input) {
            metrics
                .fallbacks
                .get_or_create(&RuleLabels {
                    rule: self.fallback_names[fb.rule_id as usize].clone(),
                })
                .inc();
            return Verdict::Local(respond::canned(&fb.rule.response));
        }
        Verdict::Proceed
    }

    /// The breaker's say on a routed request: forward (with a permit to report through),
    /// answer locally, or forward to the alternate upstream.
    pub fn target(
        &self,
        snap: &Snapshot,
        route: &RouteDecision<'_>,
        upstreams: &[Arc<Upstream>],
        metrics: &Metrics,
    ) -> Target {
        let upstream = |id: UpstreamId| Arc::clone(&upstreams[id.0 as usize]);
        let Some(bi) = snap.breaker_for(route.upstream, Some(route.rule_id)) else {
            return Target::Forward(upstream(route.upstream), None);
        };
        let b = &self.breakers.by_id[bi as usize];
        let (admission, transition) = b.admit(crate::breaker::now());
        if let Some(t) = transition {
            on_transition(metrics, b, t);
        }
        match admission {
            Admission::Pass(p) => Target::Forward(upstream(route.upstream), Some(p)),
            Admission::Reject => {
                metrics
                    .breaker_rejections
                    .get_or_create(&breaker_labels(b))
                    .inc();
                match &b.def.when_open {
                    WhenOpen::Respond(r) => Target::Local(respond::canned(r)),
                    WhenOpen::Alternate(id) => Target::Forward(upstream(*id), None),
                }
            }
        }
    }

    /// Set every breaker's state gauge (at start-up and after a reload, so a breaker that
    /// never changed state is still exported).
    pub fn export_states(&self, metrics: &Metrics) {
        for b in &self.breakers.by_id {
            metrics
                .breaker_state
                .get_or_create(&breaker_labels(b))
                .set(b.state() as i64);
        }
    }
}

/// Report a forwarded call to its breaker: 5xx and upstream failures are failures; errors
/// that are the client's (a body too large) say nothing and are not reported.
pub fn finish_call(
    metrics: &Metrics,
    permit: Option<Permit>,
    outcome: Result<http::StatusCode, GatewayError>,
    latency: Duration,
) {
    let Some(p) = permit else { return };
    let result = match outcome {
        Ok(s) if s.is_server_error() => CallResult::Failure,
        Ok(_) => CallResult::Success,
        Err(
            GatewayError::UpstreamTimeout
            | GatewayError::UpstreamUnavailable
            | GatewayError::UpstreamReset,
        ) => CallResult::Failure,
        Err(_) => return, // dropping the permit gives a probe slot back
    };
    let b = Arc::clone(p.breaker());
    if let Some(t) = p.finish(crate::breaker::now(), result, latency) {
        on_transition(metrics, &b, t);
    }
}

// === impl ClusterPending ===

impl ClusterPending {
    /// Make the set-aside cluster checks, in rule order: `None` to go on, or the answer
    /// (429, or 503 for a `fail_closed` rule whose store failed). Waits at most the store
    /// timeout per check; background refills are started and not waited for.
    pub async fn resolve(self, metrics: &Metrics) -> Option<Response<Full<Bytes>>> {
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
                None => Err(crate::cluster::StoreUnavailable),
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
                    return Some(respond::rate_limited(&crate::limit::Rejection {
                        rule: Arc::clone(&c.rule),
                        quota: c.quota,
                        retry_after: wait,
                    }));
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
                        return Some(respond::limit_store_unavailable(&lim.name.0));
                    }
                    count_limit(metrics, lim, Outcome::Allowed);
                }
            }
        }
        None
    }
}

fn count_limit(metrics: &Metrics, lim: &RuleLimiter, outcome: Outcome) {
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
    counters[outcome as usize].inc();
}

fn breaker_labels(b: &Breaker) -> BreakerLabels {
    BreakerLabels {
        breaker: b.name.clone(),
        upstream: b.upstream.clone(),
    }
}

fn on_transition(metrics: &Metrics, b: &Breaker, t: Transition) {
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

fn observe_limit(
    metrics: &Metrics,
    lim: &RuleLimiter,
    outcome: Outcome,
    wait: Duration,
    input: &RouteInput<'_>,
) {
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
    counters[outcome as usize].inc();
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

/// How often idle limiter keys are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Sweep idle keys out of the live runtime's limiters every [`SWEEP_INTERVAL`] until
/// shutdown, so limiter memory follows the active users. Each sweep locks one shard at a
/// time, so requests wait for at most one shard's sweep.
pub async fn housekeep(
    gateway: Arc<crate::gateway::Gateway>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::server::stopped(&mut shutdown) => return,
        }
        let rt = gateway.runtime.load_full();
        if rt.governors.limiters.rules.is_empty() {
            continue;
        }
        // Off the async workers: a sweep of a million keys takes milliseconds.
        let tracked = tokio::task::spawn_blocking(move || rt.governors.limiters.retain_recent())
            .await
            .unwrap_or(0);
        tracing::debug!(target: "tidegate::limit", tracked_keys = tracked, "limiter sweep");
    }
}
