//! The dashboard's sampler and `GET /admin/status.json`.
//!
//! Once a second, [`sample`] (a background task) swaps every live counter
//! ([`crate::stats::Counters`]) to zero and appends the second to a ring of [`HISTORY_SECS`]
//! buckets. The status document is built and serialized only when asked for, at most once
//! per second whoever asks (the admin endpoint, on the admin thread, then answers with a
//! clone of those bytes): a gateway with no dashboard open spends nothing on it, and a
//! thousand rules do not cost the request path a JSON document a second.
//!
//! Limit decisions are not counted twice: the sampler reads the limit rules' Prometheus
//! counters (already one atomic per decision) and takes differences.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rules::route::RouteAction;
use serde::Serialize;

use crate::control::reload::Reloader;
use crate::control::reload::plans::{SampledWindow, Windows};
use crate::govern::limit::Outcome;
use crate::runtime::{Live, Runtime};
use crate::stats::{CLASSES, Class, LAT_BUCKETS, quantile_ms};
use rules::trigger::{InterfaceFigures, UpstreamFigures, Window};

/// Seconds of history kept (and charted): five minutes.
pub const HISTORY_SECS: usize = 300;
/// Seconds the table's rates are averaged over.
pub const RATE_WINDOW_SECS: usize = 10;
/// Seconds a canary's observed share is measured over (longer than the rate window: a 1%
/// canary needs more requests than ten seconds give to show a stable share).
pub const SHARE_WINDOW_SECS: usize = 60;

pub struct Stats {
    live: Arc<Live>,
    reloader: Option<Arc<Reloader>>,
    inner: Mutex<Sampled>,
    /// Each second's figures with the runtime they were sampled from, for the plans'
    /// triggers (the sampler is the counters' only reader).
    windows: tokio::sync::watch::Sender<Option<Arc<SampledWindow>>>,
}

struct Sampled {
    history: History,
    /// The document of the current sample, once asked for.
    doc: Option<Bytes>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

// === impl Stats ===

impl Stats {
    /// Nothing sampled yet.
    pub fn new(live: Arc<Live>, reloader: Option<Arc<Reloader>>) -> Self {
        Self {
            live,
            reloader,
            inner: Mutex::new(Sampled {
                history: History::new(unix_ms()),
                doc: None,
            }),
            windows: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Each second's figures as the sampler closes it (the latest only: a slow reader skips
    /// windows rather than queueing them).
    pub fn windows(&self) -> Windows {
        self.windows.subscribe()
    }

    /// The status document (JSON) of the latest sample, serialized on first request.
    pub fn latest(&self) -> Bytes {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(doc) = &s.doc {
            return doc.clone();
        }
        let rt = self.live.runtime.load_full();
        let doc = s.history.document(&rt, self.reloader.as_deref());
        let bytes = Bytes::from(serde_json::to_vec(&doc).expect("the status document serializes"));
        s.doc = Some(bytes.clone());
        bytes
    }

    /// Take one second of counts from the live runtime.
    fn tick(&self) {
        let rt = self.live.runtime.load_full();
        // An ejection ends by time alone: the gauges catch up here, once a second.
        for u in &rt.upstreams {
            u.export_health();
        }
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let window = s.history.push(&rt, unix_ms());
        s.doc = None;
        drop(s);
        self.windows.send_replace(Some(Arc::new(SampledWindow {
            runtime: rt,
            window,
        })));
    }
}

/// Sample the live runtime into `stats` once a second until shutdown.
pub async fn sample(stats: Arc<Stats>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        }
        stats.tick();
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// === history ===

/// A map of the sampler's series by name. The sampler looks up every interface, upstream,
/// limit and split each second: with 1,000 of each, SipHash was most of its cost.
type ByName<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// The sampler's rings, keyed by name so they survive reloads; every ring has one entry per
/// second in `t_ms`. Owned by the sampler task alone: no lock.
#[derive(Debug)]
struct History {
    started_ms: u64,
    /// Start of the oldest bucket.
    first_start_ms: u64,
    /// End of each bucket (the sample time), oldest first.
    t_ms: VecDeque<u64>,
    /// Per interface: its requests of each second, by class.
    interfaces: Series<VecDeque<[u32; CLASSES]>>,
    unclassified: VecDeque<[u32; CLASSES]>,
    /// Per upstream: requests, p50 and p99 (ms) of each second.
    latency: ByName<VecDeque<LatSecond>>,
    /// Per upstream: the last [`RATE_WINDOW_SECS`] histograms, for the table's percentiles.
    recent_hist: ByName<VecDeque<[u32; LAT_BUCKETS]>>,
    /// Per limit rule: allowed, limited and dry-run-limited decisions of each second.
    limits: Series<VecDeque<[u32; 3]>>,
    /// Per limit rule: the Prometheus counters' values at the previous sample.
    limit_prev: Series<Option<[u64; 3]>>,
    /// Per route rule and target upstream ([`split_key`]): forwarded requests of each
    /// second.
    splits: Series<VecDeque<u32>>,
    /// Identity of the runtime sampled last (its counters' address): a change means a
    /// reload, after which series of names that left the config are dropped.
    layout: usize,
    /// [`Metrics::series_activated`](crate::metrics::Metrics::series_activated) when the
    /// active series were last listed.
    activated: u64,
    /// The limits (by index) and split targets (by series index, route and target) that
    /// were ever used, or have a ring: the only ones a second's sample visits. A thousand
    /// rules of which a few see traffic cost a few visits a second, not a thousand.
    active_limits: Vec<usize>,
    active_splits: Vec<(usize, usize, usize)>,
}

#[derive(Debug, Clone, Copy, Default)]
struct LatSecond {
    count: u32,
    p50_ms: Option<f32>,
    p99_ms: Option<f32>,
}

/// Append `v` to `ring` (zero-filled to `len - 1` first for a new series), keeping at most
/// [`HISTORY_SECS`] entries.
fn push_ring<T: Copy + Default>(ring: &mut VecDeque<T>, len: usize, v: T) {
    while ring.len() + 1 < len {
        ring.push_front(T::default());
    }
    ring.push_back(v);
    while ring.len() > len {
        ring.pop_front();
    }
}

/// The ring of `name` in `map`, created empty (to be zero-filled by [`push_ring`]) for a new
/// name. A lookup by `&str`: no allocation unless the name is new.
fn ring_of<'m, T>(map: &'m mut ByName<VecDeque<T>>, name: &str) -> &'m mut VecDeque<T> {
    if !map.contains_key(name) {
        map.insert(name.into(), VecDeque::new());
    }
    map.get_mut(name).expect("just inserted")
}

/// Series of one kind (one per limit rule, or per split target), by name, bound to the
/// sampled runtime's order once per runtime: a second's sample reaches each series by its
/// index in the runtime, with no lookup by name (a thousand rules made those lookups most
/// of the sampler's cost). Names survive reloads as with [`ByName`].
#[derive(Debug, Default)]
struct Series<V> {
    /// Name → slot in `values`.
    slots: ByName<usize>,
    values: Vec<V>,
    /// The name of each slot.
    names: Vec<Box<str>>,
    /// The slot of each of the bound runtime's series, in its order.
    bound: Vec<usize>,
    /// For a series of rings, in the bound order: whether its ring has an entry yet. A
    /// second's zero for a series without one is skipped on this flag alone, without
    /// reaching its ring (most of a large config's series, any second).
    live: Vec<bool>,
}

impl<V: Default> Series<V> {
    /// The series of `name`, if it has one.
    fn get(&self, name: &str) -> Option<&V> {
        self.slots.get(name).map(|&i| &self.values[i])
    }

    /// Bind the runtime's series, in its order (a new name gets a new, default series).
    fn bind<N: AsRef<str>>(&mut self, names: impl Iterator<Item = N>) {
        self.bound.clear();
        for name in names {
            let name = name.as_ref();
            let slot = match self.slots.get(name) {
                Some(&i) => i,
                None => {
                    self.values.push(V::default());
                    self.names.push(name.into());
                    self.slots.insert(name.into(), self.values.len() - 1);
                    self.values.len() - 1
                }
            };
            self.bound.push(slot);
        }
    }

    /// The series of the bound runtime's `i`-th name.
    fn at(&mut self, i: usize) -> &mut V {
        &mut self.values[self.bound[i]]
    }

    /// Drop the series the bound runtime does not have.
    fn prune(&mut self) {
        let mut keep = vec![false; self.values.len()];
        for &i in &self.bound {
            keep[i] = true;
        }
        let mut remap = vec![usize::MAX; self.values.len()];
        let values = std::mem::take(&mut self.values);
        let names = std::mem::take(&mut self.names);
        for (i, (v, n)) in values.into_iter().zip(names).enumerate() {
            if keep[i] {
                remap[i] = self.values.len();
                self.values.push(v);
                self.names.push(n);
            }
        }
        self.slots = (self.names.iter())
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        for i in &mut self.bound {
            *i = remap[*i];
        }
    }
}

impl<T: Copy + Default + PartialEq> Series<VecDeque<T>> {
    /// [`Series::bind`] for a series of rings, noting which have an entry.
    fn bind_rings<N: AsRef<str>>(&mut self, names: impl Iterator<Item = N>) {
        self.bind(names);
        self.live = (self.bound.iter())
            .map(|&slot| !self.values[slot].is_empty())
            .collect();
    }

    /// [`push_ring`] onto the bound runtime's `i`-th ring, except that a series that has
    /// been zero all along stays empty: most of a large config's interfaces, limits and
    /// split targets see no request in a given second, and the sampler then only reads
    /// their counters. Readers take a short ring as zeros before its first entry.
    #[inline(always)]
    fn push_sparse(&mut self, i: usize, len: usize, v: T) {
        if self.live[i] || v != T::default() {
            self.push_at(i, len, v);
        }
    }

    /// [`Series::push_sparse`] of a series that has, or now gets, an entry: out of line, so
    /// that the sampler's loops over a thousand series stay a flag and a compare each.
    #[inline(never)]
    fn push_at(&mut self, i: usize, len: usize, v: T) {
        self.live[i] = true;
        push_ring(&mut self.values[self.bound[i]], len, v);
    }
}

/// The [`Series`] name of a split's target: route and upstream names (neither has a
/// control character).
fn split_key(route: &str, upstream: &str) -> String {
    format!("{route}\u{1}{upstream}")
}

fn last_n<T>(ring: &VecDeque<T>, n: usize) -> impl Iterator<Item = &T> {
    ring.iter().skip(ring.len().saturating_sub(n))
}

impl History {
    fn new(now_ms: u64) -> Self {
        Self {
            started_ms: now_ms,
            first_start_ms: now_ms,
            t_ms: VecDeque::with_capacity(HISTORY_SECS),
            interfaces: Series::default(),
            unclassified: VecDeque::with_capacity(HISTORY_SECS),
            latency: ByName::default(),
            recent_hist: ByName::default(),
            limits: Series::default(),
            limit_prev: Series::default(),
            splits: Series::default(),
            layout: 0,
            activated: 0,
            active_limits: Vec::new(),
            active_splits: Vec::new(),
        }
    }

    /// Take one second of counts from the live runtime. Rings are updated in place; only
    /// when the runtime changed (a reload) are series that left the config dropped.
    /// Returns the second's figures, indexed like `rt`'s snapshot, for the plans' triggers.
    fn push(&mut self, rt: &Runtime, now_ms: u64) -> Window {
        let mut window = Window {
            start_ms: self.t_ms.back().copied().unwrap_or(self.first_start_ms),
            end_ms: now_ms,
            interfaces: Vec::with_capacity(rt.snapshot.interfaces.len()),
            upstreams: Vec::with_capacity(rt.snapshot.upstreams.len()),
            admission_level: (rt.overload.admission.as_ref())
                .filter(|_| rt.overload.enabled)
                .map_or(0, |a| a.level()),
            ramps: Vec::with_capacity(rt.snapshot.ramps.len()),
        };
        if self.t_ms.len() == HISTORY_SECS {
            self.first_start_ms = self.t_ms.pop_front().unwrap_or(self.first_start_ms);
        }
        self.t_ms.push_back(now_ms);
        let len = self.t_ms.len();
        let snap = &rt.snapshot;
        let c = &rt.stats;
        let layout = Arc::as_ptr(c) as usize;
        let reloaded = std::mem::replace(&mut self.layout, layout) != layout;
        if reloaded {
            self.bind(rt);
        }
        let activated = rt.metrics.series_activated.load(Ordering::Acquire);
        if reloaded || activated != self.activated {
            self.activated = activated;
            self.list_active(rt);
        }

        for i in 0..snap.interfaces.len() {
            let counts = c.interfaces[i].take();
            let n = |class: Class| counts[class as usize];
            window.interfaces.push(InterfaceFigures {
                ok: n(Class::Ok),
                error: n(Class::Error),
                limited: n(Class::Limited),
                shed: n(Class::Shed),
                degraded: n(Class::Degraded),
            });
            (self.interfaces).push_sparse(i, len, counts.map(|n| n as u32));
        }
        let none = c.interfaces[snap.interfaces.len()].take().map(|n| n as u32);
        push_ring(&mut self.unclassified, len, none);

        for (i, u) in snap.upstreams.iter().enumerate() {
            let h = c.upstreams[i].take();
            let second = LatSecond {
                count: h.iter().sum(),
                p50_ms: quantile_ms(&h, 0.50).map(|v| v as f32),
                p99_ms: quantile_ms(&h, 0.99).map(|v| v as f32),
            };
            window.upstreams.push(UpstreamFigures {
                calls: second.count.into(),
                p99_ms: quantile_ms(&h, 0.99),
            });
            push_ring(ring_of(&mut self.latency, &u.name), len, second);
            let hr = ring_of(&mut self.recent_hist, &u.name);
            hr.push_back(h);
            while hr.len() > RATE_WINDOW_SECS {
                hr.pop_front();
            }
        }

        for &li in &self.active_limits {
            let lim = &rt.governors.limiters.rules[li];
            // A limiter gets its counters at its first decision; one without has nothing to
            // take (listed for its ring, from before a reload rebuilt it).
            let Some(cs) = lim.counters.get() else {
                self.limits.push_sparse(li, len, [0; 3]);
                continue;
            };
            // Paced requests were admitted (after their turn): the dashboard counts them as
            // allowed.
            let n = |o: Outcome| cs[o as usize].get();
            let now = [
                n(Outcome::Allowed) + n(Outcome::Paced) + n(Outcome::DryRunPaced),
                n(Outcome::Limited),
                n(Outcome::DryRunLimited),
            ];
            // The rule's counters are cumulative and outlive a reload: a rebuilt limiter's
            // first take continues from the last one's, and a new rule's counters (no take
            // before) started at 0.
            let before = self.limit_prev.at(li).replace(now).unwrap_or([0; 3]);
            let delta = std::array::from_fn(|i| now[i].saturating_sub(before[i]) as u32);
            self.limits.push_sparse(li, len, delta);
        }

        for &(si, ri, ti) in &self.active_splits {
            let n = crate::stats::take(&c.splits[ri][ti].n);
            (self.splits).push_sparse(si, len, n as u32);
        }

        for r in &snap.ramps {
            let Some(Some(g)) = c.guarded.get(r.route_index as usize) else {
                continue;
            };
            window.ramps.push(rules::ramp::RampFigures {
                route: r.route.clone(),
                target: g.sides[0].take(),
                baseline: g.sides[1].take(),
            });
        }

        if reloaded {
            self.prune(rt);
        }
        window
    }

    /// Bind the per-rule series to a new runtime's rules (see [`Series`]).
    fn bind(&mut self, rt: &Runtime) {
        let snap = &rt.snapshot;
        (self.interfaces).bind_rings(snap.interfaces.iter().map(|i| &*i.name));
        let limits = || rt.governors.limiters.rules.iter().map(|l| &*l.name.0);
        self.limits.bind_rings(limits());
        self.limit_prev.bind(limits());
        let splits = snap.routes.iter().flat_map(|r| {
            let targets = match &r.action {
                RouteAction::Split(targets) => &targets[..],
                RouteAction::Upstream(_) => &[],
            };
            targets
                .iter()
                .map(|t| split_key(&r.name, &snap.upstreams[t.upstream.0 as usize].name))
        });
        self.splits.bind_rings(splits);
    }

    /// List the limits and split targets a sample visits: those used since their counters
    /// were made, and those with a ring (which takes a zero each second it sees nothing).
    /// Split targets are in the order `bind` gave them (a route that does not split has
    /// none).
    fn list_active(&mut self, rt: &Runtime) {
        let limiters = &rt.governors.limiters.rules;
        self.active_limits = (0..limiters.len())
            .filter(|&li| limiters[li].counters.get().is_some() || self.limits.live[li])
            .collect();
        self.active_splits.clear();
        let mut si = 0;
        for (ri, targets) in rt.stats.splits.iter().enumerate() {
            for (ti, t) in targets.iter().enumerate() {
                if t.seen() || self.splits.live[si] {
                    self.active_splits.push((si, ri, ti));
                }
                si += 1;
            }
        }
    }

    /// Drop the series of names the runtime no longer has.
    fn prune(&mut self, rt: &Runtime) {
        let snap = &rt.snapshot;
        self.interfaces.prune();
        let upstreams: HashSet<&str> = snap.upstreams.iter().map(|u| &*u.name).collect();
        self.latency.retain(|k, _| upstreams.contains(&**k));
        self.recent_hist.retain(|k, _| upstreams.contains(&**k));
        self.limits.prune();
        self.limit_prev.prune();
        self.splits.prune();
    }

    /// Seconds covered by the last `n` buckets, and that window's start and end.
    fn window(&self, n: usize) -> (f64, u64, u64) {
        let len = self.t_ms.len();
        let Some(&end) = self.t_ms.back() else {
            return (0.0, self.first_start_ms, self.first_start_ms);
        };
        let start = if len > n {
            self.t_ms[len - n - 1]
        } else {
            self.first_start_ms
        };
        ((end - start) as f64 / 1000.0, start, end)
    }

    fn rates(&self, ring: &VecDeque<[u32; CLASSES]>, secs: f64) -> Rates {
        let mut sum = [0u64; CLASSES];
        for s in last_n(ring, RATE_WINDOW_SECS) {
            for (a, &b) in sum.iter_mut().zip(s) {
                *a += u64::from(b);
            }
        }
        let r = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        Rates {
            total: r(sum.iter().sum()),
            ok: r(sum[Class::Ok as usize]),
            error: r(sum[Class::Error as usize]),
            limited: r(sum[Class::Limited as usize]),
            shed: r(sum[Class::Shed as usize]),
            degraded: r(sum[Class::Degraded as usize]),
            count: sum.iter().sum(),
        }
    }

    /// The status document for the live runtime.
    fn document<'a>(&'a self, rt: &'a Runtime, reloader: Option<&Reloader>) -> Document<'a> {
        let snap = &rt.snapshot;
        let (secs, wstart, wend) = self.window(RATE_WINDOW_SECS);
        let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };

        // Limits first: interfaces refer to them.
        let limits: Vec<LimitView<'a>> = snap
            .governance
            .limits
            .iter()
            .map(|l| {
                let ring = self.limits.get(&l.name);
                let mut sum = [0u64; 3];
                for s in ring.into_iter().flat_map(|r| last_n(r, RATE_WINDOW_SECS)) {
                    for (a, &b) in sum.iter_mut().zip(s) {
                        *a += u64::from(b);
                    }
                }
                let q = &l.quotas[0];
                let rate_per_s = f64::from(q.rate.count) / q.rate.period.as_secs_f64();
                let key = l.key_parts();
                let admitted = per_s(sum[0] + sum[2]);
                LimitView {
                    rule: &l.name,
                    mode: match l.mode {
                        rules::model::LimitMode::Enforce => "enforce",
                        rules::model::LimitMode::DryRun => "dry_run",
                    },
                    utilisation: key.is_empty().then(|| admitted / rate_per_s),
                    key,
                    rate_per_s,
                    burst: q.burst,
                    exceptions: l.quotas.len() - 1,
                    interfaces: l.matcher.interfaces().map(|ids| {
                        ids.iter()
                            .map(|&i| &*snap.interfaces[i.0 as usize].name)
                            .collect()
                    }),
                    apps: l.matcher.apps().map(|a| a.iter().map(|s| &**s).collect()),
                    partial: l.matcher.narrows(),
                    allowed_per_s: per_s(sum[0]),
                    limited_per_s: per_s(sum[1]),
                    dry_run_limited_per_s: per_s(sum[2]),
                }
            })
            .collect();

        let empty = VecDeque::new();
        let interfaces = snap
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, itf)| {
                let rates = self.rates(self.interfaces.get(&itf.name).unwrap_or(&empty), secs);
                let mine: Vec<usize> = limits
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| {
                        l.interfaces
                            .as_ref()
                            .is_none_or(|v| v.contains(&&*itf.name))
                    })
                    .map(|(k, _)| k)
                    .collect();
                // The water level: the fullest shared (unkeyed) limit.
                let level = mine
                    .iter()
                    .filter_map(|&k| limits[k].utilisation.map(|u| (k, u)))
                    .max_by(|a, b| a.1.total_cmp(&b.1));
                let headroom = match level {
                    Some((_, u)) if u >= 0.9 => "critical",
                    Some((_, u)) if u >= 0.7 => "warning",
                    Some(_) => "ok",
                    None if rates.limited > 0.0 => "limiting",
                    None if mine.is_empty() => "unlimited",
                    None => "per_key",
                };
                InterfaceView {
                    name: &itf.name,
                    index: i,
                    rates,
                    limit: level.map(|(k, _)| LimitRef {
                        rule: limits[k].rule,
                        rate_per_s: limits[k].rate_per_s,
                    }),
                    utilisation: level.map(|(_, u)| u),
                    headroom,
                    limits: mine.iter().map(|&k| limits[k].rule).collect(),
                }
            })
            .collect();

        let health_now = crate::upstream::health::now_ms();
        let unix_now = unix_ms();
        let upstreams = snap
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let mut h = [0u32; LAT_BUCKETS];
                for s in self.recent_hist.get(&u.name).into_iter().flatten() {
                    for (a, b) in h.iter_mut().zip(s) {
                        *a += b;
                    }
                }
                let n: u64 = h.iter().map(|&c| u64::from(c)).sum();
                let endpoints = rt.upstreams.get(i).map_or_else(Vec::new, |up| {
                    up.endpoints
                        .iter()
                        .map(|ep| {
                            let h = ep.health.snapshot(health_now);
                            EndpointView {
                                address: &ep.name.0,
                                resolved: ep.address().to_string(),
                                state: h.state,
                                ejected_until_ms: h.ejected_for_ms.map(|ms| unix_now + ms),
                                reason: h.reason,
                                consecutive_failures: h.consecutive_failures,
                            }
                        })
                        .collect()
                });
                UpstreamView {
                    name: &u.name,
                    rate_per_s: per_s(n),
                    p50_ms: quantile_ms(&h, 0.50),
                    p99_ms: quantile_ms(&h, 0.99),
                    endpoints,
                }
            })
            .collect();

        let (share_secs, _, _) = self.window(SHARE_WINDOW_SECS);
        let canaries = snap
            .routes
            .iter()
            .filter_map(|r| {
                let RouteAction::Split(targets) = &r.action else {
                    return None;
                };
                let counts: Vec<u64> = targets
                    .iter()
                    .map(|t| {
                        let up = &*snap.upstreams[t.upstream.0 as usize].name;
                        self.splits.get(&split_key(&r.name, up)).map_or(0, |ring| {
                            last_n(ring, SHARE_WINDOW_SECS).map(|&n| u64::from(n)).sum()
                        })
                    })
                    .collect();
                let total: u64 = counts.iter().sum();
                Some(CanaryView {
                    rule: &r.name,
                    requests: total,
                    window_s: share_secs,
                    targets: targets
                        .iter()
                        .zip(&counts)
                        .map(|(t, &n)| SplitView {
                            upstream: &snap.upstreams[t.upstream.0 as usize].name,
                            ppm: t.ppm,
                            configured_share: f64::from(t.ppm) / 1e6,
                            requests: n,
                            observed_share: (total > 0).then(|| n as f64 / total as f64),
                        })
                        .collect(),
                })
            })
            .collect();

        let breakers = rt
            .governors
            .breakers
            .by_id
            .iter()
            .map(|b| BreakerView {
                name: &b.name.0,
                upstream: &b.upstream.0,
                state: b.state().label(),
                mode: match b.def.dry_run {
                    true => "dry_run",
                    false => "enforce",
                },
            })
            .collect();

        let shed: f64 = self
            .interfaces
            .values
            .iter()
            .chain(std::iter::once(&self.unclassified))
            .map(|r| self.rates(r, secs).shed)
            .sum();

        let config = match reloader {
            Some(r) => {
                let s = r.status();
                ConfigView {
                    reload: "watching",
                    file: Some(s.file),
                    generation: s.generation,
                    hash: Some(s.hash),
                    loaded_at_ms: Some(s.loaded_at_ms),
                    last_error: s.last_error,
                    last_error_at_ms: s.last_error_at_ms,
                    restart_needed: s.restart_needed,
                }
            }
            None => ConfigView {
                reload: "disabled",
                file: None,
                generation: 1,
                hash: None,
                loaded_at_ms: Some(self.started_ms),
                last_error: None,
                last_error_at_ms: None,
                restart_needed: None,
            },
        };

        let mut outcome_totals: Vec<[u32; CLASSES]> = vec![[0; CLASSES]; self.t_ms.len()];
        for ring in self
            .interfaces
            .values
            .iter()
            .chain(std::iter::once(&self.unclassified))
        {
            let skip = outcome_totals.len().saturating_sub(ring.len());
            for (acc, s) in outcome_totals.iter_mut().skip(skip).zip(ring) {
                for (a, b) in acc.iter_mut().zip(s) {
                    *a += b;
                }
            }
        }
        let col = |ring: &[[u32; CLASSES]], c: Class| ring.iter().map(|s| s[c as usize]).collect();
        let by_outcome = |ring: &[[u32; CLASSES]]| OutcomeSeries {
            ok: col(ring, Class::Ok),
            error: col(ring, Class::Error),
            limited: col(ring, Class::Limited),
            shed: col(ring, Class::Shed),
            degraded: col(ring, Class::Degraded),
        };
        let series = SeriesView {
            start_ms: self.first_start_ms,
            t_ms: self.t_ms.iter().copied().collect(),
            outcomes: by_outcome(&outcome_totals),
            interfaces: snap
                .interfaces
                .iter()
                .map(|itf| {
                    // Zeros before a sparse ring's first entry (see `Series::push_sparse`).
                    let ring = self.interfaces.get(&itf.name);
                    let have = ring.map_or(0, VecDeque::len);
                    let ring: Vec<_> = std::iter::repeat_n([0; CLASSES], self.t_ms.len() - have)
                        .chain(ring.into_iter().flatten().copied())
                        .collect();
                    Named {
                        name: &itf.name,
                        series: by_outcome(&ring),
                    }
                })
                .collect(),
            upstreams: snap
                .upstreams
                .iter()
                .map(|u| {
                    let ring = self.latency.get(&u.name);
                    let it = || ring.into_iter().flatten();
                    Named {
                        name: &u.name,
                        series: LatencySeries {
                            count: it().map(|s| s.count).collect(),
                            p50_ms: it().map(|s| s.p50_ms).collect(),
                            p99_ms: it().map(|s| s.p99_ms).collect(),
                        },
                    }
                })
                .collect(),
        };

        Document {
            sampled: true,
            now_ms: self.t_ms.back().copied().unwrap_or(self.started_ms),
            started_at_ms: self.started_ms,
            window: WindowView {
                seconds: secs,
                start_ms: wstart,
                end_ms: wend,
            },
            config,
            admission: {
                let o = rt.overload.status();
                AdmissionView {
                    enabled: o.enabled,
                    level: o.admission.as_ref().filter(|_| o.enabled).map(|a| a.rank),
                    shed_per_s: shed,
                    overload: o,
                }
            },
            active_plans: snap.governance.active_plans.iter().map(|p| &**p).collect(),
            plans: reloader.map(Reloader::plans).unwrap_or_default(),
            ramps: reloader.map(Reloader::ramps).unwrap_or_default(),
            breakers,
            interfaces,
            unclassified: self.rates(&self.unclassified, secs),
            limits,
            upstreams,
            canaries,
            caches: caches(rt),
            series,
        }
    }
}

/// Each cached interface's counts since the gateway started, and its hit ratio: the share
/// of its cacheable requests answered without an upstream call of their own.
fn caches(rt: &Runtime) -> Vec<CacheView<'_>> {
    (rt.snapshot.interfaces.iter().zip(&rt.caches))
        .filter_map(|(itf, c)| {
            let c = c.as_ref()?;
            let (hits, coalesced, misses) = c.figures();
            let total = hits + coalesced + misses;
            Some(CacheView {
                interface: &itf.name,
                ttl_ms: c.spec.ttl.as_millis() as u64,
                hits,
                coalesced,
                misses,
                hit_ratio: (total > 0).then(|| (hits + coalesced) as f64 / total as f64),
            })
        })
        .collect()
}

// === the document ===

/// `GET /admin/status.json` (documented field by field in docs/operations.md).
#[derive(Debug, Serialize)]
struct Document<'a> {
    sampled: bool,
    now_ms: u64,
    started_at_ms: u64,
    window: WindowView,
    config: ConfigView,
    admission: AdmissionView,
    active_plans: Vec<&'a str>,
    /// Every plan of the live config: in force or not, why, and what its trigger saw
    /// (empty without a config file).
    plans: Vec<crate::control::reload::plans::PlanStatus>,
    /// Every ramp of the live config: its step, weight, phase and last verdict (empty
    /// without a config file).
    ramps: Vec<crate::control::reload::ramps::RampStatus>,
    breakers: Vec<BreakerView<'a>>,
    interfaces: Vec<InterfaceView<'a>>,
    unclassified: Rates,
    limits: Vec<LimitView<'a>>,
    upstreams: Vec<UpstreamView<'a>>,
    canaries: Vec<CanaryView<'a>>,
    /// Every interface with a `cache`: its counts since start and hit ratio.
    caches: Vec<CacheView<'a>>,
    series: SeriesView<'a>,
}

#[derive(Debug, Serialize)]
struct CacheView<'a> {
    interface: &'a str,
    ttl_ms: u64,
    hits: u64,
    coalesced: u64,
    misses: u64,
    /// `(hits + coalesced) / (hits + coalesced + misses)`; `null` before any request.
    hit_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct WindowView {
    seconds: f64,
    start_ms: u64,
    end_ms: u64,
}

#[derive(Debug, Serialize)]
struct ConfigView {
    reload: &'static str,
    file: Option<String>,
    generation: u64,
    hash: Option<String>,
    loaded_at_ms: Option<u64>,
    last_error: Option<String>,
    last_error_at_ms: Option<u64>,
    restart_needed: Option<String>,
}

#[derive(Debug, Serialize)]
struct AdmissionView {
    enabled: bool,
    level: Option<u32>,
    shed_per_s: f64,
    overload: crate::overload::Status,
}

#[derive(Debug, Serialize)]
struct BreakerView<'a> {
    name: &'a str,
    upstream: &'a str,
    state: &'static str,
    /// `enforce`, or `dry_run` (its state is the one it would be in; it never refuses).
    mode: &'static str,
}

#[derive(Debug, Serialize)]
struct Rates {
    total: f64,
    ok: f64,
    error: f64,
    limited: f64,
    shed: f64,
    degraded: f64,
    count: u64,
}

#[derive(Debug, Serialize)]
struct LimitRef<'a> {
    rule: &'a str,
    rate_per_s: f64,
}

#[derive(Debug, Serialize)]
struct InterfaceView<'a> {
    name: &'a str,
    index: usize,
    rates: Rates,
    limit: Option<LimitRef<'a>>,
    utilisation: Option<f64>,
    headroom: &'static str,
    limits: Vec<&'a str>,
}

#[derive(Debug, Serialize)]
struct LimitView<'a> {
    rule: &'a str,
    mode: &'static str,
    key: Vec<String>,
    rate_per_s: f64,
    burst: u32,
    exceptions: usize,
    interfaces: Option<Vec<&'a str>>,
    apps: Option<Vec<&'a str>>,
    partial: bool,
    allowed_per_s: f64,
    limited_per_s: f64,
    dry_run_limited_per_s: f64,
    utilisation: Option<f64>,
}

#[derive(Debug, Serialize)]
struct UpstreamView<'a> {
    name: &'a str,
    rate_per_s: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    endpoints: Vec<EndpointView<'a>>,
}

/// An upstream endpoint's health (docs/operations.md, "Endpoint health").
#[derive(Debug, Serialize)]
struct EndpointView<'a> {
    /// As configured.
    address: &'a str,
    /// What it resolves to now.
    resolved: String,
    /// `healthy`, `ejected` or `unhealthy`.
    state: &'static str,
    /// While ejected: when the ejection ends, in Unix milliseconds.
    ejected_until_ms: Option<u64>,
    /// While out of rotation: `consecutive_failures` or `health_check`.
    reason: Option<&'static str>,
    consecutive_failures: u32,
}

#[derive(Debug, Serialize)]
struct CanaryView<'a> {
    rule: &'a str,
    requests: u64,
    window_s: f64,
    targets: Vec<SplitView<'a>>,
}

#[derive(Debug, Serialize)]
struct SplitView<'a> {
    upstream: &'a str,
    ppm: u32,
    configured_share: f64,
    requests: u64,
    observed_share: Option<f64>,
}

#[derive(Debug, Serialize)]
struct SeriesView<'a> {
    start_ms: u64,
    t_ms: Vec<u64>,
    outcomes: OutcomeSeries,
    interfaces: Vec<Named<'a, OutcomeSeries>>,
    upstreams: Vec<Named<'a, LatencySeries>>,
}

#[derive(Debug, Serialize)]
struct Named<'a, T> {
    name: &'a str,
    #[serde(flatten)]
    series: T,
}

#[derive(Debug, Serialize)]
struct OutcomeSeries {
    ok: Vec<u32>,
    error: Vec<u32>,
    limited: Vec<u32>,
    shed: Vec<u32>,
    degraded: Vec<u32>,
}

#[derive(Debug, Serialize)]
struct LatencySeries {
    count: Vec<u32>,
    p50_ms: Vec<Option<f32>>,
    p99_ms: Vec<Option<f32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new series is zero-filled to the length of the others, and rings stop at five minutes.
    #[test]
    fn rings_align_and_stay_bounded() {
        let mut r: VecDeque<u32> = VecDeque::new();
        push_ring(&mut r, 3, 7);
        assert_eq!(r, [0, 0, 7]);
        for i in 0..1000 {
            push_ring(&mut r, HISTORY_SECS.min(4 + i), 1);
        }
        assert_eq!(r.len(), HISTORY_SECS);
        assert_eq!(last_n(&r, RATE_WINDOW_SECS).count(), RATE_WINDOW_SECS);
    }

    /// A limit's series counts each second's decisions, the first second's too. A reload
    /// that rebuilds the limiter (its rate changed) carries on from the rule's cumulative
    /// counters, without a jump; a new rule counts from its first decision.
    #[test]
    fn limit_series_count_each_second_across_a_rebuild() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let build = |limits: serde_json::Value, previous: Option<&Runtime>| {
            let c = serde_json::json!({
                "schema_version": 1,
                "upstreams": { "v1": { "endpoints": ["127.0.0.1:1"] } },
                "routes": [ { "name": "default", "upstream": "v1" } ],
                "limits": limits,
            });
            let snap = rules::load("t.json", c.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{e}"))
                .snapshot;
            Runtime::offline(snap, previous, &metrics)
        };
        let decide = |rt: &Runtime, name: &str, n: usize| {
            let rules = &rt.governors.limiters.rules;
            let lim = rules.iter().find(|l| *l.name.0 == *name).unwrap();
            for _ in 0..n {
                crate::govern::count_limit(&metrics, lim, Outcome::Allowed);
            }
        };
        let series = |h: &History, name: &str| -> Vec<u32> {
            h.limits.get(name).unwrap().iter().map(|s| s[0]).collect()
        };
        let a = build(serde_json::json!([{ "name": "l", "rate": "10/s" }]), None);
        let mut h = History::new(0);
        decide(&a, "l", 1);
        h.push(&a, 1000);
        decide(&a, "l", 3);
        h.push(&a, 2000);
        let b = build(
            serde_json::json!([{ "name": "l", "rate": "20/s" }, { "name": "m", "rate": "5/s" }]),
            Some(&a),
        );
        h.push(&b, 3000);
        decide(&b, "l", 2);
        decide(&b, "m", 4);
        h.push(&b, 4000);
        assert_eq!(series(&h, "l"), [1, 3, 0, 2]);
        assert_eq!(series(&h, "m"), [0, 0, 0, 4]);
    }

    /// A limit and a split target first used between two samples (in different seconds),
    /// with no reload, are counted from that second on: each first use has the sampler
    /// list them.
    #[test]
    fn series_first_used_between_samples_are_counted() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let c = serde_json::json!({
            "schema_version": 1,
            "upstreams": {
                "v1": { "endpoints": ["127.0.0.1:1"] },
                "v2": { "endpoints": ["127.0.0.1:2"] },
            },
            "routes": [ { "name": "s", "split": [
                { "upstream": "v2", "weight": "50%" }, { "upstream": "v1", "weight": "rest" },
            ] } ],
            "limits": [ { "name": "idle", "rate": "10/s" }, { "name": "l", "rate": "10/s" } ],
        });
        let snap = rules::load("t.json", c.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
            .snapshot;
        let rt = Runtime::offline(snap, None, &metrics);
        let mut h = History::new(0);
        h.push(&rt, 1000);
        let lim = (rt.governors.limiters.rules.iter())
            .find(|l| *l.name.0 == *"l")
            .unwrap();
        crate::govern::count_limit(&metrics, lim, Outcome::Allowed);
        crate::govern::count_limit(&metrics, lim, Outcome::Allowed);
        h.push(&rt, 2000);
        let headers = http::HeaderMap::new();
        let input = rules::RouteInput {
            m: rules::MatchInput {
                app: None,
                interface: None,
                user: Some("u1"),
                headers: &headers,
                params: &[],
            },
            client_ip: None,
            random: 0,
            pair: Default::default(),
        };
        let route = rt.snapshot.route(&input).unwrap();
        for _ in 0..3 {
            rt.stats.tally(None, Some(&route), Some(route.upstream));
        }
        h.push(&rt, 3000);
        h.push(&rt, 4000);
        let limit = |name: &str| -> Vec<u32> {
            (h.limits.get(name).into_iter().flatten())
                .map(|s| s[0])
                .collect()
        };
        assert_eq!(limit("l"), [0, 2, 0, 0]);
        assert_eq!(limit("idle"), [0u32; 0], "a rule never used takes no room");
        let split = split_key("s", route.upstream_name);
        assert_eq!(h.splits.get(&split).unwrap(), &[0, 0, 3, 0]);
    }

    /// A series that has been zero all along takes no room; its first count is placed in
    /// its second like any other (the zeros before it filled in), and after that every
    /// second is kept, zeros too, also after a rebind.
    #[test]
    fn a_zero_series_stays_empty_until_its_first_count() {
        let mut s: Series<VecDeque<u32>> = Series::default();
        s.bind_rings(["a"].into_iter());
        for len in 1..=4 {
            s.push_sparse(0, len, 0);
        }
        assert!(s.get("a").unwrap().is_empty());
        s.push_sparse(0, 5, 3);
        s.push_sparse(0, 6, 0);
        assert_eq!(*s.get("a").unwrap(), [0, 0, 0, 0, 3, 0]);
        // A new runtime binds "a" second: its ring keeps its seconds; "b" stays empty.
        s.bind_rings(["b", "a"].into_iter());
        s.push_sparse(0, 7, 0);
        s.push_sparse(1, 7, 0);
        assert_eq!(*s.get("a").unwrap(), [0, 0, 0, 0, 3, 0, 0]);
        assert!(s.get("b").unwrap().is_empty());
    }
}
