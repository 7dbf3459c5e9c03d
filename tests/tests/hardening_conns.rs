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

/// The tests here measure latency against a baseline and count descriptors: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
    const SLACK: Duration = Duration::from_millis(2000);
    let _serial = serial();
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

// === HTTP/2 rapid reset, stream floods, header lists ===

/// `GET http://{addr}{path}` for the `h2` crate (it needs scheme and authority).
fn h2_req(addr: SocketAddr, path: &str) -> http::Request<()> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(())
        .expect("a valid request")
}

/// An h2c connection opened with the `h2` crate; the connection task is left to the caller.
async fn h2_open(
    addr: SocketAddr,
    builder: &h2::client::Builder,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<TcpStream, Bytes>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connects");
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(TIMEOUT, builder.handshake(tcp))
        .await
        .expect("the h2 handshake finishes in time")
        .expect("the h2 handshake succeeds")
}

/// Whether an `h2` error is the server closing the connection with GOAWAY
/// ENHANCE_YOUR_CALM.
fn calmed(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
}

/// CVE-2023-44487 on one connection: open a stream (a whole GET) and reset it at once,
/// again and again, `BATCH` streams per write, up to `total`. Returns how many streams were
/// opened and how the connection ended. Run it on a current-thread runtime, so the
/// connection task writes each batch in one go.
async fn rapid_reset(addr: SocketAddr, total: usize) -> (usize, Result<(), h2::Error>) {
    const BATCH: usize = 100;
    let (mut client, conn) = h2_open(addr, &h2::client::Builder::new()).await;
    let conn = tokio::spawn(conn);
    let mut opened = 0;
    'attack: while opened < total {
        for _ in 0..BATCH {
            if std::future::poll_fn(|cx| client.poll_ready(cx))
                .await
                .is_err()
            {
                break 'attack;
            }
            match client.send_request(h2_req(addr, "/reset"), true) {
                Ok((_response, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    opened += 1;
                }
                Err(_) => break 'attack,
            }
        }
        tokio::task::yield_now().await; // the connection task writes the batch
    }
    drop(client);
    let ended = tokio::time::timeout(TIMEOUT, conn)
        .await
        .expect("the attacked connection ends in time")
        .expect("the connection task joins");
    (opened, ended)
}

/// A stream flood on one connection: `n` POSTs whose bodies never end, all sent before
/// the server's SETTINGS (and its stream limit) are read — the client is told it may open
/// `n` at once. Returns how each stream ended (`"open"`: still waiting after a second) and
/// how the connection ended.
async fn stream_flood(
    addr: SocketAddr,
    n: usize,
) -> (
    std::collections::BTreeMap<String, usize>,
    Option<Result<(), h2::Error>>,
) {
    let mut b = h2::client::Builder::new();
    b.initial_max_send_streams(n);
    let (mut client, conn) = h2_open(addr, &b).await;
    let mut held = Vec::new(); // the request bodies, kept open
    let mut responses = Vec::new();
    for _ in 0..n {
        let req = http::Request::post(format!("http://{addr}/flood"))
            .body(())
            .expect("a valid request");
        let (resp, body) = client.send_request(req, false).expect("opening a stream");
        held.push(body);
        responses.push(resp);
    }
    let mut conn = tokio::spawn(conn); // only now is anything written or read
    let mut outcomes = std::collections::BTreeMap::new();
    let waits: Vec<_> = responses
        .into_iter()
        .map(|r| tokio::spawn(tokio::time::timeout(Duration::from_secs(1), r)))
        .collect();
    for w in waits {
        let outcome = match w.await.expect("joins") {
            Err(_) => "open".to_owned(),
            Ok(Ok(r)) => format!("answered {}", r.status()),
            Ok(Err(e)) if e.is_reset() => format!("reset {:?}", e.reason()),
            Ok(Err(e)) if e.is_go_away() => format!("goaway {:?}", e.reason()),
            Ok(Err(e)) => format!("error {e}"),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(1), &mut conn)
        .await
        .ok()
        .map(|r| r.expect("the connection task joins"));
    conn.abort();
    drop(held);
    (outcomes, ended)
}

/// One healthy request: when it started, how long it took, and its failure if it failed.
type Sample = (Instant, Duration, Option<String>);

/// A healthy h2c client sending `GET /healthy` one at a time until `stop`.
async fn healthy_h2(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<Sample> {
    let client = tidegate_tests::h2c_client();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let req = http::Request::get(format!("http://{addr}/healthy"))
            .body(tidegate_tests::full(Bytes::new()))
            .expect("a valid request");
        let failure = match tokio::time::timeout(TIMEOUT, client.request(req)).await {
            Err(_) => Some("timed out".to_owned()),
            Ok(Err(e)) => Some(format!("{e}")),
            Ok(Ok(resp)) => {
                let r = tidegate_tests::read_reply(resp).await;
                (r.status != 200).then(|| format!("{} {}", r.status, r.text()))
            }
        };
        out.push((t, t.elapsed(), failure));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// HTTP/2 abuse over h2c while a healthy h2c client keeps measuring: rapid reset
/// (CVE-2023-44487) connections are closed with GOAWAY ENHANCE_YOUR_CALM long before their
/// thousands of resets are through; streams beyond `h2_max_concurrent_streams` are refused
/// and a connection that keeps opening them is closed; an oversized header list is refused
/// without reaching the upstream. The healthy client's requests all succeed, its p99
/// within 2× of its baseline.
#[test]
fn h2_rapid_reset_and_stream_floods_are_cut_off() {
    // Above the attacker's batch of 100, so each batch goes out in one write: the `h2`
    // client holds a reset stream's slot until the reset is written.
    const MAX_STREAMS: usize = 128;
    const RESETS: usize = 5000;
    const FLOOD: usize = 1400; // > MAX_STREAMS + the 1024 refusals h2 tolerates
    let _serial = serial();
    let gw_rt = runtime(2);
    let side = runtime(1);
    let attack = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a runtime");

    let up = gw_rt.block_on(Upstream::start());
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "server/limits/h2_max_concurrent_streams",
        json!(MAX_STREAMS),
    );
    set(
        &mut c,
        "server/limits/h2_max_pending_reset_streams",
        json!(32),
    );
    set(&mut c, "server/limits/max_header_bytes", json!(8192));
    set(&mut c, "upstreams/up/request_timeout_ms", json!(30_000));
    let server = gw_rt.block_on(tidegate_tests::start_gateway(&c));
    let addr = server.listen_addrs[0];

    let stop = Arc::new(AtomicBool::new(false));
    let healthy = side.spawn(healthy_h2(addr, stop.clone()));
    std::thread::sleep(Duration::from_millis(1500));
    let attack_start = Instant::now();

    // Rapid reset, one connection after another for a second and a half.
    let mut resets = Vec::new();
    let hits_before = up.hits();
    while attack_start.elapsed() < Duration::from_millis(1500) && resets.len() < 500 {
        resets.push(attack.block_on(rapid_reset(addr, RESETS)));
    }
    let reset_hits = up.hits() - hits_before;

    // A stream flood.
    let hits_before = up.hits();
    let (flood, flood_end) = attack.block_on(stream_flood(addr, FLOOD));
    let flood_hits = up.seen()[hits_before..]
        .iter()
        .filter(|s| s.path == "/flood")
        .count();

    // An oversized header list, then an ordinary request on the same connection.
    let (big, after) = attack.block_on(async {
        let (client, conn) = h2_open(addr, &h2::client::Builder::new()).await;
        tokio::spawn(conn);
        let mut client = client.ready().await.expect("ready");
        let req = http::Request::get(format!("http://{addr}/big"))
            .header("x-big", "b".repeat(10_000))
            .body(())
            .expect("a valid request");
        let (resp, _) = client.send_request(req, true).expect("sends");
        let big = match tokio::time::timeout(TIMEOUT, resp).await.expect("in time") {
            Ok(r) => format!("answered {}", r.status()),
            Err(e) => format!("reset {:?}", e.reason()),
        };
        let mut client = client.ready().await.expect("ready");
        let (resp, _) = client
            .send_request(h2_req(addr, "/after"), true)
            .expect("sends");
        let after = match tokio::time::timeout(TIMEOUT, resp).await.expect("in time") {
            Ok(r) => r.status().as_u16(),
            Err(e) => panic!("a request after the refused one failed: {e}"),
        };
        (big, after)
    });
    let attack_end = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let samples = gw_rt.block_on(healthy).expect("the healthy client joins");

    let mut base: Vec<Duration> = samples
        .iter()
        .filter(|(t, _, _)| *t < attack_start)
        .map(|(_, d, _)| *d)
        .collect();
    let mut hit: Vec<Duration> = samples
        .iter()
        .filter(|(t, _, _)| *t >= attack_start && *t < attack_end)
        .map(|(_, d, _)| *d)
        .collect();
    let failed: Vec<&String> = samples.iter().filter_map(|(_, _, f)| f.as_ref()).collect();
    let (b, h) = (summary(&mut base), summary(&mut hit));
    let opened: Vec<usize> = resets.iter().map(|(n, _)| *n).collect();
    let calm = resets
        .iter()
        .filter(|(_, e)| matches!(e, Err(e) if calmed(e)))
        .count();
    let cut_off = resets
        .iter()
        .filter(|(n, e)| matches!(e, Err(e) if calmed(e) || e.is_io()) && *n < RESETS)
        .count();
    let report = format!(
        "rapid reset: {} connections ({cut_off} closed early, {calm} with GOAWAY \
         ENHANCE_YOUR_CALM), streams the \
         client queued before it saw the close: min {:?} max {:?}, \
         {reset_hits} requests reached the upstream; flood of {FLOOD} streams: {flood:?}, \
         connection {flood_end:?}, {flood_hits} reached the upstream; oversized header list: \
         {big}, next request {after}; healthy h2 p50/p99 {:?}/{:?} baseline ({} samples), \
         {:?}/{:?} attacked ({} samples), {} failed {:?}",
        resets.len(),
        opened.iter().min(),
        opened.iter().max(),
        b.0,
        b.1,
        base.len(),
        h.0,
        h.1,
        hit.len(),
        failed.len(),
        failed.first(),
    );
    eprintln!("h2: {report}");

    // Attacking connections are closed by the gateway before their resets are through:
    // with GOAWAY ENHANCE_YOUR_CALM, or a broken pipe when the close beats the GOAWAY to
    // the client's next write. (The client counts the streams it queued: a few batches
    // more than the gateway read before closing.) The limit counts streams reset before
    // the gateway took them up, so a connection whose every batch the gateway kept pace
    // with can get through — rarely, under CPU contention; with the limit off, every one
    // does.
    assert!(
        resets.len() >= 5 && cut_off * 10 >= resets.len() * 8 && calm > 0,
        "rapid-reset connections were not cut off: {cut_off} of {} closed early\n{report}",
        resets.len()
    );
    let refused = flood
        .get("reset Some(REFUSED_STREAM)")
        .copied()
        .unwrap_or(0);
    assert!(
        refused >= 1000 && flood_hits <= MAX_STREAMS,
        "streams beyond {MAX_STREAMS} were not refused\n{report}"
    );
    assert!(
        matches!(&flood_end, Some(Err(e)) if calmed(e)),
        "the flooding connection was not closed with GOAWAY ENHANCE_YOUR_CALM\n{report}"
    );
    assert!(
        big == "answered 431 Request Header Fields Too Large"
            || big == "reset Some(REFUSED_STREAM)",
        "an oversized header list was not refused\n{report}"
    );
    assert!(
        up.seen().iter().all(|s| !s.headers.contains_key("x-big")),
        "the oversized header list reached the upstream\n{report}"
    );
    assert_eq!(
        after, 200,
        "the connection is still usable after a refused stream"
    );
    assert!(
        failed.is_empty(),
        "healthy h2 requests failed during the attacks\n{report}"
    );
    assert!(
        h.1 <= allowed(b.1, Duration::from_millis(50)),
        "healthy h2 p99 {:?} attacked vs {:?} baseline\n{report}",
        h.1,
        b.1
    );
    // Every client connection closes with its runtime; then the gateway drains: the
    // attacks left no connection behind.
    drop(attack);
    drop(side);
    assert!(
        gw_rt.block_on(server.shutdown()),
        "the gateway did not drain after the attacks"
    );
    drop(up);
}

// === the connection cap ===

/// The gateway's `tidegate_connections` gauge (downstream connections open now), read
/// from the admin port.
async fn open_connections(admin: SocketAddr) -> u64 {
    let client = tidegate_tests::h1_client();
    let text = tidegate_tests::get(&client, admin, "/metrics").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix("tidegate_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tidegate_connections gauge in /metrics:\n{text}"))
}

/// The connection cap, on a real gateway process with `max_connections` 100: 1,500
/// connections that never send a byte take the 100 slots; the rest wait in (or beyond) the
/// kernel's accept queue, so the process holds about 100 more descriptors than when idle
/// and a healthy client is queued too. Once the attackers close, a healthy request is
/// answered promptly and the descriptors come back.
#[test]
fn connection_cap_bounds_descriptors_and_recovers() {
    const CAP: usize = 100;
    // Descriptors beyond the idle count and the cap: upstream connections and the like.
    const SPARE_FDS: usize = 16;
    let _serial = serial();
    let n = scaled(1500, "the connection cap test");
    let rt = runtime(2);
    let up = rt.block_on(Upstream::start());
    let mut c = config(&[up.addr]);
    set(&mut c, "server/limits/max_connections", json!(CAP));
    // The attackers send nothing; the head deadline would close them only after a minute,
    // far outside this test: the cap alone holds them back here.
    set(
        &mut c,
        "server/limits/header_read_timeout_ms",
        json!(60_000),
    );
    let gw = ChildGateway::spawn(&c);
    let (addr, admin) = (gw.addr, gw.admin_addr);

    // Warm up (the upstream connection is pooled from now on), then count.
    let st = rt.block_on(fresh_get(addr, "/healthy"));
    assert_eq!(st, Ok(200));
    std::thread::sleep(Duration::from_millis(200));
    let fds_idle = gw.fd_count();

    // The attack: every connection at once, each given two seconds to connect.
    let fd_peak = FdPeak::start(gw.pid());
    let t = Instant::now();
    let attackers: Vec<TcpStream> = rt.block_on(async {
        let tries: Vec<_> = (0..n)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(
                    Duration::from_secs(2),
                    TcpStream::connect(addr),
                ))
            })
            .collect();
        let mut held = Vec::new();
        for t in tries {
            if let Ok(Ok(s)) = t.await.expect("joins") {
                held.push(s);
            }
        }
        held
    });
    let connect_time = t.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (open, probe) = rt.block_on(async {
        let open = open_connections(admin).await;
        // A healthy client now waits behind the attackers.
        let probe = tokio::time::timeout(Duration::from_secs(1), fresh_get(addr, "/healthy")).await;
        (open, probe)
    });
    let fds_attack = fd_peak.peak().max(gw.fd_count());

    // The attackers leave; a healthy request gets through promptly.
    let held = attackers.len();
    drop(attackers);
    let t = Instant::now();
    let recovered = rt.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), fresh_get(addr, "/healthy")).await {
                Ok(Ok(200)) => break true,
                _ if t.elapsed() > Duration::from_secs(10) => break false,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    let recovery = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.fd_count() > fds_idle + 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let fds_after = gw.fd_count();
    drop(fd_peak);

    let report = format!(
        "{n} connections tried, {held} connected within 2 s ({connect_time:?}); the gateway \
         had {open} open; gateway fds idle {fds_idle}, peak {fds_attack}, after \
         {fds_after}; healthy probe while saturated: {}; first healthy answer {recovery:?} \
         after the attackers left",
        match &probe {
            Ok(r) => format!("answered {r:?}"),
            Err(_) => "still waiting after 1 s".to_owned(),
        }
    );
    eprintln!("connection cap: {report}");

    assert_eq!(
        open, CAP as u64,
        "the gateway holds exactly its cap\n{report}"
    );
    assert!(
        fds_attack <= fds_idle + CAP + SPARE_FDS,
        "file descriptors grew past the cap\n{report}"
    );
    assert!(
        probe.is_err(),
        "a connection beyond the cap was served while the cap was full\n{report}"
    );
    assert!(
        recovered && recovery < Duration::from_secs(5),
        "no prompt recovery\n{report}"
    );
    assert!(
        fds_after <= fds_idle + 4,
        "descriptors did not come back\n{report}"
    );
    drop(gw);
    drop(up);
}
