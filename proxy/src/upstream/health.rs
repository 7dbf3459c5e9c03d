//! Endpoint health: which endpoints of an upstream take requests.
//!
//! Three mechanisms feed one cheap check on the request path ([`EndpointHealth::usable`]:
//! relaxed atomic loads, no lock, no allocation):
//!
//! - **Passive outlier ejection** ([`Outlier`]): exchanges that fail for the upstream's
//!   fault (connect failures, resets, timeouts; never an answer, whatever its status, and
//!   never a client's own body error) are counted per endpoint; `consecutive_failures` in a
//!   row eject it for a backoff that doubles per repeated ejection up to `max_ejection`,
//!   never more than `max_ejected_percent` of the upstream's endpoints at once.
//! - **Active checks** ([`check_loop`]): a background task per upstream probes each
//!   endpoint with a `GET` on a fresh connection every interval; thresholds of passed and
//!   failed checks in a row move its verdict. An endpoint that comes back by its checks
//!   also has a passive ejection ended: it demonstrably answers again.
//! - **Re-resolution** ([`resolve_loop`]): host names are resolved again every
//!   `resolve_ttl`; a failed resolution keeps the last good address.
//!
//! The state of an endpoint is an [`EndpointHealth`] shared by every runtime whose upstream
//! of that name lists that endpoint (as configured): a reload that keeps the endpoint keeps
//! its ejection, backoff and check verdict, as limiter and breaker state are kept. The
//! background tasks hold a `Weak` of their upstream and are aborted when it is dropped, so
//! an upstream that leaves the config (or is rebuilt by an edit) stops its own tasks.

use std::net::SocketAddr;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, header};
use rules::snapshot::{HealthCheckSpec, OutlierSpec};

use super::{Endpoint, Resolved, Upstream, h1};

/// The health of one endpoint: shared over reloads that keep it.
#[derive(Debug)]
pub struct EndpointHealth {
    /// Exchanges failed in a row since its last success.
    failures: AtomicU32,
    /// Until when it is ejected, in [`now_ms`] time; 0: never ejected.
    ejected_until: AtomicU64,
    /// Ejections in a row: the backoff's exponent.
    ejections: AtomicU32,
    /// [`Reason`] of the last ejection.
    reason: AtomicU8,
    /// The active checks' verdict (true without checks, and until they decide otherwise).
    checked_healthy: AtomicBool,
}

/// Why an endpoint left the rotation: the `reason` label of
/// `tidegate_endpoint_ejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Passive: `consecutive_failures` failed exchanges in a row.
    ConsecutiveFailures = 0,
    /// Active: `unhealthy_threshold` failed checks in a row.
    HealthCheck = 1,
}

/// Passive outlier ejection of one upstream.
#[derive(Debug)]
pub struct Outlier {
    spec: OutlierSpec,
    /// Held only to decide an ejection (rare), so that two failures at once cannot both
    /// pass the cap; the request path never takes it.
    deciding: Mutex<()>,
}

/// What status.json and the dashboard show of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// `healthy`, `ejected` or `unhealthy` (failing its active checks).
    pub state: &'static str,
    /// While ejected: how much longer, in milliseconds.
    pub ejected_for_ms: Option<u64>,
    /// While out of rotation: why (`consecutive_failures` or `health_check`).
    pub reason: Option<&'static str>,
    /// Exchanges failed in a row.
    pub consecutive_failures: u32,
}

// === impl Reason ===

impl Reason {
    /// Every reason, indexed by its value.
    pub const ALL: [Self; 2] = [Self::ConsecutiveFailures, Self::HealthCheck];

    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ConsecutiveFailures => "consecutive_failures",
            Self::HealthCheck => "health_check",
        }
    }
}

// === impl EndpointHealth ===

impl Default for EndpointHealth {
    fn default() -> Self {
        Self {
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            reason: AtomicU8::new(Reason::ConsecutiveFailures as u8),
            checked_healthy: AtomicBool::new(true),
        }
    }
}

impl EndpointHealth {
    /// Whether it takes requests at `now` (given lazily: the clock is read only while the
    /// endpoint has been ejected at some time).
    #[inline]
    pub fn usable(&self, now: &mut impl FnMut() -> u64) -> bool {
        if !self.checked_healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || until <= now()
    }

    /// Whether it is ejected at `now`.
    fn ejected_at(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// How bad it is, for choosing among endpoints that are all out: failing its checks
    /// is worse than ejected, a longer ejection worse than a shorter one.
    pub fn badness(&self, now: u64) -> (bool, u64, u32) {
        (
            !self.checked_healthy.load(Ordering::Relaxed),
            self.ejected_until
                .load(Ordering::Relaxed)
                .saturating_sub(now),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// An exchange got its response head: the run of failures ends.
    #[inline]
    pub fn succeeded(&self) {
        // Read first: most exchanges succeed, and a store on every one would bounce the
        // cache line between cores.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// The active checks' verdict is `healthy`. Coming back (failing, now passing) also ends
    /// a passive ejection: the endpoint demonstrably answers again. A passing verdict that
    /// changes nothing leaves an ejection alone, since the requests that caused it know
    /// more of the endpoint than its health path does. Returns whether the verdict changed.
    pub fn set_checked(&self, healthy: bool) -> bool {
        let was = self.checked_healthy.swap(healthy, Ordering::Relaxed);
        if healthy && !was {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
        } else if !healthy && was {
            self.reason
                .store(Reason::HealthCheck as u8, Ordering::Relaxed);
        }
        was != healthy
    }

    /// Taken over by a rebuilt upstream: a verdict of checks it no longer runs, and an
    /// ejection it no longer does, are dropped (nothing would ever end them otherwise, and
    /// turning a mechanism off is how an operator gets an endpoint back).
    pub fn adopt(&self, checks: bool, outlier: bool) {
        if !checks {
            self.checked_healthy.store(true, Ordering::Relaxed);
        }
        if !outlier {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Forget everything: the name now resolves to another host.
    pub fn reset(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.ejected_until.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        self.checked_healthy.store(true, Ordering::Relaxed);
    }

    /// Its state at `now`, for status.json.
    pub fn snapshot(&self, now: u64) -> Snapshot {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let consecutive_failures = self.failures.load(Ordering::Relaxed);
        if !self.checked_healthy.load(Ordering::Relaxed) {
            return Snapshot {
                state: "unhealthy",
                ejected_for_ms: None,
                reason: Some(Reason::HealthCheck.label()),
                consecutive_failures,
            };
        }
        if until > now {
            let reason = Reason::ALL[usize::from(self.reason.load(Ordering::Relaxed)) & 1];
            return Snapshot {
                state: "ejected",
                ejected_for_ms: Some(until - now),
                reason: Some(reason.label()),
                consecutive_failures,
            };
        }
        Snapshot {
            state: "healthy",
            ejected_for_ms: None,
            reason: None,
            consecutive_failures,
        }
    }
}

// === impl Outlier ===

impl Outlier {
    /// Ejection as `spec` says.
    pub fn new(spec: OutlierSpec) -> Self {
        Self {
            spec,
            deciding: Mutex::new(()),
        }
    }

    /// Count a failed exchange of `ep`, one of `all` (the upstream's endpoints, `ep`
    /// among them), at `now`. Ejects it when this makes `consecutive_failures` in a row and
    /// the cap allows; returns the ejection's length then.
    ///
    /// The backoff doubles with each ejection that follows the previous one's end within
    /// `max_ejection` (a quiet spell that long starts it again from `base_ejection`).
    /// Refused by the cap, the endpoint stays in with its count, and its next failure
    /// tries again (by then another ejection may have ended).
    pub fn failed<'a>(
        &self,
        ep: &EndpointHealth,
        all: impl Iterator<Item = &'a EndpointHealth>,
        now: u64,
    ) -> Option<Duration> {
        let failures = ep
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < self.spec.consecutive_failures {
            return None;
        }
        let _deciding = self.deciding.lock().unwrap_or_else(|p| p.into_inner());
        let until = ep.ejected_until.load(Ordering::Relaxed);
        if until > now {
            return None; // already out (a request picked before it was ejected)
        }
        let (mut n, mut out) = (0usize, 0usize);
        for e in all {
            n += 1;
            out += usize::from(e.ejected_at(now));
        }
        if out >= max_ejected(n, self.spec.max_ejected_percent) {
            return None;
        }
        let max_ms = self.spec.max_ejection.as_millis() as u64;
        let in_a_row = if until != 0 && now.saturating_sub(until) <= max_ms {
            ep.ejections.load(Ordering::Relaxed)
        } else {
            0
        };
        let length = ejection_length(in_a_row, self.spec.base_ejection, self.spec.max_ejection);
        ep.ejected_until
            .store(now + length.as_millis() as u64, Ordering::Relaxed);
        ep.ejections.store(in_a_row + 1, Ordering::Relaxed);
        ep.reason
            .store(Reason::ConsecutiveFailures as u8, Ordering::Relaxed);
        ep.failures.store(0, Ordering::Relaxed);
        Some(length)
    }
}

/// The length of an ejection after `in_a_row` earlier ones: `base` doubled that many
/// times, at most `max`.
pub fn ejection_length(in_a_row: u32, base: Duration, max: Duration) -> Duration {
    base.saturating_mul(1u32 << in_a_row.min(31)).min(max)
}

/// Most endpoints of `n` that may be ejected at once under `percent`: rounded down, but
/// one when there are two or more (a share of a small upstream would otherwise never allow
/// any), and none of a single endpoint (there would be nowhere else to go).
pub fn max_ejected(n: usize, percent: u32) -> usize {
    if n < 2 || percent == 0 {
        return 0;
    }
    (n * percent as usize / 100).max(1)
}

/// Milliseconds on the gateway's monotonic health clock; never 0 (0 means "never").
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

// === background tasks ===

/// Probe every endpoint of the upstream every `spec.interval` until it is dropped, and
/// move each endpoint's verdict by the thresholds. Off the request path.
pub(super) async fn check_loop(up: Weak<Upstream>, spec: HealthCheckSpec) {
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Per endpoint: checks passed and failed in a row.
    let mut runs: Vec<(u32, u32)> = Vec::new();
    loop {
        tick.tick().await;
        let Some(up) = up.upgrade() else { return };
        runs.resize(up.endpoints.len(), (0, 0));
        let probes = up.endpoints.iter().map(|ep| {
            let resolved = ep.resolved.load_full();
            probe(resolved, &ep.name.0, &spec)
        });
        let results = futures_util::future::join_all(probes).await;
        for (i, passed) in results.into_iter().enumerate() {
            let (ok, bad) = &mut runs[i];
            if passed {
                (*ok, *bad) = (ok.saturating_add(1), 0);
            } else {
                (*ok, *bad) = (0, bad.saturating_add(1));
            }
            let ep = &up.endpoints[i];
            if *ok >= spec.healthy_threshold && ep.health.set_checked(true) {
                tracing::info!(upstream = %up.name.0, endpoint = %ep.name.0, "endpoint passes its health checks: back in rotation");
            }
            if *bad >= spec.unhealthy_threshold && ep.health.set_checked(false) {
                ep.ejected(Reason::HealthCheck);
                tracing::warn!(upstream = %up.name.0, endpoint = %ep.name.0, failed = *bad, "endpoint fails its health checks: out of rotation");
            }
            ep.export(now_ms());
        }
    }
}

/// One check: a `GET` of the path on a fresh connection, within the timeout, whose status
/// is in the expected range.
async fn probe(to: std::sync::Arc<Resolved>, configured: &str, spec: &HealthCheckSpec) -> bool {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(to.addr).await.ok()?;
        let _ = tcp.set_nodelay(true);
        let mut headers = HeaderMap::with_capacity(3);
        let host = match &spec.host {
            Some(h) => HeaderValue::from_str(h).ok()?,
            None => HeaderValue::from_str(configured).ok()?,
        };
        headers.insert(header::HOST, host);
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("tidegate-health"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let encode = |head: &mut Vec<u8>| {
            h1::encode_head(
                &Method::GET,
                &spec.path,
                &headers,
                &Default::default(),
                head,
            );
        };
        let mut conn = h1::Conn::new(tcp);
        let deadline = tokio::time::Instant::now() + spec.timeout;
        let h = conn.exchange(&Method::GET, deadline, encode).await.ok()?;
        Some(h.parts.status.as_u16())
    };
    match tokio::time::timeout(spec.timeout, exchange).await {
        Ok(Some(status)) => (spec.expected_status.0..=spec.expected_status.1).contains(&status),
        _ => false,
    }
}

/// Resolve the upstream's host-name endpoints again every `ttl` until it is dropped. A
/// failed resolution keeps the last good address (and is logged); a changed one replaces
/// it, and the endpoint's health starts afresh (it is another host now).
pub(super) async fn resolve_loop(up: Weak<Upstream>, ttl: Duration) {
    let mut tick = tokio::time::interval(ttl);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // resolved at load time
    loop {
        tick.tick().await;
        let Some(up) = up.upgrade() else { return };
        for ep in up.endpoints.iter().filter(|e| e.is_host_name) {
            apply_resolution(&up, ep, resolve(&ep.name.0).await);
        }
    }
}

/// Take a new resolution of `ep`: a changed address replaces the old one whole, and the
/// endpoint's health starts afresh (it is another host now); a failure keeps the last good
/// address. Returns whether the address changed.
fn apply_resolution(up: &Upstream, ep: &Endpoint, resolved: Result<SocketAddr, String>) -> bool {
    match resolved {
        Ok(addr) if addr != ep.address() => {
            tracing::info!(upstream = %up.name.0, endpoint = %ep.name.0, %addr, "endpoint resolves to a new address");
            ep.resolved.store(std::sync::Arc::new(Resolved::new(addr)));
            ep.health.reset();
            ep.export(now_ms());
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(upstream = %up.name.0, endpoint = %ep.name.0, error = %e, "resolving the endpoint failed; keeping its last address");
            false
        }
    }
}

/// Resolve `host:port` to its first address, off the request path.
async fn resolve(endpoint: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(endpoint)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "no address".to_owned())
}

#[cfg(test)]
mod tests;
