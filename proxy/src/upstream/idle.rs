//! An endpoint's stock of idle connections of the gateway's own HTTP/1.1 client ([`h1`]),
//! given back by downstream connections that parked or closed, for the next downstream
//! connection that has none of its own to the endpoint: newest first, at most the
//! upstream's `pool_max_idle_per_endpoint` (the oldest pushed out and closed), none handed
//! out after [`IDLE_TIMEOUT`]. The common request, on a connection that already has its
//! own, never touches it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::h1;

/// How long a connection may wait in the stock: as long as hyper's pools let theirs idle.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One endpoint's idle connections, with when each was put in, oldest first.
#[derive(Debug, Default)]
pub(super) struct IdlePool(Mutex<VecDeque<(Instant, h1::Conn)>>);

impl IdlePool {
    /// Keep `conn`, its buffers given back, pushing out (closing) the oldest beyond `max`
    /// and any that have waited past [`IDLE_TIMEOUT`].
    pub(super) fn put(&self, conn: h1::Conn, max: usize) {
        self.put_at(conn, max, Instant::now());
    }

    /// The newest connection kept, unless it has waited past [`IDLE_TIMEOUT`] (then every
    /// one kept is closed: the others are older).
    pub(super) fn take(&self) -> Option<h1::Conn> {
        self.take_at(Instant::now())
    }

    fn put_at(&self, mut conn: h1::Conn, max: usize, now: Instant) {
        if max == 0 {
            return;
        }
        conn.park();
        let mut out = Vec::new();
        {
            let mut q = self.0.lock().expect("not poisoned");
            while q
                .front()
                .is_some_and(|(at, _)| q.len() >= max || now - *at >= IDLE_TIMEOUT)
            {
                out.extend(q.pop_front());
            }
            q.push_back((now, conn));
        }
        // Closed outside the lock.
        drop(out);
    }

    fn take_at(&self, now: Instant) -> Option<h1::Conn> {
        let mut q = self.0.lock().expect("not poisoned");
        let (at, conn) = q.pop_back()?;
        if now - at < IDLE_TIMEOUT {
            return Some(conn);
        }
        let stale = std::mem::take(&mut *q);
        drop(q);
        drop((stale, conn));
        None
    }

    /// How many are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().expect("not poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// `n` connections to a listener, with the listener's ends in the order connected.
    async fn conns(n: usize) -> (Vec<h1::Conn>, Vec<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..n {
            ours.push(h1::Conn::new(TcpStream::connect(addr).await.unwrap()));
            theirs.push(l.accept().await.unwrap().0);
        }
        (ours, theirs)
    }

    /// Whether the peer of `s` has closed the connection.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn newest_first_and_bounded() {
        let pool = IdlePool::default();
        let (ours, mut theirs) = conns(3).await;
        for c in ours {
            pool.put(c, 2);
        }
        assert_eq!(pool.len(), 2);
        assert!(
            closed(&mut theirs[0]).await,
            "the oldest is pushed out and closed"
        );
        assert!(!closed(&mut theirs[2]).await);
        // The newest comes out first: closing it shows which end it was.
        drop(pool.take().expect("one kept"));
        assert!(closed(&mut theirs[2]).await);
        assert!(!closed(&mut theirs[1]).await);
        assert!(pool.take().is_some());
        assert!(pool.take().is_none());
    }

    #[tokio::test]
    async fn none_kept_with_a_zero_cap() {
        let pool = IdlePool::default();
        let (mut ours, mut theirs) = conns(1).await;
        pool.put(ours.pop().unwrap(), 0);
        assert_eq!(pool.len(), 0);
        assert!(closed(&mut theirs[0]).await);
    }

    #[tokio::test]
    async fn none_handed_out_after_the_idle_timeout() {
        let pool = IdlePool::default();
        let t0 = Instant::now();
        let later = t0 + IDLE_TIMEOUT;
        let (ours, _theirs) = conns(2).await;
        for c in ours {
            pool.put_at(c, 8, t0);
        }
        assert!(pool.take_at(later).is_none());
        assert_eq!(pool.len(), 0, "the older one is closed with it");
        let (mut ours, _theirs) = conns(2).await;
        pool.put_at(ours.pop().unwrap(), 8, t0);
        pool.put_at(ours.pop().unwrap(), 8, later);
        assert_eq!(
            pool.len(),
            1,
            "an expired one is pushed out by the next put"
        );
        assert!(pool.take_at(later).is_some());
    }
}
