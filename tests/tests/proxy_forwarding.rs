//! Forwarding behaviour: header hygiene, request IDs, upstream timeouts and failures,
//! connect-failure retry, and the request body limit.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use serde_json::{Value, json};
use tidegate_tests::raw::exchange;
use tidegate_tests::{
    Upstream, config, dead_addr, full, get, h1_client, post, send, set, start_gateway, streamed,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Send raw HTTP/1.1 bytes (which must ask for `Connection: close`) and return the status
/// line, the header block and the body.
async fn raw_exchange(addr: SocketAddr, request: &str) -> (String, String, Vec<u8>) {
    let r = exchange(addr, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        r.closed,
        "the gateway answers and closes in time: {}",
        r.text()
    );
    r.head_and_body()
}

/// Connection-named, Keep-Alive, TE, Proxy-Connection never reach the upstream; X-Forwarded-* set.
#[tokio::test]
async fn hop_by_hop_request_headers_are_stripped() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[up.addr])).await;
    let (status, _, _) = raw_exchange(
        gw.listen_addrs[0],
        "GET /hop HTTP/1.1\r\nHost: example.test\r\nConnection: close, x-secret\r\n\
         x-secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
         Proxy-Connection: keep-alive\r\nx-keep: yes\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    for gone in ["x-secret", "keep-alive", "te", "proxy-connection"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h:?}");
    }
    // hyper's client may add its own `connection` header, but never the client's tokens.
    for v in h.get_all("connection") {
        assert!(!v.to_str().unwrap().contains("x-secret"), "{h:?}");
    }
    assert_eq!(h["x-keep"], "yes");
    assert_eq!(h["host"], "example.test");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(gw.shutdown().await);
}

/// Hop-by-hop headers in the upstream's response do not reach the client.
#[tokio::test]
async fn hop_by_hop_response_headers_are_stripped() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[up.addr])).await;
    let r = get(&h1_client(), gw.listen_addrs[0], "/x?hop=1").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-up-visible"], "1");
    assert!(r.headers.get("x-up-secret").is_none(), "{:?}", r.headers);
    assert!(r.headers.get("keep-alive").is_none(), "{:?}", r.headers);
    assert!(gw.shutdown().await);
}

/// A client's own `X-Forwarded-For` (from a peer that is not a trusted proxy) is replaced
/// by the peer's address, not passed on; see `trusted_proxies.rs` for a trusted peer.
#[tokio::test]
async fn forwarded_for_from_untrusted_peer_is_replaced() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[up.addr])).await;
    let req = Request::get(format!("http://{}/xff", gw.listen_addrs[0]))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=203.0.113.7")
        .header("x-real-ip", "203.0.113.7")
        .body(full(""))
        .unwrap();
    let r = send(&h1_client(), req).await;
    assert_eq!(r.status, StatusCode::OK);
    let h = &up.seen()[0].headers;
    let all = |n: &str| h.get_all(n).iter().collect::<Vec<_>>();
    assert_eq!(all("x-forwarded-for"), ["127.0.0.1"]);
    // The proto describes the gateway's own listener; a client cannot claim https.
    assert_eq!(all("x-forwarded-proto"), ["http"]);
    assert_eq!(all("forwarded").len(), 1, "{h:?}");
    assert!(
        h["forwarded"]
            .to_str()
            .unwrap()
            .starts_with("for=127.0.0.1;")
    );
    assert!(!h.contains_key("x-real-ip"), "{h:?}");
    assert!(gw.shutdown().await);
}

/// X-Forwarded-For sent by a trusted proxy as several lines keeps every hop, in order,
/// before the proxy's address.
#[tokio::test]
async fn forwarded_for_keeps_every_line() {
    let up = Upstream::start().await;
    let mut c = config(&[up.addr]);
    set(&mut c, "server/trusted_proxies", json!(["127.0.0.1/32"]));
    let gw = start_gateway(&c).await;
    let (status, _, _) = raw_exchange(
        gw.listen_addrs[0],
        "GET /xff HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\
         X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 198.51.100.2, 198.51.100.3\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let h = &up.seen()[0].headers;
    let all: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
    assert_eq!(
        all,
        ["198.51.100.1, 198.51.100.2, 198.51.100.3, 127.0.0.1"],
        "{h:?}"
    );
    assert!(gw.shutdown().await);
}

/// A client X-Request-Id is forwarded and echoed unchanged; otherwise a distinct one is generated.
#[tokio::test]
async fn request_id_kept_or_generated() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[up.addr])).await;
    let client = h1_client();
    let addr = gw.listen_addrs[0];

    let req = Request::get(format!("http://{addr}/rid"))
        .header("x-request-id", "client-chosen-42")
        .body(full(""))
        .unwrap();
    let r = send(&client, req).await;
    assert_eq!(r.headers["x-request-id"], "client-chosen-42");
    assert_eq!(up.seen()[0].headers["x-request-id"], "client-chosen-42");

    let a = get(&client, addr, "/rid").await;
    let b = get(&client, addr, "/rid").await;
    let (ida, idb) = (&a.headers["x-request-id"], &b.headers["x-request-id"]);
    assert!(!ida.is_empty());
    assert_ne!(ida, idb, "generated IDs are distinct");
    let seen = up.seen();
    assert_eq!(&seen[1].headers["x-request-id"], ida);
    assert_eq!(&seen[2].headers["x-request-id"], idb);

    // An unusable first value (empty, or over 128 bytes) is replaced, every line of it.
    for bad in [String::new(), "x".repeat(129)] {
        let req = Request::get(format!("http://{addr}/rid"))
            .header("x-request-id", bad.as_str())
            .header("x-request-id", "second-line")
            .body(full(""))
            .unwrap();
        let r = send(&client, req).await;
        let id = &r.headers["x-request-id"];
        assert!(!id.is_empty() && id != "second-line", "{id:?}");
        let seen = up.seen();
        let sent: Vec<_> = seen
            .last()
            .unwrap()
            .headers
            .get_all("x-request-id")
            .iter()
            .collect();
        assert_eq!(sent, [id], "the upstream sees the generated ID alone");
    }
    assert!(gw.shutdown().await);
}

/// An upstream slower than `request_timeout_ms` gives 504 `upstream_timeout`, on time.
#[tokio::test]
async fn slow_upstream_times_out() {
    let up = Upstream::start().await;
    let mut cfg = config(&[up.addr]);
    set(&mut cfg, "upstreams/up/request_timeout_ms", json!(300));
    let gw = start_gateway(&cfg).await;
    let started = Instant::now();
    let r = get(&h1_client(), gw.listen_addrs[0], "/slow?sleep_ms=5000").await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json(), json!({"error": "upstream_timeout"}));
    assert!(
        took >= Duration::from_millis(290),
        "answered early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1300),
        "answered late: {took:?}"
    );
    assert_eq!(up.hits(), 1);
    assert!(gw.shutdown().await);
}

/// A refused connection to the only endpoint gives 502 `upstream_unavailable`, counted in metrics.
#[tokio::test]
async fn dead_upstream_is_502() {
    let gw = start_gateway(&config(&[dead_addr()])).await;
    let client = h1_client();
    let r = get(&client, gw.listen_addrs[0], "/x").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json(), json!({"error": "upstream_unavailable"}));
    let m = get(&client, gw.admin_addr, "/metrics").await.text();
    assert!(
        m.contains(
            r#"tidegate_upstream_errors_total{upstream="up",error="upstream_unavailable"} 1"#
        ),
        "{m}"
    );
    assert!(gw.shutdown().await);
}

/// With one dead and one live endpoint, every request (bodies included) succeeds via connect retry.
#[tokio::test]
async fn connect_failure_retries_next_endpoint() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[dead_addr(), up.addr])).await;
    // Requests without a Host get the endpoint's, and a retry the live endpoint's, not the
    // dead one's it was first meant for (endpoints take turns: some of these try the dead one
    // first).
    for i in 0..4 {
        let (status, _, body) = raw_exchange(
            gw.listen_addrs[0],
            &format!("GET /nohost/{i} HTTP/1.0\r\n\r\n"),
        )
        .await;
        assert!(status.contains(" 200 "), "request {i}: {status}");
        let body: Value = serde_json::from_slice(&body).expect("the upstream's echo");
        assert_eq!(body["headers"]["host"], up.addr.to_string(), "request {i}");
    }
    let client = h1_client();
    for i in 0..10 {
        let r = if i % 2 == 0 {
            get(&client, gw.listen_addrs[0], &format!("/r/{i}")).await
        } else {
            post(
                &client,
                gw.listen_addrs[0],
                &format!("/r/{i}"),
                vec![b'b'; 1000],
            )
            .await
        };
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
        let body: Value = r.json();
        assert_eq!(body["path"], format!("/r/{i}"));
        assert_eq!(
            body["body_len"],
            if i % 2 == 0 { 0 } else { 1000 },
            "request {i}"
        );
    }
    assert_eq!(up.hits(), 14);
    assert!(gw.shutdown().await);
}

/// A Content-Length over `max_body_bytes` gives 413, upstream untouched; exactly at it passes.
#[tokio::test]
async fn declared_body_over_limit_is_413() {
    let up = Upstream::start().await;
    let mut cfg = config(&[up.addr]);
    set(&mut cfg, "server/limits/max_body_bytes", json!(1024));
    let gw = start_gateway(&cfg).await;
    let client = h1_client();
    let r = post(&client, gw.listen_addrs[0], "/upload", vec![b'a'; 4096]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json(), json!({"error": "body_too_large"}));
    assert_eq!(up.hits(), 0, "the upstream saw the refused request");

    let r = post(&client, gw.listen_addrs[0], "/upload", vec![b'a'; 1024]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["body_len"], 1024);
    assert_eq!(up.hits(), 1);
    assert!(gw.shutdown().await);
}

/// A chunked body growing past `max_body_bytes` gives 413; the upstream never gets bytes over it.
#[tokio::test]
async fn streamed_body_over_limit_is_413() {
    let up = Upstream::start().await;
    let mut cfg = config(&[up.addr]);
    set(&mut cfg, "server/limits/max_body_bytes", json!(100_000));
    let gw = start_gateway(&cfg).await;
    let req = Request::post(format!("http://{}/upload", gw.listen_addrs[0]))
        .body(streamed(1_000_000))
        .unwrap();
    let r = send(&h1_client(), req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_eq!(r.json(), json!({"error": "body_too_large"}));
    assert!(
        up.body_bytes() <= 100_000,
        "upstream got {} bytes",
        up.body_bytes()
    );
    assert!(gw.shutdown().await);
}

/// A raw HTTP/1.1 upstream answering `200 ok` to each request head, counting the connections
/// it accepts. Without `keep_alive` it closes each connection after its first answer, which
/// still says nothing of closing (a keep-alive timeout of zero).
async fn raw_upstream(
    keep_alive: bool,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() || !keep_alive {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (up, accepted, server)
}

/// An upstream that answers one request per connection, keep-alive in form, and then closes
/// (a keep-alive timeout of zero). Requests on one client connection, back to back and with
/// pauses, all get answered: a closed idle upstream connection is noticed before use, and a
/// GET that raced the close is sent again on a fresh connection.
#[tokio::test]
async fn upstream_closing_idle_connections_is_invisible_to_gets() {
    let (up, accepted, server) = raw_upstream(false).await;
    let gw = start_gateway(&config(&[up])).await;
    let client = h1_client();
    for i in 0..40 {
        let r = get(&client, gw.listen_addrs[0], &format!("/k/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
        assert_eq!(r.text(), "ok");
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        40,
        "one upstream connection per request"
    );
    assert!(gw.shutdown().await);
    server.abort();
}

/// Read from `c` until what came ends with `end` (each read within 10 s, the connection
/// not closed before).
async fn read_until(c: &mut tokio::net::TcpStream, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(end) {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_ne!(n, 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

/// A keep-alive connection's next head may take its whole `header_read_timeout`, even when
/// an earlier wait's (shorter) deadline is still armed: that one waking is not this one's.
#[tokio::test]
async fn a_later_head_keeps_its_own_deadline() {
    let up = Upstream::start().await;
    let mut cfg = config(&[up.addr]);
    set(
        &mut cfg,
        "server/limits/header_read_timeout_ms",
        json!(5_000),
    );
    let gw = start_gateway(&cfg).await;
    let mut c = tokio::net::TcpStream::connect(gw.listen_addrs[0])
        .await
        .unwrap();
    // The echo upstream's answer is a JSON object.
    let answer = async |c: &mut tokio::net::TcpStream| read_until(c, b"}").await;
    c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(answer(&mut c).await.starts_with("HTTP/1.1 200"));
    // Half a head at once, the rest past the first wait's park delay (1 s).
    c.write_all(b"GET /b HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    c.write_all(b"st: x\r\n\r\n").await.unwrap();
    assert!(answer(&mut c).await.starts_with("HTTP/1.1 200"));
    assert!(gw.shutdown().await);
}

/// A client connection idle past the park delay (its buffers given back, its upstream
/// connection put in the endpoint's stock) serves on: the next request, arriving in pieces
/// with a 6 KB field, is answered over the same upstream connection, taken back.
#[tokio::test]
async fn a_parked_connection_serves_on() {
    let (up, accepted, server) = raw_upstream(true).await;
    let gw = start_gateway(&config(&[up])).await;
    let mut c = tokio::net::TcpStream::connect(gw.listen_addrs[0])
        .await
        .unwrap();
    let answer = async |c: &mut tokio::net::TcpStream| read_until(c, b"\r\n\r\nok").await;
    c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(answer(&mut c).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let big = format!(
        "GET /b HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "v".repeat(6000)
    );
    for piece in big.as_bytes().chunks(20).take(3) {
        c.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    c.write_all(&big.as_bytes()[60..]).await.unwrap();
    assert!(answer(&mut c).await.starts_with("HTTP/1.1 200"));
    c.write_all(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(answer(&mut c).await.starts_with("HTTP/1.1 200"));
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the upstream connection is kept while parked"
    );
    assert!(gw.shutdown().await);
    server.abort();
}

/// Upstream connections outlive the client connections that opened them: a client
/// connection that closes or parks puts its upstream connection in the endpoint's stock,
/// and the next one without an upstream connection of its own takes it from there. With
/// `pool_max_idle_per_endpoint: 0` none is kept, and every client connection opens its own.
#[tokio::test]
async fn idle_upstream_connections_pass_between_clients() {
    for (kept, opened) in [(256, [1, 1, 1, 2]), (0, [1, 2, 3, 4])] {
        let (up, accepted, server) = raw_upstream(true).await;
        let mut cfg = config(&[up]);
        set(
            &mut cfg,
            "upstreams/up/pool_max_idle_per_endpoint",
            json!(kept),
        );
        let gw = start_gateway(&cfg).await;
        let connect = async || {
            tokio::net::TcpStream::connect(gw.listen_addrs[0])
                .await
                .unwrap()
        };
        let ask = async |c: &mut tokio::net::TcpStream| {
            c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            assert!(
                read_until(c, b"\r\n\r\nok")
                    .await
                    .starts_with("HTTP/1.1 200")
            );
            accepted.load(std::sync::atomic::Ordering::SeqCst)
        };
        let mut seen = Vec::new();
        // One client asks and leaves; the next one asks and stays, past the park delay.
        let mut a = connect().await;
        seen.push(ask(&mut a).await);
        drop(a);
        let mut b = connect().await;
        // The gateway notices the first client's close as soon as it can read it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen.push(ask(&mut b).await);
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        // A third takes the parked one's upstream connection; that one, asking again,
        // finds none left and opens another.
        let mut c = connect().await;
        seen.push(ask(&mut c).await);
        seen.push(ask(&mut b).await);
        assert_eq!(seen, opened, "upstream connections opened, kept {kept}");
        assert!(gw.shutdown().await);
        server.abort();
    }
}

/// How long until the gateway closes `c` (reading and dropping what it sends), at most 8 s.
async fn closed_after(c: &mut tokio::net::TcpStream) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(8), c.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return t.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("still open after 8 s"),
        }
    }
}

/// A parked connection (idle past the park delay: the task serving it has ended, a small
/// one waits for its bytes) keeps the deadlines of the wait it was parked in: the idle
/// timeout closes one, whether or not it has asked anything yet, and shutdown any at once.
/// One parked before its first request may still start HTTP/2 (hyper's).
#[tokio::test]
async fn parked_connections_keep_their_deadlines() {
    let up = Upstream::start().await;
    let mut cfg = config(&[up.addr]);
    set(&mut cfg, "server/limits/idle_timeout_ms", json!(3_500));
    set(
        &mut cfg,
        "server/limits/header_read_timeout_ms",
        json!(6_000),
    );
    set(&mut cfg, "server/shutdown_grace_ms", json!(10_000));
    let gw = start_gateway(&cfg).await;
    let addr = gw.listen_addrs[0];
    let answered = async || {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_until(&mut c, b"}").await.starts_with("HTTP/1.1 200"));
        c
    };
    let idle = async {
        let mut c = answered().await;
        closed_after(&mut c).await
    };
    let silent = async {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        closed_after(&mut c).await
    };
    let late_h2 = async {
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let io = hyper_util::rt::TokioIo::new(c);
        let exec = hyper_util::rt::TokioExecutor::new();
        let (mut h2, conn) = hyper::client::conn::http2::handshake(exec, io)
            .await
            .expect("an HTTP/2 connection");
        tokio::spawn(conn);
        let req = Request::get(format!("http://{addr}/h2"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        h2.send_request(req).await.unwrap().status()
    };
    let (idle, silent, h2) = tokio::join!(idle, silent, late_h2);
    assert!(
        (Duration::from_millis(3_300)..Duration::from_millis(4_500)).contains(&idle),
        "closed by the idle timeout (3.5 s) after {idle:?}"
    );
    assert!(
        (Duration::from_millis(3_300)..Duration::from_millis(4_500)).contains(&silent),
        "closed by the idle timeout before a first request after {silent:?}"
    );
    assert_eq!(h2, StatusCode::OK);

    // Parked, 2.2 s before its idle timeout.
    let mut c = answered().await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let t = Instant::now();
    assert!(gw.shutdown().await, "every connection closed");
    assert!(
        t.elapsed() < Duration::from_millis(1_500),
        "shutdown waited {:?} for a parked connection",
        t.elapsed()
    );
    assert!(closed_after(&mut c).await < Duration::from_millis(500));
}

/// The own upstream client keeps an answer's fields as they came; both servers pass them
/// on, hop-by-hop ones stripped: the fast path's writer, and hyper's, which serves a
/// connection after a request the fast path hands to it (a chunked body). A bodiless
/// request there still goes out on the connection's own upstream connection.
#[tokio::test]
async fn answers_keep_the_upstreams_fields_on_both_servers() {
    let up = Upstream::start().await;
    let gw = start_gateway(&config(&[up.addr])).await;
    let check = |answer: &str, path: &str| {
        assert!(answer.starts_with("200 OK"), "{answer}");
        assert!(
            answer.contains("content-type: application/json"),
            "{answer}"
        );
        assert!(answer.contains("x-request-id: "), "{answer}");
        assert!(answer.contains(&format!("\"path\":\"{path}\"")), "{answer}");
        let lower = answer.to_ascii_lowercase();
        assert!(
            !lower.contains("keep-alive"),
            "hop-by-hop passed on: {answer}"
        );
    };
    let (status, head, body) = raw_exchange(
        gw.listen_addrs[0],
        "GET /a?ka=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let fast = format!(
        "{}\n{head}\n{}",
        &status[9..],
        String::from_utf8_lossy(&body)
    );
    check(&fast, "/a?ka=1");
    let r = exchange(
        gw.listen_addrs[0],
        b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /c?ka=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    let text = r.text();
    check(text.rsplit("HTTP/1.1 ").next().unwrap(), "/c?ka=1");
    assert_eq!(up.hits(), 3);
    assert!(gw.shutdown().await);
}
