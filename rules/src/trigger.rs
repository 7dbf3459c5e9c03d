//! Plans that switch themselves on: compiled triggers and the controller that runs them.
//!
//! The controller is a pure state machine. Once per window (one second of the gateway's
//! figures, closed by the proxy's sampler) it is handed that window's [`Window`] figures and
//! its end time; it says which plans its triggers switch on or off and why. It reads no
//! clock and keeps its state by plan name, so it survives a reload (a plan whose trigger is
//! edited keeps its state). What is in force is then [`in_force`]: the plans of
//! `active_plans` (manual, always on) and the auto-active ones.

use std::collections::BTreeMap;

use crate::ids::{InterfaceId, UpstreamId};

/// A plan's trigger, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledTrigger {
    /// The plan it switches.
    pub plan: Box<str>,
    /// `auto`: whether it may switch the plan on.
    pub auto: bool,
    /// Any one holding is enough.
    pub when: Vec<CompiledCondition>,
    /// How long a condition must hold before the plan goes on, in milliseconds.
    pub for_ms: u64,
    /// How long no condition may hold before the plan goes off, in milliseconds.
    pub release_for_ms: u64,
    /// Requests a window must hold for a condition over it to hold.
    pub min_requests: u64,
}

/// One condition, compiled: a measure and its threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledCondition {
    /// What is measured.
    pub measure: Measure,
    /// The interface or upstream name (for the log and the dashboard); empty for the
    /// admission level.
    pub subject: Box<str>,
}

/// What a condition measures, with its threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measure {
    /// Errors over (ok + errors) of an interface, above this many parts per million.
    ErrorRatio(InterfaceId, u32),
    /// Limited over all requests of an interface, above this many ppm.
    LimitedRatio(InterfaceId, u32),
    /// Shed over all requests of an interface, above this many ppm.
    ShedRatio(InterfaceId, u32),
    /// The upstream's p99 time to the response head, above this many milliseconds.
    UpstreamP99(UpstreamId, u64),
    /// The admission level at the end of the window, above this.
    AdmissionLevel(u32),
}

/// One interface's requests in a window, by what became of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterfaceFigures {
    /// Answered by the upstream below 500.
    pub ok: u64,
    /// 5xx from the upstream, or a gateway error.
    pub error: u64,
    /// Refused by a rate limit.
    pub limited: u64,
    /// Shed by overload protection.
    pub shed: u64,
    /// Answered by a fallback or an open breaker.
    pub degraded: u64,
}

/// One upstream's calls in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UpstreamFigures {
    /// Calls answered or failed.
    pub calls: u64,
    /// Their 99th percentile time to the response head, in milliseconds.
    pub p99_ms: Option<f64>,
}

/// The gateway's figures over one window, indexed like the snapshot whose triggers judge
/// them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    /// Start of the window (ms, any fixed origin).
    pub start_ms: u64,
    /// End of the window, same origin.
    pub end_ms: u64,
    /// By [`InterfaceId`].
    pub interfaces: Vec<InterfaceFigures>,
    /// By [`UpstreamId`].
    pub upstreams: Vec<UpstreamFigures>,
    /// The admission level at the end of the window (0 without overload admission).
    pub admission_level: u32,
    /// The ramped splits' figures, by route (for the ramps' guards).
    pub ramps: Vec<crate::ramp::RampFigures>,
}

/// A plan switched on or off by its trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The plan.
    pub plan: Box<str>,
    /// On (`true`) or off.
    pub on: bool,
    /// The figures that caused it: the condition that held, with its value, or that none
    /// held since when.
    pub reason: String,
}

/// What one plan's trigger has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanState {
    /// Switched on by its trigger.
    pub active: bool,
    /// When the current change of state happened (ms), if it happened.
    pub since_ms: Option<u64>,
    /// Why (the reason of the last [`Change`]).
    pub reason: Option<String>,
    /// Start of the first window of the current run of windows in which a condition held.
    holding_since: Option<u64>,
    /// Start of the first window of the current run of windows in which none held.
    recovered_since: Option<u64>,
}

/// The auto-active plans and what each trigger has seen, by plan name.
#[derive(Debug, Clone, Default)]
pub struct Controller {
    states: BTreeMap<Box<str>, PlanState>,
}

/// Why a plan is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Listed in `active_plans`.
    Manual,
    /// Switched on by its trigger.
    Auto,
}

// === impl InterfaceFigures ===

impl InterfaceFigures {
    /// Every request answered in the window, however.
    fn answered(&self) -> u64 {
        self.ok + self.error + self.limited + self.shed + self.degraded
    }
}

// === impl Measure ===

impl Measure {
    /// The measured value as written in a log (`"42.0%"`, `"310 ms"`, `"level 12"`), and
    /// whether it is above the threshold, or `None` when the window holds too few requests
    /// to judge.
    fn judge(&self, w: &Window, min_requests: u64) -> Option<(String, bool)> {
        let iface = |i: InterfaceId| w.interfaces.get(i.0 as usize).copied().unwrap_or_default();
        let ratio = |part: u64, whole: u64, ppm: u32| {
            (whole >= min_requests && whole > 0).then(|| {
                let r = part as f64 / whole as f64;
                (
                    format!("{:.1}% of {whole}", r * 100.0),
                    part * 1_000_000 > u64::from(ppm) * whole,
                )
            })
        };
        match *self {
            Measure::ErrorRatio(i, ppm) => {
                let f = iface(i);
                ratio(f.error, f.ok + f.error, ppm)
            }
            Measure::LimitedRatio(i, ppm) => {
                let f = iface(i);
                ratio(f.limited, f.answered(), ppm)
            }
            Measure::ShedRatio(i, ppm) => {
                let f = iface(i);
                ratio(f.shed, f.answered(), ppm)
            }
            Measure::UpstreamP99(u, ms) => {
                let f = w.upstreams.get(u.0 as usize).copied().unwrap_or_default();
                let p99 = f.p99_ms.filter(|_| f.calls >= min_requests)?;
                Some((
                    format!("{p99:.1} ms over {} calls", f.calls),
                    p99 > ms as f64,
                ))
            }
            Measure::AdmissionLevel(l) => Some((
                format!("level {}", w.admission_level),
                w.admission_level > l,
            )),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Measure::ErrorRatio(..) => "error_ratio",
            Measure::LimitedRatio(..) => "limited_ratio",
            Measure::ShedRatio(..) => "shed_ratio",
            Measure::UpstreamP99(..) => "p99_ms",
            Measure::AdmissionLevel(..) => "admission_level",
        }
    }

    fn threshold(&self) -> String {
        let pct = |ppm: u32| format!("{}%", f64::from(ppm) / 10_000.0);
        match *self {
            Measure::ErrorRatio(_, p) | Measure::LimitedRatio(_, p) | Measure::ShedRatio(_, p) => {
                pct(p)
            }
            Measure::UpstreamP99(_, ms) => format!("{ms} ms"),
            Measure::AdmissionLevel(l) => format!("level {l}"),
        }
    }
}

// === impl CompiledTrigger ===

impl CompiledTrigger {
    /// The first condition that holds over `w`, described with its figures.
    fn holding(&self, w: &Window) -> Option<String> {
        self.when.iter().find_map(|c| {
            let (value, above) = c.measure.judge(w, self.min_requests)?;
            above.then(|| {
                let of = if c.subject.is_empty() {
                    String::new()
                } else {
                    format!(" of {}", c.subject)
                };
                format!(
                    "{}{of} {value} above {}",
                    c.measure.name(),
                    c.measure.threshold()
                )
            })
        })
    }
}

// === impl Controller ===

impl Controller {
    /// Judge one window with the triggers in force and return the plans switched on or off.
    ///
    /// A condition holds in a window when its measure is above its threshold and the window
    /// holds at least `min_requests` (a window with fewer does not hold). A plan goes on once
    /// some condition has held in every window since a window that started at least
    /// `for_ms` before `w.end_ms`, and off once none has held for `release_for_ms`: one good
    /// window in a bad spell restarts the release count, one bad window in a good spell the
    /// sustain count. Plans with no trigger, or `auto: false`, are dropped (and released if
    /// they were on).
    pub fn step(&mut self, triggers: &[CompiledTrigger], w: &Window) -> Vec<Change> {
        let mut changes = Vec::new();
        let keep: Vec<&str> = triggers
            .iter()
            .filter(|t| t.auto)
            .map(|t| &*t.plan)
            .collect();
        self.states.retain(|plan, st| {
            let kept = keep.contains(&&**plan);
            if !kept && st.active {
                changes.push(Change {
                    plan: plan.clone(),
                    on: false,
                    reason: "its trigger was removed or set to auto: false".to_owned(),
                });
            }
            kept
        });
        for t in triggers.iter().filter(|t| t.auto) {
            let st = self.states.entry(t.plan.clone()).or_default();
            match t.holding(w) {
                Some(why) => {
                    st.recovered_since = None;
                    let since = *st.holding_since.get_or_insert(w.start_ms);
                    if !st.active && w.end_ms.saturating_sub(since) >= t.for_ms {
                        let reason =
                            format!("{why}, held for {} ms", w.end_ms.saturating_sub(since));
                        st.active = true;
                        st.since_ms = Some(w.end_ms);
                        st.reason = Some(reason.clone());
                        changes.push(Change {
                            plan: t.plan.clone(),
                            on: true,
                            reason,
                        });
                    }
                }
                None => {
                    st.holding_since = None;
                    let since = *st.recovered_since.get_or_insert(w.start_ms);
                    if st.active && w.end_ms.saturating_sub(since) >= t.release_for_ms {
                        let reason = format!(
                            "no condition held for {} ms",
                            w.end_ms.saturating_sub(since)
                        );
                        st.active = false;
                        st.since_ms = Some(w.end_ms);
                        st.reason = Some(reason.clone());
                        changes.push(Change {
                            plan: t.plan.clone(),
                            on: false,
                            reason,
                        });
                    }
                }
            }
        }
        changes
    }

    /// The plans switched on by their triggers, by name.
    pub fn active(&self) -> Vec<Box<str>> {
        (self.states.iter())
            .filter(|(_, s)| s.active)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// What the trigger of `plan` has seen, if it has one in force.
    pub fn state(&self, plan: &str) -> Option<&PlanState> {
        self.states.get(plan)
    }
}

/// The plans in force and why: those of `active_plans` first (manual always wins: a plan
/// listed there is on whatever its trigger says), then the auto-active ones not listed
/// there.
pub fn in_force<'a>(manual: &'a [String], auto: &'a [Box<str>]) -> Vec<(&'a str, Cause)> {
    let mut out: Vec<(&str, Cause)> = manual.iter().map(|m| (m.as_str(), Cause::Manual)).collect();
    for a in auto {
        if !manual.iter().any(|m| m == &**a) {
            out.push((a, Cause::Auto));
        }
    }
    out
}

#[cfg(test)]
mod tests;
