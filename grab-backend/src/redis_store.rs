//! The Redis store: envelopes, grabs and wallets in Redis, so several backend nodes can
//! serve one envelope and each share is still handed out exactly once.
//!
//! # Keys
//! Every key of one envelope carries the hash tag `{env:ID}`, so they live in one slot and
//! each operation is one Lua script on one node, also on Redis Cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{env:ID}:meta` | hash | sender, total, count, created, expires, rem_cents, rem_count, refunded, events, settled, settled_id |
//! | `{env:ID}:shares` | list | the shares not yet grabbed, pre-split at create by [`crate::split::split`] |
//! | `{env:ID}:grabs` | hash | user → `amount:seq:at_ms` (the repeat-grab answer) |
//! | `{env:ID}:order` | list | `amount:at_ms:user` in grab order (`GET /envelopes/{id}` pages) |
//! | `{env:ID}:events` | stream | settlement events: `n`, `kind` (grab/refund), `user`, `amount`, `at` |
//! | `{w:USER}:bal`, `:done`, `:credits` | string, set, list | settled balance, credited event keys, recent credits |
//! | `grab:next_id` | string | the envelope id counter |
//! | `grab:envelopes`, `grab:expiries` | sorted sets | every id; id by expiry (refund sweep) |
//! | `grab:dirty` | set | envelopes whose events may not be settled yet |
//! | `grab:wallets` | set | every user with a wallet (for `/stats`) |
//! | `grab:idem:LEN:SENDER:KEY` | string, with TTL | `FINGERPRINT:ID` of a create's `Idempotency-Key` |
//!
//! # Idempotent create
//! A create with an `Idempotency-Key` first claims the key for a freshly counted id with
//! one script (`GET`, else `SET .. PX ttl`), then creates that id; the create script does
//! nothing when the id exists. So the key→id binding is decided atomically once, and the
//! envelope for the id is created at most once: a retry or a concurrent duplicate that
//! finds the claim (same fingerprint) reads the envelope, or, if the first request has
//! not created it yet (in flight, or its node died between the two scripts), runs the
//! same create for the same id, and exactly one of them creates it. Two scripts rather
//! than one because the claim and the envelope live in different slots on Redis Cluster.
//!
//! # Grab
//! One script checks the user (a repeat answers the recorded share), then empty, then
//! expiry, pops the next pre-split share, records it, and appends a settlement event to
//! the envelope's own stream, atomically. There is no global stream: it would sit in
//! another slot, so the script could not append to it on Redis Cluster. Instead the
//! envelope is marked in `grab:dirty` before the script runs (so a crash right after the
//! script cannot lose the mark) and again after it (so a settler that cleared the mark
//! while the script ran sees it again).
//!
//! # Settlement
//! A settler task on every backend node takes dirty envelopes, clears the mark, reads the
//! envelope's stream past its `settled_id` cursor and credits each event with one script
//! on the wallet's slot: `SADD {w:USER}:done ENV:N` guards the `INCRBY`, so an event is
//! credited once however many nodes settle it, concurrently or after a crash. The cursor
//! only moves forward. A full sweep over `grab:envelopes` at start and every
//! [`FULL_SWEEP`] catches anything a crash left unmarked.
//!
//! # Durability
//! A grab is acknowledged once the script has run, which is as durable as the Redis
//! deployment: run it with `appendonly yes` and `appendfsync always` (no acknowledged grab
//! lost) or `everysec` (up to a second lost on power loss); see `docs/operations.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands as _, Script, Value};

use crate::config::RedisStoreConfig;
use crate::model::{Credit, CreditKind, EnvelopeId, EnvelopeState};
use crate::store::{
    CreateError, Created, EnvelopePage, EnvelopeSummary, GrabError, GrabReceipt, GrabView, Health,
    IdempotencyKey, NewEnvelope, Store, StoreError, Totals, WalletView,
};

/// How often the settler looks for dirty envelopes when there were none.
const SETTLE_IDLE: Duration = Duration::from_millis(10);
/// How often the settler sweeps every envelope, for marks a crash lost.
const FULL_SWEEP: Duration = Duration::from_secs(30);
/// Events read per `XRANGE`.
const EVENT_BATCH: usize = 256;

const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  local m = redis.call('HMGET', KEYS[1], 'created', 'expires')
  return {m[1], m[2], 'exists'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = now + tonumber(ARGV[4]) * 1000
redis.call('HSET', KEYS[1], 'sender', ARGV[1], 'total', ARGV[2], 'count', ARGV[3],
  'created', string.format('%d', now), 'expires', string.format('%d', expires),
  'rem_cents', ARGV[2], 'rem_count', ARGV[3], 'events', 0, 'settled', 0, 'settled_id', '0-0')
local i = 5
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, j))
  i = j + 1
end
return {string.format('%d', now), string.format('%d', expires)}
";

/// Claim an idempotency key for `ARGV[1]` (`FINGERPRINT:ID`) for `ARGV[2]` ms, or answer
/// the claim already there.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

const GRAB: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local m = redis.call('HMGET', KEYS[1], 'expires', 'rem_cents', 'rem_count', 'refunded', 'count')
if not m[1] then return {'not_found'} end
local prev = redis.call('HGET', KEYS[3], ARGV[1])
if prev then return {'repeat', prev, m[3], m[2]} end
if tonumber(m[3]) == 0 then return {'empty'} end
if m[4] or now >= tonumber(m[1]) then return {'expired'} end
local share = redis.call('LPOP', KEYS[2])
if not share then return {'empty'} end
local rc = redis.call('HINCRBY', KEYS[1], 'rem_count', -1)
local rcents = redis.call('HINCRBY', KEYS[1], 'rem_cents', -tonumber(share))
local seq = tonumber(m[5]) - rc
local at = string.format('%d', now)
redis.call('HSET', KEYS[3], ARGV[1], share .. ':' .. seq .. ':' .. at)
redis.call('RPUSH', KEYS[4], share .. ':' .. at .. ':' .. ARGV[1])
local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
redis.call('XADD', KEYS[5], '*', 'n', n, 'kind', 'grab', 'user', ARGV[1], 'amount', share, 'at', at)
return {'ok', share, tostring(seq), at, tostring(rc), tostring(rcents)}
";

const REFUND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local m = redis.call('HMGET', KEYS[1], 'expires', 'rem_cents', 'refunded', 'sender')
if not m[1] then return -1 end
if m[3] then return 0 end
if now < tonumber(m[1]) then return -2 end
local rem = tonumber(m[2])
if rem == 0 then return 0 end
redis.call('HSET', KEYS[1], 'refunded', m[2], 'rem_cents', 0)
redis.call('DEL', KEYS[2])
local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
redis.call('XADD', KEYS[3], '*', 'n', n, 'kind', 'refund', 'user', m[4], 'amount', m[2],
  'at', string.format('%d', now))
return 1
";

const CREDIT: &str = r"
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('INCRBY', KEYS[2], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
return 1
";

const ADVANCE: &str = r"
local settled = tonumber(redis.call('HGET', KEYS[1], 'settled') or '0')
if tonumber(ARGV[1]) > settled then
  redis.call('HSET', KEYS[1], 'settled', ARGV[1], 'settled_id', ARGV[2])
end
return 1
";

/// The multi-node store over one Redis (or one Redis Cluster slot per envelope).
pub struct RedisStore {
    inner: Arc<Inner>,
    settler: tokio::task::JoinHandle<()>,
    /// Lifetime of an idempotency key, in milliseconds (`PX`).
    idem_ttl_ms: u64,
}

struct Inner {
    conn: ConnectionManager,
    timeout: Duration,
    keep_credits: usize,
    scripts: Scripts,
    /// False while Redis calls fail (`/healthz` answers 503).
    ok: AtomicBool,
    /// Grabs and refunds this node appended.
    appended: AtomicU64,
    /// Events this node's settler credited.
    credited: AtomicU64,
    /// Size of `grab:dirty` as last seen by the settler.
    dirty_seen: AtomicU64,
}

struct Scripts {
    create: Script,
    claim: Script,
    grab: Script,
    refund: Script,
    credit: Script,
    advance: Script,
}

/// Decoded `{env:ID}:meta`.
#[derive(Debug, Default)]
struct Meta {
    sender: String,
    total: u64,
    count: u32,
    created: u64,
    expires: u64,
    rem_cents: u64,
    rem_count: u32,
    refunded: Option<u64>,
}

// === impl RedisStore ===

impl RedisStore {
    /// Connect to `config.url` and start the settler. Fails when Redis cannot be reached
    /// within the timeout: a backend that cannot store anything should not start.
    pub async fn open(config: &RedisStoreConfig, keep_credits: usize) -> anyhow::Result<Self> {
        let client = redis::Client::open(config.url.as_str())?;
        let cm = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            config.timeout * 4,
            ConnectionManager::new_with_config(client, cm),
        )
        .await
        .map_err(|_| anyhow::anyhow!("redis {}: no connection within the timeout", config.url))??;
        let inner = Arc::new(Inner {
            conn,
            timeout: config.timeout,
            keep_credits: keep_credits.max(1),
            scripts: Scripts {
                create: Script::new(CREATE),
                claim: Script::new(CLAIM),
                grab: Script::new(GRAB),
                refund: Script::new(REFUND),
                credit: Script::new(CREDIT),
                advance: Script::new(ADVANCE),
            },
            ok: AtomicBool::new(true),
            appended: AtomicU64::new(0),
            credited: AtomicU64::new(0),
            dirty_seen: AtomicU64::new(0),
        });
        let settler = tokio::spawn(settle_loop(inner.clone()));
        Ok(Self {
            inner,
            settler,
            idem_ttl_ms: 86_400_000,
        })
    }

    /// Keep idempotency keys for `ttl` (default 24 h; at least 1 ms).
    #[must_use]
    pub fn idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.idem_ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self
    }

    /// Stop the settler, after one last pass over the dirty envelopes.
    pub async fn close(&self) {
        self.settler.abort();
        let _ = self.inner.settle_dirty().await;
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.settler.abort();
    }
}

impl Store for RedisStore {
    async fn create(&self, new: NewEnvelope) -> Result<EnvelopeSummary, StoreError> {
        let inner = &self.inner;
        let id: u64 = inner.run(inner.conn().incr("grab:next_id", 1)).await?;
        match inner.create_id(id, &new).await? {
            (summary, false) => Ok(summary),
            (_, true) => Err(StoreError::Unavailable(format!(
                "envelope id {id} already in use"
            ))),
        }
    }

    async fn create_idempotent(
        &self,
        new: NewEnvelope,
        idem: &IdempotencyKey,
    ) -> Result<Created, CreateError> {
        let inner = &self.inner;
        let unavailable = |StoreError::Unavailable(why)| CreateError::Unavailable(why);
        let fresh: u64 = inner
            .run(inner.conn().incr("grab:next_id", 1))
            .await
            .map_err(unavailable)?;
        let mut inv = inner.scripts.claim.prepare_invoke();
        inv.key(idem_key(new.sender(), idem.key()))
            .arg(format!("{}:{fresh}", idem.fingerprint()))
            .arg(self.idem_ttl_ms);
        let claimed: Option<String> = inner
            .run(inv.invoke_async(&mut inner.conn()))
            .await
            .map_err(unavailable)?;
        let id = match claimed {
            None => fresh,
            Some(v) => {
                let (fingerprint, id) = v.rsplit_once(':').unwrap_or(("", ""));
                if fingerprint != idem.fingerprint() {
                    return Err(CreateError::KeyReused);
                }
                id.parse()
                    .map_err(|_| CreateError::Unavailable(format!("bad idempotency claim {v:?}")))?
            }
        };
        if id != fresh {
            // A replay: answer the envelope without writing anything, if it exists.
            let times: Vec<Option<u64>> = inner
                .run(inner.conn().hmget(key(id, "meta"), &["created", "expires"]))
                .await
                .map_err(unavailable)?;
            if let [Some(created_at_ms), Some(expires_at_ms)] = times[..] {
                return Ok(Created {
                    summary: created_summary(id, &new, created_at_ms, expires_at_ms),
                    replayed: true,
                });
            }
        }
        // Creates the envelope, or (for a claim whose first request has not created it
        // yet, in flight or dead) whichever of them runs the create script first does.
        let (summary, existed) = inner.create_id(id, &new).await.map_err(unavailable)?;
        Ok(Created {
            summary,
            replayed: existed || id != fresh,
        })
    }

    async fn grab(&self, id: EnvelopeId, user: &str) -> Result<GrabReceipt, GrabError> {
        let inner = &self.inner;
        let id = id.0;
        let unavailable = |e: StoreError| {
            let StoreError::Unavailable(why) = e;
            GrabError::Unavailable(why)
        };
        inner.mark_dirty(id).await.map_err(unavailable)?;
        let mut inv = inner.scripts.grab.prepare_invoke();
        inv.key(key(id, "meta"))
            .key(key(id, "shares"))
            .key(key(id, "grabs"))
            .key(key(id, "order"))
            .key(key(id, "events"))
            .arg(user);
        let r: Vec<String> = inner
            .run(inv.invoke_async(&mut inner.conn()))
            .await
            .map_err(unavailable)?;
        let num = |i: usize| -> u64 { r.get(i).and_then(|s| s.parse().ok()).unwrap_or(0) };
        match r.first().map(String::as_str) {
            Some("ok") => {
                inner.appended.fetch_add(1, Ordering::Relaxed);
                // Re-mark: a settler may have cleared the mark while the script ran.
                inner.mark_dirty(id).await.map_err(unavailable)?;
                Ok(GrabReceipt {
                    envelope_id: EnvelopeId(id),
                    user: user.to_owned(),
                    amount_cents: num(1),
                    seq: num(2) as u32,
                    remaining_count: num(4) as u32,
                    remaining_cents: num(5),
                    repeat: false,
                    at_ms: num(3),
                })
            }
            Some("repeat") => {
                let mut prev = r.get(1).map(String::as_str).unwrap_or("").split(':');
                let mut next = || prev.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                let (amount_cents, seq, at_ms) = (next(), next(), next());
                Ok(GrabReceipt {
                    envelope_id: EnvelopeId(id),
                    user: user.to_owned(),
                    amount_cents,
                    seq: seq as u32,
                    remaining_count: num(2) as u32,
                    remaining_cents: num(3),
                    repeat: true,
                    at_ms,
                })
            }
            Some("not_found") => Err(GrabError::NotFound),
            Some("empty") => Err(GrabError::Empty),
            Some("expired") => Err(GrabError::Expired),
            other => Err(GrabError::Unavailable(format!(
                "unexpected grab script answer {other:?}"
            ))),
        }
    }

    async fn envelope(
        &self,
        id: EnvelopeId,
        offset: usize,
        limit: usize,
    ) -> Result<Option<EnvelopePage>, StoreError> {
        let inner = &self.inner;
        let mut p = redis::pipe();
        p.hgetall(key(id.0, "meta")).llen(key(id.0, "order"));
        if limit > 0 {
            p.lrange(
                key(id.0, "order"),
                offset as isize,
                (offset + limit - 1) as isize,
            );
        }
        let (meta, grabbed, page): (Vec<(String, String)>, u32, Vec<String>) = if limit > 0 {
            inner.run(p.query_async(&mut inner.conn())).await?
        } else {
            let (m, g): (Vec<(String, String)>, u32) =
                inner.run(p.query_async(&mut inner.conn())).await?;
            (m, g, Vec::new())
        };
        if meta.is_empty() {
            return Ok(None);
        }
        let meta = Meta::from_pairs(&meta);
        let grabs = page
            .iter()
            .filter_map(|e| {
                let mut it = e.splitn(3, ':');
                let amount_cents = it.next()?.parse().ok()?;
                let at_ms = it.next()?.parse().ok()?;
                Some(GrabView {
                    user: it.next()?.to_owned(),
                    amount_cents,
                    at_ms,
                })
            })
            .collect();
        let summary = meta.summary(id);
        let grabbed_cents =
            summary.total_cents - summary.remaining_cents - summary.refunded_cents.unwrap_or(0);
        Ok(Some(EnvelopePage {
            summary,
            grabbed_count: grabbed,
            grabbed_cents,
            offset,
            limit,
            grabs,
        }))
    }

    async fn wallet(&self, user: &str, limit: usize) -> Result<WalletView, StoreError> {
        let inner = &self.inner;
        let mut p = redis::pipe();
        p.get(wallet_key(user, "bal"));
        p.lrange(wallet_key(user, "credits"), 0, limit.max(1) as isize - 1);
        let (bal, credits): (Option<u64>, Vec<String>) =
            inner.run(p.query_async(&mut inner.conn())).await?;
        let mut credits: Vec<Credit> = credits
            .iter()
            .filter_map(|c| serde_json::from_str(c).ok())
            .collect();
        credits.truncate(limit);
        Ok(WalletView {
            user: user.to_owned(),
            balance_cents: bal.unwrap_or(0),
            credits,
            settled_lsn: inner.credited.load(Ordering::Relaxed),
        })
    }

    async fn refund_expired(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let due: Vec<u64> = inner
            .run(
                inner
                    .conn()
                    .zrangebyscore_limit("grab:expiries", "-inf", now_ms() as f64, 0, 100),
            )
            .await?;
        let mut refunded = 0;
        for id in due {
            inner.mark_dirty(id).await?;
            let mut inv = inner.scripts.refund.prepare_invoke();
            inv.key(key(id, "meta"))
                .key(key(id, "shares"))
                .key(key(id, "events"));
            let r: i64 = inner.run(inv.invoke_async(&mut inner.conn())).await?;
            if r == -2 {
                continue; // Redis's clock says not yet
            }
            if r == 1 {
                refunded += 1;
                inner.appended.fetch_add(1, Ordering::Relaxed);
            }
            let _: i64 = inner.run(inner.conn().zrem("grab:expiries", id)).await?;
        }
        Ok(refunded)
    }

    fn health(&self) -> Health {
        let inner = &self.inner;
        let appended = inner.appended.load(Ordering::Relaxed);
        let credited = inner.credited.load(Ordering::Relaxed);
        Health {
            ok: inner.ok.load(Ordering::Relaxed),
            fsync: "redis".to_owned(),
            committed_lsn: appended,
            settled_lsn: credited,
            settlement_lag_records: inner.dirty_seen.load(Ordering::Relaxed),
            snapshot_lsn: 0,
            envelopes: 0,
            log_syncs: 0,
        }
    }

    async fn totals(&self) -> Result<Totals, StoreError> {
        let inner = &self.inner;
        let ids: Vec<u64> = inner
            .run(inner.conn().zrange("grab:envelopes", 0, -1))
            .await?;
        let mut created_cents = 0;
        let mut remaining_cents = 0;
        let mut envelopes = 0;
        let mut settled = true;
        for chunk in ids.chunks(500) {
            let mut p = redis::pipe();
            for id in chunk {
                p.hmget(
                    key(*id, "meta"),
                    &["total", "rem_cents", "events", "settled"],
                );
            }
            let rows: Vec<Vec<Option<u64>>> = inner.run(p.query_async(&mut inner.conn())).await?;
            for row in rows {
                let [Some(total), Some(rem), Some(events), Some(done)] = row[..] else {
                    continue; // indexed, but the create never ran
                };
                envelopes += 1;
                created_cents += total;
                remaining_cents += rem;
                settled &= events == done;
            }
        }
        let users: Vec<String> = inner.run(inner.conn().smembers("grab:wallets")).await?;
        let mut wallet_cents = 0;
        for chunk in users.chunks(500) {
            let mut p = redis::pipe();
            for u in chunk {
                p.get(wallet_key(u, "bal"));
            }
            let bals: Vec<Option<u64>> = inner.run(p.query_async(&mut inner.conn())).await?;
            wallet_cents += bals.into_iter().flatten().sum::<u64>();
        }
        let dirty: u64 = inner.run(inner.conn().scard("grab:dirty")).await?;
        Ok(Totals {
            envelopes,
            created_cents,
            remaining_cents,
            wallet_cents,
            settled: settled && dirty == 0,
        })
    }
}

// === impl Inner ===

impl Inner {
    /// Create envelope `id` from `new` unless it exists. Answers the envelope as its create
    /// answered it, and whether it already existed (then `new`'s split is unused).
    async fn create_id(
        &self,
        id: u64,
        new: &NewEnvelope,
    ) -> Result<(EnvelopeSummary, bool), StoreError> {
        // Index first: an indexed id without an envelope is skipped by every sweep, an
        // envelope missing from the index would never be refunded. `NX`: a retry of an
        // existing envelope must not move its expiry.
        let expires_guess = now_ms() + new.expires_in_s() * 1000;
        let mut p = redis::pipe();
        p.zadd("grab:envelopes", id, id as f64)
            .ignore()
            .cmd("ZADD")
            .arg("grab:expiries")
            .arg("NX")
            .arg(expires_guess as f64)
            .arg(id)
            .ignore();
        self.run(p.query_async::<()>(&mut self.conn())).await?;

        let shares = crate::split::split(new.total_cents(), new.count(), &mut rand::rng());
        let mut inv = self.scripts.create.prepare_invoke();
        inv.key(key(id, "meta"))
            .key(key(id, "shares"))
            .arg(new.sender())
            .arg(new.total_cents())
            .arg(new.count())
            .arg(new.expires_in_s())
            .arg(&shares);
        let r: Vec<String> = self.run(inv.invoke_async(&mut self.conn())).await?;
        let num = |i: usize| r.get(i).and_then(|s| s.parse::<u64>().ok());
        let (Some(created_at_ms), Some(expires_at_ms)) = (num(0), num(1)) else {
            return Err(StoreError::Unavailable(format!(
                "unexpected create script answer {r:?}"
            )));
        };
        let existed = r.get(2).is_some_and(|s| s == "exists");
        Ok((
            created_summary(id, new, created_at_ms, expires_at_ms),
            existed,
        ))
    }

    /// A handle on the shared multiplexed connection (a cheap clone).
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Await one Redis call within the timeout; any failure is `Unavailable` and marks the
    /// store unhealthy until the next success. The connection manager reconnects by itself.
    async fn run<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => {
                self.ok.store(true, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.ok.store(false, Ordering::Relaxed);
                Err(StoreError::Unavailable(format!("redis: {e}")))
            }
            Err(_) => {
                self.ok.store(false, Ordering::Relaxed);
                Err(StoreError::Unavailable("redis: timed out".into()))
            }
        }
    }

    async fn mark_dirty(&self, id: u64) -> Result<(), StoreError> {
        let _: i64 = self.run(self.conn().sadd("grab:dirty", id)).await?;
        Ok(())
    }

    /// One pass over the dirty set: clear each mark, then settle the envelope.
    async fn settle_dirty(&self) -> Result<usize, StoreError> {
        let ids: Vec<u64> = self
            .run(self.conn().srandmember_multiple("grab:dirty", 64))
            .await?;
        self.dirty_seen.store(ids.len() as u64, Ordering::Relaxed);
        for &id in &ids {
            // Clear first: a grab that lands after this re-marks the envelope.
            let _: i64 = self.run(self.conn().srem("grab:dirty", id)).await?;
            self.settle_envelope(id).await?;
        }
        Ok(ids.len())
    }

    /// Settle every envelope whose events run ahead of its cursor.
    async fn settle_all(&self) -> Result<(), StoreError> {
        let ids: Vec<u64> = self
            .run(self.conn().zrange("grab:envelopes", 0, -1))
            .await?;
        for chunk in ids.chunks(500) {
            let mut p = redis::pipe();
            for id in chunk {
                p.hmget(key(*id, "meta"), &["events", "settled"]);
            }
            let rows: Vec<Vec<Option<u64>>> = self.run(p.query_async(&mut self.conn())).await?;
            for (id, row) in chunk.iter().zip(rows) {
                if let [Some(events), Some(done)] = row[..]
                    && events > done
                {
                    self.settle_envelope(*id).await?;
                }
            }
        }
        Ok(())
    }

    /// Credit every event of one envelope past its cursor, then move the cursor.
    async fn settle_envelope(&self, id: u64) -> Result<(), StoreError> {
        let mut cursor: String = self
            .run(self.conn().hget(key(id, "meta"), "settled_id"))
            .await
            .map(|c: Option<String>| c.unwrap_or_else(|| "0-0".into()))?;
        loop {
            let entries: Value = self
                .run(
                    redis::cmd("XRANGE")
                        .arg(key(id, "events"))
                        .arg(format!("({cursor}"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(EVENT_BATCH)
                        .query_async(&mut self.conn()),
                )
                .await?;
            let events = parse_events(&entries);
            let n_read = events.len();
            let mut last = None;
            for (stream_id, ev) in events {
                let credit = Credit {
                    envelope_id: EnvelopeId(id),
                    amount_cents: ev.amount,
                    kind: ev.kind,
                    at_ms: ev.at,
                    lsn: ev.n,
                };
                let json = serde_json::to_string(&credit).expect("a credit serializes");
                // Index the wallet before crediting it, as for envelopes.
                let _: i64 = self.run(self.conn().sadd("grab:wallets", &ev.user)).await?;
                let mut inv = self.scripts.credit.prepare_invoke();
                inv.key(wallet_key(&ev.user, "done"))
                    .key(wallet_key(&ev.user, "bal"))
                    .key(wallet_key(&ev.user, "credits"))
                    .arg(format!("{id}:{}", ev.n))
                    .arg(ev.amount)
                    .arg(json)
                    .arg(self.keep_credits);
                let fresh: i64 = self.run(inv.invoke_async(&mut self.conn())).await?;
                if fresh == 1 {
                    self.credited.fetch_add(1, Ordering::Relaxed);
                }
                last = Some((ev.n, stream_id));
            }
            if let Some((n, stream_id)) = last {
                let mut inv = self.scripts.advance.prepare_invoke();
                inv.key(key(id, "meta")).arg(n).arg(&stream_id);
                let _: i64 = self.run(inv.invoke_async(&mut self.conn())).await?;
                cursor = stream_id;
            }
            if n_read < EVENT_BATCH {
                return Ok(());
            }
        }
    }
}

/// The settler: dirty envelopes as they come, everything at start and every
/// [`FULL_SWEEP`]. Errors are logged and retried; settlement only lags meanwhile.
async fn settle_loop(inner: Arc<Inner>) {
    let mut last_full: Option<tokio::time::Instant> = None;
    loop {
        if last_full.is_none_or(|t| t.elapsed() >= FULL_SWEEP) {
            match inner.settle_all().await {
                Ok(()) => last_full = Some(tokio::time::Instant::now()),
                Err(e) => tracing::warn!(error = %e, "settlement sweep failed"),
            }
        }
        match inner.settle_dirty().await {
            Ok(0) => tokio::time::sleep(SETTLE_IDLE).await,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "settlement pass failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One settlement event, decoded.
#[derive(Debug)]
struct Event {
    n: u64,
    kind: CreditKind,
    user: String,
    amount: u64,
    at: u64,
}

/// `XRANGE` output: `[[id, [field, value, …]], …]`.
fn parse_events(v: &Value) -> Vec<(String, Event)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let [id, Value::Array(fields)] = &pair[..] else {
                return None;
            };
            let mut ev = Event {
                n: 0,
                kind: CreditKind::Grab,
                user: String::new(),
                amount: 0,
                at: 0,
            };
            for kv in fields.chunks(2) {
                let [k, v] = kv else { continue };
                let v = text(v);
                match text(k).as_str() {
                    "n" => ev.n = v.parse().ok()?,
                    "kind" => {
                        ev.kind = if v == "refund" {
                            CreditKind::Refund
                        } else {
                            CreditKind::Grab
                        }
                    }
                    "user" => ev.user = v,
                    "amount" => ev.amount = v.parse().ok()?,
                    "at" => ev.at = v.parse().ok()?,
                    _ => {}
                }
            }
            Some((text(id), ev))
        })
        .collect()
}

// === impl Meta ===

impl Meta {
    fn from_pairs(pairs: &[(String, String)]) -> Self {
        let mut m = Meta::default();
        for (k, v) in pairs {
            let n = || v.parse::<u64>().unwrap_or(0);
            match k.as_str() {
                "sender" => m.sender = v.clone(),
                "total" => m.total = n(),
                "count" => m.count = n() as u32,
                "created" => m.created = n(),
                "expires" => m.expires = n(),
                "rem_cents" => m.rem_cents = n(),
                "rem_count" => m.rem_count = n() as u32,
                "refunded" => m.refunded = Some(n()),
                _ => {}
            }
        }
        m
    }

    fn summary(self, id: EnvelopeId) -> EnvelopeSummary {
        let state = if self.refunded.is_some() {
            EnvelopeState::Refunded
        } else if self.rem_count == 0 {
            EnvelopeState::Empty
        } else if now_ms() >= self.expires {
            EnvelopeState::Expired
        } else {
            EnvelopeState::Open
        };
        EnvelopeSummary {
            id,
            sender: self.sender,
            total_cents: self.total,
            count: self.count,
            remaining_cents: self.rem_cents,
            remaining_count: self.rem_count,
            refunded_cents: self.refunded,
            state,
            created_at_ms: self.created,
            expires_at_ms: self.expires,
        }
    }
}

/// `{env:ID}:PART`: the hash tag keeps an envelope's keys in one slot.
fn key(id: u64, part: &str) -> String {
    format!("{{env:{id}}}:{part}")
}

/// Envelope `id` of `new` as its create answered it: nothing grabbed, open.
fn created_summary(
    id: u64,
    new: &NewEnvelope,
    created_at_ms: u64,
    expires_at_ms: u64,
) -> EnvelopeSummary {
    EnvelopeSummary {
        id: EnvelopeId(id),
        sender: new.sender().to_owned(),
        total_cents: new.total_cents(),
        count: new.count(),
        remaining_cents: new.total_cents(),
        remaining_count: new.count(),
        refunded_cents: None,
        state: EnvelopeState::Open,
        created_at_ms,
        expires_at_ms,
    }
}

/// `grab:idem:LEN:SENDER:KEY`: an idempotency key in its sender's scope (the length
/// keeps `sender`/`key` pairs apart when either contains `:`).
fn idem_key(sender: &str, key: &str) -> String {
    format!("grab:idem:{}:{sender}:{key}", sender.len())
}

/// `{w:USER}:PART`. User ids are at most 128 bytes; a `}` in one only shortens the tag,
/// and every key of the user still shares it.
fn wallet_key(user: &str, part: &str) -> String {
    format!("{{w:{user}}}:{part}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
