//! Tracing: W3C `traceparent`/`tracestate` continued or started by the gateway, the
//! upstream told the gateway's span as its parent, and the trace ID in the access log.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use serde_json::{Value, json};
use tidegate_tests::{ChildGateway, Seen, Upstream, config, full, h1_client, send, set};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// `GET /x` with the given headers; the status.
async fn get_with(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> u16 {
    let mut req = Request::get(format!("http://{addr}/x"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req.body(full(Bytes::new())).expect("a valid request");
    send(&h1_client(), req).await.status.as_u16()
}

/// The upstream's `traceparent`, split into its four fields.
fn upstream_traceparent(seen: &Seen) -> [String; 4] {
    let all: Vec<_> = seen.headers.get_all("traceparent").iter().collect();
    assert_eq!(all.len(), 1, "one traceparent: {all:?}");
    let v = all[0].to_str().expect("ASCII");
    let parts: Vec<String> = v.split('-').map(str::to_owned).collect();
    assert_eq!(parts.len(), 4, "{v}");
    assert!(
        parts.iter().all(|p| p
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())),
        "{v}"
    );
    parts.try_into().expect("four")
}

/// The access log lines written so far, parsed.
fn access_lines(gw: &ChildGateway) -> Vec<Value> {
    gw.log_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "tidegate::access")
        .collect()
}

fn traced_config(up: &Upstream) -> Value {
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "server/access_log",
        json!({ "enabled": true, "format": "json" }),
    );
    c
}

/// A valid `traceparent` is continued: same trace ID, a new span whose parent is the
/// caller's, `tracestate` passed unchanged; the access log names the trace and the span.
/// Invalid ones (uppercase, an all-zero trace ID, a wrong length, two of them) and an
/// absent one start a new trace each, and a `tracestate` that came with them is dropped.
#[tokio::test]
async fn traceparent_continued_or_started() {
    let up = Upstream::start().await;
    let gw = ChildGateway::spawn(&traced_config(&up));
    let good = format!("00-{TRACE}-{PARENT}-01");
    let state = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";
    assert_eq!(
        get_with(gw.addr, &[("traceparent", &good), ("tracestate", state)]).await,
        200
    );
    let invalid = [
        good.to_uppercase(),
        format!("00-{}-{PARENT}-01", "0".repeat(32)),
        format!("00-{TRACE}-{PARENT}-1"),
    ];
    for bad in &invalid {
        assert_eq!(
            get_with(gw.addr, &[("traceparent", bad), ("tracestate", state)]).await,
            200
        );
    }
    assert_eq!(
        get_with(gw.addr, &[("traceparent", &good), ("traceparent", &good)]).await,
        200
    );
    assert_eq!(get_with(gw.addr, &[]).await, 200);

    let seen = up.seen();
    assert_eq!(seen.len(), 6);
    let first = upstream_traceparent(&seen[0]);
    assert_eq!(first[0], "00");
    assert_eq!(first[1], TRACE, "the trace continues");
    assert_ne!(first[2], PARENT, "the gateway's own span is the parent");
    assert_eq!(seen[0].headers["tracestate"], state);
    let mut traces = vec![first[1].clone()];
    for s in &seen[1..] {
        let tp = upstream_traceparent(s);
        assert_ne!(tp[1], TRACE, "a new trace: {tp:?}");
        assert_ne!(tp[1], "0".repeat(32));
        assert!(
            !s.headers.contains_key("tracestate"),
            "tracestate of a trace not continued"
        );
        traces.push(tp[1].clone());
    }
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), 6, "every new trace is its own: {traces:?}");

    // The access log line of each request carries the trace and span the upstream saw.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut lines = access_lines(&gw);
    while lines.len() < 6 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        lines = access_lines(&gw);
    }
    assert_eq!(lines.len(), 6, "{lines:#?}");
    for (line, s) in lines.iter().zip(&seen) {
        let tp = upstream_traceparent(s);
        assert_eq!(line["trace_id"], tp[1], "{line}");
        assert_eq!(line["span_id"], tp[2], "{line}");
    }
}

/// An untrusted client cannot switch sampling on with its `sampled` flag (at ratio 0 the
/// upstream is told `00`), while a peer in `server.trusted_proxies` can; with
/// `parent_sampled: any`, anyone can.
#[tokio::test]
async fn sampled_flag_followed_only_from_trusted_peers() {
    let up = Upstream::start().await;
    let sampled = format!("00-{TRACE}-{PARENT}-01");
    let cases = [
        (json!([]), "trusted_proxies", "00"),
        (json!(["127.0.0.1"]), "trusted_proxies", "01"),
        (json!([]), "any", "01"),
    ];
    for (i, (trusted, parent_sampled, want)) in cases.iter().enumerate() {
        let mut c = config(&[up.addr]);
        set(&mut c, "server/trusted_proxies", trusted.clone());
        set(
            &mut c,
            "server/tracing",
            json!({ "sample_ratio": 0, "parent_sampled": parent_sampled }),
        );
        let gw = ChildGateway::spawn(&c);
        assert_eq!(get_with(gw.addr, &[("traceparent", &sampled)]).await, 200);
        let tp = upstream_traceparent(&up.seen()[i]);
        assert_eq!(tp[1], TRACE);
        assert_eq!(
            &tp[3], want,
            "trusted {trusted}, parent_sampled {parent_sampled}"
        );
    }
}

/// With `propagate: false` the client's headers pass untouched and none is added.
#[tokio::test]
async fn propagation_off_passes_headers_through() {
    let up = Upstream::start().await;
    let mut c = traced_config(&up);
    set(&mut c, "server/tracing", json!({ "propagate": false }));
    let gw = ChildGateway::spawn(&c);
    let odd = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    assert_eq!(get_with(gw.addr, &[("traceparent", odd)]).await, 200);
    assert_eq!(get_with(gw.addr, &[]).await, 200);
    let seen = up.seen();
    assert_eq!(seen[0].headers["traceparent"], odd);
    assert!(!seen[1].headers.contains_key("traceparent"));
}
