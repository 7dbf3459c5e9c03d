//! Rate limits, compiled: which limits apply to a request, which quota it falls under, and
//! the fixed-size key it is counted by.
//!
//! This module decides *what* is counted; the counting itself (GCRA, per key, against a
//! clock) is the proxy's, with governor's arithmetic and clock. A request's key is the XXH3-64 hash of its key tuple,
//! so a tracked key costs a `u64` whatever the length of the user ID, and hashing allocates
//! nothing. Two distinct tuples share a quota only on a 64-bit hash collision: with a million
//! active keys in one rule, about one chance in 30 million.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use http::HeaderName;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::ids::{InterfaceId, InterfaceNames};
use crate::matcher::{CompiledMatch, MatchInput};
use crate::model::{Limit, LimitMode, LimitScope, OnStoreError, WhenMissing};
use crate::route::RouteInput;

/// Largest count in a rate.
pub const MAX_RATE_COUNT: u32 = 1_000_000_000;
/// Longest rate period.
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(30 * 86_400);
/// Longest `max_delay_ms` of a paced limit: a minute (a request held longer has usually
/// been given up by its client).
pub const MAX_DELAY_MS: u64 = 60_000;
/// Largest `max_queue` of a paced limit.
pub const MAX_QUEUE: u32 = 100_000;
/// `max_queue` when a paced limit gives none.
pub const DEFAULT_MAX_QUEUE: u32 = 1_000;

/// A parsed rate: `count` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per period (≥ 1).
    pub count: u32,
    /// The period.
    pub period: Duration,
}

/// One quota of a limit: its base quota or one exception's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitQuota {
    /// The sustained rate.
    pub rate: Rate,
    /// Bucket size: requests admitted at once after idleness (≥ 1).
    pub burst: u32,
    /// `default`, or the exception (`user:alice`), for logs and the `RateLimit` headers.
    pub label: Box<str>,
}

/// How a paced limit queues what exceeds its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// Longest wait: a request that would wait longer is refused at once.
    pub max_delay: Duration,
    /// Requests waiting at once, over all keys.
    pub max_queue: u32,
}

/// A limit rule, compiled.
#[derive(Debug)]
pub struct CompiledLimit {
    /// Its name.
    pub name: Box<str>,
    /// Its conditions.
    pub matcher: CompiledMatch,
    /// Enforce or dry run.
    pub mode: LimitMode,
    /// Counted in this gateway or in Redis.
    pub scope: LimitScope,
    /// With cluster scope: admit or refuse while Redis is unavailable.
    pub on_store_error: OnStoreError,
    /// Its quotas: `[0]` is the base quota, then one per exception. A [`LimitKey`]'s
    /// `quota` indexes this.
    pub quotas: Vec<LimitQuota>,
    /// Pace instead of refuse (`max_delay_ms`): how long an excess request may wait.
    pub pacing: Option<Pacing>,
    /// A hash of the rule's whole definition: the proxy keeps a limiter's state across a
    /// reload exactly when name and fingerprint are unchanged.
    pub fingerprint: u64,
    key: Vec<CompiledKeyPart>,
    /// The hash of an empty key tuple (one key for all requests), computed at load time:
    /// such a rule (a global or per-pair limit) hashes nothing per request.
    fixed_hash: Option<u64>,
    when_missing: WhenMissing,
    exc_users: HashMap<Box<str>, u16>,
    exc_apps: HashMap<Box<str>, u16>,
    exc_interfaces: Vec<(InterfaceId, u16)>,
}

/// Who an exception of a limit is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Exception<'a> {
    User(&'a str),
    App(&'a str),
    Interface(InterfaceId),
}

#[derive(Debug)]
pub(crate) enum CompiledKeyPart {
    App,
    Interface,
    User,
    Header(HeaderName),
    /// A path parameter: its slot in [`crate::Classified::params`], and its name.
    PathParam(u8, Box<str>),
}

/// What a request is counted as under one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitKey {
    /// Index into [`CompiledLimit::quotas`].
    pub quota: u16,
    /// The hashed key tuple.
    pub hash: u64,
}

// === rates ===

/// Parse `"N/unit"` or `"N/Kunit"`: `5/s`, `300/min`, `100/10s`, `1000/d`. Units: `ms`, `s`
/// (`sec`, `second`), `min` (`m`, `minute`), `h` (`hour`), `d` (`day`).
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("{s:?} is not a rate: write N/unit, like \"5/s\" or \"300/min\"");
    let (n, per) = s.trim().split_once('/').ok_or_else(bad)?;
    let n = n.trim();
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let count: u64 = n.parse().map_err(|_| bad())?;
    if count == 0 || count > u64::from(MAX_RATE_COUNT) {
        return Err(format!("{s:?}: the count must be in 1..={MAX_RATE_COUNT}"));
    }
    let per = per.trim();
    let split = per.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (k, unit) = per.split_at(split);
    let k: u64 = if k.is_empty() {
        1
    } else {
        k.parse().map_err(|_| bad())?
    };
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" | "sec" | "second" => 1_000,
        "m" | "min" | "minute" => 60_000,
        "h" | "hour" => 3_600_000,
        "d" | "day" => 86_400_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, min, h or d"
            ));
        }
    };
    let period = Duration::from_millis(k.saturating_mul(unit_ms));
    if period.is_zero() || period > MAX_RATE_PERIOD {
        return Err(format!("{s:?}: the period must be in 1ms..=30d"));
    }
    if (period.as_nanos() as u64) < count {
        return Err(format!(
            "{s:?}: more than one request per nanosecond cannot be timed"
        ));
    }
    Ok(Rate {
        count: count as u32,
        period,
    })
}

impl Rate {
    /// Time to replenish one request: `period / count`.
    pub fn interval(&self) -> Duration {
        self.period / self.count
    }
}

// === impl CompiledLimit ===

impl CompiledLimit {
    /// Assemble a limit rule from its typed parts: the base `rate`, and one quota per
    /// exception, in the order given.
    pub(crate) fn new(
        l: &Limit,
        matcher: CompiledMatch,
        rate: Rate,
        exceptions: Vec<(Exception<'_>, &str, Rate)>,
        key: Vec<CompiledKeyPart>,
    ) -> Self {
        let mut quotas = vec![LimitQuota {
            rate,
            burst: l.burst.unwrap_or(rate.count),
            label: "default".into(),
        }];
        let mut exc_users = HashMap::new();
        let mut exc_apps = HashMap::new();
        let mut exc_interfaces = Vec::new();
        for (on, label, rate) in exceptions {
            let slot = quotas.len() as u16;
            quotas.push(LimitQuota {
                rate,
                burst: rate.count,
                label: label.into(),
            });
            match on {
                Exception::User(u) => {
                    exc_users.insert(u.into(), slot);
                }
                Exception::App(a) => {
                    exc_apps.insert(a.into(), slot);
                }
                Exception::Interface(i) => exc_interfaces.push((i, slot)),
            }
        }
        Self {
            name: l.name.as_str().into(),
            matcher,
            mode: l.mode,
            scope: l.scope,
            on_store_error: l.on_store_error,
            quotas,
            pacing: l.max_delay_ms.map(|ms| Pacing {
                max_delay: Duration::from_millis(ms),
                max_queue: l.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
            }),
            fingerprint: fingerprint(l),
            fixed_hash: key.is_empty().then(|| KeyHasher::new().finish()),
            key,
            when_missing: l.when_missing,
            exc_users,
            exc_apps,
            exc_interfaces,
        }
    }

    /// The key tuple, for display: `app`, `interface`, `user`, `header:NAME` or
    /// `path_param:NAME`; empty for one shared quota.
    pub fn key_parts(&self) -> Vec<String> {
        self.key
            .iter()
            .map(|p| match p {
                CompiledKeyPart::App => "app".to_owned(),
                CompiledKeyPart::Interface => "interface".to_owned(),
                CompiledKeyPart::User => "user".to_owned(),
                CompiledKeyPart::Header(h) => format!("header:{h}"),
                CompiledKeyPart::PathParam(_, name) => format!("path_param:{name}"),
            })
            .collect()
    }

    /// The quota a request falls under: an exception for its user, interface or app (in
    /// that order), else the base quota (0).
    #[inline(always)]
    pub fn quota_of(&self, m: &MatchInput<'_>) -> u16 {
        match self.quotas.len() {
            1 => 0, // no exceptions: skip hashing the user
            _ => self.exception_quota(m),
        }
    }

    /// [`CompiledLimit::quota_of`] of a rule with exceptions: out of line, so that most
    /// rules' (none) is a compare where the request path calls it.
    #[inline(never)]
    fn exception_quota(&self, m: &MatchInput<'_>) -> u16 {
        if let Some(&q) = m.user.and_then(|u| self.exc_users.get(u)) {
            return q;
        }
        if let Some(i) = m.interface
            && let Some(&(_, q)) = self.exc_interfaces.iter().find(|(x, _)| *x == i)
        {
            return q;
        }
        if let Some(&q) = m.app.and_then(|a| self.exc_apps.get(a)) {
            return q;
        }
        0
    }

    /// The request headers the rule's conditions and key read.
    pub(crate) fn header_names(&self) -> impl Iterator<Item = &HeaderName> {
        let key = self.key.iter().filter_map(|p| match p {
            CompiledKeyPart::Header(h) => Some(h),
            _ => None,
        });
        self.matcher.header_names().chain(key)
    }

    /// Whether every request the rule counts shares one key (a global or per-pair limit:
    /// no key parts).
    pub fn single_key(&self) -> bool {
        self.fixed_hash.is_some()
    }

    /// What a request this rule matched is counted as, or `None` when part of the key is
    /// missing and the rule says `skip`. `names` names interfaces (keys hash the name, not the
    /// ID, so they survive a reload that reorders interfaces); pass the snapshot.
    #[inline]
    pub fn key_of(
        &self,
        names: &(impl InterfaceNames + ?Sized),
        r: &RouteInput<'_>,
    ) -> Option<LimitKey> {
        match self.fixed_hash {
            Some(hash) => Some(LimitKey {
                quota: self.quota_of(&r.m),
                hash,
            }),
            None => self.hashed_key_of(names, r),
        }
    }

    /// [`CompiledLimit::key_of`] of a rule with key parts: the request's values hashed.
    /// Inlined: the gateway's limit phase calls `key_of` only on its out-of-line path for
    /// rules with keys, whose frame this shares (a rule with one shared key, most of a
    /// large config's, takes a shorter path there).
    #[inline(always)]
    fn hashed_key_of(
        &self,
        names: &(impl InterfaceNames + ?Sized),
        r: &RouteInput<'_>,
    ) -> Option<LimitKey> {
        // The common shape, one part present and short (a user ID): the bytes the general
        // path would hash, laid out in a small buffer at once.
        if let [part] = &self.key[..]
            && let Some(v) = part_value(part, names, r)
            && v.len() <= SHORT_VALUE
        {
            let mut buf = [0u8; 5 + SHORT_VALUE];
            buf[0] = 1;
            buf[1..5].copy_from_slice(&(v.len() as u32).to_le_bytes());
            crate::bucket::copy_short(&mut buf[5..], v);
            return Some(LimitKey {
                quota: self.quota_of(&r.m),
                hash: xxh3_64(&buf[..5 + v.len()]),
            });
        }
        self.streamed_key_of(names, r)
    }

    /// [`CompiledLimit::hashed_key_of`] of a key of several parts or a long value, through
    /// the streaming hasher (whose state is most of a kilobyte of stack).
    #[inline(never)]
    fn streamed_key_of(
        &self,
        names: &(impl InterfaceNames + ?Sized),
        r: &RouteInput<'_>,
    ) -> Option<LimitKey> {
        let mut h = KeyHasher::new();
        let found = self.walk_key(names, r, |piece| match piece {
            KeyPiece::Value(_, v) => {
                h.write(&[1]);
                h.write(&(v.len() as u32).to_le_bytes());
                h.write(v);
            }
            KeyPiece::Shared(_) => h.write(&[2]),
            KeyPiece::ClientIp(_, ip) => {
                h.write(&[3]);
                h.write(&ipv6_octets(ip));
            }
        });
        found.then(|| LimitKey {
            quota: self.quota_of(&r.m),
            hash: h.finish(),
        })
    }

    /// The key [`CompiledLimit::key_of`] hashes, as text (`user="bob", app="douyin"`), and
    /// the quota's label; `None` when the rule skips the request. For `explain`.
    pub fn describe_key(
        &self,
        names: &(impl InterfaceNames + ?Sized),
        r: &RouteInput<'_>,
    ) -> Option<(String, &str)> {
        let mut parts = Vec::new();
        let found = self.walk_key(names, r, |piece| {
            parts.push(match piece {
                KeyPiece::Value(part, v) => {
                    format!("{}={:?}", part.label(), String::from_utf8_lossy(v))
                }
                KeyPiece::Shared(part) => format!("{}=(missing: one shared key)", part.label()),
                KeyPiece::ClientIp(part, ip) => format!("{}=(missing: client {ip})", part.label()),
            })
        });
        let key = match parts.is_empty() {
            true => "(one key for all)".to_owned(),
            false => parts.join(", "),
        };
        found.then(|| (key, &*self.quotas[self.quota_of(&r.m) as usize].label))
    }

    /// Hand each part of the request's key to `f`, in key order; `false` when a part is
    /// missing and the rule skips such requests.
    #[inline]
    fn walk_key<'a>(
        &'a self,
        names: &'a (impl InterfaceNames + ?Sized),
        r: &RouteInput<'a>,
        mut f: impl FnMut(KeyPiece<'a>),
    ) -> bool {
        for part in &self.key {
            let value = part_value(part, names, r);
            f(match (value, self.when_missing, r.client_ip) {
                (Some(v), ..) => KeyPiece::Value(part, v),
                (None, WhenMissing::Skip, _) => return false,
                (None, WhenMissing::ClientIp, Some(ip)) => KeyPiece::ClientIp(part, ip),
                (None, WhenMissing::Shared | WhenMissing::ClientIp, _) => KeyPiece::Shared(part),
            });
        }
        true
    }
}

/// Longest single key value hashed through the small buffer of [`CompiledLimit::key_of`].
const SHORT_VALUE: usize = 59;

/// The request's value of one key part; `None` when missing (or empty).
#[inline]
fn part_value<'a>(
    part: &CompiledKeyPart,
    names: &'a (impl InterfaceNames + ?Sized),
    r: &RouteInput<'a>,
) -> Option<&'a [u8]> {
    match part {
        CompiledKeyPart::App => r.m.app.map(str::as_bytes),
        CompiledKeyPart::User => r.m.user.map(str::as_bytes),
        CompiledKeyPart::Interface => r.m.interface.map(|i| names.interface_name(i).as_bytes()),
        CompiledKeyPart::Header(name) => crate::classify::field(r.m.headers, name)
            .map(|v| v.as_bytes())
            .filter(|v| !v.is_empty()),
        CompiledKeyPart::PathParam(slot, _) => {
            r.m.params
                .get(usize::from(*slot))
                .and_then(|v| v.as_deref())
                .filter(|v| !v.is_empty())
        }
    }
}

/// One part of a request's limit key.
enum KeyPiece<'a> {
    /// The request's value.
    Value(&'a CompiledKeyPart, &'a [u8]),
    /// Missing, counted under one key shared by all such requests.
    Shared(&'a CompiledKeyPart),
    /// Missing, counted under the client's address.
    ClientIp(&'a CompiledKeyPart, IpAddr),
}

impl CompiledKeyPart {
    fn label(&self) -> String {
        match self {
            Self::App => "app".to_owned(),
            Self::Interface => "interface".to_owned(),
            Self::User => "user".to_owned(),
            Self::Header(h) => format!("header {h}"),
            Self::PathParam(_, name) => format!("path_param {name}"),
        }
    }
}

/// A hash of a rule's whole definition, as JSON. (A config value always serializes; one
/// that did not would get 0.)
pub(crate) fn fingerprint(rule: &impl serde::Serialize) -> u64 {
    serde_json::to_vec(rule).map_or(0, |json| xxh3_64(&json))
}

fn ipv6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// XXH3 over a byte sequence written in pieces: into a stack buffer while it fits (the
/// common case, one-shot hashing), spilling into the streaming hasher beyond.
struct KeyHasher {
    buf: [u8; 192],
    len: usize,
    spill: Option<Box<Xxh3>>,
}

impl KeyHasher {
    fn new() -> Self {
        Self {
            buf: [0; 192],
            len: 0,
            spill: None,
        }
    }

    fn write(&mut self, b: &[u8]) {
        if let Some(s) = &mut self.spill {
            s.update(b);
        } else if self.len + b.len() <= self.buf.len() {
            self.buf[self.len..self.len + b.len()].copy_from_slice(b);
            self.len += b.len();
        } else {
            // Rare: long header values or user IDs.
            let mut s = Box::new(Xxh3::new());
            s.update(&self.buf[..self.len]);
            s.update(b);
            self.spill = Some(s);
        }
    }

    fn finish(&self) -> u64 {
        match &self.spill {
            Some(s) => s.digest(),
            None => xxh3_64(&self.buf[..self.len]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rates parse with their units; nonsense is refused with a hint.
    #[test]
    fn rates() {
        let r = |s| parse_rate(s).unwrap();
        assert_eq!(
            r("5/s"),
            Rate {
                count: 5,
                period: Duration::from_secs(1)
            }
        );
        assert_eq!(r("300/min").period, Duration::from_secs(60));
        assert_eq!(r("100/10s").period, Duration::from_secs(10));
        assert_eq!(r(" 7 / h ").period, Duration::from_secs(3600));
        assert_eq!(r("1000/d").interval(), Duration::from_millis(86_400));
        assert_eq!(r("10/s").interval(), Duration::from_millis(100));
        for bad in [
            "5",
            "5/",
            "/s",
            "0/s",
            "-1/s",
            "5/fortnight",
            "5/0s",
            "1.5/s",
            "5/31d",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert!(parse_rate("2000000000/s").is_err());
    }

    /// The hasher gives the same answer whether or not it spilled.
    #[test]
    fn key_hasher_spill() {
        let long = vec![b'x'; 500];
        let mut a = KeyHasher::new();
        a.write(&[1]);
        a.write(&long);
        let mut whole = vec![1u8];
        whole.extend_from_slice(&long);
        assert_eq!(a.finish(), xxh3_64(&whole));
    }
}
