use super::*;
use crate::model::Config;
use crate::snapshot::Snapshot;

/// A split of `v2` (0%, ramped) and `v1` (rest), windows of 1 s, steps held 3 s.
fn config(ramp: serde_json::Value) -> Config {
    serde_json::from_value(serde_json::json!({
        "schema_version": 1,
        "interfaces": [ { "name": "grab", "method": "POST", "path": "/envelopes/{id}/grab" } ],
        "upstreams": {
            "v1": { "endpoints": ["127.0.0.1:9001"] },
            "v2": { "endpoints": ["127.0.0.1:9002"] },
            "v3": { "endpoints": ["127.0.0.1:9003"] }
        },
        "routes": [ {
            "name": "canary",
            "split": [ { "upstream": "v3", "weight": "10%" },
                       { "upstream": "v2", "weight": "0%" },
                       { "upstream": "v1", "weight": "rest" } ],
            "ramp": ramp
        } ]
    }))
    .expect("a config")
}

fn ramp_json() -> serde_json::Value {
    serde_json::json!({
        "target": "v2", "baseline": "v1",
        "steps": ["1%", "10%", "50%", "90%"],
        "hold_ms": 3000,
        "guard": { "window_ms": 1000, "min_requests": 20, "max_error_ratio_diff": "5%",
                   "max_p99_ratio": 2.0, "p99_margin_ms": 5 }
    })
}

fn compiled(ramp: serde_json::Value) -> (Config, Vec<CompiledRamp>) {
    let c = config(ramp);
    let s = Snapshot::compile(&c).expect("compiles");
    let ramps = s.ramps.clone();
    (c, ramps)
}

/// `n` requests with `errors` errors, each taking `ms` milliseconds.
fn side(n: u64, errors: u64, ms: u64) -> TargetFigures {
    let mut latency = Hist::default();
    for _ in 0..n {
        latency.observe_us(ms * 1000);
    }
    TargetFigures {
        requests: n,
        errors,
        latency,
    }
}

fn figures(target: TargetFigures, baseline: TargetFigures) -> Vec<RampFigures> {
    vec![RampFigures {
        route: "canary".into(),
        target,
        baseline,
    }]
}

fn healthy() -> Vec<RampFigures> {
    figures(side(50, 0, 10), side(500, 1, 10))
}

/// Feed one-second windows ending at `from+1 ..= to` seconds; the events with their time.
fn run(
    c: &mut Controller,
    ramps: &[CompiledRamp],
    secs: std::ops::RangeInclusive<u64>,
    f: impl Fn(u64) -> Vec<RampFigures>,
) -> Vec<(u64, EventKind, u32)> {
    secs.flat_map(|t| {
        c.step(ramps, &f(t), t * 1000, true)
            .into_iter()
            .map(move |e| (t, e.kind, e.to_ppm))
    })
    .collect()
}

#[test]
fn compiles_the_pair_and_its_written_weights() {
    let (_, ramps) = compiled(ramp_json());
    let r = &ramps[0];
    assert_eq!((r.target_slot, r.baseline_slot), (1, 2));
    assert_eq!(r.written, [100_000, 0, 900_000]);
    assert_eq!(r.steps, [10_000, 100_000, 500_000, 900_000]);
    assert_eq!(r.max_error_diff_ppm, 50_000);
}

/// A healthy target advances one step per hold, and completes after the last one held.
#[test]
fn advances_after_each_hold_and_completes() {
    let (_, ramps) = compiled(ramp_json());
    let mut c = Controller::default();
    let ev = c.reconcile(&ramps, 0);
    assert_eq!(
        (ev[0].kind, ev[0].from_ppm, ev[0].to_ppm),
        (EventKind::Started, 0, 10_000)
    );
    let ev = run(&mut c, &ramps, 1..=13, |_| healthy());
    assert_eq!(
        ev,
        [
            (3, EventKind::Advanced, 100_000),
            (6, EventKind::Advanced, 500_000),
            (9, EventKind::Advanced, 900_000),
            (12, EventKind::Completed, 900_000),
        ]
    );
    let st = c.state("canary").unwrap();
    assert_eq!(st.phase, Phase::Done);
    assert_eq!(c.weights(&ramps), [900_000]);
    assert!(
        st.reason.starts_with("last step 4 of 4 (90%) held 3000 ms"),
        "{}",
        st.reason
    );
}

/// A breaching window rolls the target back to 0 at once, and it stays there.
#[test]
fn breach_rolls_back_at_once() {
    let (_, ramps) = compiled(ramp_json());
    let mut c = Controller::default();
    c.reconcile(&ramps, 0);
    let ev = run(&mut c, &ramps, 1..=4, |_| healthy());
    assert_eq!(ev, [(3, EventKind::Advanced, 100_000)]);
    // At the second step, the target fails 20% of its calls.
    let ev = run(&mut c, &ramps, 5..=8, |_| {
        figures(side(50, 10, 10), side(500, 1, 10))
    });
    assert_eq!(ev, [(5, EventKind::RolledBack, 0)]);
    assert_eq!(c.weights(&ramps), [0]);
    let st = c.state("canary").unwrap();
    assert_eq!(st.phase, Phase::RolledBack);
    assert!(
        st.reason
            .starts_with("guard breached at step 2 of 4 (10%): error ratio 20.00% vs 0.20%"),
        "{}",
        st.reason
    );
    let v = st.verdict.as_ref().unwrap();
    assert_eq!(
        (v.outcome, v.target.errors, v.baseline.requests),
        (Outcome::Breach, 10, 500)
    );
    // Healthy again: rolled back is for good (until the ramp is edited).
    assert!(run(&mut c, &ramps, 9..=20, |_| healthy()).is_empty());
}

/// A slow target breaches on p99, beyond both the ratio and the margin; a ratio within the
/// margin does not.
#[test]
fn p99_breach_needs_the_ratio_and_the_margin() {
    let (_, ramps) = compiled(ramp_json());
    let mut c = Controller::default();
    c.reconcile(&ramps, 0);
    // 3 ms against 1 ms: ×3, but only 2 ms more: within the margin.
    let ev = run(&mut c, &ramps, 1..=3, |_| {
        figures(side(50, 0, 3), side(500, 0, 1))
    });
    assert_eq!(ev, [(3, EventKind::Advanced, 100_000)]);
    // 40 ms against 10 ms: a breach.
    let ev = run(&mut c, &ramps, 4..=4, |_| {
        figures(side(50, 0, 40), side(500, 0, 10))
    });
    assert_eq!(ev, [(4, EventKind::RolledBack, 0)]);
    let st = c.state("canary").unwrap();
    assert!(st.reason.contains("p99 "), "{}", st.reason);
}

/// Too few requests: the window goes on (waiting) until both sides have `min_requests`;
/// the step advances only on a judged pass.
#[test]
fn min_requests_extends_the_window() {
    let (_, ramps) = compiled(ramp_json());
    let mut c = Controller::default();
    c.reconcile(&ramps, 0);
    // 5 target requests a second: 20 after 4 s.
    let ev = run(&mut c, &ramps, 1..=3, |_| {
        figures(side(5, 0, 10), side(500, 0, 10))
    });
    assert!(ev.is_empty(), "{ev:?}");
    let v = c.state("canary").unwrap().verdict.clone().unwrap();
    assert_eq!(v.outcome, Outcome::Waiting);
    assert_eq!(v.target.requests, 15);
    assert!(
        v.detail
            .starts_with("waiting for 20 requests each: target 15"),
        "{}",
        v.detail
    );
    let ev = run(&mut c, &ramps, 4..=4, |_| {
        figures(side(5, 0, 10), side(500, 0, 10))
    });
    assert_eq!(ev, [(4, EventKind::Advanced, 100_000)]);
    // Failing, but with too few requests to judge: nothing happens...
    let ev = run(&mut c, &ramps, 5..=6, |_| {
        figures(side(5, 5, 10), side(500, 0, 10))
    });
    assert!(ev.is_empty(), "{ev:?}");
    // ... until there are enough: the window holds all of them.
    let ev = run(&mut c, &ramps, 7..=8, |_| {
        figures(side(5, 5, 10), side(500, 0, 10))
    });
    assert_eq!(ev, [(8, EventKind::RolledBack, 0)]);
}

/// `on_breach: hold` keeps the target at its step and stops advancing.
#[test]
fn breach_with_on_breach_hold_holds() {
    let mut j = ramp_json();
    j["on_breach"] = "hold".into();
    let (_, ramps) = compiled(j);
    let mut c = Controller::default();
    c.reconcile(&ramps, 0);
    let ev = run(&mut c, &ramps, 1..=5, |t| match t {
        5 => figures(side(50, 25, 10), side(500, 0, 10)),
        _ => healthy(),
    });
    assert_eq!(
        ev,
        [
            (3, EventKind::Advanced, 100_000),
            (5, EventKind::Held, 100_000)
        ]
    );
    assert!(run(&mut c, &ramps, 6..=20, |_| healthy()).is_empty());
    assert_eq!(c.weights(&ramps), [100_000]);
    assert_eq!(c.state("canary").unwrap().phase, Phase::Held);
}

/// `stop: hold` and a freeze (`may_advance: false`) stop advancing; breaches still act.
/// `stop: rollback` sends the target to 0 without starting the ramp again.
#[test]
fn stop_and_freeze() {
    let (_, ramps) = compiled(ramp_json());
    let mut c = Controller::default();
    c.reconcile(&ramps, 0);
    run(&mut c, &ramps, 1..=3, |_| healthy());
    assert_eq!(c.weights(&ramps), [100_000]);

    let mut held = ramp_json();
    held["stop"] = "hold".into();
    let (_, held) = compiled(held);
    assert_eq!(
        held[0].fingerprint, ramps[0].fingerprint,
        "stop is not an edit"
    );
    assert!(run(&mut c, &held, 4..=12, |_| healthy()).is_empty());
    assert_eq!(c.weights(&held), [100_000]);

    for t in 13..=20 {
        assert!(
            c.step(&ramps, &healthy(), t * 1000, false).is_empty(),
            "frozen"
        );
    }
    let ev = c.step(
        &ramps,
        &figures(side(50, 25, 10), side(500, 0, 10)),
        21_000,
        false,
    );
    assert_eq!(
        ev[0].kind,
        EventKind::RolledBack,
        "a breach acts in a freeze"
    );

    let (_, fresh) = compiled(ramp_json());
    let mut c = Controller::default();
    c.reconcile(&fresh, 0);
    let mut stop = ramp_json();
    stop["stop"] = "rollback".into();
    let (_, stop) = compiled(stop);
    assert_eq!(c.weights(&stop), [0]);
    let ev = c.reconcile(&stop, 1000);
    assert_eq!(
        (ev[0].kind, ev[0].from_ppm, ev[0].to_ppm),
        (EventKind::RolledBack, 10_000, 0)
    );
    assert_eq!(c.state("canary").unwrap().reason, "stop: rollback");
}

/// A reload that leaves the ramp as written keeps its step; an edit starts it again; a
/// removed ramp's state goes.
#[test]
fn survives_an_unchanged_reload_and_restarts_on_an_edit() {
    let (_, ramps) = compiled(ramp_json());
    let mut c = Controller::default();
    c.reconcile(&ramps, 0);
    run(&mut c, &ramps, 1..=6, |_| healthy());
    assert_eq!(c.weights(&ramps), [500_000]);
    let (_, same) = compiled(ramp_json());
    assert!(c.reconcile(&same, 7000).is_empty());
    assert_eq!(c.weights(&same), [500_000]);

    let mut edited = ramp_json();
    edited["hold_ms"] = 5000.into();
    let (_, edited) = compiled(edited);
    assert_eq!(c.weights(&edited), [10_000], "an edit would start again");
    let ev = c.reconcile(&edited, 8000);
    assert_eq!(
        (ev[0].kind, ev[0].from_ppm, ev[0].to_ppm),
        (EventKind::Restarted, 500_000, 10_000)
    );
    c.reconcile(&[], 9000);
    assert!(c.state("canary").is_none());
}

/// A restart resumes at the recorded step and phase (its hold starting again), never at
/// another; a record of an edited ramp is not taken up.
#[test]
fn restore_resumes_the_recorded_step() {
    let (_, ramps) = compiled(ramp_json());
    let mut c = Controller::default();
    c.reconcile(&ramps, 0);
    run(&mut c, &ramps, 1..=6, |_| healthy());
    let saved: Saved =
        serde_json::from_slice(&serde_json::to_vec(&c.save()).unwrap()).expect("round trip");
    let (mut r, ev) = Controller::restore(saved.clone(), &ramps, 100_000);
    assert_eq!((ev[0].kind, ev[0].to_ppm), (EventKind::Resumed, 500_000));
    assert!(r.reconcile(&ramps, 100_000).is_empty());
    assert_eq!(r.weights(&ramps), [500_000]);
    // The hold starts again at the restart.
    assert!(run(&mut r, &ramps, 101..=102, |_| healthy()).is_empty());
    assert_eq!(
        run(&mut r, &ramps, 103..=103, |_| healthy()),
        [(103, EventKind::Advanced, 900_000)]
    );

    let mut edited = ramp_json();
    edited["steps"] = serde_json::json!(["2%", "50%"]);
    let (_, edited) = compiled(edited);
    let (mut r, ev) = Controller::restore(saved, &edited, 100_000);
    assert_eq!((ev[0].kind, ev[0].to_ppm), (EventKind::Restarted, 20_000));
    assert!(r.reconcile(&edited, 100_000).is_empty());
    assert_eq!(r.weights(&edited), [20_000]);
}

/// The effective config moves only the pair's common edge: users of the target stay in as
/// it grows, and the targets outside the pair keep their ranges.
#[test]
fn effective_weights_grow_the_targets_range_only() {
    let (c, ramps) = compiled(ramp_json());
    assert!(effective(&c, &ramps, &[0]).is_none(), "as written");
    let mut before: Option<Vec<crate::route::SplitEdge>> = None;
    for w in [10_000, 100_000, 500_000, 900_000] {
        let e = effective(&c, &ramps, &[w]).expect("changed");
        let s = Snapshot::compile(&e).expect("the effective config compiles");
        let crate::route::RouteAction::Split(edges) = &s.routes[0].action else {
            panic!("a split");
        };
        assert_eq!(
            edges.iter().map(|e| e.ppm).collect::<Vec<_>>(),
            [100_000, w, 900_000 - w]
        );
        if let Some(b) = &before {
            // v3 keeps [0, 100000); v2's range starts where it did and ends later.
            assert_eq!(edges[0].edge, b[0].edge);
            assert!(edges[1].edge > b[1].edge);
        }
        assert_eq!(s.ramps[0].route, ramps[0].route);
        before = Some(edges.clone());
    }
}

#[test]
fn percent_prints_as_written() {
    assert_eq!(percent(100), "0.01%");
    assert_eq!(percent(50_000), "5%");
    assert_eq!(percent(1_000_000), "100%");
    assert_eq!(percent(0), "0%");
    assert_eq!(percent(125), "0.0125%");
}

/// At a step that leaves the baseline no weight (here the last, 90% of the pair's 90%),
/// the target is judged against the baseline's last window with requests: healthy, it
/// completes; failing, it is rolled back.
#[test]
fn a_step_without_baseline_traffic_is_judged_against_its_last_window() {
    let (_, ramps) = compiled(ramp_json());
    for failing in [false, true] {
        let mut c = Controller::default();
        c.reconcile(&ramps, 0);
        run(&mut c, &ramps, 1..=9, |_| healthy());
        assert_eq!(c.weights(&ramps), [900_000]);
        let alone = |_| figures(side(500, if failing { 50 } else { 0 }, 10), side(0, 0, 10));
        let ev = run(&mut c, &ramps, 10..=12, alone);
        let want = match failing {
            false => (12, EventKind::Completed, 900_000),
            true => (10, EventKind::RolledBack, 0),
        };
        assert_eq!(ev, [want]);
        let v = c.state("canary").unwrap().verdict.clone().unwrap();
        assert_eq!(v.baseline.requests, 500, "the reference window");
        assert!(
            v.detail
                .ends_with("(baseline: its last window with requests)"),
            "{}",
            v.detail
        );
    }
}

/// Windows fed a few milliseconds short of the second still close a judging window and a
/// hold on time.
#[test]
fn timer_jitter_does_not_cost_a_window() {
    let (_, ramps) = compiled(ramp_json());
    let mut c = Controller::default();
    c.reconcile(&ramps, 0);
    // Ticks at 999, 1998, 2997 ms.
    let mut events = Vec::new();
    for i in 1..=3u64 {
        let end = i * 999;
        for e in c.step(&ramps, &healthy(), end, true) {
            events.push((end, e.kind));
        }
        let v = c.state("canary").unwrap().verdict.clone().unwrap();
        assert_eq!(
            (v.at_ms, v.outcome),
            (end, Outcome::Pass),
            "judged at {end}"
        );
    }
    assert_eq!(events, [(2997, EventKind::Advanced)]);
}
