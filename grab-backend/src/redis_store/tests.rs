//! The Redis store against a real `redis-server` (skipped, loudly, when it is not on
//! `PATH`; CI installs it).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::config::Limits;
use crate::store::CreateRequest;

/// A throwaway `redis-server` on a free port; killed on drop.
struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Option<Self> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server missing in CI"
            );
            eprintln!("==== SKIPPED: redis-server is not on PATH ====");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some(Self {
            child,
            url,
            _dir: dir,
        })
    }

    async fn store(&self, ttl: Duration) -> RedisStore {
        RedisStore::open(&RedisStoreConfig::new(&self.url), 20)
            .await
            .unwrap()
            .idempotency_ttl(ttl)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keyed(sender: &str, total: u64, count: u64, key: &str) -> (NewEnvelope, IdempotencyKey) {
    let r = CreateRequest {
        sender: sender.into(),
        total_cents: total,
        count,
        expires_in_s: Some(60),
    };
    let k = IdempotencyKey::new(key.as_bytes(), &r).unwrap();
    (NewEnvelope::validate(r, &Limits::default()).unwrap(), k)
}

/// Same key and body: one envelope, the first answer repeated, money reserved once;
/// another body: refused; another sender: another key; no key: two envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_idempotent_create_answers_the_first_envelope() {
    let Some(server) = Server::start().await else {
        return;
    };
    let store = server.store(Duration::from_secs(60)).await;
    let (new, key) = keyed("sam", 1_000, 4, "k-1");
    let first = store.create_idempotent(new.clone(), &key).await.unwrap();
    assert!(!first.replayed);
    store.grab(first.summary.id, "u").await.unwrap();
    let again = store.create_idempotent(new, &key).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.summary, first.summary);
    let t = store.totals().await.unwrap();
    assert_eq!((t.envelopes, t.created_cents), (1, 1_000));

    let (other, other_key) = keyed("sam", 2_000, 4, "k-1");
    assert_eq!(
        store.create_idempotent(other, &other_key).await,
        Err(CreateError::KeyReused)
    );
    let (bob, bob_key) = keyed("bob", 2_000, 4, "k-1");
    assert_ne!(
        store
            .create_idempotent(bob, &bob_key)
            .await
            .unwrap()
            .summary
            .id,
        first.summary.id
    );
    let (plain, _) = keyed("sam", 500, 2, "unused");
    let a = store.create(plain.clone()).await.unwrap();
    let b = store.create(plain).await.unwrap();
    assert_ne!(a.id, b.id);
    let t = store.totals().await.unwrap();
    assert_eq!((t.envelopes, t.created_cents), (4, 4_000));

    // Concurrent duplicates, also through a second store (another node): one envelope.
    let nodes = [
        std::sync::Arc::new(store),
        std::sync::Arc::new(server.store(Duration::from_secs(60)).await),
    ];
    let mut runs = Vec::new();
    for i in 0..16 {
        let node = nodes[i % 2].clone();
        runs.push(tokio::spawn(async move {
            let (new, key) = keyed("sam", 700, 7, "race");
            node.create_idempotent(new, &key).await.unwrap()
        }));
    }
    let mut answers = Vec::new();
    for r in runs {
        answers.push(r.await.unwrap());
    }
    let store = &nodes[0];
    assert!(answers.iter().all(|a| a.summary == answers[0].summary));
    let t = store.totals().await.unwrap();
    assert_eq!((t.envelopes, t.created_cents), (5, 4_700));
}

/// A claim whose create never ran (the first node died between the two scripts) is
/// completed by the retry with the claimed id; the mapping carries a TTL and a retry
/// after it expires creates a new envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_expire_and_orphan_claims_complete() {
    let Some(server) = Server::start().await else {
        return;
    };
    let store = server.store(Duration::from_millis(1_000)).await;
    let (new, key) = keyed("sam", 100, 1, "ttl");
    let first = store.create_idempotent(new.clone(), &key).await.unwrap();
    let ttl: i64 = store
        .inner
        .conn()
        .pttl(idem_key("sam", "ttl"))
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 1_000, "pttl {ttl}");
    assert_eq!(
        store
            .create_idempotent(new.clone(), &key)
            .await
            .unwrap()
            .summary
            .id,
        first.summary.id
    );
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let later = store.create_idempotent(new, &key).await.unwrap();
    assert!(!later.replayed);
    assert_ne!(later.summary.id, first.summary.id);

    // An orphan claim: id 1000 claimed, never created.
    let (new, key) = keyed("sam", 300, 3, "orphan");
    let _: () = store
        .inner
        .conn()
        .set(
            idem_key("sam", "orphan"),
            format!("{}:1000", key.fingerprint()),
        )
        .await
        .unwrap();
    let done = store.create_idempotent(new.clone(), &key).await.unwrap();
    assert_eq!(done.summary.id, EnvelopeId(1000));
    let again = store.create_idempotent(new, &key).await.unwrap();
    assert_eq!(again.summary, done.summary);
    let t = store.totals().await.unwrap();
    assert_eq!(t.created_cents, 100 + 100 + 300);
}
