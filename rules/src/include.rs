//! A config split over files: the main file plus the rules fragments of its `include_dir`,
//! merged into one config and loaded as one snapshot.
//!
//! A fragment holds rules only (interfaces, upstreams, routes, limits, fallbacks, plans,
//! breakers); bootstrap settings and `active_plans` stay in the main file, so flipping the
//! gateway's posture remains a one-file edit. Lists are appended in file order (main first,
//! then fragments by file name); maps must not name the same key twice. Every error is
//! reported in the file and at the place where the offending value was written, not at its
//! position in the merged document.

use std::collections::{BTreeMap, HashMap};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, ConfigErrors, JsonPath, Seg};
use crate::model::{Breaker, Config, Fallback, Interface, Limit, Plan, Route, Upstream};
use crate::snapshot::Snapshot;
use crate::{Loaded, source};

/// One file's name (as errors should show it) and bytes.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The file name.
    pub name: &'a str,
    /// Its content.
    pub bytes: &'a [u8],
}

/// A rules fragment: one `*.json` file of the main config's `include_dir`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fragment {
    /// Interfaces, appended to the main file's.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Upstreams; a name already defined elsewhere is an error.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    /// Route rules, appended.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Limit rules, appended.
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Fallback rules, appended.
    #[serde(default)]
    pub fallbacks: Vec<Fallback>,
    /// Emergency plans; a name already defined elsewhere is an error.
    #[serde(default)]
    pub plans: BTreeMap<String, Plan>,
    /// Circuit breakers, appended.
    #[serde(default)]
    pub breakers: Vec<Breaker>,
}

/// Where each merged element came from: `(file index, index or key in that file)`.
#[derive(Debug, Default)]
struct Provenance {
    lists: HashMap<&'static str, Vec<(usize, usize)>>,
    maps: HashMap<&'static str, HashMap<String, usize>>,
}

/// Load a main file and, when it names an `include_dir`, the fragments `fetch` returns for
/// that directory (`(file name, bytes)` in the order to merge). `fetch` is how the caller's
/// I/O gets in: this crate reads no files. Its error message is reported at `include_dir`.
pub fn load_with(
    main: Source<'_>,
    fetch: impl FnOnce(&str) -> Result<Vec<(String, Vec<u8>)>, String>,
) -> Result<Loaded, ConfigErrors> {
    let config = source::parse(main.name, main.bytes)?;
    let Some(dir) = config.include_dir.clone() else {
        return merge(main, config, &[]);
    };
    let files = fetch(&dir)
        .map_err(|message| located(&main, JsonPath::root().key("include_dir"), message))?;
    let sources: Vec<Source<'_>> = files
        .iter()
        .map(|(name, bytes)| Source { name, bytes })
        .collect();
    merge(main, config, &sources)
}

/// Parse, merge, validate and compile a main file and its fragments (in the order given).
/// With no fragments this is exactly [`crate::load`].
pub fn load_set(main: Source<'_>, fragments: &[Source<'_>]) -> Result<Loaded, ConfigErrors> {
    let config = source::parse(main.name, main.bytes)?;
    merge(main, config, fragments)
}

fn merge(
    main: Source<'_>,
    mut config: Config,
    fragments: &[Source<'_>],
) -> Result<Loaded, ConfigErrors> {
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    for f in fragments {
        match source::parse_as::<Fragment>(f.name, f.bytes, "a rules fragment") {
            Ok(frag) => parsed.push(frag),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }

    let files: Vec<Source<'_>> = std::iter::once(main)
        .chain(fragments.iter().copied())
        .collect();
    let mut prov = Provenance::default();
    macro_rules! list {
        ($key:literal, $field:ident) => {{
            let p = prov.lists.entry($key).or_default();
            p.extend((0..config.$field.len()).map(|i| (0, i)));
            for (fi, frag) in parsed.iter_mut().enumerate() {
                p.extend((0..frag.$field.len()).map(|i| (fi + 1, i)));
                config.$field.append(&mut frag.$field);
            }
        }};
    }
    list!("interfaces", interfaces);
    list!("routes", routes);
    list!("limits", limits);
    list!("fallbacks", fallbacks);
    list!("breakers", breakers);
    macro_rules! map {
        ($key:literal, $field:ident) => {{
            let p = prov.maps.entry($key).or_default();
            p.extend(config.$field.keys().map(|k| (k.clone(), 0)));
            for (fi, frag) in parsed.iter_mut().enumerate() {
                for (k, v) in std::mem::take(&mut frag.$field) {
                    if let Some(&prev) = p.get(&k) {
                        let path = JsonPath::root().key($key).key(k.clone());
                        errors.push(located(
                            &files[fi + 1],
                            path,
                            format!(
                                "{} {k:?} is already defined in {}",
                                &$key[..$key.len() - 1],
                                files[prev].name
                            ),
                        ));
                        continue;
                    }
                    p.insert(k.clone(), fi + 1);
                    config.$field.insert(k, v);
                }
            }
        }};
    }
    map!("upstreams", upstreams);
    map!("plans", plans);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }

    match Snapshot::compile(&config) {
        Ok(snapshot) => Ok(Loaded { config, snapshot }),
        Err(issues) => Err(ConfigErrors(
            issues
                .into_iter()
                .map(|i| {
                    let (file, path) = prov.origin(i.path);
                    located(&files[file], path, i.message)
                })
                .collect(),
        )),
    }
}

fn located(file: &Source<'_>, path: JsonPath, message: String) -> ConfigError {
    let text = std::str::from_utf8(file.bytes).unwrap_or_default();
    let (line, column) = source::locate(text, &path);
    ConfigError {
        file: file.name.to_owned(),
        line,
        column,
        path,
        message,
    }
}

// === impl Provenance ===

impl Provenance {
    /// The file and in-file path of a path into the merged config.
    fn origin(&self, mut path: JsonPath) -> (usize, JsonPath) {
        let (Some(Seg::Key(top)), Some(second)) = (path.0.first(), path.0.get(1)) else {
            return (0, path);
        };
        match second {
            Seg::Index(i) => {
                if let Some(&(file, local)) = self.lists.get(top.as_str()).and_then(|l| l.get(*i)) {
                    path.0[1] = Seg::Index(local);
                    return (file, path);
                }
            }
            Seg::Key(k) => {
                if let Some(&file) = self.maps.get(top.as_str()).and_then(|m| m.get(k)) {
                    return (file, path);
                }
            }
        }
        (0, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: &str = r#"{
  "schema_version": 1,
  "interfaces": [{"name": "grab", "method": "POST", "path": "/envelopes/{id}/grab"}],
  "upstreams": {"v1": {"endpoints": ["127.0.0.1:1"]}},
  "routes": [{"name": "default", "upstream": "v1"}]
}"#;

    /// Fragments add rules; the merged snapshot routes with them.
    #[test]
    fn merges() {
        let frag = r#"{"upstreams": {"v2": {"endpoints": ["127.0.0.1:2"]}},
                       "routes": [{"name": "grab", "match": {"interfaces": ["grab"]}, "upstream": "v2"}]}"#;
        let l = load_set(
            Source {
                name: "main.json",
                bytes: MAIN.as_bytes(),
            },
            &[Source {
                name: "rules.d/10-grab.json",
                bytes: frag.as_bytes(),
            }],
        )
        .unwrap();
        assert_eq!(l.config.routes.len(), 2);
        assert_eq!(l.snapshot.upstreams.len(), 2);
    }

    /// Errors in a fragment name the fragment and the place in it.
    #[test]
    fn errors_point_into_the_fragment() {
        let frag = "{\n  \"routes\": [\n    {\"name\": \"grab\", \"upstream\": \"v9\"}\n  ]\n}";
        let e = load_set(
            Source {
                name: "main.json",
                bytes: MAIN.as_bytes(),
            },
            &[Source {
                name: "rules.d/a.json",
                bytes: frag.as_bytes(),
            }],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rules.d/a.json:3:34 routes[0].upstream: unknown upstream \"v9\""),
            "{e}"
        );
        // Two default routes across files are ambiguous, reported where the second is.
        let frag = "{\"routes\": [{\"name\": \"d2\", \"upstream\": \"v1\"}]}";
        let e = load_set(
            Source {
                name: "main.json",
                bytes: MAIN.as_bytes(),
            },
            &[Source {
                name: "rules.d/b.json",
                bytes: frag.as_bytes(),
            }],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("rules.d/b.json:1:13 routes[0]: rules \"default\" (routes[0]) and \"d2\" (routes[1])"), "{e}");
    }

    /// A duplicate upstream across files, bootstrap settings and unknown fields in a
    /// fragment are refused.
    #[test]
    fn refusals() {
        let dup = r#"{"upstreams": {"v1": {"endpoints": ["127.0.0.1:3"]}}}"#;
        let e = load_set(
            Source {
                name: "m",
                bytes: MAIN.as_bytes(),
            },
            &[Source {
                name: "f",
                bytes: dup.as_bytes(),
            }],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("f:1:22 upstreams.v1: upstream \"v1\" is already defined in m"),
            "{e}"
        );
        let server = r#"{"server": {}}"#;
        let e = load_set(
            Source {
                name: "m",
                bytes: MAIN.as_bytes(),
            },
            &[Source {
                name: "f",
                bytes: server.as_bytes(),
            }],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `server`"), "{e}");
    }
}
