//! What the gateway exposes to hostile input beyond the data plane: the admin port's `Host`
//! check (DNS rebinding), its bearer token and its connection cap, and identity values
//! (a 10 KB user ID is anonymous, or refused, and never logged whole).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tidegate_tests::raw::exchange;
use tidegate_tests::{ChildGateway, TIMEOUT, Upstream, api, config, get, h1_client, set};
use tokio::io::AsyncWriteExt as _;

/// How long a raw exchange may take.
const BOUND: Duration = Duration::from_secs(3);

/// `GET path` on a new connection with these `Host` and `Authorization` headers (each
/// absent when `None`); the status and the body text.
async fn admin_get(
    admin: SocketAddr,
    path: &str,
    host: Option<&str>,
    auth: Option<&str>,
) -> (u16, String) {
    let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if let Some(h) = host {
        req += &format!("Host: {h}\r\n");
    }
    if let Some(a) = auth {
        req += &format!("Authorization: {a}\r\n");
    }
    req += "\r\n";
    let r = exchange(admin, req.as_bytes(), BOUND).await;
    let status = r.statuses().first().copied().unwrap_or(0);
    let text = r.text();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Only the port's own names are answered: `evil.example` (a rebinding page) gets 403
/// `forbidden_host`; `localhost:PORT`, `127.0.0.1:PORT` and a configured name get 200.
#[tokio::test]
async fn admin_refuses_foreign_hosts() {
    let up = Upstream::start().await;
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "server/admin/allowed_hosts",
        json!(["Admin.Internal"]),
    );
    let server = api::start_gateway(&c).await;
    let admin = server.admin_addr;
    let port = admin.port();

    for path in ["/admin/status.json", "/metrics", "/healthz", "/admin/"] {
        let (status, body) = admin_get(admin, path, Some("evil.example"), None).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body, r#"{"error":"forbidden_host"}"#, "{path}");
        let (status, _) = admin_get(admin, path, Some(&format!("evil.example:{port}")), None).await;
        assert_eq!(status, 403, "{path} with the port");
    }
    let (status, _) = admin_get(admin, "/admin/status.json", None, None).await;
    assert_eq!(status, 403, "HTTP/1.1 without Host");
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "localhost".to_owned(),
        "admin.internal".to_owned(),
    ] {
        let (status, body) = admin_get(admin, "/admin/status.json", Some(&host), None).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    server.shutdown().await;
}

/// With `token_file`, every endpoint but the probes (and the dashboard's static page)
/// needs `Authorization: Bearer <token>`: 401 without or with a wrong one, 200 with it.
#[tokio::test]
async fn admin_token_required_when_configured() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = "s3cr3t-admin-token-0123456789";
    std::fs::write(dir.path().join("admin.token"), format!("{token}\n")).unwrap();
    let mut c = config(&[up.addr]);
    set(&mut c, "server/admin/token_file", json!("admin.token"));
    let file = dir.path().join("tidegate.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    // Started from another directory: the token file is found beside the config.
    let server = tokio::time::timeout(TIMEOUT, api::start_from_file(&file))
        .await
        .expect("starts in time")
        .expect("starts");
    let admin = server.admin_addr;
    let host = format!("localhost:{}", admin.port());
    let host = Some(host.as_str());
    let right = format!("Bearer {token}");

    for path in [
        "/admin/status.json",
        "/metrics",
        "/admin/config",
        "/admin/overload",
    ] {
        let (status, body) = admin_get(admin, path, host, None).await;
        assert_eq!(status, 401, "{path} without a token: {body}");
        assert_eq!(body, r#"{"error":"unauthorized"}"#);
        let (status, _) = admin_get(admin, path, host, Some("Bearer wrong-token-0123456789")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, body) = admin_get(admin, path, host, Some(&right)).await;
        assert_eq!(status, 200, "{path} with the token: {body}");
    }
    for path in ["/healthz", "/readyz", "/admin/", "/admin/dashboard.js"] {
        let (status, _) = admin_get(admin, path, host, None).await;
        assert_eq!(status, 200, "{path} is open");
    }
    // The Host check still comes first.
    let (status, _) = admin_get(admin, "/metrics", Some("evil.example"), Some(&right)).await;
    assert_eq!(status, 403);

    // Rotation without a restart: a new token in the file is live after the next reload,
    // the old one refused; an unusable file (too short) keeps the current token.
    let reloader = server.reloader.clone().expect("started from a file");
    let rotated = "r0tated-admin-token-9876543210";
    std::fs::write(dir.path().join("admin.token"), format!("{rotated}\n")).unwrap();
    reloader.reload("test", std::time::Instant::now()).await;
    let new = format!("Bearer {rotated}");
    let (status, _) = admin_get(admin, "/metrics", host, Some(&new)).await;
    assert_eq!(status, 200, "the rotated token");
    let (status, _) = admin_get(admin, "/metrics", host, Some(&right)).await;
    assert_eq!(status, 401, "the old token after rotation");
    std::fs::write(dir.path().join("admin.token"), "short\n").unwrap();
    reloader.reload("test", std::time::Instant::now()).await;
    let (status, _) = admin_get(admin, "/metrics", host, Some(&new)).await;
    assert_eq!(
        status, 200,
        "an unusable token file keeps the current token"
    );
    server.shutdown().await;
}

/// `server.admin.max_connections` idle connections hold the admin port: a further
/// connection is not served until one closes, while the data port is unaffected.
#[tokio::test]
async fn admin_connection_cap() {
    const CAP: usize = 4;
    const EXTRA: usize = 3;
    let up = Upstream::start().await;
    let mut c = config(&[up.addr]);
    set(&mut c, "server/admin/max_connections", json!(CAP));
    let server = api::start_gateway(&c).await;
    let admin = server.admin_addr;
    let host = format!("localhost:{}", admin.port());

    // Hold the cap with idle connections, each first proven served (so it holds a permit).
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(TIMEOUT, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
            .await
            .expect("a held connection is served")
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "held connection");
        held.push(s); // kept alive, idle
    }
    // Extra connections connect (the kernel queues them) but get no answer.
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let extras: Vec<_> = (0..EXTRA)
        .map(|_| {
            let req = req.clone();
            tokio::spawn(
                async move { exchange(admin, req.as_bytes(), Duration::from_secs(20)).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    for e in &extras {
        assert!(
            !e.is_finished(),
            "an admin connection beyond the cap was served"
        );
    }
    // The data port is unaffected.
    let r = get(&h1_client(), server.listen_addrs[0], "/x").await;
    assert_eq!(r.status, 200, "data port while the admin cap is held");
    // Freeing the cap serves the waiting ones.
    drop(held);
    for e in extras {
        let r = tokio::time::timeout(TIMEOUT, e)
            .await
            .expect("served after the cap frees")
            .unwrap();
        assert_eq!(r.statuses().first(), Some(&200), "{}", r.text());
    }
    server.shutdown().await;
}

/// The config of the identity tests: the access log on, and a per-user limit of one
/// request a minute where requests without a user share one quota.
fn id_config(up: &Upstream, on_invalid: &str) -> Value {
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "server/access_log",
        json!({ "enabled": true, "format": "json" }),
    );
    set(&mut c, "identity/on_invalid", json!(on_invalid));
    set(
        &mut c,
        "limits",
        json!([{ "name": "per-user", "key": ["user"], "rate": "1/min", "burst": 1,
                 "when_missing": "shared" }]),
    );
    c
}

async fn get_as(addr: SocketAddr, user: &str) -> u16 {
    let req =
        format!("GET /x HTTP/1.1\r\nHost: gw\r\nx-user-id: {user}\r\nConnection: close\r\n\r\n");
    let r = exchange(addr, req.as_bytes(), BOUND).await;
    r.statuses().first().copied().unwrap_or(0)
}

/// A 10 KB user ID is no user at all by default: two different ones share the anonymous
/// quota (the second is limited), and no access log line carries more than the bound.
#[tokio::test]
async fn long_user_id_is_anonymous_and_not_logged() {
    let up = Upstream::start().await;
    let gw = ChildGateway::spawn(&id_config(&up, "anonymous"));
    let a = "a".repeat(10_000);
    let b = "b".repeat(10_000);
    assert_eq!(get_as(gw.addr, &a).await, 200, "first anonymous request");
    assert_eq!(
        get_as(gw.addr, &b).await,
        429,
        "a second, different long ID shares the anonymous quota"
    );
    assert_eq!(
        get_as(gw.addr, "bob").await,
        200,
        "a real user has their own"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = gw.log_lines();
    let access: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("tidegate::access"))
        .collect();
    assert_eq!(access.len(), 3, "{lines:#?}");
    for l in &access {
        assert!(l.len() < 1024, "an access log line of {} bytes", l.len());
        assert!(!l.contains(&"a".repeat(129)) && !l.contains(&"b".repeat(129)));
    }
    assert!(access[0].contains(r#""user":"none""#), "{}", access[0]);
    assert!(access[2].contains(r#""user":"bob""#), "{}", access[2]);
}

/// With `on_invalid: reject`, a 10 KB user ID is refused: 400 `invalid_identity`, and it
/// reaches neither the upstream nor the log.
#[tokio::test]
async fn long_user_id_rejected_when_configured() {
    let up = Upstream::start().await;
    let gw = ChildGateway::spawn(&id_config(&up, "reject"));
    let req = format!(
        "GET /x HTTP/1.1\r\nHost: gw\r\nx-user-id: {}\r\nConnection: close\r\n\r\n",
        "u".repeat(10_000)
    );
    let r = exchange(gw.addr, req.as_bytes(), BOUND).await;
    assert_eq!(r.statuses().first(), Some(&400), "{:.300}", r.text());
    assert!(
        r.text().contains(r#"{"error":"invalid_identity"}"#),
        "{:.300}",
        r.text()
    );
    assert_eq!(up.hits(), 0, "forwarded");
    assert_eq!(get_as(gw.addr, &"u".repeat(128)).await, 200, "at the bound");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = gw.log_lines();
    assert!(lines.iter().all(|l| l.len() < 1024), "a long log line");
}
