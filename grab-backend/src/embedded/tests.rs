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
    // Let the settlement worker finish the snapshot it may be writing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let segs = wal::list_segments(dir.path()).unwrap();
    assert!(
        segs.len() <= 3,
        "log not truncated: {} segments",
        segs.len()
    );
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
    let short = store.create(new_env(3_000, 5, 1)).await.unwrap();
    let long = store.create(new_env(7_000, 5, 60)).await.unwrap();
    store.grab(short.id, "x").await.unwrap();
    store.grab(long.id, "x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_050)).await;
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
