//! WebSocket (HTTP/1.1 `Upgrade`) through the gateway, end to end, with a real WebSocket
//! client and server (tokio-tungstenite): messages echo both ways through the tunnel; the
//! upgrade request is routed and limited by the same rules as any request; an idle tunnel
//! is closed while a busy one is not; the tunnel cap refuses the next upgrade with 503
//! before the upstream hears of it; a route without the opt-in strips `Upgrade` (as does a
//! body or another method on one with it); and a 101 nobody asked for never reaches the
//! client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use http::HeaderMap;
use serde_json::{Value, json};
use tidegate_tests::{
    Client, TIMEOUT, Upstream, config, get, h1_client, metric_value, raw, set, start_gateway,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket echo server on `127.0.0.1:0`: it records the head of every handshake it
/// accepts and sends back every text and binary message as it came.
struct EchoServer {
    addr: SocketAddr,
    /// Path and headers of each accepted handshake, in order.
    handshakes: Arc<Mutex<Vec<(String, HeaderMap)>>>,
    /// Connections it has open now.
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl EchoServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("a bound address");
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicUsize::new(0));
        let (h, o) = (handshakes.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (h, o) = (h.clone(), o.clone());
                tokio::spawn(async move {
                    #[expect(
                        clippy::result_large_err,
                        reason = "tungstenite's handshake callback fixes the error type"
                    )]
                    let record = |req: &Request, resp: Response| {
                        let path = req.uri().path().to_owned();
                        h.lock().unwrap().push((path, req.headers().clone()));
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, record).await else {
                        return;
                    };
                    o.fetch_add(1, Ordering::SeqCst);
                    while let Some(Ok(m)) = ws.next().await {
                        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                            break;
                        }
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            handshakes,
            open,
            task,
        }
    }

    fn handshakes(&self) -> Vec<(String, HeaderMap)> {
        self.handshakes.lock().unwrap().clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream that answers every request head with a 101 (naming `Upgrade: websocket`, or
/// the protocol after `/switch/` in the path) followed at once by bytes of the "new
/// protocol": what a confused or hostile upstream does to a request that never asked.
struct SwitchingUpstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// What [`SwitchingUpstream`] writes after its 101.
const SMUGGLED: &str = "SMUGGLED-BYTES";

impl SwitchingUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("a bound address");
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("/");
                    let proto = path.strip_prefix("/switch/").unwrap_or("websocket");
                    let answer = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: {proto}\r\nSec-WebSocket-Accept: x\r\n\r\n{SMUGGLED}"
                    );
                    let _ = tcp.write_all(answer.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for SwitchingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config whose default route sends to `up` and allows WebSocket upgrades.
fn ws_config(up: SocketAddr) -> Value {
    let mut c = config(&[up]);
    set(&mut c, "routes/0/upgrade", json!(["websocket"]));
    c
}

/// Open a WebSocket through the gateway at `gw` as `user` (`x-user-id`).
async fn connect(gw: SocketAddr, path: &str, user: &str) -> Result<Ws, WsError> {
    let mut req = format!("ws://{gw}{path}")
        .into_client_request()
        .expect("a valid URL");
    req.headers_mut()
        .insert("x-user-id", user.parse().expect("a header value"));
    req.headers_mut()
        .insert("x-app-id", "douyin".parse().expect("a header value"));
    tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(req))
        .await
        .expect("the handshake ends in time")
        .map(|(ws, _)| ws)
}

/// The status and body of a refused handshake.
fn refusal(r: Result<Ws, WsError>) -> (u16, String) {
    match r {
        Err(WsError::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("refused without an HTTP answer: {e}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

/// Send `m` and read the next data message back.
async fn echo(ws: &mut Ws, m: Message) -> Message {
    tokio::time::timeout(TIMEOUT, ws.send(m))
        .await
        .expect("sent in time")
        .expect("sent");
    loop {
        let got = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("an answer in time")
            .expect("the tunnel is open")
            .expect("a message");
        if got.is_text() || got.is_binary() {
            return got;
        }
    }
}

/// Whether the tunnel has been closed by the other side: the next read ends the stream or
/// fails (a close without a closing handshake), within `within`. `false` when it is still
/// open then.
async fn closed_within(ws: &mut Ws, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return false,
            Ok(None | Some(Err(_))) => return true,
            Ok(Some(Ok(m))) if m.is_close() => return true,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Close as a client does: send the close frame, read until the server's side ends, drop.
async fn close(mut ws: Ws) {
    ws.close(None).await.expect("closing");
    assert!(closed_within(&mut ws, TIMEOUT).await, "never closed");
}

async fn metrics(client: &Client, admin: SocketAddr) -> String {
    get(client, admin, "/metrics").await.text()
}

/// Wait until the metric `series` reads `want` (polled every 10 ms), at most [`TIMEOUT`].
async fn until_metric(client: &Client, admin: SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let v = metric_value(&metrics(client, admin).await, series);
        if v == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {v:?}, never {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Text, binary and a 300 KiB binary message (many frames' worth) echo through the tunnel
/// unchanged; the upstream saw the upgrade with its WebSocket headers; the tunnel is
/// counted while open and no longer once the client closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_round_trip() {
    let echo_srv = EchoServer::start().await;
    let server = start_gateway(&ws_config(echo_srv.addr)).await;
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();

    let mut ws = connect(gw, "/chat/room-1", "alice")
        .await
        .expect("upgraded");
    assert_eq!(
        echo(&mut ws, Message::text("hello")).await,
        Message::text("hello")
    );
    let bin: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    assert_eq!(
        echo(&mut ws, Message::binary(bin.clone())).await,
        Message::binary(bin)
    );
    let big: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        echo(&mut ws, Message::binary(big.clone())).await,
        Message::binary(big)
    );

    let seen = echo_srv.handshakes();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (path, h) = &seen[0];
    assert_eq!(path, "/chat/room-1");
    assert!(h["upgrade"].as_bytes().eq_ignore_ascii_case(b"websocket"));
    assert!(h["connection"].as_bytes().eq_ignore_ascii_case(b"upgrade"));
    assert!(h.contains_key("sec-websocket-key"), "{h:?}");
    assert_eq!(h["x-user-id"], "alice");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");

    let text = metrics(&client, admin).await;
    let switched = r#"tidegate_upgrades_total{route="default",outcome="switched"}"#;
    assert_eq!(metric_value(&text, switched), Some(1.0), "{text}");
    assert_eq!(
        metric_value(&text, "tidegate_upgraded_connections"),
        Some(1.0)
    );
    close(ws).await;
    until_metric(&client, admin, "tidegate_upgraded_connections", 0.0).await;
    let closed = r#"tidegate_upgraded_closed_total{reason="closed"}"#;
    until_metric(&client, admin, closed, 1.0).await;
    server.shutdown().await;
}

/// The upgrade request goes through the rules: a route for the `chat` interface sends it
/// to another upstream than the default route, and a per-user limit on `chat` refuses a
/// user's third upgrade with 429 (the upstream never hears of it) while another user's
/// passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_and_limited_like_any_request() {
    let (a, b) = (EchoServer::start().await, EchoServer::start().await);
    let mut c = ws_config(a.addr);
    c["interfaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "chat", "method": "GET", "path": "/chat" }));
    set(
        &mut c,
        "upstreams/b",
        json!({ "endpoints": [b.addr.to_string()] }),
    );
    c["routes"].as_array_mut().unwrap().push(json!({
        "name": "chat", "match": { "interfaces": ["chat"] }, "upstream": "b",
        "upgrade": ["websocket"]
    }));
    set(
        &mut c,
        "limits",
        json!([{ "name": "chat-per-user", "match": { "interfaces": ["chat"] },
                 "key": ["user"], "rate": "1/min", "burst": 2 }]),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];

    let mut elsewhere = connect(gw, "/other", "alice").await.expect("upgraded");
    let mut kept = Vec::new();
    for _ in 0..2 {
        kept.push(connect(gw, "/chat", "alice").await.expect("upgraded"));
    }
    let (status, body) = refusal(connect(gw, "/chat", "alice").await);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("rate_limited"), "{body}");
    let mut bob = connect(gw, "/chat", "bob")
        .await
        .expect("another user's passes");

    assert_eq!(echo(&mut bob, Message::text("b")).await, Message::text("b"));
    assert_eq!(
        echo(&mut elsewhere, Message::text("a")).await,
        Message::text("a")
    );
    let paths = |s: &EchoServer| {
        s.handshakes()
            .into_iter()
            .map(|(p, _)| p)
            .collect::<Vec<_>>()
    };
    assert_eq!(paths(&a), ["/other"]);
    assert_eq!(paths(&b), ["/chat", "/chat", "/chat"]);
    drop(kept);
    server.shutdown().await;
}

/// A tunnel with no byte moving for `upgrade_idle_timeout_ms` (400 ms here) is closed, both
/// sides; one that carries a message every 100 ms outlives that timeout several times over
/// (the baseline: the timeout counts silence, not age).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnel_is_closed() {
    let echo_srv = EchoServer::start().await;
    let mut c = ws_config(echo_srv.addr);
    set(&mut c, "server/limits/upgrade_idle_timeout_ms", json!(400));
    let server = start_gateway(&c).await;
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();

    let mut busy = connect(gw, "/", "busy").await.expect("upgraded");
    let mut idle = connect(gw, "/", "idle").await.expect("upgraded");
    assert_eq!(
        echo(&mut idle, Message::text("x")).await,
        Message::text("x")
    );
    let started = Instant::now();
    for i in 0..15 {
        let m = Message::text(format!("tick {i}"));
        assert_eq!(echo(&mut busy, m.clone()).await, m);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)).await,
        "the idle tunnel is still open"
    );
    // The upstream side was closed too.
    let deadline = Instant::now() + TIMEOUT;
    while echo_srv.open.load(Ordering::SeqCst) > 1 {
        assert!(Instant::now() < deadline, "the upstream side stayed open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        echo(&mut busy, Message::text("still")).await,
        Message::text("still")
    );
    let series = r#"tidegate_upgraded_closed_total{reason="idle_timeout"}"#;
    until_metric(&client, admin, series, 1.0).await;
    server.shutdown().await;
}

/// With `max_upgraded_connections: 2`, the third concurrent upgrade is answered 503
/// `upgrade_capacity` and never reaches the upstream; once a tunnel closes, its place is
/// free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cap_refuses_the_next_tunnel() {
    let echo_srv = EchoServer::start().await;
    let mut c = ws_config(echo_srv.addr);
    set(&mut c, "server/limits/max_upgraded_connections", json!(2));
    let server = start_gateway(&c).await;
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();

    let first = connect(gw, "/", "u1").await.expect("upgraded");
    let _second = connect(gw, "/", "u2").await.expect("upgraded");
    let (status, body) = refusal(connect(gw, "/", "u3").await);
    assert_eq!(
        (status, body.as_str()),
        (503, r#"{"error":"upgrade_capacity"}"#)
    );
    assert_eq!(echo_srv.handshakes().len(), 2);
    let refused = r#"tidegate_upgrades_total{route="default",outcome="refused_capacity"}"#;
    assert_eq!(
        metric_value(&metrics(&client, admin).await, refused),
        Some(1.0)
    );

    close(first).await;
    until_metric(&client, admin, "tidegate_upgraded_connections", 1.0).await;
    let mut third = connect(gw, "/", "u3")
        .await
        .expect("a freed place is taken");
    assert_eq!(
        echo(&mut third, Message::text("t")).await,
        Message::text("t")
    );
    server.shutdown().await;
}

/// `Upgrade` reaches no upstream that did not opt in: on a route without `upgrade` the
/// handshake is forwarded as an ordinary GET (no `Upgrade`, no `Connection`) and its answer
/// comes back as it is; on a route with it, a POST with a body asking for websocket is not
/// an upgrade either (bytes after the head are its body, not a new protocol).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_is_stripped_without_the_opt_in() {
    let up = Upstream::start().await;
    let mut c = ws_config(up.addr);
    c["routes"].as_array_mut().unwrap().insert(
        0,
        json!({ "name": "plain", "match": { "interfaces": ["open"] }, "upstream": "up" }),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];

    let (status, _) = refusal(connect(gw, "/envelopes/e1", "alice").await);
    assert_eq!(status, 200, "the upstream's own answer to a plain GET");
    let smuggle = format!(
        "POST /anything HTTP/1.1\r\nHost: {gw}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Content-Length: 5\r\n\r\nhello"
    );
    let reply = raw::exchange(gw, smuggle.as_bytes(), Duration::from_millis(500)).await;
    assert_eq!(reply.statuses(), [200], "{}", reply.text());

    let seen = up.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        for gone in ["upgrade", "connection"] {
            assert!(
                s.headers.get(gone).is_none(),
                "{gone} reached {}: {s:?}",
                s.path
            );
        }
        assert!(s.headers.contains_key("sec-websocket-key"), "{s:?}");
    }
    assert_eq!(seen[0].path, "/envelopes/e1");

    // The same handshake on the opted-in default route does carry the ask; this upstream
    // answers 200 instead of switching, and that answer is passed through as it is.
    let (status, body) = refusal(connect(gw, "/ws", "alice").await);
    assert_eq!(status, 200);
    assert!(body.contains(r#""path":"/ws""#), "{body}");
    let asked = &up.seen()[2];
    assert!(
        asked.headers["upgrade"]
            .as_bytes()
            .eq_ignore_ascii_case(b"websocket")
    );
    let client = h1_client();
    let declined = r#"tidegate_upgrades_total{route="default",outcome="declined"}"#;
    let text = metrics(&client, server.admin_addr).await;
    assert_eq!(metric_value(&text, declined), Some(1.0), "{text}");
    assert_eq!(
        metric_value(&text, "tidegate_upgraded_connections"),
        Some(0.0)
    );
    server.shutdown().await;
}

/// Shutdown closes open tunnels at once (they have no request boundary to wait for): the
/// client sees its connection end, and the gateway's shutdown does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_tunnels() {
    let echo_srv = EchoServer::start().await;
    let server = start_gateway(&ws_config(echo_srv.addr)).await;
    let mut ws = connect(server.listen_addrs[0], "/", "alice")
        .await
        .expect("upgraded");
    assert_eq!(echo(&mut ws, Message::text("x")).await, Message::text("x"));
    let t0 = Instant::now();
    server.shutdown().await;
    assert!(
        closed_within(&mut ws, Duration::from_secs(5)).await,
        "the tunnel outlived the gateway"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// A 101 is passed on only as the answer to the upgrade a route allowed: to a request that
/// did not ask (a POST with a body, a GET whose `Upgrade` was stripped) or that asked for
/// another protocol, it is a 502, and none of the upstream's bytes after it reach the
/// client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unasked_switch_is_a_bad_gateway() {
    let up = SwitchingUpstream::start().await;
    let mut c = ws_config(up.addr);
    c["routes"].as_array_mut().unwrap().insert(
        0,
        json!({ "name": "plain", "match": { "interfaces": ["create", "open"] },
                "upstream": "up" }),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let within = Duration::from_millis(1500);

    let cases = [
        // No ask: a POST with a body (the hyper client path).
        format!("POST /envelopes HTTP/1.1\r\nHost: {gw}\r\nContent-Length: 2\r\n\r\n{{}}"),
        // No ask: a bodiless GET (the gateway's own client).
        format!("GET /envelopes/e1 HTTP/1.1\r\nHost: {gw}\r\n\r\n"),
        // An ask on a route without the opt-in: stripped, so nobody asked.
        format!(
            "GET /envelopes/e1 HTTP/1.1\r\nHost: {gw}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        ),
        // An allowed ask answered with another protocol.
        format!(
            "GET /switch/h2c HTTP/1.1\r\nHost: {gw}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        ),
    ];
    for req in cases {
        let reply = raw::exchange(gw, req.as_bytes(), within).await;
        let line = req.lines().next().unwrap();
        assert_eq!(reply.statuses(), [502], "{line}: {}", reply.text());
        assert!(!reply.text().contains(SMUGGLED), "{line}: {}", reply.text());
    }
    // The allowed ask answered in kind does switch: the check above is not blanket.
    let ok = format!(
        "GET /switch/websocket HTTP/1.1\r\nHost: {gw}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    let reply = raw::exchange(gw, ok.as_bytes(), within).await;
    assert_eq!(reply.statuses(), [101], "{}", reply.text());
    assert!(reply.text().ends_with(SMUGGLED), "{}", reply.text());
    server.shutdown().await;
}

/// An allowed upgrade that the gateway itself answers after the decision (here: no overload
/// slot, the one slot held by a slow request) is counted `refused`, opens no tunnel and
/// gives its tunnel place back (with a cap of one, the next upgrade gets its place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_after_the_decision_frees_its_place() {
    let up = Upstream::start().await;
    let mut c = ws_config(up.addr);
    set(&mut c, "server/limits/max_upgraded_connections", json!(1));
    set(
        &mut c,
        "overload",
        json!({ "enabled": true, "max_in_flight": 1, "max_queue": 0 }),
    );
    let server = start_gateway(&c).await;
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();

    let slow = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, gw, "/slow?sleep_ms=1500").await.status })
    };
    let deadline = Instant::now() + TIMEOUT;
    while up.hits() == 0 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = refusal(connect(gw, "/ws", "alice").await);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("overloaded"), "{body}");
    assert_eq!(slow.await.unwrap(), 200);

    // The place is free again: this upstream declines, but the ask reaches it.
    let (status, _) = refusal(connect(gw, "/ws", "alice").await);
    assert_eq!(status, 200);
    let text = metrics(&client, admin).await;
    let series = |o: &str| format!(r#"tidegate_upgrades_total{{route="default",outcome="{o}"}}"#);
    assert_eq!(metric_value(&text, &series("refused")), Some(1.0), "{text}");
    assert_eq!(
        metric_value(&text, &series("declined")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, &series("refused_capacity")),
        None,
        "{text}"
    );
    server.shutdown().await;
}
