//! The grab backend on the Redis store, two nodes on one Redis: the hot-envelope race and
//! `kill -9` under load, with grabs for the same envelopes arriving through both nodes.
//!
//! Each test starts its own `redis-server` on a free loopback port (skipped, loudly, only
//! when the binary is missing on a developer machine; CI installs it).

mod grab_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grab_backend::{Config, RedisStoreConfig, StoreKind};
use grab_support::{
    Acked, Backend, Conn, InProcess, Rng, SENDERS, USERS, load, verify, wait_settled,
};
use serde_json::json;
use tidegate_tests::redis::RedisServer;

fn redis_config(url: &str) -> Config {
    Config {
        store: StoreKind::Redis(RedisStoreConfig::new(url)),
        // Unused by the Redis store; a path that must not be created proves it.
        data_dir: "/nonexistent/grab-redis".into(),
        ..Config::default()
    }
}

/// One envelope of 1,000 shares, 2,000 users plus 500 repeats over 64 connections split
/// across two backends on one Redis: exactly 1,000 first grabs win, no user twice, every
/// repeat answers the user's one share, and the shares (and the settled wallets) sum to
/// the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hot_envelope_race_through_two_backends() {
    const USERS_N: usize = 2_000;
    const REPEATS: usize = 500;
    const CONNECTIONS: usize = 64;
    const COUNT: u64 = 1_000;
    const TOTAL: u64 = 1_000_000;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = InProcess::start(redis_config(&redis.url())).await.unwrap();
    let b = InProcess::start(redis_config(&redis.url())).await.unwrap();
    let mut c = Conn::connect(a.addr).await.unwrap();
    let (status, env) = c
        .create(
            json!({"sender": "boss", "total_cents": TOTAL, "count": COUNT, "expires_in_s": 600}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{env}");
    let id = env["id"].as_str().unwrap().to_owned();

    let (mut rng, seed) = Rng::from_env_or_time("GRAB_RACE_SEED");
    eprintln!("grab_redis race seed {seed}");
    let mut ops: Vec<String> = (0..USERS_N).map(|u| format!("user-{u}")).collect();
    for _ in 0..REPEATS {
        let u = rng.range(0, USERS_N as u64);
        ops.push(format!("user-{u}"));
    }
    for i in (1..ops.len()).rev() {
        let j = rng.range(0, i as u64 + 1) as usize;
        ops.swap(i, j);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..CONNECTIONS {
        let mine: Vec<String> = ops.iter().skip(k).step_by(CONNECTIONS).cloned().collect();
        let addr = if k % 2 == 0 { a.addr } else { b.addr };
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await.unwrap();
            let mut out = Vec::new();
            for user in mine {
                let (status, body) = conn.grab(&id, &user).await.unwrap();
                out.push((user, status, body));
            }
            out
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();

    let mut first: HashMap<String, u64> = HashMap::new();
    let mut amounts: HashMap<String, Vec<u64>> = HashMap::new();
    let mut empty = 0;
    for (user, status, body) in &answers {
        match status {
            200 => {
                let amount = body["amount_cents"].as_u64().unwrap();
                assert!(amount >= 1);
                amounts.entry(user.clone()).or_default().push(amount);
                if body["repeat"] == false {
                    assert!(
                        first.insert(user.clone(), amount).is_none(),
                        "{user} won twice"
                    );
                }
            }
            410 => {
                assert_eq!(body["error"], "empty");
                empty += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(first.len() as u64, COUNT, "successful first grabs");
    assert_eq!(
        first.values().sum::<u64>(),
        TOTAL,
        "shares sum to the total"
    );
    for (user, seen) in &amounts {
        assert!(first.contains_key(user), "{user} got only repeats");
        assert!(
            seen.iter().all(|x| *x == first[user]),
            "{user} saw different amounts: {seen:?}"
        );
    }
    for (user, status, _) in &answers {
        if *status == 410 {
            assert!(!first.contains_key(user), "{user} got a share and 'empty'");
        }
    }
    assert_eq!(
        empty + amounts.values().map(Vec::len).sum::<usize>(),
        USERS_N + REPEATS
    );
    // Both nodes see the same envelope.
    for addr in [a.addr, b.addr] {
        let mut c = Conn::connect(addr).await.unwrap();
        let (status, page, grabs) = c.envelope_all(&id).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(page["remaining_count"], 0);
        assert_eq!(page["remaining_cents"], 0);
        assert_eq!(grabs.len() as u64, COUNT);
        for g in &grabs {
            assert_eq!(
                Some(&g["amount_cents"].as_u64().unwrap()),
                first.get(g["user"].as_str().unwrap())
            );
        }
    }
    let stats = wait_settled(b.addr, Duration::from_secs(20)).await.unwrap();
    assert_eq!(stats["wallet_cents"], TOTAL, "{stats}");
    eprintln!(
        "grab_redis race: {} requests through two backends in {:.2}s",
        answers.len(),
        elapsed.as_secs_f64()
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
            let (acked, stop, seed) = (acked.clone(), stop.clone(), rng.next());
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
    let stats = wait_settled(nodes[0].addr, Duration::from_secs(20))
        .await
        .unwrap();
    let created = stats["created_cents"].as_u64().unwrap();
    let remaining = stats["remaining_cents"].as_u64().unwrap();
    let wallets = stats["wallet_cents"].as_u64().unwrap();
    assert_eq!(wallets + remaining, created, "money not conserved: {stats}");
    let mut c = Conn::connect(nodes[1].addr).await.unwrap();
    let mut sum = 0;
    for u in (0..USERS)
        .map(|i| format!("u{i}"))
        .chain((0..SENDERS).map(|i| format!("s{i}")))
    {
        let (status, w) = c.get(&format!("/users/{u}/wallet")).await.unwrap();
        assert_eq!(status, 200);
        sum += w["balance_cents"].as_u64().unwrap();
    }
    assert_eq!(sum, wallets, "per-user wallets do not add up to the total");
    let a = acked.lock().unwrap();
    eprintln!(
        "grab_redis crash: {ROUNDS} rounds, {} envelopes and {} grabs acknowledged, {:.1}s",
        a.envelopes.len(),
        a.grabs.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(a.grabs.len() > 200, "too little load: {}", a.grabs.len());
}
