//! Degradation end to end: a fallback answering `share` locally; a 30% fallback that picks
//! 30% of users, always the same ones; an emergency plan switched on by one edit that changes
//! several rules at once; a circuit breaker that opens on a failing backend, serves the
//! fallback, and closes through half-open once the backend recovers; a plan that switches
//! itself on when its upstream starts failing, and off once it recovers.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidegate_tests::api;
use tidegate_tests::{
    ChildGateway, Client, Reply, Switchable, TIMEOUT, Upstream, add_share_interface, config, get,
    h1_client, metric_value, post_as, set, start_gateway,
};

/// The test config plus a `share` interface.
fn base(up: SocketAddr) -> Value {
    let mut c = config(&[up]);
    add_share_interface(&mut c);
    c
}

fn share_off(fraction: Option<&str>) -> Value {
    let mut f = json!({
        "name": "share-off",
        "match": { "interfaces": ["share"] },
        "response": { "status": 200, "headers": { "x-degraded": "share-off" },
                      "body": { "shared": false, "degraded": true } }
    });
    if let Some(p) = fraction {
        f["fraction"] = json!(p);
    }
    f
}

/// A `share` request as `user`.
async fn share(client: &Client, gw: SocketAddr, user: &str) -> Reply {
    post_as(client, gw, "/envelopes/7/share", "app", user).await
}

fn degraded(r: &Reply) -> bool {
    r.headers.contains_key("x-degraded")
}

/// A fallback on `share` answers locally with its status, headers and body; `grab` still
/// reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_answers_locally() {
    let up = Upstream::start().await;
    let mut c = base(up.addr);
    set(&mut c, "fallbacks", json!([share_off(None)]));
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();

    for user in ["a", "b", "c"] {
        let r = share(&client, gw, user).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-degraded"], "share-off");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.json(), json!({ "shared": false, "degraded": true }));
    }
    assert_eq!(up.hits(), 0, "the upstream never saw a share request");
    let r = post_as(&client, gw, "/envelopes/7/grab", "app", "a").await;
    assert!(!degraded(&r));
    assert_eq!(up.hits(), 1);
    let metrics = get(&client, server.admin_addr, "/metrics").await.text();
    assert!(
        metrics.contains("tidegate_fallbacks_total{rule=\"share-off\"} 3"),
        "{metrics}"
    );
    assert!(server.shutdown().await);
}

/// A 30% fallback: of 5,000 users, 30% within 4σ are answered locally, and asking again
/// gives every user the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_fraction_sticky_per_user() {
    let up = Upstream::start().await;
    let mut c = base(up.addr);
    set(&mut c, "fallbacks", json!([share_off(Some("30%"))]));
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();

    let n = 5_000usize;
    let workers = 16;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in (w..n).step_by(workers) {
                let r = share(&client, gw, &format!("user-{i}")).await;
                assert_eq!(r.status, 200);
                out.push((i, degraded(&r)));
            }
            out
        }));
    }
    let mut first = vec![false; n];
    for t in tasks {
        for (i, d) in tokio::time::timeout(TIMEOUT * 4, t)
            .await
            .expect("load finishes")
            .unwrap()
        {
            first[i] = d;
        }
    }
    let hit = first.iter().filter(|&&d| d).count();
    let (nf, p) = (n as f64, 0.3);
    let sigma = (nf * p * (1.0 - p)).sqrt();
    assert!(
        (hit as f64 - nf * p).abs() <= 4.0 * sigma,
        "{hit} of {n} degraded; expected {} ± {:.0}",
        nf * p,
        4.0 * sigma
    );
    assert_eq!(
        up.hits(),
        n - hit,
        "degraded requests never reached the upstream"
    );
    for (i, &was) in first.iter().enumerate().take(500) {
        let r = share(&client, gw, &format!("user-{i}")).await;
        assert_eq!(degraded(&r), was, "user-{i} changed sides");
    }
    assert!(server.shutdown().await);
}

/// One edit (`"active_plans": ["peak"]`) flips three rules at once: the grab limit tightens,
/// a share fallback appears, and the limit on `open` is switched off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_switches_several_rules() {
    let up = Upstream::start().await;
    let mut c = base(up.addr);
    set(
        &mut c,
        "limits",
        json!([
            { "name": "grab-per-user", "match": { "interfaces": ["grab"] },
              "key": ["user"], "rate": "100/s" },
            { "name": "open-limit", "match": { "interfaces": ["open"] }, "rate": "1/min", "burst": 1 }
        ]),
    );
    set(
        &mut c,
        "plans",
        json!({ "peak": {
            "description": "red-envelope rain: protect grab, drop share, stop limiting open",
            "limits": [ { "name": "grab-per-user", "match": { "interfaces": ["grab"] },
                          "key": ["user"], "rate": "1/min", "burst": 1 } ],
            "fallbacks": [ share_off(None) ],
            "disable": ["open-limit"]
        } }),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidegate.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    let server = api::start_from_file(&path).await.expect("starts");
    let gw = server.listen_addrs[0];
    let client = h1_client();

    // Normal posture.
    for _ in 0..3 {
        assert_eq!(
            post_as(&client, gw, "/envelopes/7/grab", "app", "u1")
                .await
                .status,
            200
        );
    }
    assert!(!degraded(&share(&client, gw, "u1").await));
    assert_eq!(get(&client, gw, "/envelopes/7").await.status, 200);
    assert_eq!(get(&client, gw, "/envelopes/7").await.status, 429);

    // The one-line edit.
    c["active_plans"] = json!(["peak"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    let reloader = server.reloader.clone().expect("started from a file");
    api::apply_written(&reloader).await;

    let statuses: Vec<u16> = futures_util::future::join_all((0..3).map(|_| async {
        post_as(&client, gw, "/envelopes/7/grab", "app", "u2")
            .await
            .status
            .as_u16()
    }))
    .await;
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 429, 429], "{statuses:?}");
    let hits_before = up.hits();
    assert!(degraded(&share(&client, gw, "u1").await));
    assert_eq!(up.hits(), hits_before, "share is answered locally");
    for _ in 0..3 {
        assert_eq!(get(&client, gw, "/envelopes/7").await.status, 200);
    }

    // And back: the base limit on open returns (with fresh state: it is a new rule again).
    c["active_plans"] = json!([]);
    std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    api::apply_written(&reloader).await;
    assert!(!degraded(&share(&client, gw, "u1").await));
    assert!(server.shutdown().await);
}

/// A backend failing 100% opens the breaker after `min_calls` (inside the window); the
/// fallback is served without touching it; once it recovers and the cool-down passes, two
/// probes close the breaker through half-open. Every transition is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_and_recovers() {
    let backend = Switchable::start().await;
    let mut c = base(backend.addr);
    set(
        &mut c,
        "breakers",
        json!([{ "name": "up-breaker", "upstream": "up", "window_ms": 10000, "min_calls": 5,
                 "error_ratio": "50%", "open_ms": 1000, "half_open_probes": 2,
                 "response": { "status": 503, "body": { "error": "grab_degraded" } } }]),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();
    let grab = || post_as(&client, gw, "/envelopes/7/grab", "app", "u");

    backend.failing.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(
            grab().await.status,
            500,
            "the backend's own answer passes through"
        );
    }
    assert_eq!(backend.hits(), 5);
    // Open: the fallback, without the backend (three requests well inside the 1 s cool-down).
    for _ in 0..3 {
        let r = grab().await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json(), json!({ "error": "grab_degraded" }));
    }
    assert_eq!(backend.hits(), 5, "an open breaker spares the backend");

    backend.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        assert_eq!(grab().await.status, 200, "probe");
    }
    for _ in 0..5 {
        assert_eq!(grab().await.status, 200, "closed again");
    }
    assert_eq!(backend.hits(), 5 + 2 + 5);

    let metrics = get(&client, server.admin_addr, "/metrics").await.text();
    for to in ["open", "half_open", "closed"] {
        let want = format!(
            "tidegate_breaker_transitions_total{{breaker=\"up-breaker\",upstream=\"up\",to=\"{to}\"}} 1"
        );
        assert!(metrics.contains(&want), "{want}\n{metrics}");
    }
    assert!(
        metrics.contains("tidegate_breaker_state{breaker=\"up-breaker\",upstream=\"up\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "tidegate_breaker_rejections_total{breaker=\"up-breaker\",upstream=\"up\"} 3"
        ),
        "{metrics}"
    );
    assert!(server.shutdown().await);
}

/// An open breaker with an alternate upstream sends traffic there instead of answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_alternate_upstream() {
    let backend = Switchable::start().await;
    let spare = Upstream::start().await;
    let mut c = base(backend.addr);
    set(
        &mut c,
        "upstreams/spare",
        json!({ "endpoints": [spare.addr.to_string()] }),
    );
    set(
        &mut c,
        "breakers",
        json!([{ "name": "to-spare", "upstream": "up", "route": "default", "min_calls": 3,
                 "open_ms": 60000, "alternate_upstream": "spare" }]),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();
    backend.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            post_as(&client, gw, "/envelopes/7/grab", "app", "u")
                .await
                .status,
            500
        );
    }
    for _ in 0..4 {
        assert_eq!(
            post_as(&client, gw, "/envelopes/7/grab", "app", "u")
                .await
                .status,
            200
        );
    }
    assert_eq!((backend.hits(), spare.hits()), (3, 4));
    assert!(server.shutdown().await);
}

/// Grab requests from fresh users, one after another, until `until` says stop; returns
/// when each first and last degraded answer came, and how many of each status.
async fn grab_until(
    client: &Client,
    gw: SocketAddr,
    next_user: &mut usize,
    mut until: impl FnMut(&Reply, Instant) -> bool,
) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        *next_user += 1;
        let r = post_as(
            client,
            gw,
            "/envelopes/7/grab",
            "app",
            &format!("u{next_user}"),
        )
        .await;
        if until(&r, Instant::now()) {
            return;
        }
        assert!(Instant::now() < deadline, "no end within {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// A plan with a trigger on `grab`'s error ratio: the upstream starts answering 500 and the
/// plan goes on within `for_ms` plus one window (with margin), its 50% fallback answers;
/// while the upstream still fails (seen through the other half) it stays on past
/// `release_for_ms`; once the upstream recovers it goes off within `release_for_ms` plus one
/// window. Each switch is logged at warn with its figures and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_switches_itself_on_a_failing_upstream_and_off_after_recovery() {
    const FOR_MS: u64 = 1000;
    const RELEASE_MS: u64 = 1500;
    const WINDOW_MS: u64 = 1000;
    // Scheduling slack on a loaded 2-core machine: the sampler's tick, a rebuild, the
    // request that observes it.
    const MARGIN_MS: u64 = 700;
    let backend = Switchable::start().await;
    let mut c = base(backend.addr);
    set(
        &mut c,
        "plans",
        json!({ "calm": {
            "fallbacks": [ { "name": "grab-calm", "match": { "interfaces": ["grab"] },
                             "fraction": "50%",
                             "response": { "status": 200, "headers": { "x-degraded": "calm" },
                                           "body": { "queued": true } } } ],
            "trigger": { "when": [ { "interface": "grab", "error_ratio_above": "20%" } ],
                         "for_ms": FOR_MS, "release_for_ms": RELEASE_MS, "min_requests": 10 }
        } }),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidegate.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    let gw = ChildGateway::spawn_file(&path, dir);
    let client = h1_client();
    let mut user = 0;

    // Healthy for two windows: nothing degraded, the plan off.
    let start = Instant::now();
    grab_until(&client, gw.addr, &mut user, |r, now| {
        assert_eq!(r.status, 200);
        assert!(
            !degraded(r),
            "the plan is off while the upstream is healthy"
        );
        now - start > Duration::from_millis(2 * WINDOW_MS)
    })
    .await;

    backend.failing.store(true, Ordering::SeqCst);
    let failing_at = Instant::now();
    let mut on_at = None;
    grab_until(&client, gw.addr, &mut user, |r, now| {
        if degraded(r) {
            assert_eq!(r.json(), json!({ "queued": true }));
            on_at = Some(now);
            return true;
        }
        assert_eq!(r.status, 500, "the backend's own answer passes through");
        false
    })
    .await;
    let took = on_at.expect("switched on") - failing_at;
    eprintln!("plan switched on {took:?} after the upstream started failing");
    assert!(
        took <= Duration::from_millis(FOR_MS + WINDOW_MS + MARGIN_MS),
        "on after {took:?}"
    );

    let status = get(&client, gw.admin_addr, "/admin/status.json")
        .await
        .json();
    let calm = &status["plans"][0];
    assert_eq!(
        (&calm["name"], &calm["active"], &calm["cause"]),
        (&json!("calm"), &json!(true), &json!("auto")),
        "{status}"
    );
    let reason = calm["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("error_ratio of grab "), "{reason}");
    assert!(reason.contains(" above 20%, held for "), "{reason}");
    assert_eq!(status["active_plans"], json!(["calm"]));

    // An edit while the plan is on (here, of its description) keeps it on: the reload
    // compiles the new file with the plans its triggers switched on.
    c["plans"]["calm"]["description"] = json!("switched on by its trigger");
    std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();

    let deadline = Instant::now() + TIMEOUT;
    loop {
        let cfg = get(&client, gw.admin_addr, "/admin/config").await.json();
        if cfg["generation"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the edit was not applied: {cfg}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Still failing: the half not degraded keeps the error ratio up, so the plan stays on
    // past release_for_ms, and its fallback answers the other half.
    let (mut deg, mut err) = (0, 0);
    let held_from = Instant::now();
    grab_until(&client, gw.addr, &mut user, |r, now| {
        match degraded(r) {
            true => deg += 1,
            false => {
                assert_eq!(r.status, 500);
                err += 1;
            }
        }
        now - held_from > Duration::from_millis(RELEASE_MS + WINDOW_MS)
    })
    .await;
    assert!(deg > 20 && err > 20, "{deg} degraded, {err} failed");
    let tail = get(&client, gw.admin_addr, "/admin/status.json")
        .await
        .json();
    assert_eq!(tail["plans"][0]["active"], json!(true), "{tail}");

    backend.failing.store(false, Ordering::SeqCst);
    let recovered_at = Instant::now();
    let mut last_degraded = recovered_at;
    grab_until(&client, gw.addr, &mut user, |r, now| {
        if degraded(r) {
            last_degraded = now;
        } else {
            assert_eq!(r.status, 200, "recovered");
        }
        // Off once no request was degraded for a while (half of all users would be).
        now - last_degraded > Duration::from_millis(500)
    })
    .await;
    let took = last_degraded - recovered_at;
    eprintln!("plan switched off {took:?} after the upstream recovered");
    assert!(
        took <= Duration::from_millis(RELEASE_MS + WINDOW_MS + MARGIN_MS),
        "off after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(RELEASE_MS - WINDOW_MS),
        "released after only {took:?}: release_for_ms was not waited for"
    );

    let metrics = get(&client, gw.admin_addr, "/metrics").await.text();
    let m = |series: &str| metric_value(&metrics, series);
    assert_eq!(
        m("tidegate_plan_active{plan=\"calm\",cause=\"auto\"}"),
        Some(0.0)
    );
    for to in ["on", "off"] {
        let series =
            format!("tidegate_plan_transitions_total{{plan=\"calm\",cause=\"auto\",to=\"{to}\"}}");
        assert_eq!(m(&series), Some(1.0), "{series}\n{metrics}");
    }
    let status = get(&client, gw.admin_addr, "/admin/status.json")
        .await
        .json();
    assert_eq!(status["plans"][0]["active"], json!(false), "{status}");
    assert!(
        status["plans"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("no condition held for")),
        "{status}"
    );

    let warned = |msg: &str| {
        (gw.log_lines().into_iter())
            .find(|l| l.contains(msg) && l.contains("WARN") && l.contains("calm"))
    };
    let on = warned("plan switched on by its trigger").expect("the switch on is logged");
    assert!(on.contains("error_ratio of grab"), "{on}");
    let off = warned("plan switched off by its trigger").expect("the switch off is logged");
    assert!(off.contains("no condition held for"), "{off}");
}
