//! Matching requests to rules, shared by every rule kind (routes, limits, fallbacks).
//!
//! A [`CompiledMatch`] is one rule's conditions with everything precomputed; a [`MatchIndex`]
//! buckets rules by the app and interface they constrain so that finding the rules that can
//! apply to a request costs at most four hash lookups, whatever the number of rules. Within a
//! bucket rules are sorted most specific first.
//!
//! The four lists of every (app, interface) pair some rule names are merged when the index is
//! built ([`Merged`]), in the order its lookups want (most specific first for `best`, rule
//! ID for `all`): a lookup is one hash of the app and an array index, and `all` over rules
//! that only name apps and interfaces returns the merged list itself. When the merged lists
//! would be too large (many apps times many interfaces), the pairs a thread meets are merged
//! on first use and remembered per thread instead (`Memo`): a stream of requests repeats a
//! few pairs.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::bucket::{BucketRange, bucket};
use crate::ids::InterfaceId;
use crate::model::Match;

/// What matching reads of a request.
#[derive(Debug, Clone, Copy)]
pub struct MatchInput<'a> {
    /// App ID, if any.
    pub app: Option<&'a str>,
    /// Interface, if any.
    pub interface: Option<InterfaceId>,
    /// User ID, if any.
    pub user: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The path parameters limit keys read ([`crate::Classified::params`]); `&[]` when the
    /// caller has none.
    pub params: &'a [Option<Cow<'a, [u8]>>],
}

/// One rule's conditions, compiled.
#[derive(Debug)]
pub struct CompiledMatch {
    /// Precedence (see [`crate::model::Match`]); higher wins.
    pub specificity: u8,
    apps: Option<Vec<Box<str>>>,
    interfaces: Option<Vec<InterfaceId>>,
    users: Option<HashSet<Box<str>>>,
    user_buckets: Option<(Box<str>, BucketRange)>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Why a rule did not match, for `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The app is not listed.
    App,
    /// The interface is not listed.
    Interface,
    /// The user is not listed (or there is no user).
    User,
    /// The user's bucket is outside the range (or there is no user).
    UserBucket,
    /// A required header is missing or has another value.
    Header,
}

/// The index's hasher: looked up several times per request (routes, limits, fallbacks), so
/// foldhash rather than SipHash. Seeded per process; the tables are built from the config
/// and only read with request data, so there is no insertion for a client to flood.
type FastHash = foldhash::fast::RandomState;

/// Rules bucketed by (app, interface). Rule IDs are indices into the caller's rule list.
#[derive(Debug, Default)]
pub struct MatchIndex {
    /// This index among all built in the process (never reused): the memo's key.
    id: u64,
    /// The order of the merged and memoized candidate lists.
    order: Order,
    by_app: HashMap<Box<str>, IfaceTable, FastHash>,
    any_app: IfaceTable,
    /// Every pair's candidates, merged when the index was built; `None` when they would
    /// exceed [`MERGED_MAX`] (the memo is used then).
    merged: Option<Merged>,
}

/// The order of an index's merged candidate lists: what its lookups want. Either lookup is
/// right on either order; the other order costs it a sort or the four lists.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Most specific first, then by rule ID: for [`MatchIndex::best`].
    #[default]
    MostSpecific,
    /// By rule ID: for [`MatchIndex::all`].
    RuleId,
}

/// The candidates of every (app, interface) pair, merged: each app some rule names has a
/// list per interface ID up to the highest one a rule for it (or for any app) names, and a
/// last list for any other interface or none; requests of other apps, or none, take
/// `other`'s lists. Lists lie end to end in `ids`.
#[derive(Debug)]
struct Merged {
    apps: AppLists,
    spans: Box<[Span]>,
    ids: Box<[u32]>,
}

/// Where the lists of each app lie, in a table of lists per (app, interface): the index of
/// its first list and how many it has (see [`Merged`] and [`PairTable`]).
#[derive(Debug, Default)]
struct AppLists {
    /// Per app of up to 15 bytes (most are: `douyin`, `1128`), by [`short_app`].
    by_short_app: HashMap<u128, (u32, u32), FastHash>,
    /// The same for longer app IDs.
    by_long_app: HashMap<Box<str>, (u32, u32), FastHash>,
    /// Whether either map has an app (a table whose rules name none skips the hash).
    has_apps: bool,
    /// The lists of an app no rule names, or of a request without one.
    other: (u32, u32),
}

/// One merged list: `ids[start..end]`, and whether a rule in it narrows (users, buckets or
/// headers), so that its conditions must be checked per request.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: u32,
    end: u32,
    narrows: bool,
}

/// The candidate lists of several indexes ([`PAIR_INDEXES`]: the route, limit and fallback
/// indexes) for every (app, interface) pair, under one app look-up: a request's candidates
/// of all three are found with one hash of its app, not one per index. Built from indexes
/// that merged their lists ([`Merged`]); laid out as they are, each index's lists copied.
#[derive(Debug)]
pub struct PairTable {
    /// This table among all built in the process: a [`Pair`] is only read by its own.
    id: u64,
    apps: AppLists,
    /// Per (app, interface) position, each index's list.
    pairs: Box<[[Span; PAIR_INDEXES]]>,
    ids: Box<[u32]>,
}

/// Indexes a [`PairTable`] covers.
pub const PAIR_INDEXES: usize = 3;

/// A request's candidate lists in a [`PairTable`], looked up once for all its lookups. The
/// default (or one from another table) has none: each lookup then finds its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pair<'a> {
    table: u64,
    spans: Option<&'a [Span; PAIR_INDEXES]>,
}

/// Most lists and candidate IDs [`Merged`] holds, together: rules for any app or interface
/// are repeated in each list, and there is a list per app and interface, so a config with
/// many of both uses the memo instead.
const MERGED_MAX: usize = 1 << 16;

/// Source of [`MatchIndex`] and [`PairTable`] IDs; 0 is an index that was never built (and is
/// not memoized).
static NEXT_INDEX_ID: AtomicU64 = AtomicU64::new(1);

/// Per-thread memo of merged candidate lists, direct-mapped (see the module docs). A slot's
/// key is exact (the index, the interface and the app's bytes), so a hit gives what the
/// lookups would; an app that changes with every request only replaces slots.
struct Memo {
    slots: Vec<Slot>,
    hasher: foldhash::fast::FixedState,
}

/// Memo size (a power of two).
const MEMO_SLOTS: usize = 256;
/// Longer app IDs are looked up each time (keys stay inline).
const MEMO_APP_MAX: usize = 32;
/// Longer candidate lists are not kept (a slot's memory stays small whatever the config).
const MEMO_LIST_MAX: usize = 64;
/// `Slot::app_len` of a request without an app.
const NO_APP: u8 = u8::MAX;

#[derive(Default)]
struct Slot {
    index: u64,
    interface: u32,
    app_len: u8,
    app: [u8; MEMO_APP_MAX],
    /// The candidates, in the index's order, each once.
    list: Vec<u32>,
}

thread_local! {
    static MEMO: RefCell<Memo> = const {
        RefCell::new(Memo {
            slots: Vec::new(),
            hasher: foldhash::fast::FixedState::with_seed(0x7469_6465_6761_7465),
        })
    };
}

#[derive(Debug, Default)]
struct IfaceTable {
    by_iface: HashMap<u32, Vec<u32>, FastHash>,
    any_iface: Vec<u32>,
}

// === impl CompiledMatch ===

impl CompiledMatch {
    /// Assemble a rule's conditions from its typed parts: `interfaces` and `headers` are
    /// the matcher's, resolved and parsed; `salt` is the rule's bucket salt (used by
    /// `user_buckets`).
    pub(crate) fn new(
        m: &Match,
        salt: &str,
        interfaces: Option<Vec<InterfaceId>>,
        headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Self {
        Self {
            specificity: m.specificity(),
            apps: m
                .apps
                .as_ref()
                .map(|a| a.iter().map(|s| s.as_str().into()).collect()),
            interfaces,
            users: m
                .users
                .as_ref()
                .map(|u| u.iter().map(|s| s.as_str().into()).collect()),
            user_buckets: m
                .user_buckets
                .as_ref()
                .map(|r| (salt.into(), BucketRange::from(r))),
            headers,
        }
    }

    /// Whether every condition holds, or the first that does not.
    pub fn check(&self, r: &MatchInput<'_>) -> Result<(), Mismatch> {
        if let Some(apps) = &self.apps
            && !r.app.is_some_and(|a| apps.iter().any(|x| &**x == a))
        {
            return Err(Mismatch::App);
        }
        if let Some(ifaces) = &self.interfaces
            && !r.interface.is_some_and(|i| ifaces.contains(&i))
        {
            return Err(Mismatch::Interface);
        }
        if let Some(users) = &self.users
            && !r.user.is_some_and(|u| users.contains(u))
        {
            return Err(Mismatch::User);
        }
        if let Some((salt, range)) = &self.user_buckets
            && !r.user.is_some_and(|u| range.contains(bucket(salt, u)))
        {
            return Err(Mismatch::UserBucket);
        }
        if !self
            .headers
            .iter()
            .all(|(k, v)| crate::classify::field(r.headers, k) == Some(v))
        {
            return Err(Mismatch::Header);
        }
        Ok(())
    }

    /// The request headers the conditions read.
    pub(crate) fn header_names(&self) -> impl Iterator<Item = &HeaderName> {
        self.headers.iter().map(|(k, _)| k)
    }

    /// [`CompiledMatch::holds`] for a rule the index gave as a candidate for this request:
    /// its app and interface conditions hold by construction (it was filed under the
    /// request's app and interface, or under "any"), so only the narrowing conditions are
    /// checked, and a rule without any is a match with no work.
    #[inline]
    fn holds_as_candidate(&self, r: &MatchInput<'_>) -> bool {
        if self.users.is_none() && self.user_buckets.is_none() && self.headers.is_empty() {
            return true;
        }
        self.check(r).is_ok()
    }

    /// Whether every condition holds.
    pub fn holds(&self, r: &MatchInput<'_>) -> bool {
        self.check(r).is_ok()
    }

    /// The interfaces the rule is limited to; `None` when it matches any interface.
    pub fn interfaces(&self) -> Option<&[InterfaceId]> {
        self.interfaces.as_deref()
    }

    /// The apps the rule is limited to; `None` when it matches any app.
    pub fn apps(&self) -> Option<&[Box<str>]> {
        self.apps.as_deref()
    }

    /// Whether the rule also constrains users, user buckets or headers, and so covers only
    /// part of the traffic of its apps and interfaces.
    pub fn narrows(&self) -> bool {
        self.users.is_some() || self.user_buckets.is_some() || !self.headers.is_empty()
    }
}

// === impl MatchIndex ===

impl MatchIndex {
    /// Index rules; `rules` yields each rule's matcher in rule-ID order; `order` is what
    /// the caller's lookups want.
    pub fn build<'a>(rules: impl Iterator<Item = &'a CompiledMatch>, order: Order) -> Self {
        Self::build_merging(rules, order, MERGED_MAX)
    }

    /// [`MatchIndex::build`], merging candidates up to `merged_max` (tests: 0, the memo).
    fn build_merging<'a>(
        rules: impl Iterator<Item = &'a CompiledMatch>,
        order: Order,
        merged_max: usize,
    ) -> Self {
        let mut index = Self {
            order,
            ..Self::default()
        };
        let mut spec = Vec::new();
        let mut narrows = Vec::new();
        for (ri, m) in rules.enumerate() {
            spec.push(m.specificity);
            narrows.push(m.narrows());
            let ri = ri as u32;
            match &m.apps {
                None => push_rule(&mut index.any_app, m.interfaces.as_deref(), ri),
                Some(apps) => {
                    let uniq: HashSet<&str> = apps.iter().map(|a| &**a).collect();
                    for a in uniq {
                        let t = index.by_app.entry(a.into()).or_default();
                        push_rule(t, m.interfaces.as_deref(), ri);
                    }
                }
            }
        }
        index.id = NEXT_INDEX_ID.fetch_add(1, Ordering::Relaxed);
        let key = |i: &u32| (std::cmp::Reverse(spec[*i as usize]), *i);
        for t in index
            .by_app
            .values_mut()
            .chain(std::iter::once(&mut index.any_app))
        {
            t.any_iface.sort_by_key(key);
            for v in t.by_iface.values_mut() {
                v.sort_by_key(key);
                v.dedup();
            }
        }
        let sort = |list: &mut Vec<u32>| match order {
            Order::MostSpecific => list.sort_by_key(key),
            Order::RuleId => list.sort_unstable(),
        };
        index.merged = index.merge(merged_max, sort, &narrows);
        index
    }

    /// Every pair's candidates merged (see [`Merged`]), each list ordered by `sort`; `None`
    /// when they would exceed `max` lists and IDs. `narrows` says which rules narrow.
    fn merge(&self, max: usize, sort: impl Fn(&mut Vec<u32>), narrows: &[bool]) -> Option<Merged> {
        let any = &self.any_app;
        let top = |t: &IfaceTable| t.by_iface.keys().max().map_or(0, |&m| m as usize + 1);
        let (mut spans, mut ids, mut list) = (Vec::new(), Vec::new(), Vec::new());
        // The lists of requests under app table `t` (`None`: an app no rule names): the
        // index of the first in `spans`, and how many.
        let mut lists_of = |t: Option<&IfaceTable>| {
            let n = t.map_or(0, top).max(top(any)) + 1;
            let first = spans.len() as u32;
            for i in 0..n {
                let named = (i + 1 < n).then_some(i as u32);
                list.clear();
                list.extend(any.rules_for(named));
                list.extend(t.into_iter().flat_map(|t| t.rules_for(named)));
                sort(&mut list);
                list.dedup();
                let start = ids.len() as u32;
                ids.extend_from_slice(&list);
                spans.push(Span {
                    start,
                    end: ids.len() as u32,
                    narrows: list.iter().any(|&i| narrows[i as usize]),
                });
                if spans.len() + ids.len() > max {
                    return None;
                }
            }
            Some((first, n as u32))
        };
        let mut apps = AppLists::default();
        for (app, t) in &self.by_app {
            apps.insert(app, lists_of(Some(t))?);
        }
        apps.other = lists_of(None)?;
        Some(Merged {
            apps,
            spans: spans.into(),
            ids: ids.into(),
        })
    }

    /// The (at most four) candidate lists for a request: rules for (app, interface),
    /// (app, any), (any, interface), (any, any). Each list is sorted most specific first,
    /// then by rule ID.
    pub fn candidates(&self, app: Option<&str>, interface: Option<InterfaceId>) -> [&[u32]; 4] {
        fn list(t: Option<&IfaceTable>, interface: Option<InterfaceId>, by_iface: bool) -> &[u32] {
            match (t, by_iface) {
                (None, _) => &[],
                (Some(t), true) => interface
                    .and_then(|i| t.by_iface.get(&i.0))
                    .map_or(&[], Vec::as_slice),
                (Some(t), false) => &t.any_iface,
            }
        }
        let app_table = app.and_then(|a| self.by_app.get(a));
        [
            list(app_table, interface, true),
            list(app_table, interface, false),
            list(Some(&self.any_app), interface, true),
            list(Some(&self.any_app), interface, false),
        ]
    }

    /// The candidates of (`app`, `interface`) merged, in the index's order, given to `f`:
    /// merged when the index was built, else from this thread's memo, or merged now (and
    /// remembered); `None` when the pair is not memoized (`f` not called).
    fn with_candidates<'m, R>(
        &self,
        app: Option<&str>,
        interface: Option<InterfaceId>,
        matcher: &impl Fn(u32) -> &'m CompiledMatch,
        f: impl FnOnce(&[u32]) -> R,
    ) -> Option<R> {
        if let Some(merged) = &self.merged {
            return Some(f(merged.list(app, interface).0));
        }
        let app_bytes = app.map_or(&[][..], str::as_bytes);
        if self.id == 0 || app_bytes.len() > MEMO_APP_MAX {
            return None;
        }
        let app_len = app.map_or(NO_APP, |a| a.len() as u8);
        let iface = interface.map_or(u32::MAX, |i| i.0);
        MEMO.with(|m| {
            let mut m = m.borrow_mut();
            let m = &mut *m;
            if m.slots.is_empty() {
                m.slots.resize_with(MEMO_SLOTS, Slot::default);
            }
            let h = m.hasher.hash_one((self.id, iface, app_bytes));
            let slot = &mut m.slots[h as usize & (MEMO_SLOTS - 1)];
            let hit = slot.index == self.id
                && slot.interface == iface
                && slot.app_len == app_len
                && slot.app[..app_bytes.len()] == *app_bytes;
            if !hit {
                let lists = self.candidates(app, interface);
                if lists.iter().map(|l| l.len()).sum::<usize>() > MEMO_LIST_MAX {
                    return None;
                }
                slot.list.clear();
                for list in lists {
                    slot.list.extend_from_slice(list);
                }
                match self.order {
                    Order::MostSpecific => slot
                        .list
                        .sort_unstable_by_key(|&i| (std::cmp::Reverse(matcher(i).specificity), i)),
                    Order::RuleId => slot.list.sort_unstable(),
                }
                slot.list.dedup();
                slot.index = self.id;
                slot.interface = iface;
                slot.app_len = app_len;
                slot.app[..app_bytes.len()].copy_from_slice(app_bytes);
            }
            Some(f(&slot.list))
        })
    }

    /// The most specific rule whose conditions hold. Validation guarantees that two matching
    /// rules never share a specificity, so the answer does not depend on rule order.
    pub fn best<'m>(
        &self,
        r: &MatchInput<'_>,
        matcher: impl Fn(u32) -> &'m CompiledMatch,
    ) -> Option<u32> {
        if self.order != Order::MostSpecific {
            return self.best_looked_up(r, matcher);
        }
        let merged = self.with_candidates(r.app, r.interface, &matcher, |list| {
            list.iter()
                .copied()
                .find(|&ri| matcher(ri).holds_as_candidate(r))
        });
        match merged {
            Some(best) => best,
            None => self.best_looked_up(r, matcher),
        }
    }

    /// [`MatchIndex::best`] from the four lists.
    fn best_looked_up<'m>(
        &self,
        r: &MatchInput<'_>,
        matcher: impl Fn(u32) -> &'m CompiledMatch,
    ) -> Option<u32> {
        let mut best: Option<(u8, u32)> = None;
        for list in self.candidates(r.app, r.interface) {
            for &ri in list {
                let m = matcher(ri);
                if best.is_some_and(|(s, _)| s >= m.specificity) {
                    break; // sorted: nothing further in this list can beat `best`
                }
                if m.holds_as_candidate(r) {
                    best = Some((m.specificity, ri));
                    break;
                }
            }
        }
        best.map(|(_, ri)| ri)
    }

    /// [`MatchIndex::best`] over `list`, this index's merged candidates of the request's
    /// pair (from a [`PairTable`] built with it).
    #[inline]
    pub(crate) fn best_in<'m>(
        &self,
        list: &[u32],
        r: &MatchInput<'_>,
        matcher: impl Fn(u32) -> &'m CompiledMatch,
    ) -> Option<u32> {
        if self.order != Order::MostSpecific {
            return self.best_looked_up(r, matcher);
        }
        list.iter()
            .copied()
            .find(|&ri| matcher(ri).holds_as_candidate(r))
    }

    /// Every rule whose conditions hold, in rule-ID order: the merged list itself when
    /// none of its rules narrows (and the index is in [`Order::RuleId`]), else written into
    /// `out` (cleared first; reuse it across requests to avoid allocating). For rule kinds
    /// where all matching rules apply (limits).
    pub fn all<'s, 'm>(
        &'s self,
        r: &MatchInput<'_>,
        matcher: impl Fn(u32) -> &'m CompiledMatch,
        out: &'s mut Vec<u32>,
    ) -> &'s [u32] {
        if let Some(merged) = &self.merged {
            let (list, narrows) = merged.list(r.app, r.interface);
            return self.all_in(list, narrows, r, matcher, out);
        }
        out.clear();
        let holds = |&ri: &u32| matcher(ri).holds_as_candidate(r);
        let memo = self.with_candidates(r.app, r.interface, &matcher, |list| {
            out.extend(list.iter().copied().filter(holds));
        });
        if memo.is_none() {
            for list in self.candidates(r.app, r.interface) {
                out.extend(list.iter().copied().filter(holds));
            }
            out.sort_unstable();
            out.dedup();
            return out;
        }
        if self.order != Order::RuleId {
            out.sort_unstable();
        }
        out
    }

    /// [`MatchIndex::all`] over `list`, this index's merged candidates of the request's pair
    /// (`narrows`: whether one of them narrows).
    #[inline(always)]
    pub(crate) fn all_in<'s, 'm>(
        &self,
        list: &'s [u32],
        narrows: bool,
        r: &MatchInput<'_>,
        matcher: impl Fn(u32) -> &'m CompiledMatch,
        out: &'s mut Vec<u32>,
    ) -> &'s [u32] {
        match self.as_is(list, narrows) {
            Some(list) => list,
            None => self.all_filtered(list, r, matcher, out),
        }
    }

    /// [`MatchIndex::all_in`] when it needs no filtering (no rule of `list` narrows, and
    /// the index is in [`Order::RuleId`]): `list` itself.
    #[inline(always)]
    pub(crate) fn as_is<'s>(&self, list: &'s [u32], narrows: bool) -> Option<&'s [u32]> {
        (!narrows && self.order == Order::RuleId).then_some(list)
    }

    /// [`MatchIndex::all_in`] of a list to filter (or sort): out of line, so that returning
    /// the list as it is needs no frame.
    #[inline(never)]
    fn all_filtered<'s, 'm>(
        &self,
        list: &[u32],
        r: &MatchInput<'_>,
        matcher: impl Fn(u32) -> &'m CompiledMatch,
        out: &'s mut Vec<u32>,
    ) -> &'s [u32] {
        out.clear();
        out.extend(
            list.iter()
                .copied()
                .filter(|&ri| matcher(ri).holds_as_candidate(r)),
        );
        if self.order != Order::RuleId {
            out.sort_unstable();
        }
        out
    }
}

// === impl PairTable ===

impl PairTable {
    /// The lists of `indexes` per (app, interface); `None` unless each merged its lists, or
    /// when the table would hold over [`MERGED_MAX`] lists and IDs.
    pub fn build(indexes: [&MatchIndex; PAIR_INDEXES]) -> Option<Self> {
        let mut merged = Vec::with_capacity(PAIR_INDEXES);
        for index in indexes {
            merged.push(index.merged.as_ref()?);
        }
        let mut names: Vec<&str> = (indexes.iter())
            .flat_map(|i| i.by_app.keys().map(|a| &**a))
            .collect();
        names.sort_unstable();
        names.dedup();
        let (mut pairs, mut ids) = (Vec::new(), Vec::new());
        // The positions of `app`'s lists: as many as the index with the most has for it (an
        // interface past another's last is that one's last list, as for no interface).
        let mut lists_of = |app: Option<&str>| {
            let n = (merged.iter())
                .map(|m| match app {
                    Some(a) if m.apps.has_apps => m.apps.lists_of(a).1,
                    _ => m.apps.other.1,
                })
                .max()
                .unwrap_or(1);
            let first = pairs.len() as u32;
            for j in 0..n {
                let interface = (j + 1 < n).then_some(InterfaceId(j));
                let mut spans = [Span::default(); PAIR_INDEXES];
                for (span, m) in spans.iter_mut().zip(&merged) {
                    let (list, narrows) = m.list(app, interface);
                    let start = ids.len() as u32;
                    ids.extend_from_slice(list);
                    *span = Span {
                        start,
                        end: ids.len() as u32,
                        narrows,
                    };
                }
                pairs.push(spans);
                if pairs.len() * PAIR_INDEXES + ids.len() > MERGED_MAX {
                    return None;
                }
            }
            Some((first, n))
        };
        let mut apps = AppLists::default();
        for app in names {
            apps.insert(app, lists_of(Some(app))?);
        }
        apps.other = lists_of(None)?;
        Some(Self {
            id: NEXT_INDEX_ID.fetch_add(1, Ordering::Relaxed),
            apps,
            pairs: pairs.into(),
            ids: ids.into(),
        })
    }

    /// The lists of (`app`, `interface`). None when no index names an app: each index's own
    /// lookup hashes nothing then, and is as cheap as carrying the pair.
    #[inline]
    pub fn pair(&self, app: Option<&str>, interface: Option<InterfaceId>) -> Pair<'_> {
        if !self.apps.has_apps {
            return Pair::default();
        }
        Pair {
            table: self.id,
            spans: Some(&self.pairs[self.apps.position(app, interface) as usize]),
        }
    }

    /// Index `k`'s list in `pair` and whether one of its rules narrows; `None` when the pair
    /// has none from this table.
    #[inline(always)]
    pub(crate) fn list(&self, pair: &Pair<'_>, k: usize) -> Option<(&[u32], bool)> {
        let spans = pair.spans.filter(|_| pair.table == self.id)?;
        let span = spans[k];
        Some((span.of(&self.ids), span.narrows))
    }
}

// === impl Merged ===

impl Merged {
    /// The merged candidates of (`app`, `interface`), and whether one of them narrows.
    /// Inlined into each lookup, so an index whose rules name no app pays no call.
    #[inline(always)]
    fn list(&self, app: Option<&str>, interface: Option<InterfaceId>) -> (&[u32], bool) {
        let span = self.spans[self.apps.position(app, interface) as usize];
        (span.of(&self.ids), span.narrows)
    }
}

// === impl AppLists ===

impl AppLists {
    fn insert(&mut self, app: &str, lists: (u32, u32)) {
        match short_app(app) {
            Some(k) => self.by_short_app.insert(k, lists),
            None => self.by_long_app.insert(app.into(), lists),
        };
        self.has_apps = true;
    }

    /// The position in the table of the list of (`app`, `interface`): an interface past the
    /// app's named ones, or none, takes its last list.
    #[inline(always)]
    fn position(&self, app: Option<&str>, interface: Option<InterfaceId>) -> u32 {
        let (first, n) = match app {
            Some(app) if self.has_apps => self.lists_of(app),
            _ => self.other,
        };
        first + interface.map_or(n - 1, |i| i.0.min(n - 1))
    }

    /// The lists of `app`: for a short ID, one integer hashed and compared, not a string.
    #[inline(never)]
    fn lists_of(&self, app: &str) -> (u32, u32) {
        match short_app(app) {
            Some(k) => (self.by_short_app.get(&k).copied()).unwrap_or(self.other),
            None => self.lists_of_long(app),
        }
    }

    /// [`AppLists::lists_of`] for an app ID over 15 bytes: out of line, so that the string
    /// compare's call does not spill the short path's registers.
    #[inline(never)]
    fn lists_of_long(&self, app: &str) -> (u32, u32) {
        (self.by_long_app.get(app).copied()).unwrap_or(self.other)
    }
}

// === impl Span ===

impl Span {
    #[inline(always)]
    fn of(self, ids: &[u32]) -> &[u32] {
        &ids[self.start as usize..self.end as usize]
    }
}

/// An app ID of up to 15 bytes as one integer: its bytes, zero-padded, little-endian, and
/// its length in the last byte (so `a` and `a\0` differ). Read with two overlapping loads,
/// shifted, rather than copied into a buffer (a `memcpy` call).
#[inline]
fn short_app(app: &str) -> Option<u128> {
    let b = app.as_bytes();
    let n = b.len();
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let (lo, hi) = match n {
        // The tail load's last 8 bytes, shifted down to the ones past the first 8.
        9..=15 => (word(0), word(n - 8) >> (8 * (16 - n))),
        8 => (word(0), 0),
        5..=7 => {
            let tail = half(n - 4) >> (8 * (8 - n));
            (u64::from(half(0)) | u64::from(tail) << 32, 0)
        }
        4 => (u64::from(half(0)), 0),
        0..=3 => {
            let lo = (b.iter().enumerate()).fold(0, |k, (i, &x)| k | u64::from(x) << (8 * i));
            (lo, 0)
        }
        _ => return None,
    };
    Some(u128::from(lo) | u128::from(hi | (n as u64) << 56) << 64)
}

impl IfaceTable {
    /// The rules for `interface` (`None`: one no rule names, or none) and for any.
    fn rules_for(&self, interface: Option<u32>) -> impl Iterator<Item = u32> + '_ {
        let own = interface.and_then(|i| self.by_iface.get(&i));
        (own.map_or(&[][..], Vec::as_slice).iter())
            .chain(&self.any_iface)
            .copied()
    }
}

fn push_rule(t: &mut IfaceTable, ifaces: Option<&[InterfaceId]>, rule: u32) {
    match ifaces {
        None => t.any_iface.push(rule),
        Some(list) => {
            for id in list {
                t.by_iface.entry(id.0).or_default().push(rule);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Apps the rules name: short ones, and one over [`short_app`]'s 15 bytes.
    const APPS: [&str; 3] = ["a", "b", "c-is-a-longer-id"];
    const USERS: [&str; 2] = ["u1", "u2"];

    /// A rule from three masks: apps, interfaces (0..3) and users it lists (0: any).
    fn rule((apps, ifaces, users): (u8, u8, u8)) -> CompiledMatch {
        let pick = |mask: u8, all: &[&str]| {
            (mask != 0).then(|| {
                (all.iter().enumerate())
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, s)| (*s).to_owned())
                    .collect::<Vec<_>>()
            })
        };
        let m = Match {
            apps: pick(apps, &APPS),
            users: pick(users, &USERS),
            ..Match::default()
        };
        let interfaces = (ifaces != 0).then(|| {
            (0..3)
                .filter(|i| ifaces & (1 << i) != 0)
                .map(InterfaceId)
                .collect()
        });
        CompiledMatch::new(&m, "salt", interfaces, Vec::new())
    }

    /// An app ID's key is its bytes zero-padded with the length in the last byte, at every
    /// length the key takes, and none over 15 bytes.
    #[test]
    fn short_app_packs_bytes_and_length() {
        let text: String = (0..16).map(|i| char::from(b'a' + i * 7 % 26)).collect();
        for n in 0..=15 {
            let app = &text[..n];
            let mut k = [0u8; 16];
            k[..n].copy_from_slice(app.as_bytes());
            k[15] = n as u8;
            assert_eq!(short_app(app), Some(u128::from_le_bytes(k)), "{app:?}");
        }
        assert_eq!(short_app(&text), None);
    }

    /// Merging stops at its bound: a thousand apps on a hundred interfaces use the memo.
    #[test]
    fn merging_is_bounded() {
        let apps: Vec<String> = (0..1000).map(|i| format!("app{i}")).collect();
        let rules: Vec<CompiledMatch> = (0..1000)
            .map(|i| {
                let m = Match {
                    apps: Some(vec![apps[i].clone()]),
                    ..Match::default()
                };
                CompiledMatch::new(&m, "salt", Some(vec![InterfaceId(99)]), Vec::new())
            })
            .collect();
        let index = MatchIndex::build(rules.iter(), Order::RuleId);
        assert!(index.merged.is_none());
        let few = MatchIndex::build(rules[..10].iter(), Order::RuleId);
        assert!(few.merged.is_some());
    }

    /// A pair with more candidates than a slot keeps is answered, and left out of the memo.
    #[test]
    fn long_candidate_lists_are_not_kept() {
        let rules: Vec<CompiledMatch> = (0..MEMO_LIST_MAX + 1).map(|_| rule((1, 0, 1))).collect();
        let index = MatchIndex::build_merging(rules.iter(), Order::MostSpecific, 0);
        assert!(
            index.merged.is_none(),
            "too many to merge: the memo is used"
        );
        let headers = HeaderMap::new();
        let r = MatchInput {
            app: Some("a"),
            interface: None,
            user: Some("u1"),
            headers: &headers,
            params: &[],
        };
        let mut scratch = Vec::new();
        let all = index.all(&r, |i| &rules[i as usize], &mut scratch);
        assert_eq!(all.len(), MEMO_LIST_MAX + 1);
        assert!(index.best(&r, |i| &rules[i as usize]).is_some());
        let kept = MEMO.with(|m| m.borrow().slots.iter().any(|s| s.index == index.id));
        assert!(!kept, "a long list was kept");
    }

    proptest! {
        /// With the candidates merged when the index is built, `all` finds exactly the
        /// rules that hold, in ID order, and `best` one of the most specific, whatever the
        /// index's order: apps the rules name, one they do not and none; interfaces the
        /// rules name, one they do not (3) and none.
        #[test]
        fn merged_lookups_find_what_holds(
            masks in proptest::collection::vec((0u8..8, 0u8..8, 0u8..4), 0..100),
        ) {
            let rules: Vec<CompiledMatch> = masks.iter().copied().map(rule).collect();
            lookups_find_what_holds(&rules, MERGED_MAX)?;
        }

        /// A pair table over three indexes (two ordered most specific first, one by rule
        /// ID, as the route, limit and fallback indexes are) gives each index's lookups
        /// what they find by themselves, for every request shape; a pair from another
        /// table is not read.
        #[test]
        fn pair_lookups_match_each_index(
            sets in proptest::array::uniform3(
                proptest::collection::vec((0u8..8, 0u8..8, 0u8..4), 0..40),
            ),
        ) {
            let rules: Vec<Vec<CompiledMatch>> =
                sets.iter().map(|s| s.iter().copied().map(rule).collect()).collect();
            let orders = [Order::MostSpecific, Order::RuleId, Order::MostSpecific];
            let indexes: Vec<MatchIndex> = (rules.iter().zip(orders))
                .map(|(r, o)| MatchIndex::build(r.iter(), o))
                .collect();
            let table = PairTable::build([&indexes[0], &indexes[1], &indexes[2]])
                .expect("merged indexes make a table");
            let other = PairTable::build([&indexes[0], &indexes[1], &indexes[2]])
                .expect("merged indexes make a table");
            let headers = HeaderMap::new();
            for_each_request(&headers, |r| {
                let pair = table.pair(r.app, r.interface);
                prop_assert!(other.list(&pair, 0).is_none(), "another table's pair was read");
                for (k, (index, rules)) in indexes.iter().zip(&rules).enumerate() {
                    let matcher = |i: u32| &rules[i as usize];
                    let Some((list, narrows)) = table.list(&pair, k) else {
                        prop_assert!(!table.apps.has_apps, "a table naming apps gave no pair");
                        continue;
                    };
                    prop_assert_eq!(index.best_in(list, r, matcher), index.best(r, matcher));
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    prop_assert_eq!(
                        index.all_in(list, narrows, r, matcher, &mut a),
                        index.all(r, matcher, &mut b)
                    );
                }
                Ok(())
            })?;
        }

        /// The same through the memo (a first request fills a slot, a second hits it);
        /// each case's index is new, so slots left by earlier cases must not be taken. Over
        /// 64 candidates, a pair is looked up each time instead.
        #[test]
        fn memoized_lookups_find_what_holds(
            masks in proptest::collection::vec((0u8..8, 0u8..8, 0u8..4), 0..100),
        ) {
            let rules: Vec<CompiledMatch> = masks.iter().copied().map(rule).collect();
            lookups_find_what_holds(&rules, 0)?;
        }
    }

    /// `all` and `best` over every request shape, twice each, against the rules' own
    /// `holds`, on indexes of both orders that merge up to `merged_max`.
    fn lookups_find_what_holds(
        rules: &[CompiledMatch],
        merged_max: usize,
    ) -> Result<(), TestCaseError> {
        for order in [Order::MostSpecific, Order::RuleId] {
            let index = MatchIndex::build_merging(rules.iter(), order, merged_max);
            prop_assert_eq!(index.merged.is_some(), merged_max > 0);
            index_finds_what_holds(&index, rules)?;
        }
        Ok(())
    }

    /// Every request shape the index tests try: apps the rules name, one they do not, a
    /// look-alike, long ones and none; interfaces the rules name, one they do not (3) and
    /// none; users listed, one not and none.
    fn for_each_request(
        headers: &HeaderMap,
        mut f: impl FnMut(&MatchInput<'_>) -> Result<(), TestCaseError>,
    ) -> Result<(), TestCaseError> {
        let long = "x".repeat(MEMO_APP_MAX + 1);
        let apps = [
            None,
            Some(APPS[0]),
            Some(APPS[1]),
            Some(APPS[2]),
            Some("zz"),
            Some("a\0"),
            Some("c-is-a-longer-i"),
            Some(&*long),
        ];
        for app in apps {
            for interface in [None, Some(0), Some(1), Some(2), Some(3)].map(|i| i.map(InterfaceId))
            {
                for user in [None, Some("u1"), Some("u2"), Some("u3")] {
                    f(&MatchInput {
                        app,
                        interface,
                        user,
                        headers,
                        params: &[],
                    })?;
                }
            }
        }
        Ok(())
    }

    fn index_finds_what_holds(
        index: &MatchIndex,
        rules: &[CompiledMatch],
    ) -> Result<(), TestCaseError> {
        let headers = HeaderMap::new();
        for_each_request(&headers, |r| {
            let want: Vec<u32> = (0..rules.len() as u32)
                .filter(|&i| rules[i as usize].holds(r))
                .collect();
            let top = want.iter().map(|&i| rules[i as usize].specificity).max();
            for _ in 0..2 {
                let mut scratch = Vec::new();
                let all = index.all(r, |i| &rules[i as usize], &mut scratch);
                prop_assert_eq!(all, &want[..]);
                let best = index.best(r, |i| &rules[i as usize]);
                prop_assert_eq!(best.map(|i| rules[i as usize].specificity), top);
                prop_assert!(best.is_none_or(|i| want.contains(&i)));
            }
            Ok(())
        })
    }
}
