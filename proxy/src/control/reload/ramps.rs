//! Guarded canary ramps: the reloader runs the ramps' controller ([`rules::ramp`]) once per
//! window and rebuilds the live runtime when a ramp's weight changes.
//!
//! A step is a reload without a file edit, as a plan switch is: the live config (as
//! written) is compiled again with each ramp's target at its weight (see
//! [`Reloader::compile_effective`]) and built over the live runtime, so counters, limiters
//! and breakers keep their state. The request path is not involved beyond counting the
//! ramped targets' answers. Every change of a ramp is logged with its figures, counted, and
//! written to the state file (`server.data_dir/ramps.json`), from which a restart resumes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rules::ramp::{CompiledRamp, Controller, Event, EventKind, Outcome, Phase, Saved, Verdict};
use serde::Serialize;

use super::Reloader;
use crate::metrics::{
    Metrics, Name, RampLabels, RampRouteLabels, RampTransitionLabels, RampVerdictLabels,
};

/// The state file's name, under `server.data_dir`.
pub const STATE_FILE: &str = "ramps.json";

/// What the reloader knows of ramps.
#[derive(Debug, Default)]
pub struct RampControl {
    controller: Controller,
    /// The live config's ramps, compiled from the config as written (the live runtime's
    /// snapshot has them too, compiled from the effective config).
    ramps: Vec<CompiledRamp>,
    /// Where the state is kept, for a gateway started from a file.
    file: Option<PathBuf>,
    /// The `(route, target)` weight series exported last, to drop those of removed ramps.
    exported: Vec<(Box<str>, Box<str>)>,
}

/// A ramp as the admin port shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RampStatus {
    /// The route rule whose split is ramped.
    pub route: String,
    /// The target ramped.
    pub target: String,
    /// The target it is compared with.
    pub baseline: String,
    /// What is released, as written.
    pub release: Option<String>,
    /// The steps, as percentages.
    pub steps: Vec<String>,
    /// The current step (1 for the first).
    pub step: usize,
    /// The target's weight in force, as a percentage and in ppm.
    pub weight: String,
    /// Same, in parts per million.
    pub weight_ppm: u32,
    /// `stepping`, `held`, `rolled_back` or `done`.
    pub phase: Phase,
    /// The operator's brake, as written (`hold`, `rollback`), if any.
    pub stop: Option<rules::model::Stop>,
    /// When the current step or phase began (Unix milliseconds).
    pub since_ms: u64,
    /// How long a step holds (ms).
    pub hold_ms: u64,
    /// Length of a judging window (ms).
    pub window_ms: u64,
    /// Why it is where it is.
    pub reason: String,
    /// The last verdict, with the target's and the baseline's figures.
    pub verdict: Option<Verdict>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn event_name(k: EventKind) -> &'static str {
    match k {
        EventKind::Started => "started",
        EventKind::Restarted => "restarted",
        EventKind::Resumed => "resumed",
        EventKind::Advanced => "advanced",
        EventKind::Completed => "completed",
        EventKind::Held => "held",
        EventKind::RolledBack => "rolled_back",
    }
}

// === impl RampControl ===

impl RampControl {
    /// The ramps of a gateway starting with `ramps` (compiled from its config as written):
    /// each resumes from `file` if it holds the state of that same ramp, else starts at its
    /// first step. An unreadable state file is logged, and the ramps start at their first
    /// step: never further than recorded.
    pub fn start(file: Option<PathBuf>, ramps: &[CompiledRamp], metrics: &Metrics) -> Self {
        let now = unix_ms();
        let saved = file.as_deref().map(load).unwrap_or_default();
        let (controller, mut events) = Controller::restore(saved, ramps, now);
        let mut c = Self {
            controller,
            ramps: ramps.to_vec(),
            file,
            exported: Vec::new(),
        };
        events.extend(c.controller.reconcile(ramps, now));
        c.note(&events, metrics);
        if !ramps.is_empty() {
            c.save();
        }
        c
    }

    /// The written ramps in force.
    pub fn ramps(&self) -> &[CompiledRamp] {
        &self.ramps
    }

    /// The target weight of each of `ramps` (ppm), as the controller has it.
    pub fn weights(&self, ramps: &[CompiledRamp]) -> Vec<u32> {
        self.controller.weights(ramps)
    }

    /// Log and count `events`, and export every ramp's step and weight.
    fn note(&mut self, events: &[Event], m: &Metrics) {
        for e in events {
            let (from, to) = (
                rules::ramp::percent(e.from_ppm),
                rules::ramp::percent(e.to_ppm),
            );
            let what = event_name(e.kind);
            match e.kind {
                EventKind::RolledBack | EventKind::Held | EventKind::Restarted => {
                    tracing::warn!(route = %e.route, from = %from, to = %to, figures = %e.reason, "ramp {what}")
                }
                _ => {
                    tracing::info!(route = %e.route, from = %from, to = %to, figures = %e.reason, "ramp {what}")
                }
            }
            m.ramp_transitions
                .get_or_create(&RampTransitionLabels {
                    route: Name::from(&*e.route),
                    to: what,
                })
                .inc();
        }
        let weights = self.controller.weights(&self.ramps);
        let now: Vec<(Box<str>, Box<str>)> = (self.ramps.iter())
            .map(|r| (r.route.clone(), r.target_name.clone()))
            .collect();
        for (route, target) in self.exported.iter().filter(|e| !now.contains(e)) {
            m.ramp_weight.remove(&RampLabels {
                route: Name::from(&**route),
                target: Name::from(&**target),
            });
            m.ramp_step.remove(&RampRouteLabels {
                route: Name::from(&**route),
            });
        }
        for (r, w) in self.ramps.iter().zip(weights) {
            m.ramp_weight
                .get_or_create(&RampLabels {
                    route: Name::from(&*r.route),
                    target: Name::from(&*r.target_name),
                })
                .set(i64::from(w));
            let step = self.controller.state(&r.route).map_or(0, |s| s.step + 1);
            m.ramp_step
                .get_or_create(&RampRouteLabels {
                    route: Name::from(&*r.route),
                })
                .set(step as i64);
        }
        self.exported = now;
    }

    /// The state file's path and content now, if it is kept.
    fn snapshot(&self) -> Option<(PathBuf, Vec<u8>)> {
        let file = self.file.clone()?;
        match serde_json::to_vec_pretty(&self.controller.save()) {
            Ok(b) => Some((file, b)),
            Err(e) => {
                tracing::error!("ramp state: cannot serialize: {e}");
                None
            }
        }
    }

    /// Write the state file now (at start, before serving).
    fn save(&self) {
        if let Some((file, bytes)) = self.snapshot() {
            write_state(&file, &bytes);
        }
    }

    /// Every ramp's state, for the admin port.
    pub fn status(&self) -> Vec<RampStatus> {
        let weights = self.controller.weights(&self.ramps);
        (self.ramps.iter().zip(weights))
            .map(|(r, w)| {
                let st = self.controller.state(&r.route);
                RampStatus {
                    route: r.route.to_string(),
                    target: r.target_name.to_string(),
                    baseline: r.baseline_name.to_string(),
                    release: r.release.as_deref().map(str::to_owned),
                    steps: r.steps.iter().map(|&s| rules::ramp::percent(s)).collect(),
                    step: st.map_or(1, |s| s.step + 1),
                    weight: rules::ramp::percent(w),
                    weight_ppm: w,
                    phase: st.map_or(Phase::Stepping, |s| s.phase),
                    stop: r.stop,
                    since_ms: st.map_or(0, |s| s.since_ms),
                    hold_ms: r.hold_ms,
                    window_ms: r.window_ms,
                    reason: st.map(|s| s.reason.clone()).unwrap_or_default(),
                    verdict: st.and_then(|s| s.verdict.clone()),
                }
            })
            .collect()
    }
}

/// Replace the state file by `bytes`; a failure is logged: the ramps go on, and a restart
/// would start them again from their first step.
fn write_state(file: &Path, bytes: &[u8]) {
    let written = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .map_err(|e| e.to_string())
        .and_then(|()| crate::control::history::replace_atomically(file, bytes));
    if let Err(e) = written {
        tracing::error!(file = %file.display(), "ramp state not saved: {e}");
    }
}

/// The state file's content; nothing (logged) when it is absent, unreadable or corrupt.
fn load(file: &Path) -> Saved {
    if !file.exists() {
        return Saved::default();
    }
    let read = crate::control::config::read_bounded(file)
        .and_then(|b| serde_json::from_slice::<Saved>(&b).map_err(|e| e.to_string()));
    match read {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(file = %file.display(), "ramp state unreadable ({e}); every ramp starts at its first step");
            Saved::default()
        }
    }
}

// === impl Reloader ===

impl Reloader {
    /// Judge one window of figures with the live ramps; when a ramp's weight changes, log
    /// it with its figures, save the state and rebuild the live runtime.
    pub async fn ramp_window(self: &Arc<Self>, w: &rules::trigger::Window) {
        // No step forward during a change freeze (a breach still rolls back).
        let may_advance = !(self.config.lock().expect("not poisoned").freeze.as_ref())
            .is_some_and(|f| super::freeze_active(f, SystemTime::now()));
        let (changed, events) = {
            let mut rc = self.ramps.lock().expect("not poisoned");
            if rc.ramps.is_empty() {
                return;
            }
            let RampControl {
                controller, ramps, ..
            } = &mut *rc;
            let before = controller.weights(ramps);
            let events = controller.step(ramps, &w.ramps, w.end_ms, may_advance);
            for r in ramps.iter() {
                if let Some(v) = controller.state(&r.route).and_then(|s| s.verdict.as_ref())
                    && v.at_ms == w.end_ms
                {
                    let outcome = match v.outcome {
                        Outcome::Pass => "pass",
                        Outcome::Breach => "breach",
                        Outcome::Waiting => "waiting",
                    };
                    self.live
                        .metrics
                        .ramp_verdicts
                        .get_or_create(&RampVerdictLabels {
                            route: Name::from(&*r.route),
                            outcome,
                        })
                        .inc();
                }
            }
            let changed = controller.weights(ramps) != before;
            (changed, events)
        };
        if events.is_empty() {
            return;
        }
        {
            let mut rc = self.ramps.lock().expect("not poisoned");
            rc.note(&events, &self.live.metrics);
        }
        // The new weight first (a rollback protects users), then the record of it.
        if changed {
            self.rebuild_live("ramp step").await;
        }
        self.save_ramps().await;
    }

    /// Write the ramps' state file off the async threads, the state read under the ramps'
    /// lock and written outside it. Writers (the ramp task, a reload) take turns, each
    /// reading the state once it has its turn, so the last write carries the latest state.
    async fn save_ramps(&self) {
        let _turn = self.ramp_writes.lock().await;
        let Some((file, bytes)) = self.ramps.lock().expect("not poisoned").snapshot() else {
            return;
        };
        let _ = tokio::task::spawn_blocking(move || write_state(&file, &bytes)).await;
    }

    /// After a reload made `written` (the new config's ramps as written) live: bring the
    /// controller in line (new ramps start, edited ones start again, removed ones go).
    pub(super) async fn ramps_reloaded(self: &Arc<Self>, written: Vec<CompiledRamp>) {
        let events = {
            let mut rc = self.ramps.lock().expect("not poisoned");
            if rc.ramps.is_empty() && written.is_empty() {
                return;
            }
            rc.ramps = written;
            let RampControl {
                controller, ramps, ..
            } = &mut *rc;
            let events = controller.reconcile(ramps, unix_ms());
            rc.note(&events, &self.live.metrics);
            events
        };
        if !events.is_empty() {
            // Not under the reload lock: the file's fsync must not delay the next reload.
            let this = Arc::clone(self);
            tokio::spawn(async move { this.save_ramps().await });
        }
    }

    /// Every ramp of the live config and where it is.
    pub fn ramps(&self) -> Vec<RampStatus> {
        self.ramps.lock().expect("not poisoned").status()
    }
}
