//! `GET /admin/status.json` latency under load: the dashboard's data source must answer fast
//! while the gateway is busy (target: within 5 ms).
//!
//! Starts an in-process backend and gateway (the peer comparison's configs: plain, and the
//! realistic rule set of 1,000 routes, 1,000 limits, a per-user limit and canaries), drives
//! closed-loop load through it from `CONNS` keep-alive connections, and meanwhile fetches
//! `/admin/status.json` every 10 ms on its own connection, timing each whole answer.
//!
//! With `RATE` (requests per second over all connections) the load is paced; without it (or
//! 0) each connection sends as fast as it can, saturating the machine.
//!
//! `cargo run --release -p tidegate-benches --bin status-bench [SECONDS] [CONNS] [RATE]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tidegate_benches::{hello_backend, peer_config};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let conns: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(32);
    let rate: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let backend = hello_backend().await?;
        println!("| config | load req/s | status.json bytes | samples | p50 | p99 | max |");
        println!("|---|---|---|---|---|---|---|");
        for (label, rules) in [("plain", false), ("1,000 routes + 1,000 limits", true)] {
            run(label, rules, backend, secs, conns, rate).await?;
        }
        anyhow::Ok(())
    })
}

async fn run(
    label: &str,
    rules: bool,
    backend: SocketAddr,
    secs: u64,
    conns: usize,
    rate: u64,
) -> anyhow::Result<()> {
    let text = peer_config(rules, "127.0.0.1:0", "127.0.0.1:0", &backend.to_string());
    let loaded = rules::load("bench.json", text.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = tidegate::start(loaded).await?;
    let gw = server.listen_addrs[0];
    let admin = server.admin_addr;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut load = Vec::new();
    for i in 0..conns {
        let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut pace = (rate > 0).then(|| {
                let mut t = tokio::time::interval(Duration::from_secs(conns as u64) / rate as u32);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            while !stop.load(Ordering::Relaxed) {
                if let Some(p) = &mut pace {
                    p.tick().await;
                }
                let req = Request::get(format!("http://{gw}/envelopes/{n}"))
                    .header("x-app-id", "app7")
                    .header("x-user-id", format!("user-{i}-{}", n % 1000))
                    .body(Empty::new())
                    .expect("a valid request");
                if let Ok(resp) = client.request(req).await {
                    let _ = resp.into_body().collect().await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        }));
    }

    // Let the sampler fill a few seconds of history first (the document grows with it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let admin_client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut bytes = 0;
    let before = done.load(Ordering::Relaxed);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        let req = Request::get(format!("http://{admin}/admin/status.json"))
            .body(Empty::new())
            .expect("a valid request");
        let t = Instant::now();
        let resp = admin_client.request(req).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        hist.record(t.elapsed().as_micros() as u64)?;
        bytes = body.len();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let achieved = (done.load(Ordering::Relaxed) - before) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "| {label} | {achieved:.0} | {bytes} | {} | {:.3} ms | {:.3} ms | {:.3} ms |",
        hist.len(),
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.max()),
    );
    server.shutdown().await;
    Ok(())
}
