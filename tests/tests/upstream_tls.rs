//! Upstream TLS and HTTP/2: real TLS upstreams with certificates made in the test. The
//! gateway verifies every upstream certificate: a wrong CA or a wrong server name fails the
//! handshake (502 `upstream_tls`, counted, the upstream never served), mutual TLS presents
//! the configured client certificate, and `protocol: http2` reaches the upstream as HTTP/2,
//! by prior knowledge in cleartext and by ALPN over TLS.

use std::path::Path;

use serde_json::{Value, json};
use tidegate::control::reload::ReloadOutcome;
use tidegate_tests::{
    TIMEOUT, TestCert, Upstream, api, config, get, h1_client, h2c_client, metric_value, set,
    test_cert, test_cert_for, tls_server,
};

/// Write `config` as `tidegate.json` in `dir` and start a gateway from the file (so the
/// files its `tls` sections name are read beside it).
async fn start_in(dir: &Path, config: &Value) -> anyhow::Result<api::Server> {
    let file = dir.join("tidegate.json");
    std::fs::write(&file, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    tokio::time::timeout(TIMEOUT, api::start_from_file(&file))
        .await
        .expect("starts in time")
}

/// Copy a certificate's PEM into `dir` as `name` (what the config's `ca_file` names).
fn put_cert(dir: &Path, name: &str, cert: &TestCert) {
    std::fs::copy(&cert.cert_path, dir.join(name)).unwrap();
}

/// `tidegate_upstream_errors_total` of `upstream` for `upstream_tls`.
fn tls_errors(server: &api::Server, upstream: &str) -> f64 {
    let text = server.live.metrics.encode();
    let series =
        format!(r#"tidegate_upstream_errors_total{{upstream="{upstream}",error="upstream_tls"}}"#);
    metric_value(&text, &series).unwrap_or(0.0)
}

/// One route per example interface, each to its own upstream.
fn routes(c: &mut Value, by_interface: &[(&str, &str)]) {
    let mut rules: Vec<Value> = by_interface
        .iter()
        .map(|(itf, up)| json!({ "name": format!("r-{itf}"), "match": { "interfaces": [itf] }, "upstream": up }))
        .collect();
    rules.push(json!({ "name": "default", "upstream": by_interface[0].1 }));
    set(c, "routes", Value::Array(rules));
}

/// The right CA and name pass; a CA that did not sign the certificate, or a name the
/// certificate does not carry, fail the handshake: 502 `upstream_tls`, counted, and the
/// upstream serves nothing. An IP endpoint without `server_name` is verified against the
/// certificate's IP addresses.
#[tokio::test]
async fn certificates_are_verified() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert();
    let other = test_cert();
    let ip_cert = test_cert_for(&["127.0.0.1"]);
    put_cert(dir.path(), "ca.pem", &cert);
    put_cert(dir.path(), "other-ca.pem", &other);
    put_cert(dir.path(), "ip-ca.pem", &ip_cert);
    let good = Upstream::start_tls(tls_server(&cert, &[b"http/1.1"], None)).await;
    let ip = Upstream::start_tls(tls_server(&ip_cert, &[b"http/1.1"], None)).await;

    let mut c = config(&[good.addr]);
    let tls = |ca: &str, name: Option<&str>| {
        let mut t = json!({ "ca_file": ca });
        if let Some(n) = name {
            t["server_name"] = json!(n);
        }
        t
    };
    set(&mut c, "upstreams/up/tls", tls("ca.pem", Some("localhost")));
    for (name, addr, t) in [
        ("bad_ca", good.addr, tls("other-ca.pem", Some("localhost"))),
        ("bad_name", good.addr, tls("ca.pem", Some("other.example"))),
        ("by_ip", ip.addr, tls("ip-ca.pem", None)),
        ("ip_no_san", good.addr, tls("ca.pem", None)),
    ] {
        set(
            &mut c,
            &format!("upstreams/{name}"),
            json!({ "endpoints": [addr.to_string()], "tls": t }),
        );
    }
    routes(
        &mut c,
        &[
            ("open", "up"),
            ("grab", "bad_ca"),
            ("create", "bad_name"),
            ("health", "by_ip"),
        ],
    );
    c["interfaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "other", "method": "GET", "path": "/other" }));
    c["routes"].as_array_mut().unwrap().insert(
        0,
        json!({ "name": "r-other", "match": { "interfaces": ["other"] }, "upstream": "ip_no_san" }),
    );
    let server = start_in(dir.path(), &c).await.expect("starts");
    let gw = server.listen_addrs[0];
    let client = h1_client();

    let r = get(&client, gw, "/envelopes/1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/1.1");
    assert_eq!(good.hits(), 1);
    // Nine more, each from a new client connection: the pooled TLS connection is reused,
    // so the handshake was paid once.
    for _ in 0..9 {
        assert_eq!(get(&h1_client(), gw, "/envelopes/1").await.status, 200);
    }
    assert_eq!(good.hits(), 10);
    assert_eq!(
        good.connections(),
        1,
        "one TLS connection for ten client connections"
    );

    let r = get(&client, gw, "/healthz").await;
    assert_eq!(
        r.status,
        200,
        "an IP SAN verifies an IP endpoint: {}",
        r.text()
    );
    assert_eq!(ip.hits(), 1);

    for (method, path, upstream) in [
        ("POST", "/envelopes/1/grab", "bad_ca"),
        ("POST", "/envelopes", "bad_name"),
        ("GET", "/other", "ip_no_san"),
    ] {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{gw}{path}"))
            .body(tidegate_tests::full(""))
            .unwrap();
        let r = tidegate_tests::send(&client, req).await;
        assert_eq!(r.status, 502, "{upstream}: {}", r.text());
        assert_eq!(r.json()["error"], "upstream_tls", "{upstream}");
        assert_eq!(tls_errors(&server, upstream), 1.0, "{upstream}");
    }
    assert_eq!(good.hits(), 10, "a failed handshake serves nothing");
    assert!(server.shutdown().await);
}

/// Mutual TLS: an upstream that requires a client certificate serves the gateway that
/// presents the configured one, and refuses the one that presents none.
#[tokio::test]
async fn client_certificate_is_presented() {
    let dir = tempfile::tempdir().unwrap();
    let server_cert = test_cert();
    let client_cert = test_cert_for(&["tidegate.client"]);
    put_cert(dir.path(), "ca.pem", &server_cert);
    put_cert(dir.path(), "client.pem", &client_cert);
    std::fs::copy(&client_cert.key_path, dir.path().join("client.key")).unwrap();
    let up =
        Upstream::start_tls(tls_server(&server_cert, &[b"http/1.1"], Some(&client_cert))).await;

    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "upstreams/up/tls",
        json!({ "ca_file": "ca.pem", "server_name": "localhost",
                "client_cert_file": "client.pem", "client_key_file": "client.key" }),
    );
    set(
        &mut c,
        "upstreams/anonymous",
        json!({ "endpoints": [up.addr.to_string()],
                "tls": { "ca_file": "ca.pem", "server_name": "localhost" } }),
    );
    routes(&mut c, &[("open", "up"), ("grab", "anonymous")]);
    let server = start_in(dir.path(), &c).await.expect("starts");
    let gw = server.listen_addrs[0];
    let client = h1_client();

    let r = get(&client, gw, "/envelopes/1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits(), 1);

    let r = tidegate_tests::post(&client, gw, "/envelopes/1/grab", "").await;
    assert_eq!(r.status, 502, "no client certificate: {}", r.text());
    assert_eq!(
        up.hits(),
        1,
        "the upstream served nothing without a client certificate"
    );
    assert!(server.shutdown().await);
}

/// A `tls` whose files are missing or garbled refuses the load, the field named; on a
/// reload the old rules (and their TLS client) stay live.
#[tokio::test]
async fn bad_files_refuse_the_load_and_keep_the_old_rules() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert();
    let up = Upstream::start_tls(tls_server(&cert, &[b"http/1.1"], None)).await;
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "upstreams/up/tls",
        json!({ "ca_file": "ca.pem", "server_name": "localhost" }),
    );
    let e = start_in(dir.path(), &c).await.expect_err("no ca.pem yet");
    assert!(
        format!("{e:#}").contains("upstreams.up.tls.ca_file"),
        "{e:#}"
    );

    put_cert(dir.path(), "ca.pem", &cert);
    let server = start_in(dir.path(), &c).await.expect("starts");
    let gw = server.listen_addrs[0];
    assert_eq!(get(&h1_client(), gw, "/envelopes/1").await.status, 200);

    std::fs::write(
        dir.path().join("ca.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let reloader = server.reloader.clone().expect("started from a file");
    let outcome = reloader.reload("test", std::time::Instant::now()).await;
    assert!(matches!(outcome, ReloadOutcome::Failed), "{outcome:?}");
    let r = get(&h1_client(), gw, "/envelopes/1").await;
    assert_eq!(r.status, 200, "the old TLS client stays live: {}", r.text());
    assert!(server.shutdown().await);
}

/// `protocol: http2` reaches the upstream as HTTP/2: in cleartext by prior knowledge, over
/// TLS by ALPN h2, for requests from HTTP/1.1 and HTTP/2 client connections alike, all on
/// one connection per endpoint (concurrent calls multiplexed). A
/// TLS upstream that does not agree to h2 fails clearly (502 `upstream_tls`).
#[tokio::test]
async fn http2_by_prior_knowledge_and_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert();
    put_cert(dir.path(), "ca.pem", &cert);
    let h2c = Upstream::start().await;
    let h2tls = Upstream::start_tls(tls_server(&cert, &[b"h2", b"http/1.1"], None)).await;
    let no_alpn = Upstream::start_tls(tls_server(&cert, &[], None)).await;

    let mut c = config(&[h2c.addr]);
    set(&mut c, "upstreams/up/protocol", json!("http2"));
    let tls = json!({ "ca_file": "ca.pem", "server_name": "localhost" });
    set(
        &mut c,
        "upstreams/tls_h2",
        json!({ "endpoints": [h2tls.addr.to_string()], "protocol": "http2", "tls": tls }),
    );
    set(
        &mut c,
        "upstreams/tls_h1_only",
        json!({ "endpoints": [no_alpn.addr.to_string()], "protocol": "http2", "tls": tls }),
    );
    routes(
        &mut c,
        &[
            ("open", "up"),
            ("grab", "tls_h2"),
            ("create", "tls_h1_only"),
        ],
    );
    let server = start_in(dir.path(), &c).await.expect("starts");
    let gw = server.listen_addrs[0];

    // From three HTTP/1.1 client connections and one h2c one.
    for client in [h1_client(), h1_client(), h1_client(), h2c_client()] {
        let r = get(&client, gw, "/envelopes/7?x=1").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["version"], "HTTP/2.0");
        assert_eq!(r.json()["path"], "/envelopes/7?x=1");
        let r = tidegate_tests::post(&client, gw, "/envelopes/7/grab", "body").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["version"], "HTTP/2.0");
        assert_eq!(r.json()["body_len"], 4);
    }
    assert!(
        h2c.seen()
            .iter()
            .all(|s| s.version == http::Version::HTTP_2)
    );
    assert_eq!(h2tls.hits(), 4);

    // Concurrent requests from 16 more client connections, each held 100 ms by the
    // upstream so that they overlap: all multiplexed on the one connection per endpoint.
    let calls = (0..16).map(|_| async {
        let r = get(&h1_client(), gw, "/envelopes/8?sleep_ms=100").await;
        assert_eq!(r.status, 200, "{}", r.text());
    });
    futures_util::future::join_all(calls).await;
    assert!(h2c.most_concurrent() > 1, "the calls overlapped");
    assert_eq!(
        h2c.connections(),
        1,
        "one HTTP/2 connection for every request"
    );
    assert_eq!(h2tls.connections(), 1);

    let r = tidegate_tests::post(&h1_client(), gw, "/envelopes", "").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_tls");
    assert_eq!(no_alpn.hits(), 0);
    assert_eq!(tls_errors(&server, "tls_h1_only"), 1.0);
    assert!(server.shutdown().await);
}

/// A CA bundle replaced on disk is picked up by the watcher without a signal: an upstream
/// refused under the wrong CA (502 `upstream_tls`) is served once the right one is written.
#[tokio::test]
async fn replaced_ca_file_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert();
    let other = test_cert();
    put_cert(dir.path(), "ca.pem", &other);
    let up = Upstream::start_tls(tls_server(&cert, &[b"http/1.1"], None)).await;
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "upstreams/up/tls",
        json!({ "ca_file": "ca.pem", "server_name": "localhost" }),
    );
    let server = start_in(dir.path(), &c).await.expect("starts");
    let gw = server.listen_addrs[0];
    let client = h1_client();
    let r = get(&client, gw, "/envelopes/1").await;
    assert_eq!(r.status, 502, "{}", r.text());

    // Written whole then renamed in, as deployment tools do.
    std::fs::copy(&cert.cert_path, dir.path().join(".ca.pem.tmp")).unwrap();
    std::fs::rename(dir.path().join(".ca.pem.tmp"), dir.path().join("ca.pem")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = get(&client, gw, "/envelopes/1").await;
        if r.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never picked up: {}",
            r.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(up.hits(), 1);
    assert!(server.shutdown().await);
}
