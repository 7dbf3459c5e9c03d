//! `grab-backend`: the red-envelope service, standalone.
//!
//! Prints `listening on ADDR` on stdout once the store is recovered and it
//! accepts connections (tests and scripts read the port from it when binding
//! port 0), and exits 0 after draining on SIGTERM or SIGINT. If recovery
//! refuses (a corrupt log) it exits 1 with the segment file and byte offset
//! on stderr.
//!
//! `grab-backend recover --data-dir DIR [--truncate | --quarantine QDIR]`
//! inspects (and with a flag repairs) the log; see [`RECOVER_EXIT_CODES`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use grab_backend::recovery::{self, Repair};
use grab_backend::{Config, FsyncMode, RedisStoreConfig, StoreKind};

/// Exit codes of `grab-backend recover`.
const RECOVER_EXIT_CODES: &str = "Exit codes: 0 = no corruption (a torn tail, if reported, is cut by \
the next start), or the repair succeeded; 1 = recover failed (unreadable files, corrupt snapshot \
or id file, repair error); 2 = bad arguments; 3 = corruption found and nothing changed (rerun with \
--truncate or --quarantine DIR to repair).";

#[derive(Debug, Parser)]
#[command(
    name = "grab-backend",
    version,
    about = "Red-envelope grab service with a durable log"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory for the log and snapshots (created if missing).
    #[arg(long, default_value = "data/grab", global = true)]
    data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: String,
    /// always: ack after fsync (grouped); batch: ack after write, fsync every 10 ms;
    /// never: ack after write, fsync only at segment close, snapshot and shutdown.
    #[arg(long, value_enum, default_value_t = FsyncMode::Always)]
    fsync: FsyncMode,
    /// Header carrying the user id of a grab.
    #[arg(long, default_value = "x-user-id")]
    user_header: String,
    /// Sync once per record instead of sharing syncs (benchmark baseline).
    #[arg(long)]
    no_group_commit: bool,
    /// Largest number of shares per envelope.
    #[arg(long, default_value_t = 10_000)]
    max_count: u32,
    /// Largest envelope total, in cents.
    #[arg(long, default_value_t = 20_000_000)]
    max_total_cents: u64,
    /// embedded: in process with a local log (one node); redis: in Redis, so several
    /// nodes can serve the same envelopes (needs --redis-url).
    #[arg(long, value_enum, default_value_t = StoreArg::Embedded)]
    store: StoreArg,
    /// Redis URL of the redis store, e.g. redis://127.0.0.1:6379.
    #[arg(long, env = "GRAB_REDIS_URL")]
    redis_url: Option<String>,
    /// Longest wait for one Redis call, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    redis_timeout_ms: u64,
    /// How long an Idempotency-Key of POST /envelopes is remembered, in seconds.
    #[arg(long, default_value_t = 86_400)]
    idempotency_ttl_s: u64,
    /// Most Idempotency-Keys the embedded store keeps (oldest forgotten first).
    #[arg(long, default_value_t = 1_000_000)]
    idempotency_max_keys: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect the log in --data-dir without starting: report a torn tail or
    /// corruption and every record cutting the log at the corruption would
    /// drop. Changes nothing unless --truncate or --quarantine is given.
    #[command(after_help = RECOVER_EXIT_CODES)]
    Recover {
        /// Repair: raise the envelope id high-water mark past every dropped
        /// record, truncate the damaged segment at the damage and delete every
        /// later segment.
        #[arg(long, conflicts_with = "quarantine")]
        truncate: bool,
        /// Repair like --truncate, but first copy the damaged segment and move
        /// every later segment into DIR (created if missing).
        #[arg(long, value_name = "DIR")]
        quarantine: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreArg {
    Embedded,
    Redis,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = Args::parse();
    let result = match args.command.take() {
        Some(Command::Recover {
            truncate,
            quarantine,
        }) => recover(&args.data_dir, truncate, quarantine),
        None => serve(args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("grab-backend: error: {e:#}");
        ExitCode::FAILURE
    })
}

/// `grab-backend recover`: report, and repair only when asked.
fn recover(
    dir: &std::path::Path,
    truncate: bool,
    quarantine: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let how = match (truncate, quarantine) {
        (_, Some(q)) => Some(Repair::Quarantine(q)),
        (true, None) => Some(Repair::Truncate),
        (false, None) => None,
    };
    let report = match &how {
        None => recovery::inspect(dir)?,
        Some(how) => recovery::repair(dir, how)?,
    };
    print!("{report}");
    if report.corruption.is_some() {
        if how.is_some() {
            anyhow::bail!("the log is still corrupt after the repair");
        }
        println!(
            "nothing changed; a start refuses until the log is repaired with --truncate or --quarantine DIR"
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(args: Args) -> anyhow::Result<()> {
    let mut config = Config {
        data_dir: args.data_dir,
        fsync: args.fsync,
        user_header: args.user_header,
        group_commit: !args.no_group_commit,
        idempotency_ttl: std::time::Duration::from_secs(args.idempotency_ttl_s.max(1)),
        idempotency_max_keys: args.idempotency_max_keys,
        ..Config::default()
    };
    config.limits.max_count = args.max_count;
    config.limits.max_total_cents = args.max_total_cents;
    if args.store == StoreArg::Redis {
        let url = args
            .redis_url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--store redis needs --redis-url"))?;
        config.store = StoreKind::Redis(RedisStoreConfig {
            url,
            timeout: std::time::Duration::from_millis(args.redis_timeout_ms.max(1)),
        });
    }

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        let serving = grab_backend::start(listener, config, shutdown_signal()).await?;
        println!("listening on {addr}");
        serving.await
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received; draining");
}
