//! Hot-key protection end to end: a limit keyed on the envelope's path parameter refuses
//! the hot envelope beyond its rate while another envelope's requests all pass.

use serde_json::json;
use tidegate_tests::{
    Upstream, config_with_limits, get, grab_as, h1_client, post_as, start_gateway,
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

    let t0 = std::time::Instant::now();
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
