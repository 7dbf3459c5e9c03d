//! The compiled, indexed form of the rules that the request path reads.
//!
//! A [`Snapshot`] is built once per load, off the request path, and never mutated: the proxy
//! publishes it with one atomic store and each request reads it with one load. It composes
//! the compiled parts, each of which owns its data and its lookups: the interfaces' router
//! and identity extractors ([`crate::classify`]), the upstreams ([`crate::upstream`]), the
//! route rules ([`crate::route`]), limits, fallbacks and breakers ([`crate::govern`]) and the
//! overload section ([`crate::overload`]). Its own methods only delegate to them.

use std::sync::Arc;

use crate::classify::{Classified, Classifier, RequestParts};
use crate::degrade::FallbackDecision;
use crate::govern::Governance;
use crate::identity::CompiledJwt;
use crate::ids::{InterfaceId, InterfaceNames, UpstreamId};
use crate::matcher::{MatchInput, Pair, PairTable};
use crate::model::Config;
use crate::overload::CompiledOverload;
use crate::route::{RouteDecision, RouteInput, Routes};
use crate::trusted::TrustedProxies;
use crate::validate::{self, Issue};

pub use crate::classify::CompiledInterface;
pub use crate::upstream::{HealthCheckSpec, OutlierSpec, TlsSpec, UpstreamSpec};

/// Compiled rules.
#[derive(Debug)]
pub struct Snapshot {
    /// Interfaces in config order.
    pub interfaces: Vec<CompiledInterface>,
    pub(crate) classifier: Classifier,
    /// Interface names by [`InterfaceId`], for cheap clones.
    interface_names: Box<[Arc<str>]>,
    /// Upstream names by [`UpstreamId`], for cheap clones (shared with the routes).
    upstream_names: Arc<[Arc<str>]>,
    /// Upstreams sorted by name.
    pub upstreams: Vec<UpstreamSpec>,
    /// Route rules in config order, indexed.
    pub routes: Routes,
    /// Limits, fallbacks and breakers in force (active plans applied).
    pub governance: Governance,
    /// Plans' triggers, in plan name order (run by the proxy's plan controller).
    pub triggers: Vec<crate::trigger::CompiledTrigger>,
    /// Ramps of the routes' splits, in route order (run by the proxy's ramp controller).
    pub ramps: Vec<crate::ramp::CompiledRamp>,
    /// Overload protection.
    pub overload: CompiledOverload,
    /// `server.trusted_proxies`: whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    /// `identity.jwt`: how a request's token is found and judged (the gateway holds the
    /// keys).
    pub jwt: Option<CompiledJwt>,
    /// Some fallback is a dry run or some route has a shadow split (see
    /// [`Snapshot::has_shadow`]).
    shadow: bool,
    /// The route, limit and enforced fallback indexes' candidates per (app, interface), when
    /// each merged its own (see [`Snapshot::pair`]).
    pairs: Option<PairTable>,
}

/// The [`PairTable`] positions of the indexes it covers, in the order [`Snapshot::compile`]
/// passes them.
const ROUTES: usize = 0;
const LIMITS: usize = 1;
const FALLBACKS: usize = 2;

// === impl Snapshot ===

impl Snapshot {
    /// Validate and compile a config: the snapshot, or every problem found (what
    /// [`validate::validate`] returns). Never panics, whatever the config.
    pub fn compile(c: &Config) -> Result<Self, Vec<Issue>> {
        let parts = validate::check(c)?;
        let interface_names = parts
            .interfaces
            .iter()
            .map(|i| Arc::from(&*i.name))
            .collect();
        let upstream_names: Arc<[Arc<str>]> = parts
            .upstreams
            .iter()
            .map(|u| Arc::from(&*u.name))
            .collect();
        let routes = Routes::new(parts.routes, Arc::clone(&upstream_names));
        let governance = Governance::new(
            parts.limits,
            parts.fallbacks,
            parts.breakers,
            parts.active_plans,
        );
        let shadow = governance.has_shadow_fallbacks() || routes.iter().any(|r| r.shadow.is_some());
        let pairs = PairTable::build([
            routes.index(),
            &governance.limit_index,
            &governance.fallback_index,
        ]);
        Ok(Self {
            pairs,
            interfaces: parts.interfaces,
            classifier: parts.classifier,
            interface_names,
            routes,
            upstream_names,
            upstreams: parts.upstreams,
            governance,
            shadow,
            triggers: parts.triggers,
            ramps: parts.ramps,
            overload: parts.overload,
            trusted_proxies: parts.trusted_proxies,
            jwt: parts.jwt,
        })
    }

    /// Classify a request: its interface, app and user.
    pub fn classify<'a>(&self, req: RequestParts<'a>) -> Classified<'a> {
        self.classifier.classify(req)
    }

    /// Whether the identity extractors read `name` (a header that carries the app or user
    /// ID): a client must not be able to have it removed as hop-by-hop after classification.
    pub fn is_identity_header(&self, name: &str) -> bool {
        self.classifier.is_identity_header(name)
    }

    /// Every request header a rule reads (matcher conditions, override headers,
    /// `no_user_key` and limit-key headers), sorted, each once: what a decision needs of a
    /// request beyond its method, path, identity and client address. The identity
    /// extractors' headers are not included (their result, the app and user, is). For
    /// reload time: it walks every rule.
    pub fn headers_read(&self) -> Vec<http::HeaderName> {
        let gov = &self.governance;
        let mut names: Vec<http::HeaderName> = (self.routes.iter())
            .flat_map(|r| r.header_names())
            .chain(gov.limits.iter().flat_map(|l| l.header_names()))
            .chain(gov.fallbacks.iter().flat_map(|f| f.header_names()))
            .cloned()
            .collect();
        names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        names
    }

    /// Whether a request whose app or user ID is invalid ([`Classified::invalid_id`]) is
    /// refused (`identity.on_invalid: reject`) rather than treated as anonymous.
    pub fn rejects_invalid_id(&self) -> bool {
        self.classifier.rejects_invalid_id()
    }

    /// The candidate rules of a request's app and interface, looked up once: put it in the
    /// request's [`RouteInput::pair`] and [`Snapshot::route`], [`Snapshot::limits_of`] and
    /// [`Snapshot::fallback`] each start from it instead of hashing the app again. Read with
    /// another snapshot, it is ignored.
    #[inline]
    pub fn pair(&self, m: &MatchInput<'_>) -> Pair<'_> {
        match &self.pairs {
            Some(t) => t.pair(m.app, m.interface),
            None => Pair::default(),
        }
    }

    /// Index `k`'s candidates in the request's pair, if it has one from this snapshot.
    #[inline(always)]
    fn in_pair(&self, r: &RouteInput<'_>, k: usize) -> Option<(&[u32], bool)> {
        self.pairs.as_ref()?.list(&r.pair, k)
    }

    /// Route a request: the most specific matching rule, and its choice.
    pub fn route(&self, r: &RouteInput<'_>) -> Option<RouteDecision<'_>> {
        let candidates = self.in_pair(r, ROUTES).map(|(list, _)| list);
        self.routes.route_in(candidates, r)
    }

    /// The limit rules that apply to a request, in check order (config order): see
    /// [`Governance::limits_for`](crate::govern::Governance::limits_for).
    pub fn limits_for<'s>(&'s self, m: &MatchInput<'_>, out: &'s mut Vec<u32>) -> &'s [u32] {
        self.governance.limits_for(m, out)
    }

    /// [`Snapshot::limits_for`] a request, from its pair when it has one. Inlined where it
    /// is called: from a pair, a list no rule of which narrows is returned as it is.
    #[inline(always)]
    pub fn limits_of<'s>(&'s self, r: &RouteInput<'_>, out: &'s mut Vec<u32>) -> &'s [u32] {
        match self.in_pair(r, LIMITS) {
            Some(lists) => self.governance.limits_in(lists, &r.m, out),
            None => self.governance.limits_for(&r.m, out),
        }
    }

    /// [`Snapshot::limits_of`] a request when it needs no list of its own: its pair's list,
    /// none of whose rules narrows (every one applies), so the caller need not find a
    /// scratch list; `None` when it does (call `limits_of`).
    #[inline(always)]
    pub fn limits_as_is(&self, r: &RouteInput<'_>) -> Option<&[u32]> {
        self.governance.limits_as_is(self.in_pair(r, LIMITS)?)
    }

    /// The fallback that answers this request, if any: the most specific matching fallback
    /// rule, when the request's user falls in its fraction.
    ///
    /// Inlined where it is called: no fallbacks, or none among the pair's candidates, is a
    /// compare or two.
    #[inline(always)]
    pub fn fallback(&self, r: &RouteInput<'_>) -> Option<FallbackDecision<'_>> {
        if self.governance.fallbacks.is_empty() {
            return None;
        }
        let candidates = self.in_pair(r, FALLBACKS).map(|(list, _)| list);
        if candidates.is_some_and(<[u32]>::is_empty) {
            return None;
        }
        self.governance.fallback_in(candidates, r)
    }

    /// Whether the decision has shadow rules to evaluate after routing (dry-run fallbacks,
    /// shadow splits): decided once per load, so without them the request path pays one
    /// branch. Dry-run breakers and admission are decided where their enforced forms are.
    pub fn has_shadow(&self) -> bool {
        self.shadow
    }

    /// The dry-run fallback that would answer this request if it were enforced (see
    /// [`Governance::shadow_fallback`](crate::govern::Governance::shadow_fallback)).
    pub fn shadow_fallback(&self, r: &RouteInput<'_>) -> Option<FallbackDecision<'_>> {
        self.governance.shadow_fallback(r)
    }

    /// The breaker guarding requests that `route` sends to `upstream`: one for that route, or
    /// else one for the whole upstream.
    pub fn breaker_for(&self, upstream: UpstreamId, route: Option<u32>) -> Option<u32> {
        self.governance.breaker_for(upstream, route)
    }

    /// The name of an interface: O(1), and a cheap clone.
    pub fn interface_name(&self, id: InterfaceId) -> &Arc<str> {
        &self.interface_names[id.0 as usize]
    }

    /// The name of an upstream: O(1), and a cheap clone.
    pub fn upstream_name(&self, id: UpstreamId) -> &Arc<str> {
        &self.upstream_names[id.0 as usize]
    }

    /// The upstream with this name (a scan: for reload time, not the request path).
    pub fn upstream_by_name(&self, name: &str) -> Option<UpstreamId> {
        self.upstreams
            .iter()
            .position(|u| &*u.name == name)
            .map(|i| UpstreamId(i as u32))
    }
}

impl InterfaceNames for Snapshot {
    fn interface_name(&self, id: InterfaceId) -> &str {
        Snapshot::interface_name(self, id)
    }
}

#[cfg(test)]
mod tests;
