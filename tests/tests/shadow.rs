//! Shadow mode end to end, for every rule kind: a known load from known users, and each
//! shadow counter equal to the count the `rules` crate's bucket function predicts, while no
//! request is answered, refused or shed by a rule in shadow mode.
//!
//! - a dry-run fallback and a route's `shadow_split` (`tidegate_shadow_fallback_total`,
//!   `tidegate_shadow_split_total`), and `explain` showing both beside the real verdict;
//! - a dry-run breaker in front of a dead upstream (`tidegate_shadow_breaker_total`);
//! - dry-run overload admission held at a floor (`tidegate_shadow_shed_total`).

use std::net::SocketAddr;

use serde_json::{Value, json};
use tidegate_tests::api::{bucket, start_gateway};
use tidegate_tests::{
    Client, Reply, Upstream, add_share_interface, config, dead_addr, get, grab_as, h1_client,
    post_as, set,
};

/// Users of the known load.
const USERS: usize = 200;

fn users() -> impl Iterator<Item = String> {
    (0..USERS).map(|i| format!("user-{i}"))
}

/// A `share` request as `user`.
async fn share(client: &Client, gw: SocketAddr, user: &str) -> Reply {
    post_as(client, gw, "/envelopes/7/share", "app", user).await
}

/// The value of one series in a Prometheus text exposition (0 when absent).
fn series(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

/// A dry-run fallback on `share` (40% of users) and a shadow split on the default route
/// (30% to `up2`): every request reaches `up`, and the two counters equal the users whose
/// buckets (under the rule's salt) fall in the 40% and the 30%. `explain` shows the shadow
/// verdicts beside the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_fallback_and_shadow_split_count_exactly() {
    let up = Upstream::start().await;
    let up2 = Upstream::start().await;
    let mut c = config(&[up.addr]);
    add_share_interface(&mut c);
    set(
        &mut c,
        "upstreams/up2",
        json!({ "endpoints": [up2.addr.to_string()] }),
    );
    set(
        &mut c,
        "routes/0/shadow_split",
        json!([{ "upstream": "up2", "weight": "30%" }, { "upstream": "up", "weight": "rest" }]),
    );
    set(
        &mut c,
        "fallbacks",
        json!([{ "name": "try-off", "match": { "interfaces": ["share"] }, "fraction": "40%",
                 "mode": "dry_run", "response": { "status": 418 } }]),
    );
    let server = start_gateway(&c).await;
    let (gw, client) = (server.listen_addrs[0], h1_client());

    for u in users() {
        assert_eq!(grab_as(&client, gw, "app", &u).await.status, 200, "{u}");
        assert_eq!(share(&client, gw, &u).await.status, 200, "{u}");
    }
    assert_eq!(
        (up.hits(), up2.hits()),
        (2 * USERS, 0),
        "nothing answered locally or moved"
    );

    let would_answer = users().filter(|u| bucket("try-off", u) < 400_000).count();
    // Both requests of a user would move: the route's salt is its name.
    let would_move = 2 * users().filter(|u| bucket("default", u) < 300_000).count();
    assert!(would_answer > 0 && would_move > 0);
    let m = get(&client, server.admin_addr, "/metrics").await.text();
    assert_eq!(
        series(&m, r#"tidegate_shadow_fallback_total{rule="try-off"}"#),
        would_answer as u64,
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            r#"tidegate_shadow_split_total{route="default",from="up",to="up2"}"#
        ),
        would_move as u64,
        "{m}"
    );
    assert_eq!(series(&m, r#"tidegate_fallbacks_total{rule="try-off"}"#), 0);

    // A user in both shadows: forwarded to `up`, with both shadow verdicts beside it.
    let who = users()
        .find(|u| bucket("try-off", u) < 400_000 && bucket("default", u) < 300_000)
        .expect("about 12% of users are in both");
    let e = get(
        &client,
        server.admin_addr,
        &format!("/admin/explain?app=app&user={who}&method=POST&path=/envelopes/7/share"),
    )
    .await
    .json();
    assert_eq!(e["answer"]["kind"], "upstream", "{e}");
    assert_eq!(e["answer"]["upstream"], "up", "{e}");
    assert_eq!(e["fallback"], Value::Null, "{e}");
    assert_eq!(e["shadow"]["fallback"]["rule"], "try-off", "{e}");
    assert_eq!(e["shadow"]["split"], "up2", "{e}");
    assert_eq!(e["decision"]["shadow_split"]["upstream"], "up2", "{e}");
    assert!(server.shutdown().await);
}

/// A dry-run breaker in front of a dead upstream: its state machine opens once after
/// `min_calls` failures (`would_open` 1), every later request is one it would have refused
/// (`would_reject`), and each is still forwarded (502), never given the breaker's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_breaker_counts_would_open_and_would_reject() {
    let up = Upstream::start().await;
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "upstreams/dead",
        json!({ "endpoints": [dead_addr().to_string()], "connect_timeout_ms": 1000 }),
    );
    c["routes"]
        .as_array_mut()
        .expect("routes is an array")
        .push(json!({ "name": "grab", "match": { "interfaces": ["grab"] }, "upstream": "dead" }));
    set(
        &mut c,
        "breakers",
        json!([{ "name": "dead-breaker", "upstream": "dead", "window_ms": 60000, "min_calls": 5,
                 "error_ratio": "50%", "open_ms": 600000, "mode": "dry_run",
                 "response": { "status": 418 } }]),
    );
    let server = start_gateway(&c).await;
    let (gw, client) = (server.listen_addrs[0], h1_client());

    let n = 20;
    for u in users().take(n) {
        assert_eq!(grab_as(&client, gw, "app", &u).await.status, 502, "{u}");
    }
    let m = get(&client, server.admin_addr, "/metrics").await.text();
    let shadow = |event: &str| {
        series(
            &m,
            &format!(
                r#"tidegate_shadow_breaker_total{{breaker="dead-breaker",upstream="dead",event="{event}"}}"#
            ),
        )
    };
    assert_eq!(shadow("would_open"), 1, "{m}");
    assert_eq!(shadow("would_reject"), n as u64 - 5, "{m}");
    assert!(!m.contains("tidegate_breaker_rejections_total{"), "{m}");
    assert!(!m.contains("tidegate_breaker_transitions_total{"), "{m}");
    let e = get(
        &client,
        server.admin_addr,
        "/admin/explain?app=app&user=u&method=POST&path=/envelopes/7/grab",
    )
    .await
    .json();
    assert_eq!(e["answer"]["upstream"], "dead", "{e}");
    assert_eq!(e["breaker"]["state"], "open", "{e}");
    assert_eq!(e["breaker"]["pass"], true, "{e}");
    assert_eq!(e["shadow"]["breaker"], "dead-breaker", "{e}");
    assert!(server.shutdown().await);
}

/// Dry-run admission with the floor at `normal`: every `share` request (low priority) is one
/// it would shed, counted by interface and served; `grab` (critical) is never counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_admission_counts_would_shed() {
    let up = Upstream::start().await;
    let mut c = config(&[up.addr]);
    add_share_interface(&mut c);
    set(
        &mut c,
        "overload",
        json!({ "enabled": true, "max_in_flight": 1000,
                "interfaces": { "share": { "priority": "low" }, "grab": { "priority": "critical" } },
                "admission": { "floor": "normal", "mode": "dry_run" } }),
    );
    let server = start_gateway(&c).await;
    let (gw, client) = (server.listen_addrs[0], h1_client());

    for u in users() {
        assert_eq!(share(&client, gw, &u).await.status, 200, "{u}");
        assert_eq!(grab_as(&client, gw, "app", &u).await.status, 200, "{u}");
    }
    assert_eq!(up.hits(), 2 * USERS, "nobody shed");
    let m = get(&client, server.admin_addr, "/metrics").await.text();
    assert_eq!(
        series(&m, r#"tidegate_shadow_shed_total{interface="share"}"#),
        USERS as u64,
        "{m}"
    );
    assert_eq!(
        series(&m, r#"tidegate_shadow_shed_total{interface="grab"}"#),
        0
    );
    assert_eq!(
        series(
            &m,
            r#"tidegate_overload_rejected_total{reason="admission",interface="share"}"#
        ),
        0,
        "{m}"
    );
    let e = get(
        &client,
        server.admin_addr,
        "/admin/explain?app=app&user=u&method=POST&path=/envelopes/7/share",
    )
    .await
    .json();
    assert_eq!(e["admission"]["admitted"], true, "{e}");
    assert_eq!(e["shadow"]["shed"], true, "{e}");
    assert!(server.shutdown().await);
}
