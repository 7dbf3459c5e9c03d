//! Each phase's report, on a runtime decided against as the admin port does (live state,
//! peeked) and as the command line does (fresh state).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::govern::breaker::CallResult;
use crate::pipeline::decide::decide;

/// Interfaces `grab` (critical) and `share` (low), upstreams `v1` and `v2`, a split on grab,
/// a per-user limit of one request a minute on grab, and whatever `extra` sets.
fn runtime(extra: serde_json::Value) -> Runtime {
    let mut c = json!({
        "schema_version": 1,
        "interfaces": [
            { "name": "grab", "method": "POST", "path": "/envelopes/{id}/grab" },
            { "name": "share", "method": "POST", "path": "/envelopes/{id}/share" }
        ],
        "upstreams": { "v1": { "endpoints": ["127.0.0.1:1"] },
                       "v2": { "endpoints": ["127.0.0.1:2"] } },
        "routes": [ { "name": "default", "upstream": "v1" } ],
        "limits": [ { "name": "grab-per-user", "match": { "interfaces": ["grab"] },
                      "key": ["user"], "rate": "1/min", "burst": 1 } ]
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    let snap = rules::load("t.json", c.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot;
    Runtime::offline(snap, None, &Arc::new(Metrics::new()))
}

fn query(path: &str, user: &str) -> ExplainQuery {
    ExplainQuery {
        method: Some("POST".into()),
        path: path.into(),
        app: Some("douyin".into()),
        user: Some(user.into()),
        ..ExplainQuery::default()
    }
}

/// Serve one request through `decide`, as the gateway would.
fn serve<'g>(rt: &'g Runtime, path: &str, user: &str) -> Action<'g> {
    let mut h = HeaderMap::new();
    h.insert("x-user-id", user.parse().unwrap());
    h.insert("x-app-id", "douyin".parse().unwrap());
    let conn = crate::conn::ConnInfo::new("10.0.0.1:1000".parse().unwrap(), false);
    let req = RequestParts {
        method: &Method::POST,
        path,
        query: None,
        headers: &h,
    };
    decide(
        rt,
        req,
        &conn,
        Mode::Serve {
            draw: 0,
            at: crate::clock::Stamp::now(),
        },
    )
    .action
}

/// Each limit: its key and quota; on live state, whether it would refuse now. Explaining
/// spends nothing: a user explained twice is still admitted when served.
#[test]
fn limits_report_key_and_live_verdict_without_spending() {
    let rt = runtime(json!({}));
    let e = explain_live(&rt, &query("/envelopes/7/grab", "bob")).unwrap();
    let l = &e.limits[0];
    assert_eq!(
        (
            l.rule.as_str(),
            l.verdict,
            l.key.as_deref(),
            l.quota.as_deref()
        ),
        (
            "grab-per-user",
            "allowed",
            Some("user=\"bob\""),
            Some("default")
        )
    );
    assert_eq!(e.answer.kind, "upstream");
    // Peeking did not spend bob's one request a minute.
    assert!(matches!(
        serve(&rt, "/envelopes/7/grab", "bob"),
        Action::Forward { .. }
    ));
    // Now it is spent: explain says so, and so does the gateway.
    let e = explain_live(&rt, &query("/envelopes/7/grab", "bob")).unwrap();
    assert_eq!(e.limits[0].verdict, "limited");
    assert!(e.limits[0].retry_after_ms.unwrap() > 1_000, "{e:?}");
    assert_eq!(
        (e.answer.kind, e.answer.status, e.answer.rule.as_deref()),
        ("rate_limited", Some(429), Some("grab-per-user"))
    );
    assert!(!e.route_reached && e.route.decision.is_none());
    assert!(
        e.to_string()
            .contains("answer: 429 rate_limited (rule \"grab-per-user\")"),
        "{e}"
    );
    assert!(matches!(
        serve(&rt, "/envelopes/7/grab", "bob"),
        Action::Answer(..)
    ));
}

/// A 100% fallback answers: explain reports the fallback, not the upstream routing would
/// have chosen.
#[test]
fn fallback_answers_instead_of_the_route() {
    let rt = runtime(json!({ "fallbacks": [ {
        "name": "grab-off", "match": { "interfaces": ["grab"] },
        "response": { "status": 200, "body": { "degraded": true } } } ] }));
    let e = explain_live(&rt, &query("/envelopes/7/grab", "bob")).unwrap();
    let fb = e.fallback.as_ref().expect("the fallback is reported");
    assert_eq!(
        (fb.rule.as_str(), fb.fraction_ppm, fb.status),
        ("grab-off", 1_000_000, 200)
    );
    assert_eq!((e.answer.kind, e.answer.status), ("fallback", Some(200)));
    assert!(!e.route_reached);
    let text = e.to_string();
    assert!(
        text.contains("fallback: rule \"grab-off\" answers 200"),
        "{text}"
    );
    assert!(text.contains("route: not reached"), "{text}");
    assert!(!text.contains("→ upstream"), "{text}");
    // Another interface is routed as usual.
    let e = explain_live(&rt, &query("/envelopes/7/share", "bob")).unwrap();
    assert!(e.fallback.is_none() && e.route_reached);
    assert_eq!(e.answer.upstream.as_deref(), Some("v1"));
}

/// Admission at the live level (everyone in) and at a given one (a low-priority interface
/// shed below the floor), with the rank reported.
#[test]
fn admission_at_live_and_given_level() {
    let rt = runtime(json!({ "overload": {
        "enabled": true,
        "upstreams": { "v1": { "max_in_flight": 100 } },
        "interfaces": { "grab": { "priority": "critical" }, "share": { "priority": "low" } },
        "admission": {} } }));
    let e = explain_live(&rt, &query("/envelopes/7/share", "bob")).unwrap();
    assert!(e.admission.enabled && e.admission.admitted, "{e:?}");
    assert_eq!(e.admission.level, Some(0));
    let rank = e.admission.rank.unwrap();
    let mut q = query("/envelopes/7/share", "bob");
    q.level = Some(rank + 1);
    let e = explain_live(&rt, &q).unwrap();
    assert!(!e.admission.admitted);
    assert_eq!((e.answer.kind, e.answer.status), ("overloaded", Some(503)));
    assert_eq!(e.limits.len(), 0, "share has no limits");
    assert!(e.to_string().contains(&format!(
        "admission: shed (rank {rank}, level {})",
        rank + 1
    )));
    // The same level admits critical grab traffic of a higher rank.
    let mut q = query("/envelopes/7/grab", "bob");
    q.level = Some(rank + 1);
    let e = explain_live(&rt, &q).unwrap();
    assert!(
        e.admission.admitted && e.admission.rank.unwrap() > rank,
        "{e:?}"
    );
}

/// The breaker: closed passes; open answers with its response, read from the live state
/// (peeking takes no probe slot and makes no transition).
#[test]
fn breaker_closed_then_open() {
    let rt = runtime(json!({ "breakers": [ {
        "name": "v1-breaker", "upstream": "v1", "min_calls": 2, "error_ratio": "50%",
        "open_ms": 60000, "response": { "status": 503, "body": { "error": "degraded" } } } ] }));
    let e = explain_live(&rt, &query("/envelopes/7/share", "bob")).unwrap();
    let b = e.breaker.as_ref().unwrap();
    assert_eq!(
        (b.breaker.as_str(), b.state, b.pass),
        ("v1-breaker", "closed", true)
    );
    let breaker = &rt.governors.breakers.by_id[0];
    for _ in 0..2 {
        let (admission, _) = breaker.admit(crate::govern::breaker::now());
        let crate::govern::breaker::Admission::Pass(p) = admission else {
            panic!("closed admits")
        };
        p.finish(
            crate::govern::breaker::now(),
            CallResult::Failure,
            Duration::ZERO,
        );
    }
    let e = explain_live(&rt, &query("/envelopes/7/share", "bob")).unwrap();
    let b = e.breaker.as_ref().unwrap();
    assert_eq!((b.state, b.pass), ("open", false));
    assert_eq!(
        (e.answer.kind, e.answer.status, e.answer.rule.as_deref()),
        ("circuit_open", Some(503), Some("v1-breaker"))
    );
    assert_eq!(e.route.decision.as_ref().unwrap().upstream, "v1");
    assert_eq!(breaker.state().label(), "open", "peeking changed nothing");
}

/// The route phase keeps its account (rules considered, split, bucket) and the answer is
/// the upstream it chose; the command line decides against fresh state.
#[test]
fn route_and_answer_off_line() {
    let rt = runtime(json!({ "routes": [
        { "name": "default", "upstream": "v1" },
        { "name": "canary", "match": { "interfaces": ["grab"] },
          "split": [ { "upstream": "v2", "weight": "100%" } ] } ] }));
    let snap_text = rt.snapshot.routes.len();
    assert_eq!(snap_text, 2);
    let e = explain_live(&rt, &query("/envelopes/7/grab", "bob")).unwrap();
    let d = e.route.decision.as_ref().unwrap();
    assert_eq!(
        (d.rule.as_str(), d.upstream.as_str(), d.via),
        ("canary", "v2", "split")
    );
    assert_eq!(e.answer.upstream.as_deref(), Some("v2"));
    let text = e.to_string();
    assert!(
        text.contains("decision: rule \"canary\" → upstream \"v2\" via split"),
        "{text}"
    );
    assert!(
        text.contains("answer: forward to upstream \"v2\""),
        "{text}"
    );
    assert!(text.contains("limits (1, live state)"), "{text}");
}

/// Every shadow verdict is reported next to the real one, in the text and the JSON: a
/// dry-run fallback and a shadow split (100% to `v2`) beside the forward to `v1`; dry-run
/// admission judged at a level that sheds `share`, beside `admitted`.
#[test]
fn shadow_verdicts_beside_the_real_ones() {
    let rt = runtime(json!({
        "routes": [ { "name": "default", "upstream": "v1",
                      "shadow_split": [ { "upstream": "v2", "weight": "100%" } ] } ],
        "fallbacks": [ { "name": "try-off", "match": { "interfaces": ["share"] },
                         "mode": "dry_run", "response": { "status": 503 } } ],
        "overload": { "enabled": true, "max_in_flight": 100,
                      "interfaces": { "share": { "priority": "low" } },
                      "admission": { "mode": "dry_run" } }
    }));
    let q = ExplainQuery {
        level: Some(128),
        ..query("/envelopes/7/share", "bob")
    };
    let e = explain_live(&rt, &q).unwrap();
    assert_eq!(e.answer.upstream.as_deref(), Some("v1"), "{e}");
    assert!(e.admission.admitted && e.fallback.is_none(), "{e}");
    assert!(e.shadow.shed, "{e}");
    assert_eq!(
        e.shadow.fallback.as_ref().map(|f| &*f.rule),
        Some("try-off")
    );
    assert_eq!(e.shadow.split.as_deref(), Some("v2"));
    let text = e.to_string();
    for line in [
        "shadow: admission (dry run) would shed it",
        "shadow: fallback \"try-off\" (dry run) would answer 503",
        "shadow: split would send it to \"v2\"",
        "answer: forward to upstream \"v1\"",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    assert!(matches!(
        serve(&rt, "/envelopes/7/share", "bob"),
        Action::Forward { upstream, .. } if upstream == rules::UpstreamId(0)
    ));
}

/// A forwarded request of a mirrored user names the mirror in its answer; one the fraction
/// leaves out, or one answered locally (limited), names none.
#[test]
fn mirror_in_the_answer() {
    let with = |fraction: &str| {
        runtime(json!({ "routes": [ { "name": "default", "upstream": "v1",
            "mirror": { "upstream": "v2", "fraction": fraction } } ] }))
    };
    let rt = with("100%");
    let e = explain_live(&rt, &query("/envelopes/7/share", "bob")).unwrap();
    assert_eq!(e.answer.mirror.as_deref(), Some("v2"));
    let m = e.route.decision.as_ref().unwrap().mirror.as_ref().unwrap();
    assert!(m.mirrored && m.ppm == 1_000_000 && m.bucket.is_none());
    assert!(
        e.to_string()
            .contains("answer: forward to upstream \"v1\", and a copy to \"v2\""),
        "{e}"
    );
    // Refused by the limit: nothing is forwarded, so nothing is copied.
    assert!(matches!(
        serve(&rt, "/envelopes/7/grab", "bob"),
        Action::Forward { .. }
    ));
    let e = explain_live(&rt, &query("/envelopes/7/grab", "bob")).unwrap();
    assert_eq!((e.answer.kind, e.answer.mirror), ("rate_limited", None));

    let e = explain_live(&with("0%"), &query("/envelopes/7/share", "bob")).unwrap();
    assert_eq!(e.answer.mirror, None);
    assert!(
        e.to_string()
            .contains("mirror: upstream \"v2\" 0 ppm: not copied"),
        "{e}"
    );
}

/// A paced limit over its rate: explain says the request would wait its turn (and how
/// long), not that it would be refused, and the text says "would wait".
#[test]
fn paced_limit_reports_the_wait() {
    let rt = runtime(json!({
        "limits": [ { "name": "paced", "match": { "interfaces": ["grab"] },
                      "key": ["user"], "rate": "1/min", "burst": 1, "max_delay_ms": 60000 } ]
    }));
    assert!(matches!(
        serve(&rt, "/envelopes/7/grab", "bob"),
        Action::Forward { .. }
    ));
    let e = explain_live(&rt, &query("/envelopes/7/grab", "bob")).unwrap();
    let l = &e.limits[0];
    assert_eq!((l.verdict, l.retry_after_ms), ("paced", None));
    assert!(l.wait_ms.unwrap() > 59_000, "{l:?}");
    assert_eq!(e.answer.kind, "upstream");
    assert!(e.to_string().contains("]: paced (would wait "), "{e}");
}
