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

fn all(c: &mut Criterion) {
    routing::bench(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
