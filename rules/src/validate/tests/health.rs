//! Validation of `upstreams.NAME.health_check`, `outlier` and `resolve_ttl_ms`.

use std::time::Duration;

use crate::source::parse;

use super::messages;

fn with_upstream(up: &str) -> crate::model::Config {
    let text = format!(
        r#"{{"schema_version": 1, "upstreams": {{"v1": {up}}},
            "routes": [{{"name": "d", "upstream": "v1"}}]}}"#
    );
    parse("t.json", text.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Without the fields: outlier ejection on with its conservative defaults, no active
/// checks, names resolved again every 30 s.
#[test]
fn defaults_compile() {
    let c = with_upstream(r#"{"endpoints": ["127.0.0.1:9000"]}"#);
    assert_eq!(messages(&c), Vec::<String>::new());
    let loaded = crate::load("t.json", serde_json::to_vec(&c).unwrap().as_slice()).unwrap();
    let u = &loaded.snapshot.upstreams[0];
    assert_eq!(u.health_check, None);
    let o = u.outlier.expect("on by default");
    assert_eq!(
        (o.consecutive_failures, o.base_ejection, o.max_ejection),
        (5, Duration::from_secs(30), Duration::from_secs(300))
    );
    assert_eq!(o.max_ejected_percent, 10);
    assert_eq!(u.resolve_ttl, Duration::from_secs(30));
}

/// A full health check compiles to typed values; `enabled: false` or a 0% cap turns
/// ejection off.
#[test]
fn configured_fields_compile() {
    let c = with_upstream(
        r#"{"endpoints": ["127.0.0.1:9000"], "resolve_ttl_ms": 1000,
            "health_check": {"path": "/healthz?deep=1", "interval_ms": 200, "timeout_ms": 100,
              "healthy_threshold": 1, "unhealthy_threshold": 2,
              "expected_status": [200, 204], "host": "health.internal"},
            "outlier": {"enabled": false}}"#,
    );
    assert_eq!(messages(&c), Vec::<String>::new());
    let loaded = crate::load("t.json", serde_json::to_vec(&c).unwrap().as_slice()).unwrap();
    let u = &loaded.snapshot.upstreams[0];
    let h = u.health_check.as_ref().unwrap();
    assert_eq!(&*h.path, "/healthz?deep=1");
    assert_eq!(
        (h.interval, h.timeout),
        (Duration::from_millis(200), Duration::from_millis(100))
    );
    assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (1, 2));
    assert_eq!(h.expected_status, (200, 204));
    assert_eq!(h.host.as_deref(), Some("health.internal"));
    assert_eq!(u.outlier, None);
    assert_eq!(u.resolve_ttl, Duration::from_secs(1));

    let zero = with_upstream(
        r#"{"endpoints": ["127.0.0.1:9000"], "outlier": {"max_ejected_percent": 0}}"#,
    );
    let loaded = crate::load("t.json", serde_json::to_vec(&zero).unwrap().as_slice()).unwrap();
    assert_eq!(loaded.snapshot.upstreams[0].outlier, None);
}

/// Every out-of-range field is reported at its JSON path, with the allowed range.
#[test]
fn out_of_range_fields_are_located() {
    let c = with_upstream(
        r#"{"endpoints": ["127.0.0.1:9000"], "resolve_ttl_ms": 5,
            "health_check": {"path": "healthz", "interval_ms": 5, "timeout_ms": 0,
              "healthy_threshold": 0, "unhealthy_threshold": 101,
              "expected_status": [600, 99], "host": "bad\nhost"},
            "outlier": {"consecutive_failures": 0, "base_ejection_ms": 0,
              "max_ejection_ms": 86400001, "max_ejected_percent": 101}}"#,
    );
    assert_eq!(
        messages(&c),
        [
            "upstreams.v1.resolve_ttl_ms: 5 is out of range; allowed 100..=86400000",
            "upstreams.v1.health_check.path: \"healthz\" is not a request path: it must start with `/` and hold no spaces or control characters",
            "upstreams.v1.health_check.interval_ms: 5 is out of range; allowed 10..=3600000",
            "upstreams.v1.health_check.timeout_ms: 0 is out of range; allowed 1..=60000",
            "upstreams.v1.health_check.healthy_threshold: 0 is out of range; allowed 1..=100",
            "upstreams.v1.health_check.unhealthy_threshold: 101 is out of range; allowed 1..=100",
            "upstreams.v1.health_check.expected_status[0]: 600 is out of range; allowed 100..=599",
            "upstreams.v1.health_check.expected_status[1]: 99 is out of range; allowed 100..=599",
            "upstreams.v1.health_check.expected_status: [600, 99]: the lowest status is above the highest",
            "upstreams.v1.health_check.host: \"bad\\nhost\" is not a valid Host header value",
            "upstreams.v1.outlier.consecutive_failures: 0 is out of range; allowed 1..=1000",
            "upstreams.v1.outlier.base_ejection_ms: 0 is out of range; allowed 1..=3600000",
            "upstreams.v1.outlier.max_ejection_ms: 86400001 is out of range; allowed 1..=86400000",
            "upstreams.v1.outlier.max_ejected_percent: 101 is out of range; allowed 0..=100",
        ]
    );
}

/// A check that may outlast its interval, a backoff cap below its base, and an unknown
/// field are refused.
#[test]
fn inconsistent_fields_are_refused() {
    let c = with_upstream(
        r#"{"endpoints": ["127.0.0.1:9000"],
            "health_check": {"path": "/h", "interval_ms": 100, "timeout_ms": 500},
            "outlier": {"base_ejection_ms": 1000, "max_ejection_ms": 500}}"#,
    );
    assert_eq!(
        messages(&c),
        [
            "upstreams.v1.health_check.timeout_ms: 500 is longer than interval_ms (100); allowed 1..=100",
            "upstreams.v1.outlier.max_ejection_ms: 500 is shorter than base_ejection_ms (1000); allowed 1000..=86400000",
        ]
    );
    let text = r#"{"schema_version": 1, "upstreams": {"v1": {"endpoints": ["127.0.0.1:9000"],
        "outlier": {"consecutive_failure": 3}}}, "routes": [{"name": "d", "upstream": "v1"}]}"#;
    let e = parse("t.json", text.as_bytes()).unwrap_err().to_string();
    assert!(e.contains("consecutive_failure"), "{e}");
}
