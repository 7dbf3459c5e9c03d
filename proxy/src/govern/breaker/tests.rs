use super::*;

const MS: u64 = 1_000_000;

fn breaker(extra: &str) -> Arc<Breaker> {
    let text = format!(
        r#"{{
  "schema_version": 1,
  "upstreams": {{ "up": {{ "endpoints": ["127.0.0.1:9000"] }} }},
  "routes": [ {{ "name": "default", "upstream": "up" }} ],
  "breakers": [ {{ "name": "b", "upstream": "up", "window_ms": 1000, "min_calls": 10,
                  "error_ratio": "50%", "open_ms": 500, "half_open_probes": 2{extra} }} ]
}}"#
    );
    let snap = rules::load("t.json", text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot;
    Breakers::build(&snap, None).by_id[0].clone()
}

/// Admit at `now` and report `result`; `None` when the breaker refused.
fn call(b: &Arc<Breaker>, now: u64, result: CallResult) -> Option<Option<Transition>> {
    call_took(b, now, result, Duration::from_millis(1))
}

fn call_took(
    b: &Arc<Breaker>,
    now: u64,
    result: CallResult,
    took: Duration,
) -> Option<Option<Transition>> {
    match b.admit(now).0 {
        Admission::Pass(p) => Some(p.finish(now, result, took)),
        Admission::Reject => None,
        Admission::Shadow(_) => panic!("an enforced breaker refuses, it does not shadow"),
    }
}

const OPENED: Option<Transition> = Some(Transition {
    from: State::Closed,
    to: State::Open,
});

/// Failures below `min_calls` never open it, however bad the ratio.
#[test]
fn min_calls_guard() {
    let b = breaker("");
    for i in 0..9 {
        assert_eq!(call(&b, i * MS, CallResult::Failure), Some(None));
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(call(&b, 9 * MS, CallResult::Failure), Some(OPENED));
}

/// 50% exactly opens it; 4 of 10 does not.
#[test]
fn error_ratio_threshold() {
    let b = breaker("");
    for i in 0..6 {
        call(&b, i * MS, CallResult::Success);
    }
    for i in 6..10 {
        assert_eq!(call(&b, i * MS, CallResult::Failure), Some(None));
    }
    assert_eq!(b.state(), State::Closed, "4 of 10");
    assert_eq!(
        call(&b, 10 * MS, CallResult::Failure),
        Some(None),
        "5 of 11"
    );
    assert_eq!(
        call(&b, 11 * MS, CallResult::Failure),
        Some(OPENED),
        "6 of 12"
    );
}

/// Old failures slide out of the window.
#[test]
fn window_slides() {
    let b = breaker("");
    for i in 0..9 {
        call(&b, i * MS, CallResult::Failure);
    }
    // 1.2 s later the nine failures are out of the 1 s window.
    for i in 0..10 {
        assert_eq!(
            call(&b, 1200 * MS + i * MS, CallResult::Success),
            Some(None)
        );
    }
    assert_eq!(b.state(), State::Closed);
}

/// Open: refused until the cool-down ends; then two probes, and closed when both succeed.
#[test]
fn open_half_open_close() {
    let b = breaker("");
    for i in 0..10 {
        call(&b, i * MS, CallResult::Failure);
    }
    assert_eq!(b.state(), State::Open);
    assert!(call(&b, 100 * MS, CallResult::Success).is_none(), "open");
    // Cool-down over (opened at 9 ms, 500 ms): the first request half-opens it.
    let (a1, t) = b.admit(510 * MS);
    assert_eq!(
        t,
        Some(Transition {
            from: State::Open,
            to: State::HalfOpen
        })
    );
    let Admission::Pass(p1) = a1 else {
        panic!("the first probe passes")
    };
    let Admission::Pass(p2) = b.admit(511 * MS).0 else {
        panic!("the second probe passes")
    };
    assert!(
        matches!(b.admit(512 * MS).0, Admission::Reject),
        "only two probes"
    );
    assert_eq!(
        p1.finish(520 * MS, CallResult::Success, Duration::ZERO),
        None
    );
    assert_eq!(
        p2.finish(521 * MS, CallResult::Success, Duration::ZERO),
        Some(Transition {
            from: State::HalfOpen,
            to: State::Closed
        })
    );
    assert_eq!(
        call(&b, 522 * MS, CallResult::Failure),
        Some(None),
        "fresh window"
    );
}

/// A failing probe opens it again for another cool-down.
#[test]
fn failed_probe_reopens() {
    let b = breaker("");
    for i in 0..10 {
        call(&b, i * MS, CallResult::Failure);
    }
    assert_eq!(
        call(&b, 600 * MS, CallResult::Failure),
        Some(Some(Transition {
            from: State::HalfOpen,
            to: State::Open
        }))
    );
    assert!(
        call(&b, 1000 * MS, CallResult::Success).is_none(),
        "open again"
    );
    assert!(
        call(&b, 1101 * MS, CallResult::Success).is_some(),
        "probing again"
    );
}

/// A probe dropped unreported gives its slot back.
#[test]
fn dropped_probe_frees_its_slot() {
    let b = breaker("");
    for i in 0..10 {
        call(&b, i * MS, CallResult::Failure);
    }
    let (Admission::Pass(p1), _) = b.admit(600 * MS) else {
        panic!()
    };
    let Admission::Pass(_p2) = b.admit(600 * MS).0 else {
        panic!()
    };
    assert!(matches!(b.admit(600 * MS).0, Admission::Reject));
    drop(p1);
    assert!(matches!(b.admit(600 * MS).0, Admission::Pass(_)));
}

/// Slow calls open it when slowness is watched.
#[test]
fn slow_calls() {
    let b = breaker(r#", "slow_call_ms": 100, "slow_ratio": "80%""#);
    let slow = Duration::from_millis(150);
    for i in 0..7 {
        call_took(&b, i * MS, CallResult::Success, slow);
    }
    for i in 7..9 {
        call(&b, i * MS, CallResult::Success);
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(
        call_took(&b, 9 * MS, CallResult::Success, slow),
        Some(OPENED),
        "8 of 10 slow"
    );
}

/// Calls admitted before the breaker opened and finishing after do not disturb it.
#[test]
fn stale_results_are_ignored() {
    let b = breaker("");
    let Admission::Pass(early) = b.admit(0).0 else {
        panic!()
    };
    for i in 0..10 {
        call(&b, i * MS, CallResult::Failure);
    }
    assert_eq!(
        early.finish(20 * MS, CallResult::Success, Duration::ZERO),
        None
    );
    assert_eq!(b.state(), State::Open);
}

/// A dry-run breaker goes through the states an enforced one goes through on the same
/// outcomes, and never refuses: where the enforced one refuses it hands out a shadow permit,
/// whose outcome changes nothing (successes reported while open do not close it).
#[test]
fn dry_run_mirrors_states_and_never_refuses() {
    let real = breaker("");
    let dry = breaker(r#", "mode": "dry_run""#);
    let mut opened = 0;
    let mut shadowed = 0;
    let mut step = |now: u64, result: CallResult| {
        let (r, rt) = real.admit(now);
        let (d, dt) = dry.admit(now);
        assert_eq!(rt, dt, "at {now}");
        let t = match (r, d) {
            (Admission::Pass(p), Admission::Pass(q)) => {
                let t = p.finish(now, result, Duration::from_millis(1));
                assert_eq!(t, q.finish(now, result, Duration::from_millis(1)));
                t
            }
            (Admission::Reject, Admission::Shadow(q)) => {
                shadowed += 1;
                assert_eq!(q.finish(now, result, Duration::from_millis(1)), None);
                None
            }
            (r, d) => panic!("at {now}: enforced {r:?}, dry run {d:?}"),
        };
        opened += usize::from(t.is_some_and(|t| t.to == State::Open));
        assert_eq!(real.state(), dry.state(), "at {now}");
    };
    for i in 0..10 {
        step(i * MS, CallResult::Failure);
    }
    for i in 100..105 {
        step(i * MS, CallResult::Success);
    }
    assert_eq!(dry.state(), State::Open);
    step(600 * MS, CallResult::Success);
    step(601 * MS, CallResult::Success);
    assert_eq!(dry.state(), State::Closed, "two good probes close it");
    for i in 700..710 {
        step(i * MS, CallResult::Failure);
    }
    assert_eq!((opened, shadowed), (2, 5));
}

/// Outcomes recorded at once from several threads, without the lock, are all counted: the
/// window holds every call of the bucket, and a call in a later interval rotates its bucket.
#[test]
fn concurrent_outcomes_are_all_counted() {
    let b = breaker("");
    let threads = 4;
    let calls = 5_000;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..calls {
                    assert_eq!(call(&b, MS, CallResult::Success), Some(None));
                }
            });
        }
    });
    let w = &b.core.window;
    let epoch = MS / w.bucket_ns;
    assert_eq!(w.counts(epoch), (threads * calls, 0, 0));
    assert_eq!(b.state(), State::Closed);
    // 0.25 s later: another bucket, the first still in the 1 s window.
    assert_eq!(call(&b, 250 * MS, CallResult::Failure), Some(None));
    assert_eq!(
        w.counts(250 * MS / w.bucket_ns),
        (threads * calls + 1, 1, 0)
    );
}

/// A good call can open it too: the one that brings a window of failures to `min_calls`.
#[test]
fn a_good_call_reaching_min_calls_opens_it() {
    let b = breaker("");
    for i in 0..9 {
        assert_eq!(call(&b, i * MS, CallResult::Failure), Some(None));
    }
    assert_eq!(
        call(&b, 9 * MS, CallResult::Success),
        Some(OPENED),
        "9 of 10"
    );
}

/// Good calls made after every failure has left the window skip the sum, and still count:
/// ten of them and ten failures are 50%.
#[test]
fn good_calls_after_old_failures_still_count() {
    let b = breaker("");
    for i in 0..5 {
        assert_eq!(call(&b, i * MS, CallResult::Failure), Some(None));
    }
    let later = 2000 * MS;
    for i in 0..10 {
        assert_eq!(call(&b, later + i * MS, CallResult::Success), Some(None));
    }
    for i in 10..19 {
        assert_eq!(
            call(&b, later + i * MS, CallResult::Failure),
            Some(None),
            "{i}"
        );
    }
    assert_eq!(
        call(&b, later + 19 * MS, CallResult::Failure),
        Some(OPENED),
        "10 of 20"
    );
}
