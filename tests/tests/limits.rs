//! Rate limits end to end: a per-user limit on `grab` (the sixth request in a second gets 429
//! with `Retry-After` and the `RateLimit` headers, another user is unaffected, and the
//! upstream never sees a rejected request); an app-wide limit holding its rate under three
//! times the load for ten seconds; a dry-run limit that only counts; a paced limit
//! (`max_delay_ms`) that holds what exceeds its rate instead of refusing it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tidegate_tests::{
    TIMEOUT, Upstream, config_with_limits, get, grab_as, h1_client, metric_value, start_gateway,
};

/// A per-user limit of 5/s on `grab`: alice's sixth request in a burst is refused with 429,
/// `Retry-After`, `RateLimit-Policy`, `RateLimit` and a body naming the rule; bob is not
/// affected; the upstream saw exactly the admitted requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_limit_on_grab() {
    let up = Upstream::start().await;
    let server = start_gateway(&config_with_limits(
        &[up.addr],
        json!([{ "name": "grab-per-user", "match": { "interfaces": ["grab"] },
                 "key": ["user"], "rate": "5/s", "burst": 5 }]),
    ))
    .await;
    let gw = server.listen_addrs[0];
    let client = h1_client();

    // Send until the first refusal. GCRA refills one request per 200 ms, so on a machine
    // slow enough to take longer than that over the burst, more may pass: allow exactly
    // that many, and no more.
    let t0 = Instant::now();
    let mut admitted = 0;
    let refusal = loop {
        let r = grab_as(&client, gw, "app", "alice").await;
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        admitted += 1;
        assert!(admitted <= 50, "never refused");
    };
    let refills = t0.elapsed().as_millis() / 200;
    assert!(
        admitted >= 5 && admitted <= 5 + refills as usize,
        "admitted {admitted} in {:?}",
        t0.elapsed()
    );
    let h = &refusal.headers;
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry, 1, "200 ms rounds up to one second");
    assert_eq!(h["ratelimit-policy"], "\"grab-per-user\";q=5;w=1");
    assert_eq!(h["ratelimit"], "\"grab-per-user\";r=0;t=1");
    let body = refusal.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["rule"], "grab-per-user");
    let wait = body["retry_after_ms"].as_u64().unwrap();
    assert!((1..=200).contains(&wait), "{wait}");

    // Bob has his own bucket.
    for _ in 0..5 {
        assert_eq!(grab_as(&client, gw, "app", "bob").await.status, 200);
    }
    // Other interfaces are not limited.
    for _ in 0..10 {
        assert_eq!(get(&client, gw, "/envelopes/7").await.status, 200);
    }
    assert_eq!(
        up.hits(),
        admitted + 5 + 10,
        "rejected requests never reached the upstream"
    );

    let metrics = get(&client, server.admin_addr, "/metrics").await.text();
    assert!(
        metrics.contains(
            "tidegate_limit_decisions_total{rule=\"grab-per-user\",outcome=\"limited\"} 1"
        ),
        "{metrics}"
    );
    assert!(server.shutdown().await);
}

/// An app-wide limit of 500/s (burst 20) under 3,000/s offered load for 10 s admits within
/// 2% of 5,000. The offered load only has to stay above twice the rate, which a generator
/// sharing a busy 2-core machine with the gateway still manages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_wide_limit_under_load() {
    let up = Upstream::start().await;
    let server = start_gateway(&config_with_limits(
        &[up.addr],
        json!([{ "name": "app-wide", "match": { "apps": ["douyin"] },
                 "key": ["app"], "rate": "500/s", "burst": 20 }]),
    ))
    .await;
    let gw = server.listen_addrs[0];
    let client = h1_client();

    // 30 workers, each one request every 10 ms (3,000/s), for 10 s. A worker that falls
    // behind skips ticks rather than bursting.
    let workers = 30;
    let run_for = Duration::from_secs(10);
    let sent = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let start_at = tokio::time::Instant::now() + Duration::from_millis(50);
    let deadline = start_at + run_for;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, sent, refused) = (client.clone(), sent.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                start_at + Duration::from_micros(333 * w),
                Duration::from_millis(10),
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                let at = tick.tick().await;
                if at >= deadline {
                    break;
                }
                let r = grab_as(&client, gw, "douyin", &format!("u{w}")).await;
                sent.fetch_add(1, Ordering::Relaxed);
                match r.status.as_u16() {
                    200 => {}
                    429 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    s => panic!("unexpected status {s}"),
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(run_for + TIMEOUT, t)
            .await
            .expect("load finishes")
            .unwrap();
    }
    let (sent, refused, hits) = (
        sent.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        up.hits(),
    );
    eprintln!("offered {sent} in 10 s, admitted {hits}, refused {refused}");
    assert!(sent >= 10_000, "the load generator kept up: {sent}");
    assert_eq!(hits + refused, sent, "every refusal stayed at the gateway");
    assert!(
        hits.abs_diff(5_000) <= 100,
        "admitted {hits}, not within 2% of 5,000"
    );
    assert!(server.shutdown().await);
}

/// A dry-run limit lets everything through but counts what it would have refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_counts_only() {
    let up = Upstream::start().await;
    let server = start_gateway(&config_with_limits(
        &[up.addr],
        json!([{ "name": "trial", "match": { "interfaces": ["grab"] },
                 "key": ["user"], "rate": "1/min", "burst": 2, "mode": "dry_run" }]),
    ))
    .await;
    let gw = server.listen_addrs[0];
    let client = h1_client();
    for _ in 0..10 {
        assert_eq!(grab_as(&client, gw, "app", "carol").await.status, 200);
    }
    assert_eq!(up.hits(), 10);
    let metrics = get(&client, server.admin_addr, "/metrics").await.text();
    for want in [
        "tidegate_limit_decisions_total{rule=\"trial\",outcome=\"allowed\"} 2",
        "tidegate_limit_decisions_total{rule=\"trial\",outcome=\"dry_run_limited\"} 8",
    ] {
        assert!(metrics.contains(want), "{want}\n{metrics}");
    }
    assert!(server.shutdown().await);
}

/// A paced app-wide limit of 20/s (burst 1, `max_delay_ms: 1000`). Six clients that would
/// send 60/s together for 5 s: the upstream gets the limit's rate (within 10% of 20/s over
/// the measured run), and nobody gets a 429, since six waiting at once wait at most 300 ms.
/// Then 40 requests at once from another app: the first is admitted, the next 20 get turns
/// 50 ms apart (up to 1000 ms), and only the excess gets the 429, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_limit_holds_the_excess_instead_of_refusing() {
    const RATE: f64 = 20.0;
    let up = Upstream::start().await;
    let server = start_gateway(&config_with_limits(
        &[up.addr],
        json!([{ "name": "paced", "match": { "interfaces": ["grab"] }, "key": ["app"],
                 "rate": "20/s", "burst": 1, "max_delay_ms": 1000 }]),
    ))
    .await;
    let gw = server.listen_addrs[0];
    let client = h1_client();

    // Six clients, each ticking every 100 ms (60/s together); a client held for its turn
    // skips the ticks it missed.
    let run_for = Duration::from_secs(5);
    let refused = Arc::new(AtomicUsize::new(0));
    let t0 = tokio::time::Instant::now();
    let deadline = t0 + run_for;
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let (client, refused) = (client.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                t0 + Duration::from_millis(17 * w),
                Duration::from_millis(100),
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut sent = 0;
            while tick.tick().await < deadline {
                let r = grab_as(&client, gw, "flash", &format!("u{w}")).await;
                sent += 1;
                match r.status.as_u16() {
                    200 => {}
                    429 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    s => panic!("unexpected status {s}"),
                }
            }
            sent
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += tokio::time::timeout(run_for + TIMEOUT, t)
            .await
            .expect("load finishes")
            .unwrap();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let hits = up.hits();
    let expected = 1.0 + RATE * elapsed;
    eprintln!("sent {sent} in {elapsed:.2} s, upstream saw {hits} (expected {expected:.0})");
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "no 429 within max_delay_ms"
    );
    assert_eq!(hits, sent);
    assert!(
        (hits as f64 - expected).abs() <= 0.1 * expected,
        "upstream saw {hits} in {elapsed:.2} s, not within 10% of {expected:.0}"
    );

    // A burst beyond what max_delay allows, from an app whose bucket is fresh.
    let before = up.hits();
    let burst_at = Instant::now();
    let answers: Vec<(u16, Duration)> = futures_util::future::join_all((0..40).map(|i| {
        let client = client.clone();
        async move {
            let r = grab_as(&client, gw, "burst", &format!("b{i}")).await;
            (r.status.as_u16(), burst_at.elapsed())
        }
    }))
    .await;
    let admitted: Vec<Duration> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, t)| *t)
        .collect();
    let refusals: Vec<Duration> = answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(admitted.len() + refusals.len(), 40, "{answers:?}");
    // Requests decided later find the queue's tail moved on by the time passed: one more
    // turn per 50 ms between the first decision and the last refusal.
    let spread = refusals.iter().max().copied().unwrap_or_default();
    let slack = (spread.as_millis() / 50) as usize + 1;
    assert!(
        admitted.len() >= 21 && admitted.len() <= 21 + slack,
        "admitted {} (spread {spread:?}): {answers:?}",
        admitted.len()
    );
    assert_eq!(
        up.hits() - before,
        admitted.len(),
        "429s never reached the upstream"
    );
    let slowest = admitted.iter().max().unwrap();
    assert!(
        spread < *slowest,
        "refusals came at once ({spread:?}), before the last turn ({slowest:?})"
    );
    assert!(
        *slowest >= Duration::from_millis(900)
            && *slowest < Duration::from_millis(1000) + spread * 2 + Duration::from_millis(500),
        "the last turn is about max_delay_ms away: {slowest:?}"
    );

    let metrics = get(&client, server.admin_addr, "/metrics").await.text();
    let paced = metric_value(
        &metrics,
        "tidegate_limit_decisions_total{rule=\"paced\",outcome=\"paced\"}",
    )
    .unwrap_or(0.0);
    assert!(paced >= 20.0, "{metrics}");
    let waits = metric_value(
        &metrics,
        "tidegate_limit_pace_delay_seconds_count{rule=\"paced\"}",
    );
    assert_eq!(waits, Some(paced), "{metrics}");
    assert!(server.shutdown().await);
}
