//! Parked connections: idle keep-alive connections kept without a task of their own, their
//! deadlines and shutdown watched for all of them by one sweep task.
//!
//! An idle connection costs what it keeps while it waits, and a task per parked connection
//! would be a 384-byte task cell around its future (640 with a timer and a shutdown wait
//! in it). A parked connection is one of two kinds, each with an entry in its server's
//! [`ParkLot`], a table of deadlines ordered by time:
//!
//! - **dormant** (plain TCP): its socket taken out of the runtime's event loop (tokio's
//!   registration is 256 bytes and an allocation of its own) and watched by the lot's own
//!   `epoll` set, keyed by a slot of the lot's table, which holds the socket and what the
//!   connection needs to go on (its deadlines, its connection permit): about 120 bytes, in
//!   one array for all of them, so thousands of idle connections leave no small objects
//!   scattered among the pages their busy moments used, and the allocator can give those
//!   back. The lot's sweep task watches the set's readiness with the rest;
//! - **sleeping** (TLS, whose session state lives in the stream): a [`Sleeper`] of its own,
//!   which the socket's readiness holds as the waker of its read interest, held by the table
//!   by a weak reference.
//!
//! Bytes arriving take the connection out of the table and start a task to serve it on; the
//! sweep task sleeps until the earliest deadline and closes the connections that are due,
//! and closes them all on shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use mio::unix::SourceFd;
use tokio::io::unix::AsyncFd;
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

    /// Whether it can park by its socket's descriptor ([`ReadReady::into_dormant`]); not a
    /// stream with state of its own (TLS), which parks as a [`Sleeper`].
    fn parks_dormant(&self) -> bool {
        false
    }

    /// The plain socket under it, out of the runtime's event loop, to park by its
    /// descriptor. For a stream that [`parks_dormant`](ReadReady::parks_dormant) only (the
    /// others give `Unsupported`, and are lost).
    fn into_dormant(self) -> io::Result<std::net::TcpStream>
    where
        Self: Sized,
    {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The wait of a parked connection in its lot: see [`ParkLot::enter`].
pub type Key = (Instant, u64);

/// What serves a dormant connection on once it has bytes: its socket, registered with the
/// runtime again, and what was parked with it ([`ParkLot::park_dormant`]). Called in the
/// lot's sweep task.
pub type Resume<T> = fn(tokio::net::TcpStream, T);

/// The waits of one server's parked connections; `T` is what a dormant one keeps.
pub struct ParkLot<T> {
    inner: Mutex<Lot<T>>,
    ids: AtomicU64,
    /// Wakes the sweep: a wait due before the sweep's next run was added, or the lot is gone.
    sweep: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
    /// Where the sweep runs, and where sleepers start the tasks that serve or close them
    /// (a waker may be called outside the runtime's context).
    runtime: Handle,
    /// Where dormant sockets are registered: the lot's own `epoll` set (`None` if it could
    /// not be made: plain connections then park as sleepers).
    registry: Option<mio::Registry>,
    resume: Resume<T>,
}

struct Lot<T> {
    /// By deadline, then by an id that makes keys unique.
    waits: BTreeMap<Key, Waiter>,
    /// When the sweep task will next look at the table (`None`: not running, or nothing
    /// to wait for).
    armed: Option<Instant>,
    /// The sweep task is spawned (with the first wait).
    sweeping: bool,
    /// Shutdown has stopped every wait; later ones are refused.
    stopped: bool,
    /// The `epoll` set of dormant sockets, as the runtime watches it, until the sweep task
    /// takes it.
    poll: Option<AsyncFd<mio::Poll>>,
    dormant: Slab<T>,
}

/// Who waits in the table.
enum Waiter {
    Sleeper(Weak<dyn Sleeper>),
    /// A dormant connection, by its slot.
    Dormant(u32),
}

/// Dormant connections in one array, reusing the slots that leave. A slot's generation
/// goes up each time it is taken, and its `epoll` token carries it, so an event read for a
/// connection that has left since is not taken for the one now in its slot.
struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// The first free slot, whose `Free` names the next (`u32::MAX`: none).
    free: u32,
}

enum Slot<T> {
    Free {
        generation: u32,
        next: u32,
    },
    Taken {
        generation: u32,
        key: Key,
        stream: std::net::TcpStream,
        state: T,
    },
}

impl<T: Send + 'static> ParkLot<T> {
    /// An empty lot in the current runtime; its waits end on shutdown (`shutdown` reads
    /// `true`, or its sender is gone); `resume` serves its dormant connections on.
    pub fn new(shutdown: watch::Receiver<bool>, resume: Resume<T>) -> Arc<Self> {
        let (registry, poll) = match dormant_set() {
            Ok((r, p)) => (Some(r), Some(p)),
            Err(e) => {
                tracing::warn!(error = %e, "no epoll set for idle connections: they park with the runtime's registration");
                (None, None)
            }
        };
        Arc::new(Self {
            inner: Mutex::new(Lot {
                waits: BTreeMap::new(),
                armed: None,
                sweeping: false,
                stopped: false,
                poll,
                dormant: Slab::default(),
            }),
            ids: AtomicU64::new(0),
            sweep: Arc::new(Notify::new()),
            shutdown,
            runtime: Handle::current(),
            registry,
            resume,
        })
    }

    /// Whether plain connections park dormant ([`ParkLot::park_dormant`]).
    pub fn takes_dormant(&self) -> bool {
        self.registry.is_some()
    }

    /// Park a plain connection by its socket, with `state`, until `until`: its socket's
    /// bytes serve it on ([`Resume`]); its deadline or shutdown close it (the socket and
    /// `state` dropped). `Err` gives both back when it cannot park (shutdown has begun, or
    /// the lot takes none): the caller closes it.
    pub fn park_dormant(
        self: &Arc<Self>,
        stream: std::net::TcpStream,
        until: Instant,
        state: T,
    ) -> Result<(), (std::net::TcpStream, T)> {
        let Some(registry) = &self.registry else {
            return Err((stream, state));
        };
        let key = self.key(until);
        let mut lot = self.lock();
        if lot.stopped {
            return Err((stream, state));
        }
        let fd = stream.as_raw_fd();
        let (slot, token) = lot.dormant.insert(key, stream, state);
        // Edge-triggered, as the runtime's own registrations: bytes already there when it
        // is added count as an edge.
        let interest = mio::Interest::READABLE;
        if let Err(e) = registry.register(&mut SourceFd(&fd), mio::Token(token as usize), interest)
        {
            tracing::debug!(error = %e, "parking an idle connection");
            let (_, stream, state) = lot.dormant.take(slot).expect("just put");
            return Err((stream, state));
        }
        self.wait(&mut lot, key, Waiter::Dormant(slot));
        Ok(())
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
        self.wait(&mut lot, key, Waiter::Sleeper(sleeper));
        true
    }

    /// Add a wait to the table, the sweep started or moved earlier for it.
    fn wait(self: &Arc<Self>, lot: &mut Lot<T>, key: Key, w: Waiter) {
        lot.waits.insert(key, w);
        if !lot.sweeping {
            lot.sweeping = true;
            let (me, sweep) = (Arc::downgrade(self), self.sweep.clone());
            let poll = lot.poll.take();
            self.runtime
                .spawn(sweep_task(me, sweep, self.shutdown.clone(), poll));
        }
        if lot.armed.is_none_or(|at| key.0 < at) {
            lot.armed = Some(key.0);
            self.sweep.notify_one();
        }
    }

    /// Stop watching the wait `key`: its bytes came.
    pub fn leave(&self, key: Key) {
        self.lock().waits.remove(&key);
    }

    /// Serve on the dormant connections the `epoll` set reported: out of the table and the
    /// set, back into the runtime's event loop, handed to [`Resume`].
    fn woken(&self, events: &mio::Events) {
        let mut ready = Vec::new();
        {
            let mut lot = self.lock();
            for e in events {
                let Some((key, stream, state)) = lot.dormant.take_token(e.token().0) else {
                    continue; // gone meanwhile (closed at its deadline)
                };
                lot.waits.remove(&key);
                if let Some(r) = &self.registry {
                    // Before the runtime registers the same descriptor: a socket parked
                    // again later is added again.
                    let _ = r.deregister(&mut SourceFd(&stream.as_raw_fd()));
                }
                ready.push((stream, state));
            }
        }
        for (stream, state) in ready {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => (self.resume)(s, state),
                Err(e) => tracing::debug!(error = %e, "resuming an idle connection"),
            }
        }
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

    /// Dormant connections in the lot.
    #[cfg(test)]
    fn dormant(&self) -> usize {
        self.lock().dormant.len()
    }

    /// Stop every wait due at `now`, and note when the next is due.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut due = Vec::new();
        let mut closed = Vec::new();
        let next = {
            let mut lot = self.lock();
            while let Some(e) = lot.waits.first_entry() {
                if e.key().0 > now {
                    break;
                }
                match e.remove() {
                    Waiter::Sleeper(s) => due.push(s),
                    Waiter::Dormant(slot) => closed.extend(lot.dormant.take(slot)),
                }
            }
            lot.armed = lot.waits.first_key_value().map(|(k, _)| k.0);
            lot.armed
        };
        // Outside the lock: a sleeper closing may take it again; a closing socket leaves
        // the `epoll` set with its descriptor.
        drop(closed);
        for s in due.iter().filter_map(Weak::upgrade) {
            s.stop(Stop::Expired);
        }
        next
    }

    /// Stop every wait, now and to come.
    fn stop(&self) {
        let (waits, dormant) = {
            let mut lot = self.lock();
            lot.stopped = true;
            lot.armed = None;
            let dormant = std::mem::take(&mut lot.dormant);
            (std::mem::take(&mut lot.waits), dormant)
        };
        drop(dormant);
        for w in waits.into_values() {
            if let Waiter::Sleeper(s) = w
                && let Some(s) = s.upgrade()
            {
                s.stop(Stop::Shutdown);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lot<T>> {
        // Every update leaves the table whole; a panic elsewhere does not make it wrong.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> Drop for ParkLot<T> {
    fn drop(&mut self) {
        // The sweep holds only a weak reference: let it see that the lot is gone.
        self.sweep.notify_one();
    }
}

/// The lot's `epoll` set for dormant sockets: its registry, and the set as the runtime
/// watches it (an `epoll` descriptor is readable while it has events to read).
fn dormant_set() -> io::Result<(mio::Registry, AsyncFd<mio::Poll>)> {
    let poll = mio::Poll::new()?;
    let registry = poll.registry().try_clone()?;
    // Deprecated because in general nothing ties the descriptor to the value for the
    // registration's life; a `mio::Poll` owns its `epoll` descriptor and gives the same one
    // until it is dropped (with the `AsyncFd`), which is what the registration needs.
    #[allow(deprecated)]
    let set = AsyncFd::with_interest(poll, tokio::io::Interest::READABLE)?;
    Ok((registry, set))
}

// A dormant connection's `epoll` token is its slot and the slot's generation, 32 bits each.
const _: () = assert!(usize::BITS >= 64);

/// Events read from the `epoll` set at a time.
const EVENTS: usize = 256;

/// The sweep: stops the waits that are due, each at its deadline, and all of them on
/// shutdown, and serves on the dormant connections whose bytes came; returns on shutdown,
/// or once the lot is gone.
async fn sweep_task<T: Send + 'static>(
    lot: Weak<ParkLot<T>>,
    sweep: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
    mut poll: Option<AsyncFd<mio::Poll>>,
) {
    let mut events = mio::Events::with_capacity(EVENTS);
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
            Some(Ok(mut ready)) = readable(&mut poll) => {
                // Read without blocking: the runtime said there are events.
                match ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the idle connections' epoll set");
                        continue;
                    }
                }
                // A full batch may have left events behind: look again before waiting.
                if events.iter().count() < EVENTS {
                    ready.clear_ready();
                }
                let Some(l) = lot.upgrade() else { return };
                l.woken(&events);
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
        }
    }
}

/// The `epoll` set's next readiness; never, without one.
async fn readable(
    poll: &mut Option<AsyncFd<mio::Poll>>,
) -> Option<io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, mio::Poll>>> {
    match poll {
        Some(p) => Some(p.readable_mut().await),
        None => std::future::pending().await,
    }
}

// === impl Slab ===

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: u32::MAX,
        }
    }
}

impl<T> Slab<T> {
    /// Put a dormant connection in a free slot: the slot, and the `epoll` token for it.
    fn insert(&mut self, key: Key, stream: std::net::TcpStream, state: T) -> (u32, u64) {
        let (slot, generation) = match self.slots.get(self.free as usize) {
            Some(&Slot::Free { generation, next }) => {
                let slot = self.free;
                self.free = next;
                (slot, generation.wrapping_add(1))
            }
            _ => {
                self.slots.push(Slot::Free {
                    generation: 0,
                    next: u32::MAX,
                });
                (self.slots.len() as u32 - 1, 0)
            }
        };
        self.slots[slot as usize] = Slot::Taken {
            generation,
            key,
            stream,
            state,
        };
        (slot, (u64::from(generation) << 32) | u64::from(slot))
    }

    /// The connection in `slot`, which becomes free.
    fn take(&mut self, slot: u32) -> Option<(Key, std::net::TcpStream, T)> {
        let s = self.slots.get_mut(slot as usize)?;
        let generation = match s {
            Slot::Taken { generation, .. } => *generation,
            Slot::Free { .. } => return None,
        };
        let free = Slot::Free {
            generation,
            next: self.free,
        };
        self.free = slot;
        match std::mem::replace(s, free) {
            Slot::Taken {
                key, stream, state, ..
            } => Some((key, stream, state)),
            Slot::Free { .. } => unreachable!("checked above"),
        }
    }

    /// The connection an `epoll` token names, if it is still the one in its slot.
    fn take_token(&mut self, token: usize) -> Option<(Key, std::net::TcpStream, T)> {
        let (slot, generation) = (token as u32, (token as u64 >> 32) as u32);
        match self.slots.get(slot as usize)? {
            Slot::Taken { generation: g, .. } if *g == generation => self.take(slot),
            _ => None,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Taken { .. }))
            .count()
    }
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }

    fn parks_dormant(&self) -> bool {
        true
    }

    fn into_dormant(self) -> io::Result<std::net::TcpStream> {
        self.into_std()
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

    /// What a test's dormant connection keeps: its number, where its resumption is told,
    /// and a count that tells whether it was dropped.
    struct Kept {
        n: u32,
        woke: mpsc::UnboundedSender<(u32, tokio::net::TcpStream)>,
        _alive: Arc<()>,
    }

    fn resume(s: tokio::net::TcpStream, k: Kept) {
        let _ = k.woke.send((k.n, s));
    }

    type Woken = mpsc::UnboundedReceiver<(u32, tokio::net::TcpStream)>;

    fn lot() -> (Arc<ParkLot<Kept>>, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        (ParkLot::new(rx, resume), tx)
    }

    /// `n` probes reporting to one channel; the lot holds them weakly, the caller keeps them.
    fn probes(n: u32) -> (Vec<Arc<Probe>>, Stops) {
        let (tx, rx) = mpsc::unbounded_channel();
        let v = (0..n)
            .map(|n| Arc::new(Probe { tx: tx.clone(), n }))
            .collect();
        (v, rx)
    }

    fn enter(lot: &Arc<ParkLot<Kept>>, p: &Arc<Probe>, until: Instant) -> Option<Key> {
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

    /// A client and the server's side of its connection, as a parked connection's socket.
    async fn pair() -> (tokio::net::TcpStream, std::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s.into_std().unwrap())
    }

    fn park(
        lot: &Arc<ParkLot<Kept>>,
        s: std::net::TcpStream,
        until: Instant,
        n: u32,
        woke: &mpsc::UnboundedSender<(u32, tokio::net::TcpStream)>,
        alive: &Arc<()>,
    ) -> bool {
        let k = Kept {
            n,
            woke: woke.clone(),
            _alive: alive.clone(),
        };
        lot.park_dormant(s, until, k).is_ok()
    }

    async fn woken(rx: &mut Woken) -> (u32, tokio::net::TcpStream) {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("resumed within 2 s")
            .expect("the sender kept")
    }

    /// The client sees its connection closed within 2 s.
    async fn closed(c: &mut tokio::net::TcpStream) {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b))
            .await
            .expect("closed within 2 s");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }

    #[tokio::test]
    async fn a_dormant_connection_resumes_on_bytes_and_can_sleep_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (lot, _tx) = lot();
        assert!(lot.takes_dormant());
        let (wtx, mut wrx) = mpsc::unbounded_channel();
        let alive = Arc::new(());
        let far = Instant::now() + Duration::from_secs(60);
        let (mut c, s) = pair().await;
        assert!(park(&lot, s, far, 7, &wtx, &alive));
        assert_eq!((lot.len(), lot.dormant()), (1, 1));
        let quiet = tokio::time::timeout(Duration::from_millis(100), wrx.recv()).await;
        assert!(quiet.is_err(), "resumed without bytes");
        for (n, byte) in [(7, b'x'), (8, b'y'), (9, b'z')] {
            c.write_all(&[byte]).await.unwrap();
            let (got, mut s) = woken(&mut wrx).await;
            assert_eq!(got, n);
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], byte, "the bytes that woke it are there to read");
            assert_eq!((lot.len(), lot.dormant()), (0, 0));
            // Its descriptor left the lot's set as it woke: it can sleep again.
            assert!(park(&lot, s.into_std().unwrap(), far, n + 1, &wtx, &alive));
        }
        assert_eq!(
            Arc::strong_count(&alive),
            2,
            "the one asleep keeps its state"
        );
    }

    #[tokio::test]
    async fn bytes_already_there_resume_a_dormant_connection_at_once() {
        use tokio::io::AsyncWriteExt;
        let (lot, _tx) = lot();
        let (wtx, mut wrx) = mpsc::unbounded_channel();
        let alive = Arc::new(());
        let (mut c, s) = pair().await;
        c.write_all(b"GET").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let far = Instant::now() + Duration::from_secs(60);
        assert!(park(&lot, s, far, 1, &wtx, &alive));
        assert_eq!(woken(&mut wrx).await.0, 1);
    }

    #[tokio::test]
    async fn a_dormant_connection_closes_at_its_deadline() {
        let (lot, _tx) = lot();
        let (wtx, _wrx) = mpsc::unbounded_channel();
        let alive = Arc::new(());
        let (mut c, s) = pair().await;
        let (c2, s2) = pair().await;
        let t0 = Instant::now();
        assert!(park(
            &lot,
            s,
            t0 + Duration::from_millis(100),
            1,
            &wtx,
            &alive
        ));
        assert!(park(
            &lot,
            s2,
            t0 + Duration::from_secs(60),
            2,
            &wtx,
            &alive
        ));
        closed(&mut c).await;
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert_eq!(Arc::strong_count(&alive), 2, "its state dropped with it");
        assert_eq!((lot.len(), lot.dormant()), (1, 1));
        // The other is still open.
        let mut b = [0u8; 1];
        assert!(matches!(c2.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
    }

    #[tokio::test]
    async fn shutdown_closes_dormant_connections_and_refuses_later_ones() {
        let (lot, tx) = lot();
        let (wtx, _wrx) = mpsc::unbounded_channel();
        let alive = Arc::new(());
        let far = Instant::now() + Duration::from_secs(60);
        let (mut c1, s1) = pair().await;
        let (mut c2, s2) = pair().await;
        assert!(park(&lot, s1, far, 1, &wtx, &alive));
        assert!(park(&lot, s2, far, 2, &wtx, &alive));
        tx.send(true).unwrap();
        closed(&mut c1).await;
        closed(&mut c2).await;
        assert_eq!((lot.len(), lot.dormant()), (0, 0));
        let (_c3, s3) = pair().await;
        assert!(
            !park(&lot, s3, far, 3, &wtx, &alive),
            "parked after shutdown"
        );
        assert_eq!(Arc::strong_count(&alive), 1);
    }

    /// An `epoll` event read for a connection that left its slot is not taken for the one
    /// that took the slot next.
    #[tokio::test]
    async fn a_reused_slot_answers_only_its_own_token() {
        let mut slab: Slab<u32> = Slab::default();
        let key = (Instant::now(), 0);
        let (_c1, s1) = pair().await;
        let (_c2, s2) = pair().await;
        let (slot, old) = slab.insert(key, s1, 1);
        assert!(slab.take(slot).is_some());
        let (again, new) = slab.insert(key, s2, 2);
        assert_eq!(again, slot, "the free slot is reused");
        assert_ne!(old, new);
        assert!(slab.take_token(old as usize).is_none());
        assert_eq!(slab.take_token(new as usize).map(|t| t.2), Some(2));
        assert_eq!(slab.len(), 0);
    }
}
