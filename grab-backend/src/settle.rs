//! Settlement: the worker that turns committed log records into wallet
//! credits, and writes snapshots.
//!
//! The writer forwards each committed batch, in log order, over a channel.
//! The worker applies it to the [`Ledger`] (grabs credit the grabber, refunds
//! credit the sender) and advances `settled_lsn`. A record is applied exactly
//! once because the ledger only accepts the next sequence number, and the
//! snapshot stores the ledger together with that number: after a restart the
//! records past the snapshot are applied again from the log, the ones before
//! it never are.
//!
//! Settlement lag is `committed_lsn - settled_lsn`: how far the wallets are
//! behind the acknowledged grabs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::model::Ledger;
use crate::snapshot;
use crate::wal::Committed;

/// Progress of settlement, shared with the HTTP layer.
#[derive(Debug, Default)]
pub(crate) struct SettleStatus {
    pub(crate) settled_lsn: AtomicU64,
    pub(crate) snapshot_lsn: AtomicU64,
    pub(crate) snapshots_written: AtomicU64,
    /// A committed record did not apply: a bug. Settlement stops and no
    /// further snapshot is taken, so the log is kept for diagnosis.
    pub(crate) failed: AtomicBool,
}

/// What the worker needs; moved into its thread.
pub(crate) struct Settler {
    pub(crate) rx: mpsc::Receiver<Committed>,
    pub(crate) ledger: Arc<RwLock<Ledger>>,
    pub(crate) status: Arc<SettleStatus>,
    pub(crate) dir: PathBuf,
    pub(crate) snapshot_every: u64,
    pub(crate) keep_credits: usize,
    /// Records applied since the last snapshot (recovery's replay counts).
    pub(crate) since_snapshot: u64,
    /// Idempotency keys older than this are dropped before each snapshot.
    pub(crate) idem_ttl_ms: u64,
    /// At most this many idempotency keys go into a snapshot (oldest dropped).
    pub(crate) idem_max_keys: usize,
}

// === impl Settler ===

impl Settler {
    pub(crate) fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("grab-settle".into())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        if self.since_snapshot >= self.snapshot_every {
            self.snapshot();
        }
        // Ends when the writer drops its sender (log closed) and the channel
        // is drained.
        while let Ok(first) = self.rx.recv() {
            let mut batches = vec![first];
            while batches.len() < 256 {
                match self.rx.try_recv() {
                    Ok(b) => batches.push(b),
                    Err(_) => break,
                }
            }
            if self.status.failed.load(Ordering::Acquire) {
                continue;
            }
            let mut applied = 0u64;
            {
                let mut ledger = self.ledger.write().expect("ledger poisoned");
                'apply: for batch in &batches {
                    for (i, record) in batch.records.iter().enumerate() {
                        let lsn = batch.first_lsn + i as u64;
                        if let Err(e) = ledger.apply(lsn, record, self.keep_credits) {
                            tracing::error!(error = %e, "settlement stopped: committed record does not apply");
                            self.status.failed.store(true, Ordering::Release);
                            break 'apply;
                        }
                        applied += 1;
                    }
                }
                self.status.settled_lsn.store(ledger.lsn, Ordering::Release);
            }
            self.since_snapshot += applied;
            if self.since_snapshot >= self.snapshot_every {
                self.snapshot();
            }
        }
        if self.since_snapshot > 0 {
            self.snapshot();
        }
    }

    /// Write a snapshot of the ledger and delete the segments it covers.
    /// Settlement pauses while the ledger is serialized; readers do not.
    fn snapshot(&mut self) {
        if self.status.failed.load(Ordering::Acquire) {
            return;
        }
        let started = Instant::now();
        self.ledger
            .write()
            .expect("ledger poisoned")
            .idempotency
            .prune(
                crate::embedded::now_ms(),
                self.idem_ttl_ms,
                self.idem_max_keys,
            );
        let (bytes, lsn) = {
            let ledger = self.ledger.read().expect("ledger poisoned");
            (snapshot::encode(&ledger), ledger.lsn)
        };
        let result = snapshot::install(&self.dir, &bytes)
            .and_then(|()| snapshot::drop_covered_segments(&self.dir, lsn));
        match result {
            Ok(removed) => {
                self.since_snapshot = 0;
                self.status.snapshot_lsn.store(lsn, Ordering::Release);
                self.status
                    .snapshots_written
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    lsn,
                    bytes = bytes.len(),
                    segments_removed = removed,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "snapshot written"
                );
            }
            // The log still holds everything; the next attempt may succeed.
            Err(e) => tracing::error!(error = %e, lsn, "snapshot failed"),
        }
    }
}
