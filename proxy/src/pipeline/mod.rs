//! The request path, as phases: **head → identity → decide → cluster limits → overload
//! slots → paced turn → cache → forward → record**.
//!
//! One [`Gateway`] serves every listener. Each request loads the live [`Runtime`] once (an
//! arc-swap load, no lock) and is served against that one version from start to end, so a
//! reload never waits for, and never disturbs, requests in flight.
//!
//! - [`head`]: one `Host`, no `Connection` naming `Host` or an identity header, hop-by-hop
//!   headers removed, so every later phase sees what the upstream will (400 otherwise).
//! - [`identity`]: with `identity.jwt`, the token verified and the identity headers set
//!   from its claims, client-sent copies dropped (401 when a valid token is required).
//! - [`decide`]: everything decided before any I/O (classify, admission, limits, fallback,
//!   route, breaker), synchronous; the benchmarks and `explain` run the same function.
//! - cluster limits: checks of cluster-scope limits that need Redis (bounded by the store
//!   timeout), only for keys without a leased token.
//! - overload slots: the concurrency caps' slots, queueing by business priority.
//! - paced turn: a request over the rate of a limit with `max_delay_ms` sleeps until the
//!   turn `decide` reserved for it, holding its slots (so waiters count against the caps).
//! - cache: on an interface with `cache`, a `GET`/`HEAD` answered from a kept answer or
//!   another request's upstream call, or led to the upstream to fill it (`crate::cache`).
//! - forward: header hygiene, then the upstream exchange (`crate::upstream`).
//! - [`tunnel`]: for an HTTP/1.1 upgrade its route allows, a place under the tunnel cap
//!   before the waits, the `Upgrade` put back for the upstream, and on a 101 the bytes
//!   copied both ways; a 101 nobody asked for is refused (502).
//! - [`record`]: metrics, the dashboard's counters and the access log, and the response.

pub mod decide;
#[doc(hidden)]
pub mod fuzz;
pub mod head;
pub mod identity;
pub mod record;
pub mod tunnel;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::Full;
use hyper::body::Body as _;
use hyper::upgrade::OnUpgrade;
use rules::{InterfaceId, RequestParts, UpstreamId};

use self::decide::{Action, Mode, decide};
use self::record::{Answer, Ids, Record, Recorder};
pub use self::record::{RespBody, X_REQUEST_ID, take_raw};
use crate::cache::{self, Lookup, ResponseCache};
use crate::clock::Stamp;
use crate::conn::ConnInfo;
use crate::govern::breaker::Permit;
use crate::govern::limit::Pace;
use crate::govern::{ClusterPending, finish_call};
use crate::overload::Held;
use crate::respond::GatewayError;
use crate::runtime::{Live, Runtime};
use crate::stats::Class;
use crate::trace::export::Exporter;
use crate::trace::{Sampler, TraceContext};
use crate::upstream::grpc::is_grpc;
use crate::upstream::headers::{Forwarding, Outgoing, forwarding, keep_authority};
use crate::upstream::{ConnCache, ReqBody, UpstreamBody};

/// Settings of the request path that come from bootstrap config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest request body forwarded.
    pub max_body_bytes: u64,
    /// Write one access log line per request.
    pub access_log: bool,
    /// Most upgraded connections open at once (`max_upgraded_connections`).
    pub max_upgraded_connections: u32,
    /// A tunnel without a byte moving for this long is closed (`upgrade_idle_timeout_ms`).
    pub upgrade_idle_timeout: Duration,
    /// The stop signal: tunnels close when it flips.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Trace context propagation (`server.tracing`), when `propagate` is on.
    pub trace: Option<Sampler>,
    /// The OTLP span exporter, when `server.tracing.otlp_endpoint` is set.
    pub export: Option<Exporter>,
}

/// The gateway service shared by all connections.
#[derive(Debug)]
pub struct Gateway {
    /// The live runtime and the metrics.
    pub live: Arc<Live>,
    settings: Settings,
    /// Upgraded connections: their cap, idle timeout and stop signal.
    tunnels: tunnel::Tunnels,
    /// Request-ID generator: a per-process random prefix and a counter.
    id_prefix: u64,
    id_counter: AtomicU64,
    /// The prefix's half of every request ID, written once.
    id_template: [u8; ID_LEN],
    /// Counter behind [`Gateway::next_random`].
    rand_counter: AtomicU64,
}

/// Where a request stands once the checks that may wait are done.
enum Step<'r> {
    /// Answered locally (decided, or refused by a cluster limit or an overload cap).
    Answer(Box<Response<Full<Bytes>>>, Class),
    /// An error standing in for the exchange (no route, body too large).
    Fail(Option<UpstreamId>, GatewayError),
    /// Forward, holding the breaker's permit and the overload slots.
    Forward(UpstreamId, Option<Permit<'r>>, Option<Held>),
}

// === impl Gateway ===

impl Gateway {
    /// A gateway serving what `live` holds.
    pub fn new(live: Arc<Live>, settings: Settings) -> Self {
        let id_prefix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        let tunnels = tunnel::Tunnels::new(
            settings.max_upgraded_connections,
            settings.upgrade_idle_timeout,
            settings.shutdown.clone(),
        );
        Self {
            live,
            settings,
            tunnels,
            id_prefix,
            id_counter: AtomicU64::new(0),
            id_template: {
                let mut t = [0; ID_LEN];
                format_hex(id_prefix, 0, &mut t);
                t
            },
            rand_counter: AtomicU64::new(0),
        }
    }

    /// Give a downstream connection's idle upstream connections back, as it parks or closes
    /// ([`ConnCache::release`]).
    pub fn release(&self, conns: &ConnCache) {
        conns.release(&self.live.runtime.load().upstreams);
    }

    /// Serve one request. `conns` is the downstream connection's own upstream connections
    /// (HTTP/1.x connections, one request at a time); without it the shared pool is used.
    ///
    /// Returns the response and the request's ID, which the caller sends as
    /// `X-Request-Id` ([`with_request_id`] puts it in the header map; the own HTTP/1 writer
    /// writes it into the head, one insert fewer).
    pub async fn handle(
        &self,
        req: Request<ReqBody>,
        conn: &ConnInfo,
        conns: Option<&Arc<ConnCache>>,
    ) -> (Response<RespBody>, HeaderValue) {
        let (mut parts, body) = req.into_parts();
        self.handle_parts(&mut parts, body, conn, conns).await
    }

    /// [`Gateway::handle`] of a request whose head stays where its caller keeps it: the
    /// request path works on it in place and forwards it by reference, so its parts (over
    /// 200 bytes) are not copied from one future's state into the next on the way.
    pub async fn handle_parts(
        &self,
        parts: &mut http::request::Parts,
        body: ReqBody,
        conn: &ConnInfo,
        conns: Option<&Arc<ConnCache>>,
    ) -> (Response<RespBody>, HeaderValue) {
        let started = Stamp::now();
        let (request_id, fresh_id) = self.request_id(&mut parts.headers);
        let rt = self.live.runtime.load_full();
        let trace = self.trace(&mut parts.headers, conn, &rt);
        let ids = Ids {
            request: request_id.clone(),
            trace,
        };
        // One function (a nested one would move the request's parts into its own state).
        let id = move |resp| (resp, request_id);
        let (ask, host) = match head::sanitize(parts, &rt.snapshot) {
            // The client's side of the connection goes with the ask (hyper offers it only
            // for an HTTP/1.1 request carrying `Upgrade`), never to anyone else.
            Ok(head::Sane { ask, host }) => (
                ask.and_then(|a| Some((a, parts.extensions.remove::<OnUpgrade>()?))),
                host,
            ),
            Err(e) => return id(self.refuse_head(&rt, e, parts.version, ids, conn, started)),
        };
        let verdict = match identity::phase(&rt, &mut parts.headers) {
            Ok(v) => v,
            Err(e) => {
                let grpc = is_grpc(&parts.headers);
                return id(self.refuse_identity(&rt, e, grpc, ids, conn, started));
            }
        };
        let mode = Mode::Serve {
            draw: self.next_random(),
            at: started,
        };
        let d = decide(&rt, request_parts(parts), conn, mode);
        let req = request_parts(parts);
        let mut record = Record::start(&rt, &d, req, verdict, self.recorder(&ids), started);
        // Only what the later phases need is carried across the waits (a smaller future).
        // The cache key is taken now, while the classification (app, user) is at hand.
        let cached = match (&d.action, interface_cache(&rt, d.class.interface)) {
            (Action::Forward { .. }, Some(c)) => c.key(parts, &d.class).map(|key| (c, key)),
            _ => None,
        };
        let (interface, action, cluster, pace) = (d.class.interface, d.action, d.cluster, d.pace);
        let mirror = d.route.as_ref().filter(|r| r.mirrored).map(|r| r.rule_id);
        let metrics = &self.live.metrics;
        let upgrade =
            ask.and_then(|a| (self.tunnels).approve(a, d.route.as_ref(), &action, metrics));
        let step = match upgrade {
            Some(Err(e)) => Step::Fail(None, e),
            _ => {
                self.wait_checks(&rt, interface, action, cluster, pace, &parts.headers)
                    .await
            }
        };
        let mut upgrade = upgrade.and_then(Result::ok);
        // A tunnel is never answered from (or kept in) the cache.
        let cached = cached.filter(|_| upgrade.is_none());
        let answer = match step {
            Step::Answer(resp, class) => Answer::Local(resp, class),
            Step::Fail(upstream, e) => Answer::Exchange(upstream, Err(e)),
            Step::Forward(up, permit, held) => {
                let lookup = match cached {
                    Some((c, key)) => Some(crate::out_of_line(|| c.lookup(key)).await),
                    None => None,
                };
                if let Some(Lookup::Answered(resp)) = lookup {
                    // The upstream is not asked: the slots and the breaker's permit go
                    // back unjudged.
                    return id(record.finish(&rt, Answer::Cached(up, resp), ids, conn));
                }
                let head_only = parts.method == http::Method::HEAD;
                let trusted = &rt.snapshot.trusted_proxies;
                let forwarding = hygiene(parts, host, conn, trusted);
                let mut extra = Outgoing {
                    request_id: fresh_id.then(|| ids.request.clone()),
                    trace: ids.trace,
                    forwarding,
                };
                let upstream = &rt.upstreams[up.0 as usize];
                let mut result = match &mut upgrade {
                    Some(u) => {
                        u.restore(&mut parts.headers);
                        extra.put(&mut parts.headers);
                        u.check(
                            crate::out_of_line(|| upstream.forward_upgrade(parts)).await,
                            metrics,
                        )
                    }
                    None => {
                        // The copy starts here, after hygiene (it carries the same
                        // forwarding headers and `traceparent`), and is never waited for.
                        let mirror = mirror.and_then(|id| rt.mirrors.get(id as usize)?.as_ref());
                        if mirror.is_some() {
                            std::mem::take(&mut extra).put(&mut parts.headers);
                        }
                        let tee = mirror.and_then(|m| m.start(parts, body.is_end_stream()));
                        let max_body = self.settings.max_body_bytes;
                        let sent = upstream.forward(parts, body, max_body, conns, tee, extra);
                        let mut result = sent.await;
                        tunnel::refuse_unasked_switch(&mut result);
                        result
                    }
                };
                let done = self.finish(result.as_ref(), permit, held, started);
                if lookup.is_none() {
                    record.done_at(done);
                }
                // In place: the answer moves once more, into the `Answer`.
                match lookup {
                    Some(Lookup::Lead(lead)) => {
                        result =
                            crate::out_of_line(|| lead.fill(result, head_only, &rt.snapshot)).await;
                    }
                    Some(_) => cache::mark_miss(&mut result),
                    None => {}
                }
                Answer::Exchange(Some(up), result)
            }
        };
        let resp = record.finish(&rt, answer, ids, conn);
        match upgrade {
            Some(u) => id(u.open(resp, &self.tunnels, metrics)),
            None => id(resp),
        }
    }

    /// The checks after the decision that may wait: cluster-scope limits (Redis), the
    /// declared body size, the overload slots, then the turn of paced limits (waited for
    /// holding the slots, so waiting requests count against the concurrency caps). A request
    /// answered locally takes no slot and does not wait, and an upstream is never asked for
    /// a request refused here.
    async fn wait_checks<'r>(
        &self,
        rt: &Runtime,
        interface: Option<InterfaceId>,
        mut action: Action<'r>,
        cluster: Option<ClusterPending>,
        pace: Option<Pace>,
        headers: &HeaderMap,
    ) -> Step<'r> {
        // Boxed, as every rarer path of a request is: the request's future is as large as
        // its largest state, and it lives inline in each HTTP/1 connection's task.
        if let Some(c) = cluster
            && let Some((resp, class)) = crate::out_of_line(|| c.resolve(&self.live.metrics)).await
        {
            action = Action::Answer(Box::new(resp), class);
        }
        let too_large = declared_len(headers).is_some_and(|n| n > self.settings.max_body_bytes);
        match action {
            Action::Answer(resp, class) => Step::Answer(resp, class),
            Action::NoRoute if too_large => Step::Fail(None, GatewayError::BodyTooLarge),
            Action::NoRoute => Step::Fail(None, GatewayError::NoRoute),
            Action::Forward { upstream, .. } if too_large => {
                Step::Fail(Some(upstream), GatewayError::BodyTooLarge)
            }
            Action::Forward { upstream, permit } => {
                let pending = rt.overload.pending(
                    interface,
                    upstream,
                    &rt.interface_names,
                    &self.live.metrics,
                );
                let held = match pending {
                    None => None,
                    Some(p) => match p.acquire().await {
                        Ok(held) => Some(held),
                        Err(resp) => return Step::Answer(Box::new(resp), Class::Shed),
                    },
                };
                if let Some(p) = pace {
                    p.wait().await;
                }
                Step::Forward(upstream, permit, held)
            }
        }
    }

    /// The answer to a head refused before the decision: counted as unclassified, and on
    /// HTTP/1.x the connection is closed after it (what follows an ambiguous head is not
    /// trusted to be framed as the client meant).
    fn refuse_head(
        &self,
        rt: &Runtime,
        e: GatewayError,
        version: http::Version,
        ids: Ids,
        conn: &ConnInfo,
        started: Stamp,
    ) -> Response<RespBody> {
        let record = Record::unclassified(rt, "unverified", self.recorder(&ids), started);
        let mut resp = record.finish(rt, Answer::Exchange(None, Err(e)), ids, conn);
        if version < http::Version::HTTP_2 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// The 401 to a request without the valid token `identity.jwt` requires: counted as
    /// unclassified (nothing was decided), the connection kept (the head was sound).
    fn refuse_identity(
        &self,
        rt: &Runtime,
        e: crate::jwt::TokenError,
        grpc: bool,
        ids: Ids,
        conn: &ConnInfo,
        started: Stamp,
    ) -> Response<RespBody> {
        let record = Record::unclassified(rt, e.code(), self.recorder(&ids), started).grpc(grpc);
        let answer = Answer::Exchange(None, Err(GatewayError::Unauthorized(e)));
        record.finish(rt, answer, ids, conn)
    }

    /// Give the overload slots back and report the call to the breaker. (A request that
    /// was not forwarded drops both unjudged: the upstream was never asked.) Returns the
    /// time, read once for the breaker and the record.
    fn finish(
        &self,
        result: Result<&(Response<UpstreamBody>, std::time::Duration), &GatewayError>,
        permit: Option<Permit<'_>>,
        held: Option<Held>,
        started: Stamp,
    ) -> Stamp {
        let now = Stamp::now();
        if let Some(h) = held {
            h.finish(result.ok().map(|(_, latency)| *latency));
        }
        if permit.is_some() {
            let (judged, latency) = match result {
                Ok((resp, latency)) => (Ok(resp.status()), *latency),
                Err(e) => (Err(*e), started.until(now)),
            };
            finish_call(&self.live.metrics, permit, judged, latency, now);
        }
        now
    }

    /// The client's `X-Request-Id` when it sent a usable one, else a new one, and whether it
    /// is new. A new one reaches the upstream with the gateway's other added fields
    /// ([`Outgoing`]), not through the header map (an insert, and a hash of the name, fewer
    /// per request); an unusable one is taken out of the map.
    fn request_id(&self, headers: &mut HeaderMap) -> (HeaderValue, bool) {
        match rules::classify::field(headers, &X_REQUEST_ID) {
            Some(v) if !v.is_empty() && v.len() <= 128 => return (v.clone(), false),
            Some(_) => drop(headers.remove(&X_REQUEST_ID)), // every value of the name
            None => {}
        }
        (self.next_request_id(), true)
    }

    /// Where the record phase writes: the access log when it is on, and the exporter when
    /// the request's span is sampled.
    fn recorder(&self, ids: &Ids) -> Recorder {
        let sampled = ids.trace.is_some_and(|t| t.sampled);
        Recorder {
            log: self.settings.access_log,
            export: self.settings.export.as_ref().filter(|_| sampled).cloned(),
        }
    }

    /// The request's trace context, continued from its `traceparent` or started (the
    /// client's is taken out of the headers: the upstream gets the gateway's, written as
    /// the request goes out); none when propagation is off.
    fn trace(
        &self,
        headers: &mut HeaderMap,
        conn: &ConnInfo,
        rt: &Runtime,
    ) -> Option<TraceContext> {
        use rand::Rng as _;
        let sampler = self.settings.trace.as_ref()?;
        let trusted = &rt.snapshot.trusted_proxies;
        let trusted = !trusted.is_empty() && trusted.contains(conn.remote.ip());
        // Trace and span IDs are read by others (and chosen by nobody but the gateway):
        // drawn from the thread's CSPRNG, not the counter behind `next_random`, which is
        // plenty for the sampling draw.
        let mut ids = [0u64; 3];
        rand::rng().fill(&mut ids[..]);
        let draw = self.next_random();
        Some(TraceContext::continue_or_start(
            headers, sampler, trusted, draw, ids,
        ))
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
        let mut buf = self.id_template;
        hex16(n, &mut buf[17..]);
        HeaderValue::from_maybe_shared(id_bytes(&buf)).expect("hex is a valid header value")
    }
}

/// Length of a request ID the gateway makes.
const ID_LEN: usize = 33;

/// IDs cut from one block of this thread's (see [`id_bytes`]).
const IDS_PER_BLOCK: usize = 64;

thread_local! {
    static ID_BLOCK: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// `id` as shared bytes cut from a per-thread block: one allocation per
/// [`IDS_PER_BLOCK`] requests instead of one each, and the request's and the response's copy
/// share it. A block is freed when the last ID cut from it is dropped.
fn id_bytes(id: &[u8; ID_LEN]) -> Bytes {
    ID_BLOCK.with(|b| {
        let mut block = b.borrow_mut();
        if block.capacity() < ID_LEN {
            *block = BytesMut::with_capacity(ID_LEN * IDS_PER_BLOCK);
        }
        block.extend_from_slice(id);
        block.split_to(ID_LEN).freeze()
    })
}

/// `resp` with its request's ID as `X-Request-Id` (replacing any the upstream sent), for a
/// response [`Gateway::handle`] returned.
pub fn with_request_id(mut resp: Response<RespBody>, id: HeaderValue) -> Response<RespBody> {
    crate::upstream::materialize(&mut resp, record::take_raw);
    resp.headers_mut().insert(&X_REQUEST_ID, id);
    resp
}

/// `{prefix:016x}-{n:016x}` into `buf`, without allocating.
fn format_hex(prefix: u64, n: u64, buf: &mut [u8; ID_LEN]) -> &[u8] {
    hex16(prefix, &mut buf[..16]);
    buf[16] = b'-';
    hex16(n, &mut buf[17..]);
    buf
}

/// `n` as 16 lower-case hex digits into `out` (16 bytes).
fn hex16(n: u64, out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out[..16].iter_mut().enumerate() {
        *b = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// Header hygiene before forwarding (hop-by-hop headers are already gone: see [`head`]):
/// the authority kept as `Host`, and the forwarding headers: a trusted peer's chain extended
/// here; any other client's claims removed, and the gateway's own returned, to be written
/// as the request goes out.
fn hygiene(
    parts: &mut http::request::Parts,
    host: Option<HeaderValue>,
    conn: &ConnInfo,
    trusted: &rules::trusted::TrustedProxies,
) -> Option<Forwarding> {
    let host = keep_authority(parts, host);
    let peer_trusted = !trusted.is_empty() && trusted.contains(conn.remote.ip());
    forwarding(&mut parts.headers, host.as_ref(), conn, peer_trusted)
}

/// The response cache of the request's interface, if it has one.
fn interface_cache(rt: &Runtime, interface: Option<InterfaceId>) -> Option<&Arc<ResponseCache>> {
    rt.caches.get(interface?.0 as usize)?.as_ref()
}

/// What classification reads of a request.
pub fn request_parts(parts: &http::request::Parts) -> RequestParts<'_> {
    RequestParts {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
    }
}

/// The declared `Content-Length`, if it is a number.
fn declared_len(headers: &HeaderMap) -> Option<u64> {
    rules::classify::field(headers, &header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
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

    /// IDs cut from shared blocks keep their own bytes, across block boundaries and while
    /// every earlier one is still alive.
    #[test]
    fn request_ids_cut_from_blocks_keep_their_bytes() {
        let n = IDS_PER_BLOCK as u64 * 3 + 5;
        let ids: Vec<Bytes> = (0..n)
            .map(|i| {
                let mut b = [0u8; ID_LEN];
                format_hex(7, i, &mut b);
                id_bytes(&b)
            })
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let mut want = [0u8; ID_LEN];
            assert_eq!(&id[..], format_hex(7, i as u64, &mut want));
        }
    }
}
