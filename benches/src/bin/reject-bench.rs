//! The overload reject path: how many requests per second one gateway core can refuse, and
//! how long a refusal takes.
//!
//! Runs the release `tidegate` binary as a child process pinned to CPU 0 (`taskset -c 0`),
//! with overload admission forced to refuse `share` (`"floor": "normal"`, `share` low), and
//! drives it from this process (a pooled HTTP/1.1 client, unpinned) with `POST
//! /envelopes/1/share` from 100,000 users:
//!
//! 1. latency of a refusal with one request at a time (no queueing anywhere);
//! 2. refusals per second with `CONNS` connections each sending back to back, and the
//!    latency under that load.
//!
//! Every answer must be 503 `{"error":"overloaded"}`; the upstream is a closed port, so a
//! request that got through would fail with 502 and be counted.
//!
//! `cargo build --release -p tidegate --bin tidegate && cargo run --release -p
//! tidegate-benches --bin reject-bench [SECONDS] [CONNS]`

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// The child gateway; killed on drop.
struct Gateway {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let conns: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);

    let bin = std::env::current_exe()?
        .parent()
        .context("the bench's directory")?
        .join("tidegate");
    if !bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p tidegate --bin tidegate",
            bin.display()
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let dir = tempfile::tempdir()?;
    let config = serde_json::json!({
        "schema_version": 1,
        "server": {
            "listeners": [{ "address": addr.to_string() }],
            "admin": { "address": "127.0.0.1:0" },
            "limits": { "max_connections": 100000 }
        },
        "interfaces": [
            { "name": "grab", "method": "POST", "path": "/envelopes/{id}/grab" },
            { "name": "share", "method": "POST", "path": "/envelopes/{id}/share" }
        ],
        "upstreams": { "up": { "endpoints": ["127.0.0.1:9"] } },
        "routes": [{ "name": "default", "upstream": "up" }],
        "overload": {
            "enabled": true,
            "upstreams": { "up": { "max_in_flight": 100 } },
            "interfaces": { "grab": { "priority": "critical" }, "share": { "priority": "low" } },
            "admission": { "floor": "normal" }
        }
    });
    let path = dir.path().join("tidegate.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    let child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(&bin)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting taskset tidegate (is util-linux installed?)")?;
    let _gateway = Gateway { child, _dir: dir };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(conns.max(1) * 2)
            .build(http);
        // Wait for the listener.
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if t0.elapsed() > Duration::from_secs(15) {
                bail!("the gateway did not listen on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Warm up, then one request at a time.
        drive(&client, addr, 1, Duration::from_secs(1)).await?;
        let (n, hist) = drive(&client, addr, 1, Duration::from_secs(secs.min(3))).await?;
        println!(
            "sequential: {n} refusals, latency p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0,
            hist.max() as f64 / 1000.0
        );

        let (n, hist) = drive(&client, addr, conns, Duration::from_secs(secs)).await?;
        println!(
            "saturated ({conns} connections, gateway on one core): {:.0} refusals/s, latency p50 {:.1} µs, p99 {:.1} µs",
            n as f64 / secs as f64,
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0
        );
        Ok(())
    })
}

/// `conns` loops, each sending refused requests back to back for `run`; returns the count
/// and the latency histogram (ns). Any answer but 503 `overloaded` is an error.
async fn drive(
    client: &HttpClient,
    addr: SocketAddr,
    conns: usize,
    run: Duration,
) -> anyhow::Result<(u64, Histogram<u64>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (client, stop, count) = (client.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("a histogram");
            let mut i = c as u64;
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_add(conns as u64);
                let req = Request::post(format!("http://{addr}/envelopes/1/share"))
                    .header("x-user-id", format!("user-{}", i % 100_000))
                    .body(Empty::new())
                    .expect("a valid request");
                let t = Instant::now();
                let resp = client.request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                hist.record(t.elapsed().as_nanos() as u64)?;
                if status != 503 || &body[..] != br#"{"error":"overloaded"}"# {
                    bail!("expected a refusal, got {status}: {body:?}");
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new(3)?;
    for t in tasks {
        all.add(t.await??)?;
    }
    Ok((count.load(Ordering::Relaxed), all))
}
