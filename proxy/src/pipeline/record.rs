//! The record phase: the response the client gets, and what the gateway writes down about
//! it (Prometheus metrics, the dashboard's counters, the access log).
//!
//! What a request will be counted under is taken when it is decided ([`Record::start`]);
//! the answer is known only after the exchange ([`Record::finish`]). Nothing here decides
//! anything: the [`Class`] of a local answer comes from the phase that made it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response};
use http_body_util::{Either, Full};
use rules::{InterfaceId, UpstreamId};

use super::decide::{Action, Decision};
use super::identity::Verdict;
use crate::conn::ConnInfo;
use crate::metrics::{Name, RequestLabels, UpstreamErrorLabels, status_class};
use crate::respond::GatewayError;
use crate::runtime::Runtime;
use crate::stats::{Class, Tally};
use crate::upstream::UpstreamBody;
use crate::upstream::headers::strip_hop_by_hop;

/// The response body: the upstream's, streamed, or one the gateway made.
pub type RespBody = Either<UpstreamBody, Full<Bytes>>;

/// The upstream's response and the time to its head, or the error standing in for it.
pub type Exchange = Result<(Response<UpstreamBody>, Duration), GatewayError>;

/// How a request was answered: by the gateway itself, or by an exchange with an upstream
/// (or the error standing in for one: no route, body too large, upstream failure).
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "the exchange is the common case: boxing it would allocate per forwarded request"
)]
pub enum Answer {
    /// A local answer and its class.
    Local(Box<Response<Full<Bytes>>>, Class),
    /// The upstream it was meant for, and the exchange.
    Exchange(Option<UpstreamId>, Exchange),
}

/// What a request will be counted and logged under.
#[derive(Debug)]
pub struct Record {
    tally: Tally,
    interface: Option<InterfaceId>,
    started: Instant,
    /// Who asked and where it was routed, for the access log (copied only when it is on).
    who: Option<Who>,
}

/// Client address, identity outcome, app, user and route rule of a request, for its access
/// log line.
#[derive(Debug)]
struct Who {
    client: Option<std::net::IpAddr>,
    /// `unverified`, `verified`, or why the request is anonymous or refused (a token
    /// error's code).
    identity: &'static str,
    app: Option<String>,
    user: Option<String>,
    route: Option<Arc<str>>,
}

pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

// === impl Record ===

impl Record {
    /// Take what the decision says the request is counted under; count a split's choice.
    pub fn start(
        rt: &Runtime,
        d: &Decision<'_>,
        identity: Verdict,
        access_log: bool,
        started: Instant,
    ) -> Self {
        let forwarded = match &d.action {
            Action::Forward { upstream, .. } => Some(*upstream),
            _ => None,
        };
        let tally = rt
            .stats
            .tally(d.class.interface, d.route.as_ref(), forwarded);
        let who = access_log.then(|| Who {
            client: d.client_ip,
            identity: identity.log_field(),
            app: d.class.app.as_deref().map(str::to_owned),
            user: d.class.user.as_deref().map(str::to_owned),
            route: d.route.as_ref().map(|r| Arc::clone(r.rule_name)),
        });
        Self {
            tally,
            interface: d.class.interface,
            started,
            who,
        }
    }

    /// What a request refused before its decision is counted under: no interface, no
    /// route, no upstream. `identity` is the access log's identity field.
    pub fn unclassified(
        rt: &Runtime,
        identity: &'static str,
        access_log: bool,
        started: Instant,
    ) -> Self {
        Self {
            tally: rt.stats.tally(None, None, None),
            interface: None,
            started,
            who: access_log.then_some(Who {
                client: None,
                identity,
                app: None,
                user: None,
                route: None,
            }),
        }
    }

    /// The response to send, with everything about it counted and logged.
    pub fn finish(
        self,
        rt: &Runtime,
        answer: Answer,
        request_id: HeaderValue,
        conn: &ConnInfo,
    ) -> Response<RespBody> {
        let metrics = &*rt.metrics;
        let upstream = match &answer {
            Answer::Exchange(u, _) => *u,
            Answer::Local(..) => None,
        };
        let up = upstream.map(|u| &rt.upstreams[u.0 as usize]);
        let (mut resp, class) = match answer {
            Answer::Local(resp, class) => ((*resp).map(Either::Right), class),
            Answer::Exchange(_, Ok((resp, latency))) => {
                if let Some(u) = up {
                    u.latency_histogram(metrics).observe(latency.as_secs_f64());
                }
                let (mut rp, rb) = resp.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                let class = Class::of(rp.status, true);
                (Response::from_parts(rp, Either::Left(rb)), class)
            }
            Answer::Exchange(_, Err(e)) => {
                if let (
                    Some(u),
                    GatewayError::UpstreamTimeout
                    | GatewayError::UpstreamUnavailable
                    | GatewayError::UpstreamReset,
                ) = (up, e)
                {
                    metrics
                        .upstream_errors
                        .get_or_create(&UpstreamErrorLabels {
                            upstream: u.name.clone(),
                            error: e.code(),
                        })
                        .inc();
                }
                (
                    e.response().map(Either::Right),
                    Class::of(e.status(), false),
                )
            }
        };
        resp.headers_mut().insert(&X_REQUEST_ID, request_id.clone());

        let status = resp.status();
        let elapsed = self.started.elapsed();
        self.tally.record(class, elapsed);
        let iface = self.interface.map(|i| &rt.interface_names[i.0 as usize]);
        self.tally
            .count_request(metrics, upstream.is_some(), status, || RequestLabels {
                interface: iface.cloned().unwrap_or_else(none_label),
                upstream: up.map_or_else(none_label, |u| u.name.clone()),
                status: status_class(status),
            });

        if let Some(Who {
            client,
            identity,
            app,
            user,
            route,
        }) = &self.who
        {
            let peer = conn.remote;
            tracing::info!(
                target: "tidegate::access",
                request_id = request_id.to_str().unwrap_or("-"),
                client = %client.unwrap_or(peer.ip()),
                peer = %peer,
                identity = *identity,
                app = app.as_deref().unwrap_or("none"),
                interface = iface.map(|n| &*n.0).unwrap_or("none"),
                user = user.as_deref().unwrap_or("none"),
                route = route.as_deref().unwrap_or("none"),
                upstream = up.map(|u| &*u.name.0).unwrap_or("none"),
                status = status.as_u16(),
                duration_us = elapsed.as_micros() as u64,
                "request"
            );
        }
        resp
    }
}

fn none_label() -> Name {
    static NONE: std::sync::OnceLock<Name> = std::sync::OnceLock::new();
    NONE.get_or_init(|| Name("none".into())).clone()
}
