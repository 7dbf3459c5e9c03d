//! Reading a config file from disk: the I/O half of loading that `rules` (pure) cannot do.
//!
//! Only regular files are read: the main file, every fragment of its `include_dir` and the
//! listeners' TLS files are checked with `metadata` *before* they are opened, so a FIFO (whose
//! `open` would block until a writer appears), a socket, a device or a directory is refused
//! with its name; files over [`rules::source::MAX_CONFIG_BYTES`] are refused by their size,
//! unread. Then `rules::load` runs, plus the checks that need the file system (do the TLS
//! certificate and key load?), located like every other error.
//!
//! A file swapped for a FIFO between that check and the `open` (or a hung network file
//! system) can still block a read. Callers that must not hang use
//! [`read_config_within`] (a detached thread, abandoned after a bound) or, for reloads, the
//! same pattern in `reload`; [`Progress`] says which file the read was stuck on.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rules::Loaded;
use rules::error::{ConfigError, ConfigErrors, JsonPath};
use rules::source::MAX_CONFIG_BYTES;
use rules::validate::Issue;

use crate::jwt::KeySet;
use crate::runtime::Secrets;

/// How long reading a config (every file of it) and compiling it may take before the read
/// is abandoned and reported as stuck: at start-up, in `tidegate check` and on every reload.
/// A healthy read of the largest allowed config takes well under a second.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a config read is doing now (`reading FILE`, ...), shared with whoever waits for it,
/// so a read that never finishes can be reported by the file it is stuck on.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Mutex<String>>);

impl Progress {
    /// Record the current step.
    pub fn set(&self, step: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = step.into();
    }

    /// The current step (`"starting"` before the first).
    pub fn get(&self) -> String {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_empty() {
            "starting the config read".to_owned()
        } else {
            s.clone()
        }
    }

    /// The message for a read that gave no answer within `bound`.
    pub fn stuck_message(&self, bound: Duration) -> String {
        format!("{}: no answer within {}", self.get(), human(bound))
    }
}

/// `5 s`, `1.5 s`, `250 ms`.
pub fn human(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// A config as read from disk: the compiled rules, their content version, and what they
/// name on disk that the gateway loads itself.
#[derive(Debug)]
pub struct Read {
    /// The parsed config and its compiled snapshot.
    pub loaded: Loaded,
    /// XXH3-64 over the file's bytes, each fragment's name and bytes, and the key files'
    /// bytes: equal hashes mean a reload has nothing to do.
    pub hash: u64,
    /// The files the rules name that the gateway reads: the keys of `identity.jwt`, the
    /// user-priority key.
    pub secrets: Secrets,
    /// The config's own files as read (the main file and its fragments), for the history.
    pub sources: Sources,
}

/// The files a config was read from, and their bytes: what the history keeps and a
/// rollback writes back. Key files are not among them (they are secrets).
#[derive(Debug, Clone)]
pub struct Sources {
    /// The main file.
    pub main: (std::path::PathBuf, Vec<u8>),
    /// The `include_dir` it names, if any.
    pub include_dir: Option<std::path::PathBuf>,
    /// Each fragment of the include directory, in the order they were merged.
    pub fragments: Vec<(std::path::PathBuf, Vec<u8>)>,
}

/// Read, parse, validate and compile the config at `path`, and check its TLS and key files.
pub fn read_config(path: &Path) -> Result<Loaded, ConfigErrors> {
    read_config_hashed(path).map(|r| r.loaded)
}

/// [`read_config_hashed`] on a detached thread, waiting at most `bound`: a read that does
/// not finish in time (a FIFO swapped in after the file-type check, a hung file system) is
/// abandoned, its thread left blocked, and reported as an error naming the file it was
/// reading. For one-shot callers (start-up, `tidegate check`), which exit or carry on.
pub fn read_config_within(path: &Path, bound: Duration) -> Result<Read, ConfigErrors> {
    let progress = Progress::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let (p, pr) = (path.to_path_buf(), progress.clone());
    let whole = |message: String| ConfigError {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        path: JsonPath::root(),
        message,
    };
    std::thread::Builder::new()
        .name("tidegate-config-read".into())
        .spawn(move || {
            let _ = tx.send(read_config_traced(&p, &pr));
        })
        .map_err(|e| whole(format!("cannot start a thread to read the config: {e}")))?;
    match rx.recv_timeout(bound) {
        Ok(result) => result,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            Err(whole(progress.stuck_message(bound)).into())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(whole("the config read failed (its thread panicked)".to_owned()).into())
        }
    }
}

/// [`read_config`], also returning the content version (shown on the admin port) and the
/// keys.
pub fn read_config_hashed(path: &Path) -> Result<Read, ConfigErrors> {
    read_config_traced(path, &Progress::default())
}

/// [`read_config_hashed`], recording each step in `progress`.
pub fn read_config_traced(path: &Path, progress: &Progress) -> Result<Read, ConfigErrors> {
    let name = path.display().to_string();
    progress.set(format!("reading {name}"));
    let bytes = read_bounded(path).map_err(|message| ConfigError {
        file: name.clone(),
        line: 0,
        column: 0,
        path: JsonPath::root(),
        message,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    // The content version: XXH3-64 over the main file's bytes, then each fragment's name,
    // a NUL and its bytes.
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&bytes);
    let (mut include_dir, mut fragments) = (None, Vec::new());
    let loaded = rules::include::load_with(
        rules::include::Source {
            name: &name,
            bytes: &bytes,
        },
        |dir| {
            include_dir = Some(base.join(dir));
            let files = read_include_dir(&base.join(dir), progress)?;
            for (n, b) in &files {
                hasher.update(n.as_bytes());
                hasher.update(&[0]);
                hasher.update(b);
            }
            fragments = (files.iter())
                .map(|(n, b)| (std::path::PathBuf::from(n), b.clone()))
                .collect();
            Ok(files)
        },
    )?;
    let mut issues = Vec::new();
    for (i, l) in loaded.config.server.listeners.iter().enumerate() {
        if let Some(tls) = &l.tls {
            // Only regular files, checked before the TLS loader opens them.
            let not_regular = [("cert_path", &tls.cert_path), ("key_path", &tls.key_path)]
                .into_iter()
                .find_map(|(field, p)| {
                    let meta = std::fs::metadata(p).ok()?;
                    (!meta.is_file()).then(|| {
                        let kind = if meta.is_dir() {
                            "a directory"
                        } else {
                            special_kind(meta.file_type())
                        };
                        (
                            field,
                            format!("{p}: the file is {kind}, not a regular file"),
                        )
                    })
                });
            progress.set(format!(
                "loading TLS files {} and {}",
                tls.cert_path, tls.key_path
            ));
            let checked = match not_regular {
                Some((field, message)) => Err((field, message)),
                None => {
                    crate::serve::tls::server_config(&tls.cert_path, &tls.key_path).map_err(|e| {
                        let field = match e {
                            crate::serve::tls::TlsError::Key { .. } => "key_path",
                            _ => "cert_path",
                        };
                        (field, e.to_string())
                    })
                }
            };
            if let Err((field, message)) = checked {
                issues.push(Issue {
                    path: JsonPath::root()
                        .key("server")
                        .key("listeners")
                        .index(i)
                        .key("tls")
                        .key(field),
                    message,
                });
            }
        }
    }
    let mut named = NamedFiles {
        base,
        hasher: &mut hasher,
        progress,
        issues: &mut issues,
    };
    let keys = loaded.snapshot.jwt.as_ref().and_then(|jwt| {
        let at = JsonPath::root().key("identity").key("jwt").key("jwks_file");
        named
            .read(&jwt.jwks_file, at, |b| {
                KeySet::parse(b, &crate::jwt::algorithms(jwt))
            })
            .map(Arc::new)
    });
    let priority_key = loaded
        .snapshot
        .overload
        .priority_key_file
        .as_deref()
        .and_then(|f| {
            let at = JsonPath::root()
                .key("overload")
                .key("admission")
                .key("priority_key_file");
            named.read(f, at, priority_key)
        });
    let upstream_tls = upstream_tls(&loaded, &mut named);
    if !issues.is_empty() {
        let text = String::from_utf8_lossy(&bytes);
        return Err(rules::locate_all(&name, &text, issues));
    }
    Ok(Read {
        loaded,
        hash: hasher.digest(),
        secrets: Secrets {
            jwks: keys,
            priority_key,
            upstream_tls,
        },
        sources: Sources {
            main: (path.to_path_buf(), bytes),
            include_dir,
            fragments,
        },
    })
}

/// The key files a config names, read beside it: each hashed into the content version (a
/// key file edit alone is a reload) and parsed, a failure reported at the field naming it.
struct NamedFiles<'a> {
    base: &'a Path,
    hasher: &'a mut xxhash_rust::xxh3::Xxh3,
    progress: &'a Progress,
    issues: &'a mut Vec<Issue>,
}

impl NamedFiles<'_> {
    /// Read `file` (relative to the config) named at `at`, and parse it.
    fn read<T>(
        &mut self,
        file: &str,
        at: JsonPath,
        parse: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Option<T> {
        let path = self.base.join(file);
        self.progress.set(format!("reading {}", path.display()));
        self.hasher.update(b"\0");
        self.hasher.update(at.to_string().as_bytes());
        self.hasher.update(b"\0");
        let parsed = read_bounded(&path).and_then(|b| {
            self.hasher.update(&b);
            parse(&b)
        });
        parsed
            .map_err(|message| {
                self.issues.push(Issue {
                    path: at,
                    message: format!("{}: {message}", path.display()),
                });
            })
            .ok()
    }
}

/// The TLS client of every upstream with `tls`: its files read beside the config (and
/// hashed into the content version, so replacing a certificate is a reload) and the rustls
/// config built, once per load. A file that is missing or does not parse, or a key that
/// does not match its certificate, is reported at the field naming it and refuses the load.
fn upstream_tls(
    loaded: &Loaded,
    named: &mut NamedFiles<'_>,
) -> HashMap<Box<str>, crate::upstream::tls::TlsClient> {
    use crate::upstream::tls::{TlsClient, TlsFiles};
    let mut out = HashMap::new();
    for spec in &loaded.snapshot.upstreams {
        let Some(t) = &spec.tls else { continue };
        let at = JsonPath::root()
            .key("upstreams")
            .key(&*spec.name)
            .key("tls");
        let bytes = |b: &[u8]| Ok(b.to_vec());
        let mut ok = true;
        let ca = t.ca_file.as_deref().map(|f| {
            let read = named.read(f, at.key("ca_file"), bytes);
            ok &= read.is_some();
            read.unwrap_or_default()
        });
        let identity = t.client_identity.as_ref().map(|(c, k)| {
            let cert = named.read(c, at.key("client_cert_file"), bytes);
            let key = named.read(k, at.key("client_key_file"), bytes);
            ok &= cert.is_some() && key.is_some();
            (cert.unwrap_or_default(), key.unwrap_or_default())
        });
        if !ok {
            continue;
        }
        named
            .progress
            .set(format!("building the TLS client of upstream {}", spec.name));
        match TlsClient::build(spec.protocol, &TlsFiles { ca, identity }) {
            Ok(c) => {
                if t.ca_file.is_none() {
                    // The system store is read at every load: its content is part of the
                    // version too, so a reload after it changed builds the client anew.
                    named.hasher.update(&c.fingerprint.to_le_bytes());
                }
                out.insert(spec.name.clone(), c);
            }
            Err(message) => named.issues.push(Issue { path: at, message }),
        }
    }
    out
}

/// The SipHash key for user priorities from a key file's bytes: SHA-256 of the whole file,
/// first 16 bytes (any length of secret works; a short one is refused as guessable).
fn priority_key(bytes: &[u8]) -> Result<rules::overload::PriorityKey, String> {
    if bytes.len() < 16 {
        return Err(format!(
            "{} bytes; a priority key needs at least 16 secret bytes (head -c 32 /dev/urandom)",
            bytes.len()
        ));
    }
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut key = [0u8; 16];
    key.copy_from_slice(&d.as_ref()[..16]);
    Ok(key)
}

/// The key file of `identity.jwt` in `loaded`, resolved against the config file at `path`
/// (watched for edits like the config itself).
pub fn jwks_file(path: &Path, loaded: &Loaded) -> Option<std::path::PathBuf> {
    let jwt = loaded.snapshot.jwt.as_ref()?;
    Some(
        path.parent()
            .unwrap_or(Path::new("."))
            .join(&*jwt.jwks_file),
    )
}

/// The rules fragments of an include directory: every `*.json` file not starting with `.`
/// (editors' swap and temp files are skipped), in file-name order, as `(path, bytes)`.
fn read_include_dir(dir: &Path, progress: &Progress) -> Result<Vec<(String, Vec<u8>)>, String> {
    progress.set(format!("listing {}", dir.display()));
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut paths: Vec<std::path::PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            progress.set(format!("reading {}", p.display()));
            let bytes = read_bounded(&p).map_err(|m| format!("{}: {m}", p.display()))?;
            Ok((p.display().to_string(), bytes))
        })
        .collect()
}

/// The directory named by a config's `include_dir`, resolved against the config's own
/// directory (for the watcher).
pub fn include_dir(path: &Path, loaded: &Loaded) -> Option<std::path::PathBuf> {
    let dir = loaded.config.include_dir.as_ref()?;
    Some(path.parent().unwrap_or(Path::new(".")).join(dir))
}

/// Check that `path` (following symbolic links) is a regular file of at most
/// `MAX_CONFIG_BYTES`, without opening it; an operator-readable reason when it is not.
fn regular_file(path: &Path) -> Result<std::fs::Metadata, String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => match std::fs::symlink_metadata(path) {
            Ok(_) => "the file is a dangling symbolic link".to_owned(),
            Err(_) => "the file does not exist".to_owned(),
        },
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => format!("cannot read the file: {e}"),
    })?;
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err("the path is a directory, not a config file".into());
    }
    if !kind.is_file() {
        return Err(format!(
            "the file is {}, not a regular file; only regular files are read",
            special_kind(kind)
        ));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "config is {} bytes, more than the limit of {MAX_CONFIG_BYTES}",
            meta.len()
        ));
    }
    Ok(meta)
}

/// What a file that is neither a directory nor a regular file is.
fn special_kind(kind: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if kind.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
    }
    let _ = kind;
    "a special file"
}

/// Shortest admin token accepted, in bytes.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// Read the admin token named by `admin.token_file` (relative to `base`, the config file's
/// directory, when given): its content with surrounding whitespace removed. `Ok(None)`
/// when no token file is configured.
pub fn read_admin_token(
    admin: &rules::model::Admin,
    base: Option<&Path>,
) -> Result<Option<Vec<u8>>, String> {
    let Some(file) = &admin.token_file else {
        return Ok(None);
    };
    let path = match base {
        Some(b) => b.join(file),
        None => Path::new(file).to_path_buf(),
    };
    // Regular files only, bounded: a FIFO named as the token file must not hang the start
    // or `tidegate check`.
    let bytes = read_bounded(&path)
        .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?;
    let token = bytes.trim_ascii();
    if token.len() < MIN_ADMIN_TOKEN_BYTES {
        return Err(format!(
            "the admin token in {} is shorter than {MIN_ADMIN_TOKEN_BYTES} bytes",
            path.display()
        ));
    }
    if let Some(b) = token.iter().find(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "the admin token in {} contains byte {b:#04x}; use printable ASCII without spaces",
            path.display()
        ));
    }
    Ok(Some(token.to_vec()))
}

/// Read a regular file of at most `MAX_CONFIG_BYTES`, with an operator-readable reason on
/// failure. The type and size are checked before opening (a FIFO's `open` would block), and
/// again on the opened handle (the path may have been swapped in between).
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let meta = regular_file(path)?;
    let f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => format!("cannot open the file: {e}"),
    })?;
    let opened = f
        .metadata()
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if !opened.is_file() {
        return Err(format!(
            "the file is {}, not a regular file; only regular files are read (it was replaced while being opened)",
            if opened.is_dir() {
                "a directory"
            } else {
                special_kind(opened.file_type())
            }
        ));
    }
    let mut buf = Vec::with_capacity(meta.len().min(opened.len()).min(MAX_CONFIG_BYTES) as usize);
    // Bounded even if the file grows between stat and read.
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if buf.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!(
            "config is larger than the limit of {MAX_CONFIG_BYTES} bytes"
        ));
    }
    Ok(buf)
}

/// The one-line summary `tidegate check` prints for a good file.
pub fn summary(path: &Path, loaded: &Loaded) -> String {
    let c = &loaded.config;
    let plural = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    format!(
        "{}: ok ({}, {}, {}, {})",
        path.display(),
        plural(c.server.listeners.len(), "listener"),
        plural(c.interfaces.len(), "interface"),
        plural(c.upstreams.len(), "upstream"),
        plural(c.routes.len(), "route"),
    )
}
