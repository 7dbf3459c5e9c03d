use serde_json::{Value, json};

use super::*;
use crate::Loaded;

/// A config with a freeze from 18:00 to 23:30 (+08:00) on 2026-12-31.
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
        "plans": {"gala": {"fallbacks": [
            {"name": "lite", "match": {"interfaces": ["grab"]}, "fraction": "25%",
             "response": {"status": 200}}
        ]}},
        "freeze": {
            "name": "gala-night",
            "start": "2026-12-31T18:00:00+08:00",
            "end": "2026-12-31T23:30:00+08:00"
        }
    })
}

fn load(v: &Value) -> Loaded {
    crate::load("t.json", v.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn at(s: &str) -> OffsetDateTime {
    parse_time(s).expect("a test time")
}

/// Inside the window (20:00 in Shanghai, written in UTC).
const INSIDE: &str = "2026-12-31T12:00:00Z";

fn check_at(old: &Value, new: &Value, now: &str) -> Result<(), Refusal> {
    let (o, n) = (load(old), load(new));
    check((&o.config, &o.snapshot), (&n.config, &n.snapshot), at(now))
}

fn with_weight(v: &mut Value, w: &str) {
    v["routes"][1]["split"][0]["weight"] = json!(w);
}

#[test]
fn a_route_edit_inside_the_window_is_refused_naming_the_frozen_path() {
    let mut new = base();
    with_weight(&mut new, "20%");
    let r = check_at(&base(), &new, INSIDE).expect_err("frozen");
    assert_eq!(r.frozen, ["routes/canary/split/0/weight"]);
    assert_eq!(
        r.to_string(),
        "freeze: routes/canary/split/0/weight is frozen until 2026-12-31T23:30:00+08:00 \
         (window \"gala-night\"); editable: active_plans"
    );
}

#[test]
fn the_window_is_judged_in_absolute_time_whatever_the_offsets() {
    let mut new = base();
    with_weight(&mut new, "20%");
    // 09:59:59Z is 17:59:59 in +08:00: one second before the start.
    assert!(check_at(&base(), &new, "2026-12-31T09:59:59Z").is_ok());
    assert!(check_at(&base(), &new, "2026-12-31T10:00:00Z").is_err());
    assert!(check_at(&base(), &new, "2026-12-31T05:00:00-05:00").is_err());
    // The end is exclusive: 23:30 in Shanghai is 15:30Z.
    assert!(check_at(&base(), &new, "2026-12-31T15:29:59Z").is_err());
    assert!(check_at(&base(), &new, "2026-12-31T15:30:00Z").is_ok());
    assert!(check_at(&base(), &new, "2027-01-01T00:00:00+08:00").is_ok());
}

#[test]
fn active_plans_stay_editable_by_default() {
    let mut new = base();
    new["active_plans"] = json!(["gala"]);
    // The plan brings a fallback: a consequence of the edit, not an edit of its own.
    check_at(&base(), &new, INSIDE).expect("active_plans is editable");
    let mut off = new.clone();
    off["active_plans"] = json!([]);
    check_at(&new, &off, INSIDE).expect("and can be switched off again");
}

#[test]
fn an_empty_editable_list_freezes_active_plans_too() {
    let mut old = base();
    old["freeze"]["editable"] = json!([]);
    let mut new = old.clone();
    new["active_plans"] = json!(["gala"]);
    let r = check_at(&old, &new, INSIDE).expect_err("frozen");
    assert_eq!(r.frozen, ["active_plans"]);
    assert!(
        r.to_string().contains("nothing is editable but `freeze`"),
        "{r}"
    );
}

#[test]
fn editable_paths_cover_what_is_below_them_and_stars_match_one_segment() {
    let mut old = base();
    old["freeze"]["editable"] = json!(["routes/*/split/0", "limits/per-user/rate"]);
    let mut new = old.clone();
    with_weight(&mut new, "20%");
    new["limits"][0]["rate"] = json!("10/s");
    check_at(&old, &new, INSIDE).expect("both are editable");
    // Not covered: another route, another field of the limit, a new limit.
    new["routes"][0]["upstream"] = json!("v2");
    new["limits"][0]["key"] = json!(["app"]);
    new["limits"]
        .as_array_mut()
        .expect("a list")
        .push(json!({"name": "per-app", "key": ["app"], "rate": "1000/s"}));
    let r = check_at(&old, &new, INSIDE).expect_err("frozen");
    assert_eq!(
        r.frozen,
        [
            "routes/default/upstream",
            "limits/per-user/key/0",
            "limits/per-app"
        ]
    );
}

#[test]
fn a_path_pattern_matches_whole_segments_only() {
    assert!(covers("routes", "routes/canary/split"));
    assert!(covers("routes/canary", "routes/canary"));
    assert!(covers("routes/*/split", "routes/canary/split/0/weight"));
    assert!(!covers("routes/can", "routes/canary"));
    assert!(!covers("routes/canary/split", "routes/canary"));
    assert!(!covers("active_plans", "active_plans_x"));
}

#[test]
fn editing_the_freeze_itself_is_always_allowed() {
    let mut new = base();
    new["freeze"]["end"] = json!("2026-12-31T20:00:00+08:00");
    check_at(&base(), &new, INSIDE).expect("moving the end");
    let mut lifted = base();
    lifted.as_object_mut().expect("an object").remove("freeze");
    check_at(&base(), &lifted, INSIDE).expect("lifting it");
}

#[test]
fn lifting_the_freeze_and_a_frozen_edit_in_one_save_is_refused_as_a_whole() {
    let mut new = base();
    new["freeze"]["end"] = json!("2026-12-31T19:00:00+08:00");
    with_weight(&mut new, "20%");
    let r = check_at(&base(), &new, INSIDE).expect_err("judged by the live window");
    assert_eq!(r.frozen, ["routes/canary/split/0/weight"]);
    assert!(r.freeze_edited);
    assert!(r.to_string().contains("save it on its own first"), "{r}");
}

#[test]
fn a_freeze_added_by_the_edit_does_not_block_it() {
    let mut old = base();
    old.as_object_mut().expect("an object").remove("freeze");
    let mut new = base();
    with_weight(&mut new, "20%");
    check_at(&old, &new, INSIDE).expect("no window was in force");
}

#[test]
fn a_refusal_names_three_paths_and_counts_the_rest() {
    let mut old = base();
    old["freeze"]["name"] = Value::Null;
    let mut new = old.clone();
    with_weight(&mut new, "20%");
    new["routes"][1]["salt"] = json!("s2");
    new["limits"][0]["rate"] = json!("10/s");
    new["upstreams"]["v2"]["endpoints"] = json!(["127.0.0.1:9002"]);
    let r = check_at(&old, &new, INSIDE).expect_err("frozen");
    assert_eq!(r.frozen.len(), 4, "{:?}", r.frozen);
    let m = r.to_string();
    assert!(
        m.starts_with("freeze: upstreams/v2/endpoints/0, routes/canary/"),
        "{m}"
    );
    assert!(
        m.contains(" and 1 more are frozen until 2026-12-31T23:30:00+08:00;"),
        "{m}"
    );
    assert!(!m.contains("window"), "{m}");
}

#[test]
fn validation_names_bad_times_and_paths() {
    let mut v = base();
    v["freeze"]["start"] = json!("2026-12-31T18:00:00");
    v["freeze"]["editable"] = json!(["route/canary", "routes//split"]);
    let e = crate::load("t.json", v.to_string().as_bytes())
        .expect_err("invalid")
        .to_string();
    assert!(e.contains("freeze.start"), "{e}");
    assert!(e.contains("not an RFC 3339 time with an offset"), "{e}");
    assert!(e.contains("freeze.editable[0]"), "{e}");
    assert!(e.contains("did you mean \"routes\"?"), "{e}");
    assert!(e.contains("freeze.editable[1]"), "{e}");
    let mut v = base();
    v["freeze"]["end"] = json!("2026-12-31T10:00:00Z");
    let e = crate::load("t.json", v.to_string().as_bytes())
        .expect_err("empty window")
        .to_string();
    assert!(e.contains("freeze.end"), "{e}");
    assert!(e.contains("is not after start"), "{e}");
}

#[test]
fn the_window_describes_itself() {
    let l = load(&base());
    let w = Window::of(l.config.freeze.as_ref().expect("a freeze")).expect("valid");
    assert_eq!(
        w.describe(),
        "\"gala-night\" 2026-12-31T18:00:00+08:00 → 2026-12-31T23:30:00+08:00"
    );
    assert!(w.is_active(at(INSIDE)));
    assert!(!w.is_active(at("2027-01-01T00:00:00Z")));
}

/// Brakes stay editable in a freeze: a ramp's `stop` set, a plan's `auto` set to false.
/// Taking them off, or any other ramp edit, is frozen.
#[test]
fn brakes_are_editable_in_a_freeze() {
    let mut old = base();
    old["routes"][1]["split"][0]["weight"] = json!("0%");
    old["routes"][1]["ramp"] = json!({"target": "v2", "steps": ["1%", "10%"]});
    old["plans"]["gala"]["trigger"] =
        json!({"when": [{"interface": "grab", "error_ratio_above": "20%"}]});
    for stop in ["hold", "rollback"] {
        let mut new = old.clone();
        new["routes"][1]["ramp"]["stop"] = json!(stop);
        check_at(&old, &new, INSIDE).expect("stopping a ramp");
        let r = check_at(&new, &old, INSIDE).expect_err("releasing the brake is frozen");
        assert_eq!(r.frozen, ["routes/canary/ramp/stop"]);
    }
    let mut new = old.clone();
    new["plans"]["gala"]["auto"] = json!(false);
    check_at(&old, &new, INSIDE).expect("switching a trigger off");
    let r = check_at(&new, &old, INSIDE).expect_err("switching it on again is frozen");
    assert_eq!(r.frozen, ["plans/gala/auto"]);
    let mut new = old.clone();
    new["routes"][1]["ramp"]["steps"] = json!(["1%", "50%"]);
    let r = check_at(&old, &new, INSIDE).expect_err("a ramp edit is frozen");
    assert_eq!(r.frozen, ["routes/canary/ramp/steps/1"]);
}
