//! Routing end to end: a 5% canary of one app's grab traffic, sticky per user, with a
//! whitelist, and other apps untouched; `explain` on the command line and the admin port.

use std::net::SocketAddr;
use std::process::Command;

use serde_json::{Value, json};
use tidegate_tests::api;
use tidegate_tests::{
    Client, TIMEOUT, Upstream, config, get, grab_as, h1_client, set, start_gateway, tidegate_bin,
};

/// Config with two upstreams and a 5% canary of douyin's grab traffic to v2.
fn canary_config(v1: SocketAddr, v2: SocketAddr) -> Value {
    let mut c = config(&[v1]);
    set(
        &mut c,
        "upstreams/v1",
        json!({ "endpoints": [v1.to_string()] }),
    );
    set(
        &mut c,
        "upstreams/v2",
        json!({ "endpoints": [v2.to_string()] }),
    );
    c["upstreams"].as_object_mut().unwrap().remove("up");
    set(
        &mut c,
        "routes",
        json!([
            { "name": "default", "upstream": "v1" },
            { "name": "douyin-grab-canary",
              "match": { "apps": ["douyin"], "interfaces": ["grab"] },
              "split": [ { "upstream": "v2", "weight": "5%" }, { "upstream": "v1", "weight": "rest" } ],
              "whitelist": [ { "upstream": "v2", "users": ["tester-1"] } ] }
        ]),
    );
    c
}

async fn grab(client: &Client, gw: SocketAddr, app: &str, user: &str) {
    let r = grab_as(client, gw, app, user).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// 20,000 users of app douyin: v2's share is 5% within 4σ; one user repeated 100 times always
/// hits one upstream; the whitelisted tester always reaches v2; another app never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_sticky_whitelist() {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let server = start_gateway(&canary_config(v1.addr, v2.addr)).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();

    let n = 20_000usize;
    let workers = 32;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(workers) {
                grab(&client, gw, "douyin", &format!("user-{i}")).await;
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(TIMEOUT * 8, t)
            .await
            .expect("load finishes")
            .unwrap();
    }
    assert_eq!(v1.hits() + v2.hits(), n);
    let (nf, p) = (n as f64, 0.05);
    let sigma = (nf * p * (1.0 - p)).sqrt();
    let got = v2.hits() as f64;
    assert!(
        (got - nf * p).abs() <= 4.0 * sigma,
        "v2 got {got} of {n}; expected {} ± {}",
        nf * p,
        4.0 * sigma
    );

    // Sticky: the same user 100 times goes to the same upstream.
    for user in ["user-1", "user-2", "user-3"] {
        let (a1, a2) = (v1.hits(), v2.hits());
        for _ in 0..100 {
            grab(&client, gw, "douyin", user).await;
        }
        let (d1, d2) = (v1.hits() - a1, v2.hits() - a2);
        assert!(
            (d1, d2) == (100, 0) || (d1, d2) == (0, 100),
            "{user}: v1 {d1}, v2 {d2}"
        );
    }

    // The whitelisted tester always reaches v2.
    let before = v2.hits();
    for _ in 0..50 {
        grab(&client, gw, "douyin", "tester-1").await;
    }
    assert_eq!(v2.hits() - before, 50);

    // Another app's grab traffic is untouched by the canary.
    let before = v2.hits();
    for i in 0..1000 {
        grab(&client, gw, "kuaishou", &format!("user-{i}")).await;
    }
    assert_eq!(
        v2.hits(),
        before,
        "kuaishou traffic must not reach the canary"
    );

    // The admin port explains the same decision the gateway made.
    let r = get(
        &client,
        server.admin_addr,
        "/admin/explain?app=douyin&user=tester-1&method=POST&path=/envelopes/7/grab",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.json();
    assert_eq!(e["decision"]["upstream"], "v2");
    assert_eq!(e["decision"]["via"], "whitelist_user");
    let bad = get(&client, server.admin_addr, "/admin/explain?app=douyin").await;
    assert_eq!(bad.status, 400);
    assert!(server.shutdown().await);
}

/// Write a config to a temp dir and run `tidegate <args> --config FILE`.
fn tidegate(config: &Value, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidegate.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let out = Command::new(tidegate_bin())
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("running tidegate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tidegate explain` reports a split hit with its bucket, a whitelist hit, and the default
/// route when nothing specific matches.
#[test]
fn explain_command() {
    let c = canary_config(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    let grab = [
        "explain",
        "--method",
        "POST",
        "--path",
        "/envelopes/7/grab",
        "--app",
        "douyin",
    ];

    let (code, out, err) = tidegate(&c, &[&grab[..], &["--user", "bob"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("classification: app=douyin interface=grab user=bob"),
        "{out}"
    );
    assert!(
        out.contains(
            "+ douyin-grab-canary (specificity 3): matched: the most specific matching rule"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "+ default (specificity 0): matched, but \"douyin-grab-canary\" is more specific"
        ),
        "{out}"
    );
    assert!(
        out.contains("split: v2 50000 ppm, buckets [0, 50000)"),
        "{out}"
    );
    let bucket = api::bucket("douyin-grab-canary", "bob");
    assert!(
        out.contains(&format!("bucket: {bucket} (from user)")),
        "{out}"
    );
    let want = if bucket < 50_000 { "v2" } else { "v1" };
    assert!(
        out.contains(&format!("→ upstream \"{want}\" via split")),
        "{out}"
    );

    let (code, out, _) = tidegate(&c, &[&grab[..], &["--user", "tester-1", "--json"]].concat());
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"]["via"], "whitelist_user");
    assert_eq!(v["decision"]["upstream"], "v2");

    let (code, out, _) = tidegate(
        &c,
        &[
            "explain",
            "--path",
            "/somewhere",
            "--app",
            "douyin",
            "--user",
            "bob",
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("decision: rule \"default\" → upstream \"v1\" via direct"),
        "{out}"
    );
}

/// `tidegate explain` reports every phase: with a 100% fallback on `grab`, the fallback
/// answers and routing is not reached (not the upstream routing would have picked), in text
/// and JSON; other interfaces are still routed.
#[test]
fn explain_reports_the_fallback() {
    let mut c = canary_config(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    c["fallbacks"] = json!([{ "name": "grab-off", "match": { "interfaces": ["grab"] },
        "response": { "status": 200, "body": { "degraded": true } } }]);
    let grab = [
        "explain",
        "--method",
        "POST",
        "--path",
        "/envelopes/7/grab",
        "--app",
        "douyin",
        "--user",
        "bob",
    ];
    let (code, out, err) = tidegate(&c, &grab);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("fallback: rule \"grab-off\" answers 200"),
        "{out}"
    );
    assert!(out.contains("route: not reached"), "{out}");
    assert!(
        out.contains("answer: 200 fallback (rule \"grab-off\")"),
        "{out}"
    );
    assert!(!out.contains("→ upstream"), "{out}");

    let (code, out, _) = tidegate(&c, &[&grab[..], &["--json"]].concat());
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["answer"]["kind"], "fallback");
    assert_eq!(v["fallback"]["rule"], "grab-off");
    assert_eq!(v["route_reached"], false);
    assert!(v["decision"].is_null());

    let (code, out, _) = tidegate(&c, &["explain", "--path", "/somewhere", "--app", "douyin"]);
    assert_eq!(code, 0);
    assert!(out.contains("fallback: none"), "{out}");
    assert!(out.contains("answer: forward to upstream \"v1\""), "{out}");
}

/// `tidegate check` refuses two rules that can match the same request with the same
/// specificity, naming both; `explain` refuses to run on such a config.
#[test]
fn ambiguity_caught_by_check() {
    let mut c = canary_config(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    c["routes"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "douyin-grab-other", "match": { "apps": ["douyin", "x"], "interfaces": ["grab"] }, "upstream": "v1" }));
    let (code, _, err) = tidegate(&c, &["check"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("routes[2]: rules \"douyin-grab-canary\" (routes[1]) and \"douyin-grab-other\" (routes[2]) can match the same request"),
        "{err}"
    );
    let (code, _, err) = tidegate(&c, &["explain", "--path", "/x"]);
    assert_eq!(code, 1, "{err}");
}
