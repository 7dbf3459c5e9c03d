//! Trusted client addresses (`server.trusted_proxies`): a client that is not a trusted proxy
//! cannot choose the address it is limited and logged under by sending `X-Forwarded-For`,
//! and its forwarding headers are replaced; behind a trusted proxy, the forwarded address
//! is the client and the chain reaches the upstream with the proxy appended. `tidegate
//! check` refuses a bad CIDR at its place.

use http::{Request, StatusCode};
use serde_json::{Value, json};
use tidegate_tests::{Upstream, config_with_limits, full, h1_client, send, set, start_gateway};

/// One request per minute per client for requests without a user (`key: ["user"]`, the
/// default `when_missing: client_ip`).
fn per_client_limit(up: &Upstream) -> Value {
    config_with_limits(
        &[up.addr],
        json!([{ "name": "per-client", "key": ["user"], "rate": "1/min", "burst": 1 }]),
    )
}

/// GET `/who` with these extra headers and no user.
fn who(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> Request<tidegate_tests::ReqBody> {
    let mut b = Request::get(format!("http://{addr}/who")).header("host", "gw.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(full("")).unwrap()
}

/// From 127.0.0.1, not a trusted proxy, a spoofed `X-Forwarded-For` changes nothing: two
/// requests with different values share the one quota of 127.0.0.1 (the second is 429), and
/// the upstream sees only the gateway's own forwarding headers.
#[tokio::test]
async fn spoofed_forwarded_for_from_untrusted_peer_is_ignored() {
    let up = Upstream::start().await;
    let gw = start_gateway(&per_client_limit(&up)).await;
    let addr = gw.listen_addrs[0];
    let client = h1_client();
    let spoof = |ip: &'static str| {
        who(
            addr,
            &[
                ("x-forwarded-for", ip),
                ("x-real-ip", ip),
                ("true-client-ip", ip),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "bank.test"),
                ("forwarded", "for=203.0.113.1;proto=https"),
            ],
        )
    };
    let a = send(&client, spoof("203.0.113.1")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let b = send(&client, spoof("203.0.113.2")).await;
    assert_eq!(
        b.status,
        StatusCode::TOO_MANY_REQUESTS,
        "a spoofed X-Forwarded-For bought a fresh quota: {}",
        b.text()
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    let all = |n: &str| h.get_all(n).iter().collect::<Vec<_>>();
    assert_eq!(all("x-forwarded-for"), ["127.0.0.1"], "{h:?}");
    assert_eq!(all("x-forwarded-proto"), ["http"], "{h:?}");
    assert_eq!(all("x-forwarded-host"), ["gw.test"], "{h:?}");
    assert_eq!(all("forwarded"), ["for=127.0.0.1;proto=http;host=gw.test"]);
    for gone in ["x-real-ip", "true-client-ip"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h:?}");
    }
    assert!(gw.shutdown().await);
}

/// With `trusted_proxies: ["127.0.0.1/32"]`, the forwarded address is the client: two
/// different values are two clients (both 200, the same value again is 429), and the
/// upstream sees the chain with the peer appended.
#[tokio::test]
async fn forwarded_for_from_trusted_proxy_names_the_client() {
    let up = Upstream::start().await;
    let mut c = per_client_limit(&up);
    set(&mut c, "server/trusted_proxies", json!(["127.0.0.1/32"]));
    let gw = start_gateway(&c).await;
    let addr = gw.listen_addrs[0];
    let client = h1_client();
    let via = |chain: &'static str| {
        who(
            addr,
            &[("x-forwarded-for", chain), ("x-real-ip", "198.51.100.9")],
        )
    };
    let a = send(&client, via("203.0.113.1")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // A trusted hop (127.0.0.1) at the right is skipped: the client is 203.0.113.2.
    let b = send(&client, via("198.51.100.7, 203.0.113.2, 127.0.0.1")).await;
    assert_eq!(b.status, StatusCode::OK, "another client: {}", b.text());
    let again = send(&client, via("203.0.113.1")).await;
    assert_eq!(
        again.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        again.text()
    );

    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    let h = &seen[0].headers;
    assert_eq!(h["x-forwarded-for"], "203.0.113.1, 127.0.0.1", "{h:?}");
    assert_eq!(
        h["x-real-ip"], "198.51.100.9",
        "a trusted proxy's headers are kept"
    );
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=gw.test");
    let h = &seen[1].headers;
    assert_eq!(
        h["x-forwarded-for"], "198.51.100.7, 203.0.113.2, 127.0.0.1, 127.0.0.1",
        "{h:?}"
    );
    assert!(gw.shutdown().await);
}

/// `tidegate check` refuses a prefix longer than the address with a located error.
#[test]
fn check_refuses_bad_cidr() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trusted.json");
    let mut c = tidegate_tests::config(&["127.0.0.1:9000".parse().unwrap()]);
    set(
        &mut c,
        "server/trusted_proxies",
        json!(["192.168.0.0/16", "10.0.0.0/33"]),
    );
    std::fs::write(&file, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    let (code, stderr) = tidegate_tests::tidegate_check(&file);
    assert_eq!(code, Some(1), "{stderr}");
    // `FILE:LINE:COL PATH: message`.
    let first = stderr.lines().next().unwrap_or_default();
    let at = first
        .strip_prefix(&format!("{}:", file.display()))
        .and_then(|r| r.split_once(' '))
        .unwrap_or_else(|| panic!("not FILE:LINE:COL PATH: {stderr}"));
    let (line, col) = at.0.split_once(':').expect("LINE:COL");
    assert!(
        line.parse::<u32>().is_ok() && col.parse::<u32>().is_ok(),
        "{stderr}"
    );
    assert_eq!(
        at.1,
        "server.trusted_proxies[1]: \"10.0.0.0/33\": the prefix length must be a number in 0..=32",
        "{stderr}"
    );
}
