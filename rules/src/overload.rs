//! Overload protection, the pure half: the compiled `overload` section, request priorities,
//! and the two controllers the proxy drives once per window.
//!
//! - [`priority`] places a request: business priority (its interface's) first, then a user
//!   priority from a stable hash of the user ID that is re-drawn every rotation period, as
//!   one rank in `0..4 × levels` (higher is more important).
//! - [`LevelController`] is DAGOR's admission level: a request is admitted iff its rank is at
//!   least the level. Each window it is raised (overloaded) or lowered (calm) using the
//!   histogram of the window's requests by rank, so one step sheds or re-admits a chosen
//!   share of traffic whatever the shape of the distribution.
//! - [`Gradient`] is the adaptive concurrency limit of one upstream.
//!
//! Nothing here reads a clock: the proxy passes the rotation epoch and the window's figures
//! in, so both controllers are tested with made-up windows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::bucket::{BUCKETS, bucket, bucket_ip};
use crate::ids::{InterfaceId, UpstreamId};
use crate::model::{Config, Priority, RuleMode};

mod adaptive;

pub use adaptive::{AdaptiveSpec, Gradient, MIN_CALLS, RttWindow, TOLERANCE};

/// Business priorities, one rank band each.
pub const BUSINESS_LEVELS: u32 = 4;

/// The compiled `overload` section.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledOverload {
    /// Protection is on.
    pub enabled: bool,
    /// Global cap.
    pub max_in_flight: Option<u32>,
    /// Longest wait for a slot.
    pub queue_timeout: Duration,
    /// Most waiters per cap.
    pub max_queue: u32,
    /// `Retry-After` of a rejection, in seconds.
    pub retry_after_s: u32,
    /// Control window.
    pub window: Duration,
    /// Business priority of requests with no interface.
    pub default_priority: Priority,
    /// Per interface (indexed like the snapshot's interfaces): priority and cap.
    pub interfaces: Vec<InterfaceSpec>,
    /// Per upstream (indexed like the snapshot's upstreams): its cap, if any.
    pub upstreams: Vec<Option<UpstreamCap>>,
    /// Priority admission, when on.
    pub admission: Option<AdmissionSpec>,
    /// `admission.priority_key_file`, as written (relative to the config file).
    pub priority_key_file: Option<Box<str>>,
}

/// Overload settings of one interface, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceSpec {
    /// Business priority.
    pub priority: Priority,
    /// Cap on its requests in flight.
    pub max_in_flight: Option<u32>,
}

/// The cap of one upstream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpstreamCap {
    /// A fixed number of requests in flight.
    Fixed(u32),
    /// A limit following latency.
    Adaptive(AdaptiveSpec),
}

/// Priority admission settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionSpec {
    /// Mean queueing delay that makes a window overloaded.
    pub queue_delay_threshold: Duration,
    /// User priority levels.
    pub user_levels: u32,
    /// Rotation period of user priorities, in seconds.
    pub rotate_every_s: u64,
    /// Share shed per overloaded window (0.05 for 5%).
    pub shed: f64,
    /// Share re-admitted per calm window.
    pub admit: f64,
    /// Lowest level (an operator's floor), as a rank.
    pub floor: u32,
    /// The secret keying user priorities (`priority_key_file`, read by the gateway); `None`:
    /// the public hash.
    pub priority_key: Option<PriorityKey>,
    /// `mode: dry_run`: the level moves, requests below it are counted and served.
    pub dry_run: bool,
}

/// A per-deployment secret keying user priorities: a SipHash-2-4 key.
pub type PriorityKey = [u8; 16];

/// Whose priority a request carries.
#[derive(Debug, Clone, Copy)]
pub enum UserKey<'a> {
    /// A user ID.
    User(&'a str),
    /// The client IP, for a request with no user ID.
    Ip(IpAddr),
    /// Neither is known: the lowest user priority.
    Unknown,
}

/// What one window measured, for [`LevelController::adjust`].
#[derive(Debug, Clone, Copy)]
pub struct LevelWindow<'a> {
    /// Requests that arrived, by rank (all of them, admitted or not); `len` is the number
    /// of ranks.
    pub offered: &'a [u64],
    /// Requests that passed the level and then got every slot they needed.
    pub admitted: u64,
    /// Whether the window was overloaded.
    pub overloaded: bool,
}

/// Weight of the newest window in the smoothed histogram and admitted count.
pub const SMOOTHING: f64 = 0.2;

/// DAGOR's admission level over ranks `0..ranks`.
///
/// The histogram and the admitted count it steers by are smoothed over windows (an
/// exponentially weighted average, newest window [`SMOOTHING`]): a 100 ms window at a few
/// thousand requests per second puts less than one request in most of its 512 ranks, and a
/// level computed from one such window jumps by tens of ranks from noise alone, flipping
/// users in and out. Both are smoothed alike, so their ratio, which is what places the
/// level, is right from the first window on.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelController {
    ranks: u32,
    level: u32,
    floor: u32,
    shed: f64,
    admit: f64,
    weight: f64,
    hist: Vec<f64>,
    admitted: f64,
    /// Calm windows since the level last moved: each one admits another `admit` more.
    calm: i32,
}

// === impl CompiledOverload ===

impl CompiledOverload {
    /// Compile a validated config's `overload` section.
    pub(crate) fn compile(
        c: &Config,
        iface_ids: &HashMap<&str, InterfaceId>,
        upstream_ids: &HashMap<&str, UpstreamId>,
    ) -> Self {
        let o = &c.overload;
        let mut interfaces = vec![
            InterfaceSpec {
                priority: o.default_priority,
                max_in_flight: None,
            };
            iface_ids.len()
        ];
        for (name, i) in &o.interfaces {
            if let Some(&id) = iface_ids.get(name.as_str()) {
                interfaces[id.0 as usize] = InterfaceSpec {
                    priority: i.priority.unwrap_or(o.default_priority),
                    max_in_flight: i.max_in_flight,
                };
            }
        }
        let mut upstreams = vec![None; upstream_ids.len()];
        for (name, u) in &o.upstreams {
            let Some(&id) = upstream_ids.get(name.as_str()) else {
                continue;
            };
            upstreams[id.0 as usize] = match (&u.adaptive, u.max_in_flight) {
                (Some(a), _) => Some(UpstreamCap::Adaptive(AdaptiveSpec {
                    min: a.min,
                    max: a.max,
                    // `max(min).min(max)`, not `clamp`: no panic should min exceed max.
                    initial: a.initial.unwrap_or(20).max(a.min).min(a.max),
                    target: a.target_latency_ms.map(Duration::from_millis),
                })),
                (None, Some(n)) => Some(UpstreamCap::Fixed(n)),
                (None, None) => None,
            };
        }
        let a = &o.admission;
        Self {
            enabled: o.enabled,
            max_in_flight: o.max_in_flight,
            queue_timeout: Duration::from_millis(o.queue_timeout_ms),
            max_queue: o.max_queue,
            retry_after_s: o.retry_after_s,
            window: Duration::from_millis(o.window_ms),
            default_priority: o.default_priority,
            interfaces,
            upstreams,
            admission: a.enabled.then(|| AdmissionSpec {
                queue_delay_threshold: Duration::from_millis(a.queue_delay_threshold_ms),
                user_levels: a.user_priority_levels,
                rotate_every_s: a.rotate_every_s,
                shed: f64::from(a.shed_percent) / 100.0,
                admit: f64::from(a.admit_percent) / 100.0,
                floor: a
                    .floor
                    .map_or(0, |p| business_rank(p) * a.user_priority_levels),
                priority_key: None,
                dry_run: a.mode == RuleMode::DryRun,
            }),
            priority_key_file: a
                .enabled
                .then(|| a.priority_key_file.as_deref().map(Into::into))
                .flatten(),
        }
    }

    /// Whether any concurrency cap is configured (admission measures queueing at caps).
    pub fn has_caps(&self) -> bool {
        self.max_in_flight.is_some()
            || self.interfaces.iter().any(|i| i.max_in_flight.is_some())
            || self.upstreams.iter().any(Option::is_some)
    }
}

// === impl AdmissionSpec ===

impl AdmissionSpec {
    /// Number of ranks: business levels × user levels.
    pub fn ranks(&self) -> u32 {
        BUSINESS_LEVELS * self.user_levels
    }

    /// The rotation epoch of a Unix time in seconds: user priorities are stable within one.
    pub fn epoch(&self, unix_secs: u64) -> u64 {
        unix_secs / self.rotate_every_s
    }
}

/// Business priority as a rank band: `low` 0 .. `critical` 3.
pub fn business_rank(p: Priority) -> u32 {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

/// The business priority of a rank band (clamped to `critical`).
pub fn business_of_rank(band: u32) -> Priority {
    match band {
        0 => Priority::Low,
        1 => Priority::Normal,
        2 => Priority::High,
        _ => Priority::Critical,
    }
}

/// A user's priority in `0..levels` during rotation `epoch` (higher is more important).
///
/// `bucket("overload:{epoch}", user) × levels / 1_000_000`: the same XXH3 bucket as route
/// splits (see [`crate::bucket`]), under a salt naming the epoch, so it is stable within an
/// epoch, independent between epochs, and identical on every gateway.
pub fn user_priority(key: UserKey<'_>, epoch: u64, levels: u32) -> u32 {
    // "overload:" + up to 20 digits, on the stack.
    let mut buf = [0u8; 32];
    let salt = epoch_salt(epoch, &mut buf);
    let b = match key {
        UserKey::User(u) => bucket(salt, u),
        UserKey::Ip(ip) => bucket_ip(salt, ip),
        UserKey::Unknown => return 0,
    };
    (u64::from(b) * u64::from(levels) / u64::from(BUCKETS)) as u32
}

fn epoch_salt(epoch: u64, buf: &mut [u8; 32]) -> &str {
    const PREFIX: &[u8] = b"overload:";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 20];
    let mut n = epoch;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = PREFIX.len() + digits.len() - i;
    buf[PREFIX.len()..len].copy_from_slice(&digits[i..]);
    std::str::from_utf8(&buf[..len]).expect("ASCII")
}

/// A user's priority in `0..levels` during rotation `epoch`, keyed by `secret`:
/// SipHash-2-4 under the secret of the epoch and the user (or client IP), mapped onto the
/// levels. A pseudo-random function: without the secret, which IDs rank high in an epoch
/// cannot be computed, offline or otherwise; with the same secret every gateway agrees.
pub fn keyed_user_priority(key: UserKey<'_>, epoch: u64, levels: u32, secret: &PriorityKey) -> u32 {
    use std::hash::Hasher as _;
    let mut h = siphasher::sip::SipHasher24::new_with_key(secret);
    h.write_u64(epoch);
    match key {
        UserKey::User(u) => {
            h.write_u8(b'u');
            h.write(u.as_bytes());
        }
        UserKey::Ip(ip) => {
            h.write_u8(b'i');
            match ip.to_canonical() {
                IpAddr::V4(a) => h.write(&a.octets()),
                IpAddr::V6(a) => h.write(&a.octets()),
            }
        }
        UserKey::Unknown => return 0,
    }
    ((u128::from(h.finish()) * u128::from(levels)) >> 64) as u32
}

/// A request's rank: `business_rank × levels + user priority` (keyed when `secret` is set).
pub fn priority(
    business: Priority,
    key: UserKey<'_>,
    epoch: u64,
    levels: u32,
    secret: Option<&PriorityKey>,
) -> u32 {
    let user = match secret {
        Some(s) => keyed_user_priority(key, epoch, levels, s),
        None => user_priority(key, epoch, levels),
    };
    business_rank(business) * levels + user
}

// === impl LevelController ===

impl LevelController {
    /// A controller over `spec`'s ranks, starting with everything admitted (above the
    /// floor).
    pub fn new(spec: &AdmissionSpec) -> Self {
        Self {
            ranks: spec.ranks(),
            level: spec.floor,
            floor: spec.floor,
            shed: spec.shed,
            admit: spec.admit,
            weight: SMOOTHING,
            hist: vec![0.0; spec.ranks() as usize],
            admitted: 0.0,
            calm: 0,
        }
    }

    /// The same with another smoothing weight (1.0: each window alone).
    pub fn with_smoothing(mut self, weight: f64) -> Self {
        self.weight = weight.clamp(0.01, 1.0);
        self
    }

    /// The current level: requests of a lower rank are refused.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Whether a request of rank `rank` is admitted at `level`.
    pub fn admits(level: u32, rank: u32) -> bool {
        rank >= level
    }

    /// Adjust the level after a window; returns the new level.
    ///
    /// Overloaded: the lowest level whose traffic (in this window's histogram) is at most
    /// `(1 - shed) × admitted`, and at least one rank up. Measuring against what got through
    /// the caps rather than what passed the level makes the first step land at the capacity
    /// the caps measured, instead of creeping there 5% at a time while every request waits.
    ///
    /// Calm: the lowest level whose traffic is at most `(1 + admit)^k × admitted`, `k` the
    /// calm windows since the level last moved: 1% more per window, compounding, so a rank
    /// holding more than 1% of the traffic is still entered after a few calm windows, and
    /// the level does not step down by a whole rank every window when ranks are small (which
    /// would swing it by many ranks, flipping users in and out). A window with no traffic at
    /// all resets the level. Never below the floor.
    ///
    /// The level never exceeds the top rank, so the most important requests are always let
    /// through to measure whether the overload has passed.
    pub fn adjust(&mut self, w: &LevelWindow<'_>) -> u32 {
        let top = self.ranks.saturating_sub(1);
        let total: u64 = w.offered.iter().sum();
        if total == 0 && !w.overloaded {
            self.level = self.floor;
            self.hist.iter_mut().for_each(|h| *h = 0.0);
            self.admitted = 0.0;
            return self.level;
        }
        let k = self.weight;
        for (h, &o) in self.hist.iter_mut().zip(w.offered) {
            *h = *h * (1.0 - k) + o as f64 * k;
        }
        self.admitted = self.admitted * (1.0 - k) + w.admitted as f64 * k;
        if w.overloaded {
            self.calm = 0;
            let target = self.admitted * (1.0 - self.shed);
            let l = lowest_level_within(&self.hist, target);
            self.level = l.max(self.level + 1).min(top);
        } else if self.level > self.floor {
            self.calm = (self.calm + 1).min(1000);
            let target = self.admitted * (1.0 + self.admit).powi(self.calm);
            let l = lowest_level_within(&self.hist, target);
            if l < self.level {
                self.level = l;
                self.calm = 0;
            }
        }
        self.level = self.level.max(self.floor);
        self.level
    }

    /// Set the level (tests; the floor still holds).
    pub fn set_level(&mut self, level: u32) {
        self.level = level.min(self.ranks.saturating_sub(1)).max(self.floor);
    }
}

/// The lowest level `l` with `sum(offered[l..]) <= target` (`offered.len()` if none).
fn lowest_level_within(offered: &[f64], target: f64) -> u32 {
    // A hair of tolerance, so sums of smoothed counts that equal the target still fit.
    let target = target * (1.0 + 1e-9);
    let mut suffix = 0.0;
    let mut l = offered.len();
    while l > 0 {
        let next = suffix + offered[l - 1];
        if next > target {
            break;
        }
        suffix = next;
        l -= 1;
    }
    l as u32
}

#[cfg(test)]
mod tests;
