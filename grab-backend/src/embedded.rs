//! The embedded store: envelopes in memory behind per-envelope locks, made
//! durable by the local write-ahead log, settled by the settlement worker.
//!
//! # Concurrency
//! Envelopes live in a sharded map of `Arc<Mutex<Envelope>>`. A grab takes
//! one shard lock just long enough to clone the `Arc`, then the envelope's
//! own lock while it checks, draws the share, appends the record (a queue
//! push) and applies it. No lock is held across the wait for the disk. So a
//! hot envelope serializes only its own grabs, for about a microsecond each,
//! and all of them share the log's syncs with everybody else's.
//!
//! # Answers and durability
//! The record is appended before memory changes, under the same lock, so the
//! log holds each envelope's records in the order memory applied them; the
//! log is a single sequence, so if a record survives a crash so do all before
//! it. Answers wait for the log: a grab for its own record, a repeat for the
//! original grab, and "empty" or "expired" for the envelope's last record.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::config::{Config, FsyncMode};
use crate::ids::Ids;
use crate::model::{Envelope, EnvelopeId, IdemEntry, IdemTable, Ledger, LoggedKey, Record};
use crate::recovery::{self, Recovered};
use crate::settle::{SettleStatus, Settler};
use crate::store::{
    CreateError, Created, EnvelopePage, EnvelopeSummary, GrabError, GrabReceipt, GrabView, Health,
    IdempotencyKey, NewEnvelope, Store, StoreError, Totals, WalletView,
};
use crate::wal::{Commit, Wal, WalError, WalOptions};

/// Shards of the envelope map. A power of two; ids are sequential, so
/// `id % SHARDS` spreads them evenly.
const SHARDS: usize = 64;

/// One shard of the envelope map. A std mutex: it is held only to clone an
/// `Arc`, never across an await.
type Shard = Mutex<HashMap<u64, Arc<Mutex<Envelope>>>>;

/// The single-node store: memory, a local log and snapshots in `data_dir`.
pub struct EmbeddedStore {
    shards: Box<[Shard]>,
    /// Envelope ids, below a durable high-water mark (see `ids`).
    ids: Ids,
    wal: Wal,
    /// The settled state, written only by the settlement worker.
    ledger: Arc<RwLock<Ledger>>,
    settle: Arc<SettleStatus>,
    /// Joined by `close` after the log closes (which ends its input).
    settle_thread: Mutex<Option<JoinHandle<()>>>,
    /// (expires_at_ms, id) of envelopes that may need a refund.
    expiries: Mutex<BinaryHeap<Reverse<(u64, u64)>>>,
    /// Live idempotency keys of creates. A keyed create holds this lock while it
    /// checks the key, appends its record and publishes the envelope (no disk wait),
    /// so two requests under one key cannot both create.
    idem: Mutex<IdemTable>,
    idem_ttl_ms: u64,
    idem_max_keys: usize,
    fsync: FsyncMode,
}

// === impl EmbeddedStore ===

impl EmbeddedStore {
    /// Open (creating if needed) and recover the store in
    /// `config.data_dir`, then start the log writer and settlement worker.
    /// Blocking: call from `spawn_blocking` in async code.
    pub fn open(config: &Config) -> anyhow::Result<Self> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let started = std::time::Instant::now();
        let Recovered {
            mut ledger,
            tail,
            replayed,
            torn,
        } = recovery::recover(dir, config.wallet_recent_credits)?;
        let idem_ttl_ms = u64::try_from(config.idempotency_ttl.as_millis()).unwrap_or(u64::MAX);
        let idem_max_keys = config.idempotency_max_keys;
        let expired_keys = ledger
            .idempotency
            .prune(now_ms(), idem_ttl_ms, idem_max_keys);
        let idem = ledger.idempotency.clone();
        tracing::info!(
            dir = %dir.display(),
            lsn = ledger.lsn,
            replayed,
            torn_tail_bytes = torn.map_or(0, |t| t.dropped_bytes),
            envelopes = ledger.envelopes.len(),
            idempotency_keys = idem.len(),
            expired_keys,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "grab store recovered"
        );

        let shards: Box<[Shard]> = (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        let mut expiries = BinaryHeap::new();
        for env in ledger.envelopes.values() {
            if env.refunded_cents.is_none() && env.remaining_cents > 0 {
                expiries.push(Reverse((env.expires_at_ms, env.id)));
            }
            shards[shard_of(env.id)]
                .lock()
                .expect("shard poisoned")
                .insert(env.id, Arc::new(Mutex::new(env.clone())));
        }
        let ids = Ids::open(dir, ledger.next_envelope_id)?;
        let next_lsn = ledger.lsn + 1;
        let settle = Arc::new(SettleStatus::default());
        settle.settled_lsn.store(ledger.lsn, Ordering::Release);
        let ledger = Arc::new(RwLock::new(ledger));

        let (tx, rx) = mpsc::channel();
        let opts = WalOptions {
            mode: config.fsync,
            group_commit: config.group_commit,
            batch_interval: config.batch_fsync_interval,
            segment_max_bytes: config.segment_max_bytes,
        };
        let wal = Wal::start(dir, tail, next_lsn, opts, tx).context("starting the log writer")?;
        let settle_thread = Settler {
            rx,
            ledger: ledger.clone(),
            status: settle.clone(),
            dir: dir.clone(),
            snapshot_every: config.snapshot_every_records.max(1),
            keep_credits: config.wallet_recent_credits,
            since_snapshot: replayed,
            idem_ttl_ms,
            idem_max_keys,
        }
        .spawn()
        .context("starting settlement")?;

        Ok(Self {
            shards,
            ids,
            wal,
            ledger,
            settle,
            settle_thread: Mutex::new(Some(settle_thread)),
            expiries: Mutex::new(expiries),
            idem: Mutex::new(idem),
            idem_ttl_ms,
            idem_max_keys,
            fsync: config.fsync,
        })
    }

    /// Refuse new writes, commit everything queued, let settlement catch up
    /// and write a final snapshot. Blocking; idempotent.
    pub fn close(&self) {
        self.wal.close();
        self.ids.close();
        let thread = self
            .settle_thread
            .lock()
            .expect("settle thread poisoned")
            .take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("settlement thread panicked");
        }
    }

    /// Last appended (handed out, maybe not yet durable) and last settled
    /// sequence numbers. Equal means the wallets reflect every change made
    /// so far.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.wal.appended_lsn(),
            self.settle.settled_lsn.load(Ordering::Acquire),
        )
    }

    /// Log a create and publish the envelope; the caller answers once the returned
    /// commit resolves.
    fn start_create(
        &self,
        new: &NewEnvelope,
        now: u64,
        idem: Option<LoggedKey>,
    ) -> Result<(EnvelopeSummary, u64, Commit), StoreError> {
        let id = self
            .ids
            .allocate()
            .map_err(|e| StoreError::Unavailable(format!("reserving envelope ids: {e}")))?;
        let expires_at_ms = now.saturating_add(new.expires_in_s().saturating_mul(1000));
        let record = Record::Create {
            id,
            sender: new.sender().to_owned(),
            total_cents: new.total_cents(),
            count: new.count(),
            created_at_ms: now,
            expires_at_ms,
            idem,
        };
        // Appended before the envelope becomes visible, so no grab of it can
        // precede its create in the log.
        let (lsn, commit) = self.wal.append(record).map_err(unavailable)?;
        let env = Envelope::new(
            id,
            new.sender().to_owned(),
            new.total_cents(),
            new.count(),
            now,
            expires_at_ms,
            lsn,
        );
        let summary = created_summary(&env);
        self.shards[shard_of(id)]
            .lock()
            .expect("shard poisoned")
            .insert(id, Arc::new(Mutex::new(env)));
        self.expiries
            .lock()
            .expect("expiries poisoned")
            .push(Reverse((expires_at_ms, id)));
        Ok((summary, lsn, commit))
    }

    fn get(&self, id: u64) -> Option<Arc<Mutex<Envelope>>> {
        self.shards[shard_of(id)]
            .lock()
            .expect("shard poisoned")
            .get(&id)
            .cloned()
    }

    fn for_each_envelope(&self, mut f: impl FnMut(&Envelope)) {
        for shard in self.shards.iter() {
            let envs: Vec<_> = shard
                .lock()
                .expect("shard poisoned")
                .values()
                .cloned()
                .collect();
            for env in envs {
                f(&env.lock().expect("envelope poisoned"));
            }
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl Store for EmbeddedStore {
    async fn create(&self, new: NewEnvelope) -> Result<EnvelopeSummary, StoreError> {
        let (summary, _, commit) = self.start_create(&new, now_ms(), None)?;
        commit.wait().await.map_err(unavailable)?;
        Ok(summary)
    }

    async fn create_idempotent(
        &self,
        new: NewEnvelope,
        key: &IdempotencyKey,
    ) -> Result<Created, CreateError> {
        let now = now_ms();
        let (created, commit) = {
            let mut table = self.idem.lock().expect("idempotency table poisoned");
            table.prune(now, self.idem_ttl_ms, self.idem_max_keys);
            if let Some(e) = table.get(new.sender(), key.key(), now, self.idem_ttl_ms) {
                if e.fingerprint != key.fingerprint() {
                    return Err(CreateError::KeyReused);
                }
                let env = self.get(e.envelope).ok_or_else(|| {
                    CreateError::Unavailable(format!(
                        "idempotency key names missing envelope {}",
                        e.envelope
                    ))
                })?;
                let summary = created_summary(&env.lock().expect("envelope poisoned"));
                // The first request may still be waiting for the disk: answer only
                // once its create is durable, like it does.
                let commit = self.wal.committed(e.lsn);
                (
                    Created {
                        summary,
                        replayed: true,
                    },
                    commit,
                )
            } else {
                let logged = LoggedKey {
                    key: key.key().to_owned(),
                    fingerprint: key.fingerprint().to_owned(),
                };
                let (summary, lsn, commit) = self
                    .start_create(&new, now, Some(logged))
                    .map_err(|StoreError::Unavailable(why)| CreateError::Unavailable(why))?;
                table.insert(IdemEntry {
                    sender: new.sender().to_owned(),
                    key: key.key().to_owned(),
                    fingerprint: key.fingerprint().to_owned(),
                    envelope: summary.id.0,
                    at_ms: now,
                    lsn,
                });
                table.prune(now, self.idem_ttl_ms, self.idem_max_keys);
                (
                    Created {
                        summary,
                        replayed: false,
                    },
                    commit,
                )
            }
        };
        commit
            .wait()
            .await
            .map_err(|e| CreateError::Unavailable(e.to_string()))?;
        Ok(created)
    }

    async fn grab(&self, id: EnvelopeId, user: &str) -> Result<GrabReceipt, GrabError> {
        let env = self.get(id.0).ok_or(GrabError::NotFound)?;
        let now = now_ms();
        // Decide under the envelope lock; wait for the disk after releasing it.
        let (outcome, commit) = {
            let mut e = env.lock().expect("envelope poisoned");
            if let Some((i, g)) = e.grab_of(user) {
                let receipt = receipt(&e, i, g.amount_cents, g.at_ms, true);
                let commit = self.wal.committed(g.lsn);
                (Ok(receipt), commit)
            } else {
                match e.state(now) {
                    crate::model::EnvelopeState::Open => {
                        let mut rng = rand::rng();
                        let amount = crate::split::draw_share(
                            e.remaining_cents,
                            e.remaining_count,
                            &mut rng,
                        );
                        let user: Arc<str> = Arc::from(user);
                        let record = Record::Grab {
                            envelope: id.0,
                            user: user.clone(),
                            amount_cents: amount,
                            at_ms: now,
                        };
                        let (lsn, commit) = self
                            .wal
                            .append(record)
                            .map_err(|e| GrabError::Unavailable(e.to_string()))?;
                        e.apply_grab(user, amount, now, lsn)
                            .expect("a drawn share always fits the envelope it was drawn from");
                        let i = e.grabs.len() - 1;
                        (Ok(receipt(&e, i, amount, now, false)), commit)
                    }
                    crate::model::EnvelopeState::Empty => {
                        (Err(GrabError::Empty), self.wal.committed(e.last_lsn))
                    }
                    crate::model::EnvelopeState::Expired
                    | crate::model::EnvelopeState::Refunded => {
                        (Err(GrabError::Expired), self.wal.committed(e.last_lsn))
                    }
                }
            }
        };
        commit
            .wait()
            .await
            .map_err(|e| GrabError::Unavailable(e.to_string()))?;
        outcome
    }

    async fn envelope(
        &self,
        id: EnvelopeId,
        offset: usize,
        limit: usize,
    ) -> Result<Option<EnvelopePage>, StoreError> {
        let Some(env) = self.get(id.0) else {
            return Ok(None);
        };
        let e = env.lock().expect("envelope poisoned");
        let grabs = e
            .grabs
            .iter()
            .skip(offset)
            .take(limit)
            .map(|g| GrabView {
                user: g.user.to_string(),
                amount_cents: g.amount_cents,
                at_ms: g.at_ms,
            })
            .collect();
        Ok(Some(EnvelopePage {
            summary: summary(&e, now_ms()),
            grabbed_count: e.grabs.len() as u32,
            grabbed_cents: e.grabs.iter().map(|g| g.amount_cents).sum(),
            offset,
            limit,
            grabs,
        }))
    }

    async fn wallet(&self, user: &str, limit: usize) -> Result<WalletView, StoreError> {
        let ledger = self.ledger.read().expect("ledger poisoned");
        let (balance_cents, credits) = match ledger.wallets.get(user) {
            Some(w) => (
                w.balance_cents,
                w.credits.iter().rev().take(limit).cloned().collect(),
            ),
            None => (0, Vec::new()),
        };
        Ok(WalletView {
            user: user.to_owned(),
            balance_cents,
            credits,
            settled_lsn: ledger.lsn,
        })
    }

    async fn refund_expired(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let due: Vec<u64> = {
            let mut heap = self.expiries.lock().expect("expiries poisoned");
            let mut due = Vec::new();
            while heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                let Reverse((_, id)) = heap.pop().expect("peeked");
                due.push(id);
            }
            due
        };
        let mut refunded = 0;
        for (n, id) in due.iter().enumerate() {
            let Some(env) = self.get(*id) else { continue };
            let mut e = env.lock().expect("envelope poisoned");
            if e.refunded_cents.is_some() || e.remaining_cents == 0 {
                continue;
            }
            let amount = e.remaining_cents;
            let record = Record::Refund {
                envelope: *id,
                amount_cents: amount,
                at_ms: now,
            };
            match self.wal.append(record) {
                Ok((lsn, _commit)) => {
                    // Nobody waits on a refund: settlement credits it once it
                    // is committed, and a crash before that replays it or
                    // (if it was lost) the next sweep issues it again.
                    e.apply_refund(amount, lsn)
                        .expect("refund of the exact remainder always applies");
                    refunded += 1;
                }
                Err(err) => {
                    let mut heap = self.expiries.lock().expect("expiries poisoned");
                    for id in &due[n..] {
                        heap.push(Reverse((now, *id)));
                    }
                    return Err(unavailable(err));
                }
            }
        }
        Ok(refunded)
    }

    fn health(&self) -> Health {
        let committed_lsn = self.wal.committed_lsn();
        let settled_lsn = self.settle.settled_lsn.load(Ordering::Acquire);
        let envelopes = self
            .shards
            .iter()
            .map(|s| s.lock().expect("shard poisoned").len() as u64)
            .sum();
        Health {
            ok: !self.wal.failed() && !self.settle.failed.load(Ordering::Acquire),
            fsync: self.fsync.to_string(),
            committed_lsn,
            settled_lsn,
            settlement_lag_records: committed_lsn.saturating_sub(settled_lsn),
            snapshot_lsn: self.settle.snapshot_lsn.load(Ordering::Acquire),
            envelopes,
            log_syncs: self.wal.syncs(),
        }
    }

    async fn totals(&self) -> Result<Totals, StoreError> {
        // Settled means: nothing was appended between the two reads and the
        // ledger had applied all of it, so the live envelopes read in between
        // describe the same log prefix as the wallets.
        let before = self.wal.appended_lsn();
        let (wallet_cents, ledger_lsn) = {
            let l = self.ledger.read().expect("ledger poisoned");
            (l.wallet_cents(), l.lsn)
        };
        let (mut envelopes, mut created_cents, mut remaining_cents) = (0, 0, 0);
        self.for_each_envelope(|e| {
            envelopes += 1;
            created_cents += e.total_cents;
            remaining_cents += e.remaining_cents;
        });
        let settled = before == ledger_lsn && self.wal.appended_lsn() == before;
        Ok(Totals {
            envelopes,
            created_cents,
            remaining_cents,
            wallet_cents,
            settled,
        })
    }
}

// === helpers ===

fn shard_of(id: u64) -> usize {
    (id as usize) % SHARDS
}

fn unavailable(e: WalError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn summary(e: &Envelope, now: u64) -> EnvelopeSummary {
    EnvelopeSummary {
        id: EnvelopeId(e.id),
        sender: e.sender.clone(),
        total_cents: e.total_cents,
        count: e.count,
        remaining_cents: e.remaining_cents,
        remaining_count: e.remaining_count,
        refunded_cents: e.refunded_cents,
        state: e.state(now),
        created_at_ms: e.created_at_ms,
        expires_at_ms: e.expires_at_ms,
    }
}

/// An envelope as its create answered it: nothing grabbed, open. A replayed create
/// answers exactly this, whatever happened to the envelope since.
fn created_summary(e: &Envelope) -> EnvelopeSummary {
    EnvelopeSummary {
        id: EnvelopeId(e.id),
        sender: e.sender.clone(),
        total_cents: e.total_cents,
        count: e.count,
        remaining_cents: e.total_cents,
        remaining_count: e.count,
        refunded_cents: None,
        state: crate::model::EnvelopeState::Open,
        created_at_ms: e.created_at_ms,
        expires_at_ms: e.expires_at_ms,
    }
}

fn receipt(e: &Envelope, index: usize, amount_cents: u64, at_ms: u64, repeat: bool) -> GrabReceipt {
    GrabReceipt {
        envelope_id: EnvelopeId(e.id),
        user: e.grabs[index].user.to_string(),
        amount_cents,
        seq: index as u32 + 1,
        remaining_count: e.remaining_count,
        remaining_cents: e.remaining_cents,
        repeat,
        at_ms,
    }
}

#[cfg(test)]
mod tests;
