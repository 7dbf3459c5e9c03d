//! The deadlines and the shutdown of parked connections, kept for all of them by one sweep
//! task instead of a timer and a shutdown wait in each one's task.
//!
//! An idle keep-alive connection's cost is its parked task ([`super::parked`]), and in it
//! tokio's timer entry (112 bytes) and the shutdown watch's wait (160) were half of the
//! future. Here a parked connection holds a [`Parked`]: a key into the lot's table of
//! deadlines, ordered by time, with the waker of the task waiting on it. The sweep task
//! sleeps until the earliest deadline, takes every entry that is due out of the table and
//! wakes its task; on shutdown it takes them all. A connection whose bytes come first drops
//! its `Parked`, which removes its entry.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Why a parked connection's wait ended without bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Its deadline passed: the head's, or the idle timeout's.
    Expired,
    /// The gateway is shutting down.
    Shutdown,
}

/// The waits of one server's parked connections.
#[derive(Debug)]
pub struct ParkLot {
    inner: Mutex<Lot>,
    /// Wakes the sweep: a wait due before the sweep's next run was added, or the lot is gone.
    sweep: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
}

#[derive(Debug, Default)]
struct Lot {
    /// By deadline, then by an id that makes keys unique; the waker of the task waiting
    /// (none before its first poll).
    waits: BTreeMap<Key, Option<Waker>>,
    next_id: u64,
    /// When the sweep task will next look at the table (`None`: not running, or nothing
    /// to wait for).
    armed: Option<Instant>,
    /// The sweep task is spawned (with the first wait).
    sweeping: bool,
    /// Shutdown has taken every wait; later ones end at once.
    stopped: bool,
}

type Key = (Instant, u64);

/// One parked connection's wait, until its deadline or shutdown. Dropping it (bytes came
/// first) removes it from the lot.
#[derive(Debug)]
pub struct Parked<'a> {
    lot: &'a ParkLot,
    /// `None` once the wait has ended (taken by the sweep, or never added).
    key: Option<Key>,
}

impl ParkLot {
    /// An empty lot; its waits end on shutdown (`shutdown` reads `true`).
    pub fn new(shutdown: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            sweep: Arc::new(Notify::new()),
            shutdown,
        })
    }

    /// Wait until `until` or shutdown, whichever comes first. Spawns the sweep task on the
    /// first call, so must run inside the runtime.
    pub fn park(self: &Arc<Self>, until: Instant) -> Parked<'_> {
        let mut lot = self.lock();
        if lot.stopped {
            return Parked {
                lot: self,
                key: None,
            };
        }
        let key = (until, lot.next_id);
        lot.next_id += 1;
        lot.waits.insert(key, None);
        if !lot.sweeping {
            lot.sweeping = true;
            let (me, sweep) = (Arc::downgrade(self), self.sweep.clone());
            tokio::spawn(sweep_task(me, sweep, self.shutdown.clone()));
        }
        if lot.armed.is_none_or(|at| until < at) {
            lot.armed = Some(until);
            self.sweep.notify_one();
        }
        Parked {
            lot: self,
            key: Some(key),
        }
    }

    /// Waits in the lot.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().waits.len()
    }

    /// End every wait due at `now`, and note when the next is due.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut due = Vec::new();
        let next = {
            let mut lot = self.lock();
            while let Some(e) = lot.waits.first_entry() {
                if e.key().0 > now {
                    break;
                }
                due.push(e.remove());
            }
            lot.armed = lot.waits.first_key_value().map(|(k, _)| k.0);
            lot.armed
        };
        // Woken outside the lock: the tasks take it again to see that they are done.
        due.into_iter().flatten().for_each(Waker::wake);
        next
    }

    /// End every wait, now and to come.
    fn stop(&self) {
        let waits = {
            let mut lot = self.lock();
            lot.stopped = true;
            lot.armed = None;
            std::mem::take(&mut lot.waits)
        };
        waits.into_values().flatten().for_each(Waker::wake);
    }

    fn lock(&self) -> MutexGuard<'_, Lot> {
        // Every update leaves the table whole; a panic elsewhere does not make it wrong.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ParkLot {
    fn drop(&mut self) {
        // The sweep holds only a weak reference: let it see that the lot is gone.
        self.sweep.notify_one();
    }
}

/// The sweep: ends the waits that are due, each at its deadline, and all of them on
/// shutdown; returns then, or once the lot is gone.
async fn sweep_task(lot: Weak<ParkLot>, sweep: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let Some(next) = lot.upgrade().map(|l| l.expire(Instant::now())) else {
            return;
        };
        tokio::select! {
            biased;
            _ = crate::shutdown::stopped(&mut shutdown) => {
                if let Some(l) = lot.upgrade() {
                    l.stop();
                }
                return;
            }
            _ = sweep.notified() => {}
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
        }
    }
}

impl Future for Parked<'_> {
    type Output = Stop;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Stop> {
        let Some(key) = self.key else {
            return Poll::Ready(Stop::Shutdown);
        };
        let mut lot = self.lot.lock();
        match lot.waits.get_mut(&key) {
            Some(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            None => {
                let stop = if lot.stopped {
                    Stop::Shutdown
                } else {
                    Stop::Expired
                };
                drop(lot);
                self.key = None;
                Poll::Ready(stop)
            }
        }
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.lot.lock().waits.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn lot() -> (Arc<ParkLot>, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        (ParkLot::new(rx), tx)
    }

    #[tokio::test]
    async fn waits_end_at_their_deadlines_in_order() {
        let (lot, _tx) = lot();
        let t0 = Instant::now();
        let at = move |ms| t0 + Duration::from_millis(ms);
        // Added latest first: the sweep must move its wake-up earlier each time.
        let late = tokio::spawn({
            let lot = lot.clone();
            async move { (lot.park(at(400)).await, Instant::now()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let early = lot.park(at(150));
        let (stop, ended) = (early.await, Instant::now());
        assert_eq!(stop, Stop::Expired);
        assert!(ended >= at(150) && ended < at(350), "{:?}", ended - t0);
        assert_eq!(lot.len(), 1, "the later wait is still there");
        let (stop, ended) = late.await.unwrap();
        assert_eq!(stop, Stop::Expired);
        assert!(ended >= at(400), "{:?}", ended - t0);
        assert_eq!(lot.len(), 0);
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_the_lot() {
        let (lot, _tx) = lot();
        let far = Instant::now() + Duration::from_secs(60);
        let woke = tokio::time::timeout(Duration::from_millis(30), lot.park(far)).await;
        assert!(woke.is_err(), "not due yet");
        assert_eq!(lot.len(), 0, "the wait dropped by the timeout is gone");
        // One never polled goes too.
        let never = lot.park(far);
        assert_eq!(lot.len(), 1);
        drop(never);
        assert_eq!(lot.len(), 0);
    }

    #[tokio::test]
    async fn shutdown_ends_every_wait_now_and_later() {
        let (lot, tx) = lot();
        let far = Instant::now() + Duration::from_secs(60);
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let lot = lot.clone();
                tokio::spawn(async move { lot.park(far).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lot.len(), 3);
        let t = Instant::now();
        tx.send(true).unwrap();
        for w in waiting {
            let stop = tokio::time::timeout(Duration::from_secs(1), w).await;
            assert_eq!(stop.expect("ended by shutdown").unwrap(), Stop::Shutdown);
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(lot.len(), 0);
        assert_eq!(lot.park(far).await, Stop::Shutdown, "parked after shutdown");
    }

    #[tokio::test]
    async fn the_sweep_ends_with_the_lot() {
        let (lot, _tx) = lot();
        let weak = Arc::downgrade(&lot);
        drop(lot.park(Instant::now() + Duration::from_secs(60)));
        // The sweep is running, asleep until that wait's deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sweep = Arc::downgrade(&lot.sweep);
        drop(lot);
        assert!(weak.upgrade().is_none());
        // The sweep task held the notifier; it lets it go when it returns.
        for _ in 0..100 {
            if sweep.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the sweep task outlived its lot");
    }
}
