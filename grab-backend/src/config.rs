//! Bootstrap configuration: where the data lives, how hard acknowledgements
//! wait for the disk, and the request limits. Everything here needs a restart;
//! the grab backend has no hot-reloadable rules.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// How the write-ahead log reaches the disk before a create or grab is
/// acknowledged.
///
/// Every mode writes the record to the kernel (`write(2)`) before answering,
/// so every mode survives `kill -9` of the process. They differ in what
/// survives a power loss or kernel crash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum FsyncMode {
    /// Acknowledge only after the record is `fdatasync`ed. Concurrent records
    /// share one sync (group commit, see [`Config::group_commit`]). Survives
    /// power loss. The default, because an acknowledged grab is money.
    #[default]
    Always,
    /// Acknowledge after `write(2)`; sync at most every
    /// [`Config::batch_fsync_interval`] (10 ms by default). A power loss can
    /// lose up to that much acknowledged work.
    Batch,
    /// Acknowledge after `write(2)`; sync only when a log segment is closed,
    /// at snapshots and at shutdown. For tests and benchmarks.
    Never,
}

/// Where envelopes, grabs and wallets are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreKind {
    /// In process, with a local write-ahead log in [`Config::data_dir`]: one node. The
    /// default.
    #[default]
    Embedded,
    /// In Redis: several backend nodes can serve the same envelopes.
    Redis(RedisStoreConfig),
}

/// Connection settings of the Redis store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Longest wait for one Redis call (and for connecting); past it the request answers
    /// 503 and may be retried (grabs are idempotent). Default 2 s.
    pub timeout: Duration,
}

/// Request validation limits. Requests outside them are answered 400 with a
/// reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Smallest number of shares in one envelope. Default 1.
    pub min_count: u32,
    /// Largest number of shares in one envelope. Default 10,000.
    pub max_count: u32,
    /// Largest envelope total, in cents. Default 20,000,000 (200,000.00).
    /// The smallest total is always `count` cents: every share is at least
    /// one cent.
    pub max_total_cents: u64,
    /// Expiry used when a create names none, in seconds. Default 86,400 (24 h).
    pub default_expires_in_s: u64,
    /// Longest allowed expiry, in seconds. Default 604,800 (7 days).
    pub max_expires_in_s: u64,
    /// Longest user or sender id, in bytes. Default 128.
    pub max_user_id_bytes: usize,
    /// Largest page of grabs `GET /envelopes/{id}` returns. Default 500.
    pub max_page: usize,
}

/// Bootstrap configuration of the grab backend.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory holding the log segments (`wal-*.log`) and the snapshot
    /// (`snapshot.bin`); created if missing. Default `data/grab`.
    pub data_dir: PathBuf,
    /// Durability of acknowledgements. Default [`FsyncMode::Always`].
    pub fsync: FsyncMode,
    /// Header carrying the user id of a grab; must match the gateway's user
    /// extractor. Default `x-user-id`.
    pub user_header: String,
    /// Request validation limits.
    pub limits: Limits,
    /// With [`FsyncMode::Always`]: let all records waiting while a sync runs
    /// share the next sync (true, default) or sync once per record (false;
    /// the baseline the benchmark compares against).
    pub group_commit: bool,
    /// With [`FsyncMode::Batch`]: longest time between syncs. Default 10 ms.
    pub batch_fsync_interval: Duration,
    /// Start a new log segment once the current one exceeds this many bytes.
    /// Default 16 MiB. Segments wholly covered by a snapshot are deleted.
    pub segment_max_bytes: u64,
    /// Write a snapshot after this many newly settled records. Default
    /// 50,000. Together with `segment_max_bytes` this bounds restart time:
    /// recovery reads one snapshot and at most this many records plus one
    /// segment.
    pub snapshot_every_records: u64,
    /// How often expired envelopes are looked for and refunded. Default 250 ms.
    pub expiry_sweep_interval: Duration,
    /// Credits kept per wallet for `GET /users/{id}/wallet`. Default 20.
    pub wallet_recent_credits: usize,
    /// How long an `Idempotency-Key` of `POST /envelopes` is remembered after its
    /// create. Default 24 h. A retry after that creates a new envelope.
    pub idempotency_ttl: Duration,
    /// Most idempotency keys the embedded store keeps; past it the oldest are forgotten
    /// first. Default 1,000,000 (about 200 bytes each). The Redis store bounds its keys
    /// by the TTL only.
    pub idempotency_max_keys: usize,
    /// Storage: embedded (default) or Redis. With Redis, `data_dir`, `fsync` and the log
    /// settings are unused: durability is the Redis deployment's.
    pub store: StoreKind,
}

// === impl FsyncMode ===

impl FsyncMode {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FsyncMode::Always => "always",
            FsyncMode::Batch => "batch",
            FsyncMode::Never => "never",
        }
    }
}

impl fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsyncMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncMode::Always),
            "batch" => Ok(FsyncMode::Batch),
            "never" => Ok(FsyncMode::Never),
            other => Err(format!(
                "unknown fsync mode {other:?}, expected always|batch|never"
            )),
        }
    }
}

// === impl Limits ===

impl Default for Limits {
    fn default() -> Self {
        Self {
            min_count: 1,
            max_count: 10_000,
            max_total_cents: 20_000_000,
            default_expires_in_s: 86_400,
            max_expires_in_s: 7 * 86_400,
            max_user_id_bytes: 128,
            max_page: 500,
        }
    }
}

// === impl RedisStoreConfig ===

impl RedisStoreConfig {
    /// Settings for `url` with the default timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout: Duration::from_secs(2),
        }
    }
}

// === impl Config ===

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data/grab"),
            fsync: FsyncMode::Always,
            user_header: "x-user-id".to_owned(),
            limits: Limits::default(),
            group_commit: true,
            batch_fsync_interval: Duration::from_millis(10),
            segment_max_bytes: 16 << 20,
            snapshot_every_records: 50_000,
            expiry_sweep_interval: Duration::from_millis(250),
            wallet_recent_credits: 20,
            idempotency_ttl: Duration::from_secs(86_400),
            idempotency_max_keys: 1_000_000,
            store: StoreKind::Embedded,
        }
    }
}
