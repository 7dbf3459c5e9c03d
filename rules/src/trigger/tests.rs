use super::*;

const GRAB: InterfaceId = InterfaceId(0);

fn trigger(auto: bool) -> CompiledTrigger {
    CompiledTrigger {
        plan: "calm".into(),
        auto,
        when: vec![CompiledCondition {
            measure: Measure::ErrorRatio(GRAB, 200_000),
            subject: "grab".into(),
        }],
        for_ms: 3_000,
        release_for_ms: 5_000,
        min_requests: 20,
    }
}

/// Window `i` (one second) with `ok` and `error` requests on `grab`.
fn window(i: u64, ok: u64, error: u64) -> Window {
    Window {
        start_ms: i * 1000,
        end_ms: (i + 1) * 1000,
        interfaces: vec![InterfaceFigures {
            ok,
            error,
            ..Default::default()
        }],
        upstreams: vec![],
        admission_level: 0,
        ramps: vec![],
    }
}

fn bad(i: u64) -> Window {
    window(i, 50, 50)
}

fn good(i: u64) -> Window {
    window(i, 100, 0)
}

/// Step through windows, returning the index of each window that changed something.
fn run(c: &mut Controller, t: &[CompiledTrigger], ws: &[Window]) -> Vec<(u64, bool)> {
    ws.iter()
        .flat_map(|w| {
            c.step(t, w)
                .into_iter()
                .map(move |ch| (w.start_ms / 1000, ch.on))
        })
        .collect()
}

#[test]
fn switches_on_once_the_condition_has_held_for_for_ms() {
    let t = [trigger(true)];
    let mut c = Controller::default();
    let ws: Vec<Window> = (0..2).map(good).chain((2..6).map(bad)).collect();
    // Bad from t=2 s: held for 3 s at the end of window 4.
    assert_eq!(run(&mut c, &t, &ws), [(4, true)]);
    assert_eq!(c.active(), [Box::from("calm")]);
    let st = c.state("calm").expect("tracked");
    assert_eq!(st.since_ms, Some(5_000));
    let why = st.reason.as_deref().expect("a reason");
    assert!(
        why.contains("error_ratio of grab 50.0% of 100 above 20%"),
        "{why}"
    );
}

#[test]
fn one_good_window_restarts_the_sustain_count() {
    let t = [trigger(true)];
    let mut c = Controller::default();
    let ws = [bad(0), bad(1), good(2), bad(3), bad(4), bad(5)];
    assert_eq!(run(&mut c, &t, &ws), [(5, true)]);
}

#[test]
fn releases_after_release_for_ms_of_recovery_and_does_not_flap() {
    let t = [trigger(true)];
    let mut c = Controller::default();
    let mut ws: Vec<Window> = (0..3).map(bad).collect();
    // Recovering, but one bad window at 6 restarts the count; off 5 s after 7.
    ws.extend((3..6).map(good));
    ws.push(bad(6));
    ws.extend((7..13).map(good));
    assert_eq!(run(&mut c, &t, &ws), [(2, true), (11, false)]);
    assert!(c.active().is_empty());
    let why = c.state("calm").and_then(|s| s.reason.clone());
    assert_eq!(why.as_deref(), Some("no condition held for 5000 ms"));
}

#[test]
fn a_window_below_min_requests_does_not_hold() {
    let t = [trigger(true)];
    let mut c = Controller::default();
    let ws: Vec<Window> = (0..10).map(|i| window(i, 5, 10)).collect();
    assert!(run(&mut c, &t, &ws).is_empty());
}

#[test]
fn auto_false_never_switches_on_and_releases_a_plan_it_had_on() {
    let mut c = Controller::default();
    let ws: Vec<Window> = (0..10).map(bad).collect();
    assert!(run(&mut c, &[trigger(false)], &ws).is_empty());
    assert!(c.active().is_empty());
    // On by its trigger, then the trigger is set to auto: false: off at once.
    assert_eq!(run(&mut c, &[trigger(true)], &ws[..3]), [(2, true)]);
    let off = c.step(&[trigger(false)], &bad(3));
    assert_eq!(off.len(), 1);
    assert!(!off[0].on);
    assert!(c.active().is_empty());
}

#[test]
fn manual_plans_always_win() {
    let manual = vec!["calm".to_owned()];
    let auto: Vec<Box<str>> = vec!["calm".into(), "shed".into()];
    assert_eq!(
        in_force(&manual, &auto),
        [("calm", Cause::Manual), ("shed", Cause::Auto)]
    );
    // A manual plan is on whether or not its trigger has seen anything.
    assert_eq!(in_force(&manual, &[]), [("calm", Cause::Manual)]);
}

#[test]
fn every_measure_judges_its_figures() {
    let mut w = window(0, 60, 0);
    w.interfaces[0].limited = 30;
    w.interfaces[0].shed = 10;
    w.upstreams = vec![UpstreamFigures {
        calls: 60,
        p99_ms: Some(250.0),
    }];
    w.admission_level = 7;
    let up = UpstreamId(0);
    let cases = [
        (Measure::LimitedRatio(GRAB, 290_000), true),
        (Measure::LimitedRatio(GRAB, 300_000), false),
        (Measure::ShedRatio(GRAB, 90_000), true),
        (Measure::ShedRatio(GRAB, 100_000), false),
        (Measure::UpstreamP99(up, 200), true),
        (Measure::UpstreamP99(up, 250), false),
        (Measure::AdmissionLevel(6), true),
        (Measure::AdmissionLevel(7), false),
        (Measure::ErrorRatio(GRAB, 0), false),
    ];
    for (m, above) in cases {
        let (_, got) = m.judge(&w, 20).expect("enough requests");
        assert_eq!(got, above, "{m:?}");
    }
}

// === validation and compilation ===

fn config(plans: &str) -> String {
    format!(
        r#"{{
  "schema_version": 1,
  "interfaces": [ {{ "name": "grab", "method": "POST", "path": "/envelopes/{{id}}/grab" }} ],
  "upstreams": {{ "v1": {{ "endpoints": ["127.0.0.1:9000"] }} }},
  "routes": [ {{ "name": "default", "upstream": "v1" }} ],
  "limits": [ {{ "name": "l", "rate": "5/s" }} ],
  "plans": {plans}
}}"#
    )
}

fn messages(plans: &str) -> Vec<String> {
    let c =
        crate::source::parse("t.json", config(plans).as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    crate::validate::validate(&c)
        .into_iter()
        .map(|i| format!("{}: {}", i.path, i.message))
        .collect()
}

#[test]
fn a_trigger_compiles_into_the_snapshot() {
    let text = config(
        r#"{ "calm": { "disable": ["l"], "trigger": {
        "when": [ { "interface": "grab", "error_ratio_above": "20%" },
                  { "upstream": "v1", "p99_ms_above": 500 },
                  { "admission_level_above": 3 } ],
        "for_ms": 3000, "release_for_ms": 10000, "min_requests": 5 } },
      "held": { "auto": false, "trigger": { "when": [ { "interface": "grab", "shed_ratio_above": "1%" } ] } } }"#,
    );
    let snap = crate::load("t.json", text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot;
    let t = &snap.triggers;
    assert_eq!(t.len(), 2);
    assert_eq!((&*t[0].plan, t[0].auto), ("calm", true));
    assert_eq!(
        t[0].when.iter().map(|c| c.measure).collect::<Vec<_>>(),
        [
            Measure::ErrorRatio(GRAB, 200_000),
            Measure::UpstreamP99(UpstreamId(0), 500),
            Measure::AdmissionLevel(3)
        ]
    );
    assert_eq!(
        (t[0].for_ms, t[0].release_for_ms, t[0].min_requests),
        (3000, 10_000, 5)
    );
    assert_eq!((&*t[1].plan, t[1].auto), ("held", false));
    // Triggers switch nothing on at load: the rules in force are the base ones.
    assert!(snap.governance.active_plans.is_empty());
    assert_eq!(snap.governance.limits.len(), 1);
}

#[test]
fn trigger_mistakes_are_reported_where_they_are() {
    let m = messages(
        r#"{ "a": { "trigger": { "when": [
        { "interface": "grb", "error_ratio_above": "20%" },
        { "interface": "grab", "error_ratio_above": "20%", "p99_ms_above": 5 },
        { "upstream": "v1", "error_ratio_above": "20%" },
        { "interface": "grab", "shed_ratio_above": "rest" },
        { "upstream": "v2", "p99_ms_above": 0 },
        { "interface": "grab", "admission_level_above": 2 },
        {} ], "min_requests": 0, "for_ms": 4000000 } },
      "b": { "auto": true },
      "c": { "trigger": { "when": [] } } }"#,
    );
    for want in [
        "plans.a.trigger.for_ms: 4000000 is out of range; allowed 0..=3600000",
        "plans.a.trigger.min_requests: 0 is out of range; allowed 1..=1000000",
        "plans.a.trigger.when[0].interface: unknown interface \"grb\"; did you mean \"grab\"?",
        "plans.a.trigger.when[1]: a condition needs exactly one measure of",
        "plans.a.trigger.when[2].upstream: `error_ratio_above` does not take an upstream",
        "plans.a.trigger.when[2]: `error_ratio_above` needs an `interface`",
        "plans.a.trigger.when[3].shed_ratio_above: \"rest\": a ratio is a percentage",
        "plans.a.trigger.when[4].p99_ms_above: 0 is out of range; allowed 1..=3600000",
        "plans.a.trigger.when[4].upstream: unknown upstream \"v2\"; did you mean \"v1\"?",
        "plans.a.trigger.when[5].interface: `admission_level_above` does not take an interface",
        "plans.a.trigger.when[6]: a condition needs exactly one measure of",
        "plans.b.auto: `auto: true` needs a `trigger`",
        "plans.c.trigger.when: 0 conditions; a trigger needs 1 to 32",
    ] {
        assert!(
            m.iter().any(|x| x.starts_with(want)),
            "missing {want:?} in {m:#?}"
        );
    }
    assert_eq!(m.len(), 13, "{m:#?}");
}

/// Plans a trigger may switch on together must not conflict; a plan kept off its trigger
/// (`auto: false`) is judged only alone.
#[test]
fn plans_a_trigger_may_switch_on_together_must_not_conflict() {
    let both = r#"{ "a": { "disable": ["l"], "trigger": { "when": [ { "admission_level_above": 1 } ] } },
      "b": { "limits": [ { "name": "l", "rate": "1/s" } ], "trigger": { "when": [ { "admission_level_above": 2 } ] } } }"#;
    let m = messages(both);
    assert_eq!(
        m,
        [
            "plans.b.limits[0]: plans \"a\" and \"b\" are both active and both change limit \"l\" when the plans with a trigger are switched on beside the active ones"
        ]
    );
    let held = both.replacen("\"trigger\"", "\"auto\": false, \"trigger\"", 1);
    assert_eq!(messages(&held), Vec::<String>::new());
}

/// During a change freeze, `plans/*/auto` listed as editable lets an operator keep a
/// trigger from switching its plan on, while the trigger's conditions stay frozen.
#[test]
fn a_freeze_can_leave_a_triggers_auto_switch_editable() {
    let cfg = |auto: bool, ratio: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&config(&format!(
            r#"{{ "calm": {{ "disable": ["l"], "auto": {auto}, "trigger": {{
                "when": [ {{ "interface": "grab", "error_ratio_above": "{ratio}" }} ] }} }} }}"#
        )))
        .expect("json");
        v["freeze"] = serde_json::json!({ "name": "gala", "start": "2026-12-31T18:00:00+08:00",
            "end": "2026-12-31T23:30:00+08:00", "editable": ["active_plans", "plans/*/auto"] });
        crate::load("t.json", v.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    };
    let inside = crate::model::parse_time("2026-12-31T12:00:00Z").expect("a time");
    let check = |old: &crate::Loaded, new: &crate::Loaded| {
        crate::freeze::check(
            (&old.config, &old.snapshot),
            (&new.config, &new.snapshot),
            inside,
        )
    };
    let on = cfg(true, "20%");
    check(&on, &cfg(false, "20%")).expect("auto is editable");
    let r = check(&on, &cfg(true, "50%")).expect_err("the conditions are frozen");
    assert_eq!(r.frozen, ["plans/calm/trigger/when/0/error_ratio_above"]);
}
