use std::net::IpAddr;

use governor::clock::FakeRelativeClock;
use http::HeaderMap;
use rules::MatchInput;

use super::*;

const MS: Duration = Duration::from_millis(1);

fn snapshot(limits: &str) -> Snapshot {
    let text = format!(
        r#"{{
  "schema_version": 1,
  "interfaces": [ {{ "name": "grab", "method": "POST", "path": "/envelopes/{{id}}/grab" }} ],
  "upstreams": {{ "up": {{ "endpoints": ["127.0.0.1:9000"] }} }},
  "routes": [ {{ "name": "default", "upstream": "up" }} ],
  "limits": {limits}
}}"#
    );
    rules::load("t.json", text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot
}

struct Rig {
    snap: Snapshot,
    clock: FakeRelativeClock,
    lim: Limiters<FakeRelativeClock>,
    headers: HeaderMap,
}

impl Rig {
    fn new(limits: &str) -> Self {
        let snap = snapshot(limits);
        let clock = FakeRelativeClock::default();
        let lim = Limiters::build(&snap, &clock, None);
        Self {
            snap,
            clock,
            lim,
            headers: HeaderMap::new(),
        }
    }

    /// One request, with its pair as the gateway makes it; the refusing rule's name, and
    /// every outcome seen, in order.
    fn send(&self, app: &str, user: Option<&str>) -> (Option<String>, Vec<(String, Outcome)>) {
        let mut seen = Vec::new();
        let m = MatchInput {
            app: Some(app),
            interface: self
                .snap
                .classify(rules::RequestParts {
                    method: &http::Method::POST,
                    path: "/envelopes/1/grab",
                    query: None,
                    headers: &self.headers,
                })
                .interface,
            user,
            headers: &self.headers,
            params: &[],
        };
        let input = RouteInput {
            pair: self.snap.pair(&m),
            m,
            client_ip: Some(IpAddr::from([10, 0, 0, 1])),
            random: 0,
        };
        let rej = self.lim.check(&self.snap, &input, |r, o, _| {
            seen.push((r.name.0.to_string(), o))
        });
        (rej.map(|r| r.rule.name.0.to_string()), seen)
    }

    fn admitted(&self, app: &str, user: &str) -> bool {
        self.send(app, Some(user)).0.is_none()
    }
}

/// The GCRA virtual-scheduling algorithm, written out as the reference: admit at `t` if
/// `t ≥ tat − τ`, then `tat = max(tat, t) + T`.
fn reference(arrivals_ns: &[u64], t_ns: u64, burst: u64) -> Vec<bool> {
    let tau = t_ns * (burst - 1);
    let mut tat: Option<u64> = None;
    arrivals_ns
        .iter()
        .map(|&t| {
            let cur = tat.unwrap_or(t);
            if t + tau >= cur {
                tat = Some(cur.max(t) + t_ns);
                true
            } else {
                false
            }
        })
        .collect()
}

/// `n` deterministic irregular gaps of 0..60 ms, in nanoseconds (a linear congruential
/// sequence from `seed`).
fn irregular_gaps(seed: u64, n: usize) -> impl Iterator<Item = u64> {
    let mut x = seed;
    (0..n).map(move |_| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % 60_000_000
    })
}

/// 10/s with burst 5: five at once, then one every 100 ms, exactly; the refusal says when.
#[test]
fn gcra_sequence_10_per_s_burst_5() {
    let rig = Rig::new(r#"[{"name": "per-user", "key": ["user"], "rate": "10/s", "burst": 5}]"#);
    let got: Vec<bool> = (0..7).map(|_| rig.admitted("a", "u")).collect();
    assert_eq!(got, [true, true, true, true, true, false, false]);
    let lim = &rig.lim.rules[0];
    let key = rig.snap.governance.limits[0]
        .key_of(
            &rig.snap,
            &RouteInput {
                m: MatchInput {
                    app: None,
                    interface: None,
                    user: Some("u"),
                    headers: &rig.headers,
                    params: &[],
                },
                client_ip: None,
                random: 0,
                pair: Default::default(),
            },
        )
        .unwrap();
    assert_eq!(lim.check_at(key.quota, key.hash, lim.now()), Err(100 * MS));
    rig.clock.advance(99 * MS);
    assert!(!rig.admitted("a", "u"), "not yet at 99 ms");
    rig.clock.advance(MS);
    assert!(rig.admitted("a", "u"), "one more at 100 ms");
    assert!(!rig.admitted("a", "u"));
    rig.clock.advance(1000 * MS);
    let refill: usize = (0..10).filter(|_| rig.admitted("a", "u")).count();
    assert_eq!(
        refill, 5,
        "a full bucket holds the burst, not a second's worth"
    );
}

/// Against the reference algorithm over 2,000 irregular arrivals, decision by decision.
#[test]
fn gcra_matches_reference() {
    let rig = Rig::new(r#"[{"name": "per-user", "key": ["user"], "rate": "10/s", "burst": 5}]"#);
    let mut now = 0u64;
    let mut arrivals = Vec::new();
    let mut got = Vec::new();
    for gap in irregular_gaps(12345, 2000) {
        rig.clock.advance(Duration::from_nanos(gap));
        now += gap;
        arrivals.push(now);
        got.push(rig.admitted("a", "u"));
    }
    let want = reference(&arrivals, 100_000_000, 5);
    assert_eq!(got, want);
    let admitted = got.iter().filter(|&&a| a).count();
    assert!(admitted > 500 && admitted < 2000, "{admitted}");
}

/// A VIP user and an internal app get their own quotas; a user exception beats an app one.
#[test]
fn exceptions_get_their_quota() {
    let rig = Rig::new(
        r#"[{"name": "per-user", "key": ["user"], "rate": "2/s",
             "exceptions": {"user:alice": "50/s", "app:internal": "10/s"}}]"#,
    );
    let count = |app: &str, user: &str| (0..100).filter(|_| rig.admitted(app, user)).count();
    assert_eq!(count("a", "bob"), 2);
    assert_eq!(count("a", "alice"), 50);
    assert_eq!(count("internal", "carol"), 10);
    assert_eq!(
        count("internal", "alice2"),
        10,
        "each internal user has their own"
    );
    // alice under the internal app: the user exception wins, and it is the same key as
    // alice's other requests, whose quota is spent.
    assert_eq!(count("internal", "alice"), 0);
    rig.clock.advance(1000 * MS);
    assert_eq!(count("internal", "alice"), 50);
}

/// A dry-run limit never rejects, but reports every would-be rejection.
#[test]
fn dry_run_counts_but_never_rejects() {
    let rig =
        Rig::new(r#"[{"name": "try-me", "key": ["user"], "rate": "3/s", "mode": "dry_run"}]"#);
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        let (rej, seen) = rig.send("a", Some("u"));
        assert_eq!(rej, None);
        outcomes.extend(seen.into_iter().map(|(_, o)| o));
    }
    let n = |o| outcomes.iter().filter(|&&x| x == o).count();
    assert_eq!(n(Outcome::Allowed), 3);
    assert_eq!(n(Outcome::DryRunLimited), 7);
    assert_eq!(n(Outcome::Limited), 0);
}

/// Per-user, then per-app, then global: the per-app limit refuses the third request, and the
/// global limit after it spent quota only on the two requests that got that far.
#[test]
fn later_limits_spend_nothing_after_a_refusal() {
    let rig = Rig::new(
        r#"[{"name": "per-user", "key": ["user"], "rate": "100/s"},
            {"name": "per-app", "key": ["app"], "rate": "2/s"},
            {"name": "global", "rate": "3/s"}]"#,
    );
    let mut last = Vec::new();
    for i in 0..5 {
        let (rej, seen) = rig.send("a", Some("u"));
        assert_eq!(rej.as_deref(), if i < 2 { None } else { Some("per-app") });
        last = seen;
    }
    assert_eq!(
        last,
        [
            ("per-user".to_owned(), Outcome::Allowed),
            ("per-app".to_owned(), Outcome::Limited)
        ],
        "the global limit was not consulted"
    );
    // The global bucket (3) lost only 2: one request of another app still passes all three.
    assert_eq!(rig.send("b", Some("v")).0, None);
    assert_eq!(rig.send("c", Some("w")).0.as_deref(), Some("global"));
    // The per-user bucket did spend on all 5 (it ran before the refusal) plus none more.
    let per_user_left = (0..200).filter(|_| rig.rules_admit(0, "u")).count();
    assert_eq!(per_user_left, 95);
}

impl Rig {
    /// Check rule `i` alone for user `u` (default quota).
    fn rules_admit(&self, i: usize, u: &str) -> bool {
        let key = self.snap.governance.limits[i]
            .key_of(
                &self.snap,
                &RouteInput {
                    m: MatchInput {
                        app: None,
                        interface: None,
                        user: Some(u),
                        headers: &self.headers,
                        params: &[],
                    },
                    client_ip: None,
                    random: 0,
                    pair: Default::default(),
                },
            )
            .unwrap();
        let lim = &self.lim.rules[i];
        lim.check_at(key.quota, key.hash, lim.now()).is_ok()
    }
}

/// A limit keyed by user with no user: the client IP stands in by default; `skip` exempts;
/// `shared` puts all such requests in one bucket.
#[test]
fn missing_key_parts() {
    let rig = Rig::new(
        r#"[{"name": "ip", "key": ["user"], "rate": "1/s"},
            {"name": "skip", "key": ["user"], "rate": "1/s", "when_missing": "skip",
             "match": {"apps": ["s"]}}]"#,
    );
    assert_eq!(rig.send("a", None).0, None);
    assert_eq!(rig.send("a", None).0.as_deref(), Some("ip"));
    assert_eq!(rig.send("a", Some("u")).0, None, "a user is its own key");
    // App `s`: the `ip` limit still applies (and is spent), `skip` does not.
    rig.clock.advance(1000 * MS);
    let (rej, seen) = rig.send("s", None);
    assert_eq!(rej, None);
    assert_eq!(seen.len(), 1, "{seen:?}");
}

/// From a request's pair, as the gateway checks: a limit that narrows (to some users) is
/// checked only for the requests it covers, beside one of the same app that does not; a
/// pair none of whose limits narrows is checked as it is.
#[test]
fn a_narrowing_limit_in_a_pair_applies_only_where_it_holds() {
    let rig = Rig::new(
        r#"[{"name": "app", "rate": "100/s", "match": {"apps": ["a"]}},
            {"name": "vip", "rate": "100/s", "match": {"apps": ["a"], "users": ["vip"]}},
            {"name": "other", "rate": "100/s", "match": {"apps": ["b"]}}]"#,
    );
    let names = |app, user| {
        let seen = rig.send(app, Some(user)).1;
        seen.into_iter().map(|(n, _)| n).collect::<Vec<_>>()
    };
    assert_eq!(names("a", "u"), ["app"]);
    assert_eq!(names("a", "vip"), ["app", "vip"]);
    assert_eq!(names("b", "vip"), ["other"]);
    assert!(names("c", "vip").is_empty());
}

/// Keys seen once are evicted once their state is fresh again; memory follows active keys.
#[test]
fn idle_keys_are_evicted() {
    let rig = Rig::new(r#"[{"name": "per-user", "key": ["user"], "rate": "10/s", "burst": 5}]"#);
    for i in 0..10_000 {
        assert!(rig.admitted("a", &format!("user-{i}")));
    }
    assert_eq!(
        rig.lim.retain_recent(),
        10_000,
        "all still inside their first interval"
    );
    rig.clock.advance(50 * MS);
    assert!(rig.admitted("a", "user-1"));
    rig.clock.advance(200 * MS);
    // user-1's bucket is not yet refilled to fresh (its TAT is 350 ms); all others are.
    assert_eq!(rig.lim.retain_recent(), 1);
    rig.clock.advance(1000 * MS);
    assert_eq!(rig.lim.retain_recent(), 0);
}

/// A sweep gives a keyed table's room back once the table went a whole interval mostly
/// empty, not as soon as it drops most keys: where many keys come and go each interval, the
/// next interval's keys would grow it back, rehashing every key again.
#[test]
fn a_swept_table_keeps_its_room_while_keys_come_and_go() {
    let rig = Rig::new(r#"[{"name": "per-user", "key": ["user"], "rate": "10/s", "burst": 5}]"#);
    let room = || rig.lim.rules[0].base.gcra.store.capacity();
    let wave = |n: usize| {
        for i in 0..10_000 {
            assert!(rig.admitted("a", &format!("user-{n}-{i}")));
        }
    };
    wave(0);
    let grown = room();
    assert!(grown >= 10_000, "{grown}");
    rig.clock.advance(1000 * MS);
    assert_eq!(rig.lim.retain_recent(), 0, "all fresh again: dropped");
    assert_eq!(room(), grown, "busy last interval: the room is kept");
    // The same users again (each seen now and then): their keys land where they did, so
    // every shard holds as many as before.
    wave(0);
    assert_eq!(room(), grown, "the next wave fits without growing");
    rig.clock.advance(1000 * MS);
    assert_eq!(rig.lim.retain_recent(), 0);
    assert_eq!(room(), grown, "busy again: kept again");
    rig.clock.advance(1000 * MS);
    assert_eq!(rig.lim.retain_recent(), 0, "an idle interval");
    assert_eq!(room(), 0, "given back");
    assert!(rig.lim.rules[0].idle(), "and the limit is idle again");
}

/// A small table that quiets down gives its room back too: the sweep walks every slot, so
/// room kept from a busier time would cost each sweep after it.
#[test]
fn a_small_table_that_quiets_down_shrinks() {
    let rig = Rig::new(r#"[{"name": "per-user", "key": ["user"], "rate": "10/s", "burst": 5}]"#);
    let room = || rig.lim.rules[0].base.gcra.store.capacity();
    for i in 0..2_000 {
        assert!(rig.admitted("a", &format!("busy-{i}")));
    }
    rig.clock.advance(1000 * MS);
    rig.lim.retain_recent();
    let busy = room();
    assert!((2_000..=64 * 64).contains(&busy), "{busy}");
    for i in 0..64 {
        assert!(rig.admitted("a", &format!("quiet-{i}")));
    }
    assert_eq!(rig.lim.retain_recent(), 64, "the quiet keys are live");
    assert!(room() * 4 <= busy, "{} of {busy}", room());
}

/// The frequent sweep visits the keyed limiters only: their idle keys go, a one-key
/// limiter's state stays for the full sweep (it reads as fresh either way).
#[test]
fn the_keyed_sweep_leaves_one_key_limiters_alone() {
    let rig = Rig::new(
        r#"[{"name": "all", "rate": "1000/s", "burst": 1000},
            {"name": "per-user", "key": ["user"], "rate": "10/s", "burst": 2}]"#,
    );
    assert!(rig.lim.keyed_idle());
    for i in 0..100 {
        rig.send("a", Some(&format!("user-{i}")));
    }
    assert!(!rig.lim.keyed_idle());
    let tracked = |i: usize| rig.lim.rules[i].tracked_keys();
    assert_eq!((tracked(0), tracked(1)), (1, 100));
    rig.clock.advance(1000 * MS);
    rig.lim.retain_recent_keyed();
    assert_eq!(
        (tracked(0), tracked(1)),
        (1, 0),
        "only the keyed limiter swept"
    );
    assert_eq!(rig.lim.retain_recent(), 0, "the full sweep takes the rest");
    assert!(rig.lim.keyed_idle());
}

/// The frequent sweep visits a keyed limiter only while it is busy (it took in [`BUSY_KEYS`]
/// keys a period before its last sweep, or has not been swept yet); a quiet one waits for
/// the full sweep.
#[test]
fn the_keyed_sweep_visits_busy_limiters_only() {
    let rig = Rig::new(r#"[{"name": "per-user", "key": ["user"], "rate": "10/s", "burst": 2}]"#);
    let tracked = || rig.lim.rules[0].tracked_keys();
    let wave = |n: usize, tag: &str| {
        for i in 0..n {
            rig.send("a", Some(&format!("{tag}-{i}")));
        }
        rig.clock.advance(1000 * MS);
    };
    wave(100, "first");
    rig.lim.retain_recent_keyed();
    assert_eq!(tracked(), 0, "not measured yet: swept");
    wave(100, "quiet");
    assert!(rig.lim.keyed_idle());
    rig.lim.retain_recent_keyed();
    assert_eq!(tracked(), 100, "quiet: left for the full sweep");
    assert_eq!(rig.lim.retain_recent(), 0, "which takes them");
    // What a quiet store gathered until the full sweep is several periods' keys.
    wave(BUSY_KEYS, "a period's worth over several");
    assert_eq!(rig.lim.retain_recent(), 0);
    wave(10, "still quiet");
    assert!(
        rig.lim.keyed_idle(),
        "not busy for a period after the full sweep"
    );
    assert_eq!(rig.lim.retain_recent(), 0);
    wave(BUSY_KEYS * QUIET_PERIODS, "busy");
    assert_eq!(rig.lim.retain_recent(), 0);
    wave(10, "after");
    assert!(!rig.lim.keyed_idle());
    rig.lim.retain_recent_keyed();
    assert_eq!(tracked(), 0, "busy: swept every second");
}

/// A one-key limit's state says whether it is in use (its check sets no flag): a sweep
/// counts it while it is live, clears it once it is fresh again, and skips it unused.
#[test]
fn a_one_key_limit_is_swept_by_its_state() {
    let rig = Rig::new(r#"[{"name": "all", "rate": "10/s", "burst": 2}]"#);
    assert!(rig.lim.rules[0].simple, "the limit phase's short path");
    assert!(rig.lim.rules[0].idle(), "unused");
    assert_eq!(rig.lim.retain_recent(), 0);
    assert!(rig.admitted("a", "bob"));
    assert!(!rig.lim.rules[0].idle(), "its state is set");
    assert_eq!(rig.lim.retain_recent(), 1, "live: kept and counted");
    rig.clock.advance(1000 * MS);
    assert_eq!(rig.lim.retain_recent(), 0, "fresh again: cleared");
    assert!(rig.lim.rules[0].idle());
    assert!(rig.admitted("a", "bob"));
    assert!(rig.admitted("a", "carol"));
    assert!(
        !rig.admitted("a", "dave"),
        "the burst of 2 is spent: the state was kept"
    );
}

/// A rebuild keeps the limiter (and its state) of unchanged rules and replaces changed ones.
#[test]
fn state_carries_over_unchanged_rules() {
    let a = snapshot(
        r#"[{"name": "keep", "key": ["user"], "rate": "1/s"},
            {"name": "edit", "key": ["user"], "rate": "1/s"}]"#,
    );
    let b = snapshot(
        r#"[{"name": "new", "rate": "5/s"},
            {"name": "keep", "key": ["user"], "rate": "1/s"},
            {"name": "edit", "key": ["user"], "rate": "2/s"}]"#,
    );
    let clock = FakeRelativeClock::default();
    let la = Limiters::build(&a, &clock, None);
    let lb = Limiters::build(&b, &clock, Some(&la));
    assert!(Arc::ptr_eq(&la.rules[0], &lb.rules[1]), "keep is kept");
    assert!(!Arc::ptr_eq(&la.rules[1], &lb.rules[2]), "edit is rebuilt");
}

/// The 429 pieces: body names the rule; headers follow the IETF draft's syntax.
#[test]
fn rejection_headers_and_body() {
    let rig = Rig::new(r#"[{"name": "per-user", "key": ["user"], "rate": "300/min", "burst": 1}]"#);
    let r = &rig.lim.rules[0];
    assert_eq!(r.policy(0), "\"per-user\";q=300;w=60");
    assert_eq!(
        r.rate_limit_header(Duration::from_millis(200)),
        "\"per-user\";r=0;t=1"
    );
    let body: serde_json::Value = serde_json::from_slice(&r.body(200 * MS)).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "rate_limited", "rule": "per-user", "retry_after_ms": 200})
    );
    let half = Rig::new(r#"[{"name": "h", "rate": "5/500ms"}]"#);
    assert_eq!(half.lim.rules[0].policy(0), "\"h\";q=10;w=1");
    assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
    assert_eq!(ceil_secs(Duration::ZERO), 1);
}

// === pacing (`max_delay_ms`) ===

impl Rig {
    /// One request; each limit's outcome and reported wait (in ms), and whether it was
    /// refused.
    fn pace(&self, user: &str) -> (bool, Vec<(Outcome, u128)>) {
        let mut seen = Vec::new();
        let input = RouteInput {
            m: MatchInput {
                app: Some("a"),
                interface: None,
                user: Some(user),
                headers: &self.headers,
                params: &[],
            },
            client_ip: Some(IpAddr::from([10, 0, 0, 1])),
            random: 0,
            pair: Default::default(),
        };
        let rej = self
            .lim
            .check(&self.snap, &input, |_, o, w| seen.push((o, w.as_millis())));
        (rej.is_some(), seen)
    }
}

/// 10/s, burst 1, max 500 ms: the first is admitted now, the next five get turns one
/// interval apart (100..500 ms), the seventh would wait 600 ms and is refused without
/// spending, and once time moves on the queue's tail moves with it.
#[test]
fn paced_turns_are_one_interval_apart() {
    let rig = Rig::new(
        r#"[{"name": "paced", "key": ["user"], "rate": "10/s", "burst": 1, "max_delay_ms": 500}]"#,
    );
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::Allowed, 0)]));
    for k in 1..=5 {
        assert_eq!(rig.pace("u"), (false, vec![(Outcome::Paced, 100 * k)]));
    }
    // Refused, twice: a refusal reserves nothing, so the tail stays at 600 ms.
    assert_eq!(rig.pace("u"), (true, vec![(Outcome::Limited, 600)]));
    assert_eq!(rig.pace("u"), (true, vec![(Outcome::Limited, 600)]));
    // Another key has its own queue.
    assert_eq!(rig.pace("v"), (false, vec![(Outcome::Allowed, 0)]));
    rig.clock.advance(150 * MS);
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::Paced, 450)]));
    // Idle for long enough, the key is fresh again.
    rig.clock.advance(2000 * MS);
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::Allowed, 0)]));
}

/// The burst is admitted at once, as without pacing; only what exceeds it waits.
#[test]
fn pacing_starts_after_the_burst() {
    let rig = Rig::new(r#"[{"name": "paced", "rate": "100/s", "burst": 3, "max_delay_ms": 1000}]"#);
    for _ in 0..3 {
        assert_eq!(rig.pace("u"), (false, vec![(Outcome::Allowed, 0)]));
    }
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::Paced, 10)]));
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::Paced, 20)]));
}

/// With `max_queue: 2`, a third request waiting at once is refused even within
/// `max_delay_ms`; a waiter that leaves (its place dropped) makes room again.
#[test]
fn a_full_queue_refuses_and_a_leaving_waiter_makes_room() {
    let rig = Rig::new(
        r#"[{"name": "paced", "key": ["user"], "rate": "10/s", "burst": 1,
             "max_delay_ms": 5000, "max_queue": 2}]"#,
    );
    let rule = &rig.lim.rules[0];
    let queue = rule.pacing.as_ref().unwrap();
    assert!(!rig.pace("u").0);
    let mut places = Vec::new();
    for _ in 0..2 {
        let (refused, seen) = rig.pace("u");
        assert!(!refused && seen[0].0 == Outcome::Paced);
        places.push(Waiter::enter(queue));
    }
    assert_eq!(queue.waiting(), 2);
    // The queue is over all keys: another user finds it full too.
    assert_eq!(rig.pace("v"), (false, vec![(Outcome::Allowed, 0)]));
    assert!(
        rig.pace("v").0,
        "v's second request would wait: the queue is full"
    );
    assert!(rig.pace("u").0);
    places.pop();
    assert_eq!(queue.waiting(), 1);
    let (refused, seen) = rig.pace("u");
    assert!(!refused, "{seen:?}");
    assert_eq!(seen, vec![(Outcome::Paced, 300)]);
}

/// A dry-run paced limit reports the wait it would impose and never refuses within
/// `max_delay_ms`; past it, it reports a would-be refusal.
#[test]
fn dry_run_pacing_never_waits() {
    let rig = Rig::new(
        r#"[{"name": "paced", "rate": "10/s", "burst": 1, "max_delay_ms": 200,
             "max_queue": 1, "mode": "dry_run"}]"#,
    );
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::Allowed, 0)]));
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::DryRunPaced, 100)]));
    // max_queue does not bind a dry run: nobody waits.
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::DryRunPaced, 200)]));
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::DryRunLimited, 300)]));
}

/// Peeking (explain) tells the wait a request would get, and reserves nothing.
#[test]
fn peeking_reserves_no_turn() {
    let rig = Rig::new(r#"[{"name": "paced", "rate": "10/s", "burst": 1, "max_delay_ms": 500}]"#);
    assert!(!rig.pace("u").0);
    for _ in 0..3 {
        assert_eq!(
            peeking(|| rig.pace("u")),
            (false, vec![(Outcome::Paced, 100)])
        );
    }
    assert_eq!(rig.pace("u"), (false, vec![(Outcome::Paced, 100)]));
}

/// Paced keys are swept like others once their last turn is past.
#[test]
fn paced_keys_are_evicted() {
    let rig = Rig::new(
        r#"[{"name": "paced", "key": ["user"], "rate": "10/s", "burst": 1, "max_delay_ms": 500}]"#,
    );
    for i in 0..100 {
        for _ in 0..3 {
            rig.pace(&format!("user-{i}"));
        }
    }
    assert_eq!(rig.lim.retain_recent(), 100);
    rig.clock.advance(250 * MS);
    // The last turn is at 200 ms; the key's arrival time, 300 ms, is one interval on.
    assert_eq!(
        rig.lim.retain_recent(),
        100,
        "still inside the last interval"
    );
    rig.clock.advance(150 * MS);
    assert_eq!(rig.lim.retain_recent(), 0);
}

/// A pace joins every paced limit's queue and waits for the latest turn; dropping it
/// gives the places back.
#[test]
fn a_pace_holds_its_places_until_dropped() {
    let rig = Rig::new(
        r#"[{"name": "a", "rate": "10/s", "max_delay_ms": 500},
            {"name": "b", "rate": "10/s", "max_delay_ms": 500}]"#,
    );
    let now = std::time::Instant::now();
    let mut pace = None;
    Pace::join(&mut pace, &rig.lim.rules[0], now, 100 * MS);
    Pace::join(&mut pace, &rig.lim.rules[1], now, 300 * MS);
    let p = pace.unwrap();
    assert_eq!(p.until, now + 300 * MS);
    let waiting = |i: usize| rig.lim.rules[i].pacing.as_ref().unwrap().waiting();
    assert_eq!((waiting(0), waiting(1)), (1, 1));
    drop(p);
    assert_eq!((waiting(0), waiting(1)), (0, 0));
}

fn quota(count: u32, period: Duration, burst: u32) -> LimitQuota {
    LimitQuota {
        rate: rules::limit::Rate { count, period },
        burst,
        label: "default".into(),
    }
}

/// One verdict of `g` for `key` at the fake clock's time: admitted, or the wait.
fn verdict(g: &Gcra<FakeRelativeClock>, clock: &FakeRelativeClock, key: u64) -> Result<(), u64> {
    g.check(key, g.since_start(clock.now()))
}

/// Our GCRA decides as governor's keyed limiter, request by request: the same admissions,
/// the same waits, over irregular arrivals of a few keys, for bursts of 1 to 20 and
/// intervals from 1 ns to 1 s (an odd period, and rates it does not divide).
#[test]
fn gcra_decides_as_governor() {
    use governor::{Quota, RateLimiter};
    use std::num::NonZeroU32;
    let quotas = [
        (10, Duration::from_secs(1), 5),
        (1, Duration::from_secs(1), 1),
        (3, Duration::from_millis(700), 20),
        (1_000_000_000, Duration::from_secs(1), 2),
        (7, Duration::from_millis(333), 3),
    ];
    for (qi, &(count, period, burst)) in quotas.iter().enumerate() {
        let clock = FakeRelativeClock::default();
        let q = quota(count, period, burst);
        let ours = Gcra::new(&q, KeyStore::new(), &clock);
        let gq = Quota::with_period(q.rate.interval())
            .unwrap()
            .allow_burst(NonZeroU32::new(burst).unwrap());
        let theirs = RateLimiter::hashmap_with_clock(gq, clock.clone());
        let (mut admitted, mut refused) = (0, 0);
        for (i, gap) in irregular_gaps(qi as u64 + 7, 3000).enumerate() {
            // Bunched arrivals as well as spread ones.
            clock.advance(Duration::from_nanos(gap / (1 + (i as u64 % 5) * 1000)));
            let key = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % 3;
            let want = theirs
                .check_key(&key)
                .map_err(|n| n.wait_time_from(clock.now()).as_nanos() as u64);
            let got = verdict(&ours, &clock, key);
            assert_eq!(got, want, "quota {qi}, arrival {i}");
            match got {
                Ok(()) => admitted += 1,
                Err(_) => refused += 1,
            }
        }
        assert!(admitted > 0, "quota {qi}");
        assert!(refused > 0 || count == 1_000_000_000, "quota {qi}");
    }
}

/// A one-key store (an atomic) decides as the sharded one, request by request, over 2,000
/// irregular arrivals of one key; its idle state is dropped by the same sweep; a peek
/// leaves it as it was.
#[test]
fn single_key_store_decides_as_the_sharded_one() {
    let clock = FakeRelativeClock::default();
    let q = quota(10, Duration::from_secs(1), 5);
    let single = Gcra::new(&q, KeyStore::single(), &clock);
    let sharded = Gcra::new(&q, KeyStore::new(), &clock);
    assert_eq!(single.store.len(), 0);
    let mut refused = 0;
    for (i, gap) in irregular_gaps(99, 2000).enumerate() {
        clock.advance(Duration::from_nanos(gap));
        let (a, b) = (verdict(&single, &clock, 7), verdict(&sharded, &clock, 7));
        assert_eq!(a, b, "arrival {i}");
        refused += usize::from(a.is_err());
    }
    assert!(refused > 100, "{refused}");
    // Idle long enough, the state is as fresh as none and goes.
    single.retain_recent(clock.now());
    assert_eq!(single.store.len(), 1);
    clock.advance(Duration::from_secs(2));
    single.retain_recent(clock.now());
    assert_eq!(single.store.len(), 0);
    // Peeks answer without spending: the whole burst is still there after ten.
    let peeked: Vec<bool> = peeking(|| {
        (0..10)
            .map(|_| verdict(&single, &clock, 7).is_ok())
            .collect()
    });
    assert_eq!(peeked, [true; 10]);
    let burst: Vec<bool> = (0..6)
        .map(|_| verdict(&single, &clock, 7).is_ok())
        .collect();
    assert_eq!(burst, [true, true, true, true, true, false]);
    assert_eq!(single.store.len(), 1);
}

/// Rules without key parts (a global limit) get the one-key store, decide by the reference
/// algorithm, and count one key.
#[test]
fn a_global_limit_matches_the_reference() {
    let rig = Rig::new(r#"[{"name": "global", "rate": "10/s", "burst": 5}]"#);
    assert!(rig.snap.governance.limits[0].single_key());
    assert!(rig.lim.rules[0].base.gcra.store.is_empty());
    let mut now = 0u64;
    let mut arrivals = Vec::new();
    let mut got = Vec::new();
    for (i, gap) in irregular_gaps(4242, 2000).enumerate() {
        rig.clock.advance(Duration::from_nanos(gap));
        now += gap;
        arrivals.push(now);
        // Every user shares the one key.
        got.push(rig.admitted("a", &format!("u{}", i % 7)));
    }
    assert_eq!(got, reference(&arrivals, 100_000_000, 5));
    assert_eq!(rig.lim.rules[0].tracked_keys(), 1);
}

/// A sweep keeps exactly the keys whose arrival time is still ahead of the cut, with their
/// times, whether most of a table's keys go (moved out and back) or most stay (erased in
/// place), and leaves a table it found all live or all expired as it should.
#[test]
fn a_sweep_keeps_exactly_the_live_keys() {
    let mut next = 0x2545_f491_4f6c_dd1d_u64;
    let mut rand = move || {
        next ^= next << 13;
        next ^= next >> 7;
        next ^= next << 17;
        next
    };
    for (keys, live_pct) in [(0, 0), (50, 0), (50, 10), (500, 30), (500, 70), (200, 100)] {
        let mut t = KeyTable::new(rand());
        for _ in 0..keys {
            let live = rand() % 100 < live_pct;
            let tat = match live {
                true => 1_000 + rand() % 1_000,
                false => rand() % 1_001,
            };
            t.insert(rand(), tat);
        }
        let want: HashMap<u64, u64> = t.iter().filter(|&(_, tat)| tat > 1_000).collect();
        t.drop_at_or_below(1_000);
        let got: HashMap<u64, u64> = t.iter().collect();
        assert_eq!(got, want, "{keys} keys, {live_pct}% live");
        // The table still finds and updates what it kept.
        for (k, v) in want {
            assert_eq!(t.get(k), Some(v));
        }
    }
}

/// A limit with one key for all requests and exceptions: each quota has its own shared
/// state, and a request is counted under its exception's, not the base quota's (such a rule
/// is not on the limit phase's short path, which reads only the base quota).
#[test]
fn a_shared_key_limit_with_exceptions_counts_each_quota() {
    let rig =
        Rig::new(r#"[{"name": "all", "rate": "2/s", "exceptions": {"app:internal": "10/s"}}]"#);
    let count = |app: &str, user: &str| (0..100).filter(|_| rig.admitted(app, user)).count();
    assert_eq!(count("a", "bob"), 2);
    assert_eq!(count("b", "carol"), 0, "one key for every request");
    assert_eq!(count("internal", "dave"), 10);
    assert_eq!(count("internal", "erin"), 0);
    rig.clock.advance(1000 * MS);
    assert_eq!(count("internal", "erin"), 10);
    assert_eq!(count("a", "bob"), 2);
}

/// A cluster-scope limit with one key is set aside for Redis, not counted here (such a rule
/// is not on the limit phase's short path, which counts locally).
#[test]
fn a_shared_key_cluster_limit_is_set_aside() {
    let config = serde_json::json!({
        "schema_version": 1,
        "server": { "redis": { "url": "redis://127.0.0.1:6379" } },
        "upstreams": { "up": { "endpoints": ["127.0.0.1:9"] } },
        "routes": [{ "name": "default", "upstream": "up" }],
        "limits": [{ "name": "all", "rate": "2/s", "scope": "cluster" }]
    });
    let snap = rules::load("t.json", &serde_json::to_vec(&config).unwrap())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot;
    let lim = Limiters::build(&snap, &FakeRelativeClock::default(), None);
    let headers = HeaderMap::new();
    let input = RouteInput {
        m: MatchInput {
            app: Some("a"),
            interface: None,
            user: Some("bob"),
            headers: &headers,
            params: &[],
        },
        client_ip: Some(IpAddr::from([10, 0, 0, 1])),
        random: 0,
        pair: Default::default(),
    };
    for _ in 0..5 {
        let mut remote = Vec::new();
        let mut observed = 0;
        let rej = lim.check_remote(&snap, &input, None, |_, _, _| observed += 1, &mut remote);
        assert!(rej.is_none());
        assert_eq!((observed, remote.len()), (0, 1), "decided in Redis");
        assert!(!remote[0].refill_only);
    }
}
