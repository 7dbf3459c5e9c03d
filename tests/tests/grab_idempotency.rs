//! `Idempotency-Key` on `POST /envelopes`, against the standalone `grab-backend` binary:
//! a keyed create, `kill -9` right after its acknowledgement, a restart, and the retry
//! answers the same envelope with the same body while the money is reserved once; on the
//! embedded store (the mapping is in the create's log record) and on the Redis store
//! (the mapping is a Redis key with a TTL; Redis itself is also killed and restarted from
//! its append-only file). Plus the HTTP rules: another body under the key answers 422,
//! a malformed key 400, and creates without a key are not deduplicated.

use serde_json::{Value, json};
use tidegate_tests::grab::{Backend, Conn};
use tidegate_tests::redis::RedisServer;

/// `/stats` envelopes and created_cents.
async fn money(c: &mut Conn) -> (u64, u64) {
    let (status, stats) = c.get("/stats").await.unwrap();
    assert_eq!(status, 200, "{stats}");
    (
        stats["envelopes"].as_u64().unwrap(),
        stats["created_cents"].as_u64().unwrap(),
    )
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

/// Create under a key, `kill -9`, restart with `restart`, retry: same status, same body,
/// one envelope's money. Returns the backend for further checks.
async fn retry_after_kill9(
    mut backend: Backend,
    restart: impl AsyncFnOnce() -> Backend,
) -> Backend {
    let body = json!({"sender": "sam", "total_cents": 12_345, "count": 5});
    let key = "3f1c2a9e-7c1b-4d0e-9d4f-0a6b5c1e2d33";
    let mut c = Conn::connect(backend.addr).await.unwrap();
    let (status, first) = c.create_with_key(&body, key).await.unwrap();
    assert_eq!(status, 201, "{first:?}");
    let id = json_of(&first)["id"].as_str().unwrap().to_owned();
    // The envelope moves on before the crash; the replay still answers the create.
    let (status, _) = c.grab(&id, "early").await.unwrap();
    assert_eq!(status, 200);
    drop(c);
    backend.kill9();

    let backend = restart().await;
    let mut c = Conn::connect(backend.addr).await.unwrap();
    // Same parameters, another field order: the same request.
    let reordered = json!({"count": 5, "total_cents": 12_345, "sender": "sam"});
    let (status, again) = c.create_with_key(&reordered, key).await.unwrap();
    assert_eq!(status, 201, "{again:?}");
    assert_eq!(
        again, first,
        "the retry answers the first answer byte for byte"
    );
    let (status, page) = c.get(&format!("/envelopes/{id}")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(page["grabbed_count"], 1, "{page}");
    assert_eq!(money(&mut c).await, (1, 12_345), "money reserved once");

    // Same key, other body: 422, nothing created.
    let other = json!({"sender": "sam", "total_cents": 99_999, "count": 5});
    let (status, err) = c.create_with_key(&other, key).await.unwrap();
    assert_eq!(status, 422);
    assert_eq!(json_of(&err)["error"], "idempotency_key_reused");
    // Same key, other sender: another scope, another envelope.
    let bob = json!({"sender": "bob", "total_cents": 100, "count": 1});
    let (status, bobs) = c.create_with_key(&bob, key).await.unwrap();
    assert_eq!(status, 201);
    assert_ne!(json_of(&bobs)["id"].as_str().unwrap(), id);
    assert_eq!(money(&mut c).await, (2, 12_445));
    backend
}

/// Malformed keys answer 400 and create nothing; creates without a key are not
/// deduplicated.
async fn http_rules(addr: std::net::SocketAddr) {
    let mut c = Conn::connect(addr).await.unwrap();
    let before = money(&mut c).await;
    let body = serde_json::to_vec(&json!({"sender": "x", "total_cents": 10, "count": 1})).unwrap();
    let long = vec![b'k'; 256];
    for bad in [&b""[..], b"two words", b"caf\xc3\xa9", long.as_slice()] {
        let (status, err) = c
            .send("POST", "/envelopes", &[("idempotency-key", bad)], &body)
            .await
            .unwrap();
        assert_eq!(status, 400, "{bad:?}: {err:?}");
        assert_eq!(json_of(&err)["error"], "invalid_request");
    }
    let (status, _) = c
        .send(
            "POST",
            "/envelopes",
            &[("idempotency-key", b"a"), ("idempotency-key", b"b")],
            &body,
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "two keys");
    assert_eq!(money(&mut c).await, before);
    let plain = json!({"sender": "x", "total_cents": 10, "count": 1});
    let (s1, a) = c.create(plain.clone()).await.unwrap();
    let (s2, b) = c.create(plain).await.unwrap();
    assert_eq!((s1, s2), (201, 201));
    assert_ne!(a["id"], b["id"]);
    assert_eq!(money(&mut c).await, (before.0 + 2, before.1 + 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_retry_after_kill9_returns_the_first_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--fsync", "always"];
    let backend = Backend::start(dir.path(), &args).await.unwrap();
    let backend = retry_after_kill9(backend, async || {
        Backend::start(dir.path(), &args).await.unwrap()
    })
    .await;
    http_rules(backend.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_retry_after_kill9_returns_the_first_envelope() {
    let Some(mut redis) = RedisServer::start_durable() else {
        return;
    };
    let url = redis.url();
    // A durable Redis syncs every write: on a busy disk one call can take seconds, which
    // is not what this test is about.
    let args = [
        "--store",
        "redis",
        "--redis-url",
        url.as_str(),
        "--redis-timeout-ms",
        "10000",
    ];
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(dir.path(), &args).await.unwrap();
    let backend = retry_after_kill9(backend, async || {
        // Redis goes down too, and comes back from its append-only file.
        redis.restart();
        Backend::start(dir.path(), &args).await.unwrap()
    })
    .await;
    http_rules(backend.addr).await;
}
