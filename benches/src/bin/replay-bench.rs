//! `tidegate replay` speed: lines per second on one core.
//!
//! Writes an access log of `LINES` lines (default 1,000,000) as the gateway writes them, over
//! the realistic rule set of the peer comparison (`peer_config(true, ..)`: 1,000 route rules,
//! half of them 5% splits, 1,000 limits, a per-user limit, a fallback): 100,000 users of 200
//! apps over the five interfaces, 20,000 requests per second of log time (so limits are
//! simulated over 50 s of traffic). Then replays it (a replay is single-threaded) under a
//! candidate with every split raised to 10% against the recorded decisions, and prints the
//! lines per second and the report's summary.
//!
//! `cargo run --release -p tidegate-benches --bin replay-bench [LINES]` (pin it with
//! `taskset -c 0` for a per-core figure).

use std::io::{BufWriter, Write as _};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let lines: u64 = match std::env::args().nth(1) {
        Some(s) => s.parse().context("LINES must be a number")?,
        None => 1_000_000,
    };
    let recorded = tidegate_benches::peer_config(true, "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:9");
    let candidate = recorded.replace(r#""weight":"5%""#, r#""weight":"10%""#);
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("access.log");
    let t = Instant::now();
    write_log(&log, lines)?;
    let size = std::fs::metadata(&log)?.len();
    eprintln!(
        "wrote {lines} lines ({:.0} MB) in {:.1} s",
        size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let snap = rules::load("candidate.json", candidate.as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .snapshot;
    let metrics = Arc::new(tidegate::metrics::Metrics::new());
    let rt = tidegate::runtime::Runtime::offline(snap, None, &metrics);
    let opts = tidegate::replay::Options {
        level: None,
        users_bound: 1_000_000,
        sample_users: 3,
        first_bad_lines: 10,
    };
    let file = std::fs::File::open(&log)?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let report = tidegate::replay::replay(rt, None, reader, opts)?;
    print!("{report}");
    println!(
        "replay: {} lines in {:.2} s: {:.0} lines/s on one core ({:.0} ns per line)",
        report.lines,
        report.seconds,
        report.lines_per_second,
        1e9 / report.lines_per_second
    );
    Ok(())
}

/// The log: what the recording gateway (the same rules, 5% splits) would have written.
fn write_log(path: &std::path::Path, lines: u64) -> anyhow::Result<()> {
    const IFACES: [(&str, &str, &str); 5] = [
        ("create", "POST", "/envelopes"),
        ("grab", "POST", "/envelopes/42/grab"),
        ("open", "GET", "/envelopes/42"),
        ("wallet", "GET", "/users/7/wallet"),
        ("share", "POST", "/envelopes/42/share"),
    ];
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let start_us: u64 = 1_780_000_000_000_000;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..lines {
        // xorshift: a fixed, cheap spread of users, apps and interfaces.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let user = x % 100_000;
        let app = (x >> 20) % 200;
        let (iface, method, path) = IFACES[((x >> 40) % 5) as usize];
        let rule = app * 5 + ((x >> 40) % 5);
        // Odd rules split 5% to v2 under the rule's name as salt.
        let upstream = if rule % 2 == 1
            && rules::bucket::bucket(&format!("r{rule}"), &format!("u{user}")) < 50_000
        {
            "v2"
        } else {
            "v1"
        };
        let (decision, route, upstream, rule_field) = match iface {
            "share" => ("fallback", "none".to_owned(), "none", "share-off"),
            _ => ("forward", format!("r{rule}"), upstream, "none"),
        };
        let at_us = start_us + i * 50;
        writeln!(
            out,
            r#"{{"timestamp":"2026-05-29T00:00:00.000000Z","level":"INFO","message":"request","target":"tidegate::access","request_id":"5f0c2a7e9b1d4c3a-{i:016x}","client":"10.1.{}.{}","peer":"10.1.{}.{}:40000","identity":"unverified","app":"app{app}","interface":"{iface}","user":"u{user}","route":"{route}","upstream":"{upstream}","status":200,"duration_us":412,"at_us":{at_us},"method":"{method}","path":"{path}","inputs":"","decision":"{decision}","rule":"{rule_field}"}}"#,
            (x >> 8) & 255,
            x & 255,
            (x >> 8) & 255,
            x & 255,
        )?;
    }
    out.flush()?;
    Ok(())
}
