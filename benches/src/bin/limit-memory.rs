//! Memory per tracked limiter key: N distinct users (default 1,000,000) hit a per-user limit;
//! the process's resident memory is read (`VmRSS`) before, after, after the idle keys are
//! swept, and after a second sweep with no keys between (the one that gives the room back).
//! Runs the gateway's own limiter code (`tidegate::govern::Governors`, keys hashed by
//! `rules`), in-process, so the figure is the gateway's and nothing else's.
//!
//! `cargo run --release -p tidegate-benches --bin limit-memory [-- USERS]`

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::HeaderMap;
use rules::{MatchInput, RouteInput};
use tidegate::govern::Governors;

fn main() -> anyhow::Result<()> {
    let users: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 1_000_000,
    };
    // 10/s with burst 1: a key's state is fresh again 100 ms after its request, so a sweep
    // 200 ms later may drop every key.
    let config = r#"{
      "schema_version": 1,
      "interfaces": [ { "name": "grab", "method": "POST", "path": "/envelopes/{id}/grab" } ],
      "upstreams": { "up": { "endpoints": ["127.0.0.1:9000"] } },
      "routes": [ { "name": "default", "upstream": "up" } ],
      "limits": [ { "name": "per-user", "match": { "interfaces": ["grab"] },
                    "key": ["user"], "rate": "10/s", "burst": 1 } ]
    }"#;
    let snap = rules::load("bench.json", config.as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .snapshot;
    let gov = Governors::build(&snap, None);
    let limiters = &gov.limiters;
    let headers = HeaderMap::new();
    let grab = snap.classify(rules::RequestParts {
        method: &http::Method::POST,
        path: "/envelopes/1/grab",
        query: None,
        headers: &headers,
    });
    let mut name = String::with_capacity(32);
    let check = |user: &str| {
        let input = RouteInput {
            m: MatchInput {
                app: Some("app"),
                interface: grab.interface,
                user: Some(user),
                headers: &headers,
                params: &[],
            },
            client_ip: Some(IpAddr::from([127, 0, 0, 1])),
            random: 0,
            pair: Default::default(),
        };
        limiters.check(&snap, &input, |_, _, _| {}).is_none()
    };
    // Warm up allocator and code paths with a few keys, then sweep them.
    for i in 0..1000 {
        name.clear();
        write!(name, "warm-{i}")?;
        check(&name);
    }
    std::thread::sleep(Duration::from_millis(250));
    limiters.retain_recent();

    let before = rss_bytes();
    let t = Instant::now();
    let mut admitted = 0u64;
    for i in 0..users {
        name.clear();
        write!(name, "user-{i}")?;
        admitted += u64::from(check(&name));
    }
    let insert = t.elapsed();
    let tracked = limiters.rules[0].tracked_keys();
    let after = rss_bytes();
    anyhow::ensure!(admitted == users, "every first request is admitted");
    anyhow::ensure!(tracked as u64 == users, "every user is tracked: {tracked}");

    std::thread::sleep(Duration::from_millis(250));
    let t = Instant::now();
    let left = limiters.retain_recent();
    let sweep = t.elapsed();
    let swept = rss_bytes();

    // A second sweep with no new keys between: the tables, kept while keys came and went,
    // are given back once a period passed mostly empty.
    let t = Instant::now();
    limiters.retain_recent();
    let quiet_sweep = t.elapsed();
    let quiet = rss_bytes();

    let growth = after.saturating_sub(before);
    let returned = |rss: u64| 100.0 * after.saturating_sub(rss) as f64 / growth.max(1) as f64;
    println!("users                 {users}");
    println!(
        "insert                {:.0} ns/key",
        insert.as_nanos() as f64 / users as f64
    );
    println!("rss before            {:.1} MiB", mib(before));
    println!("rss with keys         {:.1} MiB", mib(after));
    println!(
        "growth per key        {:.1} bytes",
        growth as f64 / users as f64
    );
    println!(
        "sweep                 {:.1} ms, {left} keys left",
        sweep.as_secs_f64() * 1e3
    );
    println!("rss after sweep       {:.1} MiB", mib(swept));
    println!(
        "returned by sweep     {:.0}% of the growth (the tables' room is kept a period)",
        returned(swept)
    );
    println!(
        "quiet sweep           {:.1} ms",
        quiet_sweep.as_secs_f64() * 1e3
    );
    println!("rss after quiet sweep {:.1} MiB", mib(quiet));
    println!(
        "returned by then      {:.0}% of the growth",
        returned(quiet)
    );
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// `VmRSS` of this process, in bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}
