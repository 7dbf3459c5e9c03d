//! `grab-bench`: grabs per second and latency of the grab backend, direct
//! (no gateway), with `--fsync always`, group commit against one fsync per
//! grab, in one run.
//!
//! ```text
//! cargo run --release -p tidegate-benches --bin grab-bench -- [SECS] [CONNECTIONS] [DATA_PARENT]
//! ```
//!
//! Four scenarios, each on a fresh in-process server and data directory
//! (under `DATA_PARENT`, default the system temp dir: it must be a real
//! disk for the fsync numbers to mean anything):
//! - many: 1,000 envelopes, every grab by a new user on a random envelope;
//! - hot: one envelope of 1,000,000 shares, every grab by a new user;
//!
//! each with group commit on and off. Client and server share the machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Clone, Copy)]
enum Shape {
    Many,
    Hot,
}

struct Outcome {
    grabs: u64,
    other: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    syncs: u64,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let conns: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let parent = args
        .get(3)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "grab-bench: fsync={}, {conns} connections, {secs}s per scenario, {} cores, data under {}",
        std::env::var("GRAB_BENCH_FSYNC").unwrap_or_else(|_| "always".into()),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        parent.display()
    );
    println!(
        "{:<6} {:<14} {:>10} {:>9} {:>9} {:>9} {:>10} {:>12}",
        "shape", "commit", "grabs/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "grabs/fsync"
    );
    for shape in [Shape::Many, Shape::Hot] {
        for group_commit in [true, false] {
            let o = rt.block_on(run(shape, group_commit, secs, conns, &parent))?;
            let ms = |q: f64| o.hist.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "{:<6} {:<14} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>12.1}{}",
                match shape {
                    Shape::Many => "many",
                    Shape::Hot => "hot",
                },
                if group_commit {
                    "group"
                } else {
                    "fsync-per-grab"
                },
                o.grabs as f64 / o.elapsed.as_secs_f64(),
                ms(0.5),
                ms(0.99),
                ms(0.999),
                o.hist.max() as f64 / 1000.0,
                o.grabs as f64 / o.syncs.max(1) as f64,
                if o.other > 0 {
                    format!("  ({} non-200)", o.other)
                } else {
                    String::new()
                },
            );
        }
    }
    Ok(())
}

async fn run(
    shape: Shape,
    group_commit: bool,
    secs: u64,
    conns: usize,
    parent: &std::path::Path,
) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir_in(parent)?;
    let mut config = grab_backend::Config {
        data_dir: dir.path().to_owned(),
        // GRAB_BENCH_FSYNC=never measures the HTTP and CPU ceiling without disk waits.
        fsync: match std::env::var("GRAB_BENCH_FSYNC").as_deref() {
            Ok("never") => grab_backend::FsyncMode::Never,
            _ => grab_backend::FsyncMode::Always,
        },
        group_commit,
        ..Default::default()
    };
    config.limits.max_count = 1_000_000;
    config.limits.max_total_cents = u64::MAX / 4;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(grab_backend::serve(listener, config, async move {
        let _ = stop_rx.await;
    }));

    let mut setup = connect(addr).await?;
    let envelopes = match shape {
        Shape::Many => 1_000,
        Shape::Hot => 1,
    };
    let count = match shape {
        Shape::Many => 10_000,
        Shape::Hot => 1_000_000,
    };
    let mut ids = Vec::new();
    for _ in 0..envelopes {
        let (status, v) = request(
            &mut setup,
            addr,
            "/envelopes",
            None,
            Some(json!({"sender": "bench", "total_cents": count * 100, "count": count, "expires_in_s": 3_600})),
        )
        .await?;
        anyhow::ensure!(status == 201, "create: {status} {v}");
        ids.push(v["id"].as_str().unwrap_or_default().to_owned());
    }
    let (_, h0) = request(&mut setup, addr, "/healthz", None, None).await?;
    let ids = Arc::new(ids);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (ids, stop) = (ids.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let (mut grabs, mut other) = (0u64, 0u64);
            let mut conn = connect(addr).await?;
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1);
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = &ids[(x % ids.len() as u64) as usize];
                seq += 1;
                let user = format!("c{c}-{seq}");
                let t = Instant::now();
                let (status, _) = request(
                    &mut conn,
                    addr,
                    &format!("/envelopes/{id}/grab"),
                    Some(&user),
                    None,
                )
                .await?;
                hist.record(t.elapsed().as_micros().max(1) as u64)?;
                if status == 200 {
                    grabs += 1;
                } else {
                    other += 1;
                }
            }
            anyhow::Ok((grabs, other, hist))
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut out = Outcome {
        grabs: 0,
        other: 0,
        elapsed: Duration::ZERO,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        syncs: 0,
    };
    for t in tasks {
        let (g, o, h) = t.await??;
        out.grabs += g;
        out.other += o;
        out.hist.add(h)?;
    }
    out.elapsed = started.elapsed();
    let (_, h1) = request(&mut setup, addr, "/healthz", None, None).await?;
    out.syncs = h1["log_syncs"].as_u64().unwrap_or(0) - h0["log_syncs"].as_u64().unwrap_or(0);
    drop(setup);
    let _ = stop_tx.send(());
    server.await??;
    Ok(out)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn request(
    conn: &mut http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    user: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    conn.ready().await?;
    let method = if body.is_some() || user.is_some() {
        "POST"
    } else {
        "GET"
    };
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(u) = user {
        req = req.header("x-user-id", u);
    }
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let resp = conn.send_request(req.body(Full::new(bytes))?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}
