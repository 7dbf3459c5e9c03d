//! Parked connections: idle keep-alive connections kept without a task of their own, their
//! deadlines and shutdown watched for all of them by one sweep task.
//!
//! An idle connection costs what it keeps while it waits, and a task per parked connection
//! would be a 384-byte task cell around its future (640 with a timer and a shutdown wait
//! in it). A parked connection is instead a [`Sleeper`] of its own (the connection and its wait, 200 bytes
//! for plain TCP), which the socket's readiness holds as the waker of its read interest,
//! and an entry in its server's [`ParkLot`]: a table of deadlines ordered by time, holding
//! the sleeper by a weak reference. Bytes arriving wake the sleeper, which leaves the table
//! and starts a task to serve the connection on; the sweep task sleeps until the earliest
//! deadline and stops the sleepers that are due, and stops them all on shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};

use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::conn::Tracked;

/// Why a parked connection's wait ended without bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Its deadline passed: the head's, or the idle timeout's.
    Expired,
    /// The gateway is shutting down.
    Shutdown,
}

/// A parked connection, as its lot sees it.
pub trait Sleeper: Send + Sync {
    /// Its wait ended without bytes: close it.
    fn stop(self: Arc<Self>, why: Stop);
}

/// An IO whose readiness to read can be awaited without reading: what a parked connection
/// registers instead of a read.
pub trait ReadReady {
    /// Ready when the socket has bytes (or an error, or EOF) to read; pending, with `cx`'s
    /// waker registered, while it has none.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// The wait of a parked connection in its lot: see [`ParkLot::enter`].
pub type Key = (Instant, u64);

/// The waits of one server's parked connections.
pub struct ParkLot {
    inner: Mutex<Lot>,
    ids: AtomicU64,
    /// Wakes the sweep: a wait due before the sweep's next run was added, or the lot is gone.
    sweep: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
    /// Where the sweep runs, and where sleepers start the tasks that serve or close them
    /// (a waker may be called outside the runtime's context).
    runtime: Handle,
}

#[derive(Default)]
struct Lot {
    /// By deadline, then by an id that makes keys unique.
    waits: BTreeMap<Key, Weak<dyn Sleeper>>,
    /// When the sweep task will next look at the table (`None`: not running, or nothing
    /// to wait for).
    armed: Option<Instant>,
    /// The sweep task is spawned (with the first wait).
    sweeping: bool,
    /// Shutdown has stopped every wait; later ones are refused.
    stopped: bool,
}

impl ParkLot {
    /// An empty lot in the current runtime; its waits end on shutdown (`shutdown` reads
    /// `true`, or its sender is gone).
    pub fn new(shutdown: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            ids: AtomicU64::new(0),
            sweep: Arc::new(Notify::new()),
            shutdown,
            runtime: Handle::current(),
        })
    }

    /// A key for a wait until `until`, to make the sleeper with before it enters.
    pub fn key(&self, until: Instant) -> Key {
        (until, self.ids.fetch_add(1, Ordering::Relaxed))
    }

    /// Watch the wait `key` of `sleeper`: it is stopped at `key`'s deadline or on shutdown,
    /// unless it [`leave`](ParkLot::leave)s first. `false` once shutdown has begun: the
    /// caller closes the connection itself.
    pub fn enter(self: &Arc<Self>, key: Key, sleeper: Weak<dyn Sleeper>) -> bool {
        let mut lot = self.lock();
        if lot.stopped {
            return false;
        }
        lot.waits.insert(key, sleeper);
        if !lot.sweeping {
            lot.sweeping = true;
            let (me, sweep) = (Arc::downgrade(self), self.sweep.clone());
            self.runtime
                .spawn(sweep_task(me, sweep, self.shutdown.clone()));
        }
        if lot.armed.is_none_or(|at| key.0 < at) {
            lot.armed = Some(key.0);
            self.sweep.notify_one();
        }
        true
    }

    /// Stop watching the wait `key`: its bytes came.
    pub fn leave(&self, key: Key) {
        self.lock().waits.remove(&key);
    }

    /// Run `f` as a task of the lot's runtime (dropped if the runtime is shutting down).
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        drop(self.runtime.spawn(f));
    }

    /// Waits in the lot.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().waits.len()
    }

    /// Stop every wait due at `now`, and note when the next is due.
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
        // Outside the lock: a sleeper closing may take it again.
        for s in due.iter().filter_map(Weak::upgrade) {
            s.stop(Stop::Expired);
        }
        next
    }

    /// Stop every wait, now and to come.
    fn stop(&self) {
        let waits = {
            let mut lot = self.lock();
            lot.stopped = true;
            lot.armed = None;
            std::mem::take(&mut lot.waits)
        };
        for s in waits.values().filter_map(Weak::upgrade) {
            s.stop(Stop::Shutdown);
        }
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

/// The sweep: stops the waits that are due, each at its deadline, and all of them on
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

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

/// The socket's readiness: the TLS layer has no plaintext buffered when the connection
/// parks (its last read was pending), so bytes for it arrive on the socket.
impl ReadReady for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.poll_read_ready(cx)
    }
}

impl<I: ReadReady> ReadReady for Tracked<I> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_read_ready(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;

    /// Reports its stop, and when.
    struct Probe {
        tx: mpsc::UnboundedSender<(u32, Stop, Instant)>,
        n: u32,
    }

    impl Sleeper for Probe {
        fn stop(self: Arc<Self>, why: Stop) {
            let _ = self.tx.send((self.n, why, Instant::now()));
        }
    }

    type Stops = mpsc::UnboundedReceiver<(u32, Stop, Instant)>;

    fn lot() -> (Arc<ParkLot>, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        (ParkLot::new(rx), tx)
    }

    /// `n` probes reporting to one channel; the lot holds them weakly, the caller keeps them.
    fn probes(n: u32) -> (Vec<Arc<Probe>>, Stops) {
        let (tx, rx) = mpsc::unbounded_channel();
        let v = (0..n)
            .map(|n| Arc::new(Probe { tx: tx.clone(), n }))
            .collect();
        (v, rx)
    }

    fn enter(lot: &Arc<ParkLot>, p: &Arc<Probe>, until: Instant) -> Option<Key> {
        let key = lot.key(until);
        let weak = Arc::downgrade(p) as Weak<dyn Sleeper>;
        lot.enter(key, weak).then_some(key)
    }

    async fn next(rx: &mut Stops) -> (u32, Stop, Instant) {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("a stop within 2 s")
            .expect("a probe alive")
    }

    #[tokio::test]
    async fn waits_end_at_their_deadlines_in_order() {
        let (lot, _tx) = lot();
        let (p, mut rx) = probes(2);
        let t0 = Instant::now();
        let at = move |ms| t0 + Duration::from_millis(ms);
        // The later first: the sweep must move its wake-up earlier for the second.
        enter(&lot, &p[0], at(400)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        enter(&lot, &p[1], at(150)).unwrap();
        let (n, why, ended) = next(&mut rx).await;
        assert_eq!((n, why), (1, Stop::Expired));
        assert!(ended >= at(150) && ended < at(350), "{:?}", ended - t0);
        assert_eq!(lot.len(), 1, "the later wait is still there");
        let (n, why, ended) = next(&mut rx).await;
        assert_eq!((n, why), (0, Stop::Expired));
        assert!(ended >= at(400), "{:?}", ended - t0);
        assert_eq!(lot.len(), 0);
    }

    #[tokio::test]
    async fn a_wait_that_leaves_is_not_stopped() {
        let (lot, _tx) = lot();
        let (p, mut rx) = probes(2);
        let soon = Instant::now() + Duration::from_millis(50);
        let key = enter(&lot, &p[0], soon).unwrap();
        enter(&lot, &p[1], soon + Duration::from_millis(10)).unwrap();
        lot.leave(key);
        assert_eq!(lot.len(), 1);
        assert_eq!(next(&mut rx).await.0, 1, "only the one that stayed");
        assert_eq!(lot.len(), 0);
        // A sleeper gone without leaving (its connection dropped): its entry still goes
        // at its deadline.
        let (p, _rx) = probes(1);
        enter(&lot, &p[0], Instant::now()).unwrap();
        drop(p);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lot.len(), 0);
    }

    #[tokio::test]
    async fn shutdown_stops_every_wait_and_refuses_later_ones() {
        let (lot, tx) = lot();
        let (p, mut rx) = probes(4);
        let far = Instant::now() + Duration::from_secs(60);
        for s in &p[..3] {
            enter(&lot, s, far).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lot.len(), 3);
        let t = Instant::now();
        tx.send(true).unwrap();
        let mut stopped: Vec<_> = Vec::new();
        for _ in 0..3 {
            let (n, why, _) = next(&mut rx).await;
            assert_eq!(why, Stop::Shutdown);
            stopped.push(n);
        }
        stopped.sort_unstable();
        assert_eq!(stopped, [0, 1, 2]);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(lot.len(), 0);
        assert_eq!(enter(&lot, &p[3], far), None, "parked after shutdown");
    }

    #[tokio::test]
    async fn the_sweep_ends_with_the_lot() {
        let (lot, _tx) = lot();
        let (p, _rx) = probes(1);
        let key = enter(&lot, &p[0], Instant::now() + Duration::from_secs(60)).unwrap();
        lot.leave(key);
        // The sweep is running, asleep until that wait's deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let weak = Arc::downgrade(&lot);
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
