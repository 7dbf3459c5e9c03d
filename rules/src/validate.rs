//! Semantic checks of a parsed [`Config`]: ranges, formats, references and ambiguity; and
//! the typed values of a config that passes them.
//!
//! Validation never stops at the first problem: it returns every [`Issue`] it finds, each with
//! the JSON path of the offending value, so one `tidegate check` run lists everything an
//! operator has to fix. Checks that need the file system (do the TLS files exist?) belong to
//! the proxy; this module is pure.
//!
//! It is also where the config is compiled: each value is parsed once, here (a header name
//! into a `HeaderName`, a rate into a `Rate`, an upstream name into its `UpstreamId`), and
//! the compiled parts are built from what parsed. A part with a problem is left out and the
//! problem reported, so a config that passes yields every part and compiling it cannot
//! fail; the snapshot then only indexes them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

use http::{HeaderName, Method};

use crate::bucket::{BUCKETS, Weight, target_weight};
use crate::classify::{CacheSpec, Classifier, CompiledExtractor, CompiledInterface, MethodTable};
use crate::degrade::{CompiledBreaker, CompiledFallback};
use crate::error::{JsonPath, did_you_mean};
use crate::identity::CompiledJwt;
use crate::ids::{InterfaceId, UpstreamId};
use crate::limit::CompiledLimit;
use crate::matcher::CompiledMatch;
use crate::model::{
    Config, DEFAULT_EMBEDDED_DATA_DIR, Extractor, Match, NoUserKey, OnInvalidId, Route,
    SCHEMA_VERSION, SplitTarget, UpstreamKind,
};
use crate::overload::CompiledOverload;
use crate::ramp::CompiledRamp;
use crate::route::{CompiledMirror, CompiledNoUserKey, CompiledRoute, RouteAction, ShadowSplit};
use crate::trusted::{Cidr, TrustedProxies};
use crate::upstream::{UpstreamSpec, upstream_ids};

mod cache;
mod freeze;
mod govern;
mod health;
mod identity;
mod mirror;
mod overload;
mod ramp;
mod tracing;
mod trigger;
mod upgrade;
mod upstream_tls;

/// Most route rules in one config.
pub const MAX_ROUTES: usize = 200_000;
/// Most interfaces in one config.
pub const MAX_INTERFACES: usize = 10_000;
/// Most entries in `server.trusted_proxies` (each request from a trusted peer walks them).
pub const MAX_TRUSTED_PROXIES: usize = 1_000;
/// Longest name (rule, interface, upstream, plan, listener), in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Most limit or fallback rules in one list.
pub const MAX_GOVERN_RULES: usize = 10_000;
/// Largest `identity.max_id_bytes`.
pub const MAX_ID_BYTES: u64 = 4096;
/// Most requests in flight a cap may allow.
pub const MAX_IN_FLIGHT: u64 = 1_000_000;

/// Whether `c` may appear in a name: ASCII letters, digits, `.`, `_`, `:` and `-`.
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// One validation problem, not yet located in the source text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Where the offending value is.
    pub path: JsonPath,
    /// What is wrong.
    pub message: String,
}

/// The typed parts of a valid config, ready to be indexed into a snapshot.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) interfaces: Vec<CompiledInterface>,
    pub(crate) classifier: Classifier,
    pub(crate) upstreams: Vec<UpstreamSpec>,
    pub(crate) routes: Vec<CompiledRoute>,
    /// Ramps of the routes' splits, in route order.
    pub(crate) ramps: Vec<CompiledRamp>,
    /// Limits in force (active plans applied), in check order.
    pub(crate) limits: Vec<CompiledLimit>,
    /// Fallbacks in force.
    pub(crate) fallbacks: Vec<CompiledFallback>,
    pub(crate) breakers: Vec<CompiledBreaker>,
    pub(crate) active_plans: Vec<Box<str>>,
    /// Plans' triggers, in plan name order.
    pub(crate) triggers: Vec<crate::trigger::CompiledTrigger>,
    pub(crate) overload: CompiledOverload,
    pub(crate) trusted_proxies: TrustedProxies,
    pub(crate) jwt: Option<CompiledJwt>,
}

/// Check everything checkable without I/O. An empty result means the config compiles.
pub fn validate(c: &Config) -> Vec<Issue> {
    check(c).err().unwrap_or_default()
}

/// Check a config and, when it is valid, return its typed parts: every value is parsed
/// once, here, where a bad one is reported with its path. Otherwise every problem found.
pub(crate) fn check(c: &Config) -> Result<Checked, Vec<Issue>> {
    let mut v = Validator::new(c);
    let checked = v.config(c);
    match checked {
        Some(checked) if v.issues.is_empty() => Ok(checked),
        _ => {
            if v.issues.is_empty() {
                // Every value left out of the typed parts is reported where it is left
                // out; this is the safety net should a check ever miss one.
                v.err(JsonPath::root(), "the config could not be compiled");
            }
            Err(v.issues)
        }
    }
}

/// The parameter names of a path template (`{id}`, and `{*rest}` as `rest`), in order.
fn template_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| name.strip_prefix('*').unwrap_or(name))
        .collect()
}

/// Walks a config once: reports every problem, and builds the typed value of each part
/// with no problem (`None` where there was one, so `None` always comes with an issue).
/// The interfaces, compiled, and the router of their path templates.
type CompiledInterfaces = (Vec<CompiledInterface>, matchit::Router<MethodTable>);

/// What a route rule does with a request, compiled (all but its conditions).
struct RouteTarget {
    action: RouteAction,
    pinned_users: HashMap<Box<str>, UpstreamId>,
    pinned_apps: HashMap<Box<str>, UpstreamId>,
    override_header: Option<HeaderName>,
    override_from: TrustedProxies,
    no_user_key: CompiledNoUserKey,
    shadow: Option<ShadowSplit>,
    mirror: Option<CompiledMirror>,
}

struct Validator<'c> {
    issues: Vec<Issue>,
    /// Interface IDs by name.
    iface_ids: HashMap<&'c str, InterfaceId>,
    /// Upstream IDs by name.
    upstream_ids: HashMap<&'c str, UpstreamId>,
    /// Route rule IDs by name.
    route_ids: HashMap<&'c str, u32>,
    /// Compiled limits and fallbacks by where they are written (a base list or a plan), for
    /// picking those in force.
    limits: HashMap<JsonPath, CompiledLimit>,
    fallbacks: HashMap<JsonPath, CompiledFallback>,
    /// Interface name → the parameter names of its path template.
    iface_params: HashMap<&'c str, Vec<&'c str>>,
    /// The path parameters limit keys read, by slot (the classifier's `key_params`).
    key_params: Vec<Box<str>>,
}

impl<'c> Validator<'c> {
    fn new(c: &'c Config) -> Self {
        Self {
            issues: Vec::new(),
            iface_ids: c
                .interfaces
                .iter()
                .enumerate()
                .map(|(i, x)| (x.name.as_str(), InterfaceId(i as u32)))
                .collect(),
            upstream_ids: upstream_ids(&c.upstreams),
            route_ids: c
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| (r.name.as_str(), i as u32))
                .collect(),
            limits: HashMap::new(),
            fallbacks: HashMap::new(),
            iface_params: c
                .interfaces
                .iter()
                .map(|x| (x.name.as_str(), template_params(&x.path)))
                .collect(),
            key_params: Vec::new(),
        }
    }

    /// Whether issues were reported since there were `before`.
    fn reported_since(&self, before: usize) -> bool {
        self.issues.len() > before
    }

    fn err(&mut self, path: JsonPath, message: impl Into<String>) {
        self.issues.push(Issue {
            path,
            message: message.into(),
        });
    }

    fn range(&mut self, path: JsonPath, value: u64, lo: u64, hi: u64) {
        if value < lo || value > hi {
            self.err(
                path,
                format!("{value} is out of range; allowed {lo}..={hi}"),
            );
        }
    }

    /// A name (rule, interface, upstream, plan, listener): 1 to [`MAX_NAME_BYTES`] of
    /// [`is_name_char`]. Names reach logs, metrics labels and the dashboard, so they are
    /// kept to a set that needs no escaping anywhere.
    fn name(&mut self, path: JsonPath, name: &str) {
        if name.is_empty() {
            self.err(path, "name must not be empty");
        } else if name.len() > MAX_NAME_BYTES {
            self.err(path, format!("name is longer than {MAX_NAME_BYTES} bytes"));
        } else if let Some(bad) = name.chars().find(|&c| !is_name_char(c)) {
            self.err(
                path,
                format!(
                    "{name:?} contains {bad:?}; names may use only ASCII letters, digits and `._:-`"
                ),
            );
        }
    }

    fn config(&mut self, c: &Config) -> Option<Checked> {
        let root = JsonPath::root();
        if c.schema_version != SCHEMA_VERSION {
            self.err(
                root.key("schema_version"),
                format!(
                    "unsupported schema_version {}; this build reads version {SCHEMA_VERSION}",
                    c.schema_version
                ),
            );
        }
        let trusted_proxies = self.server(c);
        let (interfaces, compiled_interfaces) = self.interfaces(c);
        let identity = self.identity(c);
        let jwt = self.jwt(c);
        self.upstreams(c);
        let routes = self.routes(c, &interfaces);
        let governance = self.govern(c, &interfaces);
        let triggers = self.triggers(c, &interfaces);
        self.overload(c, &interfaces);
        self.freeze(c);

        if !self.issues.is_empty() {
            return None;
        }
        let (interfaces, router) = compiled_interfaces?;
        let (app, user) = identity?;
        let (limits, fallbacks, breakers) = governance?;
        let (routes, ramps) = routes?;
        Some(Checked {
            interfaces,
            classifier: Classifier {
                router,
                app,
                user,
                max_id_bytes: c.identity.max_id_bytes as usize,
                reject_invalid: c.identity.on_invalid == OnInvalidId::Reject,
                key_params: std::mem::take(&mut self.key_params),
            },
            upstreams: c
                .upstreams
                .iter()
                .map(|(name, u)| UpstreamSpec::new(name, u))
                .collect(),
            routes,
            ramps,
            limits,
            fallbacks,
            breakers,
            active_plans: c.active_plans.iter().map(|p| p.as_str().into()).collect(),
            triggers,
            overload: CompiledOverload::compile(c, &self.iface_ids, &self.upstream_ids),
            trusted_proxies,
            jwt,
        })
    }

    /// The bootstrap section; returns the trusted proxies (those that parse).
    fn server(&mut self, c: &Config) -> TrustedProxies {
        let p = JsonPath::root().key("server");
        let s = &c.server;
        if s.listeners.is_empty() {
            self.err(p.key("listeners"), "at least one listener is required");
        }
        let mut seen_addr: HashMap<SocketAddr, usize> = HashMap::new();
        let mut seen_name = HashSet::new();
        for (i, l) in s.listeners.iter().enumerate() {
            let lp = p.key("listeners").index(i);
            if let Some(addr) = self.socket_addr(lp.key("address"), &l.address)
                && addr.port() != 0
                && let Some(prev) = seen_addr.insert(addr, i)
            {
                self.err(
                    lp.key("address"),
                    format!("{addr} is already used by listeners[{prev}]"),
                );
            }
            if let Some(name) = &l.name {
                self.name(lp.key("name"), name);
                if !seen_name.insert(name.as_str()) {
                    self.err(lp.key("name"), format!("duplicate listener name {name:?}"));
                }
            }
            if let Some(tls) = &l.tls {
                if tls.cert_path.trim().is_empty() {
                    self.err(lp.key("tls").key("cert_path"), "path must not be empty");
                }
                if tls.key_path.trim().is_empty() {
                    self.err(lp.key("tls").key("key_path"), "path must not be empty");
                }
            }
        }
        self.admin(c, &seen_addr);
        let l = &s.limits;
        let lp = p.key("limits");
        self.range(
            lp.key("header_read_timeout_ms"),
            l.header_read_timeout_ms,
            100,
            300_000,
        );
        self.range(
            lp.key("max_header_bytes"),
            l.max_header_bytes.into(),
            4096,
            1 << 20,
        );
        self.range(lp.key("max_headers"), l.max_headers.into(), 8, 1000);
        self.range(lp.key("max_body_bytes"), l.max_body_bytes, 0, 16 << 30);
        self.range(
            lp.key("h2_max_concurrent_streams"),
            l.h2_max_concurrent_streams.into(),
            1,
            10_000,
        );
        self.range(
            lp.key("h2_max_pending_reset_streams"),
            l.h2_max_pending_reset_streams.into(),
            1,
            10_000,
        );
        self.range(lp.key("idle_timeout_ms"), l.idle_timeout_ms, 100, 3_600_000);
        self.range(
            lp.key("max_connections"),
            l.max_connections.into(),
            1,
            1_000_000,
        );
        self.range(
            lp.key("max_upgraded_connections"),
            l.max_upgraded_connections.into(),
            0,
            1_000_000,
        );
        self.range(
            lp.key("upgrade_idle_timeout_ms"),
            l.upgrade_idle_timeout_ms,
            100,
            86_400_000,
        );
        self.range(p.key("shutdown_grace_ms"), s.shutdown_grace_ms, 0, 600_000);
        self.range(p.key("history_keep"), s.history_keep.into(), 0, 1_000);
        self.tracing(&s.tracing);
        if s.data_dir.trim().is_empty() {
            self.err(p.key("data_dir"), "must name a directory");
        }
        if let Some(r) = &s.redis {
            let rp = p.key("redis");
            match r.url.split_once("://") {
                Some(("redis", rest)) if !rest.is_empty() && !rest.starts_with('/') => {}
                Some(("rediss", _)) => self.err(
                    rp.key("url"),
                    "TLS to Redis (rediss://) is not built in; use redis:// on a private network",
                ),
                _ => self.err(
                    rp.key("url"),
                    format!("{:?} is not a Redis URL: write redis://host:port", r.url),
                ),
            }
            self.range(rp.key("timeout_ms"), r.timeout_ms, 1, 5_000);
            self.range(rp.key("lease_ms"), r.lease_ms, 1, 10_000);
        }
        self.trusted_proxies(c)
    }

    /// `server.trusted_proxies`: each a CIDR (or one address), at most [`MAX_TRUSTED_PROXIES`].
    fn trusted_proxies(&mut self, c: &Config) -> TrustedProxies {
        let p = JsonPath::root().key("server").key("trusted_proxies");
        let list = &c.server.trusted_proxies;
        if list.len() > MAX_TRUSTED_PROXIES {
            self.err(
                p.clone(),
                format!(
                    "{} trusted proxies; at most {MAX_TRUSTED_PROXIES} are allowed",
                    list.len()
                ),
            );
        }
        let mut nets = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            match Cidr::parse(s) {
                Ok(n) => nets.push(n),
                Err(e) => self.err(p.index(i), e),
            }
        }
        TrustedProxies::new(nets)
    }

    /// The admin listener: its address, host names, connection cap and token file. An
    /// address beyond loopback must come with a token.
    fn admin(&mut self, c: &Config, seen_addr: &HashMap<SocketAddr, usize>) {
        let ap = JsonPath::root().key("server").key("admin");
        let a = &c.server.admin;
        if let Some(addr) = self.socket_addr(ap.key("address"), &a.address) {
            if addr.port() != 0
                && let Some(i) = seen_addr.get(&addr)
            {
                self.err(
                    ap.key("address"),
                    format!("{addr} is already used by listeners[{i}]"),
                );
            }
            if !addr.ip().is_loopback() && a.token_file.is_none() {
                self.err(
                    ap.key("address"),
                    format!(
                        "the admin port on {addr} (not loopback) must require a token: \
                         set server.admin.token_file, or bind 127.0.0.1"
                    ),
                );
            }
        }
        for (i, h) in a.allowed_hosts.iter().enumerate() {
            let ok = !h.is_empty()
                && h.len() <= 255
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c));
            if !ok {
                self.err(
                    ap.key("allowed_hosts").index(i),
                    format!("{h:?} is not a host name or host:port"),
                );
            }
        }
        self.range(
            ap.key("max_connections"),
            a.max_connections.into(),
            1,
            10_000,
        );
        if a.token_file.as_deref().is_some_and(|t| t.trim().is_empty()) {
            self.err(ap.key("token_file"), "path must not be empty");
        }
    }

    /// `IP:port`, with messages for the usual mistakes.
    fn socket_addr(&mut self, path: JsonPath, s: &str) -> Option<SocketAddr> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let msg = if s.is_empty() {
                    "address must not be empty".to_owned()
                } else if s.contains("://") {
                    format!("{s:?} must be IP:port, without a scheme")
                } else if s.parse::<std::net::IpAddr>().is_ok() {
                    format!("{s:?} has no port")
                } else {
                    format!("{s:?} is not an IP:port address")
                };
                self.err(path, msg);
                None
            }
        }
    }

    /// The interface names (for hints), and when all are valid, the compiled interfaces and
    /// the router of their path templates.
    fn interfaces(&mut self, c: &Config) -> (HashSet<String>, Option<CompiledInterfaces>) {
        let before = self.issues.len();
        let p = JsonPath::root().key("interfaces");
        if c.interfaces.len() > MAX_INTERFACES {
            self.err(
                p.clone(),
                format!(
                    "{} interfaces; at most {MAX_INTERFACES} are allowed",
                    c.interfaces.len()
                ),
            );
        }
        let mut names = HashSet::new();
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        let mut by_route: HashMap<(String, &str), usize> = HashMap::new();
        // Each interface's method, parsed once: `Some(None)` for `*`, `None` when invalid.
        let methods: Vec<Option<Option<Method>>> = c
            .interfaces
            .iter()
            .map(|i| parse_method(&i.method))
            .collect();
        // The interfaces on each path template, exact methods before the `*` catch-all: the
        // router's value for the template.
        let mut tables: HashMap<&str, MethodTable> = HashMap::new();
        for (i, (itf, method)) in c.interfaces.iter().zip(&methods).enumerate() {
            if let Some(method) = method {
                let id = InterfaceId(i as u32);
                tables
                    .entry(itf.path.as_str())
                    .or_default()
                    .push((method.clone(), id));
            }
        }
        for list in tables.values_mut() {
            list.sort_by_key(|(m, _)| m.is_none());
        }
        let mut router = matchit::Router::new();
        let mut templates: HashMap<&str, usize> = HashMap::new();
        for (i, itf) in c.interfaces.iter().enumerate() {
            let ip = p.index(i);
            self.name(ip.key("name"), &itf.name);
            if let Some(prev) = by_name.insert(itf.name.as_str(), i) {
                self.err(
                    ip.key("name"),
                    format!(
                        "duplicate interface {:?} (also interfaces[{prev}])",
                        itf.name
                    ),
                );
            }
            names.insert(itf.name.clone());
            if methods[i].is_none() {
                self.err(
                    ip.key("method"),
                    format!(
                        "{:?} is not an HTTP method in upper case (or `*`)",
                        itf.method
                    ),
                );
            }
            if let Err(msg) = check_path_template(&itf.path) {
                self.err(ip.key("path"), msg);
                continue;
            }
            let key = (itf.method.clone(), itf.path.as_str());
            if let Some(prev) = by_route.insert(key, i) {
                self.err(
                    ip.clone(),
                    format!(
                        "duplicate interface: {} {} is already interfaces[{prev}]",
                        itf.method, itf.path
                    ),
                );
            }
            if !templates.contains_key(itf.path.as_str()) {
                let table = tables.remove(itf.path.as_str()).unwrap_or_default();
                match router.insert(itf.path.as_str(), table) {
                    Ok(()) => {
                        templates.insert(itf.path.as_str(), i);
                    }
                    Err(e) => self.err(ip.key("path"), format!("path template: {e}")),
                }
            }
        }
        let caches: Vec<Option<CacheSpec>> = c
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, itf)| self.cache(p.index(i), itf))
            .collect();
        if self.reported_since(before) {
            return (names, None);
        }
        let compiled = c
            .interfaces
            .iter()
            .zip(methods)
            .enumerate()
            .map(|(i, (itf, method))| {
                Some(CompiledInterface {
                    name: itf.name.as_str().into(),
                    method: method?,
                    path: itf.path.as_str().into(),
                    cache: caches[i].clone(),
                })
            })
            .collect::<Option<Vec<_>>>()
            .map(|interfaces| (interfaces, router));
        (names, compiled)
    }

    /// The app and user extractors, compiled.
    fn identity(&mut self, c: &Config) -> Option<(CompiledExtractor, CompiledExtractor)> {
        let p = JsonPath::root().key("identity");
        self.range(
            p.key("max_id_bytes"),
            c.identity.max_id_bytes.into(),
            1,
            MAX_ID_BYTES,
        );
        let mut compiled = Vec::with_capacity(2);
        for (field, ex) in [("app", &c.identity.app), ("user", &c.identity.user)] {
            let ep = p.key(field);
            compiled.push(match ex {
                Extractor::Header(h) => self
                    .header_name(ep.key("header"), h)
                    .map(CompiledExtractor::Header),
                Extractor::Query(q) | Extractor::Cookie(q) if q.is_empty() => {
                    let k = if matches!(ex, Extractor::Query(_)) {
                        "query"
                    } else {
                        "cookie"
                    };
                    self.err(ep.key(k), "name must not be empty");
                    None
                }
                Extractor::PathParam(name) => {
                    let declared = c
                        .interfaces
                        .iter()
                        .any(|i| i.path.split('/').any(|s| s == format!("{{{name}}}")));
                    if !declared {
                        self.err(
                            ep.key("path_param"),
                            format!("no interface path template has a `{{{name}}}` parameter"),
                        );
                        None
                    } else {
                        Some(CompiledExtractor::PathParam(name.as_str().into()))
                    }
                }
                Extractor::Claim(claim) => self.claim_extractor(c, ep.key("claim"), field, claim),
                Extractor::Query(q) => Some(CompiledExtractor::Query(q.as_str().into())),
                Extractor::Cookie(q) => Some(CompiledExtractor::Cookie(q.as_str().into())),
            });
        }
        let user = compiled.pop()??;
        let app = compiled.pop()??;
        Some((app, user))
    }

    fn header_name(&mut self, path: JsonPath, h: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(h.as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                self.err(path, format!("{h:?} is not a valid HTTP header name"));
                None
            }
        }
    }

    fn upstreams(&mut self, c: &Config) {
        let p = JsonPath::root().key("upstreams");
        if c.upstreams.is_empty() {
            self.err(p.clone(), "at least one upstream is required");
        }
        let mut data_dirs: HashMap<&str, &str> = HashMap::new();
        for (name, u) in &c.upstreams {
            let up = p.key(name.clone());
            self.name(up.clone(), name);
            match u.kind {
                UpstreamKind::Static => {
                    if u.endpoints.is_empty() {
                        self.err(
                            up.key("endpoints"),
                            "a static upstream needs at least one endpoint",
                        );
                    }
                    for (i, e) in u.endpoints.iter().enumerate() {
                        if let Err(msg) = check_endpoint(e) {
                            self.err(up.key("endpoints").index(i), msg);
                        }
                    }
                    if u.data_dir.is_some() {
                        self.err(
                            up.key("data_dir"),
                            "data_dir is only for `embedded` upstreams",
                        );
                    }
                }
                UpstreamKind::Embedded => {
                    if !u.endpoints.is_empty() {
                        self.err(
                            up.key("endpoints"),
                            "an embedded upstream has no endpoints: the gateway picks a loopback port",
                        );
                    }
                    let dir = u.data_dir.as_deref().unwrap_or(DEFAULT_EMBEDDED_DATA_DIR);
                    if dir.trim().is_empty() {
                        self.err(up.key("data_dir"), "path must not be empty");
                    }
                    if let Some(other) = data_dirs.insert(dir, name) {
                        self.err(
                            up.key("data_dir"),
                            format!("data_dir {dir:?} is already used by upstream {other:?}"),
                        );
                    }
                }
            }
            self.range(
                up.key("connect_timeout_ms"),
                u.connect_timeout_ms,
                1,
                60_000,
            );
            self.range(
                up.key("request_timeout_ms"),
                u.request_timeout_ms,
                1,
                3_600_000,
            );
            self.range(up.key("read_timeout_ms"), u.read_timeout_ms, 1, 3_600_000);
            self.range(
                up.key("pool_max_idle_per_endpoint"),
                u.pool_max_idle_per_endpoint.into(),
                0,
                100_000,
            );
            self.upstream_health(&up, u);
            self.upstream_transport(&up, u);
        }
    }

    /// The route rules, compiled.
    /// The route rules, compiled, and the ramps of their splits (in route order).
    fn routes(
        &mut self,
        c: &Config,
        interfaces: &HashSet<String>,
    ) -> Option<(Vec<CompiledRoute>, Vec<CompiledRamp>)> {
        let p = JsonPath::root().key("routes");
        if c.routes.is_empty() && !c.allow_empty_routes {
            self.err(
                p.clone(),
                "no route rules: every request would fail; add a route, or set \"allow_empty_routes\": true if that is meant",
            );
        }
        if c.routes.len() > MAX_ROUTES {
            self.err(
                p.clone(),
                format!(
                    "{} routes; at most {MAX_ROUTES} are allowed",
                    c.routes.len()
                ),
            );
            return None;
        }
        let mut compiled = Vec::with_capacity(c.routes.len());
        let mut ramps = Vec::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, r) in c.routes.iter().enumerate() {
            let rp = p.index(i);
            self.name(rp.key("name"), &r.name);
            if let Some(prev) = names.insert(r.name.as_str(), i) {
                self.err(
                    rp.key("name"),
                    format!("duplicate rule name {:?} (also routes[{prev}])", r.name),
                );
            }
            let target = self.route_target(c, &rp, r);
            ramps.extend(self.ramp(&rp, r, i, target.as_ref().map(|t| &t.action)));
            let matcher = self.matcher(rp.key("match"), &r.matcher, r.bucket_salt(), interfaces);
            let upgrade = self.upgrade(&rp, &r.upgrade);
            if !upgrade.is_empty() {
                self.upgrade_targets(c, &rp, r);
            }
            compiled.push(target.zip(matcher).map(|(t, matcher)| CompiledRoute {
                name: r.name.as_str().into(),
                matcher,
                action: t.action,
                salt: r.bucket_salt().into(),
                pinned_users: t.pinned_users,
                pinned_apps: t.pinned_apps,
                override_header: t.override_header,
                override_from: t.override_from,
                no_user_key: t.no_user_key,
                shadow: t.shadow,
                mirror: t.mirror,
                upgrade,
            }));
        }
        for (a, b) in ambiguous_pairs(c.routes.iter().map(|r| (&r.matcher, r.bucket_salt()))) {
            self.err(
                p.index(b),
                format!(
                    "rules {:?} (routes[{a}]) and {:?} (routes[{b}]) can match the same request with the same specificity; make one more specific",
                    c.routes[a].name, c.routes[b].name
                ),
            );
        }
        let compiled: Option<Vec<CompiledRoute>> = compiled.into_iter().collect();
        Some((compiled?, ramps))
    }

    /// The ID of a named upstream.
    fn upstream_ref(&mut self, c: &Config, p: JsonPath, name: &str) -> Option<UpstreamId> {
        if let Some(&id) = self.upstream_ids.get(name) {
            return Some(id);
        }
        let hint = did_you_mean(name, c.upstreams.keys().map(String::as_str))
            .map(|m| format!("; did you mean {m:?}?"))
            .unwrap_or_default();
        self.err(p, format!("unknown upstream {name:?}{hint}"));
        None
    }

    /// The ID of a named interface; `names` are all interface names, for the hint.
    fn interface_ref(
        &mut self,
        p: JsonPath,
        name: &str,
        names: &HashSet<String>,
    ) -> Option<InterfaceId> {
        if let Some(&id) = self.iface_ids.get(name) {
            return Some(id);
        }
        let hint = did_you_mean(name, names.iter().map(String::as_str))
            .map(|m| format!("; did you mean {m:?}?"))
            .unwrap_or_default();
        self.err(p, format!("unknown interface {name:?}{hint}"));
        None
    }

    /// `upstream` or `split` (exactly one), the split's weights, pins and the override.
    fn route_target(&mut self, c: &Config, rp: &JsonPath, r: &Route) -> Option<RouteTarget> {
        let before = self.issues.len();
        let action = match (&r.upstream, &r.split) {
            (Some(_), Some(_)) => {
                self.err(
                    rp.key("split"),
                    "give either `upstream` or `split`, not both",
                );
                None
            }
            (None, None) => {
                self.err(rp.clone(), "missing field `upstream` (or `split`)");
                None
            }
            (Some(u), None) => self
                .upstream_ref(c, rp.key("upstream"), u)
                .map(RouteAction::Upstream),
            (None, Some(targets)) => self.split(c, &rp.key("split"), targets),
        };
        if r.salt.as_deref() == Some("") {
            self.err(
                rp.key("salt"),
                "salt must not be empty (omit it to use the rule name)",
            );
        }
        let mut pinned: HashMap<(&str, &str), usize> = HashMap::new();
        let mut pinned_users = HashMap::new();
        let mut pinned_apps = HashMap::new();
        for (i, pin) in r.whitelist.iter().enumerate() {
            let pp = rp.key("whitelist").index(i);
            if let Some(up) = self.upstream_ref(c, pp.key("upstream"), &pin.upstream) {
                for u in &pin.users {
                    pinned_users.insert(u.as_str().into(), up);
                }
                for a in &pin.apps {
                    pinned_apps.insert(a.as_str().into(), up);
                }
            }
            if pin.users.is_empty() && pin.apps.is_empty() {
                self.err(pp.clone(), "a whitelist entry needs `users` or `apps`");
            }
            for (field, list) in [("users", &pin.users), ("apps", &pin.apps)] {
                for (j, v) in list.iter().enumerate() {
                    if let Some(prev) = pinned.insert((field, v.as_str()), i) {
                        self.err(
                            pp.key(field).index(j),
                            format!("{v:?} is already pinned by whitelist[{prev}]"),
                        );
                    }
                }
            }
        }
        let mut override_header = None;
        if let Some(h) = &r.override_header {
            override_header = self.header_name(rp.key("override_header"), h);
            if r.split.is_none() {
                self.err(
                    rp.key("override_header"),
                    "override_header only applies to a `split`",
                );
            }
        }
        let mut nets = Vec::with_capacity(r.override_from.len());
        for (i, s) in r.override_from.iter().enumerate() {
            match Cidr::parse(s) {
                Ok(n) => nets.push(n),
                Err(e) => self.err(rp.key("override_from").index(i), e),
            }
        }
        if !r.override_from.is_empty() && r.override_header.is_none() {
            self.err(
                rp.key("override_from"),
                "override_from limits override_header, which is not set",
            );
        }
        let no_user_key = self.no_user_key(rp.key("no_user_key"), &r.no_user_key);
        let shadow = self.shadow_split(c, rp, r);
        let mirror = self.mirror(c, rp, r);
        if self.reported_since(before) {
            return None;
        }
        Some(RouteTarget {
            action: action?,
            pinned_users,
            pinned_apps,
            override_header,
            override_from: TrustedProxies::new(nets),
            no_user_key: no_user_key?,
            shadow,
            mirror,
        })
    }

    /// A route's `shadow_split`, checked like a split (its salt defaults to the route's).
    fn shadow_split(&mut self, c: &Config, rp: &JsonPath, r: &Route) -> Option<ShadowSplit> {
        if r.shadow_salt.as_deref() == Some("") {
            self.err(
                rp.key("shadow_salt"),
                "shadow_salt must not be empty (omit it to use the rule's salt)",
            );
        }
        let Some(targets) = &r.shadow_split else {
            if r.shadow_salt.is_some() {
                self.err(
                    rp.key("shadow_salt"),
                    "shadow_salt only applies to a `shadow_split`",
                );
            }
            return None;
        };
        let targets = match self.split(c, &rp.key("shadow_split"), targets)? {
            RouteAction::Split(t) => t,
            RouteAction::Upstream(_) => return None,
        };
        let salt = r.shadow_salt.as_deref().unwrap_or(r.bucket_salt());
        Some(ShadowSplit {
            targets,
            same_salt: salt == r.bucket_salt(),
            salt: salt.into(),
        })
    }

    /// The bucket key of requests with no user, compiled; `p` is its path.
    fn no_user_key(&mut self, p: JsonPath, k: &NoUserKey) -> Option<CompiledNoUserKey> {
        match k {
            NoUserKey::ClientIp => Some(CompiledNoUserKey::ClientIp),
            NoUserKey::Random => Some(CompiledNoUserKey::Random),
            NoUserKey::Header(h) => self
                .header_name(p.key("header"), h)
                .map(CompiledNoUserKey::Header),
        }
    }

    fn split(&mut self, c: &Config, sp: &JsonPath, targets: &[SplitTarget]) -> Option<RouteAction> {
        if targets.is_empty() {
            self.err(sp.clone(), "a split needs at least one target");
            return None;
        }
        let before = self.issues.len();
        let mut typed = Vec::with_capacity(targets.len());
        let mut total: u64 = 0;
        let mut rest = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut all_parsed = true;
        for (i, t) in targets.iter().enumerate() {
            let tp = sp.index(i);
            let up = self.upstream_ref(c, tp.key("upstream"), &t.upstream);
            if let Some(prev) = seen.insert(t.upstream.as_str(), i) {
                self.err(
                    tp.key("upstream"),
                    format!("{:?} is already split[{prev}]", t.upstream),
                );
            }
            let weight = target_weight(t);
            match &weight {
                Ok(Weight::Ppm(p)) => total += u64::from(*p),
                Ok(Weight::Rest) => rest.push(i),
                Err((field, msg)) => {
                    all_parsed = false;
                    self.err(
                        if field.is_empty() { tp } else { tp.key(*field) },
                        msg.clone(),
                    );
                }
            }
            typed.push(up.zip(weight.ok()));
        }
        if !all_parsed {
            return None;
        }
        let pct = |ppm: u64| format!("{}.{:04}%", ppm / 10_000, ppm % 10_000);
        match rest.as_slice() {
            [] if total != u64::from(BUCKETS) => self.err(
                sp.clone(),
                format!(
                    "weights sum to {total} ppm ({}), not 1000000 (100%); fix them or mark one target \"rest\"",
                    pct(total)
                ),
            ),
            [_] if total > u64::from(BUCKETS) => self.err(
                sp.clone(),
                format!(
                    "weights other than \"rest\" sum to {total} ppm ({}), more than 100%",
                    pct(total)
                ),
            ),
            [_, second, ..] => {
                self.err(sp.index(*second).key("weight"), "only one target may be \"rest\"")
            }
            _ => {}
        }
        if self.reported_since(before) {
            return None;
        }
        Some(RouteAction::split(
            typed.into_iter().collect::<Option<_>>()?,
        ))
    }

    /// A rule's conditions, compiled; `salt` is the rule's bucket salt.
    fn matcher(
        &mut self,
        p: JsonPath,
        m: &Match,
        salt: &str,
        interfaces: &HashSet<String>,
    ) -> Option<CompiledMatch> {
        let before = self.issues.len();
        if let Some(b) = &m.user_buckets {
            let bp = p.key("user_buckets");
            if b.to_ppm > BUCKETS {
                self.err(
                    bp.key("to_ppm"),
                    format!("{} is out of range; allowed 0..={BUCKETS}", b.to_ppm),
                );
            } else if b.from_ppm >= b.to_ppm {
                self.err(
                    bp.key("from_ppm"),
                    format!(
                        "empty range: from_ppm {} is not below to_ppm {}",
                        b.from_ppm, b.to_ppm
                    ),
                );
            }
        }
        for (field, list) in [("apps", &m.apps), ("users", &m.users)] {
            if let Some(list) = list {
                if list.is_empty() {
                    self.err(
                        p.key(field),
                        "list must not be empty (omit the field to match any)",
                    );
                }
                self.no_dupes(p.key(field), list);
            }
        }
        let mut iface_ids = None;
        if let Some(list) = &m.interfaces {
            if list.is_empty() {
                self.err(
                    p.key("interfaces"),
                    "list must not be empty (omit the field to match any)",
                );
            }
            self.no_dupes(p.key("interfaces"), list);
            let ids: Vec<Option<InterfaceId>> = list
                .iter()
                .enumerate()
                .map(|(i, name)| self.interface_ref(p.key("interfaces").index(i), name, interfaces))
                .collect();
            iface_ids = Some(ids);
        }
        let mut headers = Vec::new();
        if let Some(list) = &m.headers {
            if list.is_empty() {
                self.err(
                    p.key("headers"),
                    "map must not be empty (omit the field to match any)",
                );
            }
            let mut lower = HashSet::new();
            for (k, v) in list {
                let name = self.header_name(p.key("headers").key(k.clone()), k);
                if !lower.insert(k.to_ascii_lowercase()) {
                    self.err(
                        p.key("headers").key(k.clone()),
                        format!("header {k:?} is given twice (names are case-insensitive)"),
                    );
                }
                let value = http::HeaderValue::from_str(v);
                if value.is_err() {
                    self.err(
                        p.key("headers").key(k.clone()),
                        format!("{v:?} is not a valid header value"),
                    );
                }
                headers.push(name.zip(value.ok()));
            }
        }
        if self.reported_since(before) {
            return None;
        }
        let interfaces = match iface_ids {
            Some(ids) => Some(ids.into_iter().collect::<Option<Vec<_>>>()?),
            None => None,
        };
        let headers = headers.into_iter().collect::<Option<Vec<_>>>()?;
        Some(CompiledMatch::new(m, salt, interfaces, headers))
    }

    fn no_dupes(&mut self, p: JsonPath, list: &[String]) {
        let mut seen = HashSet::new();
        for (i, v) in list.iter().enumerate() {
            if !seen.insert(v) {
                self.err(p.index(i), format!("{v:?} is listed twice"));
            }
        }
    }
}

fn lists_overlap(a: &Option<Vec<String>>, b: &Option<Vec<String>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            let set: HashSet<&String> = a.iter().collect();
            b.iter().any(|x| set.contains(x))
        }
        _ => true,
    }
}

fn headers_overlap(
    a: &Option<BTreeMap<String, String>>,
    b: &Option<BTreeMap<String, String>>,
) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            // Disjoint only if some header is required with different values by the two.
            let b_lower: HashMap<String, &String> =
                b.iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
            a.iter().all(|(k, v)| {
                b_lower
                    .get(&k.to_ascii_lowercase())
                    .is_none_or(|bv| *bv == v)
            })
        }
        _ => true,
    }
}

/// Whether two matchers (with their rules' bucket salts) can match one request.
fn overlap((a, salt_a): (&Match, &str), (b, salt_b): (&Match, &str)) -> bool {
    let buckets = match (&a.user_buckets, &b.user_buckets) {
        // Same salt: a user has the same bucket under both rules, so disjoint ranges mean
        // disjoint users. Different salts: anything can overlap.
        (Some(ra), Some(rb)) => {
            salt_a != salt_b || (ra.from_ppm < rb.to_ppm && rb.from_ppm < ra.to_ppm)
        }
        _ => true,
    };
    buckets
        && lists_overlap(&a.apps, &b.apps)
        && lists_overlap(&a.interfaces, &b.interfaces)
        && lists_overlap(&a.users, &b.users)
        && headers_overlap(&a.headers, &b.headers)
}

/// Pairs `(earlier, later)` of rules with equal specificity that can match one request.
///
/// Two such rules constrain the same dimensions, so they can only overlap if they share a
/// value in every listed dimension. Rules are grouped by specificity, then by the values of
/// the listed dimension with the most distinct values in that group, and only rules sharing
/// a value are compared: linear for the usual configs (one rule per app or per interface),
/// not quadratic.
pub(crate) fn ambiguous_pairs<'a>(
    matchers: impl Iterator<Item = (&'a Match, &'a str)>,
) -> Vec<(usize, usize)> {
    type Dim = fn(&Match) -> Option<&Vec<String>>;
    const DIMS: [Dim; 3] = [
        |m| m.users.as_ref(),
        |m| m.interfaces.as_ref(),
        |m| m.apps.as_ref(),
    ];
    let all: Vec<(&Match, &str)> = matchers.collect();
    let mut by_spec: HashMap<u8, Vec<usize>> = HashMap::new();
    for (i, (m, _)) in all.iter().enumerate() {
        by_spec.entry(m.specificity()).or_default().push(i);
    }
    let mut pairs = HashSet::new();
    for members in by_spec.values() {
        // The most selective dimension that every rule of the group lists, if any. (Rules of
        // one specificity constrain the same dimensions, but `users` may be a list in one and
        // a bucket range in another.)
        let dim = DIMS
            .iter()
            .filter(|d| members.iter().all(|&i| d(all[i].0).is_some()))
            .max_by_key(|d| {
                members
                    .iter()
                    .flat_map(|&i| d(all[i].0).into_iter().flatten())
                    .collect::<HashSet<_>>()
                    .len()
            });
        let mut groups: HashMap<Option<&str>, Vec<usize>> = HashMap::new();
        for &i in members {
            match dim.and_then(|d| d(all[i].0)) {
                Some(values) => {
                    let uniq: HashSet<&str> = values.iter().map(String::as_str).collect();
                    for v in uniq {
                        groups.entry(Some(v)).or_default().push(i);
                    }
                }
                None => groups.entry(None).or_default().push(i),
            }
        }
        for g in groups.values() {
            for (x, &a) in g.iter().enumerate() {
                for &b in &g[x + 1..] {
                    if overlap(all[a], all[b]) {
                        pairs.insert((a, b));
                    }
                }
            }
        }
    }
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort_unstable();
    pairs
}

/// An interface's method: `Some(None)` for `*`, `Some(method)` for an HTTP method in upper
/// case, `None` otherwise.
fn parse_method(m: &str) -> Option<Option<Method>> {
    if m == "*" {
        return Some(None);
    }
    if !m.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Method::from_bytes(m.as_bytes()).ok().map(Some)
}

/// A path template: starts with `/`, no `..` segment, no encoded slash, no control
/// characters or whitespace; `{param}` segments are whole segments with a plain name.
fn check_path_template(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with `/`"));
    }
    if path.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{path:?} contains whitespace or control characters"
        ));
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return Err(format!("{path:?} contains an encoded `/`, `\\` or NUL"));
    }
    for seg in path.split('/').skip(1) {
        if seg == ".." || seg == "." {
            return Err(format!("{path:?} contains a `{seg}` segment"));
        }
        if seg.contains('{') || seg.contains('}') {
            let name = seg
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .ok_or_else(|| {
                    format!("{path:?}: a parameter must be a whole segment, like `{{id}}`")
                })?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "{path:?}: parameter name {name:?} must be letters, digits or `_`"
                ));
            }
        }
    }
    Ok(())
}

/// `host:port` with a port in 1..=65535; no scheme, no path.
fn check_endpoint(e: &str) -> Result<(), String> {
    if e.is_empty() {
        return Err("endpoint must not be empty".into());
    }
    if e.contains("://") {
        return Err(format!("{e:?} must be host:port, without a scheme"));
    }
    if e.contains('/') {
        return Err(format!("{e:?} must be host:port, without a path"));
    }
    if e.parse::<SocketAddr>().is_ok() {
        return match e.rsplit_once(':') {
            Some((_, "0")) => Err(format!("{e:?}: port 0 is not a valid upstream port")),
            _ => Ok(()),
        };
    }
    if e.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{e:?} has no port"));
    }
    let (host, port) = e
        .rsplit_once(':')
        .ok_or_else(|| format!("{e:?} has no port"))?;
    if host.is_empty() {
        return Err(format!("{e:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{e:?}: port {port:?} is not in 1..=65535")),
        Ok(_) => {
            let ok = host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
            if ok {
                Ok(())
            } else {
                Err(format!("{e:?}: {host:?} is not a valid host name"))
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// What is valid but unsafe in a config: each with its place and why. `tidegate check`
/// prints them (and still exits 0); the gateway logs them when it loads the config.
pub fn warnings(c: &Config) -> Vec<Issue> {
    let mut out = Vec::new();
    let a = &c.overload.admission;
    if c.overload.enabled && a.enabled && a.priority_key_file.is_none() {
        out.push(Issue {
            path: JsonPath::root()
                .key("overload")
                .key("admission")
                .key("priority_key_file"),
            message: "not set: user priorities are a public hash of the user ID, so anyone can \
                      compute offline which IDs are shed last this hour; name a secret key file"
                .to_owned(),
        });
    }
    for (i, r) in c.routes.iter().enumerate() {
        if r.override_header.is_some() && r.override_from.is_empty() {
            out.push(Issue {
                path: JsonPath::root()
                    .key("routes")
                    .index(i)
                    .key("override_header"),
                message: "honoured from any client: anyone can choose their target; limit it \
                          with override_from (client CIDRs)"
                    .to_owned(),
            });
        }
    }
    out
}
