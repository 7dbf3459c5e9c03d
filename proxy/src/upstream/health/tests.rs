use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

fn spec(consecutive: u32, base_ms: u64, max_ms: u64, percent: u32) -> OutlierSpec {
    OutlierSpec {
        consecutive_failures: consecutive,
        base_ejection: Duration::from_millis(base_ms),
        max_ejection: Duration::from_millis(max_ms),
        max_ejected_percent: percent,
    }
}

fn endpoints(n: usize) -> Vec<EndpointHealth> {
    (0..n).map(|_| EndpointHealth::default()).collect()
}

/// Fail endpoint `i` of `eps` `times` times at `now`; the ejection, if the last one ejected.
fn fail(o: &Outlier, eps: &[EndpointHealth], i: usize, times: u32, now: u64) -> Option<Duration> {
    let mut last = None;
    for _ in 0..times {
        last = o.failed(&eps[i], eps.iter(), now);
    }
    last
}

/// The backoff doubles per ejection in a row and stops at the cap.
#[test]
fn ejection_length_doubles_up_to_the_cap() {
    let (base, max) = (Duration::from_millis(100), Duration::from_millis(1000));
    let lengths: Vec<u64> = (0..6)
        .map(|k| ejection_length(k, base, max).as_millis() as u64)
        .collect();
    assert_eq!(lengths, [100, 200, 400, 800, 1000, 1000]);
    // No overflow however many.
    assert_eq!(ejection_length(u32::MAX, base, max), max);
}

/// The share cap rounds down, allows one of two or more, and none of a lone endpoint.
#[test]
fn max_ejected_share() {
    assert_eq!(max_ejected(1, 100), 0);
    assert_eq!(max_ejected(2, 10), 1);
    assert_eq!(max_ejected(3, 50), 1);
    assert_eq!(max_ejected(3, 67), 2);
    assert_eq!(max_ejected(3, 100), 3);
    assert_eq!(max_ejected(20, 10), 2);
    assert_eq!(max_ejected(20, 0), 0);
}

/// `consecutive_failures` failures in a row eject; a success in between starts over.
#[test]
fn consecutive_failures_eject_and_success_resets() {
    let o = Outlier::new(spec(3, 100, 1000, 100));
    let eps = endpoints(3);
    assert_eq!(fail(&o, &eps, 0, 2, 10), None);
    eps[0].succeeded();
    assert_eq!(fail(&o, &eps, 0, 2, 10), None);
    assert!(eps[0].usable(&mut || 10));
    assert_eq!(fail(&o, &eps, 0, 1, 10), Some(Duration::from_millis(100)));
    assert!(!eps[0].usable(&mut || 10));
    assert!(!eps[0].usable(&mut || 109));
    assert!(
        eps[0].usable(&mut || 110),
        "the ejection ends by time alone"
    );
    assert_eq!(eps[0].snapshot(50).state, "ejected");
    assert_eq!(eps[0].snapshot(50).ejected_for_ms, Some(60));
    assert_eq!(eps[0].snapshot(50).reason, Some("consecutive_failures"));
}

/// An endpoint ejected again soon after its last ejection ended waits twice as long, up
/// to the cap; after a quiet spell of `max_ejection` the backoff starts from the base.
#[test]
fn repeated_ejections_back_off_and_quiet_forgives() {
    let o = Outlier::new(spec(1, 100, 400, 100));
    let eps = endpoints(2);
    let mut now = 1;
    let mut lengths = Vec::new();
    for _ in 0..4 {
        let l = fail(&o, &eps, 0, 1, now).expect("ejected");
        lengths.push(l.as_millis() as u64);
        now += l.as_millis() as u64 + 10; // back, and failing again at once
    }
    assert_eq!(lengths, [100, 200, 400, 400]);
    // Quiet for longer than max_ejection after the last one ended.
    now += 400;
    assert_eq!(fail(&o, &eps, 0, 1, now), Some(Duration::from_millis(100)));
}

/// Never more than the cap's share is ejected at once: the next failing endpoint stays in
/// (with its count) until an ejection ends, then is ejected at its next failure.
#[test]
fn cap_keeps_endpoints_in() {
    let o = Outlier::new(spec(2, 100, 1000, 34)); // 1 of 3
    let eps = endpoints(3);
    assert!(fail(&o, &eps, 0, 2, 10).is_some());
    assert_eq!(fail(&o, &eps, 1, 5, 10), None, "capped");
    assert!(eps[1].usable(&mut || 10));
    assert!(
        fail(&o, &eps, 1, 1, 111).is_some(),
        "room again once 0 is back"
    );
    // With 0% nothing is ever ejected.
    let none = Outlier::new(spec(1, 100, 1000, 0));
    let eps = endpoints(3);
    assert_eq!(fail(&none, &eps, 0, 10, 10), None);
}

/// Failing active checks take an endpoint out; coming back by its checks ends a passive
/// ejection too, but passing checks that change nothing leave an ejection alone.
#[test]
fn check_verdicts_move_the_endpoint() {
    let o = Outlier::new(spec(1, 10_000, 10_000, 100));
    let eps = endpoints(2);
    assert!(fail(&o, &eps, 1, 1, 1).is_some());
    assert!(!eps[1].set_checked(true), "already passing");
    assert_eq!(eps[1].snapshot(2).state, "ejected", "still ejected");
    assert!(eps[0].set_checked(false));
    assert!(!eps[0].set_checked(false), "no change the second time");
    assert!(!eps[0].usable(&mut || 1));
    assert_eq!(eps[0].snapshot(1).state, "unhealthy");
    assert!(fail(&o, &eps, 0, 1, 1).is_some());
    assert!(eps[0].set_checked(true));
    assert!(
        eps[0].usable(&mut || 2),
        "back before the ejection would end"
    );
    assert_eq!(eps[0].snapshot(2).state, "healthy");
}

fn upstream(extra: &str, metrics: &Metrics) -> Arc<Upstream> {
    let text = format!(
        r#"{{"schema_version": 1,
          "upstreams": {{"v1": {{"endpoints": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]{extra}}}}},
          "routes": [{{"name": "r", "upstream": "v1"}}]}}"#
    );
    let snap = rules::load("t.json", text.as_bytes()).unwrap().snapshot;
    Upstream::build(&snap.upstreams[0], None, None, None, metrics).unwrap()
}

/// The balancer skips an ejected endpoint, counts the ejection in the metrics, and with
/// every endpoint out still picks one (the least bad) rather than none.
#[test]
fn pick_skips_ejected_and_falls_back_to_least_bad() {
    let m = Metrics::new();
    let up = upstream(
        r#", "outlier": {"consecutive_failures": 1, "base_ejection_ms": 60000,
            "max_ejection_ms": 60000, "max_ejected_percent": 100}"#,
        &m,
    );
    up.failed(1);
    let picks: Vec<usize> = (0..6).map(|_| up.pick(None)).collect();
    assert!(!picks.contains(&1), "{picks:?}");
    assert!(picks.contains(&0) && picks.contains(&2), "{picks:?}");
    let text = m.encode();
    assert!(
        text.contains(
            r#"tidegate_endpoint_ejections_total{upstream="v1",endpoint="127.0.0.1:2",reason="consecutive_failures"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"tidegate_endpoint_healthy{upstream="v1",endpoint="127.0.0.1:2"} 0"#));
    assert!(text.contains(r#"tidegate_endpoint_healthy{upstream="v1",endpoint="127.0.0.1:1"} 1"#));
    // Everything out: 2 was ejected first, so 0 or 1... all ejected for the same time;
    // the one that is merely failing its checks is worse than an ejected one.
    up.failed(0);
    up.failed(2);
    up.endpoints[0].health.set_checked(false);
    for _ in 0..4 {
        let i = up.pick(None);
        assert_ne!(i, 0, "failing checks is worse than ejected");
    }
    // Avoiding one (a retry) still finds another.
    assert_ne!(up.pick(Some(1)), 1);
}

/// A reload that rebuilds the upstream keeps each remaining endpoint's health by name.
#[test]
fn rebuilt_upstream_keeps_endpoint_health() {
    let m = Metrics::new();
    let old = upstream(r#", "outlier": {"consecutive_failures": 1}"#, &m);
    old.failed(2);
    let text = r#"{"schema_version": 1,
      "upstreams": {"v1": {"endpoints": ["127.0.0.1:3", "127.0.0.1:4"], "connect_timeout_ms": 5}},
      "routes": [{"name": "r", "upstream": "v1"}]}"#;
    let snap = rules::load("t.json", text.as_bytes()).unwrap().snapshot;
    let new = Upstream::build(&snap.upstreams[0], None, None, Some(&old), &m).unwrap();
    assert!(Arc::ptr_eq(
        &new.endpoints[0].health,
        &old.endpoints[2].health
    ));
    assert_eq!(new.endpoints[0].health.snapshot(now_ms()).state, "ejected");
    assert_eq!(new.endpoints[1].health.snapshot(now_ms()).state, "healthy");
}

/// Turning ejection or the checks off in a reload brings back the endpoints they held out:
/// nothing would end their state otherwise.
#[test]
fn turning_a_mechanism_off_releases_its_endpoints() {
    let m = Metrics::new();
    let old = upstream(
        r#", "outlier": {"consecutive_failures": 1}, "health_check": {"path": "/h"}"#,
        &m,
    );
    old.failed(0);
    old.endpoints[1].health.set_checked(false);
    let rebuilt = |extra: &str| {
        let text = format!(
            r#"{{"schema_version": 1,
              "upstreams": {{"v1": {{"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]{extra}}}}},
              "routes": [{{"name": "r", "upstream": "v1"}}]}}"#
        );
        let snap = rules::load("t.json", text.as_bytes()).unwrap().snapshot;
        Upstream::build(&snap.upstreams[0], None, None, Some(&old), &m).unwrap()
    };
    // Both still on: both stay out.
    let same =
        rebuilt(r#", "outlier": {"consecutive_failures": 1}, "health_check": {"path": "/h"}"#);
    assert_eq!(same.endpoints[0].health.snapshot(now_ms()).state, "ejected");
    assert_eq!(
        same.endpoints[1].health.snapshot(now_ms()).state,
        "unhealthy"
    );
    let off = rebuilt(r#", "outlier": {"enabled": false}"#);
    assert_eq!(off.endpoints[0].health.snapshot(now_ms()).state, "healthy");
    assert_eq!(off.endpoints[1].health.snapshot(now_ms()).state, "healthy");
}

/// A host-name endpoint is re-resolved: a new address replaces the old one and clears its
/// health record; a failed resolution keeps the last good address.
#[test]
fn re_resolution_swaps_the_address_or_keeps_the_last() {
    let m = Metrics::new();
    let text = r#"{"schema_version": 1,
      "upstreams": {"v1": {"endpoints": ["localhost:9", "127.0.0.1:8"],
        "outlier": {"consecutive_failures": 1, "max_ejected_percent": 100}}},
      "routes": [{"name": "r", "upstream": "v1"}]}"#;
    let snap = rules::load("t.json", text.as_bytes()).unwrap().snapshot;
    let up = Upstream::build(&snap.upstreams[0], None, None, None, &m).unwrap();
    let ep = &up.endpoints[0];
    assert!(ep.is_host_name && !up.endpoints[1].is_host_name);
    let first = ep.address();
    assert_eq!(first.port(), 9);
    up.failed(0);
    assert_eq!(ep.health.snapshot(now_ms()).state, "ejected");

    assert!(!apply_resolution(&up, ep, Err("no such host".into())));
    assert_eq!(ep.address(), first, "a failure keeps the last good address");
    assert!(!apply_resolution(&up, ep, Ok(first)), "unchanged");
    assert_eq!(ep.health.snapshot(now_ms()).state, "ejected");

    let moved: SocketAddr = "127.0.0.2:9".parse().unwrap();
    assert!(apply_resolution(&up, ep, Ok(moved)));
    assert_eq!(ep.address(), moved);
    assert_eq!(ep.resolved.load().authority.as_str(), "127.0.0.2:9");
    assert_eq!(
        ep.health.snapshot(now_ms()).state,
        "healthy",
        "another host: a clean record"
    );
}
