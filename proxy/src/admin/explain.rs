//! `tidegate explain` and `GET /admin/explain`: one query type, one code path, so the command
//! line and the admin port can never disagree about a decision.
//!
//! Both run the gateway's own [`decide`](crate::pipeline::decide) in peek mode and report
//! every phase: overload admission (at the live level or a given one), each limit that
//! applies (its quota and whether it would refuse now), the fallback, the route with every
//! rule considered, the breaker, and the final answer. On the admin port the limiters and
//! breakers are the live ones, read without being changed; the command line decides against
//! fresh state (no request counted yet). Rules in shadow mode get their verdict beside the
//! real one (`shadow`, and the route decision's `shadow_split`).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use rules::{RequestParts, Snapshot};
use serde::Serialize;

use crate::govern::BreakerVerdict;
use crate::govern::limit::Outcome;
use crate::metrics::Metrics;
use crate::pipeline::decide::{Action, Decision, Mode, decide_classified, user_key};
use crate::runtime::Runtime;

/// A request to explain.
#[derive(Debug, Clone, Default)]
pub struct ExplainQuery {
    /// HTTP method. Default `GET`.
    pub method: Option<String>,
    /// Path, optionally with `?query`.
    pub path: String,
    /// Headers, as `(name, value)`.
    pub headers: Vec<(String, String)>,
    /// App ID (replaces what the app extractor finds).
    pub app: Option<String>,
    /// User ID (replaces what the user extractor finds).
    pub user: Option<String>,
    /// Client IP (bucket key for requests without a user).
    pub client_ip: Option<IpAddr>,
    /// Overload admission level to judge at (default: the live level).
    pub level: Option<u32>,
}

/// The account of one decision, phase by phase. `classification`, `considered` and
/// `decision` are the route phase's (as `rules` explains it); `decision` is `null` when
/// routing was not reached or no rule matched.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// Classification and the route phase.
    #[serde(flatten)]
    pub route: rules::explain::Explanation,
    /// Whether routing was reached (an earlier phase may answer).
    pub route_reached: bool,
    /// Overload admission.
    pub admission: AdmissionReport,
    /// Each limit that applies, in rule order.
    pub limits: Vec<LimitReport>,
    /// The fallback that answers, if any.
    pub fallback: Option<FallbackReport>,
    /// The chosen upstream's breaker, if it has one.
    pub breaker: Option<BreakerReport>,
    /// What the gateway does.
    pub answer: AnswerReport,
    /// What the rules in shadow mode would have done (nothing of it is done).
    pub shadow: ShadowReport,
    /// Whether limiter and breaker state is the live gateway's (admin port) or fresh
    /// (command line).
    pub live_state: bool,
    /// The ramp of the deciding route's split, where it is now (admin port only: the
    /// command line routes by the written weights).
    pub ramp: Option<crate::control::reload::ramps::RampStatus>,
}

/// The admission phase.
#[derive(Debug, Clone, Serialize)]
pub struct AdmissionReport {
    /// Priority admission is on.
    pub enabled: bool,
    /// The request's rank (higher is admitted first).
    pub rank: Option<u32>,
    /// The level it was judged at.
    pub level: Option<u32>,
    /// Let in.
    pub admitted: bool,
}

/// One limit rule that applies.
#[derive(Debug, Clone, Serialize)]
pub struct LimitReport {
    /// Rule name.
    pub rule: String,
    /// `enforce` or `dry_run`.
    pub mode: &'static str,
    /// `local` or `cluster`.
    pub scope: &'static str,
    /// What the request is counted as (`user="bob"`), when the rule counts it.
    pub key: Option<String>,
    /// The quota it falls under: `default`, or an exception's label.
    pub quota: Option<String>,
    /// `allowed`, `limited`, `dry_run_limited` (would refuse, but only counts),
    /// `paced` (over the rate, admitted after waiting its turn: `max_delay_ms`),
    /// `dry_run_paced` (would wait, but does not),
    /// `no_key` (the key is missing and the rule skips such requests), `not_reached` (an
    /// earlier limit refused) or `in_redis` (cluster scope: decided by the shared store).
    pub verdict: &'static str,
    /// When limited: the wait before the key conforms again.
    pub retry_after_ms: Option<u64>,
    /// When paced: how long it would wait for its turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// The fallback phase's answer.
#[derive(Debug, Clone, Serialize)]
pub struct FallbackReport {
    /// Rule name.
    pub rule: String,
    /// Share of users it answers, in parts per million.
    pub fraction_ppm: u32,
    /// The request's bucket, when the rule applies to a fraction.
    pub bucket: Option<u32>,
    /// The status it answers with.
    pub status: u16,
}

/// The breaker phase.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerReport {
    /// Breaker name.
    pub breaker: String,
    /// `closed`, `open` or `half_open` (for a dry-run breaker: the state it would be in).
    pub state: &'static str,
    /// `mode: dry_run`: it never refuses (see `shadow.breaker`).
    pub dry_run: bool,
    /// Whether it lets the request through.
    pub pass: bool,
}

/// The shadow verdicts: what dry-run rules would do to the request if they were enforced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShadowReport {
    /// Dry-run admission would shed it (`admission.admitted` stays true).
    pub shed: bool,
    /// The dry-run fallback that would answer it.
    pub fallback: Option<FallbackReport>,
    /// The dry-run breaker that would refuse it (`breaker.pass` stays true).
    pub breaker: Option<String>,
    /// The upstream the route's shadow split would send it to, when not the route's choice
    /// (the route decision's `shadow_split` has the details).
    pub split: Option<String>,
}

/// The final answer.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerReport {
    /// `upstream`, `overloaded`, `rate_limited`, `fallback`, `circuit_open` (the breaker's
    /// answer) or `no_route`.
    pub kind: &'static str,
    /// The status the gateway answers with, when it answers itself.
    pub status: Option<u16>,
    /// The upstream, when forwarded.
    pub upstream: Option<String>,
    /// The rule that answered (limit, fallback, breaker).
    pub rule: Option<String>,
    /// The mirror upstream a copy goes to, when forwarded and mirrored (a body over the
    /// mirror's `max_body_bytes` or a mirror with no room in flight still skip the copy).
    pub mirror: Option<String>,
}

/// Explain a query against a live runtime, changing nothing.
pub fn explain_live(rt: &Runtime, q: &ExplainQuery) -> Result<Explanation, String> {
    explain_runtime(rt, q, true)
}

/// Explain a query against a config's rules with fresh state (`tidegate explain`).
pub fn explain(snap: Snapshot, q: &ExplainQuery) -> Result<Explanation, String> {
    let rt = Runtime::offline(snap, None, &Arc::new(Metrics::new()));
    explain_runtime(&rt, q, false)
}

fn explain_runtime(rt: &Runtime, q: &ExplainQuery, live: bool) -> Result<Explanation, String> {
    let (method, uri, headers) = request_of(q)?;
    let req = RequestParts {
        method: &method,
        path: uri.path(),
        query: uri.query(),
        headers: &headers,
    };
    let snap = &rt.snapshot;
    let mut class = snap.classify(req);
    if let Some(a) = &q.app {
        class.app = Some(a.as_str().into());
    }
    if let Some(u) = &q.user {
        class.user = Some(u.as_str().into());
    }
    let admission = admission_report(rt, &class, q);
    let mut verdicts = Vec::new();
    let mode = Mode::Peek { level: q.level };
    let d = decide_classified(rt, class, &headers, q.client_ip, mode, |l, o, w| {
        verdicts.push((l as *const _, o, w));
    });
    let limits = limit_reports(rt, &d, &headers, q.client_ip, &verdicts);
    let route_reached =
        d.route.is_some() || (d.admitted && d.limited.is_none() && d.fallback.is_none());
    let mut route = snap.explain(req, q.app.as_deref(), q.user.as_deref(), q.client_ip);
    if !route_reached {
        route.considered.clear();
        route.decision = None;
    }
    Ok(Explanation {
        route,
        route_reached,
        admission: AdmissionReport {
            admitted: d.admitted,
            ..admission
        },
        limits,
        fallback: d.fallback.as_ref().map(fallback_report),
        breaker: breaker_report(&d.breaker),
        answer: answer_report(rt, &d),
        shadow: ShadowReport {
            shed: d.shadow.shed,
            fallback: d.shadow.fallback.as_ref().map(fallback_report),
            breaker: match &d.breaker {
                BreakerVerdict::Pass {
                    breaker,
                    would_reject: true,
                    ..
                } => Some(breaker.name.0.to_string()),
                _ => None,
            },
            split: d.shadow.split.map(|u| snap.upstream_name(u).to_string()),
        },
        live_state: live,
        ramp: None,
    })
}

fn request_of(q: &ExplainQuery) -> Result<(Method, Uri, HeaderMap), String> {
    let method = Method::from_bytes(q.method.as_deref().unwrap_or("GET").as_bytes())
        .map_err(|_| format!("{:?} is not an HTTP method", q.method))?;
    let uri: Uri = q
        .path
        .parse()
        .map_err(|e| format!("path {:?}: {e}", q.path))?;
    if !uri.path().starts_with('/') {
        return Err(format!("path {:?} must start with `/`", q.path));
    }
    let mut headers = HeaderMap::new();
    for (k, v) in &q.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("{k:?} is not a header name"))?;
        let value = HeaderValue::from_str(v).map_err(|_| format!("{v:?} is not a header value"))?;
        headers.append(name, value);
    }
    Ok((method, uri, headers))
}

fn admission_report(
    rt: &Runtime,
    class: &rules::Classified<'_>,
    q: &ExplainQuery,
) -> AdmissionReport {
    let who = user_key(class.user.as_deref(), q.client_ip);
    let p = rt.overload.priority(class.interface, who, q.level);
    AdmissionReport {
        enabled: p.is_some(),
        rank: p.map(|(rank, _)| rank),
        level: p.map(|(_, level)| level),
        admitted: true,
    }
}

/// Every limit that applies, with the verdict `decide` heard for it, or why it heard none.
fn limit_reports(
    rt: &Runtime,
    d: &Decision<'_, '_>,
    headers: &HeaderMap,
    client_ip: Option<IpAddr>,
    verdicts: &[(
        *const crate::govern::limit::RuleLimiter,
        Outcome,
        std::time::Duration,
    )],
) -> Vec<LimitReport> {
    let snap = &rt.snapshot;
    let input = rules::RouteInput {
        m: rules::MatchInput {
            app: d.class.app.as_deref(),
            interface: d.class.interface,
            user: d.class.user.as_deref(),
            headers,
            params: &d.class.params,
        },
        client_ip,
        random: 0,
        pair: Default::default(),
    };
    let mut scratch = Vec::new();
    let mut refused = false;
    (snap.limits_for(&input.m, &mut scratch).iter())
        .map(|&i| {
            let rule = &snap.governance.limits[i as usize];
            let lim = &rt.governors.limiters.rules[i as usize];
            let heard = verdicts
                .iter()
                .find(|(p, ..)| std::ptr::eq(*p, Arc::as_ptr(lim)));
            let key = rule.describe_key(snap, &input);
            let (verdict, wait) = match heard {
                Some((_, o, w)) => (o.label(), (*o != Outcome::Allowed).then_some(*w)),
                None if !d.admitted || refused => ("not_reached", None),
                None if key.is_none() => ("no_key", None),
                None if lim.cluster.is_some() => ("in_redis", None),
                None => ("not_reached", None),
            };
            refused |= verdict == "limited";
            let paced = matches!(verdict, "paced" | "dry_run_paced");
            LimitReport {
                rule: rule.name.to_string(),
                mode: match rule.mode {
                    rules::model::LimitMode::Enforce => "enforce",
                    rules::model::LimitMode::DryRun => "dry_run",
                },
                scope: match lim.cluster {
                    Some(_) => "cluster",
                    None => "local",
                },
                key: key.as_ref().map(|(k, _)| k.clone()),
                quota: key.map(|(_, q)| q.to_owned()),
                verdict,
                retry_after_ms: wait.filter(|_| !paced).map(|w| w.as_millis().max(1) as u64),
                wait_ms: wait.filter(|_| paced).map(|w| w.as_millis() as u64),
            }
        })
        .collect()
}

fn fallback_report(f: &rules::degrade::FallbackDecision<'_>) -> FallbackReport {
    FallbackReport {
        rule: f.rule.name.to_string(),
        fraction_ppm: f.rule.fraction_ppm,
        bucket: f.bucket.map(|(b, _)| b),
        status: f.rule.response.status.as_u16(),
    }
}

fn breaker_report(v: &BreakerVerdict<'_>) -> Option<BreakerReport> {
    let (b, pass) = match v {
        BreakerVerdict::Pass { breaker, .. } => (breaker, true),
        BreakerVerdict::Open { breaker } => (breaker, false),
        BreakerVerdict::Unchecked | BreakerVerdict::None => return None,
    };
    Some(BreakerReport {
        breaker: b.name.0.to_string(),
        state: b.state().label(),
        dry_run: b.def.dry_run,
        pass,
    })
}

fn answer_report(rt: &Runtime, d: &Decision<'_, '_>) -> AnswerReport {
    let name = |id: rules::UpstreamId| rt.snapshot.upstreams[id.0 as usize].name.to_string();
    let (kind, rule) = match &d.action {
        Action::Forward { upstream, .. } => {
            return AnswerReport {
                kind: "upstream",
                status: None,
                upstream: Some(name(*upstream)),
                rule: None,
                mirror: d
                    .route
                    .as_ref()
                    .filter(|r| r.mirrored)
                    .and_then(|r| r.rule.mirror.as_ref())
                    .map(|m| name(m.upstream)),
            };
        }
        Action::NoRoute => ("no_route", None),
        Action::Answer(..) if d.identity_refused => ("invalid_identity", None),
        Action::Answer(..) if !d.admitted => ("overloaded", None),
        Action::Answer(..) => match (&d.limited, &d.fallback, &d.breaker) {
            (Some(rej), _, _) => ("rate_limited", Some(rej.rule.name.0.to_string())),
            (None, Some(f), _) => ("fallback", Some(f.rule.name.to_string())),
            (None, None, BreakerVerdict::Open { breaker }) => {
                ("circuit_open", Some(breaker.name.0.to_string()))
            }
            _ => ("local", None),
        },
    };
    let status = match &d.action {
        Action::Answer(resp, _) => resp.status().as_u16(),
        _ => 404,
    };
    AnswerReport {
        kind,
        status: Some(status),
        upstream: None,
        rule,
        mirror: None,
    }
}

// === impl Explanation ===

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The route phase's text starts with the classification line: it goes first, the
        // phases before routing follow it, then the rest of the route phase.
        let route = self.route.to_string();
        let (classification, route_rest) = route.split_once('\n').unwrap_or((&route, ""));
        writeln!(f, "{classification}")?;
        let a = &self.admission;
        match (a.rank, a.level) {
            (Some(rank), Some(level)) => writeln!(
                f,
                "admission: {} (rank {rank}, level {level})",
                if a.admitted { "admitted" } else { "shed" }
            )?,
            _ => writeln!(f, "admission: off (no priority admission configured)")?,
        }
        if self.limits.is_empty() {
            writeln!(f, "limits: none apply")?;
        } else {
            let state = if self.live_state { "live" } else { "fresh" };
            writeln!(f, "limits ({}, {state} state):", self.limits.len())?;
            for l in &self.limits {
                write!(f, "  - {} [{}, {}", l.rule, l.mode, l.scope)?;
                if let (Some(k), Some(q)) = (&l.key, &l.quota) {
                    write!(f, ", key {k}, quota {q}")?;
                }
                write!(f, "]: {}", l.verdict)?;
                match (l.retry_after_ms, l.wait_ms) {
                    (Some(ms), _) => writeln!(f, " (retry after {ms} ms)")?,
                    (None, Some(ms)) => writeln!(f, " (would wait {ms} ms)")?,
                    (None, None) => writeln!(f)?,
                }
            }
        }
        match &self.fallback {
            Some(fb) => writeln!(
                f,
                "fallback: rule {:?} answers {} ({} ppm of users)",
                fb.rule, fb.status, fb.fraction_ppm
            )?,
            None => writeln!(f, "fallback: none")?,
        }
        if self.route_reached {
            writeln!(f, "{route_rest}")?;
        } else {
            writeln!(f, "route: not reached")?;
        }
        if let Some(r) = &self.ramp {
            write!(
                f,
                "ramp: {:?} at {} (step {} of {}, {:?})",
                r.target,
                r.weight,
                r.step,
                r.steps.len(),
                r.phase
            )?;
            match &r.verdict {
                Some(v) => writeln!(f, "; last window: {:?}: {}", v.outcome, v.detail)?,
                None => writeln!(f)?,
            }
        }
        if let Some(b) = &self.breaker {
            writeln!(
                f,
                "breaker: {:?}{} is {}: {}",
                b.breaker,
                if b.dry_run { " (dry run)" } else { "" },
                b.state,
                if b.pass { "pass" } else { "answers instead" }
            )?;
        }
        let s = &self.shadow;
        if s.shed {
            writeln!(f, "shadow: admission (dry run) would shed it")?;
        }
        if let Some(fb) = &s.fallback {
            writeln!(
                f,
                "shadow: fallback {:?} (dry run) would answer {} ({} ppm of users)",
                fb.rule, fb.status, fb.fraction_ppm
            )?;
        }
        if let Some(b) = &s.breaker {
            writeln!(f, "shadow: breaker {b:?} (dry run) would answer instead")?;
        }
        let a = &self.answer;
        match (&a.upstream, &a.rule, a.status) {
            (Some(u), _, _) => {
                write!(f, "answer: forward to upstream {u:?}")?;
                match &a.mirror {
                    Some(m) => write!(f, ", and a copy to {m:?}"),
                    None => Ok(()),
                }
            }
            (None, Some(r), Some(s)) => write!(f, "answer: {s} {} (rule {r:?})", a.kind),
            (None, _, Some(s)) => write!(f, "answer: {s} {}", a.kind),
            (None, _, None) => write!(f, "answer: {}", a.kind),
        }
    }
}

/// Split `name:value` (as given to `--header` or `header=`).
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: write a header as name:value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// Build a query from an admin URL's query string
/// (`app=..&user=..&method=..&path=..&header=k:v&client_ip=..&level=..`).
pub fn query_from_url(query: &str) -> Result<ExplainQuery, String> {
    let mut q = ExplainQuery::default();
    let mut path = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, _) = pair.split_once('=').unwrap_or((pair, ""));
        let v = rules::classify::query_param(pair, k)
            .map(|v| v.into_owned())
            .unwrap_or_default();
        match k {
            "app" => q.app = Some(v),
            "user" => q.user = Some(v),
            "method" => q.method = Some(v),
            "path" => path = Some(v),
            "header" => q.headers.push(parse_header(&v)?),
            "client_ip" => {
                q.client_ip = Some(
                    v.parse()
                        .map_err(|_| format!("{v:?} is not an IP address"))?,
                )
            }
            "level" => {
                q.level = Some(
                    v.parse()
                        .map_err(|_| format!("{v:?} is not an admission level"))?,
                )
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}; use app, user, method, path, header, client_ip, level"
                ));
            }
        }
    }
    q.path = path.ok_or("missing parameter `path`")?;
    Ok(q)
}

#[cfg(test)]
mod tests;
