//! Grab backend: the bundled red-envelope service Tidegate protects.
//!
//! Senders create envelopes (`POST /envelopes`); users grab shares
//! (`POST /envelopes/{id}/grab`, user from a header) split by the
//! double-mean rule; wallets are credited asynchronously by a settlement
//! worker that reads the log. A create or grab is acknowledged only once it
//! is in the write-ahead log on disk (group commit), and recovery after
//! `kill -9` restores every acknowledged grab. See `docs/grab-backend.md`.
//!
//! Run it with [`serve`], or [`start`] to see a refusal to start (a corrupt
//! log) before serving (the standalone binary and the gateway's embedded
//! upstream do), or build the router over any [`Store`] with [`router`].
//!
//! # Layout
//! - [`config`]: bootstrap settings ([`Config`], [`FsyncMode`], [`Limits`]).
//! - [`split`]: the double-mean share draw (pure).
//! - `model`: ids, log records, envelope state and the settled ledger.
//! - `wal`: log framing, the group-commit writer, segment scanning.
//! - `snapshot`: atomic snapshots of the ledger; log truncation.
//! - [`recovery`]: snapshot + log replay, torn tail vs corruption, `recover`.
//! - `ids`: the durable envelope id high-water mark.
//! - `settle`: the settlement worker (wallet credits, snapshots).
//! - [`store`]: the [`Store`] trait and the types crossing it.
//! - `embedded`: [`EmbeddedStore`], the single-node implementation.
//! - `redis_store`: [`RedisStore`], the multi-node implementation (Lua scripts on Redis).
//! - `http`: the axum routes over a [`Store`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;

pub mod config;
mod embedded;
mod http;
mod ids;
mod model;
pub mod recovery;
mod redis_store;
mod settle;
mod snapshot;
pub mod split;
pub mod store;
mod wal;

pub use config::{Config, FsyncMode, Limits, RedisStoreConfig, StoreKind};
pub use embedded::EmbeddedStore;
pub use http::router;
pub use model::{Credit, CreditKind, EnvelopeId, EnvelopeState};
pub use redis_store::RedisStore;
pub use store::{
    CreateError, CreateRequest, Created, EnvelopePage, EnvelopeSummary, GrabError, GrabReceipt,
    GrabView, Health, IdempotencyKey, InvalidRequest, NewEnvelope, Store, StoreError, Totals,
    WalletView,
};

/// Serving the grab API, as returned by [`start`]; resolves after shutdown.
pub type Serving = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Serve the grab API on `listener` until `shutdown` resolves: [`start`],
/// then the serving future it returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    start(listener, config, shutdown).await?.await
}

/// Open the store, then return the future that serves the grab API on
/// `listener` until `shutdown` resolves. Everything that can stop the
/// backend from starting (recovery refusing a corrupt log, Redis not
/// answering) fails here, before anything is served.
///
/// With the embedded store (the default) it opens and recovers the store in
/// `config.data_dir` (creating it; see [`recovery`] for what it refuses),
/// starts the log writer, the settlement worker and the expiry sweeper, and
/// serves HTTP/1.1 and h2c. When `shutdown` resolves it stops accepting, lets
/// in-flight requests finish, commits the log, lets settlement catch up and
/// writes a final snapshot before the serving future resolves. With the Redis
/// store it connects to Redis instead (failing if it cannot), and starts the
/// Redis settler and the sweeper.
pub async fn start(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Serving> {
    match &config.store {
        StoreKind::Embedded => {
            let open_config = config.clone();
            let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&open_config))
                .await
                .context("store recovery panicked")??;
            let store = Arc::new(store);
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, data_dir = %config.data_dir.display(), fsync = %config.fsync, "grab backend serving");
            }
            Ok(Box::pin(async move {
                let served = serve_store(listener, store.clone(), &config, shutdown).await;
                tokio::task::spawn_blocking(move || store.close())
                    .await
                    .context("store close panicked")?;
                served
            }))
        }
        StoreKind::Redis(redis) => {
            let store = Arc::new(
                RedisStore::open(redis, config.wallet_recent_credits)
                    .await
                    .with_context(|| format!("opening the Redis store at {}", redis.url))?
                    .idempotency_ttl(config.idempotency_ttl),
            );
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, redis = %redis.url, "grab backend serving (redis store)");
            }
            Ok(Box::pin(async move {
                let served = serve_store(listener, store.clone(), &config, shutdown).await;
                store.close().await;
                served
            }))
        }
    }
}

/// Serve `store` until `shutdown`, with the periodic expiry sweep.
async fn serve_store<S: Store>(
    listener: tokio::net::TcpListener,
    store: Arc<S>,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = router(store.clone(), config)?;
    let sweeper = {
        let every = config.expiry_sweep_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = store.refund_expired().await {
                    tracing::warn!(error = %e, "expiry sweep failed");
                }
            }
        })
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    sweeper.abort();
    let _ = sweeper.await;
    served.context("serving grab API")?;
    Ok(())
}
