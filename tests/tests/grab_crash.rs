//! `kill -9` under load: the standalone grab backend, killed at a random
//! moment while clients create and grab concurrently, restarted, 22 times.
//! After every restart each acknowledged create and grab is present with the
//! same amount, every envelope conserves its money, and no user appears
//! twice. At the end settlement catches up and wallets + remaining money
//! equals all money ever put in.
//!
//! Replay a run with `GRAB_CRASH_SEED=<seed>` (printed at the start).

mod grab_support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grab_support::{Backend, Conn, Rng, wait_settled};
use serde_json::json;

const ROUNDS: usize = 22;
const WORKERS: usize = 12;
const USERS: u64 = 200;
const SENDERS: u64 = 8;

/// What clients saw acknowledged, across all rounds.
#[derive(Default)]
struct Acked {
    /// id → (total_cents, count); numeric ids, so the last keys are the newest
    envelopes: BTreeMap<u64, (u64, u64)>,
    /// (envelope id, user) → amount
    grabs: HashMap<(String, String), u64>,
    /// Amounts a client saw for a grab that disagreed with an earlier ack.
    mismatches: Vec<String>,
}

/// Every acknowledged create and grab survives 22 kill -9 / restart rounds
/// under concurrent load, and money is conserved once settlement catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_loses_no_acknowledged_write() {
    let started = Instant::now();
    let (mut rng, seed) = Rng::from_env_or_time("GRAB_CRASH_SEED");
    eprintln!("grab_crash seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut kills_mid_load = 0;

    for round in 0..ROUNDS {
        let mut backend = Backend::start(dir.path(), &["--fsync", "always"])
            .await
            .unwrap();
        verify(backend.addr, &acked, round).await;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..WORKERS {
            let acked = acked.clone();
            let stop = stop.clone();
            let seed = rng.next();
            let addr = backend.addr;
            workers.push(tokio::spawn(async move {
                load(addr, acked, stop, seed, w).await
            }));
        }
        // Kill at a random moment: sometimes right away, mostly mid-stream.
        let delay = rng.range(30, 350);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        backend.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut done = 0;
        for w in workers {
            done += tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("worker stuck")
                .unwrap();
        }
        if done > 0 {
            kills_mid_load += 1;
        }
        let a = acked.lock().unwrap();
        assert!(
            a.mismatches.is_empty(),
            "repeat grabs disagreed: {:?}",
            a.mismatches
        );
    }

    // Final restart: verify, let expiries refund and settlement catch up, and
    // check conservation over every wallet the clients could have touched.
    let mut backend = Backend::start(dir.path(), &["--fsync", "always"])
        .await
        .unwrap();
    verify(backend.addr, &acked, ROUNDS).await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let stats = wait_settled(backend.addr, Duration::from_secs(20))
        .await
        .unwrap();
    let created = stats["created_cents"].as_u64().unwrap();
    let remaining = stats["remaining_cents"].as_u64().unwrap();
    let wallets = stats["wallet_cents"].as_u64().unwrap();
    assert_eq!(wallets + remaining, created, "money not conserved: {stats}");
    let acked_total: u64 = acked.lock().unwrap().envelopes.values().map(|e| e.0).sum();
    assert!(
        created >= acked_total,
        "acknowledged creates missing: {created} < {acked_total}"
    );
    let mut c = Conn::connect(backend.addr).await.unwrap();
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
    let exit = backend.terminate().unwrap();
    assert!(exit.success(), "SIGTERM exit: {exit}");

    let a = acked.lock().unwrap();
    eprintln!(
        "grab_crash: {ROUNDS} rounds ({kills_mid_load} with load in flight), {} envelopes and {} grabs acknowledged, {:.1}s",
        a.envelopes.len(),
        a.grabs.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        a.grabs.len() > 200,
        "too little load to mean anything: {}",
        a.grabs.len()
    );
}

/// One client: creates (10%) and grabs (90%) until the server dies or `stop`.
/// Returns 1 if it was still running when the server died.
async fn load(
    addr: std::net::SocketAddr,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
    worker: usize,
) -> usize {
    let mut rng = Rng::new(seed);
    let Ok(mut conn) = Conn::connect(addr).await else {
        return 0;
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let pick = {
            let a = acked.lock().unwrap();
            if a.envelopes.is_empty() || rng.range(0, 10) == 0 {
                None
            } else {
                // Prefer recent envelopes so they fill up and go empty.
                let n = a.envelopes.len() as u64;
                let i = n - 1 - rng.range(0, n.min(12));
                a.envelopes.keys().nth(i as usize).map(u64::to_string)
            }
        };
        match pick {
            None => {
                let count = rng.range(3, 40);
                let total = count * rng.range(1, 300);
                // A fifth expire in a second, so refunds race the crashes too.
                let expires = if rng.range(0, 5) == 0 { 1 } else { 3_600 };
                let sender = format!("s{}", rng.range(0, SENDERS));
                let body = json!({"sender": sender, "total_cents": total, "count": count, "expires_in_s": expires});
                match conn.create(body).await {
                    Ok((201, v)) => {
                        let id: u64 = v["id"].as_str().unwrap().parse().unwrap();
                        acked.lock().unwrap().envelopes.insert(id, (total, count));
                    }
                    Ok((status, v)) => panic!("worker {worker}: create answered {status} {v}"),
                    Err(_) => return 1,
                }
            }
            Some(id) => {
                let user = format!("u{}", rng.range(0, USERS));
                match conn.grab(&id, &user).await {
                    Ok((200, v)) => {
                        let amount = v["amount_cents"].as_u64().unwrap();
                        let mut a = acked.lock().unwrap();
                        let prev = *a.grabs.entry((id.clone(), user.clone())).or_insert(amount);
                        if prev != amount {
                            a.mismatches
                                .push(format!("{id}/{user}: {prev} then {amount}"));
                        }
                    }
                    Ok((410, _)) => {}
                    Ok((status, v)) => panic!("worker {worker}: grab answered {status} {v}"),
                    Err(_) => return 1,
                }
            }
        }
    }
    0
}

/// Check the recovered server against everything acknowledged so far.
async fn verify(addr: std::net::SocketAddr, acked: &Mutex<Acked>, round: usize) {
    let (envelopes, grabs) = {
        let a = acked.lock().unwrap();
        (a.envelopes.clone(), a.grabs.clone())
    };
    let mut by_env: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for ((id, user), amount) in grabs {
        by_env.entry(id).or_default().push((user, amount));
    }
    let mut conn = Conn::connect(addr).await.unwrap();
    for (id, (total, count)) in &envelopes {
        let id = &id.to_string();
        let (status, env, list) = conn.envelope_all(id).await.unwrap();
        assert_eq!(
            status, 200,
            "round {round}: acknowledged envelope {id} lost"
        );
        assert_eq!(
            env["total_cents"].as_u64(),
            Some(*total),
            "round {round}: envelope {id}"
        );
        assert_eq!(
            env["count"].as_u64(),
            Some(*count),
            "round {round}: envelope {id}"
        );
        let grabbed: u64 = list
            .iter()
            .map(|g| g["amount_cents"].as_u64().unwrap())
            .sum();
        let remaining = env["remaining_cents"].as_u64().unwrap();
        let refunded = env["refunded_cents"].as_u64().unwrap_or(0);
        assert_eq!(
            grabbed + remaining + refunded,
            *total,
            "round {round}: envelope {id} leaks money: {env}"
        );
        assert_eq!(
            list.len() as u64 + env["remaining_count"].as_u64().unwrap(),
            *count,
            "round {round}: {id}"
        );
        let mut seen = HashSet::new();
        let amounts: HashMap<&str, u64> = list
            .iter()
            .map(|g| {
                let u = g["user"].as_str().unwrap();
                assert!(
                    seen.insert(u),
                    "round {round}: user {u} grabbed envelope {id} twice"
                );
                (u, g["amount_cents"].as_u64().unwrap())
            })
            .collect();
        for (user, amount) in by_env.get(id).map(Vec::as_slice).unwrap_or_default() {
            assert_eq!(
                amounts.get(user.as_str()),
                Some(amount),
                "round {round}: acknowledged grab {id}/{user} of {amount} not recovered"
            );
        }
    }
}
