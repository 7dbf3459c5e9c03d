//! Validation of `upstreams.NAME.tls` and `protocol`.

use crate::model::Protocol;
use crate::source::parse;

use super::messages;

fn with(up: &str, route: &str) -> crate::model::Config {
    let text = format!(
        r#"{{"schema_version": 1, "upstreams": {{"v1": {up}}},
            "routes": [{route}]}}"#
    );
    parse("t.json", text.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

const ROUTE: &str = r#"{"name": "d", "upstream": "v1"}"#;

/// A full `tls` with `http2` compiles to typed values; without them an upstream is
/// cleartext HTTP/1.1.
#[test]
fn fields_compile() {
    let c = with(
        r#"{"endpoints": ["10.0.0.1:443"], "protocol": "http2",
            "tls": {"ca_file": "ca.pem", "server_name": "api.internal",
                    "client_cert_file": "c.pem", "client_key_file": "k.pem"}}"#,
        ROUTE,
    );
    assert_eq!(messages(&c), Vec::<String>::new());
    let loaded = crate::load("t.json", serde_json::to_vec(&c).unwrap().as_slice()).unwrap();
    let u = &loaded.snapshot.upstreams[0];
    assert_eq!(u.protocol, Protocol::Http2);
    let t = u.tls.as_ref().expect("tls");
    assert_eq!(t.ca_file.as_deref(), Some("ca.pem"));
    assert_eq!(t.server_name.as_deref(), Some("api.internal"));
    assert_eq!(t.client_identity, Some(("c.pem".into(), "k.pem".into())));

    let c = with(r#"{"endpoints": ["10.0.0.1:80"]}"#, ROUTE);
    let loaded = crate::load("t.json", serde_json::to_vec(&c).unwrap().as_slice()).unwrap();
    assert_eq!(loaded.snapshot.upstreams[0].tls, None);
    assert_eq!(loaded.snapshot.upstreams[0].protocol, Protocol::Http1);
    // `tls: {}` is valid: the system roots and each endpoint's name.
    let c = with(r#"{"endpoints": ["api.internal:443"], "tls": {}}"#, ROUTE);
    assert_eq!(messages(&c), Vec::<String>::new());
}

/// Every problem is reported at its own path: half a client identity, empty paths, a bad
/// server name, tls on the embedded backend, health checks and upgrades it cannot serve.
#[test]
fn problems_reported_at_their_paths() {
    let c = with(
        r#"{"endpoints": ["10.0.0.1:443"], "health_check": {"path": "/h"},
            "tls": {"ca_file": " ", "server_name": "bad name!", "client_cert_file": "c.pem"}}"#,
        r#"{"name": "d", "upstream": "v1", "upgrade": ["websocket"]}"#,
    );
    let m = messages(&c);
    for want in [
        "upstreams.v1.tls.ca_file: path must not be empty",
        "upstreams.v1.tls.client_key_file: client_cert_file is given without its key",
        "upstreams.v1.tls.server_name: \"bad name!\" is not a DNS name or IP address",
        "upstreams.v1.health_check: active health checks speak cleartext HTTP/1.1",
        "routes[0].upstream: upstream \"v1\" uses tls or http2",
    ] {
        assert!(m.iter().any(|x| x.starts_with(want)), "{want}\n{m:#?}");
    }
    assert_eq!(m.len(), 5, "{m:#?}");

    let c = with(r#"{"kind": "embedded", "protocol": "http2"}"#, ROUTE);
    let m = messages(&c);
    assert!(
        m.iter()
            .any(|x| x.starts_with("upstreams.v1.protocol: an embedded upstream")),
        "{m:#?}"
    );
    // An IP address is a valid server name (checked against the certificate's IP SANs).
    let c = with(
        r#"{"endpoints": ["10.0.0.1:443"], "tls": {"server_name": "10.0.0.1"}}"#,
        ROUTE,
    );
    assert_eq!(messages(&c), Vec::<String>::new());
}

/// Unknown fields and protocols are refused by the parser, not ignored.
#[test]
fn unknown_fields_refused() {
    for up in [
        r#"{"endpoints": ["a:1"], "tls": {"verify": false}}"#,
        r#"{"endpoints": ["a:1"], "protocol": "http3"}"#,
    ] {
        let text =
            format!(r#"{{"schema_version": 1, "upstreams": {{"v1": {up}}}, "routes": [{ROUTE}]}}"#);
        assert!(parse("t.json", text.as_bytes()).is_err(), "{up}");
    }
}
