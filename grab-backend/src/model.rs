//! Data: envelope ids, log records, envelope state, wallets, and the
//! [`Ledger`] (the state a log prefix describes).
//!
//! One set of `apply_*` methods moves an [`Envelope`] forward, used by the
//! live grab path, by recovery and by the settlement worker alike, so the
//! three can never disagree about what a record means.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Identifier of an envelope: a positive integer, rendered as a decimal
/// string in JSON and URLs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvelopeId(pub u64);

/// What an envelope currently accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeState {
    /// Grabs are accepted.
    Open,
    /// Every share has been grabbed.
    Empty,
    /// Expired; the remainder is about to be refunded to the sender.
    Expired,
    /// Expired and the remainder has been returned to the sender.
    Refunded,
}

/// Why a wallet was credited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditKind {
    /// A share of someone's envelope.
    Grab,
    /// The unclaimed remainder of one's own expired envelope.
    Refund,
}

/// One record of the write-ahead log. The log is the truth: amounts are
/// decided before logging and replay applies them verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Record {
    Create {
        id: u64,
        sender: String,
        total_cents: u64,
        count: u32,
        created_at_ms: u64,
        expires_at_ms: u64,
        /// The `Idempotency-Key` the create was made under, if any: logged in the same
        /// record as the create, so the mapping is exactly as durable as the envelope.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idem: Option<LoggedKey>,
    },
    Grab {
        envelope: u64,
        user: Arc<str>,
        amount_cents: u64,
        at_ms: u64,
    },
    Refund {
        envelope: u64,
        amount_cents: u64,
        at_ms: u64,
    },
}

/// An idempotency key as logged with its create; scoped to the create's sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LoggedKey {
    pub(crate) key: String,
    /// Hex SHA-256 of the canonical request (see [`crate::store::IdempotencyKey`]).
    pub(crate) fingerprint: String,
}

/// One remembered idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdemEntry {
    pub(crate) sender: String,
    pub(crate) key: String,
    pub(crate) fingerprint: String,
    pub(crate) envelope: u64,
    /// The create's time; the key expires `ttl` after it.
    pub(crate) at_ms: u64,
    /// The create's log sequence number: a replay waits until it is durable.
    pub(crate) lsn: u64,
}

/// Idempotency keys by (sender, key), oldest first, bounded by [`IdemTable::prune`].
/// Serialized (in snapshots) as the list of entries in insertion order.
#[derive(Clone, Debug, Default)]
pub(crate) struct IdemTable {
    by_key: HashMap<(String, String), IdemEntry>,
    /// (lsn, scope) in insertion (= log) order; stale after a key is replaced.
    order: VecDeque<(u64, (String, String))>,
}

/// One grab of an envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GrabEntry {
    pub(crate) user: Arc<str>,
    pub(crate) amount_cents: u64,
    pub(crate) at_ms: u64,
    /// Log sequence number of the grab record: a repeat grab waits until the
    /// log is durable up to here before answering.
    pub(crate) lsn: u64,
}

/// Full state of one envelope.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) id: u64,
    pub(crate) sender: String,
    pub(crate) total_cents: u64,
    pub(crate) count: u32,
    pub(crate) created_at_ms: u64,
    pub(crate) expires_at_ms: u64,
    pub(crate) remaining_cents: u64,
    pub(crate) remaining_count: u32,
    /// Grabs in order; `by_user` indexes them.
    pub(crate) grabs: Vec<GrabEntry>,
    /// Amount returned to the sender, once refunded.
    pub(crate) refunded_cents: Option<u64>,
    /// Log sequence number of the last record about this envelope. An
    /// answer derived from the envelope's state (such as "empty") waits for
    /// the log to be durable up to here, so no answer depends on state a
    /// crash could take back.
    pub(crate) last_lsn: u64,
    #[serde(skip)]
    pub(crate) by_user: HashMap<Arc<str>, u32>,
}

/// A user's settled balance and most recent credits.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Wallet {
    pub(crate) balance_cents: u64,
    /// Most recent last; bounded by `Config::wallet_recent_credits`.
    pub(crate) credits: VecDeque<Credit>,
}

/// One credit to a wallet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// Envelope the money came from.
    pub envelope_id: EnvelopeId,
    /// Amount credited, in cents.
    pub amount_cents: u64,
    /// Grab share or refund.
    pub kind: CreditKind,
    /// When the grab or refund happened, in Unix milliseconds.
    pub at_ms: u64,
    /// Log sequence number of the record that caused the credit.
    pub lsn: u64,
}

/// The state described by a prefix of the log, up to and including `lsn`.
///
/// Owned by the settlement worker, which applies committed records to it in
/// log order; recovery rebuilds it from the snapshot plus the log tail, and
/// snapshots serialize it. Because it only ever reflects a whole prefix of the
/// log it is always self-consistent, which the live, concurrently updated
/// envelope map is not.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Ledger {
    /// Last applied log sequence number (0 = nothing).
    pub(crate) lsn: u64,
    /// One more than the largest envelope id ever logged.
    pub(crate) next_envelope_id: u64,
    pub(crate) envelopes: HashMap<u64, Envelope>,
    pub(crate) wallets: HashMap<String, Wallet>,
    /// Sum of `total_cents` over all envelopes: the conservation check's
    /// right-hand side.
    pub(crate) created_cents: u64,
    /// Idempotency keys of creates; pruned (TTL, count) at open and before snapshots.
    #[serde(default)]
    pub(crate) idempotency: IdemTable,
}

/// A record that does not fit the state it is applied to: the log is corrupt
/// or a bug wrote it. Recovery refuses to start rather than guess.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ApplyError {
    #[error("record {lsn} out of order: expected {expected}")]
    OutOfOrder { lsn: u64, expected: u64 },
    #[error("record {lsn}: envelope {id} created twice")]
    DuplicateEnvelope { lsn: u64, id: u64 },
    #[error("record {lsn}: unknown envelope {id}")]
    UnknownEnvelope { lsn: u64, id: u64 },
    #[error("record {lsn}: {reason} on envelope {id}")]
    Invalid {
        lsn: u64,
        id: u64,
        reason: &'static str,
    },
}

// === impl EnvelopeId ===

impl fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for EnvelopeId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(EnvelopeId)
    }
}

impl Serialize for EnvelopeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EnvelopeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// === impl Envelope ===

impl Envelope {
    pub(crate) fn new(
        id: u64,
        sender: String,
        total_cents: u64,
        count: u32,
        created_at_ms: u64,
        expires_at_ms: u64,
        lsn: u64,
    ) -> Self {
        Self {
            id,
            sender,
            total_cents,
            count,
            created_at_ms,
            expires_at_ms,
            remaining_cents: total_cents,
            remaining_count: count,
            grabs: Vec::new(),
            refunded_cents: None,
            last_lsn: lsn,
            by_user: HashMap::new(),
        }
    }

    pub(crate) fn state(&self, now_ms: u64) -> EnvelopeState {
        if self.refunded_cents.is_some() {
            EnvelopeState::Refunded
        } else if self.remaining_count == 0 {
            EnvelopeState::Empty
        } else if now_ms >= self.expires_at_ms {
            EnvelopeState::Expired
        } else {
            EnvelopeState::Open
        }
    }

    pub(crate) fn grab_of(&self, user: &str) -> Option<(usize, &GrabEntry)> {
        let i = *self.by_user.get(user)? as usize;
        Some((i, &self.grabs[i]))
    }

    /// Record a grab whose amount was already decided (live) or logged (replay).
    pub(crate) fn apply_grab(
        &mut self,
        user: Arc<str>,
        amount_cents: u64,
        at_ms: u64,
        lsn: u64,
    ) -> Result<(), ApplyError> {
        let invalid = |reason| ApplyError::Invalid {
            lsn,
            id: self.id,
            reason,
        };
        if self.refunded_cents.is_some() {
            return Err(invalid("grab after refund"));
        }
        if self.remaining_count == 0 {
            return Err(invalid("grab of an empty envelope"));
        }
        if self.by_user.contains_key(&user) {
            return Err(invalid("second grab by one user"));
        }
        let left_after = u64::from(self.remaining_count - 1);
        if amount_cents == 0
            || amount_cents > self.remaining_cents
            || self.remaining_cents - amount_cents < left_after
            || (left_after == 0 && amount_cents != self.remaining_cents)
        {
            return Err(invalid("share out of range"));
        }
        self.remaining_cents -= amount_cents;
        self.remaining_count -= 1;
        self.by_user.insert(user.clone(), self.grabs.len() as u32);
        self.grabs.push(GrabEntry {
            user,
            amount_cents,
            at_ms,
            lsn,
        });
        self.last_lsn = lsn;
        Ok(())
    }

    /// Return the remainder to the sender.
    pub(crate) fn apply_refund(&mut self, amount_cents: u64, lsn: u64) -> Result<(), ApplyError> {
        if self.refunded_cents.is_some() || amount_cents != self.remaining_cents {
            return Err(ApplyError::Invalid {
                lsn,
                id: self.id,
                reason: "refund does not match remainder",
            });
        }
        self.refunded_cents = Some(amount_cents);
        self.remaining_cents = 0;
        self.last_lsn = lsn;
        Ok(())
    }

    /// Rebuild the skipped index after deserializing.
    pub(crate) fn reindex(&mut self) {
        self.by_user = self
            .grabs
            .iter()
            .enumerate()
            .map(|(i, g)| (g.user.clone(), i as u32))
            .collect();
    }
}

// === impl IdemTable ===

impl IdemTable {
    /// The entry for (`sender`, `key`), if it has not expired by `now_ms`.
    pub(crate) fn get(
        &self,
        sender: &str,
        key: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Option<&IdemEntry> {
        self.by_key
            .get(&(sender.to_owned(), key.to_owned()))
            .filter(|e| e.at_ms.saturating_add(ttl_ms) > now_ms)
    }

    /// Remember `entry`, replacing an (expired) entry of the same scope.
    pub(crate) fn insert(&mut self, entry: IdemEntry) {
        let scope = (entry.sender.clone(), entry.key.clone());
        self.order.push_back((entry.lsn, scope.clone()));
        self.by_key.insert(scope, entry);
    }

    /// Drop entries older than `ttl_ms` at `now_ms`, then the oldest until at most
    /// `max` remain. Returns how many were dropped.
    pub(crate) fn prune(&mut self, now_ms: u64, ttl_ms: u64, max: usize) -> usize {
        let before = self.by_key.len();
        while let Some((lsn, scope)) = self.order.front() {
            let live = self.by_key.get(scope).filter(|e| e.lsn == *lsn);
            let drop = match live {
                // Replaced by a newer entry: the queue slot is stale.
                None => true,
                Some(e) => e.at_ms.saturating_add(ttl_ms) <= now_ms || self.by_key.len() > max,
            };
            if !drop {
                break;
            }
            let (lsn, scope) = self.order.pop_front().expect("peeked");
            if self.by_key.get(&scope).is_some_and(|e| e.lsn == lsn) {
                self.by_key.remove(&scope);
            }
        }
        before - self.by_key.len()
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }
}

impl Serialize for IdemTable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            self.order
                .iter()
                .filter_map(|(lsn, scope)| self.by_key.get(scope).filter(|e| e.lsn == *lsn)),
        )
    }
}

impl<'de> Deserialize<'de> for IdemTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut table = IdemTable::default();
        for entry in Vec::<IdemEntry>::deserialize(d)? {
            table.insert(entry);
        }
        Ok(table)
    }
}

// === impl Wallet ===

impl Wallet {
    fn credit(&mut self, credit: Credit, keep: usize) {
        self.balance_cents += credit.amount_cents;
        self.credits.push_back(credit);
        while self.credits.len() > keep {
            self.credits.pop_front();
        }
    }
}

// === impl Ledger ===

impl Ledger {
    /// Apply record `lsn`, which must be the next one. Grabs and refunds
    /// credit wallets here: applying the log in order, exactly once per
    /// sequence number, is what makes settlement idempotent across restarts.
    pub(crate) fn apply(
        &mut self,
        lsn: u64,
        record: &Record,
        keep_credits: usize,
    ) -> Result<(), ApplyError> {
        if lsn != self.lsn + 1 {
            return Err(ApplyError::OutOfOrder {
                lsn,
                expected: self.lsn + 1,
            });
        }
        match record {
            Record::Create {
                id,
                sender,
                total_cents,
                count,
                created_at_ms,
                expires_at_ms,
                idem,
            } => {
                if self.envelopes.contains_key(id) {
                    return Err(ApplyError::DuplicateEnvelope { lsn, id: *id });
                }
                if *count == 0 || *total_cents < u64::from(*count) {
                    return Err(ApplyError::Invalid {
                        lsn,
                        id: *id,
                        reason: "total below count",
                    });
                }
                let env = Envelope::new(
                    *id,
                    sender.clone(),
                    *total_cents,
                    *count,
                    *created_at_ms,
                    *expires_at_ms,
                    lsn,
                );
                self.envelopes.insert(*id, env);
                self.next_envelope_id = self.next_envelope_id.max(id + 1);
                self.created_cents += total_cents;
                if let Some(k) = idem {
                    self.idempotency.insert(IdemEntry {
                        sender: sender.clone(),
                        key: k.key.clone(),
                        fingerprint: k.fingerprint.clone(),
                        envelope: *id,
                        at_ms: *created_at_ms,
                        lsn,
                    });
                }
            }
            Record::Grab {
                envelope,
                user,
                amount_cents,
                at_ms,
            } => {
                let env = self
                    .envelopes
                    .get_mut(envelope)
                    .ok_or(ApplyError::UnknownEnvelope { lsn, id: *envelope })?;
                env.apply_grab(user.clone(), *amount_cents, *at_ms, lsn)?;
                let credit = Credit {
                    envelope_id: EnvelopeId(*envelope),
                    amount_cents: *amount_cents,
                    kind: CreditKind::Grab,
                    at_ms: *at_ms,
                    lsn,
                };
                self.wallets
                    .entry(user.to_string())
                    .or_default()
                    .credit(credit, keep_credits);
            }
            Record::Refund {
                envelope,
                amount_cents,
                at_ms,
            } => {
                let env = self
                    .envelopes
                    .get_mut(envelope)
                    .ok_or(ApplyError::UnknownEnvelope { lsn, id: *envelope })?;
                env.apply_refund(*amount_cents, lsn)?;
                let credit = Credit {
                    envelope_id: EnvelopeId(*envelope),
                    amount_cents: *amount_cents,
                    kind: CreditKind::Refund,
                    at_ms: *at_ms,
                    lsn,
                };
                let sender = env.sender.clone();
                self.wallets
                    .entry(sender)
                    .or_default()
                    .credit(credit, keep_credits);
            }
        }
        self.lsn = lsn;
        Ok(())
    }

    /// Rebuild skipped indexes after deserializing a snapshot.
    pub(crate) fn reindex(&mut self) {
        for env in self.envelopes.values_mut() {
            env.reindex();
        }
    }

    /// Sum of wallet balances, in cents.
    pub(crate) fn wallet_cents(&self) -> u64 {
        self.wallets.values().map(|w| w.balance_cents).sum()
    }
}
