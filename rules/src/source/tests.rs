use super::*;

const GOOD: &str = r#"{
  "schema_version": 1,
  "upstreams": { "grab": { "endpoints": ["127.0.0.1:9000"] } },
  "routes": [ { "name": "default", "upstream": "grab" } ]
}"#;

fn err(text: &[u8]) -> ConfigError {
    parse("t.json", text).expect_err("should be rejected")
}

/// A minimal valid file parses.
#[test]
fn minimal_parses() {
    let c = parse("t.json", GOOD.as_bytes()).unwrap();
    assert_eq!(c.routes.len(), 1);
}

/// An empty or blank file is "empty config", not a serde EOF message.
#[test]
fn empty_and_blank() {
    assert!(err(b"").message.contains("empty config"));
    assert!(err(b"  \n\t ").message.contains("empty config"));
}

/// Truncated JSON reports EOF with the position.
#[test]
fn truncated() {
    let e = err(&GOOD.as_bytes()[..GOOD.len() / 2]);
    assert!(e.message.contains("EOF"), "{e}");
    assert!(e.line >= 2, "{e}");
}

/// A BOM and invalid UTF-8 are refused with a clear reason and no panic.
#[test]
fn encoding() {
    let mut b = b"\xEF\xBB\xBF".to_vec();
    b.extend_from_slice(GOOD.as_bytes());
    assert!(err(&b).message.contains("byte order mark"));
    let e = err(b"{\"schema_version\": 1, \"x\": \"\xff\"}");
    assert!(e.message.contains("UTF-8"));
    assert_eq!((e.line, e.column), (1, 29));
}

/// A typo in a field is refused with a suggestion and the path of the object holding it.
#[test]
fn unknown_field_suggests() {
    let text = GOOD.replace("\"endpoints\"", "\"endpoint\"");
    let e = err(text.as_bytes());
    assert!(e.message.contains("unknown field `endpoint`"), "{e}");
    assert!(e.message.contains("did you mean `endpoints`?"), "{e}");
    assert_eq!(e.path.to_string(), "upstreams.grab.endpoint");
    assert_eq!(e.line, 3);
}

/// Duplicate keys are refused both in derived structs and in map fields (where serde
/// alone would keep the last value).
#[test]
fn duplicate_keys() {
    let text = GOOD.replace(
        "\"grab\": { \"endpoints\": [\"127.0.0.1:9000\"] }",
        "\"grab\": { \"endpoints\": [\"127.0.0.1:9000\"] }, \"grab\": { \"endpoints\": [\"127.0.0.1:9001\"] }",
    );
    let e = err(text.as_bytes());
    assert!(e.message.contains("duplicate key `grab`"), "{e}");
    assert_eq!(e.path.to_string(), "upstreams");
    let text = GOOD.replace(
        "\"schema_version\": 1,",
        "\"schema_version\": 1, \"schema_version\": 1,",
    );
    assert!(err(text.as_bytes()).message.contains("duplicate field"));
}

/// Floats, exponents, negatives and overflow where an integer is expected are refused.
#[test]
fn numbers() {
    for bad in ["100.5", "1e3", "-1", "4294967296", "1e400"] {
        let text = GOOD.replace(
            "\"schema_version\": 1",
            &format!("\"schema_version\": {bad}"),
        );
        let e = err(text.as_bytes());
        assert_eq!(e.path.to_string(), "schema_version", "{bad}: {e}");
    }
}

/// Whole-document shape errors name the expected type.
#[test]
fn wrong_top_level() {
    for bad in ["[]", "null", "3", "\"x\""] {
        let e = err(bad.as_bytes());
        assert!(
            e.message.contains("struct Config") || e.message.contains("expected"),
            "{bad}: {e}"
        );
    }
}

/// Comments and trailing commas are syntax errors at their position.
#[test]
fn comments_and_trailing_commas() {
    let e = err(b"{\n  // note\n  \"schema_version\": 1\n}");
    assert_eq!(e.line, 2);
    let e = err(b"{\"schema_version\": 1,}");
    assert!(e.message.contains("trailing comma"), "{e}");
}

/// Deep nesting is refused without exhausting the stack, wherever it appears.
#[test]
fn deep_nesting() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    err(deep.as_bytes());
    let text = GOOD.replace("[\"127.0.0.1:9000\"]", &deep);
    let e = err(text.as_bytes());
    assert_eq!(e.path.to_string(), "upstreams.grab.endpoints[0]", "{e}");
}

/// Oversized input is refused before parsing.
#[test]
fn too_large() {
    let text = vec![b' '; MAX_CONFIG_BYTES as usize + 1];
    assert!(err(&text).message.contains("limit"));
}

/// `locate` finds nested values, and the parent for a missing one.
#[test]
fn locate_paths() {
    let p = JsonPath::root()
        .key("upstreams")
        .key("grab")
        .key("endpoints")
        .index(0);
    assert_eq!(locate(GOOD, &p), (3, 42));
    let p = JsonPath::root().key("routes").index(0).key("upstream");
    assert_eq!(locate(GOOD, &p), (4, 48));
    let missing = JsonPath::root().key("routes").index(0).key("nope");
    assert_eq!(locate(GOOD, &missing), (4, 15));
}
