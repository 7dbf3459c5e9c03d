//! Recovery: rebuild the settled ledger from the snapshot and the log, and
//! tell a torn tail from corruption.
//!
//! # The contract
//! - A **torn tail** is damage that runs to the end of the *last* segment:
//!   the final frame is short, oversized or fails its CRC, and no valid frame
//!   follows it. That is what a crash in the middle of a write leaves, and
//!   with `fsync always` nothing in it was acknowledged. Recovery cuts it off
//!   and logs the warning `dropping torn log tail` (and reports it in
//!   [`Report::torn_tail`]).
//! - Anything else is **corruption**: a damaged frame followed by a valid
//!   one (found by trying every later byte offset for a frame whose length,
//!   CRC and sequence number check out), a damaged frame in a segment that
//!   has later segments, a bad segment header, a sequence gap, a record that
//!   passes its CRC but does not parse or does not apply. Recovery refuses:
//!   the store does not open, and the error names the segment file and the
//!   byte offset. Nothing is changed on disk.
//! - [`inspect`] (`grab-backend recover`) reports what the damage would cost
//!   (every valid frame after it, decoded as far as possible); [`repair`]
//!   (`recover --truncate` / `--quarantine DIR`) cuts the log at the damage,
//!   after raising the envelope id high-water mark (see `ids`) past every id
//!   the dropped records mention.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::ids;
use crate::model::{Ledger, Record};
use crate::snapshot;
use crate::wal::{self, SEGMENT_HEADER_LEN, Tail};

/// What a clean recovery found, for [`crate::EmbeddedStore::open`].
pub(crate) struct Recovered {
    pub(crate) ledger: Ledger,
    pub(crate) tail: Option<Tail>,
    pub(crate) replayed: u64,
    /// The torn tail that was cut, if any.
    pub(crate) torn: Option<TornTail>,
}

/// A torn tail: the bytes from `offset` to the end of the last segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The last segment.
    pub segment: PathBuf,
    /// Where the damaged final frame starts (0: the segment header itself is
    /// short, and the whole file goes).
    pub offset: u64,
    /// Bytes dropped.
    pub dropped_bytes: u64,
    /// What is wrong with the final frame.
    pub reason: String,
}

/// Corruption: where the log stops being trustworthy, and what lies beyond.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    /// The segment file holding the damage.
    pub segment: PathBuf,
    /// Byte offset of the damaged frame (or header) in it.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
    /// Every whole, checksummed frame after the damage, in this segment and
    /// all later ones: what cutting the log at the damage would drop.
    pub after: Vec<LostRecord>,
    /// Later segments (removed or moved aside by a repair).
    pub later_segments: Vec<PathBuf>,
}

/// A valid frame past the damage, decoded as far as possible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostRecord {
    /// Segment file of the frame.
    pub segment: PathBuf,
    /// Byte offset of the frame in it.
    pub offset: u64,
    /// Log sequence number.
    pub lsn: u64,
    /// `create`, `grab`, `refund`, or `undecodable` (CRC fine, JSON not).
    pub kind: &'static str,
    /// Envelope id (created, grabbed or refunded).
    pub envelope: Option<u64>,
    /// Grabber, or the sender of a create.
    pub user: Option<String>,
    /// Share, refund, or envelope total, in cents.
    pub amount_cents: Option<u64>,
    /// Already in the snapshot: dropping the frame loses nothing.
    pub in_snapshot: bool,
}

/// What [`inspect`] or [`repair`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The data directory looked at.
    pub data_dir: PathBuf,
    /// Sequence number of the snapshot (0: none).
    pub snapshot_lsn: u64,
    /// Last record a start would recover (up to the damage, if any).
    pub recovered_lsn: u64,
    /// Envelopes in the recovered state.
    pub envelopes: usize,
    /// Segments in the log.
    pub segments: usize,
    /// A torn tail a start would cut (nothing acknowledged is in it).
    pub torn_tail: Option<TornTail>,
    /// Corruption: a start refuses until it is repaired.
    pub corruption: Option<Corruption>,
    /// The id high-water mark on disk: new envelopes get ids at or above
    /// this (or above the largest recovered id, if higher).
    pub id_high_water: u64,
    /// Set by [`repair`]: what it did.
    pub repaired: Option<String>,
}

/// How [`repair`] cuts the log at the corruption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Truncate the damaged segment at the damage and delete later segments.
    Truncate,
    /// Copy the damaged segment and move later segments into this directory
    /// (created if missing), then truncate as [`Repair::Truncate`] does.
    Quarantine(PathBuf),
}

/// Everything a read-only pass over the data directory learns.
struct Analysis {
    ledger: Ledger,
    tail: Option<Tail>,
    replayed: u64,
    torn: Option<TornTail>,
    corruption: Option<Corruption>,
    snapshot_lsn: u64,
    segments: usize,
}

/// Recover for [`crate::EmbeddedStore::open`]: refuse on corruption, cut a
/// torn tail (with the warning), return the ledger.
pub(crate) fn recover(dir: &Path, keep_credits: usize) -> anyhow::Result<Recovered> {
    snapshot::remove_leftovers(dir)?;
    let a = analyze(dir, keep_credits)?;
    if let Some(c) = &a.corruption {
        bail!(
            "{}: corrupt log at byte {}: {}; {} record(s) after it would be lost. Refusing to \
             start rather than drop acknowledged data: run `grab-backend recover --data-dir {}` \
             to see what is affected, then repair with `--truncate` or `--quarantine DIR`",
            c.segment.display(),
            c.offset,
            c.reason,
            c.after.iter().filter(|r| !r.in_snapshot).count(),
            dir.display()
        );
    }
    if let Some(t) = &a.torn {
        tracing::warn!(
            path = %t.segment.display(),
            at = t.offset,
            dropped_bytes = t.dropped_bytes,
            reason = %t.reason,
            "dropping torn log tail"
        );
        cut(&t.segment, t.offset, false)?;
        wal::sync_dir(dir)?;
    }
    Ok(Recovered {
        ledger: a.ledger,
        tail: a.tail,
        replayed: a.replayed,
        torn: a.torn,
    })
}

/// Read-only: what a start would recover, and any torn tail or corruption.
pub fn inspect(dir: &Path) -> anyhow::Result<Report> {
    let a = analyze(dir, usize::MAX)?;
    report(dir, &a)
}

/// Cut the log at the corruption (if there is any; otherwise change
/// nothing) and report the state after the cut. Raises the envelope id
/// high-water mark past every id the dropped records mention first, so no
/// id is ever handed out twice.
pub fn repair(dir: &Path, how: &Repair) -> anyhow::Result<Report> {
    let a = analyze(dir, usize::MAX)?;
    let Some(c) = &a.corruption else {
        return report(dir, &a);
    };
    let bound = c
        .after
        .iter()
        .filter_map(|r| r.envelope)
        .chain(a.ledger.envelopes.keys().copied())
        .max()
        .map_or(0, |id| id + 1)
        .max(a.ledger.next_envelope_id);
    ids::raise(dir, bound)?;
    let mut done = Vec::new();
    if let Repair::Quarantine(q) = how {
        fs::create_dir_all(q).with_context(|| format!("creating {}", q.display()))?;
        let name = c.segment.file_name().expect("segments have names");
        fs::copy(&c.segment, q.join(name))
            .with_context(|| format!("copying {} to {}", c.segment.display(), q.display()))?;
        done.push(format!("copied {} to {}", c.segment.display(), q.display()));
        for s in &c.later_segments {
            let to = q.join(s.file_name().expect("segments have names"));
            fs::rename(s, &to)
                .with_context(|| format!("moving {} to {}", s.display(), to.display()))?;
            done.push(format!("moved {} to {}", s.display(), to.display()));
        }
        wal::sync_dir(q)?;
    } else {
        for s in &c.later_segments {
            fs::remove_file(s).with_context(|| format!("removing {}", s.display()))?;
            done.push(format!("removed {}", s.display()));
        }
    }
    cut(&c.segment, c.offset, true)?;
    wal::sync_dir(dir)?;
    done.push(if c.offset <= SEGMENT_HEADER_LEN {
        format!("removed {}", c.segment.display())
    } else {
        format!("truncated {} to {} bytes", c.segment.display(), c.offset)
    });
    let mut after = inspect(dir)?;
    after.repaired = Some(done.join("; "));
    Ok(after)
}

/// Cut `segment` at `offset`. Below the header length the file goes; a
/// repair (`whole_header`) also removes a segment cut to its bare header,
/// which after a sequence gap could name a record the next segment reuses.
fn cut(segment: &Path, offset: u64, whole_header: bool) -> anyhow::Result<()> {
    if offset < SEGMENT_HEADER_LEN || (whole_header && offset == SEGMENT_HEADER_LEN) {
        fs::remove_file(segment).with_context(|| format!("removing {}", segment.display()))?;
        return Ok(());
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .open(segment)
        .with_context(|| format!("opening {}", segment.display()))?;
    f.set_len(offset)?;
    f.sync_all()?;
    Ok(())
}

fn report(dir: &Path, a: &Analysis) -> anyhow::Result<Report> {
    Ok(Report {
        data_dir: dir.to_owned(),
        snapshot_lsn: a.snapshot_lsn,
        recovered_lsn: a.ledger.lsn,
        envelopes: a.ledger.envelopes.len(),
        segments: a.segments,
        torn_tail: a.torn.clone(),
        corruption: a.corruption.clone(),
        id_high_water: ids::read(dir)?,
        repaired: None,
    })
}

/// The read-only pass: replay the snapshot and the log up to the first
/// damage, and classify the damage.
fn analyze(dir: &Path, keep_credits: usize) -> anyhow::Result<Analysis> {
    let mut ledger = snapshot::read(dir)?.unwrap_or_default();
    let snapshot_lsn = ledger.lsn;
    let segments = wal::list_segments(dir)?;
    let mut tail = None;
    let mut torn = None;
    let mut replayed = 0u64;
    let mut corruption = None;
    'segments: for (idx, (base, path)) in segments.iter().enumerate() {
        let is_last = idx + 1 == segments.len();
        let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut bad = |offset: u64, reason: String| {
            corruption = Some(corruption_at(
                &segments,
                idx,
                &bytes,
                offset,
                reason,
                snapshot_lsn,
            ));
        };
        let scan = match wal::scan_segment(&bytes, *base) {
            Ok(s) => s,
            Err(c) => {
                bad(c.offset, c.reason);
                break;
            }
        };
        if *base > ledger.lsn + 1 && !scan.records.is_empty() {
            bad(
                SEGMENT_HEADER_LEN,
                format!(
                    "log starts at record {base} but the state ends at {}: records are missing",
                    ledger.lsn
                ),
            );
            break;
        }
        for ((lsn, record), offset) in scan.records.iter().zip(&scan.offsets) {
            if *lsn <= ledger.lsn {
                continue;
            }
            if let Err(e) = ledger.apply(*lsn, record, keep_credits) {
                bad(*offset, format!("record does not apply: {e}"));
                break 'segments;
            }
            replayed += 1;
        }
        if let Some(d) = &scan.damage {
            if let Some(next) = d.later.first() {
                bad(
                    scan.valid_len,
                    format!(
                        "{}, but valid frames follow (the first at byte {}, record {}): \
                         the middle of the log is damaged, not its tail",
                        d.reason, next.offset, next.lsn
                    ),
                );
                break;
            }
            if !is_last {
                bad(
                    scan.valid_len,
                    format!(
                        "{} in a closed segment (later segments exist): the log is corrupt",
                        d.reason
                    ),
                );
                break;
            }
            torn = Some(TornTail {
                segment: path.clone(),
                offset: scan.valid_len,
                dropped_bytes: bytes.len() as u64 - scan.valid_len,
                reason: d.reason.to_owned(),
            });
            if scan.valid_len == 0 {
                // Crashed while creating the segment: nothing in it was ever
                // acknowledged, and the whole file goes.
                continue;
            }
        }
        tail = Some(Tail {
            path: path.clone(),
            len: scan.valid_len,
            last_lsn: base + scan.records.len() as u64 - 1,
        });
    }
    Ok(Analysis {
        ledger,
        tail,
        replayed,
        torn,
        corruption,
        snapshot_lsn,
        segments: segments.len(),
    })
}

/// Corruption at `offset` of segment `idx` (whose contents are `bytes`):
/// collect every valid frame from there to the end of the log.
fn corruption_at(
    segments: &[(u64, PathBuf)],
    idx: usize,
    bytes: &[u8],
    offset: u64,
    reason: String,
    snapshot_lsn: u64,
) -> Corruption {
    let mut after = Vec::new();
    let mut collect = |path: &Path, bytes: &[u8], from: usize| {
        for f in wal::resync(bytes, from, 1..=u64::MAX) {
            after.push(lost_record(path, &f, snapshot_lsn));
        }
    };
    let from = (offset as usize).max(SEGMENT_HEADER_LEN as usize);
    collect(&segments[idx].1, bytes, from);
    let mut later_segments = Vec::new();
    for (_, path) in &segments[idx + 1..] {
        later_segments.push(path.clone());
        match fs::read(path) {
            Ok(b) => collect(path, &b, SEGMENT_HEADER_LEN as usize),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot read segment"),
        }
    }
    Corruption {
        segment: segments[idx].1.clone(),
        offset,
        reason,
        after,
        later_segments,
    }
}

fn lost_record(path: &Path, f: &wal::Found, snapshot_lsn: u64) -> LostRecord {
    let mut r = LostRecord {
        segment: path.to_owned(),
        offset: f.offset,
        lsn: f.lsn,
        kind: "undecodable",
        envelope: None,
        user: None,
        amount_cents: None,
        in_snapshot: f.lsn <= snapshot_lsn,
    };
    match &f.record {
        Ok(Record::Create {
            id,
            sender,
            total_cents,
            ..
        }) => {
            r.kind = "create";
            r.envelope = Some(*id);
            r.user = Some(sender.clone());
            r.amount_cents = Some(*total_cents);
        }
        Ok(Record::Grab {
            envelope,
            user,
            amount_cents,
            ..
        }) => {
            r.kind = "grab";
            r.envelope = Some(*envelope);
            r.user = Some(user.to_string());
            r.amount_cents = Some(*amount_cents);
        }
        Ok(Record::Refund {
            envelope,
            amount_cents,
            ..
        }) => {
            r.kind = "refund";
            r.envelope = Some(*envelope);
            r.amount_cents = Some(*amount_cents);
        }
        Err(_) => {}
    }
    r
}

// === impl Report ===

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "data dir: {}", self.data_dir.display())?;
        writeln!(
            f,
            "segments: {}; snapshot at record {}; a start recovers up to record {} ({} envelopes)",
            self.segments, self.snapshot_lsn, self.recovered_lsn, self.envelopes
        )?;
        writeln!(f, "envelope id high-water mark: {}", self.id_high_water)?;
        if let Some(t) = &self.torn_tail {
            writeln!(
                f,
                "torn tail: {} at byte {} ({}; {} bytes): a start drops it (never acknowledged)",
                t.segment.display(),
                t.offset,
                t.reason,
                t.dropped_bytes
            )?;
        }
        match &self.corruption {
            None => writeln!(f, "corruption: none")?,
            Some(c) => {
                writeln!(
                    f,
                    "CORRUPTION: {} at byte {}: {}",
                    c.segment.display(),
                    c.offset,
                    c.reason
                )?;
                let lost = c.after.iter().filter(|r| !r.in_snapshot).count();
                writeln!(
                    f,
                    "cutting the log there drops {} valid frame(s) ({} not in the snapshot) and {} later segment(s):",
                    c.after.len(),
                    lost,
                    c.later_segments.len()
                )?;
                for r in &c.after {
                    write!(
                        f,
                        "  {} byte {} record {}: {}",
                        r.segment
                            .file_name()
                            .map(|n| n.to_string_lossy())
                            .unwrap_or_default(),
                        r.offset,
                        r.lsn,
                        r.kind
                    )?;
                    if let Some(e) = r.envelope {
                        write!(f, " envelope={e}")?;
                    }
                    if let Some(u) = &r.user {
                        write!(f, " user={u:?}")?;
                    }
                    if let Some(a) = r.amount_cents {
                        write!(f, " amount_cents={a}")?;
                    }
                    if r.in_snapshot {
                        write!(f, " (in the snapshot: not lost)")?;
                    }
                    writeln!(f)?;
                }
            }
        }
        if let Some(done) = &self.repaired {
            writeln!(f, "repaired: {done}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
