//! The decision: everything the gateway decides about a request before any I/O.
//!
//! [`decide`] runs the phases in their documented order against one [`Runtime`]:
//!
//! 1. **classify**: interface, app and user; an app or user ID over `identity.max_id_bytes`
//!    is dropped (the request is anonymous), or refused here (400 `invalid_identity`) when
//!    `identity.on_invalid` is `reject`;
//! 2. **admission**: overload priority admission (DAGOR): a request below the level is shed
//!    here and spends no limit quota;
//! 3. **limits**: every limit rule that applies, in rule order, until an enforced one refuses
//!    (cluster-scope checks that need Redis are set aside for the pipeline);
//! 4. **fallback**: a degraded answer instead of the upstream;
//! 5. **route**: the route rule and the upstream it chooses;
//! 6. **breaker**: the chosen upstream's circuit breaker.
//!
//! The first phase that answers ends the decision; later phases are not run (their fields stay
//! empty).
//!
//! Rules in shadow mode (`mode: dry_run`, `shadow_split`) are decided beside the real ones,
//! counted and logged (target `tidegate::shadow`, at debug), and never change the action:
//! dry-run admission in the admission phase, dry-run fallbacks and shadow splits after the
//! route phase (one branch when the snapshot has none), a dry-run breaker in the breaker
//! phase. [`Decision::shadow`] and the breaker verdict carry what they would have done. It is synchronous and does no I/O, so the request path, the benchmarks, the fuzz
//! target and `explain` all run this one function. [`Mode::Peek`] decides without side
//! effects (no quota spent, no breaker probe taken, nothing counted), for `explain` on the
//! live runtime.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use http::{HeaderMap, Response};
use http_body_util::Full;
use rules::degrade::{FallbackDecision, WhenOpen};
use rules::overload::UserKey;
use rules::{
    Classified, MatchInput, RequestParts, RouteDecision, RouteInput, Snapshot, UpstreamId,
};

use crate::clock::Stamp;
use crate::conn::ConnInfo;
use crate::govern::limit::{Limiters, Outcome, Pace, Rejection, RuleLimiter};
use crate::govern::{BreakerVerdict, ClusterPending};
use crate::metrics::{Name, ShadowSplitLabels};
use crate::overload::Verdict;
use crate::respond::{self, GatewayError};
use crate::runtime::Runtime;
use crate::stats::Class;

/// How to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serve the request: spend quota, take breaker permits, count metrics. `draw` is a
    /// uniformly random number, the bucket of requests that split by `random`.
    Serve {
        /// The random draw.
        draw: u64,
        /// The request's start: the time its limits are counted at.
        at: Stamp,
    },
    /// Decide as the live gateway would now, changing nothing (`explain`); overload
    /// admission at `level` when given, else at the live level.
    Peek {
        /// The admission level to judge at.
        level: Option<u32>,
    },
}

/// Everything decided about one request: `'r` borrows the request and the runtime, `'g` the
/// runtime alone (the breaker and its permit, which the request keeps while its head is
/// lent out again to be forwarded).
#[derive(Debug)]
pub struct Decision<'r, 'g> {
    /// App, interface and user.
    pub class: Classified<'r>,
    /// The client address the request was decided for (the peer, or with a trusted proxy
    /// the address it forwarded for); `None` when unknown (`explain` without one).
    pub client_ip: Option<IpAddr>,
    /// Refused at classification: an invalid ID with `identity.on_invalid: reject`.
    pub identity_refused: bool,
    /// Whether overload admission let it in (`false`, unasked, when refused at
    /// classification).
    pub admitted: bool,
    /// The enforced limit that refused it.
    pub limited: Option<Rejection>,
    /// Cluster-scope limit checks that need Redis: made by the pipeline before forwarding.
    pub cluster: Option<ClusterPending>,
    /// The turn paced limits gave it: a forwarded request waits for it (holding its
    /// overload slots). Only when serving.
    pub pace: Option<Pace>,
    /// The fallback that answers it.
    pub fallback: Option<FallbackDecision<'r>>,
    /// The route rule and the upstream it chose.
    pub route: Option<RouteDecision<'r>>,
    /// The chosen upstream's breaker.
    pub breaker: BreakerVerdict<'g>,
    /// What the dry-run rules would have done with it.
    pub shadow: Shadow<'r>,
    /// What to do with it.
    pub action: Action<'g>,
}

/// The shadow verdicts of a request: what rules in shadow mode would have done, had they
/// been enforced (a dry-run breaker's is [`BreakerVerdict::Pass::would_reject`]).
#[derive(Debug, Default)]
pub struct Shadow<'r> {
    /// Dry-run admission would have shed it.
    pub shed: bool,
    /// The dry-run fallback that would have answered it.
    pub fallback: Option<FallbackDecision<'r>>,
    /// The upstream the route's shadow split would have sent it to, when not the one the
    /// route chose.
    pub split: Option<UpstreamId>,
}

/// What the gateway does with a request.
#[derive(Debug)]
pub enum Action<'g> {
    /// Forward to this upstream (the route's choice, or a breaker's alternate), reporting
    /// the outcome to its breaker through the permit, if there is one.
    Forward {
        /// The upstream.
        upstream: UpstreamId,
        /// The breaker's permit.
        permit: Option<crate::govern::breaker::Permit<'g>>,
    },
    /// Answer locally: shed, limited, or degraded (a fallback or an open breaker). Boxed: a
    /// forwarded request (the common case) then moves a small action through the pipeline.
    Answer(Box<Response<Full<Bytes>>>, Class),
    /// No route rule matched (404 `no_route`).
    NoRoute,
}

/// What a decision came to, as the access log names it and `tidegate replay` reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Answered {
    /// Routed to an upstream (`route` and `upstream` say which).
    Forward,
    /// Shed by overload admission.
    Shed,
    /// Refused by an enforced limit (`rule` names it).
    Limited,
    /// Answered by a fallback (`rule` names it).
    Fallback,
    /// No route rule matched.
    NoRoute,
    /// An open breaker answered or chose the alternate upstream (`rule` names the breaker).
    Breaker,
    /// Refused at classification (`identity.on_invalid: reject`).
    InvalidIdentity,
    /// Refused before any decision (a malformed head, a missing or invalid token).
    Refused,
}

/// A decision replayed from an access log line (`tidegate replay`): the phases of
/// [`decide_classified`] in the same order, with limits counted by the caller's `limiters`
/// (on a clock that follows the log's time), no breaker asked (their state came from
/// upstream answers a log cannot replay), nothing counted, no answer built.
#[derive(Debug)]
pub struct Replayed<'r, C: Clock = DefaultClock> {
    /// Whether overload admission let it in.
    pub admitted: bool,
    /// The enforced limit that refused it.
    pub limited: Option<Rejection<C>>,
    /// The fallback that answers it.
    pub fallback: Option<FallbackDecision<'r>>,
    /// The route rule and the upstream it chose.
    pub route: Option<RouteDecision<'r>>,
}

// === impl Answered ===

impl Answered {
    /// Every value, for parsing.
    pub const ALL: [Answered; 8] = [
        Self::Forward,
        Self::Shed,
        Self::Limited,
        Self::Fallback,
        Self::NoRoute,
        Self::Breaker,
        Self::InvalidIdentity,
        Self::Refused,
    ];

    /// The access log's `decision` field.
    pub fn label(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Shed => "shed",
            Self::Limited => "limited",
            Self::Fallback => "fallback",
            Self::NoRoute => "no_route",
            Self::Breaker => "breaker",
            Self::InvalidIdentity => "invalid_identity",
            Self::Refused => "refused",
        }
    }

    /// The value whose [`Answered::label`] is `s`.
    pub fn from_label(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.label() == s)
    }
}

// === impl Decision ===

impl Decision<'_, '_> {
    /// What it came to, and the rule that answered (limit, fallback or breaker), if one did.
    pub fn answered(&self) -> (Answered, Option<&Arc<str>>) {
        if self.identity_refused {
            return (Answered::InvalidIdentity, None);
        }
        if !self.admitted {
            return (Answered::Shed, None);
        }
        if let Some(r) = &self.limited {
            return (Answered::Limited, Some(&r.rule.name.0));
        }
        if let Some(f) = &self.fallback {
            return (Answered::Fallback, Some(f.rule_name));
        }
        match (&self.route, &self.breaker) {
            (None, _) => (Answered::NoRoute, None),
            (Some(_), BreakerVerdict::Open { breaker }) => {
                (Answered::Breaker, Some(&breaker.name.0))
            }
            (Some(_), _) => (Answered::Forward, None),
        }
    }
}

/// Decide what to do with a request (see the module docs for the phases), for the client
/// address `conn` and the runtime's trusted proxies give it (resolved once, here).
pub fn decide<'r, 'g: 'r>(
    rt: &'g Runtime,
    req: RequestParts<'r>,
    conn: &ConnInfo,
    mode: Mode,
) -> Decision<'r, 'g> {
    let client_ip = conn.client_ip(req.headers, &rt.snapshot.trusted_proxies);
    let class = rt.snapshot.classify(req);
    decide_classified(rt, class, req.headers, Some(client_ip), mode, |_, _, _| {})
}

/// [`decide`] after classification (which `explain` may override), telling `on_limit`
/// each limit's verdict as it is made.
pub fn decide_classified<'r, 'g: 'r>(
    rt: &'g Runtime,
    class: Classified<'r>,
    headers: &'r HeaderMap,
    client_ip: Option<IpAddr>,
    mode: Mode,
    mut on_limit: impl FnMut(&RuleLimiter, Outcome, Duration),
) -> Decision<'r, 'g> {
    let at = match mode {
        Mode::Serve { at, .. } => Some(at),
        Mode::Peek { .. } => None,
    };
    let serve = at.is_some();
    let input = route_input(&rt.snapshot, &class, headers, client_ip, mode);
    // Each phase runs only if every phase before it let the request on.
    let identity_refused = class.invalid_id && rt.snapshot.rejects_invalid_id();
    let (admitted, shed) = match identity_refused {
        true => (false, false),
        false => admit(rt, &input, mode),
    };
    let mut pace = None;
    let (limited, cluster) = match admitted {
        true => rt
            .governors
            .check_limits(&rt.snapshot, &input, at, |l, o, w| {
                if serve {
                    crate::govern::observe_limit(&rt.metrics, l, o, w, &input);
                    if o == Outcome::Paced {
                        Pace::join(&mut pace, l, std::time::Instant::now(), w);
                    }
                }
                on_limit(l, o, w)
            }),
        false => (None, None),
    };
    // A refused request does not wait (its places in the queues are given back here).
    let pace = pace.filter(|_| limited.is_none());
    let on = admitted && limited.is_none();
    let fallback = on.then(|| rt.snapshot.fallback(&input)).flatten();
    let route = (on && fallback.is_none())
        .then(|| rt.snapshot.route(&input))
        .flatten();
    let mut breaker = match &route {
        Some(r) => (rt.governors).breaker(&rt.snapshot, r, serve.then_some(&*rt.metrics)),
        None => BreakerVerdict::Unchecked,
    };
    let mut shadow = Shadow {
        shed,
        ..Shadow::default()
    };
    if on && rt.snapshot.has_shadow() {
        shadow_rules(rt, &input, route.as_ref(), serve, &mut shadow);
    }
    let verdicts = Verdicts {
        identity_refused,
        admitted,
        limited: limited.as_ref(),
        fallback: fallback.as_ref(),
        route: route.as_ref(),
    };
    let action = action(rt, verdicts, &mut breaker, serve);
    // Built in place as the return value: a `Decision` (about 470 bytes) made first and
    // completed after would be copied out whole.
    Decision {
        class,
        client_ip,
        identity_refused,
        admitted,
        limited,
        cluster,
        pace,
        fallback,
        route,
        breaker,
        shadow,
        action,
    }
}

/// Replay a logged request (`tidegate replay`): [`decide_classified`]'s phases, with
/// overload admission judged at `admission` (the level, and the request's time in Unix
/// seconds, whose hour ranks users) when given (else everyone is admitted), limits counted
/// by `limiters` (local-scope rules only: cluster-scope ones are decided in Redis from the
/// whole fleet's traffic), and `on_limit` told each limit's verdict. Requests without a user
/// under `no_user_key: random` are bucketed by draw 0; the caller tells them by their
/// [`rules::Via`] or bucket key.
pub fn replay<'r, C: Clock + Clone>(
    rt: &'r Runtime,
    class: &Classified<'r>,
    headers: &'r HeaderMap,
    client_ip: Option<IpAddr>,
    admission: Option<(u32, u64)>,
    limiters: &Limiters<C>,
    on_limit: impl FnMut(&RuleLimiter<C>, Outcome, Duration),
) -> Replayed<'r, C> {
    let input = route_input(
        &rt.snapshot,
        class,
        headers,
        client_ip,
        Mode::Peek { level: None },
    );
    // Admission in dry run sheds nobody, at any level.
    let admitted = rt.overload.dry_run()
        || admission.is_none_or(|(level, secs)| {
            let user = user_key(input.m.user, input.client_ip);
            (rt.overload).would_admit_at(input.m.interface, user, level, secs)
        });
    let limited = match admitted {
        true => limiters.check_local(&rt.snapshot, &input, None, on_limit),
        false => None,
    };
    let on = admitted && limited.is_none();
    let fallback = on.then(|| rt.snapshot.fallback(&input)).flatten();
    let route = (on && fallback.is_none())
        .then(|| rt.snapshot.route(&input))
        .flatten();
    Replayed {
        admitted,
        limited,
        fallback,
        route,
    }
}

/// What the phases read of a request, with its candidate rules looked up once for them all.
fn route_input<'a>(
    snap: &'a Snapshot,
    class: &'a Classified<'_>,
    headers: &'a HeaderMap,
    client_ip: Option<IpAddr>,
    mode: Mode,
) -> RouteInput<'a> {
    let m = MatchInput {
        app: class.app.as_deref(),
        interface: class.interface,
        user: class.user.as_deref(),
        headers,
        params: &class.params,
    };
    RouteInput {
        m,
        client_ip,
        random: match mode {
            Mode::Serve { draw, .. } => draw,
            Mode::Peek { .. } => 0,
        },
        pair: snap.pair(&m),
    }
}

/// Overload admission: counted in the window's histogram when serving. A request without a
/// user is ranked by its client address. Whether it is let in, and whether a dry-run
/// admission would have shed it.
fn admit(rt: &Runtime, input: &RouteInput<'_>, mode: Mode) -> (bool, bool) {
    let user = user_key(input.m.user, input.client_ip);
    let v = match mode {
        Mode::Serve { .. } => {
            rt.overload
                .verdict(input.m.interface, user, &rt.interface_names, &rt.metrics)
        }
        Mode::Peek { level } => rt.overload.peek(input.m.interface, user, level),
    };
    (v != Verdict::Shed, v == Verdict::WouldShed)
}

/// The dry-run fallbacks and the route's shadow split, for a request that reached the
/// fallback phase; counted and logged when serving.
fn shadow_rules<'r>(
    rt: &'r Runtime,
    input: &RouteInput<'_>,
    route: Option<&RouteDecision<'r>>,
    serve: bool,
    shadow: &mut Shadow<'r>,
) {
    let snap = &rt.snapshot;
    shadow.fallback = snap.shadow_fallback(input);
    if let (Some(fb), true) = (&shadow.fallback, serve) {
        rt.governors.count_shadow_fallback(&rt.metrics, fb.rule_id);
        tracing::debug!(
            target: "tidegate::shadow",
            kind = "fallback",
            rule = &**fb.rule_name,
            user = input.m.user.unwrap_or("none"),
            "fallback would answer (dry run)"
        );
    }
    let Some(r) = route else { return };
    let Some((to, _)) = r.rule.shadow_choice(input, r.via) else {
        return;
    };
    if to == r.upstream {
        return;
    }
    shadow.split = Some(to);
    if serve {
        let to = snap.upstream_name(to);
        rt.metrics
            .shadow_split
            .get_or_create(&ShadowSplitLabels {
                route: Name(Arc::clone(r.rule_name)),
                from: Name(Arc::clone(r.upstream_name)),
                to: Name(Arc::clone(to)),
            })
            .inc();
        tracing::debug!(
            target: "tidegate::shadow",
            kind = "split",
            route = &**r.rule_name,
            from = &**r.upstream_name,
            to = &**to,
            user = input.m.user.unwrap_or("none"),
            "shadow split would send elsewhere"
        );
    }
}

/// What the phases before the action decided, as [`action`] reads them.
struct Verdicts<'a, 'r> {
    identity_refused: bool,
    admitted: bool,
    limited: Option<&'a Rejection>,
    fallback: Option<&'a FallbackDecision<'r>>,
    route: Option<&'a RouteDecision<'r>>,
}

/// The action the phases add up to. Takes the breaker's permit out of `breaker`.
fn action<'g>(
    rt: &Runtime,
    d: Verdicts<'_, '_>,
    breaker: &mut BreakerVerdict<'g>,
    serve: bool,
) -> Action<'g> {
    if d.identity_refused {
        return Action::Answer(
            Box::new(GatewayError::InvalidIdentity.response()),
            Class::Error,
        );
    }
    if !d.admitted {
        return Action::Answer(Box::new(rt.overload.refusal()), Class::Shed);
    }
    if let Some(rej) = d.limited {
        return Action::Answer(Box::new(rej.response()), Class::Limited);
    }
    if let Some(fb) = d.fallback {
        if serve {
            rt.governors.count_fallback(&rt.metrics, fb.rule_id);
        }
        return Action::Answer(
            Box::new(respond::canned(&fb.rule.response)),
            Class::Degraded,
        );
    }
    let Some(route) = d.route else {
        return Action::NoRoute;
    };
    match breaker {
        BreakerVerdict::Open { breaker } => match &breaker.def.when_open {
            WhenOpen::Respond(r) => Action::Answer(Box::new(respond::canned(r)), Class::Degraded),
            WhenOpen::Alternate(id) => Action::Forward {
                upstream: *id,
                permit: None,
            },
        },
        BreakerVerdict::Pass { permit, .. } => Action::Forward {
            upstream: route.upstream,
            permit: permit.take(),
        },
        BreakerVerdict::Unchecked | BreakerVerdict::None => Action::Forward {
            upstream: route.upstream,
            permit: None,
        },
    }
}

/// Who a request is to overload admission: its user, or without one its client address.
pub fn user_key(user: Option<&str>, client_ip: Option<IpAddr>) -> UserKey<'_> {
    match user {
        Some(u) => UserKey::User(u),
        None => UserKey::Ip(client_ip.unwrap_or(IpAddr::from([0, 0, 0, 0]))),
    }
}
