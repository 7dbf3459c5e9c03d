//! End-to-end test support: config fixtures, upstream test servers, clients, certificates
//! and the gateway as a real child process.
//!
//! Everything binds `127.0.0.1:0`; nothing here uses a fixed port. Every network wait is
//! bounded by [`TIMEOUT`], and everything started here stops when its handle is dropped
//! (upstream tasks are aborted, child processes killed, temp dirs removed).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub mod api;
pub mod grab;
pub mod killable;
pub mod layout;
pub mod otlp;
pub mod raw;
pub mod redis;

pub use api::start_gateway;

/// Upper bound for any single network exchange in a test.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// Body type of requests sent by test clients (a whole buffer or a stream).
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// A pooled client for plain HTTP (HTTP/1.1 or prior-knowledge h2c).
pub type Client = LegacyClient<HttpConnector, ReqBody>;

// === config fixtures ===

/// A complete config: one plain listener and the admin port on `127.0.0.1:0`, the example
/// interfaces, and one static upstream `up` with the given endpoints behind the default
/// route. Tests adjust it with [`set`].
pub fn config(endpoints: &[SocketAddr]) -> Value {
    let endpoints: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
    json!({
        "schema_version": 1,
        "server": {
            "listeners": [{ "name": "public", "address": "127.0.0.1:0" }],
            "admin": { "address": "127.0.0.1:0" },
            "limits": {},
            "shutdown_grace_ms": 5000,
            "access_log": { "enabled": false, "format": "json" }
        },
        "interfaces": [
            { "name": "create", "method": "POST", "path": "/envelopes" },
            { "name": "grab",   "method": "POST", "path": "/envelopes/{id}/grab" },
            { "name": "open",   "method": "GET",  "path": "/envelopes/{id}" },
            { "name": "health", "method": "GET",  "path": "/healthz" }
        ],
        "upstreams": {
            "up": {
                "endpoints": endpoints,
                "connect_timeout_ms": 1000,
                "request_timeout_ms": 5000
            }
        },
        "routes": [{ "name": "default", "upstream": "up" }]
    })
}

/// Set the value at a `/`-separated path (`server/limits/max_body_bytes`,
/// `server/listeners/0/tls`), creating objects on the way.
pub fn set(config: &mut Value, path: &str, value: Value) {
    let mut at = config;
    for key in path.split('/') {
        at = match at {
            Value::Array(items) => key
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get_mut(i))
                .unwrap_or_else(|| panic!("{path}: no element {key:?}")),
            Value::Object(map) => map.entry(key).or_insert_with(|| json!({})),
            _ => panic!("{path}: {key:?} is not inside an object or array"),
        };
    }
    *at = value;
}

/// [`config`] with the given rate `limits`.
pub fn config_with_limits(endpoints: &[SocketAddr], limits: Value) -> Value {
    let mut c = config(endpoints);
    set(&mut c, "limits", limits);
    c
}

/// Add the interface `share` (`POST /envelopes/{id}/share`) to a config.
pub fn add_share_interface(config: &mut Value) {
    config["interfaces"]
        .as_array_mut()
        .expect("interfaces is an array")
        .push(json!({ "name": "share", "method": "POST", "path": "/envelopes/{id}/share" }));
}

/// An HTTP relay in front of a real service (the grab backend, say): every request is
/// counted by method and path, optionally held for `delay` (a slow service, so that
/// concurrent requests overlap), and passed on whole; the service's answer is passed back.
/// It tells how many requests reached the service behind a gateway.
pub struct CountingRelay {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<(http::Method, String)>>>,
    task: JoinHandle<()>,
}

impl CountingRelay {
    /// Relay to `target`, holding each request `delay` before passing it on.
    pub async fn start(target: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("a bound address");
        let seen: Arc<Mutex<Vec<(http::Method, String)>>> = Arc::default();
        let (log, client) = (seen.clone(), h1_client());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (log, client) = (log.clone(), client.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (log, client) = (log.clone(), client.clone());
                        async move {
                            let (mut parts, body) = req.into_parts();
                            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                            log.lock()
                                .expect("not poisoned")
                                .push((parts.method.clone(), path.to_owned()));
                            parts.uri = format!("http://{target}{path}").parse().expect("a URI");
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            tokio::time::sleep(delay).await;
                            let resp = client.request(Request::from_parts(parts, full(body))).await;
                            let resp = match resp {
                                Ok(r) => read_reply(r).await,
                                Err(e) => panic!("the relayed service failed: {e}"),
                            };
                            let mut out = Response::new(Full::new(resp.body));
                            *out.status_mut() = resp.status;
                            *out.headers_mut() = resp.headers;
                            Ok::<_, Infallible>(out)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    /// Requests relayed so far with this method and path (query included).
    pub fn count(&self, method: &http::Method, path: &str) -> usize {
        let seen = self.seen.lock().expect("not poisoned");
        seen.iter()
            .filter(|(m, p)| m == method && p == path)
            .count()
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream that answers 500 while `failing` is set and 200 otherwise, counting requests.
pub struct Switchable {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Answer 500 while set.
    pub failing: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Switchable {
    /// Start one, healthy.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let failing = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let (f, h) = (failing.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (f, h) = (f.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let status = if f.load(Ordering::SeqCst) {
                            StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            StatusCode::OK
                        };
                        async move {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
                            *r.status_mut() = status;
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            failing,
            hits,
            task,
        }
    }

    /// Requests it has received.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Switchable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener that accepts connections and never reads from or answers them (a hung
/// service); it holds every connection until dropped.
#[derive(Debug)]
pub struct Blackhole {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Blackhole {
    /// Start one.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("a bound address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::Relaxed);
                held.push(stream);
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of the series written exactly as `series` (`name{labels}`, labels in the
/// order the gateway writes them) in a Prometheus text exposition, if present.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
}

/// An address that was bound and then closed: connecting to it is refused.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("a bound address")
}

// === upstream test server ===

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request method.
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// HTTP version on the upstream connection.
    pub version: Version,
    /// Every header as received.
    pub headers: HeaderMap,
}

/// A request the upstream has read to its end: its head and the start of its body.
#[derive(Debug, Clone)]
pub struct Received {
    /// Every header as received.
    pub headers: HeaderMap,
    /// The body's first [`KEPT_BODY_BYTES`] bytes.
    pub body: Bytes,
}

/// Bytes of each request body an [`Upstream`] keeps for [`Upstream::received`].
pub const KEPT_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Log {
    seen: Mutex<Vec<Seen>>,
    received: Mutex<Vec<Received>>,
    body_bytes: AtomicU64,
    /// Wait before answering anything, in milliseconds (see [`Upstream::set_delay`]).
    delay_ms: AtomicU64,
    /// Requests being answered now, and the most there ever were at once.
    busy: AtomicUsize,
    most_busy: AtomicUsize,
    /// Connections accepted (TLS ones counted whether their handshake succeeds or not).
    connections: AtomicUsize,
}

/// A test upstream on `127.0.0.1:0` (HTTP/1.1 and h2c). It records every request head as
/// it arrives and answers by query parameters, so one server covers every scenario:
///
/// - `sleep_ms=N`: wait N ms before reading the body and answering;
/// - `download=N`: answer with N bytes streamed in 64 KiB chunks;
/// - `hop=1`: answer with hop-by-hop headers (`Connection: x-up-secret`, `x-up-secret`,
///   `Keep-Alive`) that a proxy must strip;
/// - `ka=1`: answer with `Connection: keep-alive`, `Keep-Alive: timeout=5` and
///   `Proxy-Connection: keep-alive` (hop-by-hop, naming no other field);
/// - otherwise: read the body (counting, never buffering it) and answer 200 with JSON
///   `{"method", "path", "version", "body_len", "headers": {name: value}}`.
#[derive(Debug)]
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<Log>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Start one.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Start one behind TLS with `cfg` (see [`tls_server`]): HTTP/1.1 or HTTP/2 by what
    /// the connection speaks. A connection whose handshake fails is dropped unserved.
    pub async fn start_tls(cfg: Arc<rustls::ServerConfig>) -> Self {
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(cfg))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("a bound address");
        let log = Arc::new(Log::default());
        let l = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                l.connections.fetch_add(1, Ordering::Relaxed);
                let log = l.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(upstream_answer(req, &log).await) }
                    });
                    let auto = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        None => auto.serve_connection(TokioIo::new(stream), svc).await,
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(s) => auto.serve_connection(TokioIo::new(s), svc).await,
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        Self { addr, log, task }
    }

    /// Request heads seen so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.log.seen.lock().expect("not poisoned").clone()
    }

    /// Number of requests that reached this upstream.
    pub fn hits(&self) -> usize {
        self.log.seen.lock().expect("not poisoned").len()
    }

    /// Request body bytes received over all requests.
    pub fn body_bytes(&self) -> u64 {
        self.log.body_bytes.load(Ordering::Relaxed)
    }

    /// Requests read to their end so far (head and body start), in the order they ended.
    pub fn received(&self) -> Vec<Received> {
        self.log.received.lock().expect("not poisoned").clone()
    }

    /// Make every answer from now on wait `d` first (a slow service), on top of `sleep_ms`.
    pub fn set_delay(&self, d: Duration) {
        self.log
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.log.connections.load(Ordering::Relaxed)
    }

    /// The most requests it was answering at once so far.
    pub fn most_concurrent(&self) -> usize {
        self.log.most_busy.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpBody = BoxBody<Bytes, Infallible>;

async fn upstream_answer(req: Request<Incoming>, log: &Log) -> Response<UpBody> {
    /// Counts the request out however it ends (a client that goes away drops it).
    struct Busy<'a>(&'a AtomicUsize);
    impl Drop for Busy<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let busy = log.busy.fetch_add(1, Ordering::Relaxed) + 1;
    let _busy = Busy(&log.busy);
    log.most_busy.fetch_max(busy, Ordering::Relaxed);
    upstream_answer_inner(req, log).await
}

async fn upstream_answer_inner(req: Request<Incoming>, log: &Log) -> Response<UpBody> {
    let (parts, mut body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    log.seen.lock().expect("not poisoned").push(Seen {
        method: parts.method.clone(),
        path: path.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
    });
    let query: BTreeMap<&str, &str> = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let num = |k: &str| query.get(k).and_then(|v| v.parse::<u64>().ok());

    let delay = log.delay_ms.load(Ordering::Relaxed) + num("sleep_ms").unwrap_or(0);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut body_len = 0u64;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(d) = frame.data_ref() {
            body_len += d.len() as u64;
            log.body_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            let room = KEPT_BODY_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&d[..d.len().min(room)]);
        }
    }
    log.received.lock().expect("not poisoned").push(Received {
        headers: parts.headers.clone(),
        body: Bytes::from(kept),
    });

    if let Some(n) = num("download") {
        return Response::new(streamed_body(n).map_err(|e| match e {}).boxed());
    }
    let headers: BTreeMap<&str, &str> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("<binary>")))
        .collect();
    let answer = json!({
        "method": parts.method.as_str(),
        "path": path,
        "version": format!("{:?}", parts.version),
        "body_len": body_len,
        "headers": headers,
    });
    let mut resp = Response::new(
        Full::new(Bytes::from(answer.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("valid"));
    if num("ka") == Some(1) {
        let h = resp.headers_mut();
        h.insert("connection", "keep-alive".parse().expect("valid"));
        h.insert("keep-alive", "timeout=5".parse().expect("valid"));
        h.insert("proxy-connection", "keep-alive".parse().expect("valid"));
    }
    if num("hop") == Some(1) {
        let h = resp.headers_mut();
        h.insert("connection", "x-up-secret".parse().expect("valid"));
        h.insert("x-up-secret", "1".parse().expect("valid"));
        h.insert("keep-alive", "timeout=5".parse().expect("valid"));
        h.insert("x-up-visible", "1".parse().expect("valid"));
    }
    resp
}

/// `n` bytes of `b'x'`, streamed in 64 KiB chunks that share one buffer.
pub fn streamed_body(
    n: u64,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let frames = (0..n.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(n - i * CHUNK) as usize;
        Ok(Frame::data(chunk.slice(..len)))
    });
    StreamBody::new(futures_util::stream::iter(frames))
}

// === clients ===

/// An HTTP/1.1 client.
pub fn h1_client() -> Client {
    LegacyClient::builder(TokioExecutor::new()).build_http()
}

/// A prior-knowledge HTTP/2 (h2c) client.
pub fn h2c_client() -> Client {
    LegacyClient::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A whole request body.
pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A streamed request body of `n` bytes.
pub fn streamed(n: u64) -> ReqBody {
    streamed_body(n).map_err(|e| match e {}).boxed()
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// HTTP version of the downstream connection.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the body text when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Read a response whole, within [`TIMEOUT`].
pub async fn read_reply<B>(resp: Response<B>) -> Reply
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .expect("the body arrives in time")
        .expect("the body reads")
        .to_bytes();
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

/// Send a request and read the response whole, within [`TIMEOUT`].
pub async fn send(client: &Client, req: Request<ReqBody>) -> Reply {
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .expect("the response head arrives in time")
        .expect("the request is answered");
    read_reply(resp).await
}

/// `GET http://{addr}{path}`.
pub async fn get(client: &Client, addr: SocketAddr, path: &str) -> Reply {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(full(Bytes::new()))
        .expect("a valid request");
    send(client, req).await
}

/// `POST http://{addr}{path}` with a body.
pub async fn post(client: &Client, addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> Reply {
    let req = Request::post(format!("http://{addr}{path}"))
        .body(full(body))
        .expect("a valid request");
    send(client, req).await
}

/// `POST http://{addr}{path}` with an empty body as `user` of `app` (headers `x-app-id`
/// and `x-user-id`).
pub async fn post_as(
    client: &Client,
    addr: SocketAddr,
    path: &str,
    app: &str,
    user: &str,
) -> Reply {
    let req = Request::post(format!("http://{addr}{path}"))
        .header("x-app-id", app)
        .header("x-user-id", user)
        .body(full(Bytes::new()))
        .expect("a valid request");
    send(client, req).await
}

/// A grab (`POST /envelopes/7/grab`) as `user` of `app`.
pub async fn grab_as(client: &Client, addr: SocketAddr, app: &str, user: &str) -> Reply {
    post_as(client, addr, "/envelopes/7/grab", app, user).await
}

// === TLS ===

/// A self-signed certificate for `localhost`, written as PEM files into a temp dir.
#[derive(Debug)]
pub struct TestCert {
    /// The certificate, DER, to trust in clients.
    pub der: CertificateDer<'static>,
    /// The certificate PEM file.
    pub cert_path: PathBuf,
    /// The private key PEM file.
    pub key_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Generate a certificate for `localhost` and write it out.
pub fn test_cert() -> TestCert {
    test_cert_for(&["localhost"])
}

/// Generate a self-signed certificate for `names` (DNS names or IP addresses, each a
/// subject alternative name) and write it out.
pub fn test_cert_for(names: &[&str]) -> TestCert {
    let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
    let ck = rcgen::generate_simple_self_signed(names).expect("generating a certificate");
    let dir = tempfile::tempdir().expect("a temp dir");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).expect("writing the certificate");
    std::fs::write(&key_path, ck.key_pair.serialize_pem()).expect("writing the key");
    TestCert {
        der: ck.cert.der().clone(),
        cert_path,
        key_path,
        _dir: dir,
    }
}

/// A client config trusting only `cert`, offering `alpn` and the given TLS versions.
pub fn tls_client(
    cert: &TestCert,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).expect("a valid certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("supported versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A server config presenting `cert`, offering `alpn` (none: no ALPN at all), and, with
/// `client_ca`, requiring a client certificate that chains to it.
pub fn tls_server(
    cert: &TestCert,
    alpn: &[&[u8]],
    client_ca: Option<&TestCert>,
) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("supported versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der.clone()).expect("a valid certificate");
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .expect("a client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let key = PrivateKeyDer::from_pem_file(&cert.key_path).expect("the key file");
    let mut cfg = builder
        .with_single_cert(vec![cert.der.clone()], key)
        .expect("a usable certificate and key");
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// What a TLS exchange negotiated, and the answer.
#[derive(Debug)]
pub struct TlsReply {
    /// The ALPN protocol the server chose.
    pub alpn: Option<Vec<u8>>,
    /// The TLS version.
    pub tls_version: Option<rustls::ProtocolVersion>,
    /// The response.
    pub reply: Reply,
}

/// `GET https://localhost{path}` on `addr` over one new TLS connection, speaking h2 if the
/// server chose it by ALPN and HTTP/1.1 otherwise.
pub async fn tls_get(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, path: &str) -> TlsReply {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.expect("connecting");
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").expect("a DNS name"), tcp)
            .await
            .expect("the TLS handshake succeeds");
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let tls_version = tls.get_ref().1.protocol_version();
        let io = TokioIo::new(tls);
        let resp = if alpn.as_deref() == Some(b"h2") {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("the h2 handshake succeeds");
            tokio::spawn(conn);
            let req = Request::get(format!("https://localhost{path}"))
                .body(Full::new(Bytes::new()))
                .expect("a valid request");
            send.send_request(req).await.expect("an h2 answer")
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("the h1 handshake succeeds");
            tokio::spawn(conn);
            let req = Request::get(path)
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .expect("a valid request");
            send.send_request(req).await.expect("an h1 answer")
        };
        TlsReply {
            alpn,
            tls_version,
            reply: read_reply(resp).await,
        }
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .expect("the TLS exchange finishes in time")
}

// === the gateway as a child process ===

/// The `tidegate` binary of this build profile, built on first use.
pub fn tidegate_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("tidegate", "tidegate"))
        .clone()
}

/// Build binary `bin` of workspace package `package` in this build profile and return its
/// path (cargo hands a test only its own package's binaries via `CARGO_BIN_EXE_*`).
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    // The test executable is `<target>/<profile>/deps/<name>`; binaries sit in
    // `<target>/<profile>/`.
    let exe = std::env::current_exe().expect("the test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable is in <target>/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("<target>").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
    // Cargo gives the test process the variables of *this* package. Build scripts
    // (ring's, via cc) track some of them, so passing them on would make this build
    // and the next ordinary one rebuild each other's dependencies every time.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&&*k)
        {
            cmd.env_remove(&*k);
        }
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .unwrap_or_else(|e| panic!("running cargo build -p {package}: {e}"));
    assert!(status.success(), "cargo build -p {package} failed");
    let path = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// `tidegate check --config PATH` with the real binary: its exit code and standard error.
pub fn tidegate_check(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(tidegate_bin())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("running tidegate check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `tidegate run` child process serving a config written to a temp dir. Killed on drop.
#[derive(Debug)]
pub struct ChildGateway {
    child: Child,
    /// The traffic listener's bound address, read from the `listening` log line.
    pub addr: SocketAddr,
    /// The admin listener's bound address, read from the `admin listening` log line.
    pub admin_addr: SocketAddr,
    /// Every line the child wrote to stdout (its log, access log included), in order.
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl ChildGateway {
    /// Write `config` to a temp file and run the gateway on it; returns once it logs its
    /// listening address. Its stdout is drained on a thread for the rest of its life.
    pub fn spawn(config: &Value) -> Self {
        Self::spawn_with_files(config, &[])
    }

    /// [`ChildGateway::spawn`], with `files` (name, content) written beside the config first
    /// (an admin token file, say).
    pub fn spawn_with_files(config: &Value, files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("writing a file");
        }
        let path = dir.path().join("tidegate.json");
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(config).expect("serializes"),
        )
        .expect("writing the config");
        Self::spawn_file(&path, dir)
    }

    /// Run the gateway on the config file at `path`, keeping `dir` (the directory it and
    /// anything it includes live in) until the gateway is dropped.
    pub fn spawn_file(path: &Path, dir: tempfile::TempDir) -> Self {
        let mut child = Command::new(tidegate_bin())
            .arg("run")
            .arg("--config")
            .arg(path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting tidegate");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                kept.lock().expect("the log lock").push(line.clone());
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let admin = match v["message"].as_str() {
                    Some("listening") => false,
                    Some("admin listening") => true,
                    _ => continue,
                };
                if let Some(addr) = v["addr"].as_str().and_then(|a| a.parse().ok()) {
                    let _ = tx.send((admin, addr));
                }
            }
        });
        // The traffic listener is logged first, then the admin listener.
        let mut addrs: [Option<SocketAddr>; 2] = [None, None];
        let deadline = std::time::Instant::now() + TIMEOUT;
        while addrs.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok((admin, a)) => addrs[usize::from(admin)] = Some(a),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("tidegate did not log its listening addresses: {e}");
                }
            }
        }
        Self {
            child,
            addr: addrs[0].expect("set above"),
            admin_addr: addrs[1].expect("set above"),
            lines,
            _dir: dir,
        }
    }

    /// The lines the child has written to stdout so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.lock().expect("the log lock").clone()
    }

    /// Resident set size now, in bytes (`VmRSS` of `/proc/PID/status`).
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.child.id())
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// File descriptors the child has open now.
    pub fn fd_count(&self) -> usize {
        fd_count(self.child.id())
    }

    /// Send SIGTERM and wait up to `within` for the exit: the exit status and how long it
    /// took, or `None` (the child is then killed) if it did not exit in time.
    pub fn terminate(&mut self, within: Duration) -> Option<(std::process::ExitStatus, Duration)> {
        let sent = std::time::Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
        loop {
            if let Some(s) = self.child.try_wait().expect("waiting for tidegate") {
                return Some((s, sent.elapsed()));
            }
            if sent.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmRSS` of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    try_rss_bytes(pid).unwrap_or_else(|| panic!("no VmRSS for process {pid}"))
}

fn try_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())?;
    Some(kib * 1024)
}

/// Samples a process's RSS on a thread until dropped, keeping the peak.
#[derive(Debug)]
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    /// Sample `pid` every 10 ms.
    pub fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid)));
        let stop = Arc::new(AtomicUsize::new(0));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while s.load(Ordering::Relaxed) == 0 {
                if let Some(rss) = try_rss_bytes(pid) {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The highest RSS seen so far, in bytes.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(1, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// === file descriptors and latency figures ===

/// The soft limit on open file descriptors of this process (`Max open files` in
/// `/proc/self/limits`; child processes inherit it). `None` when unlimited or unreadable.
pub fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// File descriptors process `pid` has open now (entries of `/proc/PID/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"))
        .count()
}

/// The `p` quantile (`0.0..=1.0`, nearest rank) of `samples`, which it sorts. Zero when
/// there are none.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}
