//! Config checking: the shipped config passes, and the careless and hostile edits listed in
//! BAD-CONFIGS.md each fail with an error that names its place (`file:line:col path`) and
//! says what is wrong. The last test runs the real `tidegate check`.

use std::path::Path;
use std::process::Command;

use tidegate_tests::api;

/// A small valid config; bad cases edit one spot of it, so positions are predictable.
/// Lines: 2 schema_version, 4 listeners, 5 admin, 8 interface, 11 upstream, 14 route.
const GOOD: &str = r#"{
  "schema_version": 1,
  "server": {
    "listeners": [{ "name": "public", "address": "127.0.0.1:0" }],
    "admin": { "address": "127.0.0.1:0" }
  },
  "interfaces": [
    { "name": "grab", "method": "POST", "path": "/envelopes/{id}/grab" }
  ],
  "upstreams": {
    "up": { "endpoints": ["127.0.0.1:9000"], "request_timeout_ms": 5000 }
  },
  "routes": [
    { "name": "default", "upstream": "up" }
  ]
}
"#;

/// GOOD with the first `from` replaced by `to` (which must be there).
fn edit(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "GOOD has no {from:?}");
    GOOD.replacen(from, to, 1)
}

/// Check `bytes` as file `t.json` and return the rendered errors.
fn errors_of(bytes: &[u8]) -> String {
    match api::load_rules("t.json", bytes) {
        Ok(_) => panic!("accepted a bad config:\n{}", String::from_utf8_lossy(bytes)),
        Err(e) => e.to_string(),
    }
}

/// Assert the rendered errors of `bytes` contain `place` and every phrase.
#[track_caller]
fn assert_fails(case: &str, bytes: impl AsRef<[u8]>, place: &str, phrases: &[&str]) {
    let got = errors_of(bytes.as_ref());
    eprintln!("CASE {case}: {got}");
    assert!(got.contains(place), "{case}: no {place:?} in:\n{got}");
    for p in phrases {
        assert!(got.contains(p), "{case}: no {p:?} in:\n{got}");
    }
}

/// The shipped `config/tidegate.json` reads, validates and compiles.
#[test]
fn shipped_config_passes() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/tidegate.json"
    ));
    if let Err(e) = api::read_config(path) {
        panic!("config/tidegate.json fails:\n{e}");
    }
}

/// The base config of these tests is itself valid (so each case fails for its one edit).
#[test]
fn base_config_passes() {
    if let Err(e) = api::load_rules("t.json", GOOD.as_bytes()) {
        panic!("{e}");
    }
}

/// Empty, blank and truncated files are refused: "empty config", or EOF at a position.
#[test]
fn empty_blank_truncated() {
    assert_fails("0-byte file", "", "t.json: ", &["empty config"]);
    assert_fails("whitespace", " \n\t \n", "t.json: ", &["empty config"]);
    let half = &GOOD[..GOOD.len() / 2];
    assert_fails(
        "truncated",
        half,
        "t.json:8:33 interfaces[0].method: ",
        &["EOF while parsing"],
    );
}

/// `{}` misses `schema_version`, a listener misses `address`, and empty `routes` is refused.
#[test]
fn missing_fields_and_empty_routes() {
    assert_fails(
        "{}",
        "{}",
        "t.json:1:2: ",
        &["missing field `schema_version`"],
    );
    assert_fails(
        "empty routes",
        edit(
            "[\n    { \"name\": \"default\", \"upstream\": \"up\" }\n  ]",
            "[]",
        ),
        "t.json:13:13 routes: ",
        &["no route rules", "allow_empty_routes"],
    );
    assert_fails(
        "listener without address",
        edit(
            r#""name": "public", "address": "127.0.0.1:0" "#,
            r#""name": "public" "#,
        ),
        "t.json:4:38 server.listeners[0]: ",
        &["missing field `address`"],
    );
}

/// Not JSON at all: YAML, a UTF-8 BOM, invalid UTF-8, comments, trailing commas.
#[test]
fn not_json() {
    assert_fails(
        "yaml",
        "schema_version: 1\nroutes: []\n",
        "t.json:1:1",
        &["expected value"],
    );
    assert_fails(
        "bom",
        [b"\xEF\xBB\xBF".as_slice(), GOOD.as_bytes()].concat(),
        "t.json:1:1",
        &["byte order mark"],
    );
    let mut bad_utf8 = GOOD.as_bytes().to_vec();
    let at = GOOD.find("public").unwrap();
    bad_utf8[at] = 0xff;
    assert_fails(
        "invalid utf-8",
        bad_utf8,
        "t.json:4:30: ",
        &["not valid UTF-8"],
    );
    assert_fails(
        "line comment",
        edit(
            "  \"schema_version\": 1,",
            "  // the version\n  \"schema_version\": 1,",
        ),
        "t.json:2:3",
        &["key must be a string"],
    );
    assert_fails(
        "block comment",
        edit("\"up\": {", "/* main */ \"up\": {"),
        "t.json:11:5 upstreams: ",
        &["key must be a string"],
    );
    assert_fails(
        "trailing comma",
        edit(r#""upstream": "up" }"#, r#""upstream": "up" },"#),
        "t.json:15:3",
        &["trailing comma"],
    );
}

/// The top level must be an object: an array, `null`, a number or a string is refused.
#[test]
fn top_level_not_an_object() {
    for (text, what) in [
        ("[]", "invalid type: array"),
        ("null", "invalid type: null"),
        ("42", "invalid type: integer `42`"),
        ("\"x\"", "invalid type: string \"x\""),
    ] {
        assert_fails(text, text, "t.json:1:", &[what, "expected struct Config"]);
    }
}

/// A JSON array of the config fields in declaration order is refused: the file must be an object.
#[test]
fn positional_array_is_refused() {
    let v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
    let positional = serde_json::json!([
        1,
        v["server"],
        { "app": { "header": "x-app-id" }, "user": { "header": "x-user-id" } },
        v["interfaces"],
        v["upstreams"],
        v["routes"],
        false
    ]);
    assert_fails(
        "positional array",
        positional.to_string(),
        "t.json:1:1: ",
        &["expected struct Config"],
    );
}

/// Duplicate keys are refused in a struct, in the `upstreams` map and in `match.headers`.
#[test]
fn duplicate_keys() {
    assert_fails(
        "struct",
        edit(
            "\"schema_version\": 1,",
            "\"schema_version\": 1, \"schema_version\": 1,",
        ),
        "t.json:2:39: ",
        &["duplicate field `schema_version`"],
    );
    assert_fails(
        "upstreams map",
        edit(
            "\"up\": { \"endpoints\"",
            "\"up\": { \"endpoints\": [\"127.0.0.1:1\"] },\n    \"up\": { \"endpoints\"",
        ),
        "t.json:12:5 upstreams: ",
        &["duplicate key `up`"],
    );
    assert_fails(
        "match.headers",
        edit(
            r#"{ "name": "default", "upstream": "up" }"#,
            r#"{ "name": "default", "upstream": "up", "match": { "headers": { "x-a": "1", "x-a": "2" } } }"#,
        ),
        "t.json:14:80 routes[0].match.headers: ",
        &["duplicate key `x-a`"],
    );
}

/// An unknown field is refused with a suggestion, at its position.
#[test]
fn unknown_field_suggests() {
    assert_fails(
        "Routes",
        edit("\"routes\":", "\"rotues\":"),
        "t.json:13:10 rotues: ",
        &["unknown field `rotues`", "did you mean `routes`"],
    );
    assert_fails(
        "request_timout_ms",
        edit("\"request_timeout_ms\"", "\"request_timout_ms\""),
        "t.json:11:64 upstreams.up.request_timout_ms: ",
        &[
            "unknown field `request_timout_ms`",
            "did you mean `request_timeout_ms`",
        ],
    );
}

/// Wrong types, floats, exponents, negatives and overflow are refused by the parser at the field.
#[test]
fn wrong_types_and_numbers() {
    // serde reports the end of the offending token, so the column varies by value.
    let place = "t.json:11:";
    let path = "upstreams.up.request_timeout_ms: ";
    for (value, phrase) in [
        ("\"5000\"", "invalid type: string \"5000\", expected u64"),
        ("true", "invalid type: boolean `true`"),
        ("null", "invalid type: null"),
        ("100.5", "invalid type: floating point `100.5`"),
        ("1e3", "invalid type: floating point `1000.0`"),
        ("-1", "invalid value: integer `-1`"),
        ("1e400", "number out of range"),
    ] {
        let text = edit(
            "\"request_timeout_ms\": 5000",
            &format!("\"request_timeout_ms\": {value}"),
        );
        assert_fails(value, text, place, &[path, phrase]);
    }
    assert_fails(
        "u32 overflow",
        edit(
            "\"admin\": { \"address\": \"127.0.0.1:0\" }",
            "\"admin\": { \"address\": \"127.0.0.1:0\" },\n    \"limits\": { \"max_headers\": 4294967296 }",
        ),
        "t.json:6:41 server.limits.max_headers: ",
        &["invalid value: integer `4294967296`, expected u32"],
    );
    assert_fails(
        "null for an object",
        edit(
            "\"admin\": { \"address\": \"127.0.0.1:0\" }",
            "\"admin\": null",
        ),
        "t.json:5:17 server.admin: ",
        &["invalid type: null, expected struct Admin"],
    );
}

/// Zero and absurd values of the right type are refused with the allowed range.
#[test]
fn out_of_range_values() {
    assert_fails(
        "zero",
        edit("\"request_timeout_ms\": 5000", "\"request_timeout_ms\": 0"),
        "t.json:11:68 upstreams.up.request_timeout_ms: ",
        &["0 is out of range; allowed 1..=3600000"],
    );
    assert_fails(
        "a day",
        edit(
            "\"request_timeout_ms\": 5000",
            "\"request_timeout_ms\": 86400000",
        ),
        "t.json:11:68 upstreams.up.request_timeout_ms: ",
        &["86400000 is out of range; allowed 1..=3600000"],
    );
    assert_fails(
        "connect timeout zero",
        edit("\"request_timeout_ms\": 5000", "\"connect_timeout_ms\": 0"),
        "upstreams.up.connect_timeout_ms: ",
        &["allowed 1..=60000"],
    );
}

/// An unknown upstream (with a hint), duplicate route names and identical matchers are refused.
#[test]
fn references_and_ambiguity() {
    assert_fails(
        "unknown upstream",
        edit(r#""upstream": "up""#, r#""upstream": "uq""#),
        "t.json:14:38 routes[0].upstream: ",
        &["unknown upstream \"uq\"", "did you mean \"up\""],
    );
    let two = |second: &str| {
        edit(
            r#"{ "name": "default", "upstream": "up" }"#,
            &format!("{{ \"name\": \"default\", \"upstream\": \"up\" }},\n    {second}"),
        )
    };
    assert_fails(
        "duplicate name",
        two(r#"{ "name": "default", "upstream": "up", "match": { "apps": ["a"] } }"#),
        "t.json:15:15 routes[1].name: ",
        &["duplicate rule name \"default\""],
    );
    assert_fails(
        "identical matchers",
        two(r#"{ "name": "other", "upstream": "up" }"#),
        "t.json:15:5 routes[1]: ",
        &["\"default\"", "\"other\"", "can match the same request"],
    );
}

/// Path templates must start with `/` and contain no `..` segment or encoded slash.
#[test]
fn bad_path_templates() {
    for (path, phrase) in [
        ("envelopes/{id}/grab", "must start with `/`"),
        ("/envelopes/../grab", "contains a `..` segment"),
        ("/envelopes%2F{id}/grab", "encoded `/`"),
    ] {
        assert_fails(
            path,
            edit("/envelopes/{id}/grab", path),
            "t.json:8:49 interfaces[0].path: ",
            &[phrase],
        );
    }
}

/// An invalid header name and an unknown enum value (listing the allowed ones) are refused.
#[test]
fn bad_names_and_enums() {
    assert_fails(
        "header name",
        edit(
            "\"interfaces\"",
            "\"identity\": { \"app\": { \"header\": \"x user\" } },\n  \"interfaces\"",
        ),
        "t.json:7:36 identity.app.header: ",
        &["\"x user\" is not a valid HTTP header name"],
    );
    assert_fails(
        "balance",
        edit("\"request_timeout_ms\": 5000", "\"balance\": \"random\""),
        "t.json:11:64 upstreams.up.balance: ",
        &[
            "unknown variant `random`",
            "round_robin",
            "least_outstanding",
        ],
    );
}

/// Addresses: a listener without a port, an endpoint port out of range, a scheme.
#[test]
fn bad_addresses() {
    assert_fails(
        "no port",
        edit(
            "\"address\": \"127.0.0.1:0\" }]",
            "\"address\": \"127.0.0.1\" }]",
        ),
        "t.json:4:50 server.listeners[0].address: ",
        &["\"127.0.0.1\" has no port"],
    );
    assert_fails(
        "port out of range",
        edit("127.0.0.1:9000", "localhost:99999"),
        "t.json:11:27 upstreams.up.endpoints[0]: ",
        &["port \"99999\" is not in 1..=65535"],
    );
    assert_fails(
        "scheme",
        edit("127.0.0.1:9000", "http://x:1"),
        "t.json:11:27 upstreams.up.endpoints[0]: ",
        &["without a scheme"],
    );
}

/// A `schema_version` this build does not know is refused.
#[test]
fn unsupported_schema_version() {
    assert_fails(
        "99",
        edit("\"schema_version\": 1", "\"schema_version\": 99"),
        "t.json:2:21 schema_version: ",
        &["unsupported schema_version 99", "version 1"],
    );
}

/// A directory, missing file, dangling link, missing TLS cert and garbage PEM are refused.
#[test]
fn files_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let read = |p: &Path| match api::read_config(p) {
        Ok(_) => panic!("{} was accepted", p.display()),
        Err(e) => e.to_string(),
    };
    let got = read(dir.path());
    assert!(got.contains("is a directory"), "{got}");
    let missing = dir.path().join("missing.json");
    let got = read(&missing);
    assert!(got.starts_with(&missing.display().to_string()), "{got}");
    assert!(got.contains("does not exist"), "{got}");
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(dir.path().join("gone.json"), &link).unwrap();
    let got = read(&link);
    assert!(got.contains("dangling symbolic link"), "{got}");

    let key = dir.path().join("key.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&key, "not a key").unwrap();
    std::fs::write(
        &garbage,
        "-----BEGIN GARBAGE-----\nzzzz\n-----END GARBAGE-----\n",
    )
    .unwrap();
    for (cert, phrase) in [
        (dir.path().join("nope.pem"), "certificate"),
        (garbage.clone(), "no certificate found"),
    ] {
        let text = edit(
            "\"address\": \"127.0.0.1:0\" }]",
            &format!(
                "\"address\": \"127.0.0.1:0\", \"tls\": {{ \"cert_path\": {:?}, \"key_path\": {:?} }} }}]",
                cert.to_str().unwrap(),
                key.to_str().unwrap()
            ),
        );
        let file = dir.path().join("tls.json");
        std::fs::write(&file, text).unwrap();
        let got = read(&file);
        let place = format!("{}:4:", file.display());
        assert!(got.contains(&place), "{phrase}: no {place:?} in {got}");
        assert!(got.contains("server.listeners[0].tls.cert_path: "), "{got}");
        assert!(got.contains(phrase), "{phrase}: {got}");
        assert!(got.contains(cert.to_str().unwrap()), "{got}");
    }
}

/// `tidegate check` exits 0 with a summary on a good file and 1 with `FILE:LINE:COL PATH: message`.
#[test]
fn check_command() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, GOOD).unwrap();
    let out = Command::new(tidegate_tests::tidegate_bin())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        format!(
            "{}: ok (1 listener, 1 interface, 1 upstream, 1 route)",
            good.display()
        )
    );

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, edit(r#""upstream": "up""#, r#""upstream": "uq""#)).unwrap();
    let out = Command::new(tidegate_tests::tidegate_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!(
                "{}:14:38 routes[0].upstream: unknown upstream \"uq\"; did you mean \"up\"?",
                bad.display()
            ),
            format!("{}: 1 error(s)", bad.display()),
        ],
        "{stderr}"
    );
}

/// A name with markup (a stored-XSS attempt on the dashboard) is refused at its place, and
/// so is any name outside ASCII letters, digits and `._:-`.
#[test]
fn hostile_names() {
    assert_fails(
        "markup route name",
        edit(
            "\"name\": \"default\"",
            "\"name\": \"<img src=x onerror=alert(1)>\"",
        ),
        "t.json:14:15 routes[0].name: ",
        &[
            "\"<img src=x onerror=alert(1)>\" contains '<'",
            "ASCII letters, digits and `._:-`",
        ],
    );
    assert_fails(
        "interface name with a space",
        edit("\"name\": \"grab\"", "\"name\": \"grab it\""),
        "t.json:8:15 interfaces[0].name: ",
        &["contains ' '"],
    );
    assert_fails(
        "upstream name with a quote",
        edit("\"up\": {", "\"u'p\": {").replace("\"upstream\": \"up\"", "\"upstream\": \"u'p\""),
        "upstreams",
        &["contains '\\''"],
    );
}

/// `tidegate check` refuses an admin port beyond loopback without a token file, and one
/// whose token file is missing; with a token file beside the config it passes.
#[test]
fn check_admin_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let run = |text: String| {
        let file = dir.path().join("admin.json");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(tidegate_tests::tidegate_bin())
            .args(["check", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(edit(
        "\"admin\": { \"address\": \"127.0.0.1:0\" }",
        "\"admin\": { \"address\": \"0.0.0.0:0\" }",
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(":5:27 server.admin.address: the admin port on 0.0.0.0:0 (not loopback) must require a token"),
        "{stderr}"
    );
    let with_token = edit(
        "\"admin\": { \"address\": \"127.0.0.1:0\" }",
        "\"admin\": { \"address\": \"0.0.0.0:0\", \"token_file\": \"admin.token\" }",
    );
    let (code, stderr) = run(with_token.clone());
    assert_eq!(code, Some(1), "missing token file: {stderr}");
    assert!(
        stderr.contains("server.admin.token_file: cannot read the admin token file"),
        "{stderr}"
    );
    // A FIFO as the token file: refused at once, not a hang on its `open`.
    let fifo = dir.path().join("admin.token");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let t = std::time::Instant::now();
    let (code, stderr) = run(with_token.clone());
    assert_eq!(code, Some(1), "FIFO token file: {stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    std::fs::remove_file(&fifo).unwrap();
    std::fs::write(dir.path().join("admin.token"), "0123456789abcdef0123\n").unwrap();
    let (code, stderr) = run(with_token);
    assert_eq!(code, Some(0), "{stderr}");
}

/// `tidegate diff OLD NEW` with the real binary: the moved share of a grown canary, exit
/// codes like diff(1)'s (0 same, 1 different, 2 unreadable), and the JSON form.
#[test]
fn diff_command() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let split = |w: &str| {
        edit(
            r#"{ "name": "default", "upstream": "up" }"#,
            &format!(
                r#"{{ "name": "default", "split": [{{ "upstream": "canary", "weight": "{w}" }},
                  {{ "upstream": "up", "weight": "rest" }}] }}"#
            ),
        )
        .replace(
            r#""up": {"#,
            r#""canary": { "endpoints": ["127.0.0.1:9001"] }, "up": {"#,
        )
    };
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("writing a config");
        p
    };
    let (old, new) = (
        write("old.json", &split("1%")),
        write("new.json", &split("5%")),
    );
    let bad = write("bad.json", &split("5%").replace("\"rest\"", "\"most\""));
    let diff = |args: &[&Path], json: bool| {
        let mut cmd = Command::new(tidegate_tests::tidegate_bin());
        cmd.arg("diff").args(args);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().expect("running tidegate diff");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, out, _) = diff(&[&old, &new], false);
    eprintln!("{out}");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("/split/0/weight: \"1%\" → \"5%\""), "{out}");
    assert!(
        out.contains("4.0000% of its users move up → canary (buckets [10000, 50000))"),
        "{out}"
    );

    let (code, out, _) = diff(&[&old, &new], true);
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["sections"][0]["name"], "routes", "{v}");
    let moved = &v["sections"][0]["changes"][0]["moves"][0];
    assert_eq!(
        (&moved["ppm"], &moved["exact"]),
        (&40_000.into(), &true.into()),
        "{v}"
    );

    let (code, out, _) = diff(&[&new, &new], false);
    assert_eq!((code, out.as_str()), (Some(0), "no changes\n"));

    let (code, _, err) = diff(&[&old, &bad], false);
    assert_eq!(code, Some(2));
    assert!(err.contains("bad.json:") && err.contains("most"), "{err}");
}
