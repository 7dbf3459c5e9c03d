//! User priorities out of a client's reach (`overload.admission.priority_key_file`): with a
//! key file, the overload admission ranks users by a keyed hash nobody can compute without
//! the file; gateways sharing the file agree user by user; `tidegate check` refuses a key
//! too short to be secret and warns about what is valid but unsafe.

use std::path::Path;

use rules::overload::{UserKey, user_priority};
use serde_json::{Value, json};
use tidegate_tests::{TIMEOUT, Upstream, api, config, set, tidegate_check};

const LEVELS: u32 = 128;

fn admission_config(up: &Upstream, key_file: Option<&str>) -> Value {
    let mut c = config(&[up.addr]);
    let mut admission = json!({ "user_priority_levels": LEVELS });
    if let Some(f) = key_file {
        admission["priority_key_file"] = json!(f);
    }
    set(
        &mut c,
        "overload",
        json!({ "enabled": true, "max_in_flight": 100, "admission": admission }),
    );
    c
}

async fn start(dir: &Path, name: &str, config: &Value) -> api::Server {
    let file = dir.join(name);
    std::fs::write(&file, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    tokio::time::timeout(TIMEOUT, api::start_from_file(&file))
        .await
        .expect("starts in time")
        .expect("starts")
}

/// Each user's rank within its business band, as the live gateway judges it.
fn ranks(server: &api::Server, users: &[String]) -> Vec<u32> {
    let rt = server.live.runtime.load();
    users
        .iter()
        .map(|u| {
            let (rank, _) = rt
                .overload
                .priority(None, UserKey::User(u), None)
                .expect("admission is on");
            rank % LEVELS
        })
        .collect()
}

/// Two gateways with the same key file rank every user alike; the ranking agrees with the
/// public hash (what an attacker can compute) and with another key's only by chance.
#[tokio::test]
async fn keyed_priorities_are_shared_by_the_fleet_and_unguessable() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_a: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let key_b: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(53).wrapping_add(5))
        .collect();
    std::fs::write(dir.path().join("a.key"), &key_a).unwrap();
    std::fs::write(dir.path().join("b.key"), &key_b).unwrap();
    let users: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();

    let one = start(
        dir.path(),
        "one.json",
        &admission_config(&up, Some("a.key")),
    )
    .await;
    let two = start(
        dir.path(),
        "two.json",
        &admission_config(&up, Some("a.key")),
    )
    .await;
    let other = start(
        dir.path(),
        "other.json",
        &admission_config(&up, Some("b.key")),
    )
    .await;
    let public = start(dir.path(), "public.json", &admission_config(&up, None)).await;
    let (r1, r2, rb, rp) = (
        ranks(&one, &users),
        ranks(&two, &users),
        ranks(&other, &users),
        ranks(&public, &users),
    );
    assert_eq!(r1, r2, "gateways sharing the key file disagree");

    // What an attacker computes offline: the public hash of the current epoch. The keyless
    // gateway is exactly that (the test of the comparison itself).
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600;
    let offline: Vec<u32> = users
        .iter()
        .map(|u| user_priority(UserKey::User(u), epoch, LEVELS))
        .collect();
    let agree = |a: &[u32], b: &[u32]| a.iter().zip(b).filter(|(x, y)| x == y).count();
    // An hour boundary between the two reads would move everyone: allow one retry's worth.
    assert!(
        agree(&rp, &offline) >= users.len() * 9 / 10,
        "the keyless gateway should be computable offline"
    );
    // Chance agreement is 1/128 of 2000 ≈ 16; 60 is far beyond 5 sigma.
    let (vs_offline, vs_other) = (agree(&r1, &offline), agree(&r1, &rb));
    println!(
        "keyed ranks agreeing with the public hash: {vs_offline}/2000, with another key: {vs_other}/2000"
    );
    assert!(vs_offline < 60, "{vs_offline}");
    assert!(vs_other < 60, "{vs_other}");
    for s in [one, two, other, public] {
        assert!(s.shutdown().await);
    }
}

/// `tidegate check`: a key file too short to be secret is refused at its place; a config
/// that is valid but unsafe (admission without a key, an override header anyone can use)
/// passes with a warning for each.
#[tokio::test]
async fn check_refuses_weak_keys_and_warns_about_unsafe_settings() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short.key"), b"hunter2").unwrap();
    let file = dir.path().join("weak.json");
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(&admission_config(&up, Some("short.key"))).unwrap(),
    )
    .unwrap();
    let (code, err) = tidegate_check(&file);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("overload.admission.priority_key_file") && err.contains("at least 16"),
        "{err}"
    );

    let mut c = admission_config(&up, None);
    set(
        &mut c,
        "routes",
        json!([{ "name": "canary", "override_header": "x-canary",
                 "split": [{ "upstream": "up", "weight": "rest" }] }]),
    );
    let file = dir.path().join("unsafe.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    let (code, err) = tidegate_check(&file);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: overload.admission.priority_key_file: not set"),
        "{err}"
    );
    assert!(
        err.contains("warning: routes[0].override_header: honoured from any client"),
        "{err}"
    );
}
