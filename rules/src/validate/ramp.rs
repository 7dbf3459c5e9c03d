//! Validation of a route's `ramp`: a target and a neighbouring baseline of its split,
//! increasing steps that fit in the pair's weight, and a guard in range.

use crate::degrade::ratio_ppm;
use crate::error::JsonPath;
use crate::model::{Ramp, Route};
use crate::ramp::CompiledRamp;
use crate::route::RouteAction;

use super::Validator;

/// Steps one ramp may have.
const MAX_STEPS: usize = 32;

impl Validator<'_> {
    /// `r`'s ramp, compiled against its compiled split (`action`, when that compiled);
    /// `None` when it has none or it is faulty (then reported).
    pub(super) fn ramp(
        &mut self,
        rp: &JsonPath,
        r: &Route,
        index: usize,
        action: Option<&RouteAction>,
    ) -> Option<CompiledRamp> {
        let ramp = r.ramp.as_ref()?;
        let p = rp.key("ramp");
        let before = self.issues.len();
        let Some(split) = &r.split else {
            self.err(p, "a ramp needs a `split` (it steps one of its targets)");
            return None;
        };
        let g = &ramp.guard;
        let gp = p.key("guard");
        self.range(p.key("hold_ms"), ramp.hold_ms, 1_000, 86_400_000);
        self.range(gp.key("window_ms"), g.window_ms, 1_000, 3_600_000);
        self.range(gp.key("min_requests"), g.min_requests, 1, 10_000_000);
        self.range(gp.key("p99_margin_ms"), g.p99_margin_ms, 0, 60_000);
        if !(1.0..=100.0).contains(&g.max_p99_ratio) {
            self.err(
                gp.key("max_p99_ratio"),
                format!("{} is out of range; allowed 1.0..=100.0", g.max_p99_ratio),
            );
        }
        let max_error_diff_ppm = ratio_ppm(&g.max_error_ratio_diff)
            .map_err(|e| self.err(gp.key("max_error_ratio_diff"), e))
            .ok();
        if matches!(&ramp.release, Some(s) if s.is_empty() || s.len() > 128) {
            self.err(p.key("release"), "release must be 1 to 128 bytes");
        }
        let slot_of = |name: &str| split.iter().position(|t| t.upstream == name);
        let Some(t) = slot_of(&ramp.target) else {
            let names: Vec<&str> = split.iter().map(|t| t.upstream.as_str()).collect();
            self.err(
                p.key("target"),
                format!(
                    "{:?} is not a target of this split ({})",
                    ramp.target,
                    names.join(", ")
                ),
            );
            return None;
        };
        let b = self.baseline(&p, ramp, split.len(), t, slot_of)?;
        let steps = self.steps(&p, ramp);
        // The split's own problems are reported where it is checked.
        let RouteAction::Split(edges) = action? else {
            return None;
        };
        let written: Vec<u32> = edges.iter().map(|e| e.ppm).collect();
        let pair = written[t] + written[b];
        if let Some(steps) = &steps
            && let Some(i) = steps.iter().position(|&s| s > pair)
        {
            self.err(
                p.key("steps").index(i),
                format!(
                    "{:?} is more than {} and {} have together as written ({}): a step takes its weight from the baseline",
                    ramp.steps[i],
                    ramp.target,
                    split[b].upstream,
                    crate::ramp::percent(pair)
                ),
            );
        }
        if self.reported_since(before) {
            return None;
        }
        Some(CompiledRamp {
            route: r.name.as_str().into(),
            route_index: index as u32,
            target: edges[t].upstream,
            target_name: ramp.target.as_str().into(),
            target_slot: t as u32,
            baseline: edges[b].upstream,
            baseline_name: split[b].upstream.as_str().into(),
            baseline_slot: b as u32,
            release: ramp.release.as_deref().map(Into::into),
            steps: steps?,
            written,
            hold_ms: ramp.hold_ms,
            window_ms: g.window_ms,
            min_requests: g.min_requests,
            max_error_diff_ppm: max_error_diff_ppm?,
            max_p99_ratio: g.max_p99_ratio,
            p99_margin_ms: g.p99_margin_ms,
            on_breach: ramp.on_breach,
            stop: ramp.stop,
            fingerprint: fingerprint(ramp, split),
        })
    }

    /// The baseline's slot: `baseline`, or the target's only neighbour.
    fn baseline(
        &mut self,
        p: &JsonPath,
        ramp: &Ramp,
        len: usize,
        t: usize,
        slot_of: impl Fn(&str) -> Option<usize>,
    ) -> Option<usize> {
        let neighbours: Vec<usize> = [t.checked_sub(1), Some(t + 1).filter(|&n| n < len)]
            .into_iter()
            .flatten()
            .collect();
        match &ramp.baseline {
            None => match neighbours.as_slice() {
                [n] => Some(*n),
                [] => {
                    self.err(
                        p.key("target"),
                        "a ramped split needs a second target, the baseline",
                    );
                    None
                }
                _ => {
                    self.err(
                        p.key("baseline"),
                        format!(
                            "{:?} has a target on each side in the split: name the `baseline`",
                            ramp.target
                        ),
                    );
                    None
                }
            },
            Some(name) => match slot_of(name) {
                Some(b) if neighbours.contains(&b) => Some(b),
                Some(_) => {
                    self.err(
                        p.key("baseline"),
                        format!(
                            "{name:?} is not next to {:?} in the split: a step would move the users of the targets between them",
                            ramp.target
                        ),
                    );
                    None
                }
                None => {
                    self.err(
                        p.key("baseline"),
                        format!("{name:?} is not a target of this split"),
                    );
                    None
                }
            },
        }
    }

    /// The steps in ppm: 1 to [`MAX_STEPS`], strictly increasing.
    fn steps(&mut self, p: &JsonPath, ramp: &Ramp) -> Option<Vec<u32>> {
        if ramp.steps.is_empty() || ramp.steps.len() > MAX_STEPS {
            self.err(
                p.key("steps"),
                format!("{} steps; a ramp needs 1 to {MAX_STEPS}", ramp.steps.len()),
            );
            return None;
        }
        let mut out = Vec::with_capacity(ramp.steps.len());
        for (i, s) in ramp.steps.iter().enumerate() {
            match ratio_ppm(s) {
                Ok(ppm) if out.last().is_some_and(|&l| ppm <= l) => self.err(
                    p.key("steps").index(i),
                    format!("{s:?} is not above the step before: steps only grow the target"),
                ),
                Ok(0) => self.err(
                    p.key("steps").index(i),
                    "a step of 0% sends nothing to judge",
                ),
                Ok(ppm) => out.push(ppm),
                Err(e) => self.err(p.key("steps").index(i), e),
            }
        }
        (out.len() == ramp.steps.len()).then_some(out)
    }
}

/// What identifies a ramp across reloads and restarts: it (without the operator's `stop`)
/// and its split as written.
fn fingerprint(ramp: &Ramp, split: &[crate::model::SplitTarget]) -> u64 {
    let mut r = ramp.clone();
    r.stop = None;
    let json = serde_json::to_vec(&(r, split)).unwrap_or_default();
    xxhash_rust::xxh3::xxh3_64(&json)
}
