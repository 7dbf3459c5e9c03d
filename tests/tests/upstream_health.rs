//! Endpoint health under load: one of three endpoints stops answering (a hung process: its
//! kernel still accepts connections, so a connect retry cannot hide it). Passive outlier
//! ejection takes it out within the first second, leaving at most 0.1% of requests failed
//! after it; active health checks keep it out and, once it is back on the same port, bring
//! it back into rotation. The ejection shows in the metrics and in status.json.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidegate_tests::killable::Killable;
use tidegate_tests::{
    Upstream, config, get, h1_client, metric_value, send, set, start_gateway, streamed,
};

/// Load from a few tasks: each sends `GET /work` every `every`, recording when each
/// request started (since `t0`) and whether it got a 200.
struct Load {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Duration, bool)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gw: SocketAddr, tasks: usize, every: Duration, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..tasks)
            .map(|_| {
                let (stop, log) = (stop.clone(), log.clone());
                tokio::spawn(async move {
                    let client = h1_client();
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let at = t0.elapsed();
                        let ok = get(&client, gw, "/work").await.status == 200;
                        log.lock().unwrap().push((at, ok));
                    }
                })
            })
            .collect();
        Self { stop, log, tasks }
    }

    async fn stop(self) -> Vec<(Duration, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.log).unwrap().into_inner().unwrap()
    }
}

/// (requests, failed) among those started in `[from, to)`.
fn count(log: &[(Duration, bool)], from: Duration, to: Duration) -> (usize, usize) {
    let window: Vec<_> = log
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .collect();
    (window.len(), window.iter().filter(|(_, ok)| !ok).count())
}

fn three_endpoint_config(eps: &[&Killable], outlier: Value) -> Value {
    let addrs: Vec<SocketAddr> = eps.iter().map(|e| e.addr).collect();
    endpoints_config(&addrs, outlier)
}

fn endpoints_config(addrs: &[SocketAddr], outlier: Value) -> Value {
    let mut c = config(addrs);
    set(&mut c, "upstreams/up/connect_timeout_ms", json!(200));
    set(&mut c, "upstreams/up/request_timeout_ms", json!(500));
    set(&mut c, "upstreams/up/outlier", outlier);
    c
}

async fn metrics(admin: SocketAddr) -> String {
    get(&h1_client(), admin, "/metrics").await.text()
}

/// One endpoint hangs under ~300 requests/s; passive ejection alone (no active checks, an
/// ejection longer than the test) keeps the failed requests after the first second at or
/// below 0.1%. With ejection off every third request times out, and this test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_takes_a_hung_endpoint_out_within_a_second() {
    let eps = [
        Killable::start().await,
        Killable::start().await,
        Killable::start().await,
    ];
    let c = three_endpoint_config(
        &[&eps[0], &eps[1], &eps[2]],
        json!({"consecutive_failures": 3, "base_ejection_ms": 30000,
               "max_ejection_ms": 60000, "max_ejected_percent": 34}),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let t0 = Instant::now();
    let load = Load::start(gw, 4, Duration::from_millis(12), t0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let killed_at = t0.elapsed();
    eps[1].hang();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = load.stop().await;

    let second = killed_at + Duration::from_secs(1);
    let (before, failed_before) = count(&log, Duration::ZERO, killed_at);
    let (first, failed_first) = count(&log, killed_at, second);
    let (after, failed_after) = count(&log, second, Duration::MAX);
    eprintln!(
        "before: {failed_before}/{before} failed; first second: {failed_first}/{first}; after: {failed_after}/{after}"
    );
    assert_eq!(failed_before, 0);
    assert!(
        failed_after * 1000 <= after,
        "{failed_after} of {after} failed after the first second (at most 0.1%)"
    );
    assert!(
        after >= 300,
        "the load ran: {after} requests after the first second"
    );

    let m = metrics(server.admin_addr).await;
    let ep = eps[1].addr;
    let ejected = format!(
        r#"tidegate_endpoint_ejections_total{{upstream="up",endpoint="{ep}",reason="consecutive_failures"}}"#
    );
    assert_eq!(metric_value(&m, &ejected), Some(1.0), "{m}");
    let healthy =
        |a: SocketAddr| format!(r#"tidegate_endpoint_healthy{{upstream="up",endpoint="{a}"}}"#);
    assert_eq!(metric_value(&m, &healthy(ep)), Some(0.0));
    assert_eq!(metric_value(&m, &healthy(eps[0].addr)), Some(1.0));
    server.shutdown().await;
}

/// With active checks as well: the hung endpoint is out within the first second, status.json
/// says why; killed and started again on the same port, the checks bring it back into
/// rotation long before its passive ejection would have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_bring_a_recovered_endpoint_back() {
    let mut eps = vec![
        Killable::start().await,
        Killable::start().await,
        Killable::start().await,
    ];
    let mut c = three_endpoint_config(
        &[&eps[0], &eps[1], &eps[2]],
        json!({"consecutive_failures": 3, "base_ejection_ms": 60000,
               "max_ejection_ms": 60000, "max_ejected_percent": 34}),
    );
    set(
        &mut c,
        "upstreams/up/health_check",
        json!({"path": "/healthz", "interval_ms": 100, "timeout_ms": 100,
               "healthy_threshold": 2, "unhealthy_threshold": 2}),
    );
    let server = start_gateway(&c).await;
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let t0 = Instant::now();
    let load = Load::start(gw, 4, Duration::from_millis(12), t0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(eps[1].checks() > 0, "the endpoint is being checked");
    let killed_at = t0.elapsed();
    eps[1].hang();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Out of rotation, and status.json says so (it is sampled once a second).
    let b = eps[1].addr.to_string();
    let status: Value = get(&h1_client(), admin, "/admin/status.json").await.json();
    let up = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "up")
        .unwrap()
        .clone();
    let endpoint = |u: &Value, a: &str| {
        u["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == a)
            .cloned()
            .unwrap()
    };
    let e = endpoint(&up, &b);
    assert_ne!(e["state"], "healthy", "{e}");
    assert!(
        e["reason"] == "health_check" || e["reason"] == "consecutive_failures",
        "{e}"
    );
    assert_eq!(endpoint(&up, &eps[0].addr.to_string())["state"], "healthy");

    // The process dies and a new one starts on the same port.
    let old = eps.remove(1);
    let addr = old.addr;
    old.kill().await;
    let back = Killable::start_on(addr).await;
    let recovered_at = Instant::now();
    let deadline = recovered_at + Duration::from_secs(5);
    while back.hits() == 0 {
        assert!(
            Instant::now() < deadline,
            "the recovered endpoint got no request within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back_in = recovered_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = load.stop().await;

    let second = killed_at + Duration::from_secs(1);
    let (first, failed_first) = count(&log, killed_at, second);
    let (after, failed_after) = count(&log, second, Duration::MAX);
    eprintln!(
        "first second: {failed_first}/{first} failed; after: {failed_after}/{after}; back in rotation {back_in:?} after restarting"
    );
    assert!(
        failed_after * 1000 <= after,
        "{failed_after} of {after} failed after the first second (at most 0.1%)"
    );
    assert!(
        after >= 300,
        "the load ran: {after} requests after the first second"
    );
    assert!(
        back.hits() > 20,
        "in rotation again: {} requests",
        back.hits()
    );

    let m = metrics(admin).await;
    let healthy = format!(r#"tidegate_endpoint_healthy{{upstream="up",endpoint="{b}"}}"#);
    // The gauge follows the check's verdict at once.
    assert_eq!(metric_value(&m, &healthy), Some(1.0), "{m}");
    let checks = format!(
        r#"tidegate_endpoint_ejections_total{{upstream="up",endpoint="{b}",reason="health_check"}}"#
    );
    assert_eq!(metric_value(&m, &checks), Some(1.0), "{m}");
    server.shutdown().await;
}

/// A client cannot eject endpoints: request bodies that grow past `max_body_bytes` while
/// streaming, and bodies trickled in slower than `request_timeout_ms` (504, though the
/// endpoint is fine), fail the exchange for the client's fault, which never counts against
/// the endpoint, even with ejection after a single failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_faults_never_eject() {
    // Upstreams that read the whole body before answering.
    let eps = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    let addrs: Vec<SocketAddr> = eps.iter().map(|e| e.addr).collect();
    let mut c = endpoints_config(
        &addrs,
        json!({"consecutive_failures": 1, "max_ejected_percent": 100}),
    );
    set(&mut c, "server/limits/max_body_bytes", json!(1024));
    let server = start_gateway(&c).await;
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();
    for _ in 0..9 {
        let req = http::Request::post(format!("http://{gw}/upload"))
            .body(streamed(256 * 1024))
            .unwrap();
        let status = send(&client, req).await.status;
        assert_eq!(status, 413);
    }
    // Three bodies that take a second each, against a 500 ms deadline, at once.
    let trickled = (0..3).map(|_| {
        let client = client.clone();
        async move {
            let pieces = futures_util::stream::unfold(0, |i| async move {
                (i < 4).then_some(())?;
                tokio::time::sleep(Duration::from_millis(250)).await;
                let piece = http_body::Frame::data(bytes::Bytes::from_static(b"x"));
                Some((Ok::<_, std::io::Error>(piece), i + 1))
            });
            let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(pieces));
            let req = http::Request::post(format!("http://{gw}/upload"))
                .body(body)
                .unwrap();
            send(&client, req).await.status
        }
    });
    for status in futures_util::future::join_all(trickled).await {
        assert_eq!(status, 504);
    }
    let m = metrics(admin).await;
    for ep in &eps {
        let a = ep.addr;
        let series = format!(
            r#"tidegate_endpoint_ejections_total{{upstream="up",endpoint="{a}",reason="consecutive_failures"}}"#
        );
        assert_eq!(metric_value(&m, &series), Some(0.0), "{m}");
    }
    server.shutdown().await;
}

/// Write `config` to `path` by rename (never half-written) and wait until it is applied
/// (by the file watcher or by the reload asked for here, whichever comes first).
async fn reload_to(server: &tidegate_tests::api::Server, path: &std::path::Path, config: &Value) {
    let reloader = server.reloader.as_ref().expect("started from a file");
    let before = reloader.status().generation;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    let outcome = reloader.reload("test", Instant::now()).await;
    assert!(
        matches!(
            outcome,
            tidegate_tests::api::ReloadOutcome::Applied
                | tidegate_tests::api::ReloadOutcome::Unchanged
        ),
        "{outcome:?}"
    );
    assert!(
        reloader.status().generation > before,
        "the edit was applied"
    );
}

/// A reload that rebuilds the upstream keeps an endpoint's ejection (the hung endpoint gets
/// no request after it), and leaves one health checker per upstream however many reloads
/// rebuilt it; a reload that removes the checks stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_endpoint_state_and_one_checker() {
    let eps = [
        Killable::start().await,
        Killable::start().await,
        Killable::start().await,
    ];
    let with = |timeout_ms: u64, checks: bool| {
        let mut c = three_endpoint_config(
            &[&eps[0], &eps[1], &eps[2]],
            json!({"consecutive_failures": 1, "base_ejection_ms": 60000,
                   "max_ejection_ms": 60000, "max_ejected_percent": 34}),
        );
        set(&mut c, "upstreams/up/request_timeout_ms", json!(timeout_ms));
        if checks {
            set(
                &mut c,
                "upstreams/up/health_check",
                json!({"path": "/healthz", "interval_ms": 100, "timeout_ms": 80}),
            );
        }
        c
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidegate.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&with(300, false)).unwrap()).unwrap();
    let server = tidegate_tests::api::start_from_file(&path).await.unwrap();
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();

    // Eject the hung endpoint: one failure is enough here.
    eps[1].hang();
    let mut failed = 0;
    for _ in 0..6 {
        failed += usize::from(get(&client, gw, "/work").await.status != 200);
    }
    assert_eq!(failed, 1, "one timeout, then the endpoint is out");

    // Rebuilt by an edit (another request timeout): still out.
    reload_to(&server, &path, &with(400, false)).await;
    for i in 0..30 {
        assert_eq!(get(&client, gw, "/work").await.status, 200, "request {i}");
    }
    let m = metrics(admin).await;
    let b = eps[1].addr;
    let series = format!(
        r#"tidegate_endpoint_ejections_total{{upstream="up",endpoint="{b}",reason="consecutive_failures"}}"#
    );
    assert_eq!(metric_value(&m, &series), Some(1.0), "{m}");

    // Checks on, then three rebuilds: one checker, about ten checks a second per endpoint.
    reload_to(&server, &path, &with(400, true)).await;
    for t in [500, 600, 700] {
        reload_to(&server, &path, &with(t, true)).await;
    }
    // Runtimes replaced just now may live on for a moment (the sampler holds the last
    // sampled one up to a second), and their checkers with them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = eps[0].checks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_s = eps[0].checks() - before;
    assert!(
        (5..=15).contains(&per_s),
        "{per_s} checks in a second at a 100 ms interval"
    );

    // Checks off: they stop.
    reload_to(&server, &path, &with(700, false)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = eps[0].checks();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(eps[0].checks(), before, "no checker left");

    // The hung endpoint leaves the config: its health series goes with it.
    let mut two = with(700, false);
    set(
        &mut two,
        "upstreams/up/endpoints",
        json!([eps[0].addr.to_string(), eps[2].addr.to_string()]),
    );
    reload_to(&server, &path, &two).await;
    let m = metrics(admin).await;
    let healthy =
        |a: SocketAddr| format!(r#"tidegate_endpoint_healthy{{upstream="up",endpoint="{a}"}}"#);
    assert_eq!(metric_value(&m, &healthy(b)), None, "{m}");
    assert_eq!(metric_value(&m, &healthy(eps[0].addr)), Some(1.0), "{m}");
    server.shutdown().await;
}
