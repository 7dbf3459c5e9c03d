//! The history of applied configs, and rollback to one of them.
//!
//! Every config the gateway applies (at start and on each reload that changes something) is
//! kept as one JSON file in `<server.data_dir>/history/`: an increasing ID that survives
//! restarts, the process's generation, the content hash, the time, what triggered it, a
//! one-line semantic summary of what changed from the entry before (`rules::diff`), and the
//! config's own files as they were read (the main file and its `include_dir` fragments; key
//! files are secrets and are never copied). The last `server.history_keep` entries are kept.
//!
//! `tidegate rollback --to ID` writes an entry's files back: each file atomically (a
//! temporary file in the same directory, then a rename), fragments first and the main file
//! last, so the watcher applies the rolled-back config as a whole once the main file lands;
//! fragments the entry did not have are renamed aside (`NAME.json.replaced-<ms>`), never
//! deleted. An entry that no longer loads with this build is refused before anything is
//! written.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::config::{Sources, read_bounded};

/// The history directory of a gateway.
#[derive(Debug, Clone)]
pub struct History {
    dir: PathBuf,
    keep: usize,
}

/// What the history says of one applied config, besides its files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Increases with every entry, across restarts.
    pub id: u64,
    /// The process's config generation when it was applied (1: at start).
    pub generation: u64,
    /// The content hash `/admin/config` showed, hex.
    pub hash: String,
    /// When it was applied, Unix milliseconds.
    pub applied_at_ms: u64,
    /// What applied it (`start`, `watch`, `poll`, `signal`, ...).
    pub trigger: String,
    /// What changed from the entry before, one line (`rules::diff`).
    pub summary: String,
}

/// One applied config.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Its ID, generation, hash, time, trigger and summary.
    #[serde(flatten)]
    pub meta: Meta,
    /// The main config file.
    pub main: String,
    /// Its include directory, if it names one.
    pub include_dir: Option<String>,
    /// The files as read: the main file first, then the fragments.
    pub files: Vec<File>,
}

/// One config file and its text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct File {
    /// Where it was read from.
    pub path: String,
    /// Its content (config files are UTF-8 JSON: they were validated).
    pub text: String,
}

/// An entry without its files' text, for listings.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// Its ID, generation, hash, time, trigger and summary.
    #[serde(flatten)]
    pub meta: Meta,
    /// The files' paths.
    pub files: Vec<String>,
}

// === impl History ===

impl History {
    /// The history under `data_dir` keeping `keep` entries; `None` when `keep` is 0.
    pub fn new(data_dir: &Path, keep: u32) -> Option<Self> {
        (keep > 0).then(|| Self {
            dir: data_dir.join("history"),
            keep: keep as usize,
        })
    }

    /// The history a `data_dir` holds, whatever it keeps (for `tidegate rollback`).
    pub fn at(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("history"),
            keep: usize::MAX,
        }
    }

    /// Record an applied config, unless the newest entry has the same hash (a restart on
    /// an unchanged config). Returns the entry's ID.
    pub fn record(
        &self,
        sources: &Sources,
        generation: u64,
        hash: u64,
        trigger: &str,
    ) -> Result<u64, String> {
        let hash = format!("{hash:016x}");
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let ids = self.ids()?;
        let previous = ids.last().and_then(|&id| self.get(id).ok());
        if let Some(p) = &previous
            && p.meta.hash == hash
        {
            return Ok(p.meta.id);
        }
        let files: Vec<File> = std::iter::once(&sources.main)
            .chain(&sources.fragments)
            .map(|(p, b)| File {
                path: p.display().to_string(),
                text: String::from_utf8_lossy(b).into_owned(),
            })
            .collect();
        let mut entry = Entry {
            meta: Meta {
                id: ids.last().map_or(1, |i| i + 1),
                generation,
                hash,
                applied_at_ms: unix_ms(),
                trigger: trigger.to_owned(),
                summary: String::new(),
            },
            main: sources.main.0.display().to_string(),
            include_dir: sources
                .include_dir
                .as_ref()
                .map(|d| d.display().to_string()),
            files,
        };
        entry.meta.summary = match &previous {
            Some(p) => summary(p, &entry),
            None => "first recorded config".into(),
        };
        self.write_new(&mut entry)?;
        self.prune()?;
        Ok(entry.meta.id)
    }

    /// Write `entry` under its ID, or the next free one if another writer took it (two
    /// gateways sharing a data directory): never overwrites an entry.
    fn write_new(&self, entry: &mut Entry) -> Result<(), String> {
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", std::process::id(), entry.meta.id));
        for _ in 0..100 {
            let bytes = serde_json::to_vec_pretty(&*entry).map_err(|e| e.to_string())?;
            write_synced(&tmp, &bytes)?;
            let path = self.path_of(entry.meta.id);
            // A hard link fails if the name exists, where a rename would replace it.
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => entry.meta.id += 1,
                Err(e) => return Err(format!("cannot write {}: {e}", path.display())),
            }
        }
        Err(format!("no free entry name in {}", self.dir.display()))
    }

    /// Remove all but the newest `keep` entries.
    fn prune(&self) -> Result<(), String> {
        let ids = self.ids()?;
        for id in ids.iter().take(ids.len().saturating_sub(self.keep)) {
            let p = self.path_of(*id);
            std::fs::remove_file(&p).map_err(|e| format!("cannot remove {}: {e}", p.display()))?;
        }
        Ok(())
    }

    fn path_of(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:08}.json"))
    }

    /// The entry IDs on disk, ascending. Names that are not entries are ignored.
    fn ids(&self) -> Result<Vec<u64>, String> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("cannot list {}: {e}", self.dir.display())),
        };
        let mut ids: Vec<u64> = rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name();
                let stem = name.to_str()?.strip_suffix(".json")?;
                (stem.len() == 8).then(|| stem.parse().ok()).flatten()
            })
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// One entry, read as any file the gateway reads (regular files only, bounded).
    pub fn get(&self, id: u64) -> Result<Entry, String> {
        let p = self.path_of(id);
        let bytes = read_bounded(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let entry: Entry = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a history entry: {e}", p.display()))?;
        if entry.meta.id != id {
            return Err(format!("{}: holds entry {}", p.display(), entry.meta.id));
        }
        Ok(entry)
    }

    /// Every readable entry, newest first, without the files' text; entries that cannot
    /// be read are reported as errors beside them.
    pub fn list(&self) -> (Vec<Listed>, Vec<String>) {
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        let ids = match self.ids() {
            Ok(ids) => ids,
            Err(e) => return (out, vec![e]),
        };
        for id in ids.into_iter().rev() {
            match self.get(id) {
                Ok(e) => out.push(Listed {
                    meta: e.meta,
                    files: e.files.into_iter().map(|f| f.path).collect(),
                }),
                Err(e) => errors.push(e),
            }
        }
        (out, errors)
    }
}

/// Load an entry's files as the gateway would (pure: from the stored text).
pub fn load(entry: &Entry) -> Result<rules::Loaded, String> {
    let (main, fragments) = entry
        .files
        .split_first()
        .ok_or_else(|| format!("entry {} has no files", entry.meta.id))?;
    let fragments: Vec<(String, Vec<u8>)> = (fragments.iter())
        .map(|f| (f.path.clone(), f.text.clone().into_bytes()))
        .collect();
    rules::include::load_with(
        rules::include::Source {
            name: &main.path,
            bytes: main.text.as_bytes(),
        },
        |_| Ok(fragments),
    )
    .map_err(|e| e.to_string())
}

/// "routes: ~canary; limits: +total -old", or "no rule changes" (a hash change that the
/// rules do not see: whitespace, key order, a key file's content).
fn summary(previous: &Entry, current: &Entry) -> String {
    match (load(previous), load(current)) {
        (Ok(p), Ok(c)) => {
            rules::diff::diff((&p.config, &p.snapshot), (&c.config, &c.snapshot)).summary()
        }
        (Err(e), _) => format!(
            "entry {} does not load with this build: {e}",
            previous.meta.id
        ),
        (_, Err(e)) => format!("does not load with this build: {e}"),
    }
}

/// Write `entry`'s files back where they were read from; fragments in its include directory
/// that it did not have are renamed aside. Every file is first written and synced beside its
/// place, then all renames run in one burst, so a running gateway's watcher (which settles
/// for tens of milliseconds) reads the whole old set, never a half-restored one. Returns what
/// was written and what was moved aside.
pub fn rollback(entry: &Entry) -> Result<(Vec<PathBuf>, Vec<PathBuf>), String> {
    load(entry)
        .map_err(|e| format!("entry {} does not load with this build: {e}", entry.meta.id))?;
    let (main, fragments) = entry
        .files
        .split_first()
        .ok_or_else(|| format!("entry {} has no files", entry.meta.id))?;
    let mut aside = Vec::new();
    if let Some(dir) = &entry.include_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
        let keep: Vec<&str> = fragments.iter().map(|f| f.path.as_str()).collect();
        let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot list {dir}: {e}"))?;
        let stamp = unix_ms();
        for p in rd.filter_map(Result::ok).map(|e| e.path()) {
            let is_fragment = p.extension().is_some_and(|x| x == "json");
            if is_fragment && !keep.contains(&&*p.display().to_string()) {
                let to = PathBuf::from(format!("{}.replaced-{stamp}", p.display()));
                aside.push((p, to));
            }
        }
    }
    // Fragments first and the main file last, in case the burst is interrupted.
    let mut staged = Vec::new();
    for f in fragments.iter().chain(std::iter::once(main)) {
        let p = PathBuf::from(&f.path);
        match stage(&p, f.text.as_bytes()) {
            Ok(tmp) => staged.push((tmp, p)),
            Err(e) => {
                discard(&staged);
                return Err(e);
            }
        }
    }
    let mut moved = Vec::new();
    for (from, to) in aside {
        if let Err(e) = std::fs::rename(&from, &to) {
            discard(&staged);
            return Err(format!("cannot move {} aside: {e}", from.display()));
        }
        moved.push(to);
    }
    let mut written = Vec::new();
    for (tmp, p) in staged {
        rename_into_place(&tmp, &p)?;
        written.push(p);
    }
    Ok((written, moved))
}

/// Remove staged files that will not be renamed into place.
fn discard(staged: &[(PathBuf, PathBuf)]) {
    for (tmp, _) in staged {
        let _ = std::fs::remove_file(tmp);
    }
}

/// Replace `path` by `bytes` in one rename, so a reader sees the old file or the new one.
pub(crate) fn replace_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = stage(path, bytes)?;
    rename_into_place(&tmp, path)
}

/// Write and sync `bytes` to a hidden file beside `path`, ready to be renamed over it.
fn stage(path: &Path, bytes: &[u8]) -> Result<PathBuf, String> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.rollback-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    write_synced(&tmp, bytes)?;
    Ok(tmp)
}

fn rename_into_place(tmp: &Path, path: &Path) -> Result<(), String> {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        format!("cannot replace {}: {e}", path.display())
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
