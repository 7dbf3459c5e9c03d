use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::*;
use crate::model::Priority;
use crate::validate::validate;

fn text(overload: &str) -> String {
    format!(
        r#"{{
  "schema_version": 1,
  "interfaces": [
    {{ "name": "grab", "method": "POST", "path": "/envelopes/{{id}}/grab" }},
    {{ "name": "share", "method": "POST", "path": "/envelopes/{{id}}/share" }}
  ],
  "upstreams": {{ "v1": {{ "endpoints": ["127.0.0.1:9000"] }}, "v2": {{ "endpoints": ["127.0.0.1:9001"] }} }},
  "routes": [ {{ "name": "default", "upstream": "v1" }} ],
  "overload": {overload}
}}"#
    )
}

fn messages(overload: &str) -> Vec<String> {
    let c =
        crate::source::parse("t.json", text(overload).as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    validate(&c)
        .into_iter()
        .map(|i| format!("{}: {}", i.path, i.message))
        .collect()
}

fn spec(levels: u32) -> AdmissionSpec {
    AdmissionSpec {
        queue_delay_threshold: Duration::from_millis(10),
        user_levels: levels,
        rotate_every_s: 3600,
        shed: 0.05,
        admit: 0.01,
        floor: 0,
        priority_key: None,
        dry_run: false,
    }
}

/// The example from the issue validates and compiles: grab critical with its own cap, share
/// low, an adaptive limit on one upstream, the rest at the default priority.
#[test]
fn example_compiles() {
    let o = r#"{"enabled": true, "max_in_flight": 2000, "queue_timeout_ms": 20,
        "interfaces": {"grab": {"priority": "critical", "max_in_flight": 500}, "share": {"priority": "low"}},
        "upstreams": {"v2": {"adaptive": {"min": 8, "max": 1000, "target_latency_ms": 50}}},
        "admission": {"queue_delay_threshold_ms": 10, "user_priority_levels": 128, "rotate_every_s": 3600}}"#;
    assert_eq!(messages(o), Vec::<String>::new());
    let loaded = crate::load("t.json", text(o).as_bytes()).unwrap();
    let ov = &loaded.snapshot.overload;
    assert!(ov.enabled && ov.has_caps());
    assert_eq!(ov.interfaces[0].priority, Priority::Critical);
    assert_eq!(ov.interfaces[0].max_in_flight, Some(500));
    assert_eq!(ov.interfaces[1].priority, Priority::Low);
    assert_eq!(ov.upstreams[0], None);
    assert_eq!(
        ov.upstreams[1],
        Some(UpstreamCap::Adaptive(AdaptiveSpec {
            min: 8,
            max: 1000,
            initial: 20,
            target: Some(Duration::from_millis(50)),
        }))
    );
    assert_eq!(ov.admission.unwrap().ranks(), 512);
}

/// No `overload` section: off, no caps, nothing to validate.
#[test]
fn absent_is_off() {
    let c = crate::load("t.json", text("{}").as_bytes()).unwrap();
    assert!(!c.snapshot.overload.enabled);
    assert!(!c.snapshot.overload.has_caps());
}

/// Every bad value is reported at its path, all at once.
#[test]
fn bad_values_are_located() {
    let m = messages(
        r#"{"enabled": true, "max_in_flight": 0, "queue_timeout_ms": 20000, "window_ms": 5,
        "interfaces": {"grb": {"priority": "low"}},
        "upstreams": {"v1": {"max_in_flight": 10, "adaptive": {}}, "v3": {"max_in_flight": 1},
                      "v2": {"adaptive": {"min": 50, "max": 10, "initial": 100}}},
        "admission": {"user_priority_levels": 0, "shed_percent": 90}}"#,
    );
    let expect = [
        "overload.max_in_flight: 0 is out of range; allowed 1..=1000000",
        "overload.queue_timeout_ms: 20000 is out of range; allowed 0..=10000",
        "overload.window_ms: 5 is out of range; allowed 10..=10000",
        "overload.interfaces.grb: unknown interface \"grb\"; did you mean \"grab\"?",
        "overload.upstreams.v1.adaptive: give either `max_in_flight` (a fixed cap) or `adaptive`, not both",
        "overload.upstreams.v2.adaptive.min: min 50 is above max 10",
        "overload.upstreams.v2.adaptive.initial: 100 is outside min..=max (50..=10)",
        "overload.upstreams.v3: unknown upstream \"v3\"; did you mean \"v1\"?",
        "overload.admission.user_priority_levels: 0 is out of range; allowed 1..=1024",
        "overload.admission.shed_percent: 90 is out of range; allowed 1..=50",
    ];
    for e in expect {
        assert!(m.iter().any(|x| x == e), "missing {e:?} in {m:#?}");
    }
    assert_eq!(m.len(), expect.len(), "{m:#?}");
}

/// Admission switched on with no cap anywhere cannot measure queueing: refused, with the
/// way out in the message. Switched off, the same section is fine.
#[test]
fn admission_needs_a_cap() {
    let m = messages(r#"{"enabled": true, "interfaces": {"grab": {"priority": "critical"}}}"#);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].starts_with("overload.admission.enabled: admission measures queueing"));
    assert!(messages(r#"{"enabled": false}"#).is_empty());
    assert!(messages(r#"{"enabled": true, "admission": {"enabled": false}}"#).is_empty());
}

/// Unknown fields are refused (a typo must not switch a protection off).
#[test]
fn unknown_field_refused() {
    let e = crate::load("t.json", text(r#"{"enabeld": true}"#).as_bytes()).unwrap_err();
    assert!(e.to_string().contains("enabeld"), "{e}");
}

/// User priority: pinned values (the hash is part of the contract), stable within an epoch,
/// independent across epochs, spread evenly over the levels.
#[test]
fn user_priority_is_stable_rotating_and_even() {
    let mut buf = [0u8; 32];
    assert_eq!(epoch_salt(0, &mut buf), "overload:0");
    assert_eq!(
        epoch_salt(u64::MAX, &mut buf),
        "overload:18446744073709551615"
    );
    // Same as a route bucket under the epoch salt.
    let b = crate::bucket::bucket("overload:475000", "alice");
    assert_eq!(
        user_priority(UserKey::User("alice"), 475_000, 128),
        (u64::from(b) * 128 / 1_000_000) as u32
    );
    assert_eq!(
        user_priority(UserKey::User("alice"), 475_000, 128),
        user_priority(UserKey::User("alice"), 475_000, 128)
    );
    let n = 20_000;
    let mut counts = [0u32; 8];
    let mut moved = 0;
    for i in 0..n {
        let u = format!("user-{i}");
        let p = user_priority(UserKey::User(&u), 1, 8);
        counts[p as usize] += 1;
        if p != user_priority(UserKey::User(&u), 2, 8) {
            moved += 1;
        }
    }
    // Each level holds 1/8 within 5 sigma; next epoch re-draws about 7/8 of users.
    let mean = f64::from(n) / 8.0;
    let sigma = (mean * 7.0 / 8.0).sqrt();
    for c in counts {
        assert!((f64::from(c) - mean).abs() < 5.0 * sigma, "{counts:?}");
    }
    assert!(
        (moved as f64 / f64::from(n) - 7.0 / 8.0).abs() < 0.02,
        "{moved}"
    );
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(
        user_priority(UserKey::Ip(ip), 3, 128),
        user_priority(UserKey::Ip(ip), 3, 128)
    );
    assert_eq!(user_priority(UserKey::Unknown, 3, 128), 0);
    assert_eq!(spec(128).epoch(7200), 2);
}

/// Ranks order business priority first: the least important critical request outranks the
/// most important normal one.
#[test]
fn ranks_are_lexicographic() {
    let s = spec(16);
    let top_normal = business_rank(Priority::Normal) * s.user_levels + (s.user_levels - 1);
    let bottom_critical = business_rank(Priority::Critical) * s.user_levels;
    assert!(bottom_critical > top_normal);
    assert_eq!(
        business_of_rank(bottom_critical / s.user_levels),
        Priority::Critical
    );
    let r = priority(Priority::High, UserKey::User("bob"), 9, 16, None);
    assert_eq!(r / 16, 2);
}

/// A flat histogram: `per` requests in each rank.
fn flat(ranks: u32, per: u64) -> Vec<u64> {
    vec![per; ranks as usize]
}

/// The first overloaded window jumps to what the caps let through (less 5%), not 5% at a
/// time; later overloaded windows go on raising by at least one rank.
#[test]
fn overload_jumps_to_measured_capacity() {
    let s = spec(4); // 16 ranks
    let mut c = LevelController::new(&s).with_smoothing(1.0);
    let offered = flat(16, 100); // 1600 offered
    // The caps let 800 through: the level must keep at most 760 = 7 ranks, from rank 9.
    let l = c.adjust(&LevelWindow {
        offered: &offered,
        admitted: 800,
        overloaded: true,
    });
    assert_eq!(l, 9);
    // Still overloaded at 700 through the level: at least one rank more.
    let l = c.adjust(&LevelWindow {
        offered: &offered,
        admitted: 700,
        overloaded: true,
    });
    assert_eq!(l, 10);
    // Overload that never ends stops below the top rank: the best requests still pass.
    for _ in 0..100 {
        c.adjust(&LevelWindow {
            offered: &offered,
            admitted: 0,
            overloaded: true,
        });
    }
    assert_eq!(c.level(), 15);
    assert!(LevelController::admits(c.level(), 15));
    assert!(!LevelController::admits(c.level(), 14));
}

/// Calm windows lower the level by about 1% of the traffic each (at least one rank), and an
/// idle window resets it.
#[test]
fn calm_relaxes_slowly_idle_resets() {
    let s = spec(128); // 512 ranks
    let mut c = LevelController::new(&s).with_smoothing(1.0);
    c.set_level(400);
    let offered = flat(512, 10);
    // Admitted 1120 (112 ranks): 1% more is 1131.2 → 113 ranks: level 399.
    let l = c.adjust(&LevelWindow {
        offered: &offered,
        admitted: 1120,
        overloaded: false,
    });
    assert_eq!(l, 399);
    // Empty ranks are skipped at once; a big rank below is entered once the compounding
    // 1% per calm window covers it.
    c.set_level(420);
    let mut lumpy = vec![0u64; 512];
    lumpy[397] = 1_000_000;
    lumpy[450] = 10;
    let l = c.adjust(&LevelWindow {
        offered: &lumpy,
        admitted: 10,
        overloaded: false,
    });
    assert_eq!(l, 398, "empty ranks are skipped");
    lumpy[397] = 1;
    let mut windows = 0;
    while c.level() == 398 {
        c.adjust(&LevelWindow {
            offered: &lumpy,
            admitted: 10,
            overloaded: false,
        });
        windows += 1;
    }
    // 10 → 11 takes ten 1% steps (1.01^10 = 1.105); the empty ranks below follow.
    assert_eq!((c.level(), windows), (0, 10));
    let l = c.adjust(&LevelWindow {
        offered: &[0; 512],
        admitted: 0,
        overloaded: false,
    });
    assert_eq!(l, 0);
}

/// The DAGOR loop against a fixed-capacity server: offered 3× capacity split 20% critical /
/// 80% low, and a window is overloaded when more passes than the capacity. The level
/// settles in the low band, sheds no critical traffic, and admits 90-100% of capacity.
#[test]
fn level_loop_settles_at_capacity() {
    let s = spec(128);
    let mut c = LevelController::new(&s);
    let cap = 100u64; // per window
    // 300 per window: 60 critical, 240 low, spread evenly over user levels.
    let mut offered = vec![0u64; 512];
    let (low, critical) = (240u64, 60u64);
    for u in 0..128 {
        offered[u] += low / 128 + u64::from((u as u64) < low % 128);
        offered[3 * 128 + u] += critical / 128 + u64::from((u as u64) < critical % 128);
    }
    let mut admitted_sum = 0;
    let windows = 200;
    for w in 0..windows {
        let passed: u64 = offered[c.level() as usize..].iter().sum();
        let admitted = passed.min(cap);
        if w >= 50 {
            admitted_sum += admitted;
            assert!(c.level() < 384, "critical traffic shed at window {w}");
        }
        c.adjust(&LevelWindow {
            offered: &offered,
            admitted,
            overloaded: passed > cap,
        });
    }
    let mean = admitted_sum as f64 / f64::from(windows - 50);
    assert!((90.0..=100.0).contains(&mean), "{mean}");
}

/// Simulated upstream of `cap` concurrent slots and `service` each, saturated by demand:
/// latency grows with queueing beyond `cap`.
fn simulate(g: &mut Gradient, cap: f64, service: Duration, windows: usize) -> Vec<u32> {
    (0..windows)
        .map(|_| {
            let l = f64::from(g.limit());
            let rtt = service.mul_f64((l / cap).max(1.0));
            g.update(&RttWindow {
                calls: 100,
                mean_rtt: rtt,
                peak_in_flight: g.limit(),
            })
        })
        .collect()
}

/// Without a target, the limit finds an upstream of 50 × 50 ms from below (20) and from
/// above (400), settling between 1× and 2× its concurrency.
#[test]
fn gradient_finds_capacity() {
    for initial in [4, 20, 400] {
        let mut g = Gradient::new(AdaptiveSpec {
            min: 4,
            max: 1000,
            initial,
            target: None,
        });
        if initial > 50 {
            // Seed the baseline from one unqueued window, as a quiet start would.
            g.update(&RttWindow {
                calls: 10,
                mean_rtt: Duration::from_millis(50),
                peak_in_flight: 1,
            });
        }
        let limits = simulate(&mut g, 50.0, Duration::from_millis(50), 100);
        let last = *limits.last().unwrap();
        assert!((50..=100).contains(&last), "from {initial}: {limits:?}");
        assert_eq!(g.baseline(), Some(Duration::from_millis(50)));
        assert_eq!(g.target(), Some(Duration::from_millis(75)));
    }
}

/// With a configured target the limit holds latency near it; an idle window or a few calls
/// move nothing; a limit nobody uses does not grow; bounds hold.
#[test]
fn gradient_target_and_bounds() {
    let mut g = Gradient::new(AdaptiveSpec {
        min: 8,
        max: 60,
        initial: 20,
        target: Some(Duration::from_millis(100)),
    });
    let limits = simulate(&mut g, 50.0, Duration::from_millis(50), 50);
    assert_eq!(*limits.last().unwrap(), 60, "capped at max: {limits:?}");
    let before = g.limit();
    g.update(&RttWindow {
        calls: 2,
        mean_rtt: Duration::from_secs(5),
        peak_in_flight: 60,
    });
    assert_eq!(g.limit(), before, "too few calls");
    g.update(&RttWindow {
        calls: 50,
        mean_rtt: Duration::from_millis(50),
        peak_in_flight: 3,
    });
    assert_eq!(g.limit(), before, "unused: no growth");
    for _ in 0..20 {
        g.update(&RttWindow {
            calls: 50,
            mean_rtt: Duration::from_secs(10),
            peak_in_flight: 60,
        });
    }
    assert_eq!(g.limit(), 8, "floored at min");
}

/// A floor of `normal` refuses all `low` traffic whatever the load, and calm or idle
/// windows never take the level below it.
#[test]
fn floor_holds() {
    let o = r#"{"enabled": true, "max_in_flight": 10, "admission": {"floor": "normal"}}"#;
    assert_eq!(messages(o), Vec::<String>::new());
    let loaded = crate::load("t.json", text(o).as_bytes()).unwrap();
    let s = loaded.snapshot.overload.admission.unwrap();
    assert_eq!(s.floor, 128);
    let mut c = LevelController::new(&s);
    assert_eq!(c.level(), 128);
    assert!(!LevelController::admits(c.level(), 127));
    c.adjust(&LevelWindow {
        offered: &flat(512, 1),
        admitted: 512,
        overloaded: false,
    });
    assert_eq!(c.level(), 128);
    c.adjust(&LevelWindow {
        offered: &[0; 512],
        admitted: 0,
        overloaded: false,
    });
    assert_eq!(c.level(), 128);
}

/// Keyed user priorities: stable within an epoch, spread evenly, different from the public
/// hash and from another key's (so they cannot be computed without the key).
#[test]
fn keyed_user_priority_needs_the_key() {
    let (k1, k2) = ([7u8; 16], [8u8; 16]);
    let users: Vec<String> = (0..4000).map(|i| format!("user-{i}")).collect();
    let mut counts = [0u32; 8];
    let (mut same_public, mut same_other_key) = (0, 0);
    for u in &users {
        let p = keyed_user_priority(UserKey::User(u), 9, 8, &k1);
        assert_eq!(p, keyed_user_priority(UserKey::User(u), 9, 8, &k1));
        counts[p as usize] += 1;
        same_public += usize::from(p == user_priority(UserKey::User(u), 9, 8));
        same_other_key += usize::from(p == keyed_user_priority(UserKey::User(u), 9, 8, &k2));
    }
    // Each level 1/8 of 4000 = 500, within 5 sigma (~105).
    for c in counts {
        assert!((395..=605).contains(&c), "{counts:?}");
    }
    // Agreement with an unkeyed or other-keyed ranking is chance (1/8 = 500).
    assert!((395..=605).contains(&same_public), "{same_public}");
    assert!((395..=605).contains(&same_other_key), "{same_other_key}");
    // The business band still comes first; no key keeps the public hash.
    let ip: IpAddr = [10, 0, 0, 1].into();
    assert!(keyed_user_priority(UserKey::Ip(ip), 9, 8, &k1) < 8);
    assert_eq!(keyed_user_priority(UserKey::Unknown, 9, 8, &k1), 0);
    assert_eq!(
        priority(Priority::High, UserKey::User("a"), 9, 8, None),
        2 * 8 + user_priority(UserKey::User("a"), 9, 8)
    );
    assert_eq!(
        priority(Priority::High, UserKey::User("a"), 9, 8, Some(&k1)),
        2 * 8 + keyed_user_priority(UserKey::User("a"), 9, 8, &k1)
    );
}
