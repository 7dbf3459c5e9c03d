//! Config errors that name their place: file, line, column and JSON path.
//!
//! Operators fix configs under pressure; an error they cannot find is worse than none. Every
//! error therefore carries the position of the offending value (1-based line and byte
//! column, as serde_json counts them) and the path to it (`upstreams.grab.endpoints[0]`).

use std::fmt;

/// One segment of a [`JsonPath`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    /// An object member.
    Key(String),
    /// An array element.
    Index(usize),
}

/// A path into the config document, shown as `routes[3].match.apps[0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct JsonPath(pub Vec<Seg>);

/// A problem with a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name as given by the caller.
    pub file: String,
    /// 1-based line of the offending value (0 when the file could not be read at all).
    pub line: usize,
    /// 1-based byte column of the offending value.
    pub column: usize,
    /// Where in the document; empty for whole-file problems.
    pub path: JsonPath,
    /// What is wrong, in lowercase, without a trailing period.
    pub message: String,
}

/// A located list of errors, as `check` prints it: one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

// === impl JsonPath ===

impl JsonPath {
    /// The empty (root) path.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path with an object member appended.
    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(key.into()));
        Self(v)
    }

    /// This path with an array index appended.
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }

    /// Whether this is the document root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k) if is_plain_key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                // Keys a reader could misparse (dots, brackets, spaces) are quoted.
                Seg::Key(k) => write!(f, "[{k:?}]")?,
            }
        }
        Ok(())
    }
}

fn is_plain_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b':')
}

// === impl ConfigError ===

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if self.path.is_root() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, " {}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// === impl ConfigErrors ===

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&lower, &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths print the way operators write them; odd keys are quoted.
    #[test]
    fn path_display() {
        let p = JsonPath::root()
            .key("upstreams")
            .key("grab")
            .key("endpoints")
            .index(0);
        assert_eq!(p.to_string(), "upstreams.grab.endpoints[0]");
        let q = JsonPath::root().key("upstreams").key("a.b");
        assert_eq!(q.to_string(), "upstreams[\"a.b\"]");
    }

    /// A one-letter typo is suggested; an unrelated word is not.
    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("rate_limt", ["routes", "rate_limit"]),
            Some("rate_limit")
        );
        assert_eq!(
            did_you_mean("Routes", ["routes", "upstreams"]),
            Some("routes")
        );
        assert_eq!(did_you_mean("zzzz", ["routes", "upstreams"]), None);
    }
}
