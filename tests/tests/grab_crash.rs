//! `kill -9` under load: the standalone grab backend, killed at a random
//! moment while clients create and grab concurrently, restarted, 22 times.
//! After every restart each acknowledged create and grab is present with the
//! same amount, every envelope conserves its money, and no user appears
//! twice. At the end settlement catches up and wallets + remaining money
//! equals all money ever put in.
//!
//! Replay a run with `GRAB_CRASH_SEED=<seed>` (printed at the start).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidegate_tests::grab::{Acked, Backend, Rng, check_money, load, verify};

const ROUNDS: usize = 22;
const WORKERS: usize = 12;

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
            let seed = rng.next_u64();
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
    let stats = check_money(backend.addr, backend.addr).await;
    let created = stats["created_cents"].as_u64().unwrap();
    let acked_total: u64 = acked.lock().unwrap().envelopes.values().map(|e| e.0).sum();
    assert!(
        created >= acked_total,
        "acknowledged creates missing: {created} < {acked_total}"
    );
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
