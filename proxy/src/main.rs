//! The `tidegate` binary: parse arguments, set up logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidegate::control::history::History;

/// mimalloc rather than the C library's allocator: fewer instructions per allocation on the
/// request path (its thread-local free lists), and an allocation's cost no longer depends on
/// what other tasks (span export, reloads) allocated and freed in between (measured in
/// docs/benchmarks.md). The `system-allocator` feature leaves it out, for heap profilers.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often, at most, a worker going idle asks the allocator to give freed pages back.
#[cfg(not(feature = "system-allocator"))]
const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Periods of [`COLLECT_EVERY`] since start, counted by a thread of its own ([`start_ticker`]):
/// what a worker going idle compares with the period of its last collection, instead of
/// reading the clock each time it parks (a clock reading and an `Instant` difference were
/// about 170 instructions per request at 400 requests/s, where a worker parks after nearly
/// every request: `benches/peers/profile.sh rules`).
#[cfg(not(feature = "system-allocator"))]
static PERIODS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Start the thread that counts [`PERIODS`]. Without it (a thread that cannot start) each
/// thread collects once, at its first park.
#[cfg(not(feature = "system-allocator"))]
fn start_ticker() {
    let ticker = std::thread::Builder::new()
        .name("tidegate-tick".into())
        .spawn(|| {
            loop {
                std::thread::sleep(COLLECT_EVERY);
                PERIODS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    if let Err(e) = ticker {
        tracing::warn!(error = %e, "no ticker thread: freed memory is given back only at start");
    }
}

/// Called by each worker of the runtime as it parks (nothing to do), and after each limiter
/// sweep on the thread that ran it: give the pages this thread's heap no longer uses back to
/// the allocator, and those freed longer than its purge delay (1 s) ago back to the system.
/// mimalloc does that only inside later calls into it, and a worker that served a burst and
/// then holds only idle connections makes few: it kept what the burst used (about 10 KB per
/// idle connection of 10,000 at 10 s; see docs/benchmarks.md). At most once per
/// [`COLLECT_EVERY`] per thread: a collection visits the thread's pages, and a busy worker
/// parks often.
#[cfg(not(feature = "system-allocator"))]
fn collect_when_idle() {
    thread_local! {
        static LAST: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
    }
    let now = PERIODS.load(std::sync::atomic::Ordering::Relaxed);
    if LAST.replace(now) != now {
        mi_collect();
    }
}

/// mimalloc's collection of the calling thread's heap (not forced: only memory already
/// free, and purges already due).
#[cfg(not(feature = "system-allocator"))]
#[allow(unsafe_code)]
fn mi_collect() {
    // SAFETY: `mi_collect` takes no pointers, may be called on any thread at any time, and
    // frees only what the thread's heap holds unused.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

/// Tidegate: an edge traffic-governance gateway.
///
/// Classifies every request by app, interface and user, and routes, limits, degrades or
/// sheds it by rules in a JSON file.
#[derive(Debug, Parser)]
#[command(name = "tidegate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The config file.
        #[arg(long, short, default_value = "config/tidegate.json")]
        config: PathBuf,
        /// Threads serving traffic. Default: one per CPU core (or `TOKIO_WORKER_THREADS`).
        /// `1` runs the whole request path on one thread's event loop, like one nginx
        /// worker: the cheapest per request when the process is pinned to one core. The
        /// admin port always has a thread of its own.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
        workers: Option<u16>,
    },
    /// Check a config file, like `nginx -t`: exit 0 with a summary, or 1 with every error.
    ///
    /// With `--at`, also report the file's change freeze at that time (active or not, what
    /// stays editable). With `--against LIVE`, judge the edit from LIVE (the config in force)
    /// to this file as a reload at `--at` (default: now) would: exit 1 listing every frozen
    /// path it changes.
    Check {
        /// The config file.
        #[arg(long, short, default_value = "config/tidegate.json")]
        config: PathBuf,
        /// A time to judge the freeze at: RFC 3339 with an offset
        /// (`2026-12-31T20:00:00+08:00`). Default with `--against`: now.
        #[arg(long, value_parser = parse_at)]
        at: Option<At>,
        /// The config in force, to judge this file as an edit of it under its freeze.
        #[arg(long, value_name = "LIVE_FILE")]
        against: Option<PathBuf>,
    },
    /// Print the JSON Schema of the config file.
    Schema,
    /// Explain what the gateway would do with a request under a config, phase by phase: its
    /// classification, overload admission, each limit that applies, the fallback, every
    /// route rule considered and why it did or did not match, the bucket, the breaker, and
    /// the final answer (an upstream, 429, a fallback, 503 or 404). Limits and breakers
    /// start fresh here; `GET /admin/explain` reads the live ones.
    Explain {
        /// The config file.
        #[arg(long, short, default_value = "config/tidegate.json")]
        config: PathBuf,
        /// App ID (default: what the app extractor finds in the request).
        #[arg(long)]
        app: Option<String>,
        /// User ID (default: what the user extractor finds in the request).
        #[arg(long)]
        user: Option<String>,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request path, optionally with `?query`.
        #[arg(long)]
        path: String,
        /// A request header as `name:value`; repeatable.
        #[arg(long = "header", value_parser = tidegate::admin::explain::parse_header)]
        headers: Vec<(String, String)>,
        /// Client IP (the bucket key of requests without a user).
        #[arg(long)]
        client_ip: Option<std::net::IpAddr>,
        /// Overload admission level to judge the request at (default: the live level, which
        /// is 0, everyone admitted, for a config read from a file).
        #[arg(long)]
        level: Option<u32>,
        /// Print JSON (the same document `GET /admin/explain` returns).
        #[arg(long)]
        json: bool,
    },
    /// Replay a recorded access log (the gateway's own, `server.access_log` with `format:
    /// json`) under a candidate config before deploying it: every request is decided again
    /// (limits simulated in the log's own time) and compared with what the log recorded, or
    /// with `--live` with the current config's decision. Reports per rule the requests and
    /// distinct users whose route changes (from → to), that are newly limited or no longer
    /// limited, newly degraded, or newly shed at `--level`. Identity is taken from the log
    /// (edits of the identity extractors are not replayed); breakers, cluster-scope limits
    /// and requests bucketed by a random draw are not replayed, and are counted apart.
    Replay {
        /// The candidate config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The current config file: compare with its decisions rather than the recorded
        /// ones (both replayed the same way, so only the edit differs).
        #[arg(long)]
        live: Option<PathBuf>,
        /// Judge overload admission at this level (each request with the user priorities
        /// of its own hour). Without it everyone is admitted, and requests the log
        /// recorded as shed are not compared.
        #[arg(long)]
        level: Option<u32>,
        /// Distinct users counted exactly (over all changes); past it, counts are lower
        /// bounds.
        #[arg(long, default_value_t = 1_000_000)]
        users_bound: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The access log (`-`: standard input).
        log: PathBuf,
    },
    /// Mint a signed JWT for `identity.jwt` (tests, rehearsals, the docs' examples) and print
    /// it. The key is a PEM private key (`openssl genpkey`) for RS*, PS*, ES* and EdDSA, or
    /// a file holding the shared secret for HS*.
    Token {
        /// The private key (or HS* secret) file.
        #[arg(long)]
        key: PathBuf,
        /// Signature algorithm: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384,
        /// EdDSA, HS256, HS384, HS512.
        #[arg(long)]
        alg: String,
        /// The key's `kid` (as in the JWKS).
        #[arg(long)]
        kid: Option<String>,
        /// `sub`: the user ID, with `"user": {"claim": "sub"}`.
        #[arg(long)]
        sub: Option<String>,
        /// `iss`.
        #[arg(long)]
        iss: Option<String>,
        /// `aud`.
        #[arg(long)]
        aud: Option<String>,
        /// Lifetime in seconds (`exp` = now + ttl).
        #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
        ttl: i64,
        /// `nbf` = now + this many seconds.
        #[arg(long, allow_negative_numbers = true)]
        nbf_in: Option<i64>,
        /// Another string claim as `name=value` (e.g. `azp=shop`); repeatable.
        #[arg(long = "claim", value_parser = parse_claim)]
        claims: Vec<(String, String)>,
    },
    /// Print a JWKS with the public half of a private key file, for `identity.jwt.jwks_file`.
    /// For HS* the "public half" is the shared secret itself: keep that file private.
    Jwks {
        /// The private key (or HS* secret) file.
        #[arg(long)]
        key: PathBuf,
        /// The algorithm the key signs with.
        #[arg(long)]
        alg: String,
        /// The key's `kid` (tokens name it).
        #[arg(long)]
        kid: String,
    },
    /// List the applied configs the gateway kept (`server.data_dir`/history), newest
    /// first: ID, generation, hash, time, trigger and what changed.
    History {
        /// The config file (its `server.data_dir` is used, even when its rules are broken).
        #[arg(long, short, default_value = "config/tidegate.json")]
        config: PathBuf,
        /// The data directory, instead of the config's `server.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write an applied config's files back (see `history`): each file atomically, the main
    /// file last, so the gateway reloads the rolled-back config as a whole. Fragments the
    /// entry did not have are renamed aside, never deleted. Refused, with nothing written,
    /// if the entry does not load with this build.
    Rollback {
        /// The config file (its `server.data_dir` is used, even when its rules are broken).
        #[arg(long, short, default_value = "config/tidegate.json")]
        config: PathBuf,
        /// The data directory, instead of the config's `server.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The history entry to restore.
        #[arg(long)]
        to: u64,
    },
    /// Show what changes from one config to another, rule by rule: rules added, removed and
    /// changed (field by field), and for a changed split, upstream or fallback fraction the
    /// exact share of users that move and from where to where, computed from the bucket
    /// ranges. Exit 0 when the configs are the same, 1 when they differ, 2 when one cannot
    /// be read.
    Diff {
        /// The config in force (or an older one).
        old: PathBuf,
        /// The candidate.
        new: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A time given on the command line, with its text for messages (`at TIME`, `now`).
#[derive(Debug, Clone)]
struct At {
    time: rules::freeze::OffsetDateTime,
    text: String,
}

/// `--at`: an RFC 3339 time with an offset.
fn parse_at(s: &str) -> Result<At, String> {
    Ok(At {
        time: rules::model::parse_time(s)?,
        text: format!("at {s}"),
    })
}

/// `name=value`.
fn parse_claim(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: write name=value"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            config,
            at,
            against,
        } => match read_config(&config).and_then(|loaded| check_admin_token(&config, loaded)) {
            Ok(loaded) => {
                for w in rules::validate::warnings(&loaded.config) {
                    eprintln!("{}: warning: {}: {}", config.display(), w.path, w.message);
                }
                println!("{}", tidegate::control::config::summary(&config, &loaded));
                match (at, against) {
                    (None, None) => ExitCode::SUCCESS,
                    (at, against) => {
                        let at = at.unwrap_or_else(|| At {
                            time: std::time::SystemTime::now().into(),
                            text: "now".to_owned(),
                        });
                        check_freeze(&config, &loaded, &at, against.as_deref())
                    }
                }
            }
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("{e}");
                }
                eprintln!("{}: {} error(s)", config.display(), errors.0.len());
                ExitCode::FAILURE
            }
        },
        Command::Token {
            key,
            alg,
            kid,
            sub,
            iss,
            aud,
            ttl,
            nbf_in,
            claims,
        } => {
            use tidegate::jwt::mint;
            let claims = mint::Claims {
                sub,
                iss,
                aud,
                ttl_s: ttl,
                nbf_in_s: nbf_in,
                extra: claims,
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let minted = mint::signing_key(&key, &alg)
                .and_then(|(k, alg)| mint::token(&k, alg, kid.as_deref(), &claims, now));
            print_or_fail("token", minted)
        }
        Command::Jwks { key, alg, kid } => {
            use tidegate::jwt::mint;
            let jwks = mint::signing_key(&key, &alg).and_then(|(k, alg)| mint::jwks(&k, alg, &kid));
            print_or_fail("jwks", jwks)
        }
        Command::Diff { old, new, json } => diff(&old, &new, json),
        Command::History {
            config,
            data_dir,
            json,
        } => history(&config, data_dir, json),
        Command::Rollback {
            config,
            data_dir,
            to,
        } => rollback(&config, data_dir, to),
        Command::Schema => {
            let schema = schemars::schema_for!(rules::Config);
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).expect("a schema serializes")
            );
            ExitCode::SUCCESS
        }
        Command::Explain {
            config,
            app,
            user,
            method,
            path,
            headers,
            client_ip,
            level,
            json,
        } => {
            let loaded = match read_config(&config) {
                Ok(l) => l,
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            let q = tidegate::admin::explain::ExplainQuery {
                method: Some(method),
                path,
                headers,
                app,
                user,
                client_ip,
                level,
            };
            match tidegate::admin::explain::explain(loaded.snapshot, &q) {
                Ok(e) if json => {
                    println!("{}", serde_json::to_string_pretty(&e).expect("serializes"));
                    ExitCode::SUCCESS
                }
                Ok(e) => {
                    println!("{e}");
                    ExitCode::SUCCESS
                }
                Err(msg) => {
                    eprintln!("explain: {msg}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Replay {
            config,
            live,
            level,
            users_bound,
            json,
            log,
        } => replay(&config, live.as_deref(), level, users_bound, json, &log),
        Command::Run { config, workers } => {
            let loaded = match read_config(&config) {
                Ok(l) => l,
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            init_tracing(loaded.config.server.access_log.format);
            drop(loaded);
            let mut rt = match workers {
                Some(1) => tokio::runtime::Builder::new_current_thread(),
                Some(n) => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(usize::from(n));
                    b
                }
                None => tokio::runtime::Builder::new_multi_thread(),
            };
            #[cfg(not(feature = "system-allocator"))]
            {
                start_ticker();
                rt.on_thread_park(collect_when_idle);
                tidegate::control::housekeep::on_memory_freed(collect_when_idle);
            }
            let rt = rt.enable_all().build().expect("building the tokio runtime");
            let result = tidegate::serve_until_signal(&rt, &config);
            // Never wait long for blocking tasks still running (the reload's reader is a
            // detached thread already; this covers any other): the drain is done.
            rt.shutdown_timeout(SHUTDOWN_BLOCKING_WAIT);
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "tidegate failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `tidegate replay`: exit 0 with the report, 1 when a config does not load or the log
/// cannot be read.
fn replay(
    config: &std::path::Path,
    live: Option<&std::path::Path>,
    level: Option<u32>,
    users_bound: usize,
    json: bool,
    log: &std::path::Path,
) -> ExitCode {
    use std::sync::Arc;
    use tidegate::control::config as cfg;
    let metrics = Arc::new(tidegate::metrics::Metrics::new());
    let runtime = |path: &std::path::Path| match cfg::read_config_within(path, cfg::READ_TIMEOUT) {
        Ok(r) => Some(tidegate::runtime::Runtime::offline_keyed(
            r.loaded.snapshot,
            r.secrets.priority_key,
            &metrics,
        )),
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            None
        }
    };
    let Some(candidate) = runtime(config) else {
        return ExitCode::FAILURE;
    };
    let live = match live.map(runtime) {
        Some(None) => return ExitCode::FAILURE,
        Some(Some(rt)) => Some(rt),
        None => None,
    };
    let opts = tidegate::replay::Options {
        level,
        users_bound,
        sample_users: 5,
        first_bad_lines: 10,
    };
    let input: Box<dyn std::io::Read> = if log.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(log) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("replay: {}: {e}", log.display());
                return ExitCode::FAILURE;
            }
        }
    };
    let reader = std::io::BufReader::with_capacity(1 << 20, input);
    match tidegate::replay::replay(candidate, live, reader, opts) {
        Ok(report) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("serializes")
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("replay: {}: {e}", log.display());
            ExitCode::FAILURE
        }
    }
}

/// Print `out`, or the error and exit 1.
fn print_or_fail(what: &str, out: Result<String, String>) -> ExitCode {
    match out {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{what}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long exit waits for blocking tasks left after the drain.
const SHUTDOWN_BLOCKING_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Read a config for `check`, `explain` and start-up: only regular files, within
/// [`tidegate::control::config::READ_TIMEOUT`] (a read stuck on a FIFO is an error naming the
/// file, not a hang).
fn read_config(path: &std::path::Path) -> Result<rules::Loaded, rules::error::ConfigErrors> {
    use tidegate::control::config;
    config::read_config_within(path, config::READ_TIMEOUT).map(|r| r.loaded)
}

fn diff(old: &std::path::Path, new: &std::path::Path, json: bool) -> ExitCode {
    let (o, n) = match (read_config(old), read_config(new)) {
        (Ok(o), Ok(n)) => (o, n),
        (o, n) => {
            for e in [o.err(), n.err()].into_iter().flatten() {
                for e in &e.0 {
                    eprintln!("{e}");
                }
            }
            return ExitCode::from(2);
        }
    };
    let d = rules::diff::diff((&o.config, &o.snapshot), (&n.config, &n.snapshot));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&d).expect("a diff serializes")
        );
    } else {
        print!("{}", d.render());
    }
    ExitCode::from(u8::from(!d.is_empty()))
}

/// `check --at/--against`: the file's own freeze at `at`, and, against the live file, what
/// a reload at `at` would refuse.
fn check_freeze(
    file: &std::path::Path,
    loaded: &rules::Loaded,
    at: &At,
    against: Option<&std::path::Path>,
) -> ExitCode {
    let (time, at) = (at.time, &at.text);
    let window = |f: Option<&rules::model::Freeze>| match f.map(rules::freeze::Window::of) {
        None => "none".to_owned(),
        Some(Err(e)) => e,
        Some(Ok(w)) if w.is_active(time) => format!(
            "{}: active {at}; editable: {}",
            w.describe(),
            if w.freeze.editable.is_empty() {
                "nothing but `freeze`".to_owned()
            } else {
                w.freeze.editable.join(", ")
            }
        ),
        Some(Ok(w)) => format!("{}: not active {at}", w.describe()),
    };
    println!("freeze: {}", window(loaded.config.freeze.as_ref()));
    let Some(live_path) = against else {
        return ExitCode::SUCCESS;
    };
    let live = match read_config(live_path) {
        Ok(l) => l,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{}: the config in force does not load", live_path.display());
            return ExitCode::FAILURE;
        }
    };
    println!(
        "freeze in force ({}): {}",
        live_path.display(),
        window(live.config.freeze.as_ref())
    );
    match rules::freeze::check(
        (&live.config, &live.snapshot),
        (&loaded.config, &loaded.snapshot),
        time,
    ) {
        Ok(()) => {
            println!("a reload {at} would apply this edit");
            ExitCode::SUCCESS
        }
        Err(refusal) => {
            eprintln!("{}: {refusal}", file.display());
            for p in &refusal.frozen {
                eprintln!("frozen: {p}");
            }
            eprintln!("a reload {at} would refuse this edit; the config in force would stay live");
            ExitCode::FAILURE
        }
    }
}

/// The history of the gateway running `config`: `--data-dir`, else the file's
/// `server.data_dir` (read from its JSON alone, so a broken rule does not stand between an
/// operator and a rollback), else the default, relative to the file's directory.
fn history_at(config: &std::path::Path, data_dir: Option<PathBuf>) -> History {
    let dir = data_dir.unwrap_or_else(|| {
        let named = std::fs::read(config)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["server"]["data_dir"].as_str().map(str::to_owned));
        let server = rules::model::Server::default();
        let base = config.parent().unwrap_or(std::path::Path::new("."));
        base.join(named.unwrap_or(server.data_dir))
    });
    History::at(&dir)
}

fn history(config: &std::path::Path, data_dir: Option<PathBuf>, json: bool) -> ExitCode {
    let (entries, errors) = history_at(config, data_dir).list();
    if json {
        let v = serde_json::json!({ "entries": entries, "errors": errors });
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        for e in &entries {
            println!(
                "{:>6}  gen {:<4} {}  {:<7} {}  {}",
                e.meta.id,
                e.meta.generation,
                e.meta.hash,
                e.meta.trigger,
                e.meta.applied_at_ms,
                e.meta.summary
            );
        }
        for e in &errors {
            eprintln!("{e}");
        }
    }
    ExitCode::from(u8::from(!errors.is_empty()))
}

fn rollback(config: &std::path::Path, data_dir: Option<PathBuf>, to: u64) -> ExitCode {
    let done = history_at(config, data_dir)
        .get(to)
        .and_then(|e| tidegate::control::history::rollback(&e));
    match done {
        Ok((written, moved)) => {
            for p in written {
                println!("wrote {}", p.display());
            }
            for p in moved {
                println!("moved aside {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rollback: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: rules::model::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    match format {
        rules::model::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        rules::model::LogFormat::Text => builder.init(),
    }
}

/// The admin token file must be readable and usable (as at start-up), reported at
/// `server.admin.token_file`.
fn check_admin_token(
    config: &std::path::Path,
    loaded: rules::Loaded,
) -> Result<rules::Loaded, rules::ConfigErrors> {
    let admin = &loaded.config.server.admin;
    match tidegate::control::config::read_admin_token(admin, config.parent()) {
        Ok(_) => Ok(loaded),
        Err(message) => {
            let text = std::fs::read_to_string(config).unwrap_or_default();
            let path = rules::JsonPath::root()
                .key("server")
                .key("admin")
                .key("token_file");
            Err(rules::locate_all(
                &config.display().to_string(),
                &text,
                vec![rules::validate::Issue { path, message }],
            ))
        }
    }
}
