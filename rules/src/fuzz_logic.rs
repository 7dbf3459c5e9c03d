//! What the fuzz targets in `fuzz/` run, kept here so the committed corpus is also replayed
//! by `cargo test` (see `tests` below) and every input that ever crashed stays a regression
//! test.
//!
//! Each entry point takes raw bytes and checks properties that must hold for any input, by
//! panicking when they do not: the fuzzer reports a panic as a crash.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::{MatchInput, RequestParts, RouteInput, Snapshot};

/// Config bytes → parse → validate → compile. Never panics; a refused file has located,
/// non-empty errors inside the text; an accepted one survives a serialize/load round trip
/// unchanged.
pub fn config(data: &[u8]) {
    match crate::load("fuzz.json", data) {
        Ok(loaded) => {
            let again = serde_json::to_vec(&loaded.config).expect("a loaded config serializes");
            let reloaded = crate::load("again.json", &again).unwrap_or_else(|e| {
                panic!("a config that loaded must load again after a round trip: {e}")
            });
            assert_eq!(
                reloaded.config, loaded.config,
                "round trip changed the config"
            );
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a refusal names at least one error");
            let lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
            for e in &errors.0 {
                assert!(!e.message.is_empty(), "every error says what is wrong");
                assert!(
                    e.line <= lines,
                    "error line {} beyond the {lines} lines of input: {e}",
                    e.line
                );
            }
        }
    }
}

/// The snapshot request-path fuzzing runs against: every extractor kind, splits, whitelists,
/// bucket ranges, header matches, limits and fallbacks.
fn snapshot() -> &'static Snapshot {
    static SNAP: OnceLock<Snapshot> = OnceLock::new();
    SNAP.get_or_init(base_snapshot)
}

const FUZZ_CONFIG: &str = r#"{
  "schema_version": 1,
  "identity": { "app": { "path_param": "app" }, "user": { "query": "uid" } },
  "interfaces": [
    { "name": "grab", "method": "POST", "path": "/apps/{app}/envelopes/{id}/grab" },
    { "name": "open", "method": "GET", "path": "/apps/{app}/envelopes/{id}" },
    { "name": "any", "method": "*", "path": "/any/{rest}" }
  ],
  "upstreams": { "v1": { "endpoints": ["127.0.0.1:1"] }, "v2": { "endpoints": ["127.0.0.1:2"] } },
  "routes": [
    { "name": "default", "upstream": "v1" },
    { "name": "canary", "match": { "apps": ["douyin"], "interfaces": ["grab"] },
      "split": [ { "upstream": "v2", "weight": "0.0125%" }, { "upstream": "v1", "weight": "rest" } ],
      "whitelist": [ { "upstream": "v2", "users": ["qa"], "apps": ["internal"] } ],
      "override_header": "x-canary", "no_user_key": { "header": "x-device" } },
    { "name": "slice", "match": { "user_buckets": { "from_ppm": 0, "to_ppm": 1000 } }, "upstream": "v2" },
    { "name": "hdr", "match": { "headers": { "x-env": "gray" } }, "upstream": "v2" }
  ],
  "limits": [
    { "name": "per-user", "match": { "interfaces": ["grab"] }, "key": ["user", "app"], "rate": "5/s" },
    { "name": "per-device", "key": [ { "header": "x-device" } ], "rate": "100/min", "when_missing": "skip" }
  ],
  "fallbacks": [
    { "name": "open-off", "match": { "interfaces": ["open"] }, "fraction": "30%",
      "response": { "status": 200, "body": { "ok": false } } }
  ]
}"#;

/// Request bytes → classify → route, limits, fallback and explain on a fixed snapshot. The
/// input is split on `\n`: method, path, query, then `name: value` header lines. Never
/// panics; every ID a decision returns indexes into the snapshot.
pub fn request(data: &[u8]) {
    let snap = snapshot();
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method =
        Method::from_bytes(lines.next().unwrap_or("GET").as_bytes()).unwrap_or(Method::GET);
    let path = lines.next().unwrap_or("/");
    let query = lines.next().filter(|q| !q.is_empty());
    let headers = header_lines(lines);
    let parts = RequestParts {
        method: &method,
        path,
        query,
        headers: &headers,
    };
    let c = snap.classify(parts);
    assert!(c.app.as_deref() != Some(""), "an empty app is none");
    assert!(c.user.as_deref() != Some(""), "an empty user is none");
    let input = RouteInput {
        m: MatchInput {
            app: c.app.as_deref(),
            interface: c.interface,
            user: c.user.as_deref(),
            headers: &headers,
            params: &c.params,
        },
        client_ip: data.first().map(|b| std::net::IpAddr::from([10, 0, 0, *b])),
        random: (data.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        pair: Default::default(),
    };
    if let Some(d) = snap.route(&input) {
        assert!((d.upstream.0 as usize) < snap.upstreams.len());
        if let crate::Via::Split { bucket, .. } = d.via {
            assert!(bucket < crate::bucket::BUCKETS);
        }
    } else {
        panic!("the base config has a default route: every request routes");
    }
    let mut scratch = Vec::new();
    for &l in snap.limits_for(&input.m, &mut scratch) {
        assert!((l as usize) < snap.governance.limits.len());
    }
    let _ = snap.fallback(&input);
    let e = snap.explain(parts, None, None, input.client_ip);
    assert!(e.decision.is_some());
}

/// A decision's inputs decoded from fuzz bytes: split on `\n`, app, interface index, user,
/// then header lines; the client IP and the random draw come from a hash of the bytes.
#[derive(Debug)]
pub struct DecideInput {
    /// App ID.
    pub app: Option<String>,
    /// Interface, when the index names one of the base config's.
    pub interface: Option<crate::InterfaceId>,
    /// User ID.
    pub user: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Client address.
    pub client_ip: Option<std::net::IpAddr>,
    /// The random draw.
    pub random: u64,
}

impl DecideInput {
    /// Decode `data` (any bytes) against `snap`'s interfaces.
    pub fn decode(data: &[u8], snap: &Snapshot) -> Self {
        let text = String::from_utf8_lossy(data);
        let mut lines = text.split('\n');
        let app = lines.next().filter(|a| !a.is_empty()).map(str::to_owned);
        let interface = lines
            .next()
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|i| (*i as usize) < snap.interfaces.len())
            .map(crate::InterfaceId);
        let user = lines.next().filter(|u| !u.is_empty()).map(str::to_owned);
        let headers = header_lines(lines);
        let seed = xxhash_rust::xxh3::xxh3_64(data);
        Self {
            app,
            interface,
            user,
            headers,
            client_ip: (seed & 1 == 0)
                .then(|| std::net::IpAddr::from(((seed >> 8) as u32).to_be_bytes())),
            random: seed,
        }
    }

    /// The decision input.
    pub fn route_input(&self) -> RouteInput<'_> {
        RouteInput {
            m: MatchInput {
                app: self.app.as_deref(),
                interface: self.interface,
                user: self.user.as_deref(),
                headers: &self.headers,
                params: &[],
            },
            client_ip: self.client_ip,
            random: self.random,
            pair: Default::default(),
        }
    }
}

/// `name: value` lines as headers; lines that are not a valid header are skipped.
fn header_lines<'a>(lines: impl Iterator<Item = &'a str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':')
            && let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.trim().as_bytes()),
                HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(k, v);
        }
    }
    headers
}

/// A fresh snapshot of the base config the request-path targets run against (every
/// extractor kind, splits, whitelists, bucket ranges, header matches, limits, fallbacks).
pub fn base_snapshot() -> Snapshot {
    crate::load("fuzz-base.json", FUZZ_CONFIG.as_bytes())
        .unwrap_or_else(|e| panic!("the fuzz base config is valid: {e}"))
        .snapshot
}

/// Decision bytes → route, limits and fallback for an arbitrary (app, interface, user,
/// headers, client IP, random draw), without going through the extractors (see
/// [`DecideInput`]). Never panics. Each lookup from the request's pair (as the gateway
/// makes them) finds what it finds by itself. The gateway's whole decision on the same
/// input is fuzzed by the proxy's `pipeline::fuzz`.
pub fn decide(data: &[u8]) {
    let snap = snapshot();
    let decoded = DecideInput::decode(data, snap);
    let alone = decoded.route_input();
    let input = RouteInput {
        pair: snap.pair(&alone.m),
        ..alone
    };
    let d = snap
        .route(&input)
        .expect("the base config has a default route");
    assert!((d.upstream.0 as usize) < snap.upstreams.len());
    assert_eq!(Some(d), snap.route(&alone), "route from the pair");
    let (mut scratch, mut own) = (Vec::new(), Vec::new());
    let limits = snap.limits_of(&input, &mut scratch);
    assert_eq!(
        limits,
        snap.limits_for(&alone.m, &mut own),
        "limits from the pair"
    );
    for &l in limits {
        let limit = &snap.governance.limits[l as usize];
        let _ = limit.key_of(snap, &input);
        let _ = limit.quota_of(&input.m);
    }
    let fallback = |r| snap.fallback(r).map(|f| (f.rule_id, f.bucket));
    assert_eq!(fallback(&input), fallback(&alone), "fallback from the pair");
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replay every committed fuzz corpus and crash input through the same entry points, so
    /// a fixed crash stays fixed.
    #[test]
    fn replay_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut n = 0;
        for (dirs, run) in [
            (
                &["corpus/config", "artifacts/config"][..],
                super::config as fn(&[u8]),
            ),
            (
                &["corpus/classify", "artifacts/classify"][..],
                super::request as fn(&[u8]),
            ),
            (
                &["corpus/decide", "artifacts/decide"][..],
                super::decide as fn(&[u8]),
            ),
        ] {
            for d in dirs {
                let Ok(entries) = std::fs::read_dir(root.join(d)) else {
                    continue;
                };
                for e in entries.flatten() {
                    let data = std::fs::read(e.path()).unwrap();
                    run(&data);
                    n += 1;
                }
            }
        }
        assert!(
            n >= 10,
            "the committed corpus is replayed ({n} inputs found)"
        );
    }

    /// The base config itself and a few hand-written requests pass.
    #[test]
    fn seeds() {
        super::request(b"POST\n/apps/douyin/envelopes/7/grab\nuid=bob\nx-canary: v2");
        super::request(b"GET\n/apps/x/envelopes/7\n\nx-env: gray");
        super::request(b"");
        super::config(super::FUZZ_CONFIG.as_bytes());
        super::config(b"{");
        super::decide(b"douyin\n0\nbob\nx-device: d1");
        super::decide(b"");
    }
}
