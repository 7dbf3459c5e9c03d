//! The per-request path: classify → decide → act → record.
//!
//! One [`Gateway`] serves every listener. Each request loads the current [`Runtime`] once
//! (an arc-swap load, no lock), classifies and routes against it synchronously, clones the
//! `Arc` of the chosen upstream and drops the guard before the first `.await`, so a reload
//! never waits for, and never disturbs, requests in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use rules::overload::UserKey;
use rules::{MatchInput, RequestParts, RouteInput, Snapshot};

use crate::forward::{
    ConnCache, ConnInfo, Upstream, UpstreamBody, add_forwarded, keep_authority, strip_hop_by_hop,
};
use crate::govern::{Governors, Target, Verdict, finish_call};
use crate::metrics::{Metrics, Name, RequestLabels, UpstreamErrorLabels, status_class};
use crate::overload::{Admit, Overload};
use crate::respond::GatewayError;

/// The response body: the upstream's, streamed, or one the gateway made.
pub type RespBody = Either<UpstreamBody, Full<Bytes>>;

/// How a request was answered: by the gateway itself (a limit, fallback, open breaker or
/// overload refusal), or by an exchange with the upstream (or the error standing in for one:
/// no route, body too large, upstream failure).
enum Answer {
    Local(Response<Full<Bytes>>),
    Exchange(Result<(Response<UpstreamBody>, std::time::Duration), GatewayError>),
}

/// Everything a request needs from the current config, published as one unit.
#[derive(Debug)]
pub struct Runtime {
    /// The compiled rules.
    pub snapshot: Snapshot,
    /// Runtime upstreams, indexed like `snapshot.upstreams`.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Interface names as metric labels, indexed like `snapshot.interfaces`.
    pub interface_names: Vec<Name>,
    /// Limiter and breaker state (carried over a reload for unchanged rules).
    pub governors: Governors,
    /// Overload caps and admission level (carried over a reload when unchanged).
    pub overload: Overload,
    /// Live per-second counters for the dashboard (carried over a reload by name).
    pub stats: Arc<crate::stats::Counters>,
}

/// Settings of the request path that come from bootstrap config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest request body forwarded.
    pub max_body_bytes: u64,
    /// Write one access log line per request.
    pub access_log: bool,
}

/// The gateway service shared by all connections.
#[derive(Debug)]
pub struct Gateway {
    /// The live rules; replaced whole by a reload.
    pub runtime: ArcSwap<Runtime>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    settings: Settings,
    /// Request-ID generator: a per-process random prefix and a counter.
    id_prefix: u64,
    id_counter: AtomicU64,
    /// Counter behind [`Gateway::next_random`].
    rand_counter: AtomicU64,
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn none_label() -> Name {
    static NONE: std::sync::OnceLock<Name> = std::sync::OnceLock::new();
    NONE.get_or_init(|| Name("none".into())).clone()
}

// === impl Runtime ===

impl Runtime {
    /// Build the runtime for a compiled snapshot. `embedded` gives the address of each
    /// running embedded upstream by name.
    ///
    /// State worth keeping moves over from `previous` (the runtime being replaced by a
    /// reload): an upstream whose definition did not change keeps its client, so its pooled
    /// connections stay warm instead of every reload causing a reconnect storm.
    pub fn build(
        snapshot: Snapshot,
        embedded: &dyn Fn(&str) -> Option<std::net::SocketAddr>,
        previous: Option<&Runtime>,
    ) -> Result<Self, String> {
        let upstreams = snapshot
            .upstreams
            .iter()
            .map(|spec| {
                let addr = embedded(&spec.name);
                let kept = previous
                    .and_then(|p| p.upstreams.iter().find(|u| u.same_definition(spec, addr)));
                match kept {
                    Some(u) => Ok(u.clone()),
                    None => Upstream::build(spec, addr).map(Arc::new),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let interface_names = snapshot
            .interfaces
            .iter()
            .map(|i| Name(i.name.as_ref().into()))
            .collect();
        let governors = Governors::build(&snapshot, previous.map(|p| &p.governors));
        let overload = Overload::build(&snapshot, previous.map(|p| &p.overload));
        let stats = Arc::new(crate::stats::Counters::build(
            &snapshot,
            previous.map(|p| (&p.snapshot, &*p.stats)),
        ));
        Ok(Self {
            snapshot,
            upstreams,
            interface_names,
            governors,
            overload,
            stats,
        })
    }
}

// === impl Gateway ===

impl Gateway {
    /// A gateway serving `runtime`.
    pub fn new(runtime: Runtime, metrics: Arc<Metrics>, settings: Settings) -> Self {
        let id_prefix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            settings,
            id_prefix,
            id_counter: AtomicU64::new(0),
            rand_counter: AtomicU64::new(0),
        }
    }

    /// Serve one request. `cache` is the downstream connection's own upstream connections
    /// (HTTP/1.x connections, one request at a time); without it the shared pool is used.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        cache: Option<&Arc<ConnCache>>,
    ) -> Response<RespBody> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        // Room for what the gateway adds (request ID, X-Forwarded-For/-Proto, Host): one
        // growth of the map, if any, instead of one per insert.
        parts.headers.reserve(4);

        let request_id = match parts.headers.get(&X_REQUEST_ID) {
            Some(v) if !v.is_empty() && v.len() <= 128 => v.clone(),
            _ => {
                let v = self.next_request_id();
                parts.headers.insert(&X_REQUEST_ID, v.clone());
                v
            }
        };

        // Decide, synchronously, on one snapshot; keep only Arcs past this block.
        let decision = {
            let rt = self.runtime.load();
            let c = rt.snapshot.classify(RequestParts {
                method: &parts.method,
                path: parts.uri.path(),
                query: parts.uri.query(),
                headers: &parts.headers,
            });
            let input = RouteInput {
                m: MatchInput {
                    app: c.app.as_deref(),
                    interface: c.interface,
                    user: c.user.as_deref(),
                    headers: &parts.headers,
                },
                client_ip: Some(conn.remote.ip()),
                random: self.next_random(),
            };
            // Overload admission first: a request below the admission level spends no
            // limit quota, is not routed, and its body is never read.
            let user_key = match c.user.as_deref() {
                Some(u) => UserKey::User(u),
                None => UserKey::Ip(conn.remote.ip()),
            };
            let admit =
                rt.overload
                    .admit(c.interface, user_key, &rt.interface_names, &self.metrics);
            // Then limits and fallbacks: a refused or degraded request is answered here
            // and never reaches routing, let alone the upstream.
            let gov = &rt.governors;
            // Cluster-scope limits that need Redis are set aside and checked below, off
            // the snapshot guard.
            let mut cluster = None;
            let (route, target) = match admit {
                Admit::Reject(resp) => (None, Some(Target::Local(resp))),
                Admit::Pass => match gov.before_route_cluster(
                    &rt.snapshot,
                    &input,
                    &self.metrics,
                    &mut cluster,
                ) {
                    Verdict::Local(resp) => (None, Some(Target::Local(resp))),
                    Verdict::Proceed => {
                        let route = rt.snapshot.route(&input);
                        let target = route
                            .map(|r| gov.target(&rt.snapshot, &r, &rt.upstreams, &self.metrics));
                        (route, target)
                    }
                },
            };
            // The overload slots a forwarded request must take (as Arcs, taken below).
            let pending = match &target {
                Some(Target::Forward(up, _)) => rt.overload.pending(
                    c.interface,
                    up,
                    &rt.upstreams,
                    &rt.interface_names,
                    &self.metrics,
                ),
                _ => None,
            };
            let forwarded = match &target {
                Some(Target::Forward(up, _)) => Some(up),
                _ => None,
            };
            let tally = rt
                .stats
                .tally(c.interface, route.as_ref(), forwarded, &rt.upstreams);
            let iface = c
                .interface
                .map(|i| rt.interface_names[i.0 as usize].clone());
            let who = self.settings.access_log.then(|| {
                (
                    c.app.as_deref().map(str::to_owned),
                    c.user.as_deref().map(str::to_owned),
                    route.map(|r| r.rule.name.to_string()),
                )
            });
            (iface, target, who, pending, tally, cluster)
        };
        let (iface, target, who, pending, tally, cluster) = decision;
        let (mut upstream, permit, mut local) = match target {
            Some(Target::Forward(up, permit)) => (Some(up), permit, None),
            Some(Target::Local(resp)) => (None, None, Some(resp)),
            None => (None, None, None),
        };
        // Cluster-scope limits that needed Redis (bounded by the store timeout): a refusal
        // (429, or 503 when a fail-closed rule's store is down) is a local answer.
        if let Some(c) = cluster {
            if let Some(resp) = c.resolve(&self.metrics).await {
                local = Some(resp);
                upstream = None;
            }
        }

        let declared_len = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = declared_len.is_some_and(|n| n > self.settings.max_body_bytes);

        // Overload slots, just before forwarding (a body too large, or a request a cluster
        // limit refused, is answered without one). A refusal is answered like any local
        // answer: the upstream is never touched.
        let mut held = None;
        if let (Some(p), false, None) = (pending, too_large, &local) {
            match p.acquire().await {
                Ok(h) => held = Some(h),
                Err(resp) => {
                    local = Some(resp);
                    upstream = None;
                }
            }
        }

        // A local answer (429, fallback, open breaker) is final; otherwise forward.
        let answer = match (local, &upstream) {
            (Some(resp), _) => Answer::Local(resp),
            (None, _) if too_large => Answer::Exchange(Err(GatewayError::BodyTooLarge)),
            (None, None) => Answer::Exchange(Err(GatewayError::NoRoute)),
            (None, Some(up)) => {
                strip_hop_by_hop(&mut parts.headers);
                keep_authority(&mut parts);
                add_forwarded(&mut parts.headers, conn);
                Answer::Exchange(
                    up.forward(parts, body, self.settings.max_body_bytes, cache)
                        .await,
                )
            }
        };

        if let Answer::Exchange(outcome) = &answer {
            if let Some(h) = held {
                h.finish(outcome.as_ref().ok().map(|(_, latency)| *latency));
            }
            if permit.is_some() {
                let (judged, latency) = match outcome {
                    Ok((resp, latency)) => (Ok(resp.status()), *latency),
                    Err(e) => (Err(*e), started.elapsed()),
                };
                finish_call(&self.metrics, permit, judged, latency);
            }
        }
        // Otherwise the overload slots and the breaker permit (a probe slot) are given back
        // unjudged as they drop: the upstream was never asked.

        let upstream_label = upstream.as_ref().map(|u| u.name.clone());
        let mut resp = match answer {
            Answer::Local(resp) => resp.map(Either::Right),
            Answer::Exchange(Ok((resp, latency))) => {
                if let Some(u) = &upstream {
                    u.latency_histogram(&self.metrics)
                        .observe(latency.as_secs_f64());
                }
                let (mut rp, rb) = resp.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                Response::from_parts(rp, Either::Left(rb))
            }
            Answer::Exchange(Err(e)) => {
                if let (
                    Some(u),
                    GatewayError::UpstreamTimeout
                    | GatewayError::UpstreamUnavailable
                    | GatewayError::UpstreamReset,
                ) = (&upstream_label, e)
                {
                    self.metrics
                        .upstream_errors
                        .get_or_create(&UpstreamErrorLabels {
                            upstream: u.clone(),
                            error: e.code(),
                        })
                        .inc();
                }
                e.response().map(Either::Right)
            }
        };
        resp.headers_mut().insert(&X_REQUEST_ID, request_id.clone());

        let status = resp.status();
        tally.record(&resp, started.elapsed());
        tally.count_request(&self.metrics, upstream.is_some(), status, || {
            RequestLabels {
                interface: iface.clone().unwrap_or_else(none_label),
                upstream: upstream_label.clone().unwrap_or_else(none_label),
                status: status_class(status),
            }
        });

        if let Some((app, user, route)) = who {
            tracing::info!(
                target: "tidegate::access",
                request_id = request_id.to_str().unwrap_or("-"),
                client = %conn.remote,
                app = app.as_deref().unwrap_or("none"),
                interface = iface.as_ref().map(|n| &*n.0).unwrap_or("none"),
                user = user.as_deref().unwrap_or("none"),
                route = route.as_deref().unwrap_or("none"),
                upstream = upstream_label.as_ref().map(|n| &*n.0).unwrap_or("none"),
                status = status.as_u16(),
                duration_us = started.elapsed().as_micros() as u64,
                "request"
            );
        }
        resp
    }

    /// A uniformly distributed number for decisions that need a random draw (splitmix64 over
    /// a counter: cheap, lock-free, and plenty for spreading requests over buckets).
    fn next_random(&self) -> u64 {
        let mut z = self
            .rand_counter
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(self.id_prefix)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_request_id(&self) -> HeaderValue {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 33];
        HeaderValue::from_bytes(format_hex(self.id_prefix, n, &mut buf))
            .expect("hex is a valid header value")
    }
}

/// `{prefix:016x}-{n:016x}` into `buf`, without allocating.
fn format_hex(prefix: u64, n: u64, buf: &mut [u8; 33]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in buf[..16].iter_mut().enumerate() {
        *b = HEX[((prefix >> (60 - 4 * i)) & 0xf) as usize];
    }
    buf[16] = b'-';
    for (i, b) in buf[17..].iter_mut().enumerate() {
        *b = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request IDs are fixed-width hex and distinct.
    #[test]
    fn request_id_format() {
        let mut a = [0u8; 33];
        assert_eq!(
            format_hex(0xabc, 1, &mut a),
            b"0000000000000abc-0000000000000001"
        );
    }
}
