//! Tidegate: an edge traffic-governance gateway.
//!
//! A reverse proxy (hyper on tokio; HTTP/1.1, h2c and TLS with ALPN h2) that classifies every
//! request by app, interface and user and applies operator rules from a JSON file. The rules
//! themselves live in the pure `rules` crate; this crate owns sockets, TLS, forwarding, the
//! admin port, metrics and the embedded grab backend.
//!
//! # Layout
//!
//! The request path, top to bottom (dependencies point down, never up):
//!
//! ```text
//! serve/         accept, connection caps, first-request deadline, TLS  (serve/tls.rs),
//!                the own HTTP/1.x server, hyper for the rest  (serve/h1/)
//!   └─ pipeline/   Gateway::handle: head → identity → decide → cluster limits → overload slots → cache → forward → record
//!        ├─ head.rs     one Host, Connection may not name Host or identity headers, hop-by-hop out
//!        ├─ identity.rs identity.jwt: the token verified (jwt/), identity headers set from its claims
//!        ├─ decide.rs   decide(): classify → admission → limits → fallback → route → breaker
//!        ├─ tunnel.rs   HTTP/1.1 upgrades a route allows: the cap, a 101 into a tunnel, idle timeout
//!        └─ record.rs   the response, metrics, dashboard counters, access log
//!             └─ runtime.rs   Runtime (what one config compiles to) and Live (its handle)
//!                  ├─ cache.rs    interface response caches: keys, kept answers, coalesced misses
//!                  ├─ govern/     limiters (limit.rs), cluster limits (cluster.rs), breakers
//!                  ├─ overload/   DAGOR admission, concurrency caps, adaptive limits
//!                  └─ upstream/   endpoints, connection cache, own HTTP/1.1 client, headers, mirrors,
//!                                 endpoint health (ejection, checks, re-resolution), upstream
//!                                 TLS, HTTP/2 connections, gRPC status counts
//! ```
//!
//! Beside it, the planes that hold the [`runtime::Live`] handle rather than the gateway:
//! - [`control`]: the config file (`config`), hot reload (`reload`, with the plans' triggers
//!   in `reload::plans` and the guarded ramps in `reload::ramps`), the config history
//!   (`history`), background housekeeping (`housekeep`) and the embedded grab backend
//!   (`embedded`).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, the dashboard and `status.json`
//!   (`admin::status`), and `explain` (`admin::explain`, also behind `tidegate explain`).
//! - [`replay`]: `tidegate replay`: a recorded access log decided again under a candidate
//!   config (`pipeline::decide::replay`, limits on the log's clock), the changes reported
//!   per rule.
//!
//! Leaves every layer may use: [`stats`] (the dashboard's live counters), [`metrics`] (the
//! Prometheus registry), [`respond`] (the gateway's own answers), [`conn`] (per-connection
//! facts), [`names`] and [`header_maps`] (the HTTP/1 parsers' header names and header
//! maps, reused per thread), [`jwt`]
//! (token verification: keys, the cache, and minting for `tidegate token`), [`shutdown`]
//! (the stop signal) and [`clock`] (the request path's clock).
//!
//! `cargo test -p tidegate-tests --test layout` fails on any import circle among these
//! modules (and those of `rules`).
//!
//! Tests and the binary start a gateway with [`start`], which binds everything (port 0 is
//! fine) and returns a [`Server`] that reports its addresses and shuts down gracefully.

pub mod admin;
pub mod cache;
pub mod clock;
pub mod conn;
pub mod control;
pub mod govern;
pub mod header_maps;
pub mod jwt;
pub mod metrics;
pub mod names;
pub mod overload;
pub mod pipeline;
pub mod replay;
pub mod respond;
pub mod runtime;
pub mod serve;
pub mod shutdown;
pub mod stats;
pub mod trace;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use rules::Loaded;
use rules::model::UpstreamKind;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::admin::AdminState;
use crate::control::embedded::{self, Embedded};
use crate::control::history::History;
use crate::control::{config, housekeep, reload};
use crate::govern::cluster::ClusterStore;
use crate::metrics::Metrics;
use crate::pipeline::{Gateway, Settings};
use crate::runtime::{Live, Runtime};
use crate::serve::tls;

/// A running gateway.
#[derive(Debug)]
pub struct Server {
    /// Bound address of each traffic listener, in config order.
    pub listen_addrs: Vec<SocketAddr>,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// The live runtime (it can be inspected or replaced) and the metrics.
    pub live: Arc<Live>,
    /// Addresses of embedded upstreams by name.
    pub embedded_addrs: Vec<(String, SocketAddr)>,
    /// The reloader, for a gateway started from a file.
    pub reloader: Option<Arc<reload::Reloader>>,
    shutdown: watch::Sender<bool>,
    stop_embedded: watch::Sender<bool>,
    embedded: Vec<Embedded>,
    tasks: Vec<JoinHandle<()>>,
    conn_permits: Arc<Semaphore>,
    max_connections: u32,
    grace: Duration,
    admin: Arc<AdminState>,
    admin_task: std::thread::JoinHandle<()>,
}

/// Start a gateway for a loaded config: start embedded upstreams, bind every listener and
/// the admin port, and begin serving. Returns once everything is bound.
pub async fn start(loaded: Loaded) -> anyhow::Result<Server> {
    start_inner(loaded, runtime::Secrets::default(), None).await
}

/// `tidegate run`: serve from the config file at `path` on `rt` until SIGTERM or SIGINT,
/// then drain the requests in flight.
///
/// A plain function that blocks, not an `async fn` for the binary to await: an `async fn`
/// of the library awaited from another crate is compiled again in that crate, the request
/// path with it. The server was compiled into the binary twice (the parked connections'
/// resumption makes its own copy here), and with two callers each, none of the request
/// path's phases was inlined (`benches/peers/profile.sh rules`: 139 more instructions per
/// request).
pub fn serve_until_signal(
    rt: &tokio::runtime::Runtime,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    rt.block_on(async {
        let server = start_from_file(path).await?;
        shutdown::signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        let drained = server.shutdown().await;
        tracing::info!(drained, "stopped");
        Ok(())
    })
}

/// Start a gateway from a config file, and keep it in step with the file: edits (and
/// SIGHUP) reload the rules without a restart (see [`reload`]).
pub async fn start_from_file(path: &std::path::Path) -> anyhow::Result<Server> {
    // Bounded: a read blocked for good (a FIFO swapped in after the file-type check) fails
    // the start after `READ_TIMEOUT` rather than hanging it.
    let read = config::read_config_within(path, config::READ_TIMEOUT)?;
    let include = config::include_dir(path, &read.loaded);
    let file = (path.to_path_buf(), include, read.hash, read.sources);
    start_inner(read.loaded, read.secrets, Some(file)).await
}

/// The future `make` returns, boxed by a function of its own, and polled by one: for the
/// rare paths of the request path. An `async` function's poll reserves stack for every
/// future it builds and for the locals of every poll inlined into it: `Box::pin(f())` builds
/// `f`'s future (several KB for hyper's exchanges) in the caller's frame before moving it
/// to the heap, and polling a `Pin<Box<F>>` inlines `F::poll`, whose locals (a task spawned,
/// a hyper handshake) then sit in the caller's frame too. Built and polled here, they take
/// stack only when they run. Every wake-up of every connection runs the common polls, and a
/// frame over a page is probed page by page on entry: their frames are touched in full.
#[inline(never)]
pub fn out_of_line<F: std::future::Future>(make: impl FnOnce() -> F) -> OutOfLine<F> {
    OutOfLine(Box::pin(make()))
}

/// A boxed future whose poll is never inlined into its caller's ([`out_of_line`]).
pub struct OutOfLine<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for OutOfLine<F> {
    type Output = F::Output;

    #[inline(never)]
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// Where a config's history is kept: `server.data_dir/history`, resolved against the
/// config file's directory; `None` when `server.history_keep` is 0.
pub fn history_of(path: &std::path::Path, server: &rules::model::Server) -> Option<History> {
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    History::new(&base.join(&server.data_dir), server.history_keep)
}

/// The ramps of a gateway starting from the file at `path` (each resumed from its state
/// file under `server.data_dir`, or at its first step), and the snapshot to start with:
/// `snapshot` (compiled from `config` as written) with each ramp's target at its weight,
/// so the first request is already routed as the ramp has it. Without a file there is no
/// state to keep, and ramps stay at their written weights.
fn start_ramps(
    config: &rules::Config,
    snapshot: rules::Snapshot,
    path: Option<&std::path::Path>,
    metrics: &Metrics,
) -> anyhow::Result<(reload::ramps::RampControl, rules::Snapshot)> {
    let Some(path) = path else {
        if !snapshot.ramps.is_empty() {
            tracing::warn!(
                "ramps step only in a gateway started from a config file; their targets keep their written weights"
            );
        }
        return Ok((reload::ramps::RampControl::default(), snapshot));
    };
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    let file = base
        .join(&config.server.data_dir)
        .join(reload::ramps::STATE_FILE);
    let ramps = reload::ramps::RampControl::start(Some(file), &snapshot.ramps, metrics);
    let weights = ramps.weights(ramps.ramps());
    let snapshot = match rules::ramp::effective(config, ramps.ramps(), &weights) {
        Some(c) => rules::Snapshot::compile(&c).map_err(|issues| {
            let text: Vec<String> = (issues.iter())
                .map(|i| format!("{}: {}", i.path, i.message))
                .collect();
            anyhow::anyhow!("with the ramps' weights: {}", text.join("; "))
        })?,
        None => snapshot,
    };
    Ok((ramps, snapshot))
}

async fn start_inner(
    loaded: Loaded,
    secrets: runtime::Secrets,
    file: Option<(
        std::path::PathBuf,
        Option<std::path::PathBuf>,
        u64,
        control::config::Sources,
    )>,
) -> anyhow::Result<Server> {
    let Loaded { config, snapshot } = loaded;
    for w in rules::validate::warnings(&config) {
        tracing::warn!(path = %w.path, "config: {}", w.message);
    }
    let server_cfg = &config.server;
    // The admin token (relative to the config file, like `include_dir`), before anything
    // starts: a missing or unusable token file refuses the start.
    let token = config::read_admin_token(
        &server_cfg.admin,
        file.as_ref().and_then(|(p, ..)| p.parent()),
    )
    .map_err(|e| anyhow::anyhow!("server.admin.token_file: {e}"))?
    .map(|t| Arc::new(arc_swap::ArcSwap::from_pointee(t)));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (stop_embedded_tx, stop_embedded_rx) = watch::channel(false);

    let mut embedded = Vec::new();
    for (name, spec) in snapshot.upstreams.iter().map(|u| (u.name.to_string(), u)) {
        if spec.kind == UpstreamKind::Embedded {
            let dir = spec
                .data_dir
                .as_deref()
                .unwrap_or(rules::DEFAULT_EMBEDDED_DATA_DIR);
            let e = embedded::start(&name, dir, &config.identity, stop_embedded_rx.clone())
                .await
                .with_context(|| format!("starting embedded upstream {name:?}"))?;
            tracing::info!(upstream = %name, addr = %e.addr, data_dir = dir, "embedded grab backend started");
            embedded.push(e);
        }
    }
    let embedded_addrs: Vec<(String, SocketAddr)> =
        embedded.iter().map(|e| (e.name.clone(), e.addr)).collect();
    let lookup = |n: &str| embedded_addrs.iter().find(|(m, _)| m == n).map(|(_, a)| *a);
    let metrics = Arc::new(Metrics::new());
    let (ramps, snapshot) = start_ramps(&config, snapshot, file.as_ref().map(|f| &*f.0), &metrics)?;
    let mut runtime = Runtime::build(snapshot, secrets.clone(), &lookup, None, &metrics)
        .map_err(anyhow::Error::msg)?;
    if let Some(redis) = &server_cfg.redis {
        let store = ClusterStore::connect(redis).context("server.redis")?;
        runtime.governors = govern::Governors::build_cluster(&runtime.snapshot, None, Some(store));
    }
    let live = Arc::new(Live::new(runtime, metrics.clone()));
    let gateway = Arc::new(Gateway::new(
        live.clone(),
        Settings {
            max_body_bytes: server_cfg.limits.max_body_bytes,
            access_log: server_cfg.access_log.enabled,
            max_upgraded_connections: server_cfg.limits.max_upgraded_connections,
            upgrade_idle_timeout: Duration::from_millis(server_cfg.limits.upgrade_idle_timeout_ms),
            shutdown: shutdown_rx.clone(),
            trace: server_cfg.tracing.propagate.then(|| {
                let t = &server_cfg.tracing;
                trace::Sampler::new(t.sample_ratio, t.parent_sampled)
            }),
            // Validation refuses an endpoint without `propagate`.
            export: trace::export::ExportSettings::from_config(&server_cfg.tracing)
                .map(|s| trace::export::Exporter::start(s, metrics.clone())),
        },
    ));

    let limits = &server_cfg.limits;
    let conn_permits = Arc::new(Semaphore::new(limits.max_connections as usize));
    let shared = Arc::new(serve::Shared {
        gateway,
        builder: Arc::new(serve::builder(limits)),
        h1: serve::h1::Limits::new(limits),
        conn_permits: conn_permits.clone(),
        idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
        handshake_timeout: Duration::from_millis(limits.header_read_timeout_ms),
        shutdown: shutdown_rx.clone(),
        stop: shutdown::Stop::new(shutdown_rx.clone()),
        parked: serve::park::ParkLot::new(shutdown_rx.clone(), serve::resume_dormant),
    });

    let mut tasks = Vec::new();
    let mut listen_addrs = Vec::new();
    let mut cert_stores = Vec::new();
    for l in &server_cfg.listeners {
        let (listener, addr) = serve::bind(&l.address).await?;
        let acceptor = match &l.tls {
            Some(t) => {
                let store = Arc::new(tls::CertStore::open(&t.cert_path, &t.key_path)?);
                cert_stores.push(store.clone());
                Some(store)
            }
            None => None,
        };
        let name: Arc<str> = l.name.clone().unwrap_or_else(|| l.address.clone()).into();
        tracing::info!(listener = %name, %addr, tls = acceptor.is_some(), "listening");
        listen_addrs.push(addr);
        tasks.push(tokio::spawn(serve::accept_loop(
            listener,
            acceptor,
            shared.clone(),
            name,
        )));
    }

    let mut reloader = None;
    if let Some((path, include, hash, sources)) = file {
        let history = history_of(&path, server_cfg);
        if let Some(h) = history.clone() {
            let recorded =
                tokio::task::spawn_blocking(move || h.record(&sources, 1, hash, "start"))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
            if let Err(e) = recorded {
                tracing::warn!("config history: {e}");
            }
        }
        reloader = Some(Arc::new(reload::Reloader::new(
            path,
            hash,
            live.clone(),
            embedded_addrs.clone(),
            config.clone(),
            reload::Beside {
                include_dir: include,
                certs: cert_stores.clone(),
                admin_token: token.clone(),
                history,
                secrets,
                ramps,
            },
        )));
    }
    if let Some(r) = &reloader {
        tasks.push(tokio::spawn(reload::watch(r.clone(), shutdown_rx.clone())));
    }

    live.runtime.load().governors.export_states(&metrics);
    tasks.push(tokio::spawn(housekeep::sweep_limiters(
        live.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(housekeep::overload_windows(
        live.clone(),
        shutdown_rx.clone(),
    )));

    let stats = Arc::new(admin::status::Stats::new(live.clone(), reloader.clone()));
    tasks.push(tokio::spawn(admin::status::sample(
        stats.clone(),
        shutdown_rx.clone(),
    )));
    if let Some(r) = &reloader {
        tasks.push(tokio::spawn(reload::plans::run(
            r.clone(),
            stats.windows(),
            shutdown_rx.clone(),
        )));
    }

    let (admin_listener, admin_addr) = serve::bind(&server_cfg.admin.address).await?;
    let admin = Arc::new(AdminState {
        guard: admin::guard::Guard::new(admin_addr, &server_cfg.admin.allowed_hosts, token),
        max_connections: server_cfg.admin.max_connections as usize,
        stats,
        metrics,
        ready: true.into(),
        live: live.clone(),
        reloader: reloader.clone(),
    });
    tracing::info!(addr = %admin_addr, "admin listening");
    // The admin port outlives the drain (so probes see `/readyz` answer 503 rather than a
    // refused connection); it stops with the embedded upstreams.
    // It also runs on its own thread and runtime, so probes, scrapes and the dashboard are
    // answered promptly even while traffic saturates the main runtime's workers.
    let admin_task = {
        let (state, stop) = (admin.clone(), stop_embedded_rx.clone());
        let listener = admin_listener.into_std()?;
        std::thread::Builder::new()
            .name("tidegate-admin".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building the admin runtime");
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => admin::serve(l, state, stop).await,
                        Err(e) => tracing::error!(error = %e, "admin listener failed"),
                    }
                });
            })?
    };

    Ok(Server {
        listen_addrs,
        admin_addr,
        live,
        embedded_addrs,
        shutdown: shutdown_tx,
        stop_embedded: stop_embedded_tx,
        embedded,
        tasks,
        conn_permits,
        max_connections: limits.max_connections,
        grace: Duration::from_millis(server_cfg.shutdown_grace_ms),
        admin,
        admin_task,
        reloader,
    })
}

// === impl Server ===

impl Server {
    /// Graceful shutdown: stop accepting, let in-flight requests finish (up to the grace
    /// period), then stop embedded upstreams. Returns whether every connection drained in
    /// time.
    pub async fn shutdown(self) -> bool {
        self.admin.ready.store(false, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Every open connection holds a permit; all of them back means all are closed.
        let drained = tokio::time::timeout(
            self.grace,
            self.conn_permits.acquire_many(self.max_connections),
        )
        .await
        .is_ok();
        if !drained {
            tracing::warn!(
                grace_ms = self.grace.as_millis() as u64,
                "shutdown grace period over; closing the rest"
            );
        }
        self.conn_permits.close();
        let _ = self.stop_embedded.send(true);
        let admin = self.admin_task;
        let _ = tokio::task::spawn_blocking(move || admin.join()).await;
        for e in self.embedded {
            match e.task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::error!(upstream = %e.name, error = %err, "embedded backend failed")
                }
                Err(err) => {
                    tracing::error!(upstream = %e.name, error = %err, "embedded backend panicked")
                }
            }
        }
        drained
    }
}
