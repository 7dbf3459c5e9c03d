//! The tunnel phase: an HTTP/1.1 request that asks to switch protocols (WebSocket), from
//! the ask to the bytes copied both ways.
//!
//! The ask is noted by [`super::head`] before hop-by-hop removal; it is decided like any
//! request (classify, admission, limits, fallbacks, route, breaker). Only when the route
//! lists the protocol in its `upgrade` ([`Tunnels::approve`]) is it an upgrade: it takes a
//! place under `max_upgraded_connections` (none left: 503 `upgrade_capacity`, before the
//! upstream is asked), its `Connection: upgrade` and `Upgrade` are put back
//! ([`Approved::restore`]), and it goes to the upstream on a connection of its own. A 101
//! naming the same protocol opens the tunnel ([`Approved::open`]); any other answer passes
//! through as an ordinary response and frees the place. A 101 to a request that did not
//! ask for one, or for another protocol, is a bad gateway ([`refuse_unasked_switch`]):
//! switching the client's connection then would let an upstream (or a client that smuggled
//! an `Upgrade` past a route without the opt-in) turn it into something no rule governs.
//!
//! A tunnel is one task: it waits for both sides to hand over their connections, then
//! copies bytes both ways until either side closes, no byte moves either way for
//! `upgrade_idle_timeout_ms`, or the gateway shuts down; then both sides are closed.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rules::route::RouteDecision;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::decide::Action;
use super::head::UpgradeAsk;
use crate::conn::{Activity, Tracked};
use crate::metrics::{Metrics, Name, TunnelCloseLabels, UpgradeLabels};
use crate::respond::GatewayError;
use crate::upstream::UpstreamBody;

/// What every tunnel shares: the cap, the idle timeout and the stop signal.
#[derive(Debug)]
pub struct Tunnels {
    /// One permit per open tunnel (`max_upgraded_connections`); a tunnel's task holds its
    /// permit until both sides are closed.
    permits: Arc<Semaphore>,
    /// `upgrade_idle_timeout_ms`.
    idle: Duration,
    /// Flips to `true` on shutdown: every tunnel closes at once (an upgraded connection has
    /// no request boundary to finish at).
    shutdown: watch::Receiver<bool>,
}

/// An upgrade its route allows, holding its place under the cap until it is answered (and,
/// when it switches, for the tunnel's life).
#[derive(Debug)]
pub struct Approved {
    protocol: HeaderValue,
    route: Name,
    permit: OwnedSemaphorePermit,
    /// The client's side, handed over by hyper once the 101 has been written.
    downstream: OnUpgrade,
    /// The upstream's answer was judged (and counted) by [`Approved::check`]; one that
    /// never was came from the gateway after the approval (an overload cap, a cluster-scope
    /// limit).
    forwarded: bool,
}

/// Why a tunnel closed: the `reason` label of `tidegate_upgraded_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// A side ended its connection (the other was closed after what was in flight).
    Closed,
    /// A side failed (reset, a failed hand-over).
    Error,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// The gateway is shutting down.
    Shutdown,
}

// === impl Tunnels ===

impl Tunnels {
    /// At most `max` tunnels at once, each closed after `idle` without a byte moving.
    pub fn new(max: u32, idle: Duration, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max as usize)),
            idle,
            shutdown,
        }
    }

    /// The upgrade of a request that asked for one (with the client's side of its
    /// connection, as hyper offers it), when its route allows the protocol and
    /// the decision is to forward it: `None` when it is an ordinary request (its `Upgrade`
    /// stays removed), `Some(Err)` when no tunnel place is free (503, counted).
    pub fn approve(
        &self,
        (ask, downstream): (UpgradeAsk, OnUpgrade),
        route: Option<&RouteDecision<'_>>,
        action: &Action<'_>,
        metrics: &Metrics,
    ) -> Option<Result<Approved, GatewayError>> {
        let route = route.filter(|r| r.rule.allows_upgrade(ask.protocol.as_bytes()))?;
        if !matches!(action, Action::Forward { .. }) {
            return None;
        }
        let route = Name(Arc::clone(route.rule_name));
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            count(metrics, &route, "refused_capacity");
            return Some(Err(GatewayError::UpgradeCapacity));
        };
        Some(Ok(Approved {
            protocol: ask.protocol,
            route,
            permit,
            downstream,
            forwarded: false,
        }))
    }
}

// === impl Approved ===

impl Approved {
    /// Put back what hop-by-hop removal took: the upstream must see the ask.
    pub fn restore(&self, headers: &mut http::HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }

    /// The upstream's answer judged: a 101 must name the protocol asked for (and carry the
    /// connection's hand-over), else it is a bad gateway. Counts what is not a switch.
    pub fn check(
        &mut self,
        result: Result<(Response<UpstreamBody>, Duration), GatewayError>,
        metrics: &Metrics,
    ) -> Result<(Response<UpstreamBody>, Duration), GatewayError> {
        self.forwarded = true;
        let (resp, latency) = match result {
            Ok(r) => r,
            Err(e) => {
                count(metrics, &self.route, "failed");
                return Err(e);
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            count(metrics, &self.route, "declined");
            return Ok((resp, latency));
        }
        let mut named = resp.headers().get_all(header::UPGRADE).iter();
        let same = matches!(
            (named.next(), named.next()),
            (Some(p), None) if p.as_bytes().eq_ignore_ascii_case(self.protocol.as_bytes())
        );
        if !same || resp.extensions().get::<OnUpgrade>().is_none() {
            tracing::debug!(route = %self.route.0, "upstream switched to another protocol than asked");
            count(metrics, &self.route, "failed");
            return Err(GatewayError::UpstreamReset);
        }
        Ok((resp, latency))
    }

    /// The answer to send: a 101 (already [`check`](Self::check)ed) gets its `Connection`
    /// and `Upgrade` back and starts the tunnel's task; anything else is sent as it is (and
    /// the place under the cap is freed). Out of line: the task it spawns is built on the
    /// stack first, which the request path's frame should not reserve for every request.
    #[inline(never)]
    pub fn open(
        self,
        mut resp: Response<super::RespBody>,
        tunnels: &Tunnels,
        metrics: &Arc<Metrics>,
    ) -> Response<super::RespBody> {
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            if !self.forwarded {
                count(metrics, &self.route, "refused");
            }
            return resp;
        }
        let Some(upstream) = resp.extensions_mut().remove::<OnUpgrade>() else {
            // `check` saw it; nothing else takes it.
            return resp;
        };
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, self.protocol);
        count(metrics, &self.route, "switched");
        metrics.upgraded_connections.inc();
        let (idle, shutdown, metrics) = (tunnels.idle, tunnels.shutdown.clone(), metrics.clone());
        let (downstream, permit) = (self.downstream, self.permit);
        tokio::spawn(async move {
            let close = run(downstream, upstream, idle, shutdown).await;
            metrics.upgraded_connections.dec();
            metrics
                .upgraded_closed
                .get_or_create(&TunnelCloseLabels {
                    reason: close.label(),
                })
                .inc();
            drop(permit);
        });
        resp
    }
}

/// The answer to a request that is not an approved upgrade: a 101 is refused (502), since
/// nobody asked for the switch it announces. In place: the answer is not moved.
pub fn refuse_unasked_switch(
    result: &mut Result<(Response<UpstreamBody>, Duration), GatewayError>,
) {
    if let Ok((resp, _)) = result
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        tracing::debug!("upstream answered 101 to a request that did not ask to upgrade");
        *result = Err(GatewayError::UpstreamReset);
    }
}

/// The tunnel: both connections once handed over, bytes copied both ways until a side
/// closes, the idle timeout passes, or shutdown. Dropping both ends closes them.
async fn run(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Close {
    // The hand-over is bounded too: a client that never reads its 101 holds nothing long.
    let (down, up) =
        match tokio::time::timeout(idle, async { tokio::try_join!(downstream, upstream) }).await {
            Ok(Ok(both)) => both,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "tunnel hand-over failed");
                return Close::Error;
            }
            Err(_) => return Close::IdleTimeout,
        };
    // Reads and writes on the client's side are the tunnel's traffic both ways.
    let activity = Arc::new(Activity::new());
    let mut down = Tracked {
        io: TokioIo::new(down),
        activity: activity.clone(),
    };
    let mut up = TokioIo::new(up);
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    loop {
        let wait = idle.saturating_sub(activity.idle_for());
        tokio::select! {
            r = copy.as_mut() => return match r {
                Ok(_) => Close::Closed,
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel ended with an error");
                    Close::Error
                }
            },
            _ = tokio::time::sleep(wait) => {
                if activity.idle_for() >= idle {
                    return Close::IdleTimeout;
                }
            }
            _ = crate::shutdown::stopped(&mut shutdown) => return Close::Shutdown,
        }
    }
}

fn count(metrics: &Metrics, route: &Name, outcome: &'static str) {
    metrics
        .upgrades
        .get_or_create(&UpgradeLabels {
            route: route.clone(),
            outcome,
        })
        .inc();
}

// === impl Close ===

impl Close {
    fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Error => "error",
            Self::IdleTimeout => "idle_timeout",
            Self::Shutdown => "shutdown",
        }
    }
}
