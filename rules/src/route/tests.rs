use std::net::IpAddr;

use http::HeaderMap;
use proptest::prelude::*;

use super::*;
use crate::MatchInput;
use crate::snapshot::Snapshot;

fn snap(routes: &str) -> Snapshot {
    let text = format!(
        r#"{{"schema_version": 1,
  "interfaces": [{{"name": "grab", "method": "POST", "path": "/envelopes/{{id}}/grab"}}],
  "upstreams": {{"v1": {{"endpoints": ["127.0.0.1:9000"]}}, "v2": {{"endpoints": ["127.0.0.1:9001"]}},
                 "v3": {{"endpoints": ["127.0.0.1:9002"]}}}},
  "routes": {routes}}}"#
    );
    crate::load("t.json", text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot
}

fn split(weight: &str) -> Snapshot {
    snap(&format!(
        r#"[{{"name": "canary", "split": [{{"upstream": "v2", "weight": "{weight}"}}, {{"upstream": "v1", "weight": "rest"}}]}}]"#
    ))
}

fn input<'a>(user: Option<&'a str>, app: Option<&'a str>, h: &'a HeaderMap) -> RouteInput<'a> {
    RouteInput {
        m: MatchInput {
            app,
            interface: None,
            user,
            headers: h,
            params: &[],
        },
        client_ip: None,
        random: 0,
        pair: Default::default(),
    }
}

fn upstream_of(s: &Snapshot, r: &RouteInput<'_>) -> String {
    let d = s.route(r).expect("matched");
    s.upstreams[d.upstream.0 as usize].name.to_string()
}

/// How many of `n` synthetic users a split sends to `v2`.
fn count_v2(s: &Snapshot, n: usize) -> usize {
    let h = HeaderMap::new();
    let v2 = s.upstream_by_name("v2").unwrap();
    let mut user = String::new();
    (0..n)
        .filter(|i| {
            use std::fmt::Write;
            user.clear();
            write!(user, "user-{i}").unwrap();
            s.route(&input(Some(&user), None, &h)).unwrap().upstream == v2
        })
        .count()
}

/// 100 ppm of 1,000,000 distinct users: between 70 and 130 land in the canary.
#[test]
fn one_in_ten_thousand() {
    let got = count_v2(&split("0.01%"), 1_000_000);
    assert!((70..=130).contains(&got), "{got}");
}

/// For 0.0125%, 1%, 33.3333% and 50%, the observed share is within 4σ of the binomial
/// expectation over 1,000,000 users.
#[test]
fn shares_within_four_sigma() {
    let n = 1_000_000f64;
    for (w, p) in [
        ("0.0125%", 0.000125),
        ("1%", 0.01),
        ("33.3333%", 0.333333),
        ("50%", 0.5),
    ] {
        let got = count_v2(&split(w), n as usize) as f64;
        let sigma = (n * p * (1.0 - p)).sqrt();
        assert!(
            (got - n * p).abs() <= 4.0 * sigma,
            "{w}: {got} vs {} ± {}",
            n * p,
            4.0 * sigma
        );
    }
}

/// Two 50% splits with different salts are independent: the joint share is 25% within 4σ.
#[test]
fn independent_salts() {
    let a = snap(
        r#"[{"name": "a", "split": [{"upstream": "v2", "weight": "50%"}, {"upstream": "v1", "weight": "50%"}]}]"#,
    );
    let b = snap(
        r#"[{"name": "b", "split": [{"upstream": "v2", "weight": "50%"}, {"upstream": "v1", "weight": "50%"}]}]"#,
    );
    let h = HeaderMap::new();
    let n = 200_000;
    let both = (0..n)
        .filter(|i| {
            let u = format!("u{i}");
            upstream_of(&a, &input(Some(&u), None, &h)) == "v2"
                && upstream_of(&b, &input(Some(&u), None, &h)) == "v2"
        })
        .count() as f64;
    let (nf, p) = (n as f64, 0.25);
    let sigma = (nf * p * (1.0 - p)).sqrt();
    assert!((both - nf * p).abs() <= 4.0 * sigma, "{both}");
}

proptest! {
    /// Monotone ramp: raising the canary from p1 to p2 keeps every user who was in it.
    #[test]
    fn ramp_is_monotone(p1 in 0u32..=1_000_000, p2 in 0u32..=1_000_000, users in proptest::collection::vec("[a-z0-9]{1,12}", 1..200)) {
        let (lo, hi) = (p1.min(p2), p1.max(p2));
        let mk = |ppm: u32| snap(&format!(
            r#"[{{"name": "canary", "split": [{{"upstream": "v2", "weight_ppm": {ppm}}}, {{"upstream": "v1", "weight": "rest"}}]}}]"#
        ));
        let (a, b) = (mk(lo), mk(hi));
        let h = HeaderMap::new();
        for u in &users {
            if upstream_of(&a, &input(Some(u), None, &h)) == "v2" {
                prop_assert_eq!(upstream_of(&b, &input(Some(u), None, &h)), "v2");
            }
        }
    }

    /// Sticky: the same user always gets the same target under the same weights.
    #[test]
    fn sticky(user in "\\PC{1,40}") {
        let s = split("37.5%");
        let h = HeaderMap::new();
        let first = upstream_of(&s, &input(Some(&user), None, &h));
        for _ in 0..3 {
            prop_assert_eq!(&upstream_of(&s, &input(Some(&user), None, &h)), &first);
        }
    }
}

/// The whitelist pins users and apps before the split; the override header picks a target
/// only when enabled and only among the split's targets.
#[test]
fn whitelist_and_override() {
    let s = snap(
        r#"[{"name": "canary", "split": [{"upstream": "v2", "weight": "0%"}, {"upstream": "v1", "weight": "rest"}],
             "whitelist": [{"upstream": "v2", "users": ["tester"], "apps": ["internal"]}],
             "override_header": "x-canary"}]"#,
    );
    let none = HeaderMap::new();
    assert_eq!(upstream_of(&s, &input(Some("tester"), None, &none)), "v2");
    assert_eq!(
        upstream_of(&s, &input(Some("bob"), Some("internal"), &none)),
        "v2"
    );
    assert_eq!(upstream_of(&s, &input(Some("bob"), None, &none)), "v1");
    let mut h = HeaderMap::new();
    h.insert("x-canary", "v2".parse().unwrap());
    let d = s.route(&input(Some("bob"), None, &h)).unwrap();
    assert_eq!(d.via, Via::Override);
    h.insert("x-canary", "v3".parse().unwrap());
    assert_eq!(
        upstream_of(&s, &input(Some("bob"), None, &h)),
        "v1",
        "v3 is not a target"
    );
}

/// A decision names the split's target it chose, whichever way it was chosen (the counters
/// of each target's share are indexed by it); a rule with one upstream names none.
#[test]
fn the_decision_names_its_target() {
    let s = snap(
        r#"[{"name": "canary", "split": [{"upstream": "v2", "weight": "20%"}, {"upstream": "v3", "weight": "30%"}, {"upstream": "v1", "weight": "rest"}],
             "whitelist": [{"upstream": "v3", "users": ["tester"]}],
             "override_header": "x-canary"},
            {"name": "plain", "match": {"apps": ["other"]}, "upstream": "v2"}]"#,
    );
    let target_of = |d: &RouteDecision<'_>| {
        let RouteAction::Split(t) = &d.rule.action else {
            panic!("not a split")
        };
        t[d.target.expect("a split names its target") as usize].upstream
    };
    let none = HeaderMap::new();
    let mut seen = [0; 3];
    for i in 0..300 {
        let user = format!("user-{i}");
        let d = s.route(&input(Some(&user), None, &none)).unwrap();
        assert_eq!(target_of(&d), d.upstream, "{user}");
        seen[d.target.unwrap() as usize] += 1;
    }
    assert!(seen.iter().all(|&n| n > 0), "every target chosen: {seen:?}");
    let d = s.route(&input(Some("tester"), None, &none)).unwrap();
    assert_eq!((d.via, d.target), (Via::WhitelistUser, Some(1)));
    let mut h = HeaderMap::new();
    h.insert("x-canary", "v1".parse().unwrap());
    let d = s.route(&input(Some("bob"), None, &h)).unwrap();
    assert_eq!((d.via, d.target), (Via::Override, Some(2)));
    let d = s.route(&input(Some("bob"), Some("other"), &none)).unwrap();
    assert_eq!((d.via, d.target), (Via::Direct, None));
    // A whitelist may pin an upstream the split does not name: no target to count.
    let s = snap(
        r#"[{"name": "canary", "split": [{"upstream": "v2", "weight": "5%"}, {"upstream": "v1", "weight": "rest"}],
             "whitelist": [{"upstream": "v3", "users": ["tester"]}]}]"#,
    );
    let d = s.route(&input(Some("tester"), None, &none)).unwrap();
    assert_eq!(upstream_of(&s, &input(Some("tester"), None, &none)), "v3");
    assert_eq!((d.via, d.target), (Via::WhitelistUser, None));
}

/// Requests without a user are spread by client IP (or a random draw), never into one bucket.
#[test]
fn no_user_spreads() {
    let s = split("50%");
    let h = HeaderMap::new();
    let mut buckets = std::collections::HashSet::new();
    for i in 0..100u8 {
        let ip: IpAddr = [10, 0, 0, i].into();
        let r = RouteInput {
            client_ip: Some(ip),
            ..input(None, None, &h)
        };
        let d = s.route(&r).unwrap();
        match d.via {
            Via::Split {
                bucket,
                key: BucketKey::ClientIp,
            } => {
                buckets.insert(bucket);
            }
            other => panic!("{other:?}"),
        }
        // The same IP is sticky.
        assert_eq!(s.route(&r).unwrap().via, d.via);
    }
    assert!(buckets.len() > 95, "{}", buckets.len());

    let s = snap(
        r#"[{"name": "c", "no_user_key": "random", "split": [{"upstream": "v2", "weight": "50%"}, {"upstream": "v1", "weight": "rest"}]}]"#,
    );
    let spread: std::collections::HashSet<u32> = (0..50u64)
        .map(|i| {
            match s
                .route(&RouteInput {
                    random: i * 7_919_111,
                    ..input(None, None, &h)
                })
                .unwrap()
                .via
            {
                Via::Split {
                    bucket,
                    key: BucketKey::Random,
                } => bucket,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    assert!(spread.len() > 45);

    let s = snap(
        r#"[{"name": "c", "no_user_key": {"header": "x-device"}, "split": [{"upstream": "v2", "weight": "50%"}, {"upstream": "v1", "weight": "rest"}]}]"#,
    );
    let mut h = HeaderMap::new();
    h.insert("x-device", "dev-1".parse().unwrap());
    assert!(matches!(
        s.route(&input(None, None, &h)).unwrap().via,
        Via::Split {
            key: BucketKey::Header,
            ..
        }
    ));
}

/// A user-bucket range in `match` selects a slice of users for a direct route.
#[test]
fn user_bucket_match() {
    let s = snap(
        r#"[{"name": "slice", "match": {"user_buckets": {"from_ppm": 0, "to_ppm": 100000}}, "upstream": "v2"},
            {"name": "default", "upstream": "v1"}]"#,
    );
    let h = HeaderMap::new();
    let n = 100_000;
    let got = (0..n)
        .filter(|i| upstream_of(&s, &input(Some(&format!("u{i}")), None, &h)) == "v2")
        .count() as f64;
    let sigma = (n as f64 * 0.1 * 0.9).sqrt();
    assert!((got - 10_000.0).abs() <= 4.0 * sigma, "{got}");
}

/// Weights that do not sum to 100%, two `rest`s, and bad percentages are refused.
#[test]
fn bad_splits_refused() {
    let bad = |routes: &str| {
        let text = format!(
            r#"{{"schema_version": 1, "upstreams": {{"v1": {{"endpoints": ["127.0.0.1:1"]}}, "v2": {{"endpoints": ["127.0.0.1:2"]}}}}, "routes": {routes}}}"#
        );
        crate::load("t.json", text.as_bytes())
            .expect_err("refused")
            .to_string()
    };
    let e = bad(
        r#"[{"name": "c", "split": [{"upstream": "v2", "weight": "5%"}, {"upstream": "v1", "weight": "90%"}]}]"#,
    );
    assert!(
        e.contains("routes[0].split: weights sum to 950000 ppm (95.0000%)"),
        "{e}"
    );
    let e = bad(
        r#"[{"name": "c", "split": [{"upstream": "v2", "weight": "rest"}, {"upstream": "v1", "weight": "rest"}]}]"#,
    );
    assert!(
        e.contains("routes[0].split[1].weight: only one target may be \"rest\""),
        "{e}"
    );
    let e = bad(
        r#"[{"name": "c", "split": [{"upstream": "v2", "weight": "0.00001%"}, {"upstream": "v1", "weight": "rest"}]}]"#,
    );
    assert!(e.contains("more than four decimals"), "{e}");
    let e = bad(
        r#"[{"name": "c", "upstream": "v1", "split": [{"upstream": "v1", "weight": "100%"}]}]"#,
    );
    assert!(e.contains("not both"), "{e}");
    let e = bad(r#"[{"name": "c"}]"#);
    assert!(e.contains("missing field `upstream` (or `split`)"), "{e}");
}

/// `override_from` honours the override header only from the listed client addresses; an
/// unlisted or unknown client gets its bucket, whatever it sends.
#[test]
fn override_only_from_listed_clients() {
    let s = snap(
        r#"[{"name": "canary", "split": [{"upstream": "v2", "weight": "0%"}, {"upstream": "v1", "weight": "rest"}],
             "override_header": "x-canary", "override_from": ["10.1.0.0/16", "::1"]}]"#,
    );
    let mut h = HeaderMap::new();
    h.insert("x-canary", "v2".parse().unwrap());
    let from = |ip: Option<&str>| RouteInput {
        client_ip: ip.map(|i| i.parse().unwrap()),
        ..input(Some("bob"), None, &h)
    };
    assert_eq!(upstream_of(&s, &from(Some("10.1.2.3"))), "v2");
    assert_eq!(upstream_of(&s, &from(Some("::1"))), "v2");
    assert_eq!(upstream_of(&s, &from(Some("203.0.113.9"))), "v1");
    assert_eq!(upstream_of(&s, &from(None)), "v1");
}

/// A shadow split counts exactly the users whose bucket puts them elsewhere: with the route's
/// salt, the users in its first 10% are "moved" to v2; with its own salt, those of the
/// bucket under that salt. The real choice never changes, and pinned users are not counted.
#[test]
fn shadow_split_counts_by_bucket() {
    let h = HeaderMap::new();
    let users: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
    for (salt, shadow_salt) in [("canary", ""), ("canary", r#", "shadow_salt": "other""#)] {
        let s = snap(&format!(
            r#"[{{"name": "canary", "split": [{{"upstream": "v2", "weight": "1%"}}, {{"upstream": "v1", "weight": "rest"}}],
                 "shadow_split": [{{"upstream": "v2", "weight": "10%"}}, {{"upstream": "v1", "weight": "rest"}}],
                 "whitelist": [{{"upstream": "v1", "users": ["user-7"]}}]{shadow_salt}}}]"#
        ));
        let shadow_by = if shadow_salt.is_empty() {
            salt
        } else {
            "other"
        };
        let (v1, v2) = (
            s.upstream_by_name("v1").unwrap(),
            s.upstream_by_name("v2").unwrap(),
        );
        let mut moved = 0;
        let mut want = 0;
        for u in &users {
            let r = input(Some(u), None, &h);
            let d = s.route(&r).unwrap();
            let real = if crate::bucket::bucket(salt, u) < 10_000 {
                v2
            } else {
                v1
            };
            let shadow = if crate::bucket::bucket(shadow_by, u) < 100_000 {
                v2
            } else {
                v1
            };
            if u == "user-7" {
                assert_eq!(d.upstream, v1);
                assert_eq!(d.rule.shadow_choice(&r, d.via), None, "pinned: not split");
                continue;
            }
            assert_eq!(d.upstream, real, "{u}");
            let (to, _) = d.rule.shadow_choice(&r, d.via).expect("has a shadow split");
            assert_eq!(to, shadow, "{u}");
            moved += usize::from(to != d.upstream);
            want += usize::from(shadow != real);
        }
        assert_eq!(moved, want);
        assert!(
            want > 1_000,
            "{want}: the shadow split moves about 10% of users"
        );
    }
    let plain = snap(r#"[{"name": "canary", "upstream": "v1"}]"#);
    let r = input(Some("user-1"), None, &h);
    let d = plain.route(&r).unwrap();
    assert_eq!(d.rule.shadow_choice(&r, d.via), None, "no shadow split");
    assert!(!plain.has_shadow());
}

/// A shadow split beside a single upstream is allowed and judged like a split; its
/// mistakes are reported at `shadow_split` and `shadow_salt`.
#[test]
fn shadow_split_validation() {
    let s = snap(
        r#"[{"name": "one", "upstream": "v1", "shadow_split": [{"upstream": "v2", "weight": "50%"}, {"upstream": "v1", "weight": "rest"}]}]"#,
    );
    assert!(s.has_shadow());
    let bad = |routes: &str| {
        let text = format!(
            r#"{{"schema_version": 1, "upstreams": {{"v1": {{"endpoints": ["127.0.0.1:1"]}}, "v2": {{"endpoints": ["127.0.0.1:2"]}}}}, "routes": {routes}}}"#
        );
        crate::load("t.json", text.as_bytes())
            .expect_err("refused")
            .to_string()
    };
    let e = bad(
        r#"[{"name": "c", "upstream": "v1", "shadow_split": [{"upstream": "v2", "weight": "5%"}, {"upstream": "v1", "weight": "90%"}]}]"#,
    );
    assert!(
        e.contains("routes[0].shadow_split") && e.contains("not 1000000 (100%)"),
        "{e}"
    );
    let e = bad(
        r#"[{"name": "c", "upstream": "v1", "shadow_split": [{"upstream": "v9", "weight": "rest"}]}]"#,
    );
    assert!(
        e.contains("routes[0].shadow_split[0].upstream") && e.contains("unknown upstream \"v9\""),
        "{e}"
    );
    let e = bad(r#"[{"name": "c", "upstream": "v1", "shadow_salt": "x"}]"#);
    assert!(
        e.contains("routes[0].shadow_salt") && e.contains("only applies to a `shadow_split`"),
        "{e}"
    );
}

/// A mirror copies exactly the users whose bucket under the mirror's salt (by default the
/// route's salt and `#mirror`) is below its fraction; 0% and 100% need no hash.
#[test]
fn mirror_by_bucket() {
    let with = |fraction: &str| {
        snap(&format!(
            r#"[{{"name": "r", "upstream": "v1", "mirror": {{"upstream": "v3", "fraction": "{fraction}"}}}}]"#
        ))
    };
    let h = HeaderMap::new();
    let s = with("30%");
    let mut n = 0;
    for i in 0..2_000 {
        let u = format!("user-{i}");
        let r = input(Some(&u), None, &h);
        let want = crate::bucket::bucket("r#mirror", &u) < 300_000;
        assert_eq!(s.route(&r).unwrap().mirrored, want, "{u}");
        n += usize::from(want);
    }
    assert!((500..700).contains(&n), "about 30% of 2000: {n}");
    let (all, none) = (with("100%"), with("0%"));
    let r = input(Some("anyone"), None, &h);
    assert_eq!(all.routes[0].mirror_of(&r), Some((true, None)));
    assert_eq!(none.routes[0].mirror_of(&r), Some((false, None)));
    assert!(
        !snap(r#"[{"name": "r", "upstream": "v1"}]"#)
            .route(&r)
            .unwrap()
            .mirrored
    );
}

/// Anonymous requests bucketed by a random draw are not mirrored by the same bits that
/// place them in a split: among the canary's requests, the mirror takes its own share.
#[test]
fn mirror_random_draw_independent_of_split() {
    let s = snap(
        r#"[{"name": "r", "no_user_key": "random",
             "split": [{"upstream": "v2", "weight": "50%"}, {"upstream": "v1", "weight": "rest"}],
             "mirror": {"upstream": "v3", "fraction": "50%"}}]"#,
    );
    let h = HeaderMap::new();
    let (mut canary, mut both) = (0, 0);
    for i in 0..4_000u64 {
        let mut r = input(None, None, &h);
        r.random = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let d = s.route(&r).unwrap();
        if &*s.upstreams[d.upstream.0 as usize].name == "v2" {
            canary += 1;
            both += usize::from(d.mirrored);
        }
    }
    let share = both as f64 / canary as f64;
    assert!(
        (0.4..0.6).contains(&share),
        "mirrored share of canary: {share}"
    );
}
