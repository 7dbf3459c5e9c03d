//! The grab API end to end against the in-process server: statuses, error
//! bodies, paging, wallets, expiry refunds, h2c, a custom user header, and a
//! graceful restart on the same data directory.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tidegate_tests::grab::{Conn, InProcess, embedded_config, wait_settled};

fn config(dir: &std::path::Path) -> grab_backend::Config {
    grab_backend::Config {
        expiry_sweep_interval: Duration::from_millis(50),
        ..embedded_config(dir)
    }
}

/// Creates outside the limits are 400 with a reason; valid ones are 201.
#[tokio::test]
async fn create_validation() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(config(dir.path())).await.unwrap();
    let mut c = Conn::connect(server.addr).await.unwrap();
    let bad = [
        json!({"sender": "s", "total_cents": 100, "count": 0}),
        json!({"sender": "s", "total_cents": 100_000, "count": 10_001}),
        json!({"sender": "s", "total_cents": 9, "count": 10}),
        json!({"sender": "s", "total_cents": 20_000_001, "count": 10}),
        json!({"sender": "", "total_cents": 100, "count": 1}),
        json!({"sender": "s", "total_cents": 100, "count": 1, "expires_in_s": 0}),
        json!({"sender": "s", "total_cents": 100, "count": 1, "colour": "red"}),
        json!({"sender": "s", "total_cents": -5, "count": 1}),
        json!({"total_cents": 100, "count": 1}),
    ];
    for body in bad {
        let (status, v) = c.create(body.clone()).await.unwrap();
        assert_eq!(status, 400, "{body} → {v}");
        assert_eq!(v["error"], "invalid_request");
        assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    }
    let (status, v) = c.request("POST", "/envelopes", None, None).await.unwrap();
    assert_eq!((status, &v["error"]), (400, &json!("invalid_request")));
    for (total, count) in [(10_000, 10), (10_000, 10_000), (20_000_000, 1)] {
        let (status, v) = c
            .create(json!({"sender": "s", "total_cents": total, "count": count}))
            .await
            .unwrap();
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["remaining_cents"], total);
        assert_eq!(v["state"], "open");
    }
    server.stop().await.unwrap();
}

/// Grab statuses: 200 with the share, repeat → same share, empty → 410,
/// unknown → 404, missing user → 400.
#[tokio::test]
async fn grab_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(config(dir.path())).await.unwrap();
    let mut c = Conn::connect(server.addr).await.unwrap();
    let (_, env) = c
        .create(json!({"sender": "s", "total_cents": 300, "count": 2}))
        .await
        .unwrap();
    let id = env["id"].as_str().unwrap();

    let (status, a) = c.grab(id, "alice").await.unwrap();
    assert_eq!(status, 200, "{a}");
    assert_eq!(
        (
            a["repeat"].clone(),
            a["remaining_count"].clone(),
            a["seq"].clone()
        ),
        (json!(false), json!(1), json!(1))
    );
    let (_, again) = c.grab(id, "alice").await.unwrap();
    assert_eq!(again["repeat"], true);
    assert_eq!(again["amount_cents"], a["amount_cents"]);
    let (_, b) = c.grab(id, "bob").await.unwrap();
    assert_eq!(
        a["amount_cents"].as_u64().unwrap() + b["amount_cents"].as_u64().unwrap(),
        300
    );
    assert_eq!(
        c.grab(id, "carol").await.unwrap(),
        (410, json!({"error": "empty"}))
    );
    assert_eq!(
        c.grab("999999", "carol").await.unwrap(),
        (404, json!({"error": "not_found"}))
    );
    assert_eq!(c.grab("not-a-number", "carol").await.unwrap().0, 404);
    let (status, v) = c
        .request("POST", &format!("/envelopes/{id}/grab"), None, None)
        .await
        .unwrap();
    assert_eq!((status, v["error"].clone()), (400, json!("missing_user")));
    let (status, h) = c.get("/healthz").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(h["fsync"], "always");
    assert!(h["settlement_lag_records"].is_u64());
    server.stop().await.unwrap();
}

/// An expired envelope answers 410 expired; the sweep refunds its remainder
/// to the sender's wallet, and grab credits reach grabbers' wallets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_refund_and_wallets() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(config(dir.path())).await.unwrap();
    let mut c = Conn::connect(server.addr).await.unwrap();
    let (_, env) = c
        .create(json!({"sender": "sam", "total_cents": 1_000, "count": 4, "expires_in_s": 1}))
        .await
        .unwrap();
    let id = env["id"].as_str().unwrap();
    let (_, g) = c.grab(id, "ann").await.unwrap();
    let share = g["amount_cents"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        c.grab(id, "ben").await.unwrap(),
        (410, json!({"error": "expired"}))
    );
    // Ann's repeat still answers her share after expiry.
    assert_eq!(c.grab(id, "ann").await.unwrap().1["amount_cents"], share);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = wait_settled(server.addr, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(stats["wallet_cents"], 1_000, "{stats}");
    let (_, page) = c.get(&format!("/envelopes/{id}")).await.unwrap();
    assert_eq!(page["state"], "refunded");
    assert_eq!(page["refunded_cents"], 1_000 - share);
    let (_, sam) = c.get("/users/sam/wallet").await.unwrap();
    assert_eq!(sam["balance_cents"], 1_000 - share);
    assert_eq!(sam["credits"][0]["kind"], "refund");
    let (_, ann) = c.get("/users/ann/wallet").await.unwrap();
    assert_eq!(ann["balance_cents"], share);
    assert_eq!(ann["credits"][0]["envelope_id"], id);
    let (_, nobody) = c.get("/users/nobody/wallet").await.unwrap();
    assert_eq!(nobody["balance_cents"], 0);
    server.stop().await.unwrap();
}

/// `GET /envelopes/{id}` pages grabs in grab order.
#[tokio::test]
async fn envelope_paging() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(config(dir.path())).await.unwrap();
    let mut c = Conn::connect(server.addr).await.unwrap();
    let (_, env) = c
        .create(json!({"sender": "s", "total_cents": 10_000, "count": 30}))
        .await
        .unwrap();
    let id = env["id"].as_str().unwrap();
    for u in 0..25 {
        c.grab(id, &format!("u{u:02}")).await.unwrap();
    }
    let (_, p) = c
        .get(&format!("/envelopes/{id}?offset=10&limit=10"))
        .await
        .unwrap();
    let users: Vec<&str> = p["grabs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["user"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        (10..20).map(|u| format!("u{u:02}")).collect::<Vec<_>>()
    );
    assert_eq!(
        (p["grabbed_count"].clone(), p["remaining_count"].clone()),
        (json!(25), json!(5))
    );
    let (_, tail) = c.get(&format!("/envelopes/{id}?offset=20")).await.unwrap();
    assert_eq!(tail["grabs"].as_array().unwrap().len(), 5);
    assert_eq!(c.get("/envelopes/424242").await.unwrap().0, 404);
    server.stop().await.unwrap();
}

/// The user header is configurable, and h2c (prior knowledge) is served.
#[tokio::test]
async fn custom_user_header_over_h2c() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = grab_backend::Config {
        user_header: "X-Uid".into(),
        ..config(dir.path())
    };
    let server = InProcess::start(cfg).await.unwrap();
    let mut c = Conn::connect(server.addr).await.unwrap();
    let (_, env) = c
        .create(json!({"sender": "s", "total_cents": 100, "count": 1}))
        .await
        .unwrap();
    let id = env["id"].as_str().unwrap().to_owned();
    // x-user-id is not the configured header here.
    assert_eq!(c.grab(&id, "zed").await.unwrap().0, 400);

    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/envelopes/{id}/grab", server.addr))
        .header("x-uid", "zed")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(
        (body["amount_cents"].clone(), body["user"].clone()),
        (json!(100), json!("zed"))
    );
    server.stop().await.unwrap();
}

/// A graceful stop snapshots; a new server on the same directory has the
/// same envelopes, grabs and wallets, and keeps issuing fresh ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(config(dir.path())).await.unwrap();
    let mut c = Conn::connect(server.addr).await.unwrap();
    let (_, env) = c
        .create(json!({"sender": "s", "total_cents": 5_000, "count": 5}))
        .await
        .unwrap();
    let id = env["id"].as_str().unwrap().to_owned();
    for u in ["a", "b", "c"] {
        c.grab(&id, u).await.unwrap();
    }
    let (_, before) = c.get(&format!("/envelopes/{id}")).await.unwrap();
    drop(c);
    server.stop().await.unwrap();
    assert!(dir.path().join("snapshot.bin").exists());

    let server = InProcess::start(config(dir.path())).await.unwrap();
    let mut c = Conn::connect(server.addr).await.unwrap();
    let (_, after) = c.get(&format!("/envelopes/{id}")).await.unwrap();
    assert_eq!(after["grabs"], before["grabs"]);
    assert_eq!(after["remaining_cents"], before["remaining_cents"]);
    let (_, w) = c.get("/users/b/wallet").await.unwrap();
    assert_eq!(w["balance_cents"], before["grabs"][1]["amount_cents"]);
    let (_, again) = c.grab(&id, "a").await.unwrap();
    assert_eq!(
        (again["repeat"].clone(), again["amount_cents"].clone()),
        (json!(true), before["grabs"][0]["amount_cents"].clone())
    );
    let (_, next) = c
        .create(json!({"sender": "s", "total_cents": 10, "count": 1}))
        .await
        .unwrap();
    assert!(next["id"].as_str().unwrap().parse::<u64>().unwrap() > id.parse::<u64>().unwrap());
    server.stop().await.unwrap();
}
