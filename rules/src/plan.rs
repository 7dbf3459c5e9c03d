//! Emergency plans: the limits and fallbacks in force once the active plans are applied.
//!
//! A plan's rules replace base rules of the same name (in place, so check order is kept) or
//! join after them; names in its `disable` list are switched off. Validation and compilation
//! both go through [`effective`], so what `tidegate check` judges is exactly what runs.

use std::collections::HashMap;

use crate::error::JsonPath;
use crate::model::{Config, Fallback, Limit};

/// A rule in force, with where it was written.
#[derive(Debug, Clone)]
pub(crate) struct InForce<'c, T> {
    pub(crate) rule: &'c T,
    pub(crate) path: JsonPath,
}

/// The limits and fallbacks in force under some set of plans.
#[derive(Debug)]
pub(crate) struct Effective<'c> {
    pub(crate) limits: Vec<InForce<'c, Limit>>,
    pub(crate) fallbacks: Vec<InForce<'c, Fallback>>,
    /// `(path, message)` of every conflict between the plans: two plans setting or
    /// disabling one rule.
    pub(crate) conflicts: Vec<(JsonPath, String)>,
}

/// Apply `active` plans (names that exist in `c.plans`; others are skipped, validation
/// reports them) to the base rules.
pub(crate) fn effective<'c>(c: &'c Config, active: &[&'c str]) -> Effective<'c> {
    let root = JsonPath::root();
    let mut limits: Vec<Option<InForce<'c, Limit>>> = c
        .limits
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            Some(InForce {
                rule,
                path: root.key("limits").index(i),
            })
        })
        .collect();
    let mut fallbacks: Vec<Option<InForce<'c, Fallback>>> = c
        .fallbacks
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            Some(InForce {
                rule,
                path: root.key("fallbacks").index(i),
            })
        })
        .collect();
    let mut conflicts = Vec::new();
    // Rule name → the plan that touched it first.
    let mut touched: HashMap<(&'static str, &'c str), &'c str> = HashMap::new();
    for &plan_name in active {
        let Some(plan) = c.plans.get(plan_name) else {
            continue;
        };
        let pp = root.key("plans").key(plan_name);
        let mut touch = |kind: &'static str, name: &'c str, path: &JsonPath| {
            if let Some(prev) = touched.insert((kind, name), plan_name)
                && prev != plan_name
            {
                conflicts.push((
                        path.clone(),
                        format!(
                            "plans {prev:?} and {plan_name:?} are both active and both change {kind} {name:?}"
                        ),
                    ));
            }
        };
        for (i, name) in plan.disable.iter().enumerate() {
            let path = pp.key("disable").index(i);
            for slot in limits.iter_mut() {
                if slot.as_ref().is_some_and(|s| s.rule.name == *name) {
                    touch("limit", name, &path);
                    *slot = None;
                }
            }
            for slot in fallbacks.iter_mut() {
                if slot.as_ref().is_some_and(|s| s.rule.name == *name) {
                    touch("fallback", name, &path);
                    *slot = None;
                }
            }
        }
        for (i, rule) in plan.limits.iter().enumerate() {
            let path = pp.key("limits").index(i);
            touch("limit", &rule.name, &path);
            let new = InForce { rule, path };
            match limits
                .iter_mut()
                .find(|s| s.as_ref().is_some_and(|s| s.rule.name == rule.name))
            {
                Some(slot) => *slot = Some(new),
                None => limits.push(Some(new)),
            }
        }
        for (i, rule) in plan.fallbacks.iter().enumerate() {
            let path = pp.key("fallbacks").index(i);
            touch("fallback", &rule.name, &path);
            let new = InForce { rule, path };
            match fallbacks
                .iter_mut()
                .find(|s| s.as_ref().is_some_and(|s| s.rule.name == rule.name))
            {
                Some(slot) => *slot = Some(new),
                None => fallbacks.push(Some(new)),
            }
        }
    }
    Effective {
        limits: limits.into_iter().flatten().collect(),
        fallbacks: fallbacks.into_iter().flatten().collect(),
        conflicts,
    }
}

/// The active plans of a config, as `&str`.
pub(crate) fn active(c: &Config) -> Vec<&str> {
    c.active_plans.iter().map(String::as_str).collect()
}
