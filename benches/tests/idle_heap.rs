//! An idle keep-alive connection keeps little heap once it is parked: a gateway in this
//! process (the peer comparison's no-rules config, in front of a backend in this process)
//! serves one request on each of `CONNS` client connections, which then stay open and
//! idle past the park delay; a global allocator (this test binary only) counts the bytes
//! live in the whole process before and after. Parked dormant (the socket in the lot's own
//! `epoll` set, its state in the lot's table) a connection kept 258 bytes when this test was
//! written (its slot, the table's room grown by doubling, its deadline's entry); parked with
//! the runtime's registration and its objects (the connection's facts, its upstream cache and
//! activity record, the sleeper) it kept 760, and this test fails.

// The allocator wrapper is an unsafe thing of this crate (`GlobalAlloc` is an unsafe
// trait): see `[lints]` in benches/Cargo.toml.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::net::TcpStream;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tidegate_benches::{HELLO, hello_backend, peer_config};

/// [`System`], counting the bytes live in the process.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Client connections held idle.
const CONNS: usize = 400;
/// Bytes of heap a parked connection may keep (dormant: 258 measured; sleeping: 760).
const BOUND: i64 = 400;

#[test]
fn a_parked_connection_keeps_little_heap() {
    // The gateway on the runtime's worker; the clients here, with blocking sockets, so
    // that they keep no heap of their own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let server = rt.block_on(async {
        let backend = hello_backend().await.expect("a backend");
        let text = peer_config(false, "127.0.0.1:0", "127.0.0.1:0", &backend.to_string());
        let mut config: serde_json::Value = serde_json::from_str(&text).expect("json");
        // Nothing closed while the test looks: idle and head deadlines of minutes.
        config["server"]["limits"] = serde_json::json!({
            "idle_timeout_ms": 600_000, "header_read_timeout_ms": 300_000
        });
        let loaded = rules::load("idle.json", config.to_string().as_bytes()).expect("loads");
        tidegate::start(loaded).await.expect("starts")
    });
    let gw = server.listen_addrs[0];

    // What the first requests make once: metric series, and the upstream connections'
    // stock filled to its bound (256), as the connections below leave it.
    drop(open(gw, 300));
    std::thread::sleep(Duration::from_millis(300));

    let before = settled();
    let idle = open(gw, CONNS);
    // Past the park delay (1 s): every connection parked.
    std::thread::sleep(Duration::from_millis(2500));
    let after = settled();
    let per = (after - before) / CONNS as i64;
    eprintln!(
        "{CONNS} parked connections: {} bytes of heap, {per} each",
        after - before
    );
    assert!(
        per < BOUND,
        "a parked connection keeps {per} bytes of heap (bound {BOUND})"
    );
    drop(idle);
    drop(server);
}

/// `n` client connections, each served one request and left open.
fn open(gw: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = TcpStream::connect(gw).expect("connects");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a timeout");
        let req = format!("GET /envelopes/{i} HTTP/1.1\r\nhost: gw\r\nx-app-id: app7\r\n\r\n");
        c.write_all(req.as_bytes()).expect("sends");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(HELLO) {
            let n = c.read(&mut buf).expect("answered within 5 s");
            assert!(
                n > 0,
                "closed before the answer: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        conns.push(c);
    }
    conns
}

/// The live heap once the process's background work (the admin thread, sweeps) has let
/// it settle: two readings 100 ms apart within 4 KB.
fn settled() -> i64 {
    let mut last = LIVE.load(Ordering::Relaxed);
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = LIVE.load(Ordering::Relaxed);
        if (now - last).abs() < 4096 {
            return now;
        }
        last = now;
    }
    last
}
