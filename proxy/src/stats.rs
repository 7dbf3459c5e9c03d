//! Live per-rule counters behind the dashboard: what the request path adds to.
//!
//! Prometheus counters answer "how many since start"; the on-call room needs "how many per
//! second, now". On the request path, [`Counters`] (one per runtime, indexed like the
//! snapshot, so the label set is closed) take one relaxed atomic add per outcome, one per
//! latency bucket and one per canary split decision. No lock, no allocation, no lookup by
//! name. Once a second the dashboard's sampler (`admin::status`) swaps every counter to
//! zero; it is the only reader.
//!
//! Counters are carried over a reload by name (interfaces, upstreams, split targets), like
//! limiter state, so a reload loses no counts and the swap-to-zero sampling stays exact.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rules::route::RouteAction;
use rules::{InterfaceId, RouteDecision, Snapshot, UpstreamId};

use rules::hist::lat_bucket;
pub(crate) use rules::hist::{LAT_BUCKETS, quantile_ms};

/// What became of a request, as the dashboard counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Answered by the upstream with a status below 500.
    Ok = 0,
    /// A 5xx from the upstream, or an error the gateway answered (no route, 502, 504, ...).
    Error = 1,
    /// Refused by a rate limit (429).
    Limited = 2,
    /// Shed by overload protection: a 503 the gateway made that is not a degraded answer.
    Shed = 3,
    /// Answered locally by a fallback or an open circuit breaker.
    Degraded = 4,
}

/// Number of [`Class`]es.
pub const CLASSES: usize = 5;

/// Per-runtime counters, indexed like the snapshot. Built by [`Counters::build`] off the
/// request path; read and reset by the sampler.
#[derive(Debug)]
pub struct Counters {
    /// By interface (indexed like `snapshot.interfaces`), then one more for requests that
    /// matched no interface.
    pub(crate) interfaces: Vec<Arc<ClassCounts>>,
    /// By upstream (indexed like `snapshot.upstreams`): time to the response head.
    pub(crate) upstreams: Vec<Arc<Latency>>,
    /// By route rule (indexed like `snapshot.routes`): forwarded requests per split target;
    /// empty for a rule with one upstream.
    pub(crate) splits: Vec<Vec<Arc<SplitCount>>>,
    /// The metrics' `series_activated`, which a split target's first count bumps.
    activated: Arc<AtomicU64>,
    /// By route rule, for a ramped split only: the ramp's target and baseline, with what
    /// they answered (see [`Guarded`]). Empty when no split is ramped.
    pub(crate) guarded: Vec<Option<Arc<Guarded>>>,
    /// This runtime's `tidegate_requests_total` handles (not carried over: the family keeps
    /// the counts, a new runtime just looks its handles up again).
    requests: crate::metrics::RequestSeries,
}

/// What a ramped split's target and baseline answered, for the ramp's guard: the route's
/// requests forwarded to each of them (not requests a breaker sent elsewhere).
#[derive(Debug)]
pub struct Guarded {
    /// Split slots of the target and the baseline.
    pub(crate) slots: [u32; 2],
    /// Upstream names of the target and the baseline (to carry counts over a reload).
    names: [Arc<str>; 2],
    /// The target's, then the baseline's.
    pub(crate) sides: [Side; 2],
}

/// One side of a [`Guarded`] split.
#[derive(Debug, Default)]
pub struct Side {
    /// Answered or failed calls.
    pub(crate) requests: AtomicU64,
    /// Of which errors ([`Class::Error`]).
    pub(crate) errors: AtomicU64,
    /// Their times to the response head.
    pub(crate) latency: Latency,
}

/// Requests forwarded to one split target since the sampler last took them.
#[derive(Debug, Default)]
pub struct SplitCount {
    pub(crate) n: AtomicU64,
    /// Whether a request was ever counted here (see [`Metrics::series_activated`]).
    ///
    /// [`Metrics::series_activated`]: crate::metrics::Metrics::series_activated
    seen: AtomicBool,
}

/// Requests by [`Class`].
#[derive(Debug, Default)]
pub struct ClassCounts([AtomicU64; CLASSES]);

/// A latency histogram: counts per log-scale bucket of microseconds.
#[derive(Debug)]
pub struct Latency([AtomicU64; LAT_BUCKETS]);

/// What one request will be counted under, taken while the snapshot is loaded and recorded
/// once its response is known.
#[derive(Debug)]
pub struct Tally {
    counters: Arc<Counters>,
    iface: u32,
    upstream: Option<u32>,
    /// For a ramped split: the route and the side (0 target, 1 baseline) it went to.
    guarded: Option<(u32, u8)>,
}

// === impl SplitCount ===

impl SplitCount {
    /// Count one request; the first ever bumps `activated`.
    #[inline]
    fn count(&self, activated: &AtomicU64) {
        // A count from zero (once a second at most, per target the sampler takes) checks
        // whether it is the first ever.
        if self.n.fetch_add(1, Ordering::Relaxed) == 0 {
            self.first(activated);
        }
    }

    #[cold]
    fn first(&self, activated: &AtomicU64) {
        if !self.seen.swap(true, Ordering::Relaxed) {
            activated.fetch_add(1, Ordering::Release);
        }
    }

    /// Whether a request was ever counted here.
    pub(crate) fn seen(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }
}

// === impl ClassCounts ===

impl ClassCounts {
    pub(crate) fn take(&self) -> [u64; CLASSES] {
        std::array::from_fn(|i| take(&self.0[i]))
    }
}

/// A counter's value, reset to zero. A zero counter (most of a large config's, in a given
/// second) is only read: a count that lands between the read and the next sample is taken
/// then.
pub(crate) fn take(c: &AtomicU64) -> u64 {
    match c.load(Ordering::Relaxed) {
        0 => 0,
        _ => c.swap(0, Ordering::Relaxed),
    }
}

// === impl Latency ===

impl Default for Latency {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Latency {
    fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0[lat_bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn take(&self) -> [u32; LAT_BUCKETS] {
        std::array::from_fn(|i| self.0[i].swap(0, Ordering::Relaxed) as u32)
    }
}

// === impl Counters ===

impl Counters {
    /// Counters for `snap`. Those of interfaces, upstreams and split targets that `previous`
    /// (the runtime a reload replaces) also had are shared with it, so counts made by
    /// requests still in flight on the old runtime are not lost.
    pub fn build(
        snap: &Snapshot,
        previous: Option<(&Snapshot, &Counters)>,
        activated: &Arc<AtomicU64>,
    ) -> Self {
        let old_ifaces: HashMap<&str, usize> = previous
            .map(|(s, _)| {
                s.interfaces
                    .iter()
                    .enumerate()
                    .map(|(i, itf)| (&*itf.name, i))
                    .collect()
            })
            .unwrap_or_default();
        let old_iface = |name: &str| {
            let (_, c) = previous?;
            old_ifaces.get(name).map(|&i| c.interfaces[i].clone())
        };
        let mut interfaces: Vec<Arc<ClassCounts>> = snap
            .interfaces
            .iter()
            .map(|i| old_iface(&i.name).unwrap_or_default())
            .collect();
        interfaces.push(
            previous
                .and_then(|(_, c)| c.interfaces.last().cloned())
                .unwrap_or_default(),
        );
        let upstreams = snap
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .and_then(|(s, c)| {
                        s.upstreams
                            .iter()
                            .position(|x| x.name == u.name)
                            .map(|i| c.upstreams[i].clone())
                    })
                    .unwrap_or_default()
            })
            .collect();
        // Old route rules by name, looked up once per split rule (a scan per rule would make
        // a reload of 100,000 rules quadratic).
        let old_routes: HashMap<&str, usize> = previous
            .map(|(s, _)| {
                s.routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (&*r.name, i))
                    .collect()
            })
            .unwrap_or_default();
        let splits = snap
            .routes
            .iter()
            .map(|r| match &r.action {
                RouteAction::Upstream(_) => Vec::new(),
                RouteAction::Split(targets) => targets
                    .iter()
                    .map(|t| {
                        let up = &snap.upstreams[t.upstream.0 as usize].name;
                        previous
                            .and_then(|(s, c)| {
                                let ri = *old_routes.get(&*r.name)?;
                                let RouteAction::Split(old) = &s.routes[ri].action else {
                                    return None;
                                };
                                let ti = old
                                    .iter()
                                    .position(|o| s.upstreams[o.upstream.0 as usize].name == *up)?;
                                Some(c.splits[ri][ti].clone())
                            })
                            .unwrap_or_default()
                    })
                    .collect(),
            })
            .collect();
        let guarded = guarded(snap, previous.map(|(s, c)| (s, c, &old_routes)));
        Self {
            guarded,
            activated: Arc::clone(activated),
            requests: crate::metrics::RequestSeries::new(
                snap.interfaces.len(),
                snap.upstreams.len(),
            ),
            interfaces,
            upstreams,
            splits,
        }
    }

    /// Start counting a request: its interface, the upstream it is forwarded to (if any),
    /// and, for a split rule that forwards to the target it chose, that target's share.
    pub fn tally(
        self: &Arc<Self>,
        interface: Option<InterfaceId>,
        route: Option<&RouteDecision<'_>>,
        forwarded_to: Option<UpstreamId>,
    ) -> Tally {
        let mut guarded = None;
        if let (Some(r), Some(u)) = (route, forwarded_to) {
            // Only when the split's own choice is forwarded (not a breaker's alternate).
            if r.upstream == u
                && let Some(t) = r.target
            {
                self.splits[r.rule_id as usize][t as usize].count(&self.activated);
                if let Some(Some(g)) = self.guarded.get(r.rule_id as usize) {
                    guarded = (g.slots.iter())
                        .position(|&s| s == t)
                        .map(|side| (r.rule_id, side as u8));
                }
            }
        }
        Tally {
            counters: Arc::clone(self),
            iface: interface.map_or(self.interfaces.len() as u32 - 1, |i| i.0),
            upstream: forwarded_to.map(|u| u.0),
            guarded,
        }
    }
}

/// The [`Guarded`] counters of `snap`'s ramped splits, by route; those `previous` had for
/// the same route, target and baseline are shared with it (see [`Counters::build`]).
fn guarded(
    snap: &Snapshot,
    previous: Option<(&Snapshot, &Counters, &HashMap<&str, usize>)>,
) -> Vec<Option<Arc<Guarded>>> {
    if snap.ramps.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<Option<Arc<Guarded>>> = vec![None; snap.routes.len()];
    for r in &snap.ramps {
        let names = [
            r.target_name.as_ref().into(),
            r.baseline_name.as_ref().into(),
        ];
        let slots = [r.target_slot, r.baseline_slot];
        let kept = previous.and_then(|(_, c, old_routes)| {
            let g = c.guarded.get(*old_routes.get(&*r.route)?)?.as_ref()?;
            (g.names == names && g.slots == slots).then(|| Arc::clone(g))
        });
        out[r.route_index as usize] = Some(kept.unwrap_or_else(|| {
            Arc::new(Guarded {
                slots,
                names,
                sides: Default::default(),
            })
        }));
    }
    out
}

// === impl Side ===

impl Side {
    /// Take (and zero) the counts since the last take.
    pub(crate) fn take(&self) -> rules::ramp::TargetFigures {
        let mut latency = rules::ramp::Hist::default();
        for (a, b) in latency.0.iter_mut().zip(self.latency.take()) {
            *a = u64::from(b);
        }
        rules::ramp::TargetFigures {
            requests: self.requests.swap(0, Ordering::Relaxed),
            errors: self.errors.swap(0, Ordering::Relaxed),
            latency,
        }
    }
}

// === impl Tally ===

impl Tally {
    /// Count the answered request in `tidegate_requests_total`: under its interface, the
    /// upstream it was `forwarded` to (or `none`) and its status class. `labels` gives the
    /// interface and upstream names the first time this runtime counts that series.
    pub fn count_request(
        &self,
        metrics: &crate::metrics::Metrics,
        forwarded: bool,
        status: http::StatusCode,
        labels: impl FnOnce() -> crate::metrics::RequestLabels,
    ) {
        let upstream = match forwarded {
            true => self.upstream.map(|u| u as usize),
            false => None,
        };
        self.counters
            .requests
            .counter(metrics, Some(self.iface as usize), upstream, status, || {
                let l = labels();
                (l.interface, l.upstream)
            })
            .inc();
    }

    /// Count the answered request in its [`Class`] and, for a forwarded request, the time
    /// from its arrival to the response head.
    pub fn record(&self, class: Class, elapsed: Duration) {
        self.counters.interfaces[self.iface as usize].0[class as usize]
            .fetch_add(1, Ordering::Relaxed);
        // Latency of calls the upstream answered or failed; not of requests turned away
        // before the call (a shed request may have been on its way to an upstream).
        if let (Some(u), Class::Ok | Class::Error) = (self.upstream, class) {
            self.counters.upstreams[u as usize].observe(elapsed);
            if let Some((route, side)) = self.guarded
                && let Some(Some(g)) = self.counters.guarded.get(route as usize)
            {
                let s = &g.sides[side as usize];
                s.requests.fetch_add(1, Ordering::Relaxed);
                if class == Class::Error {
                    s.errors.fetch_add(1, Ordering::Relaxed);
                }
                s.latency.observe(elapsed);
            }
        }
    }
}

// === impl Class ===

impl Class {
    /// The class of an answer: the upstream's (5xx is an error), or the gateway's own error
    /// (a 503 it made is load turned away: overload protection, a drain, a limit store).
    pub fn of(status: http::StatusCode, from_upstream: bool) -> Self {
        match (from_upstream, status.as_u16()) {
            (true, 500..) => Class::Error,
            (true, _) => Class::Ok,
            (false, 503) => Class::Shed,
            (false, 400..) => Class::Error,
            (false, _) => Class::Ok,
        }
    }
}

#[cfg(test)]
mod tests;
