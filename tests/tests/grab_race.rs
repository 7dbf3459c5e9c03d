//! The hot-envelope race: one envelope, 2,000 distinct users plus 500
//! repeat grabs over 64 connections at once, against the in-process server
//! with `fsync always`.

mod grab_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use grab_support::{Conn, InProcess, Rng, wait_settled};
use serde_json::json;

const USERS: usize = 2_000;
const REPEATS: usize = 500;
const CONNECTIONS: usize = 64;
const COUNT: u64 = 1_000;
const TOTAL: u64 = 1_000_000;

/// Exactly `count` first grabs succeed, each user at most once, every repeat
/// returns the user's one amount, and the shares sum to the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_envelope_race_hands_out_exactly_count_shares() {
    let dir = tempfile::tempdir().unwrap();
    let config = grab_backend::Config {
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    let server = InProcess::start(config).await.unwrap();
    let mut c = Conn::connect(server.addr).await.unwrap();
    let (status, env) = c
        .create(
            json!({"sender": "boss", "total_cents": TOTAL, "count": COUNT, "expires_in_s": 600}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201);
    let id = env["id"].as_str().unwrap().to_owned();

    // 2,000 users once each plus 500 of them again, shuffled and dealt over
    // 64 connections, so repeats race their own first grabs.
    let (mut rng, seed) = Rng::from_env_or_time("GRAB_RACE_SEED");
    eprintln!("grab_race seed {seed}");
    let mut ops: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
    for _ in 0..REPEATS {
        let u = rng.range(0, USERS as u64);
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
        let (addr, id) = (server.addr, id.clone());
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
    assert_eq!(answers.len(), USERS + REPEATS);

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
        "shares must sum to the total"
    );
    for (user, seen) in &amounts {
        assert!(first.contains_key(user), "{user} got only repeats");
        assert!(
            seen.iter().all(|a| *a == first[user]),
            "{user} saw different amounts: {seen:?}"
        );
    }
    // A user who was refused never got money later, and vice versa.
    for (user, status, _) in &answers {
        if *status == 410 {
            assert!(
                !first.contains_key(user),
                "{user} got both a share and 'empty'"
            );
        }
    }
    assert_eq!(
        empty + amounts.values().map(Vec::len).sum::<usize>(),
        USERS + REPEATS
    );

    // The server's view agrees.
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
    let stats = wait_settled(server.addr, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(stats["wallet_cents"], TOTAL);
    eprintln!(
        "grab_race: {} requests in {:.2}s",
        answers.len(),
        elapsed.as_secs_f64()
    );
    server.stop().await.unwrap();
}
