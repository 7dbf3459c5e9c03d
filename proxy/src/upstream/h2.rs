//! HTTP/2 to an upstream endpoint: one multiplexed connection per endpoint, shared by every
//! request to it whatever downstream connection it came on, opened on first use and again
//! after it closes (the upstream's GOAWAY, an error, an idle close).
//!
//! Opening is serialized by an async lock, so a burst of requests to a cold endpoint makes
//! one connection, not one each; once open, taking a sender is a lock and a clone of a
//! channel handle.

use std::io;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::connect::Connector;
use super::{DirectError, UpBody};

/// Pings on an idle HTTP/2 connection this often, so a peer that vanished (no FIN, no RST)
/// is noticed and the connection replaced instead of requests hanging on it.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/2 connection of one endpoint.
#[derive(Debug, Default)]
pub(super) struct H2Conn {
    /// The sender of the open connection, if any. A tokio lock: it is held across the
    /// connect, which is what makes concurrent first requests share one connection.
    send: tokio::sync::Mutex<Option<SendRequest<UpBody>>>,
}

// === impl H2Conn ===

impl H2Conn {
    /// Send `req` on the endpoint's connection (endpoint `i` of `connector`), opening it
    /// when there is none or it has closed. A request the connection refused unsent (it
    /// was going away) is sent once more on a fresh one.
    pub(super) async fn send(
        &self,
        connector: &Connector,
        i: usize,
        mut req: Request<UpBody>,
    ) -> Result<Response<Incoming>, DirectError> {
        let mut fresh = false;
        loop {
            let mut send = self.sender(connector, i, fresh).await?;
            // Waits while the peer's stream limit is reached.
            send.ready().await.map_err(DirectError::Http)?;
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => {
                        req = r;
                        fresh = true;
                    }
                    _ => return Err(DirectError::Http(e.into_error())),
                },
            }
        }
    }

    /// A sender on the open connection, or on a new one (always, when `fresh`).
    async fn sender(
        &self,
        connector: &Connector,
        i: usize,
        fresh: bool,
    ) -> Result<SendRequest<UpBody>, DirectError> {
        let mut slot = self.send.lock().await;
        if !fresh && let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        *slot = None;
        let stream = connector
            .open(i, true)
            .await
            .map_err(DirectError::Connect)?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            // An idle connection is kept for the next request, so it is the one to check.
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| DirectError::Connect(io::Error::other(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        *slot = Some(send.clone());
        Ok(send)
    }
}
