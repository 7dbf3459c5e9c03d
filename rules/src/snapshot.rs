//! The compiled, indexed form of the rules that the request path reads.
//!
//! A [`Snapshot`] is built once per load, off the request path, and never mutated: the proxy
//! publishes it with one atomic store and each request reads it with one load. It composes
//! the compiled parts, each of which owns its data and its lookups: the interfaces' router
//! and identity extractors ([`crate::classify`]), the upstreams ([`crate::upstream`]), the
//! route rules ([`crate::route`]), limits, fallbacks and breakers ([`crate::govern`]) and the
//! overload section ([`crate::overload`]). Its own methods only delegate to them.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, Method};

use crate::classify::{Classified, Classifier, CompiledExtractor, MethodTable, RequestParts};
use crate::degrade::FallbackDecision;
use crate::govern::Governance;
use crate::ids::{InterfaceId, InterfaceNames, UpstreamId};
use crate::matcher::MatchInput;
use crate::model::{Config, Extractor};
use crate::overload::CompiledOverload;
use crate::route::{CompiledRoute, RouteDecision, RouteInput, Routes};
use crate::upstream::upstream_ids;

pub use crate::classify::CompiledInterface;
pub use crate::upstream::UpstreamSpec;

/// Compiled rules.
#[derive(Debug)]
pub struct Snapshot {
    /// Interfaces in config order.
    pub interfaces: Vec<CompiledInterface>,
    pub(crate) classifier: Classifier,
    /// Upstreams sorted by name.
    pub upstreams: Vec<UpstreamSpec>,
    /// Route rules in config order, indexed.
    pub routes: Routes,
    /// Limits, fallbacks and breakers in force (active plans applied).
    pub governance: Governance,
    /// Overload protection.
    pub overload: CompiledOverload,
}

// === impl Snapshot ===

impl Snapshot {
    /// Compile a config that [`crate::validate::validate`] accepted.
    ///
    /// # Panics
    /// Only on a config that failed validation (an unknown upstream, say); [`crate::load`]
    /// never calls it on one.
    pub fn compile(c: &Config) -> Self {
        let interfaces: Vec<CompiledInterface> = c
            .interfaces
            .iter()
            .map(|i| CompiledInterface {
                name: i.name.as_str().into(),
                method: (i.method != "*")
                    .then(|| Method::from_bytes(i.method.as_bytes()).expect("validated")),
                path: i.path.as_str().into(),
            })
            .collect();
        // Path template → interfaces on it, in first-seen order of templates.
        let mut per_template: Vec<(&str, MethodTable)> = Vec::new();
        let mut template_slot: HashMap<&str, usize> = HashMap::new();
        for (i, itf) in interfaces.iter().enumerate() {
            let entry = (itf.method.clone(), InterfaceId(i as u32));
            let slot = *template_slot.entry(&itf.path).or_insert_with(|| {
                per_template.push((&itf.path, Vec::new()));
                per_template.len() - 1
            });
            per_template[slot].1.push(entry);
        }
        let mut router = matchit::Router::new();
        for (path, mut list) in per_template {
            // Exact methods before the `*` catch-all.
            list.sort_by_key(|(m, _)| m.is_none());
            router.insert(path, list).expect("validated template");
        }
        let iface_ids: HashMap<&str, InterfaceId> = c
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, x)| (x.name.as_str(), InterfaceId(i as u32)))
            .collect();

        let upstreams: Vec<UpstreamSpec> = c
            .upstreams
            .iter()
            .map(|(name, u)| UpstreamSpec::new(name, u))
            .collect();
        let upstream_ids = upstream_ids(&c.upstreams);

        let routes: Vec<CompiledRoute> = c
            .routes
            .iter()
            .map(|r| CompiledRoute::compile(r, &iface_ids, &upstream_ids))
            .collect();
        let upstream_names = upstreams.iter().map(|u| Arc::from(&*u.name)).collect();
        let governance = Governance::compile(c, &iface_ids, &upstream_ids);
        let overload = CompiledOverload::compile(c, &iface_ids, &upstream_ids);

        Self {
            classifier: Classifier {
                router,
                app: compile_extractor(&c.identity.app),
                user: compile_extractor(&c.identity.user),
            },
            interfaces,
            upstreams,
            routes: Routes::new(routes, upstream_names),
            governance,
            overload,
        }
    }

    /// Classify a request: its interface, app and user.
    pub fn classify<'a>(&self, req: RequestParts<'a>) -> Classified<'a> {
        self.classifier.classify(req)
    }

    /// Route a request: the most specific matching rule, and its choice.
    pub fn route(&self, r: &RouteInput<'_>) -> Option<RouteDecision<'_>> {
        self.routes.route(r)
    }

    /// The limit rules that apply to a request, in check order (config order), written into
    /// `out` (cleared first; reuse it across requests to avoid allocating).
    pub fn limits_for(&self, m: &MatchInput<'_>, out: &mut Vec<u32>) {
        self.governance.limits_for(m, out);
    }

    /// The fallback that answers this request, if any: the most specific matching fallback
    /// rule, when the request's user falls in its fraction.
    pub fn fallback(&self, r: &RouteInput<'_>) -> Option<FallbackDecision<'_>> {
        self.governance.fallback(r)
    }

    /// The breaker guarding requests that `route` sends to `upstream`: one for that route, or
    /// else one for the whole upstream.
    pub fn breaker_for(&self, upstream: UpstreamId, route: Option<u32>) -> Option<u32> {
        self.governance.breaker_for(upstream, route)
    }

    /// The name of an interface.
    pub fn interface_name(&self, id: InterfaceId) -> &str {
        &self.interfaces[id.0 as usize].name
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

fn compile_extractor(e: &Extractor) -> CompiledExtractor {
    match e {
        Extractor::Header(h) => {
            CompiledExtractor::Header(HeaderName::from_bytes(h.as_bytes()).expect("validated"))
        }
        Extractor::Query(q) => CompiledExtractor::Query(q.as_str().into()),
        Extractor::Cookie(c) => CompiledExtractor::Cookie(c.as_str().into()),
        Extractor::PathParam(p) => CompiledExtractor::PathParam(p.as_str().into()),
    }
}

#[cfg(test)]
mod tests;
