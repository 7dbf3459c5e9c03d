//! Connection-level abuse: slowloris, HTTP/2 rapid reset and stream floods, and the
//! connection cap. Each attack runs against a real gateway on loopback while a healthy
//! client keeps measuring its latency against a baseline taken in the same test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tidegate_tests::{ChildGateway, TIMEOUT, Upstream, config, fd_limit, percentile, set};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// === shared helpers ===

/// How many attack connections to open: `wanted`, or fewer when `ulimit -n` would not
/// allow them (this process and the gateway each hold one descriptor per connection).
fn scaled(wanted: usize, what: &str) -> usize {
    const SPARE: u64 = 256;
    let Some(limit) = fd_limit() else {
        return wanted;
    };
    let fit = limit.saturating_sub(SPARE) as usize;
    if fit >= wanted {
        return wanted;
    }
    let n = fit.max(16);
    eprintln!(
        "NOTICE: ulimit -n is {limit}: running {what} with {n} connections instead of \
         {wanted} (raise it with `ulimit -n 20000` for the full test)"
    );
    n
}

/// A multi-threaded runtime of `workers` threads, for one side of a test.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("building a runtime")
}

/// One `GET` on a new connection: connect, HTTP/1.1 handshake, request, whole body.
async fn fresh_get(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "gateway")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(status)
}

/// Latencies of a healthy client that sends `GET /healthy` for `length`, one request at a
/// time with a short pause between them, on a new connection each time (`fresh`) or on
/// one kept-alive connection. Panics on any failed or non-200 request.
async fn healthy(addr: SocketAddr, length: Duration, fresh: bool) -> Vec<Duration> {
    let client = tidegate_tests::h1_client();
    let mut out = Vec::new();
    let end = Instant::now() + length;
    while Instant::now() < end {
        let t = Instant::now();
        let status = if fresh {
            tokio::time::timeout(TIMEOUT, fresh_get(addr, "/healthy"))
                .await
                .unwrap_or_else(|_| Err("timed out".into()))
        } else {
            let r = tidegate_tests::get(&client, addr, "/healthy").await;
            Ok(r.status.as_u16())
        };
        out.push(t.elapsed());
        assert_eq!(
            status,
            Ok(200),
            "a healthy request failed (fresh connection: {fresh})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// p50 / p99 of healthy latencies, for messages.
fn summary(samples: &mut [Duration]) -> (Duration, Duration) {
    (percentile(samples, 0.50), percentile(samples, 0.99))
}

/// The latency an attacked p99 may reach: twice the baseline, but never less than the
/// baseline plus `floor` (a 2-core CI box under load has millisecond scheduling noise).
fn allowed(base_p99: Duration, floor: Duration) -> Duration {
    (base_p99 * 2).max(base_p99 + floor)
}

// === slowloris ===

/// What a slowloris connection sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loris {
    /// Connects and sends nothing.
    Silent,
    /// Trickles an HTTP/1.1 request head that never ends.
    H1,
    /// Trickles the HTTP/2 connection preface, then SETTINGS and PING frames.
    H2,
}

impl Loris {
    /// Byte number `i` of what this kind trickles.
    fn byte(self, i: usize) -> u8 {
        const H1_HEAD: &[u8] = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        const H2_START: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
        const PING: &[u8] = b"\0\0\x08\x06\0\0\0\0\0pingping";
        match self {
            Loris::Silent => unreachable!("a silent connection sends nothing"),
            Loris::H1 => H1_HEAD.get(i).copied().unwrap_or(b'a'),
            Loris::H2 => match H2_START.get(i) {
                Some(b) => *b,
                None => PING[(i - H2_START.len()) % PING.len()],
            },
        }
    }
}

/// How one slowloris connection ended.
#[derive(Debug)]
struct Fate {
    kind: Loris,
    /// From connected to closed by the gateway (or to giving up).
    lived: Duration,
    /// Bytes trickled before the close.
    sent: usize,
    /// Whether the gateway closed it (`false`: still open when the attacker gave up).
    closed: bool,
}

/// Slowloris attackers' shared state.
#[derive(Default)]
struct Swarm {
    stop: AtomicBool,
    open: AtomicUsize,
    peak_open: AtomicUsize,
    connect_failures: AtomicUsize,
    fates: Mutex<Vec<Fate>>,
}

/// One slowloris attacker: keeps one connection open at a time, trickling a byte every
/// `every`, and opens another as soon as the gateway closes it, until told to stop. A
/// connection still open after `give_up` is recorded as not closed.
async fn loris(
    addr: SocketAddr,
    kind: Loris,
    every: Duration,
    give_up: Duration,
    swarm: Arc<Swarm>,
) {
    let mut buf = [0u8; 1024];
    while !swarm.stop.load(Ordering::Relaxed) {
        let mut s = match tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            _ => {
                swarm.connect_failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let t0 = tokio::time::Instant::now();
        let now_open = swarm.open.fetch_add(1, Ordering::Relaxed) + 1;
        swarm.peak_open.fetch_max(now_open, Ordering::Relaxed);
        let mut sent = 0;
        let mut next = t0 + every;
        let closed = loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => {} // whatever the gateway says before closing
                },
                _ = tokio::time::sleep_until(next), if kind != Loris::Silent => {
                    if s.write_all(&[kind.byte(sent)]).await.is_err() {
                        break true;
                    }
                    sent += 1;
                    next += every;
                }
                _ = tokio::time::sleep_until(t0 + give_up) => break false,
            }
        };
        swarm.open.fetch_sub(1, Ordering::Relaxed);
        swarm.fates.lock().expect("not poisoned").push(Fate {
            kind,
            lived: t0.elapsed(),
            sent,
            closed,
        });
    }
}

/// Samples a process's open file descriptors on a thread, keeping the peak.
struct FdPeak {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FdPeak {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicUsize::new(tidegate_tests::fd_count(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    p.fetch_max(d.count(), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for FdPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Slowloris: 2,000 connections that send nothing or trickle a byte every ~300 ms, opening
/// a new one whenever the gateway closes one. Every one of them is closed by the absolute
/// head deadline (`header_read_timeout_ms`, 1 s here) however steadily it keeps sending,
/// and healthy clients — on kept-alive and on new connections — keep their p99 within 2×
/// of the baseline measured before the attack.
#[test]
fn slowloris_is_cut_off_by_absolute_deadlines() {
    const DEADLINE: Duration = Duration::from_millis(1000);
    // Timer and scheduling lag on a loaded 2-core box, on top of the deadline.
    const SLACK: Duration = Duration::from_millis(1500);
    let n = scaled(2000, "slowloris");
    let side = runtime(1); // the upstream and the healthy clients
    let attack = runtime(2); // the attackers

    let up = side.block_on(Upstream::start());
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "server/limits/header_read_timeout_ms",
        json!(DEADLINE.as_millis() as u64),
    );
    let gw = ChildGateway::spawn(&c);
    let addr = gw.addr;
    let fds_idle = gw.fd_count();

    // Baseline: both kinds of healthy client, alone.
    side.block_on(healthy(addr, Duration::from_millis(300), false)); // warm-up
    let (mut base_ka, mut base_fresh) = side.block_on(async {
        let ka = tokio::spawn(healthy(addr, Duration::from_secs(2), false));
        let fresh = tokio::spawn(healthy(addr, Duration::from_secs(2), true));
        (ka.await.expect("joins"), fresh.await.expect("joins"))
    });

    // The attack: ramped up over half a second, then held.
    let swarm = Arc::new(Swarm::default());
    let fd_peak = FdPeak::start(gw.pid());
    let attackers: Vec<_> = (0..n)
        .map(|i| {
            let kind = [Loris::Silent, Loris::H1, Loris::H2][i % 3];
            let every = Duration::from_millis(250 + (i % 100) as u64);
            let swarm = swarm.clone();
            attack.spawn(async move {
                tokio::time::sleep(Duration::from_micros((i * 500_000 / n) as u64)).await;
                loris(addr, kind, every, DEADLINE + SLACK * 2, swarm).await;
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let (mut hit_ka, mut hit_fresh) = side.block_on(async {
        let ka = tokio::spawn(healthy(addr, Duration::from_secs(3), false));
        let fresh = tokio::spawn(healthy(addr, Duration::from_secs(3), true));
        (ka.await.expect("joins"), fresh.await.expect("joins"))
    });
    let peak_open = swarm.peak_open.load(Ordering::Relaxed);
    swarm.stop.store(true, Ordering::Relaxed);
    attack.block_on(async {
        for a in attackers {
            tokio::time::timeout(TIMEOUT, a)
                .await
                .expect("attackers stop in time")
                .expect("an attacker panicked");
        }
    });
    let fds_attack = fd_peak.peak();
    drop(fd_peak);

    let fates = std::mem::take(&mut *swarm.fates.lock().expect("not poisoned"));
    let (b_ka, h_ka) = (summary(&mut base_ka), summary(&mut hit_ka));
    let (b_fr, h_fr) = (summary(&mut base_fresh), summary(&mut hit_fresh));
    let lived_max = |k: Loris| {
        fates
            .iter()
            .filter(|f| f.kind == k)
            .map(|f| f.lived)
            .max()
            .unwrap_or_default()
    };
    let report = format!(
        "{n} attackers ({peak_open} open at the peak, {} connections in all, {} connect \
         failures); gateway fds idle {fds_idle}, peak {fds_attack}; longest life silent \
         {:?}, h1 trickle {:?}, h2 trickle {:?}; healthy keep-alive p50/p99 {:?}/{:?} \
         baseline, {:?}/{:?} attacked ({} samples); new connection {:?}/{:?} baseline, \
         {:?}/{:?} attacked ({} samples)",
        fates.len(),
        swarm.connect_failures.load(Ordering::Relaxed),
        lived_max(Loris::Silent),
        lived_max(Loris::H1),
        lived_max(Loris::H2),
        b_ka.0,
        b_ka.1,
        h_ka.0,
        h_ka.1,
        hit_ka.len(),
        b_fr.0,
        b_fr.1,
        h_fr.0,
        h_fr.1,
        hit_fresh.len(),
    );
    eprintln!("slowloris: {report}");

    // Attackers were really there, and every one was closed by the deadline.
    assert!(
        peak_open >= n * 9 / 10,
        "the attack never reached {n} open connections: {report}"
    );
    let open_too_long: Vec<&Fate> = fates
        .iter()
        .filter(|f| !f.closed || f.lived > DEADLINE + SLACK)
        .collect();
    assert!(
        open_too_long.is_empty(),
        "{} of {} slowloris connections outlived the {DEADLINE:?} head deadline by more \
         than {SLACK:?}, e.g. {:?}\n{report}",
        open_too_long.len(),
        fates.len(),
        &open_too_long[..open_too_long.len().min(5)],
    );
    // Closed by the deadline, not earlier, and not reset by the bytes they kept sending
    // (a byte every 250-350 ms: a per-byte timer of 1 s would never fire).
    for f in fates.iter().filter(|f| f.kind != Loris::Silent) {
        assert!(
            f.lived >= DEADLINE * 8 / 10 && f.sent >= 2,
            "a trickling connection closed after {:?} having sent {} bytes: {f:?}",
            f.lived,
            f.sent
        );
    }

    // Healthy clients kept their latency.
    let floor = Duration::from_millis(50);
    assert!(
        h_ka.1 <= allowed(b_ka.1, floor),
        "keep-alive p99 {:?} attacked vs {:?} baseline\n{report}",
        h_ka.1,
        b_ka.1
    );
    assert!(
        h_fr.1 <= allowed(b_fr.1, floor),
        "new-connection p99 {:?} attacked vs {:?} baseline\n{report}",
        h_fr.1,
        b_fr.1
    );
    drop(gw);
    drop(up);
}
