use http::{HeaderMap, Method};

use super::*;
use crate::RequestParts;

fn snap(routes: &str, identity: &str) -> Snapshot {
    let text = format!(
        r#"{{
  "schema_version": 1,
  "identity": {identity},
  "interfaces": [
    {{ "name": "grab", "method": "POST", "path": "/apps/{{app}}/envelopes/{{id}}/grab" }},
    {{ "name": "open", "method": "GET", "path": "/apps/{{app}}/envelopes/{{id}}" }},
    {{ "name": "any", "method": "*", "path": "/any" }}
  ],
  "upstreams": {{ "v1": {{ "endpoints": ["127.0.0.1:9000"] }}, "v2": {{ "endpoints": ["127.0.0.1:9001"] }} }},
  "routes": {routes}
}}"#
    );
    crate::load("t.json", text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot
}

const ROUTES: &str = r#"[
  {"name": "default", "upstream": "v1"},
  {"name": "douyin", "match": {"apps": ["douyin"]}, "upstream": "v2"},
  {"name": "douyin-open", "match": {"apps": ["douyin"], "interfaces": ["open"]}, "upstream": "v1"},
  {"name": "vip", "match": {"users": ["alice"]}, "upstream": "v2"},
  {"name": "canary-header", "match": {"headers": {"x-canary": "v2"}}, "upstream": "v2"}
]"#;

fn route_name<'s>(
    s: &'s Snapshot,
    app: Option<&str>,
    iface: Option<&str>,
    user: Option<&str>,
    h: &HeaderMap,
) -> &'s str {
    let interface =
        iface.map(|n| InterfaceId(s.interfaces.iter().position(|i| &*i.name == n).unwrap() as u32));
    let input = crate::RouteInput {
        m: crate::MatchInput {
            app,
            interface,
            user,
            headers: h,
            params: &[],
        },
        client_ip: None,
        random: 0,
        pair: Default::default(),
    };
    &s.route(&input).expect("a default route exists").rule.name
}

/// The most specific matching rule wins: user over header over interface over app.
#[test]
fn precedence() {
    let s = snap(ROUTES, "{}");
    let none = HeaderMap::new();
    assert_eq!(route_name(&s, None, None, None, &none), "default");
    assert_eq!(
        route_name(&s, Some("douyin"), Some("grab"), None, &none),
        "douyin"
    );
    assert_eq!(
        route_name(&s, Some("douyin"), Some("open"), None, &none),
        "douyin-open"
    );
    assert_eq!(
        route_name(&s, Some("kuaishou"), Some("open"), None, &none),
        "default"
    );
    assert_eq!(
        route_name(&s, Some("douyin"), Some("open"), Some("alice"), &none),
        "vip"
    );
    let mut h = HeaderMap::new();
    h.insert("x-canary", "v2".parse().unwrap());
    assert_eq!(
        route_name(&s, Some("douyin"), Some("open"), Some("bob"), &h),
        "canary-header"
    );
    assert_eq!(
        route_name(&s, Some("douyin"), Some("open"), Some("alice"), &h),
        "vip"
    );
}

/// Interfaces are found by method and template; `*` matches any method; unknown paths and
/// wrong methods have no interface.
#[test]
fn classify_interfaces() {
    let s = snap(ROUTES, "{}");
    let h = HeaderMap::new();
    let c = |m: Method, p: &'static str| {
        s.classify(RequestParts {
            method: &m,
            path: p,
            query: None,
            headers: &h,
        })
        .interface
        .map(|i| s.interface_name(i).to_owned())
    };
    assert_eq!(
        c(Method::POST, "/apps/d/envelopes/7/grab").as_deref(),
        Some("grab")
    );
    assert_eq!(
        c(Method::GET, "/apps/d/envelopes/7").as_deref(),
        Some("open")
    );
    assert_eq!(c(Method::POST, "/apps/d/envelopes/7"), None);
    assert_eq!(c(Method::DELETE, "/any").as_deref(), Some("any"));
    assert_eq!(c(Method::GET, "/nope"), None);
}

/// Each extractor kind reads its value; missing or empty values are `None`.
#[test]
fn extractors() {
    let s = snap(
        ROUTES,
        r#"{"app": {"path_param": "app"}, "user": {"query": "uid"}}"#,
    );
    let h = HeaderMap::new();
    let m = Method::POST;
    let c = s.classify(RequestParts {
        method: &m,
        path: "/apps/douyin/envelopes/7/grab",
        query: Some("uid=u%2042"),
        headers: &h,
    });
    assert_eq!(c.app.as_deref(), Some("douyin"));
    assert_eq!(c.user.as_deref(), Some("u 42"));
    let c = s.classify(RequestParts {
        method: &m,
        path: "/other",
        query: Some("uid="),
        headers: &h,
    });
    assert_eq!((c.app, c.user), (None, None));

    let s = snap(
        ROUTES,
        r#"{"app": {"header": "x-app-id"}, "user": {"cookie": "uid"}}"#,
    );
    let mut h = HeaderMap::new();
    h.insert("x-app-id", "kuaishou".parse().unwrap());
    h.insert("cookie", "a=1; uid=bob".parse().unwrap());
    let c = s.classify(RequestParts {
        method: &m,
        path: "/x",
        query: None,
        headers: &h,
    });
    assert_eq!(c.app.as_deref(), Some("kuaishou"));
    assert_eq!(c.user.as_deref(), Some("bob"));
}

/// An ID longer than `max_id_bytes` is dropped (the request is anonymous) and flagged;
/// one at the bound is kept.
#[test]
fn ids_over_the_bound_are_invalid() {
    let s = snap(
        ROUTES,
        r#"{"app": {"header": "x-app-id"}, "user": {"query": "uid"}, "max_id_bytes": 8, "on_invalid": "reject"}"#,
    );
    assert!(s.rejects_invalid_id());
    let m = Method::GET;
    let mut h = HeaderMap::new();
    h.insert("x-app-id", "12345678".parse().unwrap());
    let c = s.classify(RequestParts {
        method: &m,
        path: "/x",
        query: Some("uid=123456789"),
        headers: &h,
    });
    assert_eq!(c.app.as_deref(), Some("12345678"));
    assert_eq!(c.user, None);
    assert!(c.invalid_id);
    h.insert("x-app-id", "123456789".parse().unwrap());
    let c = s.classify(RequestParts {
        method: &m,
        path: "/x",
        query: Some("uid=12345678"),
        headers: &h,
    });
    assert_eq!(
        (c.app, c.user.as_deref(), c.invalid_id),
        (None, Some("12345678"), true)
    );
    let s = snap(ROUTES, "{}");
    assert!(!s.rejects_invalid_id());
    let long = "u".repeat(10_000);
    h.insert("x-user-id", long.parse().unwrap());
    let c = s.classify(RequestParts {
        method: &m,
        path: "/x",
        query: None,
        headers: &h,
    });
    assert_eq!((c.user, c.invalid_id), (None, true), "default bound 128");
}

/// With many app-keyed rules, lookups still find the right one (the index, not a scan).
#[test]
fn many_rules() {
    let mut routes = vec![r#"{"name": "default", "upstream": "v1"}"#.to_owned()];
    for i in 0..5000 {
        routes.push(format!(r#"{{"name": "r{i}", "match": {{"apps": ["app{i}"], "interfaces": ["grab"]}}, "upstream": "v2"}}"#));
    }
    let s = snap(&format!("[{}]", routes.join(",")), "{}");
    let h = HeaderMap::new();
    assert_eq!(
        route_name(&s, Some("app4321"), Some("grab"), None, &h),
        "r4321"
    );
    assert_eq!(
        route_name(&s, Some("app4321"), Some("open"), None, &h),
        "default"
    );
}

/// Names are precomputed: a decision carries its rule's and upstream's names as shared
/// strings, and the snapshot names interfaces and upstreams by ID.
#[test]
fn names_by_id() {
    let s = snap(ROUTES, "{}");
    let h = HeaderMap::new();
    let input = crate::RouteInput {
        m: crate::MatchInput {
            app: Some("douyin"),
            interface: None,
            user: None,
            headers: &h,
            params: &[],
        },
        client_ip: None,
        random: 0,
        pair: Default::default(),
    };
    let d = s.route(&input).unwrap();
    assert_eq!(&**d.rule_name, "douyin");
    assert_eq!(&**d.upstream_name, "v2");
    assert!(std::sync::Arc::ptr_eq(
        d.upstream_name,
        s.upstream_name(d.upstream)
    ));
    let v1 = s.upstream_by_name("v1").unwrap();
    assert_eq!(&**s.upstream_name(v1), "v1");
    assert_eq!(&**s.interface_name(InterfaceId(1)), "open");
}

/// Every header a rule reads is named once (what the access log must carry for a replay):
/// route conditions, the override and `no_user_key` headers, limit conditions and keys,
/// fallback conditions and `no_user_key`; the identity extractor's is not.
#[test]
fn headers_read() {
    let text = r#"{
  "schema_version": 1,
  "identity": { "user": { "header": "x-user-id" } },
  "interfaces": [ { "name": "grab", "method": "POST", "path": "/grab" } ],
  "upstreams": { "v1": { "endpoints": ["127.0.0.1:9000"] }, "v2": { "endpoints": ["127.0.0.1:9001"] } },
  "routes": [
    { "name": "default", "upstream": "v1" },
    { "name": "gray", "match": { "headers": { "x-env": "gray" } }, "upstream": "v2" },
    { "name": "canary", "match": { "interfaces": ["grab"] },
      "split": [ { "upstream": "v2", "weight": "5%" }, { "upstream": "v1", "weight": "rest" } ],
      "override_header": "x-canary", "override_from": ["10.0.0.0/8"], "no_user_key": { "header": "x-device" } }
  ],
  "limits": [ { "name": "per-device", "match": { "headers": { "x-tier": "free" } },
                "key": [ { "header": "x-device-id" } ], "rate": "5/s" } ],
  "fallbacks": [ { "name": "off", "match": { "headers": { "x-env": "gray" }, "interfaces": ["grab"] },
                   "no_user_key": { "header": "x-session" },
                   "response": { "status": 200, "body": {} } } ]
}"#;
    let s = crate::load("t.json", text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot;
    let names: Vec<String> = s.headers_read().iter().map(|h| h.to_string()).collect();
    assert_eq!(
        names,
        [
            "x-canary",
            "x-device",
            "x-device-id",
            "x-env",
            "x-session",
            "x-tier"
        ]
    );
}
