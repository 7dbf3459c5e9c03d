//! Matching requests to rules, shared by every rule kind (routes, limits, fallbacks).
//!
//! A [`CompiledMatch`] is one rule's conditions with everything precomputed; a [`MatchIndex`]
//! buckets rules by the app and interface they constrain so that finding the rules that can
//! apply to a request costs at most four hash lookups, whatever the number of rules. Within a
//! bucket rules are sorted most specific first.
//!
//! The four lists of an (app, interface) pair, merged, are remembered per thread (`Memo`):
//! a stream of requests repeats a few pairs, and a remembered pair costs one hash of the app
//! and a compare instead of the four lookups and the merge. An index whose rules name no
//! app (fallbacks on an interface, say) has its lists merged by interface when it is built,
//! and a lookup is an array index.

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
    by_app: HashMap<Box<str>, IfaceTable, FastHash>,
    any_app: IfaceTable,
    /// When no rule names an app (fallbacks on an interface, say), the candidates depend on
    /// the interface alone: merged once here, by interface ID, the last entry for an
    /// interface no rule names (or none). The lookup is then an index: no hash, no memo.
    by_iface_merged: Option<Box<[Box<[u32]>]>>,
}

/// Most entries and candidate IDs [`MatchIndex::by_iface_merged`] holds, together: rules for
/// any interface are repeated in each entry, and there is an entry for every interface up to
/// the highest a rule names, so a config with many of both uses the memo instead.
const MERGED_MAX: usize = 1 << 16;

/// Source of [`MatchIndex`] IDs; 0 is an index that was never built (and is not memoized).
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
    /// The candidates: most specific first, then by rule ID, each once.
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
    /// Index rules; `rules` yields each rule's matcher in rule-ID order.
    pub fn build<'a>(rules: impl Iterator<Item = &'a CompiledMatch>) -> Self {
        let mut index = Self::default();
        let mut spec = Vec::new();
        for (ri, m) in rules.enumerate() {
            spec.push(m.specificity);
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
        index.by_iface_merged = index.merge_by_iface(key);
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
        index
    }

    /// The candidates of each interface merged (see [`MatchIndex::by_iface_merged`]), when
    /// no rule names an app and they fit in [`MERGED_MAX`]; `key` orders them.
    fn merge_by_iface<K: Ord>(&self, key: impl Fn(&u32) -> K) -> Option<Box<[Box<[u32]>]>> {
        let t = &self.any_app;
        let named = t.by_iface.keys().max().map_or(0, |&m| m as usize + 1);
        let size = t.by_iface.values().map(Vec::len).sum::<usize>()
            + (named + 1) * (1 + t.any_iface.len());
        if !self.by_app.is_empty() || size > MERGED_MAX {
            return None;
        }
        let merged = (0..=named).map(|i| {
            let own = t.by_iface.get(&(i as u32)).filter(|_| i < named);
            let mut list: Vec<u32> = own.into_iter().flatten().copied().collect();
            list.extend_from_slice(&t.any_iface);
            list.sort_by_key(&key);
            list.dedup();
            list.into_boxed_slice()
        });
        Some(merged.collect())
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

    /// The candidates of (`app`, `interface`) merged, most specific first, then by rule ID,
    /// given to `f`: merged at build time when no rule names an app, else from this thread's
    /// memo, or looked up (and remembered).
    fn with_candidates<'m, R>(
        &self,
        app: Option<&str>,
        interface: Option<InterfaceId>,
        matcher: &impl Fn(u32) -> &'m CompiledMatch,
        f: impl FnOnce(&[u32]) -> R,
    ) -> Option<R> {
        if let Some(merged) = &self.by_iface_merged {
            let other = merged.len() - 1;
            let i = interface.map_or(other, |i| (i.0 as usize).min(other));
            return Some(f(&merged[i]));
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
                slot.list
                    .sort_unstable_by_key(|&i| (std::cmp::Reverse(matcher(i).specificity), i));
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

    /// Every rule whose conditions hold, in rule-ID order, written into `out` (cleared
    /// first). For rule kinds where all matching rules apply (limits).
    pub fn all<'m>(
        &self,
        r: &MatchInput<'_>,
        matcher: impl Fn(u32) -> &'m CompiledMatch,
        out: &mut Vec<u32>,
    ) {
        out.clear();
        let merged = self.with_candidates(r.app, r.interface, &matcher, |list| {
            out.extend(
                list.iter()
                    .copied()
                    .filter(|&ri| matcher(ri).holds_as_candidate(r)),
            );
        });
        if merged.is_some() {
            out.sort_unstable();
            return;
        }
        for list in self.candidates(r.app, r.interface) {
            out.extend(
                list.iter()
                    .copied()
                    .filter(|&ri| matcher(ri).holds_as_candidate(r)),
            );
        }
        out.sort_unstable();
        out.dedup();
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

    const APPS: [&str; 3] = ["a", "b", "c"];
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

    /// A pair with more candidates than a slot keeps is answered, and left out of the memo.
    #[test]
    fn long_candidate_lists_are_not_kept() {
        let rules: Vec<CompiledMatch> = (0..MEMO_LIST_MAX + 1).map(|_| rule((1, 0, 1))).collect();
        let index = MatchIndex::build(rules.iter());
        assert!(
            index.by_iface_merged.is_none(),
            "rules naming an app use the memo"
        );
        let headers = HeaderMap::new();
        let r = MatchInput {
            app: Some("a"),
            interface: None,
            user: Some("u1"),
            headers: &headers,
            params: &[],
        };
        let mut all = Vec::new();
        index.all(&r, |i| &rules[i as usize], &mut all);
        assert_eq!(all.len(), MEMO_LIST_MAX + 1);
        assert!(index.best(&r, |i| &rules[i as usize]).is_some());
        let kept = MEMO.with(|m| m.borrow().slots.iter().any(|s| s.index == index.id));
        assert!(!kept, "a long list was kept");
    }

    proptest! {
        /// Through the memo (a first request fills a slot, a second hits it), `all` finds
        /// exactly the rules that hold, in ID order, and `best` one of the most specific;
        /// each case's index is new, so slots left by earlier cases must not be taken. Over 64
        /// candidates, a pair is looked up each time instead.
        #[test]
        fn memoized_lookups_find_what_holds(
            masks in proptest::collection::vec((0u8..8, 0u8..8, 0u8..4), 0..100),
        ) {
            let rules: Vec<CompiledMatch> = masks.iter().copied().map(rule).collect();
            lookups_find_what_holds(&rules)?;
        }

        /// The same for rules that name no app, whose candidates are merged by interface
        /// when the index is built: interfaces the rules name, one they do not (3) and none.
        #[test]
        fn merged_lookups_find_what_holds(
            masks in proptest::collection::vec((0u8..8, 0u8..4), 0..40),
        ) {
            let rules: Vec<CompiledMatch> =
                masks.iter().map(|&(i, u)| rule((0, i, u))).collect();
            let index = MatchIndex::build(rules.iter());
            prop_assert!(index.by_iface_merged.is_some());
            lookups_find_what_holds(&rules)?;
        }
    }

    /// `all` and `best` over every request shape, twice each, against the rules' own
    /// `holds`.
    fn lookups_find_what_holds(rules: &[CompiledMatch]) -> Result<(), TestCaseError> {
        let index = MatchIndex::build(rules.iter());
        let headers = HeaderMap::new();
        let long = "x".repeat(MEMO_APP_MAX + 1);
        let apps = [
            None,
            Some("a"),
            Some("b"),
            Some("c"),
            Some("zz"),
            Some(&*long),
        ];
        for app in apps {
            for interface in [None, Some(0), Some(1), Some(2), Some(3)].map(|i| i.map(InterfaceId))
            {
                for user in [None, Some("u1"), Some("u2"), Some("u3")] {
                    let r = MatchInput {
                        app,
                        interface,
                        user,
                        headers: &headers,
                        params: &[],
                    };
                    let want: Vec<u32> = (0..rules.len() as u32)
                        .filter(|&i| rules[i as usize].holds(&r))
                        .collect();
                    let top = want.iter().map(|&i| rules[i as usize].specificity).max();
                    for _ in 0..2 {
                        let mut all = Vec::new();
                        index.all(&r, |i| &rules[i as usize], &mut all);
                        prop_assert_eq!(&all, &want);
                        let best = index.best(&r, |i| &rules[i as usize]);
                        prop_assert_eq!(best.map(|i| rules[i as usize].specificity), top);
                        prop_assert!(best.is_none_or(|i| want.contains(&i)));
                    }
                }
            }
        }
        Ok(())
    }
}
