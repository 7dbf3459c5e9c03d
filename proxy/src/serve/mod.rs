//! Accepting and serving downstream connections.
//!
//! One accept loop per listener. A connection first takes a permit from the shared
//! `max_connections` semaphore (beyond the cap, new connections wait in the kernel's accept
//! queue instead of exhausting file descriptors), then runs in its own task: the TLS
//! handshake (never in the accept loop), then the gateway's own HTTP/1.x server ([`h1`]),
//! which serves ordinary requests itself (heads parsed with `httparse` into
//! `http::request::Parts`, the answer written with one `write`) and hands the connection,
//! with the bytes it has read, to hyper's auto-detecting HTTP/1.1 + HTTP/2 server at the
//! first request that is not ordinary (the HTTP/2 preface, upgrades, `Expect`, chunked or
//! large bodies, anything hyper would refuse). hyper stays the reference for all of those.
//! The same task enforces the first-request deadline, each later head's deadline and the idle
//! timeout and, on shutdown, finishes the request in flight and closes (on hyper, by asking
//! it to). A fast-path connection idle for a second is parked: its task ends and no task
//! waits for its next bytes; they start a new task that serves on from them, and its
//! deadline and shutdown are watched for all parked connections at once ([`mod@park`]).
//! Thousands of idle keep-alive clients then cost little more than their sockets.
//!
//! The first-request deadline: a connection must have delivered the head of its first
//! request within `header_read_timeout_ms` of being accepted (TLS handshake included), or it
//! is closed. On the fast path it is one deadline with the head's own; after a handoff,
//! hyper's own HTTP/1 header timeout does not cover it: that starts only once
//! hyper-util has read enough of the first bytes to tell HTTP/1 from HTTP/2, which it waits
//! for with no timeout, and HTTP/2 has no head deadline at all. Without it a connection that
//! sends nothing, or trickles the HTTP/2 preface a byte at a time, would be held until the
//! idle timeout — or, trickling, forever.
//!
//! Shutdown flows through a `watch` channel: accept loops stop at once; connections finish
//! what they are doing. The caller waits for every permit to come back (all connections
//! closed) or for the grace period to run out.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use rules::model::ConnLimits;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

pub mod h1;
pub mod park;
pub mod tls;

use crate::conn::{Activity, ConnInfo, Tracked};
use crate::pipeline::Gateway;
use crate::shutdown::Stop;
use crate::upstream::{ConnCache, ReqBody};
use park::{ParkLot, ReadReady, Sleeper};

/// What every connection of every listener shares.
#[derive(Clone)]
pub struct Shared {
    /// The request path.
    pub gateway: Arc<Gateway>,
    /// hyper's server settings (timeouts, sizes, h2 limits), built once.
    pub builder: Arc<auto::Builder<TokioExecutor>>,
    /// The HTTP/1 fast path's head limits (hyper's, see [`builder`]).
    pub h1: h1::Limits,
    /// One permit per open connection.
    pub conn_permits: Arc<Semaphore>,
    /// Close idle keep-alive connections after this long.
    pub idle_timeout: Duration,
    /// Time from accept to the first request head (TLS handshake included).
    pub handshake_timeout: Duration,
    /// Flips to `true` on shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// The same signal, as the HTTP/1 connection loops watch it.
    pub stop: Arc<Stop>,
    /// The deadlines of parked connections, and their shutdown.
    pub parked: Arc<ParkLot<Dormant>>,
}

/// hyper's server builder with Tidegate's protective limits.
pub fn builder(l: &ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // An absolute deadline for the whole head, started when hyper begins reading it
        // (including while a keep-alive connection waits for its next request).
        .header_read_timeout(Duration::from_millis(l.header_read_timeout_ms))
        .max_buf_size((l.max_header_bytes as usize).max(8192))
        .max_headers(l.max_headers as usize)
        // Response head and (small) body copied into one buffer and sent with one write(2),
        // rather than a writev of two slices: fewer instructions on both sides of the
        // syscall for the small answers a gateway mostly carries; bounded by max_buf_size.
        .writev(false)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(l.h2_max_pending_reset_streams as usize)
        .max_local_error_reset_streams(Some(1024))
        .max_header_list_size(l.max_header_bytes)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// Accept connections on `listener` until shutdown.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<tls::CertStore>>,
    shared: Arc<Shared>,
    name: Arc<str>,
) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let permit = tokio::select! {
            p = shared.conn_permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // semaphore closed: shutting down
            },
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        };
        let accepted = tokio::time::Instant::now();
        let _ = stream.set_nodelay(true);
        let info = ConnInfo::new(remote, tls.is_some());
        let live = Live::new(&shared.gateway, permit);
        let shared = shared.clone();
        // Each kind of connection is a task of its own type, not one wrapper awaiting either:
        // a task's future is as large as its largest state (a plain connection should not
        // carry the handshake's), and a wrapper's poll reserved stack for both futures (22
        // KB, a probe per page) on every wake-up of every connection.
        match &tls {
            None => {
                tokio::spawn(serve_io(
                    Connection::new(stream, info, shared, accepted, live),
                    None,
                ));
            }
            Some(certs) => {
                let certs = certs.clone();
                tokio::spawn(serve_tls(stream, certs, info, shared, accepted, live));
            }
        }
    }
}

/// An open connection, counted in the connections gauge and holding its permit until
/// dropped (with the last of its tasks).
struct Live {
    gauge: Gauge,
    _permit: OwnedSemaphorePermit,
}

impl Live {
    fn new(gateway: &Gateway, permit: OwnedSemaphorePermit) -> Self {
        let m = &gateway.live.metrics;
        m.connections.inc();
        m.connections_accepted.inc();
        Self {
            gauge: m.connections.clone(),
            _permit: permit,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A connection and what its requests are served with, passed from task to task: the one
/// serving requests, and the smaller one that waits while it is parked (see
/// [`h1::Outcome::Parked`]).
struct Connection<I> {
    io: Tracked<I>,
    info: Arc<ConnInfo>,
    /// Its own upstream connections, for its HTTP/1.x requests (one at a time).
    cache: Arc<ConnCache>,
    activity: Arc<Activity>,
    shared: Arc<Shared>,
    accepted: tokio::time::Instant,
    /// Held while any of its tasks lives.
    _live: Live,
}

impl<I> Connection<I> {
    fn new(
        io: I,
        info: ConnInfo,
        shared: Arc<Shared>,
        accepted: tokio::time::Instant,
        live: Live,
    ) -> Self {
        // Untracked while the fast path serves it: its loop has its own deadlines.
        let activity = Arc::new(Activity::untracked());
        Self {
            io: Tracked {
                io,
                activity: activity.clone(),
            },
            info: Arc::new(info),
            cache: Arc::new(ConnCache::default()),
            activity,
            shared,
            accepted,
            _live: live,
        }
    }
}

/// Serve a TLS connection: the handshake (within the handshake timeout), then its requests.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    certs: Arc<tls::CertStore>,
    info: ConnInfo,
    shared: Arc<Shared>,
    accepted: tokio::time::Instant,
    live: Live,
) {
    let remote = info.remote;
    // The pair current at accept time: certificates replaced on disk are picked up by new
    // handshakes without a restart.
    let acceptor = certs.acceptor();
    let deadline = accepted + shared.handshake_timeout;
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(s)) => serve_io(Connection::new(s, info, shared, accepted, live), None).await,
        Ok(Err(e)) => tracing::debug!(client = %remote, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(client = %remote, "TLS handshake timed out"),
    }
}

/// Serve a connection to completion: on the HTTP/1 fast path ([`h1`]) while its requests
/// are ordinary, then, from the first that is not (or from the start for HTTP/2), with
/// hyper. Parked ([`park()`]), it waits without a task, and this one ends.
async fn serve_io<I>(c: Connection<I>, resume: Option<h1::Resume>)
where
    I: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    let fast = h1::Conn {
        gateway: &c.shared.gateway,
        info: &c.info,
        cache: &c.cache,
        activity: &c.activity,
        limits: c.shared.h1,
        idle_timeout: c.shared.idle_timeout,
        first_deadline: c.accepted + c.shared.handshake_timeout,
        stop: &c.shared.stop,
    };
    match h1::serve(c.io, fast, resume).await {
        h1::Outcome::Closed => c.shared.gateway.release(&c.cache),
        h1::Outcome::Parked(io, wait) => {
            c.shared.gateway.release(&c.cache);
            c.info.forget_hop();
            park(Connection { io, ..c }, wait);
        }
        // Boxed: hyper's connection state is larger than the fast path's, and most
        // connections never get there.
        h1::Outcome::Handoff(io) => {
            c.activity.track();
            let (info, cache) = (c.info, c.cache.clone());
            let hyper = || serve_hyper(io, info, cache, c.activity, &c.shared, c.accepted);
            crate::out_of_line(hyper).await;
            c.shared.gateway.release(&c.cache);
        }
    }
}

/// Park a connection: no task waits for its next bytes; the server's [`ParkLot`] holds its
/// deadline and, for plain TCP, its socket and what it needs to go on (a [`Dormant`]);
/// otherwise its socket's readiness holds it (a [`Sleeping`]) as the waker of its read
/// interest. Bytes start a task that serves it on; the deadline or shutdown closes it.
fn park<I>(c: Connection<I>, mut wait: h1::Wait)
where
    I: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    let c = if c.shared.parked.takes_dormant() {
        match park_dormant(c, wait) {
            Ok(()) => return,
            Err((c, w)) => {
                wait = w;
                c
            }
        }
    } else {
        c
    };
    let lot = c.shared.parked.clone();
    let key = lot.key(wait.until());
    let s = Arc::new(Sleeping {
        key,
        state: Mutex::new(Some((c, wait))),
    });
    if !lot.enter(key, Arc::downgrade(&s) as Weak<dyn Sleeper>) {
        return s.stop(park::Stop::Shutdown);
    }
    let waker = Waker::from(s.clone());
    let ready = match &*s.lock() {
        Some((c, _)) => c.io.poll_read_ready(&mut Context::from_waker(&waker)),
        None => return, // stopped meanwhile
    };
    // Bytes (or an error) already: serve it on now.
    if ready.is_ready() {
        waker.wake();
    }
}

/// Park a plain connection dormant: its socket out of the runtime's event loop, in the
/// lot with its wait and permit; the rest (its facts, its empty upstream cache, its
/// activity record, its registration) dropped and made again when it wakes
/// ([`resume_dormant`]). `Err` gives back a connection that is not plain TCP.
fn park_dormant<I>(c: Connection<I>, wait: h1::Wait) -> Result<(), (Connection<I>, h1::Wait)>
where
    I: ReadReady,
{
    if !c.io.io.parks_dormant() {
        return Err((c, wait));
    }
    let Connection {
        io,
        info,
        shared,
        accepted,
        _live,
        ..
    } = c;
    let stream = match io.io.into_dormant() {
        Ok(s) => s,
        // Its descriptor could not leave the event loop: the socket is closed.
        Err(e) => {
            tracing::debug!(client = %info.remote, error = %e, "parking an idle connection");
            return Ok(());
        }
    };
    let until = wait.until();
    let d = Dormant {
        shared: Arc::downgrade(&shared),
        accepted,
        wait,
        live: _live,
    };
    // Refused only once shutdown has begun: both are dropped, and the socket closes.
    let _ = shared.parked.park_dormant(stream, until, d);
    Ok(())
}

/// What a dormant connection keeps besides its socket, in its lot's table.
pub struct Dormant {
    /// Its server's (weak: the lot is the server's).
    shared: Weak<Shared>,
    accepted: tokio::time::Instant,
    wait: h1::Wait,
    /// Held while it sleeps: the connection counts as open.
    live: Live,
}

/// Serve a dormant connection on: its bytes came.
pub fn resume_dormant(stream: tokio::net::TcpStream, d: Dormant) {
    let Some(shared) = d.shared.upgrade() else {
        return;
    };
    // Its peer's address from the socket, not kept while it slept.
    let Ok(remote) = stream.peer_addr() else {
        return; // already gone
    };
    let c = Connection::new(
        stream,
        ConnInfo::new(remote, false),
        shared,
        d.accepted,
        d.live,
    );
    // What the kept record said: whether a request was ever made (hyper's first-request
    // deadline, after a handoff, asks).
    if !d.wait.first() {
        c.activity.started.store(true, Ordering::Relaxed);
    }
    tokio::spawn(serve_io(c, Some(d.wait.resume())));
}

/// A parked connection: the connection and its wait, until its bytes come (it is woken) or
/// its lot stops it.
struct Sleeping<I> {
    key: park::Key,
    state: Mutex<Option<(Connection<I>, h1::Wait)>>,
}

impl<I> Sleeping<I> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Connection<I>, h1::Wait)>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection, to the first of its wake-up and its stop.
    fn take(&self) -> Option<(Connection<I>, h1::Wait)> {
        self.lock().take()
    }
}

impl<I> Wake for Sleeping<I>
where
    I: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    /// Its socket is readable: serve it on in a new task.
    fn wake_by_ref(self: &Arc<Self>) {
        let Some((c, wait)) = self.take() else { return };
        let lot = c.shared.parked.clone();
        lot.leave(self.key);
        lot.spawn(serve_io(c, Some(wait.resume())));
    }
}

impl<I> Sleeper for Sleeping<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn stop(self: Arc<Self>, why: park::Stop) {
        let Some((mut c, _)) = self.take() else {
            return;
        };
        match why {
            park::Stop::Expired => drop(c),
            // A TLS close or FIN, given a second; the connection counts as open until then.
            park::Stop::Shutdown => c.shared.parked.clone().spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), c.io.shutdown()).await;
            }),
        }
    }
}

/// Serve the rest of a connection with hyper's auto-detecting HTTP/1.1 + HTTP/2 server.
async fn serve_hyper<I>(
    io: I,
    info: Arc<ConnInfo>,
    upstream_conn: Arc<ConnCache>,
    activity: Arc<Activity>,
    shared: &Shared,
    accepted: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let remote = info.remote;
    let gateway = shared.gateway.clone();
    let act = activity.clone();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let gateway = gateway.clone();
        let info = info.clone();
        let act = act.clone();
        let cache = (req.version() != http::Version::HTTP_2).then(|| upstream_conn.clone());
        async move {
            act.started.store(true, Ordering::Relaxed);
            act.inflight.fetch_add(1, Ordering::Relaxed);
            let (resp, id) = gateway
                .handle(req.map(ReqBody::Hyper), &info, cache.as_ref())
                .await;
            let resp = crate::pipeline::with_request_id(resp, id);
            act.inflight.fetch_sub(1, Ordering::Relaxed);
            act.touch();
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = shared
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // One timer per connection, looked at once: the first request must have started by then.
    let first_request = tokio::time::sleep_until(accepted + shared.handshake_timeout);
    tokio::pin!(first_request);
    let mut awaiting_first = true;
    let mut shutdown = shared.shutdown.clone();
    let mut closing = false;
    loop {
        // While requests are in flight the connection is not idle whatever its bytes say;
        // look again a whole timeout later rather than re-arming an expired sleep.
        let wait = if activity.inflight.load(Ordering::Relaxed) > 0 {
            shared.idle_timeout
        } else {
            shared.idle_timeout.saturating_sub(activity.idle_for())
        };
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(client = %remote, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = first_request.as_mut(), if awaiting_first => {
                awaiting_first = false;
                if !activity.started.load(Ordering::Relaxed) {
                    // Nothing was ever asked, so nothing is lost: close without ceremony
                    // (a graceful HTTP/2 close would wait for a PING the peer need not send).
                    tracing::debug!(client = %remote, "no request head before the deadline; closing");
                    return;
                }
            }
            _ = tokio::time::sleep(wait), if !closing => {
                if activity.inflight.load(Ordering::Relaxed) == 0 && activity.idle_for() >= shared.idle_timeout {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = crate::shutdown::stopped(&mut shutdown), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Connections the kernel holds for an accept loop: those beyond `max_connections`, and
/// bursts of new connections, wait here. The usual 128 overflows under connection churn
/// (a slowloris swarm reconnecting): the kernel then drops SYNs, or the handshake's last
/// ACK, and clients stall for a retransmission. The kernel caps it at
/// `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 1024;

/// Bind a listener address.
pub async fn bind(addr: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let mut last = None;
    for sa in tokio::net::lookup_host(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?
    {
        match listen(sa) {
            Ok(l) => {
                let local = l.local_addr()?;
                return Ok((l, local));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => anyhow::anyhow!("binding {addr}: {e}"),
        None => anyhow::anyhow!("binding {addr}: no address"),
    })
}

/// A listening socket on `sa` with [`ACCEPT_BACKLOG`] (and `SO_REUSEADDR`, as the standard
/// library sets it).
fn listen(sa: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if sa.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(sa)?;
    socket.listen(ACCEPT_BACKLOG)
}
