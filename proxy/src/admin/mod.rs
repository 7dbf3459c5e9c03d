//! The admin listener: `/healthz` (the process is up), `/readyz` (listeners bound, embedded
//! upstreams started, not shutting down) and `/metrics` (Prometheus text).
//!
//! Kept apart from traffic listeners so probes and scrapes work even when traffic
//! listeners are saturated, and so it can be bound to a private address. `/admin/explain`
//! explains a decision, phase by phase, against the live rules (see [`explain`]);
//! `/admin/config` shows the live config's generation, hash, load time and last reload error;
//! `/admin/config/history` lists the applied configs kept (see `control::history`);
//! `/admin/overload` shows the overload caps (limits, slots in use, queue depths) and the
//! admission level.
//!
//! Every request passes [`guard`] first: its `Host` must name this port (403
//! `forbidden_host` otherwise) and, with `server.admin.token_file`, every endpoint but the
//! probes needs `Authorization: Bearer <token>` (401 otherwise). At most
//! `server.admin.max_connections` connections are served at once; further ones wait in the
//! kernel's accept queue, so the admin port cannot eat the data plane's descriptors.
//!
//! - [`guard`]: the `Host` check, the bearer token and reading the token file.
//! - [`explain`]: the query behind `tidegate explain` and `/admin/explain`.
//! - [`status`]: the dashboard's per-second sampler and `/admin/status.json`.

pub mod explain;
pub mod guard;
pub mod status;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::control::reload::Reloader;
use crate::metrics::Metrics;
use crate::respond::json;
use crate::runtime::Live;

/// State the admin endpoints report.
#[derive(Debug)]
pub struct AdminState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Set once everything is started; cleared when shutdown begins.
    pub ready: AtomicBool,
    /// The live runtime, for `/admin/explain` and `/admin/overload`.
    pub live: Arc<Live>,
    /// The reloader, for `/admin/config` (absent when not started from a file).
    pub reloader: Option<Arc<Reloader>>,
    /// The dashboard's status document, for `/admin/status.json` (sampled once a second by
    /// [`status::sample`], serialized when asked for).
    pub stats: Arc<status::Stats>,
    /// Who may ask: allowed `Host`s and the token.
    pub guard: guard::Guard,
    /// Most connections served at once.
    pub max_connections: usize,
}

/// Serve the admin endpoints until shutdown.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Accept only with a permit in hand: past the cap, connections wait in the kernel's
    // accept queue (and count against no descriptor of ours) until one closes.
    let permits = Arc::new(Semaphore::new(state.max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the admin semaphore is never closed"),
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(refusal) = state.guard.check(req.uri().path(), req.headers()) {
        let (status, body) = refusal.answer();
        let mut r = json(status, Bytes::from_static(body));
        if refusal == guard::Refusal::Token {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tidegate-admin\""),
            );
        }
        return r;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(br#"{"error":"method_not_allowed"}"#),
        );
    }
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#)),
        "/readyz" => {
            if state.ready.load(Ordering::Relaxed) {
                json(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from_static(br#"{"status":"not_ready"}"#),
                )
            }
        }
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.encode())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/admin/status.json" => {
            let mut r = json(StatusCode::OK, state.stats.latest());
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        "/admin" | "/admin/" | "/admin/dashboard" => asset(
            "text/html; charset=utf-8",
            include_str!("dashboard/index.html"),
        ),
        "/admin/dashboard.js" => asset(
            "text/javascript; charset=utf-8",
            include_str!("dashboard/dashboard.js"),
        ),
        "/admin/dashboard.css" => asset(
            "text/css; charset=utf-8",
            include_str!("dashboard/dashboard.css"),
        ),
        "/admin/config" => match &state.reloader {
            Some(r) => json(
                StatusCode::OK,
                Bytes::from(serde_json::to_vec_pretty(&r.status()).expect("status serializes")),
            ),
            None => json(
                StatusCode::OK,
                Bytes::from_static(br#"{"file":null,"generation":1,"reload":"disabled"}"#),
            ),
        },
        "/admin/config/history" => {
            let body = match state.reloader.as_ref().and_then(|r| r.history()) {
                Some(h) => {
                    let (entries, errors) = h.list();
                    serde_json::json!({ "entries": entries, "errors": errors })
                }
                None => serde_json::json!({ "entries": [], "errors": [], "kept": false }),
            };
            json(
                StatusCode::OK,
                Bytes::from(serde_json::to_vec_pretty(&body).expect("the history serializes")),
            )
        }
        "/admin/overload" => {
            let rt = state.live.runtime.load();
            json(
                StatusCode::OK,
                Bytes::from(
                    serde_json::to_vec_pretty(&rt.overload.status())
                        .expect("the overload status serializes"),
                ),
            )
        }
        "/admin/explain" => {
            let q = explain::query_from_url(req.uri().query().unwrap_or(""));
            let rt = state.live.runtime.load();
            let explained = q.and_then(|q| explain::explain_live(&rt, &q)).map(|mut e| {
                let rule = e.route.decision.as_ref().map(|d| d.rule.as_str());
                if let (Some(rule), Some(r)) = (rule, &state.reloader) {
                    e.ramp = r.ramps().into_iter().find(|s| s.route == rule);
                }
                e
            });
            match explained {
                Ok(e) => json(
                    StatusCode::OK,
                    Bytes::from(serde_json::to_vec_pretty(&e).expect("an explanation serializes")),
                ),
                Err(msg) => json(
                    StatusCode::BAD_REQUEST,
                    Bytes::from(
                        serde_json::json!({ "error": "bad_request", "message": msg }).to_string(),
                    ),
                ),
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            Bytes::from_static(br#"{"error":"not_found"}"#),
        ),
    }
}

/// A dashboard asset, embedded in the binary (no CDN: the page works offline).
fn asset(content_type: &'static str, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidate each load: a restarted gateway of a newer version serves newer assets.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Defense in depth: only our own script and style run, and no other site frames it.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; \
             base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}
