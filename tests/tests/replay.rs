//! `tidegate replay` on a log the real gateway recorded: replayed under the config that
//! recorded it, every route and fallback agrees and limits agree within the documented bound;
//! under edited configs, the report names exactly the requests and users that move.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use serde_json::{Value, json};
use tidegate_tests::{ChildGateway, Upstream, config, full, h1_client, send, set, tidegate_bin};

/// Users that grab twice each; `heavy` grabs in a burst (the limit refuses some).
const USERS: usize = 40;
/// The split's canary weight, and the raised one of the edit.
const CANARY: (&str, u32) = ("20%", 200_000);
const RAISED: (&str, u32) = ("50%", 500_000);

fn gateway_config(v1: &Upstream, v2: &Upstream, canary: &str, limit: Value) -> Value {
    let mut c = config(&[v1.addr]);
    set(&mut c, "server/access_log/enabled", json!(true));
    set(
        &mut c,
        "upstreams/v2",
        json!({ "endpoints": [v2.addr.to_string()] }),
    );
    set(
        &mut c,
        "routes",
        json!([
            { "name": "default", "upstream": "up" },
            { "name": "gray", "match": { "headers": { "x-env": "gray" } }, "upstream": "v2" },
            { "name": "canary", "match": { "interfaces": ["grab"] },
              "split": [ { "upstream": "v2", "weight": canary }, { "upstream": "up", "weight": "rest" } ],
              "whitelist": [ { "upstream": "v2", "users": ["qa-1"] } ] }
        ]),
    );
    set(&mut c, "limits", limit);
    set(
        &mut c,
        "fallbacks",
        json!([{ "name": "open-off", "match": { "interfaces": ["open"] }, "fraction": "30%",
                 "response": { "status": 200, "body": { "degraded": true } } }]),
    );
    c
}

fn per_user(rate: &str, burst: u32) -> Value {
    json!([{ "name": "per-user", "match": { "interfaces": ["grab"] }, "key": ["user"],
             "rate": rate, "burst": burst }])
}

async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> StatusCode {
    let client = h1_client();
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client, b.body(full(Bytes::new())).expect("a request"))
        .await
        .status
}

/// `tidegate replay --json` of `log` under `config` (and `extra` arguments).
fn replay(config: &Path, log: &Path, extra: &[&str]) -> Value {
    let out = Command::new(tidegate_bin())
        .arg("replay")
        .arg("--config")
        .arg(config)
        .args(extra)
        .arg("--json")
        .arg(log)
        .output()
        .expect("running tidegate replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the report is JSON")
}

fn write(dir: &Path, name: &str, v: &Value) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    p
}

#[tokio::test]
async fn a_recorded_log_replays_to_the_same_decisions_and_edits_name_who_moves() {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let recorded_cfg = gateway_config(&v1, &v2, CANARY.0, per_user("5/s", 3));
    let gw = ChildGateway::spawn(&recorded_cfg);

    // Traffic: every user grabs twice; `heavy` grabs 8 times in a burst; the whitelisted
    // tester grabs; users open an envelope (30% fall back); some send the gray header.
    let users: Vec<String> = (0..USERS).map(|i| format!("user-{i}")).collect();
    let mut limited = 0;
    for u in users.iter().chain(["qa-1".to_owned()].iter()) {
        for _ in 0..2 {
            let h = [("x-app-id", "shop"), ("x-user-id", u.as_str())];
            request(gw.addr, "POST", "/envelopes/7/grab", &h).await;
        }
        let h = [("x-app-id", "shop"), ("x-user-id", u.as_str())];
        request(gw.addr, "GET", "/envelopes/7", &h).await;
    }
    // Two bursts a second apart: the second is admitted only if the replay's clock moved
    // with the log's.
    for burst in 0..2 {
        if burst == 1 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        for _ in 0..8 {
            let h = [("x-app-id", "shop"), ("x-user-id", "heavy")];
            if request(gw.addr, "POST", "/envelopes/7/grab", &h).await
                == StatusCode::TOO_MANY_REQUESTS
            {
                limited += 1;
            }
        }
    }
    for u in &users[..5] {
        let h = [("x-user-id", u.as_str()), ("x-env", "gray")];
        request(gw.addr, "GET", "/healthz", &h).await;
    }
    assert!(limited >= 1, "the burst met the limit");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let dir = tempfile::tempdir().unwrap();
    let lines = gw.log_lines();
    let log = dir.path().join("access.log");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let access: Vec<Value> = lines
        .iter()
        .filter(|l| l.contains("\"tidegate::access\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let requests = 2 * (USERS + 1) + (USERS + 1) + 16 + 5;
    assert_eq!(access.len(), requests);

    // 1. The recording config: every request compared, no route or fallback changes, and
    //    limit verdicts within the bound (docs/operations.md: at most one per key whose
    //    requests came within the log's timing error of regaining quota; here sequential).
    let same = write(dir.path(), "same.json", &recorded_cfg);
    let r = replay(&same, &log, &[]);
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_eq!(r["requests"], json!(requests), "{r:#}");
    assert_eq!(r["compared"], json!(requests), "{r:#}");
    let changes = r["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .all(|c| c["kind"].as_str().unwrap().ends_with("limited")),
        "only limit verdicts may differ: {r:#}"
    );
    let flips: u64 = changes
        .iter()
        .map(|c| c["requests"].as_u64().unwrap())
        .sum();
    assert!(flips <= 1, "limit verdicts within the bound: {r:#}");
    assert!(
        r["lines"].as_u64().unwrap() > requests as u64,
        "other log lines are read past"
    );

    // 2. The split raised: exactly the recorded forwarded grabs of users in the new buckets
    //    (the bucket formula, from the rules crate) move up → v2; the whitelisted tester
    //    does not.
    let raised = write(
        dir.path(),
        "raised.json",
        &gateway_config(&v1, &v2, RAISED.0, per_user("5/s", 3)),
    );
    let r = replay(&raised, &log, &[]);
    let field = |l: &Value, k: &str| l[k].as_str().unwrap().to_owned();
    let moving: Vec<&Value> = access
        .iter()
        .filter(|l| field(l, "decision") == "forward" && field(l, "route") == "canary")
        .filter(|l| field(l, "user") != "qa-1")
        .filter(|l| {
            (CANARY.1..RAISED.1).contains(&rules::bucket::bucket("canary", &field(l, "user")))
        })
        .collect();
    let moved_users: BTreeSet<String> = moving.iter().map(|l| field(l, "user")).collect();
    assert!(!moved_users.is_empty());
    let route: Vec<&Value> = r["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "route")
        .collect();
    assert_eq!(route.len(), 1, "{r:#}");
    assert_eq!(
        (&route[0]["rule"], &route[0]["from"], &route[0]["to"]),
        (
            &json!("canary"),
            &json!("up (route canary)"),
            &json!("v2 (route canary)")
        )
    );
    assert_eq!(route[0]["requests"], json!(moving.len()), "{r:#}");
    assert_eq!(route[0]["users"], json!(moved_users.len()), "{r:#}");

    // 3. The limit tightened to 1/s, burst 1: every user's grabs after the first of each
    //    burst (each sent within a second) are newly limited.
    let tight = write(
        dir.path(),
        "tight.json",
        &gateway_config(&v1, &v2, CANARY.0, per_user("1/s", 1)),
    );
    let r = replay(&tight, &log, &[]);
    let mut forwarded: BTreeMap<String, u64> = BTreeMap::new();
    for l in access
        .iter()
        .filter(|l| field(l, "interface") == "grab" && field(l, "decision") == "forward")
    {
        *forwarded.entry(field(l, "user")).or_default() += 1;
    }
    // heavy's two bursts each keep one request.
    let expected: u64 = forwarded
        .iter()
        .map(|(u, n)| n - if u == "heavy" { 2 } else { 1 })
        .sum();
    let newly: Vec<&Value> = r["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "newly_limited")
        .collect();
    let got: u64 = newly.iter().map(|c| c["requests"].as_u64().unwrap()).sum();
    assert!(newly.iter().all(|c| c["rule"] == "per-user"), "{r:#}");
    assert_eq!(got, expected, "{r:#}");
    let users_newly: u64 = newly.iter().map(|c| c["users"].as_u64().unwrap()).sum();
    assert!(users_newly >= forwarded.values().filter(|&&n| n > 1).count() as u64);

    // The text form names the same change.
    let out = Command::new(tidegate_bin())
        .args(["replay", "--config"])
        .arg(&raised)
        .arg("--live")
        .arg(&same)
        .arg(&log)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        text.contains("canary") && text.contains("up (route canary) → v2 (route canary)"),
        "{text}"
    );
}
