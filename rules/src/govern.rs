//! The governance rules in force, compiled as one unit: limits and fallbacks after applying
//! the active plans, and circuit breakers; and the lookups the request path makes in them.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bucket::BUCKETS;
use crate::degrade::{CompiledBreaker, CompiledFallback, FallbackDecision};
use crate::ids::UpstreamId;
use crate::limit::CompiledLimit;
use crate::matcher::{MatchIndex, MatchInput, Order};
use crate::model::RuleMode;
use crate::route::RouteInput;

/// Limits, fallbacks and breakers, compiled.
#[derive(Debug, Default)]
pub struct Governance {
    /// Limit rules in force, in check order.
    pub limits: Vec<CompiledLimit>,
    pub(crate) limit_index: MatchIndex,
    /// Fallback rules in force: the enforced ones (in config order), then the dry-run ones.
    pub fallbacks: Vec<CompiledFallback>,
    /// The enforced fallbacks (`fallbacks[..n]`): the request path's index.
    pub(crate) fallback_index: MatchIndex,
    /// Every fallback, when some are dry runs: a dry run counts what it would answer if it
    /// were enforced, which depends on the enforced rules around it.
    shadow_fallback_index: Option<MatchIndex>,
    /// Circuit breakers in config order.
    pub breakers: Vec<CompiledBreaker>,
    /// (upstream, route) → breaker index, for breakers on one route's use of an upstream.
    pub(crate) breaker_by: HashMap<(u32, u32), u32>,
    /// Upstream → breaker index of its upstream-wide breaker, indexed by upstream ID (up to
    /// the highest one guarded): the common lookup is one bounds-checked load, no hashing.
    breaker_by_upstream: Box<[Option<u32>]>,
    /// The plans in force, in order.
    pub active_plans: Vec<Box<str>>,
    /// Names of the limits, fallbacks and breakers by index, for cheap clones.
    limit_names: Box<[Arc<str>]>,
    fallback_names: Box<[Arc<str>]>,
    breaker_names: Box<[Arc<str>]>,
}

// === impl Governance ===

impl Governance {
    /// Index compiled rules: the limits and fallbacks in force, the breakers in config
    /// order, and the names of the active plans.
    pub(crate) fn new(
        limits: Vec<CompiledLimit>,
        fallbacks: Vec<CompiledFallback>,
        breakers: Vec<CompiledBreaker>,
        active_plans: Vec<Box<str>>,
    ) -> Self {
        let limit_index = MatchIndex::build(limits.iter().map(|l| &l.matcher), Order::RuleId);
        // Enforced first, so the request path's index is over a prefix and its rule IDs are
        // IDs into `fallbacks`.
        let (mut fallbacks, dry): (Vec<_>, Vec<_>) = fallbacks
            .into_iter()
            .partition(|f| f.mode == RuleMode::Enforce);
        let enforced = fallbacks.len();
        fallbacks.extend(dry);
        let fallback_index = MatchIndex::build(
            fallbacks[..enforced].iter().map(|f| &f.matcher),
            Order::MostSpecific,
        );
        let shadow_fallback_index = (enforced < fallbacks.len())
            .then(|| MatchIndex::build(fallbacks.iter().map(|f| &f.matcher), Order::MostSpecific));
        let mut breaker_by = HashMap::new();
        let mut breaker_by_upstream = Vec::new();
        for (i, b) in breakers.iter().enumerate() {
            match b.route {
                Some(r) => {
                    breaker_by.insert((b.upstream.0, r), i as u32);
                }
                None => {
                    let u = b.upstream.0 as usize;
                    if breaker_by_upstream.len() <= u {
                        breaker_by_upstream.resize(u + 1, None);
                    }
                    breaker_by_upstream[u] = Some(i as u32);
                }
            }
        }
        Self {
            limit_names: limits.iter().map(|l| Arc::from(&*l.name)).collect(),
            fallback_names: fallbacks.iter().map(|f| Arc::from(&*f.name)).collect(),
            breaker_names: breakers.iter().map(|b| Arc::from(&*b.name)).collect(),
            limits,
            limit_index,
            fallbacks,
            fallback_index,
            shadow_fallback_index,
            breakers,
            breaker_by,
            breaker_by_upstream: breaker_by_upstream.into(),
            active_plans,
        }
    }

    /// The name of limit `id` (an index of [`Governance::limits`]): O(1), a cheap clone.
    pub fn limit_name(&self, id: u32) -> &Arc<str> {
        &self.limit_names[id as usize]
    }

    /// The name of fallback `id` (an index of [`Governance::fallbacks`]).
    pub fn fallback_name(&self, id: u32) -> &Arc<str> {
        &self.fallback_names[id as usize]
    }

    /// The name of breaker `id` (an index of [`Governance::breakers`]).
    pub fn breaker_name(&self, id: u32) -> &Arc<str> {
        &self.breaker_names[id as usize]
    }

    /// The limit rules that apply to a request, in check order (config order): from the
    /// index, or written into `out` (see [`MatchIndex::all`]; reuse it across requests to
    /// avoid allocating).
    #[inline(never)]
    pub fn limits_for<'s>(&'s self, m: &MatchInput<'_>, out: &'s mut Vec<u32>) -> &'s [u32] {
        (self.limit_index).all(m, |i| &self.limits[i as usize].matcher, out)
    }

    /// [`Governance::limits_for`] from the limit index's candidates of the request's pair
    /// (and whether one of them narrows).
    #[inline(always)]
    pub(crate) fn limits_in<'s>(
        &self,
        (list, narrows): (&'s [u32], bool),
        m: &MatchInput<'_>,
        out: &'s mut Vec<u32>,
    ) -> &'s [u32] {
        let matcher = |i: u32| &self.limits[i as usize].matcher;
        (self.limit_index).all_in(list, narrows, m, matcher, out)
    }

    /// [`Governance::limits_in`] when it needs neither filtering nor `out`: the pair's list
    /// itself, none of whose rules narrows.
    #[inline(always)]
    pub(crate) fn limits_as_is<'s>(&self, (list, narrows): (&'s [u32], bool)) -> Option<&'s [u32]> {
        self.limit_index.as_is(list, narrows)
    }

    /// The fallback that answers this request, if any: the most specific matching enforced
    /// fallback rule, when the request's user falls in its fraction.
    pub fn fallback(&self, r: &RouteInput<'_>) -> Option<FallbackDecision<'_>> {
        self.fallback_in(None, r)
    }

    /// [`Governance::fallback`], from the enforced fallback index's candidates of the
    /// request's pair when the caller has them.
    #[inline(never)]
    pub(crate) fn fallback_in(
        &self,
        candidates: Option<&[u32]>,
        r: &RouteInput<'_>,
    ) -> Option<FallbackDecision<'_>> {
        let matcher = |i: u32| &self.fallbacks[i as usize].matcher;
        let rule_id = match candidates {
            Some(list) => self.fallback_index.best_in(list, &r.m, matcher),
            None if self.fallbacks.is_empty() => return None,
            None => self.fallback_index.best(&r.m, matcher),
        }?;
        self.fallback_at(rule_id, r)
    }

    /// Whether some fallback is a dry run.
    pub fn has_shadow_fallbacks(&self) -> bool {
        self.shadow_fallback_index.is_some()
    }

    /// The dry-run fallback that would answer this request if it were enforced: the most
    /// specific matching fallback of all, when it is a dry run and the request's user falls
    /// in its fraction.
    pub fn shadow_fallback(&self, r: &RouteInput<'_>) -> Option<FallbackDecision<'_>> {
        let rule_id = (self.shadow_fallback_index.as_ref())?
            .best(&r.m, |i| &self.fallbacks[i as usize].matcher)?;
        match self.fallbacks[rule_id as usize].mode {
            RuleMode::DryRun => self.fallback_at(rule_id, r),
            RuleMode::Enforce => None,
        }
    }

    /// Fallback `rule_id`'s decision on a request it matches: it answers every user, or the
    /// request's bucket falls in its fraction.
    fn fallback_at(&self, rule_id: u32, r: &RouteInput<'_>) -> Option<FallbackDecision<'_>> {
        let rule = &self.fallbacks[rule_id as usize];
        if rule.fraction_ppm >= BUCKETS {
            return Some(FallbackDecision {
                rule_id,
                rule_name: &self.fallback_names[rule_id as usize],
                rule,
                bucket: None,
            });
        }
        let (b, key) = rule.bucket_of(r);
        (b < rule.fraction_ppm).then_some(FallbackDecision {
            rule_id,
            rule_name: &self.fallback_names[rule_id as usize],
            rule,
            bucket: Some((b, key)),
        })
    }

    /// The breaker guarding requests that `route` sends to `upstream`: one for that route, or
    /// else one for the whole upstream.
    pub fn breaker_for(&self, upstream: UpstreamId, route: Option<u32>) -> Option<u32> {
        let by = &self.breaker_by;
        let on_route = match route {
            Some(r) if !by.is_empty() => by.get(&(upstream.0, r)).copied(),
            _ => None,
        };
        on_route.or_else(|| {
            (self.breaker_by_upstream)
                .get(upstream.0 as usize)
                .copied()
                .flatten()
        })
    }
}

#[cfg(test)]
mod tests;
