//! Shared helpers for Tidegate's benchmarks: synthetic configs of a given size, and the
//! pressure-test driver ([`pressure`]).

pub mod pressure;

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
}
