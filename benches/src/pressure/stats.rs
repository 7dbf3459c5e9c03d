//! Outcome counting and latency histograms, per interface, merged from every worker at the
//! end (workers never share a counter on the hot path).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx the gateway did not make itself.
    Succeeded,
    /// 429: refused by a rate limit.
    Limited,
    /// 503 without a fallback marker: shed by overload protection (or an open breaker).
    Shed,
    /// Answered by a fallback rule (it carries the `x-tidegate-fallback` header).
    Degraded,
    /// Any other status (the upstream's 4xx/5xx, the gateway's 404/502/504).
    Failed,
    /// No response: connect or transport error, or the timeout.
    Error,
}

/// The header a scenario's fallback rules set so their answers are told apart.
pub const FALLBACK_MARKER: &str = "x-tidegate-fallback";

/// Classify a response by status and whether it carries the fallback marker.
pub fn classify(status: u16, fallback_marker: bool) -> Outcome {
    if fallback_marker {
        Outcome::Degraded
    } else if status == 429 {
        Outcome::Limited
    } else if status == 503 {
        Outcome::Shed
    } else if (200..300).contains(&status) {
        Outcome::Succeeded
    } else {
        Outcome::Failed
    }
}

/// Counters and latencies of one interface (or of all).
#[derive(Debug, Clone)]
pub struct Stats {
    /// Requests due (open loop: scheduled inside the run; closed loop: sent).
    pub offered: u64,
    /// Due requests never sent: every connection was busy until the drain ended.
    pub unsent: u64,
    /// Outcomes.
    pub succeeded: u64,
    /// 429s.
    pub limited: u64,
    /// 503s (no fallback marker).
    pub shed: u64,
    /// Fallback answers.
    pub degraded: u64,
    /// Other statuses.
    pub failed: u64,
    /// No response.
    pub errors: u64,
    /// Responses by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Latency in microseconds, from the *intended* send time (open loop), so queueing
    /// behind a slow response is counted rather than hidden (coordinated omission).
    pub latency_us: Histogram<u64>,
    /// Succeeded (and degraded) answers per second of the run, by completion time.
    pub per_second: Vec<u64>,
    /// Requests due per second of the run.
    pub offered_per_second: Vec<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            offered: 0,
            unsent: 0,
            succeeded: 0,
            limited: 0,
            shed: 0,
            degraded: 0,
            failed: 0,
            errors: 0,
            statuses: BTreeMap::new(),
            latency_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
            per_second: Vec::new(),
            offered_per_second: Vec::new(),
        }
    }
}

fn bump(v: &mut Vec<u64>, i: usize, by: u64) {
    if v.len() <= i {
        v.resize(i + 1, 0);
    }
    v[i] += by;
}

impl Stats {
    /// Count one due request at second `sec` of the run.
    pub fn offer(&mut self, sec: usize) {
        self.offered += 1;
        bump(&mut self.offered_per_second, sec, 1);
    }

    /// Record one finished request.
    pub fn record(
        &mut self,
        outcome: Outcome,
        status: Option<u16>,
        latency_us: u64,
        done_sec: usize,
    ) {
        match outcome {
            Outcome::Succeeded => self.succeeded += 1,
            Outcome::Limited => self.limited += 1,
            Outcome::Shed => self.shed += 1,
            Outcome::Degraded => self.degraded += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Error => self.errors += 1,
        }
        if let Some(s) = status {
            *self.statuses.entry(s).or_default() += 1;
        }
        if matches!(outcome, Outcome::Succeeded | Outcome::Degraded) {
            bump(&mut self.per_second, done_sec, 1);
        }
        self.latency_us.saturating_record(latency_us.max(1));
    }

    /// Admitted by the gateway: answered, and neither limited nor shed.
    pub fn admitted(&self) -> u64 {
        self.succeeded + self.degraded + self.failed
    }

    /// Add `other` into `self`.
    pub fn merge(&mut self, other: &Stats) {
        self.offered += other.offered;
        self.unsent += other.unsent;
        self.succeeded += other.succeeded;
        self.limited += other.limited;
        self.shed += other.shed;
        self.degraded += other.degraded;
        self.failed += other.failed;
        self.errors += other.errors;
        for (k, v) in &other.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
        self.latency_us.add(&other.latency_us).expect("same bounds");
        for (i, v) in other.per_second.iter().enumerate() {
            bump(&mut self.per_second, i, *v);
        }
        for (i, v) in other.offered_per_second.iter().enumerate() {
            bump(&mut self.offered_per_second, i, *v);
        }
    }

    /// A latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        if self.latency_us.is_empty() {
            return 0.0;
        }
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    /// The best sustained throughput of answered requests: the highest mean over any
    /// `window` consecutive seconds (requests/s).
    pub fn peak_rate(&self, window: usize) -> f64 {
        peak(&self.per_second, window)
    }

    /// The highest offered rate over `window` seconds.
    pub fn peak_offered(&self, window: usize) -> f64 {
        peak(&self.offered_per_second, window)
    }

    /// As JSON.
    pub fn to_json(&self, secs: f64) -> Value {
        json!({
            "offered": self.offered,
            "unsent": self.unsent,
            "admitted": self.admitted(),
            "succeeded": self.succeeded,
            "limited": self.limited,
            "shed": self.shed,
            "degraded": self.degraded,
            "failed": self.failed,
            "errors": self.errors,
            "statuses": self.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "rps": (self.succeeded + self.degraded + self.failed + self.limited + self.shed) as f64 / secs,
            "succeeded_rps": self.succeeded as f64 / secs,
            "peak_rps_3s": self.peak_rate(3),
            "latency_ms": {
                "p50": self.ms(0.5), "p90": self.ms(0.9), "p99": self.ms(0.99),
                "p99.9": self.ms(0.999), "max": self.latency_us.max() as f64 / 1000.0,
                "mean": self.latency_us.mean() / 1000.0,
            },
        })
    }
}

fn peak(v: &[u64], window: usize) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let w = window.clamp(1, v.len());
    v.windows(w)
        .map(|s| s.iter().sum::<u64>() as f64 / w as f64)
        .fold(0.0, f64::max)
}

/// The per-interface table, then the overall row.
pub fn table(rows: &[(String, Stats)], total: &Stats) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "interface",
        "offered",
        "admitted",
        "succeeded",
        "limited",
        "shed",
        "degraded",
        "failed",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms"
    );
    let all = rows
        .iter()
        .map(|(n, s)| (n.as_str(), s))
        .chain(std::iter::once(("overall", total)));
    for (name, st) in all {
        let _ = writeln!(
            s,
            "{:<10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name,
            st.offered,
            st.admitted(),
            st.succeeded,
            st.limited,
            st.shed,
            st.degraded,
            st.failed,
            st.errors + st.unsent,
            st.ms(0.5),
            st.ms(0.9),
            st.ms(0.99),
            st.ms(0.999),
        );
    }
    s
}

/// One row of the capacity water-level table.
#[derive(Debug, Clone, PartialEq)]
pub struct WaterLevel {
    /// Interface (or `overall`).
    pub name: String,
    /// Target QPS from the scenario.
    pub target: f64,
    /// Peak offered QPS (3 s window): a target above it was not tested.
    pub offered: f64,
    /// Peak answered QPS (succeeded + degraded, 3 s window).
    pub measured: f64,
}

impl WaterLevel {
    /// Headroom over the target: `measured / target - 1`.
    pub fn headroom(&self) -> f64 {
        if self.target > 0.0 {
            self.measured / self.target - 1.0
        } else {
            0.0
        }
    }

    /// The water level: target as a share of the measured capacity.
    pub fn level(&self) -> f64 {
        if self.measured > 0.0 {
            self.target / self.measured
        } else {
            f64::INFINITY
        }
    }

    /// Whether the answers fell behind the offered load (the capacity was found). When they
    /// kept up, the measured rate is only a lower bound of the capacity: raise the load
    /// (`--rate-scale`) to find it.
    pub fn saturated(&self) -> bool {
        self.measured < self.offered * 0.97
    }

    /// `ok`, `SHORT` (below target) or `untested` (the load never offered the target).
    pub fn verdict(&self) -> &'static str {
        if self.measured >= self.target * 0.995 {
            "ok"
        } else if self.offered < self.target * 0.995 {
            "untested"
        } else {
            "SHORT"
        }
    }
}

/// Water-level rows for every target.
pub fn water_levels(
    targets: &BTreeMap<String, f64>,
    rows: &[(String, Stats)],
    total: &Stats,
) -> Vec<WaterLevel> {
    let mut out = Vec::new();
    for (name, &target) in targets {
        let st = if name == "overall" {
            Some(total)
        } else {
            rows.iter().find(|(n, _)| n == name).map(|(_, s)| s)
        };
        let (offered, measured) = st.map_or((0.0, 0.0), |s| (s.peak_offered(3), s.peak_rate(3)));
        out.push(WaterLevel {
            name: name.clone(),
            target,
            offered,
            measured,
        });
    }
    out
}

/// The water-level table as text.
pub fn water_table(rows: &[WaterLevel]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<10} {:>11} {:>13} {:>13} {:>9} {:>11} {:>8}",
        "interface",
        "target QPS",
        "offered peak",
        "measured QPS",
        "headroom",
        "water level",
        "verdict"
    );
    for w in rows {
        // Kept up with the offered load: the capacity is at least what was measured.
        let ge = if w.saturated() { " " } else { ">=" };
        let le = if w.saturated() { " " } else { "<=" };
        let _ = writeln!(
            s,
            "{:<10} {:>11.0} {:>13.0} {:>2}{:>11.0} {:>2}{:>6.1}% {:>2}{:>8.1}% {:>8}",
            w.name,
            w.target,
            w.offered,
            ge,
            w.measured,
            ge,
            w.headroom() * 100.0,
            le,
            w.level() * 100.0,
            w.verdict()
        );
    }
    let _ = writeln!(
        s,
        ">= / <=: the interface kept up with the offered load, so its capacity is at least the\n\
         measured rate; raise the load (--rate-scale) until it saturates to find the ceiling."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outcomes by status and marker.
    #[test]
    fn classification() {
        assert_eq!(classify(200, false), Outcome::Succeeded);
        assert_eq!(classify(201, false), Outcome::Succeeded);
        assert_eq!(classify(429, false), Outcome::Limited);
        assert_eq!(classify(503, false), Outcome::Shed);
        assert_eq!(classify(503, true), Outcome::Degraded);
        assert_eq!(classify(200, true), Outcome::Degraded);
        assert_eq!(classify(410, false), Outcome::Failed);
    }

    /// Merging adds counts, histograms and per-second series; peaks use a window mean.
    #[test]
    fn merge_and_peaks() {
        let mut a = Stats::default();
        let mut b = Stats::default();
        for sec in 0..4 {
            for _ in 0..(10 * (sec + 1)) {
                a.offer(sec);
                a.record(Outcome::Succeeded, Some(200), 1_000, sec);
            }
        }
        b.offer(0);
        b.record(Outcome::Limited, Some(429), 9_000, 0);
        a.merge(&b);
        assert_eq!(
            (a.offered, a.succeeded, a.limited, a.admitted()),
            (101, 100, 1, 100)
        );
        assert_eq!(a.per_second, vec![10, 20, 30, 40]);
        assert_eq!(a.peak_rate(3), 30.0);
        assert_eq!(a.peak_rate(1), 40.0);
        assert!((a.ms(0.5) - 1.0).abs() < 0.01 && (a.ms(1.0) - 9.0).abs() < 0.01);
        let wl = water_levels(
            &[("overall".to_owned(), 25.0), ("nope".to_owned(), 5.0)]
                .into_iter()
                .collect(),
            &[],
            &a,
        );
        assert_eq!(wl[0].name, "nope");
        assert_eq!(wl[0].verdict(), "untested");
        assert_eq!(wl[1].verdict(), "ok");
        assert!((wl[1].headroom() - 0.2).abs() < 1e-9);
    }
}
