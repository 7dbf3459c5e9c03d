//! An endpoint's stock of idle connections of the gateway's own HTTP/1.1 client ([`h1`]),
//! given back by downstream connections that parked or closed, for the next downstream
//! connection that has none of its own to the endpoint: newest first, at most the
//! upstream's `pool_max_idle_per_endpoint` (the oldest pushed out and closed), none handed
//! out after [`IDLE_TIMEOUT`] or to an endpoint whose host name now resolves to another
//! address. The common request, on a connection that already has its own, never touches
//! it. A stocked connection is its bare socket, out of the runtime's event loop
//! ([`h1::Conn::into_idle`]): registered again when it is taken.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::h1;

/// How long a connection may wait in the stock: as long as hyper's pools let theirs idle.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One endpoint's idle connections, with when each was put in and the address it is
/// connected to, oldest first.
#[derive(Debug, Default)]
pub(super) struct IdlePool(Mutex<VecDeque<(Instant, SocketAddr, std::net::TcpStream)>>);

impl IdlePool {
    /// Keep `conn` as its bare socket, pushing out (closing) the oldest beyond `max` and any
    /// that have waited past [`IDLE_TIMEOUT`].
    pub(super) fn put(&self, conn: h1::Conn, max: usize) {
        self.put_at(conn, max, Instant::now());
    }

    /// The newest connection kept that is connected to `addr` (the endpoint's address now;
    /// newer ones to another address are closed) and still idle (one the upstream closed or
    /// wrote to meanwhile is closed, and the next tried), unless it has waited past
    /// [`IDLE_TIMEOUT`] (then every one kept is closed: the others are older).
    pub(super) fn take(&self, addr: SocketAddr) -> Option<h1::Conn> {
        self.take_at(addr, Instant::now())
    }

    fn put_at(&self, conn: h1::Conn, max: usize, now: Instant) {
        // No address: the socket is broken, and closed here.
        let Some(addr) = conn.peer().filter(|_| max > 0) else {
            return;
        };
        let Some(conn) = conn.into_idle() else {
            return;
        };
        let mut out = Vec::new();
        {
            let mut q = self.0.lock().expect("not poisoned");
            while q
                .front()
                .is_some_and(|(at, _, _)| q.len() >= max || now - *at >= IDLE_TIMEOUT)
            {
                out.extend(q.pop_front());
            }
            q.push_back((now, addr, conn));
        }
        // Closed outside the lock.
        drop(out);
    }

    fn take_at(&self, addr: SocketAddr, now: Instant) -> Option<h1::Conn> {
        let mut out = Vec::new();
        let mut q = self.0.lock().expect("not poisoned");
        let found = loop {
            let Some((at, to, conn)) = q.pop_back() else {
                break None;
            };
            if now - at >= IDLE_TIMEOUT {
                out.extend(q.drain(..).map(|(_, _, c)| c));
                out.push(conn);
                break None;
            }
            // One closed or written to while it waited is closed (below); the next is tried.
            if to == addr && h1::Conn::still_idle(&conn) {
                break Some(conn);
            }
            out.push(conn);
        };
        drop(q);
        // Closed, and the one taken registered with the runtime, outside the lock.
        drop(out);
        found.and_then(h1::Conn::from_idle)
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

    /// `n` connections to a listener, with the listener's ends in the order connected, and
    /// its address.
    async fn conns(n: usize) -> (Vec<h1::Conn>, Vec<TcpStream>, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..n {
            ours.push(h1::Conn::new(TcpStream::connect(addr).await.unwrap()));
            theirs.push(l.accept().await.unwrap().0);
        }
        (ours, theirs, addr)
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
        let (ours, mut theirs, addr) = conns(3).await;
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
        drop(pool.take(addr).expect("one kept"));
        assert!(closed(&mut theirs[2]).await);
        assert!(!closed(&mut theirs[1]).await);
        assert!(pool.take(addr).is_some());
        assert!(pool.take(addr).is_none());
    }

    #[tokio::test]
    async fn none_kept_with_a_zero_cap() {
        let pool = IdlePool::default();
        let (mut ours, mut theirs, _) = conns(1).await;
        pool.put(ours.pop().unwrap(), 0);
        assert_eq!(pool.len(), 0);
        assert!(closed(&mut theirs[0]).await);
    }

    #[tokio::test]
    async fn none_handed_out_after_the_idle_timeout() {
        let pool = IdlePool::default();
        let t0 = Instant::now();
        let later = t0 + IDLE_TIMEOUT;
        let (ours, _theirs, addr) = conns(2).await;
        for c in ours {
            pool.put_at(c, 8, t0);
        }
        assert!(pool.take_at(addr, later).is_none());
        assert_eq!(pool.len(), 0, "the older one is closed with it");
        let (mut ours, _theirs, addr) = conns(2).await;
        pool.put_at(ours.pop().unwrap(), 8, t0);
        pool.put_at(ours.pop().unwrap(), 8, later);
        assert_eq!(
            pool.len(),
            1,
            "an expired one is pushed out by the next put"
        );
        assert!(pool.take_at(addr, later).is_some());
    }

    /// A stocked connection the upstream wrote to unasked, or closed, while it waited is
    /// not handed out (its bytes would be taken for the next request's answer), and is
    /// closed; one left alone still is handed out.
    #[tokio::test]
    async fn none_handed_out_with_unasked_bytes_or_closed() {
        use tokio::io::AsyncWriteExt;
        let pool = IdlePool::default();
        let (mut ours, mut theirs, addr) = conns(3).await;
        for c in ours.drain(..) {
            pool.put(c, 8);
        }
        // Newest first: the third is left alone, the second written to, the first closed.
        theirs[1]
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap();
        drop(theirs.remove(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let taken = pool.take(addr).expect("the one left alone");
        drop(taken);
        assert!(
            pool.take(addr).is_none(),
            "written to, then closed: neither"
        );
        assert!(closed(&mut theirs[0]).await, "the one written to is closed");
        assert_eq!(pool.len(), 0);
    }

    /// After a re-resolution moves the endpoint, connections to its old address are closed
    /// rather than handed out; one to the address it has now still is.
    #[tokio::test]
    async fn none_handed_out_to_another_address() {
        let pool = IdlePool::default();
        let (mut old, mut old_end, old_addr) = conns(1).await;
        let (mut new, _new_end, new_addr) = conns(1).await;
        pool.put(new.pop().unwrap(), 8);
        pool.put(old.pop().unwrap(), 8);
        let taken = pool.take(new_addr).expect("the one to the new address");
        assert_eq!(taken.peer(), Some(new_addr));
        assert!(
            closed(&mut old_end[0]).await,
            "the newer one, to the old address"
        );
        assert_eq!(pool.len(), 0);
        assert!(pool.take(old_addr).is_none());
    }
}
