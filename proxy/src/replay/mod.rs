//! `tidegate replay`: decide every request of a recorded access log again under a candidate
//! config, and report per rule what would change.
//!
//! Each line of the gateway's own JSON access log carries what a decision reads: the time it
//! was decided, method and path, the client address, the app and user the gateway resolved
//! (after token verification: identity is taken from the log, not re-extracted, so an edit
//! of the identity extractors cannot be replayed), the header values the rules read, and
//! what the decision came to. The candidate's decision ([`decide::replay`], the phases of the
//! request path in the same order) is compared with a baseline: the decision the log
//! recorded, or with `--live` the current config's, replayed the same way.
//!
//! Limits are simulated in the log's own time: each side's limiters run on a manual clock
//! moved to each line's `at_us`, so quota is spent and regained as it was. Breakers are not
//! replayed (their state came from upstream answers), nor are cluster-scope limits (decided
//! in Redis from the whole fleet's traffic). Requests bucketed by a random draw (no user,
//! `no_user_key: random`) have no replayable answer and are reported apart.
//!
//! The log is streamed line by line (each read where it lies in the reader's buffer; a
//! line's fields are borrowed from it): memory is bounded by the config, the number of distinct changes, and
//! [`Options::users_bound`] distinct users counted exactly (past it, counts say "at least").

pub mod line;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::BufRead;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::FakeRelativeClock;
use http::{HeaderMap, HeaderName, Method};
use rules::route::BucketKey;
use rules::{Classified, RequestParts, Via};
use serde::Serialize;

use self::line::{ACCESS_TARGET, InputsError, Line, decode_inputs};
use crate::govern::limit::{Limiters, Outcome};
use crate::pipeline::decide::{self, Answered, Replayed};
use crate::runtime::Runtime;

/// How to replay.
#[derive(Debug, Clone)]
pub struct Options {
    /// Judge overload admission at this level (each request with the user priorities of
    /// its own hour); `None`: everyone is admitted, and requests the log recorded as shed
    /// are not compared (the level they met is not in the log).
    pub level: Option<u32>,
    /// Distinct users counted exactly, over all changes together; past it, user counts are
    /// lower bounds (marked so). Each costs about 16 bytes.
    pub users_bound: usize,
    /// Users named per change (a sample, the first seen).
    pub sample_users: usize,
    /// Line numbers kept of unparseable lines.
    pub first_bad_lines: usize,
}

/// The report of a replay (its `Display` is the text form; it serializes as `--json`).
#[derive(Debug, Serialize)]
pub struct Report {
    /// What the candidate was compared with: `recorded` (the log's decisions) or `live`.
    pub baseline: &'static str,
    /// The admission level judged at, if any.
    pub level: Option<u32>,
    /// Lines read (a truncated last line included).
    pub lines: u64,
    /// Access log lines among them.
    pub requests: u64,
    /// Requests decided under both and compared.
    pub compared: u64,
    /// Compared requests whose answer did not change.
    pub unchanged: u64,
    /// Requests whose answer changed.
    pub changed: u64,
    /// What was not compared, and why.
    pub not_replayed: NotReplayed,
    /// Lines decided earlier than a line before them (written out of order: the log is
    /// written when answered), decided at the later time instead; and the largest gap.
    pub out_of_order: u64,
    /// The largest such gap, in microseconds.
    pub max_skew_us: u64,
    /// Every change, grouped by rule and by (before, after).
    pub changes: Vec<Change>,
    /// Requests a dry-run limit of the candidate would have refused, per rule.
    pub dry_run: Vec<DryRun>,
    /// Headers the candidate's rules read that no line carried: the recording config did
    /// not read them (or they are never logged, as credentials), so they replay as absent.
    pub headers_never_seen: Vec<String>,
    /// [`Options::users_bound`].
    pub users_bound: usize,
    /// Wall time of the replay, in seconds.
    pub seconds: f64,
    /// Lines per second (one core: a replay is single-threaded).
    pub lines_per_second: f64,
}

/// Requests not compared.
#[derive(Debug, Default, Serialize)]
pub struct NotReplayed {
    /// Lines that are not JSON, or access lines without the fields a replay needs (an
    /// older gateway's).
    pub unparseable: u64,
    /// The first few of their line numbers (1-based).
    pub unparseable_lines: Vec<u64>,
    /// Whether the last line was cut short (a log still being written): not counted above.
    pub truncated_last_line: bool,
    /// Lines of the gateway's other logs (not access lines).
    pub other_lines: u64,
    /// Bucketed by a random draw (no user, `no_user_key: random`).
    pub random: u64,
    /// Answered by an open breaker, or its alternate upstream.
    pub breaker: u64,
    /// Refused before any decision (malformed head, missing or invalid token, an invalid
    /// ID refused by `identity.on_invalid: reject`).
    pub refused: u64,
    /// Shed by overload admission, replayed without `--level`.
    pub shed_level_unknown: u64,
    /// A header the candidate reads was logged by name alone (over the log's bound), or
    /// the path was cut.
    pub inputs_cut: u64,
}

/// A group of requests whose answer changed the same way.
#[derive(Debug, Serialize)]
pub struct Change {
    /// `route`, `newly_limited`, `no_longer_limited`, `newly_degraded`,
    /// `no_longer_degraded`, `newly_shed`, `no_longer_shed`, `newly_unrouted`,
    /// `newly_routed`.
    pub kind: &'static str,
    /// The rule the change is about (the route, limit or fallback rule), or `none`.
    pub rule: String,
    /// The answer before (under the baseline).
    pub from: String,
    /// The answer after (under the candidate).
    pub to: String,
    /// Requests.
    pub requests: u64,
    /// Distinct users among them (requests without a user are not counted).
    pub users: u64,
    /// Whether `users` is exact (else a lower bound: [`Options::users_bound`] was reached).
    pub users_exact: bool,
    /// The first users seen.
    pub sample_users: Vec<String>,
}

/// What a dry-run limit would have done.
#[derive(Debug, Serialize)]
pub struct DryRun {
    /// The rule.
    pub rule: String,
    /// Requests it would have refused.
    pub requests: u64,
}

/// An answer, with names interned: comparable across configs by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Verdict {
    Forward { route: u32, upstream: u32 },
    Limited(u32),
    Fallback(u32),
    Shed,
    NoRoute,
}

/// Why a request is not compared.
#[derive(Debug, Clone, Copy)]
enum Skip {
    Random,
    Breaker,
    Refused,
    ShedLevelUnknown,
    InputsCut,
    Unparseable,
}

/// One config being replayed: its runtime and its limiters on the replay's clock, and the
/// interned names of its rules by index.
struct Side {
    rt: Runtime,
    limiters: Limiters<FakeRelativeClock>,
    routes: Vec<u32>,
    upstreams: Vec<u32>,
    limits: Vec<u32>,
    fallbacks: Vec<u32>,
    /// Dry-run refusals per limit.
    dry_run: Vec<u64>,
}

/// Names interned to small numbers (rule and upstream names of every side and the log).
#[derive(Default)]
struct Names {
    ids: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    names: Vec<Box<str>>,
}

/// The requests of one change.
#[derive(Default)]
struct Moved {
    requests: u64,
    users: HashSet<u64>,
    users_exact: bool,
    sample: Vec<Box<str>>,
}

/// A replay in progress: feed it lines, then [`Replay::finish`].
pub struct Replay {
    opts: Options,
    candidate: Side,
    live: Option<Side>,
    clock: FakeRelativeClock,
    /// `at_us` of the first line: the clock's zero.
    origin_us: Option<u64>,
    /// The clock's reading, in microseconds since `origin_us`.
    now_us: u64,
    names: Names,
    /// Headers either side's rules read, by name → (index, name).
    wanted: HashMap<Box<str>, (usize, HeaderName)>,
    seen: Vec<bool>,
    headers: HeaderMap,
    scratch: Vec<u8>,
    changes: HashMap<(Verdict, Verdict), Moved>,
    users_tracked: usize,
    report: Report,
    started: Instant,
}

// === impl Replay ===

impl Replay {
    /// A replay of `candidate` against the recorded decisions, or against `live` when
    /// given. Both start with fresh limiters (the log's first requests meet full buckets).
    pub fn new(candidate: Runtime, live: Option<Runtime>, opts: Options) -> Self {
        let clock = FakeRelativeClock::default();
        let mut names = Names::default();
        let baseline = if live.is_some() { "live" } else { "recorded" };
        let candidate = Side::new(candidate, &clock, &mut names);
        let live = live.map(|rt| Side::new(rt, &clock, &mut names));
        let mut wanted = HashMap::new();
        for side in std::iter::once(&candidate).chain(&live) {
            for h in side.rt.snapshot.headers_read() {
                let n = wanted.len();
                wanted.entry(h.as_str().into()).or_insert((n, h));
            }
        }
        Self {
            seen: vec![false; wanted.len()],
            wanted,
            report: Report::empty(baseline, &opts),
            opts,
            candidate,
            live,
            clock,
            origin_us: None,
            now_us: 0,
            names,
            headers: HeaderMap::new(),
            scratch: Vec::new(),
            changes: HashMap::new(),
            users_tracked: 0,
            started: Instant::now(),
        }
    }

    /// Replay every line of `input`. Lines are read where they lie in `input`'s buffer; only
    /// a line cut by the buffer's end is copied (into a buffer kept for the next one).
    pub fn read(&mut self, mut input: impl BufRead) -> std::io::Result<()> {
        let mut cut: Vec<u8> = Vec::new();
        loop {
            let buf = match input.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                if !cut.is_empty() {
                    self.raw_line(&cut, false);
                }
                return Ok(());
            }
            let mut start = 0;
            if !cut.is_empty() {
                let Some(end) = memchr::memchr(b'\n', buf) else {
                    cut.extend_from_slice(buf);
                    let n = buf.len();
                    input.consume(n);
                    continue;
                };
                cut.extend_from_slice(&buf[..end]);
                self.raw_line(&cut, true);
                cut.clear();
                start = end + 1;
            }
            let base = start;
            for end in memchr::memchr_iter(b'\n', &buf[base..]) {
                let end = base + end;
                self.raw_line(&buf[start..end], true);
                start = end + 1;
            }
            cut.extend_from_slice(&buf[start..]);
            let n = buf.len();
            input.consume(n);
        }
    }

    /// A line without its newline: without a `\r` before it too.
    fn raw_line(&mut self, line: &[u8], complete: bool) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        self.line(line, complete);
    }

    /// Replay one line (without its newline); `complete` is false for a last line without
    /// a newline, which may have been cut short.
    pub fn line(&mut self, bytes: &[u8], complete: bool) {
        self.report.lines += 1;
        let n = self.report.lines;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let Ok(line) = Line::parse(bytes) else {
            if complete {
                self.skip(Skip::Unparseable, n);
            } else {
                self.report.not_replayed.truncated_last_line = true;
            }
            return;
        };
        if line.target.as_deref() != Some(ACCESS_TARGET) {
            self.report.not_replayed.other_lines += 1;
            return;
        }
        self.report.requests += 1;
        match self.compare(&line) {
            Ok(()) => {}
            Err(skip) => self.skip(skip, n),
        }
    }

    fn skip(&mut self, why: Skip, line_no: u64) {
        let nr = &mut self.report.not_replayed;
        match why {
            Skip::Random => nr.random += 1,
            Skip::Breaker => nr.breaker += 1,
            Skip::Refused => nr.refused += 1,
            Skip::ShedLevelUnknown => nr.shed_level_unknown += 1,
            Skip::InputsCut => nr.inputs_cut += 1,
            Skip::Unparseable => {
                nr.unparseable += 1;
                if nr.unparseable_lines.len() < self.opts.first_bad_lines {
                    nr.unparseable_lines.push(line_no);
                }
            }
        }
    }

    /// Decide one access line under both sides and count the difference.
    fn compare(&mut self, line: &Line<'_>) -> Result<(), Skip> {
        let answered = (line.decision.as_deref())
            .and_then(Answered::from_label)
            .ok_or(Skip::Unparseable)?;
        let (Some(at_us), Some(method), Some(path)) = (line.at_us, &line.method, &line.path) else {
            return Err(Skip::Unparseable);
        };
        match answered {
            Answered::Refused | Answered::InvalidIdentity => return Err(Skip::Refused),
            Answered::Breaker if self.live.is_none() => return Err(Skip::Breaker),
            Answered::Shed if self.opts.level.is_none() && self.live.is_none() => {
                return Err(Skip::ShedLevelUnknown);
            }
            _ => {}
        }
        if path.ends_with('…') {
            return Err(Skip::InputsCut);
        }
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| Skip::Unparseable)?;
        let client_ip: Option<IpAddr> = line.client.as_deref().and_then(|c| c.parse().ok());
        let wanted = &self.wanted;
        let inputs = line.inputs.as_deref().unwrap_or("");
        let lookup = |name: &str| wanted.get(name).map(|(i, h)| (*i, h.clone()));
        match decode_inputs(
            inputs,
            lookup,
            &mut self.headers,
            &mut self.seen,
            &mut self.scratch,
        ) {
            Ok(()) => {}
            Err(InputsError::Cut) => return Err(Skip::InputsCut),
            Err(InputsError::Malformed) => return Err(Skip::Unparseable),
        }
        self.advance_to(at_us);

        let (app, user) = (Line::id(&line.app), Line::id(&line.user));
        let admission = self.opts.level.map(|l| (l, at_us / 1_000_000));
        let req = Request {
            method: &method,
            path,
            app,
            user,
            client_ip,
            headers: &self.headers,
            admission,
        };
        let after = self.candidate.decide(&req).ok_or(Skip::Random)?;
        let before = match &mut self.live {
            Some(live) => live.decide(&req).ok_or(Skip::Random)?,
            None => recorded(line, answered, &mut self.names).ok_or(Skip::Unparseable)?,
        };
        self.report.compared += 1;
        if before == after {
            self.report.unchanged += 1;
            return Ok(());
        }
        self.report.changed += 1;
        let room = self.opts.users_bound.saturating_sub(self.users_tracked);
        let moved = self
            .changes
            .entry((before, after))
            .or_insert_with(|| Moved {
                users_exact: true,
                ..Moved::default()
            });
        moved.requests += 1;
        if let Some(u) = user {
            if room == 0 {
                moved.users_exact &= moved.users.contains(&user_hash(u));
            } else if moved.users.insert(user_hash(u)) {
                self.users_tracked += 1;
                if moved.sample.len() < self.opts.sample_users {
                    moved.sample.push(u.into());
                }
            }
        }
        Ok(())
    }

    /// Move the clock to `at_us` (never back: an earlier line is decided at the later time).
    fn advance_to(&mut self, at_us: u64) {
        let origin = *self.origin_us.get_or_insert(at_us);
        let t = at_us.saturating_sub(origin);
        if t > self.now_us {
            self.clock.advance(Duration::from_micros(t - self.now_us));
            self.now_us = t;
        } else if t < self.now_us {
            self.report.out_of_order += 1;
            self.report.max_skew_us = self.report.max_skew_us.max(self.now_us - t);
        }
    }

    /// The report.
    pub fn finish(mut self) -> Report {
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut r = std::mem::replace(&mut self.report, Report::empty("", &self.opts));
        r.seconds = elapsed;
        r.lines_per_second = r.lines as f64 / elapsed.max(1e-9);
        let names = &self.names;
        let mut changes: Vec<Change> = self
            .changes
            .into_iter()
            .map(|((from, to), m)| {
                let (kind, rule) = classify_change(from, to);
                Change {
                    kind,
                    rule: rule.map_or_else(|| "none".to_owned(), |i| names.name(i).to_owned()),
                    from: names.describe(from),
                    to: names.describe(to),
                    requests: m.requests,
                    users: m.users.len() as u64,
                    users_exact: m.users_exact,
                    sample_users: m.sample.into_iter().map(String::from).collect(),
                }
            })
            .collect();
        changes.sort_by(|a, b| {
            (a.kind, &a.rule, b.requests, &a.from, &a.to)
                .cmp(&(b.kind, &b.rule, a.requests, &b.from, &b.to))
        });
        r.changes = changes;
        let c = &self.candidate;
        r.dry_run = (c.dry_run.iter().enumerate())
            .filter(|&(_, &n)| n > 0)
            .map(|(i, &n)| DryRun {
                rule: c.rt.snapshot.governance.limit_name(i as u32).to_string(),
                requests: n,
            })
            .collect();
        let mut never: Vec<String> = (self.wanted.iter())
            .filter(|(_, (i, _))| !self.seen[*i])
            .filter(|(name, _)| {
                c.rt.snapshot
                    .headers_read()
                    .iter()
                    .any(|h| h.as_str() == &***name)
            })
            .map(|(name, _)| name.to_string())
            .collect();
        never.sort();
        r.headers_never_seen = never;
        r
    }
}

/// Replay every line of `input`: `candidate` against the recorded decisions, or `live`.
pub fn replay(
    candidate: Runtime,
    live: Option<Runtime>,
    input: impl BufRead,
    opts: Options,
) -> std::io::Result<Report> {
    let mut r = Replay::new(candidate, live, opts);
    r.read(input)?;
    Ok(r.finish())
}

/// What a side decides a logged request by.
struct Request<'a> {
    method: &'a Method,
    path: &'a str,
    app: Option<&'a str>,
    user: Option<&'a str>,
    client_ip: Option<IpAddr>,
    headers: &'a HeaderMap,
    admission: Option<(u32, u64)>,
}

// === impl Side ===

impl Side {
    fn new(rt: Runtime, clock: &FakeRelativeClock, names: &mut Names) -> Self {
        let snap = &rt.snapshot;
        let gov = &snap.governance;
        let limiters = Limiters::build(snap, clock, None);
        Self {
            routes: snap.routes.iter().map(|r| names.id(&r.name)).collect(),
            upstreams: snap.upstreams.iter().map(|u| names.id(&u.name)).collect(),
            limits: gov.limits.iter().map(|l| names.id(&l.name)).collect(),
            fallbacks: gov.fallbacks.iter().map(|f| names.id(&f.name)).collect(),
            dry_run: vec![0; gov.limits.len()],
            limiters,
            rt,
        }
    }

    /// The answer under this side's config, or `None` when it hangs on a random draw.
    fn decide(&mut self, q: &Request<'_>) -> Option<Verdict> {
        const NO_QUERY: Option<&str> = None;
        let parts = RequestParts {
            method: q.method,
            path: q.path,
            query: NO_QUERY,
            headers: q.headers,
        };
        // The interface and the key's path parameters come from the logged path, as the
        // gateway classified it; app and user from the line (they may have come from a
        // token the log does not keep).
        let routed = self.rt.snapshot.classify(parts);
        let class = Classified {
            interface: routed.interface,
            app: q.app.map(Into::into),
            user: q.user.map(Into::into),
            invalid_id: false,
            params: routed.params,
        };
        let (limiters, dry_run) = (&self.limiters, &mut self.dry_run);
        let r: Replayed<'_, FakeRelativeClock> = decide::replay(
            &self.rt,
            &class,
            q.headers,
            q.client_ip,
            q.admission,
            limiters,
            |l, o, _| {
                if o == Outcome::DryRunLimited
                    && let Some(i) = limiters.rules.iter().position(|x| std::ptr::eq(&**x, l))
                {
                    dry_run[i] += 1;
                }
            },
        );
        if !r.admitted {
            return Some(Verdict::Shed);
        }
        if let Some(rej) = &r.limited {
            let i = self
                .limiters
                .rules
                .iter()
                .position(|x| Arc::ptr_eq(x, &rej.rule))
                .expect("a rejection comes from one of the side's limiters");
            return Some(Verdict::Limited(self.limits[i]));
        }
        if let Some(f) = &r.fallback {
            if matches!(f.bucket, Some((_, BucketKey::Random))) {
                return None;
            }
            return Some(Verdict::Fallback(self.fallbacks[f.rule_id as usize]));
        }
        match &r.route {
            None => Some(Verdict::NoRoute),
            Some(d)
                if matches!(
                    d.via,
                    Via::Split {
                        key: BucketKey::Random,
                        ..
                    }
                ) =>
            {
                None
            }
            Some(d) => Some(Verdict::Forward {
                route: self.routes[d.rule_id as usize],
                upstream: self.upstreams[d.upstream.0 as usize],
            }),
        }
    }
}

/// The answer a line records, or `None` when a field it needs is missing.
fn recorded(line: &Line<'_>, answered: Answered, names: &mut Names) -> Option<Verdict> {
    let mut name = |v: &Option<std::borrow::Cow<'_, str>>| {
        v.as_deref().filter(|s| *s != "none").map(|s| names.id(s))
    };
    Some(match answered {
        Answered::Forward => Verdict::Forward {
            route: name(&line.route)?,
            upstream: name(&line.upstream)?,
        },
        Answered::Limited => Verdict::Limited(name(&line.rule)?),
        Answered::Fallback => Verdict::Fallback(name(&line.rule)?),
        Answered::Shed => Verdict::Shed,
        Answered::NoRoute => Verdict::NoRoute,
        Answered::Breaker | Answered::InvalidIdentity | Answered::Refused => return None,
    })
}

/// The kind of a change and the rule it is about.
fn classify_change(from: Verdict, to: Verdict) -> (&'static str, Option<u32>) {
    use Verdict as V;
    match (from, to) {
        (V::Forward { .. }, V::Forward { route, .. }) => ("route", Some(route)),
        (_, V::Limited(r)) => ("newly_limited", Some(r)),
        (V::Limited(r), _) => ("no_longer_limited", Some(r)),
        (_, V::Fallback(f)) => ("newly_degraded", Some(f)),
        (V::Fallback(f), _) => ("no_longer_degraded", Some(f)),
        (_, V::Shed) => ("newly_shed", None),
        (V::Shed, _) => ("no_longer_shed", None),
        (_, V::NoRoute) => ("newly_unrouted", None),
        (V::NoRoute, V::Forward { route, .. }) => ("newly_routed", Some(route)),
    }
}

fn user_hash(u: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(u.as_bytes())
}

// === impl Names ===

impl Names {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.ids.get(s) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(s.into());
        self.ids.insert(s.into(), i);
        i
    }

    fn name(&self, i: u32) -> &str {
        &self.names[i as usize]
    }

    fn describe(&self, v: Verdict) -> String {
        match v {
            Verdict::Forward { route, upstream } => {
                format!("{} (route {})", self.name(upstream), self.name(route))
            }
            Verdict::Limited(r) => format!("429 by limit {}", self.name(r)),
            Verdict::Fallback(f) => format!("fallback {}", self.name(f)),
            Verdict::Shed => "503 shed".to_owned(),
            Verdict::NoRoute => "404 no route".to_owned(),
        }
    }
}

// === impl Report ===

impl Report {
    fn empty(baseline: &'static str, opts: &Options) -> Self {
        Self {
            baseline,
            level: opts.level,
            lines: 0,
            requests: 0,
            compared: 0,
            unchanged: 0,
            changed: 0,
            not_replayed: NotReplayed::default(),
            out_of_order: 0,
            max_skew_us: 0,
            changes: Vec::new(),
            dry_run: Vec::new(),
            headers_never_seen: Vec::new(),
            users_bound: opts.users_bound,
            seconds: 0.0,
            lines_per_second: 0.0,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let baseline = match self.baseline {
            "live" => "the live config's decisions",
            _ => "the decisions the log recorded",
        };
        writeln!(f, "replayed against {baseline}")?;
        if let Some(l) = self.level {
            writeln!(f, "admission judged at level {l}")?;
        }
        writeln!(
            f,
            "{} lines, {} requests: {} compared, {} unchanged, {} changed",
            self.lines, self.requests, self.compared, self.unchanged, self.changed
        )?;
        let nr = &self.not_replayed;
        let skipped = [
            (nr.random, "bucketed by a random draw"),
            (nr.breaker, "answered by an open breaker"),
            (nr.refused, "refused before a decision"),
            (nr.shed_level_unknown, "shed (no --level given)"),
            (nr.inputs_cut, "with inputs over the log's bound"),
            (nr.other_lines, "other log lines"),
        ];
        for (n, what) in skipped.into_iter().filter(|&(n, _)| n > 0) {
            writeln!(f, "not replayed: {n} {what}")?;
        }
        if nr.unparseable > 0 {
            let lines: Vec<String> = nr.unparseable_lines.iter().map(u64::to_string).collect();
            writeln!(
                f,
                "not replayed: {} unparseable (lines {}{})",
                nr.unparseable,
                lines.join(", "),
                if nr.unparseable > lines.len() as u64 {
                    ", ..."
                } else {
                    ""
                }
            )?;
        }
        if nr.truncated_last_line {
            writeln!(f, "the last line was cut short (not replayed)")?;
        }
        if self.out_of_order > 0 {
            writeln!(
                f,
                "limits: {} lines out of time order (by up to {} µs), decided at the later time",
                self.out_of_order, self.max_skew_us
            )?;
        }
        if !self.headers_never_seen.is_empty() {
            writeln!(
                f,
                "warning: the candidate reads headers no line carries (replayed as absent): {}",
                self.headers_never_seen.join(", ")
            )?;
        }
        writeln!(
            f,
            "{:.3} s, {:.0} lines/s",
            self.seconds, self.lines_per_second
        )?;
        if self.changes.is_empty() {
            writeln!(f, "\nno changes")?;
        } else {
            writeln!(f, "\nchanges:")?;
        }
        for c in &self.changes {
            let users = match c.users_exact {
                true => c.users.to_string(),
                false => format!("≥{}", c.users),
            };
            write!(
                f,
                "  {:<19} {:<16} {} → {}: {} requests, {} users",
                c.kind, c.rule, c.from, c.to, c.requests, users
            )?;
            if !c.sample_users.is_empty() {
                write!(f, " (e.g. {})", c.sample_users.join(", "))?;
            }
            writeln!(f)?;
        }
        for d in &self.dry_run {
            writeln!(
                f,
                "  dry run: limit {} would refuse {} requests",
                d.rule, d.requests
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
