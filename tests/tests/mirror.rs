//! Request mirroring, end to end, against the real `tidegate` binary: which users are
//! copied (exactly those the bucket formula picks), what a copy carries (the body, the
//! forwarding headers, the mirror mark), what the metrics count, and that a slow, refusing
//! or hung mirror costs the primary nothing while its copies stay within their bound.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use serde_json::{Value, json};
use tidegate_tests::{
    Blackhole, ChildGateway, Client, Received, TIMEOUT, Upstream, config, dead_addr, full, get,
    h1_client, metric_value, percentile, send, set, streamed,
};

/// The users a 30% mirror of route `default` copies: buckets under the documented default
/// salt (the route's salt, then `#mirror`) below 300,000, by the `rules` crate's formula.
fn mirrored(user: &str) -> bool {
    rules::bucket::bucket("default#mirror", user) < 300_000
}

fn user_of(r: &Received) -> String {
    r.headers["x-user-id"].to_str().unwrap().to_owned()
}

async fn metrics(client: &Client, gw: &ChildGateway) -> String {
    get(client, gw.admin_addr, "/metrics").await.text()
}

fn series(name: &str, route: &str, upstream: &str, outcome: Option<&str>) -> String {
    match outcome {
        Some(o) => format!("{name}{{route=\"{route}\",upstream=\"{upstream}\",outcome=\"{o}\"}}"),
        None => format!("{name}{{route=\"{route}\",upstream=\"{upstream}\"}}"),
    }
}

/// Wait until `done` holds (polled every 10 ms), at most [`TIMEOUT`].
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn request(
    gw: SocketAddr,
    method: &str,
    path: &str,
    user: &str,
    body: Bytes,
) -> Request<tidegate_tests::ReqBody> {
    Request::builder()
        .method(method)
        .uri(format!("http://{gw}{path}"))
        .header("x-app-id", "douyin")
        .header("x-user-id", user)
        .body(full(body))
        .unwrap()
}

/// 200 users each send a GET and a POST with a small body through a route with a 30%
/// mirror: exactly the users the bucket formula picks reach the mirror, each copy with its
/// body, the mirror mark, the primary's request ID and forwarding headers; the primary sees
/// no mark. A body over the mirror's `max_body_bytes` and a chunked one are skipped, and the
/// metrics count the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_copies_the_bucketed_users_and_counts_them() {
    let (up, shadow) = (Upstream::start().await, Upstream::start().await);
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "upstreams/shadow",
        json!({ "endpoints": [shadow.addr.to_string()] }),
    );
    set(
        &mut c,
        "routes/0/mirror",
        json!({ "upstream": "shadow", "fraction": "30%", "max_body_bytes": 1024 }),
    );
    let gw = ChildGateway::spawn(&c);
    let client = h1_client();

    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let want: BTreeSet<&str> = users
        .iter()
        .map(String::as_str)
        .filter(|u| mirrored(u))
        .collect();
    assert!(
        (40..80).contains(&want.len()),
        "about 30% of 200: {}",
        want.len()
    );
    for u in &users {
        let r = send(
            &client,
            request(gw.addr, "GET", "/envelopes/7", u, Bytes::new()),
        )
        .await;
        assert_eq!(r.status, 200);
        let body = Bytes::from(format!("{{\"grab\":\"{u}\"}}"));
        let r = send(
            &client,
            request(gw.addr, "POST", "/envelopes/7/grab", u, body),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    // Two mirrored users whose bodies are not copied: one too large, one of undeclared
    // length (chunked). Both reach the primary.
    let big = want.first().unwrap();
    let r = send(
        &client,
        request(
            gw.addr,
            "POST",
            "/envelopes/8/grab",
            big,
            vec![b'x'; 2048].into(),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let chunked = Request::post(format!("http://{}/envelopes/8/grab", gw.addr))
        .header("x-user-id", *want.last().unwrap())
        .body(streamed(100))
        .unwrap();
    assert_eq!(send(&client, chunked).await.status, 200);

    let copies = 2 * want.len();
    until("the copies", || shadow.received().len() >= copies).await;
    // Late extra copies would show up now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = shadow.received();
    assert_eq!(got.len(), copies, "one copy per mirrored request, no more");
    let got_users: BTreeSet<String> = got.iter().map(user_of).collect();
    let want_users: BTreeSet<String> = want.iter().map(|u| u.to_string()).collect();
    assert_eq!(
        got_users, want_users,
        "exactly the users the bucket formula picks"
    );

    let primary = up.received();
    assert_eq!(
        primary.len(),
        2 * users.len() + 2,
        "the primary saw every request"
    );
    assert!(
        primary
            .iter()
            .all(|r| !r.headers.contains_key("x-tidegate-mirror"))
    );
    for copy in &got {
        assert_eq!(copy.headers["x-tidegate-mirror"], "1");
        let id = &copy.headers["x-request-id"];
        let twin = primary
            .iter()
            .find(|p| p.headers["x-request-id"] == id)
            .expect("the primary request with the copy's request ID");
        assert_eq!(copy.body, twin.body, "the copy carries the primary's body");
        for h in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "forwarded",
            "host",
            "x-user-id",
        ] {
            assert_eq!(copy.headers.get(h), twin.headers.get(h), "{h}");
        }
    }
    let posts = got.iter().filter(|r| !r.body.is_empty()).count();
    assert_eq!(posts, want.len(), "each mirrored user's POST body arrived");
    let u = user_of(got.iter().find(|r| !r.body.is_empty()).unwrap());
    let body_of = |r: &Received| String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        got.iter()
            .any(|r| body_of(r) == format!("{{\"grab\":\"{u}\"}}"))
    );

    let m = metrics(&client, &gw).await;
    let count = |name, outcome| metric_value(&m, &series(name, "default", "shadow", outcome));
    let n = copies as f64;
    assert_eq!(
        count("tidegate_mirror_requests_total", Some("sent")),
        Some(n),
        "{m}"
    );
    assert_eq!(
        count("tidegate_mirror_requests_total", Some("skipped_body")),
        Some(2.0)
    );
    assert_eq!(
        count("tidegate_mirror_requests_total", Some("dropped")),
        Some(0.0)
    );
    assert_eq!(
        count("tidegate_mirror_responses_total", Some("2xx")),
        Some(n)
    );
    assert_eq!(
        count("tidegate_mirror_latency_seconds_count", None),
        Some(n)
    );
    assert_eq!(count("tidegate_mirror_in_flight", None), Some(0.0));
}

/// Primary latency with no mirror, a 100% mirror to a service that answers after 200 ms,
/// one whose port refuses connections and one that accepts and never answers, measured
/// interleaved in one run: every primary request succeeds, and each p99 stays within a
/// generous margin of the unmirrored baseline (waiting for any of those mirrors would cost
/// 200 ms, or forever). The copies in flight never exceed `max_in_flight`: the rest are
/// dropped and counted. The refusing mirror is paused after a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_costs_the_primary_nothing() {
    const BOUND: usize = 8;
    const ROUNDS: usize = 250;
    let up = Upstream::start().await;
    let slow = Upstream::start().await;
    slow.set_delay(Duration::from_millis(200));
    let hole = Blackhole::start().await;
    // Long enough that no copy to the hung mirror times out during the test.
    let hung_timeout_ms = 60_000;
    let mut c = config(&[up.addr]);
    let static_up = |addr: String| json!({ "endpoints": [addr], "connect_timeout_ms": 1000, "request_timeout_ms": 10000 });
    set(&mut c, "upstreams/slow", static_up(slow.addr.to_string()));
    set(&mut c, "upstreams/dead", static_up(dead_addr().to_string()));
    set(&mut c, "upstreams/hole", static_up(hole.addr.to_string()));
    set(
        &mut c,
        "upstreams/hole/request_timeout_ms",
        json!(hung_timeout_ms),
    );
    let mut routes = vec![json!({ "name": "default", "upstream": "up" })];
    for name in ["slow", "dead", "hole"] {
        routes.push(json!({
            "name": format!("to-{name}"), "upstream": "up",
            "match": { "headers": { "x-variant": name } },
            "mirror": { "upstream": name, "fraction": "100%", "max_in_flight": BOUND }
        }));
    }
    set(&mut c, "routes", Value::Array(routes));
    let gw = ChildGateway::spawn(&c);
    let client = h1_client();

    let variants = ["none", "slow", "dead", "hole"];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(ROUNDS); variants.len()];
    let mut most_in_flight = 0.0f64;
    for round in 0..ROUNDS {
        for (i, v) in variants.iter().enumerate() {
            let req = Request::get(format!("http://{}/envelopes/{round}", gw.addr))
                .header("x-user-id", format!("u{round}"))
                .header("x-variant", *v)
                .body(full(Bytes::new()))
                .unwrap();
            let t = Instant::now();
            let r = send(&client, req).await;
            samples[i].push(t.elapsed());
            assert_eq!(r.status, 200, "variant {v}: the primary answers");
        }
        if round % 50 == 0 {
            let m = metrics(&client, &gw).await;
            for name in ["slow", "hole"] {
                let s = series(
                    "tidegate_mirror_in_flight",
                    &format!("to-{name}"),
                    name,
                    None,
                );
                most_in_flight = most_in_flight.max(metric_value(&m, &s).unwrap_or(0.0));
            }
        }
    }
    let p99: Vec<Duration> = samples.iter_mut().map(|s| percentile(s, 0.99)).collect();
    let p50: Vec<Duration> = samples.iter_mut().map(|s| percentile(s, 0.50)).collect();
    for (i, v) in variants.iter().enumerate() {
        eprintln!(
            "primary with mirror {v:>4}: p50 {:?}, p99 {:?} ({ROUNDS} requests)",
            p50[i], p99[i]
        );
    }
    let limit = p99[0] * 3 + Duration::from_millis(30);
    for (i, v) in variants.iter().enumerate().skip(1) {
        assert!(
            p99[i] <= limit,
            "mirror {v}: primary p99 {:?} against {:?} without a mirror (limit {limit:?})",
            p99[i],
            p99[0]
        );
    }

    assert_eq!(
        up.hits(),
        ROUNDS * variants.len(),
        "every request reached the primary"
    );
    assert!(
        slow.most_concurrent() <= BOUND,
        "slow mirror: {} at once",
        slow.most_concurrent()
    );
    assert!(
        hole.accepted() <= BOUND,
        "hung mirror: {} connections",
        hole.accepted()
    );
    assert!(
        most_in_flight <= BOUND as f64,
        "in-flight gauge {most_in_flight}"
    );
    let m = metrics(&client, &gw).await;
    let count = |route: &str, up: &str, name: &str, outcome: &str| {
        metric_value(&m, &series(name, route, up, Some(outcome))).unwrap_or(0.0)
    };
    for name in ["slow", "hole"] {
        let route = format!("to-{name}");
        let sent = count(&route, name, "tidegate_mirror_requests_total", "sent");
        let dropped = count(&route, name, "tidegate_mirror_requests_total", "dropped");
        assert_eq!(
            sent + dropped,
            ROUNDS as f64,
            "{name}: every copy sent or dropped\n{m}"
        );
        assert!(dropped > 0.0, "{name}: the bound dropped copies\n{m}");
    }
    assert_eq!(
        hole.accepted(),
        BOUND,
        "the hung mirror holds exactly the bound"
    );
    // The refusing mirror fails fast, and after a refusal gets no copies for a while: each
    // copy sent is counted as a failure, the rest as skipped.
    let dead = |m: &str, name: &str, outcome: &str| {
        metric_value(m, &series(name, "to-dead", "dead", Some(outcome))).unwrap_or(0.0)
    };
    let sent = dead(&m, "tidegate_mirror_requests_total", "sent");
    let dropped = dead(&m, "tidegate_mirror_requests_total", "dropped");
    let paused = dead(&m, "tidegate_mirror_requests_total", "skipped_down");
    assert_eq!(sent + dropped + paused, ROUNDS as f64, "{m}");
    assert!(sent > 0.0 && paused > sent, "{m}");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let m = metrics(&client, &gw).await;
        let failed = dead(
            &m,
            "tidegate_mirror_responses_total",
            "upstream_unavailable",
        );
        if failed == sent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refused copies counted: {failed} of {sent}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
