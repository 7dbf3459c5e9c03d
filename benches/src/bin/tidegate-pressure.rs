//! `tidegate-pressure`: a pressure-test driver for Tidegate (or any HTTP server).
//!
//! ```text
//! cargo run --release -p tidegate-benches --bin tidegate-pressure -- \
//!     benches/scenarios/red-envelope-wave.json --water-level --json wave.json
//! ```
//!
//! Open-loop arrivals at the scenario's rate profile (latency measured from each request's
//! due time, so a stall is not hidden by coordinated omission), over HTTP/1.1 or h2, many
//! distinct user IDs. Prints, per interface and overall: offered, admitted, succeeded,
//! limited, shed, degraded, failed, errors and p50/p90/p99/p99.9 latency; `--json` writes the
//! same; `--water-level` adds the capacity table against the scenario's targets.
//! `--closed-loop` sends back to back instead (throughput ceilings, as wrk does).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::json;
use tidegate_benches::pressure::run::{Pacing, run};
use tidegate_benches::pressure::scenario::{Protocol, Scenario};
use tidegate_benches::pressure::stats::{table, water_levels, water_table};

#[derive(Parser, Debug)]
#[command(
    name = "tidegate-pressure",
    about = "Open-loop pressure tests with a capacity water-level table"
)]
struct Args {
    /// Scenario file (JSON, see benches/scenarios/).
    scenario: PathBuf,
    /// Override the scenario's target (`http://IP:port`).
    #[arg(long)]
    target: Option<String>,
    /// Override the protocol (`http1` or `h2`).
    #[arg(long)]
    protocol: Option<String>,
    /// Override the number of connections.
    #[arg(long)]
    connections: Option<usize>,
    /// Multiply every rate (and target) of the profile.
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Multiply every phase's length.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Closed loop: send back to back for the profile's length, ignoring its rates.
    #[arg(long)]
    closed_loop: bool,
    /// Print the capacity water-level table against the scenario's `targets`.
    #[arg(long)]
    water_level: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Runtime worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the per-request draws (interface, user, envelope).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print only the overall row (scripts).
    #[arg(long)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.scenario)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.scenario.display()))?;
    let mut sc =
        Scenario::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.scenario.display()))?;
    if let Some(t) = args.target {
        sc.target = t;
    }
    if let Some(p) = args.protocol.as_deref() {
        sc.protocol = match p {
            "http1" => Protocol::Http1,
            "h2" => Protocol::H2,
            other => anyhow::bail!("--protocol {other:?}: http1 or h2"),
        };
    }
    if let Some(c) = args.connections {
        sc.connections = c;
    }
    sc.scale_rates(args.rate_scale);
    sc.scale_time(args.time_scale);
    let pacing = if args.closed_loop {
        Pacing::Closed
    } else {
        Pacing::Open
    };

    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        b.worker_threads(n);
    }
    let rt = b.enable_all().build()?;
    if !args.quiet {
        println!(
            "tidegate-pressure: {} -> {} ({:?}, {} connections{}, {:?}, {:.0}s, {} users)",
            sc.name,
            sc.target,
            sc.protocol,
            sc.connections,
            if sc.protocol == Protocol::H2 {
                format!(" x {} streams", sc.h2_streams_per_connection)
            } else {
                String::new()
            },
            pacing,
            sc.duration().as_secs_f64(),
            sc.users,
        );
    }
    let cpu0 = self_cpu_secs();
    let wall0 = Instant::now();
    let report = rt.block_on(run(&sc, pacing, args.seed))?;
    let wall = wall0.elapsed().as_secs_f64();
    let cpu = self_cpu_secs() - cpu0;
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let answered = report.total.succeeded
        + report.total.limited
        + report.total.shed
        + report.total.degraded
        + report.total.failed;
    if args.quiet {
        println!(
            "requests={} rps={:.0} p50_ms={:.3} p99_ms={:.3} errors={}",
            answered,
            answered as f64 / secs,
            report.total.ms(0.5),
            report.total.ms(0.99),
            report.total.errors + report.total.unsent
        );
    } else {
        if report.envelopes > 0 {
            println!("set-up: {} envelopes created", report.envelopes);
        }
        print!("{}", table(&report.rows, &report.total));
        println!(
            "answered {answered} in {secs:.1}s = {:.0} req/s; unsent {}; statuses {:?}; load tool CPU {cpu:.1}s over {wall:.1}s ({:.0} req per tool CPU-second)",
            answered as f64 / secs,
            report.total.unsent,
            report.total.statuses,
            answered as f64 / cpu.max(1e-9)
        );
    }
    let levels = water_levels(&sc.targets, &report.rows, &report.total);
    if args.water_level {
        println!("\ncapacity water level (measured = best 3 s mean of answered req/s):");
        print!("{}", water_table(&levels));
    }
    if let Some(path) = args.json {
        let v = json!({
            "scenario": sc.name,
            "target": sc.target,
            "protocol": format!("{:?}", sc.protocol),
            "connections": sc.connections,
            "pacing": format!("{pacing:?}"),
            "elapsed_s": secs,
            "envelopes": report.envelopes,
            "tool_cpu_s": cpu,
            "interfaces": report.rows.iter().map(|(n, s)| (n.clone(), s.to_json(secs))).collect::<serde_json::Map<_, _>>(),
            "overall": report.total.to_json(secs),
            "water_level": levels.iter().map(|w| json!({
                "interface": w.name, "target_qps": w.target, "offered_peak_qps": w.offered,
                "measured_qps": w.measured, "headroom": w.headroom(), "water_level": w.level(),
                "verdict": w.verdict(),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")?;
    }
    Ok(())
}

/// This process's user + system CPU time, from `/proc/self/stat` (0 where there is none).
fn self_cpu_secs() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / tick
}
