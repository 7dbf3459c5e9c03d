//! Background tasks that keep the live runtime's state moving: limiter sweeps and the
//! overload controller's windows. Each holds the [`Live`] handle, loads the runtime at every
//! tick (so a reload is picked up at once) and stops with the shutdown signal.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::runtime::Live;

/// How often the keyed limiters' idle keys are swept. A keyed limit's table holds the keys
/// seen since the last sweep (most are fresh again long before it: a key's state outlives
/// its last request by its burst's worth of intervals), so the interval sets how far a busy
/// per-user limit's table spreads: at 40,000 requests/s over 100,000 users, every 5 s held
/// all the users (about 2 MB, a cache miss or two per look-up), every second a third.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Every how many sweeps the one-key limiters, and the keyed ones that are not busy
/// ([`crate::govern::limit::BUSY_KEYS`]), are swept too (a one-key state needs no sweep to
/// be right, only to be counted and to let the sweep skip it when idle; a config of a
/// thousand pair limits makes that pass the sweep's larger part).
pub const FULL_SWEEP_EVERY: u32 = crate::govern::limit::QUIET_PERIODS as u32;

/// What gives the memory a sweep freed back to the system: set by the binary for the
/// allocator it chose ([`on_memory_freed`]); nothing by default.
static MEMORY_FREED: OnceLock<fn()> = OnceLock::new();

/// Have `f` called on the thread that ran each sweep, once it is done: an allocator may keep
/// freed pages until the thread that freed them calls into it again, and a sweep's thread
/// (the runtime's blocking pool, not a worker) may not for a long time. Set once; later
/// calls are ignored.
pub fn on_memory_freed(f: fn()) {
    let _ = MEMORY_FREED.set(f);
}

/// Sweep idle keys out of the live runtime's keyed limiters every [`SWEEP_INTERVAL`], and
/// out of all of them every [`FULL_SWEEP_EVERY`] sweeps, until shutdown, so limiter memory
/// follows the active users. Each sweep locks one shard at a time, so requests wait for at
/// most one shard's sweep.
pub async fn sweep_limiters(live: Arc<Live>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeps = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        }
        let full = sweeps.is_multiple_of(FULL_SWEEP_EVERY);
        sweeps = sweeps.wrapping_add(1);
        let rt = live.runtime.load_full();
        let limiters = &rt.governors.limiters;
        if limiters.rules.is_empty() || (!full && limiters.keyed_idle()) {
            continue;
        }
        // Off the async workers: a sweep of a million keys takes milliseconds.
        let tracked = tokio::task::spawn_blocking(move || {
            let limiters = &rt.governors.limiters;
            let tracked = match full {
                true => Some(limiters.retain_recent()),
                false => {
                    limiters.retain_recent_keyed();
                    None
                }
            };
            drop(rt);
            if let Some(freed) = MEMORY_FREED.get() {
                freed();
            }
            tracked
        })
        .await
        .ok()
        .flatten();
        if let Some(tracked) = tracked {
            tracing::debug!(target: "tidegate::limit", tracked_keys = tracked, "limiter sweep");
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::ThreadId;

    use serde_json::json;

    use super::*;
    use crate::metrics::Metrics;
    use crate::runtime::Runtime;

    static CALLS: AtomicUsize = AtomicUsize::new(0);
    static CALLED_ON: Mutex<Option<ThreadId>> = Mutex::new(None);

    fn freed() {
        CALLS.fetch_add(1, Ordering::Relaxed);
        *CALLED_ON.lock().unwrap() = Some(std::thread::current().id());
    }

    /// The memory hook runs after a sweep, on the thread that ran it (the blocking pool's,
    /// whose frees no worker's collection reaches), not on the runtime's.
    #[tokio::test]
    async fn a_sweep_calls_the_memory_hook_on_its_own_thread() {
        on_memory_freed(freed);
        let c = json!({
            "schema_version": 1,
            "upstreams": { "v1": { "endpoints": ["127.0.0.1:1"] } },
            "routes": [ { "name": "default", "upstream": "v1" } ],
            "limits": [ { "name": "per-user", "key": ["user"], "rate": "1/min", "burst": 1 } ]
        });
        let snap = rules::load("t.json", c.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
            .snapshot;
        let metrics = Arc::new(Metrics::new());
        let live = Arc::new(Live::new(Runtime::offline(snap, None, &metrics), metrics));
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let sweeps = tokio::spawn(sweep_limiters(live, shutdown));
        // The first sweep is at once.
        for _ in 0..200 {
            if CALLS.load(Ordering::Relaxed) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            CALLS.load(Ordering::Relaxed),
            1,
            "called after the first sweep"
        );
        let on = CALLED_ON.lock().unwrap().expect("called");
        assert_ne!(on, std::thread::current().id(), "on the sweep's thread");
        stop.send(true).unwrap();
        sweeps.await.unwrap();
    }
}
