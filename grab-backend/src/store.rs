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

    /// Create an envelope at most once per idempotency key: the first request under
    /// (`envelope.sender()`, `key`) creates it; a later one with the same fingerprint
    /// answers the first envelope as it was created (`replayed: true`), one with another
    /// fingerprint is refused with [`CreateError::KeyReused`]. A duplicate that arrives
    /// while the first is still being made durable waits for it and answers the same
    /// envelope. The key→envelope mapping is durable together with the envelope, and
    /// kept for the configured idempotency TTL.
    fn create_idempotent(
        &self,
        envelope: NewEnvelope,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<Created, CreateError>> + Send;

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

/// A valid `Idempotency-Key` of `POST /envelopes` together with the fingerprint of the
/// request it came with.
///
/// The key is 1 to [`IdempotencyKey::MAX_LEN`] visible ASCII characters (`0x21..=0x7e`),
/// sent bare or as a structured-field string (`"..."`, without escapes); both spellings
/// name the same key. The fingerprint is SHA-256 over the canonical request: the method
/// and path (`POST /envelopes`) and the parsed create parameters as the client sent them
/// (sender, total, count and the expiry, absent distinct from present). Field order,
/// whitespace and number spelling in the JSON body do not matter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey {
    key: String,
    fingerprint: String,
}

/// The answer of [`Store::create_idempotent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// The envelope as it was when first created (the first answer's body).
    pub summary: EnvelopeSummary,
    /// True when an earlier request under the same key created it.
    pub replayed: bool,
}

/// Why [`Store::create_idempotent`] did not answer an envelope.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    /// The key was used (within its TTL) for a request with another fingerprint (422).
    #[error("idempotency key reused with a different request")]
    KeyReused,
    /// The store cannot serve the request (503).
    #[error("unavailable: {0}")]
    Unavailable(String),
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

// === impl IdempotencyKey ===

impl IdempotencyKey {
    /// Longest key, in bytes (without structured-field quotes).
    pub const MAX_LEN: usize = 255;

    /// Check the header value `raw` and fingerprint `req`; the error says what is wrong
    /// with the key (400).
    pub fn new(raw: &[u8], req: &CreateRequest) -> Result<Self, InvalidRequest> {
        let key = match raw {
            [b'"', inner @ .., b'"'] => inner,
            _ => raw,
        };
        if key.is_empty() {
            return Err(InvalidRequest("Idempotency-Key must not be empty".into()));
        }
        if key.len() > Self::MAX_LEN {
            return Err(InvalidRequest(format!(
                "Idempotency-Key must be at most {} bytes",
                Self::MAX_LEN
            )));
        }
        if !key
            .iter()
            .all(|b| (0x21..=0x7e).contains(b) && *b != b'"' && *b != b'\\')
        {
            return Err(InvalidRequest(
                "Idempotency-Key must be visible ASCII without quotes or backslashes".into(),
            ));
        }
        let key = String::from_utf8(key.to_vec()).expect("checked ASCII");
        Ok(Self {
            key,
            fingerprint: fingerprint(req),
        })
    }

    /// The key as sent (without structured-field quotes).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Hex SHA-256 of the canonical request.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// Hex SHA-256 of `POST /envelopes` and the parsed parameters of `req`, each
/// length-prefixed so no two requests share an encoding.
fn fingerprint(req: &CreateRequest) -> String {
    let expires = req
        .expires_in_s
        .map_or_else(|| "-".to_owned(), |e| e.to_string());
    let canonical = format!(
        "POST /envelopes\nsender:{}:{}\ntotal_cents:{}\ncount:{}\nexpires_in_s:{}\n",
        req.sender.len(),
        req.sender,
        req.total_cents,
        req.count,
        expires
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(expires_in_s: Option<u64>) -> CreateRequest {
        CreateRequest {
            sender: "sam".into(),
            total_cents: 100,
            count: 2,
            expires_in_s,
        }
    }

    /// Malformed keys are refused; the quoted (structured-field) and bare spellings are
    /// one key; the fingerprint follows the parameters.
    #[test]
    fn key_rules_and_fingerprint() {
        let r = req(None);
        for bad in [
            &b""[..],
            b"\"\"",
            b"has space",
            b"tab\t",
            b"caf\xc3\xa9",
            b"a\"b",
            &[b'x'; 256],
        ] {
            assert!(IdempotencyKey::new(bad, &r).is_err(), "{bad:?}");
        }
        let max = IdempotencyKey::new(&[b'x'; 255], &r).unwrap();
        assert_eq!(max.key().len(), 255);
        let bare = IdempotencyKey::new(b"8e03978e-40d5", &r).unwrap();
        let quoted = IdempotencyKey::new(b"\"8e03978e-40d5\"", &r).unwrap();
        assert_eq!(bare, quoted);
        assert_eq!(bare.fingerprint().len(), 64);
        let other = IdempotencyKey::new(b"8e03978e-40d5", &req(Some(86_400))).unwrap();
        assert_ne!(bare.fingerprint(), other.fingerprint());
    }
}
