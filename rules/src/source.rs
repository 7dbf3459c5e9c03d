//! From bytes to a typed [`Config`]: the checks a hand-edited file needs before serde, and
//! positions for errors found after it.
//!
//! serde_json reports the first syntax or type error with its line and column, and
//! `serde_path_to_error` adds the JSON path. Two things serde cannot do are done here over the
//! raw text: refusing duplicate keys anywhere (a derived struct refuses them, but a map field
//! silently keeps the last value, so `"rps": 10, "rps": 1000` would pass), and finding the
//! position of a path named by a later validation error.

use crate::error::{ConfigError, JsonPath, Seg, did_you_mean};
use crate::model::Config;

/// Largest config file accepted, in bytes. Callers reading from disk should refuse larger
/// files before reading them whole.
pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// Parse a config file's bytes. `file` is only used to name the file in errors.
///
/// This is syntax and types only; `rules::load` also validates.
pub fn parse(file: &str, bytes: &[u8]) -> Result<Config, ConfigError> {
    parse_as(file, bytes, "struct Config")
}

/// [`parse`] for any document type (a config, or a rules fragment of an included
/// directory). `what` names the type in the message for a top-level array.
pub fn parse_as<T: serde::de::DeserializeOwned>(
    file: &str,
    bytes: &[u8],
    what: &str,
) -> Result<T, ConfigError> {
    let whole = |message: String| ConfigError {
        file: file.to_owned(),
        line: 0,
        column: 0,
        path: JsonPath::root(),
        message,
    };
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(whole(format!(
            "config is {} bytes, more than the limit of {MAX_CONFIG_BYTES}",
            bytes.len()
        )));
    }
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err(ConfigError {
            line: 1,
            column: 1,
            ..whole("file starts with a UTF-8 byte order mark; save it as UTF-8 without BOM".into())
        });
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let (line, column) = line_col(bytes, e.valid_up_to());
            return Err(ConfigError {
                line,
                column,
                ..whole("file is not valid UTF-8".into())
            });
        }
    };
    let body = text.trim_start();
    if body.is_empty() {
        return Err(whole("empty config (the file has no content)".into()));
    }
    // serde would also build a struct from an array of its fields in order; a config is an
    // object. (Other non-objects, and non-JSON, get serde_json's own error below.)
    if body.starts_with('[') {
        let (line, column) = line_col(bytes, text.len() - body.len());
        return Err(ConfigError {
            line,
            column,
            ..whole(format!(
                "invalid type: array, expected {what} (a JSON object)"
            ))
        });
    }

    let de = &mut serde_json::Deserializer::from_str(text);
    let config: T = match serde_path_to_error::deserialize(de) {
        Ok(c) => c,
        Err(e) => {
            let path = convert_path(e.path());
            let inner = e.into_inner();
            let mut message = strip_position(&inner.to_string());
            if let Some(hint) = unknown_hint(&message) {
                message.push_str(&hint);
            }
            let (line, column) = (inner.line(), inner.column());
            return Err(ConfigError {
                file: file.to_owned(),
                line,
                column,
                path,
                message,
            });
        }
    };

    // The typed parse succeeded, so the text is well-formed JSON from here on.
    if let Some((path, key, offset)) = find_duplicate_key(text) {
        let (line, column) = line_col(text.as_bytes(), offset);
        return Err(ConfigError {
            file: file.to_owned(),
            line,
            column,
            path,
            message: format!("duplicate key `{key}`"),
        });
    }
    Ok(config)
}

/// The 1-based line and column of the value at `path` in `text`, or of the deepest part of
/// the path that exists (a missing field is reported at its parent object).
pub fn locate(text: &str, path: &JsonPath) -> (usize, usize) {
    let mut sc = Scanner::new(text.as_bytes());
    sc.ws();
    let mut at = sc.pos;
    for seg in &path.0 {
        match (seg, sc.peek()) {
            (Seg::Key(want), Some(b'{')) => {
                sc.pos += 1;
                let mut found = false;
                loop {
                    sc.ws();
                    if sc.peek() != Some(b'"') {
                        break;
                    }
                    let key = sc.string();
                    sc.ws();
                    sc.pos += 1; // ':'
                    sc.ws();
                    if key == want.as_bytes() {
                        found = true;
                        break;
                    }
                    sc.value();
                    sc.ws();
                    if sc.peek() == Some(b',') {
                        sc.pos += 1;
                    }
                }
                if !found {
                    break;
                }
            }
            (Seg::Index(want), Some(b'[')) => {
                sc.pos += 1;
                let mut i = 0;
                let mut found = false;
                loop {
                    sc.ws();
                    if matches!(sc.peek(), Some(b']') | None) {
                        break;
                    }
                    if i == *want {
                        found = true;
                        break;
                    }
                    sc.value();
                    sc.ws();
                    if sc.peek() == Some(b',') {
                        sc.pos += 1;
                    }
                    i += 1;
                }
                if !found {
                    break;
                }
            }
            _ => break,
        }
        at = sc.pos;
    }
    line_col(text.as_bytes(), at)
}

/// 1-based line and byte column of `offset`.
fn line_col(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

fn convert_path(p: &serde_path_to_error::Path) -> JsonPath {
    use serde_path_to_error::Segment;
    JsonPath(
        p.iter()
            .filter_map(|s| match s {
                Segment::Seq { index } => Some(Seg::Index(*index)),
                Segment::Map { key } => Some(Seg::Key(key.clone())),
                Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
                Segment::Unknown => None,
            })
            .collect(),
    )
}

/// serde_json's messages end in " at line L column C"; we print the position ourselves.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// For "unknown field `x`, expected one of `a`, `b`" (and the same for variants), a
/// "did you mean" suffix when one of the expected names is close.
fn unknown_hint(msg: &str) -> Option<String> {
    let rest = msg
        .strip_prefix("unknown field `")
        .or_else(|| msg.strip_prefix("unknown variant `"))?;
    let (word, expected) = rest.split_once('`')?;
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    did_you_mean(word, names).map(|m| format!("; did you mean `{m}`?"))
}

/// The first key that appears twice in one object: its path, name and byte offset.
fn find_duplicate_key(text: &str) -> Option<(JsonPath, String, usize)> {
    let mut sc = Scanner::new(text.as_bytes());
    let mut path = Vec::new();
    sc.ws();
    dup_in_value(&mut sc, &mut path)
}

fn dup_in_value(sc: &mut Scanner<'_>, path: &mut Vec<Seg>) -> Option<(JsonPath, String, usize)> {
    match sc.peek() {
        Some(b'{') => {
            sc.pos += 1;
            let mut seen = std::collections::HashSet::new();
            loop {
                sc.ws();
                if sc.peek() != Some(b'"') {
                    sc.pos += 1; // '}'
                    return None;
                }
                let start = sc.pos;
                let key = sc.string();
                let key_str = String::from_utf8_lossy(key).into_owned();
                if !seen.insert(key) {
                    return Some((JsonPath(path.clone()), key_str, start));
                }
                sc.ws();
                sc.pos += 1; // ':'
                sc.ws();
                path.push(Seg::Key(key_str));
                if let Some(found) = dup_in_value(sc, path) {
                    return Some(found);
                }
                path.pop();
                sc.ws();
                if sc.peek() == Some(b',') {
                    sc.pos += 1;
                }
            }
        }
        Some(b'[') => {
            sc.pos += 1;
            let mut i = 0;
            loop {
                sc.ws();
                if matches!(sc.peek(), Some(b']') | None) {
                    sc.pos += 1;
                    return None;
                }
                path.push(Seg::Index(i));
                if let Some(found) = dup_in_value(sc, path) {
                    return Some(found);
                }
                path.pop();
                sc.ws();
                if sc.peek() == Some(b',') {
                    sc.pos += 1;
                }
                i += 1;
            }
        }
        _ => {
            sc.value();
            None
        }
    }
}

/// A forgiving cursor over JSON text already known to be well-formed.
struct Scanner<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Consume a string starting at `"`, returning its raw (still escaped) contents.
    fn string(&mut self) -> &'a [u8] {
        self.pos += 1;
        let start = self.pos;
        while let Some(c) = self.peek() {
            match c {
                b'\\' => self.pos += 2,
                b'"' => break,
                _ => self.pos += 1,
            }
        }
        let s = &self.b[start..self.pos.min(self.b.len())];
        self.pos += 1;
        s
    }

    /// Skip one value of any kind.
    fn value(&mut self) {
        match self.peek() {
            Some(b'"') => {
                self.string();
            }
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                while let Some(c) = self.peek() {
                    match c {
                        b'"' => {
                            self.string();
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos += 1;
                                return;
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            _ => {
                while let Some(c) = self.peek() {
                    if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.pos += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
