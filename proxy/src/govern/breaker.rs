//! Circuit breakers: per upstream (or per route's use of one), closed → open → half-open.
//!
//! Closed, a breaker lets everything through and keeps outcome counts over a sliding window
//! (ten buckets of a tenth of the window each). Once the window holds `min_calls` calls and
//! the failure ratio or the slow-call ratio reaches its threshold, it opens: requests get the
//! breaker's answer (or its alternate upstream) without touching the upstream. After
//! `open_for` the next request half-opens it: `half_open_probes` requests go through; all
//! succeeding closes it, any failing opens it again.
//!
//! A dry-run breaker (`mode: dry_run`) runs the same state machine on the same outcomes,
//! but where it would refuse it lets the request through with a *shadow* permit, whose
//! outcome it ignores (as it ignores a refused request's, which never happened): its
//! states are what an enforced breaker's would be, and nobody is kept from the upstream.
//!
//! Time is passed in (nanoseconds since [`epoch`]), so the state machine is tested without
//! sleeping. The closed state is read with one atomic load, so a healthy upstream's requests
//! never take the lock to be admitted, and the outcome of a call made while closed is
//! counted in the window with atomic adds: the lock is taken only to rotate a bucket into a
//! new interval (once per bucket per tenth of the window), to change state, and for
//! half-open probes.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rules::Snapshot;
use rules::degrade::CompiledBreaker;

use crate::metrics::Name;

/// Buckets of the sliding window.
const BUCKETS: usize = 10;

/// The ring the window's buckets rotate through: more slots than buckets, a power of two, so
/// an interval's slot is a mask of its number rather than a division's remainder; a slot
/// whose interval has left the window is not counted (its epoch says so).
const SLOTS: usize = 16;
const _: () = assert!(SLOTS.is_power_of_two() && SLOTS >= BUCKETS);

/// A breaker's state, as exported (`tidegate_breaker_state`: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests flow; outcomes are watched.
    Closed = 0,
    /// Requests are answered without the upstream.
    Open = 1,
    /// A few probes flow; the rest are answered as when open.
    HalfOpen = 2,
}

/// A state change, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Before.
    pub from: State,
    /// After.
    pub to: State,
}

/// How a request's call went, as the breaker judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// A response below 500.
    Success,
    /// A 5xx response, a connect failure, a reset or a timeout.
    Failure,
}

/// The runtime state of one breaker.
#[derive(Debug)]
pub struct Breaker {
    /// Its definition.
    pub def: CompiledBreaker,
    /// Its name, as a metric label.
    pub name: Name,
    /// The guarded upstream's name, as a metric label.
    pub upstream: Name,
    /// The state, shared with the breaker of the same definition in the next runtime when a
    /// reload keeps it (the definition is rebuilt: upstream IDs may move).
    core: Arc<Core>,
}

#[derive(Debug)]
struct Core {
    /// Mirror of the state for the lock-free closed-state check.
    fast: AtomicU8,
    /// Outcome counts of the closed state. Added to without the lock; buckets are rotated,
    /// and the window cleared, under it.
    window: Window,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Phase,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: u64 },
    HalfOpen { issued: u32, succeeded: u32 },
}

#[derive(Debug)]
struct Window {
    bucket_ns: u64,
    buckets: [Bucket; SLOTS],
    /// One past the latest epoch a failure or slow call was counted in (0: none yet). A
    /// good call when every bad one has left the window cannot trip the breaker (no
    /// failures, no slow calls), so it skips summing the buckets. Never lowered (a clear
    /// leaves it: a stale high value only costs a sum).
    last_bad: AtomicU64,
}

/// What [`Window::add`] did.
enum Added {
    /// Counted; the window's (calls, failures, slow calls).
    Counts((u32, u32, u32)),
    /// Counted: a good call with no bad one in the window.
    Clean,
    /// Not counted: the bucket must be rotated first ([`Window::add_locked`]).
    Rotate,
}

/// One interval's counts. `epoch` is written (with the counts reset before it) only under
/// the breaker's lock; the counts are added to without it once `epoch` is the caller's.
#[derive(Debug, Default)]
struct Bucket {
    /// Index of the bucket-length interval this bucket counts (`now / bucket_ns`).
    epoch: AtomicU64,
    calls: AtomicU32,
    failures: AtomicU32,
    slow: AtomicU32,
}

/// The breaker's verdict on one request.
#[derive(Debug)]
pub enum Admission<'b> {
    /// Go ahead; report the outcome through the permit.
    Pass(Permit<'b>),
    /// Do not call the upstream.
    Reject,
    /// A dry-run breaker would not call the upstream: go ahead; the permit's outcome is not
    /// counted.
    Shadow(Permit<'b>),
}

/// Leave to call the upstream. Report the outcome with [`Permit::finish`]; a permit dropped
/// unreported (the client went away, the body was refused) tells the breaker nothing, and a
/// half-open probe slot it held is given back.
///
/// It borrows its breaker (a request holds the runtime its decision was made by until the
/// outcome is reported): no reference count taken and given back per call.
#[derive(Debug)]
pub struct Permit<'b> {
    breaker: &'b Breaker,
    probe: bool,
    /// Issued by a dry-run breaker in place of a refusal: its outcome is not recorded.
    shadow: bool,
    done: bool,
}

/// The breakers of every definition in force, indexed like the snapshot's breakers.
#[derive(Debug, Default)]
pub struct Breakers {
    /// One per breaker definition.
    pub by_id: Vec<Arc<Breaker>>,
}

/// Breaker time: nanoseconds since the first reading in this process (one epoch for all
/// breakers, so a breaker carried over a reload keeps meaningful timestamps), on the
/// request path's clock ([`crate::clock::Stamp`]).
pub fn now() -> u64 {
    crate::clock::Stamp::now().nanos()
}

// === impl State ===

impl State {
    /// Metric and log label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

// === impl Breaker ===

impl Breaker {
    /// A closed breaker for a definition.
    pub fn new(def: CompiledBreaker, upstream: Name) -> Self {
        let bucket_ns = (def.window.as_nanos() as u64 / BUCKETS as u64).max(1);
        Self {
            name: Name(def.name.as_ref().into()),
            upstream,
            def,
            core: Arc::new(Core {
                fast: AtomicU8::new(State::Closed as u8),
                window: Window {
                    bucket_ns,
                    buckets: Default::default(),
                    last_bad: AtomicU64::new(0),
                },
                inner: Mutex::new(Inner {
                    state: Phase::Closed,
                }),
            }),
        }
    }

    /// This breaker's state under a new (equal) definition, for a reload.
    fn carried(&self, def: CompiledBreaker, upstream: Name) -> Self {
        Self {
            name: Name(def.name.as_ref().into()),
            upstream,
            def,
            core: Arc::clone(&self.core),
        }
    }

    /// The state now.
    pub fn state(&self) -> State {
        match self.core.fast.load(Ordering::Acquire) {
            0 => State::Closed,
            1 => State::Open,
            _ => State::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.core
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, inner: &mut Inner, to: Phase) -> Option<Transition> {
        let from = phase_state(inner.state);
        inner.state = to;
        let to = phase_state(to);
        self.core.fast.store(to as u8, Ordering::Release);
        (from != to).then_some(Transition { from, to })
    }

    /// Would [`Breaker::admit`] let a request through at `now`? Reads the state only: no
    /// probe slot is taken and no transition made (`explain`).
    pub fn would_admit(&self, now: u64) -> bool {
        if self.core.fast.load(Ordering::Acquire) == State::Closed as u8 {
            return true;
        }
        match self.lock().state {
            Phase::Closed => true,
            Phase::Open { until } => now >= until,
            Phase::HalfOpen { issued, .. } => issued < self.def.half_open_probes,
        }
    }

    /// May a request call the upstream at `now`? Also returns the transition to half-open
    /// when this request is the one that ends the open period.
    pub fn admit(&self, now: u64) -> (Admission<'_>, Option<Transition>) {
        self.admit_at(|| now)
    }

    /// [`Breaker::admit`], reading the time only when the breaker is not closed (a closed
    /// breaker admits whatever the time).
    pub fn admit_at(&self, now: impl FnOnce() -> u64) -> (Admission<'_>, Option<Transition>) {
        if self.core.fast.load(Ordering::Acquire) == State::Closed as u8 {
            return (Admission::Pass(self.permit(false)), None);
        }
        let now = now();
        let mut inner = self.lock();
        let mut transition = None;
        if let Phase::Open { until } = inner.state {
            if now < until {
                return (self.refuse(), None);
            }
            transition = self.set(
                &mut inner,
                Phase::HalfOpen {
                    issued: 0,
                    succeeded: 0,
                },
            );
        }
        let admission = match &mut inner.state {
            Phase::Closed => Admission::Pass(self.permit(false)),
            Phase::HalfOpen { issued, .. } if *issued < self.def.half_open_probes => {
                *issued += 1;
                Admission::Pass(self.permit(true))
            }
            _ => self.refuse(),
        };
        (admission, transition)
    }

    /// A refusal: or for a dry-run breaker, a shadow permit.
    fn refuse(&self) -> Admission<'_> {
        match self.def.dry_run {
            true => {
                let mut p = self.permit(false);
                p.shadow = true;
                Admission::Shadow(p)
            }
            false => Admission::Reject,
        }
    }

    /// A closed breaker's permit (it admits whatever the time); `None` otherwise.
    #[inline]
    pub fn admit_closed(&self) -> Option<Permit<'_>> {
        let closed = self.core.fast.load(Ordering::Acquire) == State::Closed as u8;
        closed.then(|| self.permit(false))
    }

    fn permit(&self, probe: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            probe,
            shadow: false,
            done: false,
        }
    }

    fn record(
        &self,
        now: u64,
        result: CallResult,
        latency: Duration,
        probe: bool,
    ) -> Option<Transition> {
        let slow = self.def.slow_call.is_some_and(|s| latency >= s);
        let bad = result == CallResult::Failure || slow;
        let failure = result == CallResult::Failure;
        let window = &self.core.window;
        // The common path: a call made while closed, counted without the lock. The lock is
        // taken when the call's bucket must be rotated first, or when the counts trip it.
        if !probe && self.core.fast.load(Ordering::Acquire) == State::Closed as u8 {
            match window.add(now, failure, slow, self.zero_ratio()) {
                Added::Clean => return None,
                Added::Counts(counts) if !self.trips(counts) => return None,
                Added::Counts(_) => {
                    // Tripped: decided again under the lock (another call may have opened
                    // it meanwhile), without counting this call twice.
                    let mut inner = self.lock();
                    let counts = window.counts(now / window.bucket_ns);
                    return match inner.state {
                        Phase::Closed if self.trips(counts) => self.open(&mut inner, now),
                        _ => None,
                    };
                }
                Added::Rotate => {}
            }
        }
        let mut inner = self.lock();
        match (inner.state, probe) {
            (Phase::HalfOpen { issued, succeeded }, true) => {
                if bad {
                    let until = now + self.def.open_for.as_nanos() as u64;
                    self.set(&mut inner, Phase::Open { until })
                } else if succeeded + 1 >= self.def.half_open_probes {
                    window.clear();
                    self.set(&mut inner, Phase::Closed)
                } else {
                    inner.state = Phase::HalfOpen {
                        issued,
                        succeeded: succeeded + 1,
                    };
                    None
                }
            }
            (Phase::Closed, false) => {
                // Under the lock: the bucket is rotated here if it has to be.
                let counts = window.add_locked(now, failure, slow);
                match self.trips(counts) {
                    true => self.open(&mut inner, now),
                    false => None,
                }
            }
            // A call admitted before the state changed, or a probe of a finished half-open
            // round: it says nothing about the current state.
            _ => None,
        }
    }

    /// Whether a ratio of 0% makes calls alone open the breaker (then even a window of good
    /// calls is summed).
    fn zero_ratio(&self) -> bool {
        let d = &self.def;
        d.error_ratio_ppm == 0 || (d.slow_call.is_some() && d.slow_ratio_ppm == 0)
    }

    /// Whether the closed window's (calls, failures, slow calls) open the breaker.
    fn trips(&self, (calls, failures, slows): (u32, u32, u32)) -> bool {
        let d = &self.def;
        let over = |n: u32, ppm: u32| u64::from(n) * 1_000_000 >= u64::from(ppm) * u64::from(calls);
        calls >= d.min_calls
            && (over(failures, d.error_ratio_ppm)
                || (d.slow_call.is_some() && over(slows, d.slow_ratio_ppm)))
    }

    /// Closed → open at `now` (under the lock).
    fn open(&self, inner: &mut Inner, now: u64) -> Option<Transition> {
        self.core.window.clear();
        let until = now + self.def.open_for.as_nanos() as u64;
        self.set(inner, Phase::Open { until })
    }

    fn release_probe(&self) {
        let mut inner = self.lock();
        if let Phase::HalfOpen { issued, .. } = &mut inner.state {
            *issued = issued.saturating_sub(1);
        }
    }
}

fn phase_state(p: Phase) -> State {
    match p {
        Phase::Closed => State::Closed,
        Phase::Open { .. } => State::Open,
        Phase::HalfOpen { .. } => State::HalfOpen,
    }
}

// === impl Window ===

impl Window {
    /// Count one call at `now` without the lock, if its bucket already counts `now`'s
    /// interval (see [`Added`]). `zero_ratio`: a good call may trip it too.
    fn add(&self, now: u64, failure: bool, slow: bool, zero_ratio: bool) -> Added {
        let epoch = now / self.bucket_ns;
        let b = &self.buckets[(epoch % SLOTS as u64) as usize];
        if b.epoch.load(Ordering::Acquire) != epoch {
            return Added::Rotate;
        }
        self.bump(b, epoch, failure, slow);
        // SeqCst with `bump`'s: of a good call and a concurrent bad one, either the good one
        // sees `last_bad`, or the bad one's sum sees the good one's call.
        if !(failure || slow || zero_ratio) && self.last_bad.load(Ordering::SeqCst) <= oldest(epoch)
        {
            return Added::Clean;
        }
        Added::Counts(self.counts(epoch))
    }

    /// Count a call in bucket `b` of `epoch`.
    fn bump(&self, b: &Bucket, epoch: u64, failure: bool, slow: bool) {
        if failure || slow {
            self.last_bad.fetch_max(epoch + 1, Ordering::SeqCst);
        }
        b.calls.fetch_add(1, Ordering::SeqCst);
        if failure {
            b.failures.fetch_add(1, Ordering::Relaxed);
        }
        if slow {
            b.slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// [`Window::add`] under the breaker's lock: the bucket is moved to `now`'s interval
    /// (its counts reset) first if it counts another.
    fn add_locked(&self, now: u64, failure: bool, slow: bool) -> (u32, u32, u32) {
        let epoch = now / self.bucket_ns;
        let b = &self.buckets[(epoch % SLOTS as u64) as usize];
        if b.epoch.load(Ordering::Acquire) != epoch {
            // Counts first, then the epoch that lets lock-free adds in (Release): an add
            // that sees the new epoch lands after the reset.
            b.calls.store(0, Ordering::Relaxed);
            b.failures.store(0, Ordering::Relaxed);
            b.slow.store(0, Ordering::Relaxed);
            b.epoch.store(epoch, Ordering::Release);
        }
        self.bump(b, epoch, failure, slow);
        self.counts(epoch)
    }

    /// (calls, failures, slow calls) of the buckets of the last BUCKETS intervals up to
    /// `epoch`, this one included.
    fn counts(&self, epoch: u64) -> (u32, u32, u32) {
        let oldest = oldest(epoch);
        self.buckets.iter().fold((0, 0, 0), |(c, f, s), b| {
            let e = b.epoch.load(Ordering::Acquire);
            let calls = b.calls.load(Ordering::SeqCst);
            if e < oldest || e > epoch || calls == 0 {
                return (c, f, s);
            }
            let failures = b.failures.load(Ordering::Relaxed);
            let slow = b.slow.load(Ordering::Relaxed);
            (c + calls, f + failures, s + slow)
        })
    }

    /// Forget every count (under the lock).
    fn clear(&self) {
        for b in &self.buckets {
            b.calls.store(0, Ordering::Relaxed);
            b.failures.store(0, Ordering::Relaxed);
            b.slow.store(0, Ordering::Relaxed);
            b.epoch.store(0, Ordering::Release);
        }
    }
}

/// The oldest epoch of the window that ends with `epoch`.
fn oldest(epoch: u64) -> u64 {
    epoch.saturating_sub(BUCKETS as u64 - 1)
}

// === impl Permit ===

impl<'b> Permit<'b> {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The breaker that issued it.
    pub fn breaker(&self) -> &'b Breaker {
        self.breaker
    }

    /// Report how the call went; returns the state change it caused, if any.
    pub fn finish(mut self, now: u64, result: CallResult, latency: Duration) -> Option<Transition> {
        self.report(now, result, latency)
    }

    /// [`Permit::finish`] without giving the permit up (its breaker stays at hand for the
    /// caller to report a transition, with no reference count taken); a permit reported
    /// once is spent: dropping it afterwards does nothing.
    pub fn report(
        &mut self,
        now: u64,
        result: CallResult,
        latency: Duration,
    ) -> Option<Transition> {
        if self.done {
            return None;
        }
        self.done = true;
        if self.shadow {
            return None;
        }
        self.breaker.record(now, result, latency, self.probe)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.done {
            self.breaker.release_probe();
        }
    }
}

// === impl Breakers ===

impl Breakers {
    /// Breakers for every definition in `snap`; one whose name and definition are unchanged
    /// from `previous` keeps its state (an open breaker stays open across a reload).
    pub fn build(snap: &Snapshot, previous: Option<&Self>) -> Self {
        let by_id = snap
            .governance
            .breakers
            .iter()
            .map(|def| {
                let upstream = Name(snap.upstreams[def.upstream.0 as usize].name.as_ref().into());
                let kept = previous.and_then(|p| {
                    p.by_id
                        .iter()
                        .find(|b| b.def.name == def.name && b.def.fingerprint == def.fingerprint)
                });
                Arc::new(match kept {
                    Some(b) => b.carried(def.clone(), upstream),
                    None => Breaker::new(def.clone(), upstream),
                })
            })
            .collect();
        Self { by_id }
    }
}

#[cfg(test)]
mod tests;
