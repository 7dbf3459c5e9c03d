use super::*;
use crate::source::parse;

fn cfg(routes: &str, extra: &str) -> Config {
    let text = format!(
        r#"{{
  "schema_version": 1,
  "interfaces": [
    {{ "name": "grab", "method": "POST", "path": "/envelopes/{{id}}/grab" }},
    {{ "name": "open", "method": "GET", "path": "/envelopes/{{id}}" }}
  ],
  "upstreams": {{ "v1": {{ "endpoints": ["127.0.0.1:9000"] }}, "v2": {{ "endpoints": ["127.0.0.1:9001"] }} }},
  "routes": {routes}{extra}
}}"#
    );
    parse("t.json", text.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn messages(c: &Config) -> Vec<String> {
    validate(c)
        .into_iter()
        .map(|i| format!("{}: {}", i.path, i.message))
        .collect()
}

/// A good config has no issues.
#[test]
fn good_config_is_clean() {
    let c = cfg(
        r#"[{"name": "d", "upstream": "v1"}, {"name": "g", "match": {"interfaces": ["grab"]}, "upstream": "v2"}]"#,
        "",
    );
    assert_eq!(messages(&c), Vec::<String>::new());
}

/// Every problem is reported, not just the first.
#[test]
fn reports_all() {
    let c = cfg(
        r#"[{"name": "d", "upstream": "v3"}, {"name": "d", "match": {"interfaces": ["grb"]}, "upstream": "v1"}]"#,
        r#", "server": {"limits": {"max_headers": 0}, "admin": {"address": "127.0.0.1"}}"#,
    );
    let m = messages(&c);
    assert_eq!(m.len(), 5, "{m:#?}");
    assert!(
        m.iter()
            .any(|x| x.starts_with("routes[0].upstream: unknown upstream \"v3\""))
    );
    assert!(m.iter().any(|x| x.contains(
        "routes[1].match.interfaces[0]: unknown interface \"grb\"; did you mean \"grab\"?"
    )));
    assert!(
        m.iter()
            .any(|x| x.starts_with("routes[1].name: duplicate rule name"))
    );
    assert!(
        m.iter()
            .any(|x| x == "server.limits.max_headers: 0 is out of range; allowed 8..=1000")
    );
    assert!(
        m.iter()
            .any(|x| x == "server.admin.address: \"127.0.0.1\" has no port")
    );
}

/// No routes is refused unless explicitly allowed.
#[test]
fn empty_routes() {
    assert!(messages(&cfg("[]", ""))[0].contains("no route rules"));
    assert!(messages(&cfg("[]", r#", "allow_empty_routes": true"#)).is_empty());
}

/// Two rules constraining the same dimensions with overlapping values are ambiguous; a
/// more specific rule, or disjoint values, are fine.
#[test]
fn ambiguity() {
    let amb = cfg(
        r#"[{"name": "a", "match": {"apps": ["x", "y"]}, "upstream": "v1"},
            {"name": "b", "match": {"apps": ["y"]}, "upstream": "v2"}]"#,
        "",
    );
    let m = messages(&amb);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].contains("rules \"a\" (routes[0]) and \"b\" (routes[1])"),
        "{m:?}"
    );

    let two_defaults = cfg(
        r#"[{"name": "a", "upstream": "v1"}, {"name": "b", "upstream": "v2"}]"#,
        "",
    );
    assert_eq!(messages(&two_defaults).len(), 1);

    let ok = cfg(
        r#"[{"name": "a", "match": {"apps": ["x"]}, "upstream": "v1"},
            {"name": "b", "match": {"apps": ["y"]}, "upstream": "v2"},
            {"name": "c", "match": {"apps": ["x"], "interfaces": ["grab"]}, "upstream": "v2"},
            {"name": "d", "match": {"headers": {"x-canary": "v2"}}, "upstream": "v2"},
            {"name": "e", "match": {"headers": {"x-canary": "v3"}}, "upstream": "v1"}]"#,
        "",
    );
    assert!(messages(&ok).is_empty(), "{:?}", messages(&ok));

    let hdr = cfg(
        r#"[{"name": "d", "match": {"headers": {"x-canary": "v2"}}, "upstream": "v2"},
            {"name": "e", "match": {"headers": {"X-Canary": "v2", "x-other": "1"}}, "upstream": "v1"}]"#,
        "",
    );
    assert_eq!(messages(&hdr).len(), 1, "same header value overlaps");
}

/// Path templates that could bypass rules by normalisation are refused.
#[test]
fn bad_templates() {
    for (path, want) in [
        ("envelopes", "must start with `/`"),
        ("/a/../b", "`..` segment"),
        ("/a%2Fb", "encoded"),
        ("/a/{id", "whole segment"),
        ("/a/{}", "parameter name"),
        ("/a b", "whitespace"),
    ] {
        let text = format!(
            r#"{{"schema_version": 1, "interfaces": [{{"name": "x", "method": "GET", "path": {path:?}}}],
               "upstreams": {{"u": {{"endpoints": ["127.0.0.1:1"]}}}}, "routes": [{{"name": "d", "upstream": "u"}}]}}"#
        );
        let c = parse("t.json", text.as_bytes()).unwrap();
        let m = messages(&c);
        assert!(m.iter().any(|x| x.contains(want)), "{path}: {m:?}");
    }
}

/// Endpoints must be host:port with a real port, without scheme or path.
#[test]
fn endpoints() {
    for (e, ok) in [
        ("127.0.0.1:80", true),
        ("[::1]:80", true),
        ("backend.internal:8080", true),
        ("127.0.0.1", false),
        ("localhost:99999", false),
        ("http://x:1", false),
        ("x:1/path", false),
        ("", false),
        ("127.0.0.1:0", false),
        (":80", false),
    ] {
        assert_eq!(
            check_endpoint(e).is_ok(),
            ok,
            "{e}: {:?}",
            check_endpoint(e)
        );
    }
}

/// Duplicate interfaces (same method and path) and bad methods are refused.
#[test]
fn interfaces() {
    let text = r#"{"schema_version": 1, "interfaces": [
        {"name": "a", "method": "GET", "path": "/x"},
        {"name": "b", "method": "GET", "path": "/x"},
        {"name": "a", "method": "get", "path": "/y"}],
        "upstreams": {"u": {"endpoints": ["127.0.0.1:1"]}}, "routes": [{"name": "d", "upstream": "u"}]}"#;
    let m = messages(&parse("t.json", text.as_bytes()).unwrap());
    assert!(
        m.iter()
            .any(|x| x.starts_with("interfaces[1]: duplicate interface: GET /x")),
        "{m:?}"
    );
    assert!(
        m.iter()
            .any(|x| x.starts_with("interfaces[2].name: duplicate interface \"a\"")),
        "{m:?}"
    );
    assert!(
        m.iter().any(|x| x.starts_with("interfaces[2].method")),
        "{m:?}"
    );
}

/// Header names in extractors and matchers must be valid.
#[test]
fn header_names() {
    let c = cfg(
        r#"[{"name": "d", "match": {"headers": {"x user": "1"}}, "upstream": "v1"}]"#,
        r#", "identity": {"user": {"header": "bad header"}}"#,
    );
    let m = messages(&c);
    assert!(
        m.iter().any(|x| x.starts_with("identity.user.header")),
        "{m:?}"
    );
    assert!(
        m.iter()
            .any(|x| x.starts_with("routes[0].match.headers[\"x user\"]")),
        "{m:?}"
    );
}

/// Unsupported schema versions are refused with the supported one named.
#[test]
fn schema_version() {
    let mut c = cfg(r#"[{"name": "d", "upstream": "v1"}]"#, "");
    c.schema_version = 99;
    assert_eq!(
        messages(&c),
        ["schema_version: unsupported schema_version 99; this build reads version 1"]
    );
}

/// Names are limited to ASCII letters, digits and `._:-`, 1 to 128 bytes: markup, spaces
/// and non-ASCII are refused wherever a name is given.
#[test]
fn name_charset() {
    let hostile = "<img src=x onerror=alert(1)>";
    let c = cfg(
        &format!(r#"[{{"name": "{hostile}", "upstream": "v1"}}]"#),
        "",
    );
    let m = messages(&c);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].starts_with("routes[0].name: \"<img src=x onerror=alert(1)>\" contains '<'"),
        "{m:?}"
    );
    assert!(m[0].contains("ASCII letters, digits and `._:-`"), "{m:?}");
    for bad in ["caf\u{e9}", "a b", "a\"b", "a/b", "&amp;"] {
        let c = cfg(&format!(r#"[{{"name": {bad:?}, "upstream": "v1"}}]"#), "");
        assert!(!messages(&c).is_empty(), "{bad:?} accepted");
    }
    let long = "a".repeat(MAX_NAME_BYTES + 1);
    let c = cfg(&format!(r#"[{{"name": "{long}", "upstream": "v1"}}]"#), "");
    assert_eq!(
        messages(&c),
        ["routes[0].name: name is longer than 128 bytes"]
    );
    let ok = format!("Ab.9_x:y-{}", "z".repeat(MAX_NAME_BYTES - 9));
    let c = cfg(&format!(r#"[{{"name": "{ok}", "upstream": "v1"}}]"#), "");
    assert_eq!(messages(&c), Vec::<String>::new());
    // Upstream, interface, limit, plan names too.
    let c = cfg(
        r#"[{"name": "d", "upstream": "v1"}]"#,
        r#", "limits": [{"name": "l<", "key": ["user"], "rate": "1/s"}], "plans": {"p q": {}}"#,
    );
    let m = messages(&c);
    assert!(m.iter().any(|x| x.starts_with("limits[0].name: ")), "{m:?}");
    assert!(
        m.iter().any(|x| x.contains("\"p q\" contains ' '")),
        "{m:?}"
    );
}

/// `identity.max_id_bytes` is range-checked and `on_invalid` takes two values.
#[test]
fn identity_bounds() {
    let c = cfg(
        r#"[{"name": "d", "upstream": "v1"}]"#,
        r#", "identity": {"max_id_bytes": 0, "on_invalid": "reject"}"#,
    );
    assert_eq!(
        messages(&c),
        ["identity.max_id_bytes: 0 is out of range; allowed 1..=4096"]
    );
}

/// An admin port beyond loopback needs a token file; on loopback it does not.
#[test]
fn admin_beyond_loopback_needs_a_token() {
    let routes = r#"[{"name": "d", "upstream": "v1"}]"#;
    let m = messages(&cfg(
        routes,
        r#", "server": {"admin": {"address": "0.0.0.0:9901"}}"#,
    ));
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].starts_with("server.admin.address: the admin port on 0.0.0.0:9901 (not loopback) must require a token"),
        "{m:?}"
    );
    for ok in [
        r#", "server": {"admin": {"address": "0.0.0.0:9901", "token_file": "admin.token"}}"#,
        r#", "server": {"admin": {"address": "[::1]:9901", "allowed_hosts": ["admin.internal:9901"]}}"#,
    ] {
        assert_eq!(messages(&cfg(routes, ok)), Vec::<String>::new(), "{ok}");
    }
    let m = messages(&cfg(
        routes,
        r#", "server": {"admin": {"max_connections": 0, "allowed_hosts": ["a b"], "token_file": " "}}"#,
    ));
    assert_eq!(m.len(), 3, "{m:?}");
}

/// `server.trusted_proxies`: each entry a CIDR, a bad one reported at its index; the good
/// ones compile into the snapshot.
#[test]
fn trusted_proxies_are_cidrs() {
    let routes = r#"[{"name": "d", "upstream": "v1"}]"#;
    let c = cfg(
        routes,
        r#", "server": {"trusted_proxies": ["10.0.0.0/8", "10.0.0.0/33", "2001:db8::/32", "::1", "proxy.lan"]}"#,
    );
    let m = messages(&c);
    assert_eq!(m.len(), 2, "{m:#?}");
    assert!(
        m[0].starts_with("server.trusted_proxies[1]: \"10.0.0.0/33\": the prefix length"),
        "{m:#?}"
    );
    assert!(
        m[1].starts_with("server.trusted_proxies[4]: \"proxy.lan\" is not a CIDR"),
        "{m:#?}"
    );
    let c = cfg(
        routes,
        r#", "server": {"trusted_proxies": ["10.0.0.0/8", "2001:db8::/32"]}"#,
    );
    let snap = crate::Snapshot::compile(&c).unwrap();
    let nets: Vec<String> = snap
        .trusted_proxies
        .nets()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "2001:db8::/32"]);
    let none = crate::Snapshot::compile(&cfg(routes, "")).unwrap();
    assert!(none.trusted_proxies.is_empty());
}

/// `identity.jwt` and claim extractors: each mistake at its place; a good one compiles to
/// settings whose claim headers classify the request.
#[test]
fn jwt_identity_checks() {
    let routes = r#"[{"name": "d", "upstream": "v1"}]"#;
    let m = messages(&cfg(routes, r#", "identity": {"user": {"claim": "sub"}}"#));
    assert_eq!(
        m,
        ["identity.user.claim: reads a claim of the verified token, but identity.jwt is not set"]
    );
    let bad = r#", "identity": {"user": {"claim": "sub"}, "app": {"claim": "azp"}, "jwt": {
        "jwks_file": "", "algorithms": ["none", "HS1", "ES256"], "leeway_s": 301,
        "max_token_bytes": 10, "audiences": [""], "app_header": "host",
        "from": {"cookie": ""}}}"#;
    let m = messages(&cfg(routes, bad));
    for want in [
        "identity.jwt.jwks_file: name the JWKS file",
        "identity.jwt.algorithms[0]: `none` is never accepted",
        "identity.jwt.algorithms[1]: unknown algorithm \"HS1\"",
        "identity.jwt.audiences[0]: must not be empty",
        "identity.jwt.leeway_s:",
        "identity.jwt.max_token_bytes:",
        "identity.jwt.from.cookie: name must not be empty",
        "identity.jwt.app_header: \"host\" cannot carry an ID",
    ] {
        assert!(m.iter().any(|x| x.starts_with(want)), "{want}: {m:#?}");
    }
    let same = r#", "identity": {"user": {"claim": "sub"}, "app": {"claim": "azp"}, "jwt": {
        "jwks_file": "k.json", "algorithms": ["ES256"], "app_header": "X-User-Id"}}"#;
    assert_eq!(
        messages(&cfg(routes, same)),
        ["identity.jwt.app_header: the user and app IDs need different headers"]
    );
    let good = r#", "identity": {"user": {"claim": "sub"}, "jwt": {
        "jwks_file": "k.json", "algorithms": ["ES256", "RS256"], "required": false}}"#;
    let snap = crate::Snapshot::compile(&cfg(routes, good)).unwrap();
    let jwt = snap.jwt.as_ref().unwrap();
    assert_eq!(&*jwt.user.as_ref().unwrap().claim, "sub");
    assert_eq!(jwt.user.as_ref().unwrap().header, "x-user-id");
    assert!(jwt.app.is_none() && !jwt.required && jwt.leeway_s == 30);
    // The claim's header is an identity header (Connection may not name it).
    assert!(snap.is_identity_header("X-User-Id"));
}

/// What is valid but unsafe is a warning with its place: an override header anyone can
/// use, priority admission without a key. `override_from` needs the header it limits.
#[test]
fn unsafe_but_valid_is_warned() {
    let routes = r#"[{"name": "c", "split": [{"upstream": "v2", "weight": "1%"}, {"upstream": "v1", "weight": "rest"}],
                      "override_header": "x-canary"}]"#;
    let c = cfg(
        routes,
        r#", "overload": {"enabled": true, "max_in_flight": 100, "admission": {}}"#,
    );
    assert!(validate(&c).is_empty());
    let w: Vec<String> = super::warnings(&c)
        .into_iter()
        .map(|i| format!("{}: {}", i.path, i.message))
        .collect();
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(w[0].starts_with("overload.admission.priority_key_file: not set"));
    assert!(w[1].starts_with("routes[0].override_header: honoured from any client"));
    let safe = r#"[{"name": "c", "split": [{"upstream": "v2", "weight": "1%"}, {"upstream": "v1", "weight": "rest"}],
                    "override_header": "x-canary", "override_from": ["10.0.0.0/8"]}]"#;
    let c = cfg(
        safe,
        r#", "overload": {"enabled": true, "max_in_flight": 100, "admission": {"priority_key_file": "p.key"}}"#,
    );
    assert!(validate(&c).is_empty() && super::warnings(&c).is_empty());
    let m = messages(&cfg(
        r#"[{"name": "d", "upstream": "v1", "override_from": ["10.0.0.0/33"]}]"#,
        "",
    ));
    assert!(
        m.iter()
            .any(|x| x.starts_with("routes[0].override_from[0]:")),
        "{m:#?}"
    );
    assert!(m.iter().any(|x| x.contains("which is not set")), "{m:#?}");
}

/// A mirror's faults are each reported at their field; a good one is clean.
#[test]
fn mirror_fields() {
    let good = cfg(
        r#"[{"name": "d", "upstream": "v1", "mirror": {"upstream": "v2", "fraction": "30%"}}]"#,
        "",
    );
    assert_eq!(messages(&good), Vec::<String>::new());
    let c = cfg(
        r#"[{"name": "d", "upstream": "v1", "mirror": {"upstream": "v3", "fraction": "rest",
             "salt": "", "max_body_bytes": 16777217, "max_in_flight": 0}},
            {"name": "e", "match": {"apps": ["a"]}, "upstream": "v1",
             "mirror": {"upstream": "v2", "fraction": "1%", "fraction_ppm": 10000}},
            {"name": "f", "match": {"apps": ["b"]}, "upstream": "v1", "mirror": {"upstream": "v2"}},
            {"name": "g", "match": {"apps": ["c"]}, "upstream": "v1",
             "mirror": {"upstream": "v2", "fraction_ppm": 1000001}}]"#,
        "",
    );
    let m = messages(&c);
    let want = [
        "routes[0].mirror.upstream: unknown upstream \"v3\"",
        "routes[0].mirror.fraction: \"rest\": a fraction is a percentage",
        "routes[0].mirror.salt: salt must not be empty",
        "routes[0].mirror.max_body_bytes: 16777217 is out of range",
        "routes[0].mirror.max_in_flight: 0 is out of range",
        "routes[1].mirror.fraction_ppm: give either",
        "routes[2].mirror: missing field `fraction`",
        "routes[3].mirror.fraction_ppm: 1000001 is out of range",
    ];
    for w in want {
        assert!(m.iter().any(|x| x.starts_with(w)), "{w} not in {m:#?}");
    }
    assert_eq!(m.len(), want.len(), "{m:#?}");
}

/// A ramp's faults are each reported at their field; a good one is clean.
#[test]
fn ramp_fields() {
    let good = cfg(
        r#"[{"name": "d", "split": [{"upstream": "v2", "weight": "0%"}, {"upstream": "v1", "weight": "rest"}],
             "ramp": {"target": "v2", "steps": ["0.01%", "1%", "100%"]}}]"#,
        "",
    );
    assert_eq!(messages(&good), Vec::<String>::new());
    let mut c = cfg(
        r#"[{"name": "d", "upstream": "v1", "ramp": {"target": "v2", "steps": ["1%"]}},
            {"name": "e", "match": {"apps": ["a"]}, "split": [{"upstream": "v2", "weight": "0%"}, {"upstream": "v1", "weight": "rest"}],
             "ramp": {"target": "v3", "steps": ["1%"]}},
            {"name": "f", "match": {"apps": ["b"]}, "split": [{"upstream": "v2", "weight": "10%"}, {"upstream": "v1", "weight": "10%"}, {"upstream": "v3", "weight": "rest"}],
             "ramp": {"target": "v2", "baseline": "v3", "steps": ["5%", "5%", "30%"], "hold_ms": 10,
                      "guard": {"window_ms": 0, "min_requests": 0, "max_error_ratio_diff": "rest", "max_p99_ratio": 0.5}}},
            {"name": "g", "match": {"apps": ["c"]}, "split": [{"upstream": "v2", "weight": "10%"}, {"upstream": "v1", "weight": "20%"}, {"upstream": "v3", "weight": "rest"}],
             "ramp": {"target": "v1", "steps": []}},
            {"name": "h", "match": {"apps": ["d"]}, "split": [{"upstream": "v2", "weight": "1%"}, {"upstream": "v1", "weight": "9%"}, {"upstream": "v3", "weight": "rest"}],
             "ramp": {"target": "v2", "steps": ["5%", "20%"]}},
            {"name": "i", "match": {"apps": ["e"]}, "split": [{"upstream": "v2", "weight": "0%"}, {"upstream": "v1", "weight": "rest"}],
             "ramp": {"target": "v2", "steps": ["0%"]}}]"#,
        "",
    );
    let v1 = c.upstreams["v1"].clone();
    c.upstreams.insert("v3".into(), v1);
    let m = messages(&c);
    let want = [
        "routes[0].ramp: a ramp needs a `split`",
        "routes[1].ramp.target: \"v3\" is not a target of this split (v2, v1)",
        "routes[2].ramp.hold_ms: 10 is out of range",
        "routes[2].ramp.guard.window_ms: 0 is out of range",
        "routes[2].ramp.guard.min_requests: 0 is out of range",
        "routes[2].ramp.guard.max_p99_ratio: 0.5 is out of range",
        "routes[2].ramp.guard.max_error_ratio_diff: \"rest\"",
        "routes[2].ramp.baseline: \"v3\" is not next to \"v2\"",
        "routes[3].ramp.baseline: \"v1\" has a target on each side",
        "routes[4].ramp.steps[1]: \"20%\" is more than v2 and v1 have together as written (10%)",
        "routes[5].ramp.steps[0]: a step of 0% sends nothing",
    ];
    for w in want {
        assert!(m.iter().any(|x| x.starts_with(w)), "{w} not in {m:#?}");
    }
    assert_eq!(m.len(), want.len(), "{m:#?}");
}

/// `max_delay_ms`: in range, not on a cluster-scope limit; `max_queue` only with it.
#[test]
fn pacing_fields() {
    let routes = r#"[{"name": "d", "upstream": "v1"}]"#;
    let limits = |l: &str| format!(r#", "limits": [{l}]"#);
    let ok = cfg(
        routes,
        &limits(r#"{"name": "p", "rate": "10/s", "max_delay_ms": 500, "max_queue": 50}"#),
    );
    assert_eq!(messages(&ok), Vec::<String>::new());
    let compiled = crate::load("t.json", serde_json::to_vec(&ok).unwrap().as_slice()).unwrap();
    let p = compiled.snapshot.governance.limits[0].pacing.unwrap();
    assert_eq!(
        (p.max_delay, p.max_queue),
        (std::time::Duration::from_millis(500), 50)
    );
    let bad = cfg(
        routes,
        &format!(
            r#"{}, "server": {{"redis": {{"url": "redis://127.0.0.1:6379"}}}}"#,
            limits(
                r#"{"name": "a", "rate": "10/s", "max_delay_ms": 0},
                   {"name": "b", "rate": "10/s", "max_delay_ms": 60001, "max_queue": 0},
                   {"name": "c", "rate": "10/s", "max_queue": 5},
                   {"name": "d", "rate": "10/s", "scope": "cluster", "max_delay_ms": 100}"#
            )
        ),
    );
    assert_eq!(
        messages(&bad),
        [
            "limits[0].max_delay_ms: 0 is out of range; allowed 1..=60000",
            "limits[1].max_delay_ms: 60001 is out of range; allowed 1..=60000",
            "limits[1].max_queue: 0 is out of range; allowed 1..=100000",
            "limits[2].max_queue: max_queue needs max_delay_ms",
            "limits[3].max_delay_ms: a cluster-scope limit cannot pace: remove max_delay_ms or use scope local",
        ]
    );
}

fn cache_cfg(interfaces: &str) -> Config {
    let text = format!(
        r#"{{ "schema_version": 1, "interfaces": {interfaces},
  "upstreams": {{ "v1": {{ "endpoints": ["127.0.0.1:9000"] }} }},
  "routes": [{{ "name": "d", "upstream": "v1" }}] }}"#
    );
    parse("t.json", text.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A cache is refused on a method whose answers must not be replayed, each range is
/// checked at its path, and the memory bound holds; a good one compiles with its defaults.
#[test]
fn cache_validation() {
    let m = messages(&cache_cfg(
        r#"[ { "name": "grab", "method": "POST", "path": "/envelopes/{id}/grab", "cache": { "ttl_ms": 100 } },
             { "name": "open", "method": "GET", "path": "/envelopes/{id}", "cache": { "ttl_ms": 0, "max_entries": 0, "max_body_bytes": 20000000, "max_waiters": 0, "max_wait_ms": 60001 } },
             { "name": "big", "method": "GET", "path": "/big", "cache": { "ttl_ms": 60001, "max_entries": 1000000, "max_body_bytes": 16777216 } },
             { "name": "huge", "method": "*", "path": "/huge", "cache": { "ttl_ms": 10, "max_entries": 1000000, "max_body_bytes": 16777216 } } ]"#,
    ));
    for want in [
        "interfaces[0].cache: only GET and HEAD answers are cached; interface \"grab\" is POST",
        "interfaces[1].cache.ttl_ms: 0 is out of range; allowed 1..=60000",
        "interfaces[1].cache.max_entries: 0 is out of range; allowed 1..=1000000",
        "interfaces[1].cache.max_body_bytes: 20000000 is out of range; allowed 1..=16777216",
        "interfaces[1].cache.max_waiters: 0 is out of range; allowed 1..=100000",
        "interfaces[1].cache.max_wait_ms: 60001 is out of range; allowed 1..=60000",
        "interfaces[2].cache.ttl_ms: 60001 is out of range; allowed 1..=60000",
        "interfaces[3].cache.max_entries: max_entries × max_body_bytes is 16777216000000 bytes; at most 1073741824 (1 GiB) are allowed",
    ] {
        assert!(m.iter().any(|x| x == want), "missing {want:?} in {m:#?}");
    }
    assert_eq!(m.len(), 8, "{m:#?}");
    let c = cache_cfg(
        r#"[ { "name": "open", "method": "GET", "path": "/envelopes/{id}", "cache": { "ttl_ms": 250 } } ]"#,
    );
    let checked = check(&c).expect("valid");
    let spec = checked.interfaces[0].cache.clone().expect("compiled");
    assert_eq!(spec.ttl, std::time::Duration::from_millis(250));
    assert_eq!((spec.max_entries, spec.max_body_bytes), (10_000, 65_536));
    assert!(spec.vary_on_identity, "per-identity unless said otherwise");
    assert_eq!(spec.max_wait, std::time::Duration::from_secs(5));
}

/// A route's `upgrade` protocols are HTTP tokens, not `h2c`, each once, at most 8; the
/// tunnel bounds are range-checked; a good list compiles lowercased and matches any case.
#[test]
fn upgrade_fields() {
    let good = cfg(
        r#"[{"name": "d", "upstream": "v1", "upgrade": ["WebSocket"]}]"#,
        r#", "server": {"limits": {"max_upgraded_connections": 0, "upgrade_idle_timeout_ms": 100}}"#,
    );
    assert_eq!(messages(&good), Vec::<String>::new());
    let snap = crate::Snapshot::compile(&good).unwrap();
    let route = &snap.routes[0];
    assert_eq!(&*route.upgrade, [Box::<str>::from("websocket")]);
    assert!(route.allows_upgrade(b"websocket") && route.allows_upgrade(b"WEBSOCKET"));
    assert!(!route.allows_upgrade(b"websocket2") && !route.allows_upgrade(b""));
    let c = cfg(
        r#"[{"name": "d", "upstream": "v1", "upgrade": ["", "web socket", "H2C", "websocket", "WebSocket"]},
            {"name": "e", "match": {"apps": ["a"]}, "upstream": "v1",
             "upgrade": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}]"#,
        r#", "server": {"limits": {"max_upgraded_connections": 1000001, "upgrade_idle_timeout_ms": 99}}"#,
    );
    let m = messages(&c);
    let want = [
        "server.limits.max_upgraded_connections: 1000001 is out of range; allowed 0..=1000000",
        "server.limits.upgrade_idle_timeout_ms: 99 is out of range; allowed 100..=86400000",
        "routes[0].upgrade[0]: \"\": a protocol is 1..=64 bytes",
        "routes[0].upgrade[1]: \"web socket\" contains ' '",
        "routes[0].upgrade[2]: \"h2c\" is refused",
        "routes[0].upgrade[4]: \"WebSocket\" is listed twice",
        "routes[1].upgrade: 9 protocols; at most 8 are allowed",
    ];
    for w in want {
        assert!(m.iter().any(|x| x.starts_with(w)), "{w} not in {m:#?}");
    }
    assert_eq!(m.len(), want.len(), "{m:#?}");
}

/// `server.tracing`: the sampling ratio is a fraction; an unknown field or word is refused.
#[test]
fn tracing_checked() {
    let route = r#"[{"name": "d", "upstream": "v1"}]"#;
    let ok = cfg(
        route,
        r#", "server": {"tracing": {"sample_ratio": 1, "parent_sampled": "never"}}"#,
    );
    assert!(messages(&ok).is_empty(), "{:#?}", messages(&ok));
    let m = messages(&cfg(
        route,
        r#", "server": {"tracing": {"sample_ratio": 1.5}}"#,
    ));
    assert_eq!(
        m,
        ["server.tracing.sample_ratio: 1.5 is out of range; allowed 0..=1"]
    );
    let m = messages(&cfg(
        route,
        r#", "server": {"tracing": {"sample_ratio": -0.1}}"#,
    ));
    assert_eq!(m.len(), 1, "{m:#?}");
    for bad in [r#"{"sampled": 1}"#, r#"{"parent_sampled": "always"}"#] {
        let text = format!(
            r#"{{"schema_version": 1, "upstreams": {{"v1": {{"endpoints": ["127.0.0.1:9000"]}}}},
            "routes": {route}, "server": {{"tracing": {bad}}}}}"#
        );
        assert!(
            parse("t.json", text.as_bytes()).is_err(),
            "{bad} was accepted"
        );
    }
}

mod health;
mod upstream_tls;
