//! Background tasks that keep the live runtime's state moving: limiter sweeps and the
//! overload controller's windows. Each holds the [`Live`] handle, loads the runtime at every
//! tick (so a reload is picked up at once) and stops with the shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use crate::runtime::Live;

/// How often idle limiter keys are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Sweep idle keys out of the live runtime's limiters every [`SWEEP_INTERVAL`] until
/// shutdown, so limiter memory follows the active users. Each sweep locks one shard at a
/// time, so requests wait for at most one shard's sweep.
pub async fn sweep_limiters(live: Arc<Live>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        }
        let rt = live.runtime.load_full();
        if rt.governors.limiters.rules.is_empty() {
            continue;
        }
        // Off the async workers: a sweep of a million keys takes milliseconds.
        let tracked = tokio::task::spawn_blocking(move || rt.governors.limiters.retain_recent())
            .await
            .unwrap_or(0);
        tracing::debug!(target: "tidegate::limit", tracked_keys = tracked, "limiter sweep");
    }
}

/// Close a window of the live runtime's overload state every `window_ms` until shutdown.
pub async fn overload_windows(live: Arc<Live>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let window = live.runtime.load().snapshot.overload.window;
        tokio::select! {
            _ = tokio::time::sleep(window) => {}
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        }
        let rt = live.runtime.load_full();
        if rt.overload.enabled {
            rt.overload.tick(&live.metrics);
        }
    }
}
