//! Reading a config file from disk: the I/O half of loading that `rules` (pure) cannot do.
//!
//! Refuses directories, unreadable files and files over [`rules::source::MAX_CONFIG_BYTES`]
//! before reading them whole, then runs `rules::load` and adds the checks that need the file
//! system (do the TLS certificate and key load?), located like every other error.

use std::io::Read;
use std::path::Path;

use rules::Loaded;
use rules::error::{ConfigError, ConfigErrors, JsonPath};
use rules::source::MAX_CONFIG_BYTES;
use rules::validate::Issue;

/// Read, parse, validate and compile the config at `path`, and check its TLS files.
pub fn read_config(path: &Path) -> Result<Loaded, ConfigErrors> {
    read_config_hashed(path).map(|(loaded, _)| loaded)
}

/// [`read_config`], also returning the XXH3-64 hash of the file's bytes (the content
/// version shown on the admin port; equal hashes mean a reload has nothing to do).
pub fn read_config_hashed(path: &Path) -> Result<(Loaded, u64), ConfigErrors> {
    let name = path.display().to_string();
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
    let loaded = rules::include::load_with(
        rules::include::Source {
            name: &name,
            bytes: &bytes,
        },
        |dir| {
            let files = read_include_dir(&base.join(dir))?;
            for (n, b) in &files {
                hasher.update(n.as_bytes());
                hasher.update(&[0]);
                hasher.update(b);
            }
            Ok(files)
        },
    )?;
    let hash = hasher.digest();
    let mut issues = Vec::new();
    for (i, l) in loaded.config.server.listeners.iter().enumerate() {
        if let Some(tls) = &l.tls {
            if let Err(e) = crate::serve::tls::server_config(&tls.cert_path, &tls.key_path) {
                let field = match e {
                    crate::serve::tls::TlsError::Key { .. } => "key_path",
                    _ => "cert_path",
                };
                issues.push(Issue {
                    path: JsonPath::root()
                        .key("server")
                        .key("listeners")
                        .index(i)
                        .key("tls")
                        .key(field),
                    message: e.to_string(),
                });
            }
        }
    }
    if !issues.is_empty() {
        let text = String::from_utf8_lossy(&bytes);
        return Err(rules::locate_all(&name, &text, issues));
    }
    Ok((loaded, hash))
}

/// The rules fragments of an include directory: every `*.json` file not starting with `.`
/// (editors' swap and temp files are skipped), in file-name order, as `(path, bytes)`.
fn read_include_dir(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
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

/// Read a file of at most `MAX_CONFIG_BYTES`, with an operator-readable reason on failure.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => match std::fs::symlink_metadata(path) {
            Ok(_) => "the file is a dangling symbolic link".to_owned(),
            Err(_) => "the file does not exist".to_owned(),
        },
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => format!("cannot read the file: {e}"),
    })?;
    if meta.is_dir() {
        return Err("the path is a directory, not a config file".into());
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "config is {} bytes, more than the limit of {MAX_CONFIG_BYTES}",
            meta.len()
        ));
    }
    let f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => format!("cannot open the file: {e}"),
    })?;
    let mut buf = Vec::with_capacity(meta.len() as usize);
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
