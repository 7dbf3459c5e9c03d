//! The governance rules in force, compiled as one unit: limits and fallbacks after applying
//! the active plans (see [`crate::plan`]), and circuit breakers.

use std::collections::HashMap;

use crate::degrade::{CompiledBreaker, CompiledFallback};
use crate::limit::CompiledLimit;
use crate::matcher::MatchIndex;
use crate::model::Config;
use crate::plan;

/// Limits, fallbacks and breakers, compiled.
#[derive(Debug, Default)]
pub struct Governance {
    /// Limit rules in force, in check order.
    pub limits: Vec<CompiledLimit>,
    pub(crate) limit_index: MatchIndex,
    /// Fallback rules in force.
    pub fallbacks: Vec<CompiledFallback>,
    pub(crate) fallback_index: MatchIndex,
    /// Circuit breakers in config order.
    pub breakers: Vec<CompiledBreaker>,
    /// (upstream, route) → breaker index; route `None` for upstream-wide breakers.
    pub(crate) breaker_by: HashMap<(u32, Option<u32>), u32>,
    /// The plans in force, in order.
    pub active_plans: Vec<Box<str>>,
}

// === impl Governance ===

impl Governance {
    /// Compile the governance half of a validated config.
    pub(crate) fn compile(
        c: &Config,
        iface_ids: &HashMap<&str, u32>,
        upstream_ids: &HashMap<&str, u32>,
    ) -> Self {
        let active = plan::active(c);
        let eff = plan::effective(c, &active);
        let limits: Vec<CompiledLimit> = eff
            .limits
            .iter()
            .map(|l| CompiledLimit::compile(l.rule, iface_ids))
            .collect();
        let limit_index = MatchIndex::build(eff.limits.iter().map(|l| &l.rule.matcher), iface_ids);
        let fallbacks: Vec<CompiledFallback> = eff
            .fallbacks
            .iter()
            .map(|f| CompiledFallback::compile(f.rule, iface_ids))
            .collect();
        let fallback_index =
            MatchIndex::build(eff.fallbacks.iter().map(|f| &f.rule.matcher), iface_ids);
        let route_ids: HashMap<&str, u32> = c
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i as u32))
            .collect();
        let breakers: Vec<CompiledBreaker> = c
            .breakers
            .iter()
            .map(|b| CompiledBreaker::compile(b, upstream_ids, &route_ids))
            .collect();
        let breaker_by = breakers
            .iter()
            .enumerate()
            .map(|(i, b)| ((b.upstream.0, b.route), i as u32))
            .collect();
        Self {
            limits,
            limit_index,
            fallbacks,
            fallback_index,
            breakers,
            breaker_by,
            active_plans: active.iter().map(|&s| s.into()).collect(),
        }
    }
}

#[cfg(test)]
mod tests;
