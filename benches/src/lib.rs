//! Shared helpers for Tidegate's benchmarks: synthetic configs of a given size, an
//! in-process backend, and the pressure-test driver ([`pressure`]).

pub mod pressure;

use std::convert::Infallible;
use std::net::SocketAddr;

/// What [`hello_backend`] answers every request with.
pub const HELLO: &[u8] = b"hello, world\n";

/// An HTTP/1.1 keep-alive backend in this process on a port of 127.0.0.1 chosen now,
/// answering every request with 200 and [`HELLO`]; it serves until the runtime ends.
pub async fn hello_backend() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let body = http_body_util::Full::new(bytes::Bytes::from_static(HELLO));
                    Ok::<_, Infallible>(http::Response::new(body))
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A valid config (compact: 100,000 rules fit the 16 MiB file limit) with `n`
/// route rules spread over apps and interfaces (one rule per (app,
/// interface) pair, 5 interfaces; odd rules are 5% splits), plus a default route.
pub fn synthetic_config(n: usize) -> String {
    const IFACES: [(&str, &str, &str); 5] = [
        ("create", "POST", "/envelopes"),
        ("grab", "POST", "/envelopes/{id}/grab"),
        ("open", "GET", "/envelopes/{id}"),
        ("wallet", "GET", "/users/{id}/wallet"),
        ("share", "POST", "/envelopes/{id}/share"),
    ];
    let interfaces: Vec<String> = IFACES
        .iter()
        .map(|(n, m, p)| format!(r#"{{"name": "{n}", "method": "{m}", "path": "{p}"}}"#))
        .collect();
    let mut routes = vec![r#"{"name": "default", "upstream": "v1"}"#.to_owned()];
    for i in 0..n {
        let app = i / IFACES.len();
        let iface = IFACES[i % IFACES.len()].0;
        // Odd rules are 5% canary splits (the request the bench sends hits one), even
        // rules direct routes.
        routes.push(if i % 2 == 1 {
            format!(
                r#"{{"name":"r{i}","match":{{"apps":["app{app}"],"interfaces":["{iface}"]}},"split":[{{"upstream":"v2","weight":"5%"}},{{"upstream":"v1","weight":"rest"}}]}}"#
            )
        } else {
            format!(
                r#"{{"name":"r{i}","match":{{"apps":["app{app}"],"interfaces":["{iface}"]}},"upstream":"v1"}}"#
            )
        });
    }
    format!(
        r#"{{"schema_version": 1,
  "interfaces": [{}],
  "upstreams": {{"v1": {{"endpoints": ["127.0.0.1:9000"]}}, "v2": {{"endpoints": ["127.0.0.1:9001"]}}}},
  "routes": [{}]}}"#,
        interfaces.join(", "),
        routes.join(",")
    )
}

/// The gateway config of the peer comparison (`benches/peers/run.sh`): one listener, a
/// static upstream `v1` (and its canary twin `v2`, the same backend), access log off.
///
/// With `rules`, the realistic rule set: 1,000 route rules over (app, interface) pairs, every
/// odd one a 5% canary split to `v2`; 1,000 limits, one per (app, interface) pair; a
/// per-user limit keyed by user ID (10/s, burst 10: the comparison's 100,000 users never
/// reach it, so every request is counted but none refused); a global limit in dry run (one
/// key for all requests, never reached); a circuit breaker on `v1` (closed: every request
/// routed there takes a permit and records its outcome); and a fallback on `share` the
/// load never hits. The comparison's request, `GET /envelopes/{id}` as `app7`, matches a
/// split rule, its pair's limit, the per-user limit and the dry-run global limit.
pub fn peer_config(rules: bool, listen: &str, admin: &str, backend: &str) -> String {
    const IFACES: [(&str, &str, &str); 5] = [
        ("create", "POST", "/envelopes"),
        ("grab", "POST", "/envelopes/{id}/grab"),
        ("open", "GET", "/envelopes/{id}"),
        ("wallet", "GET", "/users/{id}/wallet"),
        ("share", "POST", "/envelopes/{id}/share"),
    ];
    let interfaces: Vec<String> = IFACES
        .iter()
        .map(|(n, m, p)| format!(r#"{{"name": "{n}", "method": "{m}", "path": "{p}"}}"#))
        .collect();
    let mut routes = vec![r#"{"name": "default", "upstream": "v1"}"#.to_owned()];
    let mut limits = Vec::new();
    let mut fallbacks = Vec::new();
    let mut breakers = Vec::new();
    if rules {
        for i in 0..1000 {
            let app = i / IFACES.len();
            let iface = IFACES[i % IFACES.len()].0;
            routes.push(if i % 2 == 1 {
                format!(
                    r#"{{"name":"r{i}","match":{{"apps":["app{app}"],"interfaces":["{iface}"]}},"split":[{{"upstream":"v2","weight":"5%"}},{{"upstream":"v1","weight":"rest"}}]}}"#
                )
            } else {
                format!(
                    r#"{{"name":"r{i}","match":{{"apps":["app{app}"],"interfaces":["{iface}"]}},"upstream":"v1"}}"#
                )
            });
            limits.push(format!(
                r#"{{"name":"l{i}","match":{{"apps":["app{app}"],"interfaces":["{iface}"]}},"rate":"1000000/s"}}"#
            ));
        }
        limits.push(r#"{"name":"per-user","key":["user"],"rate":"10/s","burst":10}"#.to_owned());
        limits.push(r#"{"name":"global-dry","rate":"1000000/s","mode":"dry_run"}"#.to_owned());
        breakers.push(
            r#"{"name":"v1-breaker","upstream":"v1","window_ms":10000,"min_calls":100,"error_ratio":"50%","open_ms":5000,"response":{"status":503}}"#
                .to_owned(),
        );
        fallbacks.push(
            r#"{"name":"share-off","match":{"interfaces":["share"]},"response":{"status":200,"headers":{"x-tidegate-fallback":"1"}}}"#
                .to_owned(),
        );
    }
    format!(
        r#"{{"schema_version": 1,
  "server": {{"listeners": [{{"name": "public", "address": "{listen}"}}],
             "admin": {{"address": "{admin}"}},
             "access_log": {{"enabled": false, "format": "json"}}}},
  "identity": {{"app": {{"header": "x-app-id"}}, "user": {{"header": "x-user-id"}}}},
  "interfaces": [{}],
  "upstreams": {{"v1": {{"endpoints": ["{backend}"]}}, "v2": {{"endpoints": ["{backend}"]}}}},
  "routes": [{}],
  "limits": [{}],
  "fallbacks": [{}],
  "breakers": [{}]}}
"#,
        interfaces.join(", "),
        routes.join(
            ",
  "
        ),
        limits.join(
            ",
  "
        ),
        fallbacks.join(
            ",
  "
        ),
        breakers.join(
            ",
  "
        ),
    )
}

#[cfg(test)]
mod tests {
    /// The synthetic configs are valid at every size the benches use.
    #[test]
    fn synthetic_configs_load() {
        for n in [10, 1000] {
            let text = super::synthetic_config(n);
            let l = rules::load("s.json", text.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(l.snapshot.routes.len(), n + 1);
        }
    }

    /// Both peer configs load; the realistic one has its 1,001 routes.
    #[test]
    fn peer_configs_load() {
        for rules in [false, true] {
            let text = super::peer_config(rules, "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:9");
            let l = rules::load("p.json", text.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(l.snapshot.routes.len(), if rules { 1001 } else { 1 });
        }
    }
}
