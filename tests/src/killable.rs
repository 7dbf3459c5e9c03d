//! An upstream that can hang, die and come back on the same port: for endpoint health.
//!
//! [`Upstream`](crate::Upstream) and [`Switchable`](crate::Switchable) abort only their
//! accept loop when dropped; the connections they already serve live on. A [`Killable`]
//! owns its connection tasks, so [`Killable::kill`] closes the listener and every
//! connection, as a crashed process would, and [`Killable::start_on`] starts a fresh one on
//! the same address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpSocket;
use tokio::task::{JoinHandle, JoinSet};

/// Answers every request 200 `{}` (HTTP/1.1 and h2c) until told to hang or killed.
#[derive(Debug)]
pub struct Killable {
    /// Where it listens.
    pub addr: SocketAddr,
    hung: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    checks: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Killable {
    /// Start one on a free port.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("an address")).await
    }

    /// Start one on `addr` (the address of one killed before: it is reused at once).
    pub async fn start_on(addr: SocketAddr) -> Self {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(addr).expect("binding");
        let listener = socket.listen(1024).expect("listening");
        let addr = listener.local_addr().expect("a bound address");
        let hung = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let checks = Arc::new(AtomicUsize::new(0));
        let (h, n, c) = (hung.clone(), hits.clone(), checks.clone());
        let task = tokio::spawn(async move {
            // Dropped with this task: every connection is closed with the listener.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                let (h, n, c) = (h.clone(), n.clone(), c.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (h, n, c) = (h.clone(), n.clone(), c.clone());
                        async move {
                            if h.load(Ordering::SeqCst) {
                                // A stopped process: the kernel accepts, nobody answers.
                                std::future::pending::<()>().await;
                            }
                            if req.uri().path() == "/healthz" {
                                c.fetch_add(1, Ordering::SeqCst);
                            } else {
                                n.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            hung,
            hits,
            checks,
            task,
        }
    }

    /// From now on answer nothing, on new and open connections alike (requests already
    /// being answered finish).
    pub fn hang(&self) {
        self.hung.store(true, Ordering::SeqCst);
    }

    /// Close the listener and every connection, and wait until they are closed.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// Requests answered or hung on, health checks (`/healthz`) aside.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Health checks (`GET /healthz`) received.
    pub fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.task.abort();
    }
}
