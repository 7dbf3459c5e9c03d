//! The load driver: envelopes set up first, then open-loop arrivals on a fixed pool of
//! connections (or closed loop, as fast as each connection allows), every outcome counted
//! per interface.
//!
//! Open loop: request `i` is due at `start + schedule[i]` whatever happened before it.
//! Workers (one per HTTP/1.1 connection, or one per h2 stream slot) take the next due
//! request from one shared counter, wait for its time if it is in the future, send it, and
//! measure latency from the time it was *due*: when every connection is busy the wait shows
//! in the latency instead of silently lowering the rate (coordinated omission).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::scenario::{Protocol, Scenario, fill, schedule};
use super::stats::{FALLBACK_MARKER, Outcome, Stats, classify};

/// How arrivals are paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// The scenario's rate profile (open loop).
    Open,
    /// Every worker sends its next request as soon as the last answered, for the length of
    /// the profile (for throughput ceilings; latency is then service time only).
    Closed,
}

/// What a run produced.
#[derive(Debug)]
pub struct Report {
    /// Per interface, in mix order.
    pub rows: Vec<(String, Stats)>,
    /// All interfaces.
    pub total: Stats,
    /// Wall time of the timed part (schedule plus any drain).
    pub elapsed: Duration,
    /// Envelopes created by the set-up.
    pub envelopes: usize,
}

struct Kind {
    name_idx: usize,
    weight_end: u64,
    method: Method,
    path: String,
    body: Option<String>,
    headers: HeaderMap,
    templated_headers: Vec<(HeaderName, String)>,
}

struct Ctx {
    pacing: Pacing,
    schedule: Vec<f64>,
    start: Instant,
    end: Instant,
    drain_end: Instant,
    next: AtomicU64,
    kinds: Vec<Kind>,
    total_weight: u64,
    n_ifaces: usize,
    users: u64,
    user_prefix: String,
    user_header: Option<HeaderName>,
    envelopes: Vec<String>,
    addr: SocketAddr,
    authority: String,
    protocol: Protocol,
    timeout: Duration,
    seed: u64,
}

/// splitmix64: the per-request draws are a pure function of the request's index, so a
/// request never sent still has a known interface.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Parse `http://host:port` into an address and the authority to send.
pub fn parse_target(target: &str) -> anyhow::Result<(SocketAddr, String)> {
    use std::net::ToSocketAddrs;
    let rest = target
        .strip_prefix("http://")
        .with_context(|| format!("target {target:?}: only http:// is supported"))?;
    let authority = rest.trim_end_matches('/').to_owned();
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority:?}"))?
        .next()
        .with_context(|| format!("{authority:?} resolved to nothing"))?;
    Ok((addr, authority))
}

/// Run `scenario` against its target.
pub async fn run(scenario: &Scenario, pacing: Pacing, seed: u64) -> anyhow::Result<Report> {
    let (addr, authority) = parse_target(&scenario.target)?;
    let ifaces = scenario.interfaces();
    let mut kinds = Vec::new();
    let mut acc = 0u64;
    for r in &scenario.mix {
        acc += u64::from(r.weight);
        let mut headers = HeaderMap::new();
        let mut templated = Vec::new();
        for (k, v) in scenario.headers.iter().chain(r.headers.iter()) {
            let name =
                HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("header {k:?}"))?;
            if v.contains('{') {
                templated.push((name, v.clone()));
            } else {
                headers.insert(
                    name,
                    HeaderValue::from_str(v).with_context(|| format!("header {k:?}"))?,
                );
            }
        }
        if r.body.is_some() {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        if scenario.protocol == Protocol::Http1 {
            headers.insert(http::header::HOST, HeaderValue::from_str(&authority)?);
        }
        kinds.push(Kind {
            name_idx: ifaces.iter().position(|n| n == &r.name).expect("listed"),
            weight_end: acc,
            method: Method::from_bytes(r.method.as_bytes())?,
            path: r.path.clone(),
            body: r.body.clone(),
            headers,
            templated_headers: templated,
        });
    }

    let envelopes = match &scenario.setup {
        Some(s) if s.envelopes.count > 0 => create_envelopes(scenario, addr, &authority).await?,
        _ => Vec::new(),
    };

    let sched = match pacing {
        Pacing::Open => schedule(&scenario.profile),
        Pacing::Closed => Vec::new(),
    };
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + scenario.duration();
    let ctx = Arc::new(Ctx {
        pacing,
        schedule: sched,
        start,
        end,
        drain_end: end + Duration::from_millis(scenario.drain_ms),
        next: AtomicU64::new(0),
        kinds,
        total_weight: acc,
        n_ifaces: ifaces.len(),
        users: scenario.users,
        user_prefix: scenario.user_prefix.clone(),
        user_header: scenario
            .user_header
            .as_deref()
            .map(|h| HeaderName::from_bytes(h.as_bytes()))
            .transpose()?,
        envelopes: envelopes.clone(),
        addr,
        authority,
        protocol: scenario.protocol,
        timeout: Duration::from_millis(scenario.timeout_ms),
        seed,
    });

    let mut tasks = Vec::new();
    match scenario.protocol {
        Protocol::Http1 => {
            for _ in 0..scenario.connections {
                let ctx = ctx.clone();
                tasks.push(tokio::spawn(async move { worker_h1(ctx).await }));
            }
        }
        Protocol::H2 => {
            for _ in 0..scenario.connections {
                let send = connect_h2(addr).await?;
                for _ in 0..scenario.h2_streams_per_connection {
                    let ctx = ctx.clone();
                    let send = send.clone();
                    tasks.push(tokio::spawn(async move { worker_h2(ctx, send).await }));
                }
            }
        }
    }
    let mut per = vec![Stats::default(); ifaces.len()];
    for t in tasks {
        let st = t.await?;
        for (a, b) in per.iter_mut().zip(st.iter()) {
            a.merge(b);
        }
    }
    let elapsed = Instant::now().saturating_duration_since(start);
    let mut total = Stats::default();
    for s in &per {
        total.merge(s);
    }
    Ok(Report {
        rows: ifaces.into_iter().zip(per).collect(),
        total,
        elapsed,
        envelopes: envelopes.len(),
    })
}

/// Create the set-up's envelopes over one connection; returns their IDs.
async fn create_envelopes(
    scenario: &Scenario,
    addr: SocketAddr,
    authority: &str,
) -> anyhow::Result<Vec<String>> {
    let e = &scenario.setup.as_ref().expect("checked").envelopes;
    let mut send = connect_h1(addr).await?;
    let mut ids = Vec::with_capacity(e.count);
    for i in 0..e.count {
        let sender = format!("{}sender{i}", scenario.user_prefix);
        let body = serde_json::json!({
            "sender": sender, "total_cents": e.total_cents, "count": e.shares,
            "expires_in_s": e.expires_in_s,
        })
        .to_string();
        let mut b = Request::post("/envelopes")
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json");
        for (k, v) in &scenario.headers {
            b = b.header(k.as_str(), fill(v, &sender, None, 0));
        }
        if let Some(h) = &scenario.user_header {
            b = b.header(h.as_str(), sender.as_str());
        }
        send.ready().await?;
        let resp = send
            .send_request(b.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if status != http::StatusCode::CREATED {
            bail!(
                "creating envelope {i}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)?;
        let id = match &v["id"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => bail!("creating envelope {i}: no id in {other}"),
        };
        ids.push(id);
    }
    Ok(ids)
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn connect_h1(addr: SocketAddr) -> anyhow::Result<H1> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting {addr}"))?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn connect_h2(addr: SocketAddr) -> anyhow::Result<H2> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting {addr}"))?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// The next request a worker should send, or why it should not.
enum Next {
    Send {
        i: u64,
        due: Instant,
    },
    /// Its time passed beyond the drain: counted as offered but never sent.
    Unsent {
        i: u64,
    },
    Stop,
}

impl Ctx {
    async fn next(&self) -> Next {
        match self.pacing {
            Pacing::Closed => {
                let now = Instant::now();
                if now < self.start {
                    tokio::time::sleep_until(self.start).await;
                } else if now >= self.end {
                    return Next::Stop;
                }
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                Next::Send {
                    i,
                    due: Instant::now(),
                }
            }
            Pacing::Open => {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                let Some(&t) = self.schedule.get(i as usize) else {
                    return Next::Stop;
                };
                let due = self.start + Duration::from_secs_f64(t);
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep_until(due).await;
                } else if now > self.drain_end {
                    return Next::Unsent { i };
                }
                Next::Send { i, due }
            }
        }
    }

    fn kind_of(&self, i: u64) -> usize {
        let r = mix64(i ^ self.seed) % self.total_weight;
        self.kinds
            .iter()
            .position(|k| r < k.weight_end)
            .expect("r below the total")
    }

    fn sec(&self, t: Instant) -> usize {
        t.saturating_duration_since(self.start).as_secs() as usize
    }

    /// Build request `i`.
    fn request(&self, i: u64, kind: &Kind) -> Request<Full<Bytes>> {
        let h = mix64(i.wrapping_add(self.seed.rotate_left(17)));
        let user = format!("{}{}", self.user_prefix, h % self.users);
        let env = (!self.envelopes.is_empty())
            .then(|| self.envelopes[(mix64(h) % self.envelopes.len() as u64) as usize].as_str());
        let path = fill(&kind.path, &user, env, i);
        let uri = match self.protocol {
            Protocol::Http1 => path,
            Protocol::H2 => format!("http://{}{}", self.authority, path),
        };
        let body = kind
            .body
            .as_deref()
            .map(|b| Bytes::from(fill(b, &user, env, i)))
            .unwrap_or_default();
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = kind.method.clone();
        *req.uri_mut() = uri.parse().expect("a path from a checked template");
        let mut headers = kind.headers.clone();
        for (n, v) in &kind.templated_headers {
            if let Ok(v) = HeaderValue::from_str(&fill(v, &user, env, i)) {
                headers.insert(n.clone(), v);
            }
        }
        if let Some(uh) = &self.user_header {
            headers.insert(
                uh.clone(),
                HeaderValue::from_str(&user).expect("ASCII user"),
            );
        }
        *req.headers_mut() = headers;
        req
    }
}

async fn finish(
    fut: impl std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>>,
    timeout: Duration,
) -> Result<(u16, bool), ()> {
    let r = tokio::time::timeout(timeout, async {
        let resp = fut.await.map_err(|_| ())?;
        let status = resp.status().as_u16();
        let marker = resp.headers().contains_key(FALLBACK_MARKER);
        resp.into_body().collect().await.map_err(|_| ())?;
        Ok::<_, ()>((status, marker))
    })
    .await;
    r.unwrap_or(Err(()))
}

fn record(ctx: &Ctx, st: &mut [Stats], kind: usize, due: Instant, res: Result<(u16, bool), ()>) {
    let now = Instant::now();
    let lat = now.saturating_duration_since(due).as_micros() as u64;
    let s = &mut st[ctx.kinds[kind].name_idx];
    s.offer(ctx.sec(due));
    match res {
        Ok((status, marker)) => s.record(classify(status, marker), Some(status), lat, ctx.sec(now)),
        Err(()) => s.record(Outcome::Error, None, lat, ctx.sec(now)),
    }
}

fn unsent(ctx: &Ctx, st: &mut [Stats], i: u64) {
    let kind = ctx.kind_of(i);
    let s = &mut st[ctx.kinds[kind].name_idx];
    let due = ctx.start + Duration::from_secs_f64(ctx.schedule[i as usize]);
    s.offer(ctx.sec(due));
    s.unsent += 1;
}

async fn worker_h1(ctx: Arc<Ctx>) -> Vec<Stats> {
    let mut st = vec![Stats::default(); ctx.n_ifaces];
    let mut conn: Option<H1> = None;
    loop {
        let (i, due) = match ctx.next().await {
            Next::Stop => break,
            Next::Unsent { i } => {
                unsent(&ctx, &mut st, i);
                continue;
            }
            Next::Send { i, due } => (i, due),
        };
        let kind = ctx.kind_of(i);
        let req = ctx.request(i, &ctx.kinds[kind]);
        let send = match conn.as_mut() {
            Some(s) if !s.is_closed() => s,
            _ => match tokio::time::timeout(ctx.timeout, connect_h1(ctx.addr)).await {
                Ok(Ok(s)) => conn.insert(s),
                _ => {
                    record(&ctx, &mut st, kind, due, Err(()));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if send.ready().await.is_err() {
            conn = None;
            record(&ctx, &mut st, kind, due, Err(()));
            continue;
        }
        let res = finish(send.send_request(req), ctx.timeout).await;
        if res.is_err() {
            conn = None; // a timed-out HTTP/1.1 connection cannot be reused
        }
        record(&ctx, &mut st, kind, due, res);
    }
    st
}

async fn worker_h2(ctx: Arc<Ctx>, mut send: H2) -> Vec<Stats> {
    let mut st = vec![Stats::default(); ctx.n_ifaces];
    loop {
        let (i, due) = match ctx.next().await {
            Next::Stop => break,
            Next::Unsent { i } => {
                unsent(&ctx, &mut st, i);
                continue;
            }
            Next::Send { i, due } => (i, due),
        };
        let kind = ctx.kind_of(i);
        let req = ctx.request(i, &ctx.kinds[kind]);
        if send.is_closed() {
            match tokio::time::timeout(ctx.timeout, connect_h2(ctx.addr)).await {
                Ok(Ok(s)) => send = s,
                _ => {
                    record(&ctx, &mut st, kind, due, Err(()));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        if send.ready().await.is_err() {
            record(&ctx, &mut st, kind, due, Err(()));
            continue;
        }
        let res = finish(send.send_request(req), ctx.timeout).await;
        record(&ctx, &mut st, kind, due, res);
    }
    st
}
