//! The storage contract the HTTP layer talks to, and the types that cross it.
//!
//! [`Store`] is everything `http` needs; [`crate::EmbeddedStore`] implements
//! it with in-process state and a local write-ahead log. A Redis-backed store
//! (one Lua script per operation, for several backend nodes) implements the
//! same trait and the HTTP layer does not change.

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::config::Limits;
use crate::model::{Credit, EnvelopeId, EnvelopeState};

/// Storage for envelopes, grabs and wallets.
///
/// Every method that changes state resolves only once the change is durable
/// by the store's own standard (the embedded store: committed to its log).
pub trait Store: Send + Sync + 'static {
    /// Create an envelope. Resolves once the create is durable.
    fn create(
        &self,
        envelope: NewEnvelope,
    ) -> impl Future<Output = Result<EnvelopeSummary, StoreError>> + Send;

    /// Grab a share of `id` for `user`. A user's second grab answers the
    /// first grab's share with `repeat: true`. Resolves once the grab (or the
    /// state the refusal is based on) is durable.
    fn grab(
        &self,
        id: EnvelopeId,
        user: &str,
    ) -> impl Future<Output = Result<GrabReceipt, GrabError>> + Send;

    /// An envelope and one page of its grabs (in grab order), or `None`.
    fn envelope(
        &self,
        id: EnvelopeId,
        offset: usize,
        limit: usize,
    ) -> impl Future<Output = Result<Option<EnvelopePage>, StoreError>> + Send;

    /// A user's settled balance and up to `limit` most recent credits. An
    /// unknown user has an empty wallet.
    fn wallet(
        &self,
        user: &str,
        limit: usize,
    ) -> impl Future<Output = Result<WalletView, StoreError>> + Send;

    /// Refund the remainder of every envelope that has expired. Called
    /// periodically by [`crate::serve`]; returns how many were refunded.
    fn refund_expired(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Liveness and settlement progress.
    fn health(&self) -> Health;

    /// Money totals for the conservation check.
    fn totals(&self) -> impl Future<Output = Result<Totals, StoreError>> + Send;
}

/// Body of `POST /envelopes`, before validation.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// User id of the sender; refunds go to this wallet.
    pub sender: String,
    /// Money in the envelope, in cents.
    pub total_cents: u64,
    /// Number of shares.
    pub count: u64,
    /// Seconds until the envelope expires; [`Limits::default_expires_in_s`]
    /// if absent.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// A create request that passed [`NewEnvelope::validate`]; the only way a
/// store receives one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEnvelope {
    sender: String,
    total_cents: u64,
    count: u32,
    expires_in_s: u64,
}

/// Why a create request was refused (400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

/// An envelope without its grabs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSummary {
    /// Identifier, as used in `/envelopes/{id}`.
    pub id: EnvelopeId,
    /// Sender's user id.
    pub sender: String,
    /// Money put in, in cents.
    pub total_cents: u64,
    /// Shares put in.
    pub count: u32,
    /// Money not grabbed (0 once refunded), in cents.
    pub remaining_cents: u64,
    /// Shares not grabbed.
    pub remaining_count: u32,
    /// Money returned to the sender at expiry, in cents.
    pub refunded_cents: Option<u64>,
    /// What the envelope accepts now.
    pub state: EnvelopeState,
    /// Creation time, Unix milliseconds.
    pub created_at_ms: u64,
    /// Expiry time, Unix milliseconds.
    pub expires_at_ms: u64,
}

/// `GET /envelopes/{id}`: the summary plus a page of grabs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopePage {
    /// The envelope.
    #[serde(flatten)]
    pub summary: EnvelopeSummary,
    /// Number of grabs so far.
    pub grabbed_count: u32,
    /// Money grabbed so far, in cents.
    pub grabbed_cents: u64,
    /// Index of the first grab on this page.
    pub offset: usize,
    /// Page size asked for (after clamping to the limit).
    pub limit: usize,
    /// Grabs `offset .. offset + limit`, in grab order.
    pub grabs: Vec<GrabView>,
}

/// One grab, as listed on an envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrabView {
    /// Grabber's user id.
    pub user: String,
    /// Share, in cents.
    pub amount_cents: u64,
    /// Grab time, Unix milliseconds.
    pub at_ms: u64,
}

/// `POST /envelopes/{id}/grab` success.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrabReceipt {
    /// Envelope grabbed.
    pub envelope_id: EnvelopeId,
    /// Grabber.
    pub user: String,
    /// This user's share, in cents (the same on every repeat).
    pub amount_cents: u64,
    /// 1-based position of this user's grab on the envelope.
    pub seq: u32,
    /// Shares left now.
    pub remaining_count: u32,
    /// Money left now, in cents.
    pub remaining_cents: u64,
    /// True when this user had already grabbed: nothing changed.
    pub repeat: bool,
    /// Time of the (first) grab, Unix milliseconds.
    pub at_ms: u64,
}

/// `GET /users/{id}/wallet`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletView {
    /// User id.
    pub user: String,
    /// Settled balance, in cents.
    pub balance_cents: u64,
    /// Most recent credits first.
    pub credits: Vec<Credit>,
    /// Log position settlement has reached; grabs after it are not in the
    /// balance yet.
    pub settled_lsn: u64,
}

/// `GET /healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// False once the log or settlement has failed (the service answers 503).
    pub ok: bool,
    /// `always`, `batch` or `never`.
    pub fsync: String,
    /// Last committed log sequence number.
    pub committed_lsn: u64,
    /// Last settled log sequence number.
    pub settled_lsn: u64,
    /// Records committed but not yet credited to wallets.
    pub settlement_lag_records: u64,
    /// Sequence number of the latest snapshot.
    pub snapshot_lsn: u64,
    /// Envelopes held.
    pub envelopes: u64,
    /// Log syncs since start; committed records per sync is the group size.
    pub log_syncs: u64,
}

/// `GET /stats`: money totals. Once `settled` is true and no request is in
/// flight, `wallet_cents + remaining_cents == created_cents`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Envelopes held.
    pub envelopes: u64,
    /// Sum of all envelope totals, in cents.
    pub created_cents: u64,
    /// Sum of money still in envelopes, in cents.
    pub remaining_cents: u64,
    /// Sum of settled wallet balances, in cents.
    pub wallet_cents: u64,
    /// Whether settlement had caught up with the log when measured.
    pub settled: bool,
}

/// A grab that did not hand out money.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrabError {
    /// No such envelope (404).
    #[error("not found")]
    NotFound,
    /// Every share is taken (410).
    #[error("empty")]
    Empty,
    /// The envelope expired (410).
    #[error("expired")]
    Expired,
    /// The store cannot make the grab durable (503).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// The store cannot serve the request (503).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Storage failed or is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

// === impl NewEnvelope ===

impl NewEnvelope {
    /// Check `req` against `limits`; the error names the first broken rule.
    pub fn validate(req: CreateRequest, limits: &Limits) -> Result<Self, InvalidRequest> {
        let bad = |s: String| Err(InvalidRequest(s));
        if req.sender.is_empty() {
            return bad("sender must not be empty".into());
        }
        if req.sender.len() > limits.max_user_id_bytes {
            return bad(format!(
                "sender must be at most {} bytes",
                limits.max_user_id_bytes
            ));
        }
        if req.count < u64::from(limits.min_count) || req.count > u64::from(limits.max_count) {
            return bad(format!(
                "count must be between {} and {}",
                limits.min_count, limits.max_count
            ));
        }
        if req.total_cents < req.count {
            return bad(
                "total_cents must be at least count (every share is at least 1 cent)".into(),
            );
        }
        if req.total_cents > limits.max_total_cents {
            return bad(format!(
                "total_cents must be at most {}",
                limits.max_total_cents
            ));
        }
        let expires_in_s = req.expires_in_s.unwrap_or(limits.default_expires_in_s);
        if expires_in_s == 0 || expires_in_s > limits.max_expires_in_s {
            return bad(format!(
                "expires_in_s must be between 1 and {}",
                limits.max_expires_in_s
            ));
        }
        Ok(Self {
            sender: req.sender,
            total_cents: req.total_cents,
            count: req.count as u32,
            expires_in_s,
        })
    }

    /// Sender's user id.
    pub fn sender(&self) -> &str {
        &self.sender
    }

    /// Total, in cents.
    pub fn total_cents(&self) -> u64 {
        self.total_cents
    }

    /// Number of shares.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Lifetime, in seconds.
    pub fn expires_in_s(&self) -> u64 {
        self.expires_in_s
    }
}
