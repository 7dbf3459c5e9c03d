//! Cluster-scope limits: one quota shared by every gateway, counted in Redis, mostly spent
//! locally.
//!
//! # Leases
//! Asking Redis for every request would put a network round trip on every request's path.
//! Instead each gateway *leases* tokens per key: an atomic GCRA script in Redis
//! ([`TAKE`]) hands out up to `lease` tokens at once, where `lease = ceil(rate ×
//! lease_ms)` (at least 1, at most the burst), and the gateway spends them from memory.
//! A refusal is remembered too: Redis answers how long until the next token, and until
//! then the gateway refuses that key locally, so a hot key under attack costs about one
//! Redis call per token the bucket produces, not one per request.
//!
//! A request reaches Redis only when its key has neither tokens nor a remembered refusal.
//! Requests of one key queue behind one fetch (an async mutex per key), and the fetch asks
//! for enough tokens for all of them. Keys with large leases (`lease ≥ 4`) refill in the
//! background once a quarter of the lease is left, so a steady hot key never waits.
//!
//! # Accuracy
//! Redis never grants more than the GCRA allows, so the fleet never admits more than the
//! rate plus the burst over time. Leasing only shifts *when* tokens are spent: a token
//! leased at `t` may be spent up to `lease_ms` later, and leased tokens still unspent
//! after `lease_ms` are dropped. So in any window the fleet admits within `lease ×
//! gateways` of what one exact limiter would (more, by spending tokens leased just before
//! the window; fewer, by dropping unspent ones). With the default `lease_ms` of 100 a
//! `10/s` per-user limit has a lease of 1: exact, and one Redis call per admitted request
//! of that user.
//!
//! # Failures
//! Every Redis call is bounded by `server.redis.timeout_ms`. A failure (refused
//! connection, error, timeout) is answered by the rule's `on_store_error`, counted in
//! `tidegate_limit_store_errors_total{rule}`, and marks the store down for
//! [`PROBE_INTERVAL`]: meanwhile requests do not wait for Redis at all, and afterwards one
//! request probes it. The redis crate's connection manager reconnects by itself, so
//! service resumes when Redis returns, without a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use rules::limit::CompiledLimit;
use rules::model::{OnStoreError, RedisSettings};

/// How long the store counts as down after a failure before one request probes it again.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// Shards of a rule's lease table.
const SHARDS: usize = 64;

/// GCRA over a key holding the theoretical arrival time in microseconds (Redis's clock, so
/// gateways' clocks need not agree). `ARGV`: emission interval (µs), burst, tokens wanted.
/// Answers `{granted, 0}` or `{0, microseconds until the next token}`.
pub const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local avail = math.floor((now + tau - tat) / interval)
if avail < 1 then
  return {0, math.ceil(tat + interval - tau - now)}
end
local n = math.min(tonumber(ARGV[3]), avail)
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return {n, 0}
";

/// The connection to the Redis every gateway counts in (from `server.redis`).
pub struct ClusterStore {
    conn: ConnectionManager,
    /// Longest a request waits for Redis.
    pub timeout: Duration,
    /// How long leased tokens stay spendable, and how much of a rate one lease takes.
    pub lease: Duration,
    script: Script,
    /// While `now_ns() < down_until`, calls fail at once (the store failed recently).
    down_until: AtomicU64,
}

/// What Redis answered for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// This many tokens (≥ 1).
    Tokens(u32),
    /// None; the next one in this long.
    Denied(Duration),
}

/// Redis could not answer in time (refused, error, timeout, or marked down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("limit store unavailable")]
pub struct StoreUnavailable;

/// The cluster half of one cluster-scope limit rule: per-key leases.
#[derive(Debug)]
pub struct ClusterLimiter {
    /// What a request gets while Redis is unavailable.
    pub on_store_error: OnStoreError,
    quotas: Vec<ClusterQuota>,
    /// `tg:limit:{NAME}:`: the Redis key prefix of this rule.
    prefix: Box<str>,
    shards: Box<[Mutex<LeaseTable>]>,
}

/// (quota, key) → lease.
type LeaseTable = HashMap<(u16, u64), Lease>;

#[derive(Debug)]
struct ClusterQuota {
    /// Emission interval, in microseconds (may be fractional).
    interval_us: f64,
    burst: u32,
    /// Tokens one lease asks for.
    lease: u32,
    label: Box<str>,
}

/// One key's tokens in this gateway.
#[derive(Debug)]
struct Lease {
    tokens: u32,
    /// Tokens are dropped after this (ns on [`now_ns`]'s clock).
    valid_until: u64,
    /// Redis refused until this (ns); refuse locally until then.
    denied_until: u64,
    /// Held while a request of this key (or the background refill) asks Redis. Everyone
    /// waiting for it holds a clone, so `strong_count - 1` is the queue (and a cancelled
    /// request leaves it by dropping its clone).
    fetch: Arc<tokio::sync::Mutex<()>>,
    /// A background refill is in flight.
    refilling: bool,
}

/// The local part of a cluster check, decided without Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// A leased token was spent. `refill`: the lease runs low; refill it in the background.
    Admit {
        /// Start a background refill.
        refill: bool,
    },
    /// Redis refused this key recently; the next token is due in this long.
    Limited(Duration),
    /// Neither: ask Redis (see [`ClusterLimiter::acquire`]).
    Remote,
}

/// Nanoseconds since the first call in this process (a monotonic clock shared by every
/// lease table).
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// === impl ClusterStore ===

impl ClusterStore {
    /// A store for `settings`. Connects lazily: a gateway starts even while Redis is down
    /// (its cluster limits then answer by `on_store_error`). Needs a tokio runtime.
    pub fn connect(settings: &RedisSettings) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(settings.url.as_str())?;
        let timeout = Duration::from_millis(settings.timeout_ms);
        let cm = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // A failed reconnect is retried by the next call after the probe interval;
            // long internal retry chains would only delay noticing that Redis is back.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(PROBE_INTERVAL);
        let conn = ConnectionManager::new_lazy_with_config(client, cm)?;
        Ok(Arc::new(Self {
            conn,
            timeout,
            lease: Duration::from_millis(settings.lease_ms),
            script: Script::new(TAKE),
            down_until: AtomicU64::new(0),
        }))
    }

    /// Take up to `want` tokens of `key`, within the timeout.
    pub async fn take(
        &self,
        key: &str,
        interval_us: f64,
        burst: u32,
        want: u32,
    ) -> Result<Grant, StoreUnavailable> {
        self.take_within(key, interval_us, burst, want, self.timeout)
            .await
    }

    /// [`ClusterStore::take`], within `within` (at most the timeout).
    async fn take_within(
        &self,
        key: &str,
        interval_us: f64,
        burst: u32,
        want: u32,
        within: Duration,
    ) -> Result<Grant, StoreUnavailable> {
        if !self.may_call() {
            return Err(StoreUnavailable);
        }
        let mut conn = self.conn.clone();
        let mut inv = self.script.prepare_invoke();
        inv.key(key).arg(interval_us).arg(burst).arg(want.max(1));
        let answer = tokio::time::timeout(
            within.min(self.timeout),
            inv.invoke_async::<(i64, i64)>(&mut conn),
        );
        match answer.await {
            Ok(Ok((n, _))) if n > 0 => {
                self.down_until.store(0, Ordering::Relaxed);
                Ok(Grant::Tokens(n.min(i64::from(u32::MAX)) as u32))
            }
            Ok(Ok((_, wait_us))) => {
                self.down_until.store(0, Ordering::Relaxed);
                Ok(Grant::Denied(Duration::from_micros(wait_us.max(1) as u64)))
            }
            Ok(Err(e)) => {
                self.mark_down();
                tracing::debug!(target: "tidegate::limit", error = %e, "limit store call failed");
                Err(StoreUnavailable)
            }
            Err(_) => {
                self.mark_down();
                Err(StoreUnavailable)
            }
        }
    }

    /// False while the store is marked down. Once the mark expires, exactly one caller
    /// (the one that moves the mark forward) gets to probe.
    fn may_call(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = now_ns();
        if now < until {
            return false;
        }
        let next = now + PROBE_INTERVAL.as_nanos() as u64;
        self.down_until
            .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    fn mark_down(&self) {
        let next = now_ns() + PROBE_INTERVAL.as_nanos() as u64;
        self.down_until.store(next, Ordering::Relaxed);
    }

    /// Whether the store is currently marked down.
    pub fn is_down(&self) -> bool {
        now_ns() < self.down_until.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStore")
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .field("down", &self.is_down())
            .finish_non_exhaustive()
    }
}

// === impl ClusterLimiter ===

impl ClusterLimiter {
    /// The cluster state of a compiled cluster-scope rule; `lease` is `server.redis.lease_ms`.
    pub fn build(rule: &CompiledLimit, lease: Duration) -> Self {
        let quotas = rule
            .quotas
            .iter()
            .map(|q| {
                let per_lease = (f64::from(q.rate.count) * lease.as_secs_f64()
                    / q.rate.period.as_secs_f64())
                .ceil();
                ClusterQuota {
                    interval_us: q.rate.period.as_secs_f64() * 1e6 / f64::from(q.rate.count),
                    burst: q.burst,
                    lease: (per_lease as u32).clamp(1, q.burst.max(1)),
                    label: q.label.clone(),
                }
            })
            .collect();
        Self {
            on_store_error: rule.on_store_error,
            quotas,
            prefix: format!("tg:limit:{}:", rule.name).into(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, LeaseTable> {
        // The critical sections below only read and write plain fields.
        self.shards[(key >> 58) as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Decide from the lease alone, if possible.
    pub fn try_local(&self, quota: u16, key: u64) -> Local {
        let q = &self.quotas[quota as usize];
        let now = now_ns();
        let mut shard = self.shard(key);
        let Some(l) = shard.get_mut(&(quota, key)) else {
            return Local::Remote;
        };
        l.local(now, q.lease)
    }

    /// Ask Redis for this request's token (and a lease), waiting at most the store's
    /// timeout in all: `Ok(Ok(()))` admitted, `Ok(Err(wait))` limited, `Err` the store is
    /// unavailable.
    pub async fn acquire(
        &self,
        store: &ClusterStore,
        quota: u16,
        key: u64,
    ) -> Result<Result<(), Duration>, StoreUnavailable> {
        let deadline = tokio::time::Instant::now() + store.timeout;
        let q = &self.quotas[quota as usize];
        let fetch = {
            let mut shard = self.shard(key);
            let l = shard.entry((quota, key)).or_insert_with(Lease::new);
            match l.local(now_ns(), q.lease) {
                Local::Admit { .. } => return Ok(Ok(())),
                Local::Limited(w) => return Ok(Err(w)),
                Local::Remote => {}
            }
            l.fetch.clone()
        };
        let guard = tokio::time::timeout_at(deadline, fetch.lock_owned()).await;
        let want = {
            let mut shard = self.shard(key);
            let l = shard.entry((quota, key)).or_insert_with(Lease::new);
            if guard.is_err() {
                return Err(StoreUnavailable);
            }
            // Whoever held the fetch may have left tokens or a refusal.
            match l.local(now_ns(), q.lease) {
                Local::Admit { .. } => return Ok(Ok(())),
                Local::Limited(w) => return Ok(Err(w)),
                Local::Remote => {}
            }
            // The table and this request hold one `fetch` each; the rest are queued behind.
            let queued = Arc::strong_count(&l.fetch).saturating_sub(2) as u32;
            q.lease.max(queued + 1).min(q.burst.max(1))
        };
        let redis_key = format!("{}{}:{key:016x}", self.prefix, q.label);
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(StoreUnavailable);
        }
        let grant = store
            .take_within(&redis_key, q.interval_us, q.burst, want, remaining)
            .await?;
        let now = now_ns();
        let mut shard = self.shard(key);
        let l = shard.entry((quota, key)).or_insert_with(Lease::new);
        Ok(match grant {
            Grant::Tokens(n) => {
                l.tokens += n - 1;
                l.valid_until = now + store.lease.as_nanos() as u64;
                Ok(())
            }
            Grant::Denied(w) => {
                l.denied_until = now + w.as_nanos() as u64;
                Err(w)
            }
        })
    }

    /// Top up a lease that runs low, off the request path. Errors only leave the lease to
    /// run out (requests then ask Redis themselves).
    pub async fn refill(&self, store: &ClusterStore, quota: u16, key: u64) {
        let q = &self.quotas[quota as usize];
        let fetch = {
            let mut shard = self.shard(key);
            let l = shard.entry((quota, key)).or_insert_with(Lease::new);
            l.fetch.clone()
        };
        let _guard = fetch.lock_owned().await;
        let redis_key = format!("{}{}:{key:016x}", self.prefix, q.label);
        let grant = store
            .take(&redis_key, q.interval_us, q.burst, q.lease)
            .await;
        let now = now_ns();
        let mut shard = self.shard(key);
        let l = shard.entry((quota, key)).or_insert_with(Lease::new);
        l.refilling = false;
        match grant {
            Ok(Grant::Tokens(n)) => {
                l.tokens += n;
                l.valid_until = now + store.lease.as_nanos() as u64;
            }
            Ok(Grant::Denied(w)) => l.denied_until = now + w.as_nanos() as u64,
            Err(StoreUnavailable) => {}
        }
    }

    /// Drop leases that hold nothing worth keeping; returns the keys still tracked.
    pub fn retain_recent(&self) -> usize {
        let now = now_ns();
        self.shards
            .iter()
            .map(|s| {
                let mut t = s.lock().unwrap_or_else(PoisonError::into_inner);
                t.retain(|_, l| {
                    (l.tokens > 0 && now < l.valid_until)
                        || now < l.denied_until
                        || l.refilling
                        || Arc::strong_count(&l.fetch) > 1
                });
                t.len()
            })
            .sum()
    }
}

// === impl Lease ===

impl Lease {
    fn new() -> Self {
        Self {
            tokens: 0,
            valid_until: 0,
            denied_until: 0,
            fetch: Arc::new(tokio::sync::Mutex::new(())),
            refilling: false,
        }
    }

    fn local(&mut self, now: u64, lease: u32) -> Local {
        if self.tokens > 0 && now < self.valid_until {
            self.tokens -= 1;
            let refill = lease >= 4 && self.tokens <= lease / 4 && !self.refilling;
            if refill {
                self.refilling = true;
            }
            return Local::Admit { refill };
        }
        if now >= self.valid_until {
            self.tokens = 0; // a lease not spent in time is dropped
        }
        if now < self.denied_until {
            return Local::Limited(Duration::from_nanos(self.denied_until - now));
        }
        Local::Remote
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: &str, burst: Option<u32>, lease: Duration) -> ClusterLimiter {
        let mut l =
            serde_json::json!({ "name": "l", "key": ["user"], "rate": rate, "scope": "cluster" });
        if let Some(b) = burst {
            l["burst"] = b.into();
        }
        let config = serde_json::json!({
            "schema_version": 1,
            "server": { "redis": { "url": "redis://127.0.0.1:6379" } },
            "upstreams": { "up": { "endpoints": ["127.0.0.1:9"] } },
            "routes": [{ "name": "default", "upstream": "up" }],
            "limits": [l]
        });
        let loaded = rules::load("t.json", &serde_json::to_vec(&config).unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        ClusterLimiter::build(&loaded.snapshot.governance.limits[0], lease)
    }

    /// A lease is `ceil(rate × lease)`, at least 1 and at most the burst.
    #[test]
    fn lease_sizes() {
        let lease = Duration::from_millis(100);
        let size = |rate, burst| limiter(rate, burst, lease).quotas[0].lease;
        assert_eq!(size("10/s", None), 1);
        assert_eq!(size("100/s", None), 10);
        assert_eq!(size("1/min", None), 1);
        assert_eq!(size("5000/s", Some(100)), 100);
    }

    /// Leased tokens are spent until they run out or expire; a remembered refusal answers
    /// until it is due; a large lease asks for a refill once, at a quarter left.
    #[test]
    fn lease_spending() {
        let mut l = Lease::new();
        assert_eq!(l.local(0, 8), Local::Remote);
        l.tokens = 7;
        l.valid_until = 1_000;
        for left in (0..7).rev() {
            let refill = left == 2;
            assert_eq!(l.local(10, 8), Local::Admit { refill }, "{left} left");
        }
        assert_eq!(l.local(10, 8), Local::Remote);
        l.tokens = 3;
        assert_eq!(l.local(1_000, 8), Local::Remote, "expired lease");
        assert_eq!(l.tokens, 0, "dropped");
        l.denied_until = 2_000;
        assert_eq!(l.local(1_500, 8), Local::Limited(Duration::from_nanos(500)));
        assert_eq!(l.local(2_000, 8), Local::Remote);
    }
}
