//! Change freeze: whether an edit may be applied at a given time.
//!
//! The window in force is the *live* config's `freeze`. While it is active, every path an
//! edit changes (as [`crate::diff`] finds them, field by field) must be editable: listed in
//! `freeze.editable`, inside `freeze` itself, which is always editable so that a freeze can
//! be lifted, moved or extended, or a brake: a ramp's `stop` set, a plan's `auto` set to
//! `false` (what the operator reaches for when a release or a trigger misbehaves). Changes that only follow from another edit (the fallbacks a
//! plan brings when `active_plans` changes) are judged by that edit, not on their own.
//!
//! Lifting a freeze and making a frozen edit in one save is refused as a whole (a reload is
//! all or nothing): the freeze edit has to be applied first, on its own, which leaves a
//! trace of who lifted it and when. The current time is an argument: this module reads no
//! clock.

use std::fmt;

pub use time::OffsetDateTime;

use crate::diff::{ConfigDiff, diff};
use crate::model::{Config, Freeze, parse_time};
use crate::snapshot::Snapshot;

/// Sections compared as a whole: their paths do not name a rule.
const SINGLETONS: [&str; 5] = ["server", "identity", "active_plans", "overload", "freeze"];
/// Frozen paths named in a refusal's message (all are in [`Refusal::frozen`]).
const NAMED: usize = 3;

/// A parsed `freeze` window.
#[derive(Debug, Clone, PartialEq)]
pub struct Window<'c> {
    /// The section as written.
    pub freeze: &'c Freeze,
    start: OffsetDateTime,
    end: OffsetDateTime,
}

/// An edit refused because it changes frozen paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Every frozen path the edit changes, in config order.
    pub frozen: Vec<String>,
    /// The window's name, if it has one.
    pub name: Option<String>,
    /// When the window ends, as written.
    pub until: String,
    /// What stays editable.
    pub editable: Vec<String>,
    /// Whether the same edit also changes `freeze` (that change is not applied either).
    pub freeze_edited: bool,
}

// === impl Window ===

impl<'c> Window<'c> {
    /// The window of `f`; an error for a time that does not parse (validation reports it
    /// first, so a loaded config always has a window).
    pub fn of(f: &'c Freeze) -> Result<Self, String> {
        Ok(Self {
            freeze: f,
            start: parse_time(&f.start)?,
            end: parse_time(&f.end)?,
        })
    }

    /// Whether `now` is inside the window (`start <= now < end`).
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        self.start <= now && now < self.end
    }

    /// Whether a changed path may change during the window.
    pub fn is_editable(&self, path: &str) -> bool {
        path == "freeze"
            || path.starts_with("freeze/")
            || self.freeze.editable.iter().any(|p| covers(p, path))
    }

    /// The paths among `changed` that may not change during the window.
    pub fn frozen<'p>(&self, changed: &'p [String]) -> Vec<&'p String> {
        changed.iter().filter(|p| !self.is_editable(p)).collect()
    }

    /// `"gala-night" 2026-12-31T18:00:00+08:00 → 2026-12-31T23:30:00+08:00`.
    pub fn describe(&self) -> String {
        let f = self.freeze;
        match &f.name {
            Some(n) => format!("{n:?} {} → {}", f.start, f.end),
            None => format!("{} → {}", f.start, f.end),
        }
    }
}

/// Whether the `editable` pattern covers `path`: each of its segments equals the path's
/// (`*` matches any one), and the path may go deeper.
fn covers(pattern: &str, path: &str) -> bool {
    let mut segs = path.split('/');
    pattern
        .split('/')
        .all(|p| segs.next().is_some_and(|s| p == "*" || p == s))
}

/// Whether a changed path only applies a brake, which a freeze always allows: a ramp's
/// `stop` set (to `hold` or `rollback`) or a plan's `auto` set to `false` in `new`. Taking
/// a brake off is an edit like any other.
fn is_brake(path: &str, new: &Config) -> bool {
    let segs: Vec<&str> = path.split('/').collect();
    match segs.as_slice() {
        ["routes", route, "ramp", "stop"] => (new.routes.iter())
            .find(|r| r.name == *route)
            .and_then(|r| r.ramp.as_ref())
            .is_some_and(|r| r.stop.is_some()),
        ["plans", plan, "auto"] => new.plans.get(*plan).is_some_and(|p| p.auto == Some(false)),
        _ => false,
    }
}

/// The paths an edit changes, as `SECTION[/RULE]/FIELD...` (`routes/canary/split/0/weight`,
/// `active_plans`); a rule added or removed is its own path (`limits/per-user`).
pub fn changed_paths(d: &ConfigDiff) -> Vec<String> {
    let mut out = Vec::new();
    for s in &d.sections {
        for c in &s.changes {
            // A change with no field of its own follows from another edit (a plan switched
            // on brings its fallbacks): that edit is judged instead.
            for f in &c.fields {
                out.push(if SINGLETONS.contains(&s.name) {
                    format!("{}{}", s.name, f.path)
                } else {
                    format!("{}/{}{}", s.name, c.name, f.path)
                });
            }
        }
    }
    out
}

/// Whether the edit from `old` (live) to `new` may be applied at `now`: refused when the
/// live config's freeze window is active and the edit changes a path it does not leave
/// editable.
pub fn check(
    old: (&Config, &Snapshot),
    new: (&Config, &Snapshot),
    now: OffsetDateTime,
) -> Result<(), Refusal> {
    let Some(window) = old.0.freeze.as_ref().and_then(|f| Window::of(f).ok()) else {
        return Ok(());
    };
    if !window.is_active(now) {
        return Ok(());
    }
    let changed = changed_paths(&diff(old, new));
    let mut frozen = window.frozen(&changed);
    frozen.retain(|p| !is_brake(p, new.0));
    if frozen.is_empty() {
        return Ok(());
    }
    let f = window.freeze;
    Err(Refusal {
        frozen: frozen.into_iter().cloned().collect(),
        name: f.name.clone(),
        until: f.end.clone(),
        editable: f.editable.clone(),
        freeze_edited: changed
            .iter()
            .any(|p| p == "freeze" || p.starts_with("freeze/")),
    })
}

// === impl Refusal ===

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let named = self.frozen.iter().take(NAMED).cloned().collect::<Vec<_>>();
        write!(f, "freeze: {}", named.join(", "))?;
        if self.frozen.len() > NAMED {
            write!(f, " and {} more", self.frozen.len() - NAMED)?;
        }
        let verb = if self.frozen.len() == 1 { "is" } else { "are" };
        write!(f, " {verb} frozen until {}", self.until)?;
        if let Some(n) = &self.name {
            write!(f, " (window {n:?})")?;
        }
        if self.editable.is_empty() {
            write!(f, "; nothing is editable but `freeze`")?;
        } else {
            write!(f, "; editable: {}", self.editable.join(", "))?;
        }
        if self.freeze_edited {
            write!(
                f,
                "; the edit of `freeze` in the same file is not applied either: save it on its own first"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests;
