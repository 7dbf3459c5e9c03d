//! Plans that switch themselves on: the reloader runs each plan's trigger once per window
//! and rebuilds the live runtime when the plans in force change.
//!
//! A switch is a reload without a file edit: the live config (as written) is compiled again
//! with its `active_plans` followed by the auto-active plans, and the runtime is built over
//! the live one, so limits, breakers and counters the plans do not touch keep their state,
//! as on any reload. The request path is not involved: with no trigger nothing is rebuilt,
//! and with one the only cost is a rebuild when a plan goes on or off. Switches take the
//! reload lock, so a switch and a file reload never race to store a runtime.

use std::sync::Arc;

use rules::trigger::{Cause, Controller, Window, in_force};
use serde::Serialize;

use super::Reloader;
use crate::metrics::{Name, PlanLabels, PlanTransitionLabels};
use crate::runtime::Runtime;

/// One window of figures, with the runtime it was sampled from (the figures are indexed
/// like its snapshot).
#[derive(Debug)]
pub struct SampledWindow {
    /// The runtime sampled.
    pub runtime: Arc<Runtime>,
    /// Its figures over the window.
    pub window: Window,
}

/// The latest window the dashboard's sampler closed, if any.
pub type Windows = tokio::sync::watch::Receiver<Option<Arc<SampledWindow>>>;

/// What the reloader knows of plans: the controller, and what is in force.
#[derive(Debug, Default)]
pub(super) struct PlanControl {
    controller: Controller,
    /// Plans in force in the live runtime, with why (the last export).
    in_force: Vec<(Box<str>, Cause)>,
}

/// A plan as the admin port shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PlanStatus {
    /// Plan name.
    pub name: String,
    /// Whether it is in force.
    pub active: bool,
    /// Why: `manual` (listed in `active_plans`) or `auto` (its trigger); `null` when off.
    pub cause: Option<&'static str>,
    /// Whether it has a trigger that may switch it on (`auto` not `false`).
    pub triggered: bool,
    /// When its trigger last switched it on or off (Unix milliseconds).
    pub since_ms: Option<u64>,
    /// The figures that caused that switch.
    pub reason: Option<String>,
}

fn cause_name(c: Cause) -> &'static str {
    match c {
        Cause::Manual => "manual",
        Cause::Auto => "auto",
    }
}

// === impl Reloader ===

impl Reloader {
    /// Judge one window of figures (sampled from `rt`) with `rt`'s triggers; when that
    /// switches a plan on or off, log it with its figures and rebuild the live runtime with
    /// the plans now in force.
    pub async fn plan_window(self: &Arc<Self>, rt: &Runtime, w: &Window) {
        let changes = {
            let mut p = self.plans.lock().expect("not poisoned");
            p.controller.step(&rt.snapshot.triggers, w)
        };
        if changes.is_empty() {
            return;
        }
        for c in &changes {
            let to = if c.on { "on" } else { "off" };
            tracing::warn!(plan = %c.plan, cause = "auto", figures = %c.reason, "plan switched {to} by its trigger");
        }
        let config = self.config.lock().expect("not poisoned").clone();
        if self.plans_in_force(&config) == self.plans.lock().expect("not poisoned").in_force {
            // A manual plan the trigger switched: nothing in force changes.
            return;
        }
        self.rebuild_live("plan switch").await;
    }

    /// Rebuild the live runtime from the live config with the plans and ramp weights now in
    /// force (under the reload lock, so a rebuild and a file reload never race to store a
    /// runtime), and publish the plans in force.
    pub(super) async fn rebuild_live(self: &Arc<Self>, why: &'static str) {
        let _one_at_a_time = self.serial.lock().await;
        let config = self.config.lock().expect("not poisoned").clone();
        let this = Arc::clone(self);
        let built = tokio::task::spawn_blocking(move || this.rebuild(&config)).await;
        match built {
            Ok(Ok(runtime)) => {
                runtime.governors.export_states(&self.live.metrics);
                self.live.runtime.store(Arc::new(runtime));
                self.export_plans();
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "{why} not applied; the previous rules stay live")
            }
            Err(e) => tracing::error!(error = %e, "{why} failed"),
        }
    }

    /// The live config compiled with the auto-active plans and the ramps' weights, built
    /// over the live runtime.
    fn rebuild(&self, config: &rules::Config) -> Result<Runtime, String> {
        let written = self.ramps.lock().expect("not poisoned").ramps().to_vec();
        let snapshot = match self.compile_effective(config, &written)? {
            Some(s) => s,
            // Every trigger released, every ramp as written: the config as written.
            None => rules::Snapshot::compile(config).map_err(|i| issues(&i))?,
        };
        let secrets = self.secrets.lock().expect("not poisoned").clone();
        let lookup = |n: &str| self.embedded.iter().find(|(m, _)| m == n).map(|(_, a)| *a);
        let previous = self.live.runtime.load_full();
        Runtime::build(
            snapshot,
            secrets,
            &lookup,
            Some(&previous),
            &self.live.metrics,
        )
    }

    /// `config` compiled with its `active_plans` followed by the auto-active plans it still
    /// has triggers for, and with each of its ramps (`ramps`, compiled from it as written)
    /// at the weight the ramp controller gives it; `None` when neither changes anything
    /// (its own snapshot is the one).
    pub(super) fn compile_effective(
        &self,
        config: &rules::Config,
        ramps: &[rules::ramp::CompiledRamp],
    ) -> Result<Option<rules::Snapshot>, String> {
        let plans = self.plans_in_force(config);
        let auto = plans.iter().any(|(_, c)| *c == Cause::Auto);
        let weights = self.ramps.lock().expect("not poisoned").weights(ramps);
        let ramped = rules::ramp::effective(config, ramps, &weights);
        if !auto && ramped.is_none() {
            return Ok(None);
        }
        let mut c = ramped.unwrap_or_else(|| config.clone());
        c.active_plans = plans.iter().map(|(p, _)| p.to_string()).collect();
        rules::Snapshot::compile(&c)
            .map(Some)
            .map_err(|i| issues(&i))
    }

    /// The plans in force under `config` with the controller's auto-active plans (those
    /// `config` still has an automatic trigger for).
    fn plans_in_force(&self, config: &rules::Config) -> Vec<(Box<str>, Cause)> {
        let auto: Vec<Box<str>> = (self.plans.lock().expect("not poisoned").controller)
            .active()
            .into_iter()
            .filter(|p| {
                config
                    .plans
                    .get(&**p)
                    .is_some_and(|p| p.trigger.is_some() && p.auto != Some(false))
            })
            .collect();
        in_force(&config.active_plans, &auto)
            .into_iter()
            .map(|(p, c)| (p.into(), c))
            .collect()
    }

    /// Publish the plans in force under the live config (`tidegate_plan_active`), count
    /// and log (manual ones here; automatic ones where their trigger fired) what changed.
    pub(super) fn export_plans(&self) {
        let config = self.config.lock().expect("not poisoned").clone();
        let now = self.plans_in_force(&config);
        let mut p = self.plans.lock().expect("not poisoned");
        let before = std::mem::replace(&mut p.in_force, now.clone());
        let m = &self.live.metrics;
        let switch = |(plan, cause): &(Box<str>, Cause), on: bool| {
            let (plan, cause) = (Name::from(&**plan), cause_name(*cause));
            m.plan_active
                .get_or_create(&PlanLabels {
                    plan: plan.clone(),
                    cause,
                })
                .set(i64::from(on));
            let to = if on { "on" } else { "off" };
            m.plan_transitions
                .get_or_create(&PlanTransitionLabels { plan, cause, to })
                .inc();
        };
        for gone in before.iter().filter(|b| !now.contains(b)) {
            switch(gone, false);
            if gone.1 == Cause::Manual {
                tracing::warn!(plan = %gone.0, cause = "manual", "plan switched off: removed from active_plans");
            }
        }
        for new in now.iter().filter(|n| !before.contains(n)) {
            switch(new, true);
            if new.1 == Cause::Manual {
                tracing::warn!(plan = %new.0, cause = "manual", "plan switched on: listed in active_plans");
            }
        }
    }

    /// Every plan of the live config: whether it is in force, why, and what its trigger saw.
    pub fn plans(&self) -> Vec<PlanStatus> {
        let config = self.config.lock().expect("not poisoned").clone();
        let p = self.plans.lock().expect("not poisoned");
        (config.plans.iter())
            .map(|(name, plan)| {
                let cause = (p.in_force.iter())
                    .find(|(n, _)| **n == **name)
                    .map(|(_, c)| cause_name(*c));
                let st = p.controller.state(name);
                PlanStatus {
                    name: name.clone(),
                    active: cause.is_some(),
                    cause,
                    triggered: plan.trigger.is_some() && plan.auto != Some(false),
                    since_ms: st.and_then(|s| s.since_ms),
                    reason: st.and_then(|s| s.reason.clone()),
                }
            })
            .collect()
    }
}

/// Validation issues as one line.
fn issues(i: &[rules::validate::Issue]) -> String {
    (i.iter())
        .map(|i| format!("{}: {}", i.path, i.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Feed the reloader each window of figures the dashboard's sampler closes (for the plans'
/// triggers and the ramps' guards), until shutdown.
pub async fn run(
    reloader: Arc<Reloader>,
    mut windows: Windows,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = windows.changed() => if changed.is_err() { return },
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        }
        let Some(w) = windows.borrow_and_update().clone() else {
            continue;
        };
        reloader.plan_window(&w.runtime, &w.window).await;
        reloader.ramp_window(&w.window).await;
    }
}
