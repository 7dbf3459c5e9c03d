//! Routing: which upstream a request goes to.
//!
//! The most specific matching route rule (see [`crate::matcher`]) decides. A rule names one
//! upstream, or a weighted split. For a split, in order: the override header (when enabled
//! and naming one of the split's targets), the whitelist (users, then apps), then the bucket
//! of the user ID, or for requests with none, of the rule's `no_user_key`.
//!
//! Nothing here allocates on the request path: the decision borrows from the snapshot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::Arc;

use http::HeaderName;

use crate::bucket::{BUCKETS, Weight, bucket, bucket_bytes, bucket_ip, edges};
use crate::ids::UpstreamId;
use crate::matcher::{CompiledMatch, MatchIndex, MatchInput, Order, Pair};
use crate::trusted::TrustedProxies;

/// The route rules in force: in config order, indexed by (app, interface), with the upstream
/// names a split's override header is compared with. Derefs to the rules, so `routes[id]`
/// is the rule of a [`RouteDecision::rule_id`].
#[derive(Debug, Default)]
pub struct Routes {
    rules: Vec<CompiledRoute>,
    index: MatchIndex,
    /// Rule names by rule ID, for cheap clones.
    rule_names: Box<[Arc<str>]>,
    /// Upstream names by [`UpstreamId`].
    upstream_names: Arc<[Arc<str>]>,
}

/// A route rule, compiled.
#[derive(Debug)]
pub struct CompiledRoute {
    /// Its name.
    pub name: Box<str>,
    /// Its conditions.
    pub matcher: CompiledMatch,
    /// Where matching requests go.
    pub action: RouteAction,
    /// Salt of its user buckets.
    pub salt: Box<str>,
    pub(crate) pinned_users: HashMap<Box<str>, UpstreamId>,
    pub(crate) pinned_apps: HashMap<Box<str>, UpstreamId>,
    pub(crate) override_header: Option<HeaderName>,
    /// Client addresses whose override header counts (empty: anyone's).
    pub(crate) override_from: TrustedProxies,
    pub(crate) no_user_key: CompiledNoUserKey,
    /// Its `shadow_split`: evaluated per request, never sent to.
    pub shadow: Option<ShadowSplit>,
    /// Where copies of a fraction of its requests go.
    pub mirror: Option<CompiledMirror>,
    /// The protocols its requests may switch to with HTTP/1.1 `Upgrade`, lowercase; empty:
    /// none (the `Upgrade` header is removed).
    pub upgrade: Box<[Box<str>]>,
}

/// A route's shadow split, compiled.
#[derive(Debug)]
pub struct ShadowSplit {
    /// Its targets, as a split's.
    pub targets: Vec<SplitEdge>,
    /// Salt of its buckets.
    pub salt: Box<str>,
    /// The salt is the route's: a request the route split keeps its bucket (no second hash).
    pub(crate) same_salt: bool,
}

/// A route's mirror, compiled: everything the request path needs, decided at load time.
#[derive(Debug)]
pub struct CompiledMirror {
    /// The upstream copies go to.
    pub upstream: UpstreamId,
    /// Share of users mirrored, in parts per million.
    pub ppm: u32,
    /// Salt of its user buckets (the route's `no_user_key` applies).
    pub salt: Box<str>,
    /// Largest request body copied.
    pub max_body_bytes: u64,
    /// Most copies in flight at once.
    pub max_in_flight: u32,
}

/// What a route rule does with a request.
#[derive(Debug)]
pub enum RouteAction {
    /// Send it to one upstream.
    Upstream(UpstreamId),
    /// Send it by bucket: each target owns the buckets below its edge and at or above the
    /// previous target's edge.
    Split(Vec<SplitEdge>),
}

/// One target of a compiled split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitEdge {
    /// The target.
    pub upstream: UpstreamId,
    /// Its weight in parts per million.
    pub ppm: u32,
    /// First bucket after its range.
    pub edge: u32,
}

#[derive(Debug)]
pub(crate) enum CompiledNoUserKey {
    ClientIp,
    Random,
    Header(HeaderName),
}

/// A request as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// The classified request and its headers.
    pub m: MatchInput<'a>,
    /// The client's IP (bucket key for requests without a user).
    pub client_ip: Option<IpAddr>,
    /// A random number drawn for this request (for `no_user_key: random`). The caller draws
    /// it, so this crate stays free of hidden randomness.
    pub random: u64,
    /// The request's candidate rules, looked up once for the route, limit and fallback
    /// lookups ([`Snapshot::pair`](crate::Snapshot::pair)); the default leaves each lookup
    /// to find its own.
    pub pair: Pair<'a>,
}

/// The outcome of routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteDecision<'s> {
    /// The rule that decided.
    pub rule: &'s CompiledRoute,
    /// Index of the rule in [`Routes`].
    pub rule_id: u32,
    /// The rule's name (precomputed: clone it for logs and metrics).
    pub rule_name: &'s Arc<str>,
    /// The upstream chosen.
    pub upstream: UpstreamId,
    /// Its name (precomputed: clone it for logs and metrics, no lookup needed).
    pub upstream_name: &'s Arc<str>,
    /// How it was chosen.
    pub via: Via,
    /// For a split, the index among its targets of the one chosen, when one was (a
    /// whitelist may pin an upstream the split does not name; the override header picks
    /// among the targets only): counted per target without looking it up again.
    pub target: Option<u32>,
    /// Whether a copy goes to the rule's mirror (always `false` without one).
    pub mirrored: bool,
}

/// How a route rule chose its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The rule names one upstream.
    Direct,
    /// The override header named a target.
    Override,
    /// The user is pinned by the whitelist.
    WhitelistUser,
    /// The app is pinned by the whitelist.
    WhitelistApp,
    /// The split placed the request by bucket.
    Split {
        /// The bucket, 0..1,000,000.
        bucket: u32,
        /// What was hashed.
        key: BucketKey,
    },
}

/// What a split's bucket was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketKey {
    /// The user ID.
    User,
    /// The `no_user_key` header.
    Header,
    /// The client IP.
    ClientIp,
    /// A random draw.
    Random,
}

impl PartialEq for CompiledRoute {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for CompiledRoute {}

// === impl CompiledRoute ===

impl CompiledRoute {
    /// Whether this rule lets a request switch to `protocol` (an `Upgrade` value the
    /// caller has checked is a single token): compared case-insensitively, no allocation.
    pub fn allows_upgrade(&self, protocol: &[u8]) -> bool {
        self.upgrade
            .iter()
            .any(|p| p.as_bytes().eq_ignore_ascii_case(protocol))
    }

    /// Choose the upstream for a request this rule matched, how, and (for a split) which of
    /// its targets that is; `upstream_names` names upstreams by ID (for the override header).
    pub fn choose(
        &self,
        upstream_names: &[Arc<str>],
        r: &RouteInput<'_>,
    ) -> (UpstreamId, Via, Option<u32>) {
        let targets = match &self.action {
            RouteAction::Upstream(u) => return (*u, Via::Direct, None),
            RouteAction::Split(t) => t,
        };
        // A whitelist names an upstream: its target is looked up (the exception).
        let pinned = |u: UpstreamId, via| {
            let target = targets.iter().position(|t| t.upstream == u);
            (u, via, target.map(|t| t as u32))
        };
        if let Some(h) = &self.override_header
            && let Some(v) = crate::classify::field(r.m.headers, h)
            && (self.override_from.is_empty()
                || r.client_ip
                    .is_some_and(|ip| self.override_from.contains(ip)))
        {
            let named = targets
                .iter()
                .position(|t| upstream_names[t.upstream.0 as usize].as_bytes() == v.as_bytes());
            if let Some(t) = named {
                return (targets[t].upstream, Via::Override, Some(t as u32));
            }
        }
        if let Some(u) = r.m.user.and_then(|u| self.pinned_users.get(u)) {
            return pinned(*u, Via::WhitelistUser);
        }
        if let Some(u) = r.m.app.and_then(|a| self.pinned_apps.get(a)) {
            return pinned(*u, Via::WhitelistApp);
        }
        let (b, key) = self.bucket_of(r);
        let t = targets
            .iter()
            .position(|t| b < t.edge)
            .expect("the last edge is 1,000,000 and buckets are below it");
        let via = Via::Split { bucket: b, key };
        (targets[t].upstream, via, Some(t as u32))
    }

    /// The request's bucket under this rule's salt, and what it was computed from.
    pub fn bucket_of(&self, r: &RouteInput<'_>) -> (u32, BucketKey) {
        bucket_of(&self.salt, &self.no_user_key, r)
    }

    /// Where the rule's shadow split would send a request the rule placed `via`, and the
    /// request's bucket under the shadow salt: `None` without a shadow split, or when the
    /// override header or the whitelist placed the request (they come before any split, so
    /// the shadow split would place it the same way).
    pub fn shadow_choice(&self, r: &RouteInput<'_>, via: Via) -> Option<(UpstreamId, u32)> {
        let s = self.shadow.as_ref()?;
        let b = match via {
            Via::Split { bucket, .. } if s.same_salt => bucket,
            Via::Split { .. } | Via::Direct => bucket_of(&s.salt, &self.no_user_key, r).0,
            Via::Override | Via::WhitelistUser | Via::WhitelistApp => return None,
        };
        let t = s
            .targets
            .iter()
            .find(|t| b < t.edge)
            .expect("the last edge is 1,000,000 and buckets are below it");
        Some((t.upstream, b))
    }

    /// Whether a request goes to the rule's mirror too: `None` without a mirror, else the
    /// answer and, when it took a hash, the bucket under the mirror's salt.
    pub fn mirror_of(&self, r: &RouteInput<'_>) -> Option<(bool, Option<(u32, BucketKey)>)> {
        let m = self.mirror.as_ref()?;
        Some(match m.ppm {
            // Every user, or none: no hash needed.
            0 => (false, None),
            BUCKETS => (true, None),
            ppm => {
                // A request bucketed by a random draw gets a draw of its own for the mirror
                // (the same bits would mirror the split's first target first).
                let r = RouteInput {
                    random: r.random.rotate_left(32) ^ 0x6d69_7272_6f72,
                    ..*r
                };
                let (b, key) = bucket_of(&m.salt, &self.no_user_key, &r);
                (b < ppm, Some((b, key)))
            }
        })
    }

    /// The request headers the rule reads: its conditions', the override header, the
    /// `no_user_key` header.
    pub(crate) fn header_names(&self) -> impl Iterator<Item = &HeaderName> {
        let own = [self.override_header.as_ref(), self.no_user_key.header()];
        self.matcher.header_names().chain(own.into_iter().flatten())
    }
}

// === impl CompiledNoUserKey ===

impl CompiledNoUserKey {
    /// The header it reads, if it reads one.
    pub(crate) fn header(&self) -> Option<&HeaderName> {
        match self {
            Self::Header(h) => Some(h),
            Self::ClientIp | Self::Random => None,
        }
    }
}

// === impl RouteAction ===

impl RouteAction {
    /// A split over `targets` with their weights, in order. The weights must sum to 100%
    /// (validation checks it), at most one being `rest`.
    pub(crate) fn split(targets: Vec<(UpstreamId, Weight)>) -> Self {
        let weights: Vec<Weight> = targets.iter().map(|&(_, w)| w).collect();
        let mut prev = 0;
        RouteAction::Split(
            targets
                .iter()
                .zip(edges(&weights))
                .map(|(&(upstream, _), edge)| {
                    let e = SplitEdge {
                        upstream,
                        ppm: edge - prev,
                        edge,
                    };
                    prev = edge;
                    e
                })
                .collect(),
        )
    }
}

/// A request's bucket under `salt`: its user's, or for requests with none, that of
/// `no_user_key`. Shared by splits and fallback fractions.
pub(crate) fn bucket_of(
    salt: &str,
    no_user_key: &CompiledNoUserKey,
    r: &RouteInput<'_>,
) -> (u32, BucketKey) {
    if let Some(u) = r.m.user {
        return (bucket(salt, u), BucketKey::User);
    }
    let by_ip = |ip: Option<IpAddr>| match ip {
        Some(ip) => (bucket_ip(salt, ip), BucketKey::ClientIp),
        None => ((r.random % u64::from(BUCKETS)) as u32, BucketKey::Random),
    };
    match no_user_key {
        CompiledNoUserKey::ClientIp => by_ip(r.client_ip),
        CompiledNoUserKey::Random => ((r.random % u64::from(BUCKETS)) as u32, BucketKey::Random),
        CompiledNoUserKey::Header(h) => {
            match crate::classify::field(r.m.headers, h).filter(|v| !v.is_empty()) {
                Some(v) => (bucket_bytes(salt, v.as_bytes()), BucketKey::Header),
                None => by_ip(r.client_ip),
            }
        }
    }
}

// === impl Routes ===

impl Routes {
    /// Index compiled rules; `upstream_names` names upstreams by ID.
    pub(crate) fn new(rules: Vec<CompiledRoute>, upstream_names: Arc<[Arc<str>]>) -> Self {
        let index = MatchIndex::build(rules.iter().map(|r| &r.matcher), Order::MostSpecific);
        let rule_names = rules.iter().map(|r| Arc::from(&*r.name)).collect();
        Self {
            rules,
            index,
            rule_names,
            upstream_names,
        }
    }

    /// Route a request: the most specific matching rule, and its choice.
    pub fn route(&self, r: &RouteInput<'_>) -> Option<RouteDecision<'_>> {
        self.route_in(None, r)
    }

    /// [`Routes::route`], from the index's candidates of the request's pair when the caller
    /// has them.
    #[inline]
    pub(crate) fn route_in(
        &self,
        candidates: Option<&[u32]>,
        r: &RouteInput<'_>,
    ) -> Option<RouteDecision<'_>> {
        let matcher = |i: u32| &self.rules[i as usize].matcher;
        let rule_id = match candidates {
            Some(list) => self.index.best_in(list, &r.m, matcher),
            None => self.index.best(&r.m, matcher),
        }?;
        let rule = &self.rules[rule_id as usize];
        let (upstream, via, target) = rule.choose(&self.upstream_names, r);
        let mirrored = rule.mirror.is_some() && rule.mirror_of(r).is_some_and(|(m, _)| m);
        Some(RouteDecision {
            rule,
            rule_id,
            rule_name: &self.rule_names[rule_id as usize],
            upstream,
            upstream_name: &self.upstream_names[upstream.0 as usize],
            via,
            target,
            mirrored,
        })
    }

    /// The rules indexed by the app and interface they constrain.
    pub fn index(&self) -> &MatchIndex {
        &self.index
    }
}

impl Deref for Routes {
    type Target = [CompiledRoute];

    fn deref(&self) -> &[CompiledRoute] {
        &self.rules
    }
}

#[cfg(test)]
mod tests;
