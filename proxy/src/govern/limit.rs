//! Rate limit enforcement: one keyed GCRA limiter per limit rule and quota.
//!
//! The rules crate says which limits apply to a request, under which quota, and hands over a
//! 64-bit key; this module counts. Each quota of each rule is one `Gcra` over a
//! [`KeyStore`]: a sharded hash table from the `u64` key to the key's GCRA state (its
//! theoretical arrival time, another `u64`), so a tracked key costs one 16-byte slot in a
//! table at most half full, whatever the length of the user ID (a rule with one key for
//! every request, a global or pair limit, keeps it in one atomic instead). Keys whose state
//! has become indistinguishable from a fresh one are dropped by [`Limiters::retain_recent`],
//! which a housekeeping task runs periodically, so memory follows the active users, not
//! every user ever seen.
//!
//! Limits apply in rule order; the first enforced limit that refuses rejects the request and
//! the limits after it are not consulted, so they spend no quota on a request that will not
//! reach the upstream. A `dry_run` limit that refuses is reported and passed over.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock, Reference};
use http::{HeaderName, HeaderValue, Response, header};
use http_body_util::Full;
use parking_lot::{Mutex, MutexGuard};
use prometheus_client::metrics::counter::Counter;
use rules::limit::{CompiledLimit, LimitQuota, Pacing};
use rules::model::{LimitMode, LimitScope};
use rules::{RouteInput, Snapshot};

use super::cluster::{ClusterLimiter, Local};
use crate::metrics::Name;
use crate::respond::{self, GatewayError};
use table::{Entry, KeyTable};

mod table;

/// Lease length of cluster-scope rules when `server.redis` gives none.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(100);

/// Shards of a [`KeyStore`]: enough that two cores (or sixteen) rarely meet on one lock.
const SHARDS: usize = 64;

/// Keyed GCRA state: `u64` key → theoretical arrival time (nanoseconds since the limiter's
/// start), sharded by the key's top bits, each shard under its own mutex.
///
/// A mutex rather than atomics per entry: the critical section is one hash probe and one
/// store (tens of nanoseconds), and a plain `u64` value keeps entries at 16 bytes.
/// `parking_lot`'s: no poisoning to check on each lock and unlock (a panic while holding it
/// cannot leave a half-written `u64` behind).
///
/// Laid out in declaration order (`repr(C)`), as the limiter holding it is: a one-key
/// store's state first, on the cache line its rule's check reads.
#[derive(Debug)]
#[repr(C)]
pub struct KeyStore {
    /// A [`KeyStore::single`] store's one state ([`NO_TAT`]: none).
    single: Option<AtomicU64>,
    /// Whether a keyed store may track a key: set when one is inserted, cleared by a sweep
    /// that leaves every shard empty and small, so sweeping a limiter nobody used costs one
    /// load (a thousand rules with a few busy ones is the common shape). A one-key store's state
    /// says it itself ([`KeyStore::in_use`]); its check does not touch this.
    used: AtomicBool,
    /// Empty for a [`KeyStore::single`] store.
    shards: Box<[Mutex<KeyTable>]>,
    /// The keys a keyed store held at its last sweep, per sweep period since the one before
    /// (`usize::MAX` before its first): whether the frequent sweep visits it ([`BUSY_KEYS`]).
    peak: AtomicUsize,
}

/// Keys a keyed store must take in per sweep period for the frequent sweep to visit it
/// ([`Limiters::retain_recent_keyed`]); a quieter store waits for the full sweep, every
/// [`QUIET_PERIODS`] periods. A sweep costs per shard as well as per key (a lock, a walk over
/// every slot of 64 small, mostly empty tables), so a store of a few hundred keys a second
/// costs more per key swept every period than every few (at 400 requests/s over 100,000
/// users: 84 → 64 instructions per request), while the keys of a store below this, held a
/// few seconds longer, are a few hundred KB at most.
pub const BUSY_KEYS: usize = 4096;

/// Every how many sweep periods the full sweep comes, the one that visits quiet stores
/// (`control::housekeep::FULL_SWEEP_EVERY`): what a quiet store held at its sweep is that
/// many periods' keys, so it is measured per period before it is weighed against
/// [`BUSY_KEYS`] (else a store of 1,000 keys a second, 5,000 at the full sweep, would be
/// busy for one period after each, its tables shrunk and grown again every time).
pub const QUIET_PERIODS: usize = 5;

/// No state for the key (a [`KeyStore::single`] store's empty value).
const NO_TAT: u64 = u64::MAX;

/// The runtime limiter of one limit rule.
///
/// Laid out in declaration order (`repr(C)`): what the limit phase reads for every request
/// first (whether the check is the short one, the mode, the base quota's arithmetic and
/// one-key state, then its counters), so a one-key rule's check reads two cache lines of
/// it rather than three or four spread over its 376 bytes; what a keyed rule's check adds
/// next.
#[derive(Debug)]
#[repr(C)]
pub struct RuleLimiter<C: Clock = DefaultClock> {
    /// Counted here, unpaced, one key for every request and no exceptions (a global or
    /// pair limit, most of a large config's): its check needs neither the compiled rule
    /// (key, quota) nor anything but [`RuleLimiter::base`], so the limit phase takes a
    /// short path for it.
    simple: bool,
    /// Enforce or dry run.
    pub mode: LimitMode,
    /// The base quota ([`CompiledLimit::quotas`]`[0]`): inline, where the limit phase reads it.
    base: QuotaLimiter<C>,
    /// Handles of this rule's decision counters (one per [`Outcome`], in order), taken
    /// from the metric family on first use so that counting a decision is one atomic add,
    /// not a family lookup.
    pub counters: OnceLock<[Counter; Outcome::ALL.len()]>,
    /// For a paced rule (`max_delay_ms`): how long a request may wait, and the queue.
    pub pacing: Option<PaceQueue>,
    /// For a `scope: cluster` rule: its leases of the shared Redis quota. Its `quotas` then
    /// go unused except for their policy headers.
    pub cluster: Option<ClusterLimiter>,
    /// Rule name (metric label, logs).
    pub name: Name,
    /// Definition hash from the snapshot: state is carried over a reload only when it is
    /// unchanged.
    pub fingerprint: u64,
    /// The exceptions' quotas, indexed like [`CompiledLimit::quotas`]`[1..]`.
    exceptions: Box<[QuotaLimiter<C>]>,
    /// What the quotas' arrival times are read from.
    clock: C,
    /// `{"error":"rate_limited","rule":"NAME"` (the rest is added per answer).
    body_prefix: Bytes,
    /// `"NAME"` as a structured-field string, for the `RateLimit` header.
    sf_name: Box<str>,
}

#[derive(Debug)]
#[repr(C)]
struct QuotaLimiter<C: Clock> {
    gcra: Gcra<C>,
    /// `RateLimit-Policy` for this quota, built once.
    policy: HeaderValue,
}

/// One quota's GCRA (virtual scheduling): governor's arithmetic, over a [`KeyStore`], plus
/// reserving a future turn for paced rules.
///
/// Not governor's `RateLimiter`, whose `check_key` reads the clock each time: a request
/// meets several limits, and they all count it at the one instant the caller read
/// ([`Limiters::check`]). `gcra_decides_as_governor` checks it against governor's limiter.
#[derive(Debug)]
#[repr(C)]
struct Gcra<C: Clock> {
    /// Emission interval, in nanoseconds (governor's `t`).
    interval: u64,
    /// Burst tolerance, in nanoseconds: `interval × (burst − 1)` (governor's `tau`).
    tolerance: u64,
    /// Zero of the stored theoretical arrival times.
    start: C::Instant,
    store: KeyStore,
}

/// The queue of a paced rule: requests waiting for their turn, over all its keys.
#[derive(Debug)]
pub struct PaceQueue {
    /// Longest wait, in nanoseconds.
    max_delay: u64,
    /// Most requests waiting at once.
    max_queue: u32,
    /// Requests waiting now: raised by [`Waiter::enter`], lowered when the [`Waiter`] is
    /// dropped (its wait is over, or the client went away).
    waiting: Arc<AtomicU32>,
}

/// The wait of a request paced by one or more limits: it is forwarded at `until`, holding
/// a place in each one's queue meanwhile.
#[derive(Debug)]
pub struct Pace {
    /// When its turn comes (the latest of its limits' turns).
    pub until: std::time::Instant,
    /// Its places in the queues.
    waiters: Vec<Waiter>,
}

/// A request's place in a paced rule's queue, held while it waits. Dropping it frees the
/// place; the turn it reserved stays spent (not given back to the key: a later request is
/// not moved earlier, so a client that leaves costs its key one interval).
#[derive(Debug)]
pub struct Waiter(Arc<AtomicU32>);

/// The limiters of every limit rule in force, indexed like the snapshot's limits.
#[derive(Debug)]
pub struct Limiters<C: Clock = DefaultClock> {
    /// One per limit rule.
    pub rules: Vec<Arc<RuleLimiter<C>>>,
    /// Whether some rule is cluster-scope: without one, a request has nothing to set aside
    /// for Redis ([`Limiters::check_remote`]).
    pub any_cluster: bool,
    /// The rules keyed by something (user, IP, header, ...): their tables grow with the keys
    /// seen, so they are swept more often ([`Limiters::retain_recent_keyed`]).
    keyed: Box<[u32]>,
}

/// What one limit did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted (quota spent).
    Allowed,
    /// Refused by an enforced limit: the request is rejected.
    Limited,
    /// Refused by a dry-run limit: counted, logged, and let through.
    DryRunLimited,
    /// Over the rate of a paced limit, within its `max_delay_ms`: admitted after waiting
    /// for its turn (the wait is the reported duration).
    Paced,
    /// A dry-run paced limit would have made it wait (it did not).
    DryRunPaced,
}

/// A cluster-scope check that needs Redis: made after the synchronous decision, by
/// [`super::ClusterPending::resolve`].
#[derive(Debug, Clone)]
pub struct RemoteCheck<C: Clock = DefaultClock> {
    /// The rule (its [`RuleLimiter::cluster`] is set).
    pub rule: Arc<RuleLimiter<C>>,
    /// Which quota.
    pub quota: u16,
    /// The hashed key.
    pub key: u64,
    /// Only a background refill of a lease running low: the request was already admitted.
    pub refill_only: bool,
}

/// A rejected request: which rule refused it and when to retry.
#[derive(Debug, Clone)]
pub struct Rejection<C: Clock = DefaultClock> {
    /// The refusing rule's limiter.
    pub rule: Arc<RuleLimiter<C>>,
    /// Which of its quotas refused.
    pub quota: u16,
    /// Time until the key conforms again.
    pub retry_after: Duration,
}

thread_local! {
    /// Reused list of the limits applying to the current request (no allocation per request).
    static SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Set while [`peeking`]: key stores answer as they would, but keep their state.
    static PEEKING: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with every [`KeyStore`] on this thread read-only: limiters checked inside answer
/// whether they would admit now without spending quota (`explain` on the live gateway).
pub fn peeking<T>(f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PEEKING.with(|p| p.set(false));
        }
    }
    PEEKING.with(|p| p.set(true));
    let _reset = Reset;
    f()
}

// === impl Rejection ===

impl<C: Clock + Clone> Rejection<C> {
    /// 429 for the refused request: `Retry-After` (whole seconds, rounded up),
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-09), and a
    /// body naming the rule: `{"error":"rate_limited","rule":"NAME","retry_after_ms":N}`.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut r = respond::json(
            GatewayError::RateLimited.status(),
            self.rule.body(self.retry_after),
        );
        let h = r.headers_mut();
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(ceil_secs(self.retry_after)),
        );
        h.insert(
            RATELIMIT_POLICY.clone(),
            self.rule.policy(self.quota).clone(),
        );
        h.insert(
            RATELIMIT.clone(),
            self.rule.rate_limit_header(self.retry_after),
        );
        r
    }
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

// === impl Outcome ===

impl Outcome {
    /// Every outcome, in counter order.
    pub const ALL: [Outcome; 5] = [
        Self::Allowed,
        Self::Limited,
        Self::DryRunLimited,
        Self::Paced,
        Self::DryRunPaced,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Limited => "limited",
            Self::DryRunLimited => "dry_run_limited",
            Self::Paced => "paced",
            Self::DryRunPaced => "dry_run_paced",
        }
    }
}

// === impl KeyStore ===

impl KeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            shards: {
                // One seed for the store's tables, unknown to clients (see `table`).
                let seed = rand::random::<u64>();
                (0..SHARDS)
                    .map(|_| Mutex::new(KeyTable::new(seed)))
                    .collect()
            },
            used: AtomicBool::new(false),
            single: None,
            peak: AtomicUsize::new(usize::MAX),
        }
    }

    /// An empty store for a rule whose requests all share one key (a global or pair limit):
    /// that key's state in one atomic, updated by compare-and-swap as governor's direct
    /// limiters do, instead of a shard lock and a hash probe; and no shards (a thousand
    /// pair limits are a thousand of these). The key passed in is not looked at. Not for
    /// paced rules ([`KeyStore::reserve`] needs shards).
    pub fn single() -> Self {
        Self {
            shards: Box::new([]),
            used: AtomicBool::new(false),
            single: Some(AtomicU64::new(NO_TAT)),
            peak: AtomicUsize::new(0),
        }
    }

    /// Replace `key`'s state (`None`: fresh) with what `f` makes of it, or leave it as it
    /// was when `f` refuses; nothing is stored while [`peeking`].
    #[inline]
    fn update<E>(&self, key: u64, f: impl Fn(Option<u64>) -> Result<u64, E>) -> Result<(), E> {
        match &self.single {
            Some(a) => self.update_single(a, f),
            None => self.update_keyed(key, f),
        }
    }

    /// [`KeyStore::update`] of a keyed store: inlined into the limit phase's out-of-line
    /// path for keyed rules (`Limiters::check_rule`), whose frame it shares; the one-key
    /// stores' short path does not reach it (`RuleLimiter::check_simple`).
    #[inline(always)]
    fn update_keyed<E>(
        &self,
        key: u64,
        f: impl Fn(Option<u64>) -> Result<u64, E>,
    ) -> Result<(), E> {
        let mut table = Self::lock(self.shard(key));
        if PEEKING.with(Cell::get) {
            return f(table.get(key)).map(drop);
        }
        match table.entry(key) {
            Entry::Occupied(tat) => {
                *tat = f(Some(*tat))?;
            }
            // A refused request never creates an entry.
            Entry::Vacant(e) => {
                e.insert(f(None)?);
                self.mark_used();
            }
        }
        Ok(())
    }

    /// [`KeyStore::update`] on a [`KeyStore::single`] store's state `a`.
    #[inline]
    fn update_single<E>(
        &self,
        a: &AtomicU64,
        f: impl Fn(Option<u64>) -> Result<u64, E>,
    ) -> Result<(), E> {
        let state = |v: u64| (v != NO_TAT).then_some(v);
        let mut cur = a.load(Ordering::Acquire);
        if PEEKING.with(Cell::get) {
            return f(state(cur)).map(drop);
        }
        loop {
            let tat = f(state(cur))?;
            match a.compare_exchange_weak(cur, tat, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Whether the store may track a key: a one-key store's state is set, or a keyed store
    /// had one inserted since a sweep left it empty.
    fn in_use(&self) -> bool {
        match &self.single {
            Some(a) => a.load(Ordering::Relaxed) != NO_TAT,
            None => self.used.load(Ordering::Relaxed),
        }
    }

    fn mark_used(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    fn shard(&self, key: u64) -> &Mutex<KeyTable> {
        &self.shards[(key >> 58) as usize % SHARDS]
    }

    fn lock(m: &Mutex<KeyTable>) -> MutexGuard<'_, KeyTable> {
        m.lock()
    }

    /// GCRA with reservations, at `now` (nanoseconds since the store's zero): a request
    /// conforming now is admitted as governor would (`Ok(0)`); one that would conform within
    /// `max_wait` reserves the next turn (the key's arrival time moves on by one
    /// `interval`, so the next waiter's turn comes one interval later) and gets its wait,
    /// if `room()` says the queue has a place; any other is refused with its wait, the
    /// state untouched. Nothing is stored while [`peeking`].
    fn reserve(
        &self,
        key: u64,
        now: u64,
        q: (u64, u64),
        max_wait: u64,
        room: impl FnOnce() -> bool,
    ) -> Result<u64, u64> {
        let (interval, tolerance) = q;
        let mut table = Self::lock(self.shard(key));
        let tat = table.get(key).unwrap_or(now);
        let wait = tat.saturating_sub(tolerance).saturating_sub(now);
        if wait > max_wait || (wait > 0 && !room()) {
            return Err(wait);
        }
        if !PEEKING.with(Cell::get) {
            table.insert(key, tat.max(now).saturating_add(interval));
            self.mark_used();
        }
        Ok(wait)
    }

    /// Drop every key whose theoretical arrival time is at or below `drop_below`.
    fn retain_recent(&self, drop_below: u64) {
        if let Some(a) = &self.single {
            let cur = a.load(Ordering::Acquire);
            if cur != NO_TAT && cur <= drop_below {
                // A request that moved it meanwhile wins.
                let _ = a.compare_exchange(cur, NO_TAT, Ordering::AcqRel, Ordering::Acquire);
            }
            return;
        }
        // Cleared first: a key inserted while the sweep runs sets it again.
        if !self.used.swap(false, Ordering::Relaxed) {
            return;
        }
        let mut left = false;
        let mut held = 0;
        for shard in &*self.shards {
            // One shard at a time: requests wait for at most one shard's sweep.
            let mut t = Self::lock(shard);
            // Keys leave only here, so the count before the drop is the most the table held
            // since the last sweep.
            let peak = t.len();
            held += peak;
            t.drop_at_or_below(drop_below);
            // Give memory back once the table went a whole interval mostly empty, not as
            // soon as a sweep drops most keys: where many keys come and go (many users, each
            // seen now and then), the next interval's keys would grow it back, rehashing.
            // Small tables too: the sweep walks every slot, so room kept from a busier
            // minute costs every sweep after it.
            if peak * 4 < t.capacity() {
                let keep = t.len() * 2;
                t.shrink_to(keep);
            }
            // A table emptied with its room kept is looked at again by the next sweep.
            left |= !t.is_empty() || t.capacity() > 0;
        }
        if left {
            self.used.store(true, Ordering::Relaxed);
        }
        // A busy store was swept a period ago, a quiet one at the last full sweep (or, once,
        // fewer periods ago, when it turned quiet: measured low then, it stays quiet).
        let periods = if self.busy() { 1 } else { QUIET_PERIODS };
        self.peak.store(held / periods, Ordering::Relaxed);
    }

    /// Whether the store took in [`BUSY_KEYS`] keys or more per period before its last sweep.
    fn busy(&self) -> bool {
        self.peak.load(Ordering::Relaxed) >= BUSY_KEYS
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        if let Some(a) = &self.single {
            return usize::from(a.load(Ordering::Acquire) != NO_TAT);
        }
        // A store no key was inserted into since a sweep emptied it is empty: one load, not
        // 64 locks (the housekeeping sweep counts the keys of every rule, most unused).
        if !self.used.load(Ordering::Relaxed) {
            return 0;
        }
        self.shards.iter().map(|s| Self::lock(s).len()).sum()
    }

    /// Keys the tables have room for.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.shards.iter().map(|s| Self::lock(s).capacity()).sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for KeyStore {
    fn default() -> Self {
        Self::new()
    }
}

// === impl RuleLimiter ===

impl<C: Clock + Clone> RuleLimiter<C> {
    /// The limiter of a compiled limit rule, reading time from `clock`. A cluster-scope rule
    /// leases `lease` worth of its rate at a time (`server.redis.lease_ms`).
    pub fn build(rule: &CompiledLimit, clock: &C, lease: Duration) -> Self {
        let single = rule.single_key() && rule.pacing.is_none();
        let mut quotas = rule.quotas.iter().map(|q| QuotaLimiter {
            gcra: Gcra::new(
                q,
                match single {
                    true => KeyStore::single(),
                    false => KeyStore::new(),
                },
                clock,
            ),
            policy: policy_header(&rule.name, q),
        });
        let base = quotas.next().expect("a limit has its base quota");
        let exceptions = quotas.collect();
        let mut body_prefix = br#"{"error":"rate_limited","rule":"#.to_vec();
        serde_json::to_writer(&mut body_prefix, &*rule.name).expect("writing to a Vec");
        Self {
            name: Name(rule.name.as_ref().into()),
            fingerprint: rule.fingerprint,
            mode: rule.mode,
            cluster: (rule.scope == LimitScope::Cluster)
                .then(|| ClusterLimiter::build(rule, lease)),
            simple: single && rule.quotas.len() == 1 && rule.scope == LimitScope::Local,
            base,
            exceptions,
            clock: clock.clone(),
            pacing: rule.pacing.map(PaceQueue::new),
            body_prefix: body_prefix.into(),
            sf_name: sf_string(&rule.name).into(),
            counters: OnceLock::new(),
        }
    }

    /// The limiter's clock, read now: the instant to pass to [`Self::check_at`].
    pub fn now(&self) -> C::Instant {
        self.clock.now()
    }

    /// Count one request under `quota` and `key` at `now`, a reading of this limiter's
    /// clock (or a clone of it): `Ok(())` if admitted, or the time until it would be.
    #[inline]
    pub fn check_at(&self, quota: u16, key: u64, now: C::Instant) -> Result<(), Duration> {
        (self.check_ns(quota, key, now))
            .map(drop)
            .map_err(Duration::from_nanos)
    }

    /// [`Self::check_ns`] of a [`RuleLimiter::simple`] limiter, the limit phase's short
    /// path: its base quota's one state, compare-and-swapped in place (no key, no lock).
    #[inline(always)]
    fn check_simple(&self, now: C::Instant) -> Result<u64, u64> {
        let g = &self.base.gcra;
        match &g.store.single {
            Some(a) => {
                let now = g.since_start(now);
                (g.store.update_single(a, |tat| g.step(tat, now))).map(|()| 0)
            }
            // Not built so (`simple` implies a one-key store); kept out of the loop.
            None => self.check_cold(now),
        }
    }

    /// [`Self::check_simple`] of a limiter whose store is keyed after all: the general
    /// check, out of line, so that the keyed store's lock and probe stay out of the limit
    /// loop for a case the limiter's build rules out.
    #[cold]
    #[inline(never)]
    fn check_cold(&self, now: C::Instant) -> Result<u64, u64> {
        self.check_ns(0, 0, now)
    }

    /// [`Self::check_at`] in the limit phase's terms: `Ok(0)` if admitted, else `Err` with
    /// the nanoseconds until it would be.
    #[inline(always)]
    fn check_ns(&self, quota: u16, key: u64, now: C::Instant) -> Result<u64, u64> {
        let g = &self.quota(quota).gcra;
        g.check(key, g.since_start(now)).map(|()| 0)
    }

    /// Count one request under `quota` and `key` at `now`, in nanoseconds: for a paced rule
    /// `Ok(wait)` if admitted after `wait` (zero: now; else its turn is reserved), or
    /// `Err(wait)` if refused (it would wait over `max_delay_ms`, or the queue is full); for
    /// an unpaced one [`Self::check_ns`].
    fn pace_ns(&self, quota: u16, key: u64, now: C::Instant) -> Result<u64, u64> {
        let Some(queue) = &self.pacing else {
            return self.check_ns(quota, key, now);
        };
        let g = &self.quota(quota).gcra;
        // A dry run never waits, so it takes no place in the queue.
        let room = || self.mode == LimitMode::DryRun || queue.has_room();
        (g.store).reserve(
            key,
            g.since_start(now),
            (g.interval, g.tolerance),
            queue.max_delay,
            room,
        )
    }

    /// Keys tracked over all quotas.
    pub fn tracked_keys(&self) -> usize {
        self.quotas().map(|q| q.gcra.store.len()).sum::<usize>()
            + self
                .cluster
                .as_ref()
                .map_or(0, ClusterLimiter::retain_recent)
    }

    /// Whether the limiter holds no key (nothing to sweep or count): most of a large
    /// config's, whose sweep then reads no clock.
    fn idle(&self) -> bool {
        let unused = |q: &QuotaLimiter<C>| !q.gcra.store.in_use();
        self.cluster.is_none() && self.quotas().all(unused)
    }

    /// Whether the frequent sweep visits this limiter: it holds keys, and one of its stores
    /// is busy ([`BUSY_KEYS`]).
    fn keyed_sweep_due(&self) -> bool {
        !self.idle() && self.quotas().any(|q| q.gcra.store.busy())
    }

    /// Drop keys whose state is indistinguishable from a fresh one.
    pub fn retain_recent(&self) {
        if self.idle() {
            return;
        }
        let now = self.now();
        for q in self.quotas() {
            q.gcra.retain_recent(now);
        }
        if let Some(c) = &self.cluster {
            c.retain_recent();
        }
    }

    /// The `RateLimit-Policy` header value of a quota.
    pub fn policy(&self, quota: u16) -> &HeaderValue {
        &self.quota(quota).policy
    }

    /// Quota `q`'s limiter (an index into [`CompiledLimit::quotas`]).
    #[inline(always)]
    fn quota(&self, q: u16) -> &QuotaLimiter<C> {
        match q {
            0 => &self.base,
            _ => &self.exceptions[q as usize - 1],
        }
    }

    /// Every quota's limiter, the base first.
    fn quotas(&self) -> impl Iterator<Item = &QuotaLimiter<C>> {
        std::iter::once(&self.base).chain(&*self.exceptions)
    }

    /// The 429 body: `{"error":"rate_limited","rule":NAME,"retry_after_ms":N}`.
    pub fn body(&self, retry_after: Duration) -> Bytes {
        let mut b = Vec::with_capacity(self.body_prefix.len() + 32);
        b.extend_from_slice(&self.body_prefix);
        b.extend_from_slice(
            format!(",\"retry_after_ms\":{}}}", retry_after.as_millis().max(1)).as_bytes(),
        );
        b.into()
    }

    /// The `RateLimit` header of a refused request: nothing remaining, reset in `t` seconds.
    pub fn rate_limit_header(&self, retry_after: Duration) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "{};r=0;t={}",
            self.sf_name,
            ceil_secs(retry_after)
        ))
        .expect("ASCII without control characters")
    }
}

/// Whole seconds, rounded up, at least 1 (`Retry-After: 0` invites a retry storm).
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000).max(1) as u64
}

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-09): `"NAME";q=QUOTA;w=WINDOW`,
/// the window in whole seconds. Sub-second periods are stated per second.
fn policy_header(name: &str, q: &LimitQuota) -> HeaderValue {
    let period_ns = q.rate.period.as_nanos();
    let (quota, window) = if period_ns.is_multiple_of(1_000_000_000) {
        (u128::from(q.rate.count), period_ns / 1_000_000_000)
    } else {
        (u128::from(q.rate.count) * 1_000_000_000 / period_ns, 1)
    };
    HeaderValue::from_str(&format!("{};q={quota};w={window}", sf_string(name)))
        .expect("ASCII without control characters")
}

/// A structured-field string (RFC 8941 §3.3.3): quoted, with `"` and `\` escaped. Rule names
/// are validated free of whitespace and control characters; anything non-ASCII is replaced.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_ascii_graphic() => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

// === impl Gcra ===

impl<C: Clock> Gcra<C> {
    fn new(q: &LimitQuota, store: KeyStore, clock: &C) -> Self {
        // Governor's arithmetic: `t` is the interval (at least 1ns), `tau` is `t × (burst − 1)`.
        let interval = (q.rate.interval().as_nanos() as u64).max(1);
        Self {
            store,
            start: clock.now(),
            interval,
            tolerance: interval.saturating_mul(u64::from(q.burst.saturating_sub(1))),
        }
    }

    /// Nanoseconds from the zero to `now`.
    fn since_start(&self, now: C::Instant) -> u64 {
        u64::from(now.duration_since(self.start))
    }

    /// Admit a request of `key` at `now` (nanoseconds since the zero) if it conforms, moving
    /// the key's theoretical arrival time on by one interval; else the wait until it would
    /// conform, the state untouched. Governor's `test_and_update`, term for term.
    #[inline]
    fn check(&self, key: u64, now: u64) -> Result<(), u64> {
        self.store.update(key, |tat| self.step(tat, now))
    }

    /// [`Gcra::check`]'s step on a key's state `tat` (`None`: fresh): its new state, or the
    /// wait.
    #[inline(always)]
    fn step(&self, tat: Option<u64>, now: u64) -> Result<u64, u64> {
        let tat = tat.unwrap_or(now);
        let earliest = tat.saturating_sub(self.tolerance);
        match now < earliest {
            true => Err(earliest - now),
            false => Ok(tat.max(now).saturating_add(self.interval)),
        }
    }

    /// Drop the keys whose state is as good as none at `now`: their next turn is already
    /// due (governor's sweep).
    fn retain_recent(&self, now: C::Instant) {
        let drop_below = self.since_start(now).saturating_sub(self.interval);
        self.store.retain_recent(drop_below);
    }
}

// === impl PaceQueue ===

impl PaceQueue {
    fn new(p: Pacing) -> Self {
        Self {
            max_delay: p.max_delay.as_nanos() as u64,
            max_queue: p.max_queue,
            waiting: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Whether a request may join: checked when its turn is reserved, counted when it
    /// starts to wait ([`Waiter::enter`]), so two deciding at once may both join the last
    /// place (the bound is exceeded by at most the requests being decided at that moment).
    fn has_room(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) < self.max_queue
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }
}

// === impl Pace ===

impl Pace {
    /// Add `lim`'s turn, `wait` after `now`, to the pace of a request (`None`: not yet
    /// paced). A rule without pacing adds nothing.
    pub fn join(
        pace: &mut Option<Pace>,
        lim: &RuleLimiter<impl Clock>,
        now: std::time::Instant,
        wait: Duration,
    ) {
        let Some(queue) = &lim.pacing else { return };
        let until = now + wait;
        let p = pace.get_or_insert_with(|| Pace {
            until,
            waiters: Vec::with_capacity(1),
        });
        p.until = p.until.max(until);
        p.waiters.push(Waiter::enter(queue));
    }

    /// Wait for the turn; the queue places are given back when `self` is dropped (after the
    /// wait, or when the request's future is dropped because its client went away).
    pub async fn wait(&self) {
        tokio::time::sleep_until(self.until.into()).await;
    }
}

// === impl Waiter ===

impl Waiter {
    /// Take a place in `queue` for a request that is to wait.
    pub fn enter(queue: &PaceQueue) -> Self {
        queue.waiting.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(&queue.waiting))
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl Limiters ===

impl<C: Clock + Clone> Limiters<C> {
    /// Limiters for every limit in `snap`. A rule whose name and definition are unchanged
    /// from `previous` (the runtime a reload replaces) keeps its limiter, and so every key's
    /// state: an edit elsewhere must not reset everybody's buckets.
    pub fn build(snap: &Snapshot, clock: &C, previous: Option<&Self>) -> Self {
        Self::build_leased(snap, clock, previous, DEFAULT_LEASE)
    }

    /// [`Limiters::build`], with cluster-scope rules leasing `lease` worth of their rate at
    /// a time (`server.redis.lease_ms`).
    pub fn build_leased(
        snap: &Snapshot,
        clock: &C,
        previous: Option<&Self>,
        lease: Duration,
    ) -> Self {
        let kept: HashMap<(&str, u64), &Arc<RuleLimiter<C>>> = previous
            .map(|p| {
                p.rules
                    .iter()
                    .map(|r| ((&*r.name.0, r.fingerprint), r))
                    .collect()
            })
            .unwrap_or_default();
        let rules: Vec<_> = snap
            .governance
            .limits
            .iter()
            .map(|l| match kept.get(&(&*l.name, l.fingerprint)) {
                Some(r) => Arc::clone(r),
                None => Arc::new(RuleLimiter::build(l, clock, lease)),
            })
            .collect();
        let any_cluster = rules.iter().any(|r| r.cluster.is_some());
        let keyed = (0..rules.len() as u32)
            .filter(|&i| {
                rules[i as usize]
                    .quotas()
                    .any(|q| q.gcra.store.single.is_none())
            })
            .collect();
        Self {
            rules,
            any_cluster,
            keyed,
        }
    }

    /// Check every limit that applies to a request, in order, until one enforced limit
    /// refuses. `observe` hears each limit's outcome (for metrics and logs).
    ///
    /// For callers that cannot wait for Redis (benchmarks): a cluster-scope limit whose
    /// key has no leased token and no remembered refusal admits. The gateway uses
    /// [`Limiters::check_remote`].
    pub fn check(
        &self,
        snap: &Snapshot,
        r: &RouteInput<'_>,
        observe: impl FnMut(&RuleLimiter<C>, Outcome, Duration),
    ) -> Option<Rejection<C>> {
        self.check_remote(snap, r, None, observe, &mut Vec::new())
    }

    /// [`Limiters::check`] of the limits counted in this gateway only: cluster-scope rules
    /// are passed over unobserved (used with [`peeking`], which must not spend leases, and
    /// to serve when no rule is cluster-scope, [`Limiters::any_cluster`]). At `now`, a
    /// reading of the limiters' clock the caller made, or else one made here.
    pub fn check_local(
        &self,
        snap: &Snapshot,
        r: &RouteInput<'_>,
        now: Option<C::Instant>,
        observe: impl FnMut(&RuleLimiter<C>, Outcome, Duration),
    ) -> Option<Rejection<C>> {
        self.check_inner(snap, r, now, observe, None)
    }

    /// [`Limiters::check`], setting aside in `remote` the cluster-scope checks that need
    /// Redis (they are neither observed nor decided here). A cluster limit set aside does
    /// not stop the limits after it: they are checked (and spend quota) as if it admits.
    pub fn check_remote(
        &self,
        snap: &Snapshot,
        r: &RouteInput<'_>,
        now: Option<C::Instant>,
        observe: impl FnMut(&RuleLimiter<C>, Outcome, Duration),
        remote: &mut Vec<RemoteCheck<C>>,
    ) -> Option<Rejection<C>> {
        self.check_inner(snap, r, now, observe, Some(remote))
    }

    fn check_inner(
        &self,
        snap: &Snapshot,
        r: &RouteInput<'_>,
        now: Option<C::Instant>,
        observe: impl FnMut(&RuleLimiter<C>, Outcome, Duration),
        remote: Option<&mut Vec<RemoteCheck<C>>>,
    ) -> Option<Rejection<C>> {
        if self.rules.is_empty() {
            return None;
        }
        match snap.limits_as_is(r) {
            Some(list) => self.check_list(list, snap, r, now, observe, remote),
            None => self.check_filtered(snap, r, now, observe, remote),
        }
    }

    /// [`Limiters::check_inner`] of a request whose limits are a list of its own (some
    /// rule of its pair narrows, or it has no pair): written into a reused list.
    #[inline(never)]
    fn check_filtered(
        &self,
        snap: &Snapshot,
        r: &RouteInput<'_>,
        now: Option<C::Instant>,
        observe: impl FnMut(&RuleLimiter<C>, Outcome, Duration),
        remote: Option<&mut Vec<RemoteCheck<C>>>,
    ) -> Option<Rejection<C>> {
        SCRATCH.with(|s| {
            let mut scratch = s.borrow_mut();
            let list = snap.limits_of(r, &mut scratch);
            self.check_list(list, snap, r, now, observe, remote)
        })
    }

    /// Check limits `list` (indices of [`Limiters::rules`], in order) until an enforced one
    /// refuses.
    #[inline(always)]
    fn check_list(
        &self,
        list: &[u32],
        snap: &Snapshot,
        r: &RouteInput<'_>,
        now: Option<C::Instant>,
        mut observe: impl FnMut(&RuleLimiter<C>, Outcome, Duration),
        mut remote: Option<&mut Vec<RemoteCheck<C>>>,
    ) -> Option<Rejection<C>> {
        // One clock reading for every limit the request meets: the limiters of a process
        // share one clock ([`super::Governors::build`]), as a test's share its fake one.
        let first = &self.rules[*list.first()? as usize];
        let now = now.unwrap_or_else(|| first.now());
        for &i in list {
            let lim = &self.rules[i as usize];
            // Nanoseconds: `Ok(0)` admitted now, `Ok(wait)` paced, `Err(wait)` refused.
            let (quota, verdict) = match lim.simple {
                // Unpaced: admitted is admitted now (the common case, told at once).
                true => match lim.check_simple(now) {
                    Ok(_) => {
                        observe(lim, Outcome::Allowed, Duration::ZERO);
                        continue;
                    }
                    Err(wait) => (0, Err(wait)),
                },
                false => match self.check_rule(snap, r, i, now, remote.as_deref_mut()) {
                    Some(checked) => checked,
                    None => continue,
                },
            };
            let dry_run = lim.mode == LimitMode::DryRun;
            match verdict {
                Ok(0) => observe(lim, Outcome::Allowed, Duration::ZERO),
                Ok(wait) => {
                    let outcome = match dry_run {
                        true => Outcome::DryRunPaced,
                        false => Outcome::Paced,
                    };
                    observe(lim, outcome, Duration::from_nanos(wait))
                }
                Err(wait) if dry_run => {
                    observe(lim, Outcome::DryRunLimited, Duration::from_nanos(wait))
                }
                Err(wait) => {
                    let retry_after = Duration::from_nanos(wait);
                    observe(lim, Outcome::Limited, retry_after);
                    return Some(Rejection {
                        rule: Arc::clone(lim),
                        quota,
                        retry_after,
                    });
                }
            }
        }
        None
    }

    /// The limit phase's check of limit `i` when it is not [`RuleLimiter::simple`]: the
    /// request's quota and verdict (as [`Limiters::check_inner`] reads it), or `None` when
    /// the rule passes over the request (part of its key missing, or a cluster-scope check
    /// set aside or not made). Out of line: the simple rules' loop stays short.
    #[inline(never)]
    fn check_rule(
        &self,
        snap: &Snapshot,
        r: &RouteInput<'_>,
        i: u32,
        now: C::Instant,
        remote: Option<&mut Vec<RemoteCheck<C>>>,
    ) -> Option<(u16, Result<u64, u64>)> {
        let key = snap.governance.limits[i as usize].key_of(snap, r)?;
        let lim = &self.rules[i as usize];
        let verdict = match (&lim.cluster, remote) {
            (None, _) => lim.pace_ns(key.quota, key.hash, now),
            (Some(_), None) => return None,
            (Some(c), Some(remote)) => match c.try_local(key.quota, key.hash) {
                Local::Admit { refill } => {
                    if refill {
                        remote.push(RemoteCheck {
                            rule: Arc::clone(lim),
                            quota: key.quota,
                            key: key.hash,
                            refill_only: true,
                        });
                    }
                    Ok(0)
                }
                Local::Limited(wait) => Err(wait.as_nanos() as u64),
                Local::Remote => {
                    remote.push(RemoteCheck {
                        rule: Arc::clone(lim),
                        quota: key.quota,
                        key: key.hash,
                        refill_only: false,
                    });
                    return None;
                }
            },
        };
        Some((key.quota, verdict))
    }

    /// Drop idle keys from the busy keyed limiters only, whose tables hold memory: a one-key
    /// limiter's state needs no sweep to be right (a fresh one reads as none), a large
    /// config's thousand of them cost a pass each ([`Limiters::retain_recent`] visits them),
    /// and a keyed one with few keys costs its sweep's fixed part for little memory
    /// ([`BUSY_KEYS`]).
    pub fn retain_recent_keyed(&self) {
        for &i in &*self.keyed {
            let r = &self.rules[i as usize];
            if r.keyed_sweep_due() {
                r.retain_recent();
            }
        }
    }

    /// Whether no keyed limiter is busy and holds a key: nothing for
    /// [`Limiters::retain_recent_keyed`].
    pub fn keyed_idle(&self) -> bool {
        !(self.keyed.iter()).any(|&i| self.rules[i as usize].keyed_sweep_due())
    }

    /// Drop idle keys from every limiter; returns the keys still tracked.
    pub fn retain_recent(&self) -> usize {
        (self.rules.iter())
            .filter(|r| !r.idle())
            .map(|r| {
                r.retain_recent();
                r.tracked_keys()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests;
