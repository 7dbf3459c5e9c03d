//! Guarded canary ramps end to end: a healthy canary ramps to 100% step by step; one that
//! starts failing is rolled back within a judging window and gets no request afterwards;
//! the step survives an unchanged reload and a restart (from the state file under the data
//! directory), and an edit starts the ramp again.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidegate_tests::api;
use tidegate_tests::{
    Client, Switchable, TIMEOUT, Upstream, config, get, h1_client, metric_value, post_as, set,
};

/// Length of a judging window in these tests.
const WINDOW_MS: u64 = 1000;
/// How long each step holds.
const HOLD_MS: u64 = 1500;

/// `grab` split between `v2` (ramped from 0%) and `v1`; other requests go to `v1`.
fn ramped(v1: SocketAddr, v2: SocketAddr, steps: &[&str]) -> Value {
    let mut c = config(&[v1]);
    c["upstreams"] = json!({
        "v1": { "endpoints": [v1.to_string()] },
        "v2": { "endpoints": [v2.to_string()] }
    });
    set(
        &mut c,
        "routes",
        json!([
            { "name": "default", "upstream": "v1" },
            { "name": "grab-canary", "match": { "interfaces": ["grab"] },
              "split": [ { "upstream": "v2", "weight": "0%" }, { "upstream": "v1", "weight": "rest" } ],
              "ramp": { "target": "v2", "release": "v2.0.1", "steps": steps, "hold_ms": HOLD_MS,
                        "guard": { "window_ms": WINDOW_MS, "min_requests": 5,
                                   "max_error_ratio_diff": "1%", "max_p99_ratio": 3.0,
                                   "p99_margin_ms": 50 } } }
        ]),
    );
    c
}

fn write(path: &Path, c: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(c).unwrap()).unwrap();
}

/// Grab requests as ever-new users from `tasks` tasks, each pausing `pause` between
/// requests, until `stop`; returns the count of answers by status class (2xx, 5xx, other).
struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 3]>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gw: SocketAddr, tasks: usize, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let next = Arc::new(AtomicU64::new(0));
        let tasks = (0..tasks)
            .map(|_| {
                let (stop, counts, next) = (stop.clone(), counts.clone(), next.clone());
                tokio::spawn(async move {
                    let client = h1_client();
                    while !stop.load(Ordering::Relaxed) {
                        let u = next.fetch_add(1, Ordering::Relaxed);
                        let r = post_as(&client, gw, "/envelopes/7/grab", "app", &format!("u{u}"))
                            .await;
                        let class = match r.status.as_u16() {
                            200..=299 => 0,
                            500..=599 => 1,
                            _ => 2,
                        };
                        counts[class].fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            counts,
            tasks,
        }
    }

    fn counts(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }

    async fn stop(self) -> [u64; 3] {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

/// The ramp of `grab-canary` as the admin port shows it.
async fn ramp_status(client: &Client, admin: SocketAddr) -> Value {
    let s = get(client, admin, "/admin/status.json").await.json();
    s["ramps"][0].clone()
}

/// The weight (ppm) of `v2` in the live runtime's split, as `/admin/explain` routes.
async fn live_ppm(client: &Client, admin: SocketAddr) -> u64 {
    let e = get(
        client,
        admin,
        "/admin/explain?method=POST&path=/envelopes/7/grab&user=probe",
    )
    .await
    .json();
    e["decision"]["split"][0]["ppm"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// A ramp's changes of (step, phase) as the test saw them, each with the verdict that came
/// with it.
#[derive(Default)]
struct Timeline {
    lines: Vec<String>,
    /// When each change happened, by the gateway's clock (`since_ms`, Unix ms).
    since: Vec<u64>,
    last: (Value, Value),
}

/// Poll the ramp until `done` says so, adding each change of (step, phase) to `timeline`.
async fn follow(
    client: &Client,
    admin: SocketAddr,
    timeline: &mut Timeline,
    limit: Duration,
    mut done: impl FnMut(&Value) -> bool,
) {
    let Timeline {
        lines: timeline,
        since,
        last,
    } = timeline;
    let deadline = Instant::now() + limit;
    loop {
        let r = ramp_status(client, admin).await;
        let now = (r["step"].clone(), r["phase"].clone());
        if now != *last {
            let v = &r["verdict"];
            let at = r["since_ms"].as_u64().unwrap_or(0);
            since.push(at);
            timeline.push(format!(
                "{:>6} ms  step {} {:>4} {:<11}  target {}/{} errors p99 {} ms, baseline {}/{} errors p99 {} ms: {}",
                at.saturating_sub(since[0]),
                r["step"],
                r["weight"].as_str().unwrap_or("?"),
                r["phase"].as_str().unwrap_or("?"),
                v["target"]["errors"],
                v["target"]["requests"],
                v["target"]["p99_ms"],
                v["baseline"]["errors"],
                v["baseline"]["requests"],
                v["baseline"]["p99_ms"],
                v["outcome"].as_str().unwrap_or("-"),
            ));
            *last = now;
        }
        if done(&r) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not done within {limit:?}: {r}\n{}",
            timeline.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A healthy canary ramps through every step to 100%, each step after its hold, and then
/// takes every grab request. State, metrics and `explain` show where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_canary_ramps_to_100_percent() {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidegate.json");
    write(&path, &ramped(v1.addr, v2.addr, &["10%", "40%", "100%"]));
    let server = api::start_from_file(&path).await.expect("starts");
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();
    assert_eq!(
        live_ppm(&client, admin).await,
        100_000,
        "the first step at once"
    );

    let load = Load::start(gw, 4, Duration::from_millis(4));
    let mut t = Timeline::default();
    follow(&client, admin, &mut t, TIMEOUT * 2, |r| {
        r["phase"] == "done"
    })
    .await;
    let (timeline, since) = (t.lines, t.since);
    eprintln!("ramp timeline:\n{}", timeline.join("\n"));
    let counts = load.stop().await;
    assert_eq!(counts[1] + counts[2], 0, "nothing failed: {counts:?}");
    let steps: Vec<&str> = timeline
        .iter()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert_eq!(steps, ["10%", "40%", "100%", "100%"], "{timeline:#?}");
    // Each step held at least its hold, by the gateway's clock.
    for w in since.windows(2) {
        assert!(
            w[1] - w[0] >= HOLD_MS,
            "a step held less than its hold: {timeline:#?}"
        );
    }

    let r = ramp_status(&client, admin).await;
    assert_eq!(
        (&r["weight_ppm"], &r["step"], &r["release"]),
        (&json!(1_000_000), &json!(3), &json!("v2.0.1")),
        "{r}"
    );
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .starts_with("last step 3 of 3 (100%) held "),
        "{r}"
    );
    assert_eq!(live_ppm(&client, admin).await, 1_000_000);
    let before = (v1.hits(), v2.hits());
    for u in 0..50 {
        let r = post_as(&client, gw, "/envelopes/7/grab", "app", &format!("late{u}")).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        (v1.hits(), v2.hits()),
        (before.0, before.1 + 50),
        "all to v2"
    );

    let e = get(
        &client,
        admin,
        "/admin/explain?method=POST&path=/envelopes/7/grab&user=u1",
    )
    .await
    .json();
    assert_eq!(e["ramp"]["phase"], "done", "{e}");
    let metrics = get(&client, admin, "/metrics").await.text();
    let m = |s: &str| metric_value(&metrics, s);
    assert_eq!(
        m("tidegate_ramp_weight_ppm{route=\"grab-canary\",target=\"v2\"}"),
        Some(1e6)
    );
    assert_eq!(m("tidegate_ramp_step{route=\"grab-canary\"}"), Some(3.0));
    assert_eq!(
        m("tidegate_ramp_transitions_total{route=\"grab-canary\",to=\"advanced\"}"),
        Some(2.0)
    );
    assert_eq!(
        m("tidegate_ramp_transitions_total{route=\"grab-canary\",to=\"completed\"}"),
        Some(1.0)
    );
    assert!(m("tidegate_ramp_verdicts_total{route=\"grab-canary\",outcome=\"pass\"}") >= Some(3.0));
    assert!(server.shutdown().await);
}

/// A canary that starts answering 500 at its second step is rolled back within one
/// judging window (plus the time to notice), and no request reaches it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_canary_is_rolled_back_within_a_window() {
    // Scheduling slack on a loaded 2-core machine: the sampler's tick, the rebuild, and
    // the poll that observes it.
    const MARGIN_MS: u64 = 900;
    let (v1, v2) = (Upstream::start().await, Switchable::start().await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidegate.json");
    write(
        &path,
        &ramped(v1.addr, v2.addr, &["10%", "40%", "70%", "100%"]),
    );
    let server = api::start_from_file(&path).await.expect("starts");
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();
    let load = Load::start(gw, 4, Duration::from_millis(4));

    let mut t = Timeline::default();
    follow(&client, admin, &mut t, TIMEOUT, |r| r["step"] == 2).await;
    v2.failing.store(true, Ordering::SeqCst);
    let failing_at = Instant::now();
    follow(&client, admin, &mut t, TIMEOUT, |r| {
        r["phase"] == "rolled_back"
    })
    .await;
    let timeline = t.lines;
    // The runtime routes by the new weight once the rebuild is stored.
    let deadline = Instant::now() + TIMEOUT;
    while live_ppm(&client, admin).await != 0 {
        assert!(Instant::now() < deadline, "the rollback was not applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = failing_at.elapsed();
    eprintln!("ramp timeline:\n{}", timeline.join("\n"));
    eprintln!("rolled back {took:?} after the canary started failing");
    assert!(
        took <= Duration::from_millis(WINDOW_MS + MARGIN_MS),
        "rolled back after {took:?}\n{}",
        timeline.join("\n")
    );
    // Requests routed just before the swap may still be on their way.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (hits, counts) = (v2.hits(), load.counts());
    tokio::time::sleep(Duration::from_millis(2 * WINDOW_MS)).await;
    let after = load.stop().await;
    assert_eq!(v2.hits(), hits, "a request reached the rolled-back canary");
    assert!(after[0] > counts[0] + 100, "the load went on: {after:?}");
    assert_eq!(after[1], counts[1], "no 500 after the rollback");

    let r = ramp_status(&client, admin).await;
    assert_eq!(
        (&r["weight_ppm"], &r["step"]),
        (&json!(0), &json!(2)),
        "{r}"
    );
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("guard breached at step 2 of 4 (40%): error ratio "),
        "{reason}"
    );
    assert_eq!(r["verdict"]["outcome"], "breach", "{r}");
    let metrics = get(&client, admin, "/metrics").await.text();
    assert_eq!(
        metric_value(
            &metrics,
            "tidegate_ramp_transitions_total{route=\"grab-canary\",to=\"rolled_back\"}"
        ),
        Some(1.0)
    );
    // Rolled back is for good: the canary recovering changes nothing.
    v2.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(HOLD_MS + WINDOW_MS)).await;
    assert_eq!(ramp_status(&client, admin).await["phase"], "rolled_back");
    assert!(server.shutdown().await);
}

/// The step survives a reload that leaves the ramp as written and a restart (from the
/// state file under the data directory); a corrupt state file or an edited ramp start
/// again from the first step, never further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_survives_reload_and_restart() {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidegate.json");
    let mut c = ramped(v1.addr, v2.addr, &["10%", "20%", "40%", "80%"]);
    write(&path, &c);
    let server = api::start_from_file(&path).await.expect("starts");
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();
    let load = Load::start(gw, 4, Duration::from_millis(4));
    let mut t = Timeline::default();
    follow(&client, admin, &mut t, TIMEOUT, |r| r["step"] == 2).await;

    // An edit elsewhere: the ramp keeps its step.
    c["routes"][0]["name"] = json!("fallthrough");
    write(&path, &c);
    let deadline = Instant::now() + TIMEOUT;
    while get(&client, admin, "/admin/config").await.json()["generation"] != 2 {
        assert!(Instant::now() < deadline, "the edit was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = ramp_status(&client, admin).await;
    assert!(r["step"].as_u64().unwrap() >= 2, "{r}");
    follow(&client, admin, &mut t, TIMEOUT, |r| r["step"] == 3).await;
    load.stop().await;
    assert!(server.shutdown().await);

    let state = dir.path().join("data/tidegate/ramps.json");
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let step = saved["ramps"]["grab-canary"]["step"].as_u64().unwrap();
    assert!(step >= 2, "{saved}");

    // Restart: resumed at the recorded step, at once (before any window is judged).
    let server = api::start_from_file(&path).await.expect("restarts");
    let admin = server.admin_addr;
    let r = ramp_status(&client, admin).await;
    assert_eq!(r["step"], json!(step + 1), "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .starts_with("resumed from the state file: step "),
        "{r}"
    );
    let weights = [100_000, 200_000, 400_000, 800_000];
    assert_eq!(live_ppm(&client, admin).await, weights[step as usize]);
    assert!(server.shutdown().await);

    // A corrupt state file: the first step, not the recorded one.
    std::fs::write(&state, b"{\"ramps\": {\"grab-canary\": {\"step\": ").unwrap();
    let server = api::start_from_file(&path)
        .await
        .expect("starts on a corrupt state");
    assert_eq!(ramp_status(&client, server.admin_addr).await["step"], 1);
    assert_eq!(live_ppm(&client, server.admin_addr).await, 100_000);
    assert!(server.shutdown().await);

    // An edited ramp (another release) starts again.
    std::fs::write(&state, saved.to_string()).unwrap();
    c["routes"][1]["ramp"]["release"] = json!("v2.0.2");
    write(&path, &c);
    let server = api::start_from_file(&path).await.expect("starts");
    let r = ramp_status(&client, server.admin_addr).await;
    assert_eq!(r["step"], 1, "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .starts_with("edited since its state was recorded"),
        "{r}"
    );
    assert!(server.shutdown().await);
}
