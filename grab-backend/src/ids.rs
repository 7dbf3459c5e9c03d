//! The envelope id high-water mark: a small side file that keeps envelope ids
//! from ever being handed out twice, even when recovery or `recover
//! --truncate` drops records from the log.
//!
//! File `ids.hwm`: `TGIDS001`, the bound (u64 LE), and a CRC-32 (u32 LE) of
//! the first 16 bytes. Every id ever handed out is below the bound. Ids are
//! reserved in blocks: before the first id of a block is handed out, the new
//! bound is written to `ids.tmp`, synced, renamed over the old file and the
//! directory synced. So one create in [`BLOCK`] waits for that, and a crash
//! skips at most the rest of a block. A clean close lowers the bound to the
//! next id, so clean restarts leave no gap.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, bail};

use crate::wal;

pub(crate) const FILE: &str = "ids.hwm";
const TMP: &str = "ids.tmp";
const MAGIC: &[u8; 8] = b"TGIDS001";
const LEN: usize = 20;
/// Ids reserved by one write of the file.
pub(crate) const BLOCK: u64 = 1024;

/// Hands out envelope ids below a durably recorded bound.
pub(crate) struct Ids {
    dir: PathBuf,
    state: Mutex<State>,
}

struct State {
    next: u64,
    /// The bound on disk: ids below it may be handed out.
    reserved: u64,
}

impl Ids {
    /// Ids from `max(next, bound on disk)` on.
    pub(crate) fn open(dir: &Path, next: u64) -> anyhow::Result<Self> {
        let bound = read(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            state: Mutex::new(State {
                next: next.max(bound).max(1),
                reserved: bound,
            }),
        })
    }

    /// A new id, never handed out before (durably: the bound covering it is
    /// on disk before it is returned).
    pub(crate) fn allocate(&self) -> io::Result<u64> {
        let mut s = self.state.lock().expect("ids poisoned");
        if s.next >= s.reserved {
            let bound = s.next + BLOCK;
            write(&self.dir, bound)?;
            s.reserved = bound;
        }
        let id = s.next;
        s.next += 1;
        Ok(id)
    }

    /// Lower the bound on disk to the next id (after the last create).
    pub(crate) fn close(&self) {
        let mut s = self.state.lock().expect("ids poisoned");
        if s.reserved > s.next {
            match write(&self.dir, s.next) {
                Ok(()) => s.reserved = s.next,
                Err(e) => tracing::warn!(error = %e, "could not lower the id high-water mark"),
            }
        }
    }
}

/// The bound in `dir`; 0 when there is no file yet.
pub(crate) fn read(dir: &Path) -> anyhow::Result<u64> {
    let path = dir.join(FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // Written whole and renamed into place, so damage here is corruption; a
    // guessed bound could hand out an id twice.
    if bytes.len() != LEN
        || &bytes[..8] != MAGIC
        || crc32fast::hash(&bytes[..16]).to_le_bytes() != bytes[16..20]
    {
        bail!(
            "{}: the envelope id high-water mark is corrupt; refusing to guess (see docs/grab-backend.md, \"Envelope ids\")",
            path.display()
        );
    }
    Ok(u64::from_le_bytes(
        bytes[8..16].try_into().expect("8 bytes"),
    ))
}

/// Atomically replace the bound in `dir`.
pub(crate) fn write(dir: &Path, bound: u64) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&bound.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(TMP);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(FILE))?;
    wal::sync_dir(dir)
}

/// Raise the bound in `dir` to at least `bound`.
pub(crate) fn raise(dir: &Path, bound: u64) -> anyhow::Result<u64> {
    let old = read(dir)?;
    if bound > old {
        write(dir, bound).with_context(|| format!("writing {}", dir.join(FILE).display()))?;
        return Ok(bound);
    }
    Ok(old)
}
