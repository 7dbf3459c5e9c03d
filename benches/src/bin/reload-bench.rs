//! Reload time, file event to swap, for configs of 10, 1,000 and 100,000 rules.
//!
//! For each size: start an in-process gateway from a config file, then N times rewrite the
//! file (atomic rename, the weight of one split changed so every write is a real change) and
//! time from the rename to the new runtime being live (the reloader's generation moving).
//! Also times the pure part alone (`rules::load`: parse → validate → compile) for comparison.
//!
//! `cargo run --release -p tidegate-benches --bin reload-bench [ROUNDS]`

use std::time::{Duration, Instant};

use tidegate_benches::synthetic_config;

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!("| rules | file bytes | rules::load median | file event → swap median | max |");
    println!("|---|---|---|---|---|");
    for n in [10usize, 1_000, 100_000] {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tidegate.json");
        let text = with_listeners(&synthetic_config(n));
        std::fs::write(&path, &text)?;

        let mut pure = Vec::new();
        for _ in 0..rounds.min(5) {
            let t = Instant::now();
            rules::load("bench.json", text.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
            pure.push(t.elapsed());
        }

        let swaps = rt.block_on(async {
            let server = tidegate::start_from_file(&path).await?;
            let reloader = server.reloader.clone().expect("started from a file");
            let mut swaps = Vec::new();
            for round in 0..rounds {
                // Alternate the default route's weight so the content really changes.
                let changed = text.replacen(
                    "\"weight\":\"5%\"",
                    &format!("\"weight\":\"{}%\"", 6 + round % 2),
                    1,
                );
                let tmp = dir.path().join(".tidegate.json.tmp");
                std::fs::write(&tmp, &changed)?;
                let generation = reloader.status().generation;
                let t = Instant::now();
                std::fs::rename(&tmp, &path)?;
                while reloader.status().generation == generation {
                    anyhow::ensure!(
                        t.elapsed() < Duration::from_secs(30),
                        "reload did not happen: {:?}",
                        reloader.status()
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                swaps.push(t.elapsed());
            }
            server.shutdown().await;
            anyhow::Ok(swaps)
        })?;
        println!(
            "| {n} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            text.len(),
            ms(median(&mut pure)),
            ms(median(&mut swaps.clone())),
            ms(*swaps.iter().max().unwrap())
        );
    }
    Ok(())
}

/// Bind the synthetic config's listener and admin port to free loopback ports.
fn with_listeners(config: &str) -> String {
    config.replacen(
        "{\"schema_version\": 1,",
        r#"{"schema_version": 1, "server": {"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"}},"#,
        1,
    )
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
