//! The module layout of the gateway (`proxy/src`) and the rules engine (`rules/src`): no
//! import circles between their modules. Reads the sources only; starts nothing.
//!
//! Dependencies point one way (the layout maps in `proxy/src/lib.rs` and `rules/src/lib.rs`
//! draw them); a change that makes two modules import each other, however indirectly, fails
//! here with the circle and the names that tie it.

use std::path::Path;

use tidegate_tests::layout::{Graph, Source, graph, read_sources};

fn crate_graph(dir: &str) -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let sources = read_sources(&src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    assert!(
        sources.len() > 3,
        "{}: only {} files",
        src.display(),
        sources.len()
    );
    graph(&sources)
}

/// No module of the gateway or the rules engine imports, through others, itself.
#[test]
fn no_import_circles_in_proxy_and_rules() {
    let mut failures = String::new();
    for dir in ["proxy/src", "rules/src"] {
        let g = crate_graph(dir);
        let report = g.report();
        if !report.is_empty() {
            failures += &format!(
                "\n{dir} ({} modules) has import circles:\n{report}",
                g.modules.len()
            );
        }
    }
    assert!(
        failures.is_empty(),
        "modules import each other in circles:{failures}"
    );
}

// === the checker itself, on small in-memory crates ===

fn check(files: &[(&str, &str)]) -> Graph {
    let sources: Vec<Source> = files.iter().map(|(p, t)| Source::new(p, t)).collect();
    graph(&sources)
}

fn edges(g: &Graph) -> Vec<(String, String)> {
    g.edges
        .iter()
        .flat_map(|(from, to)| to.keys().map(move |t| (from.clone(), t.clone())))
        .collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

#[test]
fn a_circle_is_found_and_reported_with_its_names() {
    let g = check(&[
        ("lib.rs", "mod a; mod b; mod c;"),
        ("a.rs", "use crate::b::Thing;\nfn f() {}"),
        ("b.rs", "fn g() { crate::c::run(); }"),
        ("c.rs", "pub fn run() -> crate::a::Out { todo!() }"),
    ]);
    assert_eq!(g.circles(), [["a", "b", "c"]]);
    let report = g.report();
    for want in [
        "circle 1 of 1: 3 modules: a, b, c",
        "a -> b: crate::b::Thing (a.rs:1)",
        "b -> c: crate::c::run (b.rs:1)",
        "c -> a: crate::a::Out (c.rs:1)",
    ] {
        assert!(report.contains(want), "{want:?} in\n{report}");
    }
}

#[test]
fn a_one_way_chain_passes() {
    let g = check(&[
        ("lib.rs", "mod a; mod b; mod c;"),
        ("a.rs", "use crate::b::X;"),
        ("b.rs", "use crate::c::Y;"),
        ("c.rs", "pub struct Y;"),
    ]);
    assert_eq!(edges(&g), [pair("a", "b"), pair("b", "c")]);
    assert!(g.circles().is_empty());
    assert_eq!(g.report(), "");
}

#[test]
fn super_is_resolved_from_the_file() {
    let g = check(&[
        ("lib.rs", "mod a;"),
        ("a/mod.rs", "mod b; mod c;"),
        ("a/b.rs", "use super::c::Z;\nuse super::super::d::W;"),
        ("a/c.rs", "fn f() { let _ = crate::a::b::make(); }"),
        ("d.rs", ""),
    ]);
    assert_eq!(
        edges(&g),
        [
            pair("a", "d"),
            pair("a::b", "a::c"),
            pair("a::b", "d"),
            pair("a::c", "a::b")
        ]
    );
    assert_eq!(g.circles(), [["a::b", "a::c"]]);
}

#[test]
fn a_childs_imports_are_its_parents() {
    let g = check(&[
        ("lib.rs", "mod m; mod v;"),
        ("m.rs", "use crate::v::spec;"),
        ("v.rs", "mod g;\npub use g::X;\npub struct Validator;"),
        ("v/g.rs", "use super::Validator;\nuse crate::m::Thing;"),
    ]);
    assert_eq!(
        edges(&g),
        [pair("m", "v"), pair("v", "m"), pair("v::g", "m")]
    );
    assert_eq!(g.circles(), [["m", "v"]]);
    let report = g.report();
    assert!(
        report.contains("v -> m: crate::m::Thing (v/g.rs:2)"),
        "{report}"
    );
}

#[test]
fn groups_are_parsed() {
    let g = check(&[
        ("lib.rs", "mod a; mod b; mod c;"),
        (
            "a.rs",
            "use crate::{\n    b,\n    c::{self, e::{F, G as H}},\n};",
        ),
        ("b.rs", ""),
        ("c.rs", "mod e;"),
        ("c/e.rs", "use super::super::{a::X, b};"),
    ]);
    assert_eq!(
        edges(&g),
        [
            pair("a", "b"),
            pair("a", "c"),
            pair("a", "c::e"),
            pair("c", "a"),
            pair("c", "b"),
            pair("c::e", "a"),
            pair("c::e", "b"),
        ]
    );
    assert_eq!(g.circles(), [["a", "c", "c::e"]]);
}

#[test]
fn paths_resolve_to_the_longest_module_prefix() {
    let g = check(&[
        ("lib.rs", "pub struct Root;"),
        (
            "a.rs",
            "use crate::b::c::Item; use crate::Root; use crate::b::c::d::e;",
        ),
        ("b/mod.rs", ""),
        ("b/c.rs", ""),
    ]);
    // `crate::Root` is the root, an ancestor of every module: no edge.
    assert_eq!(edges(&g), [pair("a", "b::c")]);
    assert_eq!(g.edges["a"]["b::c"].len(), 2);
}

#[test]
fn comments_strings_and_tests_are_not_imports() {
    let g = check(&[
        ("lib.rs", "mod a; mod b;"),
        (
            "a.rs",
            "//! See crate::b::X.\n/// Like crate::b::Y.\n// crate::b::Z\n/* crate::b::W */\n\
             const S: &str = \"crate::b::V\"; const R: &str = r#\"crate::b::U\"#;\n\
             fn f<'a>(x: &'a u8) -> char { 'c' }\n\
             #[cfg(test)]\nmod tests;\n\
             #[cfg(test)]\n#[allow(unused)]\nmod inline { use crate::b::T; }",
        ),
        ("a/tests.rs", "use crate::b::Helper;"),
        ("b.rs", "use crate::a::A;"),
    ]);
    assert!(!g.modules.contains("a::tests"), "{:?}", g.modules);
    assert_eq!(edges(&g), [pair("b", "a")]);
    assert!(g.circles().is_empty());
}

#[test]
fn parents_and_children_are_not_imports() {
    let g = check(&[
        ("lib.rs", "mod a; fn f() { crate::a::go(); }"),
        ("a.rs", "mod b; use crate::a::b::Inner; pub fn go() {}"),
        ("a/b.rs", "use super::go; use crate::Root;"),
    ]);
    assert_eq!(edges(&g), Vec::<(String, String)>::new());
    assert_eq!(g.modules.len(), 3);
}
