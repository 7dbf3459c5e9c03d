//! The record phase: the response the client gets, and what the gateway writes down about
//! it (Prometheus metrics, the dashboard's counters, the access log).
//!
//! What a request will be counted under is taken when it is decided ([`Record::start`]);
//! the answer is known only after the exchange ([`Record::finish`]). Nothing here decides
//! anything: the [`Class`] of a local answer comes from the phase that made it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body_util::{Either, Full};
use rules::{InterfaceId, UpstreamId};

use rules::RequestParts;

use super::decide::{Action, Answered, Decision};
use super::identity::Verdict;
use crate::clock::Stamp;
use crate::conn::ConnInfo;
use crate::metrics::{Name, RequestLabels, UpstreamErrorLabels, status_class};
use crate::respond::{self, GatewayError};
use crate::runtime::Runtime;
use crate::stats::{Class, Tally};
use crate::trace::TraceContext;
use crate::trace::export::{Exporter, SpanRecord};
use crate::upstream::UpstreamBody;
use crate::upstream::grpc::is_grpc;
use crate::upstream::headers::strip_hop_by_hop;

/// The response body: the upstream's, streamed, or one the gateway made.
pub type RespBody = Either<UpstreamBody, Full<Bytes>>;

/// The upstream's header fields that `body` holds as they came, if it does (once; see
/// `upstream::h1::RawFields`).
pub fn take_raw(body: &mut RespBody) -> Option<crate::upstream::h1::RawFields> {
    match body {
        Either::Left(u) => u.take_raw(),
        Either::Right(_) => None,
    }
}

/// The upstream's response and the time to its head, or the error standing in for it.
pub type Exchange = Result<(Response<UpstreamBody>, Duration), GatewayError>;

/// How a request was answered: by the gateway itself, or by an exchange with an upstream
/// (or the error standing in for one: no route, body too large, upstream failure).
// The exchange (the common case) is not boxed: that would allocate per forwarded request.
#[derive(Debug)]
pub enum Answer {
    /// A local answer and its class.
    Local(Box<Response<Full<Bytes>>>, Class),
    /// The upstream it was meant for, and the exchange.
    Exchange(Option<UpstreamId>, Exchange),
    /// An answer of that upstream kept by the interface's cache, or shared by another
    /// request's call: counted like the upstream's, with no latency of its own.
    Cached(UpstreamId, Response<UpstreamBody>),
}

/// What a request will be counted and logged under.
#[derive(Debug)]
pub struct Record {
    tally: Tally,
    interface: Option<InterfaceId>,
    started: Stamp,
    /// When the answer was had, if the caller read the clock then (else it is read here).
    done: Option<Stamp>,
    /// Who asked and where it was routed, for the access log and the span (copied only
    /// when one of them is written). Boxed: a record without one is moved through the
    /// request path's futures in a few words, not 200 bytes.
    who: Option<Box<Who>>,
    /// The request is gRPC: the gateway's own answers to it are gRPC statuses.
    grpc: bool,
    to: Recorder,
}

/// Where a request's record goes besides the metrics.
#[derive(Debug)]
pub struct Recorder {
    /// The access log.
    pub log: bool,
    /// The span exporter, for a sampled request when export is on.
    pub export: Option<Exporter>,
}

/// Client address, identity outcome, app, user and route rule of a request, for its access
/// log line, and what `tidegate replay` needs to decide it again: when it was decided, the
/// method and path, the header values the rules read, and what the decision came to.
#[derive(Debug)]
struct Who {
    client: Option<std::net::IpAddr>,
    /// `unverified`, `verified`, or why the request is anonymous or refused (a token
    /// error's code).
    identity: &'static str,
    app: Option<String>,
    user: Option<String>,
    route: Option<Arc<str>>,
    /// When it was decided, in microseconds since the Unix epoch: the clock a replay runs
    /// the limits on (the line is written later, when the answer is known).
    at_us: u64,
    method: Option<http::Method>,
    /// The path without the query (the rules never read the query, and it may carry
    /// secrets), cut to [`MAX_LOGGED_PATH`] bytes and then ending in `…`.
    path: String,
    /// The values of [`Runtime::access_inputs`] the request carried (see [`log_inputs`]).
    inputs: String,
    answered: Answered,
    /// The limit, fallback or breaker that answered.
    rule: Option<Arc<str>>,
}

/// Longest path logged, in bytes.
pub const MAX_LOGGED_PATH: usize = 256;
/// Longest header value logged, in bytes: a longer one is logged by name alone.
pub const MAX_LOGGED_VALUE: usize = 128;
/// Longest `inputs` field, in bytes: headers past it are logged by name alone.
pub const MAX_LOGGED_INPUTS: usize = 512;

/// What identifies a request to others: its request ID (sent back as `X-Request-Id`) and
/// its trace context, when propagation is on.
#[derive(Debug, Clone)]
pub struct Ids {
    pub request: HeaderValue,
    pub trace: Option<TraceContext>,
}

pub use crate::upstream::headers::X_REQUEST_ID;

// === impl Record ===

impl Record {
    /// Take what the decision says the request is counted under; count a split's choice.
    pub fn start(
        rt: &Runtime,
        d: &Decision<'_, '_>,
        req: RequestParts<'_>,
        identity: Verdict,
        to: Recorder,
        started: Stamp,
    ) -> Self {
        let forwarded = match &d.action {
            Action::Forward { upstream, .. } => Some(*upstream),
            _ => None,
        };
        let tally = rt
            .stats
            .tally(d.class.interface, d.route.as_ref(), forwarded);
        let who = (to.log || to.export.is_some()).then(|| {
            let (answered, rule) = d.answered();
            // A span carries neither the user, the path nor the inputs: copied for the log.
            let log = to.log;
            Box::new(Who {
                client: d.client_ip,
                identity: identity.log_field(),
                app: d.class.app.as_deref().map(str::to_owned),
                user: d.class.user.as_deref().filter(|_| log).map(str::to_owned),
                route: d.route.as_ref().map(|r| Arc::clone(r.rule_name)),
                at_us: unix_micros(),
                method: Some(req.method.clone()),
                path: if log {
                    bounded_path(req.path)
                } else {
                    String::new()
                },
                inputs: if log {
                    log_inputs(&rt.access_inputs, req.headers)
                } else {
                    String::new()
                },
                answered,
                rule: rule.cloned(),
            })
        });
        Self {
            tally,
            interface: d.class.interface,
            started,
            done: None,
            who,
            to,
            grpc: is_grpc(req.headers),
        }
    }

    /// The answer was had at `at` (a clock reading the caller made anyway).
    pub fn done_at(&mut self, at: Stamp) {
        self.done = Some(at);
    }

    /// Answer as gRPC (when `grpc`) if the gateway answers itself.
    pub fn grpc(mut self, grpc: bool) -> Self {
        self.grpc = grpc;
        self
    }

    /// What a request refused before its decision is counted under: no interface, no
    /// route, no upstream. `identity` is the access log's identity field.
    pub fn unclassified(
        rt: &Runtime,
        identity: &'static str,
        to: Recorder,
        started: Stamp,
    ) -> Self {
        Self {
            tally: rt.stats.tally(None, None, None),
            interface: None,
            grpc: false,
            started,
            done: None,
            who: (to.log || to.export.is_some()).then(|| {
                Box::new(Who {
                    client: None,
                    identity,
                    app: None,
                    user: None,
                    route: None,
                    at_us: unix_micros(),
                    method: None,
                    path: String::new(),
                    inputs: String::new(),
                    answered: Answered::Refused,
                    rule: None,
                })
            }),
            to,
        }
    }

    /// The response to send, with everything about it counted and logged.
    pub fn finish(
        self,
        rt: &Runtime,
        mut answer: Answer,
        ids: Ids,
        conn: &ConnInfo,
    ) -> Response<RespBody> {
        let metrics = &*rt.metrics;
        let upstream = match &answer {
            Answer::Exchange(u, _) => *u,
            Answer::Cached(u, _) => Some(*u),
            Answer::Local(..) => None,
        };
        let up = upstream.map(|u| &rt.upstreams[u.0 as usize]);
        let own = matches!(answer, Answer::Local(..) | Answer::Exchange(_, Err(_)));
        // Judged and counted where the answer lies; it is turned into the response once, at
        // the end (each move of a response is a copy of its head, about 200 bytes).
        let (status, class) = match &mut answer {
            Answer::Local(resp, class) => (resp.status(), *class),
            Answer::Cached(_, resp) => (resp.status(), Class::of(resp.status(), true)),
            Answer::Exchange(_, Ok((resp, latency))) => {
                if let Some(u) = up {
                    u.latency_histogram(metrics).observe(latency.as_secs_f64());
                }
                strip_hop_by_hop(resp.headers_mut());
                (resp.status(), Class::of(resp.status(), true))
            }
            Answer::Exchange(_, Err(e)) => {
                if let (
                    Some(u),
                    GatewayError::UpstreamTimeout
                    | GatewayError::UpstreamUnavailable
                    | GatewayError::UpstreamReset
                    | GatewayError::UpstreamTls,
                ) = (up, &*e)
                {
                    metrics
                        .upstream_errors
                        .get_or_create(&UpstreamErrorLabels {
                            upstream: u.name.clone(),
                            error: e.code(),
                        })
                        .inc();
                }
                (e.status(), Class::of(e.status(), false))
            }
        };
        let elapsed = match self.done {
            Some(at) => self.started.until(at),
            None => self.started.elapsed(),
        };
        self.tally.record(class, elapsed);
        let iface = self.interface.map(|i| &rt.interface_names[i.0 as usize]);
        self.tally
            .count_request(metrics, upstream.is_some(), status, || RequestLabels {
                interface: iface.cloned().unwrap_or_else(none_label),
                upstream: up.map_or_else(none_label, |u| u.name.clone()),
                status: status_class(status),
            });

        if let Some(w) = self.who.as_ref().filter(|_| self.to.log) {
            let peer = conn.remote;
            let (mut tbuf, mut sbuf) = ([0u8; 32], [0u8; 16]);
            let trace_id = ids.trace.as_ref().map(|t| t.trace_hex(&mut tbuf));
            let span_id = ids.trace.as_ref().map(|t| t.span_hex(&mut sbuf));
            tracing::info!(
                target: "tidegate::access",
                request_id = ids.request.to_str().unwrap_or("-"),
                trace_id,
                span_id,
                client = %w.client.unwrap_or(peer.ip()),
                peer = %peer,
                identity = w.identity,
                app = w.app.as_deref().unwrap_or("none"),
                interface = iface.map(|n| &*n.0).unwrap_or("none"),
                user = w.user.as_deref().unwrap_or("none"),
                route = w.route.as_deref().unwrap_or("none"),
                upstream = up.map(|u| &*u.name.0).unwrap_or("none"),
                status = status.as_u16(),
                duration_us = elapsed.as_micros() as u64,
                at_us = w.at_us,
                method = w.method.as_ref().map_or("", http::Method::as_str),
                path = &*w.path,
                inputs = &*w.inputs,
                decision = w.answered.label(),
                rule = w.rule.as_deref().unwrap_or("none"),
                "request"
            );
        }
        // The exporter first: without one, nothing is moved out of `self`.
        if let Some(exp) = &self.to.export
            && let (Some(w), Some(t)) = (self.who, ids.trace)
        {
            let end_unix_ns = unix_nanos();
            exp.offer(SpanRecord {
                trace_id: t.trace_id,
                span_id: t.span_id,
                parent_id: t.parent_id,
                start_unix_ns: end_unix_ns.saturating_sub(elapsed.as_nanos() as u64),
                end_unix_ns,
                method: w.method,
                status: status.as_u16(),
                request_id: ids.request,
                interface: iface.cloned(),
                app: w.app,
                route: w.route,
                upstream: up.map(|u| u.name.clone()),
                decision: w.answered.label(),
                rule: w.rule,
                identity: w.identity,
            });
        }
        // Counted and logged above under the status it stands for (429, 503, ...), so the
        // dashboards and metrics read the same for gRPC and other clients.
        match (own && self.grpc, answer) {
            (false, answer) => answer.into_response(),
            (true, answer) => {
                let empty = Either::Right(Full::default());
                respond::grpc(answer.into_response(), class == Class::Degraded, empty)
            }
        }
    }
}

// === impl Answer ===

impl Answer {
    /// The response to send: the upstream's (already judged and stripped by
    /// [`Record::finish`]) or the gateway's own.
    fn into_response(self) -> Response<RespBody> {
        match self {
            Answer::Local(resp, _) => (*resp).map(Either::Right),
            Answer::Cached(_, resp) | Answer::Exchange(_, Ok((resp, _))) => resp.map(Either::Left),
            Answer::Exchange(_, Err(e)) => e.response().map(Either::Right),
        }
    }
}

/// Now, in nanoseconds since the Unix epoch.
fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Now, in microseconds since the Unix epoch.
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The path as logged: cut at [`MAX_LOGGED_PATH`] bytes (on a character boundary) and then
/// marked with `…`, which a request path (ASCII) never contains.
fn bounded_path(path: &str) -> String {
    if path.len() <= MAX_LOGGED_PATH {
        return path.to_owned();
    }
    let mut end = MAX_LOGGED_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

/// The `inputs` field: `name=value` for each of `names` the request carries, joined by `&`,
/// the value percent-encoded (every byte outside printable ASCII, and `%`, `&`, `"`, `\`),
/// so the field needs no JSON escaping. A value over [`MAX_LOGGED_VALUE`] bytes, or one
/// that would take the field over [`MAX_LOGGED_INPUTS`], is logged as its name alone (a
/// replay then knows the request is not replayable, rather than guessing). Empty, with no
/// allocation, when the rules read no header.
pub fn log_inputs(names: &[http::HeaderName], headers: &http::HeaderMap) -> String {
    let mut out = String::new();
    for name in names {
        // Repeated headers: the rules compare the first value (`HeaderMap::get`).
        let Some(v) = headers.get(name) else { continue };
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(name.as_str());
        let room = MAX_LOGGED_INPUTS.saturating_sub(out.len() + 1);
        if v.len() > MAX_LOGGED_VALUE || v.len() * 3 > room {
            continue;
        }
        out.push('=');
        for &b in v.as_bytes() {
            match b {
                b'%' | b'&' | b'"' | b'\\' => push_escaped(&mut out, b),
                0x21..=0x7e | b' ' => out.push(char::from(b)),
                _ => push_escaped(&mut out, b),
            }
        }
    }
    out
}

fn push_escaped(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

fn none_label() -> Name {
    static NONE: std::sync::OnceLock<Name> = std::sync::OnceLock::new();
    NONE.get_or_init(|| Name("none".into())).clone()
}
