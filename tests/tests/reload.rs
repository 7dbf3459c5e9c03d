//! Hot reload end to end: config rewrites under continuous load, by atomic rename, by
//! in-place truncate-and-write and by a Kubernetes ConfigMap-style symlink swap; broken edits
//! keep the old rules; the next good edit applies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use serde_json::{Value, json};
use tidegate_tests::api;
use tidegate_tests::{Client, Upstream, config, full, get, h1_client, set};

/// Config with a canary split of `grab` traffic between v1 and v2 at `ppm`.
fn canary(v1: SocketAddr, v2: SocketAddr, ppm: u32) -> Value {
    let mut c = config(&[v1]);
    c["upstreams"] = json!({
        "v1": { "endpoints": [v1.to_string()] },
        "v2": { "endpoints": [v2.to_string()] }
    });
    set(
        &mut c,
        "routes",
        json!([
            { "name": "default", "upstream": "v1" },
            { "name": "canary", "match": { "interfaces": ["grab"] },
              "split": [ { "upstream": "v2", "weight_ppm": ppm }, { "upstream": "v1", "weight": "rest" } ] }
        ]),
    );
    c
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap()
}

/// How a test writes the config file.
#[derive(Debug, Clone, Copy)]
enum Writer {
    /// Write a temp file in the same directory and rename it over the config.
    Rename,
    /// Truncate the config in place, then write it (what `cp` and many tools do).
    InPlace,
    /// Kubernetes ConfigMap: `tidegate.json -> ..data/tidegate.json`, `..data -> ..gen_N`,
    /// updated by creating `..gen_N+1` and atomically renaming a new `..data` symlink.
    ConfigMap,
}

struct ConfigDir {
    dir: tempfile::TempDir,
    writer: Writer,
    generation: u32,
}

impl ConfigDir {
    fn new(writer: Writer, first: &[u8]) -> Self {
        let mut d = Self {
            dir: tempfile::tempdir().unwrap(),
            writer,
            generation: 0,
        };
        match writer {
            Writer::ConfigMap => {
                d.write(first);
                std::os::unix::fs::symlink("..data/tidegate.json", d.path()).unwrap();
            }
            _ => std::fs::write(d.path(), first).unwrap(),
        }
        d
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("tidegate.json")
    }

    fn write(&mut self, content: &[u8]) {
        let root = self.dir.path();
        match self.writer {
            Writer::Rename => {
                let tmp = root.join(".tidegate.json.tmp");
                std::fs::write(&tmp, content).unwrap();
                std::fs::rename(&tmp, self.path()).unwrap();
            }
            Writer::InPlace => {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(self.path())
                    .unwrap();
                // Two writes with a pause: the watcher may well see the half-written file.
                let half = content.len() / 2;
                f.write_all(&content[..half]).unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(2));
                f.write_all(&content[half..]).unwrap();
            }
            Writer::ConfigMap => {
                self.generation += 1;
                let gen_dir = format!("..gen_{}", self.generation);
                std::fs::create_dir(root.join(&gen_dir)).unwrap();
                std::fs::write(root.join(&gen_dir).join("tidegate.json"), content).unwrap();
                let tmp = root.join("..data_tmp");
                std::os::unix::fs::symlink(&gen_dir, &tmp).unwrap();
                std::fs::rename(&tmp, root.join("..data")).unwrap();
            }
        }
    }
}

/// The canary ppm the gateway's live rules give, through the admin port.
async fn live_ppm(client: &Client, admin: SocketAddr) -> Option<u64> {
    let r = get(
        client,
        admin,
        "/admin/explain?method=POST&path=/envelopes/1/grab&user=u",
    )
    .await;
    r.json()["decision"]["split"][0]["ppm"].as_u64()
}

/// Continuous load: `conns` tasks each send grab requests until `stop`; any status other than
/// 200 or any error counts as a failure.
fn start_load(
    gw: SocketAddr,
    conns: usize,
    stop: Arc<AtomicBool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks = (0..conns)
        .map(|c| {
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                let client = h1_client();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let req = Request::post(format!("http://{gw}/envelopes/1/grab"))
                        .header("x-user-id", format!("user-{c}-{i}"))
                        .body(full(Bytes::new()))
                        .unwrap();
                    match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                        Ok(Ok(resp)) if resp.status() == 200 => {
                            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            eprintln!("failed request: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Paced, so the two cores still have room for the reloads being timed.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    (ok, failed, tasks)
}

/// Rewrite the config `rounds` times with `writer`, alternating the canary between two
/// weights, under continuous load; return the slowest time for a write to be in force.
async fn rewrites_under_load(writer: Writer, rounds: usize) -> Duration {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let weights = [10_000u32, 500_000];
    let mut dir = ConfigDir::new(writer, &bytes(&canary(v1.addr, v2.addr, weights[0])));
    let server = api::start_from_file(&dir.path()).await.expect("starts");
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();
    assert_eq!(live_ppm(&client, admin).await, Some(u64::from(weights[0])));

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, tasks) = start_load(gw, 16, stop.clone());
    let mut slowest = Duration::ZERO;
    for round in 1..=rounds {
        let want = weights[round % 2];
        dir.write(&bytes(&canary(v1.addr, v2.addr, want)));
        // From the moment the write returned: the write itself can stall for hundreds of
        // milliseconds behind another process's fsync (the file system's journal), which is
        // not the reload's time.
        let written = Instant::now();
        loop {
            if live_ppm(&client, admin).await == Some(u64::from(want)) {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "{writer:?} round {round}: not applied after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        slowest = slowest.max(written.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let status = server.reloader.as_ref().unwrap().status();
    assert_eq!(
        status.generation,
        1 + rounds as u64,
        "{writer:?}: every rewrite applied once: {status:?}"
    );
    assert!(
        status.last_error.is_none() || matches!(writer, Writer::InPlace),
        "{status:?}"
    );
    assert!(server.shutdown().await);
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "{writer:?}: {failed} failed requests of {}",
        ok + failed
    );
    assert!(ok > 100, "{writer:?}: the load ran ({ok} requests)");
    assert!(
        v1.hits() > 0 && v2.hits() > 0,
        "both weights were in force at some point"
    );
    slowest
}

/// 102 rewrites (34 per method) alternating a canary weight under 16 connections of
/// continuous load: zero failed requests, and every write is in force within 250 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_apply_fast_and_drop_nothing() {
    for writer in [Writer::Rename, Writer::InPlace, Writer::ConfigMap] {
        let slowest = rewrites_under_load(writer, 34).await;
        eprintln!("{writer:?}: slowest write-to-in-force {slowest:?}");
        assert!(
            slowest <= Duration::from_millis(250),
            "{writer:?}: slowest {slowest:?}"
        );
    }
}

/// Broken edits (truncated JSON, unknown field, weights not summing, a dangling upstream,
/// an ambiguous pair of rules, a deleted file, a dangling symlink) keep the old rules
/// serving and report the error with its place; the next good edit applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edits_keep_old_rules() {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let good = canary(v1.addr, v2.addr, 10_000);
    let mut dir = ConfigDir::new(Writer::Rename, &bytes(&good));
    let server = api::start_from_file(&dir.path()).await.expect("starts");
    let reloader = server.reloader.clone().unwrap();
    let client = h1_client();
    let admin = server.admin_addr;

    let mut unknown = good.clone();
    unknown["routes"][1]["spilt"] = json!([]);
    let mut not_summing = good.clone();
    not_summing["routes"][1]["split"][1] = json!({ "upstream": "v1", "weight": "90%" });
    let mut dangling = good.clone();
    dangling["routes"][0]["upstream"] = json!("v9");
    let mut ambiguous = good.clone();
    ambiguous["routes"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "other", "match": { "interfaces": ["grab"] }, "upstream": "v2" }));
    let good_text = bytes(&good);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good_text[..good_text.len() / 2].to_vec(),
            "EOF while parsing",
        ),
        ("empty", Vec::new(), "empty config"),
        (
            "unknown field",
            bytes(&unknown),
            "routes[1].spilt: unknown field `spilt`",
        ),
        (
            "weights",
            bytes(&not_summing),
            "routes[1].split: weights sum to",
        ),
        (
            "dangling upstream",
            bytes(&dangling),
            "routes[0].upstream: unknown upstream \"v9\"",
        ),
        (
            "ambiguous",
            bytes(&ambiguous),
            "can match the same request with the same specificity",
        ),
    ];
    let mut generation = reloader.status().generation;
    for (i, (what, content, expect)) in cases.iter().enumerate() {
        dir.write(content);
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = loop {
            if let Some(e) = reloader.status().last_error.filter(|e| e.contains(expect)) {
                break e;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no error reported: {:?}",
                reloader.status()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(
            err.contains("tidegate.json:"),
            "{what}: error names the file and place: {err}"
        );
        assert_eq!(
            live_ppm(&client, admin).await,
            Some(10_000),
            "{what}: old rules still live"
        );
        assert_eq!(
            reloader.status().generation,
            generation,
            "{what}: nothing applied"
        );
        // The admin port shows the error too.
        let shown = get(&client, admin, "/admin/config").await.json();
        assert!(
            shown["last_error"].as_str().unwrap().contains(expect),
            "{what}: {shown}"
        );
        // Recover with a good edit (a new weight each time so it is a real change).
        let ppm = 20_000 + i as u32;
        dir.write(&bytes(&canary(v1.addr, v2.addr, ppm)));
        let deadline = Instant::now() + Duration::from_secs(5);
        while live_ppm(&client, admin).await != Some(u64::from(ppm)) {
            assert!(Instant::now() < deadline, "{what}: good edit not applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        generation += 1;
        assert!(
            reloader.status().last_error.is_none(),
            "{what}: cleared by the good edit"
        );
        // Put the baseline weight back for the next case.
        dir.write(&good_text);
        while live_ppm(&client, admin).await != Some(10_000) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        generation += 1;
    }

    // A deleted file, then a dangling symlink in its place: old rules stay; SIGHUP-style
    // reload attempts report it.
    std::fs::remove_file(dir.path()).unwrap();
    let t = Instant::now();
    assert_eq!(reloader.reload("test", t).await, api::ReloadOutcome::Failed);
    assert!(
        reloader
            .status()
            .last_error
            .unwrap()
            .contains("does not exist")
    );
    std::os::unix::fs::symlink(dir.dir.path().join("missing.json"), dir.path()).unwrap();
    assert_eq!(reloader.reload("test", t).await, api::ReloadOutcome::Failed);
    assert!(
        reloader
            .status()
            .last_error
            .unwrap()
            .contains("dangling symbolic link")
    );
    assert_eq!(live_ppm(&client, admin).await, Some(10_000));
    std::fs::remove_file(dir.path()).unwrap();
    dir.write(&bytes(&canary(v1.addr, v2.addr, 30_000)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while live_ppm(&client, admin).await != Some(30_000) {
        assert!(
            Instant::now() < deadline,
            "recovered after the file came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = get(&client, admin, "/metrics").await.text();
    assert!(
        metrics.contains("tidegate_config_reloads_total{outcome=\"failed\"}"),
        "{metrics}"
    );
    assert!(server.shutdown().await);
}

/// Rewriting identical content is a no-op: the generation does not move.
#[tokio::test]
async fn identical_rewrite_is_noop() {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let text = bytes(&canary(v1.addr, v2.addr, 10_000));
    let dir = ConfigDir::new(Writer::Rename, &text);
    let server = api::start_from_file(&dir.path()).await.expect("starts");
    let r = server.reloader.clone().unwrap();
    std::fs::write(dir.path(), &text).unwrap();
    assert_eq!(
        r.reload("test", Instant::now()).await,
        api::ReloadOutcome::Unchanged
    );
    assert_eq!(r.status().generation, 1);
    assert!(server.shutdown().await);
}

/// A config split over a main file and an included rules directory reloads as one
/// snapshot: editing a fragment applies, a broken fragment is refused with its own file and
/// place named, and the next good edit applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn included_rules_dir_reloads_as_one() {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let mut main = canary(v1.addr, v2.addr, 10_000);
    // The canary rule moves to a fragment; the main file keeps the default route.
    let canary_rule = main["routes"][1].clone();
    main["routes"].as_array_mut().unwrap().truncate(1);
    main["include_dir"] = json!("rules.d");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules.d")).unwrap();
    let frag_path = dir.path().join("rules.d/20-canary.json");
    let frag = |ppm: u32| {
        let mut r = canary_rule.clone();
        r["split"][0]["weight_ppm"] = json!(ppm);
        bytes(&json!({ "routes": [r] }))
    };
    std::fs::write(&frag_path, frag(10_000)).unwrap();
    // An editor's swap file in the directory is ignored.
    std::fs::write(dir.path().join("rules.d/.20-canary.json.swp"), b"garbage").unwrap();
    let main_path = dir.path().join("tidegate.json");
    std::fs::write(&main_path, bytes(&main)).unwrap();

    let server = api::start_from_file(&main_path).await.expect("starts");
    let (client, admin) = (h1_client(), server.admin_addr);
    assert_eq!(live_ppm(&client, admin).await, Some(10_000));

    let wait_for = |want: u64| {
        let client = client.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while live_ppm(&client, admin).await != Some(want) {
                assert!(Instant::now() < deadline, "ppm {want} not applied");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    std::fs::write(&frag_path, frag(70_000)).unwrap();
    wait_for(70_000).await;

    std::fs::write(
        &frag_path,
        b"{\n  \"routes\": [ {\"name\": \"canary\", \"upstream\": \"nope\"} ]\n}",
    )
    .unwrap();
    let reloader = server.reloader.clone().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        if let Some(e) = reloader.status().last_error {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "the broken fragment was not reported"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        err.contains("rules.d/20-canary.json:2:46 routes[0].upstream: unknown upstream \"nope\""),
        "{err}"
    );
    assert_eq!(
        live_ppm(&client, admin).await,
        Some(70_000),
        "old rules still live"
    );

    std::fs::write(&frag_path, frag(90_000)).unwrap();
    wait_for(90_000).await;
    assert!(reloader.status().last_error.is_none());

    // `tidegate check` reads the same set.
    let loaded = api::read_config(&main_path).expect("the set checks");
    assert_eq!(loaded.config.routes.len(), 2);
    assert!(server.shutdown().await);
}

/// A per-user limit keeps its state across a reload that changes an unrelated rule (a user
/// at the limit stays limited, another user is unaffected); a reload that changes the limit
/// itself gives it the new rate, fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_state_survives_unrelated_reloads() {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let with_limit = |ppm: u32, rate: &str| {
        let mut c = canary(v1.addr, v2.addr, ppm);
        c["limits"] = json!([{ "name": "per-user-grab", "match": { "interfaces": ["grab"] },
                               "key": ["user"], "rate": rate }]);
        bytes(&c)
    };
    let mut dir = ConfigDir::new(Writer::Rename, &with_limit(10_000, "5/min"));
    let server = api::start_from_file(&dir.path()).await.expect("starts");
    let (gw, admin) = (server.listen_addrs[0], server.admin_addr);
    let client = h1_client();
    let grab = |user: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::post(format!("http://{gw}/envelopes/1/grab"))
                .header("x-user-id", user)
                .body(full(Bytes::new()))
                .unwrap();
            tidegate_tests::send(&client, req).await.status
        }
    };
    for _ in 0..5 {
        assert_eq!(grab("alice").await, 200);
    }
    assert_eq!(grab("alice").await, 429, "alice is at her limit");

    // An unrelated edit: the canary weight. Alice stays limited; bob is fresh.
    dir.write(&with_limit(20_000, "5/min"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while live_ppm(&client, admin).await != Some(20_000) {
        assert!(Instant::now() < deadline, "edit not applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        grab("alice").await,
        429,
        "an unrelated edit must not hand out a fresh burst"
    );
    assert_eq!(grab("bob").await, 200);

    // Changing the limit itself: the new rate applies, from a fresh state.
    let generation = server.reloader.as_ref().unwrap().status().generation;
    dir.write(&with_limit(20_000, "100/min"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.reloader.as_ref().unwrap().status().generation == generation {
        assert!(Instant::now() < deadline, "limit edit not applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..20 {
        assert_eq!(grab("alice").await, 200, "request {i} under the new rate");
    }
    assert!(server.shutdown().await);
}
