//! What a request's head must be before the gateway decides anything (issue: identity a
//! client cannot forge): one `Host` that agrees with an absolute-form target, no
//! `Connection` naming `Host` or an identity header, and hop-by-hop headers gone before
//! classification. Real gateway, real recording upstreams, raw bytes on the wire.

use std::time::Duration;

use serde_json::json;
use tidegate_tests::raw::exchange;
use tidegate_tests::{Upstream, config, set, start_gateway};

const WITHIN: Duration = Duration::from_secs(3);

/// Each hostile head is answered 400 with the connection closed, and nothing reaches the
/// upstream; the same request without the trick is forwarded.
#[tokio::test]
async fn ambiguous_heads_are_refused_before_anything_is_decided() {
    let up = Upstream::start().await;
    let server = start_gateway(&config(&[up.addr])).await;
    let gw = server.listen_addrs[0];
    let cases: [(&str, &[u8]); 5] = [
        ("two Host headers", b"GET /envelopes/1 HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"),
        ("Host disagreeing with an absolute-form target",
         b"GET http://a.example/envelopes/1 HTTP/1.1\r\nHost: b.example\r\n\r\n"),
        ("Connection naming the user header",
         b"GET /envelopes/1 HTTP/1.1\r\nHost: a.example\r\nx-user-id: vip\r\nConnection: x-user-id\r\n\r\n"),
        ("Connection naming the app header among others",
         b"GET /envelopes/1 HTTP/1.1\r\nHost: a.example\r\nx-app-id: douyin\r\nConnection: keep-alive, X-App-Id\r\n\r\n"),
        ("Connection naming Host",
         b"GET /envelopes/1 HTTP/1.1\r\nHost: a.example\r\nConnection: host\r\n\r\n"),
    ];
    for (what, raw) in cases {
        let r = exchange(gw, raw, WITHIN).await;
        assert_eq!(r.statuses(), [400], "{what}: {}", r.text());
        assert!(
            r.text().contains(r#"{"error":"bad_request"}"#),
            "{what}: {}",
            r.text()
        );
        assert!(
            r.closed,
            "{what}: the connection stays open after a refused head"
        );
        assert_eq!(up.hits(), 0, "{what}: reached the upstream");
    }
    let fine = exchange(
        gw,
        b"GET http://a.example/envelopes/1 HTTP/1.1\r\nHost: a.example\r\nx-user-id: u\r\nConnection: close\r\n\r\n",
        WITHIN,
    )
    .await;
    assert_eq!(fine.statuses(), [200], "{}", fine.text());
    assert_eq!(up.hits(), 1);
    assert!(server.shutdown().await);
}

/// A header named in `Connection` is gone before classification: a route that matches on it
/// does not see it, so gateway and upstream agree on what the request carried.
#[tokio::test]
async fn hop_by_hop_headers_are_removed_before_routing() {
    let (up, canary) = (Upstream::start().await, Upstream::start().await);
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "upstreams/canary",
        json!({ "endpoints": [canary.addr.to_string()] }),
    );
    set(
        &mut c,
        "routes",
        json!([
            { "name": "default", "upstream": "up" },
            { "name": "by-header", "match": { "headers": { "x-canary": "1" } }, "upstream": "canary" }
        ]),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let head = |conn: &str| {
        format!(
            "GET /envelopes/1 HTTP/1.1\r\nHost: a.example\r\nx-canary: 1\r\n{conn}Connection: close\r\n\r\n"
        )
    };
    let r = exchange(gw, head("").as_bytes(), WITHIN).await;
    assert_eq!(r.statuses(), [200], "{}", r.text());
    assert_eq!(
        (canary.hits(), up.hits()),
        (1, 0),
        "the header routes when it is end to end"
    );
    let r = exchange(gw, head("Connection: x-canary\r\n").as_bytes(), WITHIN).await;
    assert_eq!(r.statuses(), [200], "{}", r.text());
    assert_eq!(
        (canary.hits(), up.hits()),
        (1, 1),
        "a header the client marked hop-by-hop must not route the request"
    );
    let seen = up.seen();
    assert!(
        seen[0].headers.get("x-canary").is_none(),
        "{:?}",
        seen[0].headers
    );
    assert!(server.shutdown().await);
}
