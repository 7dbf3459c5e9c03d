//! Import circles between the modules of a crate, found from its source text alone (std
//! only, no parsing crate).
//!
//! A node per file: `lib.rs` is the root, `a.rs` or `a/mod.rs` is `a`, `a/b.rs` is `a::b`.
//! A module declared `#[cfg(test)] mod x;` (and all below it) is test code and left out, as
//! is the body of an inline `#[cfg(test)] mod x { … }`; `main.rs` is a crate of its own and
//! left out too. An edge goes from a file to the module named by every `crate::…` path and
//! every `super::…` path (resolved from the file's module) in `use` lines and inline paths,
//! `use crate::{a, b::{c, d}}` groups included, each path resolved to its longest prefix
//! that is a module. Comments (`//`, `//!`, `///`, `/* */`), strings and chars are skipped.
//! A path from a module to one of its own ancestors or descendants is not an edge: a parent
//! declaring `mod x;` and a child using its parent's items are one unit, not an import. A
//! parent is made of its children, so what a child imports from outside the parent, the
//! parent imports too (`validate/govern.rs` using `crate::degrade` is an edge from
//! `validate::govern` and from `validate` to `degrade`); the child stays a node of its own,
//! so circles between siblings are still found.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// The root module's name in reports.
pub const ROOT: &str = "crate";

/// One source file: its path below `src/` (with `/` separators) and its text.
#[derive(Debug, Clone)]
pub struct Source {
    /// `a/b.rs`.
    pub path: String,
    /// The file's text.
    pub text: String,
}

impl Source {
    /// A file at `path` (below `src/`) with `text`.
    pub fn new(path: &str, text: &str) -> Self {
        Self {
            path: path.to_owned(),
            text: text.to_owned(),
        }
    }
}

/// Every `.rs` file below `src`, sorted by path.
pub fn read_sources(src: &Path) -> std::io::Result<Vec<Source>> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<Source>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, base, out)?;
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(base).expect("below base");
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(Source {
                    path: rel.join("/"),
                    text: std::fs::read_to_string(&path)?,
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(src, src, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Where a path that ties two modules was written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Use {
    /// The path, resolved to start at `crate::`.
    pub name: String,
    /// The file, below `src/`.
    pub file: String,
    /// Its line.
    pub line: usize,
}

/// The modules of a crate and the imports between them.
#[derive(Debug, Default)]
pub struct Graph {
    /// Every module (`crate` for the root).
    pub modules: BTreeSet<String>,
    /// `from → to → the paths that make the edge`.
    pub edges: BTreeMap<String, BTreeMap<String, Vec<Use>>>,
}

/// The module a file is, as segments below the root; `None` for `main.rs` (a crate of its
/// own).
fn module_of(path: &str) -> Option<Vec<String>> {
    let stem = path.strip_suffix(".rs")?;
    if stem == "main" || stem.starts_with("bin/") {
        return None;
    }
    let mut segs: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if segs.last().is_some_and(|s| s == "mod") || stem == "lib" {
        segs.pop();
    }
    Some(segs)
}

fn name(segs: &[String]) -> String {
    if segs.is_empty() {
        ROOT.to_owned()
    } else {
        segs.join("::")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

/// The tokens of `text` that matter here, each with its line: identifiers, `::` and single
/// punctuation. Comments, string, byte-string, raw-string and char literals and lifetimes are
/// dropped.
fn tokens(text: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    // Skip to the end of a "…" literal starting at `i` (on the quote); counts lines.
    let skip_string = |i: &mut usize, line: &mut usize| {
        *i += 1;
        while *i < c.len() && c[*i] != '"' {
            if c[*i] == '\\' {
                *i += 1;
            }
            if c.get(*i) == Some(&'\n') {
                *line += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            skip_string(&mut i, &mut line);
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            }
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            // Raw strings r"…", r#"…"#, and byte strings b"…", br#"…"#.
            let raw = matches!(word.as_str(), "r" | "br") && matches!(c.get(i), Some('"' | '#'));
            if raw {
                let mut hashes = 0;
                while c.get(i) == Some(&'#') {
                    hashes += 1;
                    i += 1;
                }
                i += 1; // the opening quote
                loop {
                    if i >= c.len() {
                        break;
                    }
                    if c[i] == '\n' {
                        line += 1;
                    }
                    if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                        i += 1 + hashes;
                        break;
                    }
                    i += 1;
                }
            } else if word == "b" && c.get(i) == Some(&'"') {
                skip_string(&mut i, &mut line);
            } else if word == "b" && c.get(i) == Some(&'\'') {
                i += 1;
                if c.get(i) == Some(&'\\') {
                    i += 1;
                }
                i += 1;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else {
                out.push((Tok::Ident(word), line));
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
        } else if ch == ':' && next == Some(':') {
            out.push((Tok::Sep, line));
            i += 2;
        } else if ch.is_whitespace() {
            i += 1;
        } else {
            out.push((Tok::Punct(ch), line));
            i += 1;
        }
    }
    out
}

fn is_ident(t: Option<&(Tok, usize)>, word: &str) -> bool {
    matches!(t, Some((Tok::Ident(w), _)) if w == word)
}

fn is_punct(t: Option<&(Tok, usize)>, p: char) -> bool {
    matches!(t, Some((Tok::Punct(q), _)) if *q == p)
}

/// The index of the bracket closing the `open` at `i` (the end when there is none).
fn closing(toks: &[(Tok, usize)], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    while i < toks.len() {
        if is_punct(toks.get(i), open) {
            depth += 1;
        } else if is_punct(toks.get(i), close) {
            depth -= 1;
            if depth == 0 {
                break;
            }
        }
        i += 1;
    }
    i
}

/// What one file says: the paths it names (absolute, as segments below the root, with
/// their lines) and the child modules it declares `#[cfg(test)] mod x;`.
#[derive(Debug, Default)]
struct FileUses {
    paths: Vec<(Vec<String>, usize)>,
    test_children: Vec<String>,
}

fn scan(module: &[String], text: &str) -> FileUses {
    let toks = tokens(text);
    let mut out = FileUses::default();
    let mut cfg_test = false;
    let mut i = 0;
    while i < toks.len() {
        // Attributes: note `#[cfg(test)]`, skip the rest.
        if is_punct(toks.get(i), '#') {
            let mut j = i + 1;
            if is_punct(toks.get(j), '!') {
                j += 1;
            }
            if is_punct(toks.get(j), '[') {
                let start = j;
                j = closing(&toks, j, '[', ']');
                let body: Vec<&Tok> = toks[start + 1..j].iter().map(|(t, _)| t).collect();
                if matches!(body.as_slice(),
                    [Tok::Ident(c), Tok::Punct('('), Tok::Ident(t), Tok::Punct(')')]
                        if c == "cfg" && t == "test")
                {
                    cfg_test = true;
                }
                i = j + 1;
                continue;
            }
        }
        if cfg_test {
            let mut j = i;
            if is_ident(toks.get(j), "pub") {
                j += 1;
                if is_punct(toks.get(j), '(') {
                    while j < toks.len() && !is_punct(toks.get(j), ')') {
                        j += 1;
                    }
                    j += 1;
                }
            }
            if is_ident(toks.get(j), "mod")
                && let Some((Tok::Ident(child), _)) = toks.get(j + 1)
            {
                if is_punct(toks.get(j + 2), ';') {
                    out.test_children.push(child.clone());
                    i = j + 3;
                    cfg_test = false;
                    continue;
                }
                if is_punct(toks.get(j + 2), '{') {
                    // Skip the inline test module's body.
                    i = closing(&toks, j + 2, '{', '}') + 1;
                    cfg_test = false;
                    continue;
                }
            }
            cfg_test = false;
        }
        let start_of_path = i == 0 || toks[i - 1].0 != Tok::Sep;
        let head = match toks.get(i) {
            Some((Tok::Ident(w), _)) if (w == "crate" || w == "super") && start_of_path => w,
            _ => {
                i += 1;
                continue;
            }
        };
        if !matches!(toks.get(i + 1), Some((Tok::Sep, _))) {
            i += 1;
            continue;
        }
        let line = toks[i].1;
        let mut base: Vec<String> = if head == "crate" {
            Vec::new()
        } else {
            module.to_vec()
        };
        if head == "super" {
            base.pop();
        }
        let mut found = Vec::new();
        i = path_tree(&toks, i + 2, base, &mut found);
        out.paths.extend(found.into_iter().map(|p| (p, line)));
    }
    out
}

/// Parse a use-tree (`a::b`, `a::{b, c::d}`, `super::x`, `*`, `self`) at `i` below
/// `prefix`; pushes every full path named and returns where it ended.
fn path_tree(
    toks: &[(Tok, usize)],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        match toks.get(i) {
            Some((Tok::Punct('{'), _)) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        None => return i,
                        Some((Tok::Punct('}'), _)) => return i + 1,
                        Some((Tok::Punct(','), _)) => i += 1,
                        Some(_) => {
                            let before = i;
                            i = path_tree(toks, i, prefix.clone(), out);
                            // Skip `as alias` and anything else up to `,` or `}`.
                            while i < toks.len()
                                && !is_punct(toks.get(i), ',')
                                && !is_punct(toks.get(i), '}')
                            {
                                i += 1;
                            }
                            if i == before {
                                i += 1;
                            }
                        }
                    }
                }
            }
            Some((Tok::Ident(w), _)) => {
                match w.as_str() {
                    "self" => {}
                    "super" => {
                        prefix.pop();
                    }
                    _ => prefix.push(w.clone()),
                }
                i += 1;
                if matches!(toks.get(i), Some((Tok::Sep, _))) {
                    i += 1;
                } else {
                    out.push(prefix);
                    return i;
                }
            }
            _ => {
                out.push(prefix);
                return i;
            }
        }
    }
}

/// Build the module graph of one crate's sources.
pub fn graph(sources: &[Source]) -> Graph {
    let mut modules: BTreeMap<Vec<String>, &Source> = BTreeMap::new();
    for s in sources {
        if let Some(m) = module_of(&s.path) {
            modules.insert(m, s);
        }
    }
    let scans: BTreeMap<&Vec<String>, FileUses> =
        modules.iter().map(|(m, s)| (m, scan(m, &s.text))).collect();
    let mut test_mods: BTreeSet<Vec<String>> = BTreeSet::new();
    for (m, uses) in &scans {
        for child in &uses.test_children {
            let mut t = (*m).clone();
            t.push(child.clone());
            test_mods.insert(t);
        }
    }
    let is_test = |m: &[String]| test_mods.iter().any(|t| m.starts_with(t));
    let mut g = Graph::default();
    for m in modules.keys().filter(|m| !is_test(m)) {
        g.modules.insert(name(m));
    }
    for (file_module, uses) in &scans {
        if is_test(file_module) {
            continue;
        }
        let file = &modules[*file_module].path;
        for (path, line) in &uses.paths {
            // The longest prefix of the path that is a module (the root at least).
            let to = (0..=path.len())
                .rev()
                .map(|n| &path[..n])
                .find(|p| modules.contains_key(*p))
                .unwrap_or_default();
            if is_test(to) {
                continue;
            }
            // The file's module and each of its ancestors imports what the file imports,
            // except their own ancestors and descendants.
            for n in 0..=file_module.len() {
                let from = &file_module[..n];
                if from.starts_with(to) || to.starts_with(from) {
                    continue;
                }
                g.edges
                    .entry(name(from))
                    .or_default()
                    .entry(name(to))
                    .or_default()
                    .push(Use {
                        name: format!("{ROOT}::{}", path.join("::")),
                        file: file.clone(),
                        line: *line,
                    });
            }
        }
    }
    g
}

impl Graph {
    /// Every import circle: the strongly connected components of more than one module
    /// (Tarjan), each sorted, in order of their first module.
    pub fn circles(&self) -> Vec<Vec<String>> {
        struct Tarjan<'a> {
            g: &'a Graph,
            index: BTreeMap<&'a str, usize>,
            low: BTreeMap<&'a str, usize>,
            stack: Vec<&'a str>,
            on_stack: BTreeSet<&'a str>,
            out: Vec<Vec<String>>,
        }
        impl<'a> Tarjan<'a> {
            fn visit(&mut self, v: &'a str) {
                let n = self.index.len();
                self.index.insert(v, n);
                self.low.insert(v, n);
                self.stack.push(v);
                self.on_stack.insert(v);
                for w in self.g.edges.get(v).into_iter().flat_map(BTreeMap::keys) {
                    let w = w.as_str();
                    if !self.index.contains_key(w) {
                        self.visit(w);
                        let lw = self.low[w];
                        let lv = self.low.get_mut(v).expect("visited");
                        *lv = (*lv).min(lw);
                    } else if self.on_stack.contains(w) {
                        let iw = self.index[w];
                        let lv = self.low.get_mut(v).expect("visited");
                        *lv = (*lv).min(iw);
                    }
                }
                if self.low[v] == self.index[v] {
                    let mut scc = Vec::new();
                    while let Some(w) = self.stack.pop() {
                        self.on_stack.remove(w);
                        scc.push(w.to_owned());
                        if w == v {
                            break;
                        }
                    }
                    if scc.len() > 1 {
                        scc.sort();
                        self.out.push(scc);
                    }
                }
            }
        }
        let mut t = Tarjan {
            g: self,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            out: Vec::new(),
        };
        for v in &self.modules {
            if !t.index.contains_key(v.as_str()) {
                t.visit(v);
            }
        }
        t.out.sort();
        t.out
    }

    /// The circles, readably: each with its modules, then every edge between them with the
    /// names that make it and where they are written. Empty when there are none.
    pub fn report(&self) -> String {
        const NAMES: usize = 6;
        let circles = self.circles();
        let mut s = String::new();
        for (k, circle) in circles.iter().enumerate() {
            let _ = writeln!(
                s,
                "circle {} of {}: {} modules: {}",
                k + 1,
                circles.len(),
                circle.len(),
                circle.join(", ")
            );
            for from in circle {
                for (to, uses) in self.edges.get(from).into_iter().flatten() {
                    if !circle.contains(to) {
                        continue;
                    }
                    // Each name once, where it is first written.
                    let mut names: BTreeMap<&str, &Use> = BTreeMap::new();
                    for u in uses {
                        names.entry(&u.name).or_insert(u);
                    }
                    let shown: Vec<String> = names
                        .values()
                        .take(NAMES)
                        .map(|u| format!("{} ({}:{})", u.name, u.file, u.line))
                        .collect();
                    let more = names.len().saturating_sub(NAMES);
                    let _ = writeln!(
                        s,
                        "  {from} -> {to}: {}{}",
                        shown.join(", "),
                        if more > 0 {
                            format!(", and {more} more")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        s
    }
}
