use std::net::IpAddr;

use http::HeaderMap;

use crate::matcher::MatchInput;
use crate::route::RouteInput;
use crate::validate::validate;

fn text(extra: &str) -> String {
    format!(
        r#"{{
  "schema_version": 1,
  "interfaces": [
    {{ "name": "grab", "method": "POST", "path": "/envelopes/{{id}}/grab" }},
    {{ "name": "share", "method": "POST", "path": "/envelopes/{{id}}/share" }}
  ],
  "upstreams": {{ "v1": {{ "endpoints": ["127.0.0.1:9000"] }}, "v2": {{ "endpoints": ["127.0.0.1:9001"] }} }},
  "routes": [ {{ "name": "default", "upstream": "v1" }},
              {{ "name": "grab-v2", "match": {{ "interfaces": ["grab"] }}, "upstream": "v2" }} ]{extra}
}}"#
    )
}

fn messages(extra: &str) -> Vec<String> {
    let c =
        crate::source::parse("t.json", text(extra).as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    validate(&c)
        .into_iter()
        .map(|i| format!("{}: {}", i.path, i.message))
        .collect()
}

fn snap(extra: &str) -> crate::Snapshot {
    crate::load("t.json", text(extra).as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot
}

fn has(m: &[String], want: &str) -> bool {
    m.iter().any(|x| x.starts_with(want))
}

/// Every limit mistake is reported, each at its own path.
#[test]
fn limit_validation() {
    let m = messages(
        r#", "limits": [
      { "name": "a", "rate": "5/fortnight" },
      { "name": "b", "rate": "5/s", "burst": 0, "key": ["user", "user", {"header": "bad header"}] },
      { "name": "b", "rate": "0/s", "exceptions": { "alice": "5/s", "user:bob": "x",
        "interface:grb": "5/s", "ip:1.2.3.4": "5/s" } }
    ]"#,
    );
    for want in [
        "limits[0].rate: \"5/fortnight\": unknown unit",
        "limits[1].burst: 0 is out of range",
        "limits[1].key[1]: this key part is listed twice",
        "limits[1].key[2].header: \"bad header\" is not a valid HTTP header name",
        "limits[2].name: duplicate limit name",
        "limits[2].rate: \"0/s\": the count must be",
        "limits[2].exceptions.alice: \"alice\" is not an exception key",
        "limits[2].exceptions.user:bob: \"x\" is not a rate",
        "limits[2].exceptions.interface:grb: unknown interface \"grb\"; did you mean \"grab\"?",
        "limits[2].exceptions[\"ip:1.2.3.4\"]: \"ip\" cannot have exceptions",
    ] {
        assert!(has(&m, want), "missing {want:?} in {m:#?}");
    }
    assert_eq!(m.len(), 10, "{m:#?}");
}

/// Fallback and plan mistakes, including ties that exist only once a plan is on.
#[test]
fn fallback_and_plan_validation() {
    let m = messages(
        r#", "fallbacks": [
      { "name": "f1", "match": { "interfaces": ["share"] }, "fraction": "rest",
        "response": { "status": 700, "headers": { "content-length": "3" } } }
    ],
    "plans": {
      "peak": { "fallbacks": [ { "name": "f2", "match": { "interfaces": ["share"] },
                                 "response": {} } ],
                "disable": ["nope"] },
      "calm": { "disable": ["f1"] }
    },
    "active_plans": ["peek", "calm"]"#,
    );
    for want in [
        "fallbacks[0].fraction: \"rest\": a fraction is a percentage",
        "fallbacks[0].response.status: 700 is out of range; allowed 200..=599",
        "fallbacks[0].response.headers.content-length: \"content-length\" is set by the gateway",
        "plans.peak.disable[0]: no base limit or fallback is named \"nope\"",
        "plans.peak.fallbacks[0]: fallbacks \"f1\" (fallbacks[0]) and \"f2\" (plans.peak.fallbacks[0]) can match the same request with the same specificity when plan \"peak\" is active",
        "active_plans[0]: unknown plan \"peek\"; did you mean \"peak\"?",
    ] {
        assert!(has(&m, want), "missing {want:?} in {m:#?}");
    }
    assert_eq!(m.len(), 6, "{m:#?}");
}

/// Two active plans may not change the same rule.
#[test]
fn plan_conflicts() {
    let m = messages(
        r#", "limits": [ { "name": "l", "rate": "5/s" } ],
    "plans": {
      "a": { "limits": [ { "name": "l", "rate": "1/s" } ] },
      "b": { "disable": ["l"] }
    },
    "active_plans": ["a", "b"]"#,
    );
    assert_eq!(
        m,
        ["plans.b.disable[0]: plans \"a\" and \"b\" are both active and both change limit \"l\""]
    );
}

/// Breaker mistakes.
#[test]
fn breaker_validation() {
    let m = messages(
        r#", "breakers": [
      { "name": "b1", "upstream": "v3", "route": "defualt", "window_ms": 10,
        "slow_ratio": "50%", "error_ratio": "0%" },
      { "name": "b2", "upstream": "v1", "alternate_upstream": "v1",
        "response": { "status": 503 } },
      { "name": "b3", "upstream": "v1" }
    ]"#,
    );
    for want in [
        "breakers[0].upstream: unknown upstream \"v3\"",
        "breakers[0].route: unknown route \"defualt\"; did you mean \"default\"?",
        "breakers[0].window_ms: 10 is out of range",
        "breakers[0].error_ratio: 0% would open",
        "breakers[0].slow_ratio: slow_ratio needs slow_call_ms",
        "breakers[1].alternate_upstream: the alternate must differ",
        "breakers[1].response: give either `response` or `alternate_upstream`",
        "breakers[2]: breakers[1] already guards this upstream",
    ] {
        assert!(has(&m, want), "missing {want:?} in {m:#?}");
    }
    assert_eq!(m.len(), 8, "{m:#?}");
}

/// A plan replaces a base rule in place (check order kept), adds new ones after, and
/// disables others.
#[test]
fn plans_replace_add_disable() {
    let s = snap(
        r#", "limits": [ { "name": "a", "rate": "5/s" }, { "name": "b", "rate": "5/s" },
                  { "name": "c", "rate": "5/s" } ],
    "plans": { "peak": { "limits": [ { "name": "d", "rate": "1/s" }, { "name": "b", "rate": "1/s" } ],
                         "disable": ["c"] } },
    "active_plans": ["peak"]"#,
    );
    let g = &s.governance;
    let names: Vec<&str> = g.limits.iter().map(|l| &*l.name).collect();
    assert_eq!(names, ["a", "b", "d"]);
    assert_eq!(g.limits[1].quotas[0].rate.count, 1, "b is the plan's");
    assert_eq!(&*g.active_plans[0], "peak");
}

fn input<'a>(h: &'a HeaderMap, app: Option<&'a str>, user: Option<&'a str>) -> RouteInput<'a> {
    RouteInput {
        m: MatchInput {
            app,
            interface: Some(crate::InterfaceId(1)),
            user,
            headers: h,
            params: &[],
        },
        client_ip: Some(IpAddr::from([10, 1, 2, 3])),
        random: 7,
        pair: Default::default(),
    }
}

/// A 30% fallback takes 30% of users (within 4σ over 100,000), always the same ones, and a
/// request without a user is placed by its client IP.
#[test]
fn fallback_fraction() {
    let s = snap(
        r#", "fallbacks": [ { "name": "f", "match": { "interfaces": ["share"] }, "fraction": "30%",
                       "response": {} } ]"#,
    );
    let h = HeaderMap::new();
    let n = 100_000;
    let users: Vec<String> = (0..n).map(|i| format!("user-{i}")).collect();
    let hit = users
        .iter()
        .filter(|u| s.fallback(&input(&h, None, Some(u))).is_some())
        .count();
    let sigma = (n as f64 * 0.3 * 0.7).sqrt();
    assert!((hit as f64 - 30_000.0).abs() <= 4.0 * sigma, "{hit}");
    for u in users.iter().take(1000) {
        let a = s.fallback(&input(&h, None, Some(u))).is_some();
        let b = s.fallback(&input(&h, Some("other-app"), Some(u))).is_some();
        assert_eq!(a, b, "{u}");
    }
    let by_ip = s.fallback(&input(&h, None, None)).map(|d| d.bucket);
    let again = s.fallback(&input(&h, None, None)).map(|d| d.bucket);
    assert_eq!(by_ip, again);
    let f = s.fallback(&input(&h, None, Some("user-0")));
    if let Some(d) = f {
        let body: serde_json::Value = serde_json::from_slice(&d.rule.response.body).unwrap();
        assert_eq!(body, serde_json::json!({"error": "degraded", "rule": "f"}));
        assert_eq!(d.rule.response.status, 503);
    }
}

/// Keys differ by every part of the tuple, and a missing part falls back as configured.
#[test]
fn limit_keys() {
    let s = snap(
        r#", "limits": [ { "name": "u", "key": ["user"], "rate": "5/s" },
                  { "name": "au", "key": ["app", "user"], "rate": "5/s" },
                  { "name": "h", "key": [{"header": "x-device"}], "rate": "5/s", "when_missing": "shared" },
                  { "name": "i", "key": ["interface"], "rate": "5/s", "when_missing": "skip" } ]"#,
    );
    let g = &s.governance;
    let h = HeaderMap::new();
    let key = |rule: usize, app, user| g.limits[rule].key_of(&s, &input(&h, app, user));
    assert_ne!(key(0, None, Some("alice")), key(0, None, Some("bob")));
    assert_eq!(
        key(0, Some("x"), Some("alice")),
        key(0, Some("y"), Some("alice"))
    );
    assert_ne!(
        key(1, Some("x"), Some("alice")),
        key(1, Some("y"), Some("alice"))
    );
    // ("ab", "c") and ("a", "bc") are different tuples.
    assert_ne!(key(1, Some("ab"), Some("c")), key(1, Some("a"), Some("bc")));
    // No user: keyed by client IP, so not equal to a user's key.
    assert!(key(0, None, None).is_some());
    assert_ne!(key(0, None, None), key(0, None, Some("10.1.2.3")));
    // Header missing and `shared`: one key for all.
    assert_eq!(key(2, None, Some("a")), key(2, None, Some("b")));
    let mut with = HeaderMap::new();
    with.insert("x-device", "d1".parse().unwrap());
    assert_ne!(
        g.limits[2].key_of(&s, &input(&with, None, None)),
        key(2, None, None)
    );
    // Interface present: keyed by its name.
    assert!(key(3, None, None).is_some());
}

/// A route-specific breaker wins over an upstream-wide one for its route only.
#[test]
fn breaker_precedence() {
    let s = snap(
        r#", "breakers": [ { "name": "all-v2", "upstream": "v2" },
                    { "name": "grab-v2", "upstream": "v2", "route": "grab-v2" } ]"#,
    );
    let v2 = s.upstream_by_name("v2").unwrap();
    let v1 = s.upstream_by_name("v1").unwrap();
    assert_eq!(s.breaker_for(v2, Some(1)), Some(1));
    assert_eq!(s.breaker_for(v2, Some(0)), Some(0));
    assert_eq!(s.breaker_for(v2, None), Some(0));
    assert_eq!(s.breaker_for(v1, Some(0)), None);
}

/// Configs without the new sections load as before (every field defaults).
#[test]
fn old_configs_still_load() {
    let s = snap("");
    assert!(s.governance.limits.is_empty() && s.governance.fallbacks.is_empty());
    assert!(s.governance.breakers.is_empty());
}

/// A dry-run fallback never answers: the request path sees only the enforced ones (a less
/// specific enforced rule still answers where the dry run matches), and the shadow lookup
/// finds the dry run exactly for the users in its fraction, by the bucket formula.
#[test]
fn dry_run_fallback_is_shadow_only() {
    let s = snap(
        r#", "fallbacks": [
      { "name": "try", "match": { "interfaces": ["share"], "apps": ["a1"] }, "fraction": "30%",
        "mode": "dry_run", "response": {} },
      { "name": "half", "match": { "interfaces": ["share"] }, "fraction": "50%", "response": {} } ]"#,
    );
    assert!(s.has_shadow());
    let h = HeaderMap::new();
    let bucket = crate::bucket::bucket;
    let (mut real, mut shadow) = (0, 0);
    for u in (0..10_000).map(|i| format!("user-{i}")) {
        let r = input(&h, Some("a1"), Some(&u));
        let f = s.fallback(&r).map(|d| &*d.rule.name);
        assert_eq!(f, (bucket("half", &u) < 500_000).then_some("half"), "{u}");
        let sf = s.shadow_fallback(&r).map(|d| &*d.rule.name);
        assert_eq!(sf, (bucket("try", &u) < 300_000).then_some("try"), "{u}");
        real += usize::from(f.is_some());
        shadow += usize::from(sf.is_some());
        let other = input(&h, Some("a2"), Some(&u));
        assert!(
            s.shadow_fallback(&other).is_none(),
            "the enforced rule is the best there"
        );
    }
    assert!(real > 4_000 && shadow > 2_500, "{real} {shadow}");
    let plain = snap(r#", "fallbacks": [ { "name": "half", "fraction": "50%", "response": {} } ]"#);
    assert!(!plain.has_shadow());
    assert!(plain.shadow_fallback(&input(&h, None, Some("u"))).is_none());
}

/// A `path_param` key needs `match.interfaces`, each of whose templates has the parameter;
/// each mistake is reported at the key part's path.
#[test]
fn path_param_key_validation() {
    let m = messages(
        r#", "limits": [
      { "name": "a", "rate": "5/s", "key": [{"path_param": "id"}] },
      { "name": "b", "rate": "5/s", "match": {"interfaces": ["grab", "share"]}, "key": [{"path_param": "uid"}] },
      { "name": "c", "rate": "5/s", "match": {"interfaces": ["grab"]}, "key": [{"path_param": "id"}, {"path_param": "id"}] }
    ]"#,
    );
    for want in [
        "limits[0].key[0].path_param: a path_param key needs match.interfaces, each with {id}",
        "limits[1].key[0].path_param: interface(s) [\"grab\", \"share\"] of match.interfaces have no {uid}",
        "limits[2].key[1]: this key part is listed twice",
    ] {
        assert!(has(&m, want), "missing {want:?} in {m:#?}");
    }
    assert_eq!(m.len(), 3, "{m:#?}");
    assert!(
        messages(
            r#", "limits": [ { "name": "a", "rate": "5/s", "match": {"interfaces": ["grab", "share"]}, "key": [{"path_param": "id"}] } ]"#
        )
        .is_empty()
    );
}

/// A `path_param` key counts each envelope apart, whatever its percent-encoding, and the
/// user's quota is not the envelope's; explain shows the value.
#[test]
fn path_param_keys() {
    let s = snap(
        r#", "limits": [ { "name": "hot", "match": {"interfaces": ["grab"]}, "key": [{"path_param": "id"}], "rate": "5/s" },
                  { "name": "hot_user", "match": {"interfaces": ["grab", "share"]}, "key": [{"path_param": "id"}, "user"], "rate": "5/s" } ]"#,
    );
    let h = HeaderMap::new();
    let key = |rule: usize, path: &str, user: Option<&str>| {
        let c = s.classify(crate::RequestParts {
            method: &http::Method::POST,
            path,
            query: None,
            headers: &h,
        });
        let r = RouteInput {
            m: MatchInput {
                app: None,
                interface: c.interface,
                user,
                headers: &h,
                params: &c.params,
            },
            client_ip: Some(IpAddr::from([10, 1, 2, 3])),
            random: 0,
            pair: Default::default(),
        };
        let g = &s.governance;
        (
            g.limits[rule].key_of(&s, &r),
            g.limits[rule].describe_key(&s, &r).map(|(k, _)| k),
        )
    };
    let (e1, text) = key(0, "/envelopes/e1/grab", Some("alice"));
    assert_eq!(text.as_deref(), Some("path_param id=\"e1\""));
    assert_eq!(
        e1,
        key(0, "/envelopes/e1/grab", Some("bob")).0,
        "one quota per envelope"
    );
    assert_eq!(
        e1,
        key(0, "/envelopes/%651/grab", None).0,
        "decoded before hashing"
    );
    assert_ne!(e1, key(0, "/envelopes/e2/grab", Some("alice")).0);
    // Both interfaces share the parameter's slot; with the user, each pair is a key.
    let (a, _) = key(1, "/envelopes/e1/grab", Some("alice"));
    assert_eq!(a, key(1, "/envelopes/e1/share", Some("alice")).0);
    assert_ne!(a, key(1, "/envelopes/e1/grab", Some("bob")).0);
    assert_eq!(s.governance.limits[0].key_parts(), ["path_param:id"]);
}

/// Limit keys hash the tuple's bytes (tag, length, value per part) whatever the path taken:
/// a short one-part key, a long one, two parts, and a rule with no key (hashed at load).
#[test]
fn limit_key_hashes() {
    use xxhash_rust::xxh3::xxh3_64;
    let s = snap(
        r#", "limits": [ { "name": "u", "key": ["user"], "rate": "5/s" },
                  { "name": "ua", "key": ["user", "app"], "rate": "5/s" },
                  { "name": "all", "rate": "5/s" } ]"#,
    );
    let piece = |v: &str| {
        let mut b = vec![1u8];
        b.extend_from_slice(&(v.len() as u32).to_le_bytes());
        b.extend_from_slice(v.as_bytes());
        b
    };
    let h = HeaderMap::new();
    let long = "x".repeat(300);
    for user in ["bob", &"y".repeat(59), &"z".repeat(60), &long] {
        let r = input(&h, Some("app1"), Some(user));
        let [u, ua, all] = [0, 1, 2].map(|i| s.governance.limits[i].key_of(&s, &r).unwrap());
        assert_eq!(u.hash, xxh3_64(&piece(user)), "{}", user.len());
        let mut both = piece(user);
        both.extend(piece("app1"));
        assert_eq!(ua.hash, xxh3_64(&both));
        assert_eq!(all.hash, xxh3_64(&[]));
    }
}
