//! Cluster-scope limits end to end: two in-process gateways sharing one real Redis.
//!
//! - A per-user 10/s limit with the load spread over both gateways admits, over ten
//!   seconds, within 5% of what one gateway with a local limit admits under the same load
//!   at the same time; an app-wide limit likewise.
//! - Redis killed mid-load: a `fail_open` rule keeps serving, a `fail_closed` rule answers
//!   503 `limit_store_unavailable` at once, no request waits longer than the store timeout
//!   (plus scheduling margin), and both recover when Redis returns on the same port,
//!   without restarting the gateway.
//!
//! Each test starts its own `redis-server` (see `tidegate_tests::redis`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use serde_json::{Value, json};
use tidegate_tests::api;
use tidegate_tests::redis::RedisServer;
use tidegate_tests::{Upstream, config_with_limits, full, h1_client, send, set};

/// Store timeout of the tests' `server.redis`, in milliseconds: long enough that a healthy
/// Redis never misses it on a busy two-core machine (at 50 ms, 28 of 570 calls timed out
/// there after recovery), short enough that a stalled one shows well within a test.
const TIMEOUT_MS: u64 = 100;

fn gateway_config(up: SocketAddr, redis: Option<&str>, limits: Value) -> Value {
    let mut c = config_with_limits(&[up], limits);
    if let Some(url) = redis {
        set(
            &mut c,
            "server/redis",
            json!({ "url": url, "timeout_ms": TIMEOUT_MS }),
        );
    }
    c
}

/// Counts of one load run.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    limited: AtomicU64,
    store_down: AtomicU64,
    other: AtomicU64,
    /// Slowest answer, in microseconds.
    max_us: AtomicU64,
}

/// `workers` closed-loop clients per gateway address, each sending `POST path` as `user`
/// (`None`: a random user per request) every `pause` until `run_for` has passed.
async fn load(
    gws: &[SocketAddr],
    workers: usize,
    path: &'static str,
    user: Option<&'static str>,
    pause: Duration,
    run_for: Duration,
    tally: Arc<Tally>,
) {
    let deadline = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for (g, &gw) in gws.iter().enumerate() {
        for w in 0..workers {
            let tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                let client = h1_client();
                // A fresh sequence of users per call, so no phase reuses another's leases.
                static RUNS: AtomicU64 = AtomicU64::new(1);
                let run = RUNS.fetch_add(1, Ordering::Relaxed);
                let mut n =
                    (g * 1_000_003 + w * 7919) as u64 ^ run.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                while Instant::now() < deadline {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let who = user.map_or_else(|| format!("u{}", n >> 40), str::to_owned);
                    let req = Request::post(format!("http://{gw}{path}"))
                        .header("x-app-id", "shop")
                        .header("x-user-id", who)
                        .body(full(Bytes::new()))
                        .unwrap();
                    let t0 = Instant::now();
                    let r = send(&client, req).await;
                    tally
                        .max_us
                        .fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                    let slot = match r.status.as_u16() {
                        200 => &tally.ok,
                        429 => &tally.limited,
                        503 if r.json()["error"] == "limit_store_unavailable" => &tally.store_down,
                        _ => &tally.other,
                    };
                    slot.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(pause).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Run the same load against one gateway with a local limit and, at the same time, spread
/// over two gateways sharing a cluster limit; returns (single, cluster) admitted counts.
async fn compare(
    limit: Value,
    path: &'static str,
    user: Option<&'static str>,
) -> Option<(u64, u64)> {
    let redis = RedisServer::start()?;
    let up = Upstream::start().await;
    let mut local = limit.clone();
    local["scope"] = json!("local");
    let mut shared = limit;
    shared["scope"] = json!("cluster");
    let single =
        tidegate_tests::start_gateway(&gateway_config(up.addr, None, json!([local]))).await;
    let c = gateway_config(up.addr, Some(&redis.url()), json!([shared]));
    let a = tidegate_tests::start_gateway(&c).await;
    let b = tidegate_tests::start_gateway(&c).await;

    let run_for = Duration::from_secs(10);
    // About 400 requests/s on each side: well over either limit, light enough for a
    // two-core machine running the other tests too.
    let pause = Duration::from_millis(10);
    let one = Arc::new(Tally::default());
    let two = Arc::new(Tally::default());
    let one_gw = [single.listen_addrs[0]];
    let two_gws = [a.listen_addrs[0], b.listen_addrs[0]];
    tokio::join!(
        load(&one_gw, 4, path, user, pause, run_for, one.clone()),
        load(&two_gws, 2, path, user, pause, run_for, two.clone()),
    );
    for t in [&one, &two] {
        assert_eq!(
            t.other.load(Ordering::Relaxed),
            0,
            "unexpected answers: {t:?}"
        );
        assert_eq!(
            t.store_down.load(Ordering::Relaxed),
            0,
            "store errors: {t:?}"
        );
        assert!(
            t.limited.load(Ordering::Relaxed) > 0,
            "the load never hit the limit: {t:?}"
        );
    }
    let (s, c) = (
        one.ok.load(Ordering::Relaxed),
        two.ok.load(Ordering::Relaxed),
    );
    eprintln!("single gateway (local): {one:?}\ntwo gateways (cluster): {two:?}");
    assert!(single.shutdown().await);
    assert!(a.shutdown().await);
    assert!(b.shutdown().await);
    Some((s, c))
}

/// A per-user 10/s (burst 10) cluster limit, one user's load spread over two gateways:
/// over ten seconds the two admit within 5% of what one gateway with a local limit admits
/// under the same load (about 10 + 100).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_per_user_limit_across_two_gateways() {
    let limit = json!({ "name": "per-user", "match": { "interfaces": ["grab"] },
                        "key": ["user"], "rate": "10/s", "burst": 10 });
    let Some((single, cluster)) = compare(limit, "/envelopes/7/grab", Some("alice")).await else {
        return;
    };
    eprintln!("per-user 10/s over 10 s: single {single}, cluster {cluster}");
    assert!(
        (100..=125).contains(&single),
        "single gateway admitted {single}"
    );
    let diff = single.abs_diff(cluster) as f64 / single as f64;
    assert!(
        diff <= 0.05,
        "cluster admitted {cluster}, single {single}: {:.1}% apart",
        diff * 100.0
    );
}

/// An app-wide 100/s (burst 100) cluster limit, the app's load spread over two gateways
/// (a new user per request): within 5% of one gateway's local limit over ten seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_app_limit_across_two_gateways() {
    let limit = json!({ "name": "per-app", "match": { "interfaces": ["grab"] },
                        "key": ["app"], "rate": "100/s", "burst": 100 });
    let Some((single, cluster)) = compare(limit, "/envelopes/7/grab", None).await else {
        return;
    };
    eprintln!("app-wide 100/s over 10 s: single {single}, cluster {cluster}");
    assert!(
        (1_000..=1_150).contains(&single),
        "single gateway admitted {single}"
    );
    let diff = single.abs_diff(cluster) as f64 / single as f64;
    assert!(
        diff <= 0.05,
        "cluster admitted {cluster}, single {single}: {:.1}% apart",
        diff * 100.0
    );
}

/// Redis hanging (SIGSTOP), then killed mid-load: the `fail_open` rule keeps admitting,
/// the `fail_closed` rule answers 503 `limit_store_unavailable`, no request waits past the
/// store timeout (plus margin), the errors are counted, and both rules count in Redis again
/// once it resumes or restarts on the same port, without a gateway restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fail_open_and_fail_closed_then_recover() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let up = Upstream::start().await;
    // A new user per request, so every check needs Redis (no lease to live on).
    let limits = json!([
        { "name": "open-rule", "match": { "interfaces": ["create"] }, "key": ["user"],
          "rate": "1000/s", "scope": "cluster", "on_store_error": "fail_open" },
        { "name": "closed-rule", "match": { "interfaces": ["grab"] }, "key": ["user"],
          "rate": "1000/s", "scope": "cluster", "on_store_error": "fail_closed" }
    ]);
    let gw =
        tidegate_tests::start_gateway(&gateway_config(up.addr, Some(&redis.url()), limits)).await;
    let addr = [gw.listen_addrs[0]];
    let phase = |path: &'static str, secs: f64| {
        let tally = Arc::new(Tally::default());
        let t = tally.clone();
        async move {
            load(
                &addr,
                4,
                path,
                None,
                Duration::from_millis(1),
                Duration::from_secs_f64(secs),
                t,
            )
            .await;
            tally
        }
    };

    // Redis up: everything admitted.
    let (o, c) = tokio::join!(phase("/envelopes", 1.0), phase("/envelopes/7/grab", 1.0));
    assert!(
        o.ok.load(Ordering::Relaxed) > 50 && o.ok.load(Ordering::Relaxed) == total(&o),
        "{o:?}"
    );
    assert!(
        c.ok.load(Ordering::Relaxed) > 50 && c.ok.load(Ordering::Relaxed) == total(&c),
        "{c:?}"
    );

    // Redis hanging (SIGSTOP): calls meet the store timeout instead of a refused
    // connection; after one timeout the store counts as down and requests stop waiting.
    redis.pause();
    let (o, c) = tokio::join!(phase("/envelopes", 1.0), phase("/envelopes/7/grab", 1.0));
    redis.resume();
    eprintln!("redis paused: fail_open {o:?}\nfail_closed {c:?}");
    assert_eq!(
        o.ok.load(Ordering::Relaxed),
        total(&o),
        "fail_open must admit: {o:?}"
    );
    assert_eq!(c.store_down.load(Ordering::Relaxed), total(&c), "{c:?}");
    let bound_us = (TIMEOUT_MS + 150) * 1000;
    for t in [&o, &c] {
        let max = t.max_us.load(Ordering::Relaxed);
        assert!(
            max <= bound_us,
            "a request waited {max} µs with Redis hanging"
        );
    }
    let back = wait_recovered(&phase).await;
    eprintln!("recovered {back:?} after Redis resumed");

    // Redis gone.
    redis.kill();
    let (o, c) = tokio::join!(phase("/envelopes", 1.5), phase("/envelopes/7/grab", 1.5));
    eprintln!("redis down: fail_open {o:?}\nfail_closed {c:?}");
    assert_eq!(
        o.ok.load(Ordering::Relaxed),
        total(&o),
        "fail_open must admit: {o:?}"
    );
    assert_eq!(
        c.store_down.load(Ordering::Relaxed),
        total(&c),
        "fail_closed must answer 503: {c:?}"
    );
    assert!(total(&c) > 100, "{c:?}");
    // The store timeout plus scheduling margin on a busy two-core machine.
    let bound_us = (TIMEOUT_MS + 150) * 1000;
    for t in [&o, &c] {
        let max = t.max_us.load(Ordering::Relaxed);
        assert!(max <= bound_us, "a request waited {max} µs with Redis down");
    }
    let client = h1_client();
    let metrics = tidegate_tests::get(&client, gw.admin_addr, "/metrics")
        .await
        .text();
    for rule in ["open-rule", "closed-rule"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "tidegate_limit_store_errors_total{{rule=\"{rule}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no store error counter for {rule}:\n{metrics}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1.0, "{line}");
    }

    // Redis back on the same port: recovery without restarting the gateway.
    redis.restart();
    let back = wait_recovered(&phase).await;
    eprintln!("recovered {back:?} after Redis restarted");
    let (o, c) = tokio::join!(phase("/envelopes", 1.0), phase("/envelopes/7/grab", 1.0));
    assert_eq!(o.ok.load(Ordering::Relaxed), total(&o), "{o:?}");
    assert_eq!(c.ok.load(Ordering::Relaxed), total(&c), "{c:?}");
    assert!(gw.shutdown().await);
}

/// Run short load phases on the fail-closed rule until every request is admitted again;
/// returns how long that took (at most 5 s).
async fn wait_recovered<F, Fut>(phase: &F) -> Duration
where
    F: Fn(&'static str, f64) -> Fut,
    Fut: std::future::Future<Output = Arc<Tally>>,
{
    let back = Instant::now();
    loop {
        let c = phase("/envelopes/7/grab", 0.1).await;
        if c.ok.load(Ordering::Relaxed) > 0 && c.ok.load(Ordering::Relaxed) == total(&c) {
            return back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "no recovery within 5 s: {c:?}"
        );
    }
}

fn total(t: &Tally) -> u64 {
    t.ok.load(Ordering::Relaxed)
        + t.limited.load(Ordering::Relaxed)
        + t.store_down.load(Ordering::Relaxed)
        + t.other.load(Ordering::Relaxed)
}

/// `scope: cluster` without `server.redis`, and a malformed Redis URL, are refused at
/// load time with their paths.
#[test]
fn cluster_scope_needs_server_redis() {
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let limit = json!([{ "name": "x", "key": ["user"], "rate": "5/s", "scope": "cluster" }]);
    let c = gateway_config(up, None, limit.clone());
    let Err(err) = api::load_rules("t.json", &serde_json::to_vec(&c).unwrap()) else {
        panic!("refused");
    };
    let err = err.to_string();
    assert!(
        err.contains("limits[0].scope") && err.contains("server.redis"),
        "{err}"
    );

    let mut c = gateway_config(up, Some("http://127.0.0.1:6379"), limit);
    set(&mut c, "server/redis/timeout_ms", json!(0));
    let Err(err) = api::load_rules("t.json", &serde_json::to_vec(&c).unwrap()) else {
        panic!("refused");
    };
    let err = err.to_string();
    assert!(err.contains("server.redis.url"), "{err}");
    assert!(err.contains("server.redis.timeout_ms"), "{err}");
}

/// The GCRA script in Redis: a fresh key grants its burst at once (a request for more gets
/// what is there), then nothing until one emission interval has passed, with the wait
/// reported; after the interval one more token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_script_grants_burst_then_one_per_interval() {
    use tidegate_tests::api::{ClusterStore, Grant};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let settings: api::RedisSettings =
        serde_json::from_value(json!({ "url": redis.url(), "timeout_ms": 1000 })).unwrap();
    let store = ClusterStore::connect(&settings).unwrap();
    // 10/s: a 100 ms interval, burst 5.
    let interval_us = 100_000.0;
    assert_eq!(
        store.take("k", interval_us, 5, 3).await,
        Ok(Grant::Tokens(3))
    );
    assert_eq!(
        store.take("k", interval_us, 5, 3).await,
        Ok(Grant::Tokens(2))
    );
    let Ok(Grant::Denied(wait)) = store.take("k", interval_us, 5, 1).await else {
        panic!("an empty bucket must refuse");
    };
    assert!(
        wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
        "{wait:?}"
    );
    tokio::time::sleep(wait + Duration::from_millis(5)).await;
    assert_eq!(
        store.take("k", interval_us, 5, 3).await,
        Ok(Grant::Tokens(1))
    );
    // Another key is independent.
    assert_eq!(
        store.take("other", interval_us, 5, 1).await,
        Ok(Grant::Tokens(1))
    );
}
