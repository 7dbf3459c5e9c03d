//! Hot-key protection end to end: a limit keyed on the envelope's path parameter refuses
//! the hot envelope beyond its rate while another envelope's requests all pass; an
//! interface cache answers a thousand concurrent reads of one envelope with one backend
//! call, keeps the staleness bound after a grab, and never mixes identities.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use serde_json::json;
use tidegate_tests::grab::{InProcess, embedded_config};
use tidegate_tests::{
    CountingRelay, Upstream, config_with_limits, full, get, grab_as, h1_client, metric_value, post,
    post_as, send, set, start_gateway,
};

/// `key: [{"path_param": "id"}]` at 5/s: a burst of 20 grabs of envelope `hot` from 20
/// users admits about 5 and refuses the rest with 429 naming the rule, while envelope 7's
/// own burst of 5 grabs, sent after, all pass; the upstream saw only the admitted ones. An encoded ID
/// (`%68ot`) is the same envelope, so it cannot slip past the hot key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_param_limit_per_envelope() {
    let up = Upstream::start().await;
    let server = start_gateway(&config_with_limits(
        &[up.addr],
        json!([{ "name": "per-envelope", "match": { "interfaces": ["grab"] },
                 "key": [{ "path_param": "id" }], "rate": "5/s", "burst": 5 }]),
    ))
    .await;
    let gw = server.listen_addrs[0];
    let client = h1_client();

    let t0 = Instant::now();
    let mut admitted = 0;
    for i in 0..20 {
        let path = if i % 2 == 0 {
            "/envelopes/hot/grab"
        } else {
            "/envelopes/%68ot/grab"
        };
        let r = post_as(&client, gw, path, "app", &format!("u{i}")).await;
        match r.status.as_u16() {
            200 => admitted += 1,
            429 => assert_eq!(r.json()["rule"], "per-envelope"),
            s => panic!("{s}: {}", r.text()),
        }
    }
    // GCRA refills one per 200 ms: a slow machine may admit that many more, no others.
    let refills = t0.elapsed().as_millis() as usize / 200;
    assert!(
        (5..=5 + refills).contains(&admitted),
        "admitted {admitted} of 20 in {:?}",
        t0.elapsed()
    );
    for i in 0..5 {
        let r = grab_as(&client, gw, "app", &format!("c{i}")).await;
        assert_eq!(
            r.status,
            200,
            "another envelope is not limited: {}",
            r.text()
        );
    }
    // Other interfaces of the hot envelope are not limited either.
    for _ in 0..10 {
        assert_eq!(get(&client, gw, "/envelopes/hot").await.status, 200);
    }
    assert_eq!(
        up.hits(),
        admitted + 5 + 10,
        "refused grabs never reached the upstream"
    );
    server.shutdown().await;
}

/// The gateway in front of `relay` with a cache of `ttl_ms` on `open`
/// (`GET /envelopes/{id}`), per identity (the default).
fn cached_config(relay: std::net::SocketAddr, ttl_ms: u64) -> serde_json::Value {
    let mut c = tidegate_tests::config(&[relay]);
    set(
        &mut c,
        "interfaces/2/cache",
        json!({ "ttl_ms": ttl_ms, "max_entries": 1000, "max_body_bytes": 65536 }),
    );
    c
}

/// 1,000 concurrent `GET /envelopes/{id}` of one envelope, through the gateway to a real
/// grab backend behind a relay that holds each request 300 ms (so the reads overlap):
/// the backend is asked once per TTL window (here 1, at most 1 + elapsed / TTL), every
/// answer is a 200 identical to the backend's own, and `x-cache` says which one went
/// upstream. A grab of the envelope then goes through (never cached); a read right after
/// may be stale, and one a TTL after the grab sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_call_for_a_thousand_reads() {
    const TTL_MS: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let backend = InProcess::start(embedded_config(dir.path())).await.unwrap();
    let relay = CountingRelay::start(backend.addr, Duration::from_millis(300)).await;
    let server = start_gateway(&cached_config(relay.addr, TTL_MS)).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();

    let created = post(
        &client,
        gw,
        "/envelopes",
        json!({"sender": "s", "total_cents": 1000, "count": 10}).to_string(),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let path = format!("/envelopes/{}", created.json()["id"].as_str().unwrap());
    let direct = get(&client, backend.addr, &path).await;
    assert_eq!(direct.status, 200);

    let t0 = Instant::now();
    let reads: Vec<_> = (0..1000)
        .map(|_| {
            let (client, path) = (client.clone(), path.clone());
            tokio::spawn(async move { get(&client, gw, &path).await })
        })
        .collect();
    let mut tags = std::collections::BTreeMap::<String, usize>::new();
    for r in reads {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, direct.body, "every answer is the backend's");
        let tag = r.headers["x-cache"].to_str().unwrap().to_owned();
        *tags.entry(tag).or_default() += 1;
    }
    let elapsed = t0.elapsed();
    let calls = relay.count(&Method::GET, &path);
    let windows = 1 + (elapsed.as_millis() as u64 / TTL_MS) as usize;
    println!("1000 reads in {elapsed:?}: {calls} backend calls; x-cache {tags:?}");
    assert!(
        (1..=windows).contains(&calls),
        "{calls} backend calls for 1000 reads in {elapsed:?}"
    );
    assert_eq!(tags.get("miss").copied().unwrap_or(0), calls, "{tags:?}");
    assert_eq!(tags.values().sum::<usize>(), 1000);
    let metrics = get(&client, server.admin_addr, "/metrics").await.text();
    let count = |outcome| {
        metric_value(
            &metrics,
            &format!("tidegate_cache_total{{interface=\"open\",outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0) as usize
    };
    assert_eq!(count("miss"), calls);
    assert_eq!(count("hit") + count("coalesced"), 1000 - calls);
    // The dashboard's document shows the hit ratio (refreshed each second).
    let deadline = Instant::now() + Duration::from_secs(5);
    let cache = loop {
        let status = get(&client, server.admin_addr, "/admin/status.json")
            .await
            .json();
        let c = status["caches"][0].clone();
        if c["hits"].as_u64().unwrap_or(0)
            + c["coalesced"].as_u64().unwrap_or(0)
            + c["misses"].as_u64().unwrap_or(0)
            == 1000
        {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "status.json never caught up: {c}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(cache["interface"], "open");
    let ratio = cache["hit_ratio"].as_f64().unwrap();
    assert!(
        (ratio - (1000 - calls) as f64 / 1000.0).abs() < 1e-9,
        "{cache}"
    );

    // A grab is never cached: it reaches the backend and is acknowledged.
    let grab = post_as(&client, gw, &format!("{path}/grab"), "app", "alice").await;
    assert_eq!(grab.status, 200, "{}", grab.text());
    assert!(
        grab.headers.get("x-cache").is_none(),
        "a POST bypasses the cache"
    );
    assert_eq!(relay.count(&Method::POST, &format!("{path}/grab")), 1);
    let granted = Instant::now();
    // Within the TTL a read may still show the envelope before the grab (the bound)...
    let soon = get(&client, gw, &path).await;
    assert_eq!(soon.status, 200);
    let left = |r: &tidegate_tests::Reply| r.json()["remaining_count"].clone();
    assert!(
        left(&soon) == json!(10) || left(&soon) == json!(9),
        "{}",
        soon.text()
    );
    // ...and one TTL after the grab was acknowledged, every read shows it.
    tokio::time::sleep(Duration::from_millis(TTL_MS + 50).saturating_sub(granted.elapsed())).await;
    let fresh = get(&client, gw, &path).await;
    assert_eq!(left(&fresh), json!(9), "{}", fresh.text());
    assert_eq!(fresh.body, get(&client, backend.addr, &path).await.body);
    server.shutdown().await;
    backend.stop().await.unwrap();
}

/// A per-identity cache never serves one user's answer to another: alice's and bob's
/// reads of one path each reach the upstream (which echoes who asked), alice's second
/// read is a hit with her own answer, and a request claiming alice with another token is
/// not given alice's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_keeps_identities_apart() {
    let up = Upstream::start().await;
    let server = start_gateway(&cached_config(up.addr, 60_000)).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();
    let read = |user: &'static str, token: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://{gw}/envelopes/e1"))
                .header("x-app-id", "app")
                .header("x-user-id", user)
                .header("authorization", token)
                .body(full(Bytes::new()))
                .unwrap();
            let r = send(&client, req).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let who = r.json()["headers"]["authorization"]
                .as_str()
                .unwrap()
                .to_owned();
            (r.headers["x-cache"].to_str().unwrap().to_owned(), who)
        }
    };
    assert_eq!(
        read("alice", "Bearer a").await,
        ("miss".into(), "Bearer a".into())
    );
    assert_eq!(
        read("bob", "Bearer b").await,
        ("miss".into(), "Bearer b".into())
    );
    assert_eq!(
        read("alice", "Bearer a").await,
        ("hit".into(), "Bearer a".into())
    );
    assert_eq!(
        read("alice", "Bearer forged").await,
        ("miss".into(), "Bearer forged".into())
    );
    assert_eq!(up.hits(), 3);
    server.shutdown().await;
}

/// A cached answer still counts against limits: with a 3-per-user burst on `open`, a
/// user's fourth and fifth reads are refused 429 although the answer is kept, and the
/// upstream was asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_still_spend_quota() {
    let up = Upstream::start().await;
    let mut c = cached_config(up.addr, 60_000);
    set(
        &mut c,
        "limits",
        json!([{ "name": "open-per-user", "match": { "interfaces": ["open"] },
                 "key": ["user"], "rate": "1/min", "burst": 3 }]),
    );
    let server = start_gateway(&c).await;
    let gw = server.listen_addrs[0];
    let client = h1_client();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let req = Request::get(format!("http://{gw}/envelopes/e1"))
            .header("x-app-id", "app")
            .header("x-user-id", "alice")
            .body(full(Bytes::new()))
            .unwrap();
        let r = send(&client, req).await;
        let tag = r
            .headers
            .get("x-cache")
            .map(|v| v.to_str().unwrap().to_owned());
        seen.push((r.status.as_u16(), tag));
    }
    let tag = |t: &str| Some(t.to_owned());
    assert_eq!(
        seen,
        [
            (200, tag("miss")),
            (200, tag("hit")),
            (200, tag("hit")),
            (429, None),
            (429, None)
        ]
    );
    assert_eq!(up.hits(), 1);
    server.shutdown().await;
}
