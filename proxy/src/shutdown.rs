//! The stop signal every task watches.
//!
//! Shutdown flows through one `watch` channel owned by [`crate::Server`]: accept loops,
//! connections, the reloader and the background controllers each hold a receiver and stop
//! when it reads `true`. The HTTP/1 connection loops, which look at it beside every
//! request, watch a [`Stop`] made from it instead. A leaf: it depends on nothing else in the
//! crate.

use std::future::{Future, poll_fn};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use slab::Slab;
use tokio::sync::watch;

/// Resolve once `rx` reads `true` (or its sender is gone).
#[inline]
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here, inside.
    let _ = rx.wait_for(|s| *s).await;
}

/// Resolve on SIGTERM or SIGINT.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The stop signal as a connection loop watches it beside every request: a flag, read with
/// one load, and the wakers of the tasks waiting on it, each registered once for the task's
/// life ([`Stop::watch`]). A `watch` receiver's `wait_for` took its lock and put a waiter in
/// and out of a list on every wait for a head, and its three borrows a read lock each:
/// about 450 instructions per request (`benches/peers/profile.sh`).
#[derive(Debug)]
pub struct Stop {
    stopping: AtomicBool,
    waiting: Mutex<Slab<Waker>>,
}

impl Stop {
    /// A signal that fires once `rx` reads `true` (or its sender is gone); a task of its
    /// own waits for that (on the current runtime).
    pub fn new(mut rx: watch::Receiver<bool>) -> Arc<Self> {
        let stop = Arc::new(Self {
            stopping: AtomicBool::new(false),
            waiting: Mutex::new(Slab::new()),
        });
        let weak = Arc::downgrade(&stop);
        tokio::spawn(async move {
            stopped(&mut rx).await;
            if let Some(stop) = weak.upgrade() {
                stop.fire();
            }
        });
        stop
    }

    /// Whether the signal has fired.
    #[inline]
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Set the flag, then wake every task watching. A task that registers after the wakes
    /// took the lock after them, so it reads the flag set.
    fn fire(&self) {
        self.stopping.store(true, Ordering::Release);
        for (_, waker) in self.lock().iter() {
            waker.wake_by_ref();
        }
    }

    /// Register the calling task: it is woken when the signal fires, for as long as the
    /// returned guard lives. Poll [`Watching::stopped`] only from this task.
    pub async fn watch(&self) -> Watching<'_> {
        let waker = poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        let key = self.lock().insert(waker);
        Watching { stop: self, key }
    }

    fn lock(&self) -> MutexGuard<'_, Slab<Waker>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tasks registered.
    #[cfg(test)]
    fn watching(&self) -> usize {
        self.lock().len()
    }
}

/// A task's registration with a [`Stop`].
#[derive(Debug)]
pub struct Watching<'s> {
    stop: &'s Stop,
    key: usize,
}

impl Watching<'_> {
    /// Whether the signal has fired.
    #[inline]
    pub fn is_stopping(&self) -> bool {
        self.stop.is_stopping()
    }

    /// Resolves once the signal has fired: a load per poll (the task's waker is registered
    /// already).
    #[inline]
    pub fn stopped(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|_| match self.is_stopping() {
            true => Poll::Ready(()),
            false => Poll::Pending,
        })
    }
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.stop.lock().remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_watching_task_is_woken_when_the_signal_fires() {
        let (tx, rx) = watch::channel(false);
        let stop = Stop::new(rx);
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let w = stop.watch().await;
                w.stopped().await;
                assert!(w.is_stopping());
            }
        });
        // Registered and waiting before the signal.
        while stop.watching() == 0 {
            tokio::task::yield_now().await;
        }
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("woken by the signal")
            .unwrap();
        assert_eq!(stop.watching(), 0, "the registration goes with the task");
    }

    #[tokio::test]
    async fn a_task_registering_after_the_signal_sees_it() {
        let (tx, rx) = watch::channel(false);
        let stop = Stop::new(rx);
        tx.send(true).unwrap();
        while !stop.is_stopping() {
            tokio::task::yield_now().await;
        }
        let w = stop.watch().await;
        tokio::time::timeout(Duration::from_secs(5), w.stopped())
            .await
            .expect("already stopped");
    }

    #[tokio::test]
    async fn a_dropped_sender_fires_it() {
        let (tx, rx) = watch::channel(false);
        let stop = Stop::new(rx);
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !stop.is_stopping() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("fired");
    }
}
