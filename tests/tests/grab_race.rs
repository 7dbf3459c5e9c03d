//! The hot-envelope race: one envelope, 2,000 distinct users plus 500
//! repeat grabs over 64 connections at once, against the in-process server
//! with `fsync always`.

use std::time::Duration;

use tidegate_tests::grab::{
    Conn, InProcess, Race, assert_none, embedded_config, envelope_violations, race_violations,
    wait_settled,
};

const RACE: Race = Race::HOT;

/// Exactly `count` first grabs succeed, each user at most once, every repeat
/// returns the user's one amount, and the shares sum to the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_envelope_race_hands_out_exactly_count_shares() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(embedded_config(dir.path())).await.unwrap();
    let run = RACE
        .run(&[server.addr], "GRAB_RACE_SEED", "grab_race")
        .await;
    assert_eq!(run.answers.len(), RACE.users + RACE.repeats);
    let (winners, bad) = race_violations(&RACE, &run.sent, &run.answers);
    assert_none("what clients saw", &bad);

    // The server's view agrees.
    let mut c = Conn::connect(server.addr).await.unwrap();
    let (status, page, grabs) = c.envelope_all(&run.id).await.unwrap();
    assert_eq!(status, 200);
    assert_none(
        "the server's view",
        &envelope_violations(&RACE, &winners, &page, &grabs),
    );
    let stats = wait_settled(server.addr, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(stats["wallet_cents"], RACE.total);
    eprintln!(
        "grab_race: {} requests in {:.2}s",
        run.answers.len(),
        run.elapsed.as_secs_f64()
    );
    server.stop().await.unwrap();
}
