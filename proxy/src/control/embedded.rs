//! The embedded default upstream: the bundled grab backend, run inside the gateway process
//! on a loopback port chosen at start-up, so the default config needs nothing else running.

use std::net::SocketAddr;
use std::path::PathBuf;

use rules::model::{Extractor, Identity};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running embedded backend.
#[derive(Debug)]
pub struct Embedded {
    /// Upstream name it serves.
    pub name: String,
    /// Where it listens (127.0.0.1, a free port).
    pub addr: SocketAddr,
    /// Its task; ends after its shutdown signal.
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Start the grab backend for upstream `name`: recover its store (failing if recovery
/// refuses, e.g. on a corrupt log) and serve it in a task. It stops when `stop` flips to `true`, which
/// the gateway does only after its own connections have drained.
pub async fn start(
    name: &str,
    data_dir: &str,
    identity: &Identity,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Embedded> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut config = grab_backend::Config {
        data_dir: PathBuf::from(data_dir),
        ..grab_backend::Config::default()
    };
    // The backend reads the user from the same header the gateway classifies by.
    // With verified identity, the header the gateway writes the verified user into.
    let header = match (&identity.user, &identity.jwt) {
        (Extractor::Header(h), _) => Some(h),
        (Extractor::Claim(_), Some(jwt)) => Some(&jwt.user_header),
        _ => None,
    };
    if let Some(h) = header {
        config.user_header = h.to_ascii_lowercase();
    }
    let mut stop = stop;
    // Recovery runs here, so a backend that refuses to start (a corrupt log)
    // fails the gateway's start instead of leaving it serving 502s.
    let serving = grab_backend::start(listener, config, async move {
        crate::shutdown::stopped(&mut stop).await;
    })
    .await?;
    let task = tokio::spawn(serving);
    Ok(Embedded {
        name: name.to_owned(),
        addr,
        task,
    })
}
