//! The stop signal every task watches.
//!
//! Shutdown flows through one `watch` channel owned by [`crate::Server`]: accept loops,
//! connections, the reloader and the background controllers each hold a receiver and stop
//! when it reads `true`. A leaf: it depends on nothing else in the crate.

use tokio::sync::watch;

/// Resolve once `rx` reads `true` (or its sender is gone). Inlined: connection loops poll it
/// beside every request.
#[inline]
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here, inside.
    let _ = rx.wait_for(|s| *s).await;
}

/// Resolve on SIGTERM or SIGINT.
pub async fn signal() {
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
