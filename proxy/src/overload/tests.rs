use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;

fn gate(limit: u32, max_queue: u32) -> Arc<Gate> {
    Arc::new(Gate::new(
        "upstream",
        "up",
        GateDef {
            cap: Some(UpstreamCap::Fixed(limit)),
            fixed: limit,
            max_queue,
        },
    ))
}

fn later(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// A freed slot goes to the waiting request of the highest business band, whatever the
/// order they queued in; first come first served within a band.
#[tokio::test]
async fn freed_slot_goes_to_the_best_band() {
    let g = gate(1, 10);
    let held = g.acquire(later(1000), 0).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, band) in [("low-1", 0), ("low-2", 0), ("critical", 3), ("normal", 1)] {
        let (g, order) = (g.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let s = g.acquire(later(1000), band).await.unwrap();
            order.lock().unwrap().push(name);
            tokio::time::sleep(Duration::from_millis(1)).await;
            drop(s);
        }));
        tokio::task::yield_now().await;
    }
    assert_eq!(g.waiting.load(Ordering::Relaxed), 4);
    drop(held);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        ["critical", "normal", "low-1", "low-2"]
    );
    assert_eq!((g.in_flight(), g.waiting.load(Ordering::Relaxed)), (0, 0));
}

/// Past the queue bound a request is refused at once; past the deadline, after waiting.
#[tokio::test]
async fn queue_full_and_timeout() {
    let g = gate(1, 1);
    let _held = g.acquire(later(10), 0).await.unwrap();
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.acquire(later(20), 0).await.map(|_| ()) });
    tokio::task::yield_now().await;
    assert_eq!(
        g.acquire(later(20), 3).await.map(|_| ()),
        Err(Reason::QueueFull)
    );
    let t0 = Instant::now();
    assert_eq!(waiter.await.unwrap(), Err(Reason::QueueTimeout));
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(
        g.waiting.load(Ordering::Relaxed),
        0,
        "the timed-out waiter left"
    );
}

/// Shrinking the limit below the slots in use retires them as they come back; growing it
/// again hands new slots to waiters at once.
#[tokio::test]
async fn limit_shrinks_and_grows_under_load() {
    let g = gate(4, 10);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(g.acquire(later(10), 0).await.unwrap());
    }
    g.set_limit(2);
    held.pop();
    held.pop();
    assert_eq!(g.in_flight(), 2);
    // Two still in use at a limit of two: the next waits, and times out.
    assert_eq!(
        g.acquire(later(5), 0).await.map(|_| ()),
        Err(Reason::QueueTimeout)
    );
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.acquire(later(1000), 0).await.map(|_| ()) });
    tokio::task::yield_now().await;
    g.set_limit(3);
    assert_eq!(waiter.await.unwrap(), Ok(()));
    drop(held);
    assert_eq!(g.in_flight(), 0);
    // All three slots are free again, and no more.
    let three: Vec<_> = futures_util::future::join_all((0..3).map(|_| g.acquire(later(1), 0)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        g.acquire(later(1), 0).await.map(|_| ()),
        Err(Reason::QueueTimeout)
    );
    drop(three);
}

/// A wait cancelled after a slot was handed to it (the client went away) gives the slot
/// back: no slot is lost.
#[tokio::test]
async fn cancelled_wait_returns_its_slot() {
    let g = gate(1, 10);
    let held = g.acquire(later(1000), 0).await.unwrap();
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.acquire(later(1000), 0).await.map(|_| ()) });
    tokio::task::yield_now().await;
    // Hand the slot over and cancel the waiter before it runs.
    drop(held);
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(g.waiting.load(Ordering::Relaxed), 0);
    assert!(g.acquire(later(1), 0).await.is_ok(), "the slot came back");
}
