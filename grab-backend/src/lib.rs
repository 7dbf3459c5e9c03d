//! Grab backend: the bundled red-envelope service (contract stub; the real
//! store lands behind this API).

use std::future::Future;
use std::path::PathBuf;

/// How the write-ahead log reaches the disk before an acknowledgement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncMode {
    /// Acknowledge only after the record is fsynced (group commit). Default.
    #[default]
    Always,
    /// Acknowledge after `write(2)`; fsync on a short timer.
    Batch,
    /// Acknowledge after `write(2)`; never fsync on the request path.
    Never,
}

/// Request validation limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest number of shares in one envelope. Default 10,000.
    pub max_count: u32,
    /// Largest envelope total, in cents. Default 20,000,000.
    pub max_total_cents: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_count: 10_000,
            max_total_cents: 20_000_000,
        }
    }
}

/// Bootstrap configuration of the grab backend.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory holding the log segments and the snapshot. Default `data/grab`.
    pub data_dir: PathBuf,
    /// Durability mode of acknowledgements. Default [`FsyncMode::Always`].
    pub fsync: FsyncMode,
    /// Header carrying the user id of a grab. Default `x-user-id`.
    pub user_header: String,
    /// Request validation limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data/grab"),
            fsync: FsyncMode::Always,
            user_header: "x-user-id".to_owned(),
            limits: Limits::default(),
        }
    }
}

/// Serve the grab API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
