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
                        },
                        client_ip: None,
                        random: 0,
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
    use std::net::IpAddr;

    use criterion::{Criterion, Throughput};
    use http::{HeaderMap, Method};
    use rules::{MatchInput, RequestParts, RouteInput};
    use tidegate::govern::{Governors, Verdict};
    use tidegate::metrics::Metrics;
    use tidegate_benches::synthetic_config;

    /// Tracked keys in the per-user limiter before measuring.
    const KEYS: usize = 1_000_000;

    /// One full decision as the gateway makes it: classify, three limits (per user, per
    /// app, global for the interface; all admit), the fallback check (a 0.0001% fallback
    /// on the same requests, so the user's bucket is computed) and routing, against 1,000
    /// route rules, with 1,000,000 keys tracked by the per-user limiter. Metric counters
    /// included; the clock is governor's default (quanta).
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
        let gov = Governors::build(&snap, None);
        let metrics = Metrics::new();
        let method = Method::POST;
        let path = "/envelopes/42/grab";
        let decide = |headers: &HeaderMap| {
            let c = snap.classify(RequestParts {
                method: &method,
                path,
                query: None,
                headers,
            });
            let input = RouteInput {
                m: MatchInput {
                    app: c.app.as_deref(),
                    interface: c.interface,
                    user: c.user.as_deref(),
                    headers,
                },
                client_ip: Some(IpAddr::from([10, 0, 0, 1])),
                random: 0,
            };
            match gov.before_route(&snap, &input, &metrics) {
                Verdict::Local(r) => Err(r.status()),
                Verdict::Proceed => Ok(snap.route(&input).map(|r| r.upstream)),
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
        assert_eq!(gov.limiters.rules[0].tracked_keys(), KEYS);
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

fn all(c: &mut Criterion) {
    routing::bench(c);
    governance::bench(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
