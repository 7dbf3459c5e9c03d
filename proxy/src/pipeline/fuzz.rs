//! What the `decide` fuzz target in `fuzz/` runs: the gateway's own [`decide`] on arbitrary
//! decision inputs, so the benchmarks, `explain` and the fuzzer all exercise the function
//! that serves traffic. Kept here so `cargo test` replays the committed corpus.
//!
//! Properties checked for any input, by panicking (the fuzzer reports a panic as a crash):
//! the action agrees with the phases (forwarded only when admitted, under every limit, with
//! no fallback and a route, to an upstream of the config; a local answer's class and status
//! match the phase that made it), and peeking changes nothing (two peeks agree, unless a
//! limit refused the first and its wait ran out before the second; and they leave every
//! limiter's tracked keys as they were).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rules::Classified;
use rules::fuzz_logic::DecideInput;

use super::decide::{Action, Decision, Mode, decide_classified};
use crate::govern::BreakerVerdict;
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::stats::Class;

/// How far the limiters' clock and `std`'s may disagree on a short interval.
const CLOCK_SLACK: Duration = Duration::from_millis(1);

/// Decision bytes (see [`DecideInput`]) → the whole decision, served and peeked. Never
/// panics on any input; panics when a property above fails.
pub fn decide(data: &[u8]) {
    static RT: OnceLock<Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        let snap = rules::fuzz_logic::base_snapshot();
        Runtime::offline(snap, None, &Arc::new(Metrics::new()))
    });
    let input = DecideInput::decode(data, &rt.snapshot);
    let run = |mode| {
        let class = Classified {
            interface: input.interface,
            app: input.app.as_deref().map(Into::into),
            user: input.user.as_deref().map(Into::into),
            invalid_id: false,
            params: Default::default(),
        };
        decide_classified(
            rt,
            class,
            &input.headers,
            input.client_ip,
            mode,
            |_, _, _| {},
        )
    };
    let tracked = || {
        let rules = &rt.governors.limiters.rules;
        rules.iter().map(|r| r.tracked_keys()).sum::<usize>()
    };
    let before = tracked();
    let peek = Mode::Peek { level: None };
    let started = Instant::now();
    let (a, b) = (run(peek), run(peek));
    // The limiters read the real clock, and earlier inputs served requests: a key refused by
    // the first peek may conform by the second, when its wait ran out in between (the
    // second is then forwarded, or refused by a limit checked after it). A peek that spent
    // quota would make the second more limited than the first; any difference but a wait
    // that ran out is a peek's doing.
    let waited_out = match (&a.limited, &b.limited) {
        (Some(r), then) => {
            then.as_ref().is_none_or(|t| !Arc::ptr_eq(&t.rule, &r.rule))
                && r.retry_after <= started.elapsed() + CLOCK_SLACK
        }
        (None, _) => false,
    };
    if !waited_out {
        assert_eq!(summary(&a), summary(&b), "two peeks disagree");
    }
    assert_eq!(tracked(), before, "peeking added limiter keys");
    check(
        rt,
        &run(Mode::Serve {
            draw: input.random,
            at: crate::clock::Stamp::now(),
        }),
    );
}

/// What a decision came to, comparable across runs.
fn summary(d: &Decision<'_, '_>) -> (bool, Option<String>, Option<u32>, Option<u32>, String) {
    (
        d.admitted,
        d.limited.as_ref().map(|r| r.rule.name.0.to_string()),
        d.fallback.map(|f| f.rule_id),
        d.route.map(|r| r.upstream.0),
        format!("{:?}", std::mem::discriminant(&d.action)),
    )
}

fn check(rt: &Runtime, d: &Decision<'_, '_>) {
    match &d.action {
        Action::Forward { upstream, .. } => {
            assert!(d.admitted && d.limited.is_none() && d.fallback.is_none());
            let route = d.route.expect("forwarded requests were routed");
            assert!((upstream.0 as usize) < rt.snapshot.upstreams.len());
            if !matches!(d.breaker, BreakerVerdict::Open { .. }) {
                assert_eq!(*upstream, route.upstream, "forwarded where the route chose");
            }
        }
        Action::Answer(resp, class) => {
            let status = resp.status().as_u16();
            match class {
                Class::Shed => assert!(!d.admitted && status == 503),
                Class::Limited => assert!(d.limited.is_some() && status == 429),
                Class::Degraded => assert!(
                    d.fallback.is_some() || matches!(d.breaker, BreakerVerdict::Open { .. })
                ),
                Class::Error => assert!(d.identity_refused && status == 400),
                Class::Ok => panic!("a local answer of class {class:?}"),
            }
        }
        Action::NoRoute => assert!(d.route.is_none() && d.admitted && d.fallback.is_none()),
    }
}

/// Run `f` on each input of fuzz target `target`'s committed corpus and of its kept crash
/// inputs (`fuzz/corpus/<target>`, `fuzz/artifacts/<target>`); how many there were.
#[cfg(test)]
pub(crate) fn replay_corpus(target: &str, mut f: impl FnMut(&[u8])) -> usize {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for d in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(d).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            f(&std::fs::read(e.path()).unwrap());
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    /// Replay the committed corpus of the `decide` target (and any crash inputs kept).
    #[test]
    fn replay_corpus() {
        let n = super::replay_corpus("decide", super::decide);
        assert!(
            n >= 5,
            "the committed corpus is replayed ({n} inputs found)"
        );
        super::decide(b"douyin\n0\nbob\nx-device: d1");
        super::decide(b"");
    }
}
