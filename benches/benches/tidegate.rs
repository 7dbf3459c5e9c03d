//! Criterion benches, one entry with a module per area (`cargo bench -p tidegate-benches`).

use criterion::{Criterion, criterion_group, criterion_main};

mod routing {
    use std::hint::black_box;

    use criterion::{BenchmarkId, Criterion, Throughput};
    use http::{HeaderMap, Method};
    use rules::{MatchInput, RequestParts, RouteInput};
    use tidegate_benches::synthetic_config;

    /// One classify + route decision against configs of 10, 1,000 and 100,000 rules spread
    /// over apps and interfaces. The target is a flat line: the index, not a scan.
    pub(crate) fn bench(c: &mut Criterion) {
        let mut g = c.benchmark_group("decide/classify+route");
        g.throughput(Throughput::Elements(1));
        for n in [10usize, 1_000, 100_000] {
            let text = synthetic_config(n);
            let loaded =
                rules::load("bench.json", text.as_bytes()).expect("synthetic config is valid");
            let snap = loaded.snapshot;
            let mut headers = HeaderMap::new();
            // Rule 5k+1 (a split) is (app k, grab): the request below hits a split.
            headers.insert("x-app-id", format!("app{}", n / 10).parse().unwrap());
            headers.insert("x-user-id", "user-12345".parse().unwrap());
            let method = Method::POST;
            g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    let c = snap.classify(RequestParts {
                        method: &method,
                        path: "/envelopes/42/grab",
                        query: None,
                        headers: &headers,
                    });
                    let r = snap.route(&RouteInput {
                        m: MatchInput {
                            app: c.app.as_deref(),
                            interface: c.interface,
                            user: c.user.as_deref(),
                            headers: &headers,
                            params: &[],
                        },
                        client_ip: None,
                        random: 0,
                        pair: Default::default(),
                    });
                    black_box(r.map(|r| r.upstream))
                })
            });
        }
        g.finish();
    }
}

mod governance {
    use std::hint::black_box;
    use std::sync::Arc;

    use criterion::{Criterion, Throughput};
    use http::{HeaderMap, Method};
    use rules::RequestParts;
    use tidegate::conn::ConnInfo;
    use tidegate::metrics::Metrics;
    use tidegate::pipeline::decide::{Action, Mode, decide};
    use tidegate::runtime::Runtime;
    use tidegate_benches::synthetic_config;

    /// Tracked keys in the per-user limiter before measuring.
    const KEYS: usize = 1_000_000;

    /// One full decision, by the gateway's own `decide`: classify, admission (off), three
    /// limits (per user, per app, global for the interface; all admit), the fallback check
    /// (a 0.0001% fallback on the same requests, so the user's bucket is computed), routing
    /// and the breaker phase, against 1,000 route rules, with 1,000,000 keys tracked by the
    /// per-user limiter. Metric counters included; the clock is governor's default (quanta).
    pub(crate) fn bench(c: &mut Criterion) {
        let mut config: serde_json::Value =
            serde_json::from_str(&synthetic_config(1_000)).expect("valid JSON");
        config["limits"] = serde_json::json!([
            { "name": "grab-per-user", "match": { "interfaces": ["grab"] },
              "key": ["user"], "rate": "1000000/s" },
            { "name": "grab-per-app", "match": { "interfaces": ["grab"] },
              "key": ["app"], "rate": "1000000000/s" },
            { "name": "grab-global", "match": { "interfaces": ["grab"] },
              "rate": "1000000000/s" }
        ]);
        config["fallbacks"] = serde_json::json!([
            { "name": "grab-sample", "match": { "interfaces": ["grab"] },
              "fraction": "0.0001%", "response": {} }
        ]);
        let text = serde_json::to_vec(&config).expect("serializes");
        let snap = rules::load("bench.json", &text)
            .expect("valid config")
            .snapshot;
        let rt = Runtime::offline(snap, None, &Arc::new(Metrics::new()));
        let conn = ConnInfo::new("10.0.0.1:40000".parse().unwrap(), false);
        let method = Method::POST;
        let path = "/envelopes/42/grab";
        let decide = |headers: &HeaderMap| {
            let req = RequestParts {
                method: &method,
                path,
                query: None,
                headers,
            };
            match decide(
                &rt,
                req,
                &conn,
                Mode::Serve {
                    draw: 0,
                    at: tidegate::clock::Stamp::now(),
                },
            )
            .action
            {
                Action::Forward { upstream, .. } => Ok(upstream),
                Action::Answer(r, _) => Err(r.status()),
                Action::NoRoute => Err(http::StatusCode::NOT_FOUND),
            }
        };
        let request = |i: usize| {
            let mut h = HeaderMap::new();
            h.insert("x-app-id", format!("app{}", i % 200).parse().unwrap());
            h.insert("x-user-id", format!("user-{i}").parse().unwrap());
            h
        };
        for i in 0..KEYS {
            black_box(decide(&request(i)).ok());
        }
        assert_eq!(rt.governors.limiters.rules[0].tracked_keys(), KEYS);
        // Requests of 4,096 users spread over the million.
        let requests: Vec<HeaderMap> = (0..4096).map(|i| request(i * 241 % KEYS)).collect();

        let mut g = c.benchmark_group("decide/full");
        g.throughput(Throughput::Elements(1));
        let mut n = 0usize;
        g.bench_function("classify+3 limits+fallback+route, 1M keys", |b| {
            b.iter(|| {
                n = (n + 1) % requests.len();
                black_box(decide(&requests[n]))
            })
        });
        g.finish();
    }
}

mod overload {
    use std::hint::black_box;

    use criterion::{Criterion, Throughput};
    use rules::overload::{UserKey, user_priority};
    use tidegate::metrics::{Metrics, Name};
    use tidegate::overload::Overload;

    /// The overload admission decision as the gateway makes it: the user's priority (XXH3
    /// of the user ID under the epoch salt), the histogram count, the level check, and for
    /// a refusal the 503 with `Retry-After` (the whole local answer, before hyper writes
    /// it). Users cycle over 100,000 IDs.
    pub(crate) fn bench(c: &mut Criterion) {
        let config = serde_json::json!({
            "schema_version": 1,
            "interfaces": [
                { "name": "grab", "method": "POST", "path": "/envelopes/{id}/grab" },
                { "name": "share", "method": "POST", "path": "/envelopes/{id}/share" }
            ],
            "upstreams": { "up": { "endpoints": ["127.0.0.1:9"] } },
            "routes": [{ "name": "default", "upstream": "up" }],
            "overload": {
                "enabled": true,
                "upstreams": { "up": { "max_in_flight": 100 } },
                "interfaces": { "grab": { "priority": "critical" }, "share": { "priority": "low" } },
                "admission": { "floor": "normal" }
            }
        });
        let loaded = rules::load("bench.json", config.to_string().as_bytes()).expect("valid");
        let snap = loaded.snapshot;
        let overload = Overload::build(&snap, None, None);
        let metrics = Metrics::new();
        let names: Vec<Name> = snap
            .interfaces
            .iter()
            .map(|i| Name::from(&*i.name))
            .collect();
        let users: Vec<String> = (0..100_000).map(|i| format!("user-{i}")).collect();
        let (grab, share) = (
            snap.interfaces[0].name.clone(),
            snap.interfaces[1].name.clone(),
        );
        assert_eq!((&*grab, &*share), ("grab", "share"));
        let ids = [Some(rules::InterfaceId(0)), Some(rules::InterfaceId(1))];

        let mut g = c.benchmark_group("overload");
        g.throughput(Throughput::Elements(1));
        let mut n = 0usize;
        g.bench_function("user_priority", |b| {
            b.iter(|| {
                n = (n + 1) % users.len();
                black_box(user_priority(UserKey::User(&users[n]), 498_727, 128))
            })
        });
        g.bench_function("admit (passes: critical above the floor)", |b| {
            b.iter(|| {
                n = (n + 1) % users.len();
                let a = overload.admit(ids[0], UserKey::User(&users[n]), &names, &metrics);
                assert!(a);
                black_box(a)
            })
        });
        g.bench_function("admit (refused: low under the floor, 503 built)", |b| {
            b.iter(|| {
                n = (n + 1) % users.len();
                let a = overload.admit(ids[1], UserKey::User(&users[n]), &names, &metrics);
                assert!(!a);
                black_box(overload.refusal())
            })
        });
        g.finish();
    }
}

mod reload {
    use std::hint::black_box;
    use std::time::Duration;

    use criterion::{BenchmarkId, Criterion};
    use std::sync::Arc;

    use tidegate::metrics::Metrics;
    use tidegate::runtime::{Runtime, Secrets};
    use tidegate_benches::synthetic_config;

    /// The work a reload does off the request path before its swap: read the file's text
    /// (parse → validate → compile) and build the runtime from it, carrying limiter,
    /// breaker, overload and counter state over from the live one. The file watcher's
    /// debounce is not in it: `reload-bench` times file event to swap end to end.
    pub(crate) fn bench(c: &mut Criterion) {
        let metrics = Arc::new(Metrics::new());
        let mut g = c.benchmark_group("reload/load+build");
        for n in [10usize, 1_000, 100_000] {
            let text = synthetic_config(n);
            let live = Runtime::build(
                rules::load("bench.json", text.as_bytes())
                    .expect("synthetic config is valid")
                    .snapshot,
                Secrets::default(),
                &|_| None,
                None,
                &metrics,
            )
            .expect("runtime builds");
            if n >= 100_000 {
                g.sample_size(10).measurement_time(Duration::from_secs(10));
            }
            g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    let loaded = rules::load("bench.json", text.as_bytes())
                        .expect("synthetic config is valid");
                    black_box(
                        Runtime::build(
                            loaded.snapshot,
                            Secrets::default(),
                            &|_| None,
                            Some(&live),
                            &metrics,
                        )
                        .expect("runtime builds"),
                    )
                })
            });
        }
        g.finish();
    }
}

mod jwt {
    use std::hint::black_box;
    use std::sync::Arc;
    use std::time::{SystemTime, UNIX_EPOCH};

    use criterion::{Criterion, Throughput};
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use rules::identity::{ClaimHeader, CompiledJwt, TokenSource};
    use tidegate::jwt::{KeySet, Verifier, algorithms};

    // Test-only key pairs (`tests/fixtures/jwt`, made with `openssl genpkey`): RSA 2048 and
    // P-256.
    const RSA_1: &[u8] = include_bytes!("../../tests/fixtures/jwt/rsa-1.pem");
    const EC_1: &[u8] = include_bytes!("../../tests/fixtures/jwt/ec-1.pem");

    /// One token's verification, by signature and claims (`uncached`: `verify_uncached`,
    /// what every new token costs) and from the cache of verified tokens (`cached`: `verify`
    /// of a token verified once before, what a client's repeated token costs), for ES256
    /// (P-256) and RS256 (RSA 2048). One verifier with both keys (`kid` chosen), issuers and
    /// audiences checked, user and app IDs read from `sub` and `azp`; the token's `exp` is an
    /// hour ahead.
    pub(crate) fn bench(c: &mut Criterion) {
        let settings = CompiledJwt {
            jwks_file: "jwks.json".into(),
            from: TokenSource::Bearer,
            algorithms: ["RS256", "ES256"].map(Into::into).to_vec(),
            issuers: vec!["https://id.example".into()],
            audiences: vec!["tidegate".into()],
            leeway_s: 30,
            required: true,
            max_token_bytes: 4096,
            cache_entries: 10_000,
            user: Some(ClaimHeader {
                claim: "sub".into(),
                header: http::HeaderName::from_static("x-user-id"),
            }),
            app: Some(ClaimHeader {
                claim: "azp".into(),
                header: http::HeaderName::from_static("x-app-id"),
            }),
        };
        let rsa = EncodingKey::from_rsa_pem(RSA_1).expect("test RSA key");
        let ec = EncodingKey::from_ec_pem(EC_1).expect("test EC key");
        let jwk = |key: &EncodingKey, alg: Algorithm, kid: &str| -> Jwk {
            let mut j = Jwk::from_encoding_key(key, alg).expect("public JWK");
            j.common.key_id = Some(kid.to_owned());
            j
        };
        let jwks = serde_json::to_vec(&JwkSet {
            keys: vec![
                jwk(&rsa, Algorithm::RS256, "rsa-1"),
                jwk(&ec, Algorithm::ES256, "ec-1"),
            ],
        })
        .expect("serializes");
        let keys = KeySet::parse(&jwks, &algorithms(&settings)).expect("valid JWKS");
        let verifier = Verifier::build(&settings, Arc::new(keys), None);

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let claims = serde_json::json!({
            "sub": "user-12345", "azp": "app7", "iss": "https://id.example", "aud": "tidegate",
            "iat": now, "exp": now + 3600,
        });
        let mint = |alg: Algorithm, kid: &str, key: &EncodingKey| {
            let mut h = Header::new(alg);
            h.kid = Some(kid.to_owned());
            jsonwebtoken::encode(&h, &claims, key).expect("signs")
        };

        let mut g = c.benchmark_group("identity/jwt");
        g.throughput(Throughput::Elements(1));
        for (name, token) in [
            ("es256", mint(Algorithm::ES256, "ec-1", &ec)),
            ("rs256", mint(Algorithm::RS256, "rsa-1", &rsa)),
        ] {
            let (ids, _) = verifier.verify_uncached(&token).expect("token verifies");
            assert_eq!(ids.user.expect("user ID"), "user-12345");
            g.bench_function(format!("{name}/uncached"), |b| {
                b.iter(|| black_box(verifier.verify_uncached(black_box(&token))))
            });
            // One warm-up call puts the token in the cache; every measured call hits it.
            let before = verifier.cached();
            verifier.verify(&token, now).expect("token verifies");
            assert_eq!(verifier.cached(), before + 1);
            g.bench_function(format!("{name}/cached"), |b| {
                b.iter(|| black_box(verifier.verify(black_box(&token), now)))
            });
            assert_eq!(verifier.cached(), before + 1);
        }
        g.finish();
    }
}

fn all(c: &mut Criterion) {
    routing::bench(c);
    governance::bench(c);
    overload::bench(c);
    reload::bench(c);
    jwt::bench(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
