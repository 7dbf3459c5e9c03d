//! The compiled, indexed form of the rules that the request path reads.
//!
//! A [`Snapshot`] is built once per load, off the request path, and never mutated: the proxy
//! publishes it with one atomic store and each request reads it with one load. Everything a
//! decision needs is precomputed here: header names as [`HeaderName`], interface templates in
//! a `matchit` router, and route rules bucketed by (app, interface) so the cost of a decision
//! does not grow with the number of rules.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::model::{Balance, Config, Extractor, UpstreamKind};
use crate::validate::specificity;

/// Index of an interface in [`Snapshot::interfaces`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InterfaceId(pub u32);

/// Index of an upstream in [`Snapshot::upstreams`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamId(pub u32);

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
    pub(crate) route_index: RouteIndex,
}

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
    /// Idle pooled connections kept per endpoint.
    pub pool_max_idle_per_endpoint: usize,
    /// Data directory of an embedded upstream.
    pub data_dir: Option<Box<str>>,
}

/// A route rule, compiled.
#[derive(Debug)]
pub struct CompiledRoute {
    /// Its name.
    pub name: Box<str>,
    /// Where matching requests go.
    pub upstream: UpstreamId,
    /// Precedence among matching rules (see [`crate::model::Match`]).
    pub specificity: u8,
    pub(crate) users: Option<HashSet<Box<str>>>,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
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

/// Route rules bucketed by the app and interface they constrain. Within a bucket rules are
/// sorted by specificity, most specific first, so the first one whose remaining conditions
/// (users, headers) hold is the bucket's best.
#[derive(Debug, Default)]
pub(crate) struct RouteIndex {
    by_app: HashMap<Box<str>, IfaceTable>,
    any_app: IfaceTable,
}

#[derive(Debug, Default)]
struct IfaceTable {
    by_iface: HashMap<u32, Vec<u32>>,
    any_iface: Vec<u32>,
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
        let mut per_template: Vec<(&str, Vec<(Option<Method>, InterfaceId)>)> = Vec::new();
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

        let mut routes = Vec::with_capacity(c.routes.len());
        let mut index = RouteIndex::default();
        for (ri, r) in c.routes.iter().enumerate() {
            let m = &r.matcher;
            routes.push(CompiledRoute {
                name: r.name.as_str().into(),
                upstream: UpstreamId(upstream_ids[r.upstream.as_str()]),
                specificity: specificity(m),
                users: m
                    .users
                    .as_ref()
                    .map(|u| u.iter().map(|s| s.as_str().into()).collect()),
                headers: m
                    .headers
                    .iter()
                    .flatten()
                    .map(|(k, v)| {
                        (
                            HeaderName::from_bytes(k.as_bytes()).expect("validated"),
                            HeaderValue::from_str(v).expect("validated"),
                        )
                    })
                    .collect(),
            });
            match &m.apps {
                None => push_rule(
                    &mut index.any_app,
                    m.interfaces.as_deref(),
                    &iface_ids,
                    ri as u32,
                ),
                Some(apps) => {
                    for a in apps {
                        let t = index.by_app.entry(a.as_str().into()).or_default();
                        push_rule(t, m.interfaces.as_deref(), &iface_ids, ri as u32);
                    }
                }
            }
        }
        let spec = |i: &u32| std::cmp::Reverse(routes[*i as usize].specificity);
        for t in index
            .by_app
            .values_mut()
            .chain(std::iter::once(&mut index.any_app))
        {
            t.any_iface.sort_by_key(spec);
            for v in t.by_iface.values_mut() {
                v.sort_by_key(spec);
            }
        }

        Self {
            identity: CompiledIdentity {
                app: compile_extractor(&c.identity.app),
                user: compile_extractor(&c.identity.user),
            },
            interfaces,
            router,
            upstreams,
            routes,
            route_index: index,
        }
    }

    /// The upstream with this name.
    pub fn upstream_by_name(&self, name: &str) -> Option<UpstreamId> {
        self.upstreams
            .iter()
            .position(|u| &*u.name == name)
            .map(|i| UpstreamId(i as u32))
    }

    /// The route for a classified request: the most specific rule whose conditions all hold.
    ///
    /// Looks in at most four buckets ((app, interface), (app, any), (any, interface),
    /// (any, any)); validation guarantees that two matching rules never share a
    /// specificity, so the answer does not depend on rule order.
    pub fn route(
        &self,
        app: Option<&str>,
        interface: Option<InterfaceId>,
        user: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<&CompiledRoute> {
        let mut best: Option<&CompiledRoute> = None;
        let app_table = app.and_then(|a| self.route_index.by_app.get(a));
        for table in [app_table, Some(&self.route_index.any_app)]
            .into_iter()
            .flatten()
        {
            let by_iface = interface.and_then(|i| table.by_iface.get(&i.0));
            for list in [by_iface, Some(&table.any_iface)].into_iter().flatten() {
                for &ri in list {
                    let r = &self.routes[ri as usize];
                    if best.is_some_and(|b| b.specificity >= r.specificity) {
                        break; // sorted: nothing further in this list can beat `best`
                    }
                    if r.conditions_hold(user, headers) {
                        best = Some(r);
                        break;
                    }
                }
            }
        }
        best
    }
}

fn push_rule(t: &mut IfaceTable, ifaces: Option<&[String]>, ids: &HashMap<&str, u32>, rule: u32) {
    match ifaces {
        None => t.any_iface.push(rule),
        Some(list) => {
            for name in list {
                t.by_iface.entry(ids[name.as_str()]).or_default().push(rule);
            }
        }
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

// === impl CompiledRoute ===

impl CompiledRoute {
    fn conditions_hold(&self, user: Option<&str>, headers: &HeaderMap) -> bool {
        if let Some(users) = &self.users {
            match user {
                Some(u) if users.contains(u) => {}
                _ => return false,
            }
        }
        self.headers.iter().all(|(k, v)| headers.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests;
