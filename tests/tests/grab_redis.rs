//! The grab backend on the Redis store, two nodes on one Redis: the hot-envelope race and
//! `kill -9` under load, with grabs for the same envelopes arriving through both nodes.
//!
//! Each test starts its own `redis-server` on a free loopback port (skipped, loudly, only
//! when the binary is missing on a developer machine; CI installs it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidegate_tests::grab::{
    Acked, Backend, Conn, InProcess, Race, Rng, assert_none, check_money, envelope_violations,
    load, race_violations, redis_config, verify, wait_settled,
};
use tidegate_tests::redis::RedisServer;

/// One envelope of 1,000 shares, 2,000 users plus 500 repeats over 64 connections split
/// across two backends on one Redis: exactly 1,000 first grabs win, no user twice, every
/// repeat answers the user's one share, and the shares (and the settled wallets) sum to
/// the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hot_envelope_race_through_two_backends() {
    const RACE: Race = Race::HOT;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = InProcess::start(redis_config(&redis.url())).await.unwrap();
    let b = InProcess::start(redis_config(&redis.url())).await.unwrap();
    let run = RACE
        .run(&[a.addr, b.addr], "GRAB_RACE_SEED", "grab_redis race")
        .await;
    assert_eq!(run.answers.len(), RACE.users + RACE.repeats);
    let (winners, bad) = race_violations(&RACE, &run.sent, &run.answers);
    assert_none("what clients saw", &bad);
    // Both nodes see the same envelope.
    for addr in [a.addr, b.addr] {
        let mut c = Conn::connect(addr).await.unwrap();
        let (status, page, grabs) = c.envelope_all(&run.id).await.unwrap();
        assert_eq!(status, 200);
        assert_none(
            &format!("the view of {addr}"),
            &envelope_violations(&RACE, &winners, &page, &grabs),
        );
    }
    let stats = wait_settled(b.addr, Duration::from_secs(20)).await.unwrap();
    assert_eq!(stats["wallet_cents"], RACE.total, "{stats}");
    eprintln!(
        "grab_redis race: {} requests through two backends in {:.2}s",
        run.answers.len(),
        run.elapsed.as_secs_f64()
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Two standalone backends on one Redis (append-only, fsync always); clients spread over
/// both; one node is `kill -9`ed at a random moment and restarted, 6 times. Every
/// acknowledged create and grab is there after each round, no user appears twice on an
/// envelope, every envelope conserves its money, and once settled the wallets plus what is
/// left equal all money put in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_one_of_two_backends_under_load() {
    const ROUNDS: usize = 6;
    const WORKERS: usize = 12;
    let Some(redis) = RedisServer::start_durable() else {
        return;
    };
    let started = Instant::now();
    let (mut rng, seed) = Rng::from_env_or_time("GRAB_CRASH_SEED");
    eprintln!("grab_redis crash seed {seed}");
    let url = redis.url();
    let args = ["--store", "redis", "--redis-url", url.as_str()];
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = [
        Backend::start(dir.path(), &args).await.unwrap(),
        Backend::start(dir.path(), &args).await.unwrap(),
    ];
    let acked = Arc::new(Mutex::new(Acked::default()));
    for round in 0..ROUNDS {
        verify(nodes[round % 2].addr, &acked, round).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..WORKERS {
            let (acked, stop, seed) = (acked.clone(), stop.clone(), rng.next_u64());
            let addr = nodes[w % 2].addr;
            workers.push(tokio::spawn(async move {
                load(addr, acked, stop, seed, w).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.range(50, 400))).await;
        let victim = rng.range(0, 2) as usize;
        nodes[victim].kill9();
        // The survivor keeps serving its clients for a moment before everyone stops.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("worker stuck")
                .unwrap();
        }
        assert!(
            acked.lock().unwrap().mismatches.is_empty(),
            "repeat grabs disagreed: {:?}",
            acked.lock().unwrap().mismatches
        );
        nodes[victim] = Backend::start(dir.path(), &args).await.unwrap();
    }
    verify(nodes[0].addr, &acked, ROUNDS).await;
    verify(nodes[1].addr, &acked, ROUNDS).await;
    // Let the one-second envelopes expire and be refunded, and settlement catch up.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    check_money(nodes[0].addr, nodes[1].addr).await;
    let a = acked.lock().unwrap();
    eprintln!(
        "grab_redis crash: {ROUNDS} rounds, {} envelopes and {} grabs acknowledged, {:.1}s",
        a.envelopes.len(),
        a.grabs.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(a.grabs.len() > 200, "too little load: {}", a.grabs.len());
}
