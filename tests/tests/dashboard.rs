//! The operator's dashboard in a real browser: headless Chromium loads `/admin/` from a gateway
//! under generated load (the grab interface with a hot user over its per-user limit, a 20%
//! canary, the open interface), and the rendered page shows the grab row with a non-zero
//! rate, the hot user's traffic in the limited column and the canary's observed share. The
//! page's rates and `/admin/status.json`'s per-second series agree with the load generator's
//! own count within 5% over the same 10 s window. A screenshot is saved as
//! `target/dashboard.png`.
//!
//! Chromium is Debian's `chromium` (`.ci/run` installs it). Without it the test is skipped
//! loudly, except under `CI=true`, where a missing browser fails it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::Request;
use serde_json::{Value, json};
use tidegate_tests::api;
use tidegate_tests::{Client, Upstream, config, full, get, h1_client, set};

const CHROMIUM: &str = "/usr/bin/chromium";
/// How long the generator runs at least: it goes on until the browser has read the page,
/// so a browser slow to start on a busy machine still sees the load live.
const LOAD: Duration = Duration::from_secs(14);
/// The longest the generator runs, whatever the browser does.
const LOAD_MAX: Duration = Duration::from_secs(120);

/// Unix milliseconds now (the gateway stamps its seconds with the same clock).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// Completion times (Unix ms) of every answered request, per interface.
#[derive(Debug, Default)]
struct Counts(Mutex<HashMap<&'static str, Vec<u64>>>);

impl Counts {
    fn add(&self, iface: &'static str, at_ms: u64) {
        self.0
            .lock()
            .expect("not poisoned")
            .entry(iface)
            .or_default()
            .push(at_ms);
    }

    /// Requests of `iface` answered in `(start_ms, end_ms]`.
    fn between(&self, iface: &str, start_ms: u64, end_ms: u64) -> usize {
        self.0
            .lock()
            .expect("not poisoned")
            .get(iface)
            .map_or(0, |v| {
                v.iter().filter(|&&t| t > start_ms && t <= end_ms).count()
            })
    }
}

/// What every sender shares.
#[derive(Debug)]
struct Load {
    client: Client,
    gw: SocketAddr,
    until: Instant,
    /// Set once the page has been read (and `LOAD` has passed).
    stop: std::sync::atomic::AtomicBool,
    counts: Counts,
}

/// One paced sender: `rate` requests per second to `path` as `user` until the load ends.
async fn sender(
    load: Arc<Load>,
    iface: &'static str,
    method: http::Method,
    path: String,
    user: String,
    rate: u32,
) {
    let Load {
        client,
        gw,
        until,
        stop,
        counts,
    } = &*load;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < *until {
        tick.tick().await;
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{gw}{path}"))
            .header("x-app-id", "douyin")
            .header("x-user-id", &user)
            .body(full(Bytes::new()))
            .expect("a valid request");
        if let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
        {
            // The gateway counts a request when its answer is ready; so do we.
            counts.add(iface, unix_ms());
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        }
    }
}

/// Run Chromium headless with `args` on `url`, killed after `limit`; returns its stdout.
fn chromium(args: &[&str], url: &str, limit: Duration) -> String {
    // One browser at a time: three starting together on a 2-core machine that is also
    // running the gateway and its load can each take over a minute.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let profile = tempfile::tempdir().expect("a temp dir");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromium");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("waiting for chromium").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("the reader thread")
}

/// The `data-value` of the element with `attr` inside the first element opening with `open`
/// (a crude but sufficient reading of Chromium's serialized DOM).
fn data_value(dom: &str, open: &str, attr: &str) -> Option<String> {
    let start = dom.find(open)?;
    let row = &dom[start..];
    let row = &row[..row.find("</tr>").unwrap_or(row.len())];
    let cell = &row[row.find(attr)?..];
    let v = &cell[cell.find("data-value=\"")? + 12..];
    Some(v[..v.find('"')?].to_owned())
}

fn attr_value(dom: &str, id: &str, attr: &str) -> Option<String> {
    let el = &dom[dom.find(&format!("id=\"{id}\""))?..];
    let el = &el[..el.find('>')?];
    let v = &el[el.find(&format!("{attr}=\""))? + attr.len() + 2..];
    Some(v[..v.find('"')?].to_owned())
}

fn workspace_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Within 5%: `|a - b| <= 5% of b`.
fn agrees(page: f64, generator: f64) -> bool {
    (page - generator).abs() <= 0.05 * generator
}

/// Under load, the dashboard shows the grab interface's rate, the hot user's limited traffic
/// and the canary's observed share; its rates match the generator's count within 5%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_load() {
    if !Path::new(CHROMIUM).exists() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci,
            "CI=true but {CHROMIUM} is missing (.ci/run installs it)"
        );
        eprintln!(
            "SKIPPED dashboard_shows_live_load: {CHROMIUM} not found (apt-get install chromium)"
        );
        return;
    }
    let up = Upstream::start().await;
    let canary = Upstream::start().await;
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
            { "name": "grab-canary", "match": { "interfaces": ["grab"] },
              "split": [ { "upstream": "canary", "weight": "20%" },
                         { "upstream": "up", "weight": "rest" } ] }
        ]),
    );
    set(
        &mut c,
        "limits",
        json!([
            { "name": "grab-per-user", "match": { "interfaces": ["grab"] },
              "key": ["user"], "rate": "20/s", "burst": 20 },
            { "name": "grab-total", "match": { "interfaces": ["grab"] }, "rate": "220/s" },
            { "name": "open-per-app", "match": { "interfaces": ["open"] },
              "key": ["app"], "rate": "500/s" }
        ]),
    );
    // Started from a file, so the config panel has a file, generation and hash.
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("tidegate.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&c).expect("serializes")).expect("writing");
    let server = tokio::time::timeout(Duration::from_secs(15), api::start_from_file(&file))
        .await
        .expect("starts in time")
        .expect("starts");
    let gw = server.listen_addrs[0];
    let admin = server.admin_addr;

    // The load: ten users at 15/s and one hot user at 60/s on grab (20/s per user allowed),
    // five users at 10/s on open.
    let load = Arc::new(Load {
        client: h1_client(),
        gw,
        until: Instant::now() + LOAD_MAX,
        stop: std::sync::atomic::AtomicBool::new(false),
        counts: Counts::default(),
    });
    let counts = &load.counts;
    let load_start_ms = unix_ms();
    let load_started = Instant::now();
    let mut senders = Vec::new();
    let mut spawn = |iface, method, path: String, user: String, rate| {
        senders.push(tokio::spawn(sender(
            load.clone(),
            iface,
            method,
            path,
            user,
            rate,
        )));
    };
    for i in 0..10 {
        spawn(
            "grab",
            http::Method::POST,
            format!("/envelopes/{i}/grab"),
            format!("user-{i}"),
            15,
        );
    }
    spawn(
        "grab",
        http::Method::POST,
        "/envelopes/9/grab".into(),
        "hot-user".into(),
        60,
    );
    for i in 0..5 {
        spawn(
            "open",
            http::Method::GET,
            format!("/envelopes/{i}"),
            format!("reader-{i}"),
            10,
        );
    }

    // Let ten full seconds accumulate, then look at the page while the load runs.
    tokio::time::sleep(Duration::from_millis(11_500)).await;
    let url = format!("http://{admin}/admin/");
    let dom = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            chromium(
                &["--virtual-time-budget=3000", "--dump-dom"],
                &url,
                Duration::from_secs(60),
            )
        })
        .await
        .expect("the chromium task")
    };
    let shot = workspace_target().join("dashboard.png");
    {
        let url = url.clone();
        let arg = format!("--screenshot={}", shot.display());
        tokio::task::spawn_blocking(move || {
            chromium(
                &[
                    &arg,
                    "--window-size=1400,1000",
                    "--hide-scrollbars",
                    "--virtual-time-budget=3000",
                ],
                &url,
                Duration::from_secs(60),
            )
        })
        .await
        .expect("the chromium task");
    }
    tokio::time::sleep_until((load_started + LOAD).into()).await;
    load.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.await.expect("a sender");
    }
    let load_end_ms = unix_ms();

    // The page.
    assert!(
        dom.contains("data-state=\"live\""),
        "the page is not live:\n{dom}"
    );
    let grab_row = "data-interface=\"grab\"";
    let rate: f64 = data_value(&dom, grab_row, "data-col=\"rate\"")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no grab rate on the page:\n{dom}"));
    let limited: f64 = data_value(&dom, grab_row, "data-col=\"limited\"")
        .and_then(|v| v.parse().ok())
        .expect("a limited column");
    let share: f64 = data_value(
        &dom,
        "data-canary=\"grab-canary\" data-target=\"canary\"",
        "data-col=\"observed\"",
    )
    .and_then(|v| v.parse().ok())
    .expect("the canary's observed share");
    assert!(rate > 0.0, "grab rate {rate}");
    assert!(
        limited > 10.0,
        "the hot user's limited traffic: {limited}/s"
    );
    assert!(
        (0.1..0.3).contains(&share),
        "the 20% canary's observed share is {share}"
    );
    // The page's rate against the generator's count over the very window it shows.
    let ws: u64 = attr_value(&dom, "window", "data-start-ms")
        .and_then(|v| v.parse().ok())
        .expect("the page's window start");
    let we: u64 = attr_value(&dom, "window", "data-end-ms")
        .and_then(|v| v.parse().ok())
        .expect("the page's window end");
    let secs = (we - ws) as f64 / 1000.0;
    let gen_rate = counts.between("grab", ws, we) as f64 / secs;
    eprintln!(
        "page: grab {rate:.1}/s over {secs:.1} s, generator {gen_rate:.1}/s; limited {limited:.1}/s; canary share {share:.3}"
    );
    assert!(
        agrees(rate, gen_rate),
        "page {rate:.1}/s vs generator {gen_rate:.1}/s"
    );

    // /admin/status.json's per-second series against the generator, over the last ten
    // seconds that lie wholly inside the load.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status: Value = get(&h1_client(), admin, "/admin/status.json").await.json();
    let t: Vec<u64> = status["series"]["t_ms"]
        .as_array()
        .expect("t_ms")
        .iter()
        .map(|v| v.as_u64().expect("ms"))
        .collect();
    let start_ms = status["series"]["start_ms"].as_u64().expect("start_ms");
    let inside: Vec<usize> = (0..t.len())
        .filter(|&i| {
            let from = if i == 0 { start_ms } else { t[i - 1] };
            from >= load_start_ms + 500 && t[i] <= load_end_ms
        })
        .collect();
    assert!(
        inside.len() >= 10,
        "only {} whole seconds under load",
        inside.len()
    );
    let window = &inside[inside.len() - 10..];
    let (from, to) = (t[window[0] - 1], t[window[9]]);
    for iface in ["grab", "open"] {
        let series = status["series"]["interfaces"]
            .as_array()
            .expect("interfaces")
            .iter()
            .find(|s| s["name"] == iface)
            .expect("the interface's series");
        let served: u64 = ["ok", "error", "limited", "shed", "degraded"]
            .iter()
            .map(|k| {
                window
                    .iter()
                    .map(|&i| series[k][i].as_u64().expect("a count"))
                    .sum::<u64>()
            })
            .sum();
        let generated = counts.between(iface, from, to);
        eprintln!(
            "status.json: {iface} {served} requests in ({from}, {to}], generator {generated}"
        );
        assert!(
            agrees(served as f64, generated as f64),
            "{iface}: status.json {served} vs generator {generated}"
        );
    }
    let png = std::fs::metadata(&shot).expect("the screenshot was written");
    assert!(png.len() > 10_000, "the screenshot is {} bytes", png.len());
    eprintln!("screenshot: {} ({} bytes)", shot.display(), png.len());
    server.shutdown().await;
}

/// Every dynamic value the dashboard shows is written as text: the script has no HTML
/// sinks at all (a JS-free check that runs without a browser).
#[test]
fn dashboard_script_has_no_html_sinks() {
    let js = include_str!("../../proxy/src/admin/dashboard/dashboard.js");
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "createContextualFragment",
        "eval(",
    ] {
        assert!(!js.contains(sink), "dashboard.js uses {sink}");
    }
}

/// A hostile app ID (in a limit's `apps`) and a reload error quoting a hostile rule name
/// are rendered as text in a real browser; the page works with an admin token given once
/// as `#token=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_hostile_values_as_text() {
    if !Path::new(CHROMIUM).exists() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!ci, "CI=true but {CHROMIUM} is missing");
        eprintln!("SKIPPED dashboard_renders_hostile_values_as_text: {CHROMIUM} not found");
        return;
    }
    const APP: &str = "<img src=x onerror=\"document.body.dataset.pwned=1\">";
    const NAME: &str = "<img src=y onerror=\"document.body.dataset.pwned=2\">";
    const TOKEN: &str = "dashboard-test-token-0123456789";
    let up = Upstream::start().await;
    let mut c = config(&[up.addr]);
    set(
        &mut c,
        "limits",
        json!([{ "name": "hostile-app", "match": { "interfaces": ["grab"], "apps": [APP] },
                 "key": ["user"], "rate": "5/s" }]),
    );
    set(&mut c, "server/admin/token_file", json!("admin.token"));
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("admin.token"), TOKEN).expect("writing the token");
    let file = dir.path().join("tidegate.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&c).expect("serializes")).expect("writing");
    let server = tokio::time::timeout(Duration::from_secs(15), api::start_from_file(&file))
        .await
        .expect("starts in time")
        .expect("starts");
    let admin = server.admin_addr;

    // A reload refused for a hostile rule name: its error is shown on the page.
    let mut bad = c.clone();
    set(&mut bad, "routes/0/name", json!(NAME));
    std::fs::write(&file, serde_json::to_vec_pretty(&bad).expect("serializes")).expect("writing");
    let client = h1_client();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let req = Request::get(format!("http://{admin}/admin/config"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(full(Bytes::new()))
            .unwrap();
        let r = tidegate_tests::send(&client, req).await;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.json()["last_error"].is_string() {
            break;
        }
        assert!(Instant::now() < deadline, "the bad reload was not reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // a sampled second

    let url = format!("http://{admin}/admin/#token={TOKEN}");
    let dom = tokio::task::spawn_blocking(move || {
        chromium(
            &["--virtual-time-budget=3000", "--dump-dom"],
            &url,
            Duration::from_secs(60),
        )
    })
    .await
    .expect("the chromium task");
    assert!(
        dom.contains("data-state=\"live\""),
        "not live with the token:\n{dom}"
    );
    assert!(
        dom.contains("apps &lt;img src=x onerror=\"document.body.dataset.pwned=1\"&gt;"),
        "the app ID is not shown as text:\n{dom}"
    );
    assert!(
        dom.contains("&lt;img src=y onerror="),
        "the reload error is not shown as text:\n{dom}"
    );
    assert!(!dom.contains("<img"), "markup became an element:\n{dom}");
    assert!(!dom.contains("data-pwned"), "a handler ran:\n{dom}");
    assert!(!dom.contains(TOKEN), "the token stayed in the page:\n{dom}");
    server.shutdown().await;
}
