//! Lifecycle and visibility: graceful shutdown, the admin endpoints and metrics, and the
//! embedded grab backend behind the gateway.

use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use serde_json::json;
use tidegate_tests::{
    Upstream, config, full, get, h1_client, h2c_client, post, send, set, start_gateway,
};

/// Poll `cond` every 10 ms until it holds; panics after 5 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// In-flight h1/h2c requests finish 200 during shutdown; new connections are refused; full drain.
#[tokio::test]
async fn graceful_shutdown_drains_in_flight() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[up.addr])).await;
    let addr = gw.listen_addrs[0];

    let h1 = tokio::spawn(async move { get(&h1_client(), addr, "/slow?sleep_ms=1000").await });
    let h2 = tokio::spawn(async move { get(&h2c_client(), addr, "/slow?sleep_ms=1000").await });
    wait_until("both requests to reach the upstream", || up.hits() == 2).await;

    let started = Instant::now();
    let shutdown = tokio::spawn(gw.shutdown());
    let mut refused = false;
    while started.elapsed() < Duration::from_millis(800) {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "new connections still accepted after shutdown began"
    );
    assert!(
        !h1.is_finished() && !h2.is_finished(),
        "requests ended early"
    );

    for (name, task) in [("h1", h1), ("h2c", h2)] {
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the in-flight request finishes")
            .expect("the request task did not panic");
        assert_eq!(r.status, StatusCode::OK, "{name}: {}", r.text());
        assert_eq!(r.json()["path"], "/slow?sleep_ms=1000", "{name}");
    }
    let drained = tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown finishes within the grace period")
        .unwrap();
    assert!(drained, "shutdown reported connections left over");
    assert!(started.elapsed() >= Duration::from_millis(500));
}

/// Idle keep-alive h1/h2c connections are closed at once by shutdown, not after the grace period.
#[tokio::test]
async fn shutdown_closes_idle_connections_promptly() {
    let up = Upstream::start().await;
    let mut cfg = config(&[up.addr]);
    set(&mut cfg, "server/shutdown_grace_ms", json!(10_000));
    let gw = start_gateway(&cfg).await;
    let (c1, c2) = (h1_client(), h2c_client());
    assert_eq!(
        get(&c1, gw.listen_addrs[0], "/a").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&c2, gw.listen_addrs[0], "/b").await.status,
        StatusCode::OK
    );
    let started = Instant::now();
    let drained = gw.shutdown().await;
    assert!(drained);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown waited {:?} for idle connections",
        started.elapsed()
    );
    drop((c1, c2));
}

/// /healthz, /readyz answer 200; /metrics counts requests by interface, upstream, status class.
#[tokio::test]
async fn admin_and_metrics_by_interface() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[up.addr])).await;
    let client = h1_client();
    let addr = gw.listen_addrs[0];

    let health = get(&client, gw.admin_addr, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json(), json!({"status": "ok"}));
    let ready = get(&client, gw.admin_addr, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json(), json!({"status": "ready"}));
    assert_eq!(
        get(&client, gw.admin_addr, "/nope").await.status,
        StatusCode::NOT_FOUND
    );

    for id in ["e1", "e2"] {
        let r = post(&client, addr, &format!("/envelopes/{id}/grab"), "").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(
        post(&client, addr, "/envelopes", "{}").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, addr, "/unclassified").await.status,
        StatusCode::OK
    );
    // A method the interface does not name is not that interface.
    assert_eq!(
        get(&client, addr, "/envelopes/e1/grab").await.status,
        StatusCode::OK
    );

    let m = get(&client, gw.admin_addr, "/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    let m = m.text();
    for line in [
        r#"tidegate_requests_total{interface="grab",upstream="up",status="2xx"} 2"#,
        r#"tidegate_requests_total{interface="create",upstream="up",status="2xx"} 1"#,
        r#"tidegate_requests_total{interface="none",upstream="up",status="2xx"} 2"#,
        "tidegate_connections_accepted_total 1",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in:\n{m}");
    }
    assert!(gw.shutdown().await);
}

/// A request no route matches answers 404 `no_route` and is counted with upstream `none`.
#[tokio::test]
async fn no_route_is_404() {
    let up = Upstream::start().await;
    let mut cfg = config(&[up.addr]);
    set(&mut cfg, "routes", json!([]));
    set(&mut cfg, "allow_empty_routes", json!(true));
    let gw = start_gateway(&cfg).await;
    let client = h1_client();
    let r = post(&client, gw.listen_addrs[0], "/envelopes/e1/grab", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json(), json!({"error": "no_route"}));
    assert!(r.headers.contains_key("x-request-id"));
    assert_eq!(up.hits(), 0);
    let m = get(&client, gw.admin_addr, "/metrics").await.text();
    let line = r#"tidegate_requests_total{interface="grab",upstream="none",status="4xx"} 1"#;
    assert!(m.lines().any(|l| l == line), "missing {line:?} in:\n{m}");
    assert!(gw.shutdown().await);
}

fn embedded_config(data_dir: &std::path::Path) -> serde_json::Value {
    let mut cfg = config(&[]);
    set(
        &mut cfg,
        "upstreams",
        json!({
            "grab": {
                "kind": "embedded",
                "data_dir": data_dir.to_str().unwrap(),
                "request_timeout_ms": 5000
            }
        }),
    );
    set(
        &mut cfg,
        "routes",
        json!([{ "name": "default", "upstream": "grab" }]),
    );
    cfg
}

/// The embedded grab backend runs on a loopback port and answers /healthz through the gateway.
#[tokio::test]
async fn embedded_backend_health() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(&embedded_config(&dir.path().join("grab"))).await;
    assert_eq!(gw.embedded_addrs.len(), 1);
    assert_eq!(gw.embedded_addrs[0].0, "grab");
    assert!(gw.embedded_addrs[0].1.ip().is_loopback());
    let r = get(&h1_client(), gw.listen_addrs[0], "/healthz").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(gw.shutdown().await);
}

/// Through the gateway, create an envelope then grab it: a share of 1..=total, the rest left in it.
#[tokio::test]
async fn embedded_backend_create_and_grab() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(&embedded_config(&dir.path().join("grab"))).await;
    let client = h1_client();
    let addr = gw.listen_addrs[0];

    let req = Request::post(format!("http://{addr}/envelopes"))
        .header("content-type", "application/json")
        .header("x-user-id", "alice")
        .body(full(
            json!({"sender": "alice", "total_cents": 1000, "count": 3}).to_string(),
        ))
        .unwrap();
    let created = send(&client, req).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let created = created.json();
    let id = match &created["id"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => panic!("no envelope id in {created}: {other}"),
    };

    let req = Request::post(format!("http://{addr}/envelopes/{id}/grab"))
        .header("x-user-id", "bob")
        .body(full(""))
        .unwrap();
    let grabbed = send(&client, req).await;
    assert_eq!(grabbed.status, StatusCode::OK, "{}", grabbed.text());
    let g = grabbed.json();
    let amount = g["amount_cents"].as_u64().expect("amount_cents");
    assert!((1..=1000).contains(&amount), "{g}");
    assert_eq!(g["remaining_count"], 2, "{g}");
    assert_eq!(g["remaining_cents"].as_u64(), Some(1000 - amount), "{g}");
    assert_eq!(g["user"], "bob", "{g}");
    assert!(gw.shutdown().await);
}

/// CPU time (user + system, in clock ticks) used so far by the calling thread.
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A request in flight past `idle_timeout_ms` still answers 200, and the gateway thread stays idle.
#[tokio::test]
async fn idle_timeout_spares_in_flight_request_without_spinning() {
    let up = Upstream::start().await;
    let mut cfg = config(&[up.addr]);
    set(&mut cfg, "server/limits/idle_timeout_ms", json!(100));
    let gw = start_gateway(&cfg).await;
    // The test runtime is single-threaded: the gateway's tasks run on this thread.
    let before = thread_cpu_ticks();
    let r = get(&h1_client(), gw.listen_addrs[0], "/slow?sleep_ms=1000").await;
    let used = thread_cpu_ticks() - before;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        used < 30,
        "the thread used {used} ticks of CPU over a 1 s wait"
    );
    assert!(gw.shutdown().await);
}
