//! Validation of plan triggers: each condition names exactly one measure, over the subject
//! that measure needs, with a threshold in range.

use std::collections::HashSet;

use crate::degrade::ratio_ppm;
use crate::error::JsonPath;
use crate::model::{Condition, Config, Trigger};
use crate::trigger::{CompiledCondition, CompiledTrigger, Measure};

use super::Validator;

/// Conditions one trigger may have.
const MAX_CONDITIONS: usize = 32;

impl Validator<'_> {
    /// Every plan's trigger, compiled (those with a problem left out, each reported).
    pub(super) fn triggers(
        &mut self,
        c: &Config,
        interfaces: &HashSet<String>,
    ) -> Vec<CompiledTrigger> {
        let mut out = Vec::new();
        for (name, plan) in &c.plans {
            let pp = JsonPath::root().key("plans").key(name.clone());
            let Some(t) = &plan.trigger else {
                if plan.auto == Some(true) {
                    self.err(pp.key("auto"), "`auto: true` needs a `trigger`");
                }
                continue;
            };
            if let Some(t) = self.trigger(c, pp.key("trigger"), name, t, interfaces) {
                out.push(CompiledTrigger {
                    auto: plan.auto.unwrap_or(true),
                    ..t
                });
            }
        }
        out
    }

    fn trigger(
        &mut self,
        c: &Config,
        tp: JsonPath,
        plan: &str,
        t: &Trigger,
        interfaces: &HashSet<String>,
    ) -> Option<CompiledTrigger> {
        let before = self.issues.len();
        self.range(tp.key("for_ms"), t.for_ms, 0, 3_600_000);
        self.range(tp.key("release_for_ms"), t.release_for_ms, 0, 86_400_000);
        self.range(tp.key("min_requests"), t.min_requests.into(), 1, 1_000_000);
        if t.when.is_empty() || t.when.len() > MAX_CONDITIONS {
            self.err(
                tp.key("when"),
                format!(
                    "{} conditions; a trigger needs 1 to {MAX_CONDITIONS}",
                    t.when.len()
                ),
            );
        }
        let when: Vec<CompiledCondition> = (t.when.iter().enumerate())
            .filter_map(|(i, cond)| self.condition(c, tp.key("when").index(i), cond, interfaces))
            .collect();
        (!self.reported_since(before)).then(|| CompiledTrigger {
            plan: plan.into(),
            auto: true,
            when,
            for_ms: t.for_ms,
            release_for_ms: t.release_for_ms,
            min_requests: t.min_requests.into(),
        })
    }

    fn condition(
        &mut self,
        c: &Config,
        p: JsonPath,
        cond: &Condition,
        interfaces: &HashSet<String>,
    ) -> Option<CompiledCondition> {
        let ratios = [
            ("error_ratio_above", &cond.error_ratio_above),
            ("limited_ratio_above", &cond.limited_ratio_above),
            ("shed_ratio_above", &cond.shed_ratio_above),
        ];
        let mut given: Vec<&str> = ratios
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| *k)
            .collect();
        if cond.p99_ms_above.is_some() {
            given.push("p99_ms_above");
        }
        if cond.admission_level_above.is_some() {
            given.push("admission_level_above");
        }
        const ALL: &str = "`error_ratio_above`, `limited_ratio_above`, `shed_ratio_above` (with `interface`), `p99_ms_above` (with `upstream`) or `admission_level_above`";
        let &[measure] = given.as_slice() else {
            let got = match given.len() {
                0 => "none".to_owned(),
                _ => given.join(", "),
            };
            self.err(
                p,
                format!("a condition needs exactly one measure of {ALL}; got {got}"),
            );
            return None;
        };
        let needs = match measure {
            "p99_ms_above" => "upstream",
            "admission_level_above" => "",
            _ => "interface",
        };
        if needs != "interface" && cond.interface.is_some() {
            self.err(
                p.key("interface"),
                format!("`{measure}` does not take an interface"),
            );
        }
        if needs != "upstream" && cond.upstream.is_some() {
            self.err(
                p.key("upstream"),
                format!("`{measure}` does not take an upstream"),
            );
        }
        match measure {
            "p99_ms_above" => {
                let ms = cond.p99_ms_above.unwrap_or_default();
                self.range(p.key(measure), ms, 1, 3_600_000);
                let Some(name) = &cond.upstream else {
                    self.err(p, "`p99_ms_above` needs an `upstream`");
                    return None;
                };
                let id = self.upstream_ref(c, p.key("upstream"), name)?;
                Some(CompiledCondition {
                    measure: Measure::UpstreamP99(id, ms),
                    subject: name.as_str().into(),
                })
            }
            "admission_level_above" => {
                let l = cond.admission_level_above.unwrap_or_default();
                self.range(p.key(measure), l.into(), 0, 1_000_000);
                Some(CompiledCondition {
                    measure: Measure::AdmissionLevel(l),
                    subject: "".into(),
                })
            }
            _ => {
                let text = (ratios.iter())
                    .find(|(k, _)| *k == measure)
                    .and_then(|(_, v)| v.as_deref())
                    .unwrap_or_default();
                let ppm = match ratio_ppm(text) {
                    Ok(ppm) => Some(ppm),
                    Err(e) => {
                        self.err(p.key(measure), e);
                        None
                    }
                };
                let Some(name) = &cond.interface else {
                    self.err(p, format!("`{measure}` needs an `interface`"));
                    return None;
                };
                let id = self.interface_ref(p.key("interface"), name, interfaces)?;
                let ppm = ppm?;
                let measure = match measure {
                    "error_ratio_above" => Measure::ErrorRatio(id, ppm),
                    "limited_ratio_above" => Measure::LimitedRatio(id, ppm),
                    _ => Measure::ShedRatio(id, ppm),
                };
                Some(CompiledCondition {
                    measure,
                    subject: name.as_str().into(),
                })
            }
        }
    }
}
