//! Broken upstreams: one that resets before or during its response, hangs before or after
//! its headers, answers garbage, or closes without answering. Each gives the client a clean
//! 502/504 (or, once a status is already sent, a cut connection), the configured breaker
//! opens, and no connection or task is leaked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use serde_json::json;
use tidegate_tests::{config, full, h1_client, set, start_gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw-TCP upstream whose behaviour is chosen by the request path. It counts the
/// connections it holds open, so the test can see the gateway close every one.
struct Faulty {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Faulty {
    async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let o = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let o = o.clone();
                o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    serve(s).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self { addr, open, task }
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read one request head and misbehave as its path says; return when the peer has closed.
async fn serve(mut s: TcpStream) {
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&got).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
    match path.as_str() {
        "/reset-before" => {
            let _ = s.set_zero_linger();
            return; // dropped with linger 0: RST
        }
        "/reset-mid" => {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
                .await;
            let _ = s.set_zero_linger();
            return;
        }
        "/garbage" => {
            let _ = s
                .write_all(b"SSH-2.0-OpenSSH_9.2\r\nnot http at all\r\n\r\n")
                .await;
        }
        "/close" => return,
        "/hang-after-headers" => {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
                .await;
        }
        // "/hang-before-headers" and anything else: say nothing.
        _ => {}
    }
    // Hold the connection until the gateway gives up on it.
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Status and whether the body arrived whole (`None` status: no response head at all).
async fn call(client: &tidegate_tests::Client, gw: SocketAddr, path: &str) -> (u16, bool) {
    let req = http::Request::get(format!("http://{gw}{path}"))
        .body(full(bytes::Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("answered in time")
        .expect("a response head");
    let status = resp.status().as_u16();
    let whole = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the body ends in time")
        .is_ok();
    (status, whole)
}

/// Every fault gives a clean answer within the timeouts, and afterwards the gateway holds no
/// upstream connection and no extra task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_answered_cleanly_and_nothing_leaks() {
    let up = Faulty::start().await;
    let mut c = config(&[up.addr]);
    set(&mut c, "upstreams/up/request_timeout_ms", json!(500));
    set(&mut c, "upstreams/up/read_timeout_ms", json!(300));
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();

    for (path, want, whole) in [
        ("/reset-before", 502, true),
        ("/garbage", 502, true),
        ("/close", 502, true),
        ("/hang-before-headers", 504, true),
        // The status is already sent when these fail: the client sees the body cut.
        ("/reset-mid", 200, false),
        ("/hang-after-headers", 200, false),
    ] {
        let t = Instant::now();
        let got = call(&client, gw, path).await;
        assert_eq!(got, (want, whole), "{path}");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{path}: took {:?}",
            t.elapsed()
        );
    }

    // No upstream connection is left open by the gateway, and no task lingers.
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.open.load(Ordering::SeqCst) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} upstream connections leaked",
            up.open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client); // its pooled connection to the gateway and that connection's task
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        if now <= tasks_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tasks: {tasks_before} before, {now} after"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.shutdown().await);
}

/// Garbage from the upstream counts as failures: the configured breaker opens and answers
/// its fallback without calling the upstream.
#[tokio::test]
async fn garbage_opens_the_breaker() {
    let up = Faulty::start().await;
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "breakers",
        json!([{ "name": "up-breaker", "upstream": "up", "window_ms": 10000, "min_calls": 5,
                 "error_ratio": "50%", "open_ms": 60000,
                 "response": { "status": 503, "body": { "error": "degraded" } } }]),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();
    for _ in 0..5 {
        assert_eq!(call(&client, gw, "/garbage").await.0, 502);
    }
    let (status, _) = call(&client, gw, "/garbage").await;
    assert_eq!(status, 503, "the breaker is open and answers locally");
    assert!(server.shutdown().await);
}
