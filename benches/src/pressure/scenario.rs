//! Scenarios: what the pressure tool sends, at what rate, and the capacity targets it is
//! judged against. Parsed from JSON (`benches/scenarios/*.json`), unknown fields refused.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// One pressure-test scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name, printed in the report.
    pub name: String,
    /// What it shows, for humans.
    #[serde(default)]
    pub description: String,
    /// Where to send: `http://IP:port` (overridable with `--target`).
    #[serde(default = "default_target")]
    pub target: String,
    /// `http1` or `h2` (prior knowledge, no TLS).
    #[serde(default)]
    pub protocol: Protocol,
    /// Connections opened to the target.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// With h2: requests in flight at once per connection.
    #[serde(default = "default_streams")]
    pub h2_streams_per_connection: usize,
    /// Distinct user IDs drawn uniformly (`{user}` is `<user_prefix><n>`).
    #[serde(default = "default_users")]
    pub users: u64,
    /// Prefix of generated user IDs.
    #[serde(default = "default_user_prefix")]
    pub user_prefix: String,
    /// Header carrying the user ID on every request (none: not sent).
    #[serde(default = "default_user_header")]
    pub user_header: Option<String>,
    /// Headers sent on every request (values may use `{user}`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A request that has not answered in this long counts as an error.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// After the schedule ends, how long late requests may still be sent and awaited.
    #[serde(default = "default_drain_ms")]
    pub drain_ms: u64,
    /// Work done before the timed run (creating envelopes).
    #[serde(default)]
    pub setup: Option<Setup>,
    /// The arrival rate over time: phases run back to back.
    pub profile: Vec<Phase>,
    /// The requests, by interface, drawn by weight.
    pub mix: Vec<RequestSpec>,
    /// Capacity targets in requests/s per interface (and `overall`), for `--water-level`.
    #[serde(default)]
    pub targets: BTreeMap<String, f64>,
}

/// Transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 keep-alive, one request in flight per connection.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge, several streams per connection.
    H2,
}

/// Set-up before the timed run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// Envelopes created with `POST /envelopes`; their IDs fill `{envelope}`.
    pub envelopes: EnvelopeSetup,
}

/// Envelopes to create.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSetup {
    /// How many.
    pub count: usize,
    /// Total of each, in cents.
    pub total_cents: u64,
    /// Shares in each.
    pub shares: u64,
    /// Lifetime.
    #[serde(default = "default_expiry")]
    pub expires_in_s: u64,
}

/// One phase of the arrival rate: linear from `from` to `to` requests/s over `secs`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Length in seconds.
    pub secs: f64,
    /// Rate at its start (requests/s).
    pub from: f64,
    /// Rate at its end (default: `from`, a steady phase).
    #[serde(default)]
    pub to: Option<f64>,
}

/// One kind of request in the mix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// The interface name it is reported under.
    pub name: String,
    /// Relative weight in the mix.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// HTTP method.
    #[serde(default = "default_method")]
    pub method: String,
    /// Path; `{envelope}`, `{user}` and `{seq}` are filled per request.
    pub path: String,
    /// Body (same placeholders); none: empty.
    #[serde(default)]
    pub body: Option<String>,
    /// Extra headers for this request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_target() -> String {
    "http://127.0.0.1:8080".into()
}
fn default_connections() -> usize {
    64
}
fn default_streams() -> usize {
    16
}
fn default_users() -> u64 {
    100_000
}
fn default_user_prefix() -> String {
    "u".into()
}
fn default_user_header() -> Option<String> {
    Some("x-user-id".into())
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_drain_ms() -> u64 {
    5_000
}
fn default_expiry() -> u64 {
    3_600
}
fn default_weight() -> u32 {
    1
}
fn default_method() -> String {
    "GET".into()
}

// === impl Scenario ===

impl Scenario {
    /// Parse and check a scenario.
    pub fn parse(text: &str) -> Result<Self, String> {
        let s: Scenario = serde_json::from_str(text).map_err(|e| e.to_string())?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), String> {
        if self.mix.is_empty() || self.mix.iter().all(|r| r.weight == 0) {
            return Err("mix: at least one request with a weight above 0".into());
        }
        if self.profile.is_empty() {
            return Err("profile: at least one phase".into());
        }
        for (i, p) in self.profile.iter().enumerate() {
            let to = p.to.unwrap_or(p.from);
            if !(p.secs > 0.0 && p.from >= 0.0 && to >= 0.0 && p.secs.is_finite()) {
                return Err(format!("profile[{i}]: secs > 0 and rates >= 0"));
            }
        }
        if self.connections == 0 || self.h2_streams_per_connection == 0 || self.users == 0 {
            return Err("connections, h2_streams_per_connection and users must be >= 1".into());
        }
        let uses_envelope = self.mix.iter().any(|r| {
            r.path.contains("{envelope}")
                || r.body.as_deref().is_some_and(|b| b.contains("{envelope}"))
        });
        if uses_envelope && self.setup.as_ref().is_none_or(|s| s.envelopes.count == 0) {
            return Err("mix uses {envelope} but setup.envelopes.count is 0 or absent".into());
        }
        for r in &self.mix {
            http::Method::from_bytes(r.method.as_bytes())
                .map_err(|_| format!("mix {:?}: bad method {:?}", r.name, r.method))?;
            if !r.path.starts_with('/') {
                return Err(format!("mix {:?}: path must start with /", r.name));
            }
        }
        Ok(())
    }

    /// Length of the scheduled run.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.profile.iter().map(|p| p.secs).sum())
    }

    /// Interface names in mix order, without repeats.
    pub fn interfaces(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in &self.mix {
            if !v.contains(&r.name) {
                v.push(r.name.clone());
            }
        }
        v
    }

    /// Multiply every rate by `k` (`--rate-scale`).
    pub fn scale_rates(&mut self, k: f64) {
        for p in &mut self.profile {
            p.from *= k;
            p.to = p.to.map(|t| t * k);
        }
        for v in self.targets.values_mut() {
            *v *= k;
        }
    }

    /// Multiply every phase length by `k` (`--time-scale`).
    pub fn scale_time(&mut self, k: f64) {
        for p in &mut self.profile {
            p.secs *= k;
        }
    }
}

/// The intended send time of every request of an open-loop run, as offsets from its start
/// (seconds, ascending). Arrivals are evenly spaced at the instantaneous rate, as in wrk2: the
/// k-th request of a phase is due when the integral of the rate reaches k.
pub fn schedule(profile: &[Phase]) -> Vec<f64> {
    let mut out = Vec::new();
    let mut t0 = 0.0;
    // Requests due before this phase, fractional: carried so phases join without a gap.
    let mut before = 0.0f64;
    for p in profile {
        let from = p.from;
        let to = p.to.unwrap_or(from);
        let area = (from + to) / 2.0 * p.secs;
        let a = (to - from) / (2.0 * p.secs);
        let mut k = before.floor() + 1.0;
        while k <= before + area {
            let local = k - before;
            let t = if a.abs() < 1e-12 {
                local / from
            } else {
                // a t² + from t = local
                let disc = (from * from + 4.0 * a * local).max(0.0);
                (disc.sqrt() - from) / (2.0 * a)
            };
            out.push(t0 + t.clamp(0.0, p.secs));
            k += 1.0;
        }
        before += area;
        t0 += p.secs;
    }
    out
}

/// Fill `{user}`, `{envelope}` and `{seq}` in `template`.
pub fn fill(template: &str, user: &str, envelope: Option<&str>, seq: u64) -> String {
    if !template.contains('{') {
        return template.to_owned();
    }
    let mut s = template.replace("{user}", user);
    if let Some(e) = envelope {
        s = s.replace("{envelope}", e);
    }
    if s.contains("{seq}") {
        s = s.replace("{seq}", &seq.to_string());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A steady phase spaces requests evenly; a ramp's count is the integral of its rate.
    #[test]
    fn schedule_follows_the_rate() {
        let s = schedule(&[Phase {
            secs: 2.0,
            from: 10.0,
            to: None,
        }]);
        assert_eq!(s.len(), 20);
        assert!((s[0] - 0.1).abs() < 1e-9 && (s[19] - 2.0).abs() < 1e-9);
        let ramp = schedule(&[
            Phase {
                secs: 10.0,
                from: 0.0,
                to: Some(100.0),
            },
            Phase {
                secs: 10.0,
                from: 100.0,
                to: Some(0.0),
            },
        ]);
        assert_eq!(ramp.len(), 1000);
        assert!(ramp.windows(2).all(|w| w[0] <= w[1]), "ascending");
        // Half the requests of a symmetric wave come before its peak.
        let before_peak = ramp.iter().filter(|&&t| t <= 10.0).count();
        assert!((499..=501).contains(&before_peak), "{before_peak}");
        // The last second of the up-ramp carries about 95 requests (rate 90..100).
        let last = ramp.iter().filter(|&&t| t > 9.0 && t <= 10.0).count();
        assert!((94..=96).contains(&last), "{last}");
    }

    /// The shipped scenarios parse; bad ones are refused with a reason.
    #[test]
    fn scenarios_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".json") && !name.contains(".gateway") {
                let text = std::fs::read_to_string(&p).unwrap();
                Scenario::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
                n += 1;
            }
        }
        assert!(n >= 3, "found {n} scenarios");
        let bad = r#"{"name":"x","profile":[{"secs":1,"from":1}],
            "mix":[{"name":"open","path":"/envelopes/{envelope}"}]}"#;
        assert!(Scenario::parse(bad).unwrap_err().contains("setup"));
        let unknown = r#"{"name":"x","profile":[],"mix":[],"bogus":1}"#;
        assert!(Scenario::parse(unknown).unwrap_err().contains("bogus"));
    }

    /// Placeholders are filled; a template without any is returned as is.
    #[test]
    fn fill_placeholders() {
        assert_eq!(
            fill("/envelopes/{envelope}/grab", "u1", Some("42"), 0),
            "/envelopes/42/grab"
        );
        assert_eq!(
            fill("/users/{user}/wallet", "u7", None, 0),
            "/users/u7/wallet"
        );
        assert_eq!(fill("/x?n={seq}", "u", None, 9), "/x?n=9");
        assert_eq!(fill("/healthz", "u", None, 0), "/healthz");
    }
}
