//! Validation of limits, fallbacks, plans and breakers.
//!
//! Plans are checked twice over: each rule where it is written, and the sets of rules in
//! force (the active plans together, and every plan alone) for the conflicts only a set can
//! have: two plans changing one rule, or two fallbacks that tie. So a plan that cannot be
//! switched on is refused while it is still off, not at 3 a.m. when someone flips it.

use std::collections::{HashMap, HashSet};

use crate::degrade::{fraction_ppm, ratio_ppm};
use crate::error::{JsonPath, did_you_mean};
use crate::limit::{MAX_RATE_COUNT, parse_rate};
use crate::model::{
    Breaker, Config, Fallback, KeyPart, Limit, LimitScope, LocalResponse, NoUserKey,
};
use crate::plan;

use super::{MAX_GOVERN_RULES, Validator, ambiguous_pairs};

impl Validator {
    pub(super) fn govern(&mut self, c: &Config, interfaces: &HashSet<String>) {
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
        self.breakers(c);
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
            self.name(lp.key("name"), &l.name);
            if let Some(prev) = names.insert(l.name.as_str(), i) {
                self.err(
                    lp.key("name"),
                    format!("duplicate limit name {:?} (also [{prev}])", l.name),
                );
            }
            self.matcher(lp.key("match"), &l.matcher, interfaces);
            let mut seen = HashSet::new();
            for (k, part) in l.key.iter().enumerate() {
                if let KeyPart::Header(h) = part {
                    self.header_name(lp.key("key").index(k).key("header"), h);
                }
                let id = match part {
                    KeyPart::Header(h) => format!("header {}", h.to_ascii_lowercase()),
                    other => format!("{other:?}"),
                };
                if !seen.insert(id) {
                    self.err(lp.key("key").index(k), "this key part is listed twice");
                }
            }
            if let Err(m) = parse_rate(&l.rate) {
                self.err(lp.key("rate"), m);
            }
            if let Some(b) = l.burst {
                self.range(lp.key("burst"), b.into(), 1, MAX_RATE_COUNT.into());
            }
            for (k, v) in &l.exceptions {
                let ep = lp.key("exceptions").key(k.clone());
                match k.split_once(':') {
                    Some((_, "")) | None => self.err(
                        ep.clone(),
                        format!(
                            "{k:?} is not an exception key: write \"user:ID\", \"app:ID\" or \"interface:NAME\""
                        ),
                    ),
                    Some(("user" | "app", _)) => {}
                    Some(("interface", name)) => {
                        if !interfaces.contains(name) {
                            let hint = did_you_mean(name, interfaces.iter().map(String::as_str))
                                .map(|m| format!("; did you mean {m:?}?"))
                                .unwrap_or_default();
                            self.err(ep.clone(), format!("unknown interface {name:?}{hint}"));
                        }
                    }
                    Some((dim, _)) => self.err(
                        ep.clone(),
                        format!(
                            "{dim:?} cannot have exceptions; use \"user:\", \"app:\" or \"interface:\""
                        ),
                    ),
                }
                if let Err(m) = parse_rate(v) {
                    self.err(ep, m);
                }
            }
        }
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
            self.matcher(fp.key("match"), &f.matcher, interfaces);
            if let Err(m) = fraction_ppm(f) {
                self.err(fp.key("fraction"), m);
            }
            if f.salt.as_deref() == Some("") {
                self.err(
                    fp.key("salt"),
                    "salt must not be empty (omit it to use the rule name)",
                );
            }
            if let NoUserKey::Header(h) = &f.no_user_key {
                self.header_name(fp.key("no_user_key").key("header"), h);
            }
            self.local_response(fp.key("response"), &f.response);
        }
    }

    fn local_response(&mut self, p: JsonPath, r: &LocalResponse) {
        self.range(p.key("status"), r.status.into(), 200, 599);
        let mut lower = HashSet::new();
        for (k, v) in &r.headers {
            let hp = p.key("headers").key(k.clone());
            if let Some(name) = self.header_name(hp.clone(), k) {
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
            if http::HeaderValue::from_str(v).is_err() {
                self.err(hp, format!("{v:?} is not a valid header value"));
            }
        }
    }

    fn breakers(&mut self, c: &Config) {
        let p = JsonPath::root().key("breakers");
        let routes: HashSet<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut guarded: HashMap<(&str, Option<&str>), usize> = HashMap::new();
        for (i, b) in c.breakers.iter().enumerate() {
            let bp = p.index(i);
            self.breaker(c, &bp, b, &routes);
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
    }

    fn breaker(&mut self, c: &Config, bp: &JsonPath, b: &Breaker, routes: &HashSet<&str>) {
        self.name(bp.key("name"), &b.name);
        self.upstream_ref(c, bp.key("upstream"), &b.upstream);
        if let Some(r) = &b.route {
            if !routes.contains(r.as_str()) {
                let hint = did_you_mean(r, routes.iter().copied())
                    .map(|m| format!("; did you mean {m:?}?"))
                    .unwrap_or_default();
                self.err(bp.key("route"), format!("unknown route {r:?}{hint}"));
            }
        }
        self.range(bp.key("window_ms"), b.window_ms, 100, 600_000);
        self.range(bp.key("min_calls"), b.min_calls.into(), 1, 1_000_000);
        if let Err(m) = ratio_ppm(&b.error_ratio) {
            self.err(bp.key("error_ratio"), m);
        } else if ratio_ppm(&b.error_ratio) == Ok(0) {
            self.err(
                bp.key("error_ratio"),
                "0% would open on the first call; use at least 0.0001%",
            );
        }
        if let Some(ms) = b.slow_call_ms {
            self.range(bp.key("slow_call_ms"), ms, 1, 3_600_000);
        }
        if let Some(s) = &b.slow_ratio {
            if b.slow_call_ms.is_none() {
                self.err(bp.key("slow_ratio"), "slow_ratio needs slow_call_ms");
            }
            match ratio_ppm(s) {
                Err(m) => self.err(bp.key("slow_ratio"), m),
                Ok(0) => self.err(
                    bp.key("slow_ratio"),
                    "0% would open on the first call; use at least 0.0001%",
                ),
                Ok(_) => {}
            }
        }
        self.range(bp.key("open_ms"), b.open_ms, 1, 3_600_000);
        self.range(
            bp.key("half_open_probes"),
            b.half_open_probes.into(),
            1,
            1000,
        );
        if let Some(r) = &b.response {
            self.local_response(bp.key("response"), r);
        }
        if let Some(alt) = &b.alternate_upstream {
            self.upstream_ref(c, bp.key("alternate_upstream"), alt);
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
    }
}
