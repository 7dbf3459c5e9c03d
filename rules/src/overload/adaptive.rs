//! The adaptive concurrency limit of one upstream: a gradient controller.
//!
//! Every window, from the mean latency of the calls that finished in it:
//! `limit ← limit × clamp(target / latency, 0.5, 1) + √limit`, bounded by `min..=max`.
//!
//! - While latency is at or under the target, the limit grows by its square root per window,
//!   but only if at least half of it was in use (a limit nobody reaches proves nothing).
//! - Above the target it shrinks in proportion (at most halving per window, and smoothed:
//!   half of the computed decrease is applied), so one slow window does not collapse it.
//! - At equilibrium `latency ≈ target × (1 + 1/√limit)`: the square-root headroom keeps a
//!   few requests queued at the upstream, so it is never starved, which is what keeps
//!   goodput at capacity.
//!
//! Without a configured target, the target is 1.5 × the baseline, the lowest window-mean
//! latency seen: the upstream's latency without queueing. The baseline is never raised, so
//! an upstream that becomes slower for good is held to a smaller limit until the rule is
//! changed (which starts a fresh limiter); set `target_latency_ms` to avoid that.

use std::time::Duration;

/// Target over baseline when no target is configured.
pub const TOLERANCE: f64 = 1.5;
/// Calls a window needs before it moves the limit.
pub const MIN_CALLS: u32 = 5;

/// An adaptive limit's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveSpec {
    /// Lowest limit.
    pub min: u32,
    /// Highest limit.
    pub max: u32,
    /// Starting limit.
    pub initial: u32,
    /// Latency to hold; `None`: 1.5 × the lowest window mean seen.
    pub target: Option<Duration>,
}

/// What one window measured at an upstream.
#[derive(Debug, Clone, Copy, Default)]
pub struct RttWindow {
    /// Calls that finished in the window.
    pub calls: u32,
    /// Their mean latency (request sent to response head; a timeout counts its full wait).
    pub mean_rtt: Duration,
    /// Most requests in flight at once during the window.
    pub peak_in_flight: u32,
}

/// The controller's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient {
    spec: AdaptiveSpec,
    limit: f64,
    /// Lowest window-mean latency seen, in seconds.
    baseline: Option<f64>,
}

// === impl Gradient ===

impl Gradient {
    /// A controller starting at `spec.initial`.
    pub fn new(spec: AdaptiveSpec) -> Self {
        Self {
            spec,
            limit: f64::from(spec.initial),
            baseline: None,
        }
    }

    /// Its settings.
    pub fn spec(&self) -> &AdaptiveSpec {
        &self.spec
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit as u32
    }

    /// The lowest window-mean latency seen.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline.map(Duration::from_secs_f64)
    }

    /// The latency held: the configured target, or [`TOLERANCE`] × the baseline.
    pub fn target(&self) -> Option<Duration> {
        self.spec.target.or_else(|| {
            self.baseline
                .map(|b| Duration::from_secs_f64(b * TOLERANCE))
        })
    }

    /// Take a window's measurements; returns the new limit.
    pub fn update(&mut self, w: &RttWindow) -> u32 {
        if w.calls < MIN_CALLS {
            return self.limit();
        }
        let rtt = w.mean_rtt.as_secs_f64().max(1e-6);
        let baseline = self.baseline.map_or(rtt, |b| b.min(rtt));
        self.baseline = Some(baseline);
        let target = self
            .spec
            .target
            .map_or(baseline * TOLERANCE, |t| t.as_secs_f64());
        let gradient = (target / rtt).clamp(0.5, 1.0);
        let mut next = self.limit * gradient + self.limit.sqrt();
        let used = f64::from(w.peak_in_flight) >= self.limit / 2.0;
        if next > self.limit && !used {
            next = self.limit;
        }
        if next < self.limit {
            next = (self.limit + next) / 2.0;
        }
        self.limit = next.clamp(f64::from(self.spec.min), f64::from(self.spec.max));
        self.limit()
    }
}
