//! Only regular files are read, within a time bound: a FIFO, a Unix socket or a 2 GB sparse
//! file named like a rules fragment in `include_dir` is refused by name on a reload of the
//! real `tidegate` binary, quickly, while it keeps serving; a later good edit applies and
//! SIGTERM still exits promptly. `tidegate check` refuses a FIFO without hanging.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidegate_tests::{
    ChildGateway, Client, Upstream, config, dead_addr, get, h1_client, tidegate_bin,
};

/// The gateway's read bound (`tidegate::control::config::READ_TIMEOUT`).
const READ_BOUND: Duration = Duration::from_secs(5);
/// The shutdown grace the test configs set.
const GRACE_MS: u64 = 1000;

/// A config dir: `tidegate.json` including `rules.d/`, which holds `10-extra.json`.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new(upstream: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut main = config(&[upstream]);
        main["include_dir"] = json!("rules.d");
        main["server"]["shutdown_grace_ms"] = json!(GRACE_MS);
        std::fs::write(
            dir.path().join("tidegate.json"),
            serde_json::to_vec_pretty(&main).unwrap(),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("rules.d")).unwrap();
        let d = Self { dir };
        d.fragment("extra1");
        d
    }

    fn main(&self) -> PathBuf {
        self.dir.path().join("tidegate.json")
    }

    fn rules(&self, name: &str) -> PathBuf {
        self.dir.path().join("rules.d").join(name)
    }

    /// (Re)write the fragment with one interface named `name`.
    fn fragment(&self, name: &str) {
        let frag = json!({ "interfaces": [{ "name": name, "method": "GET", "path": format!("/{name}") }] });
        let tmp = self.rules(".10-extra.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&frag).unwrap()).unwrap();
        std::fs::rename(&tmp, self.rules("10-extra.json")).unwrap();
    }
}

async fn admin_config(client: &Client, admin: SocketAddr) -> Value {
    get(client, admin, "/admin/config").await.json()
}

/// Poll `/admin/config` until `done` holds, for at most `within`; the document and when.
async fn wait_config(
    client: &Client,
    admin: SocketAddr,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let c = admin_config(client, admin).await;
        if done(&c) {
            return (c, start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?}: {c}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A special file at `rules.d/zz.json` (made by `make`) is refused with an error naming it
/// and containing `phrase`; traffic flows; a later edit is still attempted and, once the file
/// is gone, applies; SIGTERM exits within the grace plus a margin.
async fn refused_while_serving(
    kind: &str,
    make: impl FnOnce(&Path) -> Box<dyn Send>,
    phrase: &str,
) {
    let up = Upstream::start().await;
    let dir = Dir::new(up.addr);
    let main = dir.main();
    let mut gw = ChildGateway::spawn_file(&main, dir.dir);
    let rules = |n: &str| main.parent().unwrap().join("rules.d").join(n);
    let client = h1_client();
    let (first, _) = wait_config(
        &client,
        gw.admin_addr,
        Duration::from_secs(10),
        "started",
        |c| c["generation"].as_u64().is_some(),
    )
    .await;
    let generation = first["generation"].as_u64().unwrap();

    let zz = rules("zz.json");
    let made = Instant::now();
    let _keep = make(&zz);
    // The create event triggers a reload within the debounce; the poll (2 s) is the fallback.
    let (c, latency) = wait_config(
        &client,
        gw.admin_addr,
        READ_BOUND + Duration::from_secs(3),
        &format!("{kind}: the error"),
        |c| {
            c["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("zz.json"))
        },
    )
    .await;
    let err = c["last_error"].as_str().unwrap().to_owned();
    eprintln!("{kind}: refused {:?} after creation: {err}", made.elapsed());
    assert!(err.contains(&zz.display().to_string()), "{kind}: {err}");
    assert!(err.contains(phrase), "{kind}: no {phrase:?} in {err}");
    assert!(
        latency < Duration::from_secs(3),
        "{kind}: the refusal took {latency:?}, as long as a stuck read"
    );
    assert_eq!(
        c["generation"].as_u64(),
        Some(generation),
        "old rules stay live"
    );

    // Traffic keeps flowing on the old rules.
    let r = get(&client, gw.addr, "/envelopes/1").await;
    assert_eq!(r.status, 200, "{kind}: {}", r.text());

    // A later edit is read again (the reloader is not blocked) and refused for the same file.
    let at = c["last_error_at_ms"].as_u64().unwrap();
    std::fs::write(rules("20-other.json"), b"{}").unwrap();
    let (c, _) = wait_config(
        &client,
        gw.admin_addr,
        Duration::from_secs(5),
        &format!("{kind}: the next attempt"),
        |c| c["last_error_at_ms"].as_u64() > Some(at),
    )
    .await;
    assert!(c["last_error"].as_str().unwrap().contains(phrase), "{c}");

    // Remove the special file; the next good edit applies.
    std::fs::remove_file(&zz).unwrap();
    let frag = json!({ "interfaces": [{ "name": "extra2", "method": "GET", "path": "/extra2" }] });
    let tmp = rules(".10-extra.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&frag).unwrap()).unwrap();
    std::fs::rename(&tmp, rules("10-extra.json")).unwrap();
    let (c, _) = wait_config(
        &client,
        gw.admin_addr,
        Duration::from_secs(5),
        &format!("{kind}: the good edit"),
        |c| c["generation"].as_u64() > Some(generation) && c["last_error"].is_null(),
    )
    .await;
    assert!(c["read_stuck"].is_null(), "{c}");
    let metrics = get(&client, gw.admin_addr, "/metrics").await.text();
    assert!(
        metrics.contains("tidegate_config_reloads_total{outcome=\"failed\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tidegate_config_read_stuck 0"),
        "{metrics}"
    );
    let r = get(&client, gw.addr, "/envelopes/1").await;
    assert_eq!(r.status, 200);

    let bound = Duration::from_millis(GRACE_MS) + Duration::from_secs(2);
    let (status, took) = gw
        .terminate(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{kind}: no exit within 20 s of SIGTERM"));
    eprintln!("{kind}: SIGTERM to exit {took:?}");
    assert!(status.success(), "{kind}: {status}");
    assert!(took < bound, "{kind}: exit took {took:?}");
}

fn mkfifo(path: &Path) {
    let s = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("running mkfifo");
    assert!(s.success(), "mkfifo failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_in_include_dir_is_refused() {
    refused_while_serving(
        "FIFO",
        |p| {
            mkfifo(p);
            Box::new(())
        },
        "is a FIFO (named pipe), not a regular file",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_in_include_dir_is_refused() {
    refused_while_serving(
        "socket",
        |p| Box::new(std::os::unix::net::UnixListener::bind(p).expect("binding a Unix socket")),
        "is a socket, not a regular file",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_2gb_file_in_include_dir_is_refused_unread() {
    refused_while_serving(
        "sparse file",
        |p| {
            let f = std::fs::File::create(p).unwrap();
            f.set_len(2 << 30).unwrap();
            Box::new(())
        },
        // The size from metadata: a file read up to the limit would not know it.
        "config is 2147483648 bytes, more than the limit of 16777216",
    )
    .await;
}

/// `tidegate check` on a config whose `include_dir` holds a FIFO exits 1 at once, naming it.
#[test]
fn check_refuses_a_fifo() {
    let dir = Dir::new(tidegate_tests::dead_addr());
    mkfifo(&dir.rules("zz.json"));
    let bin = tidegate_bin(); // built on first use: before the clock starts
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(["check", "--config"])
        .arg(dir.main())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tidegate check hung on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("check: exit {status} after {took:?}: {stderr}");
    assert_eq!(status.code(), Some(1), "{stderr}");
    let fifo = dir.rules("zz.json").display().to_string();
    assert!(
        stderr.contains(&format!("{fifo}: the file is a FIFO (named pipe)")),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(3), "check took {took:?}");
}

/// `/admin/config/history` once it lists `n` entries: an applied config is recorded just
/// after it goes live (the record never delays it), so it may trail the status by moments.
async fn history_of(client: &Client, admin: SocketAddr, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let h: Value = get(client, admin, "/admin/config/history").await.json();
        if h["entries"].as_array().is_some_and(|e| e.len() >= n) || Instant::now() > deadline {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every applied config is kept: `/admin/config/history` lists them newest first with what
/// changed; a broken edit is not recorded; `tidegate rollback --to 1` writes the first
/// config back (fragment and main file), the running gateway applies it, and the history
/// records the rollback as a new entry with the first one's hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_applied_configs_and_rollback_restores_one() {
    let up = Upstream::start().await;
    let dir = Dir::new(up.addr);
    let main = dir.main();
    let data = dir.dir.path().join("data/tidegate/history");
    let gw = ChildGateway::spawn_file(&main, dir.dir);
    let client = h1_client();
    let gen_is = |n: u64| move |c: &Value| c["generation"].as_u64() == Some(n);
    let (first, _) = wait_config(
        &client,
        gw.admin_addr,
        Duration::from_secs(10),
        "start",
        gen_is(1),
    )
    .await;
    let first_hash = first["hash"].as_str().unwrap().to_owned();

    // Two edits, and a broken one in between.
    let write_main = |edit: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_slice(&std::fs::read(&main).unwrap()).unwrap();
        edit(&mut v);
        let tmp = main.with_file_name(".tidegate.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        std::fs::rename(&tmp, &main).unwrap();
    };
    let rules_d = main.parent().unwrap().join("rules.d");
    std::fs::write(
        rules_d.join("20-limits.json"),
        r#"{"limits": [{"name": "per-user", "key": ["user"], "rate": "50/s"}]}"#,
    )
    .unwrap();
    wait_config(
        &client,
        gw.admin_addr,
        Duration::from_secs(5),
        "limit added",
        gen_is(2),
    )
    .await;
    std::fs::write(rules_d.join("30-broken.json"), "{ nope").unwrap();
    wait_config(
        &client,
        gw.admin_addr,
        Duration::from_secs(5),
        "broken refused",
        |c| {
            c["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("30-broken.json"))
        },
    )
    .await;
    std::fs::remove_file(rules_d.join("30-broken.json")).unwrap();
    write_main(&|v| v["upstreams"]["spare"] = json!({ "endpoints": ["127.0.0.1:9"] }));
    wait_config(
        &client,
        gw.admin_addr,
        Duration::from_secs(5),
        "upstream added",
        gen_is(3),
    )
    .await;

    let history = history_of(&client, gw.admin_addr, 3).await;
    eprintln!("{history:#}");
    let entries = history["entries"].as_array().unwrap();
    let summaries: Vec<&str> = entries
        .iter()
        .map(|e| e["summary"].as_str().unwrap())
        .collect();
    assert_eq!(
        summaries,
        vec![
            "upstreams: +spare",
            "limits: +per-user",
            "first recorded config"
        ],
        "{history}"
    );
    assert_eq!(entries[2]["hash"], first_hash.as_str());
    assert_eq!(entries[2]["trigger"], "start");
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 3);

    // Roll back to the first: the limit fragment is moved aside, the main file restored.
    let out = Command::new(tidegate_bin())
        .args(["rollback", "--config"])
        .arg(&main)
        .args(["--to", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("moved aside") && stdout.contains("20-limits.json"),
        "{stdout}"
    );
    let (c, _) = wait_config(
        &client,
        gw.admin_addr,
        Duration::from_secs(5),
        "rolled back",
        |c| c["hash"] == first_hash.as_str(),
    )
    .await;
    assert_eq!(c["generation"], 4, "{c}");
    let history = history_of(&client, gw.admin_addr, 4).await;
    let newest = &history["entries"][0];
    assert_eq!(
        (newest["id"].as_u64(), newest["hash"].as_str()),
        (Some(4), Some(first_hash.as_str()))
    );
    assert_eq!(
        newest["summary"], "upstreams: -spare; limits: -per-user",
        "{history}"
    );

    // An entry that does not exist is refused; nothing changes.
    let out = Command::new(tidegate_bin())
        .args(["rollback", "--config"])
        .arg(&main)
        .args(["--to", "99"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("00000099.json"));
}

/// A change freeze around now: `old`'s route to `v1`, a plan `gala` that answers every
/// request 503 locally, and a window from 2000 to 2100 (offsets on purpose: the window is
/// judged in absolute time).
fn frozen(v1: SocketAddr, v2: SocketAddr) -> Value {
    let mut c = config(&[v1]);
    c["upstreams"] = json!({
        "v1": { "endpoints": [v1.to_string()] },
        "v2": { "endpoints": [v2.to_string()] }
    });
    c["routes"] = json!([{ "name": "main", "upstream": "v1" }]);
    c["plans"] = json!({ "gala": { "fallbacks": [
        { "name": "lite", "fraction": "100%", "response": { "status": 503 } }
    ]}});
    c["freeze"] = json!({
        "name": "gala-night",
        "start": "2000-01-01T08:00:00+08:00",
        "end": "2100-01-01T00:00:00-05:00"
    });
    c
}

/// During a freeze a route edit is refused, naming the frozen path, while traffic stays on
/// the old upstream; an `active_plans` edit applies; moving the freeze's end into the past
/// applies too, and then the route edit does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_refuses_frozen_edits_and_applies_editable_ones() {
    let (v1, v2) = (Upstream::start().await, Upstream::start().await);
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("tidegate.json");
    let write = |v: &Value| {
        let tmp = main.with_file_name(".tidegate.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(v).unwrap()).unwrap();
        std::fs::rename(&tmp, &main).unwrap();
    };
    let mut cfg = frozen(v1.addr, v2.addr);
    write(&cfg);
    let gw = ChildGateway::spawn_file(&main, dir);
    let client = h1_client();
    let within = Duration::from_secs(5);
    let (c, _) = wait_config(&client, gw.admin_addr, within, "start", |c| {
        c["generation"] == 1
    })
    .await;
    assert_eq!(c["freeze"]["active"], true, "{c}");
    assert_eq!(c["freeze"]["editable"], json!(["active_plans"]), "{c}");

    // A route edit: refused, the old route stays live.
    let mut edit = cfg.clone();
    edit["routes"][0]["upstream"] = json!("v2");
    write(&edit);
    let (c, _) = wait_config(&client, gw.admin_addr, within, "route edit refused", |c| {
        c["last_error"].is_string()
    })
    .await;
    let err = c["last_error"].as_str().unwrap();
    assert!(
        err.contains("freeze: routes/main/upstream is frozen until 2100-01-01T00:00:00-05:00")
            && err.contains("(window \"gala-night\"); editable: active_plans"),
        "{err}"
    );
    assert_eq!(c["generation"], 1, "{c}");
    for _ in 0..3 {
        assert_eq!(get(&client, gw.addr, "/envelopes/1").await.status, 200);
    }
    assert_eq!(
        (v1.hits(), v2.hits()),
        (3, 0),
        "traffic stays on the old route"
    );
    // Counted as failed (once per file event: on a loaded machine one save can reach the
    // watcher as two, each refused the same way).
    let metrics = get(&client, gw.admin_addr, "/metrics").await.text();
    assert!(
        metrics.contains("tidegate_config_reloads_total{outcome=\"failed\"}"),
        "{metrics}"
    );

    // Switching the plan on is editable: it applies, and the plan answers.
    cfg["active_plans"] = json!(["gala"]);
    write(&cfg);
    wait_config(&client, gw.admin_addr, within, "plan switched on", |c| {
        c["generation"] == 2 && c["last_error"].is_null()
    })
    .await;
    assert_eq!(get(&client, gw.addr, "/envelopes/1").await.status, 503);

    // Ending the freeze (in the past) applies, plan off in the same save being editable.
    cfg["freeze"]["end"] = json!("2001-01-01T00:00:00Z");
    cfg["active_plans"] = json!([]);
    write(&cfg);
    let (c, _) = wait_config(&client, gw.admin_addr, within, "freeze ended", |c| {
        c["generation"] == 3
    })
    .await;
    assert_eq!(c["freeze"]["active"], false, "{c}");
    let logged = gw
        .log_lines()
        .into_iter()
        .find(|l| l.contains("change freeze edited"))
        .expect("the freeze edit is logged");
    assert!(
        logged.contains("WARN")
            && logged.contains("2100-01-01T00:00:00-05:00")
            && logged.contains("2001-01-01T00:00:00Z"),
        "with the old and new window: {logged}"
    );

    // Now the route edit applies.
    cfg["routes"][0]["upstream"] = json!("v2");
    write(&cfg);
    wait_config(&client, gw.admin_addr, within, "route edit applied", |c| {
        c["generation"] == 4 && c["last_error"].is_null()
    })
    .await;
    assert_eq!(get(&client, gw.addr, "/envelopes/1").await.status, 200);
    assert_eq!((v1.hits(), v2.hits()), (3, 1), "the new route is live");
}

/// `tidegate check --at T --against LIVE` refuses what a reload at T would refuse (exit 1,
/// every frozen path listed) and accepts it outside the window; `--at` alone reports the
/// file's own window.
#[test]
fn check_at_reports_what_a_reload_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let (live, new) = (dir.path().join("live.json"), dir.path().join("new.json"));
    let mut cfg = frozen(dead_addr(), dead_addr());
    cfg["freeze"]["end"] = json!("2026-12-31T23:30:00+08:00");
    std::fs::write(&live, serde_json::to_vec(&cfg).unwrap()).unwrap();
    cfg["routes"][0]["upstream"] = json!("v2");
    cfg["active_plans"] = json!(["gala"]);
    std::fs::write(&new, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let check = |args: &[&str]| {
        let out = Command::new(tidegate_bin())
            .arg("check")
            .arg("--config")
            .arg(&new)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let live = live.to_str().unwrap();
    let (code, out) = check(&["--at", "2026-12-31T12:00:00Z", "--against", live]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("frozen: routes/main/upstream\n"), "{out}");
    assert!(!out.contains("frozen: active_plans"), "{out}");
    let (code, out) = check(&["--at", "2026-12-31T15:30:00Z", "--against", live]);
    assert_eq!(code, Some(0), "the end is exclusive: {out}");
    assert!(out.contains("would apply this edit"), "{out}");
    let (code, out) = check(&["--at", "2026-12-31T20:00:00+08:00"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("active at 2026-12-31T20:00:00+08:00; editable: active_plans"),
        "{out}"
    );
}
