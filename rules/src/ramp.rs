//! Guarded canary ramps: compiled ramps and the controller that steps them.
//!
//! The controller is a pure state machine, like the plans' [`crate::trigger`] controller.
//! Once per second the proxy hands it each ramp's figures (requests, errors and latencies of
//! the target and of the baseline, for requests the route sent to them) and the window's end
//! time; it accumulates them into judging windows of `window_ms`, judges each full window
//! (one with `min_requests` on both sides), and says which ramps advanced, completed, held
//! or rolled back, and why. It reads no clock and keeps its state by route name, with the
//! ramp's fingerprint, so a reload that leaves a ramp as written keeps its step and any
//! edit starts it again. What weight a ramp gives its target is [`Controller::weights`];
//! [`effective`] writes those weights into a config, which is then compiled as any other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hist::{LAT_BUCKETS, lat_bucket, quantile_ms};
use crate::ids::UpstreamId;
use crate::model::{Config, OnBreach, Stop};

/// How far short of a window's or a hold's length the fed windows may fall and still
/// count as covering it. The proxy feeds one window per second, each ending when its timer
/// fires, a few milliseconds either side of the second: without the slack, a 1000 ms
/// window ending 999 ms after the last would wait one more second.
pub const TICK_SLACK_MS: u64 = 100;

/// A ramp, compiled from a route's `ramp` and `split`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRamp {
    /// The route rule.
    pub route: Box<str>,
    /// Its index in the config's (and the snapshot's) routes.
    pub route_index: u32,
    /// The target ramped, and its place in the split.
    pub target: UpstreamId,
    /// The target's name.
    pub target_name: Box<str>,
    /// Index of the target in the split.
    pub target_slot: u32,
    /// The baseline it is compared with and takes its weight from.
    pub baseline: UpstreamId,
    /// The baseline's name.
    pub baseline_name: Box<str>,
    /// Index of the baseline in the split (next to the target's).
    pub baseline_slot: u32,
    /// What is released, as written.
    pub release: Option<Box<str>>,
    /// The target's weights, in ppm, strictly increasing.
    pub steps: Vec<u32>,
    /// Every split target's weight as written, in ppm (`"rest"` resolved).
    pub written: Vec<u32>,
    /// How long a step holds, in milliseconds.
    pub hold_ms: u64,
    /// Length of a judging window, in milliseconds.
    pub window_ms: u64,
    /// Requests each side needs in a window before it is judged.
    pub min_requests: u64,
    /// Largest error ratio excess of the target over the baseline, in ppm.
    pub max_error_diff_ppm: u32,
    /// Largest p99 ratio of the target over the baseline.
    pub max_p99_ratio: f64,
    /// A p99 excess up to this never breaches.
    pub p99_margin_ms: u64,
    /// What a breach does.
    pub on_breach: OnBreach,
    /// The operator's brake.
    pub stop: Option<Stop>,
    /// Hash of the ramp (without `stop`) and of its split as written: a different one is an
    /// edit, which starts the ramp again.
    pub fingerprint: u64,
}

/// A latency histogram over [`crate::hist`]'s buckets.
#[derive(Clone, PartialEq, Eq)]
pub struct Hist(pub [u64; LAT_BUCKETS]);

/// Requests a route sent to one target in a window, and how they went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetFigures {
    /// Answered by the target or failed calling it.
    pub requests: u64,
    /// Of which 5xx from it, or the gateway's errors calling it.
    pub errors: u64,
    /// Their times to the response head.
    pub latency: Hist,
}

/// One ramp's figures over a window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RampFigures {
    /// The route rule.
    pub route: Box<str>,
    /// The ramped target's.
    pub target: TargetFigures,
    /// The baseline's.
    pub baseline: TargetFigures,
}

/// Where a ramp is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// At a step, being judged; advances when the step has held.
    Stepping,
    /// Stopped at its step after a breach (`on_breach: hold`).
    Held,
    /// The target's weight is 0 (a breach, or `stop: rollback`).
    RolledBack,
    /// At its last step, which held.
    Done,
}

/// What a judged window found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Within the guard.
    Pass,
    /// Outside it.
    Breach,
    /// Too few requests to judge yet (the window goes on).
    Waiting,
}

/// One side's figures over a judged window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Requests answered or failed.
    pub requests: u64,
    /// Errors among them.
    pub errors: u64,
    /// Their p99 time to the response head, in milliseconds.
    pub p99_ms: Option<f64>,
}

/// The last verdict on a ramp, with its figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// When (the end of the window, ms).
    pub at_ms: u64,
    /// What it found.
    pub outcome: Outcome,
    /// The target's figures.
    pub target: Summary,
    /// The baseline's figures.
    pub baseline: Summary,
    /// In words: `"error ratio 12.50% vs 0.10% (+12.40%, allowed +1%)"`.
    pub detail: String,
}

/// What a ramp has done, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RampState {
    /// Fingerprint of the ramp this state belongs to.
    pub fingerprint: u64,
    /// Index of the current step.
    pub step: usize,
    /// Where it is.
    pub phase: Phase,
    /// When the current step or phase began (ms).
    pub since_ms: u64,
    /// Why it is where it is: the last transition, in words.
    pub reason: String,
    /// The last verdict.
    pub verdict: Option<Verdict>,
    /// The baseline's figures in the last window judged with requests on both sides: what a
    /// step that leaves the baseline no weight is judged against.
    #[serde(default)]
    pub reference: Option<Summary>,
    /// The figures of the window being accumulated.
    #[serde(skip)]
    acc: Acc,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Acc {
    start_ms: u64,
    target: TargetFigures,
    baseline: TargetFigures,
}

/// What changed for a ramp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A new ramp took its first step.
    Started,
    /// An edited ramp started again from its first step.
    Restarted,
    /// A recorded state was taken up after a restart.
    Resumed,
    /// It moved to its next step.
    Advanced,
    /// Its last step held.
    Completed,
    /// A breach (`on_breach: hold`) stopped it at its step.
    Held,
    /// Its target went to weight 0.
    RolledBack,
}

/// A ramp's change, for the log, metrics and the state file.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The route rule.
    pub route: Box<str>,
    /// What happened.
    pub kind: EventKind,
    /// The target's weight before, in ppm.
    pub from_ppm: u32,
    /// And after.
    pub to_ppm: u32,
    /// Why, with the figures.
    pub reason: String,
}

/// The state of every ramp, by route name.
#[derive(Debug, Clone, Default)]
pub struct Controller {
    states: BTreeMap<Box<str>, RampState>,
}

/// What is kept on disk: each ramp's state, by route name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// By route name.
    pub ramps: BTreeMap<String, RampState>,
}

// === impl Hist ===

impl Default for Hist {
    fn default() -> Self {
        Self([0; LAT_BUCKETS])
    }
}

impl std::fmt::Debug for Hist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hist({} samples)", self.0.iter().sum::<u64>())
    }
}

impl Hist {
    /// Count one time, in microseconds.
    pub fn observe_us(&mut self, us: u64) {
        self.0[lat_bucket(us)] += 1;
    }

    fn add(&mut self, other: &Hist) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }
}

// === impl TargetFigures ===

impl TargetFigures {
    fn add(&mut self, other: &TargetFigures) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency.add(&other.latency);
    }

    fn summary(&self) -> Summary {
        Summary {
            requests: self.requests,
            errors: self.errors,
            p99_ms: quantile_ms(&self.latency.0, 0.99),
        }
    }
}

// === impl CompiledRamp ===

impl CompiledRamp {
    /// The target's weight at `state` (0 once rolled back).
    fn weight(&self, state: &RampState) -> u32 {
        match state.phase {
            Phase::RolledBack => 0,
            _ => self.steps[state.step.min(self.steps.len() - 1)],
        }
    }

    /// The baseline's weight at `state`: what of the pair the target leaves it.
    fn baseline_weight(&self, state: &RampState) -> u32 {
        let pair =
            self.written[self.target_slot as usize] + self.written[self.baseline_slot as usize];
        pair.saturating_sub(self.weight(state))
    }

    /// Judge a full window: the verdict, and whether it breaches.
    fn judge(&self, ts: Summary, bs: Summary, at_ms: u64) -> Verdict {
        let ratio = |f: &Summary| f.errors as f64 / f.requests.max(1) as f64;
        let pct = |r: f64| format!("{:.2}%", r * 100.0);
        // Integer comparison of t.errors/t.requests - b.errors/b.requests > max/1e6.
        let (te, tr) = (u128::from(ts.errors), u128::from(ts.requests.max(1)));
        let (be, br) = (u128::from(bs.errors), u128::from(bs.requests.max(1)));
        let lhs = (te * br) * 1_000_000;
        let rhs = (be * tr) * 1_000_000 + u128::from(self.max_error_diff_ppm) * tr * br;
        let error_breach = lhs > rhs;
        let allowed = format!("+{}%", f64::from(self.max_error_diff_ppm) / 10_000.0);
        let mut detail = format!(
            "error ratio {} vs {} (allowed {allowed})",
            pct(ratio(&ts)),
            pct(ratio(&bs))
        );
        let p99_breach = match (ts.p99_ms, bs.p99_ms) {
            (Some(tp), Some(bp)) => {
                let breach = tp > bp * self.max_p99_ratio && tp - bp > self.p99_margin_ms as f64;
                detail.push_str(&format!(
                    ", p99 {tp:.1} ms vs {bp:.1} ms (allowed ×{})",
                    self.max_p99_ratio
                ));
                breach
            }
            _ => false,
        };
        Verdict {
            at_ms,
            outcome: if error_breach || p99_breach {
                Outcome::Breach
            } else {
                Outcome::Pass
            },
            target: ts,
            baseline: bs,
            detail,
        }
    }
}

/// A weight in ppm as a percentage (`"0.01%"`, `"5%"`).
pub fn percent(ppm: u32) -> String {
    let s = format!("{}.{:04}", ppm / 10_000, ppm % 10_000);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

// === impl RampState ===

impl RampState {
    fn new(r: &CompiledRamp, now_ms: u64, reason: String) -> Self {
        Self {
            fingerprint: r.fingerprint,
            step: 0,
            phase: Phase::Stepping,
            since_ms: now_ms,
            reason,
            verdict: None,
            reference: None,
            acc: Acc {
                start_ms: now_ms,
                ..Acc::default()
            },
        }
    }

    fn restart_window(&mut self, now_ms: u64) {
        self.acc = Acc {
            start_ms: now_ms,
            ..Acc::default()
        };
    }
}

// === impl Controller ===

impl Controller {
    /// A controller that takes up `saved` (a state file) for the ramps that are as they
    /// were when it was written: each resumes at its recorded step and phase, its hold
    /// starting again at `now_ms`. A ramp whose record is of another fingerprint (edited
    /// while the gateway was down) starts at its first step; one without a record starts
    /// there at the next [`Controller::reconcile`].
    pub fn restore(saved: Saved, ramps: &[CompiledRamp], now_ms: u64) -> (Self, Vec<Event>) {
        let mut c = Self::default();
        let mut events = Vec::new();
        for r in ramps {
            let Some(mut st) = saved.ramps.get(&*r.route).cloned() else {
                continue;
            };
            if st.fingerprint != r.fingerprint || st.step >= r.steps.len() {
                let new = RampState::new(
                    r,
                    now_ms,
                    "edited since its state was recorded: first step".to_owned(),
                );
                events.push(Event {
                    route: r.route.clone(),
                    kind: EventKind::Restarted,
                    from_ppm: r.written[r.target_slot as usize],
                    to_ppm: r.weight(&new),
                    reason: new.reason.clone(),
                });
                c.states.insert(r.route.clone(), new);
                continue;
            }
            st.since_ms = now_ms;
            st.restart_window(now_ms);
            let w = r.weight(&st);
            st.reason = format!(
                "resumed from the state file: step {} of {} ({}), {:?}",
                st.step + 1,
                r.steps.len(),
                percent(w),
                st.phase
            );
            events.push(Event {
                route: r.route.clone(),
                kind: EventKind::Resumed,
                from_ppm: r.written[r.target_slot as usize],
                to_ppm: w,
                reason: st.reason.clone(),
            });
            c.states.insert(r.route.clone(), st);
        }
        (c, events)
    }

    /// Bring the states in line with `ramps` at `now_ms`: a new ramp starts at its first
    /// step, an edited one (another fingerprint) starts again, `stop: rollback` rolls back,
    /// and the states of ramps no longer written are dropped.
    pub fn reconcile(&mut self, ramps: &[CompiledRamp], now_ms: u64) -> Vec<Event> {
        self.states
            .retain(|route, _| ramps.iter().any(|r| r.route == *route));
        let mut events = Vec::new();
        for r in ramps {
            let existing = (self.states.get(&r.route))
                .map(|st| (st.fingerprint == r.fingerprint, r.weight(st)));
            let start = match existing {
                Some((true, _)) => None,
                Some((false, w)) => {
                    Some((EventKind::Restarted, w, "the ramp or its split was edited"))
                }
                None => Some((
                    EventKind::Started,
                    r.written[r.target_slot as usize],
                    "a new ramp",
                )),
            };
            if let Some((kind, from_ppm, why)) = start {
                let st = RampState::new(r, now_ms, format!("{why}: first step"));
                events.push(Event {
                    route: r.route.clone(),
                    kind,
                    from_ppm,
                    to_ppm: r.weight(&st),
                    reason: st.reason.clone(),
                });
                self.states.insert(r.route.clone(), st);
            }
            let st = self.states.get_mut(&r.route).expect("just ensured");
            if r.stop == Some(Stop::Rollback) && st.phase != Phase::RolledBack {
                let from = r.weight(st);
                st.phase = Phase::RolledBack;
                st.since_ms = now_ms;
                st.reason = "stop: rollback".to_owned();
                events.push(Event {
                    route: r.route.clone(),
                    kind: EventKind::RolledBack,
                    from_ppm: from,
                    to_ppm: 0,
                    reason: st.reason.clone(),
                });
            }
        }
        events
    }

    /// The target weight (ppm) each of `ramps` has now, in order; a ramp the controller has
    /// no state for (or an edited one) has its first step's, as after
    /// [`Controller::reconcile`].
    pub fn weights(&self, ramps: &[CompiledRamp]) -> Vec<u32> {
        ramps
            .iter()
            .map(|r| {
                if r.stop == Some(Stop::Rollback) {
                    return 0;
                }
                match self.states.get(&r.route) {
                    Some(st) if st.fingerprint == r.fingerprint => r.weight(st),
                    _ => r.steps[0],
                }
            })
            .collect()
    }

    /// Take one window of figures (ending at `end_ms`) and judge the ramps whose judging
    /// window is full. `may_advance` is false during a change freeze: a passing window
    /// then advances nothing (a breach still acts).
    ///
    /// A judging window is full once it spans `window_ms` and both sides have at least
    /// `min_requests`; until then it goes on (the verdict says it is waiting). A full
    /// window is judged and a new one begins. A breach rolls back (or holds); a pass
    /// advances once the step has held `hold_ms`, unless `stop: hold` or `may_advance` is
    /// false; passing the last step completes the ramp.
    pub fn step(
        &mut self,
        ramps: &[CompiledRamp],
        figures: &[RampFigures],
        end_ms: u64,
        may_advance: bool,
    ) -> Vec<Event> {
        let mut events = self.reconcile(ramps, end_ms);
        for r in ramps {
            let Some(st) = self.states.get_mut(&r.route) else {
                continue;
            };
            if st.phase != Phase::Stepping {
                continue;
            }
            if let Some(f) = figures.iter().find(|f| f.route == r.route) {
                st.acc.target.add(&f.target);
                st.acc.baseline.add(&f.baseline);
            }
            if end_ms.saturating_sub(st.acc.start_ms) + TICK_SLACK_MS < r.window_ms {
                continue;
            }
            let (t, b) = (st.acc.target.summary(), st.acc.baseline.summary());
            // A step that leaves the baseline no weight is judged against the baseline's
            // last judged window (before this step), as it gets no requests to compare.
            let alone = r.baseline_weight(st) == 0;
            let b = match (alone, st.reference) {
                (true, Some(reference)) => reference,
                _ => b,
            };
            if t.requests < r.min_requests || (!alone && b.requests < r.min_requests) {
                st.verdict = Some(Verdict {
                    at_ms: end_ms,
                    outcome: Outcome::Waiting,
                    target: t,
                    baseline: b,
                    detail: format!(
                        "waiting for {} requests each: target {}, baseline {}",
                        r.min_requests, t.requests, b.requests
                    ),
                });
                continue;
            }
            let mut verdict = r.judge(t, b, end_ms);
            if alone {
                verdict
                    .detail
                    .push_str(" (baseline: its last window with requests)");
            } else {
                st.reference = Some(b);
            }
            st.restart_window(end_ms);
            let from = r.weight(st);
            let event = |kind, to_ppm, reason: String| Event {
                route: r.route.clone(),
                kind,
                from_ppm: from,
                to_ppm,
                reason,
            };
            let step_no = format!(
                "step {} of {} ({})",
                st.step + 1,
                r.steps.len(),
                percent(from)
            );
            if verdict.outcome == Outcome::Breach {
                let (phase, kind, to, what) = match r.on_breach {
                    OnBreach::Rollback => {
                        (Phase::RolledBack, EventKind::RolledBack, 0, "rolled back")
                    }
                    OnBreach::Hold => (Phase::Held, EventKind::Held, from, "held"),
                };
                st.phase = phase;
                st.since_ms = end_ms;
                st.reason = format!("guard breached at {step_no}: {}; {what}", verdict.detail);
                events.push(event(kind, to, st.reason.clone()));
            } else if may_advance
                && r.stop.is_none()
                && end_ms.saturating_sub(st.since_ms) + TICK_SLACK_MS >= r.hold_ms
            {
                let held = end_ms.saturating_sub(st.since_ms);
                if st.step + 1 < r.steps.len() {
                    st.step += 1;
                    st.since_ms = end_ms;
                    let to = r.weight(st);
                    st.reason = format!("{step_no} held {held} ms: {}", verdict.detail);
                    events.push(event(EventKind::Advanced, to, st.reason.clone()));
                } else {
                    st.phase = Phase::Done;
                    st.since_ms = end_ms;
                    st.reason = format!("last {step_no} held {held} ms: {}", verdict.detail);
                    events.push(event(EventKind::Completed, from, st.reason.clone()));
                }
            }
            st.verdict = Some(verdict);
        }
        events
    }

    /// The state of the ramp on `route`, if it has one.
    pub fn state(&self, route: &str) -> Option<&RampState> {
        self.states.get(route)
    }

    /// Every state, for the state file.
    pub fn save(&self) -> Saved {
        Saved {
            ramps: (self.states.iter())
                .map(|(r, s)| (r.to_string(), s.clone()))
                .collect(),
        }
    }
}

/// `config` with each ramp's target at its weight in `weights` (ppm, as from
/// [`Controller::weights`]) and its baseline at the rest of the two targets' written
/// weights. Every target of a ramped split is written as `weight_ppm`; the ranges of the
/// targets before and after the pair do not move. `None` when every weight is as written.
pub fn effective(config: &Config, ramps: &[CompiledRamp], weights: &[u32]) -> Option<Config> {
    let changed = ramps
        .iter()
        .zip(weights)
        .any(|(r, &w)| r.written[r.target_slot as usize] != w);
    if !changed {
        return None;
    }
    let mut c = config.clone();
    for (r, &w) in ramps.iter().zip(weights) {
        let (t, b) = (r.target_slot as usize, r.baseline_slot as usize);
        let pair = r.written[t] + r.written[b];
        let Some(split) = c
            .routes
            .get_mut(r.route_index as usize)
            .and_then(|route| route.split.as_mut())
        else {
            continue;
        };
        for (i, target) in split.iter_mut().enumerate() {
            let ppm = match i {
                _ if i == t => w.min(pair),
                _ if i == b => pair - w.min(pair),
                _ => r.written[i],
            };
            target.weight = None;
            target.weight_ppm = Some(ppm);
        }
    }
    Some(c)
}

#[cfg(test)]
mod tests;
