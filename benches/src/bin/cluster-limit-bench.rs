//! Gateway throughput with cluster-scope limits (counted in Redis) against the same limits
//! counted locally, in one run.
//!
//! Starts a `redis-server` on a free loopback port, a trivial upstream, and two in-process
//! gateways whose configs differ only in `scope`. Then, alternating local / cluster runs,
//! drives each with the same closed-loop load (C keep-alive HTTP/1.1 connections) and
//! reports requests per second and the ratio cluster / local. Two workloads:
//!
//! - `hot`: an app-wide limit and a per-user limit over 100 users (hot keys: leases
//!   cover almost every request, Redis is rarely on the request path);
//! - `cold`: a per-user limit over 100,000 users, so nearly every request's key has no
//!   lease yet and waits for one Redis call (the worst case).
//!
//! Limits are set high enough never to refuse: this measures the cost of counting.
//!
//! `cargo run --release -p tidegate-benches --bin cluster-limit-bench [SECONDS] [CONNECTIONS]`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::client::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5.0);
    let conns: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let redis = Redis::start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let up = upstream().await?;
        println!(
            "cluster-limit-bench: {secs} s per run, {conns} connections, redis {}",
            redis.url()
        );
        println!("| workload | local req/s | cluster req/s | cluster / local |");
        println!("|---|---|---|---|");
        for (name, users, limits) in [
            (
                "hot (app-wide + per-user, 100 users)",
                100u64,
                json!([
                    { "name": "app", "key": ["app"], "rate": "10000000/s" },
                    { "name": "user", "key": ["user"], "rate": "100000/s" }
                ]),
            ),
            (
                "cold (per-user, 100,000 users)",
                100_000,
                json!([{ "name": "user", "key": ["user"], "rate": "1000/s" }]),
            ),
        ] {
            let local = gateway(up, &redis.url(), &limits, "local").await?;
            let cluster = gateway(up, &redis.url(), &limits, "cluster").await?;
            // Warm both (connections, leases of hot keys), then alternate twice.
            drive(local.listen_addrs[0], conns, users, 0.5).await?;
            drive(cluster.listen_addrs[0], conns, users, 0.5).await?;
            let (mut l, mut c) = (0.0, 0.0);
            for _ in 0..2 {
                l += drive(local.listen_addrs[0], conns, users, secs / 2.0).await?;
                c += drive(cluster.listen_addrs[0], conns, users, secs / 2.0).await?;
            }
            let (l, c) = (l / 2.0, c / 2.0);
            println!("| {name} | {l:.0} | {c:.0} | {:.2} |", c / l);
            local.shutdown().await;
            cluster.shutdown().await;
        }
        anyhow::Ok(())
    })
}

/// An in-process gateway in front of `up` with `limits` at `scope`.
async fn gateway(
    up: SocketAddr,
    redis: &str,
    limits: &Value,
    scope: &str,
) -> anyhow::Result<tidegate::Server> {
    let mut limits = limits.clone();
    for l in limits.as_array_mut().expect("a list") {
        l["scope"] = json!(scope);
    }
    let config = json!({
        "schema_version": 1,
        "server": {
            "listeners": [{ "address": "127.0.0.1:0" }],
            "admin": { "address": "127.0.0.1:0" },
            "access_log": { "enabled": false, "format": "json" },
            "redis": { "url": redis, "timeout_ms": 50 }
        },
        "interfaces": [{ "name": "grab", "method": "POST", "path": "/envelopes/{id}/grab" }],
        "upstreams": { "up": { "endpoints": [up.to_string()] } },
        "routes": [{ "name": "default", "upstream": "up" }],
        "limits": limits
    });
    let loaded = rules::load("bench.json", &serde_json::to_vec(&config)?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tidegate::start(loaded).await
}

/// Closed-loop load: `conns` connections, each sending `POST /envelopes/7/grab` as a
/// pseudo-random one of `users` users; returns answered requests per second. Any answer
/// but 200 is an error (the limits are set never to refuse).
async fn drive(gw: SocketAddr, conns: usize, users: u64, secs: f64) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(gw).await?;
            stream.set_nodelay(true)?;
            let (mut tx, conn) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut n = c as u64 * 0x9E37_79B9_7F4A_7C15 + 1;
            while Instant::now() < deadline {
                n ^= n << 13;
                n ^= n >> 7;
                n ^= n << 17;
                let req = http::Request::post("/envelopes/7/grab")
                    .header("host", "bench")
                    .header("x-app-id", "shop")
                    .header("x-user-id", format!("u{}", n % users))
                    .body(Empty::<Bytes>::new())?;
                tx.ready().await?;
                let resp = tx.send_request(req).await?;
                anyhow::ensure!(resp.status() == 200, "answered {}", resp.status());
                resp.into_body().collect().await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// A trivial upstream: 200 `ok` to everything.
async fn upstream() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// `redis-server` on a free loopback port, killed on drop.
struct Redis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("starting redis-server (apt-get install redis-server): {e}")
            })?;
        let r = Self {
            port,
            child,
            _dir: dir,
        };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
