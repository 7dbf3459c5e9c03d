//! The write-ahead log: framing, the group-commit writer, and the scan that
//! recovery uses.
//!
//! # Files
//! The log is a sequence of segments `wal-{first_lsn:020}.log` in the data
//! directory. A segment starts with a 16-byte header (`TGWAL\0\0\x01` and the
//! first sequence number, little endian) followed by frames:
//!
//! ```text
//! [len: u32 LE][crc32: u32 LE][lsn: u64 LE][payload: len bytes of JSON]
//! ```
//!
//! The CRC covers the sequence number and the payload. Sequence numbers are
//! contiguous across segments. A scan stops at the first frame that is short,
//! oversized or fails its CRC and then looks further for any later valid
//! frame. Only when there is none, in the last segment, is it a torn write
//! from a crash whose bytes recovery drops; anything else is corruption and
//! recovery refuses (see `recovery`). A segment is synced before the next one
//! is created, so only the last segment may end torn.
//!
//! # Group commit
//! Appenders push records onto one queue under a short mutex that also
//! assigns sequence numbers, so the log order is the order in which the
//! appenders held their envelope locks. One writer thread takes everything
//! queued, writes it with one `write(2)`, syncs once, publishes the new
//! committed sequence number and answers every waiter. While it syncs the
//! next batch accumulates, so the sync rate stays flat as load grows and the
//! batch size absorbs it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::FsyncMode;
use crate::model::Record;

/// Segment header magic; the last byte is the format version.
const SEGMENT_MAGIC: &[u8; 8] = b"TGWAL\x00\x00\x01";
pub(crate) const SEGMENT_HEADER_LEN: u64 = 16;
const FRAME_HEADER_LEN: usize = 16;
/// Largest payload a frame may claim. A torn length field can read as any
/// number; anything above this is treated as torn rather than trusted.
const MAX_PAYLOAD: usize = 1 << 20;

/// The log could not take or keep a record. After a write or sync failure
/// the log refuses everything: the kernel may have dropped the dirty pages,
/// so retrying a sync could report success for lost data.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum WalError {
    #[error("log writer failed: {0}")]
    Failed(Arc<str>),
    #[error("log is closed")]
    Closed,
}

/// Waits until a record is committed (per the fsync mode).
#[must_use = "a record is only acknowledged once its commit resolves"]
pub(crate) struct Commit(Option<oneshot::Receiver<Result<(), WalError>>>);

/// A batch of committed records, forwarded in log order to settlement.
pub(crate) struct Committed {
    pub(crate) first_lsn: u64,
    pub(crate) records: Vec<Record>,
}

/// Where an existing log ends, as recovery found it.
pub(crate) struct Tail {
    pub(crate) path: PathBuf,
    pub(crate) len: u64,
    pub(crate) last_lsn: u64,
}

/// Writer settings taken from [`crate::Config`].
#[derive(Clone, Debug)]
pub(crate) struct WalOptions {
    pub(crate) mode: FsyncMode,
    pub(crate) group_commit: bool,
    pub(crate) batch_interval: Duration,
    pub(crate) segment_max_bytes: u64,
}

/// Handle to the log. Appends are cheap and synchronous (safe under an
/// envelope lock); waiting for durability is the async [`Commit`].
pub(crate) struct Wal {
    shared: Arc<Shared>,
    /// The writer thread; joined by [`Wal::close`].
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Result of scanning one segment.
#[derive(Debug)]
pub(crate) struct Scan {
    pub(crate) records: Vec<(u64, Record)>,
    /// Byte offset of each record's frame.
    pub(crate) offsets: Vec<u64>,
    /// Length of the valid prefix (header plus whole, checked frames).
    pub(crate) valid_len: u64,
    /// Why the scan stopped before the end, if it did.
    pub(crate) damage: Option<Damage>,
}

/// The frame at [`Scan::valid_len`] is short, oversized or fails its CRC.
#[derive(Debug)]
pub(crate) struct Damage {
    pub(crate) reason: &'static str,
    /// Whole, checked frames after the damaged one. Empty: the damage runs
    /// to the end of the segment.
    pub(crate) later: Vec<Found>,
}

/// A whole, checksummed frame found by [`resync`].
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) offset: u64,
    pub(crate) lsn: u64,
    pub(crate) record: Result<Record, String>,
}

/// Checked data that contradicts itself, at byte `offset` of a segment.
#[derive(Debug)]
pub(crate) struct Corrupt {
    pub(crate) offset: u64,
    pub(crate) reason: String,
}

impl Corrupt {
    fn at(offset: u64, reason: impl Into<String>) -> Self {
        Self {
            offset,
            reason: reason.into(),
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signals the writer that the queue is not empty or is closing.
    wake: Condvar,
    /// Highest sequence number committed (written, and synced in `always`).
    committed: AtomicU64,
    failed: AtomicBool,
    /// Syncs issued, for `/healthz` (records per sync = group size).
    syncs: AtomicU64,
}

struct Queue {
    /// Sequence number the next append gets.
    next_lsn: u64,
    /// Records `next_lsn - records.len() ..` not yet taken by the writer.
    records: Vec<Record>,
    /// Who to answer once the log is committed up to their sequence number.
    waiters: Vec<(u64, oneshot::Sender<Result<(), WalError>>)>,
    state: QueueState,
}

enum QueueState {
    Open,
    /// `close()` was called; the writer drains what is queued.
    Closing,
    /// The writer has exited after draining.
    Closed,
    Failed(Arc<str>),
}

struct Segment {
    file: File,
    dir: PathBuf,
    len: u64,
}

// === impl Commit ===

impl Commit {
    /// Resolve once the record (and everything before it) is committed.
    pub(crate) async fn wait(self) -> Result<(), WalError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or(Err(WalError::Closed)),
        }
    }
}

// === impl Wal ===

impl Wal {
    /// Start the writer after recovery: continue `tail` if the log ends right
    /// before `next_lsn`, otherwise open a fresh segment at `next_lsn`.
    pub(crate) fn start(
        dir: &Path,
        tail: Option<Tail>,
        next_lsn: u64,
        opts: WalOptions,
        settle: mpsc::Sender<Committed>,
    ) -> io::Result<Self> {
        let segment = match tail {
            Some(t) if t.last_lsn + 1 == next_lsn => Segment::append(dir, &t.path, t.len)?,
            _ => Segment::create(dir, next_lsn)?,
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                next_lsn,
                records: Vec::new(),
                waiters: Vec::new(),
                state: QueueState::Open,
            }),
            wake: Condvar::new(),
            committed: AtomicU64::new(next_lsn - 1),
            failed: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
        });
        let writer = Writer {
            shared: shared.clone(),
            segment,
            opts,
            settle,
        };
        let thread = std::thread::Builder::new()
            .name("grab-wal".into())
            .spawn(move || writer.run())?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queue `record`; returns its sequence number and the commit to await.
    ///
    /// Synchronous and short (one mutex, no I/O), so callers append while
    /// holding their envelope lock: that keeps each envelope's records in the
    /// log in the order they were applied in memory.
    pub(crate) fn append(&self, record: Record) -> Result<(u64, Commit), WalError> {
        let (tx, rx) = oneshot::channel();
        let lsn = {
            let mut q = self.shared.queue.lock().expect("wal queue poisoned");
            match &q.state {
                QueueState::Open => {}
                QueueState::Closing | QueueState::Closed => return Err(WalError::Closed),
                QueueState::Failed(why) => return Err(WalError::Failed(why.clone())),
            }
            let lsn = q.next_lsn;
            q.next_lsn += 1;
            q.records.push(record);
            q.waiters.push((lsn, tx));
            lsn
        };
        self.shared.wake.notify_one();
        Ok((lsn, Commit(Some(rx))))
    }

    /// A commit that resolves once the log is committed up to `lsn`, which
    /// must already have been appended. Used by answers that depend on
    /// records someone else appended (repeat grabs, "empty").
    pub(crate) fn committed(&self, lsn: u64) -> Commit {
        if self.shared.committed.load(Ordering::Acquire) >= lsn {
            return Commit(None);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.shared.queue.lock().expect("wal queue poisoned");
            // Re-check under the lock: the writer may have committed since.
            if self.shared.committed.load(Ordering::Acquire) >= lsn {
                return Commit(None);
            }
            match &q.state {
                QueueState::Open | QueueState::Closing => {}
                QueueState::Closed => {
                    let _ = tx.send(Err(WalError::Closed));
                    return Commit(Some(rx));
                }
                QueueState::Failed(why) => {
                    let _ = tx.send(Err(WalError::Failed(why.clone())));
                    return Commit(Some(rx));
                }
            }
            q.waiters.push((lsn, tx));
        }
        self.shared.wake.notify_one();
        Commit(Some(rx))
    }

    /// Highest sequence number handed out (appended, maybe not committed).
    pub(crate) fn appended_lsn(&self) -> u64 {
        self.shared
            .queue
            .lock()
            .expect("wal queue poisoned")
            .next_lsn
            - 1
    }

    /// Highest committed sequence number.
    pub(crate) fn committed_lsn(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// Syncs issued since start.
    pub(crate) fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Whether a write or sync has failed (the log is read-only from then on).
    pub(crate) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// Stop taking records, write and sync everything queued, and join the
    /// writer. Blocking. Dropping the writer closes the settlement channel.
    pub(crate) fn close(&self) {
        {
            let mut q = self.shared.queue.lock().expect("wal queue poisoned");
            if matches!(q.state, QueueState::Open) {
                q.state = QueueState::Closing;
            }
        }
        self.shared.wake.notify_one();
        let thread = self.thread.lock().expect("wal thread poisoned").take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("log writer thread panicked");
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

// === impl Writer ===

/// The writer thread's state. Owns the open segment and the sending side of
/// the settlement channel.
struct Writer {
    shared: Arc<Shared>,
    segment: Segment,
    opts: WalOptions,
    settle: mpsc::Sender<Committed>,
}

impl Writer {
    fn run(mut self) {
        let mut buf = Vec::with_capacity(64 << 10);
        // Written but not synced (batch and never modes).
        let mut dirty = false;
        let mut last_sync = Instant::now();
        loop {
            let (records, mut waiters, first_lsn, closing) = {
                let mut q = self.shared.queue.lock().expect("wal queue poisoned");
                loop {
                    if !q.records.is_empty()
                        || !q.waiters.is_empty()
                        || !matches!(q.state, QueueState::Open)
                    {
                        break;
                    }
                    if self.opts.mode == FsyncMode::Batch && dirty {
                        let deadline = last_sync + self.opts.batch_interval;
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        q = self
                            .shared
                            .wake
                            .wait_timeout(q, deadline - now)
                            .expect("wal queue poisoned")
                            .0;
                    } else {
                        q = self.shared.wake.wait(q).expect("wal queue poisoned");
                    }
                }
                let first = q.next_lsn - q.records.len() as u64;
                let closing = matches!(q.state, QueueState::Closing);
                (
                    std::mem::take(&mut q.records),
                    std::mem::take(&mut q.waiters),
                    first,
                    closing,
                )
            };

            let result = self.write_batch(
                &records,
                first_lsn,
                &mut waiters,
                &mut buf,
                &mut dirty,
                &mut last_sync,
            );
            if let Err(e) = result {
                self.fail(&e, waiters);
                return;
            }
            let committed = self.shared.committed.load(Ordering::Acquire);
            let mut early = Vec::new();
            for (lsn, tx) in waiters {
                if lsn <= committed {
                    let _ = tx.send(Ok(()));
                } else {
                    early.push((lsn, tx));
                }
            }
            if !early.is_empty() {
                // Only reachable through a misuse of `committed()`; keep them
                // for a later batch rather than answer wrongly.
                self.shared
                    .queue
                    .lock()
                    .expect("wal queue poisoned")
                    .waiters
                    .extend(early);
            }
            if !records.is_empty() {
                // Settlement may already be gone at shutdown; that is fine.
                let _ = self.settle.send(Committed { first_lsn, records });
            }
            if self.segment.len >= self.opts.segment_max_bytes {
                if let Err(e) = self.rotate(committed + 1) {
                    self.fail(&e, Vec::new());
                    return;
                }
                dirty = false;
            }
            if closing {
                let mut q = self.shared.queue.lock().expect("wal queue poisoned");
                if q.records.is_empty() && q.waiters.is_empty() {
                    q.state = QueueState::Closed;
                    drop(q);
                    if let Err(e) = self.sync() {
                        tracing::error!(error = %e, "final log sync failed");
                    }
                    return;
                }
            }
        }
    }

    fn write_batch(
        &mut self,
        records: &[Record],
        first_lsn: u64,
        waiters: &mut Vec<(u64, oneshot::Sender<Result<(), WalError>>)>,
        buf: &mut Vec<u8>,
        dirty: &mut bool,
        last_sync: &mut Instant,
    ) -> io::Result<()> {
        if records.is_empty() {
            if self.opts.mode == FsyncMode::Batch
                && *dirty
                && last_sync.elapsed() >= self.opts.batch_interval
            {
                self.sync()?;
                *dirty = false;
                *last_sync = Instant::now();
            }
            return Ok(());
        }
        if self.opts.mode == FsyncMode::Always && !self.opts.group_commit {
            // The baseline group commit is measured against: one write and
            // one sync per record, each waiter answered after its own sync.
            waiters.sort_by_key(|w| w.0);
            let mut pending = std::mem::take(waiters).into_iter().peekable();
            for (i, record) in records.iter().enumerate() {
                let lsn = first_lsn + i as u64;
                buf.clear();
                encode_frame(buf, lsn, record);
                self.segment.write(buf)?;
                self.sync()?;
                self.shared.committed.store(lsn, Ordering::Release);
                while let Some((_, tx)) = pending.next_if(|w| w.0 <= lsn) {
                    let _ = tx.send(Ok(()));
                }
            }
            waiters.extend(pending);
            return Ok(());
        }
        buf.clear();
        for (i, record) in records.iter().enumerate() {
            encode_frame(buf, first_lsn + i as u64, record);
        }
        self.segment.write(buf)?;
        match self.opts.mode {
            FsyncMode::Always => self.sync()?,
            FsyncMode::Batch => {
                *dirty = true;
                if last_sync.elapsed() >= self.opts.batch_interval {
                    self.sync()?;
                    *dirty = false;
                    *last_sync = Instant::now();
                }
            }
            FsyncMode::Never => *dirty = true,
        }
        self.shared
            .committed
            .store(first_lsn + records.len() as u64 - 1, Ordering::Release);
        if buf.capacity() > 4 << 20 {
            *buf = Vec::with_capacity(64 << 10);
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        self.segment.sync()
    }

    /// Sync and close the current segment, then start one at `next_lsn`.
    fn rotate(&mut self, next_lsn: u64) -> io::Result<()> {
        self.sync()?;
        self.segment = Segment::create(&self.segment.dir.clone(), next_lsn)?;
        tracing::debug!(next_lsn, "log segment rotated");
        Ok(())
    }

    fn fail(&self, e: &io::Error, taken: Vec<(u64, oneshot::Sender<Result<(), WalError>>)>) {
        tracing::error!(error = %e, "log write failed; refusing further writes");
        let why: Arc<str> = Arc::from(e.to_string());
        let queued = {
            let mut q = self.shared.queue.lock().expect("wal queue poisoned");
            q.state = QueueState::Failed(why.clone());
            q.records.clear();
            std::mem::take(&mut q.waiters)
        };
        self.shared.failed.store(true, Ordering::Release);
        for (_, tx) in taken.into_iter().chain(queued) {
            let _ = tx.send(Err(WalError::Failed(why.clone())));
        }
    }
}

// === impl Segment ===

impl Segment {
    fn create(dir: &Path, base: u64) -> io::Result<Self> {
        let path = dir.join(segment_name(base));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        header[..8].copy_from_slice(SEGMENT_MAGIC);
        header[8..].copy_from_slice(&base.to_le_bytes());
        file.write_all(&header)?;
        file.sync_all()?;
        // The new name must be durable before any record in it is acknowledged.
        sync_dir(dir)?;
        Ok(Self {
            file,
            dir: dir.to_owned(),
            len: SEGMENT_HEADER_LEN,
        })
    }

    fn append(dir: &Path, path: &Path, len: u64) -> io::Result<Self> {
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            file,
            dir: dir.to_owned(),
            len,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

// === framing and scanning ===

/// File name of the segment whose first record is `base`.
pub(crate) fn segment_name(base: u64) -> String {
    format!("wal-{base:020}.log")
}

/// Segments in `dir`, sorted by first sequence number.
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(base) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        if let Ok(base) = base.parse::<u64>() {
            out.push((base, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Append one frame for `record` at sequence number `lsn` to `buf`.
pub(crate) fn encode_frame(buf: &mut Vec<u8>, lsn: u64, record: &Record) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    serde_json::to_writer(&mut *buf, record).expect("log records always serialize");
    let payload_len = buf.len() - start - FRAME_HEADER_LEN;
    assert!(
        payload_len <= MAX_PAYLOAD,
        "log record of {payload_len} bytes exceeds the frame limit"
    );
    let mut crc = crc32fast::Hasher::new();
    crc.update(&lsn.to_le_bytes());
    crc.update(&buf[start + FRAME_HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.finalize().to_le_bytes());
    buf[start + 8..start + 16].copy_from_slice(&lsn.to_le_bytes());
}

/// Parse a segment whose file name says it starts at `base`.
///
/// Reads whole, checked frames from the start and stops at the first one that
/// is short, oversized or fails its CRC. From there it resynchronises: it
/// looks at every later byte offset for a frame whose length fits and whose
/// CRC and sequence number check out, and reports those in
/// [`Damage::later`]. No later valid frame means the damage runs to the end
/// of the segment (a torn write, if this is the last segment); a later valid
/// frame means the middle of the log is damaged and the caller must not
/// drop it as a tail. Errors only when checked data contradicts itself: a
/// wrong header, a sequence gap, or a record that passes its CRC but does
/// not parse.
pub(crate) fn scan_segment(bytes: &[u8], base: u64) -> Result<Scan, Corrupt> {
    let header_len = SEGMENT_HEADER_LEN as usize;
    if bytes.len() < header_len {
        return Ok(Scan {
            records: Vec::new(),
            offsets: Vec::new(),
            valid_len: 0,
            damage: Some(Damage {
                reason: "short segment header",
                later: Vec::new(),
            }),
        });
    }
    if &bytes[..8] != SEGMENT_MAGIC {
        return Err(Corrupt::at(0, "bad segment magic"));
    }
    let header_base = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if header_base != base {
        return Err(Corrupt::at(
            8,
            format!("segment header says it starts at {header_base}, file name says {base}"),
        ));
    }
    let mut records = Vec::new();
    let mut offsets = Vec::new();
    let mut pos = header_len;
    let mut damage = None;
    while pos < bytes.len() {
        let (lsn, total, payload) = match frame_at(bytes, pos) {
            Ok(f) => f,
            Err(reason) => {
                let expected = base + records.len() as u64;
                // A frame that survived the damage carries a later sequence
                // number; at most one frame fits in every 16 bytes left.
                let most = expected + (bytes.len() - pos) as u64 / FRAME_HEADER_LEN as u64;
                damage = Some(Damage {
                    reason,
                    later: resync(bytes, pos + 1, expected..=most),
                });
                break;
            }
        };
        let expected = base + records.len() as u64;
        if lsn != expected {
            return Err(Corrupt::at(
                pos as u64,
                format!("record {lsn} where {expected} was expected"),
            ));
        }
        let record: Record = serde_json::from_slice(payload)
            .map_err(|e| Corrupt::at(pos as u64, format!("record {lsn} does not parse: {e}")))?;
        records.push((lsn, record));
        offsets.push(pos as u64);
        pos += total;
    }
    Ok(Scan {
        records,
        offsets,
        valid_len: pos as u64,
        damage,
    })
}

/// Every whole, checksummed frame from byte `from` on whose sequence number
/// is in `lsns`, found by trying each offset: after a valid frame the search
/// continues right behind it, after anything else one byte further.
pub(crate) fn resync(bytes: &[u8], from: usize, lsns: RangeInclusive<u64>) -> Vec<Found> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos + FRAME_HEADER_LEN <= bytes.len() {
        match frame_at(bytes, pos) {
            Ok((lsn, total, payload)) if lsns.contains(&lsn) => {
                out.push(Found {
                    offset: pos as u64,
                    lsn,
                    record: serde_json::from_slice(payload).map_err(|e| e.to_string()),
                });
                pos += total;
            }
            _ => pos += 1,
        }
    }
    out
}

/// The frame at `pos`: its sequence number, total length and payload, or
/// why it is not whole and correct.
fn frame_at(bytes: &[u8], pos: usize) -> Result<(u64, usize, &[u8]), &'static str> {
    let rest = &bytes[pos..];
    if rest.len() < FRAME_HEADER_LEN {
        return Err("short frame header");
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err("implausible frame length");
    }
    if rest.len() < FRAME_HEADER_LEN + len {
        return Err("short frame");
    }
    let body = &rest[8..FRAME_HEADER_LEN + len];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch");
    }
    let lsn = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
    Ok((lsn, FRAME_HEADER_LEN + len, &body[8..]))
}

/// Make a directory's entries (created, renamed, removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests;
