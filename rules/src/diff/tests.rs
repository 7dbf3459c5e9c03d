use http::HeaderMap;
use serde_json::{Value, json};

use super::*;
use crate::bucket::bucket;
use crate::route::RouteInput;
use crate::{Loaded, MatchInput};

fn base() -> Value {
    json!({
        "schema_version": 1,
        "interfaces": [{"name": "grab", "method": "POST", "path": "/envelopes/{id}/grab"}],
        "upstreams": {
            "v1": {"endpoints": ["127.0.0.1:9000"]},
            "v2": {"endpoints": ["127.0.0.1:9001"]}
        },
        "routes": [
            {"name": "default", "upstream": "v1"},
            {"name": "canary", "match": {"interfaces": ["grab"]},
             "split": [{"upstream": "v2", "weight": "5%"}, {"upstream": "v1", "weight": "rest"}]}
        ],
        "limits": [{"name": "per-user", "key": ["user"], "rate": "20/s"}],
        "fallbacks": [],
        "plans": {"gala": {"fallbacks": [
            {"name": "lite", "match": {"interfaces": ["grab"]}, "fraction": "25%",
             "response": {"status": 200}}
        ]}}
    })
}

fn load(v: &Value) -> Loaded {
    crate::load("t.json", v.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn diff_of(old: &Value, new: &Value) -> ConfigDiff {
    let (o, n) = (load(old), load(new));
    diff((&o.config, &o.snapshot), (&n.config, &n.snapshot))
}

fn change<'d>(d: &'d ConfigDiff, section: &str, name: &str) -> &'d RuleChange {
    d.sections
        .iter()
        .find(|s| s.name == section)
        .and_then(|s| s.changes.iter().find(|c| c.name == name))
        .unwrap_or_else(|| panic!("no change to {section}/{name} in:\n{}", d.render()))
}

/// Where the live routing sends `user` on `grab`.
fn routed(l: &Loaded, user: &str) -> String {
    let h = HeaderMap::new();
    let grab = Some(crate::InterfaceId(0));
    let input = RouteInput {
        m: MatchInput {
            app: None,
            interface: grab,
            user: Some(user),
            headers: &h,
            params: &[],
        },
        client_ip: None,
        random: 0,
        pair: Default::default(),
    };
    let d = l.snapshot.route(&input).expect("a route");
    l.snapshot.upstream_name(d.upstream).to_string()
}

#[test]
fn the_same_config_has_no_changes() {
    let d = diff_of(&base(), &base());
    assert!(d.is_empty(), "{}", d.render());
    assert_eq!(d.render(), "no changes\n");
}

#[test]
fn a_grown_canary_moves_exactly_the_users_of_the_added_buckets() {
    let old = base();
    let mut new = base();
    new["routes"][1]["split"][0]["weight"] = json!("20%");
    let d = diff_of(&old, &new);
    let c = change(&d, "routes", "canary");
    assert_eq!(c.kind, Kind::Changed);
    assert_eq!(c.fields.len(), 1, "{:?}", c.fields);
    assert_eq!(c.fields[0].path, "/split/0/weight");
    assert_eq!(
        c.moves,
        vec![Move {
            from: "v1".into(),
            to: "v2".into(),
            ppm: 150_000,
            buckets: vec![(50_000, 200_000)],
            exact: true,
        }]
    );
    // Against the routing itself: exactly the users in the moved buckets change target.
    let (o, n) = (load(&old), load(&new));
    let mut moved = 0;
    for i in 0..20_000 {
        let user = format!("user-{i}");
        let (a, b) = (routed(&o, &user), routed(&n, &user));
        let in_moved = (50_000..200_000).contains(&bucket("canary", &user));
        assert_eq!(a != b, in_moved, "{user}: {a} → {b}");
        if a != b {
            assert_eq!((a.as_str(), b.as_str()), ("v1", "v2"));
            moved += 1;
        }
    }
    assert!((2_700..3_300).contains(&moved), "{moved} of 20000 moved");
    assert!(
        d.render()
            .contains("15.0000% of its users move v1 → v2 (buckets [50000, 200000))")
    );
}

#[test]
fn a_route_turned_into_a_split_moves_the_targets_share() {
    let old = base();
    let mut new = base();
    new["routes"][0] = json!({"name": "default",
        "split": [{"upstream": "v1", "weight": "rest"}, {"upstream": "v2", "weight_ppm": 125}]});
    let d = diff_of(&old, &new);
    let c = change(&d, "routes", "default");
    assert_eq!(c.moves.len(), 1);
    assert_eq!(
        (c.moves[0].ppm, c.moves[0].buckets.clone()),
        (125, vec![(999_875, 1_000_000)])
    );
}

#[test]
fn a_new_salt_gives_expected_shares_and_says_so() {
    let old = base();
    let mut new = base();
    new["routes"][1]["salt"] = json!("again");
    let d = diff_of(&old, &new);
    let c = change(&d, "routes", "canary");
    assert!(c.moves.iter().all(|m| !m.exact && m.buckets.is_empty()));
    // 5% stay-or-go twice: 0.05 × 0.95 each way.
    let ppm: Vec<u32> = c.moves.iter().map(|m| m.ppm).collect();
    assert_eq!(ppm, vec![47_500, 47_500]);
    assert!(
        c.notes.iter().any(|n| n.contains("salt changed")),
        "{:?}",
        c.notes
    );
}

#[test]
fn fallback_fractions_move_users_between_served_and_degraded() {
    let mut old = base();
    old["fallbacks"] = json!([{"name": "busy", "fraction": "30%", "response": {"status": 503}}]);
    let mut new = old.clone();
    new["fallbacks"][0]["fraction"] = json!("10%");
    let d = diff_of(&old, &new);
    let c = change(&d, "fallbacks", "busy");
    assert_eq!(c.moves.len(), 1);
    let m = &c.moves[0];
    assert_eq!(
        (m.from.as_str(), m.to.as_str(), m.ppm, m.buckets.clone()),
        ("degraded", "served", 200_000, vec![(100_000, 300_000)])
    );
}

#[test]
fn switching_a_plan_on_shows_the_fallbacks_it_brings() {
    let old = base();
    let mut new = base();
    new["active_plans"] = json!(["gala"]);
    let d = diff_of(&old, &new);
    assert_eq!(
        change(&d, "active_plans", "active_plans").kind,
        Kind::Changed
    );
    let c = change(&d, "fallbacks", "lite");
    assert_eq!(c.kind, Kind::Added);
    assert_eq!(c.moves.len(), 1);
    assert_eq!(
        (c.moves[0].to.as_str(), c.moves[0].ppm),
        ("degraded", 250_000)
    );
    // And back.
    let d = diff_of(&new, &old);
    assert_eq!(change(&d, "fallbacks", "lite").kind, Kind::Removed);
}

#[test]
fn rule_fields_additions_removals_and_order_are_reported() {
    let old = base();
    let mut new = base();
    new["limits"][0]["rate"] = json!("10/s");
    new["limits"]
        .as_array_mut()
        .expect("a list")
        .push(json!({"name": "total", "rate": "1000/s"}));
    let routes = new["routes"].as_array_mut().expect("a list");
    routes.swap(0, 1);
    let d = diff_of(&old, &new);
    let per_user = change(&d, "limits", "per-user");
    assert_eq!(
        per_user.fields,
        vec![FieldChange {
            path: "/rate".into(),
            old: Some(json!("20/s")),
            new: Some(json!("10/s")),
        }]
    );
    assert_eq!(change(&d, "limits", "total").kind, Kind::Added);
    assert_eq!(change(&d, "routes", "(order)").kind, Kind::Changed);
    // Unchanged rules are not listed.
    assert!(
        d.sections.iter().all(|s| s.name != "upstreams"),
        "{}",
        d.render()
    );
    let mut removed = base();
    removed["upstreams"]
        .as_object_mut()
        .expect("a map")
        .insert("v3".into(), json!({"endpoints": ["127.0.0.1:9002"]}));
    let d = diff_of(&removed, &base());
    assert_eq!(change(&d, "upstreams", "v3").kind, Kind::Removed);
    let text = d.render();
    assert!(text.contains("  - v3 {"), "{text}");
    assert!(text.contains(r#""endpoints":["127.0.0.1:9002"]"#), "{text}");
}

#[test]
fn percentages_are_exact() {
    assert_eq!(percent(0), "0.0000%");
    assert_eq!(percent(125), "0.0125%");
    assert_eq!(percent(1_000_000), "100.0000%");
}
