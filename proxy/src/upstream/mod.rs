//! Forwarding to upstream clusters: endpoint choice, keep-alive connections, timeouts, one
//! retry on connect failure.
//!
//! - [`h1`]: the HTTP/1.1 client of our own for bodiless requests.
//! - [`tls`], [`connect`], [`h2`]: upstreams with `tls` or `protocol: http2`: the verified
//!   rustls client built at load, the connector (TCP then TLS within the connect timeout),
//!   and one multiplexed HTTP/2 connection per endpoint.
//! - [`health`]: endpoint health: passive outlier ejection, active checks, re-resolution.
//! - [`headers`]: header hygiene (hop-by-hop headers, `Host`, `X-Forwarded-For`).
//! - [`mirror`]: fire-and-forget copies of requests to a route's mirror upstream.
//!
//! An HTTP/1.x downstream connection carries one request at a time, so it gets its own
//! upstream connection ([`ConnCache`], created on its first request and reused until it
//! closes): no shared pool to check out from. A request without a body (most of a gateway's
//! traffic) is sent by [`h1`], driven by the downstream connection's own task; one with
//! a body by a hyper client connection of its own. Requests of HTTP/2 downstream connections
//! (many at once) and callers without a cache use the shared pooled client of the upstream.
//!
//! An upstream with `tls` or `protocol: http2` takes none of the downstream connection's
//! own connections: over TLS with HTTP/1.1, a pooled client of its own (the TLS handshake
//! is paid once per pooled connection, not per downstream connection); with HTTP/2, one
//! connection per endpoint that every request shares ([`h2`]). Trailers pass both ways.
//!
//! An [`Upstream`] is built once per config load from a validated [`UpstreamSpec`]: endpoint
//! names are resolved and their URI authorities parsed here (and again by the background
//! re-resolution), so the request path never parses an address. Bodies stream both ways;
//! nothing is buffered whole.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rules::model::{Balance, Protocol, UpstreamKind};
use rules::snapshot::UpstreamSpec;

pub mod connect;
pub mod grpc;
pub mod h1;
pub mod h2;
pub mod headers;
pub mod health;
mod idle;
pub mod mirror;
pub mod tls;

use crate::clock::Stamp;
use crate::metrics::{EjectionLabels, EndpointLabels, Metrics, Name};
use crate::respond::GatewayError;
use headers::Outgoing;
use health::{EndpointHealth, Outlier, Reason};

/// A runtime upstream cluster.
#[derive(Debug)]
pub struct Upstream {
    /// Its name, for metrics and logs.
    pub name: Name,
    /// Its endpoints, resolved.
    pub endpoints: Vec<Endpoint>,
    /// Passive outlier ejection, when enabled.
    outlier: Option<Outlier>,
    /// Its health checker and re-resolver, aborted when it is dropped (each also holds only
    /// a `Weak` of it and ends when it is gone).
    tasks: std::sync::OnceLock<Box<[tokio::task::AbortHandle]>>,
    balance: Balance,
    /// Round-robin cursor.
    next: AtomicUsize,
    request_timeout: Duration,
    read_timeout: Duration,
    /// One pooled client per upstream, so pool sizes and connect timeouts are per upstream.
    client: Client<HttpConnector, UpBody>,
    /// What it was built from, to tell whether a reload changed it.
    spec: UpstreamSpec,
    embedded: Option<SocketAddr>,
    /// Unique per built upstream: what a [`ConnCache`] entry is keyed by.
    id: u64,
    /// How it is reached when it has `tls` or speaks HTTP/2.
    secure: Option<Secure>,
    /// Its `tidegate_grpc_status_total` series.
    grpc: Arc<grpc::StatusCounts>,
    /// The fingerprint of its TLS client, to tell whether a reload changed a file.
    tls_fingerprint: Option<u64>,
    /// Its `tidegate_upstream_latency_seconds` series, looked up once.
    latency: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
}

/// One endpoint of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    /// As configured (`host:port`): its metrics label and its name in status.json.
    pub name: Name,
    /// Its current address: replaced whole by the re-resolution, read with one atomic load.
    /// Shared with the [`connect::Connector`] of an upstream with `tls` or HTTP/2.
    resolved: Arc<ArcSwap<Resolved>>,
    /// Whether `name` is a host name (re-resolved), not an IP address.
    is_host_name: bool,
    /// Requests in flight to it (for least-outstanding balancing).
    inflight: AtomicUsize,
    /// Its health, shared with the runtimes before and after a reload that keeps it.
    pub health: Arc<EndpointHealth>,
    /// Its `tidegate_endpoint_healthy` series.
    healthy_gauge: Gauge,
    /// Its `tidegate_endpoint_ejections_total` series, indexed like [`Reason::ALL`].
    ejections: [Counter; 2],
    /// Idle connections of [`h1`] that downstream connections gave back.
    idle: idle::IdlePool,
}

/// How an upstream with `tls` or `protocol: http2` is reached.
#[derive(Debug)]
struct Secure {
    connector: connect::Connector,
    /// `https` with TLS, else `http`.
    scheme: Scheme,
    /// Each endpoint as configured, as a URI authority: the pooled client's key for it
    /// (mapped back to its address by the connector), and an HTTP/2 request's
    /// `:authority` when the client sent no `Host`.
    authorities: Box<[Authority]>,
    /// `http1` over TLS: the pooled client, shared by every downstream connection.
    pool: Option<Client<connect::Connector, UpBody>>,
    /// `http2`: one connection per endpoint, indexed like the endpoints (empty otherwise).
    h2: Box<[h2::H2Conn]>,
}

/// An endpoint's address, and the forms the request path needs of it, built once.
#[derive(Debug)]
struct Resolved {
    addr: SocketAddr,
    authority: Authority,
    /// The same as a `Host` value, for requests that came without one.
    host: HeaderValue,
}

/// The request body sent upstream: the client's body, with the size limit enforced while it
/// streams, and kept retrievable until the client first polls it, so a request whose
/// connection could not be established can be sent again to the next endpoint.
#[derive(Debug)]
pub struct UpBody {
    state: BodyState,
    remaining: u64,
    hint: SizeHint,
}

#[derive(Debug)]
enum BodyState {
    Empty,
    /// Not yet polled; shared with the forwarder, which takes it back for a retry. The tee,
    /// when a mirror wants a copy, travels with the body.
    Parked(ParkedBody),
    Streaming(ReqBody, Option<Tee>),
    /// A body held whole (a mirror's copy), sent as one piece.
    Buffered(Bytes),
    Done,
}

/// The client's body before its first poll, and the mirror's tee that goes with it.
type ParkedBody = Arc<Mutex<Option<(ReqBody, Option<Tee>)>>>;

/// A request body as a downstream server hands it over: hyper's (HTTP/2, and HTTP/1
/// connections handed to hyper), or one the gateway's own HTTP/1 server (`serve::h1`) read
/// whole with the head (`None`: no body, or already sent).
#[derive(Debug)]
pub enum ReqBody {
    /// hyper's streaming body.
    Hyper(Incoming),
    /// A body read whole.
    Full(Option<Bytes>),
}

impl ReqBody {
    /// No body.
    pub const EMPTY: ReqBody = ReqBody::Full(None);
}

impl From<Incoming> for ReqBody {
    fn from(b: Incoming) -> Self {
        ReqBody::Hyper(b)
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Full(b) => Poll::Ready(
                b.take()
                    .filter(|d| !d.is_empty())
                    .map(|d| Ok(Frame::data(d))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Hyper(b) => b.is_end_stream(),
            ReqBody::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Hyper(b) => b.size_hint(),
            ReqBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

/// A mirror's copy of a request body, taken as the body streams to the primary upstream:
/// each piece is kept (a reference-count bump, not a copy) and the whole is handed over
/// once the body has ended. Dropped before that (the body failed, grew past `limit`, or was
/// not read to its end), it hands over nothing, and the mirror sends no copy.
#[derive(Debug)]
pub struct Tee {
    pieces: Vec<Bytes>,
    len: u64,
    limit: u64,
    done: Option<tokio::sync::oneshot::Sender<Bytes>>,
}

/// Errors of [`UpBody`].
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body grew past `max_body_bytes`.
    #[error("request body larger than the limit")]
    TooLarge,
    /// Reading from the client failed.
    #[error("reading the request body: {0}")]
    Client(#[from] hyper::Error),
}

/// A response body from upstream, streamed through, that fails if the upstream stalls
/// longer than the read timeout between two pieces. Failing the body makes hyper cut the
/// downstream response (its status is already sent) and drop the upstream connection, so
/// a hung upstream holds no task or socket forever.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Received,
    // Armed only when the upstream makes us wait: a body that is already there (most
    // small responses) never touches the timer wheel.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    // Whether `idle` counts from the current wait (disarmed by each piece of data).
    armed: bool,
    timeout: Duration,
    /// A gRPC answer's status series, counted by the `grpc-status` of its trailers.
    grpc: Option<Arc<grpc::StatusCounts>>,
}

/// Which client read the response.
#[derive(Debug)]
enum Received {
    Hyper(Incoming),
    Own(h1::ResponseBody),
    /// A whole body already read (an answer kept by an interface's cache), handed out once.
    Buffered(Option<Bytes>),
}

/// Errors of [`UpstreamBody`].
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    /// No data for longer than the read timeout.
    #[error("upstream response body stalled for longer than the read timeout")]
    Stalled,
    /// The upstream connection failed (reset, early close, bad framing).
    #[error("upstream response body: {0}")]
    Upstream(#[from] hyper::Error),
    /// The same, on a connection of [`h1`].
    #[error("upstream response body: {0}")]
    Connection(#[from] h1::Error),
}

/// A downstream connection's own upstream connection, reused by its requests one after the
/// other. The server passes it to the request path with every HTTP/1.x
/// request.
#[derive(Debug, Default)]
pub struct ConnCache {
    /// hyper connections, for requests with a body.
    hyper: Slots<hyper::client::conn::http1::SendRequest<UpBody>>,
    /// Idle [`h1`] connections, for requests without one. One that is carrying a
    /// response body is owned by that body until it has been read.
    own: Slots<h1::Conn>,
}

/// At most [`CONN_CACHE_MAX`] connections, one per (upstream id, endpoint index) used lately:
/// a canary split sends one downstream connection's requests to two upstreams.
#[derive(Debug)]
struct Slots<T>(Mutex<Vec<((u64, usize), T)>>);

/// Upstream connections of each kind one downstream connection keeps.
const CONN_CACHE_MAX: usize = 4;

/// Why a send on a downstream connection's own upstream connection failed.
#[derive(Debug)]
enum DirectError {
    Connect(std::io::Error),
    Http(hyper::Error),
    Own(h1::Error),
}

static NEXT_UPSTREAM_ID: AtomicUsize = AtomicUsize::new(0);

// === impl DirectError ===

impl DirectError {
    /// Whether the request was never sent (a connect failure: retryable on another
    /// endpoint), and what to answer.
    fn answer(self) -> (bool, GatewayError) {
        match self {
            DirectError::Connect(io) => (true, classify_connect(&io)),
            DirectError::Http(e) => (
                false,
                classify_chain(&e).unwrap_or(GatewayError::UpstreamReset),
            ),
            DirectError::Own(h1::Error::Timeout) => (false, GatewayError::UpstreamTimeout),
            DirectError::Own(e) => (
                false,
                classify_chain(&e).unwrap_or(GatewayError::UpstreamReset),
            ),
        }
    }
}

// === impl Secure ===

impl Secure {
    /// How `spec` is reached, when it has `tls` or speaks HTTP/2 (`None` for cleartext
    /// HTTP/1.1). `tls` is its TLS client, built from its files; required with `tls`.
    fn build(
        spec: &UpstreamSpec,
        endpoints: &[Endpoint],
        tls: Option<&tls::TlsClient>,
    ) -> Result<Option<Self>, String> {
        let h2 = spec.protocol == Protocol::Http2;
        if spec.tls.is_none() && !h2 {
            return Ok(None);
        }
        let (tls, scheme) = match (&spec.tls, tls) {
            (None, _) => (None, Scheme::HTTP),
            (Some(t), Some(client)) => (Some((t, client)), Scheme::HTTPS),
            (Some(_), None) => {
                return Err(format!(
                    "upstream {:?}: its tls files were not read (start the gateway from the config file)",
                    spec.name
                ));
            }
        };
        let mut targets = Vec::with_capacity(endpoints.len());
        let mut authorities = Vec::with_capacity(endpoints.len());
        for ep in endpoints {
            let name = tls
                .map(|(t, _)| tls::server_name(t, &ep.name.0))
                .transpose()
                .map_err(|e| format!("upstream {:?}: {e}", spec.name))?;
            authorities.push(
                Authority::try_from(&*ep.name.0).map_err(|e| {
                    format!("upstream {:?}: endpoint {:?}: {e}", spec.name, ep.name.0)
                })?,
            );
            targets.push(connect::Target {
                name: ep.name.0.as_ref().into(),
                resolved: ep.resolved.clone(),
                server_name: name,
            });
        }
        let connector = connect::Connector::new(targets, tls.map(|(_, c)| c), spec.connect_timeout);
        let pool = (!h2).then(|| {
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(spec.pool_max_idle_per_endpoint)
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(connector.clone())
        });
        Ok(Some(Self {
            connector,
            scheme,
            authorities: authorities.into(),
            pool,
            h2: if h2 {
                endpoints.iter().map(|_| h2::H2Conn::default()).collect()
            } else {
                Box::default()
            },
        }))
    }
}

// === impl Upstream ===

impl Upstream {
    /// Build from a validated spec. `embedded` is the address of the in-process backend for an
    /// `embedded` upstream. `previous` is the upstream of the same name being replaced, if
    /// any: each endpoint it shares (as configured) keeps its health, and a host name that
    /// fails to resolve now keeps the address it had there.
    ///
    /// Its health checker and re-resolver are started here (when configured, and when a
    /// tokio runtime is running: never off-line), and stop when it is dropped.
    ///
    /// `tls` is its TLS client, built from the files its `tls` names when it has one.
    pub fn build(
        spec: &UpstreamSpec,
        embedded: Option<SocketAddr>,
        tls: Option<&tls::TlsClient>,
        previous: Option<&Upstream>,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, String> {
        let named: Vec<(Box<str>, Option<SocketAddr>)> = match spec.kind {
            UpstreamKind::Embedded => {
                let addr = embedded.ok_or_else(|| {
                    format!(
                        "embedded upstream {:?} is not running (adding one needs a restart)",
                        spec.name
                    )
                })?;
                vec![(addr.to_string().into(), Some(addr))]
            }
            UpstreamKind::Static => spec.endpoints.iter().map(|e| (e.clone(), None)).collect(),
        };
        let upstream = Name(spec.name.as_ref().into());
        let mut endpoints = Vec::with_capacity(named.len());
        for (text, fixed) in named {
            let kept = previous.and_then(|p| p.endpoints.iter().find(|e| *e.name.0 == *text));
            let addr = match (fixed, resolve(&text)) {
                (Some(a), _) | (None, Ok(a)) => a,
                (None, Err(e)) => match kept {
                    Some(k) => {
                        let a = k.resolved.load().addr;
                        tracing::warn!(upstream = %spec.name, endpoint = %text, error = %e, %a, "resolving the endpoint failed; keeping its last address");
                        a
                    }
                    None => return Err(e),
                },
            };
            let name = Name(text.as_ref().into());
            let labels = EndpointLabels {
                upstream: upstream.clone(),
                endpoint: name.clone(),
            };
            let ejections = Reason::ALL.map(|r| {
                metrics
                    .endpoint_ejections
                    .get_or_create(&EjectionLabels {
                        upstream: upstream.clone(),
                        endpoint: name.clone(),
                        reason: r.label(),
                    })
                    .clone()
            });
            let healthy_gauge = metrics.endpoint_healthy.get_or_create(&labels).clone();
            let ep = Endpoint {
                is_host_name: fixed.is_none() && text.parse::<SocketAddr>().is_err(),
                name,
                resolved: Arc::new(ArcSwap::from_pointee(Resolved::new(addr))),
                inflight: AtomicUsize::new(0),
                health: kept.map_or_else(Default::default, |k| {
                    k.health
                        .adopt(spec.health_check.is_some(), spec.outlier.is_some());
                    k.health.clone()
                }),
                healthy_gauge,
                ejections,
                idle: idle::IdlePool::default(),
            };
            ep.export(health::now_ms());
            endpoints.push(ep);
        }
        let secure = Secure::build(spec, &endpoints, tls)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(spec.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(spec.pool_max_idle_per_endpoint)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let up = Arc::new(Self {
            name: upstream.clone(),
            endpoints,
            outlier: spec.outlier.map(Outlier::new),
            tasks: std::sync::OnceLock::new(),
            balance: spec.balance,
            next: AtomicUsize::new(0),
            request_timeout: spec.request_timeout,
            read_timeout: spec.read_timeout,
            client,
            spec: spec.clone(),
            embedded,
            id: NEXT_UPSTREAM_ID.fetch_add(1, Ordering::Relaxed) as u64,
            secure,
            grpc: Arc::new(grpc::StatusCounts::new(
                &metrics.grpc_status,
                upstream.clone(),
            )),
            tls_fingerprint: tls.map(|t| t.fingerprint),
            latency: std::sync::OnceLock::new(),
        });
        // Started once the upstream is whole: a task that ran before would find no
        // upstream behind its `Weak` and end at once.
        let mut tasks = Vec::new();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = Arc::downgrade(&up);
            if let Some(check) = &spec.health_check {
                let task = health::check_loop(me.clone(), check.clone());
                tasks.push(rt.spawn(task).abort_handle());
            }
            if up.endpoints.iter().any(|e| e.is_host_name) {
                tasks.push(
                    rt.spawn(health::resolve_loop(me, spec.resolve_ttl))
                        .abort_handle(),
                );
            }
        }
        let _ = up.tasks.set(tasks.into());
        Ok(up)
    }

    /// Its series of `tidegate_upstream_latency_seconds` in `metrics` (the gateway's one
    /// registry), looked up on first use.
    pub fn latency_histogram(
        &self,
        metrics: &crate::metrics::Metrics,
    ) -> &prometheus_client::metrics::histogram::Histogram {
        self.latency.get_or_init(|| {
            metrics
                .upstream_latency
                .get_or_create(&crate::metrics::UpstreamLabels {
                    upstream: self.name.clone(),
                })
                .clone()
        })
    }

    /// Whether `spec` (with this embedded address and TLS client) describes this very
    /// upstream.
    pub fn same_definition(
        &self,
        spec: &UpstreamSpec,
        embedded: Option<SocketAddr>,
        tls: Option<&tls::TlsClient>,
    ) -> bool {
        self.spec == *spec
            && self.embedded == embedded
            && self.tls_fingerprint == tls.map(|t| t.fingerprint)
    }

    /// Choose an endpoint in rotation (neither ejected nor failing its health checks),
    /// avoiding `avoid` when there is another. When none is, the least bad one: an upstream
    /// never refuses for lack of a healthy endpoint, it tries the likeliest.
    ///
    /// Costs an atomic load or two per endpoint looked at, and reads the clock only while
    /// an endpoint has been ejected.
    fn pick(&self, avoid: Option<usize>) -> usize {
        let n = self.endpoints.len();
        if n == 1 {
            return 0;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(health::now_ms);
        let mut order = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| Some(i) != avoid);
        let found = match self.balance {
            Balance::RoundRobin => order.find(|&i| self.endpoints[i].health.usable(&mut now)),
            Balance::LeastOutstanding => order
                .filter(|&i| self.endpoints[i].health.usable(&mut now))
                .min_by_key(|&i| self.endpoints[i].inflight.load(Ordering::Relaxed)),
        };
        found.unwrap_or_else(|| self.least_bad(start, avoid))
    }

    /// Every endpoint (but `avoid`) is out of rotation: the one likeliest to answer.
    #[cold]
    fn least_bad(&self, start: usize, avoid: Option<usize>) -> usize {
        let n = self.endpoints.len();
        let now = health::now_ms();
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| Some(i) != avoid)
            .min_by_key(|&i| self.endpoints[i].health.badness(now))
            .unwrap_or(start)
    }

    /// Count an exchange with endpoint `i` that failed for the upstream's fault, ejecting
    /// it when that makes enough in a row.
    fn failed(&self, i: usize) {
        let Some(outlier) = &self.outlier else { return };
        let ep = &self.endpoints[i];
        let now = health::now_ms();
        let all = self.endpoints.iter().map(|e| &*e.health);
        if let Some(length) = outlier.failed(&ep.health, all, now) {
            ep.ejected(Reason::ConsecutiveFailures);
            tracing::warn!(
                upstream = %self.name.0,
                endpoint = %ep.name.0,
                ejected_ms = length.as_millis() as u64,
                "endpoint ejected after consecutive failures"
            );
        }
    }

    /// Drop the `tidegate_endpoint_healthy` series of the endpoints of `old` that `new` no
    /// longer has (by upstream and endpoint name), so a removed endpoint does not report
    /// its last state for ever.
    pub fn retire_endpoints(old: &[Arc<Upstream>], new: &[Arc<Upstream>], metrics: &Metrics) {
        for u in old {
            let kept = new.iter().find(|n| n.name == u.name);
            for ep in &u.endpoints {
                if kept.is_some_and(|k| k.endpoints.iter().any(|e| e.name == ep.name)) {
                    continue;
                }
                metrics.endpoint_healthy.remove(&EndpointLabels {
                    upstream: u.name.clone(),
                    endpoint: ep.name.clone(),
                });
            }
        }
    }

    /// Set every endpoint's `tidegate_endpoint_healthy` to whether it is in rotation now
    /// (an ejection ends by time alone: the status sampler calls this every second).
    pub fn export_health(&self) {
        let now = health::now_ms();
        for ep in &self.endpoints {
            ep.export(now);
        }
    }

    /// Send a request upstream and return its response head (the body streams on).
    ///
    /// A connect failure is tried once more on another endpoint when the cluster has one;
    /// nothing else is retried, because the upstream may have acted on the request.
    ///
    /// `tee`, when given, receives a copy of the body as it streams (for a mirror). `extra`
    /// is what the gateway adds to the request: written straight into the head on a
    /// connection of our own, put in the header map for hyper's.
    pub async fn forward(
        &self,
        parts: &mut http::request::Parts,
        body: ReqBody,
        max_body: u64,
        cache: Option<&Arc<ConnCache>>,
        tee: Option<Tee>,
        extra: Outgoing,
    ) -> Result<(Response<UpstreamBody>, Duration), GatewayError> {
        // TLS and HTTP/2 connections are shared, never a downstream connection's own.
        let cache = cache.filter(|_| self.secure.is_none());
        if let Some(c) = cache
            && body.is_end_stream()
        {
            let (started, deadline) = self.deadline();
            return self.forward_own(parts, c, &extra, started, deadline).await;
        }
        // hyper's request owns its head: the caller's is left as a bare `GET /`.
        let parts = std::mem::replace(parts, Request::new(()).into_parts().0);
        let shared = || self.forward_hyper(parts, body, max_body, cache, tee, extra);
        crate::out_of_line(shared).await
    }

    /// Now (on the request path's clock, which times the exchange) and the exchange's
    /// deadline (on tokio's, whose timers enforce it).
    fn deadline(&self) -> (Stamp, tokio::time::Instant) {
        (
            Stamp::now(),
            tokio::time::Instant::now() + self.request_timeout,
        )
    }

    /// [`Upstream::forward`] through hyper: a request with a body, or to a TLS or HTTP/2
    /// upstream. Boxed by the caller ([`crate::out_of_line`]): its future, with hyper's
    /// exchange, is several KB, which the common request's should not carry.
    async fn forward_hyper(
        &self,
        parts: http::request::Parts,
        body: ReqBody,
        max_body: u64,
        cache: Option<&Arc<ConnCache>>,
        tee: Option<Tee>,
        extra: Outgoing,
    ) -> Result<(Response<UpstreamBody>, Duration), GatewayError> {
        let (started, deadline) = self.deadline();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let slot = if body.is_end_stream() {
            None
        } else {
            Some(Arc::new(Mutex::new(Some((body, tee)))))
        };
        let hint = match &slot {
            Some(s) => s
                .lock()
                .expect("not poisoned")
                .as_ref()
                .map(|(b, _)| b.size_hint())
                .unwrap_or_default(),
            None => SizeHint::with_exact(0),
        };
        // Only a cluster with another endpoint to try keeps a copy for the retry.
        let mut spare =
            (self.endpoints.len() > 1).then(|| (parts.method.clone(), parts.headers.clone()));
        let mut head = Some(parts);
        let mut avoid = None;
        loop {
            let ep_idx = self.pick(avoid);
            let ep = &self.endpoints[ep_idx];
            let to = ep.resolved.load();
            let body = UpBody {
                state: match &slot {
                    None => BodyState::Empty,
                    Some(s) => BodyState::Parked(s.clone()),
                },
                remaining: max_body,
                hint,
            };
            let mut req = match head.take() {
                Some(p) => Request::from_parts(p, body),
                None => {
                    let (method, headers) = spare.take().expect("retried at most once");
                    let mut r = Request::new(body);
                    *r.method_mut() = method;
                    *r.headers_mut() = headers;
                    r
                }
            };
            *req.version_mut() = Version::HTTP_11;
            // A connection of our own speaks to this endpoint only: the origin-form target
            // is enough. The shared pool picks its connection by the absolute URI.
            if cache.is_some() {
                // It still needs a Host.
                if !req.headers().contains_key(header::HOST) {
                    req.headers_mut().insert(header::HOST, to.host.clone());
                }
                *req.uri_mut() = Uri::from(path.clone());
            } else {
                self.pooled_target(&mut req, ep_idx, &to, path.clone());
            }

            extra.put(req.headers_mut());

            // The guard is not held across the exchange.
            drop(to);
            ep.inflight.fetch_add(1, Ordering::Relaxed);
            let res = match &cache {
                Some(c) => {
                    // Inline: this whole function is boxed by its caller.
                    let direct = self.send_direct(c, ep_idx, req);
                    tokio::time::timeout_at(deadline, direct)
                        .await
                        .map(|r| r.map_err(DirectError::answer))
                }
                None => tokio::time::timeout_at(deadline, self.send_pooled(ep_idx, req)).await,
            };
            ep.inflight.fetch_sub(1, Ordering::Relaxed);
            match res {
                Err(_elapsed) => {
                    // The deadline also runs while a request body streams in: a client that
                    // trickles its body must not make the endpoint look failing.
                    if slot.is_none() {
                        self.failed(ep_idx);
                    }
                    return Err(GatewayError::UpstreamTimeout);
                }
                Ok(Ok(resp)) => return Ok(self.received(ep, resp, Received::Hyper, started)),
                Ok(Err((is_connect, answer))) => {
                    if upstream_at_fault(&answer) {
                        self.failed(ep_idx);
                    }
                    let body_still_here = slot
                        .as_ref()
                        .is_none_or(|s| s.lock().expect("not poisoned").is_some());
                    if is_connect && spare.is_some() && body_still_here {
                        avoid = Some(ep_idx);
                        continue;
                    }
                    return Err(answer);
                }
            }
        }
    }
}

impl Upstream {
    /// [`Upstream::forward`] for a bodiless request over the downstream connection's own
    /// HTTP/1.1 connections. The exchange only borrows the request, so the retry after a
    /// connect failure needs no copy of it, and no `Request` or absolute target is built.
    async fn forward_own(
        &self,
        parts: &mut http::request::Parts,
        cache: &Arc<ConnCache>,
        extra: &Outgoing,
        started: Stamp,
        deadline: tokio::time::Instant,
    ) -> Result<(Response<UpstreamBody>, Duration), GatewayError> {
        let mut avoid = None;
        loop {
            let ep_idx = self.pick(avoid);
            let ep = &self.endpoints[ep_idx];
            // A request without a Host gets this endpoint's (taken out again for a retry on
            // another).
            let added_host = !parts.headers.contains_key(header::HOST) && {
                let host = ep.resolved.load().host.clone();
                parts.headers.insert(header::HOST, host);
                true
            };
            ep.inflight.fetch_add(1, Ordering::Relaxed);
            // The deadline is the exchange's own (see `h1::Conn::exchange`).
            let sent = self.send_own(cache, ep_idx, parts, extra, deadline).await;
            ep.inflight.fetch_sub(1, Ordering::Relaxed);
            match sent {
                Ok(resp) => {
                    crate::header_maps::give(std::mem::take(&mut parts.headers));
                    return Ok(self.received(ep, resp, Received::Own, started));
                }
                Err(e) => {
                    let (is_connect, answer) = e.answer();
                    if upstream_at_fault(&answer) {
                        self.failed(ep_idx);
                    }
                    if is_connect && avoid.is_none() && self.endpoints.len() > 1 {
                        if added_host {
                            parts.headers.remove(header::HOST);
                        }
                        avoid = Some(ep_idx);
                        continue;
                    }
                    return Err(answer);
                }
            }
        }
    }

    /// A response head received from `ep`: counted as the endpoint's success, its body
    /// (`as_received` says which client's it is) set to count gRPC statuses when it is gRPC,
    /// with the time it took. One `map`: each is a move of the whole response.
    fn received<B>(
        &self,
        ep: &Endpoint,
        resp: Response<B>,
        as_received: impl FnOnce(B) -> Received,
        started: Stamp,
    ) -> (Response<UpstreamBody>, Duration) {
        ep.health.succeeded();
        let grpc = self.grpc_status(resp.headers());
        let resp = resp.map(|b| UpstreamBody {
            grpc,
            ..UpstreamBody::new(as_received(b), self.read_timeout)
        });
        (resp, started.elapsed())
    }
}

/// Put the fields of `resp` that its body holds as they came ([`h1::RawFields`], taken out by
/// `take`) in its header map, ahead of any the map has, hop-by-hop ones stripped: for every
/// reader of the map (the response cache, hyper's server). The own HTTP/1 server's writer
/// copies them instead.
pub fn materialize<B>(resp: &mut Response<B>, take: impl FnOnce(&mut B) -> Option<h1::RawFields>) {
    let Some(raw) = take(resp.body_mut()) else {
        return;
    };
    let added = std::mem::take(resp.headers_mut());
    let h = resp.headers_mut();
    raw.append_to(h);
    let mut name = None;
    for (n, v) in added {
        name = n.or(name);
        if let Some(n) = &name {
            h.append(n, v);
        }
    }
}

impl Upstream {
    /// Send an upgrade request (bodiless; `Connection: upgrade` and `Upgrade` set by the
    /// caller) on a fresh connection of its own, never a cached one: when the upstream
    /// answers 101 the connection becomes the tunnel, reached through the answer's
    /// `hyper::upgrade::OnUpgrade` extension. A connect failure is tried once more on
    /// another endpoint; the deadline to the response head is the upstream's
    /// `request_timeout_ms`, as for any request.
    pub async fn forward_upgrade(
        &self,
        parts: &http::request::Parts,
    ) -> Result<(Response<UpstreamBody>, Duration), GatewayError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut avoid = None;
        loop {
            let ep_idx = self.pick(avoid);
            let ep = &self.endpoints[ep_idx];
            let mut req = Request::new(UpBody {
                state: BodyState::Empty,
                remaining: 0,
                hint: SizeHint::with_exact(0),
            });
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = Uri::from(path.clone());
            *req.headers_mut() = parts.headers.clone();
            if !req.headers().contains_key(header::HOST) {
                let host = ep.resolved.load().host.clone();
                req.headers_mut().insert(header::HOST, host);
            }
            ep.inflight.fetch_add(1, Ordering::Relaxed);
            let sent = tokio::time::timeout_at(deadline, self.send_upgrade(ep, req)).await;
            ep.inflight.fetch_sub(1, Ordering::Relaxed);
            match sent {
                Err(_elapsed) => {
                    self.failed(ep_idx);
                    return Err(GatewayError::UpstreamTimeout);
                }
                Ok(Ok(resp)) => {
                    ep.health.succeeded();
                    let resp =
                        resp.map(|b| UpstreamBody::new(Received::Hyper(b), self.read_timeout));
                    return Ok((resp, started.elapsed()));
                }
                Ok(Err(DirectError::Connect(e))) => {
                    self.failed(ep_idx);
                    if avoid.is_none() && self.endpoints.len() > 1 {
                        avoid = Some(ep_idx);
                        continue;
                    }
                    return Err(classify_connect(&e));
                }
                Ok(Err(err)) => {
                    let answer = match &err {
                        DirectError::Http(e) => classify_chain(e),
                        DirectError::Own(e) => classify_chain(e),
                        DirectError::Connect(_) => None,
                    }
                    .unwrap_or(GatewayError::UpstreamReset);
                    if upstream_at_fault(&answer) {
                        self.failed(ep_idx);
                    }
                    return Err(answer);
                }
            }
        }
    }

    /// One upgrade exchange on a new connection whose driver hands the connection over on
    /// a 101 (`with_upgrades`).
    async fn send_upgrade(
        &self,
        ep: &Endpoint,
        req: Request<UpBody>,
    ) -> Result<Response<Incoming>, DirectError> {
        let tcp = self.connect_tcp(ep).await.map_err(DirectError::Connect)?;
        let (mut send, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(DirectError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
            }
        });
        send.send_request(req).await.map_err(DirectError::Http)
    }

    /// Send on the downstream connection's own upstream connection (opening it first when
    /// there is none for this endpoint, or it closed). A request that a reused connection
    /// refused unsent (it was closing) is sent once more on a fresh one.
    async fn send_direct(
        &self,
        cache: &ConnCache,
        ep_idx: usize,
        mut req: Request<UpBody>,
    ) -> Result<Response<Incoming>, DirectError> {
        let ep = &self.endpoints[ep_idx];
        let key = (self.id, ep_idx);
        let mut fresh_only = false;
        loop {
            let cached = if fresh_only {
                None
            } else {
                cache.hyper.take(key)
            };
            let mut reused = None;
            if let Some(mut c) = cached.filter(|c| !c.is_closed()) {
                // Ready once the previous exchange (whose body has been streamed by now)
                // is over.
                if c.ready().await.is_ok() {
                    reused = Some(c);
                }
            }
            let was_reused = reused.is_some();
            let mut send = match reused {
                Some(s) => s,
                None => self.connect(ep).await.map_err(DirectError::Connect)?,
            };
            let fut = send.try_send_request(req);
            // Back in the slot at once: the next request of this downstream connection
            // comes after this response, and waits for `ready` above.
            cache.hyper.put(key, send);
            match fut.await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(r) if was_reused => {
                        req = r;
                        fresh_only = true;
                    }
                    _ => return Err(DirectError::Http(e.into_error())),
                },
            }
        }
    }

    /// Send a request without a body on an idle [`h1`] connection of the downstream
    /// connection's (opening one when there is none for this endpoint, or it closed). The
    /// connection goes back to the cache once the response body has been read. An idempotent
    /// request on a reused connection that failed before any of its answer arrived (the
    /// upstream closed it as it went) is sent once more on a fresh one.
    async fn send_own(
        &self,
        cache: &Arc<ConnCache>,
        ep_idx: usize,
        req: &http::request::Parts,
        extra: &Outgoing,
        deadline: tokio::time::Instant,
    ) -> Result<Response<h1::ResponseBody>, DirectError> {
        let ep = &self.endpoints[ep_idx];
        let key = (self.id, ep_idx);
        let (method, headers) = (&req.method, &req.headers);
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let encode = |out: &mut Vec<u8>| h1::encode_head(method, path, headers, extra, out);
        let mut fresh_only = false;
        loop {
            let cached = if fresh_only {
                None
            } else {
                cache.own.take(key).or_else(|| ep.idle.take(ep.address()))
            };
            let (mut conn, reused) = match cached.and_then(|mut c| {
                // A connection the upstream closed while idle is dropped here, unused.
                c.is_idle_usable().then_some(c)
            }) {
                Some(c) => (c, true),
                None => {
                    let connect = tokio::time::timeout_at(deadline, self.connect_tcp(ep));
                    match connect.await {
                        Ok(tcp) => (h1::Conn::new(tcp.map_err(DirectError::Connect)?), false),
                        Err(_) => return Err(DirectError::Own(h1::Error::Timeout)),
                    }
                }
            };
            match conn.exchange(method, deadline, encode).await {
                Ok(mut h) => {
                    let home = cache.clone();
                    let body = conn.into_body(&mut h, move |c| home.own.put(key, c));
                    return Ok(Response::from_parts(h.parts, body));
                }
                Err((_, false)) if reused && h1::idempotent(method) => {
                    fresh_only = true;
                }
                Err((e, _)) => return Err(DirectError::Own(e)),
            }
        }
    }

    /// Send a mirror's copy of a request through the shared pool (never a downstream
    /// connection's own connections, which belong to the primary's exchanges), then read
    /// the answer to its end and discard it: at most [`mirror::DRAIN_BYTES`], each piece
    /// within the read timeout. Returns the status and the time to the response head.
    pub async fn send_copy(
        &self,
        mut parts: http::request::Parts,
        body: Bytes,
    ) -> Result<(http::StatusCode, Duration), GatewayError> {
        use http_body_util::BodyExt;
        let started = Instant::now();
        let ep_idx = self.pick(None);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.version = Version::HTTP_11;
        let body = UpBody {
            hint: SizeHint::with_exact(body.len() as u64),
            state: BodyState::Buffered(body),
            remaining: u64::MAX,
        };
        let mut req = Request::from_parts(parts, body);
        let to = self.endpoints[ep_idx].resolved.load_full();
        self.pooled_target(&mut req, ep_idx, &to, path);
        let sent = tokio::time::timeout(self.request_timeout, self.send_pooled(ep_idx, req));
        let resp = match sent.await {
            Err(_) => return Err(GatewayError::UpstreamTimeout),
            Ok(Err((_, e))) => return Err(e),
            Ok(Ok(r)) => r,
        };
        let latency = started.elapsed();
        let status = resp.status();
        let mut body = resp.into_body();
        let mut left = mirror::DRAIN_BYTES;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(self.read_timeout, body.frame()).await
        {
            let n = frame.data_ref().map_or(0, |d| d.len() as u64);
            if n > left {
                break;
            }
            left -= n;
        }
        Ok((status, latency))
    }

    /// For a gRPC answer, the series its status is counted in when its trailers come; a
    /// trailers-only answer (the status in the head) is counted now. One header look-up
    /// for any other answer.
    fn grpc_status(&self, head: &http::HeaderMap) -> Option<Arc<grpc::StatusCounts>> {
        if !grpc::is_grpc(head) || self.grpc.count(head) {
            return None;
        }
        Some(self.grpc.clone())
    }

    /// Shape `req` for the shared clients: for cleartext HTTP/1.1 the absolute URI of the
    /// endpoint's address (the plain pool's key); over TLS the endpoint as configured
    /// (the TLS pool's key, mapped to its address by the connector); for HTTP/2 the
    /// client's authority as `:authority` (an HTTP/2 request carries no `Host`, RFC 9113
    /// §8.3.1), and `te: trailers`, which a gRPC request must carry.
    fn pooled_target(
        &self,
        req: &mut Request<UpBody>,
        ep_idx: usize,
        to: &Resolved,
        path: PathAndQuery,
    ) {
        let mut p = http::uri::Parts::default();
        p.path_and_query = Some(path);
        match &self.secure {
            None => {
                p.scheme = Some(Scheme::HTTP);
                p.authority = Some(to.authority.clone());
            }
            Some(s) => {
                p.scheme = Some(s.scheme.clone());
                let configured = &s.authorities[ep_idx];
                p.authority = Some(if s.h2.is_empty() {
                    configured.clone()
                } else {
                    *req.version_mut() = Version::HTTP_2;
                    // One copy of the Host value per request: `:authority` must be a
                    // parsed authority.
                    let host = req.headers_mut().remove(header::HOST);
                    host.and_then(|h| Authority::try_from(h.as_bytes()).ok())
                        .unwrap_or_else(|| configured.clone())
                });
                if !s.h2.is_empty() && grpc::is_grpc(req.headers()) {
                    req.headers_mut()
                        .insert(header::TE, HeaderValue::from_static("trailers"));
                }
            }
        }
        *req.uri_mut() = Uri::from_parts(p).expect("scheme, authority and path make a URI");
    }

    /// Send `req` (shaped by [`Self::pooled_target`]) on a shared connection to endpoint
    /// `ep_idx`: the plain pool, the TLS pool, or the endpoint's HTTP/2 connection. An error
    /// says whether the request was never sent (a connect failure, retryable elsewhere) and
    /// what to answer.
    async fn send_pooled(
        &self,
        ep_idx: usize,
        req: Request<UpBody>,
    ) -> Result<Response<Incoming>, (bool, GatewayError)> {
        let sent = match &self.secure {
            Some(s) if !s.h2.is_empty() => {
                return s.h2[ep_idx]
                    .send(&s.connector, ep_idx, req)
                    .await
                    .map_err(DirectError::answer);
            }
            Some(s) => {
                let pool = s.pool.as_ref().expect("a TLS HTTP/1.1 upstream has a pool");
                pool.request(req).await
            }
            None => self.client.request(req).await,
        };
        sent.map_err(|e| (e.is_connect(), classify_error(&e)))
    }

    /// A TCP connection to `ep`, within the connect timeout.
    async fn connect_tcp(&self, ep: &Endpoint) -> std::io::Result<tokio::net::TcpStream> {
        let addr = ep.resolved.load().addr;
        let tcp = tokio::time::timeout(
            self.spec.connect_timeout,
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// Open an HTTP/1.1 connection to `ep`, its driver spawned on the runtime.
    async fn connect(
        &self,
        ep: &Endpoint,
    ) -> std::io::Result<hyper::client::conn::http1::SendRequest<UpBody>> {
        let tcp = self.connect_tcp(ep).await?;
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            // Head and (small) body in one buffer, one write(2): cheaper than a writev of
            // two slices for the requests a gateway mostly carries.
            .writev(false)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(send)
    }
}

/// Whether a failed exchange counts against the endpoint for outlier ejection: it could
/// not be reached, reset the connection or answered garbage, or did not answer in time
/// (the deadline of a request with a body is judged by the caller). A client's own fault
/// (its body too large or broken) never does, or any client could eject endpoints at will.
fn upstream_at_fault(e: &GatewayError) -> bool {
    matches!(
        e,
        GatewayError::UpstreamUnavailable
            | GatewayError::UpstreamReset
            | GatewayError::UpstreamTimeout
            | GatewayError::UpstreamTls
    )
}

/// A failed connect: a failed TLS handshake answers 502 `upstream_tls`, a timeout 504,
/// anything else 502.
fn classify_connect(e: &std::io::Error) -> GatewayError {
    if connect::is_handshake(e) {
        GatewayError::UpstreamTls
    } else if e.kind() == std::io::ErrorKind::TimedOut {
        GatewayError::UpstreamTimeout
    } else {
        GatewayError::UpstreamUnavailable
    }
}

/// Our own body limit, a client body error or an I/O timeout anywhere in an error's chain.
fn classify_chain(e: &(dyn std::error::Error + 'static)) -> Option<GatewayError> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(b) = s.downcast_ref::<BodyError>() {
            return Some(match b {
                BodyError::TooLarge => GatewayError::BodyTooLarge,
                BodyError::Client(_) => GatewayError::BadRequest,
            });
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return Some(GatewayError::UpstreamTimeout);
        }
        src = s.source();
    }
    None
}

/// Map a client error to the answer: our own body limit, a timeout, a connect failure, or
/// anything else the upstream did (reset, garbage, early close).
fn classify_error(e: &hyper_util::client::legacy::Error) -> GatewayError {
    if connect::is_handshake(e) {
        GatewayError::UpstreamTls
    } else if let Some(g) = classify_chain(e) {
        g
    } else if e.is_connect() {
        GatewayError::UpstreamUnavailable
    } else {
        GatewayError::UpstreamReset
    }
}

/// Resolve `host:port` at load time (the background re-resolution uses tokio's resolver).
fn resolve(endpoint: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    endpoint
        .to_socket_addrs()
        .map_err(|e| format!("resolving {endpoint:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{endpoint:?} resolved to no address"))
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in self.tasks.get().into_iter().flatten() {
            t.abort();
        }
    }
}

// === impl Endpoint ===

impl Endpoint {
    /// The address it resolves to now.
    pub fn address(&self) -> SocketAddr {
        self.resolved.load().addr
    }

    /// Set its `tidegate_endpoint_healthy` to whether it is in rotation at `now`.
    fn export(&self, now: u64) {
        let usable = self.health.usable(&mut || now);
        self.healthy_gauge.set(i64::from(usable));
    }

    /// It has just left the rotation for `reason`.
    fn ejected(&self, reason: Reason) {
        self.ejections[reason as usize].inc();
        self.healthy_gauge.set(0);
    }
}

// === impl Resolved ===

impl Resolved {
    fn new(addr: SocketAddr) -> Self {
        let text = addr.to_string();
        Self {
            addr,
            host: HeaderValue::from_str(&text).expect("a socket address is a header value"),
            authority: Authority::try_from(text).expect("a socket address is an authority"),
        }
    }
}

// === impl Slots ===

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self(Mutex::new(Vec::new()))
    }
}

// === impl ConnCache ===

impl ConnCache {
    /// Give back the downstream connection's idle upstream connections, as it parks or
    /// closes: an idle one should hold its socket and little else. Those of [`h1`] go to
    /// their endpoint's stock of idle connections, for whichever downstream connection
    /// needs one next, while their upstream is still one of `upstreams` (the runtime's); the
    /// rest (hyper's, and those of an upstream a reload replaced) are closed.
    pub fn release(&self, upstreams: &[Arc<Upstream>]) {
        let own = std::mem::take(&mut *self.own.0.lock().expect("not poisoned"));
        let hyper = std::mem::take(&mut *self.hyper.0.lock().expect("not poisoned"));
        drop(hyper);
        for ((id, ep), conn) in own {
            if let Some(u) = upstreams.iter().find(|u| u.id == id) {
                u.endpoints[ep]
                    .idle
                    .put(conn, u.spec.pool_max_idle_per_endpoint);
            }
        }
    }
}

impl<T> Slots<T> {
    /// The idle connection kept for `key`, if any.
    fn take(&self, key: (u64, usize)) -> Option<T> {
        let mut v = self.0.lock().expect("not poisoned");
        let i = v.iter().position(|(k, _)| *k == key)?;
        Some(v.swap_remove(i).1)
    }

    /// Keep `conn` for the next request to `key`, dropping the oldest beyond the cap.
    fn put(&self, key: (u64, usize), conn: T) {
        let mut v = self.0.lock().expect("not poisoned");
        if v.len() >= CONN_CACHE_MAX {
            v.remove(0);
        }
        v.push((key, conn));
    }
}

// === impl Tee ===

impl Tee {
    /// A tee that keeps at most `limit` bytes, and the receiver of the whole body.
    pub fn new(limit: u64) -> (Self, tokio::sync::oneshot::Receiver<Bytes>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tee = Self {
            pieces: Vec::new(),
            len: 0,
            limit,
            done: Some(tx),
        };
        (tee, rx)
    }

    fn push(&mut self, d: &Bytes) {
        self.len += d.len() as u64;
        if self.len > self.limit {
            // Over the bound (a body longer than it declared): no copy.
            self.done = None;
            self.pieces = Vec::new();
        } else if self.done.is_some() {
            self.pieces.push(d.clone());
        }
    }

    fn finish(self) {
        let Some(tx) = self.done else { return };
        let body = match self.pieces.len() {
            0 => Bytes::new(),
            1 => self.pieces.into_iter().next().expect("one piece"),
            _ => Bytes::from(self.pieces.concat()),
        };
        // The mirror may have given up waiting: nothing to do then.
        let _ = tx.send(body);
    }
}

// === impl UpstreamBody ===

impl UpstreamBody {
    /// The response head's fields as the own client kept them, if it did (once): the
    /// response's header map has none of them until they are put in it ([`materialize`]).
    pub fn take_raw(&mut self) -> Option<h1::RawFields> {
        match &mut self.inner {
            Received::Own(b) => b.take_raw(),
            _ => None,
        }
    }

    /// A body whose bytes are all here: an answer served from an interface's cache.
    pub fn buffered(body: Bytes) -> Self {
        let body = (!body.is_empty()).then_some(body);
        Self::new(Received::Buffered(body), Duration::MAX)
    }

    fn new(inner: Received, timeout: Duration) -> Self {
        Self {
            inner,
            idle: None,
            armed: false,
            timeout,
            grpc: None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Received::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(ResponseBodyError::from),
            Received::Own(b) => Pin::new(b).poll_frame(cx).map_err(ResponseBodyError::from),
            Received::Buffered(b) => return Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                if let Some(t) = frame.trailers_ref()
                    && let Some(g) = this.grpc.take()
                {
                    g.count(t);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                // The stall deadline counts from the start of this wait for data.
                let timeout = this.timeout;
                let idle = match &mut this.idle {
                    Some(idle) if this.armed => idle,
                    Some(idle) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + timeout);
                        idle
                    }
                    None => this.idle.insert(Box::pin(tokio::time::sleep(timeout))),
                };
                this.armed = true;
                match idle.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(ResponseBodyError::Stalled))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Received::Hyper(b) => b.is_end_stream(),
            Received::Own(b) => b.is_end_stream(),
            Received::Buffered(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Received::Hyper(b) => b.size_hint(),
            Received::Own(b) => b.size_hint(),
            Received::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

// === impl UpBody ===

impl Body for UpBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                BodyState::Empty | BodyState::Done => return Poll::Ready(None),
                BodyState::Parked(slot) => {
                    let taken = slot.lock().expect("not poisoned").take();
                    this.state = match taken {
                        Some((b, tee)) => BodyState::Streaming(b, tee),
                        None => BodyState::Done,
                    };
                }
                BodyState::Buffered(b) => {
                    let data = std::mem::take(b);
                    this.state = BodyState::Done;
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::Streaming(b, tee) => {
                    return match Pin::new(&mut *b).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Some(d) = frame.data_ref() {
                                let n = d.len() as u64;
                                if n > this.remaining {
                                    this.state = BodyState::Done;
                                    return Poll::Ready(Some(Err(BodyError::TooLarge)));
                                }
                                this.remaining -= n;
                                if let Some(t) = tee {
                                    t.push(d);
                                }
                            }
                            // hyper stops polling a body that says it has ended.
                            if b.is_end_stream()
                                && let Some(t) = tee.take()
                            {
                                t.finish();
                            }
                            Poll::Ready(Some(Ok(frame)))
                        }
                        Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                        Poll::Ready(None) => {
                            if let Some(t) = tee.take() {
                                t.finish();
                            }
                            this.state = BodyState::Done;
                            Poll::Ready(None)
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Empty | BodyState::Done => true,
            BodyState::Streaming(b, _) => b.is_end_stream(),
            BodyState::Buffered(b) => b.is_empty(),
            BodyState::Parked(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Streaming(b, _) => b.size_hint(),
            BodyState::Buffered(b) => SizeHint::with_exact(b.len() as u64),
            _ => self.hint,
        }
    }
}
