//! What changes between two configs, rule by rule (`tidegate diff OLD NEW`).
//!
//! Every named rule (interface, upstream, route, limit, fallback, breaker, plan) is matched
//! by name and compared field by field; the singletons (`server`, `identity`, `overload`,
//! `active_plans`, `freeze`) are compared as wholes. On top of that, the two changes that move users
//! are measured **exactly, from the bucket ranges**: a route whose split (or upstream)
//! changes, and a fallback whose fraction changes, report the share of users (of the
//! requests the rule matches, in parts per million) that move and from where to where.
//! When a rule's salt changes, users are placed anew and only the expected share can be
//! given; the report says so.
//!
//! Routes and fallbacks are compared as compiled, so a plan switched on or off shows as the
//! fallbacks it adds or removes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::bucket::BUCKETS;
use crate::degrade::CompiledFallback;
use crate::model::Config;
use crate::route::{CompiledRoute, RouteAction};
use crate::snapshot::Snapshot;

/// The differences between two configs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConfigDiff {
    /// Changed sections, in config order; a section without changes is left out.
    pub sections: Vec<Section>,
}

/// The changes in one section of the config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Section {
    /// The section (`routes`, `limits`, ...).
    pub name: &'static str,
    /// Rules added, removed or changed; for a singleton section, one entry named after it.
    pub changes: Vec<RuleChange>,
}

/// One rule added, removed or changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleChange {
    /// The rule's name.
    pub name: String,
    /// What happened to it.
    pub kind: Kind,
    /// The fields that differ (for a changed rule).
    pub fields: Vec<FieldChange>,
    /// Users who move, from the bucket ranges (routes and fallbacks).
    pub moves: Vec<Move>,
    /// What the figures mean where they are not exact, or what else changed.
    pub notes: Vec<String>,
}

/// What happened to a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Only in the new config.
    Added,
    /// Only in the old config.
    Removed,
    /// In both, different.
    Changed,
}

/// One field that differs, as a JSON pointer into the rule, and its two values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    /// Where in the rule (`/split/0/weight`); empty for the rule as a whole.
    pub path: String,
    /// The old value (absent: the field was not there).
    pub old: Option<Value>,
    /// The new value.
    pub new: Option<Value>,
}

/// A share of a rule's users that goes somewhere else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Move {
    /// Where they went before (an upstream, or `served` / `degraded` for a fallback).
    pub from: String,
    /// Where they go now.
    pub to: String,
    /// The share, in parts per million of the users the rule buckets.
    pub ppm: u32,
    /// The bucket ranges that move, `[from, to)`; empty when the salt changed (no range
    /// keeps its users).
    pub buckets: Vec<(u32, u32)>,
    /// Exact (same salt: computed from the ranges), or expected (the salt changed).
    pub exact: bool,
}

/// Compare two loaded configs.
pub fn diff(old: (&Config, &Snapshot), new: (&Config, &Snapshot)) -> ConfigDiff {
    let (oc, os) = old;
    let (nc, ns) = new;
    let mut d = ConfigDiff::default();
    let mut push = |name: &'static str, changes: Vec<RuleChange>| {
        if !changes.is_empty() {
            d.sections.push(Section { name, changes });
        }
    };
    push("server", whole("server", &oc.server, &nc.server));
    push("identity", whole("identity", &oc.identity, &nc.identity));
    push(
        "interfaces",
        changed_only(named(&oc.interfaces, &nc.interfaces, |i| &i.name)),
    );
    push(
        "upstreams",
        changed_only(named_map(&oc.upstreams, &nc.upstreams)),
    );
    push("routes", changed_only(routes(oc, os, nc, ns)));
    push(
        "limits",
        changed_only(named(&oc.limits, &nc.limits, |l| &l.name)),
    );
    push("fallbacks", changed_only(fallbacks(oc, os, nc, ns)));
    push("plans", changed_only(named_map(&oc.plans, &nc.plans)));
    push(
        "active_plans",
        whole("active_plans", &oc.active_plans, &nc.active_plans),
    );
    push(
        "breakers",
        changed_only(named(&oc.breakers, &nc.breakers, |b| &b.name)),
    );
    push("overload", whole("overload", &oc.overload, &nc.overload));
    push("freeze", whole("freeze", &oc.freeze, &nc.freeze));
    d
}

/// A singleton section: one change named after it, with every differing field.
fn whole<T: Serialize>(name: &str, old: &T, new: &T) -> Vec<RuleChange> {
    let fields = fields(&to_value(old), &to_value(new));
    if fields.is_empty() {
        return Vec::new();
    }
    vec![RuleChange::new(name, Kind::Changed, fields)]
}

/// Rules in a list, matched by name, in the new config's order (removed ones after).
fn named<T: Serialize>(old: &[T], new: &[T], name: impl Fn(&T) -> &String) -> Vec<RuleChange> {
    let o: BTreeMap<&str, Value> = old
        .iter()
        .map(|r| (name(r).as_str(), to_value(r)))
        .collect();
    let n: Vec<(&str, Value)> = new
        .iter()
        .map(|r| (name(r).as_str(), to_value(r)))
        .collect();
    compare(&o, &n)
}

/// Rules in a map, matched by key.
fn named_map<T: Serialize>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
) -> Vec<RuleChange> {
    let o = old.iter().map(|(k, v)| (k.as_str(), to_value(v))).collect();
    let n: Vec<_> = new.iter().map(|(k, v)| (k.as_str(), to_value(v))).collect();
    compare(&o, &n)
}

/// Added and changed rules in the new order, then removed ones. A rule in both versions
/// is listed even when no field differs (its moves are decided by the caller, which drops
/// it if there are none).
fn compare(old: &BTreeMap<&str, Value>, new: &[(&str, Value)]) -> Vec<RuleChange> {
    let mut out = Vec::new();
    for (name, nv) in new {
        out.push(match old.get(name) {
            None => RuleChange::new(name, Kind::Added, whole_rule(None, Some(nv))),
            Some(ov) => RuleChange::new(name, Kind::Changed, fields(ov, nv)),
        });
    }
    for (name, ov) in old {
        if !new.iter().any(|(n, _)| n == name) {
            out.push(RuleChange::new(
                name,
                Kind::Removed,
                whole_rule(Some(ov), None),
            ));
        }
    }
    out
}

/// Drop the rules in both versions where nothing differs.
fn changed_only(mut v: Vec<RuleChange>) -> Vec<RuleChange> {
    v.retain(|c| c.kind != Kind::Changed || !c.fields.is_empty() || !c.moves.is_empty());
    v
}

fn whole_rule(old: Option<&Value>, new: Option<&Value>) -> Vec<FieldChange> {
    vec![FieldChange {
        path: String::new(),
        old: old.cloned(),
        new: new.cloned(),
    }]
}

fn to_value<T: Serialize>(v: &T) -> Value {
    // The config model serializes to JSON by construction (it was parsed from JSON).
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The leaves that differ between two JSON values, as JSON pointers.
fn fields(old: &Value, new: &Value) -> Vec<FieldChange> {
    let mut out = Vec::new();
    walk(String::new(), Some(old), Some(new), &mut out);
    out
}

fn walk(path: String, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<FieldChange>) {
    match (old, new) {
        (Some(Value::Object(o)), Some(Value::Object(n))) => {
            let keys: std::collections::BTreeSet<&String> = o.keys().chain(n.keys()).collect();
            for k in keys {
                walk(pointer(&path, k), o.get(k), n.get(k), out);
            }
        }
        // Lists of equal length compare by position (split targets, key parts); otherwise
        // the whole list is one change, which reads better than shifted positions.
        (Some(Value::Array(o)), Some(Value::Array(n))) if o.len() == n.len() => {
            for (i, (a, b)) in o.iter().zip(n).enumerate() {
                walk(pointer(&path, &i.to_string()), Some(a), Some(b), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(FieldChange {
            path,
            old: a.filter(|v| !v.is_null()).cloned(),
            new: b.filter(|v| !v.is_null()).cloned(),
        }),
    }
}

fn pointer(base: &str, key: &str) -> String {
    format!("{base}/{}", key.replace('~', "~0").replace('/', "~1"))
}

// --- routes ---

fn routes(oc: &Config, os: &Snapshot, nc: &Config, ns: &Snapshot) -> Vec<RuleChange> {
    let mut out = named(&oc.routes, &nc.routes, |r| &r.name);
    for c in &mut out {
        let (Some(o), Some(n)) = (compiled_route(os, &c.name), compiled_route(ns, &c.name)) else {
            continue;
        };
        let (old, new) = (placement(os, o), placement(ns, n));
        if o.salt == n.salt {
            c.moves = moves_exact(&old, &new);
        } else {
            c.moves = moves_expected(&old, &new);
            c.notes.push(format!(
                "salt changed ({:?} → {:?}): every user is placed anew; the shares are expected, not exact",
                o.salt, n.salt
            ));
        }
        if !c.moves.is_empty() && c.fields.iter().any(|f| f.path.starts_with("/match")) {
            c.notes.push(
                "its conditions changed too: the moves are among requests both versions match"
                    .into(),
            );
        }
        if c.fields.iter().any(|f| f.path.starts_with("/whitelist")) {
            c.notes
                .push("whitelisted users and apps go to their pinned target first".into());
        }
    }
    let common = |a: &[crate::model::Route], b: &[crate::model::Route]| -> Vec<String> {
        (a.iter().map(|r| r.name.clone()))
            .filter(|n| b.iter().any(|o| &o.name == n))
            .collect()
    };
    if common(&oc.routes, &nc.routes) != common(&nc.routes, &oc.routes) {
        out.push(RuleChange {
            name: "(order)".into(),
            kind: Kind::Changed,
            fields: vec![FieldChange {
                path: String::new(),
                old: Some(names(&oc.routes, |r| &r.name)),
                new: Some(names(&nc.routes, |r| &r.name)),
            }],
            moves: Vec::new(),
            notes: vec![
                "route rules are tried in order: the first that matches a request wins".into(),
            ],
        });
    }
    out
}

fn compiled_route<'s>(s: &'s Snapshot, name: &str) -> Option<&'s CompiledRoute> {
    s.routes.iter().find(|r| &*r.name == name)
}

fn names<T>(rules: &[T], name: impl Fn(&T) -> &String) -> Value {
    Value::from(rules.iter().map(|r| name(r).clone()).collect::<Vec<_>>())
}

/// Which buckets go where: contiguous `[from, to)` ranges covering all buckets.
fn placement(s: &Snapshot, r: &CompiledRoute) -> Vec<(u32, u32, String)> {
    match &r.action {
        RouteAction::Upstream(u) => vec![(0, BUCKETS, s.upstream_name(*u).to_string())],
        RouteAction::Split(edges) => {
            let mut from = 0;
            let mut out = Vec::new();
            for e in edges {
                if from < e.edge {
                    out.push((from, e.edge, s.upstream_name(e.upstream).to_string()));
                }
                from = e.edge;
            }
            out
        }
    }
}

/// The buckets whose target differs, summed per (from, to), with their ranges.
fn moves_exact(old: &[(u32, u32, String)], new: &[(u32, u32, String)]) -> Vec<Move> {
    let mut by: BTreeMap<(&str, &str), Move> = BTreeMap::new();
    for (of, ot, ou) in old {
        for (nf, nt, nu) in new {
            let (f, t) = ((*of).max(*nf), (*ot).min(*nt));
            if f < t && ou != nu {
                let m = by.entry((ou, nu)).or_insert_with(|| Move {
                    from: ou.clone(),
                    to: nu.clone(),
                    ppm: 0,
                    buckets: Vec::new(),
                    exact: true,
                });
                m.ppm += t - f;
                m.buckets.push((f, t));
            }
        }
    }
    by.into_values().collect()
}

/// With a new salt, a user's old and new buckets are independent: the expected share that
/// goes from `a` to `b` is the product of their shares.
fn moves_expected(old: &[(u32, u32, String)], new: &[(u32, u32, String)]) -> Vec<Move> {
    let share = |p: &[(u32, u32, String)]| {
        let mut m: BTreeMap<String, u64> = BTreeMap::new();
        for (f, t, u) in p {
            *m.entry(u.clone()).or_default() += u64::from(t - f);
        }
        m
    };
    let (o, n) = (share(old), share(new));
    let mut out = Vec::new();
    for (a, wa) in &o {
        for (b, wb) in &n {
            let ppm = (wa * wb / u64::from(BUCKETS)) as u32;
            if a != b && ppm > 0 {
                out.push(Move {
                    from: a.clone(),
                    to: b.clone(),
                    ppm,
                    buckets: Vec::new(),
                    exact: false,
                });
            }
        }
    }
    out
}

// --- fallbacks ---

fn fallbacks(oc: &Config, os: &Snapshot, nc: &Config, ns: &Snapshot) -> Vec<RuleChange> {
    let (of, nf) = (in_force(os), in_force(ns));
    let mut out = named(&oc.fallbacks, &nc.fallbacks, |f| &f.name);
    // Fallbacks a plan brings or takes away show here too: that is what switching a plan
    // does to users.
    for (name, f) in &nf {
        if !out.iter().any(|c| &c.name == name) && !of.contains_key(name) {
            let mut c = RuleChange::new(name, Kind::Added, Vec::new());
            c.notes.push("brought by an active plan".into());
            out.push(c);
        } else if let Some(o) = of.get(name)
            && o.fraction_ppm != f.fraction_ppm
            && !out.iter().any(|c| &c.name == name)
        {
            out.push(RuleChange::new(name, Kind::Changed, Vec::new()));
        }
    }
    for name in of.keys() {
        if !nf.contains_key(name) && !out.iter().any(|c| &c.name == name) {
            let mut c = RuleChange::new(name, Kind::Removed, Vec::new());
            c.notes
                .push("was brought by a plan no longer active".into());
            out.push(c);
        }
    }
    for c in &mut out {
        let old = of.get(&c.name).map(|f| (f.fraction_ppm, &*f.salt));
        let new = nf.get(&c.name).map(|f| (f.fraction_ppm, &*f.salt));
        c.moves = fallback_moves(old, new, &mut c.notes);
    }
    out
}

/// The fallbacks in force (active plans applied), by name.
fn in_force(s: &Snapshot) -> BTreeMap<String, &CompiledFallback> {
    (s.governance.fallbacks.iter())
        .map(|f| (f.name.to_string(), f))
        .collect()
}

/// A fallback degrades the buckets below its fraction: users that cross that edge move
/// between `served` and `degraded`. Absent in a version: nobody degraded.
fn fallback_moves(
    old: Option<(u32, &str)>,
    new: Option<(u32, &str)>,
    notes: &mut Vec<String>,
) -> Vec<Move> {
    let fraction = |x: Option<(u32, &str)>| x.map_or(0, |(f, _)| f);
    let ranges = |f: u32| {
        let mut v = vec![(0, f, "degraded".to_string())];
        v.push((f, BUCKETS, "served".to_string()));
        v.retain(|(a, b, _)| a < b);
        v
    };
    let (o, n) = (ranges(fraction(old)), ranges(fraction(new)));
    match (old, new) {
        (Some((_, a)), Some((_, b))) if a != b => {
            notes.push(format!(
                "salt changed ({a:?} → {b:?}): every user is placed anew; the shares are expected, not exact"
            ));
            moves_expected(&o, &n)
        }
        _ => moves_exact(&o, &n),
    }
}

// --- rendering ---

impl Kind {
    /// `+` added, `-` removed, `~` changed.
    fn sign(self) -> char {
        match self {
            Kind::Added => '+',
            Kind::Removed => '-',
            Kind::Changed => '~',
        }
    }
}

impl RuleChange {
    fn new(name: &str, kind: Kind, fields: Vec<FieldChange>) -> Self {
        Self {
            name: name.to_string(),
            kind,
            fields,
            moves: Vec::new(),
            notes: Vec::new(),
        }
    }
}

impl ConfigDiff {
    /// Whether the two configs are the same.
    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// One line: `routes: ~canary (4.0000% v1 → v2); limits: +total -old`, or
    /// `no rule changes`.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "no rule changes".into();
        }
        let sections: Vec<String> = (self.sections.iter())
            .map(|sec| {
                let changes: Vec<String> = (sec.changes.iter())
                    .map(|c| {
                        let sign = c.kind.sign();
                        let moves: Vec<String> = (c.moves.iter())
                            .map(|m| format!("{} {} → {}", percent(m.ppm), m.from, m.to))
                            .collect();
                        match moves.is_empty() {
                            true => format!("{sign}{}", c.name),
                            false => format!("{sign}{} ({})", c.name, moves.join(", ")),
                        }
                    })
                    .collect();
                format!("{}: {}", sec.name, changes.join(" "))
            })
            .collect();
        sections.join("; ")
    }

    /// The report as text: one block per section, `+` added, `-` removed, `~` changed.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.is_empty() {
            s.push_str("no changes\n");
        }
        for sec in &self.sections {
            let _ = writeln!(s, "{}:", sec.name);
            for c in &sec.changes {
                let sign = c.kind.sign();
                // An added or removed rule is shown whole, on one line.
                let whole = c
                    .fields
                    .iter()
                    .find(|f| f.path.is_empty() && c.kind != Kind::Changed);
                match whole.and_then(|f| f.new.as_ref().or(f.old.as_ref())) {
                    Some(v) => _ = writeln!(s, "  {sign} {} {v}", c.name),
                    None => _ = writeln!(s, "  {sign} {}", c.name),
                }
                for f in &c.fields {
                    if c.kind != Kind::Changed {
                        continue;
                    }
                    let v =
                        |v: &Option<Value>| v.as_ref().map_or("(none)".into(), Value::to_string);
                    let path = if f.path.is_empty() { "(all)" } else { &f.path };
                    let _ = writeln!(s, "      {path}: {} → {}", v(&f.old), v(&f.new));
                }
                for m in &c.moves {
                    let _ = write!(
                        s,
                        "      {} of its users move {} → {}",
                        percent(m.ppm),
                        m.from,
                        m.to
                    );
                    match m.exact {
                        true => {
                            let r: Vec<String> = m
                                .buckets
                                .iter()
                                .map(|(f, t)| format!("[{f}, {t})"))
                                .collect();
                            let _ = writeln!(s, " (buckets {})", r.join(", "));
                        }
                        false => {
                            let _ = writeln!(s, " (expected)");
                        }
                    }
                }
                for n in &c.notes {
                    let _ = writeln!(s, "      note: {n}");
                }
            }
        }
        s
    }
}

/// Parts per million as a percentage with four decimals, exactly.
pub fn percent(ppm: u32) -> String {
    format!("{}.{:04}%", ppm / 10_000, ppm % 10_000)
}

#[cfg(test)]
mod tests;
