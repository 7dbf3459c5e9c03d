//! Corruption in the middle of the grab log is refused, not dropped as a torn
//! tail: the standalone backend with `fsync always` acknowledges a create and
//! three grabs, is killed with `kill -9`, and one byte of a middle frame is
//! flipped. The restart refuses (non-zero exit, segment file and byte offset
//! on stderr); `grab-backend recover` reports the records behind the damage
//! and changes nothing; `recover --truncate` repairs; the next start serves
//! the prefix and a new envelope gets an id above every acknowledged one. The
//! gateway's embedded backend refuses the same log by failing the gateway's
//! start.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tidegate_tests::api::load_rules;
use tidegate_tests::grab::{Backend, Conn, binary};
use tidegate_tests::{config, set};

/// Run `grab-backend ARGS` to completion (killed after 30 s).
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning grab-backend");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The last log segment in `dir`.
fn last_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("wal-") && n.ends_with(".log")
        })
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

/// A data dir whose log holds a create and three acknowledged grabs, with a
/// byte of the second frame (the first grab) flipped after `kill -9`.
/// Returns the envelope id, the flipped segment and the frame's offset.
async fn corrupt_log(dir: &Path) -> (u64, PathBuf, u64) {
    let mut backend = Backend::start(dir, &["--fsync", "always"]).await.unwrap();
    let mut conn = Conn::connect(backend.addr).await.unwrap();
    let (status, env) = conn
        .create(json!({"sender": "alice", "total_cents": 1000, "count": 5}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{env}");
    let id = env["id"].as_str().unwrap().to_owned();
    for u in ["u1", "u2", "u3"] {
        let (status, r) = conn.grab(&id, u).await.unwrap();
        assert_eq!(status, 200, "{r}");
    }
    backend.kill9();

    let seg = last_segment(dir);
    let mut bytes = std::fs::read(&seg).unwrap();
    let first_len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    let second = 16 + 16 + first_len;
    assert!(bytes.len() > second + 40, "the log holds more frames");
    bytes[second + 30] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();
    (id.parse().unwrap(), seg, second as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_log_flip_refuses_start_then_recover_truncate_serves_the_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (id, seg, offset) = corrupt_log(dir).await;
    let name = seg.file_name().unwrap().to_string_lossy().into_owned();
    let damaged = std::fs::read(&seg).unwrap();
    let d = dir.to_str().unwrap();

    // The restart refuses, naming the segment and the byte offset.
    let out = run(&["--data-dir", d, "--listen", "127.0.0.1:0"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "started on a corrupt log: {stderr}");
    assert!(
        !text(&out.stdout).contains("listening on"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains(&name) && stderr.contains(&format!("at byte {offset}")),
        "{stderr}"
    );
    assert!(stderr.contains("grab-backend recover"), "{stderr}");

    // `recover` reports the grabs behind the damage and changes nothing.
    let out = run(&["recover", "--data-dir", d]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{report}{}", text(&out.stderr));
    assert!(report.contains("CORRUPTION"), "{report}");
    assert!(report.contains("grab envelope=1 user=\"u2\""), "{report}");
    assert!(report.contains("grab envelope=1 user=\"u3\""), "{report}");
    assert_eq!(std::fs::read(&seg).unwrap(), damaged);

    // `recover --truncate` repairs; a second look finds nothing.
    let out = run(&["recover", "--data-dir", d, "--truncate"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("repaired:"));
    assert_eq!(run(&["recover", "--data-dir", d]).status.code(), Some(0));

    // The next start serves the prefix (the create, no grabs), and a new
    // envelope's id is above every id ever acknowledged.
    let backend = Backend::start(dir, &["--fsync", "always"]).await.unwrap();
    let mut conn = Conn::connect(backend.addr).await.unwrap();
    let (status, page, grabs) = conn.envelope_all(&id.to_string()).await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(grabs.is_empty(), "{grabs:?}");
    assert_eq!(page["remaining_cents"], 1000);
    let (status, env) = conn
        .create(json!({"sender": "bob", "total_cents": 10, "count": 1}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{env}");
    let new_id: u64 = env["id"].as_str().unwrap().parse().unwrap();
    assert!(new_id > id, "envelope id {new_id} handed out again");
}

/// The gateway's embedded grab backend refuses the same log, and so the
/// gateway does not start (rather than serve an empty store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backend_refusal_fails_the_gateway_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("grab");
    let (_, seg, offset) = corrupt_log(&dir).await;
    let mut cfg = config(&[]);
    set(
        &mut cfg,
        "upstreams",
        json!({ "grab": { "kind": "embedded", "data_dir": dir.to_str().unwrap() } }),
    );
    set(
        &mut cfg,
        "routes",
        json!([{ "name": "default", "upstream": "grab" }]),
    );
    let loaded = load_rules("test.json", &serde_json::to_vec(&cfg).unwrap()).unwrap();
    let err = match tidegate::start(loaded).await {
        Ok(_) => panic!("the gateway started over a corrupt grab log"),
        Err(e) => format!("{e:#}"),
    };
    let name = seg.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        err.contains(&name) && err.contains(&format!("at byte {offset}")),
        "{err}"
    );
}
