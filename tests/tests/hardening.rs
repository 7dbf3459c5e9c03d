//! Hostile clients on raw sockets: oversized request lines, headers and bodies, and a
//! request-smuggling corpus. A recording upstream proves nothing was forwarded that should
//! not have been, and nothing was smuggled.

use std::time::Duration;

use serde_json::json;
use tidegate_tests::api;
use tidegate_tests::raw::exchange;
use tidegate_tests::{Upstream, config, set, start_gateway};

/// How long a raw exchange may take: the gateway answers and closes within it, or hangs.
const BOUND: Duration = Duration::from_secs(2);

async fn gateway(up: &Upstream, max_body: u64) -> api::Server {
    let mut c = config(&[up.addr]);
    set(&mut c, "server/limits/max_body_bytes", json!(max_body));
    set(&mut c, "server/limits/max_header_bytes", json!(8192));
    set(&mut c, "server/limits/max_headers", json!(32));
    start_gateway(&c).await
}

/// An oversized request line answers 414, too many or too large headers 431, a body over
/// the limit 413 — and none of them reaches the upstream.
#[tokio::test]
async fn oversized_requests_never_forwarded() {
    let up = Upstream::start().await;
    let server = gateway(&up, 1024).await;
    let gw = server.listen_addrs[0];

    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let r = exchange(gw, long_uri.as_bytes(), BOUND).await;
    assert!(
        matches!(r.statuses().first(), Some(414 | 431)),
        "long request line: {:.200}",
        r.text()
    );

    let many: String = (0..100).map(|i| format!("x-h{i}: v\r\n")).collect();
    let r = exchange(
        gw,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
        BOUND,
    )
    .await;
    assert_eq!(
        r.statuses().first(),
        Some(&431),
        "too many headers: {:.200}",
        r.text()
    );

    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(16_000)
    );
    let r = exchange(gw, big.as_bytes(), BOUND).await;
    assert_eq!(
        r.statuses().first(),
        Some(&431),
        "header bytes: {:.200}",
        r.text()
    );

    let body = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{}",
        "c".repeat(5000)
    );
    let r = exchange(gw, body.as_bytes(), BOUND).await;
    assert_eq!(
        r.statuses().first(),
        Some(&413),
        "declared body: {:.200}",
        r.text()
    );

    assert_eq!(
        up.hits(),
        0,
        "nothing oversized reached the upstream: {:?}",
        up.seen()
    );
    assert!(server.shutdown().await);
}

/// The request-smuggling corpus: each case is either refused with 400 (and the connection
/// closed), or forwarded as exactly one request; the smuggled second request never reaches
/// the upstream. A hang (no answer within [`BOUND`]) or a case neither refused nor
/// forwarded fails.
#[tokio::test]
async fn smuggling_corpus() {
    const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "CL.TE",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "TE.CL",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
                SMUGGLED.len()
            ),
        ),
        (
            "duplicate Content-Length",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
        ),
        (
            "Content-Length list",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0, {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
        ),
        (
            "obs-fold",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n chunked\r\nContent-Length: 0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "bad chunk size",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{SMUGGLED}"
            ),
        ),
        (
            "chunk size overflow",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n{SMUGGLED}"
            ),
        ),
        (
            "TE xchunked",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "TE chunked, identity",
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "space before colon",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n"
                .to_owned(),
        ),
        (
            "TE in HTTP/1.0",
            format!(
                "POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
    ];
    let up = Upstream::start().await;
    let server = gateway(&up, 1 << 20).await;
    let gw = server.listen_addrs[0];
    for (name, raw) in &cases {
        let before = up.hits();
        let r = exchange(gw, raw.as_bytes(), BOUND).await;
        let st = r.statuses();
        let forwarded = up.hits() - before;
        // Refused: one answer, 400, then the connection closed, and nothing forwarded.
        let refused = st == [400] && r.closed && forwarded == 0;
        // Forwarded: exactly one request reached the upstream, and its one answer came back.
        let one_forwarded = forwarded == 1 && st.len() == 1 && st != [400];
        let what = match (st.is_empty(), r.closed) {
            (true, false) => "a hang: no answer and the connection still open",
            (true, true) => "closed without an answer",
            (false, false) => "answered, connection left open",
            (false, true) => "answered, connection closed",
        };
        eprintln!(
            "{name}: statuses {st:?}, forwarded {forwarded}, {what} ({})",
            match (refused, one_forwarded) {
                (true, _) => "refused",
                (_, true) => "forwarded",
                _ => "neither",
            }
        );
        assert!(
            refused || one_forwarded,
            "{name}: neither a 400 and a closed connection with nothing forwarded, nor exactly \
             one request forwarded and answered: statuses {st:?}, forwarded {forwarded}, {what} \
             within {BOUND:?}\n{:.300}",
            r.text()
        );
        // However it was answered, the smuggled request must never reach the upstream.
        assert!(
            up.seen().iter().all(|s| s.path != "/smuggled"),
            "{name}: smuggled request reached the upstream"
        );
        // A forwarded case went as one normalised request: no Transfer-Encoding with a
        // Content-Length beside it.
        if let Some(s) = up.seen().get(before) {
            let h = &s.headers;
            assert!(
                !(h.contains_key("transfer-encoding") && h.contains_key("content-length")),
                "{name}: forwarded with both framing headers: {h:?}"
            );
        }
    }
    assert!(server.shutdown().await);
}
