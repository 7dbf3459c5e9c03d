//! Overload protection on the request path: priority admission, concurrency caps with short
//! bounded queues, and adaptive per-upstream limits.
//!
//! Two points on the request path:
//! 1. **Admission** ([`Overload::admit`]), synchronous, right after classification and
//!    before limits, body or upstream: the request's rank (business priority of its
//!    interface, then its user's priority) is counted in the window's histogram and compared
//!    with the admission level (one atomic load). Below it: 503 at once.
//! 2. **Slots** ([`Pending::acquire`]), once the request is routed and about to be
//!    forwarded: a slot under each cap that applies (upstream, interface, global), waiting
//!    at most `queue_timeout_ms` in all, in a queue of at most `max_queue` per cap. The
//!    permits are held until the upstream's response head arrives (not until its body ends:
//!    the upstream's work is done by then, and a slow client reading a large body should not
//!    hold the upstream's slot), then dropped, which is when the latency sample of an
//!    adaptive limit is taken.
//!
//! A control task ([`control`]) closes a window every `window_ms`: each adaptive limit takes
//! its window's mean latency, the admission level is raised or lowered from the window's
//! queueing (see [`rules::overload::LevelController`]), and the gauges are exported.
//!
//! Admission in `mode: dry_run` moves its level the same way, but a request below it is
//! counted (`tidegate_shadow_shed_total`) and let in: [`Verdict::WouldShed`].
//!
//! State survives reloads: a cap whose definition is unchanged keeps its [`Gate`] (slots in
//! use, queue, adaptive limit), and an unchanged admission section keeps its level.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body_util::Full;
use prometheus_client::metrics::counter::Counter;
use rules::model::Priority;
use rules::overload::{
    AdmissionSpec, Gradient, LevelController, LevelWindow, PriorityKey, RttWindow, UpstreamCap,
    UserKey, business_of_rank, business_rank, priority,
};
use rules::{InterfaceId, Snapshot, UpstreamId};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::metrics::{
    GateLabels, InterfaceLabels, LevelLabels, Metrics, Name, OverloadRejectLabels,
};
use crate::respond;

/// Why overload protection refused a request (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Below the admission level.
    Admission = 0,
    /// A cap's queue was full.
    QueueFull = 1,
    /// No slot within `queue_timeout_ms`.
    QueueTimeout = 2,
}

/// Priority admission's verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// At or above the level, or admission is off.
    Admit,
    /// Below the level: refused.
    Shed,
    /// Below the level of a dry-run admission: counted and let in.
    WouldShed,
}

/// Overload state of one runtime.
#[derive(Debug)]
pub struct Overload {
    /// Protection is on.
    pub enabled: bool,
    /// The global cap.
    pub global: Option<Arc<Gate>>,
    /// Per-interface caps, indexed like the snapshot's interfaces.
    pub interfaces: Vec<Option<Arc<Gate>>>,
    /// Per-upstream caps, indexed like the snapshot's upstreams.
    pub upstreams: Vec<Option<Arc<Gate>>>,
    /// Priority admission.
    pub admission: Option<Arc<Admission>>,
    /// Business rank of each interface, and (last) of requests with no interface.
    business: Vec<u32>,
    queue_timeout: Duration,
    retry_after: HeaderValue,
    /// Rejection counters by interface (last: no interface), by reason; taken from the
    /// metric family on first use, so counting a rejection is one atomic add.
    rejected: Vec<OnceLock<[Counter; 3]>>,
    /// `tidegate_shadow_shed_total` by interface (last: no interface), the same way.
    shadow_shed: Vec<OnceLock<Counter>>,
}

/// One concurrency cap: slots whose number can change, a bounded wait queue ordered by
/// business priority (FIFO within one), and the window's figures.
///
/// A freed slot goes to the waiting request of the highest business priority, so when the
/// queue overflows or times out it is the least important requests that are refused:
/// `grab` waiting behind `share` would otherwise time out with it. A `std` mutex guards the
/// slots and the queue: the critical section is a counter update and, when requests
/// wait, a deque operation; it is never held across an await.
#[derive(Debug)]
pub struct Gate {
    /// `global`, `interface` or `upstream`.
    pub scope: &'static str,
    /// The interface or upstream name (`global` for the global cap).
    pub name: Name,
    /// What it was built from, to tell whether a reload changed it.
    def: GateDef,
    /// Free slots (negative after the limit fell below the slots in use: those are retired
    /// as they come back) and the waiters.
    slots: Mutex<Slots>,
    limit: AtomicU32,
    in_flight: AtomicU32,
    /// Most slots in use at once during the current window.
    peak: AtomicU32,
    waiting: AtomicU32,
    rtt_sum_us: AtomicU64,
    rtt_calls: AtomicU32,
    /// The adaptive controller (locked once per window, by the control task only).
    adaptive: Option<Mutex<Gradient>>,
}

#[derive(Debug)]
struct Slots {
    free: i64,
    /// Waiters by business band (0 low .. 3 critical), each FIFO: id and hand-over channel.
    queues: [VecDeque<(u64, oneshot::Sender<()>)>; 4],
    next_id: u64,
}

#[derive(Debug, Clone, PartialEq)]
struct GateDef {
    cap: Option<UpstreamCap>,
    fixed: u32,
    max_queue: u32,
}

/// A slot under one cap; dropping it gives the slot back (or retires it, if the limit fell).
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
}

/// A place in a gate's queue. Dropped while still queued (timeout, client gone) it leaves
/// the queue; dropped after a slot was handed to it but before it was taken, it gives the
/// slot back, so no slot is ever lost to a cancelled wait.
struct Waiter<'a> {
    gate: &'a Gate,
    band: usize,
    id: u64,
    taken: bool,
}

/// Priority admission state: the level, and the current window's figures.
#[derive(Debug)]
pub struct Admission {
    spec: AdmissionSpec,
    level: AtomicU32,
    /// Current rotation epoch of user priorities.
    epoch: AtomicU64,
    /// Requests this window, by rank.
    offered: Box<[AtomicU64]>,
    /// Requests that went on to take slots this window.
    passed: AtomicU64,
    /// ... and got them.
    admitted: AtomicU64,
    /// ... their total wait for slots, in microseconds.
    wait_us: AtomicU64,
    /// ... and those refused by a full queue or a queue timeout.
    queue_rejected: AtomicU64,
    controller: Mutex<LevelController>,
    last: Mutex<WindowReport>,
    overloaded: AtomicBool,
}

/// The slots a routed request must take before it is forwarded, as plain `Arc`s (no
/// snapshot guard is held across the wait).
#[derive(Debug)]
pub struct Pending {
    gates: [Option<Arc<Gate>>; 3],
    /// Business band of the request (its place in the gates' queues).
    band: usize,
    admission: Option<Arc<Admission>>,
    deadline: Duration,
    retry_after: HeaderValue,
    counters: Option<[Counter; 3]>,
}

/// Slots held by a forwarded request.
#[derive(Debug)]
pub struct Held {
    slots: [Option<Slot>; 3],
    since: std::time::Instant,
}

/// The last closed window of the admission controller, for `/admin/overload`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowReport {
    /// Requests that arrived.
    pub offered: u64,
    /// Requests that passed the level and asked for slots.
    pub passed: u64,
    /// Requests that got their slots.
    pub admitted: u64,
    /// Requests refused by a full queue or a queue timeout.
    pub queue_rejected: u64,
    /// Mean wait for slots, in milliseconds.
    pub mean_queue_ms: f64,
    /// Whether the window counted as overloaded.
    pub overloaded: bool,
}

/// `/admin/overload`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Protection is on.
    pub enabled: bool,
    /// The admission level, if admission is on.
    pub admission: Option<LevelStatus>,
    /// Every cap.
    pub caps: Vec<GateStatus>,
}

/// The admission level, for `/admin/overload`.
#[derive(Debug, Serialize)]
pub struct LevelStatus {
    /// The level as one rank (`business × levels + user`); 0 admits everything.
    pub rank: u32,
    /// Its business priority: requests of lower business priority are all refused.
    pub business: Priority,
    /// Its user priority: requests of exactly `business` priority need at least this.
    pub user: u32,
    /// User priority levels.
    pub user_levels: u32,
    /// Current rotation epoch of user priorities.
    pub epoch: u64,
    /// The last closed window.
    pub last_window: WindowReport,
}

/// One cap, for `/admin/overload`.
#[derive(Debug, Serialize)]
pub struct GateStatus {
    /// `global`, `interface` or `upstream`.
    pub scope: &'static str,
    /// Interface or upstream name.
    pub name: String,
    /// Current limit.
    pub limit: u32,
    /// Slots in use.
    pub in_flight: u32,
    /// Requests waiting.
    pub queue_depth: u32,
    /// `fixed` or `adaptive`.
    pub kind: &'static str,
    /// Adaptive only: lowest window-mean latency seen, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_ms: Option<f64>,
    /// Adaptive only: latency held, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_ms: Option<f64>,
}

// === impl Reason ===

impl Reason {
    /// Every reason, in counter order.
    pub const ALL: [Reason; 3] = [Self::Admission, Self::QueueFull, Self::QueueTimeout];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Admission => "admission",
            Self::QueueFull => "queue_full",
            Self::QueueTimeout => "queue_timeout",
        }
    }
}

// === impl Overload ===

impl Overload {
    /// State for `snap`, keeping what `previous` had for unchanged caps and admission.
    pub fn build(snap: &Snapshot, key: Option<PriorityKey>, previous: Option<&Self>) -> Self {
        let o = &snap.overload;
        let find = |scope: &str, name: &str, def: &GateDef| -> Option<Arc<Gate>> {
            let p = previous?;
            p.global
                .iter()
                .chain(p.interfaces.iter().flatten())
                .chain(p.upstreams.iter().flatten())
                .find(|g| g.scope == scope && &*g.name.0 == name && g.def == *def)
                .cloned()
        };
        let gate = |scope: &'static str, name: &str, cap: Option<UpstreamCap>, fixed: u32| {
            let def = GateDef {
                cap,
                fixed,
                max_queue: o.max_queue,
            };
            find(scope, name, &def).unwrap_or_else(|| Arc::new(Gate::new(scope, name, def)))
        };
        let global = o.max_in_flight.map(|n| gate("global", "global", None, n));
        let interfaces = snap
            .interfaces
            .iter()
            .zip(&o.interfaces)
            .map(|(i, s)| s.max_in_flight.map(|n| gate("interface", &i.name, None, n)))
            .collect();
        let upstreams = snap
            .upstreams
            .iter()
            .zip(&o.upstreams)
            .map(|(u, cap)| {
                cap.map(|c| {
                    let fixed = match c {
                        UpstreamCap::Fixed(n) => n,
                        UpstreamCap::Adaptive(_) => 0,
                    };
                    gate("upstream", &u.name, Some(c), fixed)
                })
            })
            .collect();
        let admission = o.admission.map(|spec| {
            let spec = AdmissionSpec {
                priority_key: key,
                ..spec
            };
            previous
                .and_then(|p| p.admission.as_ref())
                .filter(|a| a.spec == spec)
                .cloned()
                .unwrap_or_else(|| Arc::new(Admission::new(spec)))
        });
        let mut business: Vec<u32> = o
            .interfaces
            .iter()
            .map(|i| business_rank(i.priority))
            .collect();
        business.push(business_rank(o.default_priority));
        Self {
            enabled: o.enabled,
            global,
            interfaces,
            upstreams,
            admission,
            rejected: (0..business.len()).map(|_| OnceLock::new()).collect(),
            shadow_shed: (0..business.len()).map(|_| OnceLock::new()).collect(),
            business,
            queue_timeout: o.queue_timeout,
            retry_after: HeaderValue::from(o.retry_after_s),
        }
    }

    /// The admission step: count the request in the window's histogram and whether it ranks
    /// at or above the level (refused ones are counted as rejections). Synchronous,
    /// allocation-free: a hash of the user ID, two atomic adds and one atomic load.
    pub fn admit(
        &self,
        interface: Option<InterfaceId>,
        user: UserKey<'_>,
        iface_names: &[Name],
        metrics: &Metrics,
    ) -> bool {
        self.verdict(interface, user, iface_names, metrics) != Verdict::Shed
    }

    /// [`Overload::admit`], telling a dry run's would-be refusal ([`Verdict::WouldShed`],
    /// counted in `tidegate_shadow_shed_total`) from an admission.
    pub fn verdict(
        &self,
        interface: Option<InterfaceId>,
        user: UserKey<'_>,
        iface_names: &[Name],
        metrics: &Metrics,
    ) -> Verdict {
        let Some((a, slot, rank)) = self.rank(interface, user) else {
            return Verdict::Admit;
        };
        a.offered[rank as usize].fetch_add(1, Ordering::Relaxed);
        let level = a.level.load(Ordering::Relaxed);
        if LevelController::admits(level, rank) {
            return Verdict::Admit;
        }
        if a.spec.dry_run {
            self.shadow_counter(slot, iface_names, metrics).inc();
            tracing::debug!(
                target: "tidegate::shadow",
                kind = "admission",
                interface = &*self.interface_label(slot, iface_names).0,
                rank,
                level,
                "admission would shed (dry run)"
            );
            return Verdict::WouldShed;
        }
        self.counters(slot, iface_names, metrics)[Reason::Admission as usize].inc();
        Verdict::Shed
    }

    /// Whether [`Overload::admit`] would let the request in at `level` (the live level when
    /// `None`), counting nothing.
    pub fn would_admit(
        &self,
        interface: Option<InterfaceId>,
        user: UserKey<'_>,
        level: Option<u32>,
    ) -> bool {
        self.peek(interface, user, level) != Verdict::Shed
    }

    /// [`Overload::verdict`] at `level` (the live level when `None`), counting nothing.
    pub fn peek(
        &self,
        interface: Option<InterfaceId>,
        user: UserKey<'_>,
        level: Option<u32>,
    ) -> Verdict {
        let Some((rank, level)) = self.priority(interface, user, level) else {
            return Verdict::Admit;
        };
        match (LevelController::admits(level, rank), self.dry_run()) {
            (true, _) => Verdict::Admit,
            (false, true) => Verdict::WouldShed,
            (false, false) => Verdict::Shed,
        }
    }

    /// Whether priority admission is a dry run.
    pub fn dry_run(&self) -> bool {
        self.admission.as_ref().is_some_and(|a| a.spec.dry_run)
    }

    /// Whether the request would be admitted at `level` with user priorities as they were
    /// in the hour `unix_secs` falls in (they rotate hourly): `tidegate replay` judges each
    /// logged request in its own hour, counting nothing.
    pub fn would_admit_at(
        &self,
        interface: Option<InterfaceId>,
        user: UserKey<'_>,
        level: u32,
        unix_secs: u64,
    ) -> bool {
        if !self.enabled {
            return true;
        }
        let Some(a) = self.admission.as_deref() else {
            return true;
        };
        let slot = interface.map_or(self.business.len() - 1, |i| i.0 as usize);
        let b = business_of_rank(self.business[slot]);
        let (epoch, levels) = (a.spec.epoch(unix_secs), a.spec.user_levels);
        let rank = priority(b, user, epoch, levels, a.spec.priority_key.as_ref());
        LevelController::admits(level, rank)
    }

    /// The request's rank and the admission level it is judged at (`level`, or the live
    /// one), when priority admission is on.
    pub fn priority(
        &self,
        interface: Option<InterfaceId>,
        user: UserKey<'_>,
        level: Option<u32>,
    ) -> Option<(u32, u32)> {
        let (a, _, rank) = self.rank(interface, user)?;
        Some((rank, level.unwrap_or_else(|| a.level())))
    }

    /// The request's admission state, counter slot and rank, when admission is on.
    fn rank(
        &self,
        interface: Option<InterfaceId>,
        user: UserKey<'_>,
    ) -> Option<(&Admission, usize, u32)> {
        if !self.enabled {
            return None;
        }
        let a = self.admission.as_deref()?;
        let slot = interface.map_or(self.business.len() - 1, |i| i.0 as usize);
        let b = business_of_rank(self.business[slot]);
        let epoch = a.epoch.load(Ordering::Relaxed);
        let levels = a.spec.user_levels;
        let rank = priority(b, user, epoch, levels, a.spec.priority_key.as_ref());
        Some((a, slot, rank))
    }

    /// The answer to a request admission refused: 503 `overloaded` with `Retry-After`.
    pub fn refusal(&self) -> Response<Full<Bytes>> {
        respond::overloaded(&self.retry_after)
    }

    /// The slots a request routed to `upstream` must take, or `None` when no cap applies.
    pub fn pending(
        &self,
        interface: Option<InterfaceId>,
        upstream: UpstreamId,
        iface_names: &[Name],
        metrics: &Metrics,
    ) -> Option<Pending> {
        if !self.enabled {
            return None;
        }
        let up = self.upstreams[upstream.0 as usize].clone();
        let itf = interface.and_then(|i| self.interfaces[i.0 as usize].clone());
        let gates = [up, itf, self.global.clone()];
        if gates.iter().all(Option::is_none) {
            return None;
        }
        let slot = interface.map_or(self.business.len() - 1, |i| i.0 as usize);
        Some(Pending {
            gates,
            band: self.business[slot] as usize,
            admission: self.admission.clone(),
            deadline: self.queue_timeout,
            retry_after: self.retry_after.clone(),
            counters: Some(self.counters(slot, iface_names, metrics).clone()),
        })
    }

    /// The interface label of a counter slot.
    fn interface_label(&self, slot: usize, iface_names: &[Name]) -> Name {
        iface_names
            .get(slot)
            .cloned()
            .unwrap_or_else(|| Name::from("none"))
    }

    fn shadow_counter(&self, slot: usize, iface_names: &[Name], metrics: &Metrics) -> &Counter {
        self.shadow_shed[slot].get_or_init(|| {
            metrics
                .shadow_shed
                .get_or_create(&InterfaceLabels {
                    interface: self.interface_label(slot, iface_names),
                })
                .clone()
        })
    }

    fn counters(&self, slot: usize, iface_names: &[Name], metrics: &Metrics) -> &[Counter; 3] {
        self.rejected[slot].get_or_init(|| {
            let interface = self.interface_label(slot, iface_names);
            Reason::ALL.map(|r| {
                metrics
                    .overload_rejected
                    .get_or_create(&OverloadRejectLabels {
                        reason: r.label(),
                        interface: interface.clone(),
                    })
                    .clone()
            })
        })
    }

    fn gates(&self) -> impl Iterator<Item = &Arc<Gate>> {
        self.global
            .iter()
            .chain(self.interfaces.iter().flatten())
            .chain(self.upstreams.iter().flatten())
    }

    /// Close a window: adapt the limits, move the admission level, export the gauges.
    pub fn tick(&self, metrics: &Metrics) {
        for g in self.gates() {
            g.close_window();
        }
        if let Some(a) = &self.admission {
            if self.enabled {
                a.close_window();
            }
            let level = a.level.load(Ordering::Relaxed);
            let levels = a.spec.user_levels;
            for (part, v) in [("business", level / levels), ("user", level % levels)] {
                metrics
                    .overload_admission_level
                    .get_or_create(&LevelLabels { part })
                    .set(i64::from(v));
            }
            let last = a.last.lock().unwrap_or_else(PoisonError::into_inner);
            metrics
                .overload_queue_delay_seconds
                .set(last.mean_queue_ms / 1000.0);
            metrics
                .overload_overloaded
                .set(i64::from(a.overloaded.load(Ordering::Relaxed)));
        }
        for g in self.gates() {
            let labels = GateLabels {
                scope: g.scope,
                name: g.name.clone(),
            };
            metrics
                .overload_limit
                .get_or_create(&labels)
                .set(i64::from(g.limit.load(Ordering::Relaxed)));
            metrics
                .overload_in_flight
                .get_or_create(&labels)
                .set(i64::from(g.in_flight.load(Ordering::Relaxed)));
            metrics
                .overload_queue_depth
                .get_or_create(&labels)
                .set(i64::from(g.waiting.load(Ordering::Relaxed)));
        }
    }

    /// The state for `/admin/overload`.
    pub fn status(&self) -> Status {
        Status {
            enabled: self.enabled,
            admission: self.admission.as_ref().map(|a| {
                let rank = a.level.load(Ordering::Relaxed);
                let levels = a.spec.user_levels;
                LevelStatus {
                    rank,
                    business: business_of_rank(rank / levels),
                    user: rank % levels,
                    user_levels: levels,
                    epoch: a.epoch.load(Ordering::Relaxed),
                    last_window: a
                        .last
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone(),
                }
            }),
            caps: self.gates().map(|g| g.status()).collect(),
        }
    }
}

/// The rotation epoch of user priorities now.
fn epoch_now(spec: &AdmissionSpec) -> u64 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    spec.epoch(secs)
}

// === impl Admission ===

impl Admission {
    fn new(spec: AdmissionSpec) -> Self {
        let controller = LevelController::new(&spec);
        Self {
            level: AtomicU32::new(controller.level()),
            epoch: AtomicU64::new(epoch_now(&spec)),
            offered: (0..spec.ranks()).map(|_| AtomicU64::new(0)).collect(),
            passed: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            wait_us: AtomicU64::new(0),
            queue_rejected: AtomicU64::new(0),
            controller: Mutex::new(controller),
            last: Mutex::new(WindowReport::default()),
            overloaded: AtomicBool::new(false),
            spec,
        }
    }

    /// The current level.
    pub fn level(&self) -> u32 {
        self.level.load(Ordering::Relaxed)
    }

    /// Close the window: judge overload, move the level, start the next window.
    fn close_window(&self) {
        let offered: Vec<u64> = self
            .offered
            .iter()
            .map(|c| c.swap(0, Ordering::Relaxed))
            .collect();
        let passed = self.passed.swap(0, Ordering::Relaxed);
        let admitted = self.admitted.swap(0, Ordering::Relaxed);
        let wait_us = self.wait_us.swap(0, Ordering::Relaxed);
        let queue_rejected = self.queue_rejected.swap(0, Ordering::Relaxed);
        let mean_wait_us = wait_us.checked_div(passed).unwrap_or(0);
        // Overloaded: requests wait too long on average, or more than 1% of them are
        // refused at a cap (a queue that is short or fast to time out never builds a
        // mean wait, but it does refuse).
        let overloaded = mean_wait_us as u128 > self.spec.queue_delay_threshold.as_micros()
            || queue_rejected * 100 > passed.max(1);
        let level = {
            let mut c = self
                .controller
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            c.adjust(&LevelWindow {
                offered: &offered,
                admitted,
                overloaded,
            })
        };
        let before = self.level.swap(level, Ordering::Relaxed);
        if before != level {
            let levels = self.spec.user_levels;
            tracing::debug!(
                target: "tidegate::overload",
                level,
                business = ?business_of_rank(level / levels),
                user = level % levels,
                overloaded,
                passed,
                admitted,
                queue_rejected,
                mean_wait_us,
                "admission level moved"
            );
        }
        self.overloaded.store(overloaded, Ordering::Relaxed);
        self.epoch.store(epoch_now(&self.spec), Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = WindowReport {
            offered: offered.iter().sum(),
            passed,
            admitted,
            queue_rejected,
            mean_queue_ms: mean_wait_us as f64 / 1000.0,
            overloaded,
        };
    }
}

// === impl Gate ===

impl Gate {
    fn new(scope: &'static str, name: &str, def: GateDef) -> Self {
        let adaptive = match def.cap {
            Some(UpstreamCap::Adaptive(spec)) => Some(Mutex::new(Gradient::new(spec))),
            _ => None,
        };
        let limit = adaptive.as_ref().map_or(def.fixed, |g| {
            g.lock().unwrap_or_else(PoisonError::into_inner).limit()
        });
        Self {
            scope,
            name: Name::from(name),
            def,
            slots: Mutex::new(Slots {
                free: i64::from(limit),
                queues: Default::default(),
                next_id: 0,
            }),
            limit: AtomicU32::new(limit),
            in_flight: AtomicU32::new(0),
            peak: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            rtt_sum_us: AtomicU64::new(0),
            rtt_calls: AtomicU32::new(0),
            adaptive,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Slots in use.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take a slot, waiting until `deadline` at most, queued in business band `band`.
    async fn acquire(self: &Arc<Self>, deadline: Instant, band: usize) -> Result<Slot, Reason> {
        let rx = {
            let mut s = self.lock();
            if s.free > 0 && s.queues.iter().all(VecDeque::is_empty) {
                s.free -= 1;
                drop(s);
                return Ok(self.taken());
            }
            if self.waiting.load(Ordering::Relaxed) >= self.def.max_queue {
                return Err(Reason::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let id = s.next_id;
            s.next_id += 1;
            s.queues[band].push_back((id, tx));
            self.waiting.fetch_add(1, Ordering::Relaxed);
            (rx, id)
        };
        let (rx, id) = rx;
        let mut waiter = Waiter {
            gate: self,
            band,
            id,
            taken: false,
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(())) => {
                waiter.taken = true;
                Ok(self.taken())
            }
            Ok(Err(_)) => Err(Reason::QueueFull),
            Err(_) => Err(Reason::QueueTimeout),
        }
    }

    /// Count a slot just taken.
    fn taken(self: &Arc<Self>) -> Slot {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        Slot { gate: self.clone() }
    }

    /// Add `n` free slots (negative: retire), handing them to waiters, best band first.
    fn give(&self, n: i64) {
        let mut s = self.lock();
        s.free += n;
        while s.free > 0 {
            let Some((_, tx)) = s.queues.iter_mut().rev().find_map(VecDeque::pop_front) else {
                break;
            };
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            // A waiter whose receiver is gone (its wait was cancelled between leaving the
            // queue and now) cannot take it: try the next.
            if tx.send(()).is_ok() {
                s.free -= 1;
            }
        }
    }

    /// Change the limit: the difference is added to (or retired from) the free slots.
    fn set_limit(&self, new: u32) {
        let old = self.limit.swap(new, Ordering::Relaxed);
        self.give(i64::from(new) - i64::from(old));
    }

    fn close_window(&self) {
        let peak = self
            .peak
            .swap(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        let sum = self.rtt_sum_us.swap(0, Ordering::Relaxed);
        let calls = self.rtt_calls.swap(0, Ordering::Relaxed);
        let Some(g) = &self.adaptive else { return };
        let w = RttWindow {
            calls,
            mean_rtt: Duration::from_micros(if calls == 0 {
                0
            } else {
                sum / u64::from(calls)
            }),
            peak_in_flight: peak,
        };
        let limit = g.lock().unwrap_or_else(PoisonError::into_inner).update(&w);
        if limit != self.limit() {
            self.set_limit(limit);
        }
    }

    fn status(&self) -> GateStatus {
        let g = self
            .adaptive
            .as_ref()
            .map(|g| g.lock().unwrap_or_else(PoisonError::into_inner).clone());
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        GateStatus {
            scope: self.scope,
            name: self.name.0.to_string(),
            limit: self.limit(),
            in_flight: self.in_flight(),
            queue_depth: self.waiting.load(Ordering::Relaxed),
            kind: if g.is_some() { "adaptive" } else { "fixed" },
            baseline_ms: g.as_ref().and_then(Gradient::baseline).map(ms),
            target_ms: g.as_ref().and_then(Gradient::target).map(ms),
        }
    }
}

// === impl Slot ===

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.gate.give(1);
    }
}

// === impl Waiter ===

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let mut s = self.gate.lock();
        let q = &mut s.queues[self.band];
        if let Some(pos) = q.iter().position(|(id, _)| *id == self.id) {
            q.remove(pos);
            self.gate.waiting.fetch_sub(1, Ordering::Relaxed);
        } else {
            // Handed a slot it never took: give it back.
            drop(s);
            self.gate.give(1);
        }
    }
}

// === impl Pending ===

impl Pending {
    /// Take every slot, within the queue timeout in all. On refusal, the 503 to answer.
    pub async fn acquire(mut self) -> Result<Held, Response<Full<Bytes>>> {
        let started = Instant::now();
        let deadline = started + self.deadline;
        let mut slots: [Option<Slot>; 3] = [None, None, None];
        let mut refused = None;
        for (i, g) in self.gates.iter().enumerate() {
            let Some(g) = g else { continue };
            match g.acquire(deadline, self.band).await {
                Ok(s) => slots[i] = Some(s),
                Err(r) => {
                    refused = Some(r);
                    break;
                }
            }
        }
        let waited = started.elapsed();
        if let Some(a) = &self.admission {
            a.passed.fetch_add(1, Ordering::Relaxed);
            a.wait_us
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
            match refused {
                None => a.admitted.fetch_add(1, Ordering::Relaxed),
                Some(_) => a.queue_rejected.fetch_add(1, Ordering::Relaxed),
            };
        }
        match refused {
            None => Ok(Held {
                slots,
                since: std::time::Instant::now(),
            }),
            Some(r) => {
                if let Some(c) = self.counters.take() {
                    c[r as usize].inc();
                }
                Err(respond::overloaded(&self.retry_after))
            }
        }
    }
}

// === impl Held ===

impl Held {
    /// Give the slots back; `latency` (request sent to response head, or to the failure) is
    /// the adaptive limit's sample.
    pub fn finish(self, latency: Option<Duration>) {
        let latency = latency.unwrap_or_else(|| self.since.elapsed());
        if let Some(s) = &self.slots[0]
            && s.gate.adaptive.is_some()
        {
            s.gate
                .rtt_sum_us
                .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
            s.gate.rtt_calls.fetch_add(1, Ordering::Relaxed);
        }
        drop(self.slots);
    }
}

#[cfg(test)]
mod tests;
