//! Validation of limits, fallbacks, plans and breakers.
//!
//! Plans are checked twice over: each rule where it is written, and the sets of rules in
//! force (the active plans together, and every plan alone) for the conflicts only a set can
//! have: two plans changing one rule, or two fallbacks that tie. So a plan that cannot be
//! switched on is refused while it is still off, not at 3 a.m. when someone flips it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use http::StatusCode;

use crate::bucket::BUCKETS;
use crate::classify::MAX_KEY_PARAMS;
use crate::degrade::{
    CompiledBreaker, CompiledFallback, CompiledResponse, WhenOpen, fraction_ppm, ratio_ppm,
};
use crate::error::{JsonPath, did_you_mean};
use crate::limit::{
    CompiledKeyPart, CompiledLimit, Exception, MAX_DELAY_MS, MAX_QUEUE, MAX_RATE_COUNT,
    fingerprint, parse_rate,
};
use crate::model::{
    Breaker, Config, Fallback, KeyPart, Limit, LimitScope, LocalResponse, RuleMode,
};
use crate::plan;

use super::{MAX_GOVERN_RULES, Validator, ambiguous_pairs};

impl Validator<'_> {
    /// The limits and fallbacks in force (active plans applied), and the breakers, compiled.
    pub(super) fn govern(
        &mut self,
        c: &Config,
        interfaces: &HashSet<String>,
    ) -> Option<(
        Vec<CompiledLimit>,
        Vec<CompiledFallback>,
        Vec<CompiledBreaker>,
    )> {
        let root = JsonPath::root();
        self.limit_list(root.key("limits"), &c.limits, interfaces);
        self.cluster_scope(c, root.key("limits"), &c.limits);
        for (name, p) in &c.plans {
            self.cluster_scope(
                c,
                root.key("plans").key(name.clone()).key("limits"),
                &p.limits,
            );
        }
        self.fallback_list(root.key("fallbacks"), &c.fallbacks, interfaces);
        let base_names: HashSet<&str> = c
            .limits
            .iter()
            .map(|l| l.name.as_str())
            .chain(c.fallbacks.iter().map(|f| f.name.as_str()))
            .collect();
        for (name, p) in &c.plans {
            let pp = root.key("plans").key(name.clone());
            self.name(pp.clone(), name);
            self.limit_list(pp.key("limits"), &p.limits, interfaces);
            self.fallback_list(pp.key("fallbacks"), &p.fallbacks, interfaces);
            self.no_dupes(pp.key("disable"), &p.disable);
            for (i, d) in p.disable.iter().enumerate() {
                if !base_names.contains(d.as_str()) {
                    let hint = did_you_mean(d, base_names.iter().copied())
                        .map(|m| format!("; did you mean {m:?}?"))
                        .unwrap_or_default();
                    self.err(
                        pp.key("disable").index(i),
                        format!("no base limit or fallback is named {d:?}{hint}"),
                    );
                }
            }
            // Each plan alone must be switchable on.
            if !c.active_plans.iter().any(|a| a == name) {
                let eff = plan::effective(c, &[name.as_str()]);
                self.fallback_ties(&eff, &format!(" when plan {name:?} is active"));
            }
        }
        self.no_dupes(root.key("active_plans"), &c.active_plans);
        for (i, a) in c.active_plans.iter().enumerate() {
            if !c.plans.contains_key(a) {
                let hint = did_you_mean(a, c.plans.keys().map(String::as_str))
                    .map(|m| format!("; did you mean {m:?}?"))
                    .unwrap_or_default();
                self.err(
                    root.key("active_plans").index(i),
                    format!("unknown plan {a:?}{hint}"),
                );
            }
        }
        let eff = plan::effective(c, &plan::active(c));
        for (path, msg) in &eff.conflicts {
            self.err(path.clone(), msg.clone());
        }
        self.fallback_ties(&eff, "");
        // A trigger may switch its plan on beside the active ones and the other triggered
        // ones: all of them together must be switchable on.
        let triggered: Vec<&str> = (c.plans.iter())
            .filter(|(n, p)| {
                p.trigger.is_some() && p.auto != Some(false) && !c.active_plans.contains(n)
            })
            .map(|(n, _)| n.as_str())
            .collect();
        if !triggered.is_empty() {
            let mut all = plan::active(c);
            all.extend(&triggered);
            let when = " when the plans with a trigger are switched on beside the active ones";
            let all_eff = plan::effective(c, &all);
            for (path, msg) in &all_eff.conflicts {
                if !eff.conflicts.iter().any(|(p, _)| p == path) {
                    self.err(path.clone(), format!("{msg}{when}"));
                }
            }
            if triggered.len() + c.active_plans.len() > 1 {
                self.fallback_ties(&all_eff, when);
            }
        }
        let breakers = self.breakers(c);
        // The rules in force, picked by where they are written among those compiled above.
        let limits = eff
            .limits
            .iter()
            .map(|l| self.limits.remove(&l.path))
            .collect::<Option<Vec<_>>>();
        let fallbacks = eff
            .fallbacks
            .iter()
            .map(|f| self.fallbacks.remove(&f.path))
            .collect::<Option<Vec<_>>>();
        Some((limits?, fallbacks?, breakers?))
    }

    fn fallback_ties(&mut self, eff: &plan::Effective<'_>, when: &str) {
        let pairs = ambiguous_pairs(
            eff.fallbacks
                .iter()
                .map(|f| (&f.rule.matcher, f.rule.bucket_salt())),
        );
        for (a, b) in pairs {
            let (fa, fb) = (&eff.fallbacks[a], &eff.fallbacks[b]);
            self.err(
                fb.path.clone(),
                format!(
                    "fallbacks {:?} ({}) and {:?} ({}) can match the same request with the same specificity{when}; make one more specific",
                    fa.rule.name, fa.path, fb.rule.name, fb.path
                ),
            );
        }
    }

    fn list_size(&mut self, p: &JsonPath, n: usize) -> bool {
        if n > MAX_GOVERN_RULES {
            self.err(
                p.clone(),
                format!("{n} rules; at most {MAX_GOVERN_RULES} are allowed"),
            );
            return false;
        }
        true
    }

    /// A cluster-scope limit needs the Redis of `server.redis`.
    fn cluster_scope(&mut self, c: &Config, p: JsonPath, list: &[Limit]) {
        if c.server.redis.is_some() {
            return;
        }
        for (i, l) in list.iter().enumerate() {
            if l.scope == LimitScope::Cluster {
                self.err(
                    p.index(i).key("scope"),
                    "\"cluster\" needs server.redis (the Redis every gateway counts in)",
                );
            }
        }
    }

    fn limit_list(&mut self, p: JsonPath, list: &[Limit], interfaces: &HashSet<String>) {
        if !self.list_size(&p, list.len()) {
            return;
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, l) in list.iter().enumerate() {
            let lp = p.index(i);
            if let Some(compiled) = self.limit(&lp, i, l, &mut names, interfaces) {
                self.limits.insert(lp, compiled);
            }
        }
    }

    /// The limit rule at index `i` of its list, compiled; `names` are those of the rules
    /// before it.
    fn limit<'l>(
        &mut self,
        lp: &JsonPath,
        i: usize,
        l: &'l Limit,
        names: &mut HashMap<&'l str, usize>,
        interfaces: &HashSet<String>,
    ) -> Option<CompiledLimit> {
        let before = self.issues.len();
        self.name(lp.key("name"), &l.name);
        if let Some(prev) = names.insert(l.name.as_str(), i) {
            self.err(
                lp.key("name"),
                format!("duplicate limit name {:?} (also [{prev}])", l.name),
            );
        }
        let matcher = self.matcher(lp.key("match"), &l.matcher, &l.name, interfaces);
        let mut seen = HashSet::new();
        let mut key = Vec::with_capacity(l.key.len());
        for (k, part) in l.key.iter().enumerate() {
            key.push(match part {
                KeyPart::App => Some(CompiledKeyPart::App),
                KeyPart::Interface => Some(CompiledKeyPart::Interface),
                KeyPart::User => Some(CompiledKeyPart::User),
                KeyPart::Header(h) => self
                    .header_name(lp.key("key").index(k).key("header"), h)
                    .map(CompiledKeyPart::Header),
                KeyPart::PathParam(name) => {
                    self.path_param_key(lp.key("key").index(k).key("path_param"), l, name)
                }
            });
            let id = match part {
                KeyPart::Header(h) => format!("header {}", h.to_ascii_lowercase()),
                KeyPart::PathParam(name) => format!("path_param {name}"),
                other => format!("{other:?}"),
            };
            if !seen.insert(id) {
                self.err(lp.key("key").index(k), "this key part is listed twice");
            }
        }
        let rate = parse_rate(&l.rate)
            .map_err(|m| self.err(lp.key("rate"), m))
            .ok();
        if let Some(b) = l.burst {
            self.range(lp.key("burst"), b.into(), 1, MAX_RATE_COUNT.into());
        }
        if let Some(d) = l.max_delay_ms {
            self.range(lp.key("max_delay_ms"), d, 1, MAX_DELAY_MS);
            if l.scope == LimitScope::Cluster {
                self.err(
                    lp.key("max_delay_ms"),
                    "a cluster-scope limit cannot pace: remove max_delay_ms or use scope local",
                );
            }
        }
        if let Some(q) = l.max_queue {
            self.range(lp.key("max_queue"), q.into(), 1, MAX_QUEUE.into());
            if l.max_delay_ms.is_none() {
                self.err(lp.key("max_queue"), "max_queue needs max_delay_ms");
            }
        }
        let mut exceptions = Vec::with_capacity(l.exceptions.len());
        for (k, v) in &l.exceptions {
            let ep = lp.key("exceptions").key(k.clone());
            let on = match k.split_once(':') {
                Some((_, "")) | None => {
                    self.err(
                        ep.clone(),
                        format!(
                            "{k:?} is not an exception key: write \"user:ID\", \"app:ID\" or \"interface:NAME\""
                        ),
                    );
                    None
                }
                Some(("user", id)) => Some(Exception::User(id)),
                Some(("app", id)) => Some(Exception::App(id)),
                Some(("interface", name)) => self
                    .interface_ref(ep.clone(), name, interfaces)
                    .map(Exception::Interface),
                Some((dim, _)) => {
                    self.err(
                        ep.clone(),
                        format!(
                            "{dim:?} cannot have exceptions; use \"user:\", \"app:\" or \"interface:\""
                        ),
                    );
                    None
                }
            };
            let rate = parse_rate(v).map_err(|m| self.err(ep, m)).ok();
            exceptions.push(on.zip(rate).map(|(on, rate)| (on, k.as_str(), rate)));
        }
        if self.reported_since(before) {
            return None;
        }
        Some(CompiledLimit::new(
            l,
            matcher?,
            rate?,
            exceptions.into_iter().collect::<Option<_>>()?,
            key.into_iter().collect::<Option<_>>()?,
        ))
    }

    /// A `{"path_param": NAME}` key part: the limit must be restricted to interfaces whose
    /// path templates all have `{NAME}`, so every request it counts has the value (a
    /// request without it would all share one key, the opposite of a per-envelope quota).
    /// Its slot among the parameters classification keeps.
    fn path_param_key(&mut self, p: JsonPath, l: &Limit, name: &str) -> Option<CompiledKeyPart> {
        let Some(list) = l.matcher.interfaces.as_ref().filter(|l| !l.is_empty()) else {
            self.err(
                p,
                format!(
                    "a path_param key needs match.interfaces, each with {{{name}}} in its path template"
                ),
            );
            return None;
        };
        let missing: Vec<&str> = list
            .iter()
            .filter(|i| {
                self.iface_params
                    .get(i.as_str())
                    .is_some_and(|params| !params.contains(&name))
            })
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            self.err(
                p,
                format!(
                    "interface(s) {missing:?} of match.interfaces have no {{{name}}} in their path template"
                ),
            );
            return None;
        }
        let slot = match self.key_params.iter().position(|x| **x == *name) {
            Some(slot) => slot,
            None if self.key_params.len() < MAX_KEY_PARAMS => {
                self.key_params.push(name.into());
                self.key_params.len() - 1
            }
            None => {
                self.err(
                    p,
                    format!(
                        "limit keys may read at most {MAX_KEY_PARAMS} distinct path parameters ({:?} already); reuse one of them",
                        self.key_params
                    ),
                );
                return None;
            }
        };
        Some(CompiledKeyPart::PathParam(slot as u8, name.into()))
    }

    fn fallback_list(&mut self, p: JsonPath, list: &[Fallback], interfaces: &HashSet<String>) {
        if !self.list_size(&p, list.len()) {
            return;
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, f) in list.iter().enumerate() {
            let fp = p.index(i);
            self.name(fp.key("name"), &f.name);
            if let Some(prev) = names.insert(f.name.as_str(), i) {
                self.err(
                    fp.key("name"),
                    format!("duplicate fallback name {:?} (also [{prev}])", f.name),
                );
            }
            let before = self.issues.len();
            let matcher = self.matcher(fp.key("match"), &f.matcher, f.bucket_salt(), interfaces);
            let fraction_ppm = fraction_ppm(f)
                .map_err(|m| self.err(fp.key("fraction"), m))
                .ok();
            if f.salt.as_deref() == Some("") {
                self.err(
                    fp.key("salt"),
                    "salt must not be empty (omit it to use the rule name)",
                );
            }
            let no_user_key = self.no_user_key(fp.key("no_user_key"), &f.no_user_key);
            let response = self.local_response(
                fp.key("response"),
                &f.response,
                &serde_json::json!({ "error": "degraded", "rule": f.name }),
            );
            if self.reported_since(before) {
                continue;
            }
            let compiled = || {
                Some(CompiledFallback {
                    name: f.name.as_str().into(),
                    matcher: matcher?,
                    fraction_ppm: fraction_ppm?,
                    salt: f.bucket_salt().into(),
                    response: response?,
                    mode: f.mode,
                    no_user_key: no_user_key?,
                })
            };
            if let Some(compiled) = compiled() {
                self.fallbacks.insert(fp, compiled);
            }
        }
    }

    /// A response the gateway makes, compiled; `default_body` is its body when it has none.
    fn local_response(
        &mut self,
        p: JsonPath,
        r: &LocalResponse,
        default_body: &serde_json::Value,
    ) -> Option<CompiledResponse> {
        let before = self.issues.len();
        self.range(p.key("status"), r.status.into(), 200, 599);
        let mut lower = HashSet::new();
        let mut headers = Vec::with_capacity(r.headers.len());
        for (k, v) in &r.headers {
            let hp = p.key("headers").key(k.clone());
            let name = self.header_name(hp.clone(), k);
            if let Some(name) = name.clone() {
                if [
                    http::header::CONTENT_LENGTH,
                    http::header::TRANSFER_ENCODING,
                    http::header::CONNECTION,
                ]
                .contains(&name)
                {
                    self.err(hp.clone(), format!("{k:?} is set by the gateway"));
                }
                if !lower.insert(name) {
                    self.err(
                        hp.clone(),
                        format!("header {k:?} is given twice (names are case-insensitive)"),
                    );
                }
            }
            let value = http::HeaderValue::from_str(v);
            if value.is_err() {
                self.err(hp, format!("{v:?} is not a valid header value"));
            }
            headers.push(name.zip(value.ok()));
        }
        if self.reported_since(before) {
            return None;
        }
        Some(CompiledResponse::new(
            StatusCode::from_u16(r.status).ok()?,
            headers.into_iter().collect::<Option<_>>()?,
            r.body.as_ref().unwrap_or(default_body),
        ))
    }

    /// The circuit breakers, compiled.
    fn breakers(&mut self, c: &Config) -> Option<Vec<CompiledBreaker>> {
        let p = JsonPath::root().key("breakers");
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut guarded: HashMap<(&str, Option<&str>), usize> = HashMap::new();
        let mut compiled = Vec::with_capacity(c.breakers.len());
        for (i, b) in c.breakers.iter().enumerate() {
            let bp = p.index(i);
            compiled.push(self.breaker(c, &bp, b));
            if let Some(prev) = names.insert(b.name.as_str(), i) {
                self.err(
                    bp.key("name"),
                    format!(
                        "duplicate breaker name {:?} (also breakers[{prev}])",
                        b.name
                    ),
                );
            }
            if let Some(prev) = guarded.insert((b.upstream.as_str(), b.route.as_deref()), i) {
                self.err(
                    bp.clone(),
                    format!("breakers[{prev}] already guards this upstream (and route)"),
                );
            }
        }
        compiled.into_iter().collect()
    }

    fn breaker(&mut self, c: &Config, bp: &JsonPath, b: &Breaker) -> Option<CompiledBreaker> {
        let before = self.issues.len();
        self.name(bp.key("name"), &b.name);
        let upstream = self.upstream_ref(c, bp.key("upstream"), &b.upstream);
        let mut route = None;
        if let Some(r) = &b.route {
            route = self.route_ids.get(r.as_str()).copied();
            if route.is_none() {
                let hint = did_you_mean(r, self.route_ids.keys().copied())
                    .map(|m| format!("; did you mean {m:?}?"))
                    .unwrap_or_default();
                self.err(bp.key("route"), format!("unknown route {r:?}{hint}"));
            }
        }
        self.range(bp.key("window_ms"), b.window_ms, 100, 600_000);
        self.range(bp.key("min_calls"), b.min_calls.into(), 1, 1_000_000);
        let error_ratio_ppm = match ratio_ppm(&b.error_ratio) {
            Err(m) => {
                self.err(bp.key("error_ratio"), m);
                None
            }
            Ok(0) => {
                self.err(
                    bp.key("error_ratio"),
                    "0% would open on the first call; use at least 0.0001%",
                );
                None
            }
            Ok(ppm) => Some(ppm),
        };
        if let Some(ms) = b.slow_call_ms {
            self.range(bp.key("slow_call_ms"), ms, 1, 3_600_000);
        }
        let mut slow_ratio_ppm = Some(BUCKETS);
        if let Some(s) = &b.slow_ratio {
            if b.slow_call_ms.is_none() {
                self.err(bp.key("slow_ratio"), "slow_ratio needs slow_call_ms");
            }
            slow_ratio_ppm = match ratio_ppm(s) {
                Err(m) => {
                    self.err(bp.key("slow_ratio"), m);
                    None
                }
                Ok(0) => {
                    self.err(
                        bp.key("slow_ratio"),
                        "0% would open on the first call; use at least 0.0001%",
                    );
                    None
                }
                Ok(ppm) => Some(ppm),
            };
        }
        self.range(bp.key("open_ms"), b.open_ms, 1, 3_600_000);
        self.range(
            bp.key("half_open_probes"),
            b.half_open_probes.into(),
            1,
            1000,
        );
        let default_body = serde_json::json!({ "error": "circuit_open", "breaker": b.name });
        let response = match &b.response {
            Some(r) => self.local_response(bp.key("response"), r, &default_body),
            None => Some(CompiledResponse::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Vec::new(),
                &default_body,
            )),
        };
        let mut alternate = None;
        if let Some(alt) = &b.alternate_upstream {
            alternate = self.upstream_ref(c, bp.key("alternate_upstream"), alt);
            if *alt == b.upstream {
                self.err(
                    bp.key("alternate_upstream"),
                    "the alternate must differ from the guarded upstream",
                );
            }
            if b.response.is_some() {
                self.err(
                    bp.key("response"),
                    "give either `response` or `alternate_upstream`, not both",
                );
            }
        }
        if self.reported_since(before) {
            return None;
        }
        let when_open = match &b.alternate_upstream {
            Some(_) => WhenOpen::Alternate(alternate?),
            None => WhenOpen::Respond(response?),
        };
        Some(CompiledBreaker {
            name: b.name.as_str().into(),
            upstream: upstream?,
            route,
            window: Duration::from_millis(b.window_ms),
            min_calls: b.min_calls,
            error_ratio_ppm: error_ratio_ppm?,
            slow_call: b.slow_call_ms.map(Duration::from_millis),
            slow_ratio_ppm: slow_ratio_ppm?,
            open_for: Duration::from_millis(b.open_ms),
            half_open_probes: b.half_open_probes,
            when_open,
            dry_run: b.mode == RuleMode::DryRun,
            fingerprint: fingerprint(b),
        })
    }
}
