use std::path::Path;
use std::time::Duration;

use super::*;
use crate::model::EnvelopeState;
use crate::store::CreateRequest;
use crate::wal;

fn config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_owned(),
        ..Config::default()
    }
}

fn new_env(total: u64, count: u64, expires_in_s: u64) -> NewEnvelope {
    let req = CreateRequest {
        sender: "sender".into(),
        total_cents: total,
        count,
        expires_in_s: Some(expires_in_s),
    };
    NewEnvelope::validate(req, &Limits::default()).unwrap()
}

use crate::config::Limits;

async fn settle(store: &EmbeddedStore) {
    for _ in 0..500 {
        let (c, s) = store.progress();
        if c == s {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("settlement did not catch up");
}

/// Three shares, four grabbers: three get money summing to the total, the
/// fourth gets `Empty`, and a repeat returns the first answer.
#[tokio::test]
async fn grab_repeat_and_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&config(dir.path())).unwrap();
    let env = store.create(new_env(1_000, 3, 60)).await.unwrap();
    let mut sum = 0;
    for u in ["a", "b", "c"] {
        let r = store.grab(env.id, u).await.unwrap();
        assert!(!r.repeat && r.amount_cents >= 1);
        sum += r.amount_cents;
    }
    assert_eq!(sum, 1_000);
    assert_eq!(store.grab(env.id, "d").await, Err(GrabError::Empty));
    let first = store.envelope(env.id, 0, 10).await.unwrap().unwrap().grabs[0].clone();
    let again = store.grab(env.id, "a").await.unwrap();
    assert!(again.repeat);
    assert_eq!(again.amount_cents, first.amount_cents);
    assert_eq!(
        store.grab(EnvelopeId(999), "a").await,
        Err(GrabError::NotFound)
    );
    settle(&store).await;
    assert_eq!(
        store.wallet("a", 5).await.unwrap().balance_cents,
        first.amount_cents
    );
}

/// After a clean close and reopen, envelopes, grabs and wallets are unchanged,
/// and ids keep increasing.
#[tokio::test]
async fn reopen_restores_state() {
    let dir = tempfile::tempdir().unwrap();
    let (id, page) = {
        let store = EmbeddedStore::open(&config(dir.path())).unwrap();
        let env = store.create(new_env(5_000, 10, 60)).await.unwrap();
        for u in 0..7 {
            store.grab(env.id, &format!("u{u}")).await.unwrap();
        }
        let page = store.envelope(env.id, 0, 100).await.unwrap().unwrap();
        store.close();
        (env.id, page)
    };
    let store = EmbeddedStore::open(&config(dir.path())).unwrap();
    let again = store.envelope(id, 0, 100).await.unwrap().unwrap();
    assert_eq!(again.grabs, page.grabs);
    assert_eq!(again.summary.remaining_cents, page.summary.remaining_cents);
    assert_eq!(
        store.wallet("u3", 5).await.unwrap().balance_cents,
        page.grabs[3].amount_cents
    );
    let next = store.create(new_env(10, 1, 60)).await.unwrap();
    assert!(next.id.0 > id.0);
}

/// Copying the data directory while the store runs (what a crash leaves) and
/// opening the copy recovers every acknowledged grab, even with garbage
/// appended to the last segment (a torn write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_image_recovers_acknowledged_grabs() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&config(dir.path())).unwrap();
    let env = store.create(new_env(100_000, 100, 60)).await.unwrap();
    let mut acked = Vec::new();
    for u in 0..40 {
        let r = store.grab(env.id, &format!("u{u}")).await.unwrap();
        acked.push((r.user, r.amount_cents));
    }
    let image = tempfile::tempdir().unwrap();
    for (_, path) in wal::list_segments(dir.path()).unwrap() {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0x17, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 9, 9]);
        std::fs::write(image.path().join(path.file_name().unwrap()), bytes).unwrap();
    }
    let recovered = EmbeddedStore::open(&config(image.path())).unwrap();
    let page = recovered.envelope(env.id, 0, 100).await.unwrap().unwrap();
    let got: Vec<_> = page
        .grabs
        .iter()
        .map(|g| (g.user.clone(), g.amount_cents))
        .collect();
    assert_eq!(got, acked);
    assert_eq!(page.grabbed_cents + page.summary.remaining_cents, 100_000);
    // The torn bytes were truncated, so the log keeps growing cleanly.
    recovered.grab(env.id, "late").await.unwrap();
    recovered.close();
    let again = EmbeddedStore::open(&config(image.path())).unwrap();
    assert_eq!(
        again
            .envelope(env.id, 0, 100)
            .await
            .unwrap()
            .unwrap()
            .grabbed_count,
        41
    );
}

/// Corruption in a closed (non-last) segment is refused, not skipped.
#[tokio::test]
async fn corrupt_closed_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        segment_max_bytes: 256,
        snapshot_every_records: u64::MAX,
        ..config(dir.path())
    };
    let store = EmbeddedStore::open(&cfg).unwrap();
    let env = store.create(new_env(10_000, 50, 60)).await.unwrap();
    for u in 0..20 {
        store.grab(env.id, &format!("u{u}")).await.unwrap();
    }
    // Crash image: a clean close would snapshot and delete closed segments.
    let image = tempfile::tempdir().unwrap();
    for (_, path) in wal::list_segments(dir.path()).unwrap() {
        std::fs::copy(&path, image.path().join(path.file_name().unwrap())).unwrap();
    }
    let cfg = Config {
        data_dir: image.path().to_owned(),
        ..cfg
    };
    let segs = wal::list_segments(image.path()).unwrap();
    assert!(segs.len() > 2);
    let victim = &segs[0].1;
    let mut bytes = std::fs::read(victim).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(victim, bytes).unwrap();
    let err = EmbeddedStore::open(&cfg)
        .err()
        .expect("must refuse")
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
}

/// Snapshots bound the log: with small segments and frequent snapshots, old
/// segments are deleted, and reopening replays only the tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_truncate_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        segment_max_bytes: 2_048,
        snapshot_every_records: 100,
        ..config(dir.path())
    };
    let store = EmbeddedStore::open(&cfg).unwrap();
    let mut ids = Vec::new();
    for e in 0..10 {
        let env = store.create(new_env(100_000, 100, 60)).await.unwrap();
        for u in 0..60 {
            store.grab(env.id, &format!("u{e}-{u}")).await.unwrap();
        }
        ids.push(env.id);
    }
    settle(&store).await;
    // The settlement worker may still be writing a snapshot (synced: slow on a busy disk).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let segs = wal::list_segments(dir.path()).unwrap();
        if segs.len() <= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "log not truncated: {} segments",
            segs.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.health().snapshot_lsn >= 500);
    drop(store);
    let store = EmbeddedStore::open(&cfg).unwrap();
    for id in ids {
        let p = store.envelope(id, 0, 10).await.unwrap().unwrap();
        assert_eq!(
            (p.grabbed_count, p.grabbed_cents + p.summary.remaining_cents),
            (60, 100_000)
        );
    }
}

/// Expired envelopes refuse grabs and, once swept and settled, their
/// remainder is in the sender's wallet: wallets + remaining == created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_refunds_and_conserves_money() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&config(dir.path())).unwrap();
    // Three seconds to live: the first grab must land before expiry even when a busy
    // machine makes each fsync slow; then wait out the rest from the creation.
    let created = tokio::time::Instant::now();
    let short = store.create(new_env(3_000, 5, 3)).await.unwrap();
    let long = store.create(new_env(7_000, 5, 60)).await.unwrap();
    store.grab(short.id, "x").await.unwrap();
    store.grab(long.id, "x").await.unwrap();
    tokio::time::sleep_until(created + Duration::from_millis(3_050)).await;
    assert_eq!(store.grab(short.id, "y").await, Err(GrabError::Expired));
    assert_eq!(store.refund_expired().await.unwrap(), 1);
    assert_eq!(store.refund_expired().await.unwrap(), 0);
    settle(&store).await;
    let t = store.totals().await.unwrap();
    assert!(
        t.settled,
        "{t:?} {:?} {:?}",
        store.progress(),
        store.health()
    );
    assert_eq!(t.created_cents, 10_000);
    assert_eq!(t.wallet_cents + t.remaining_cents, t.created_cents);
    let p = store.envelope(short.id, 0, 10).await.unwrap().unwrap();
    assert_eq!(p.summary.state, EnvelopeState::Refunded);
    let sender = store.wallet("sender", 10).await.unwrap();
    assert_eq!(Some(sender.balance_cents), p.summary.refunded_cents);
    // The refund survives a restart and is not applied twice.
    store.close();
    drop(store);
    let store = EmbeddedStore::open(&config(dir.path())).unwrap();
    assert_eq!(
        store.wallet("sender", 10).await.unwrap().balance_cents,
        sender.balance_cents
    );
    assert_eq!(store.refund_expired().await.unwrap(), 0);
}

/// One envelope, many racing grabbers on many tasks: exactly `count` winners,
/// distinct users, sum conserved; per-record fsync mode behaves the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_grabs_on_one_envelope() {
    for group_commit in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            group_commit,
            ..config(dir.path())
        };
        let store = Arc::new(EmbeddedStore::open(&cfg).unwrap());
        let env = store.create(new_env(50_000, 100, 60)).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..16 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut won = Vec::new();
                for u in 0..20 {
                    match store.grab(env.id, &format!("u{t}-{u}")).await {
                        Ok(r) => won.push(r),
                        Err(GrabError::Empty) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                won
            }));
        }
        let mut won = Vec::new();
        for t in tasks {
            won.extend(t.await.unwrap());
        }
        assert_eq!(won.len(), 100);
        assert_eq!(won.iter().map(|r| r.amount_cents).sum::<u64>(), 50_000);
        let users: std::collections::HashSet<_> = won.iter().map(|r| r.user.clone()).collect();
        assert_eq!(users.len(), 100);
    }
}

// === idempotent create ===

fn req(sender: &str, total: u64, count: u64) -> CreateRequest {
    CreateRequest {
        sender: sender.into(),
        total_cents: total,
        count,
        expires_in_s: Some(60),
    }
}

/// A validated envelope and its key for `key` (same request → same fingerprint).
fn keyed(sender: &str, total: u64, count: u64, key: &str) -> (NewEnvelope, IdempotencyKey) {
    let r = req(sender, total, count);
    let k = IdempotencyKey::new(key.as_bytes(), &r).unwrap();
    (NewEnvelope::validate(r, &Limits::default()).unwrap(), k)
}

/// What a crash leaves: the log segments and the snapshot, copied while the store runs.
fn crash_image(dir: &Path) -> tempfile::TempDir {
    let image = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, image.path().join(path.file_name().unwrap())).unwrap();
    }
    image
}

/// Same key and body: one envelope, the first answer repeated, money reserved once.
/// Another body under the key: refused. No key: two envelopes as before.
#[tokio::test]
async fn idempotent_create_answers_the_first_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&config(dir.path())).unwrap();
    let (new, key) = keyed("sam", 1_000, 4, "k-1");
    let first = store.create_idempotent(new.clone(), &key).await.unwrap();
    assert!(!first.replayed);
    // The envelope moves on; the replay still answers the create's answer.
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
    // Keys are per sender: another sender's "k-1" is another key.
    let (bob, bob_key) = keyed("bob", 2_000, 4, "k-1");
    let bobs = store.create_idempotent(bob, &bob_key).await.unwrap();
    assert_ne!(bobs.summary.id, first.summary.id);
    assert!(!bobs.replayed);

    let a = store.create(new_env(500, 2, 60)).await.unwrap();
    let b = store.create(new_env(500, 2, 60)).await.unwrap();
    assert_ne!(a.id, b.id);
    let t = store.totals().await.unwrap();
    assert_eq!((t.envelopes, t.created_cents), (4, 4_000));
}

/// Concurrent duplicates under one key create one envelope and all answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_create_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&config(dir.path())).unwrap());
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let (new, key) = keyed("sam", 700, 7, "same");
            store.create_idempotent(new, &key).await.unwrap().summary
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert!(answers.iter().all(|a| *a == answers[0]));
    let t = store.totals().await.unwrap();
    assert_eq!((t.envelopes, t.created_cents), (1, 700));
}

/// The key is in the create's log record: a crash image (no clean close) and a
/// snapshot both bring it back, and the retry answers the first envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_survive_a_crash_and_snapshots() {
    for snapshot_every_records in [u64::MAX, 1] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            snapshot_every_records,
            ..config(dir.path())
        };
        let store = EmbeddedStore::open(&cfg).unwrap();
        let (new, key) = keyed("sam", 900, 3, "crash");
        let first = store.create_idempotent(new.clone(), &key).await.unwrap();
        settle(&store).await;
        if snapshot_every_records == 1 {
            for _ in 0..500 {
                if store.settle.snapshot_lsn.load(Ordering::Acquire) >= 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(store.settle.snapshot_lsn.load(Ordering::Acquire) >= 1);
        }
        let image = crash_image(dir.path());
        let recovered = EmbeddedStore::open(&config(image.path())).unwrap();
        let again = recovered.create_idempotent(new, &key).await.unwrap();
        assert!(
            again.replayed,
            "snapshot_every_records {snapshot_every_records}"
        );
        assert_eq!(again.summary, first.summary);
        let (other, other_key) = keyed("sam", 901, 3, "crash");
        assert_eq!(
            recovered.create_idempotent(other, &other_key).await,
            Err(CreateError::KeyReused)
        );
        let t = recovered.totals().await.unwrap();
        assert_eq!((t.envelopes, t.created_cents), (1, 900));
    }
}

/// Keys expire after the TTL (live, and when recovered), and the oldest go first
/// past the count bound; a forgotten key creates a new envelope.
#[tokio::test]
async fn keys_expire_and_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        idempotency_ttl: Duration::from_millis(1_000),
        ..config(dir.path())
    };
    let store = EmbeddedStore::open(&cfg).unwrap();
    let (new, key) = keyed("sam", 100, 1, "ttl");
    let first = store.create_idempotent(new.clone(), &key).await.unwrap();
    let second = store.create_idempotent(new.clone(), &key).await.unwrap();
    assert_eq!(second.summary.id, first.summary.id);
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let third = store.create_idempotent(new.clone(), &key).await.unwrap();
    assert!(!third.replayed);
    assert_ne!(third.summary.id, first.summary.id);
    store.close();
    drop(store);
    // Recovered keys expire too.
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let store = EmbeddedStore::open(&cfg).unwrap();
    assert_eq!(store.idem.lock().unwrap().len(), 0);
    let fourth = store.create_idempotent(new, &key).await.unwrap();
    assert!(!fourth.replayed);
    store.close();
    drop(store);

    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        idempotency_max_keys: 2,
        ..config(dir.path())
    };
    let store = EmbeddedStore::open(&cfg).unwrap();
    let mut ids = Vec::new();
    for k in ["a", "b", "c"] {
        let (new, key) = keyed("sam", 100, 1, k);
        ids.push(store.create_idempotent(new, &key).await.unwrap().summary.id);
    }
    assert_eq!(store.idem.lock().unwrap().len(), 2);
    let (new, key) = keyed("sam", 100, 1, "c");
    assert_eq!(
        store.create_idempotent(new, &key).await.unwrap().summary.id,
        ids[2]
    );
    let (new, key) = keyed("sam", 100, 1, "a");
    assert_ne!(
        store.create_idempotent(new, &key).await.unwrap().summary.id,
        ids[0]
    );
}
