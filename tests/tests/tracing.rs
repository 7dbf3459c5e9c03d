//! Tracing: W3C `traceparent`/`tracestate` continued or started by the gateway, the
//! upstream told the gateway's span as its parent, and the trace ID in the access log;
//! sampled spans exported over OTLP/HTTP to a real receiver, batched off the request path.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use serde_json::{Value, json};
use tidegate_tests::otlp::{Collector, attribute, hex};
use tidegate_tests::{
    Blackhole, ChildGateway, Seen, Upstream, config, dead_addr, full, get, h1_client, metric_value,
    send, set,
};

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

/// Every way out to the upstream carries exactly one `traceparent`, the gateway's span in
/// the caller's trace: a bodiless HTTP/1.1 request (written into the head of the
/// connection's own upstream connection), one with a body (hyper's client), and an h2c one
/// (the shared pool).
#[tokio::test]
async fn every_upstream_path_carries_one_traceparent() {
    let up = Upstream::start().await;
    let gw = ChildGateway::spawn(&traced_config(&up));
    let good = format!("00-{TRACE}-{PARENT}-01");
    let req = |method: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(format!("http://{}/x", gw.addr))
            .header("traceparent", &good)
            .body(full(Bytes::from_static(body.as_bytes())))
            .expect("a valid request")
    };
    assert_eq!(send(&h1_client(), req("GET", "")).await.status, 200);
    assert_eq!(send(&h1_client(), req("POST", "a body")).await.status, 200);
    let h2 = send(&tidegate_tests::h2c_client(), req("GET", "")).await;
    assert_eq!(
        (h2.status.as_u16(), h2.version),
        (200, http::Version::HTTP_2)
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    let mut spans = Vec::new();
    for s in &seen {
        let tp = upstream_traceparent(s);
        assert_eq!(tp[1], TRACE, "{tp:?}");
        assert_ne!(tp[2], PARENT, "{tp:?}");
        spans.push(tp[2].clone());
    }
    spans.dedup();
    assert_eq!(spans.len(), 3, "a span per request: {spans:?}");
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

/// A config exporting to `endpoint` at `ratio`, batches sent after 20 ms.
fn export_config(up: &Upstream, endpoint: &str, ratio: f64) -> Value {
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "server/tracing",
        json!({ "otlp_endpoint": endpoint, "sample_ratio": ratio, "export_interval_ms": 20,
                "service_name": "edge-test" }),
    );
    c
}

/// The gateway's metric `series`, 0 when absent.
async fn metric(gw: &ChildGateway, series: &str) -> f64 {
    let text = get(&h1_client(), gw.admin_addr, "/metrics").await.text();
    metric_value(&text, series).unwrap_or(0.0)
}

/// Wait (bounded) until `f` holds.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// At ratio 1 every request's span reaches the receiver: its trace and span IDs are the
/// ones the upstream was told, its parent the caller's span, and its attributes the phase
/// outcomes (interface, app, route, upstream, decision, status), never the user.
#[tokio::test]
async fn spans_exported_with_phase_outcomes() {
    let up = Upstream::start().await;
    let collector = Collector::start().await;
    let mut c = export_config(&up, &collector.endpoint(), 1.0);
    set(
        &mut c,
        "limits",
        json!([{ "name": "one-open", "match": { "interfaces": ["open"] },
        "key": ["app"], "rate": "1/min", "burst": 1 }]),
    );
    let gw = ChildGateway::spawn(&c);
    let client = h1_client();
    let open = |tp: Option<&str>| {
        let mut req = Request::get(format!("http://{}/envelopes/7", gw.addr))
            .header("x-app-id", "app7")
            .header("x-user-id", "secret-user-42");
        if let Some(tp) = tp {
            req = req.header("traceparent", tp);
        }
        req.body(full(Bytes::new())).expect("a valid request")
    };
    let caller = format!("00-{TRACE}-{PARENT}-00");
    assert_eq!(send(&client, open(Some(&caller))).await.status, 200);
    assert_eq!(
        send(&client, open(None)).await.status,
        429,
        "the limit answers"
    );
    eventually("two spans", async || collector.spans().len() >= 2).await;
    let spans = collector.spans();
    assert_eq!(spans.len(), 2);
    assert_eq!(collector.malformed(), 0);

    let seen = up.seen();
    assert_eq!(
        seen.len(),
        1,
        "the limited request never reached the upstream"
    );
    let told = upstream_traceparent(&seen[0]);
    let fwd = spans
        .iter()
        .find(|s| hex(&s.span.trace_id) == TRACE)
        .expect("the continued trace");
    assert_eq!(fwd.service, "edge-test");
    assert_eq!(
        hex(&fwd.span.span_id),
        told[2],
        "the span the upstream was told"
    );
    assert_eq!(told[3], "01", "sampled at ratio 1");
    assert_eq!(hex(&fwd.span.parent_span_id), PARENT);
    assert!(fwd.span.end_time_unix_nano >= fwd.span.start_time_unix_nano);
    assert!(fwd.span.start_time_unix_nano > 1_700_000_000_000_000_000);
    let attrs = [
        ("tidegate.interface", "open"),
        ("tidegate.app", "app7"),
        ("tidegate.route", "default"),
        ("tidegate.upstream", "up"),
        ("tidegate.decision", "forward"),
        ("http.request.method", "GET"),
        ("http.response.status_code", "200"),
    ];
    for (k, v) in attrs {
        assert_eq!(
            attribute(&fwd.span, k).as_deref(),
            Some(v),
            "{k}: {:?}",
            fwd.span
        );
    }
    let limited = spans
        .iter()
        .find(|s| hex(&s.span.trace_id) != TRACE)
        .expect("a new trace");
    assert!(limited.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        attribute(&limited.span, "tidegate.decision").as_deref(),
        Some("limited")
    );
    assert_eq!(
        attribute(&limited.span, "tidegate.rule").as_deref(),
        Some("one-open")
    );
    assert_eq!(
        attribute(&limited.span, "http.response.status_code").as_deref(),
        Some("429")
    );
    for s in &spans {
        let all = format!("{:?}", s.span);
        assert!(
            !all.contains("secret-user-42"),
            "the user ID is exported: {all}"
        );
    }
    eventually("the export counted", async || {
        metric(&gw, "tidegate_trace_spans_exported_total").await == 2.0
    })
    .await;
}

/// At ratio 0 (and no caller's flag followed) nothing is exported.
#[tokio::test]
async fn ratio_zero_exports_nothing() {
    let up = Upstream::start().await;
    let collector = Collector::start().await;
    let gw = ChildGateway::spawn(&export_config(&up, &collector.endpoint(), 0.0));
    let sampled = format!("00-{TRACE}-{PARENT}-01");
    for _ in 0..20 {
        assert_eq!(get_with(gw.addr, &[("traceparent", &sampled)]).await, 200);
    }
    // Ten export intervals: a span would have been sent by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(collector.requests(), 0);
    assert_eq!(
        metric(&gw, "tidegate_trace_spans_exported_total").await,
        0.0
    );
}

/// `n` sequential requests; how long they took. Every one must succeed.
async fn timed_requests(addr: std::net::SocketAddr, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        assert_eq!(get_with(addr, &[]).await, 200);
    }
    start.elapsed()
}

/// With the collector down (a refused port) requests succeed as fast as without export
/// (within noise), and the failed batches are counted as dropped.
#[tokio::test]
async fn collector_down_does_not_slow_requests() {
    let up = Upstream::start().await;
    let base = ChildGateway::spawn(&config(&[up.addr]));
    let dead = format!("http://{}/v1/traces", dead_addr());
    let gw = ChildGateway::spawn(&export_config(&up, &dead, 1.0));
    // Warm both, then alternate rounds so drift hits both alike.
    timed_requests(base.addr, 20).await;
    timed_requests(gw.addr, 20).await;
    let (mut t_base, mut t_export) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..3 {
        t_base += timed_requests(base.addr, 100).await;
        t_export += timed_requests(gw.addr, 100).await;
    }
    eprintln!("300 requests: {t_base:?} without export, {t_export:?} exporting to a dead port");
    assert!(
        t_export < t_base * 2 + Duration::from_millis(200),
        "export to a dead collector slowed requests: {t_export:?} against {t_base:?}"
    );
    let failed = "tidegate_trace_spans_dropped_total{reason=\"export_failed\"}";
    eventually("failed exports counted", async || {
        metric(&gw, failed).await > 0.0
    })
    .await;
}

/// A collector that accepts and never answers holds the export task on one batch: the
/// queue (4 spans) fills, and further spans are dropped and counted while every request is
/// answered at once; a request never waits for the exporter.
#[tokio::test]
async fn full_queue_drops_spans_never_requests() {
    let up = Upstream::start().await;
    let hung = Blackhole::start().await;
    let mut c = export_config(&up, &format!("http://{}/v1/traces", hung.addr), 1.0);
    set(&mut c, "server/tracing/max_queue", json!(4));
    set(&mut c, "server/tracing/max_batch", json!(1));
    set(&mut c, "server/tracing/export_timeout_ms", json!(60_000));
    let gw = ChildGateway::spawn(&c);
    let took = tokio::time::timeout(Duration::from_secs(10), timed_requests(gw.addr, 50))
        .await
        .expect("requests are not held by a stuck exporter");
    eprintln!("50 requests with a hung collector: {took:?}");
    let full = "tidegate_trace_spans_dropped_total{reason=\"queue_full\"}";
    // One span in the stuck export, four queued: the rest were dropped.
    assert!(
        metric(&gw, full).await >= 45.0,
        "queue_full drops: {}",
        metric(&gw, full).await
    );
    assert!(hung.accepted() >= 1);
}
