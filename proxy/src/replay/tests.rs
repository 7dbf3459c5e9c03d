use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

use super::*;
use crate::metrics::Metrics;
use crate::pipeline::decide::{Mode, decide_classified};
use crate::pipeline::record::log_inputs;

fn config(routes: Value, limits: Value, fallbacks: Value) -> Value {
    json!({
        "schema_version": 1,
        "identity": { "app": { "header": "x-app-id" }, "user": { "header": "x-user-id" } },
        "interfaces": [
            { "name": "grab", "method": "POST", "path": "/envelopes/{id}/grab" },
            { "name": "open", "method": "GET", "path": "/envelopes/{id}" }
        ],
        "upstreams": {
            "v1": { "endpoints": ["127.0.0.1:9000"] },
            "v2": { "endpoints": ["127.0.0.1:9001"] }
        },
        "routes": routes,
        "limits": limits,
        "fallbacks": fallbacks
    })
}

fn runtime(c: &Value) -> Runtime {
    let snap = rules::load("t.json", c.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot;
    Runtime::offline(snap, None, &Arc::new(Metrics::new()))
}

fn split(v2: &str) -> Value {
    json!([
        { "name": "default", "upstream": "v1" },
        { "name": "canary", "match": { "interfaces": ["grab"] },
          "split": [ { "upstream": "v2", "weight": v2 }, { "upstream": "v1", "weight": "rest" } ],
          "whitelist": [ { "upstream": "v2", "users": ["qa"] } ] }
    ])
}

fn opts() -> Options {
    Options {
        level: None,
        users_bound: 1000,
        sample_users: 3,
        first_bad_lines: 3,
    }
}

/// An access line as the gateway writes it (the fields a replay reads, and a few others).
fn access(
    at_us: u64,
    path: &str,
    user: &str,
    decision: &str,
    route: &str,
    upstream: &str,
) -> String {
    json!({
        "timestamp": "2026-12-01T00:00:00.000000Z", "level": "INFO", "message": "request",
        "target": "tidegate::access", "request_id": "r", "client": "10.0.0.1",
        "peer": "10.0.0.1:5000", "identity": "unverified", "app": "shop",
        "interface": "grab", "user": user, "route": route, "upstream": upstream,
        "status": 200, "duration_us": 50, "at_us": at_us, "method": "POST", "path": path,
        "inputs": "", "decision": decision, "rule": "none"
    })
    .to_string()
}

/// The recorded answers of `users` under `rt`, as access lines (one request each, 1 ms apart).
fn recorded_log(rt: &Runtime, users: &[String]) -> String {
    let mut out = String::new();
    for (i, u) in users.iter().enumerate() {
        let (route, upstream) = decide_route(rt, u);
        out.push_str(&access(
            1_000_000 + i as u64 * 1000,
            "/envelopes/1/grab",
            u,
            "forward",
            &route,
            &upstream,
        ));
        out.push('\n');
    }
    out
}

/// The route the request path (in peek mode) gives `user`'s grab.
fn decide_route(rt: &Runtime, user: &str) -> (String, String) {
    let h = HeaderMap::new();
    let method = http::Method::POST;
    let parts = RequestParts {
        method: &method,
        path: "/envelopes/1/grab",
        query: None,
        headers: &h,
    };
    let mut class = rt.snapshot.classify(parts);
    class.user = Some(user.into());
    class.app = Some("shop".into());
    let d = decide_classified(
        rt,
        class,
        &h,
        None,
        Mode::Peek { level: None },
        |_, _, _| {},
    );
    let r = d.route.expect("routed");
    (r.rule_name.to_string(), r.upstream_name.to_string())
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

/// Replaying a log under the config that recorded it changes nothing; under a split raised
/// from 10% to 30%, exactly the users whose bucket lies in [100000, 300000) move v1 → v2
/// (computed from the bucket formula), the whitelisted user stays.
#[test]
fn a_raised_split_moves_exactly_the_users_of_the_new_buckets() {
    let live = runtime(&config(split("10%"), json!([]), json!([])));
    let mut all = users(2000);
    all.push("qa".to_owned());
    let log = recorded_log(&live, &all);

    let same = replay(
        runtime(&config(split("10%"), json!([]), json!([]))),
        None,
        log.as_bytes(),
        opts(),
    )
    .unwrap();
    assert_eq!((same.compared, same.changed), (2001, 0), "{same}");

    let r = replay(
        runtime(&config(split("30%"), json!([]), json!([]))),
        None,
        log.as_bytes(),
        opts(),
    )
    .unwrap();
    let moved: Vec<&String> = all
        .iter()
        .filter(|u| *u != "qa")
        .filter(|u| (100_000..300_000).contains(&rules::bucket::bucket("canary", u)))
        .collect();
    assert!(moved.len() > 300, "about 20% of 2000");
    assert_eq!(r.changes.len(), 1, "{r}");
    let c = &r.changes[0];
    assert_eq!((c.kind, &*c.rule), ("route", "canary"));
    assert_eq!(
        (&*c.from, &*c.to),
        ("v1 (route canary)", "v2 (route canary)")
    );
    assert_eq!(
        (c.requests, c.users, c.users_exact),
        (moved.len() as u64, moved.len() as u64, true)
    );
    assert_eq!(r.unchanged, 2001 - moved.len() as u64);

    // The same, against the live config replayed rather than the recorded decisions.
    let l = replay(
        runtime(&config(split("30%"), json!([]), json!([]))),
        Some(runtime(&config(split("10%"), json!([]), json!([])))),
        log.as_bytes(),
        opts(),
    )
    .unwrap();
    assert_eq!(
        (l.baseline, l.changes.len(), l.changes[0].requests),
        ("live", 1, moved.len() as u64)
    );
}

/// Limits run on the log's clock: a new limit of 2/s (burst 2) refuses the third and later
/// requests of a burst, and admits again once the log's time has moved on by a second.
/// With the clock frozen (every line at one time) all but the first two are refused.
#[test]
fn limits_are_simulated_in_the_logs_time() {
    let limit = json!([{ "name": "per-user", "key": ["user"], "rate": "2/s", "burst": 2 }]);
    let cand = || runtime(&config(split("0%"), limit.clone(), json!([])));
    // bob: 5 requests 1 ms apart, then 5 more a second later.
    let mut log = String::new();
    for ms in [0, 1, 2, 3, 4, 1000, 1001, 1002, 1003, 1004] {
        log.push_str(&access(
            5_000_000 + ms * 1000,
            "/envelopes/1/grab",
            "bob",
            "forward",
            "canary",
            "v1",
        ));
        log.push('\n');
    }
    let r = replay(cand(), None, log.as_bytes(), opts()).unwrap();
    assert_eq!(r.changes.len(), 1, "{r}");
    let c = &r.changes[0];
    assert_eq!(
        (c.kind, &*c.rule, c.requests, c.users),
        ("newly_limited", "per-user", 6, 1)
    );
    assert_eq!(c.to, "429 by limit per-user");

    let frozen: String = log
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["at_us"] = json!(5_000_000);
            format!("{v}\n")
        })
        .collect();
    let f = replay(cand(), None, frozen.as_bytes(), opts()).unwrap();
    assert_eq!(f.changes[0].requests, 8, "{f}");
}

/// A limit keyed on the envelope (`path_param: id`) is replayed from the logged path: the
/// hot envelope's grabs beyond its burst are newly limited, whoever sent them and however
/// its ID was encoded, and another envelope's are not.
#[test]
fn path_param_keys_are_replayed_from_the_path() {
    let limit = json!([{ "name": "per-envelope", "match": { "interfaces": ["grab"] },
                         "key": [{ "path_param": "id" }], "rate": "2/s", "burst": 2 }]);
    let cand = runtime(&config(split("0%"), limit, json!([])));
    let mut log = String::new();
    for (ms, path, user) in [
        (0, "/envelopes/hot/grab", "a"),
        (1, "/envelopes/%68ot/grab", "b"),
        (2, "/envelopes/hot/grab", "c"),
        (3, "/envelopes/h%6Ft/grab", "d"),
        (4, "/envelopes/cold/grab", "e"),
        (5, "/envelopes/cold/grab", "f"),
    ] {
        log.push_str(&access(
            5_000_000 + ms * 1000,
            path,
            user,
            "forward",
            "canary",
            "v1",
        ));
        log.push('\n');
    }
    let r = replay(cand, None, log.as_bytes(), opts()).unwrap();
    assert_eq!(r.changes.len(), 1, "{r}");
    let c = &r.changes[0];
    assert_eq!(
        (c.kind, &*c.rule, c.requests, c.users),
        ("newly_limited", "per-envelope", 2, 2)
    );
}

/// A fallback for 50% of users: the newly degraded are exactly those below 500000 under the
/// fallback's salt; requests without a user under `no_user_key: random` are not replayed
/// but counted apart.
#[test]
fn fallbacks_and_random_buckets() {
    let fb = json!([{ "name": "grab-off", "match": { "interfaces": ["grab"] }, "fraction": "50%",
                      "no_user_key": "random", "response": { "status": 200, "body": {} } }]);
    let live = runtime(&config(split("0%"), json!([]), json!([])));
    let all = users(400);
    let mut log = recorded_log(&live, &all);
    log.push_str(&access(
        9_000_000,
        "/envelopes/1/grab",
        "none",
        "forward",
        "canary",
        "v1",
    ));
    log.push('\n');
    let r = replay(
        runtime(&config(split("0%"), json!([]), fb)),
        None,
        log.as_bytes(),
        opts(),
    )
    .unwrap();
    let expected = all
        .iter()
        .filter(|u| rules::bucket::bucket("grab-off", u) < 500_000)
        .count();
    assert_eq!(r.not_replayed.random, 1, "{r}");
    assert_eq!(r.changes.len(), 1, "{r}");
    assert_eq!(
        (r.changes[0].kind, r.changes[0].requests),
        ("newly_degraded", expected as u64)
    );
}

/// A line that is not JSON, or lacks the replay's fields, is counted with its line number;
/// a cut last line and lines of other logs are reported apart; none stops the replay.
#[test]
fn bad_lines_are_counted_not_fatal() {
    let good = access(1, "/envelopes/1/grab", "bob", "forward", "canary", "v1");
    let old = json!({ "target": "tidegate::access", "user": "bob", "status": 200 }).to_string();
    let other = json!({ "target": "tidegate::reload", "message": "reloaded" }).to_string();
    let log = format!("{good}\nnot json\n{other}\n{old}\n\n{good}\n{{\"target\":\"tidegate::acc");
    let r = replay(
        runtime(&config(split("0%"), json!([]), json!([]))),
        None,
        log.as_bytes(),
        opts(),
    )
    .unwrap();
    let nr = &r.not_replayed;
    assert_eq!(
        (nr.unparseable, &nr.unparseable_lines[..]),
        (2, &[2, 4][..]),
        "{r}"
    );
    assert!(nr.truncated_last_line);
    assert_eq!((nr.other_lines, r.compared, r.changed), (1, 2, 0));
    assert_eq!(r.lines, 7);
}

/// Past the bound, distinct users are counted no further and the count says so.
#[test]
fn distinct_users_are_bounded() {
    let live = runtime(&config(split("0%"), json!([]), json!([])));
    let log = recorded_log(&live, &users(50));
    let o = Options {
        users_bound: 10,
        ..opts()
    };
    let r = replay(
        runtime(&config(split("100%"), json!([]), json!([]))),
        None,
        log.as_bytes(),
        o,
    )
    .unwrap();
    let c = &r.changes[0];
    assert_eq!((c.requests, c.users, c.users_exact), (50, 10, false), "{r}");
    assert_eq!(c.sample_users, ["user-0", "user-1", "user-2"]);
}

/// The header values the rules read survive the log: logged percent-encoded, read back
/// equal, whatever bytes they hold; a value over the bound is logged by name alone and
/// makes the line unreplayable rather than replayed as absent; credentials are never among
/// the logged headers, whatever the rules read.
#[test]
fn inputs_round_trip_and_stay_bounded() {
    let names: Vec<HeaderName> = ["x-canary", "x-env", "x-long"]
        .map(HeaderName::from_static)
        .to_vec();
    let mut h = HeaderMap::new();
    h.insert(
        "x-canary",
        HeaderValue::from_bytes(b"v2 &=%\"\\\xff\t").unwrap(),
    );
    h.insert("x-env", HeaderValue::from_static("gray"));
    let field = log_inputs(&names, &h);
    assert!(!field.contains(['"', '\\']), "{field}");
    let want = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .map(|i| (i, names[i].clone()))
    };
    let (mut out, mut seen, mut scratch) = (HeaderMap::new(), vec![false; 3], Vec::new());
    decode_inputs(&field, want, &mut out, &mut seen, &mut scratch).unwrap();
    assert_eq!(out, h);
    assert_eq!(seen, [true, true, false]);

    h.insert("x-long", HeaderValue::from_bytes(&[b'a'; 200]).unwrap());
    let field = log_inputs(&names, &h);
    assert!(field.len() < 100, "{field}");
    let got = decode_inputs(&field, want, &mut out, &mut seen, &mut scratch);
    assert_eq!(got, Err(InputsError::Cut));

    let rt = runtime(&config(
        json!([{ "name": "default", "upstream": "v1" },
               { "name": "auth", "match": { "headers": { "authorization": "x", "x-env": "gray" } }, "upstream": "v2" },
               { "name": "by-user", "match": { "headers": { "x-user-id": "x" }, "interfaces": ["grab"] }, "upstream": "v2" }]),
        json!([]),
        json!([]),
    ));
    let logged: Vec<&str> = rt.access_inputs.iter().map(HeaderName::as_str).collect();
    assert_eq!(logged, ["x-env"]);
}

/// The replay's decision is the request path's: for every user, route and fallback agree
/// with `decide_classified` in peek mode on fresh state.
#[test]
fn replay_decides_as_the_request_path() {
    let fb = json!([{ "name": "off", "match": { "interfaces": ["open"] }, "fraction": "40%",
                      "response": { "status": 200, "body": {} } }]);
    let rt = runtime(&config(split("25%"), json!([]), fb));
    let limiters = Limiters::build(&rt.snapshot, &FakeRelativeClock::default(), None);
    let h = HeaderMap::new();
    for u in users(300) {
        for (m, path) in [
            (http::Method::POST, "/envelopes/1/grab"),
            (http::Method::GET, "/envelopes/1"),
        ] {
            let parts = RequestParts {
                method: &m,
                path,
                query: None,
                headers: &h,
            };
            let mut class = rt.snapshot.classify(parts);
            class.user = Some(u.as_str().into());
            let d = decide_classified(
                &rt,
                class.clone(),
                &h,
                None,
                Mode::Peek { level: None },
                |_, _, _| {},
            );
            let r = decide::replay(&rt, &class, &h, None, None, &limiters, |_, _, _| {});
            assert_eq!(
                r.fallback.map(|f| f.rule_id),
                d.fallback.map(|f| f.rule_id),
                "{u} {path}"
            );
            assert_eq!(
                r.route.map(|r| r.upstream),
                d.route.map(|r| r.upstream),
                "{u} {path}"
            );
        }
    }
}

/// Rules in shadow mode change no answer: a candidate whose only edits are a dry-run
/// fallback over all of `grab` and dry-run admission judged at a level that would shed
/// most requests replays to the recorded decisions.
#[test]
fn shadow_rules_change_no_answer() {
    let live = runtime(&config(split("0%"), json!([]), json!([])));
    let all = users(200);
    let log = recorded_log(&live, &all);
    let fb = json!([{ "name": "grab-off", "mode": "dry_run", "match": { "interfaces": ["grab"] },
                      "response": { "status": 200, "body": {} } }]);
    let mut cand = config(split("0%"), json!([]), fb);
    cand["overload"] = json!({ "enabled": true, "max_in_flight": 100,
                               "admission": { "mode": "dry_run" } });
    let at = |mode: &str| {
        let mut c = cand.clone();
        c["overload"]["admission"]["mode"] = json!(mode);
        let o = Options {
            level: Some(4_000),
            ..opts()
        };
        replay(runtime(&c), None, log.as_bytes(), o).unwrap()
    };
    let r = at("dry_run");
    assert!(r.changes.is_empty(), "{r}");
    // The same level enforced sheds: the test would see a dry run that sheds.
    let r = at("enforce");
    assert!(r.changes.iter().any(|c| c.kind == "newly_shed"), "{r}");
}

/// Lines are read in place from the reader's buffer: a line cut by its end (any size, any
/// place, a `\r\n` or a cut last line included) replays as when read whole.
#[test]
fn lines_cut_by_the_readers_buffer_replay_the_same() {
    let live = runtime(&config(split("10%"), json!([]), json!([])));
    let mut log = recorded_log(&live, &users(40));
    log.push_str("not json\r\n\n");
    log.push_str(&access(
        9_000_000,
        "/envelopes/1/grab",
        "zed",
        "forward",
        "canary",
        "v1",
    ));
    log.push_str("\r\n{\"target\":\"tidegate::acc");
    let candidate = || runtime(&config(split("50%"), json!([]), json!([])));
    let whole = replay(candidate(), None, log.as_bytes(), opts()).unwrap();
    assert!(
        whole.changed > 0 && whole.not_replayed.truncated_last_line,
        "{whole}"
    );
    assert_eq!(whole.not_replayed.unparseable_lines, [41]);
    for cap in [1, 2, 7, 64, 333] {
        let reader = std::io::BufReader::with_capacity(cap, log.as_bytes());
        let r = replay(candidate(), None, reader, opts()).unwrap();
        let fields = |r: &Report| {
            (
                r.lines,
                r.compared,
                r.changed,
                r.not_replayed.unparseable_lines.clone(),
                r.not_replayed.truncated_last_line,
                r.changes
                    .iter()
                    .map(|c| (c.requests, c.users))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(fields(&r), fields(&whole), "buffer of {cap}: {r}");
    }
}
