use proptest::prelude::*;

use super::*;

/// A line as the gateway writes it (`tracing-subscriber`'s flat JSON, fields in its order).
const GATEWAY_LINE: &str = r#"{"timestamp":"2026-05-29T00:00:00.000000Z","level":"INFO","message":"request","target":"tidegate::access","request_id":"5f0c2a7e9b1d4c3a-0000000000000001","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7","client":"10.1.2.3","peer":"10.1.2.3:40000","identity":"unverified","app":"app7","interface":"grab","user":"u42","route":"r36","upstream":"v1","status":200,"duration_us":412,"at_us":1780000000000050,"method":"POST","path":"/envelopes/42/grab","inputs":"x-tier=gold","decision":"forward","rule":"none"}"#;

#[test]
fn the_gateways_own_lines_take_the_fast_path() {
    let line = scan(GATEWAY_LINE.as_bytes()).expect("a gateway line is scanned");
    assert_eq!(
        line,
        serde_json::from_str::<Line<'_>>(GATEWAY_LINE).unwrap()
    );
    assert_eq!(line.at_us, Some(1_780_000_000_000_050));
    assert_eq!(line.target.as_deref(), Some(ACCESS_TARGET));
    assert_eq!(line.inputs.as_deref(), Some("x-tier=gold"));
    assert!(matches!(
        line.path,
        Some(Cow::Borrowed("/envelopes/42/grab"))
    ));
    // Other targets' lines, and the empty object, too.
    assert!(scan(br#"{"target":"tidegate::reload","level":"WARN","ok":false,"n":-3}"#).is_some());
    assert_eq!(scan(b"{}"), Some(Line::default()));
}

/// Lines a gateway wrote (the e2e test's: start-up, forward, fallback, limited), each read by
/// the scanner, as `serde_json` reads it.
#[test]
fn a_gateways_log_takes_the_fast_path() {
    let log = include_str!("gateway.jsonl");
    for l in log.lines() {
        let fast = scan(l.as_bytes()).unwrap_or_else(|| panic!("declined: {l}"));
        assert_eq!(fast, serde_json::from_str::<Line<'_>>(l).unwrap());
    }
    assert_eq!(log.lines().count(), 5);
}

#[test]
fn what_the_scanner_declines_serde_json_decides() {
    for (text, ok) in [
        (r#"{"path":"/a\"b"}"#, true),       // an escape
        (r#"{"app": "x"}"#, true),           // whitespace
        (r#"{"x":{"y":1}}"#, true),          // a nested value
        (r#"{"x":1.5,"at_us":1}"#, true),    // a fraction
        (r#"{"at_us":null}"#, true),         // null in a field a replay reads
        (r#"{"app":"a","app":"b"}"#, false), // a duplicate field
        (r#"{"at_us":-1}"#, false),          // negative time
        (r#"{"at_us":01}"#, false),          // a leading zero
        (r#"{"at_us":"1"}"#, false),         // a string for a number
        (r#"{"app":1}"#, false),             // a number for a string
        (r#"{"app":"a"}x"#, false),          // trailing bytes
        (r#"{"app":"a""#, false),            // cut short
    ] {
        assert_eq!(scan(text.as_bytes()), None, "{text}");
        let parsed = Line::parse(text.as_bytes());
        assert_eq!(parsed.is_ok(), ok, "{text}: {parsed:?}");
        if let Ok(l) = parsed {
            assert_eq!(l, serde_json::from_str::<Line<'_>>(text).unwrap());
        }
    }
    // A duplicate field a replay does not read is not an error.
    assert!(scan(br#"{"status":200,"status":503}"#).is_some());
}

/// Keys: the fields a replay reads, and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "target", "at_us", "method", "path", "client", "app", "user", "decision", "route",
            "upstream", "rule", "inputs", "status", "level", "Target", "at_u", "",
        ])
        .prop_map(String::from),
        "[a-z_\"\\\\]{0,6}".prop_map(|s| s.replace('"', "\\\"")),
    ]
}

/// Values: JSON strings (with escapes, control characters, non-ASCII), integers and other
/// numbers, literals, nested values, and a few that are not JSON.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9/:.\\-]{0,12}".prop_map(|s| format!("\"{s}\"")),
        2 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        1 => "\\PC{0,6}".prop_map(|s| format!("\"{s}\"")),
        1 => "[\\x00-\\x1f\"\\\\a]{0,4}".prop_map(|s| format!("\"{s}\"")),
        3 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => "-?[0-9]{1,22}(\\.[0-9]{0,2})?([eE][+-]?[0-9]{0,2})?",
        1 => "-?0[0-9]{0,2}",
        1 => prop::sample::select(vec!["true", "false", "null", "nul", "tru", "[]", "{}", "[1,\"a\"]", "{\"a\":1}", " 1", "\"x\" ", ""]).prop_map(String::from),
    ]
}

/// A line: an object of such fields, maybe mangled (a byte changed, inserted or cut).
fn line() -> impl Strategy<Value = Vec<u8>> {
    let fields = prop::collection::vec((key(), value()), 0..8);
    let edit = prop::option::weighted(0.3, (any::<prop::sample::Index>(), any::<u8>(), 0..3u8));
    (fields, edit).prop_map(|(fields, edit)| {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let mut b = format!("{{{}}}", body.join(",")).into_bytes();
        if let Some((at, byte, how)) = edit {
            let i = at.index(b.len());
            match how {
                0 => b[i] = byte,
                1 => b.insert(i, byte),
                _ => b.truncate(i),
            }
        }
        b
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// The scanner is a fast path, never a second parser: whenever it reads a line,
    /// `serde_json` reads the same fields from it.
    #[test]
    fn scan_agrees_with_serde_json(bytes in line()) {
        if let Some(fast) = scan(&bytes) {
            let slow = serde_json::from_slice::<Line<'_>>(&bytes);
            prop_assert!(slow.is_ok(), "scanned, but serde_json says {:?}", slow);
            prop_assert_eq!(fast, slow.unwrap());
        }
    }

    /// And it reads the lines the gateway writes, whatever their values.
    #[test]
    fn scan_reads_plain_lines(fields in prop::collection::vec(("[a-z_]{1,8}", "[a-z0-9/:. ]{0,12}"), 0..8), at in any::<u64>()) {
        let mut l = serde_json::Map::new();
        for (k, v) in &fields {
            l.insert(k.clone(), v.clone().into());
        }
        l.insert("at_us".into(), at.into());
        let text = serde_json::Value::Object(l).to_string();
        let fast = scan(text.as_bytes());
        prop_assert!(fast.is_some(), "declined {}", text);
        prop_assert_eq!(fast.unwrap(), serde_json::from_str::<Line<'_>>(&text).unwrap());
    }
}

proptest! {
    /// The word-at-a-time search finds what a byte-at-a-time one finds.
    #[test]
    fn quote_or_backslash_is_the_first(b in prop::collection::vec(prop::sample::select(vec![b'a', b'"', b'\\', 0x80, 0xa2, 0xdc, 0x00, 0x01, 0x21, 0x5d]), 0..40)) {
        let naive = b.iter().position(|&c| c == b'"' || c == b'\\');
        prop_assert_eq!(quote_or_backslash(&b), naive);
    }
}
