//! Tidegate: an edge traffic-governance gateway.
//!
//! A reverse proxy (hyper on tokio; HTTP/1.1, h2c and TLS with ALPN h2) that classifies every
//! request by app, interface and user and applies operator rules from a JSON file. The rules
//! themselves live in the pure `rules` crate; this crate owns sockets, TLS, forwarding, the
//! admin port, metrics and the embedded grab backend.
//!
//! # Layout
//! - [`config`]: reading the config file from disk (size limits, TLS file checks).
//! - [`reload`]: watching the file and swapping in validated rules without a restart.
//! - [`server`]: accept loops and per-connection tasks (limits, idle timeout, shutdown).
//! - [`tls`]: rustls server config from PEM files.
//! - [`gateway`]: the per-request path: classify → route → forward → record.
//! - [`breaker`]: circuit breaker state (closed, open, half-open) over a sliding window.
//! - [`govern`]: the governance step: limits, then fallbacks, then the upstream's breaker.
//! - [`limit`]: rate limit enforcement: keyed GCRA limiters (governor), eviction.
//! - [`cluster`]: cluster-scope limits: GCRA in Redis, token leases spent locally.
//! - [`overload`]: overload protection: DAGOR priority admission, concurrency caps with
//!   bounded queues, adaptive upstream limits, and the control task that moves them.
//! - [`forward`]: upstream clusters, balancing, pooled clients, timeouts, header hygiene.
//! - [`respond`]: the gateway's own answers (stable JSON error codes).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/admin/explain`.
//! - [`explain`]: the query behind `tidegate explain` and `/admin/explain`.
//! - [`metrics`]: the Prometheus registry.
//! - [`stats`]: live per-second rates and latencies for the dashboard (`/admin/`) and
//!   `/admin/status.json`.
//! - [`embedded`]: hosting the grab backend in-process.
//!
//! Tests and the binary start a gateway with [`start`], which binds everything (port 0 is
//! fine) and returns a [`Server`] that reports its addresses and shuts down gracefully.

pub mod admin;
pub mod breaker;
pub mod cluster;
pub mod config;
pub mod embedded;
pub mod explain;
pub mod forward;
pub mod gateway;
pub mod govern;
pub mod h1;
pub mod limit;
pub mod metrics;
pub mod overload;
pub mod reload;
pub mod respond;
pub mod server;
pub mod stats;
pub mod tls;

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
use crate::embedded::Embedded;
use crate::gateway::{Gateway, Runtime, Settings};
use crate::metrics::Metrics;

/// A running gateway.
#[derive(Debug)]
pub struct Server {
    /// Bound address of each traffic listener, in config order.
    pub listen_addrs: Vec<SocketAddr>,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// The request path (its live runtime can be inspected or replaced).
    pub gateway: Arc<Gateway>,
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
    start_inner(loaded, None).await
}

/// Start a gateway from a config file, and keep it in step with the file: edits (and
/// SIGHUP) reload the rules without a restart (see [`reload`]).
pub async fn start_from_file(path: &std::path::Path) -> anyhow::Result<Server> {
    let (loaded, hash) = config::read_config_hashed(path)?;
    let include = config::include_dir(path, &loaded);
    start_inner(loaded, Some((path.to_path_buf(), include, hash))).await
}

async fn start_inner(
    loaded: Loaded,
    file: Option<(std::path::PathBuf, Option<std::path::PathBuf>, u64)>,
) -> anyhow::Result<Server> {
    let Loaded { config, snapshot } = loaded;
    let server_cfg = &config.server;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (stop_embedded_tx, stop_embedded_rx) = watch::channel(false);

    let mut embedded = Vec::new();
    for (name, spec) in snapshot.upstreams.iter().map(|u| (u.name.to_string(), u)) {
        if spec.kind == UpstreamKind::Embedded {
            let dir = spec
                .data_dir
                .as_deref()
                .unwrap_or(rules::DEFAULT_EMBEDDED_DATA_DIR);
            let e = embedded::start(&name, dir, &config.identity.user, stop_embedded_rx.clone())
                .await
                .with_context(|| format!("starting embedded upstream {name:?}"))?;
            tracing::info!(upstream = %name, addr = %e.addr, data_dir = dir, "embedded grab backend started");
            embedded.push(e);
        }
    }
    let embedded_addrs: Vec<(String, SocketAddr)> =
        embedded.iter().map(|e| (e.name.clone(), e.addr)).collect();
    let lookup = |n: &str| embedded_addrs.iter().find(|(m, _)| m == n).map(|(_, a)| *a);
    let mut runtime = Runtime::build(snapshot, &lookup, None).map_err(anyhow::Error::msg)?;
    if let Some(redis) = &server_cfg.redis {
        let store = cluster::ClusterStore::connect(redis).context("server.redis")?;
        runtime.governors = govern::Governors::build_cluster(&runtime.snapshot, None, Some(store));
    }

    let metrics = Arc::new(Metrics::new());
    let gateway = Arc::new(Gateway::new(
        runtime,
        metrics.clone(),
        Settings {
            max_body_bytes: server_cfg.limits.max_body_bytes,
            access_log: server_cfg.access_log.enabled,
        },
    ));

    let limits = &server_cfg.limits;
    let conn_permits = Arc::new(Semaphore::new(limits.max_connections as usize));
    let shared = server::Shared {
        gateway: gateway.clone(),
        builder: Arc::new(server::builder(limits)),
        conn_permits: conn_permits.clone(),
        idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
        handshake_timeout: Duration::from_millis(limits.header_read_timeout_ms),
        shutdown: shutdown_rx.clone(),
    };

    let mut tasks = Vec::new();
    let mut listen_addrs = Vec::new();
    let mut cert_stores = Vec::new();
    for l in &server_cfg.listeners {
        let (listener, addr) = server::bind(&l.address).await?;
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
        tasks.push(tokio::spawn(server::accept_loop(
            listener,
            acceptor,
            shared.clone(),
            name,
        )));
    }

    let reloader = file.map(|(path, include, hash)| {
        Arc::new(reload::Reloader::new(
            path,
            include,
            hash,
            gateway.clone(),
            metrics.clone(),
            embedded_addrs.clone(),
            server_cfg.clone(),
            cert_stores.clone(),
        ))
    });
    if let Some(r) = &reloader {
        tasks.push(tokio::spawn(reload::watch(r.clone(), shutdown_rx.clone())));
    }

    gateway.runtime.load().governors.export_states(&metrics);
    tasks.push(tokio::spawn(govern::housekeep(
        gateway.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(overload::control(
        gateway.clone(),
        shutdown_rx.clone(),
    )));

    let stats = Arc::new(stats::Stats::new(gateway.clone(), reloader.clone()));
    tasks.push(tokio::spawn(stats::sample(
        stats.clone(),
        shutdown_rx.clone(),
    )));

    let (admin_listener, admin_addr) = server::bind(&server_cfg.admin.address).await?;
    let admin = Arc::new(AdminState {
        stats,
        metrics,
        ready: true.into(),
        gateway: gateway.clone(),
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
        gateway,
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

/// Resolve on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
