//! Support for the grab-backend end-to-end tests: a small HTTP/1 client over
//! one connection, an in-process server on port 0, and the standalone binary
//! as a child process that is killed on drop.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "shared by several test binaries, each using a different subset"
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// One HTTP/1.1 keep-alive connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, addr })
    }

    /// Send one request; returns the status and the JSON body (Null if empty
    /// or not JSON).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        user: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        self.sender.ready().await?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if let Some(u) = user {
            req = req.header("x-user-id", u);
        }
        let bytes = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(b)?)
            }
            None => Bytes::new(),
        };
        let resp = self
            .sender
            .send_request(req.body(Full::new(bytes))?)
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, json))
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.request("GET", path, None, None).await
    }

    pub async fn create(&mut self, body: Value) -> anyhow::Result<(u16, Value)> {
        self.request("POST", "/envelopes", None, Some(&body)).await
    }

    pub async fn grab(&mut self, id: &str, user: &str) -> anyhow::Result<(u16, Value)> {
        self.request("POST", &format!("/envelopes/{id}/grab"), Some(user), None)
            .await
    }

    /// All grabs of an envelope, following pages.
    pub async fn envelope_all(&mut self, id: &str) -> anyhow::Result<(u16, Value, Vec<Value>)> {
        let mut grabs = Vec::new();
        let mut first = Value::Null;
        loop {
            let (status, page) = self
                .get(&format!("/envelopes/{id}?offset={}&limit=500", grabs.len()))
                .await?;
            if status != 200 {
                return Ok((status, page, grabs));
            }
            let items = page["grabs"].as_array().cloned().unwrap_or_default();
            let done = items.len() < 500;
            grabs.extend(items);
            if first.is_null() {
                first = page;
            }
            if done {
                return Ok((200, first, grabs));
            }
        }
    }
}

/// An in-process backend on 127.0.0.1:0 over a temporary directory.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    pub async fn start(config: grab_backend::Config) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(grab_backend::serve(listener, config, async move {
            let _ = rx.await;
        }));
        let server = Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        };
        wait_healthy(addr, Duration::from_secs(10)).await?;
        Ok(server)
    }

    /// Graceful shutdown; returns what `serve` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("stopped once");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .context("serve did not stop")??
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Poll `/healthz` until it answers 200.
pub async fn wait_healthy(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut c) = Conn::connect(addr).await {
            if let Ok((200, _)) = c.get("/healthz").await {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{addr} not healthy within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until settlement has applied everything appended (`/stats` says
/// `settled`); returns the stats.
pub async fn wait_settled(addr: SocketAddr, within: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + within;
    let mut c = Conn::connect(addr).await?;
    loop {
        let (status, stats) = c.get("/stats").await?;
        if status == 200 && stats["settled"] == Value::Bool(true) {
            return Ok(stats);
        }
        if Instant::now() > deadline {
            bail!("settlement did not catch up within {within:?}: {stats}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The standalone `grab-backend` binary, built once per test process into
/// the same target directory as this test (cargo cannot hand a test another
/// package's binary via `CARGO_BIN_EXE_*`).
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // current_exe: <target>/<profile>/deps/<test>-<hash>
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_owned();
        let target_dir = profile_dir.parent().expect("target dir").to_owned();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "grab-backend",
            "--bin",
            "grab-backend",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for grab-backend");
        assert!(status.success(), "cargo build -p grab-backend failed");
        let bin = profile_dir.join(format!("grab-backend{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// The standalone backend as a child process; SIGKILLed on drop.
pub struct Backend {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl Backend {
    /// Start `grab-backend --data-dir DIR --listen 127.0.0.1:0 ARGS` and wait
    /// for its `listening on` line and a healthy `/healthz`.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning grab-backend")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut backend = Self {
            child: Some(child),
            addr: "127.0.0.1:0".parse()?,
        };
        let line = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await
        .context("no `listening on` line within 30s")???;
        backend.addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        wait_healthy(backend.addr, Duration::from_secs(30)).await?;
        Ok(backend)
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("did not exit within 20s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A tiny deterministic PRNG (xorshift64*), so the tests need no RNG crate
/// and a failing seed can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn from_env_or_time(var: &str) -> (Self, u64) {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        (Self::new(seed), seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

// === the crash workload (shared by the embedded and Redis crash tests) ===

/// Users the crash workload grabs as (`u0`..).
pub const USERS: u64 = 200;
/// Senders the crash workload creates as (`s0`..).
pub const SENDERS: u64 = 8;

/// What clients saw acknowledged, across all rounds.
#[derive(Default)]
pub struct Acked {
    /// id → (total_cents, count); numeric ids, so the last keys are the newest
    pub envelopes: BTreeMap<u64, (u64, u64)>,
    /// (envelope id, user) → amount
    pub grabs: HashMap<(String, String), u64>,
    /// Amounts a client saw for a grab that disagreed with an earlier ack.
    pub mismatches: Vec<String>,
}

/// One client: creates (10%) and grabs (90%) until the server dies or `stop`.
/// Returns 1 if it was still running when the server died.
pub async fn load(
    addr: std::net::SocketAddr,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
    worker: usize,
) -> usize {
    let mut rng = Rng::new(seed);
    let Ok(mut conn) = Conn::connect(addr).await else {
        return 0;
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let pick = {
            let a = acked.lock().unwrap();
            if a.envelopes.is_empty() || rng.range(0, 10) == 0 {
                None
            } else {
                // Prefer recent envelopes so they fill up and go empty.
                let n = a.envelopes.len() as u64;
                let i = n - 1 - rng.range(0, n.min(12));
                a.envelopes.keys().nth(i as usize).map(u64::to_string)
            }
        };
        match pick {
            None => {
                let count = rng.range(3, 40);
                let total = count * rng.range(1, 300);
                // A fifth expire in a second, so refunds race the crashes too.
                let expires = if rng.range(0, 5) == 0 { 1 } else { 3_600 };
                let sender = format!("s{}", rng.range(0, SENDERS));
                let body = json!({"sender": sender, "total_cents": total, "count": count, "expires_in_s": expires});
                match conn.create(body).await {
                    Ok((201, v)) => {
                        let id: u64 = v["id"].as_str().unwrap().parse().unwrap();
                        acked.lock().unwrap().envelopes.insert(id, (total, count));
                    }
                    Ok((status, v)) => panic!("worker {worker}: create answered {status} {v}"),
                    Err(_) => return 1,
                }
            }
            Some(id) => {
                let user = format!("u{}", rng.range(0, USERS));
                match conn.grab(&id, &user).await {
                    Ok((200, v)) => {
                        let amount = v["amount_cents"].as_u64().unwrap();
                        let mut a = acked.lock().unwrap();
                        let prev = *a.grabs.entry((id.clone(), user.clone())).or_insert(amount);
                        if prev != amount {
                            a.mismatches
                                .push(format!("{id}/{user}: {prev} then {amount}"));
                        }
                    }
                    Ok((410, _)) => {}
                    Ok((status, v)) => panic!("worker {worker}: grab answered {status} {v}"),
                    Err(_) => return 1,
                }
            }
        }
    }
    0
}

/// Check the recovered server against everything acknowledged so far.
pub async fn verify(addr: std::net::SocketAddr, acked: &Mutex<Acked>, round: usize) {
    let (envelopes, grabs) = {
        let a = acked.lock().unwrap();
        (a.envelopes.clone(), a.grabs.clone())
    };
    let mut by_env: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for ((id, user), amount) in grabs {
        by_env.entry(id).or_default().push((user, amount));
    }
    let mut conn = Conn::connect(addr).await.unwrap();
    for (id, (total, count)) in &envelopes {
        let id = &id.to_string();
        let (status, env, list) = conn.envelope_all(id).await.unwrap();
        assert_eq!(
            status, 200,
            "round {round}: acknowledged envelope {id} lost"
        );
        assert_eq!(
            env["total_cents"].as_u64(),
            Some(*total),
            "round {round}: envelope {id}"
        );
        assert_eq!(
            env["count"].as_u64(),
            Some(*count),
            "round {round}: envelope {id}"
        );
        let grabbed: u64 = list
            .iter()
            .map(|g| g["amount_cents"].as_u64().unwrap())
            .sum();
        let remaining = env["remaining_cents"].as_u64().unwrap();
        let refunded = env["refunded_cents"].as_u64().unwrap_or(0);
        assert_eq!(
            grabbed + remaining + refunded,
            *total,
            "round {round}: envelope {id} leaks money: {env}"
        );
        assert_eq!(
            list.len() as u64 + env["remaining_count"].as_u64().unwrap(),
            *count,
            "round {round}: {id}"
        );
        let mut seen = HashSet::new();
        let amounts: HashMap<&str, u64> = list
            .iter()
            .map(|g| {
                let u = g["user"].as_str().unwrap();
                assert!(
                    seen.insert(u),
                    "round {round}: user {u} grabbed envelope {id} twice"
                );
                (u, g["amount_cents"].as_u64().unwrap())
            })
            .collect();
        for (user, amount) in by_env.get(id).map(Vec::as_slice).unwrap_or_default() {
            assert_eq!(
                amounts.get(user.as_str()),
                Some(amount),
                "round {round}: acknowledged grab {id}/{user} of {amount} not recovered"
            );
        }
    }
}
