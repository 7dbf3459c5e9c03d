//! Snapshots: the settled [`Ledger`] written atomically, so recovery reads
//! one file plus the log written after it, and older log segments can go.
//!
//! File `snapshot.bin`: `TGSNAP01`, the ledger's sequence number (u64 LE),
//! the payload length (u64 LE), the payload's CRC-32 (u32 LE), then the
//! ledger as JSON. It is written to `snapshot.tmp`, synced, renamed over the
//! old one and the directory synced, so a crash leaves either the old or the
//! new snapshot, never half of one. Only then are covered segments deleted.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use anyhow::{Context, bail};

use crate::model::Ledger;
use crate::wal;

const MAGIC: &[u8; 8] = b"TGSNAP01";
const HEADER_LEN: usize = 28;
pub(crate) const FILE: &str = "snapshot.bin";
const TMP: &str = "snapshot.tmp";

/// Serialize `ledger` into snapshot bytes.
pub(crate) fn encode(ledger: &Ledger) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut out, ledger).expect("the ledger always serializes");
    let crc = crc32fast::hash(&out[HEADER_LEN..]);
    let len = (out.len() - HEADER_LEN) as u64;
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&ledger.lsn.to_le_bytes());
    out[16..24].copy_from_slice(&len.to_le_bytes());
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Atomically replace the snapshot in `dir` with `bytes`.
pub(crate) fn install(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(TMP);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(FILE))?;
    wal::sync_dir(dir)
}

/// Load the snapshot in `dir`, if there is one.
pub(crate) fn read(dir: &Path) -> anyhow::Result<Option<Ledger>> {
    let path = dir.join(FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // The snapshot was synced before it got its name, so any damage here is
    // real corruption, and the log it covers is gone: refuse to guess.
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        bail!("{}: not a snapshot (bad header)", path.display());
    }
    let lsn = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len || crc32fast::hash(payload) != crc {
        bail!(
            "{}: snapshot is corrupt (length or checksum mismatch)",
            path.display()
        );
    }
    let mut ledger: Ledger = serde_json::from_slice(payload)
        .with_context(|| format!("{}: snapshot does not parse", path.display()))?;
    if ledger.lsn != lsn {
        bail!(
            "{}: snapshot header lsn {lsn} disagrees with its body {}",
            path.display(),
            ledger.lsn
        );
    }
    ledger.reindex();
    Ok(Some(ledger))
}

/// Delete the segments whose every record is at or below `lsn` (the current,
/// last segment is always kept). Returns how many were deleted.
pub(crate) fn drop_covered_segments(dir: &Path, lsn: u64) -> io::Result<usize> {
    let segments = wal::list_segments(dir)?;
    let mut removed = 0;
    for pair in segments.windows(2) {
        // Segment i holds [base_i, base_{i+1} - 1].
        if pair[1].0 <= lsn + 1 {
            fs::remove_file(&pair[0].1)?;
            removed += 1;
        } else {
            break;
        }
    }
    if removed > 0 {
        wal::sync_dir(dir)?;
    }
    Ok(removed)
}

/// Remove a leftover temporary snapshot from a crash mid-write.
pub(crate) fn remove_leftovers(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join(TMP)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
