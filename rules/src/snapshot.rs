//! The compiled, indexed form of the rules that the request path reads.
//!
//! A [`Snapshot`] is built once per load, off the request path, and never mutated: the proxy
//! publishes it with one atomic store and each request reads it with one load. Everything a
//! decision needs is precomputed here: header names as [`HeaderName`], interface templates in
//! a `matchit` router, and route rules bucketed by (app, interface) so the cost of a decision
//! does not grow with the number of rules.

use std::collections::HashMap;
use std::time::Duration;

use http::{HeaderName, Method};

use crate::govern::Governance;
use crate::ids::{InterfaceId, UpstreamId};
use crate::matcher::MatchIndex;
use crate::model::{Balance, Config, Extractor, UpstreamKind};
use crate::overload::CompiledOverload;
use crate::route::CompiledRoute;

/// Compiled rules.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) identity: CompiledIdentity,
    /// Interfaces in config order.
    pub interfaces: Vec<CompiledInterface>,
    /// Path template → the interfaces declared on it (one per method, or `*`).
    pub(crate) router: matchit::Router<Vec<(Option<Method>, InterfaceId)>>,
    /// Upstreams sorted by name.
    pub upstreams: Vec<UpstreamSpec>,
    /// Route rules in config order.
    pub routes: Vec<CompiledRoute>,
    pub(crate) route_index: MatchIndex,
    /// Limits, fallbacks and breakers in force (active plans applied).
    pub governance: Governance,
    /// Overload protection.
    pub overload: CompiledOverload,
}

/// The interfaces declared on one path template.
type MethodTable = Vec<(Option<Method>, InterfaceId)>;

/// An interface, compiled.
#[derive(Debug)]
pub struct CompiledInterface {
    /// Its name.
    pub name: Box<str>,
    /// Its method; `None` for `*`.
    pub method: Option<Method>,
    /// Its path template.
    pub path: Box<str>,
}

/// An upstream as the proxy needs it to build connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// Its name.
    pub name: Box<str>,
    /// Static endpoints or the embedded backend.
    pub kind: UpstreamKind,
    /// `host:port` strings, validated; resolved by the proxy at load time.
    pub endpoints: Vec<Box<str>>,
    /// Load-balancing policy.
    pub balance: Balance,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Request-to-response-head timeout.
    pub request_timeout: Duration,
    /// Longest stall between pieces of a response body.
    pub read_timeout: Duration,
    /// Idle pooled connections kept per endpoint.
    pub pool_max_idle_per_endpoint: usize,
    /// Data directory of an embedded upstream.
    pub data_dir: Option<Box<str>>,
}

#[derive(Debug)]
pub(crate) struct CompiledIdentity {
    pub(crate) app: CompiledExtractor,
    pub(crate) user: CompiledExtractor,
}

#[derive(Debug)]
pub(crate) enum CompiledExtractor {
    Header(HeaderName),
    Query(Box<str>),
    Cookie(Box<str>),
    PathParam(Box<str>),
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
        let iface_ids: HashMap<&str, u32> = interfaces
            .iter()
            .enumerate()
            .map(|(i, x)| (&*x.name, i as u32))
            .collect();

        let upstreams: Vec<UpstreamSpec> = c
            .upstreams
            .iter()
            .map(|(name, u)| UpstreamSpec {
                name: name.as_str().into(),
                kind: u.kind,
                endpoints: u.endpoints.iter().map(|e| e.as_str().into()).collect(),
                balance: u.balance,
                connect_timeout: Duration::from_millis(u.connect_timeout_ms),
                request_timeout: Duration::from_millis(u.request_timeout_ms),
                read_timeout: Duration::from_millis(u.read_timeout_ms),
                pool_max_idle_per_endpoint: u.pool_max_idle_per_endpoint as usize,
                data_dir: match u.kind {
                    UpstreamKind::Embedded => Some(
                        u.data_dir
                            .as_deref()
                            .unwrap_or(crate::DEFAULT_EMBEDDED_DATA_DIR)
                            .into(),
                    ),
                    UpstreamKind::Static => None,
                },
            })
            .collect();
        let upstream_ids: HashMap<&str, u32> = upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| (&*u.name, i as u32))
            .collect();

        let routes: Vec<CompiledRoute> = c
            .routes
            .iter()
            .map(|r| CompiledRoute::compile(r, &iface_ids, &upstream_ids))
            .collect();
        let route_index = MatchIndex::build(c.routes.iter().map(|r| &r.matcher), &iface_ids);
        let governance = Governance::compile(c, &iface_ids, &upstream_ids);
        let overload = CompiledOverload::compile(c, &iface_ids, &upstream_ids);

        Self {
            identity: CompiledIdentity {
                app: compile_extractor(&c.identity.app),
                user: compile_extractor(&c.identity.user),
            },
            interfaces,
            router,
            upstreams,
            routes,
            route_index,
            governance,
            overload,
        }
    }

    /// The upstream with this name.
    pub fn upstream_by_name(&self, name: &str) -> Option<UpstreamId> {
        self.upstreams
            .iter()
            .position(|u| &*u.name == name)
            .map(|i| UpstreamId(i as u32))
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
